"""Caption metrics of the COCO caption toolkit (``pycocoevalcap``), on inputs checked first.

The numbers are the toolkit's own, computed the way its ``COCOEvalCap`` computes them: PTB
tokenisation (Java) of references and results, then BLEU-1..4, METEOR 1.5 (Java), ROUGE-L,
CIDEr-D and SPICE (Java), over the images in the references' order. What this module adds:

- checks that results and references describe the same images, one caption each, with a
  one-line error otherwise (scoring only the common images must be asked for);
- nocaps-style per-domain scores: each domain is its own toolkit run over its images, as the
  nocaps evaluation does (CIDEr's document frequencies come from the subset);
- metrics chosen per call, so CIDEr alone is cheap enough for every epoch of training; METEOR's
  Java process starts once per :class:`Scorer`; SPICE is skipped, with a message saying how to
  enable it, when its Stanford CoreNLP jars are missing.

Reading references is :mod:`clipcap.annotations`' job; making the toolkit run (Java, SPICE's jars,
a writable working copy) is :mod:`clipcap.toolkit`'s.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .annotations import ImageId, References, image_key
from .files import ClipCapError, atomic_write, examples, markdown_table, read_json
from .toolkit import find_spice_jars, link_spice_jars, require_java, spice_java_options, spice_problem, toolkit

# Each scorer of the toolkit and the keys it reports (pycocoevalcap's names, in its order).
SCORERS = {"Bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"), "METEOR": ("METEOR",), "ROUGE_L": ("ROUGE_L",),
           "CIDEr": ("CIDEr",), "SPICE": ("SPICE",)}
METRIC_KEYS = tuple(key for keys in SCORERS.values() for key in keys)
# nocaps' domains, in the order its evaluation reports them; "entire" is every image.
DOMAINS = ("in-domain", "near-domain", "out-domain")
ENTIRE = "entire"

# --------------------------------------------------------------------------- results and references


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
                           f"(e.g. {examples(duplicates, 3)}); give one caption per image")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ClipCapError(f"{ref_source}: images without reference captions (e.g. {examples(empty, 3)})")
    seen = set(keys)
    common = [k for k in references if k in seen]
    if not common:
        raise ClipCapError(f"{source}: no image matches {ref_source} (results e.g. {examples(keys, 3)}; "
                           f"references e.g. {examples(references, 3)}); wrong annotations or --split?")
    if not only_common_images:
        extra = [k for k in keys if k not in references]
        if extra:
            raise ClipCapError(f"{source}: {len(extra)} of {len(keys)} captions are for images not in {ref_source} "
                               f"(e.g. {examples(extra, 3)}); check --annotations/--split, or score only the "
                               f"{len(common)} common images with --only_common_images")
        if len(common) < len(references):
            missing = [k for k in references if k not in seen]
            raise ClipCapError(f"{source}: no caption for {len(missing)} of the {len(references)} images in "
                               f"{ref_source} (e.g. {examples(missing, 3)}); score only the {len(common)} "
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
        print(f"warning: {source}: {len(empty)} empty caption(s) (e.g. image {examples(empty, 3)}) score zero",
              file=sys.stderr)
    return {k: captions[k] for k in ids}, {k: references[k] for k in ids}


# --------------------------------------------------------------------------- the toolkit


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
        return markdown_table([["images", *self.scores], self._cells(self.scores)])

    def _cells(self, keys: Iterable[str]) -> list[str]:
        return [str(len(self.per_image)), *(f"{100 * self.scores[k]:.2f}" for k in keys)]


class Scorer:
    """The toolkit's scorers for ``metrics`` (default: all), started once and reused across calls.

    METEOR keeps one Java process for the Scorer's lifetime; :meth:`close` (or ``with``) stops it.
    SPICE is skipped with a message when its jars are missing, unless asked for by name.
    """

    def __init__(self, metrics: Iterable[str] | None = None, spice_jars: str | Path | None = None):
        names = _scorer_names(metrics)
        require_java()
        if "SPICE" in names and (problem := spice_problem(spice_jars)) is not None:
            if metrics is not None:
                raise ClipCapError(f"SPICE unavailable: {problem}")
            print(f"SPICE skipped: {problem}", file=sys.stderr)
            names.remove("SPICE")
        kit = toolkit()
        if "SPICE" in names:
            link_spice_jars(find_spice_jars(spice_jars))
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
            with spice_java_options() if name == "SPICE" else contextlib.nullcontext():
                total, each = scorer.compute_score(gts, res)
        except ValueError as e:  # METEOR's process died and answered nothing
            raise ClipCapError(f"METEOR (Java) failed ({e}); it needs about 2 GB of memory") from None
        except subprocess.CalledProcessError as e:
            raise ClipCapError(f"SPICE (Java) failed with exit status {e.returncode} (see its output above); "
                               "it runs with an 8 GB Java heap (-Xmx8G)") from None
        if name == "SPICE":
            each = [s["All"]["f"] for s in each]
        return [total], [list(each)]

    def __call__(self, results: Sequence[dict[str, Any]], references: References, only_common_images: bool = False,
                 source: str = "results", ref_source: str = "references") -> Evaluation:
        return self._score(*pair_up(results, references, only_common_images, source, ref_source))

    def _score(self, captions: dict[ImageId, str], references: References) -> Evaluation:
        """Scores of captions and references already paired up (keyed alike, in reference order)."""
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


    def by_domain(self, results: Sequence[dict[str, Any]], references: References, domains: dict[ImageId, str],
                  only_common_images: bool = False, source: str = "results",
                  ref_source: str = "references") -> dict[str, Evaluation]:
        """Scores of the entire set and of each domain (nocaps' in-/near-/out-domain), each a run of its own
        over its images, as nocaps' evaluation does. The per-image rows are the entire run's, with the domain."""
        captions, references = pair_up(results, references, only_common_images, source, ref_source)
        domains = {image_key(k): v for k, v in domains.items()}
        unknown = [k for k in references if k not in domains]
        if unknown:
            raise ClipCapError(f"{ref_source}: {len(unknown)} images have no domain (e.g. {examples(unknown, 3)})")
        evaluations = {ENTIRE: self._score(captions, references)}
        present = set(domains[k] for k in references)
        for domain in [d for d in DOMAINS if d in present] + sorted(present - set(DOMAINS)):
            subset = [k for k in references if domains[k] == domain]
            evaluations[domain] = self._score({k: captions[k] for k in subset}, {k: references[k] for k in subset})
        for row in evaluations[ENTIRE].per_image:
            row["domain"] = domains[row["image_id"]]
        return evaluations


def write_scores(evaluations: dict[str, Evaluation], path: str | Path, per_image: str | Path | None = None) -> None:
    """The scores as a JSON object: the entire set's alone, or with domains ``{"entire": {...}, "in-domain":
    {...}, ...}``; and the entire run's per-image rows as a JSON list. Written atomically."""
    scores = evaluations[ENTIRE].scores if list(evaluations) == [ENTIRE] else \
        {name: evaluation.scores for name, evaluation in evaluations.items()}
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(scores, indent=2) + "\n")
    if per_image is not None:
        with atomic_write(per_image) as tmp:
            tmp.write_text(json.dumps(evaluations[ENTIRE].per_image, indent=1) + "\n")


def domain_table(evaluations: dict[str, Evaluation]) -> str:
    """A markdown table with a row per subset (entire, in-domain, ...) in the paper's units (x100)."""
    keys = list(next(iter(evaluations.values())).scores)
    return markdown_table([["subset", "images", *keys],
                           *([name, *evaluation._cells(keys)] for name, evaluation in evaluations.items())])


def score(results: Sequence[dict[str, Any]], references: References, metrics: Iterable[str] | None = None,
          only_common_images: bool = False) -> dict[str, float]:
    """One-off scores of ``results`` against ``references``; ``metrics=("CIDEr",)`` needs no METEOR or SPICE."""
    with Scorer(metrics) as scorer:
        return scorer(results, references, only_common_images).scores
