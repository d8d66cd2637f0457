"""Atomic writes and the leftovers of killed processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from clipcap import files
from clipcap.files import atomic_write, remove_stale_temp_files

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_killed_writer_leaves_a_temp_file_that_the_next_run_removes(tmp_path):
    script = f"""
import os
from clipcap.files import atomic_write
with atomic_write({str(tmp_path / 'out.bin')!r}) as tmp:
    tmp.write_bytes(b"half")
    os._exit(9)  # killed mid-write
"""
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO)
    assert killed.returncode == 9
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".out.bin.")
    (tmp_path / "keep.tmp").write_text("not ours")
    with atomic_write(tmp_path / "live.bin") as live:  # a writer still at work: kept
        live.write_bytes(b"x")
        assert remove_stale_temp_files(tmp_path) == leftovers
        assert live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp", "live.bin"]


def test_only_dead_writers_of_this_host_are_cleaned(tmp_path):
    host = files._host()
    names = {"dead": f".a.json.x1y2.pid{dead_pid()}-{host}.tmp", "live": f".b.json.x1y2.pid{os.getpid()}-{host}.tmp",
             "elsewhere": f".c.json.x1y2.pid{dead_pid()}-{host}x.tmp"}  # another machine's, on a shared disk
    for name in names.values():
        (tmp_path / name).write_text("")
    assert remove_stale_temp_files(tmp_path) == [tmp_path / names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["live"], names["elsewhere"]])
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_atomic_write_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    with atomic_write(tmp_path / "f.txt") as tmp:
        tmp.write_text("data")
        temporary = str(tmp)
    assert synced == [temporary, str(tmp_path)]
    assert (tmp_path / "f.txt").read_text() == "data"
