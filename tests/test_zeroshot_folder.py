"""Zero-shot on a class-folder tree (issue 18, "evaluation data a CLIP user already has"): class names from
WordNet-id folders (open_clip's ImageNet names), plain folder names or a list; open_clip's templates; every
config problem at once; an in-process evaluation of a tiny model, cross-checked against the validation-split
zero-shot on the same images, in the stage's metrics and through ``compt eval``."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from PIL import Image

from compt.config import ChainConfigError, load_chain
from compt.data.dataset import DEFAULT_TEMPLATES
from compt.data.digits import WORDS
from compt.data.imagefolder import ImageFolderEval, build_imagefolder, resolve_classnames, resolve_templates
from conftest import DS, TINY_CHAIN, tiny_model, write_chain

PER_CLASS = 3
WNIDS = [f"n0{i:07d}" for i in range(10)]  # WordNet-style ids, sorted in digit order
PLAIN = [f"hand_{w}" for w in WORDS]  # "hand_zero": underscores are spaces in class names
SORTED_PLAIN = sorted(PLAIN)  # "hand_eight" < "hand_five" < ...: labels follow the sorted folders


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Two class-folder trees of the same rendered sklearn digits: WordNet-id and plain folder names; one
    corrupt image in each."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("folders")
    digits = load_digits()
    for style, names in (("wnid", WNIDS), ("plain", PLAIN)):
        for digit, name in enumerate(names):
            folder = root / style / name
            folder.mkdir(parents=True)
            for j, i in enumerate(np.flatnonzero(digits.target == digit)[:PER_CLASS]):
                pixels = (digits.images[i] * 255 / 16).astype("uint8")
                Image.fromarray(pixels).resize((16, 16)).convert("RGB").save(folder / f"{j}.png")
        (root / style / names[4] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


# -- class names and templates ---------------------------------------------------------------------

def test_wordnet_folders_are_imagenets_classes_in_open_clips_order():
    wnids = [f"n{i:08d}" for i in range(1000)]
    names = resolve_classnames(wnids, "auto")
    assert names == list(IMAGENET_CLASSNAMES) and names[0] == "tench"
    assert resolve_classnames(wnids, "imagenet") == names
    assert resolve_templates("auto", names) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert resolve_templates("simple", names) == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    assert resolve_templates("auto", names)[0].format("tench") == OPENAI_IMAGENET_TEMPLATES[0]("tench")


def test_a_subset_of_wordnet_folders_needs_its_names_listed():
    with pytest.raises(ValueError, match="10 WordNet-id folders, but open_clip names ImageNet's classes only as all "
                                         "1000 .* list the 10 class names in sorted folder order"):
        resolve_classnames(WNIDS, "auto")
    assert resolve_classnames(WNIDS, WORDS) == WORDS


def test_plain_folder_names_are_the_class_names():
    assert resolve_classnames(SORTED_PLAIN, "auto") == [n.replace("_", " ") for n in SORTED_PLAIN]
    assert resolve_classnames(SORTED_PLAIN, "auto")[0] == "hand eight"
    assert resolve_templates("auto", resolve_classnames(SORTED_PLAIN, "auto")) == DEFAULT_TEMPLATES
    assert resolve_templates(["a {}."], ["x"]) == ["a {}."]
    with pytest.raises(ValueError, match="needs folders named by WordNet id"):
        resolve_classnames(SORTED_PLAIN, "imagenet")
    with pytest.raises(ValueError, match=r"3 name\(s\) for 10 class folder\(s\); give one name per folder"):
        resolve_classnames(SORTED_PLAIN, ["a", "b", "c"])


def test_every_folder_problem_is_reported_at_once_with_its_field(tmp_path, trees):
    empty = tmp_path / "tree"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "1.png").write_bytes(b"")
    (empty / "dog").mkdir()  # no image
    chain = copy.deepcopy(TINY_CHAIN)
    chain["data"]["imagefolder"] = {"path": str(empty), "classnames": ["cat", "dog", "emu"],
                                    "templates": ["a photo"]}
    with pytest.raises(ChainConfigError) as err:
        load_chain(str(write_chain(tmp_path / "c.yaml", chain)), DS)
    text = "\n".join(err.value.problems)
    assert "data.imagefolder.path: class folder(s) 'dog'" in text and "hold no image" in text
    assert "data.imagefolder.classnames: 3 name(s) for 2 class folder(s)" in text
    assert "data.imagefolder.templates: 'a photo' has no '{}'" in text

    chain["data"]["imagefolder"] = {"path": str(tmp_path / "nowhere"), "max_images": 0}
    with pytest.raises(ChainConfigError) as err:
        load_chain(str(write_chain(tmp_path / "c.yaml", chain)), DS)
    assert "data.imagefolder.max_images: Input should be greater than 0" in "\n".join(err.value.problems)
    chain["data"]["imagefolder"] = {"path": str(tmp_path / "nowhere")}
    with pytest.raises(ChainConfigError, match="data.imagefolder.path: '.*nowhere' does not exist; give a folder with "
                                               "one subfolder of images per class"):
        load_chain(str(write_chain(tmp_path / "c.yaml", chain)), DS)
    chain["data"]["imagefolder"] = {"path": str(trees / "wnid")}  # 10 wnids, no names: ask for them
    with pytest.raises(ChainConfigError, match="data.imagefolder.classnames: 10 WordNet-id folders"):
        load_chain(str(write_chain(tmp_path / "c.yaml", chain)), DS)


def test_the_dataset_labels_follow_the_sorted_folders(trees):
    ds = build_imagefolder(ImageFolderEval(path=str(trees / "plain")))
    assert len(ds) == 10 * PER_CLASS + 1 and ds.classnames[0] == "hand eight"
    assert {ds.samples[i][1] for i in range(PER_CLASS)} == {0} and "hand_eight" in ds.samples[0][0]
    assert ds[0].caption == "hand eight" and ds[0].image.mode == "RGB"
    sub = build_imagefolder(ImageFolderEval(path=str(trees / "plain"), max_images=10))
    assert len(sub) == 10 and sorted({label for _, label in sub.samples}) == list(range(10))  # a class each


# -- evaluation --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from compt.clip.model import build_clip, preprocess_for

    cfg = tiny_model(32, 1)
    torch.manual_seed(0)
    return build_clip(cfg).eval(), preprocess_for(cfg), cfg


def test_folder_zero_shot_equals_the_validation_zero_shot_on_the_same_images(trees, tiny):
    """Both folder styles, and the validation-split path (compt's own zero-shot over the same images, labels,
    names and prompts), give the same top-1/top-5; the corrupt image is counted and named."""
    from compt.clip.evaluate import evaluate, evaluate_imagefolder
    from compt.data.dataset import ImageTextDataset

    model, pre, _ = tiny
    templates = ["a handwritten {}.", "the digit {}."]
    by_wnid = build_imagefolder(ImageFolderEval(path=str(trees / "wnid"), classnames=WORDS, templates=templates))
    names = [n.removeprefix("hand_") for n in SORTED_PLAIN]
    by_name = build_imagefolder(ImageFolderEval(path=str(trees / "plain"), classnames=names, templates=templates))
    a = evaluate_imagefolder(model, by_wnid, pre, batch_size=8)
    b = evaluate_imagefolder(model, by_name, pre, batch_size=64)
    assert a["imagefolder_samples"] == b["imagefolder_samples"] == 10 * PER_CLASS
    assert a["imagefolder_bad_samples"]["count"] == 1 and "broken.jpg" in a["imagefolder_bad_samples"]["examples"][0]
    assert (a["imagefolder_top1"], a["imagefolder_top5"]) == pytest.approx((b["imagefolder_top1"],
                                                                            b["imagefolder_top5"]), abs=1e-6)

    class Same(ImageTextDataset):  # the wnid tree as a validation split
        def __len__(self):
            return len(by_wnid)

        def __getitem__(self, i):
            return by_wnid[i]

    val = evaluate(model, Same(WORDS, templates), pre, 16, retrieval=False)
    assert (val["zeroshot_top1"], val["zeroshot_top5"]) == pytest.approx((a["imagefolder_top1"],
                                                                          a["imagefolder_top5"]), abs=1e-6)
    assert 0.0 <= a["imagefolder_top1"] <= a["imagefolder_top5"] <= 1.0


def printed_json(capsys) -> dict:
    """The JSON ``compt eval --json`` printed (DeepSpeed may print its accelerator line first)."""
    out = capsys.readouterr().out
    return json.loads(out[out.index("\n{") + 1 if not out.startswith("{") else 0:])


def test_a_stage_reports_it_and_compt_eval_runs_it(trees, tiny, tmp_path, capsys):
    """The family's evaluation adds imagefolder_top1/top5 to the metrics, the manifest summary and the final
    table; ``compt eval --imagefolder`` scores a saved stage on a tree its chain did not name."""
    from compt.cli import main
    from compt.clip.family import ClipFamily
    from compt.engine import read_ds_config
    from compt.rundir import RunDir
    from compt.weights import save_zero3_module

    model, _, model_cfg = tiny
    family = ClipFamily()
    chain = copy.deepcopy(TINY_CHAIN)
    chain["stages"] = chain["stages"][:1]
    chain["data"]["imagefolder"] = {"path": str(trees / "plain"), "templates": "simple", "max_images": 20}
    cfg = load_chain(str(write_chain(tmp_path / "c.yaml", chain)), DS)
    metrics = family.evaluate(model, family.val_data(cfg.data, tmp_path), model_cfg, cfg)
    assert metrics["imagefolder_samples"] + metrics["imagefolder_bad_samples"]["count"] == 20
    assert metrics["imagefolder_classes"] == 10 and metrics["zeroshot_top1"] is not None
    assert family.summary(metrics)["imagefolder_top1"] == metrics["imagefolder_top1"]
    row = dict(zip(family.result_headers, family.result_row(cfg.stages[0], {
        **metrics, "stage": 0, "name": "a", "params": 1e6, "steps": 1, "flops": {"total": 1e9}, "wall_seconds": 1})))
    assert row["folder top-1/5"] == f"{100 * metrics['imagefolder_top1']:.1f}% / {100 * metrics['imagefolder_top5']:.1f}%"

    # A finished stage as the launcher leaves it (manifest with sha256, config.json), without the folder.
    del chain["data"]["imagefolder"]
    cfg = load_chain(str(write_chain(tmp_path / "c.yaml", chain)), DS)
    run = RunDir(tmp_path / "run")
    run.open(cfg, read_ds_config(DS))
    stage = run.stage_dir(0, "a")
    stage.mkdir(parents=True)
    sha = save_zero3_module(model, stage / "model.safetensors", rename=family.export_name)
    family.write_config(stage / "config.json", model_cfg)
    run.update_stage(0, status="done", weights="stages/0-a/model.safetensors", sha256=sha)
    assert main(["eval", str(stage), "--json"]) == 0
    assert "imagefolder_top1" not in printed_json(capsys)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(WORDS) + "\n")
    assert main(["eval", str(stage), "--json", "--imagefolder", str(trees / "wnid"), "--classnames", str(names)]) == 0
    out = printed_json(capsys)
    assert out["imagefolder_samples"] == 10 * PER_CLASS and out["imagefolder_bad_samples"]["count"] == 1
    assert main(["eval", str(stage), "--imagefolder", str(trees / "plain"), "--max-images", "10"]) == 0
    text = capsys.readouterr().out
    assert "10 class-folder images, 10 classes" in text and "imagefolder_top1" in text
    assert main(["eval", str(stage), "--imagefolder", str(trees / "wnid"), "--templates", "none.txt"]) == 2
    err = capsys.readouterr().err
    assert "--classnames/--templates: cannot read none.txt" in err, err
    assert main(["eval", str(stage), "--imagefolder", str(trees / "wnid")]) == 2
    assert "--classnames: 10 WordNet-id folders" in capsys.readouterr().err


def test_adding_a_folder_evaluation_to_a_run_retrains_nothing(trees, tmp_path):
    """Evaluation only: the stage fingerprints (what a resume compares) ignore data.imagefolder."""
    from compt.engine import read_ds_config
    from compt.rundir import stage_fingerprints

    chain = copy.deepcopy(TINY_CHAIN)
    before = stage_fingerprints(load_chain(str(write_chain(tmp_path / "a.yaml", chain)), DS), read_ds_config(DS))
    chain["data"]["imagefolder"] = {"path": str(trees / "plain")}
    after = stage_fingerprints(load_chain(str(write_chain(tmp_path / "b.yaml", chain)), DS), read_ds_config(DS))
    assert before == after
    chain["data"]["render_size"] = 24  # while a change the weights see still counts
    assert stage_fingerprints(load_chain(str(write_chain(tmp_path / "c.yaml", chain)), DS), read_ds_config(DS)) != after
