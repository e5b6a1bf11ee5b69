"""Which torch device a command runs on: one rule for every trainer, evaluation and serving."""
from __future__ import annotations

import torch

from letter.errors import SettingError


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """'auto'/None: this rank's GPU when CUDA is available, else the CPU; 'cuda' under torchrun:
    the rank's own GPU. A device this torch cannot use is a SettingError naming `device`."""
    text = "auto" if device is None else str(device)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise SettingError("device", f"{text!r}: not a device name ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError("device", f"{text}: this torch has no usable CUDA device (torch {torch.__version__})")
        index = local_rank if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise SettingError("device", f"{text}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise SettingError("device", f"{text}: only cpu and cuda devices are supported")
    return dev
