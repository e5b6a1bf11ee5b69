"""Generative recommenders on learnable item identifiers: TIGER (default) and LC-Rec
(RecConfig(model="lcrec", base_model=LOCAL_LLM_FOLDER)), behind one trainer, evaluation and CLI.

Python API (the CLI commands train-rec / evaluate / recommend call exactly these):
  RecConfig                          settings; defaults = the authors' LETTER-TIGER setup
  train_rec(config, data, codes, out_dir, *, resume=False, stop_after=None, checkpoint_minutes=None) -> summary dict
  EvaluateSettings                   split, num_beams, batch_size, max_users, decoder, exclude_history
  evaluate(run_dir, split=None, *, settings=None, out=None, index_version=None, max_new_share=None,
           ..., **settings_values) -> dict
  recommend(run_dir, history [original item ids], k=10, *, exclude_history=False, index_version=None,
            max_new_share=None) -> [{item_id, title, score, code}]
  RunRecommender(run_dir, beams=20).recommend([Query(...), ...])   a run loaded once, batched queries
  load_run(run_dir, index_version=None) -> (Tiger or LCRec model, RecData, RecConfig)
  add_items(run_dir, tokenizer_dir, embeddings)   new items -> a new index version (index_versions.py)
  evaluate_cold(run_dir, text_emb=..., cf_dir=...)  the cold-split report (cold.py)
`data` is a dataset path (any format letter.data reads) or a letter.data.Dataset; `codes` an
array [num_items, L], an authors'-format index .json, a codes .npy or a tokenizer run folder.
"""
from .config import RecConfig
from .data import RecData, load_rec_data, resolve_codes
from .evaluation import EvaluateSettings, evaluate, generate, load_run
from .model import Tiger, TokenLayout
from .recommend import Query, RunRecommender, recommend
from .train import train_rec

__all__ = ["EvaluateSettings", "Query", "RecConfig", "RecData", "RunRecommender", "Tiger", "TokenLayout", "evaluate", "generate", "load_rec_data", "load_run",
           "recommend", "resolve_codes", "train_rec"]
