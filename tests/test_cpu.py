"""CPU quota -> torch threads (runner/emulation/cpu.py), on hand-made cgroup files of both versions.

The real quota is read inside containers by tests/test_containers.py (clients log the
threads they chose); here the parsing and the rounding rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runner.emulation.cpu import cpu_quota, fit_threads, threads_for


def _v2(tmp_path: Path, text: str) -> Path:
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def _v1(tmp_path: Path, quota: int, period: int, sub: str = "cpu,cpuacct") -> Path:
    d = tmp_path / sub
    d.mkdir()
    (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (d / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


def test_quota_from_cgroup_v2(tmp_path: Path) -> None:
    assert cpu_quota(_v2(tmp_path, "12000 100000\n")) == pytest.approx(0.12)
    assert cpu_quota(_v2(tmp_path, "max 100000\n")) is None


def test_quota_from_cgroup_v1(tmp_path: Path) -> None:
    assert cpu_quota(_v1(tmp_path, 150000, 100000)) == pytest.approx(1.5)
    other = tmp_path / "unlimited"
    other.mkdir()
    assert cpu_quota(_v1(other, -1, 100000, "cpu")) is None
    empty = tmp_path / "none"
    empty.mkdir()
    assert cpu_quota(empty) is None


@pytest.mark.parametrize("quota,cores,want", [(0.12, 2, 1), (1.0, 2, 1), (1.99, 2, 1),
                                              (2.0, 8, 2), (7.5, 4, 4), (None, 6, 6)])
def test_threads_for_rounds_the_quota_down(quota: float | None, cores: int, want: int) -> None:
    assert threads_for(quota, cores) == want


def test_fit_threads_sets_torch_and_respects_the_users_choice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("TESTBED_THREADS", raising=False)
        torch.set_num_threads(2)
        assert fit_threads(_v2(tmp_path, "25000 100000")) == (1, 0.25)
        monkeypatch.setenv("TESTBED_THREADS", "2")
        assert fit_threads(tmp_path)[0] == 2  # an explicit choice wins over the quota
    finally:
        torch.set_num_threads(before)
