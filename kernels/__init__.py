"""compt.kernels: CoM-PT-specific compute, each kernel beside its PyTorch reference.

Installed as ``compt.kernels`` (never as a top-level ``kernels`` package).
"""
import os as _os
import sys as _sys

if __name__ != "compt.kernels":
    # This folder was found as a top-level ``kernels`` because the repository root is on sys.path
    # (``python -m pytest`` or ``python -c`` run from a checkout). A PyPI package has that name and
    # transformers (>= 5.2x depends on it) imports it: hand every such import the real package, never
    # this folder. Raises ModuleNotFoundError, as a plain ``import kernels`` would, when it is not installed.
    import importlib as _importlib

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _saved = _sys.path[:]
    del _sys.modules[__name__]
    _sys.path[:] = [p for p in _saved if _os.path.abspath(p or _os.curdir) != _root]
    try:
        _sys.modules[__name__] = _importlib.import_module(__name__)  # the import system returns this module
    finally:
        _sys.path[:] = _saved
else:
    from compt.kernels.alignment import feature_alignment_loss_reference
    from compt.kernels.alignment_triton import NonFiniteInputError, feature_alignment_loss
    from compt.kernels.distill import distill_kl_reference
    from compt.kernels.distill_triton import fused_linear_kl
    from compt.kernels.expansion_triton import PreparedExpansion, expand_flat_slice, prepare_expansion
    from compt.kernels.head import HeadLoss, lm_head_loss_reference
    from compt.kernels.head_triton import fused_lm_head_loss

    __all__ = ["feature_alignment_loss", "feature_alignment_loss_reference", "NonFiniteInputError",
               "expand_flat_slice", "prepare_expansion", "PreparedExpansion",
               "fused_linear_kl", "distill_kl_reference", "fused_lm_head_loss", "lm_head_loss_reference",
               "HeadLoss"]
