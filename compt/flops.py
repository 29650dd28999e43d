"""FLOP counting shared by every family: one call counted with torch.utils.flop_counter
(on the meta device, free even for large models), and FLOP figures for people.

Conventions (compt/clip/flops.py, compt/llama/flops.py): one FLOP is one multiply or one add;
only matmuls and convolutions count.
"""
from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` as torch.utils.flop_counter counts them (matmuls and convolutions)."""
    # F.scaled_dot_product_attention, which nn.MultiheadAttention calls inside open_clip's
    # blocks, decomposes to two bmm's on meta (math backend), so attention is counted;
    # on CUDA the flash / mem-efficient ops are counted by FlopCounterMode directly.
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


_UNITS = ((1e21, "ZFLOP"), (1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"),
          (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "KFLOP"))


def format_flops(x: float) -> str:
    """Three significant figures and an SI unit: "1.23 TFLOP", "456 GFLOP", "7.8 MFLOP"."""
    magnitude = abs(x)
    for scale, unit in _UNITS:
        # Compare after rounding, so 999.7e9 prints as "1 TFLOP", not "1e+03 GFLOP".
        if float(f"{magnitude / scale:.3g}") >= 1:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"
