"""pycocoevalcap made runnable: Java, SPICE's Stanford CoreNLP jars, and the toolkit's two Java tools that write files.

The toolkit's PTB tokenizer and SPICE wrappers write their working files into the package's own
directories (the tokenizer's input, SPICE's ``tmp/`` and ``cache/``), which fails when site-packages
is read-only; and ``java -jar spice-1.0.jar`` finds Stanford CoreNLP 3.6.0 only where the jar's
manifest says, in the installed ``spice/lib`` (pycocoevalcap downloads it there on first use). So
this module runs those two Java commands itself, with the wrappers' jars, flags and post-processing,
but with their files in a private temporary folder, SPICE's class path named in full (the CoreNLP
jars from a folder or the downloaded zip: ``--spice_jars`` or ``CLIPCAP_SPICE_JARS``), SPICE's parse
cache in the user's cache folder, and Java's own last error line in the message when one fails.
BLEU, METEOR, ROUGE-L and CIDEr write nothing: they are the toolkit's classes as they are.
Scoring itself is :mod:`clipcap.evaluation`'s.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .files import ClipCapError, atomic_write, user_cache

# SPICE parses captions with Stanford CoreNLP 3.6.0, jars its spice-1.0.jar names in its manifest's
# Class-Path (lib/...); pycocoevalcap downloads them from this zip on first use.
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
CORENLP_ZIP = "stanford-corenlp-full-2015-12-09.zip"
SPICE_JARS_ENV = "CLIPCAP_SPICE_JARS"
SPICE_HOWTO = (f"run once with internet access: python -m pycocoevalcap.spice.get_stanford_models, or download "
               f"{CORENLP_ZIP} and pass it (or a folder holding {' and '.join(SPICE_JARS)}) with --spice_jars "
               f"or {SPICE_JARS_ENV}")
# SPICE 1.0's parse cache serialises with FST, which on start reflects into these packages of the JDK;
# Java 9+ closes them unless opened (Java 17 refuses each in turn without its --add-opens).
SPICE_OPENED = ("java.lang", "java.math", "java.util", "java.util.concurrent", "java.net", "java.text")
SPICE_JAVA_OPTIONS = tuple(option for package in SPICE_OPENED
                           for option in ("--add-opens", f"java.base/{package}=ALL-UNNAMED"))
SPICE_HEAP = "-Xmx8G"  # pycocoevalcap's
# What the java launcher adds after the real error when the VM cannot start: never the cause.
JVM_SIGN_OFFS = ("Error: Could not create the Java Virtual Machine.",
                 "Error: A fatal exception has occurred. Program will exit.")


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


def _spice_cache() -> Path | None:
    """A lasting home for SPICE's parse cache (parsing a test set's references is slow), if one can be made."""
    try:
        cache = user_cache("spice")
        cache.mkdir(parents=True, exist_ok=True)
        return cache if os.access(cache, os.W_OK) else None
    except (OSError, RuntimeError):
        return None


def require_java() -> None:
    """Fail now, in one line, when no java is on PATH: the PTB tokenizer, METEOR and SPICE all run on it."""
    if shutil.which("java") is None:
        raise ClipCapError("java not found on PATH: pycocoevalcap's PTB tokenizer, METEOR and SPICE run on Java; "
                           "install a Java runtime (e.g. apt-get install default-jre-headless)")


def java_error(output: str) -> str:
    """Java's own last error line in ``output`` (its stderr): the last line that is neither a stack
    frame nor the launcher's sign-off ("Caused by: java.lang.ClassNotFoundException: ...")."""
    lines = [line.strip() for line in output.splitlines()
             if line.strip() and not line[0].isspace() and line.strip() not in JVM_SIGN_OFFS]
    return lines[-1] if lines else "it printed no error"


def run_java(command: Sequence[str], what: str, cwd: str | Path | None = None) -> bytes:
    """Run a Java tool of the toolkit and return its stdout; a failure is one line with Java's own error."""
    try:
        run = subprocess.run(list(command), capture_output=True, cwd=cwd)
    except OSError as e:
        raise ClipCapError(f"{what} (Java) could not start: {e}") from None
    if run.returncode != 0:
        error = java_error(run.stderr.decode(errors="replace"))
        heap = next((option for option in command if option.startswith("-Xmx")), None)
        if heap and ("OutOfMemoryError" in error or "heap" in error):
            error += f" (it runs with a {heap.removeprefix('-Xmx')} Java heap, {heap})"
        raise ClipCapError(f"{what} (Java) failed with exit status {run.returncode}: {error}")
    return run.stdout


def ptb_tokenize(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    """Captions as pycocoevalcap's ``PTBTokenizer`` returns them (PTB tokens, lower case, its punctuation
    removed), from its own jar and flags, with the input file in a private folder."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    lines = [" ".join(c.splitlines()) for v in captions.values() for c in v]  # one caption per line, always
    jar = installed_toolkit() / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR
    with tempfile.TemporaryDirectory(prefix="clipcap-ptb-") as folder:
        path = Path(folder) / "captions.txt"
        path.write_bytes("\n".join(lines).encode())
        out = run_java(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                        "-lowerCase", str(path)], "the PTB tokenizer")
    tokenized = out.decode().split("\n")
    if len(tokenized) < len(lines):
        raise ClipCapError(f"the PTB tokenizer (Java) returned {len(tokenized)} lines for {len(lines)} captions")
    words = iter(" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS) for line in tokenized)
    return {k: [next(words) for _ in v] for k, v in captions.items()}


class Spice:
    """SPICE 1.0 as pycocoevalcap's ``Spice`` runs it (its jar, heap and flags), with a class path that
    names the CoreNLP jars, its working files in a private folder and its parse cache in the user's."""

    def __init__(self, jars: dict[str, Path]):
        spice_jar = installed_toolkit() / "spice" / "spice-1.0.jar"
        options = SPICE_JAVA_OPTIONS if java_version() >= 9 else ()
        self.command = ["java", SPICE_HEAP, *options, "-cp", os.pathsep.join(map(str, [*jars.values(), spice_jar])),
                        "edu.anu.spice.SpiceScorer"]
        self.cache = _spice_cache()

    def compute_score(self, gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> tuple[float, list[float]]:
        """The mean SPICE F-score and each image's, in ``gts``' order (NaN where SPICE gives none)."""
        keys = list(gts)
        try:
            order = sorted(range(len(keys)), key=keys.__getitem__)  # the toolkit's order, which its mean sums in
        except TypeError:  # ids of mixed types: no order to keep
            order = list(range(len(keys)))
        entries = [{"image_id": i, "test": res[keys[i]][0], "refs": gts[keys[i]]} for i in order]
        with tempfile.TemporaryDirectory(prefix="clipcap-spice-") as folder:
            inputs, outputs = Path(folder) / "input.json", Path(folder) / "output.json"
            inputs.write_text(json.dumps(entries, indent=2))
            cache = ["-cache", str(self.cache)] if self.cache is not None else []
            run_java([*self.command, str(inputs), *cache, "-out", str(outputs), "-subset", "-silent"], "SPICE",
                     cwd=folder)
            answers = json.loads(outputs.read_text())
        f_scores = {int(item["image_id"]): _number(item["scores"]["All"]["f"]) for item in answers}
        mean = float(np.mean([f_scores[int(item["image_id"])] for item in answers]))  # as the toolkit averages
        return mean, [f_scores[i] for i in range(len(keys))]


def _number(value: Any) -> float:
    """SPICE's score, or NaN for its null (as the toolkit converts it)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def toolkit_scorer(name: str, spice_jars: dict[str, Path] | None = None) -> Any:
    """A new scorer of the toolkit by its name in :data:`clipcap.evaluation.SCORERS` (SPICE needs its jars)."""
    if name == "SPICE":
        return Spice(spice_jars)
    if name == "METEOR":  # starts its Java process, which loads for tens of seconds
        from pycocoevalcap.meteor.meteor import Meteor

        return Meteor()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    return {"Bleu": lambda: Bleu(4), "ROUGE_L": Rouge, "CIDEr": Cider}[name]()
