"""The LETTER tokenizer: an RQ-VAE with semantic, collaborative and diversity regularization.

    from letter.tokenizer import TokenizerConfig, train_tokenizer, load_tokenizer, encode
    report = train_tokenizer(TokenizerConfig(epochs=100), text_emb, cf_emb, "runs/tok", name="Scientific")
    report = prepare_tokenizer_inputs("data/Scientific", TokenizerConfig()).train("runs/tok")  # files beside the data
    codes = encode("runs/tok", new_item_text_emb)        # cold start, [n, L]
"""
from .config import TokenizerConfig
from .inference import Tokenizer, encode, load_tokenizer
from .inputs import TokenizerInputs, prepare_tokenizer_inputs
from .train import train_tokenizer

__all__ = ["TokenizerConfig", "Tokenizer", "TokenizerInputs", "encode", "load_tokenizer", "prepare_tokenizer_inputs",
           "train_tokenizer"]
