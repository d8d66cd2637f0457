"""pycocoevalcap made runnable: Java, SPICE's Stanford CoreNLP jars, and a writable working copy.

The COCO caption toolkit's Java wrappers run in, and write temporary files into, the directories of
their own source files (the tokenizer's input file, SPICE's ``tmp/`` and ``cache/``), which fails
when site-packages is read-only. So the toolkit is imported, under a private name, from a mirror of
its installed directory: real directories, symlinked files. SPICE also needs CoreNLP 3.6.0 jars,
which pycocoevalcap downloads on first use; they can be given as a folder or the downloaded zip
(``CLIPCAP_SPICE_JARS``), and SPICE's Java gets the ``--add-opens`` its cache needs on Java 9+.
Scoring itself is :mod:`clipcap.evaluation`'s.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Iterator

from .files import ClipCapError, atomic_write, process_alive, user_cache

# SPICE parses captions with Stanford CoreNLP 3.6.0, jars its spice-1.0.jar names in its manifest's
# Class-Path (lib/...); pycocoevalcap downloads them from this zip on first use.
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
CORENLP_ZIP = "stanford-corenlp-full-2015-12-09.zip"
SPICE_JARS_ENV = "CLIPCAP_SPICE_JARS"
SPICE_HOWTO = (f"run once with internet access: python -m pycocoevalcap.spice.get_stanford_models, or download "
               f"{CORENLP_ZIP} and pass it (or a folder holding {' and '.join(SPICE_JARS)}) with --spice_jars "
               f"or {SPICE_JARS_ENV}")
# SPICE 1.0's cache serialiser reflects into java.lang, which Java 9+ closes unless opened.
SPICE_JAVA_OPTIONS = "--add-opens java.base/java.lang=ALL-UNNAMED"
TOOLKIT_ALIAS = "clipcap._pycocoevalcap"

@functools.cache
def installed_toolkit() -> Path:
    """The directory pycocoevalcap is installed in."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise ClipCapError("pycocoevalcap is not installed: pip install pycocoevalcap==1.2")
    return Path(list(spec.submodule_search_locations)[0])


def java_version(java: str = "java") -> int:
    """The feature release of ``java`` (8 for "1.8.0_101", 17 for "17.0.15"), from ``java -version``."""
    try:
        run = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise ClipCapError(f"{java} -version failed ({e})") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', run.stderr + run.stdout)
    if match is None:
        raise ClipCapError(f"{java} -version printed no version: {(run.stderr or run.stdout).strip()[:200]!r}")
    major, minor = int(match[1]), int(match[2] or 0)
    return minor if major == 1 else major


def find_spice_jars(source: str | Path | None = None) -> dict[str, Path] | None:
    """The two CoreNLP jars SPICE needs, by name: from ``source`` (or ``$CLIPCAP_SPICE_JARS``), else
    from pycocoevalcap's own ``spice/lib``; None if they are nowhere.

    ``source`` is a folder holding the jars (or the unpacked zip's folder), the zip pycocoevalcap
    downloads, or a folder holding that zip. Jars in a zip are extracted once into a cache folder.
    """
    origin = "--spice_jars"
    if not source and os.environ.get(SPICE_JARS_ENV):
        source, origin = os.environ[SPICE_JARS_ENV], SPICE_JARS_ENV
    if not source:
        lib = installed_toolkit() / "spice" / "lib"
        return {jar: lib / jar for jar in SPICE_JARS} if all((lib / jar).is_file() for jar in SPICE_JARS) else None
    source = Path(source)
    if source.is_dir():
        for folder in (source, source / CORENLP_ZIP.removesuffix(".zip")):
            if all((folder / jar).is_file() for jar in SPICE_JARS):
                return {jar: folder / jar for jar in SPICE_JARS}
        if (source / CORENLP_ZIP).is_file():
            return _jars_from_zip(source / CORENLP_ZIP)
        raise ClipCapError(f"{source} ({origin}): holds neither {' nor '.join(SPICE_JARS)} nor {CORENLP_ZIP}")
    if source.is_file() and zipfile.is_zipfile(source):
        return _jars_from_zip(source)
    raise ClipCapError(f"{source} ({origin}): not found, or neither a folder nor a zip file")


def _jars_from_zip(path: Path) -> dict[str, Path]:
    """The jars of CoreNLP's zip, extracted beside SPICE's cache (or into a temporary folder) once."""
    with zipfile.ZipFile(path) as archive:
        members = {Path(name).name: name for name in archive.namelist() if Path(name).name in SPICE_JARS}
        missing = [jar for jar in SPICE_JARS if jar not in members]
        if missing:
            raise ClipCapError(f"{path}: zip lacks {', '.join(missing)} (expected {CORENLP_ZIP})")
        cache = _spice_cache()
        folder = cache.parent / "corenlp-3.6.0" if cache is not None else Path(tempfile.mkdtemp(prefix="clipcap-corenlp-"))
        folder.mkdir(parents=True, exist_ok=True)
        jars = {}
        for jar, name in members.items():
            target = folder / jar
            info = archive.getinfo(name)
            if not target.is_file() or target.stat().st_size != info.file_size:
                with atomic_write(target) as tmp, archive.open(info) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            jars[jar] = target
    return jars


def spice_problem(jars: str | Path | None = None) -> str | None:
    """Why SPICE cannot run here (its CoreNLP jars, or Java), or None; ``jars`` as in :func:`find_spice_jars`."""
    if find_spice_jars(jars) is None:
        return ("Stanford CoreNLP 3.6.0 jars missing (pycocoevalcap downloads them on first use, impossible "
                "offline); to enable SPICE, " + SPICE_HOWTO)
    if (version := java_version()) < 8:
        return f"SPICE 1.0 needs Java 8 or newer; java on PATH is Java {version}"
    return None


@contextlib.contextmanager
def spice_java_options() -> Iterator[None]:
    """Within the block, Java processes started get ``--add-opens java.base/java.lang`` when this Java
    (9+) needs it for SPICE's cache, through ``JDK_JAVA_OPTIONS``, which the java launcher reads."""
    before = os.environ.get("JDK_JAVA_OPTIONS")
    if java_version() >= 9:
        os.environ["JDK_JAVA_OPTIONS"] = " ".join(filter(None, (before, SPICE_JAVA_OPTIONS)))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("JDK_JAVA_OPTIONS", None)
        else:
            os.environ["JDK_JAVA_OPTIONS"] = before


def _spice_cache() -> Path | None:
    """A lasting home for SPICE's parse cache (parsing a test set's references is slow), if one can be made."""
    try:
        cache = user_cache("spice")
        cache.mkdir(parents=True, exist_ok=True)
        return cache if os.access(cache, os.W_OK) else None
    except (OSError, RuntimeError):
        return None


MIRROR_PREFIX = "clipcap-pycocoevalcap-"  # then the pid of the process that made the mirror


def remove_stale_mirrors() -> None:
    """Delete the toolkit mirrors that killed processes left in the temporary directory."""
    for mirror in Path(tempfile.gettempdir()).glob(f"{MIRROR_PREFIX}*-*"):
        pid = mirror.name.removeprefix(MIRROR_PREFIX).partition("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(mirror, ignore_errors=True)


@functools.cache
def toolkit() -> ModuleType:
    """pycocoevalcap imported from a writable mirror of its installed directory (see the module docstring)."""
    installed = installed_toolkit()
    remove_stale_mirrors()
    mirror = Path(tempfile.mkdtemp(prefix=f"{MIRROR_PREFIX}{os.getpid()}-"))
    atexit.register(shutil.rmtree, mirror, True)  # a killed process leaves it to remove_stale_mirrors
    for path in sorted(installed.rglob("*")):  # parents sort before their contents
        relative = path.relative_to(installed)
        if "__pycache__" in relative.parts or relative.parts[:2] in (("spice", "cache"), ("spice", "tmp")):
            continue  # byte code and SPICE's working files stay behind
        if path.is_dir():
            (mirror / relative).mkdir()
        else:
            (mirror / relative).symlink_to(path)
    cache = _spice_cache()
    if cache is not None:
        (mirror / "spice" / "cache").symlink_to(cache, target_is_directory=True)
    spec = importlib.machinery.ModuleSpec(TOOLKIT_ALIAS, None, is_package=True)
    spec.submodule_search_locations = [str(mirror)]
    sys.modules[TOOLKIT_ALIAS] = importlib.util.module_from_spec(spec)
    for name in ("tokenizer.ptbtokenizer", "bleu.bleu", "meteor.meteor", "rouge.rouge", "cider.cider", "spice.spice"):
        importlib.import_module(f"{TOOLKIT_ALIAS}.{name}")
    return sys.modules[TOOLKIT_ALIAS]


def link_spice_jars(jars: dict[str, Path]) -> Path:
    """Link the CoreNLP jars into the working copy's ``spice/lib``, where spice-1.0.jar's Class-Path
    and pycocoevalcap's download check look for them (site-packages is left alone); returns that folder."""
    lib = Path(list(toolkit().__path__)[0]) / "spice" / "lib"
    for name, jar in jars.items():
        link = lib / name
        if link.is_symlink() or link.exists():
            if link.resolve() == jar.resolve():
                continue
            link.unlink()
        link.symlink_to(jar.resolve())
    return lib


def require_java() -> None:
    """Fail now, in one line, when no java is on PATH: the PTB tokenizer, METEOR and SPICE all run on it."""
    if shutil.which("java") is None:
        raise ClipCapError("java not found on PATH: pycocoevalcap's PTB tokenizer, METEOR and SPICE run on Java; "
                           "install a Java runtime (e.g. apt-get install default-jre-headless)")
