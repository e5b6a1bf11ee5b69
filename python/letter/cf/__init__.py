"""Collaborative-filtering item embeddings: SASRec or LightGCN trained on the leave-one-out split."""
from letter.cf.config import CFConfig
from letter.cf.model import SASRec
from letter.cf.train import output_paths, popularity_metrics, ranking_metrics, train_cf

__all__ = ["CFConfig", "SASRec", "output_paths", "popularity_metrics", "ranking_metrics", "train_cf"]
