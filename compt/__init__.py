"""compt: Chain-of-Models Pre-Training (CoM-PT) on DeepSpeed.

Trains a family of models as a chain, smallest first; each larger model starts
from its predecessor (parameter space) and aligns to it (feature space).
"""
__version__ = "0.1.0"
