"""bench/gpu_check.py rehearsed on the CPU, so that its checks keep working between runs on a GPU: the table
and JSON it writes, what it finds, its one line on a machine without a GPU; and bench_train_throughput.py."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_train_throughput  # noqa: E402


def test_throughput_bench_prints_both_modes_on_the_cpu(monkeypatch, capsys):
    """Each mode trains in its own folder (the second was refused as another run's), and the table prints."""
    monkeypatch.setattr(sys, "argv", ["bench_train_throughput.py", "--device", "cpu", "--steps", "3", "--bs", "2"])
    bench_train_throughput.main()
    table = capsys.readouterr().out.split("mode ")[-1].splitlines()
    assert [line.split("  ")[0] for line in table[1:3]] == list(bench_train_throughput.MODES)
    assert all("min" in line for line in table[1:3])
