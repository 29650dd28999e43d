"""Speed and memory of the fused Triton alignment loss vs eager PyTorch and torch.compile, and
throughput of the fused weight expansion (CUDA only).

    python benchmarks/kernel_bench.py                   # full grid: B 1024-32768, D 512/768/1024, C 1 and 7
    python benchmarks/kernel_bench.py --loss-share      # + the loss's share of a ViT-B/16 training step
    python benchmarks/kernel_bench.py --quick           # a few shapes, for a first look
    python benchmarks/kernel_bench.py --expansion       # weight expansion ViT-B/16 -> ViT-L/16 instead
    python benchmarks/kernel_bench.py --distill         # fused linear KL distillation loss instead
    python benchmarks/kernel_bench.py --distill --head  # + the whole LLaMA head (cross-entropy + KL)
    python benchmarks/kernel_bench.py --head            # the LLaMA head alone (also measured on CPU)

What it measures, per shape (B images, C captions per image, embed dim D; bf16 unless --dtype):
- forward and forward+backward time (median of --reps, CUDA events, after warm-up) and the
  peak extra memory of one forward+backward, for three implementations of the same loss:
  ``fused`` = compt.kernels.feature_alignment_loss(backend="triton") (includes its one host
  sync for the NaN/Inf check), ``eager`` = feature_alignment_loss_reference,
  ``compile`` = torch.compile(feature_alignment_loss_reference) (compile time excluded).
- Before timing: agreement of fused vs reference (loss and gradients, fp32 and bf16, with and
  without proj), since the tests here only run the kernels in Triton's CPU interpreter.
- With --loss-share: the loss's share of one ViT-B/16 training step at a per-GPU batch, two
  ways: (a) FLOPs: compt.clip.flops.count_sample_flops(ViT-B-16) x batch at this GPU's measured
  bf16 matmul rate (a lower bound on the step time, so the share is an upper bound), and
  (b) a real open_clip ViT-B/16 step (autocast bf16, AdamW) timed on this GPU.
  The step excludes the teacher's forward, which CoM-PT adds: real shares are smaller.

With --expansion: every tensor of ViT-B/16 -> ViT-L/16 (exact with noise 0 and 0.05, official)
grown into float32 by compt.kernels.expand_flat_slice's Triton kernel and by the PyTorch
reference (TensorPlan.flat_slice): a bit-identity check on this GPU (whole tensors and ZeRO-3
partitions), then GB/s of useful bytes (output + teacher + init read once) for the kernel
(GPU time from the profiler, and wall time), the end-to-end call (teacher preparation
included) and the reference, against the memory-bandwidth limit measured with a large
clone/copy on the same device.

With --distill: the fused linear KL distillation loss (compt.kernels.fused_linear_kl) at
--distill-tokens 8192 tokens, vocab 32000, student:teacher hidden 1024:1024, 2048:2048 and
1024:2048 (bf16 unless --dtype): peak memory above the inputs and forward+backward time of
``naive`` (distill_kl_reference, full logits), ``fused`` (backend="triton"), ``torch-chunked``
(backend="torch") and Liger-Kernel's fused linear JSD loss when liger_kernel is importable
(configured as KL(p_t || p_s) only after a numerical check against the reference; else a
printed note), after an agreement check of both of ours against the reference on the GPU.

With --head: the LLaMA head's whole loss from final hidden states and lm_head weights,
compt.kernels.fused_lm_head_loss: cross-entropy + alpha * KL for each --distill-dims pair, and
cross-entropy alone (a stage without a teacher) for each student dim, at --distill-tokens and
--distill-vocab: peak memory above the inputs and forward+backward time of ``naive``
(lm_head_loss_reference, full logits of both models), ``fused`` (backend="triton"),
``torch-chunked`` (backend="torch") and Liger-Kernel's fused linear cross-entropy / JSD losses
when importable (each after a numerical check), after an agreement check against the reference.
With --distill its rows go into the distill file (gpu_check.py runs it so); alone, into
head-<device>.*. ``--head --device cpu`` measures CPU training's head (naive vs torch-chunked;
peak memory from torch.profiler's allocation records, wall times); only its ``fused`` (Triton
interpreter) numbers mean nothing there.

Targets (issue 4): fused >= 3x faster than eager and not slower than torch.compile;
expansion within 2x of the bandwidth limit; distill: fused peak <= 30% of naive's, time
<= naive's. Issue 19: the fused LLaMA head (--head) <= 30% of the naive head's peak memory at
32k vocabulary and 8k tokens, time <= naive's.
Outputs: benchmarks/results/kernels-<device>.{json,md} (expansion-<device>.{json,md} with
--expansion, distill-<device>.{json,md} with --distill, head-<device>.{json,md} with --head
alone), with the device, versions and command.
Without CUDA it prints a message and exits 0, writing nothing.

``--device cpu`` is a dry run of this script's own logic (tests/test_kernels_benchmark.py):
the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here), times are wall
times, no memory is measured, the agreement checks use tiny shapes and torch.compile uses
its "eager" backend. Its numbers mean nothing; pass small shapes (--batches, --dims,
--step-model, --expansion-models, --distill-*) and --results somewhere else.
"""
from __future__ import annotations

import argparse
import json
import os
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
DEVICE = "cuda"  # where inputs live; only a CPU dry run of this script's own logic changes it (--device cpu)


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
        # A CPU dry run checks the plumbing, not Inductor (which would need minutes per shape there).
        backend = {} if DEVICE == "cuda" else {"backend": "eager"}
        compiled = torch.compile(feature_alignment_loss_reference, dynamic=False, **backend)
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
    """Median of fn()'s time by CUDA events (wall time on a CPU dry run)."""
    if DEVICE != "cuda":
        return _wall_ms(fn, reps, warmup=0)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_extra_mib(fn) -> dict:
    """{"peak_extra_mib": peak CUDA memory of one fn() above what is allocated before it}; {} on a CPU dry run."""
    if DEVICE != "cuda":
        return {}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return {"peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}


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
    out = _peak_extra_mib(forward_backward)
    out["fwd_ms"] = _median_ms(forward, reps)
    out["fwd_bwd_ms"] = _median_ms(forward_backward, reps)
    _clear_grads(inputs)
    return out


# ---------------------------------------------------------------------------
# Correctness on the GPU (the compiled kernels, not the interpreter).
# ---------------------------------------------------------------------------

def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


# (batch, captions, dim, student dim for a projection or None)
AGREEMENT_CASES = ((1, 1, 512, None), (3, 7, 500, None), (64, 7, 1024, None), (1024, 7, 512, None),
                   (4096, 1, 768, None), (33, 7, 512, 768))
DRY_RUN_AGREEMENT_CASES = ((1, 1, 16, None), (3, 7, 20, None), (5, 1, 40, None), (7, 7, 16, 24))


def check_agreement(cases=None) -> list[dict]:
    """fused (Triton) vs feature_alignment_loss_reference (loss and gradients, fp32 and bf16);
    ``cases`` defaults to AGREEMENT_CASES on CUDA, DRY_RUN_AGREEMENT_CASES on a CPU dry run."""
    from compt.kernels import feature_alignment_loss, feature_alignment_loss_reference

    rows = []
    if cases is None:
        cases = AGREEMENT_CASES if DEVICE == "cuda" else DRY_RUN_AGREEMENT_CASES
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
            del inputs
    return rows


# ---------------------------------------------------------------------------
# Loss share of a ViT-B/16 training step.
# ---------------------------------------------------------------------------

def matmul_tflops(dtype: torch.dtype = torch.bfloat16, n: int | None = None, reps: int = 20) -> float:
    n = n or (8192 if DEVICE == "cuda" else 256)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    for _ in range(3):
        a @ b
    ms = _median_ms(lambda: a @ b, reps)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def step_model_config(spec: str) -> dict:
    """--step-model: an open_clip model name, or the path of a JSON model config."""
    import open_clip

    if spec.endswith(".json") or Path(spec).is_file():
        return json.loads(Path(spec).read_text())
    cfg = open_clip.get_model_config(spec)
    if cfg is None:
        raise SystemExit(f"--step-model {spec!r}: neither an open_clip model name nor a JSON model config file")
    return cfg


def time_clip_step(model_name: str, batch: int, captions: int, reps: int, warmup: int) -> dict:
    """Median time of one training step of open_clip model ``model_name`` (a name or a
    JSON config file, as --step-model): autocast bf16, AdamW, CLIP loss."""
    import open_clip

    if open_clip.get_model_config(model_name) is not None:
        model = open_clip.create_model(model_name, device=DEVICE)
    else:
        model = open_clip.CLIP(**step_model_config(model_name)).to(DEVICE)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    size = model.visual.image_size
    height, width = size if isinstance(size, (tuple, list)) else (size, size)
    vocab = model.vocab_size if hasattr(model, "vocab_size") else 49408
    images = torch.randn(batch, 3, height, width, device=DEVICE)
    texts = torch.randint(0, vocab, (batch * captions, model.context_length), device=DEVICE)
    labels = torch.arange(batch, device=DEVICE)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
            txt = torch.nn.functional.normalize(model.encode_text(texts), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.view(batch, captions, -1).mean(1).t()
            loss = (torch.nn.functional.cross_entropy(logits, labels)
                    + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync()
    ms = _median_ms(step, reps)
    projection = getattr(model, "text_projection", None)
    embed_dim = projection.shape[-1] if isinstance(projection, torch.Tensor) else None
    del model, opt
    _empty_cache()
    return {"step_ms": ms, "embed_dim": embed_dim}


def loss_share(args, impls: dict, dtype: torch.dtype) -> dict:
    from compt.clip.flops import count_sample_flops

    model_name = args.step_model
    cfg = step_model_config(model_name)
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
        _empty_cache()
    return out


# ---------------------------------------------------------------------------
# Fused weight expansion (--expansion): GB/s of growing ViT-B/16 -> ViT-L/16.
# ---------------------------------------------------------------------------
EXPANSION_CASES = (("exact", 0.0), ("exact", 0.05), ("official", 0.0))
# (elements per program, widest column block, warps) tried for the kernel; the first is the default.
LAUNCH_SWEEP = ((1024, 256, 8), (512, 256, 4), (1024, 128, 4), (2048, 256, 8), (4096, 512, 16))


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _wall_ms(fn, reps: int, warmup: int = 1) -> float:
    """Median wall time of fn() (host work included), synchronised on both ends."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _device_ms(fn, reps: int, name: str) -> float | None:
    """GPU time of the kernels whose name contains ``name`` in one fn() (median-free: the
    profiler's sum over reps / reps). Excludes host launch overhead, which for the many
    small tensors of a model would otherwise be all that is measured."""
    if DEVICE != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        _sync()
    total_us = sum(e.device_time_total for e in prof.key_averages() if name in e.key)
    return total_us / 1e3 / reps if total_us else None


def copy_bandwidth_gbs(gib: float = 1.0, reps: int = 20) -> dict:
    """The memory-bandwidth limit on this device: (read + write bytes) / time of a large
    ``torch.clone`` and of ``dst.copy_(src)``; the better one is the limit."""
    n = int(gib * 2**30) // 4
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    out = {}
    for label, fn in (("clone", lambda: src.clone()), ("copy_", lambda: dst.copy_(src))):
        ms = _median_ms(fn, reps) if DEVICE == "cuda" else _wall_ms(fn, reps)
        out[f"{label}_gbs"] = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    out["limit_gbs"] = max(out["clone_gbs"], out["copy__gbs"])
    del src, dst
    return out


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


def expansion_case(small_cfg: dict, big_cfg: dict, mode: str, noise: float, *, ranks: int, reps: int,
                   ref_reps: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Grow every student tensor (full tensors, then as ``ranks`` ZeRO-3 partitions) with
    the Triton kernel and with the reference; check they agree bit for bit; time both."""
    from compt.clip.grow import plan_tensor, state_shapes
    from compt.kernels import expand_flat_slice, prepare_expansion

    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    teacher = {k: torch.randn(v, device=DEVICE, generator=gen) * 0.02 for k, v in state_shapes(small_cfg).items()}
    plans, inits = [], {}
    for name, shape in state_shapes(big_cfg).items():
        plan = plan_tensor(name, small_cfg, big_cfg, mode, noise, seed)
        if plan is None or not plan.axes:
            continue
        plans.append(plan)
        if plan.needs_init():
            inits[name] = torch.randn(plan.numel, device=DEVICE, dtype=dtype, generator=gen) * 0.02
    out_bytes = sum(p.numel for p in plans) * torch.finfo(dtype).bits // 8
    teacher_bytes = sum(teacher[p.sources[0]].numel() * teacher[p.sources[0]].element_size()
                        for p in plans if p.sources)
    init_bytes = sum(x.numel() * x.element_size() for x in inits.values())
    useful_bytes = out_bytes + teacher_bytes + init_bytes  # what any implementation must move

    t0 = time.perf_counter()
    prepared = [prepare_expansion(p, teacher) for p in plans]
    _sync()
    prepare_s = time.perf_counter() - t0
    parts = [[(p.numel * r // ranks, p.numel * (r + 1) // ranks) for r in range(ranks)] for p in plans]

    def kernel_full():
        return [e.flat_slice(0, e.plan.numel, inits.get(e.plan.name), dtype=dtype) for e in prepared]

    def kernel_parts():
        for e, cuts in zip(prepared, parts):
            init = inits.get(e.plan.name)
            for a, b in cuts:
                e.flat_slice(a, b, init[a:b] if init is not None else None, dtype=dtype)

    def end_to_end():  # what a caller without prepare_expansion pays: teacher preparation per call
        for p in plans:
            expand_flat_slice(p, teacher, 0, p.numel, inits.get(p.name), dtype=dtype, backend="triton")

    def reference():
        for p in plans:
            p.flat_slice(teacher, 0, p.numel, inits.get(p.name), dtype=dtype)

    mismatched = []
    for e, got in zip(prepared, kernel_full()):
        p = e.plan
        want = p.flat_slice(teacher, 0, p.numel, inits.get(p.name), dtype=dtype)
        if not _bits_equal(got, want):
            mismatched.append({"name": p.name, "elements": int((got.view(-1) != want.view(-1)).sum()),
                               "of": p.numel})
        del got, want
    for e, cuts in zip(prepared[:8], parts[:8]):  # partitions of a few tensors against the reference
        init = inits.get(e.plan.name)
        for a, b in cuts:
            got = e.flat_slice(a, b, init[a:b] if init is not None else None, dtype=dtype)
            if not _bits_equal(got, e.plan.flat_slice(teacher, a, b, init[a:b] if init is not None else None,
                                                       dtype=dtype)):
                mismatched.append({"name": e.plan.name, "slice": [a, b]})

    row = {"mode": mode, "noise": noise, "dtype": str(dtype).removeprefix("torch."), "tensors": len(plans),
           "elements": sum(p.numel for p in plans), "useful_bytes": useful_bytes,
           "bit_identical": not mismatched, "mismatched": mismatched[:20], "prepare_s_once": prepare_s}
    row["kernel_device_ms"] = _device_ms(kernel_full, reps, "_expand_kernel")
    row["kernel_parts_device_ms"] = _device_ms(kernel_parts, reps, "_expand_kernel")
    row["kernel_wall_ms"] = _wall_ms(kernel_full, reps)
    row["end_to_end_wall_ms"] = _wall_ms(end_to_end, max(1, ref_reps))
    row["reference_wall_ms"] = _wall_ms(reference, max(1, ref_reps))

    # The biggest tensors alone: long enough that wall time is the kernel's time.
    largest = sorted(prepared, key=lambda e: -e.plan.numel)[:3]
    row["largest"] = []
    for e in largest:
        p, init = e.plan, inits.get(e.plan.name)
        nbytes = p.numel * torch.finfo(dtype).bits // 8 + (teacher[p.sources[0]].numel() * 4 if p.sources else 0) + (
            init.numel() * init.element_size() if init is not None else 0)
        k_ms = _wall_ms(lambda: e.flat_slice(0, p.numel, init, dtype=dtype), reps)
        r_ms = _wall_ms(lambda: p.flat_slice(teacher, 0, p.numel, init, dtype=dtype), max(1, ref_reps))
        row["largest"].append({"name": p.name, "shape": list(p.shape), "kernel_ms": k_ms, "reference_ms": r_ms,
                               "kernel_gbs": nbytes / (k_ms * 1e-3) / 1e9,
                               "reference_gbs": nbytes / (r_ms * 1e-3) / 1e9})
    row["launch_sweep"] = []
    if DEVICE == "cuda":  # same results (per-element code), other tile shapes and warp counts
        from compt.kernels import expansion_triton

        default = expansion_triton.GPU_LAUNCH
        try:
            for launch in LAUNCH_SWEEP:
                expansion_triton.GPU_LAUNCH = launch
                row["launch_sweep"].append(_sweep_entry(launch, _device_ms(kernel_full, reps, "_expand_kernel"),
                                                        useful_bytes))
        finally:
            expansion_triton.GPU_LAUNCH = default
    for key in ("kernel_device_ms", "kernel_parts_device_ms", "kernel_wall_ms", "end_to_end_wall_ms",
                "reference_wall_ms"):
        ms = row[key]
        row[key.replace("_ms", "_gbs")] = useful_bytes / (ms * 1e-3) / 1e9 if ms else None
    del prepared, teacher, inits
    _empty_cache()
    return row


def _sweep_entry(launch: tuple[int, int, int], ms: float | None, useful_bytes: int) -> dict:
    """One launch configuration's result; ms None (the profiler saw no kernel) gives no GB/s."""
    return {"tile": launch[0], "max_cols": launch[1], "warps": launch[2], "device_ms": ms,
            "device_gbs": useful_bytes / (ms * 1e-3) / 1e9 if ms else None}


def expansion_model_config(spec: str) -> tuple[str, dict]:
    """--expansion-models: a METHOD.md chain model name (compt.recipes.PAPER_MODELS) or
    the path of a JSON model config; (its name, its config)."""
    from compt.recipes import PAPER_MODELS

    if spec in PAPER_MODELS:
        return spec, PAPER_MODELS[spec]
    path = Path(spec)
    if path.is_file():
        return path.stem, json.loads(path.read_text())
    raise SystemExit(f"--expansion-models {spec!r}: neither one of {sorted(PAPER_MODELS)} nor a JSON config file")


def expansion_benchmark(args) -> dict:
    from compt.kernels import expansion_triton

    (small_name, small_cfg), (big_name, big_cfg) = (expansion_model_config(m) for m in args.expansion_models)
    bandwidth = copy_bandwidth_gbs(args.bandwidth_gib)
    print(f"copy bandwidth: clone {bandwidth['clone_gbs']:.0f} GB/s, copy_ {bandwidth['copy__gbs']:.0f} GB/s",
          flush=True)
    rows = []
    for mode, noise in EXPANSION_CASES:
        row = expansion_case(small_cfg, big_cfg, mode, noise, ranks=args.expansion_ranks, reps=args.reps,
                             ref_reps=args.expansion_ref_reps)
        gbs = row["kernel_device_gbs"] or row["kernel_wall_gbs"]
        row["x_of_bandwidth_limit"] = bandwidth["limit_gbs"] / gbs  # kernel time / minimal time
        rows.append(row)
        print(_expansion_line(row), flush=True)
    return {"teacher": small_name, "student": big_name, "configs": {"teacher": small_cfg, "student": big_cfg},
            "bandwidth": bandwidth, "rows": rows, "gpu_launch": list(expansion_triton.GPU_LAUNCH),
            "target_within_2x_of_bandwidth": all(r["x_of_bandwidth_limit"] <= 2.0 for r in rows),
            "bit_identical_everywhere": all(r["bit_identical"] for r in rows)}


def _expansion_line(row: dict) -> str:
    def f(x, fmt="{:.0f}"):
        return "-" if x is None else fmt.format(x)

    return (f"{row['mode']:>8} noise {row['noise']:<4} | {row['tensors']} tensors, {row['useful_bytes'] / 1e9:.2f} GB | "
            f"kernel {f(row['kernel_device_gbs'])} GB/s device, {f(row['kernel_wall_gbs'])} wall | "
            f"end-to-end {f(row['end_to_end_wall_gbs'])} | reference {f(row['reference_wall_gbs'], '{:.1f}')} GB/s | "
            f"x{row['x_of_bandwidth_limit']:.2f} of the bandwidth limit | bit-identical {row['bit_identical']}")


def expansion_markdown(result: dict) -> str:
    v, bw = result["versions"], result["expansion"]["bandwidth"]
    ex = result["expansion"]
    lines = [
        f"# Fused weight expansion: {result['device']}",
        "",
        f"torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, python {v['python']}; {result['date']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Growing every tensor of {ex['teacher']} -> {ex['student']} (METHOD.md chain configs) into float32, "
        "from a float32 teacher. *Useful bytes* = output + teacher (+ init slices) read once: what any "
        "implementation must move. GB/s = useful bytes / time. `kernel device` = GPU time of the Triton "
        "kernels (profiler; the teacher prepared once per tensor, `prepare_expansion`); `kernel wall` = the "
        "same with host launch overhead (~500 small tensors); `end-to-end` = `expand_flat_slice` per tensor, "
        "teacher preparation (PyTorch: float64 copy, mean slots, rms) included; `reference` = "
        "`TensorPlan.flat_slice` on the GPU. `x of limit` = kernel device time / (useful bytes / copy "
        "bandwidth); target (issue 4): <= 2.",
        "",
        f"Memory bandwidth limit (measured): clone {bw['clone_gbs']:.0f} GB/s, copy_ {bw['copy__gbs']:.0f} GB/s.",
        "",
        "| mode | noise | GB | kernel device GB/s | kernel ZeRO-3 parts GB/s | kernel wall GB/s | end-to-end GB/s "
        "| reference GB/s | x of limit | bit-identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt="{:.0f}"):
        return "-" if x is None else fmt.format(x)

    for r in ex["rows"]:
        lines.append(f"| {r['mode']} | {r['noise']} | {r['useful_bytes'] / 1e9:.2f} | {f(r['kernel_device_gbs'])} | "
                     f"{f(r['kernel_parts_device_gbs'])} | {f(r['kernel_wall_gbs'])} | "
                     f"{f(r['end_to_end_wall_gbs'])} | {f(r['reference_wall_gbs'], '{:.1f}')} | "
                     f"{r['x_of_bandwidth_limit']:.2f} | {r['bit_identical']} |")
    lines += ["", "Largest tensors alone (wall time, prepared teacher):", "",
              "| mode | noise | tensor | shape | kernel ms | GB/s | reference ms | GB/s |", "|---|---|---|---|---|---|---|---|"]
    for r in ex["rows"]:
        for t in r["largest"]:
            lines.append(f"| {r['mode']} | {r['noise']} | {t['name']} | {t['shape']} | {t['kernel_ms']:.3f} | "
                         f"{t['kernel_gbs']:.0f} | {t['reference_ms']:.1f} | {t['reference_gbs']:.1f} |")
    if any(r["launch_sweep"] for r in ex["rows"]):
        lines += ["", "Kernel device GB/s by launch configuration (elements per program / widest column block "
                  "/ warps; the first is the default, `GPU_LAUNCH` in kernels/expansion_triton.py):", "",
                  "| mode | noise | " + " | ".join(f"{t['tile']}/{t['max_cols']}/{t['warps']}"
                                                  for t in ex["rows"][0]["launch_sweep"]) + " |",
                  "|---|---|" + "---|" * len(ex["rows"][0]["launch_sweep"])]
        for r in ex["rows"]:
            lines.append(f"| {r['mode']} | {r['noise']} | "
                         + " | ".join(f(t["device_gbs"]) for t in r["launch_sweep"]) + " |")
    lines += ["", f"Within 2x of the bandwidth limit everywhere: {ex['target_within_2x_of_bandwidth']}. "
              f"Bit-identical to the reference on this GPU (every tensor, and ZeRO-3 partitions of 8): "
              f"{ex['bit_identical_everywhere']}."]
    for r in ex["rows"]:
        if r["mismatched"]:
            lines.append(f"- {r['mode']} noise {r['noise']}: differs in {r['mismatched']}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Fused linear KL distillation (--distill): peak memory and time vs the naive loss.
# ---------------------------------------------------------------------------
DISTILL_IMPLS = ("naive", "fused", "torch-chunked", "liger")


def _distill_inputs(tokens: int, student_dim: int, teacher_dim: int, vocab: int, dtype: torch.dtype,
                    seed: int = 0, masked: bool = False):
    """Hidden states ~ N(0, 1) and lm_heads ~ N(0, 1/D): logits of std ~1."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(dtype)

    s_h = rand(tokens, student_dim).requires_grad_()
    s_w = rand(vocab, student_dim, scale=student_dim ** -0.5).requires_grad_()
    t_h, t_w = rand(tokens, teacher_dim), rand(vocab, teacher_dim, scale=teacher_dim ** -0.5)
    mask = torch.rand(tokens, device=DEVICE, generator=gen) < 0.8 if masked else None
    return s_h, s_w, t_h, t_w, mask


def _distill_ours(temperature: float) -> dict:
    from compt.kernels import distill_kl_reference, fused_linear_kl

    return {
        "naive": lambda s_h, s_w, t_h, t_w: distill_kl_reference(s_h, s_w, t_h, t_w, temperature=temperature),
        "fused": lambda s_h, s_w, t_h, t_w: fused_linear_kl(s_h, s_w, t_h, t_w, temperature=temperature,
                                                            backend="triton"),
        "torch-chunked": lambda s_h, s_w, t_h, t_w: fused_linear_kl(s_h, s_w, t_h, t_w, temperature=temperature,
                                                                    backend="torch"),
    }


def _liger_call(cls, beta: float, temperature: float, hard_weight: float = 0.0, soft_weight: float = 1.0):
    """A callable (s_h, s_w, t_h, t_w, labels=None) -> loss over one of Liger-Kernel's fused
    linear JSD modules with JSD weight ``beta``: by default a pure soft (distillation) loss,
    with ``hard_weight`` its cross-entropy on ``labels`` too (random ones when None).

    Their constructor and forward arguments differ across liger_kernel releases (bias
    arguments, chunk_size, jsd_beta vs beta, labels required or optional), so they are
    read from the signatures rather than assumed."""
    import inspect

    init = inspect.signature(cls.__init__).parameters
    wanted = {"weight_hard_loss": hard_weight, "weight_soft_loss": soft_weight, "beta": beta, "jsd_beta": beta,
              "temperature": temperature, "ignore_index": -100}
    module = cls(**{k: v for k, v in wanted.items() if k in init})
    params = [p for name, p in inspect.signature(module.forward).parameters.items()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][4:]
    labels = {}

    def call(s_h, s_w, t_h, t_w, given_labels=None):
        extra = []
        for p in params:
            if p.name in ("true_labels", "target", "labels", "shift_labels") and given_labels is not None:
                extra.append(given_labels)
            elif p.name in ("true_labels", "target", "labels", "shift_labels"):
                key = (s_h.shape[0], s_w.shape[0], s_h.device)
                if key not in labels:  # every token valid: Liger's mean is then over all tokens, as ours
                    labels[key] = torch.randint(0, s_w.shape[0], (s_h.shape[0],), device=s_h.device)
                extra.append(labels[key])
            elif p.name.endswith("bias"):
                extra.append(None)
            elif p.default is p.empty:
                raise TypeError(f"{cls.__name__}.forward needs an argument {p.name!r} this benchmark does not know")
            else:
                break
        return module(s_h, s_w, t_h, t_w, *extra)

    return call


def _distill_liger(temperature: float, notes: list[str]) -> dict:
    """Liger-Kernel's fused linear distillation losses, when importable, each configured
    (beta 0 or 1, whichever its release uses for it) to compute KL(p_t || p_s) -- checked
    numerically against distill_kl_reference here, not assumed."""
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        notes.append("liger_kernel is not importable: the Liger-Kernel comparison is skipped.")
        return {}
    candidates = []
    for module_name, cls_name, label in (("liger_kernel.chunked_loss", "LigerFusedLinearJSDLoss", "liger"),
                                         ("liger_kernel.transformers", "LigerFusedLinearJSD", "liger-triton-jsd")):
        try:
            candidates.append((label, getattr(__import__(module_name, fromlist=[cls_name]), cls_name)))
        except (ImportError, AttributeError) as err:
            notes.append(f"{module_name}.{cls_name} not available ({type(err).__name__}: {err}); skipped.")

    from compt.kernels import distill_kl_reference

    impls = {}
    check = _distill_inputs(64, 64, 96, 1000, torch.float32, seed=7)
    want_loss = distill_kl_reference(*check[:4], temperature=temperature)
    want_grad = torch.autograd.grad(want_loss, check[0])[0]
    for label, cls in candidates:
        tried = []
        for beta in (0.0, 1.0):
            try:
                fn = _liger_call(cls, beta, temperature)
                loss = fn(*check[:4]) * temperature ** 2  # Liger leaves out Hinton's T^2
                grad = torch.autograd.grad(loss, check[0])[0]
            except Exception as err:  # noqa: BLE001 - any failure of a third-party API is a note
                tried.append(f"beta={beta}: {type(err).__name__}: {str(err)[:200]}")
                continue
            errors = (rel_err(loss, want_loss), rel_err(grad, want_grad))
            tried.append(f"beta={beta}: rel err loss {errors[0]:.1e}, d hidden {errors[1]:.1e}")
            if max(errors) <= 1e-3:
                impls[label] = fn
                notes.append(f"{label} = {cls.__module__}.{cls.__name__} with beta={beta} (= KL(p_t || p_s) "
                             f"here: {tried[-1]}); hard-loss weight 0, every token a valid label.")
                break
        else:
            notes.append(f"{label} ({cls.__module__}.{cls.__name__}) matched KL(p_t || p_s) with neither beta: "
                         + "; ".join(tried) + ". Not timed.")
    del check
    return impls


def _distill_measure(fn, inputs, reps: int, warmup: int) -> dict:
    """Forward+backward ms (median) and peak memory above the inputs of one forward+backward."""
    s_h, s_w, t_h, t_w = inputs

    def forward_backward():
        s_h.grad = s_w.grad = None
        fn(s_h, s_w, t_h, t_w).backward()

    for _ in range(warmup):
        forward_backward()
    s_h.grad = s_w.grad = None
    out = _peak_extra_mib(forward_backward)
    out["fwd_bwd_ms"] = _median_ms(forward_backward, reps)  # wall time on a CPU dry run
    s_h.grad = s_w.grad = None
    return out


# (tokens, student dim, teacher dim, vocab, temperature, masked)
DISTILL_AGREEMENT_CASES = ((1, 64, 64, 1000, 1.0, False), (333, 256, 512, 32000, 2.0, True),
                           (4096, 1024, 2048, 32000, 1.0, False), (2048, 1024, 1024, 50257, 0.5, True))
DRY_RUN_DISTILL_AGREEMENT_CASES = ((1, 16, 16, 50, 1.0, False), (37, 24, 40, 300, 2.0, True))


def check_distill_agreement(cases=None) -> list[dict]:
    """fused (Triton) and torch-chunked vs distill_kl_reference on this GPU (loss and both gradients);
    ``cases`` defaults to DISTILL_AGREEMENT_CASES on CUDA, DRY_RUN_DISTILL_AGREEMENT_CASES on a CPU dry run."""
    from compt.kernels import distill_kl_reference, fused_linear_kl

    rows = []
    if cases is None:
        cases = DISTILL_AGREEMENT_CASES if DEVICE == "cuda" else DRY_RUN_DISTILL_AGREEMENT_CASES
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for tokens, sdim, tdim, vocab, temperature, masked in cases:
            s_h, s_w, t_h, t_w, mask = _distill_inputs(tokens, sdim, tdim, vocab, dtype, seed=tokens, masked=masked)
            results = {}
            for name in ("reference", "triton", "torch"):
                s_h.grad = s_w.grad = None
                if name == "reference":
                    loss = distill_kl_reference(s_h, s_w, t_h, t_w, temperature=temperature, mask=mask)
                else:
                    loss = fused_linear_kl(s_h, s_w, t_h, t_w, temperature=temperature, mask=mask, backend=name)
                loss.backward()
                results[name] = [loss.detach(), s_h.grad.clone(), s_w.grad.clone()]
            for name in ("triton", "torch"):
                errors = [rel_err(f, r) for f, r in zip(results[name], results["reference"])]
                rows.append({"impl": "fused" if name == "triton" else "torch-chunked",
                             "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "student_dim": sdim,
                             "teacher_dim": tdim, "vocab": vocab, "temperature": temperature, "masked": masked,
                             "rel_err": errors, "tolerance": tol, "ok": max(errors) <= tol})
            del s_h, s_w, t_h, t_w, results
            _empty_cache()
    return rows


def distill_benchmark(args, dtype: torch.dtype) -> dict:
    notes: list[str] = []
    impls = {**_distill_ours(args.temperature), **_distill_liger(args.temperature, notes)}
    for note in notes:
        print("note:", note, flush=True)
    rows = []
    for pair in args.distill_dims:
        student_dim, teacher_dim = (int(x) for x in pair.split(":"))
        inputs = _distill_inputs(args.distill_tokens, student_dim, teacher_dim, args.distill_vocab, dtype)[:4]
        row = {"tokens": args.distill_tokens, "vocab": args.distill_vocab, "student_dim": student_dim,
               "teacher_dim": teacher_dim}
        for name, fn in impls.items():
            try:
                row[name] = _distill_measure(fn, inputs, args.reps, args.warmup)
            except torch.OutOfMemoryError as err:
                row[name] = {"error": f"OOM: {str(err)[:200]}"}
            except Exception as err:  # noqa: BLE001 - a third-party (Liger) failure must not end the run
                if name in ("naive", "fused", "torch-chunked"):
                    raise
                row[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            _empty_cache()
        naive = row.get("naive", {})
        for name in impls:
            m = row[name]
            if "fwd_bwd_ms" in m and "fwd_bwd_ms" in naive:
                m["time_vs_naive"] = m["fwd_bwd_ms"] / naive["fwd_bwd_ms"]
            if "peak_extra_mib" in m and "peak_extra_mib" in naive:
                m["peak_vs_naive"] = m["peak_extra_mib"] / naive["peak_extra_mib"]
        rows.append(row)
        print(_distill_line(row, impls), flush=True)
        del inputs
        _empty_cache()
    fused = [r["fused"] for r in rows if "time_vs_naive" in r.get("fused", {})]
    return {"temperature": args.temperature, "impls": list(impls), "notes": notes, "rows": rows, "targets": {
        "max_peak_vs_naive": max((m["peak_vs_naive"] for m in fused if "peak_vs_naive" in m), default=None),
        "max_time_vs_naive": max((m["time_vs_naive"] for m in fused), default=None),
        "fused_peak_at_most_30pct_of_naive": bool(fused) and all(m.get("peak_vs_naive", 1e9) <= 0.30 for m in fused),
        "fused_not_slower_than_naive": bool(fused) and all(m["time_vs_naive"] <= 1.0 for m in fused),
    }}


def _distill_line(row: dict, impls, label: str | None = None) -> str:
    parts = [f"N={row['tokens']} V={row['vocab']} " + (label or f"D {row['student_dim']}->{row['teacher_dim']}")]
    for name in impls:
        m = row[name]
        if "error" in m:
            parts.append(f"{name} {m['error'][:80]}")
            continue
        mem = f" {m['peak_extra_mib']:.0f} MiB" if "peak_extra_mib" in m else ""
        rel = f" ({100 * m['peak_vs_naive']:.0f}% mem, x{m['time_vs_naive']:.2f} time)" if "peak_vs_naive" in m else ""
        parts.append(f"{name} {m['fwd_bwd_ms']:.2f} ms{mem}{rel}")
    return " | ".join(parts)


def distill_markdown(result: dict) -> str:
    v, d = result["versions"], result["distill"]
    lines = [
        f"# Fused linear KL distillation loss: {result['device']}",
        "",
        f"torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, python {v['python']}; dtype {result['dtype']}; "
        f"temperature {d['temperature']}; median of {result['reps']} after {result['warmup']} warm-up; "
        f"{result['date']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        "Forward+backward time (ms) and peak memory above the inputs (MiB) of one forward+backward of "
        "T^2 * mean KL(p_teacher || p_student) from hidden states and lm_head weights. `naive` is "
        "`distill_kl_reference` (full logits); `fused` is `fused_linear_kl(backend=\"triton\")`; "
        "`torch-chunked` is `fused_linear_kl(backend=\"torch\")`; `liger` is Liger-Kernel's fused linear "
        "distillation loss when importable (see notes). Targets: fused peak <= 30% of naive, time <= naive.",
        "",
        "| D student | D teacher | impl | fwd+bwd ms | peak MiB | peak / naive | time / naive |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        for name in d["impls"]:
            m = r[name]
            if "error" in m:
                lines.append(f"| {r['student_dim']} | {r['teacher_dim']} | {name} | {m['error'][:60]} | | | |")
                continue
            lines.append(f"| {r['student_dim']} | {r['teacher_dim']} | {name} | {m['fwd_bwd_ms']:.2f} | "
                         f"{_fmt(m.get('peak_extra_mib'))} | "
                         + (f"{100 * m['peak_vs_naive']:.0f}%" if "peak_vs_naive" in m else "-")
                         + f" | {_fmt(m.get('time_vs_naive'))} |")
    t = d["targets"]
    lines += ["", f"Tokens {d['rows'][0]['tokens'] if d['rows'] else '-'}, vocab "
              f"{d['rows'][0]['vocab'] if d['rows'] else '-'}. Targets: fused peak <= 30% of naive everywhere: "
              f"{t['fused_peak_at_most_30pct_of_naive']} (max {_fmt(t['max_peak_vs_naive'])}); not slower than "
              f"naive everywhere: {t['fused_not_slower_than_naive']} (max x{_fmt(t['max_time_vs_naive'])})."]
    if "agreement" in result:
        ok = sum(r["ok"] for r in result["agreement"])
        worst = {}
        for r in result["agreement"]:
            key = f"{r['impl']} {r['dtype']}"
            worst[key] = max(worst.get(key, 0.0), max(r["rel_err"]))
        lines += ["", f"Agreement with the reference on this GPU: {ok}/{len(result['agreement'])} cases within "
                  "tolerance (1e-5 fp32, 1e-2 bf16); worst relative error "
                  + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()) + "."]
    if d["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in d["notes"]]
    if "head" in result:
        lines += ["", "## The LLaMA head: cross-entropy + KL (--head)", ""] + head_section(
            result, result.get("head_agreement"))
    return "\n".join(lines) + "\n"


def _write_distill(args, result: dict, dtype: torch.dtype) -> int:
    result["reps"] = args.reps
    if not args.skip_check:
        result["agreement"] = check_distill_agreement()
        bad = [r for r in result["agreement"] if not r["ok"]]
        print(f"agreement vs distill_kl_reference: {len(result['agreement']) - len(bad)}/"
              f"{len(result['agreement'])} ok")
        for r in bad:
            print("  DISAGREES:", r)
    result["distill"] = distill_benchmark(args, dtype)
    result.pop("alpha", None)
    if args.head:
        _run_head(args, result, dtype)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"distill-{device_slug(result['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(distill_markdown(result))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


# ---------------------------------------------------------------------------
# LLaMA head (--head): next-token cross-entropy (+ KL) from hidden states, fused vs naive.
# ---------------------------------------------------------------------------
HEAD_IMPLS = ("naive", "fused", "torch-chunked", "liger")
HEAD_TARGET_PEAK = 0.30  # issue 19: fused head peak <= 30% of naive's, at 32k vocabulary and 8k tokens


def head_cases(dims: list[str]) -> list[tuple[int, int | None]]:
    """(student dim, teacher dim) per --distill-dims pair: cross-entropy + KL; then (student dim,
    None) per distinct student dim: the cross-entropy alone, as a stage without a teacher has it."""
    pairs = [tuple(int(x) for x in pair.split(":")) for pair in dims]
    return pairs + [(s, None) for s in dict.fromkeys(s for s, _ in pairs)]


def _head_inputs(tokens: int, student_dim: int, teacher_dim: int | None, vocab: int, dtype: torch.dtype,
                 seed: int = 0, ignored: float = 0.0):
    """(hidden, weight, targets, teacher hidden, teacher weight) as _distill_inputs, targets uniform
    over the vocabulary with a share ``ignored`` of them -100 (padding); no teacher: None, None."""
    s_h, s_w, t_h, t_w, _ = _distill_inputs(tokens, student_dim, teacher_dim or student_dim, vocab, dtype, seed)
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    targets = torch.randint(0, vocab, (tokens,), device=DEVICE, generator=gen)
    if ignored:
        targets[torch.rand(tokens, device=DEVICE, generator=gen) < ignored] = -100
    if teacher_dim is None:
        t_h = t_w = None
    return s_h, s_w, targets, t_h, t_w


def _head_ours(alpha: float, temperature: float) -> dict:
    from compt.kernels import fused_lm_head_loss, lm_head_loss_reference

    def fused(backend):
        return lambda s_h, s_w, y, t_h, t_w: fused_lm_head_loss(
            s_h, s_w, y, t_h, t_w, alpha=alpha, temperature=temperature, backend=backend).total

    return {"naive": lambda s_h, s_w, y, t_h, t_w: lm_head_loss_reference(
                s_h, s_w, y, t_h, t_w, alpha=alpha, temperature=temperature).total,
            "fused": fused("triton"), "torch-chunked": fused("torch")}


def _head_liger(alpha: float, temperature: float, notes: list[str]) -> dict:
    """{"liger": fn} when liger_kernel imports: its fused linear cross-entropy for the rows without a
    teacher, its fused linear JSD loss with a hard (cross-entropy) part for the others, each timed
    only after a numerical check against lm_head_loss_reference (else a note and an error cell)."""
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        notes.append("liger_kernel is not importable: the Liger-Kernel head comparison is skipped.")
        return {}
    from compt.kernels import lm_head_loss_reference

    candidates = {"ce": [], "ce+kl": []}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        module = LigerFusedLinearCrossEntropyLoss()
        candidates["ce"].append(("LigerFusedLinearCrossEntropyLoss", lambda s_h, s_w, y, t_h, t_w: module(s_w, s_h, y)))
    except Exception as err:  # noqa: BLE001 - any failure of a third-party API is a note
        notes.append(f"liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss unavailable ({type(err).__name__}: "
                     f"{str(err)[:200]}).")
    soft = alpha * temperature ** 2  # Liger weighs hard and soft losses and leaves out Hinton's T^2
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        for beta in (0.0, 1.0):
            call = _liger_call(LigerFusedLinearJSDLoss, beta, temperature, 1 / (1 + soft), soft / (1 + soft))
            candidates["ce+kl"].append((f"LigerFusedLinearJSDLoss beta={beta}",
                                        lambda s_h, s_w, y, t_h, t_w, _c=call: _c(s_h, s_w, t_h, t_w, y) * (1 + soft)))
    except Exception as err:  # noqa: BLE001
        notes.append(f"liger_kernel.chunked_loss.LigerFusedLinearJSDLoss unavailable ({type(err).__name__}: "
                     f"{str(err)[:200]}).")
    chosen = {}
    for kind, options in candidates.items():
        check = _head_inputs(64, 64, 96 if kind == "ce+kl" else None, 1000, torch.float32, seed=7)
        want = lm_head_loss_reference(*check, alpha=alpha, temperature=temperature).total
        want_grad = torch.autograd.grad(want, check[0])[0]
        tried = []
        for label, fn in options:
            try:
                loss = fn(*check)
                grad = torch.autograd.grad(loss, check[0])[0]
            except Exception as err:  # noqa: BLE001
                tried.append(f"{label}: {type(err).__name__}: {str(err)[:200]}")
                continue
            errors = (rel_err(loss, want), rel_err(grad, want_grad))
            tried.append(f"{label}: rel err loss {errors[0]:.1e}, d hidden {errors[1]:.1e}")
            if max(errors) <= 1e-3:
                chosen[kind] = fn
                notes.append(f"liger for {kind} rows = {tried[-1]}")
                break
        else:
            notes.append(f"no Liger-Kernel loss matched the {kind} head: " + "; ".join(tried or ["none available"])
                         + ". Not timed.")
    if not chosen:
        return {}

    def liger(s_h, s_w, y, t_h, t_w):
        kind = "ce" if t_h is None else "ce+kl"
        if kind not in chosen:
            raise RuntimeError(f"no Liger-Kernel loss matched the {kind} head (see notes)")
        return chosen[kind](s_h, s_w, y, t_h, t_w)

    return {"liger": liger}


def _cpu_peak_extra_mib(fn) -> dict:
    """{"peak_extra_mib": the most bytes torch held on the CPU during one fn() above what it held
    before}: torch.profiler's allocation records (profile_memory=True) summed in time order. Only
    torch's own allocations count (not the Triton interpreter's numpy copies)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
    live = peak = 0
    for e in records:
        live += e.nbytes()
        peak = max(peak, live)
    return {"peak_extra_mib": peak / 2**20}


def _head_measure(fn, inputs, reps: int, warmup: int) -> dict:
    """Forward+backward ms (median) and peak memory above the inputs of one forward+backward (CUDA:
    torch.cuda.max_memory_allocated; CPU: torch.profiler's allocation records)."""
    s_h, s_w = inputs[:2]

    def forward_backward():
        s_h.grad = s_w.grad = None
        fn(*inputs).backward()

    for _ in range(warmup):
        forward_backward()
    s_h.grad = s_w.grad = None
    out = _peak_extra_mib(forward_backward) if DEVICE == "cuda" else _cpu_peak_extra_mib(forward_backward)
    out["fwd_bwd_ms"] = _median_ms(forward_backward, reps)  # wall time on CPU
    s_h.grad = s_w.grad = None
    return out


# (tokens, student dim, teacher dim or None, vocab, temperature, share of targets ignored)
HEAD_AGREEMENT_CASES = ((1, 64, 64, 1000, 1.0, 0.0), (333, 256, 512, 32000, 2.0, 0.2),
                        (2048, 1024, None, 32000, 1.0, 0.2))
DRY_RUN_HEAD_AGREEMENT_CASES = ((1, 16, 16, 50, 1.0, 0.0), (37, 24, 40, 300, 2.0, 0.3), (20, 16, None, 129, 1.0, 0.3))


def check_head_agreement(alpha: float = 1.0, cases=None) -> list[dict]:
    """fused (Triton) and torch-chunked vs lm_head_loss_reference on this device (total, ce, d hidden,
    d weight, and kl with a teacher). float32: within 1e-5 of the reference. bf16: the reference
    rounds each term's d logits to bf16 before adding them, the fused head once after, so each is
    held to the float32 loss of the same bf16 inputs: within twice the reference's error, or 5e-3."""
    from compt.kernels import fused_lm_head_loss

    def run(inputs, backend, temperature):
        inputs[0].grad = inputs[1].grad = None
        out = fused_lm_head_loss(*inputs, alpha=alpha, temperature=temperature, backend=backend)
        out.total.backward()
        return [out.total.detach(), out.ce, inputs[0].grad.clone(), inputs[1].grad.clone()] + (
            [out.kl] if out.kl is not None else [])

    rows = []
    if cases is None:
        cases = HEAD_AGREEMENT_CASES if DEVICE == "cuda" else DRY_RUN_HEAD_AGREEMENT_CASES
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-3)):
        for tokens, sdim, tdim, vocab, temperature, ignored in cases:
            inputs = list(_head_inputs(tokens, sdim, tdim, vocab, dtype, seed=tokens, ignored=ignored))
            results = {name: run(inputs, name, temperature) for name in ("reference", "triton", "torch")}
            if dtype != torch.float32:
                wide = [x.detach().float().requires_grad_(i < 2) if x is not None and x.is_floating_point() else x
                        for i, x in enumerate(inputs)]
                truth = run(wide, "reference", temperature)
                bound = [max(2 * rel_err(r, t), tol) for r, t in zip(results["reference"], truth)]
            for name in ("triton", "torch"):
                errors = [rel_err(f, r) for f, r in zip(results[name], results["reference"])]
                row = {"impl": "fused" if name == "triton" else "torch-chunked",
                       "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "student_dim": sdim,
                       "teacher_dim": tdim, "vocab": vocab, "temperature": temperature, "ignored": ignored,
                       "rel_err": errors, "tolerance": tol}
                if dtype == torch.float32:
                    row["ok"] = max(errors) <= tol
                else:
                    row["rel_err_vs_fp32"] = [rel_err(f, t) for f, t in zip(results[name], truth)]
                    row["ok"] = all(e <= b for e, b in zip(row["rel_err_vs_fp32"], bound))
                rows.append(row)
            del inputs, results
            _empty_cache()
    return rows


def head_benchmark(args, dtype: torch.dtype) -> dict:
    notes: list[str] = []
    impls = {**_head_ours(args.head_alpha, args.temperature), **_head_liger(args.head_alpha, args.temperature, notes)}
    impls = {name: fn for name, fn in impls.items() if name in args.head_impls}
    for note in notes:
        print("note:", note, flush=True)
    rows = []
    for student_dim, teacher_dim in head_cases(args.distill_dims):
        inputs = _head_inputs(args.distill_tokens, student_dim, teacher_dim, args.distill_vocab, dtype)
        row = {"tokens": args.distill_tokens, "vocab": args.distill_vocab, "student_dim": student_dim,
               "teacher_dim": teacher_dim, "loss": "ce+kl" if teacher_dim else "ce"}
        for name, fn in impls.items():
            try:
                row[name] = _head_measure(fn, inputs, args.reps, args.warmup)
            except torch.OutOfMemoryError as err:
                row[name] = {"error": f"OOM: {str(err)[:200]}"}
            except Exception as err:  # noqa: BLE001 - a third-party (Liger) failure must not end the run
                if name != "liger":
                    raise
                row[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            _empty_cache()
        naive = row.get("naive", {})
        for name in impls:
            m = row[name]
            if "fwd_bwd_ms" in m and "fwd_bwd_ms" in naive:
                m["time_vs_naive"] = m["fwd_bwd_ms"] / naive["fwd_bwd_ms"]
            if "peak_extra_mib" in m and "peak_extra_mib" in naive:
                m["peak_vs_naive"] = m["peak_extra_mib"] / naive["peak_extra_mib"]
        rows.append(row)
        print(_head_line(row, impls), flush=True)
        del inputs
        _empty_cache()
    fused = [r["fused"] for r in rows if "time_vs_naive" in r.get("fused", {})]
    return {"alpha": args.head_alpha, "temperature": args.temperature, "impls": list(impls), "notes": notes,
            "memory": "torch.cuda.max_memory_allocated" if DEVICE == "cuda" else
            "torch.profiler allocation records (profile_memory=True) of torch's CPU tensors",
            "rows": rows, "targets": {
                "max_peak_vs_naive": max((m["peak_vs_naive"] for m in fused if "peak_vs_naive" in m), default=None),
                "max_time_vs_naive": max((m["time_vs_naive"] for m in fused), default=None),
                "fused_peak_at_most_30pct_of_naive": bool(fused) and all(
                    m.get("peak_vs_naive", 1e9) <= HEAD_TARGET_PEAK for m in fused),
                "fused_not_slower_than_naive": bool(fused) and all(m["time_vs_naive"] <= 1.0 for m in fused)}}


def _head_line(row: dict, impls) -> str:
    label = f"D {row['student_dim']}->{row['teacher_dim']} CE+KL" if row["teacher_dim"] else f"D {row['student_dim']} CE"
    return _distill_line(row, impls, label)


def head_section(result: dict, agreement: list[dict] | None) -> list[str]:
    """Markdown lines for the --head results (a file of their own, or a section of the distill one)."""
    h = result["head"]
    lines = [
        "Forward+backward time (ms) and peak memory above the inputs (MiB) of one forward+backward of "
        f"the LLaMA head's loss from final hidden states and lm_head weights: next-token cross-entropy "
        f"(`CE`, as a stage without a teacher computes it) or CE + {h['alpha']} * T^2 KL(p_teacher || "
        f"p_student) at T = {h['temperature']} (`CE+KL`). `naive` is `lm_head_loss_reference` (full logits "
        "of both models, as the LLaMA head was before); `fused` is `fused_lm_head_loss(backend=\"triton\")`; "
        "`torch-chunked` is `fused_lm_head_loss(backend=\"torch\")` (what CPU training runs); `liger` is "
        "Liger-Kernel's fused linear cross-entropy / JSD loss when importable (see notes). Peak memory: "
        f"{h['memory']}. Target (issue 19): fused peak <= 30% of naive at 32k vocabulary and 8k tokens, time "
        "<= naive.",
        "",
        "| loss | D student | D teacher | impl | fwd+bwd ms | peak MiB | peak / naive | time / naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in h["rows"]:
        head = f"| {r['loss'].upper()} | {r['student_dim']} | {r['teacher_dim'] or '-'} |"
        for name in h["impls"]:
            m = r[name]
            if "error" in m:
                lines.append(f"{head} {name} | {m['error'][:60]} | | | |")
                continue
            lines.append(f"{head} {name} | {m['fwd_bwd_ms']:.2f} | {_fmt(m.get('peak_extra_mib'))} | "
                         + (f"{100 * m['peak_vs_naive']:.0f}%" if "peak_vs_naive" in m else "-")
                         + f" | {_fmt(m.get('time_vs_naive'))} |")
    t = h["targets"]
    sizes = f"Tokens {h['rows'][0]['tokens'] if h['rows'] else '-'}, vocab {h['rows'][0]['vocab'] if h['rows'] else '-'}."
    if t["max_time_vs_naive"] is None:
        lines += ["", f"{sizes} Targets: not measured (fused did not run here)."]
    else:
        lines += ["", f"{sizes} Targets: fused peak <= 30% of naive everywhere: "
                  f"{t['fused_peak_at_most_30pct_of_naive']} (max {_fmt(t['max_peak_vs_naive'])}); not slower than "
                  f"naive everywhere: {t['fused_not_slower_than_naive']} (max x{_fmt(t['max_time_vs_naive'])})."]
    if agreement:
        ok = sum(r["ok"] for r in agreement)
        lines += ["", f"Agreement with lm_head_loss_reference here: {ok}/{len(agreement)} cases (float32 within "
                  "1e-5 of it; bf16 within twice its error against the float32 loss, or 5e-3)."]
    if h["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in h["notes"]]
    return lines


def head_markdown(result: dict) -> str:
    v = result["versions"]
    lines = [f"# Fused LLaMA head (cross-entropy + KL): {result['device']}", "",
             f"torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, python {v['python']}; dtype "
             f"{result['dtype']}; median of {result['reps']} after {result['warmup']} warm-up; {result['date']}.",
             "", f"Command: `{result['command']}`", ""]
    if result.get("machine"):
        lines += [f"Machine: {result['machine']}", ""]
    if result.get("note"):
        lines += [f"Note: {result['note']}", ""]
    return "\n".join(lines + head_section(result, result.get("head_agreement"))) + "\n"


def _run_head(args, result: dict, dtype: torch.dtype) -> None:
    if not args.skip_check:
        result["head_agreement"] = check_head_agreement(args.head_alpha)
        bad = [r for r in result["head_agreement"] if not r["ok"]]
        print(f"agreement vs lm_head_loss_reference: {len(result['head_agreement']) - len(bad)}/"
              f"{len(result['head_agreement'])} ok")
        for r in bad:
            print("  DISAGREES:", r)
    result["head"] = head_benchmark(args, dtype)


def _write_head(args, result: dict, dtype: torch.dtype) -> int:
    result.pop("alpha", None)
    _run_head(args, result, dtype)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"head-{device_slug(result['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(head_markdown(result))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------

def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cpu_machine() -> str:
    """This CPU in words: model, cores, memory, torch's intra-op threads."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
        with open("/proc/meminfo") as f:
            mem = f"{int(next(line.split()[1] for line in f if line.startswith('MemTotal'))) / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        mem = "memory unknown"
    return f"{model}, {os.cpu_count()} cores, {mem}, torch threads {torch.get_num_threads()}"


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
    p.add_argument("--step-model", default="ViT-B-16",
                   help="--loss-share's model: an open_clip model name or a JSON model config file")
    p.add_argument("--no-real-step", action="store_true", help="--loss-share from FLOPs only")
    p.add_argument("--skip-check", action="store_true", help="skip the fused-vs-reference agreement check")
    p.add_argument("--expansion", action="store_true",
                   help="benchmark the fused weight expansion (ViT-B/16 -> ViT-L/16, GB/s vs the reference and "
                        "the measured bandwidth limit) instead of the alignment loss")
    p.add_argument("--expansion-ranks", type=int, default=8, help="ZeRO-3 ranks whose partitions --expansion times")
    p.add_argument("--expansion-ref-reps", type=int, default=3, help="repetitions of the slow reference path")
    p.add_argument("--expansion-models", nargs=2, default=["ViT-B-16", "ViT-L-16"], metavar=("TEACHER", "STUDENT"),
                   help="--expansion's teacher and student: METHOD.md chain model names or JSON model config files")
    p.add_argument("--bandwidth-gib", type=float, default=1.0,
                   help="size of the clone/copy that measures the bandwidth limit for --expansion")
    p.add_argument("--distill", action="store_true",
                   help="benchmark the fused linear KL distillation loss (naive vs fused Triton vs torch-chunked "
                        "vs Liger-Kernel if importable: peak memory and forward+backward time) instead")
    p.add_argument("--distill-tokens", type=int, default=8192, help="tokens (rows) for --distill")
    p.add_argument("--distill-vocab", type=int, default=32000, help="vocabulary size for --distill")
    p.add_argument("--distill-dims", nargs="+", default=["1024:1024", "2048:2048", "1024:2048"],
                   help="student:teacher hidden dims for --distill")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature for --distill and --head")
    p.add_argument("--head", action="store_true",
                   help="benchmark the LLaMA head (cross-entropy + KL, and cross-entropy alone) of fused_lm_head_loss "
                        "vs the naive full-logits head (and Liger-Kernel if importable) at --distill-tokens, "
                        "--distill-vocab and --distill-dims: alone into head-<device>.*, with --distill into its file")
    p.add_argument("--head-alpha", type=float, default=1.0, help="KL weight of --head's CE + alpha * KL")
    p.add_argument("--head-impls", nargs="+", choices=HEAD_IMPLS, default=list(HEAD_IMPLS),
                   help="--head's implementations (liger only when importable)")
    p.add_argument("--note", default="", help="free text recorded with the results (e.g. the machine was shared)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="folder for the outputs")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a dry run of this script's logic, kernels in Triton's interpreter (numbers mean nothing)")
    args = p.parse_args(argv)
    for pair in args.distill_dims:  # checked here, not after the agreement check has run
        if not re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", pair):
            p.error(f"--distill-dims: {pair!r} is not STUDENT:TEACHER (two positive integers)")
    if args.quick:
        args.batches, args.dims = [1024, 16384], [512]
    return args


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    args = parse_args(argv)
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("benchmarks/kernel_bench.py: no CUDA device here; the Triton kernels are benchmarked on a GPU only. "
              "Nothing measured, nothing written.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/kernel_bench.py: triton is not importable; nothing measured, nothing written.")
        return 0

    head_only = args.head and not args.distill
    if DEVICE == "cpu":
        # compt's kernels read this at each launch, so setting it after triton's import works.
        os.environ["TRITON_INTERPRET"] = "1"
        print("benchmarks/kernel_bench.py: " + (
            "--head on CPU: naive and torch-chunked measured as CPU training runs them (wall times, torch.profiler "
            "memory); fused runs in Triton's interpreter, its time means nothing." if head_only else
            "CPU dry run (Triton interpreter, wall times): a check of this script's logic; its numbers mean nothing."))

    dtype = DTYPES[args.dtype]
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else (
        f"cpu {platform.machine()}" if head_only else f"cpu dry run {platform.machine()}")
    command = [sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv]
    result = {
        "device": device, "versions": versions(),
        "command": " ".join(shlex.quote(str(a)) for a in command),
        "dtype": args.dtype, "alpha": ALPHA, "reps": args.reps, "warmup": args.warmup,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if DEVICE == "cpu" and head_only:
        result["machine"] = cpu_machine()
    if args.note:
        result["note"] = args.note
    if args.expansion:
        return _write_expansion(args, result)
    if args.distill:
        return _write_distill(args, result, dtype)
    if args.head:
        return _write_head(args, result, dtype)
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
                            _empty_cache()
                    _add_speedups(row)
                    rows.append(row)
                    print(_row_line(row), flush=True)
                    del inputs
                    _empty_cache()
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


def _write_expansion(args, result: dict) -> int:
    for key in ("dtype", "alpha", "warmup"):
        result.pop(key)
    result["expansion"] = expansion_benchmark(args)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"expansion-{device_slug(result['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(expansion_markdown(result))
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
            if "fwd_bwd_ms" not in m:
                parts.append(f"{name} {m['error']}")
                continue
            mem = f" {m['peak_extra_mib']:.0f} MiB" if "peak_extra_mib" in m else ""
            parts.append(f"{name} {m['fwd_bwd_ms']:.3f} ms{mem}")
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
