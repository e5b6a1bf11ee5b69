"""Datasets: readers (LETTER folder, P5, raw Amazon), the leave-one-out split, item code files,
the synthetic dataset and summary statistics."""
from letter.data.dataset import Dataset, build_dataset
from letter.data.index import read_index_json, write_index_json
from letter.data.readers import load_dataset, read_amazon, read_letter, read_p5, write_letter
from letter.data.split import Split, drop_leading_padding, leave_one_out, pad_left
from letter.data.synth import SyntheticSettings, make_synthetic

__all__ = [
    "Dataset",
    "Split",
    "SyntheticSettings",
    "build_dataset",
    "leave_one_out",
    "load_dataset",
    "make_synthetic",
    "pad_left",
    "drop_leading_padding",
    "read_amazon",
    "read_index_json",
    "read_letter",
    "read_p5",
    "write_index_json",
    "write_letter",
]
