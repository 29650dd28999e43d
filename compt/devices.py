"""Where tensors go: the device and dtype a model (a DeepSpeed engine, a ZeRO-3 partitioned
module, a plain module) computes in, and moving inputs there. Placement comes from the
model itself, which DeepSpeed put on its accelerator (``get_accelerator()``), so nothing
here names a device type.
"""
from __future__ import annotations

from typing import Any

import torch


def placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, floating dtype) of ``model``'s parameters; a ZeRO-3 parameter's own partition counts."""
    for p in model.parameters():
        t = getattr(p, "ds_tensor", p)
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def to_device(x: Any, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False):
    """A tensor on ``device``; floating tensors also cast to ``dtype`` (token ids and labels keep theirs).
    None stays None. On the tensor's own device and dtype this returns the tensor itself."""
    if x is None:
        return None
    if dtype is not None and x.is_floating_point():
        return x.to(device=device, dtype=dtype, non_blocking=non_blocking)
    return x.to(device=device, non_blocking=non_blocking)


def collective_device() -> torch.device:
    """Where a tensor for a torch.distributed collective must live: the accelerator for NCCL-like backends,
    the CPU for gloo (and without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() != "gloo":
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())
    return torch.device("cpu")
