"""Collaborative-filtering item embeddings: SASRec trained on the leave-one-out split."""
from letter.cf.model import SASRec
from letter.cf.train import CFConfig, output_paths, popularity_metrics, train_cf

__all__ = ["CFConfig", "SASRec", "output_paths", "popularity_metrics", "train_cf"]
