"""Collaborative-filtering item embeddings: SASRec trained on the leave-one-out split."""
from letter.cf.config import CFConfig
from letter.cf.model import SASRec
from letter.cf.train import full_ranking_metrics, output_paths, popularity_metrics, train_cf

__all__ = ["CFConfig", "SASRec", "full_ranking_metrics", "output_paths", "popularity_metrics", "train_cf"]
