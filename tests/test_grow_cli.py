"""``compt grow``: grow a saved small CLIP into a larger config, run in-process as a user would."""
from __future__ import annotations

import json
import re

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from compt.cli import main


def clip_cfg(vw=32, vl=1, tw=32, th=2, tl=1, embed=16, patch=8, ctx=8, head_width=16):
    return {
        "embed_dim": embed,
        "vision_cfg": {"image_size": 16, "patch_size": patch, "width": vw, "layers": vl, "head_width": head_width},
        "text_cfg": {"context_length": ctx, "vocab_size": 100, "width": tw, "heads": th, "layers": tl},
    }


SMALL = clip_cfg()
LARGE = clip_cfg(vw=64, vl=2, tw=64, th=4, tl=2, embed=24, ctx=10)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_run(tmp_path):
    """A saved small model (stock 0-d logit_scale) and the two config files."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**SMALL).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    (tmp_path / "small.json").write_text(json.dumps(SMALL))
    (tmp_path / "large.json").write_text(json.dumps(LARGE))
    return tmp_path, model


def grow(tmp_path, *extra, ckpt="small.safetensors", small="small.json", large="large.json", out="large.safetensors"):
    return main(["grow", "--from-checkpoint", str(tmp_path / ckpt), "--from-config", str(tmp_path / small),
                 "--to-config", str(tmp_path / large), "--out", str(tmp_path / out), *extra])


def load_large(path, cfg=LARGE):
    model = open_clip.CLIP(**json.loads(json.dumps(cfg))).eval()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def test_grow_exact_by_default_and_the_output_loads_into_open_clip(small_run, capsys):
    tmp_path, small = small_run
    assert grow(tmp_path, "--noise", "0.02", "--seed", "3") == 0
    assert "grew" in capsys.readouterr().out
    large = load_large(tmp_path / "large.safetensors")
    images = torch.randn(2, 3, 16, 16)
    text = torch.tensor([[5, 7, 99, 0, 0, 0, 0, 0], [9, 3, 4, 2, 99, 1, 0, 0]])
    big_text = torch.cat([text, torch.zeros(2, 2, dtype=torch.long)], dim=1)
    with torch.no_grad():
        for s, b in ((small.encode_image(images), large.encode_image(images)),
                     (small.encode_text(text), large.encode_text(big_text))):
            assert torch.all(b[:, 16:] == 0)
            torch.testing.assert_close(b[:, :16], s, rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "large.safetensors.tmp").exists()


def test_grow_official_is_reproducible_and_copies_the_top_left_block(small_run):
    tmp_path, small = small_run
    assert grow(tmp_path, "--mode", "official", "--seed", "1", out="a.safetensors") == 0
    assert grow(tmp_path, "--mode", "official", "--seed", "1", out="b.safetensors") == 0
    assert grow(tmp_path, "--mode", "official", "--seed", "2", out="c.safetensors") == 0
    a, b, c = (load_file(str(tmp_path / f"{x}.safetensors")) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.proj"], c["visual.proj"])  # the kept init follows --seed
    w = small.state_dict()["transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(a["transformer.resblocks.0.attn.in_proj_weight"][:96, :32], w)
    load_large(tmp_path / "a.safetensors")


def test_checkpoint_with_1_element_logit_scale_is_accepted(small_run):
    tmp_path, small = small_run
    sd = {k: v.contiguous() for k, v in small.state_dict().items()}
    sd["logit_scale"] = sd["logit_scale"].reshape(1)  # as compt's ChainCLIP stores it in training
    save_file(sd, str(tmp_path / "chain.safetensors"))
    assert grow(tmp_path, ckpt="chain.safetensors") == 0
    assert load_file(str(tmp_path / "large.safetensors"))["logit_scale"].shape == ()


def write(tmp_path, name, cfg):
    (tmp_path / name).write_text(json.dumps(cfg))
    return name


@pytest.mark.parametrize("case, message", [
    ("missing_checkpoint", r"--from-checkpoint .*nope\.safetensors: no such file"),
    ("corrupt_checkpoint", r"--from-checkpoint .*corrupt\.safetensors: not a readable safetensors file"),
    ("missing_tensor", r"lacks 1 tensor\(s\) .*visual\.ln_post\.bias"),
    ("wrong_shape", r"does not match .*small\.json: visual\.proj is \(32, 8\), config says \(32, 16\)"),
    ("missing_config", r"--to-config .*absent\.json: no such file"),
    ("bad_json", r"--to-config .*bad\.json: not a readable JSON model config"),
    ("shrink", r"vision_cfg width shrinks \(32 -> 16\)"),
    ("patch", r"vision_cfg\.patch_size differs \(teacher 8, student 4\)"),
    ("context", r"text_cfg context_length shrinks \(8 -> 6\)"),
    ("head_width", r"vision tower head width changes \(16 -> 32\)"),
    ("official_shrink", r"cannot grow .*\(official\): .*larger than student"),
    ("official_patch", r"vision_cfg\.patch_size differs"),
    ("official_context", r"context_length shrinks \(8 -> 6\)"),
    ("noise", r"--noise must be a finite number >= 0"),
    ("out_dir", r"--out .*: directory .*nodir does not exist"),
])
def test_bad_input_exits_2_says_what_and_where_and_writes_nothing(small_run, capsys, case, message):
    tmp_path, small = small_run
    kwargs, extra = {}, []
    if case == "missing_checkpoint":
        kwargs["ckpt"] = "nope.safetensors"
    elif case == "corrupt_checkpoint":
        (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        kwargs["ckpt"] = "corrupt.safetensors"
    elif case == "missing_tensor":
        sd = {k: v.contiguous() for k, v in small.state_dict().items() if k != "visual.ln_post.bias"}
        save_file(sd, str(tmp_path / "partial.safetensors"))
        kwargs["ckpt"] = "partial.safetensors"
    elif case == "wrong_shape":
        sd = {k: v.contiguous() for k, v in small.state_dict().items()}
        sd["visual.proj"] = torch.zeros(32, 8)
        save_file(sd, str(tmp_path / "wrong.safetensors"))
        kwargs["ckpt"] = "wrong.safetensors"
    elif case == "missing_config":
        kwargs["large"] = "absent.json"
    elif case == "bad_json":
        (tmp_path / "bad.json").write_text("{ this is not json")
        kwargs["large"] = "bad.json"
    elif case in ("shrink", "official_shrink"):
        kwargs["large"] = write(tmp_path, "shrink.json", clip_cfg(vw=16, head_width=16))
    elif case in ("patch", "official_patch"):
        kwargs["large"] = write(tmp_path, "patch.json", clip_cfg(vw=64, patch=4))
    elif case in ("context", "official_context"):
        kwargs["large"] = write(tmp_path, "ctx.json", clip_cfg(vw=64, ctx=6))
    elif case == "head_width":
        kwargs["large"] = write(tmp_path, "hw.json", clip_cfg(vw=64, head_width=32))
    elif case == "noise":
        extra = ["--noise", "-0.5"]
    elif case == "out_dir":
        kwargs["out"] = "nodir/large.safetensors"
    if case.startswith("official"):
        extra = ["--mode", "official"]
    out = tmp_path / kwargs.get("out", "large.safetensors")
    assert grow(tmp_path, *extra, **kwargs) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_an_existing_output_is_left_untouched_on_error(small_run):
    tmp_path, _ = small_run
    out = tmp_path / "large.safetensors"
    out.write_bytes(b"previous")
    assert grow(tmp_path, ckpt="nope.safetensors") == 2
    assert out.read_bytes() == b"previous"


def test_an_existing_output_is_replaced_only_with_force(small_run, capsys):
    tmp_path, _ = small_run
    out = tmp_path / "large.safetensors"
    out.write_bytes(b"previous")
    assert grow(tmp_path) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already exists; pass --force to replace it" in err, err
    assert out.read_bytes() == b"previous"
    assert grow(tmp_path, "--force") == 0
    load_large(out)


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
@pytest.mark.parametrize("target", ["small.safetensors", "small.json", "large.json"])
def test_grow_never_writes_over_its_own_input(small_run, capsys, target, force):
    """--out naming --from-checkpoint (or a config it reads) is refused even with --force."""
    tmp_path, _ = small_run
    before = (tmp_path / target).read_bytes()
    assert grow(tmp_path, *force, out=target) == 2
    err = capsys.readouterr().err
    assert "is the same file as --from-" in err or "is the same file as --to-config" in err, err
    assert "overwrite its own input" in err
    assert (tmp_path / target).read_bytes() == before


def test_grow_keeps_the_source_dtype_unless_told(small_run):
    """fp64 in, fp64 out (exact growth is then exact to float64 rounding); --dtype chooses another."""
    tmp_path, small = small_run
    save_file({k: v.double().contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "small64.safetensors"))
    assert grow(tmp_path, ckpt="small64.safetensors", out="l64.safetensors") == 0
    big = load_file(str(tmp_path / "l64.safetensors"))
    assert {t.dtype for t in big.values()} == {torch.float64}
    large = open_clip.CLIP(**LARGE).double().eval()
    large.load_state_dict(big, strict=True)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(large.encode_image(images)[:, :16], small.double().encode_image(images),
                                   rtol=1e-10, atol=1e-10)
    assert grow(tmp_path, "--dtype", "bfloat16", ckpt="small64.safetensors", out="l16.safetensors") == 0
    assert {t.dtype for t in load_file(str(tmp_path / "l16.safetensors")).values()} == {torch.bfloat16}
    assert grow(tmp_path, out="l32.safetensors") == 0  # a float32 source stays float32
    assert {t.dtype for t in load_file(str(tmp_path / "l32.safetensors")).values()} == {torch.float32}
