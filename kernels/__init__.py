"""compt.kernels: CoM-PT-specific compute, each kernel beside its PyTorch reference.

Installed as ``compt.kernels`` (never as a top-level ``kernels`` package).
"""
from compt.kernels.alignment import feature_alignment_loss_reference
from compt.kernels.alignment_triton import NonFiniteInputError, feature_alignment_loss
from compt.kernels.distill import distill_kl_reference
from compt.kernels.distill_triton import fused_linear_kl
from compt.kernels.expansion_triton import PreparedExpansion, expand_flat_slice, prepare_expansion

__all__ = ["feature_alignment_loss", "feature_alignment_loss_reference", "NonFiniteInputError",
           "expand_flat_slice", "prepare_expansion", "PreparedExpansion",
           "fused_linear_kl", "distill_kl_reference"]
