"""Which torch device a command runs on: one rule for every trainer, evaluation and serving."""
from __future__ import annotations

import torch

from letter.errors import LetterError


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """'auto'/None: this rank's GPU when CUDA is available, else the CPU; 'cuda' under torchrun:
    the rank's own GPU. A device this torch cannot use is a LetterError."""
    text = "auto" if device is None else str(device)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise LetterError(f"--device {text!r}: not a device name ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LetterError(f"--device {text}: this torch has no usable CUDA device (torch {torch.__version__})")
        index = local_rank if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise LetterError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise LetterError(f"--device {text}: only cpu and cuda devices are supported")
    return dev
