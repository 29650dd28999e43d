"""Models that no rank ever holds whole: built straight into ZeRO-3 partitions with their library's own
initialisation, frozen teachers read slice by slice from safetensors, and parameters gathered on demand.

``deepspeed.zero.Init`` partitions each module as soon as its own ``__init__`` returns. Libraries that
initialise weights later, from a parent's ``__init__`` (open_clip's ``TextTransformer.init_parameters``,
transformers' ``post_init`` -> ``_initialize_weights``), then write into empty partitions and their init
is silently lost. A family names those functions (:class:`LibraryInit`); :func:`build_partitioned` runs
each call with exactly the parameters it writes gathered (DeepSpeed's ``GatheredParameters``,
``modifier_rank=0``), so a rank holds at most one module's parameters in full, and the random-number
stream is consumed in the same order as an unpartitioned build: the same seed gives the same weights
for any rank count.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from compt.weights import open_lazy


@dataclass(frozen=True)
class LibraryInit:
    """A function ``owner.name`` that a model library calls after modules were constructed, to set weights;
    ``writes(*args, **kwargs)`` gives the parameters one call (with those arguments) writes."""

    owner: Any
    name: str
    writes: Callable[..., Iterable[torch.nn.Parameter]]


# torch.nn.init's in-place initialisers: each writes its first argument.
TORCH_INIT_NAMES = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                    "sparse_")


def torch_inits() -> list[LibraryInit]:
    """For libraries that re-initialise tensor by tensor through ``torch.nn.init`` (looked up at call time),
    plus torch's own late init: ``nn.MultiheadAttention`` resets its ``out_proj`` child from its own
    ``__init__`` (through names it imported, which the ``torch.nn.init`` entries do not see)."""
    return [LibraryInit(torch.nn.init, name, lambda tensor, *args, **kwargs: [tensor])
            for name in TORCH_INIT_NAMES if hasattr(torch.nn.init, name)] + [
        LibraryInit(torch.nn.MultiheadAttention, "_reset_parameters", lambda module: module.parameters())]


def is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose full value is not on this rank right now."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE


@contextlib.contextmanager
def gathered_during(inits: Sequence[LibraryInit]) -> Iterator[None]:
    """While active, every call of an ``inits`` function runs with the partitioned parameters it writes
    gathered; what rank 0 computed is what every rank keeps (the same seed makes them equal anyway)."""
    import deepspeed

    def wrap(entry: LibraryInit, original: Callable) -> Callable:
        def gathered(*args, **kwargs):
            params = [p for p in entry.writes(*args, **kwargs) if is_partitioned(p)]
            if not params:
                return original(*args, **kwargs)
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                return original(*args, **kwargs)
        return gathered

    saved = []
    try:
        for entry in inits:
            # the owner's own attribute (not an inherited one), so putting it back leaves the class as it was
            own = entry.owner.__dict__.get(entry.name) if isinstance(entry.owner, type) else None
            original = getattr(entry.owner, entry.name)
            saved.append((entry, own, original))
            setattr(entry.owner, entry.name, wrap(entry, original))
        yield
    finally:
        for entry, own, original in reversed(saved):
            if isinstance(entry.owner, type) and own is None:
                delattr(entry.owner, entry.name)
            else:
                setattr(entry.owner, entry.name, own if own is not None else original)


def build_partitioned(build: Callable[[], torch.nn.Module], zero3_config: dict,
                      inits: Sequence[LibraryInit] = ()) -> torch.nn.Module:
    """``build()`` constructed straight into ZeRO-3 partitions (its own ``zero.Init`` context), the library
    functions ``inits`` run with their parameters gathered. Without ``inits`` weights keep only what each
    module's constructor set: for models whose every weight is overwritten next (growth, a checkpoint)."""
    import deepspeed

    # Once on the meta device first (no memory, no random draws): a module class that a library imports
    # lazily, during the build, would be defined inside zero.Init, and on leaving it DeepSpeed 0.19.8 puts back
    # the __init__ the class had when defined, dropping what decorators added afterwards (transformers' hub
    # kernels: LlamaAttention then fails in its forward).
    with torch.device("meta"):
        build()
    with deepspeed.zero.Init(config_dict_or_path=zero3_config), gathered_during(inits):
        return build()


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """``p``'s whole value: ``p`` itself when it is not partitioned, else a gathered copy (collective)."""
    if not is_partitioned(p):
        return p
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        return p.detach().clone()


Rename = Callable[[str, torch.Tensor], "tuple[str, torch.Tensor] | None"]


def load_partitioned(build: Callable[[], torch.nn.Module], weights: str | Path, zero3_config: dict,
                     rename: Rename) -> torch.nn.Module:
    """A frozen model built into ZeRO-3 partitions (in the config's training dtype) whose weights are read
    from the safetensors file ``weights`` one tensor at a time: each rank reads and copies only the rows
    that hold its own flat slice. ``rename(name, tensor)`` maps a parameter to its name in the file (as the
    family's export does; the file's tensor may differ in shape but not in size). ValueError names tensors
    missing from the file or left unused."""
    import torch.distributed as dist

    model = build_partitioned(build, zero3_config)
    rank = dist.get_rank() if dist.is_initialized() else 0
    used = set()
    with open_lazy(weights) as src:
        missing = []
        for name, p in model.named_parameters():
            shape = tuple(getattr(p, "ds_shape", p.shape))
            renamed = rename(name, torch.empty(shape, device="meta"))
            if renamed is None:
                continue
            stored = renamed[0]
            if stored not in src or src.numel(stored) != torch.Size(shape).numel():
                missing.append(f"{stored} {list(shape)}")
                continue
            used.add(stored)
            with torch.no_grad():
                if hasattr(p, "ds_tensor"):
                    part = p.ds_tensor.data  # this rank's flat slice [start, start + size) of the padded tensor
                    start = part.numel() * rank
                    end = min(start + part.numel(), p.ds_numel)
                    if end > start:
                        part[: end - start].copy_(src.flat_range(stored, start, end))
                else:
                    p.data.copy_(src.get(stored).reshape(p.shape))
        unused = sorted(set(src.keys()) - used)
    if missing or unused:
        raise ValueError(f"{weights} does not fit the model: missing or mis-sized {missing[:5]}, "
                         f"unexpected {unused[:5]}")
    return model.eval().requires_grad_(False)


def frozen_engine(model: torch.nn.Module, ds_config: dict):
    """DeepSpeed's ZeRO-3 inference path for a partitioned frozen ``model`` (as transformers and TRL run
    reference models): an engine without optimizer, whose hooks gather each module's parameters for its
    forward and release them after; no gradients, no optimizer state. Returns the engine; call its module."""
    import deepspeed

    config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.module.eval()
    return engine
