"""The model families a chain can train; each implements the same stage methods
(build, plan, load_teacher, loss, train_loader, init_metrics, evaluate, sample_flops,
export_name, write_config, summary): see compt/clip/family.py and compt/llama/family.py."""
from __future__ import annotations

FAMILIES = ("clip", "llama")


def family_of(name: str):
    if name == "clip":
        from compt.clip.family import ClipFamily

        return ClipFamily()
    if name == "llama":
        from compt.llama.family import LlamaFamily

        return LlamaFamily()
    raise ValueError(f"unknown model family {name!r}; use one of {FAMILIES}")
