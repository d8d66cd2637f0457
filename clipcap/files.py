"""What the scripts share: atomic file writes, one-line errors, the choice of device."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


class ClipCapError(Exception):
    """A user-facing problem (bad file, bad flag); scripts print it as one line, no traceback."""


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash mid-write leaves the previous file (or none), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give them the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(path: Path, what: str = "annotations") -> Any:
    """A JSON file, or a one-line error naming it: missing, or not valid JSON."""
    if not path.is_file():
        raise ClipCapError(f"{path}: {what} file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClipCapError(f"{path}: not valid JSON ({e})") from None


def check_output_path(path: str | Path, flag: str) -> None:
    """Fail now, not after hours of work, if ``path`` cannot be written: a folder there, or a
    parent that is a file or cannot be created or written."""
    path = Path(path)
    if path.is_dir():
        raise ClipCapError(f"{flag} {path}: is a folder, expected a file name")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise ClipCapError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ClipCapError(f"{flag} {path}: cannot write in {parent}")


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name is kept."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main; a ClipCapError becomes ``error: ...`` on stderr and exit status 2."""
    try:
        main()
    except ClipCapError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
