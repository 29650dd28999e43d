"""Speed and memory of the fused Triton alignment loss vs eager PyTorch and torch.compile (CUDA only).

    python benchmarks/kernels.py                   # full grid: B 1024-32768, D 512/768/1024, C 1 and 7
    python benchmarks/kernels.py --loss-share      # + the loss's share of a ViT-B/16 training step
    python benchmarks/kernels.py --quick           # a few shapes, for a first look

What it measures, per shape (B images, C captions per image, embed dim D; bf16 unless --dtype):
- forward and forward+backward time (median of --reps, CUDA events, after warm-up) and the
  peak extra memory of one forward+backward, for three implementations of the same loss:
  ``fused`` = compt.kernels.feature_alignment_loss(backend="triton") (includes its one host
  sync for the NaN/Inf check), ``eager`` = feature_alignment_loss_reference,
  ``compile`` = torch.compile(feature_alignment_loss_reference) (compile time excluded).
- Before timing: agreement of fused vs reference (loss and gradients, fp32 and bf16, with and
  without proj), since the tests here only run the kernels in Triton's CPU interpreter.
- With --loss-share: the loss's share of one ViT-B/16 training step at a per-GPU batch, two
  ways: (a) FLOPs: compt.flops.count_sample_flops(ViT-B-16) x batch at this GPU's measured
  bf16 matmul rate (a lower bound on the step time, so the share is an upper bound), and
  (b) a real open_clip ViT-B/16 step (autocast bf16, AdamW) timed on this GPU.
  The step excludes the teacher's forward, which CoM-PT adds: real shares are smaller.

Targets (issue 4): fused >= 3x faster than eager and not slower than torch.compile.
Outputs: benchmarks/results/kernels-<device>.{json,md}, with the device, versions and command.
Without CUDA it prints a message and exits 0, writing nothing.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ALPHA = 500.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("fused", "eager", "compile")
DEVICE = "cuda"  # where inputs live; only a CPU dry run of this script's own logic changes it


# ---------------------------------------------------------------------------
# Implementations and timing.
# ---------------------------------------------------------------------------

def implementations(use_compile: bool) -> dict:
    from compt.kernels import feature_alignment_loss, feature_alignment_loss_reference

    impls = {
        "fused": lambda si, st, ti, tt, proj: feature_alignment_loss(si, st, ti, tt, ALPHA, proj=proj,
                                                                     backend="triton"),
        "eager": lambda si, st, ti, tt, proj: feature_alignment_loss_reference(si, st, ti, tt, ALPHA, proj=proj),
    }
    if use_compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        compiled = torch.compile(feature_alignment_loss_reference, dynamic=False)
        impls["compile"] = lambda si, st, ti, tt, proj: compiled(si, st, ti, tt, ALPHA, proj=proj)
    return impls


def make_inputs(batch: int, captions: int, dim: int, dtype: torch.dtype, student_dim: int | None = None,
                seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    sdim = student_dim or dim

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=gen)

    s_img, s_txt = rand(batch, sdim).requires_grad_(), rand(batch * captions, sdim).requires_grad_()
    t_img, t_txt = rand(batch, dim), rand(batch * captions, dim)
    proj = None
    if student_dim is not None:
        proj = torch.nn.Linear(sdim, dim, bias=False, device=DEVICE, dtype=dtype)
    return s_img, s_txt, t_img, t_txt, proj


def _clear_grads(inputs) -> None:
    s_img, s_txt, _, _, proj = inputs
    s_img.grad = s_txt.grad = None
    if proj is not None:
        proj.weight.grad = None


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(fn, inputs, reps: int, warmup: int) -> dict:
    """Forward ms, forward+backward ms, and peak memory above the inputs of one forward+backward."""

    def forward():
        return fn(*inputs)

    def forward_backward():
        _clear_grads(inputs)
        forward().backward()

    for _ in range(warmup):
        forward_backward()
    _clear_grads(inputs)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {
        "fwd_ms": _median_ms(forward, reps),
        "fwd_bwd_ms": _median_ms(forward_backward, reps),
        "peak_extra_mib": peak / 2**20,
    }


# ---------------------------------------------------------------------------
# Correctness on the GPU (the compiled kernels, not the interpreter).
# ---------------------------------------------------------------------------

def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def check_agreement() -> list[dict]:
    from compt.kernels import feature_alignment_loss, feature_alignment_loss_reference

    rows = []
    cases = [(1, 1, 512, None), (3, 7, 500, None), (64, 7, 1024, None), (1024, 7, 512, None),
             (4096, 1, 768, None), (33, 7, 512, 768)]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for batch, captions, dim, student_dim in cases:
            inputs = make_inputs(batch, captions, dim, dtype, student_dim, seed=batch + dim)
            results = []
            for backend in ("triton", "reference"):
                _clear_grads(inputs)
                s_img, s_txt, t_img, t_txt, proj = inputs
                if backend == "triton":
                    loss = feature_alignment_loss(s_img, s_txt, t_img, t_txt, ALPHA, proj=proj, backend="triton")
                else:
                    loss = feature_alignment_loss_reference(s_img, s_txt, t_img, t_txt, ALPHA, proj=proj)
                loss.backward()
                grads = [s_img.grad, s_txt.grad] + ([proj.weight.grad] if proj is not None else [])
                results.append([loss.detach()] + [g.clone() for g in grads])
            errors = [rel_err(f, r) for f, r in zip(*results)]
            rows.append({"dtype": str(dtype).removeprefix("torch."), "batch": batch, "captions": captions,
                         "dim": dim, "student_dim": student_dim, "rel_err": errors, "tolerance": tol,
                         "ok": max(errors) <= tol})
    return rows


# ---------------------------------------------------------------------------
# Loss share of a ViT-B/16 training step.
# ---------------------------------------------------------------------------

def matmul_tflops(dtype: torch.dtype = torch.bfloat16, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    ms = _median_ms(lambda: a @ b, reps)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def time_clip_step(model_name: str, batch: int, captions: int, reps: int, warmup: int) -> dict:
    import open_clip

    model = open_clip.create_model(model_name, device="cuda")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    texts = torch.randint(0, 49408, (batch * captions, model.context_length), device="cuda")
    labels = torch.arange(batch, device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
            txt = torch.nn.functional.normalize(model.encode_text(texts), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.view(batch, captions, -1).mean(1).t()
            loss = (torch.nn.functional.cross_entropy(logits, labels)
                    + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    ms = _median_ms(step, reps)
    del model, opt
    torch.cuda.empty_cache()
    return {"step_ms": ms, "embed_dim": 512}


def loss_share(args, impls: dict, dtype: torch.dtype) -> dict:
    import open_clip

    from compt.flops import count_sample_flops

    model_name = "ViT-B-16"
    cfg = open_clip.get_model_config(model_name)
    tflops = matmul_tflops()
    out = {"model": model_name, "per_gpu_batch": args.step_batch, "matmul_bf16_tflops": tflops, "rows": []}
    for captions in args.captions:
        flops = count_sample_flops(cfg, captions)
        step_flops = flops.train * args.step_batch
        est_step_ms = step_flops / (tflops * 1e12) * 1e3
        inputs = make_inputs(args.step_batch, captions, cfg["embed_dim"], dtype)
        loss_ms = {name: measure(fn, inputs, args.reps, args.warmup)["fwd_bwd_ms"] for name, fn in impls.items()}
        row = {"captions": captions, "train_flops_per_sample": flops.train, "step_ms_flops_bound": est_step_ms,
               "loss_fwd_bwd_ms": loss_ms,
               "share_of_flops_bound_step": {k: v / (est_step_ms + v) for k, v in loss_ms.items()}}
        if not args.no_real_step:
            try:
                real = time_clip_step(model_name, args.step_batch, captions, max(5, args.reps // 2), args.warmup)
            except (ImportError, RuntimeError) as err:  # e.g. out of memory at a large --step-batch
                row["real_step_error"] = f"{type(err).__name__}: {err}"[:300]
            else:
                row["real_step_ms"] = real["step_ms"]
                row["share_of_real_step"] = {k: v / (real["step_ms"] + v) for k, v in loss_ms.items()}
        out["rows"].append(row)
        del inputs
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------

def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 16384, 32768],
                   help="global batch sizes (images); text rows = batch x captions")
    p.add_argument("--dims", type=int, nargs="+", default=[512, 768, 1024], help="embedding dims")
    p.add_argument("--captions", type=int, nargs="+", default=[1, 7], help="captions per image")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--proj-from", type=int, default=None,
                   help="also benchmark with a Linear(student_dim -> D) projection from this student dim")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--quick", action="store_true", help="B 1024 and 16384, D 512, C 1 and 7")
    p.add_argument("--loss-share", action="store_true", help="the loss's share of a ViT-B/16 training step")
    p.add_argument("--step-batch", type=int, default=128, help="per-GPU batch for --loss-share")
    p.add_argument("--no-real-step", action="store_true", help="--loss-share from FLOPs only")
    p.add_argument("--skip-check", action="store_true", help="skip the fused-vs-reference agreement check")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.dims = [1024, 16384], [512]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device here; the Triton kernels are benchmarked on a GPU only. "
              "Nothing measured, nothing written.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/kernels.py: triton is not importable; nothing measured, nothing written.")
        return 0

    dtype = DTYPES[args.dtype]
    device = torch.cuda.get_device_name()
    result = {
        "device": device, "versions": versions(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "dtype": args.dtype, "alpha": ALPHA, "reps": args.reps, "warmup": args.warmup,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if not args.skip_check:
        result["agreement"] = check_agreement()
        bad = [r for r in result["agreement"] if not r["ok"]]
        print(f"agreement fused vs reference: {len(result['agreement']) - len(bad)}/{len(result['agreement'])} ok")
        for r in bad:
            print("  DISAGREES:", r)

    impls = implementations(use_compile=not args.no_compile)
    rows = []
    student_dims = [None] + ([args.proj_from] if args.proj_from else [])
    for student_dim in student_dims:
        for captions in args.captions:
            for dim in args.dims:
                for batch in args.batches:
                    inputs = make_inputs(batch, captions, dim, dtype, student_dim)
                    row = {"batch": batch, "captions": captions, "dim": dim, "student_dim": student_dim}
                    for name, fn in impls.items():
                        try:
                            row[name] = measure(fn, inputs, args.reps, args.warmup)
                        except torch.OutOfMemoryError as err:
                            row[name] = {"error": f"OOM: {str(err)[:200]}"}
                            torch.cuda.empty_cache()
                    _add_speedups(row)
                    rows.append(row)
                    print(_row_line(row), flush=True)
                    del inputs
                    torch.cuda.empty_cache()
    result["rows"] = rows
    result["targets"] = _targets(rows)
    if args.loss_share:
        result["loss_share"] = loss_share(args, impls, dtype)

    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kernels-{device_slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(result))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


def _add_speedups(row: dict) -> None:
    fused = row.get("fused", {}).get("fwd_bwd_ms")
    for other in ("eager", "compile"):
        theirs = row.get(other, {}).get("fwd_bwd_ms")
        if fused and theirs:
            row[f"speedup_vs_{other}"] = theirs / fused


def _targets(rows: list[dict]) -> dict:
    eager = [r["speedup_vs_eager"] for r in rows if "speedup_vs_eager" in r]
    compiled = [r["speedup_vs_compile"] for r in rows if "speedup_vs_compile" in r]
    return {
        "min_speedup_vs_eager": min(eager, default=None),
        "min_speedup_vs_compile": min(compiled, default=None),
        "fused_3x_eager_everywhere": bool(eager) and min(eager) >= 3.0,
        "fused_not_slower_than_compile_everywhere": bool(compiled) and min(compiled) >= 1.0,
    }


def _row_line(row: dict) -> str:
    parts = [f"B={row['batch']:>6} C={row['captions']} D={row['dim']:>4}"
             + (f" proj {row['student_dim']}->{row['dim']}" if row["student_dim"] else "")]
    for name in IMPLS:
        if name in row:
            m = row[name]
            parts.append(f"{name} {m['fwd_bwd_ms']:.3f} ms {m['peak_extra_mib']:.0f} MiB" if "fwd_bwd_ms" in m
                         else f"{name} {m['error']}")
    for other in ("eager", "compile"):
        if f"speedup_vs_{other}" in row:
            parts.append(f"x{row[f'speedup_vs_{other}']:.2f} vs {other}")
    return " | ".join(parts)


def to_markdown(result: dict) -> str:
    v = result["versions"]
    lines = [
        f"# Fused alignment loss: {result['device']}",
        "",
        f"torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, python {v['python']}; "
        f"dtype {result['dtype']}; median of {result['reps']} after {result['warmup']} warm-up; {result['date']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        "Forward+backward time (ms) and peak extra memory (MiB) of one forward+backward. `fused` is "
        "`feature_alignment_loss(backend=\"triton\")` (one forward and one backward kernel, plus its one "
        "host sync for the NaN/Inf check); `eager` is `feature_alignment_loss_reference`; `compile` is "
        "`torch.compile` of it.",
        "",
        "| B | C | D | proj | fused ms | eager ms | compile ms | x vs eager | x vs compile "
        "| fused MiB | eager MiB | compile MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        def cell(name, key, fmt):
            m = r.get(name, {})
            return fmt.format(m[key]) if key in m else ("OOM" if "error" in m else "-")

        sx = [f"{r[k]:.2f}" if k in r else "-" for k in ("speedup_vs_eager", "speedup_vs_compile")]
        lines.append(
            f"| {r['batch']} | {r['captions']} | {r['dim']} | {r['student_dim'] or '-'} | "
            + " | ".join(cell(n, "fwd_bwd_ms", "{:.3f}") for n in IMPLS) + f" | {sx[0]} | {sx[1]} | "
            + " | ".join(cell(n, "peak_extra_mib", "{:.0f}") for n in IMPLS) + " |")
    t = result["targets"]
    lines += ["", "Targets (issue 4): "
              f"fused >= 3x eager everywhere: {t['fused_3x_eager_everywhere']} "
              f"(min x{_fmt(t['min_speedup_vs_eager'])}); not slower than torch.compile everywhere: "
              f"{t['fused_not_slower_than_compile_everywhere']} (min x{_fmt(t['min_speedup_vs_compile'])})."]
    if "agreement" in result:
        ok = sum(r["ok"] for r in result["agreement"])
        worst = {}
        for r in result["agreement"]:
            worst[r["dtype"]] = max(worst.get(r["dtype"], 0.0), max(r["rel_err"]))
        lines += ["", f"Agreement with the reference on this GPU: {ok}/{len(result['agreement'])} cases within "
                  "tolerance (1e-5 fp32, 1e-2 bf16); worst relative error "
                  + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()) + "."]
    if "loss_share" in result:
        ls = result["loss_share"]
        lines += ["", f"## Share of a {ls['model']} training step (per-GPU batch {ls['per_gpu_batch']})", "",
                  f"Measured bf16 matmul rate: {ls['matmul_bf16_tflops']:.0f} TFLOP/s. The FLOPs-bound step "
                  "runs every FLOP at that rate (a lower bound on step time, so an upper bound on the share). "
                  "The real step is open_clip's model, autocast bf16, AdamW; neither includes the teacher's "
                  "forward, which CoM-PT adds.", "",
                  "| C | step ms (FLOPs bound) | real step ms | loss ms fused / eager / compile "
                  "| share of real step fused / eager / compile |",
                  "|---|---|---|---|---|"]
        for r in ls["rows"]:
            loss = " / ".join(f"{r['loss_fwd_bwd_ms'][n]:.3f}" for n in IMPLS if n in r["loss_fwd_bwd_ms"])
            share = r.get("share_of_real_step") or r["share_of_flops_bound_step"]
            tag = "" if "share_of_real_step" in r else " (FLOPs bound)"
            shares = " / ".join(f"{100 * share[n]:.2f}%" for n in IMPLS if n in share) + tag
            real = f"{r['real_step_ms']:.1f}" if "real_step_ms" in r else r.get("real_step_error", "-")
            lines.append(f"| {r['captions']} | {r['step_ms_flops_bound']:.1f} | {real} | {loss} | {shares} |")
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
