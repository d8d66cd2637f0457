"""Caption metrics of the COCO caption toolkit (``pycocoevalcap``), on inputs checked first.

The numbers are the toolkit's own, computed the way its ``COCOEvalCap`` computes them: PTB
tokenisation (Java) of references and results, then BLEU-1..4, METEOR 1.5 (Java), ROUGE-L,
CIDEr-D and SPICE (Java), over the images in the references' order. What this module adds:

- reference loaders: Karpathy's ``dataset_coco.json`` by split, COCO-format annotations (or a
  plain list of ``{"image_id", "caption"}``), the Conceptual Captions validation TSV;
- checks that results and references describe the same images, one caption each, with a
  one-line error otherwise (scoring only the common images must be asked for);
- metrics chosen per call, so CIDEr alone is cheap enough for every epoch of training; METEOR's
  Java process starts once per :class:`Scorer`; SPICE is skipped, with a message saying how to
  enable it, when the Stanford CoreNLP jars it downloads on first use are missing;
- a writable working copy. The toolkit's Java wrappers run in, and write temporary files into,
  the directories of their own source files (the tokenizer's input file, SPICE's ``tmp/`` and
  ``cache/``), which fails when site-packages is read-only. So the toolkit is imported, under a
  private name, from a mirror of its installed directory: real directories, symlinked files.
"""
from __future__ import annotations

import atexit
import functools
import importlib
import importlib.machinery
import importlib.util
import json
import numbers
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence

from .files import ClipCapError, atomic_write, read_json

# Each scorer of the toolkit and the keys it reports (pycocoevalcap's names, in its order).
SCORERS = {"Bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"), "METEOR": ("METEOR",), "ROUGE_L": ("ROUGE_L",),
           "CIDEr": ("CIDEr",), "SPICE": ("SPICE",)}
METRIC_KEYS = tuple(key for keys in SCORERS.values() for key in keys)
# SPICE parses captions with Stanford CoreNLP 3.6.0; pycocoevalcap downloads these on first use.
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_HOWTO = ("run once with internet access: python -m pycocoevalcap.spice.get_stanford_models "
               "(or copy the two jars from stanford-corenlp-full-2015-12-09.zip into {lib})")
TOOLKIT_ALIAS = "clipcap._pycocoevalcap"

ImageId = int | str  # see image_key
References = dict  # image id -> its reference captions, in the order the source lists the images


# --------------------------------------------------------------------------- image ids


def image_key(image_id: Any) -> ImageId:
    """Ids compare as integers when they are integers or ASCII digit strings ("000012" is image 12;
    "²" is a digit to ``str.isdigit`` but not a number, so it stays a string)."""
    if isinstance(image_id, numbers.Integral) and not isinstance(image_id, bool):
        return int(image_id)
    if isinstance(image_id, str):
        return int(image_id) if image_id.isascii() and image_id.isdigit() else image_id
    raise ClipCapError(f"image id {image_id!r} is neither an integer nor a string")


def _examples(ids: Iterable[Any], n: int = 3) -> str:
    ids = list(ids)
    return ", ".join(map(repr, ids[:n])) + (", ..." if len(ids) > n else "")


# --------------------------------------------------------------------------- references and results


def load_references(path: str | Path, split: str | None = None) -> References:
    """References from Karpathy's ``dataset_coco.json`` (``split`` required), COCO-format annotations,
    a JSON list of ``{"image_id", "caption"}``, or the Conceptual Captions validation TSV."""
    path = Path(path)
    if path.suffix.lower() == ".tsv":
        if split is not None:
            raise ClipCapError(f"{path}: --split applies to Karpathy's dataset_coco.json only")
        return load_conceptual_tsv(path)
    data = read_json(path, "annotations")
    if isinstance(data, dict) and data.get("images") and isinstance(data["images"][0], dict) \
            and "sentences" in data["images"][0]:
        if split is None:
            raise ClipCapError(f"{path}: Karpathy's split file holds every split; pass --split test or --split val")
        return load_karpathy(data, split, path)
    if split is not None:
        raise ClipCapError(f"{path}: --split applies to Karpathy's dataset_coco.json only; "
                           "this file is taken whole")
    if isinstance(data, dict) and "annotations" in data:
        order = [image["id"] for image in data.get("images", []) if isinstance(image, dict) and "id" in image]
        return _group(data["annotations"], order, path)
    if isinstance(data, list):
        return _group(data, [], path)
    raise ClipCapError(f"{path}: not a known reference format (Karpathy's dataset_coco.json, COCO-format "
                       "annotations with 'annotations', or a list of {image_id, caption})")


def load_karpathy(data: dict, split: str, path: str | Path = "dataset_coco.json") -> References:
    """The reference sentences (``raw``) of one Karpathy split, keyed by COCO id (``cocoid``)."""
    references: References = {}
    for i, image in enumerate(data["images"]):
        if image.get("split") != split:
            continue
        try:
            references[image_key(image["cocoid"])] = [str(s["raw"]) for s in image["sentences"]]
        except (KeyError, TypeError):
            raise ClipCapError(f"{path}: image entry {i} lacks 'cocoid' or 'sentences' with 'raw'") from None
    if not references:
        splits = sorted({str(image.get("split")) for image in data["images"]})
        raise ClipCapError(f"{path}: no image in split {split!r} (the file has {', '.join(splits)})")
    return references


def _group(annotations: Any, order: Sequence[Any], path: Path) -> References:
    """Captions grouped by image: images in ``order`` first (COCO's image list), then as they appear."""
    references: References = {image_key(i): [] for i in order}
    if not isinstance(annotations, list):
        raise ClipCapError(f"{path}: 'annotations' must be a list")
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ClipCapError(f"{path}: annotation {i} needs 'image_id' and a 'caption' string")
        references.setdefault(image_key(ann["image_id"]), []).append(ann["caption"])
    references = {k: v for k, v in references.items() if v}  # listed images without captions are not references
    if not references:
        raise ClipCapError(f"{path}: no captions")
    return references


def load_conceptual_tsv(path: str | Path) -> References:
    """``Validation_GCC-1.1.0-Validation.tsv`` (caption TAB url, no header): one reference per image.

    The image id is the 0-based row number, as in the original's parse_conceptual.py, which saves
    row ``i`` as ``{i:08d}.jpg``; ids such as "00000012" therefore match row 12.
    """
    path = Path(path)
    if not path.is_file():
        raise ClipCapError(f"{path}: annotations file not found")
    references: References = {}
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(f):
            caption, tab, _ = line.rstrip("\n").partition("\t")
            if not tab or not caption.strip():
                raise ClipCapError(f"{path}: line {row + 1} is not 'caption<TAB>url'")
            references[row] = [caption]
    if not references:
        raise ClipCapError(f"{path}: empty file")
    return references


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """A results JSON: ``[{"image_id", "caption"}, ...]`` (predict.py's output); checked by :func:`pair_up`."""
    path = Path(path)
    results = read_json(path, "results")
    if not isinstance(results, list):
        raise ClipCapError(f"{path}: expected a JSON list of {{\"image_id\", \"caption\"}}")
    return results


# --------------------------------------------------------------------------- results against references


def match_images(image_ids: Sequence[Any], references: References, only_common_images: bool = False,
                 source: str = "results", ref_source: str = "references") -> list[ImageId]:
    """The images to score, in reference order; mismatches are errors unless ``only_common_images``.

    Duplicates are always an error: two captions for one image have no single score.
    """
    keys = [image_key(i) for i in image_ids]
    references = {image_key(k): v for k, v in references.items()}
    duplicates = [k for k, n in Counter(keys).items() if n > 1]
    if duplicates:
        raise ClipCapError(f"{source}: {len(duplicates)} image ids occur more than once "
                           f"(e.g. {_examples(duplicates)}); give one caption per image")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ClipCapError(f"{ref_source}: images without reference captions (e.g. {_examples(empty)})")
    seen = set(keys)
    common = [k for k in references if k in seen]
    if not common:
        raise ClipCapError(f"{source}: no image matches {ref_source} (results e.g. {_examples(keys)}; "
                           f"references e.g. {_examples(references)}); wrong annotations or --split?")
    if not only_common_images:
        extra = [k for k in keys if k not in references]
        if extra:
            raise ClipCapError(f"{source}: {len(extra)} of {len(keys)} captions are for images not in {ref_source} "
                               f"(e.g. {_examples(extra)}); check --annotations/--split, or score only the "
                               f"{len(common)} common images with --only_common_images")
        if len(common) < len(references):
            missing = [k for k in references if k not in seen]
            raise ClipCapError(f"{source}: no caption for {len(missing)} of the {len(references)} images in "
                               f"{ref_source} (e.g. {_examples(missing)}); score only the {len(common)} "
                               f"captioned images with --only_common_images")
    return common


def pair_up(results: Sequence[dict[str, Any]], references: References, only_common_images: bool = False,
            source: str = "results", ref_source: str = "references") -> tuple[dict[ImageId, str], References]:
    """Captions and references of the images to score, keyed alike, in reference order."""
    for i, r in enumerate(results):
        if not isinstance(r, dict) or "image_id" not in r or not isinstance(r.get("caption"), str):
            raise ClipCapError(f"{source}: entry {i} needs 'image_id' and a 'caption' string")
    ids = match_images([r["image_id"] for r in results], references, only_common_images, source, ref_source)
    references = {image_key(k): v for k, v in references.items()}
    captions = {image_key(r["image_id"]): r["caption"] for r in results}
    empty = [k for k in ids if not captions[k].strip()]
    if empty:
        print(f"warning: {source}: {len(empty)} empty caption(s) (e.g. image {_examples(empty)}) score zero",
              file=sys.stderr)
    return {k: captions[k] for k in ids}, {k: references[k] for k in ids}


# --------------------------------------------------------------------------- the toolkit


@functools.cache
def installed_toolkit() -> Path:
    """The directory pycocoevalcap is installed in."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise ClipCapError("pycocoevalcap is not installed: pip install pycocoevalcap==1.2")
    return Path(list(spec.submodule_search_locations)[0])


def spice_problem() -> str | None:
    """Why SPICE cannot run here, or None."""
    lib = installed_toolkit() / "spice" / "lib"
    if all((lib / jar).is_file() for jar in SPICE_JARS):
        return None
    return ("Stanford CoreNLP 3.6.0 jars missing (pycocoevalcap downloads them on first use, impossible "
            "offline); to enable SPICE, " + SPICE_HOWTO.format(lib=lib))


def _spice_cache() -> Path | None:
    """A lasting home for SPICE's parse cache (parsing 25K references takes minutes), if one can be made."""
    try:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipcap" / "spice"
        cache.mkdir(parents=True, exist_ok=True)
        return cache if os.access(cache, os.W_OK) else None
    except (OSError, RuntimeError):
        return None


@functools.cache
def toolkit() -> ModuleType:
    """pycocoevalcap imported from a writable mirror of its installed directory (see the module docstring)."""
    installed = installed_toolkit()
    mirror = Path(tempfile.mkdtemp(prefix="clipcap-pycocoevalcap-"))
    atexit.register(shutil.rmtree, mirror, True)
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


def _scorer_names(metrics: Iterable[str] | None) -> list[str]:
    if metrics is None:
        return list(SCORERS)
    wanted = set()
    for metric in metrics:
        name = next((s for s, keys in SCORERS.items() if metric.lower() in {s.lower(), *map(str.lower, keys)}), None)
        if name is None:
            raise ClipCapError(f"unknown metric {metric!r}; choose from {', '.join(SCORERS)}")
        wanted.add(name)
    return [s for s in SCORERS if s in wanted]


# --------------------------------------------------------------------------- scoring


@dataclass
class Evaluation:
    """Corpus scores under pycocoevalcap's keys and units (CIDEr 1.08 is the paper's 108), per-image scores."""

    scores: dict[str, float]
    per_image: list[dict[str, Any]] = field(default_factory=list)  # [{"image_id", key: score, ...}]

    def table(self) -> str:
        """A one-row markdown table in the paper's units (x100)."""
        keys = [k for k in METRIC_KEYS if k in self.scores]
        return "\n".join(["| images | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|",
                          f"| {len(self.per_image)} | " + " | ".join(f"{100 * self.scores[k]:.2f}" for k in keys) + " |"])

    def write(self, path: str | Path, per_image: str | Path | None = None) -> None:
        """The corpus scores as a JSON object (and per-image scores as a JSON list), written atomically."""
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(self.scores, indent=2) + "\n")
        if per_image is not None:
            with atomic_write(per_image) as tmp:
                tmp.write_text(json.dumps(self.per_image, indent=1) + "\n")


class Scorer:
    """The toolkit's scorers for ``metrics`` (default: all), started once and reused across calls.

    METEOR keeps one Java process for the Scorer's lifetime; :meth:`close` (or ``with``) stops it.
    SPICE is skipped with a message when its jars are missing, unless asked for by name.
    """

    def __init__(self, metrics: Iterable[str] | None = None):
        names = _scorer_names(metrics)
        if shutil.which("java") is None:
            raise ClipCapError("java not found on PATH: pycocoevalcap's PTB tokenizer, METEOR and SPICE run on Java; "
                               "install a Java runtime (e.g. apt-get install default-jre-headless)")
        if "SPICE" in names and (problem := spice_problem()) is not None:
            if metrics is not None:
                raise ClipCapError(f"SPICE unavailable: {problem}")
            print(f"SPICE skipped: {problem}", file=sys.stderr)
            names.remove("SPICE")
        kit = toolkit()
        factories = {"Bleu": lambda: kit.bleu.bleu.Bleu(4), "METEOR": kit.meteor.meteor.Meteor,
                     "ROUGE_L": kit.rouge.rouge.Rouge, "CIDEr": kit.cider.cider.Cider, "SPICE": kit.spice.spice.Spice}
        self.tokenizer = kit.tokenizer.ptbtokenizer.PTBTokenizer()
        self.scorers = {name: factories[name]() for name in names}  # METEOR's Java starts loading now

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop METEOR's Java process (the toolkit stops it when its object is collected)."""
        self.scorers.clear()

    def _tokenize(self, captions: dict[ImageId, list[str]]) -> dict[ImageId, list[str]]:
        # The tokenizer reads one caption per line: other line breaks would shift every later caption.
        tokenized = self.tokenizer.tokenize({k: [{"caption": " ".join(c.splitlines())} for c in v]
                                             for k, v in captions.items()})
        if [len(v) for v in tokenized.values()] != [len(v) for v in captions.values()]:
            raise ClipCapError("the PTB tokenizer (Java) returned fewer lines than captions; see its error above")
        return tokenized

    @staticmethod
    def _compute(name: str, scorer: Any, gts: dict, res: dict) -> tuple[list[float], list[list[float]]]:
        """One toolkit scorer's corpus scores and per-image scores, one of each per key it reports."""
        try:
            if name == "Bleu":
                return scorer.compute_score(gts, res, verbose=0)
            total, each = scorer.compute_score(gts, res)
        except ValueError as e:  # METEOR's process died and answered nothing
            raise ClipCapError(f"METEOR (Java) failed ({e}); it needs about 2 GB of memory") from None
        except subprocess.CalledProcessError as e:
            raise ClipCapError(f"SPICE (Java) failed with exit status {e.returncode}; SPICE 1.0 and its "
                               "cache need Java 8 (newer Java fails in its serialiser)") from None
        if name == "SPICE":
            each = [s["All"]["f"] for s in each]
        return [total], [list(each)]

    def __call__(self, results: Sequence[dict[str, Any]], references: References, only_common_images: bool = False,
                 source: str = "results", ref_source: str = "references") -> Evaluation:
        captions, references = pair_up(results, references, only_common_images, source, ref_source)
        gts = self._tokenize(references)
        res = self._tokenize({k: [c] for k, c in captions.items()})
        scores: dict[str, float] = {}
        per_image = {k: {"image_id": k} for k in gts}
        for name, scorer in self.scorers.items():
            totals, columns = self._compute(name, scorer, gts, res)
            order = sorted(gts) if name == "SPICE" else list(gts)  # SPICE answers in image id order
            for key, total, column in zip(SCORERS[name], totals, columns):
                scores[key] = float(total)
                for image, value in zip(order, column):
                    per_image[image][key] = float(value)
        return Evaluation(scores, list(per_image.values()))


def score(results: Sequence[dict[str, Any]], references: References, metrics: Iterable[str] | None = None,
          only_common_images: bool = False) -> dict[str, float]:
    """One-off scores of ``results`` against ``references``; ``metrics=("CIDEr",)`` needs no METEOR or SPICE."""
    with Scorer(metrics) as scorer:
        return scorer(results, references, only_common_images).scores
