"""Checkpoint faults on a real 1-rank DeepSpeed engine (a helper of tests/test_faults.py).

    python tests/_checkpoint_job.py SCENARIO DIR

Prints one JSON line with what happened; scenarios: fallback, all-corrupt, disk-full.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
from pathlib import Path

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29731")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from compt.checkpoint import CheckpointError, StageCheckpointer  # noqa: E402
from compt.config import TrainSettings  # noqa: E402
from compt.distributed import release_shared_memory  # noqa: E402
from compt.engine import build_engine, read_ds_config, stage_ds_config  # noqa: E402
from compt.families import family_of  # noqa: E402
from compt.stage import init_student  # noqa: E402
from conftest import REPO, tiny_model  # noqa: E402

scenario, root = sys.argv[1], Path(sys.argv[2])
deepspeed.init_distributed(dist_backend="gloo")
release_shared_memory(torch.distributed.get_rank(), torch.distributed.get_world_size())  # as compt's launcher does
ds = stage_ds_config(read_ds_config(REPO / "ds_configs" / "zero3.json"), TrainSettings(batch_size=4), 10, 1)


def engine():
    clip = family_of("clip")
    return build_engine(init_student(clip, tiny_model(), None, 0, ds), ds, 0.1, clip.no_decay)


def weights(e) -> list[torch.Tensor]:
    return [p.ds_tensor.detach().clone() for p in e.module.parameters()]


def train_step(e) -> None:
    x, t = torch.randn(4, 3, 16, 16), torch.randint(0, 100, (4, 12))
    img, txt, _ = e(x, t)
    e.backward((img - txt).pow(2).mean())
    e.step()


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + str(root / "pwned"),))


out: dict = {}
e = engine()
ck = StageCheckpointer(e, root, 0, 0, keep=3, rank=0)
train_step(e)
ck.save(2, {"step": 2})
at_two = weights(e)
train_step(e)

if scenario == "disk-full":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over-limit writes fail with EFBIG instead of killing us
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        ck.save(4, {"step": 4})
        out["error"] = None
    except CheckpointError as err:
        out["error"] = str(err)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
else:
    ck.save(4, {"step": 4})
    if scenario in ("fallback", "all-corrupt"):
        victim = next((root / "step00000004").glob("*optim_states.pt"))
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01  # one flipped bit deep inside the optimizer state
        victim.write_bytes(bytes(data))
    if scenario == "unsafe-pickle":  # a file that would run code if unpickled, with matching hashes
        target = next((root / "step00000004").glob("*model_states.pt"))
        torch.save({"module": None, "payload": Exploit()}, target)
        from compt.checkpoint import HASHES
        from compt.weights import sha256_file
        hashes = json.loads((root / "step00000004" / HASHES).read_text())
        hashes[target.name] = sha256_file(target)
        (root / "step00000004" / HASHES).write_text(json.dumps(hashes))
    if scenario == "all-corrupt":
        for p in (root / "step00000002").glob("*model_states.pt"):
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # truncated

out["latest"] = (root / "latest").read_text().strip()
out["tags"] = sorted(p.name for p in root.glob("step*"))
fresh = engine()
try:
    client = StageCheckpointer(fresh, root, 0, 0, keep=3, rank=0).resume()
    out["resumed_step"] = client["step"]
    out["weights_match_step2"] = all(torch.equal(a, b) for a, b in zip(weights(fresh), at_two))
except CheckpointError as err:
    out["resume_error"] = str(err)
out["code_ran"] = (root / "pwned").exists()
print("RESULT " + json.dumps(out))
torch.distributed.destroy_process_group()
