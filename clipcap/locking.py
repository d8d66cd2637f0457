"""One writer per output: a lock file beside it (``OUTPUT.lock``), held while a job writes the output.

The lock is an ``flock`` on that file, which the kernel releases when its holder dies however it
dies, so a lock left by a killed job is simply taken over; the file names its holder (pid, host,
command) for the message that refuses a second writer. The holder deletes the file when done.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from .files import ClipCapError


def lock_path(output: str | Path) -> Path:
    return Path(output).with_name(Path(output).name + ".lock")


def _holder(fd: int) -> str:
    """Who wrote the lock file, in words ("" for an empty or unreadable one)."""
    try:
        info = json.loads(os.pread(fd, 65536, 0))
        return f"pid {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


@contextlib.contextmanager
def exclusive(output: str | Path) -> Iterator[Path]:
    """Hold ``output``'s lock for the block; if a live process holds it, a ClipCapError naming that process."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "another process"
            os.close(fd)
            raise ClipCapError(f"{output}: {holder} is writing it (lock {path}); wait for it to finish, "
                               "or stop it") from None
        except OSError as e:  # a file system without locks: go on unguarded, saying so
            print(f"warning: cannot lock {path} ({e.strerror}); make sure no other job writes {output}",
                  file=sys.stderr)
            os.close(fd)
            yield path
            return
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder deleted the file as this process locked it: lock the new one
    previous = _holder(fd)
    if previous:
        print(f"{path}: taking over the lock of {previous}, which is no longer running")
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                              "since": since}).encode(), 0)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before unlocking: a process waiting on this file sees it gone and starts afresh
        os.close(fd)
