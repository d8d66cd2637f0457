"""What the scripts share: atomic file writes, one-line errors, safe reads."""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence


class ClipCapError(Exception):
    """A user-facing problem (bad file, bad flag); scripts print it as one line, no traceback."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to one line, for a one-line error."""
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())


# atomic_write's temporary files: ``.NAME.RANDOM.pidPID-HOST.tmp``, so that a later run can tell
# the leftovers of a killed writer (dead pid on this host) from the files of a live one.
_TEMP_FILE = re.compile(r"^\..+\.pid(\d+)-([A-Za-z0-9-]*)\.tmp$")


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash mid-write leaves the previous file (or none), never a half-written one: the file is
    fsynced before the rename and its folder after it, so a power cut cannot undo or truncate it.
    A killed process leaves its temporary file; :func:`remove_stale_temp_files` clears those.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".pid{os.getpid()}-{_host()}.tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give them the usual mode
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # some file systems cannot sync a directory
            _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a pid reused since counts as alive: kept, not lost)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def examples(values: Iterable[Any], n: int = 5) -> str:
    """The first ``n`` of ``values`` for a message: ``1, 2, 3, ... (40 in all)``."""
    values = list(values)
    return ", ".join(map(repr, values[:n])) + (f", ... ({len(values)} in all)" if len(values) > n else "")


def user_cache(name: str) -> Path:
    """``$XDG_CACHE_HOME/clipcap/NAME`` (default ``~/.cache/clipcap/NAME``): files kept between runs."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipcap" / name


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as a markdown table, the first row its header."""
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([lines[0], "|---" * len(rows[0]) + "|", *lines[1:]])


def write_json(path: str | Path, value: Any, indent: int | None = 1) -> None:
    """``value`` as JSON at ``path``, written atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(value, indent=indent) + "\n")


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``folder``; returns them.

    Only files of processes of this host that are no longer alive go: a concurrent writer's
    (another rank, another job on a shared disk) is kept.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in names:
        match = _TEMP_FILE.match(name)
        if match and match[2] == _host() and not process_alive(int(match[1])):
            with contextlib.suppress(FileNotFoundError):  # another process cleaning the same folder
                os.unlink(Path(folder) / name)
                removed.append(Path(folder) / name)
    return removed


def open_regular(path: str | Path) -> IO[bytes]:
    """Open a file for binary reading, refusing what is not a regular file (a FIFO would block forever)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO without a writer must not wait
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise ClipCapError(f"{path}: not a regular file ({kind})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_json(path: Path, what: str = "annotations") -> Any:
    """A JSON file, or a one-line error naming it: missing, not a regular file (a FIFO would block), or not
    valid JSON."""
    try:
        with open_regular(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        raise ClipCapError(f"{path}: {what} file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClipCapError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ClipCapError(f"{path}: cannot read the {what} file ({e.strerror})") from None


# Kernel interfaces, never a place for a command's output (writing there as root can change the system).
SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_output_path(path: str | Path, flag: str) -> None:
    """Fail now, not after hours of work, if ``path`` cannot be written: a folder there, a parent
    that is a file or cannot be created or written, or a place under /proc, /sys or /dev."""
    path = Path(path)
    resolved = path.resolve()
    system = next((f for f in SYSTEM_FOLDERS if resolved == f or f in resolved.parents), None)
    if system is not None:
        raise ClipCapError(f"{flag} {path}: under {system}, not a place for output files")
    if path.is_dir():
        raise ClipCapError(f"{flag} {path}: is a folder, expected a file name")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise ClipCapError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ClipCapError(f"{flag} {path}: cannot write in {parent}")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file once links are resolved (hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would be
        return Path(a).resolve() == Path(b).resolve()


def check_outputs(outputs: dict[str, str | Path | None], inputs: dict[str, Any] | None = None) -> None:
    """Check every output of a command before its work: each writable (:func:`check_output_path`), no two
    the same file, and none of them one of its ``inputs`` (a flag -> a path, or a list of paths), which
    writing the output would destroy."""
    named = {flag: Path(path) for flag, path in outputs.items() if path is not None}
    for flag, path in named.items():
        check_output_path(path, flag)
    flags = list(named)
    for i, flag in enumerate(flags):
        for other in flags[i + 1:]:
            if same_file(named[flag], named[other]):
                raise ClipCapError(f"{flag} and {other} name the same file {named[flag]}; give them different names")
    for in_flag, value in (inputs or {}).items():
        paths = [value] if isinstance(value, (str, Path)) else list(value or [])
        for source in paths:
            for flag, path in named.items():
                if same_file(path, source):
                    raise ClipCapError(f"{flag} {path}: is the input {in_flag} {source}; writing it would destroy "
                                       "the input, so choose another output name")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
