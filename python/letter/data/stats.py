"""Summary statistics of a Dataset (`letter data stats`)."""
import numpy as np

from letter.data.dataset import Dataset


def dataset_stats(dataset: Dataset) -> dict:
    lengths = np.array([len(s) for s in dataset.sequences], dtype=np.int64)
    users, items = dataset.num_users, dataset.num_items
    interactions = dataset.num_interactions
    pct = (0, 25, 50, 75, 90, 99, 100)
    return {
        "name": dataset.name,
        "users": users,
        "items": items,
        "interactions": interactions,
        "sparsity": 1.0 - interactions / (users * items) if users and items else 1.0,
        "mean_length": float(lengths.mean()) if users else 0.0,
        "length_percentiles": {f"p{p}": float(np.percentile(lengths, p)) for p in pct} if users else {},
        "items_without_interactions": items - len({i for s in dataset.sequences for i in s}),
        "has_item_text": dataset.item_text is not None,
    }
