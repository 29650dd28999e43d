"""Run under the deepspeed launcher: grow a ZeRO-3-partitioned student rank by rank and save it.

usage: deepspeed [--num_gpus N] tests/_sharded_growth_job.py SMALL.safetensors SMALL.json BIG.json MODES OUT_PREFIX
(MODES comma-separated; writes OUT_PREFIX-<mode>.safetensors; the family is the one that recognises BIG.json)
"""
import json
import sys
from pathlib import Path

import deepspeed
import torch

from compt.config import Transfer
from compt.families import all_families
from compt.stage import StageResult, grow_into, init_student
from compt.weights import save_zero3_module

small_path, small_cfg, big_cfg, modes, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
deepspeed.init_distributed()
small_cfg, big_cfg = json.loads(Path(small_cfg).read_text()), json.loads(Path(big_cfg).read_text())
family = next(f for f in all_families() if f.is_model_config(big_cfg))
ds = {"train_batch_size": 2, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
prev = StageResult(0, "small", small_cfg, Path(small_path).parent, Path(small_path), None, {})
for mode in modes.split(","):
    model = init_student(family=family, model_cfg=big_cfg, teacher_cfg=None, seed=7, zero3_config=ds)
    world = torch.distributed.get_world_size()
    assert all(p.ds_tensor.numel() * world >= p.ds_numel and (world == 1 or p.ds_tensor.numel() < p.ds_numel)
               for p in model.parameters() if p.ds_numel > 64)
    grow_into(family=family, model=model, prev=prev, model_cfg=big_cfg, transfer=Transfer(init=mode, noise=0.05),
              seed=3, zero3=True)
    save_zero3_module(model, f"{out}-{mode}.safetensors", rename=family.export_name)
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # a clean exit: live gloo threads abort the process otherwise
