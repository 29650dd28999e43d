"""Live metrics of a training stage, as it trains.

Every ``log_every`` steps rank 0 appends one JSON line to ``<stage>/metrics.jsonl`` (flushed, so
``tail -f`` follows it) and sends the same series to DeepSpeed's monitors (TensorBoard, W&B, CSV,
Comet: whatever the ds_config enables) on one step axis for the whole chain: the samples the
chain has trained on so far, so one chart shows every stage one after the other.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

# Dense bf16 peak of common accelerators, TFLOP/s per device (vendor datasheets, without sparsity).
# A device not listed gets no MFU unless the launcher's --peak-tflops states its peak.
PEAK_BF16_TFLOPS = {
    "H200": 989.4, "GH200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0,
    "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.2, "MI300X": 1307.4, "MI250X": 383.0,
}
# ds_config keys that only change what is printed or monitored, never the weights.
MONITOR_KEYS = frozenset({"tensorboard", "wandb", "csv_monitor", "comet", "steps_per_print", "wall_clock_breakdown",
                          "flops_profiler", "comms_logger", "dump_state"})


def device_name() -> str:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return "cpu"
    try:
        import torch

        return torch.cuda.get_device_name() if accel.device_name() == "cuda" else accel.device_name()
    except Exception:  # noqa: BLE001 - a name is only used to look up the peak
        return accel.device_name()


def peak_tflops(stated: float | None = None, name: str | None = None) -> float | None:
    """The device's dense bf16 peak: ``stated`` if given, else the table entry whose key the device name
    contains (longest match first), else None (no MFU)."""
    if stated:
        return stated
    name = name if name is not None else device_name()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def peak_memory_gb() -> float | None:
    """The accelerator's peak allocated memory (DeepSpeed's accelerator API; on CPU, what it reports)."""
    try:
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().max_memory_allocated() / 2**30
    except Exception:  # noqa: BLE001 - a figure for people, never a reason to stop training
        return None


class ChainMonitor:
    """DeepSpeed's own monitors (``deepspeed.monitor.monitor.MonitorMaster``) built once from the chain's
    ds_config, so every stage writes to the same TensorBoard run / CSV files / W&B run."""

    def __init__(self, ds_config: dict[str, Any], rank: int):
        self.master = None
        if rank == 0 and any((ds_config.get(k) or {}).get("enabled") for k in ("tensorboard", "wandb", "csv_monitor",
                                                                                "comet")):
            from deepspeed.monitor.config import get_monitor_config
            from deepspeed.monitor.monitor import MonitorMaster

            self.master = MonitorMaster(get_monitor_config(ds_config))

    def write(self, events: list[tuple[str, float, int]]) -> None:
        if self.master is not None and events:
            self.master.write_events(events)


class LiveLog:
    """Rates over the last logging interval of one stage, written as they happen (rank 0 writes)."""

    def __init__(self, path: Path, *, rank: int, world: int, global_batch: int, flops_per_sample: float,
                 tokens_per_sample: int | None, peak: float | None, chain_samples_before: int,
                 names: tuple[str, str], monitor: ChainMonitor | None = None):
        self.path, self.rank, self.world, self.batch = path, rank, world, global_batch
        self.flops_per_sample, self.tokens_per_sample, self.peak = flops_per_sample, tokens_per_sample, peak
        self.offset, self.names, self.monitor = chain_samples_before, names, monitor
        self.last_time, self.last_step = time.perf_counter(), 0

    def start(self, step: int) -> None:
        """Begin at ``step`` (0, or where a resume starts): drop lines a killed run logged after that step."""
        self.last_time, self.last_step = time.perf_counter(), step
        if self.rank == 0 and self.path.is_file():
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, loss: float, task: float, transfer: float, lr: float,
            grad_norm: float | None) -> dict[str, Any]:
        now = time.perf_counter()
        seconds = max(now - self.last_time, 1e-9)
        samples = (step - self.last_step) * self.batch
        self.last_time, self.last_step = now, step
        per_s = samples / seconds
        tflops = per_s * self.flops_per_sample / self.world / 1e12
        record = {
            "step": step, "samples_seen": step * self.batch, "chain_samples": self.offset + step * self.batch,
            "loss": loss, self.names[0]: task, self.names[1]: transfer, "lr": lr, "grad_norm": grad_norm,
            "samples_per_s": per_s,
            "tokens_per_s": per_s * self.tokens_per_sample if self.tokens_per_sample else None,
            "tflops_per_rank": tflops, "mfu": tflops / self.peak if self.peak else None,
            "peak_memory_gb": peak_memory_gb(), "time": time.time(),
        }
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
            if self.monitor is not None:
                axis = record["chain_samples"]
                self.monitor.write([(f"compt/{key}", float(value), axis) for key, value in record.items()
                                    if key not in ("step", "samples_seen", "chain_samples", "time")
                                    and value is not None])
        return record


def summary_text(record: dict[str, Any]) -> dict[str, str]:
    """The progress bar's / log line's fields."""
    out = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.2e}", "samples/s": f"{record['samples_per_s']:.1f}"}
    if record.get("tokens_per_s"):
        out["tok/s"] = f"{record['tokens_per_s']:.0f}"
    if record.get("mfu") is not None:
        out["mfu"] = f"{100 * record['mfu']:.1f}%"
    return out
