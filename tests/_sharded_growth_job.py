"""Run under the deepspeed launcher: build a ZeRO-3-partitioned student (library init gathered per call),
grow it rank by rank and save it; load the small model as a sharded frozen teacher and run it.

usage: deepspeed [--num_gpus N] tests/_sharded_growth_job.py SMALL.safetensors SMALL.json BIG.json MODES OUT_PREFIX
MODES comma-separated; "none" saves the initialised student ungrown. Writes OUT_PREFIX-<mode>.safetensors,
OUT_PREFIX-teacher.safetensors (the sharded teacher saved back) and, from rank 0, OUT_PREFIX-teacher.pt (its
outputs on fixed inputs). The family is the one that recognises BIG.json.
"""
import json
import sys
from pathlib import Path

import deepspeed
import torch

from compt.config import Transfer
from compt.distributed import release_shared_memory
from compt.families import all_families
from compt.partition import frozen_engine, load_partitioned
from compt.stage import StageResult, grow_into, init_student
from compt.weights import save_zero3_module

small_path, small_cfg, big_cfg, modes, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
deepspeed.init_distributed()
release_shared_memory(torch.distributed.get_rank(), torch.distributed.get_world_size())  # as compt's launcher does
small_cfg, big_cfg = json.loads(Path(small_cfg).read_text()), json.loads(Path(big_cfg).read_text())
family = next(f for f in all_families() if f.is_model_config(big_cfg))
ds = {"train_batch_size": 2, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
prev = StageResult(0, "small", small_cfg, Path(small_path).parent, Path(small_path), None, {})
world = torch.distributed.get_world_size()
for mode in modes.split(","):
    model = init_student(family=family, model_cfg=big_cfg, teacher_cfg=None, seed=7, zero3_config=ds)
    assert all(p.ds_tensor.numel() * world >= p.ds_numel and (world == 1 or p.ds_tensor.numel() < p.ds_numel)
               for p in model.parameters() if p.ds_numel > 64)
    if mode != "none":
        grow_into(family=family, model=model, prev=prev, model_cfg=big_cfg, transfer=Transfer(init=mode, noise=0.05),
                  seed=3, zero3=True)
    save_zero3_module(model, f"{out}-{mode}.safetensors", rename=family.export_name)

teacher = frozen_engine(load_partitioned(lambda: family.build(small_cfg, None), small_path, ds, family.export_name),
                        ds).module
assert all(p.ds_tensor.numel() < p.ds_numel for p in teacher.parameters() if p.ds_numel > 64 and world > 1)
assert not any(p.requires_grad for p in teacher.parameters())
save_zero3_module(teacher, f"{out}-teacher.safetensors", rename=family.export_name)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    if family.name == "llama":
        from compt.llama.train import teacher_outputs

        outputs = teacher_outputs(teacher, torch.randint(0, small_cfg["vocab_size"], (2, 9), generator=g))
    else:
        size, ctx = small_cfg["vision_cfg"]["image_size"], small_cfg["text_cfg"]["context_length"]
        outputs = teacher(torch.randn(2, 3, size, size, generator=g), torch.randint(0, 400, (2, ctx), generator=g))[:2]
if torch.distributed.get_rank() == 0:
    torch.save([t.clone() for t in outputs], f"{out}-teacher.pt")
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # a clean exit: live gloo threads abort the process otherwise
