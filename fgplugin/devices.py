"""The one place a device name becomes a torch device ("auto": CUDA when there is one, else CPU)."""

from __future__ import annotations

import torch

from .errors import SettingError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda if available else cpu; any other name as torch reads it. A CUDA device on a
    machine without CUDA is refused (SettingError) rather than failing later inside the first forward."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SettingError(f"device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"device {device!r}: this machine has no CUDA device (use --device cpu or auto)")
    return dev
