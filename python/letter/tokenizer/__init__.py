"""The LETTER tokenizer: an RQ-VAE with semantic, collaborative and diversity regularization.

    from letter.tokenizer import TokenizerConfig, train_tokenizer, load_tokenizer, encode
    report = train_tokenizer(TokenizerConfig(epochs=100), text_emb, cf_emb, "runs/tok", name="Scientific")
    codes = encode("runs/tok", new_item_text_emb)        # cold start, [n, L]
"""
from .config import TokenizerConfig
from .inference import Tokenizer, encode, load_tokenizer
from .train import train_tokenizer

__all__ = ["TokenizerConfig", "Tokenizer", "encode", "load_tokenizer", "train_tokenizer"]
