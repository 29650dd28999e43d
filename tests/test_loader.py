"""Deterministic data feeding: N ranks see exactly the global batches one rank sees."""
from __future__ import annotations

import pytest
import torch

from compt.clip.model import preprocess_for
from compt.data import DataConfig, build_dataset
from compt.clip.loader import train_loader
from compt.sampler import GlobalBatchSampler
from conftest import tiny_model


def test_rank_slices_tile_the_global_batch():
    one = list(GlobalBatchSampler(100, 16, steps=12, rank=0, world=1, gas=1, seed=3))
    r0 = list(GlobalBatchSampler(100, 16, steps=12, rank=0, world=2, gas=1, seed=3))
    r1 = list(GlobalBatchSampler(100, 16, steps=12, rank=1, world=2, gas=1, seed=3))
    assert len(one) == 12
    for full, a, b in zip(one, r0, r1):
        assert full == a + b
    # an epoch holds 6 batches; a new epoch reshuffles, and no index repeats inside one
    epoch0 = [i for batch in one[:6] for _, i in batch]
    assert len(set(epoch0)) == 96 and one[6][0][0] == 1
    ga = list(GlobalBatchSampler(100, 16, steps=12, rank=1, world=2, gas=2, seed=3))
    assert len(ga) == 24 and ga[0] == one[0][4:8]  # micro-step 0 of rank 1
    flat_ga = [list(GlobalBatchSampler(100, 16, 12, r, 2, 2, 3)) for r in (0, 1)]
    step0 = flat_ga[0][0] + flat_ga[1][0] + flat_ga[0][1] + flat_ga[1][1]
    assert step0 == one[0]


def test_augmentation_is_seeded_per_sample():
    ds = build_dataset(DataConfig(kind="digits", render_size=16), "train")
    pre = preprocess_for(tiny_model())
    kw = dict(global_batch=8, steps=2, gas=1, seed=5)
    full = list(train_loader(ds, pre, None, rank=0, world=1, **kw))
    halves = [list(train_loader(ds, pre, None, rank=r, world=2, **kw)) for r in (0, 1)]
    for step in range(2):
        joined = torch.cat([halves[0][step].images, halves[1][step].images])
        assert torch.equal(full[step].images, joined)
        assert torch.equal(full[step].texts, torch.cat([halves[0][step].texts, halves[1][step].texts]))
    assert full[0].images.shape == (8, 3, 16, 16) and full[0].texts.shape == (8, 12)


def _image_csv(root, rows: int, missing: range = range(0)) -> DataConfig:
    """An open_clip CSV of ``rows`` small images in ``root/images``, the rows in ``missing`` without their file."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True)
    lines = ["filepath\ttitle\tlabel"]
    rng = np.random.RandomState(0)
    for i in range(rows):
        path = root / "images" / f"{i}.png"
        if i not in missing:
            Image.fromarray(rng.randint(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        lines.append(f"{path}\timage {i}\t{i % 2}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return DataConfig(kind="csv", train=str(root / "train.csv"), val=str(root / "train.csv"))


def test_a_long_run_of_missing_images_is_counted_not_fatal(tmp_path):
    """80 missing images in a row (a missing folder's rows) are replaced, counted and named, batches keep their
    size, and 0 or 2 loader workers give the same batches."""
    from compt.data.csv import build_csv
    from compt.loading import loader_options

    ds = build_csv(_image_csv(tmp_path, 100, missing=range(10, 90)), "train")
    pre = preprocess_for(tiny_model())
    kw = dict(global_batch=20, steps=5, rank=0, world=1, gas=1, seed=1)
    batches = [list(train_loader(ds, pre, None, **kw, **loader_options(DataConfig(workers=w), "cpu"))) for w in (0, 2)]
    for a, b in zip(*batches):
        assert a.images.shape == (20, 3, 16, 16) and a.texts.shape[0] == 20 and len(a.captions) == 20
        assert torch.equal(a.images, b.images) and a.captions == b.captions and a.bad == b.bad
    bad = [d for batch in batches[0] for d in batch.bad]
    assert len(bad) >= 80 and all("FileNotFoundError" in d for d in bad)
    assert any(f"images/{i}.png" in d for d in bad for i in range(10, 90))
    assert all(c.split()[-1] not in {str(i) for i in range(10, 90)} for batch in batches[0] for c in batch.captions)


def test_a_slot_with_no_readable_try_repeats_a_good_sample_of_its_batch(tmp_path):
    from compt.clip.loader import MAX_TRIES
    from compt.data.csv import build_csv

    ds = build_csv(_image_csv(tmp_path, 400, missing=range(1, 400)), "train")  # one readable image
    batch = next(iter(train_loader(ds, preprocess_for(tiny_model()), None, global_batch=4, steps=1, rank=0, world=1,
                                   gas=1, seed=0)))
    assert len(batch.captions) == 4 and set(batch.captions) == {"image 0"}
    assert len(batch.bad) >= 3 * MAX_TRIES  # every try counted: the stage's threshold sees them


def test_unreadable_training_data_stops_with_the_files_named(tmp_path):
    from compt.data.csv import build_csv
    from compt.faults import StageFailed

    ds = build_csv(_image_csv(tmp_path, 200, missing=range(200)), "train")
    loader = train_loader(ds, preprocess_for(tiny_model()), None, global_batch=4, steps=2, rank=0, world=1, gas=1,
                          seed=0)
    with pytest.raises(StageFailed, match=r"no sample of a training batch could be read(.|\n)*images/\d+\.png"):
        next(iter(loader))


def test_a_missing_image_folder_fails_the_stage_cleanly(tmp_path):
    """Through the launcher: the image folder of the training CSV is gone. Exit 1, an error naming a file,
    the stage marked failed in the manifest, no traceback."""
    import json
    import os
    import shutil
    import subprocess

    from conftest import DS, REPO, write_chain

    cfg = _image_csv(tmp_path / "data", 64)
    val = tmp_path / "val"
    shutil.copytree(tmp_path / "data", val)
    (val / "train.csv").write_text((tmp_path / "data" / "train.csv").read_text().replace(str(tmp_path / "data"),
                                                                                         str(val)))
    shutil.rmtree(tmp_path / "data" / "images")
    chain = {"name": "missing", "seed": 0,
             "data": {"kind": "csv", "train": cfg.train, "val": str(val / "train.csv"), "workers": 1},
             "eval": {"batch_size": 32},
             "defaults": {"lr": 1.0e-3, "warmup_steps": 1, "batch_size": 8},
             "stages": [{"name": "a", "model": tiny_model(), "budget": {"steps": 2}}]}
    path = write_chain(tmp_path / "chain.yaml", chain)
    proc = subprocess.run(["deepspeed", "--master_port", "29913", "--num_gpus", "1", "launch/chain.py", "--chain",
                           str(path), "--ds_config", DS, "--output", str(tmp_path / "run")], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert "no sample of a training batch could be read" in log and "data/images/" in log and ".png" in log
    assert "Traceback" not in log, log[-3000:]
    stage = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"][0]
    assert stage["status"] == "failed" and "images/" in stage["error"]
