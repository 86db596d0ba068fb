"""One device syntax for every step: auto | cpu | cuda | cuda:N."""
from __future__ import annotations

from ooc_universal.errors import OocError, UsageError

DEVICE_HELP = "auto (CUDA when torch sees a GPU, else cpu), cpu, cuda or cuda:N"


def resolve_device(device="auto"):
    """The torch.device for `device`; one line naming the value and the fix otherwise."""
    import torch
    text = "auto" if device is None else str(device).strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise UsageError(f"--device {text!r} is not a device; expected {DEVICE_HELP}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise OocError(f"--device {text!r}: torch sees no CUDA GPU; use --device cpu "
                           "or install a CUDA build of torch")
        if index and int(index) >= torch.cuda.device_count():
            raise OocError(f"--device {text!r}: only {torch.cuda.device_count()} CUDA "
                           f"device(s) visible; use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return torch.device(text)


def device_name(device="auto") -> str:
    """The resolved device as text ("cpu", "cuda", "cuda:1"), for plans and records."""
    return str(resolve_device(device))
