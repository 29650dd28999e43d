"""compt.memory: a stage's peak resident memory starts from its own baseline, and the figures degrade to the
process's lifetime peak (or None) where the kernel offers no resettable high-water mark."""
from __future__ import annotations

import numpy as np
import pytest

import compt.memory as memory
from compt.memory import StageMemory, peak_rss_bytes, reset_peak_rss, rss_bytes

MIB = 1 << 20


def _touch(mib: int) -> None:
    block = np.ones(mib * MIB, dtype=np.uint8)  # written, so resident
    assert block.sum() == mib * MIB


@pytest.mark.skipif(not reset_peak_rss(), reason="no resettable high-water mark (not Linux /proc)")
def test_peak_is_per_stage_not_per_process():
    _touch(300)  # an earlier stage's peak, now freed
    stage = StageMemory()
    assert stage.resettable
    assert peak_rss_bytes() < stage.baseline + 150 * MIB  # the earlier 300 MiB no longer counts
    block = np.ones(200 * MIB, dtype=np.uint8)  # written, so resident
    during = rss_bytes()
    assert during > stage.baseline + 150 * MIB
    del block
    report = stage.report()
    assert report["peak_rss_since"] == "stage start"
    assert len(report["peak_rss_bytes"]) == len(report["baseline_rss_bytes"]) == 1  # one rank, no process group
    # The block counted, within a few MiB of the RSS while it lived: pages resident at the baseline may be
    # returned meanwhile (baseline + 200 MiB was missed by 8 KiB in the full suite), and the kernel's RSS
    # counters are batched per CPU (VmHWM was 64 KiB below an earlier VmRSS reading).
    assert report["peak_rss_bytes"][0] >= max(during - 4 * MIB, report["baseline_rss_bytes"][0] + 150 * MIB)
    assert "peak_accelerator_bytes" not in report  # CPU: no accelerator figure


def test_without_proc_it_reports_the_process_peak(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "STATUS", str(tmp_path / "no-status"))
    monkeypatch.setattr(memory, "CLEAR_REFS", str(tmp_path / "no-dir" / "clear_refs"))
    stage = StageMemory()
    report = stage.report()
    assert report["peak_rss_since"] == "process start"
    assert report["peak_rss_bytes"][0] > 0  # getrusage's lifetime peak
    assert report["baseline_rss_bytes"][0] == rss_bytes() or report["baseline_rss_bytes"][0] > 0  # psutil's RSS
