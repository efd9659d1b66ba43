"""Whether a daemon keeps its CPU awake after an answer follows where the kernel wakes it
(fusefs/wakeup.py, fastloop.py), without a mount: the kernel's setting is read from a file
standing in for /sys/module/fuse/parameters/wake_here."""

from __future__ import annotations

from pathlib import Path

import pytest

from isolated_agent.fusefs import fastloop
from isolated_agent.fusefs.wakeup import callers_cpu_wakeups

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("written", "read"), [("Y\n", True), ("N\n", False), ("1", True),
                                               ("0", False)])
def test_the_kernels_setting_is_read(tmp_path: Path, written: str, read: bool) -> None:
    parameter = tmp_path / "wake_here"
    parameter.write_text(written)
    assert callers_cpu_wakeups(str(parameter)) is read


def test_a_kernel_without_the_setting_says_nothing(tmp_path: Path) -> None:
    assert callers_cpu_wakeups(str(tmp_path / "absent")) is None


@pytest.mark.parametrize(("callers_cpu", "spin"), [(True, 0.0), (False, fastloop.SPIN_SECONDS),
                                                   (None, fastloop.SPIN_SECONDS)])
def test_no_spin_where_the_caller_is_woken_on_its_own_cpu(
    monkeypatch: pytest.MonkeyPatch, callers_cpu: bool | None, spin: float
) -> None:
    monkeypatch.delenv(fastloop.SPIN_ENV, raising=False)
    assert fastloop.spin_seconds(callers_cpu) == spin


def test_the_benchmarks_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fastloop.SPIN_ENV, "150")
    assert fastloop.spin_seconds(True) == pytest.approx(150e-6)
    monkeypatch.setenv(fastloop.SPIN_ENV, "0")
    assert fastloop.spin_seconds(False) == 0.0
