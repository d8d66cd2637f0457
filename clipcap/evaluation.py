"""Caption metrics of the COCO caption toolkit (``pycocoevalcap``), on inputs checked first.

The numbers are the toolkit's own, computed the way its ``COCOEvalCap`` computes them: PTB
tokenisation (Java) of references and results, then BLEU-1..4, METEOR 1.5 (Java), ROUGE-L,
CIDEr-D and SPICE (Java), over the images in the references' order; they are reported in the
paper's units, the toolkit's fractions x100 (CIDEr 108.35, not 1.0835). What this module adds:

- checks that results and references describe the same images, one caption each, with a
  one-line error otherwise (scoring only the common images must be asked for);
- nocaps-style per-domain scores: each domain is its own toolkit run over its images, as the
  nocaps evaluation does (CIDEr's document frequencies come from the subset);
- metrics chosen per call, so CIDEr alone is cheap enough for every epoch of training; METEOR's
  Java process starts once per :class:`Scorer`; SPICE is skipped, with a message saying how to
  enable it, when its Stanford CoreNLP jars are missing.

Reading references is :mod:`clipcap.annotations`' job; making the toolkit run (Java, SPICE's jars,
its Java tools' working files) is :mod:`clipcap.toolkit`'s.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .annotations import ImageId, References, image_key
from .files import ClipCapError, examples, markdown_table, read_json, write_json
from .toolkit import find_spice_jars, ptb_tokenize, require_java, spice_problem, toolkit_scorer

# Each scorer of the toolkit and the keys it reports (pycocoevalcap's names, in its order).
SCORERS = {"Bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"), "METEOR": ("METEOR",), "ROUGE_L": ("ROUGE_L",),
           "CIDEr": ("CIDEr",), "SPICE": ("SPICE",)}
METRIC_KEYS = tuple(key for keys in SCORERS.values() for key in keys)
# nocaps' domains, in the order its evaluation reports them; "entire" is every image.
DOMAINS = ("in-domain", "near-domain", "out-domain")
ENTIRE = "entire"
# Every score this project reports, prints or writes is in the paper's units: the toolkit's fractions x100.
PERCENT = 100.0

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


def parse_metrics(text: str | None, flag: str = "--metrics") -> list[str] | None:
    """A comma-separated choice of metrics (None: all); one that names none is an error, not "all"."""
    if text is None:
        return None
    metrics = [m.strip() for m in text.split(",") if m.strip()]
    if not metrics:
        raise ClipCapError(f"{flag} {text!r}: names no metric; choose from {', '.join(SCORERS)}, or leave it out for all")
    return metrics


def _scorer_names(metrics: Iterable[str] | None) -> list[str]:
    if metrics is None:
        return list(SCORERS)
    wanted = set()
    for metric in metrics:
        name = next((s for s, keys in SCORERS.items() if metric.lower() in {s.lower(), *map(str.lower, keys)}), None)
        if name is None:
            raise ClipCapError(f"unknown metric {metric!r}; choose from {', '.join(SCORERS)}")
        wanted.add(name)
    if not wanted:
        raise ClipCapError(f"no metric chosen; choose from {', '.join(SCORERS)}, or pass None for all")
    return [s for s in SCORERS if s in wanted]


# --------------------------------------------------------------------------- scoring


@dataclass
class Evaluation:
    """Corpus scores under pycocoevalcap's keys in the paper's units (the toolkit's x100: CIDEr 108.35),
    and the per-image scores in the same units."""

    scores: dict[str, float]
    per_image: list[dict[str, Any]] = field(default_factory=list)  # [{"image_id", key: score, ...}]


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
        jars = find_spice_jars(spice_jars) if "SPICE" in names else None
        self.scorers = {name: toolkit_scorer(name, jars) for name in names}  # METEOR's Java starts loading now

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop METEOR's Java process (the toolkit stops it when its object is collected)."""
        self.scorers.clear()

    @staticmethod
    def _compute(name: str, scorer: Any, gts: dict, res: dict) -> tuple[list[float], list[list[float]]]:
        """One toolkit scorer's corpus scores and per-image scores, one of each per key it reports."""
        try:
            if name == "Bleu":
                return scorer.compute_score(gts, res, verbose=0)
            total, each = scorer.compute_score(gts, res)
        except ValueError as e:  # METEOR's process died and answered nothing
            raise ClipCapError(f"METEOR (Java) failed ({e}); it needs about 2 GB of memory") from None
        return [total], [list(each)]

    def __call__(self, results: Sequence[dict[str, Any]], references: References, only_common_images: bool = False,
                 source: str = "results", ref_source: str = "references") -> Evaluation:
        return self._score(*pair_up(results, references, only_common_images, source, ref_source))

    def _score(self, captions: dict[ImageId, str], references: References) -> Evaluation:
        """Scores of captions and references already paired up (keyed alike, in reference order)."""
        gts = ptb_tokenize(references)
        res = ptb_tokenize({k: [c] for k, c in captions.items()})
        scores: dict[str, float] = {}
        per_image = {k: {"image_id": k} for k in gts}
        for name, scorer in self.scorers.items():
            totals, columns = self._compute(name, scorer, gts, res)
            for key, total, column in zip(SCORERS[name], totals, columns):
                scores[key] = PERCENT * float(total)
                for image, value in zip(gts, column):
                    per_image[image][key] = PERCENT * float(value)
        return Evaluation(scores, list(per_image.values()))

    def by_domain(self, results: Sequence[dict[str, Any]], references: References, domains: dict[ImageId, str],
                  only_common_images: bool = False, source: str = "results",
                  ref_source: str = "references") -> dict[str, Evaluation]:
        """Scores of the entire set and of each domain (nocaps' in-/near-/out-domain), each a run of its own
        over its images, as nocaps' evaluation does. The per-image rows are the entire run's, with the domain.
        Without ``domains``, the entire set's alone."""
        captions, references = pair_up(results, references, only_common_images, source, ref_source)
        domains = {image_key(k): v for k, v in domains.items()}
        evaluations = {ENTIRE: self._score(captions, references)}
        if not domains:
            return evaluations
        unknown = [k for k in references if k not in domains]
        if unknown:
            raise ClipCapError(f"{ref_source}: {len(unknown)} images have no domain (e.g. {examples(unknown, 3)})")
        present = set(domains[k] for k in references)
        for domain in [d for d in DOMAINS if d in present] + sorted(present - set(DOMAINS)):
            subset = [k for k in references if domains[k] == domain]
            evaluations[domain] = self._score({k: captions[k] for k in subset}, {k: references[k] for k in subset})
        for row in evaluations[ENTIRE].per_image:
            row["domain"] = domains[row["image_id"]]
        return evaluations


def write_scores(evaluations: dict[str, Evaluation], path: str | Path | None,
                 per_image: str | Path | None = None) -> None:
    """The scores as a JSON object (the paper's units): the entire set's alone, or with domains ``{"entire":
    {...}, "in-domain": {...}, ...}``; and the entire run's per-image rows as a JSON list. Written atomically."""
    if path is not None:
        scores = evaluations[ENTIRE].scores if list(evaluations) == [ENTIRE] else \
            {name: evaluation.scores for name, evaluation in evaluations.items()}
        write_json(path, scores, indent=2)
    if per_image is not None:
        write_json(per_image, evaluations[ENTIRE].per_image)


def scores_table(evaluations: dict[str, Evaluation]) -> str:
    """A markdown table of the scores (the paper's units): one row, or a row per subset (entire, in-domain, ...)."""
    keys = list(evaluations[ENTIRE].scores)
    rows = [[name, str(len(evaluation.per_image)), *(f"{evaluation.scores[k]:.2f}" for k in keys)]
            for name, evaluation in evaluations.items()]
    if list(evaluations) == [ENTIRE]:
        return markdown_table([["images", *keys], rows[0][1:]])
    return markdown_table([["subset", "images", *keys], *rows])


def score(results: Sequence[dict[str, Any]], references: References, metrics: Iterable[str] | None = None,
          only_common_images: bool = False) -> dict[str, float]:
    """One-off scores (the paper's units) of ``results`` against ``references``; ``metrics=("CIDEr",)`` needs
    no METEOR or SPICE."""
    with Scorer(metrics) as scorer:
        return scorer(results, references, only_common_images).scores
