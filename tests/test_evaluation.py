"""Evaluation: the real pycocoevalcap (and Java) on small handmade reference sets.

METEOR's Java process loads a 60 MB paraphrase table (tens of seconds), so the suite starts it
once: the session fixture ``all_metrics`` holds it, and the direct COCOEvalCap run borrows it.
Everything else scores BLEU, ROUGE-L and CIDEr only.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from clipcap import toolkit
from clipcap.annotations import load_references
from clipcap.cli.evaluate import main as evaluate
from clipcap.evaluation import Scorer, load_results, match_images, pair_up, score
from clipcap.files import ClipCapError
from clipcap.toolkit import spice_problem

REPO = Path(__file__).resolve().parents[1]
CHEAP = ("Bleu", "ROUGE_L", "CIDEr")

# Four images, listed out of id order, with capitals and punctuation for the PTB tokenizer.
IMAGES = {
    42: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
         "a person on a surf board riding a wave"],
    7: ["Two dogs play with a frisbee in the park.", "Dogs are running on the grass, chasing a disc.",
        "two brown dogs playing in a grassy field"],
    1000: ["A plate of food with broccoli and rice.", "A white plate topped with rice, meat and broccoli.",
           "a meal of chicken, rice and vegetables on a plate"],
    3: ["A red double-decker bus on a city street.", "A bus driving down the road next to buildings."],
}
CAPTIONS = {42: "A man riding a wave on a surfboard.", 7: "Two dogs playing with a frisbee on the grass.",
            1000: "A plate of rice and broccoli.", 3: "A red bus driving down a street."}


def results_for(ids, captions=CAPTIONS):
    return [{"image_id": i, "caption": captions[i]} for i in ids]


def write_coco(path: Path, images=IMAGES) -> Path:
    annotations = [{"image_id": i, "id": 10 * i + j, "caption": c}
                   for i, caps in images.items() for j, c in enumerate(caps)]
    path.write_text(json.dumps({"images": [{"id": i} for i in images], "annotations": annotations}))
    return path


@pytest.fixture(scope="session")
def all_metrics():
    """A Scorer of every metric (METEOR's one start in the suite) and what it printed.

    SPICE takes its offline path wherever the suite runs: its jar names are made unfindable.
    """
    log = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(log):
        mp.setattr(toolkit, "SPICE_JARS", ("stanford-corenlp-missing.jar",))
        scorer = Scorer()
    yield scorer, log.getvalue()
    scorer.close()


# --------------------------------------------------------------------------- the toolkit's numbers


class NoSpice:
    """Stands in for SPICE inside COCOEvalCap where its jars cannot be downloaded."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


@pytest.mark.java
def test_scores_equal_coco_eval_cap(all_metrics, tmp_path, monkeypatch):
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    scorer, _ = all_metrics
    annotations = write_coco(tmp_path / "captions_test.json")
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results_for([3, 42, 1000, 7])))

    ours = scorer(load_results(results_file), load_references(annotations))

    coco = COCO(str(annotations))
    direct = coco_eval.COCOEvalCap(coco, coco.loadRes(str(results_file)))
    monkeypatch.setattr(coco_eval, "Meteor", lambda: scorer.scorers["METEOR"])  # the same jar, already loaded
    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    direct.evaluate()

    keys = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    assert list(ours.scores) == keys
    assert ours.scores == {k: 100 * direct.eval[k] for k in keys}  # the paper's units; equal, not close
    assert [row["image_id"] for row in ours.per_image] == [42, 7, 1000, 3]  # the references' order
    for row in ours.per_image:
        assert row == {"image_id": row["image_id"], **{k: 100 * direct.imgToEval[row["image_id"]][k] for k in keys}}
    assert 1 < ours.scores["Bleu_4"] < ours.scores["Bleu_1"] < 100 and ours.scores["CIDEr"] > 1


@pytest.mark.java
def test_spice_offline_is_skipped_with_instructions(all_metrics, monkeypatch):
    scorer, log = all_metrics
    assert "SPICE" not in scorer.scorers and "METEOR" in scorer.scorers
    assert log.count("\n") == 1 and log.startswith("SPICE skipped: Stanford CoreNLP 3.6.0 jars missing")
    assert "python -m pycocoevalcap.spice.get_stanford_models" in log and "--spice_jars" in log
    monkeypatch.setattr(toolkit, "SPICE_JARS", ("stanford-corenlp-missing.jar",))
    with pytest.raises(ClipCapError, match="SPICE unavailable: .*get_stanford_models"):
        Scorer(["CIDEr", "SPICE"])  # asked for by name: an error, not a silent skip


@pytest.mark.java
def test_spice_found_when_its_jars_are_there(monkeypatch):
    lib = toolkit.installed_toolkit() / "spice" / "lib"
    monkeypatch.setattr(toolkit, "SPICE_JARS", tuple(p.name for p in sorted(lib.glob("*.jar"))[:2]))
    assert spice_problem() is None


@pytest.mark.java
def test_bleu_and_cider_match_a_hand_computation():
    """Corpus BLEU (closest reference length) and CIDEr-D (sigma 6, clipped, x10) from their definitions."""
    pairs = [("a dog running on the grass", ["a dog runs on the grass", "a brown dog is running on the grass"]),
             ("a cat on a sofa", ["two cats sleep on a big sofa", "a cat is sleeping on a sofa"])]

    def ngrams(words, n):
        return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))

    # BLEU: clipped n-gram matches and n-gram counts summed over the corpus, brevity penalty.
    correct, guess, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for hyp, refs in pairs:
        h, rs = hyp.split(), [r.split() for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            most = Counter()
            for r in rs:
                most |= ngrams(r, n)
            correct[n - 1] += sum(min(c, most[g]) for g, c in ngrams(h, n).items())
            guess[n - 1] += len(h) - n + 1
    penalty = min(1.0, math.exp(1 - ref_len / hyp_len))
    bleu = [penalty * math.prod(correct[k] / guess[k] for k in range(n)) ** (1 / n) for n in range(1, 5)]

    # CIDEr-D: tf-idf n-gram vectors (document frequency over each image's references), clipped cosine
    # with a Gaussian length penalty, averaged over n = 1..4 and over references, times 10.
    df = Counter(g for _, refs in pairs for g in {g for r in refs for n in range(1, 5) for g in ngrams(r.split(), n)})

    def tfidf(words, n):
        return {g: c * (math.log(len(pairs)) - math.log(max(1, df[g]))) for g, c in ngrams(words, n).items()}

    per_image = []
    for hyp, refs in pairs:
        h, total = hyp.split(), 0.0
        for ref in refs:
            r = ref.split()
            sims = []
            for n in range(1, 5):
                vh, vr = tfidf(h, n), tfidf(r, n)
                dot = sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vh.items())
                norms = math.sqrt(sum(v * v for v in vh.values())) * math.sqrt(sum(v * v for v in vr.values()))
                sims.append((dot / norms if norms else 0.0) * math.exp(-(len(h) - len(r)) ** 2 / (2 * 6.0 ** 2)))
            total += sum(sims) / 4
        per_image.append(10 * total / len(refs))
    cider = sum(per_image) / len(per_image)

    scores = score([{"image_id": i, "caption": hyp} for i, (hyp, _) in enumerate(pairs)],
                   {i: refs for i, (_, refs) in enumerate(pairs)}, metrics=("Bleu", "CIDEr"))
    assert correct[3] > 0 and penalty < 1  # every term of the formulas is exercised
    assert [scores[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx([100 * b for b in bleu], rel=1e-6)
    assert scores["CIDEr"] == pytest.approx(100 * cider, rel=1e-9)


def test_java_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ClipCapError, match="java not found on PATH.*Java runtime"):
        Scorer(["CIDEr"])


READ_ONLY = r"""
import json, os, sys, sysconfig
site = os.path.realpath(sysconfig.get_paths()["purelib"])

WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT

def read_only(event, args):  # what a read-only file system does to writes under site-packages, even for root
    if event == "open":
        path, mode, flags = args
        writes = bool(flags & WRITE) if flags is not None else any(c in (mode or "") for c in "wax+")
    elif event in ("os.mkdir", "os.remove", "os.rename"):
        path, writes = args[0], True
    else:
        return
    if writes and isinstance(path, (str, os.PathLike)) and os.path.realpath(path).startswith(site + os.sep):
        raise PermissionError(30, "Read-only file system", os.fspath(path))

sys.addaudithook(read_only)
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
try:
    PTBTokenizer().tokenize({1: [{"caption": "a dog"}]})
    sys.exit("the toolkit wrote into site-packages: the read-only simulation does not hold")
except PermissionError:
    pass
from clipcap.evaluation import score
results, references = json.load(sys.stdin)
print(json.dumps(score(results, {int(k): v for k, v in references.items()}, metrics=%r)))
"""


@pytest.mark.java
def test_works_with_read_only_site_packages():
    """pycocoevalcap's own tokenizer fails there (checked first); the evaluation does not."""
    results, references = results_for(IMAGES), IMAGES
    run = subprocess.run([sys.executable, "-c", READ_ONLY % (CHEAP,)], input=json.dumps([results, references]),
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == score(results, references, metrics=CHEAP)


# --------------------------------------------------------------------------- mismatches


@pytest.mark.java
def test_mismatched_images_are_errors_unless_asked_for(all_metrics):
    scorer, _ = all_metrics
    references = {k: IMAGES[k] for k in (42, 7, 1000)}
    with pytest.raises(ClipCapError, match=r"r.json: 1 of 4 captions are for images not in refs.json "
                                           r"\(e.g. 3\).*--only_common_images"):
        pair_up(results_for([42, 7, 1000, 3]), references, source="r.json", ref_source="refs.json")
    with pytest.raises(ClipCapError, match=r"r.json: no caption for 1 of the 3 images in refs.json \(e.g. 1000\)"):
        pair_up(results_for([42, 7]), references, source="r.json", ref_source="refs.json")
    with pytest.raises(ClipCapError, match="no image matches"):
        pair_up(results_for([3]), references, only_common_images=True)

    common = scorer(results_for([3, 42, 7]), references, only_common_images=True)
    subset = scorer(results_for([42, 7]), {k: IMAGES[k] for k in (42, 7)})
    assert common.scores == subset.scores and [r["image_id"] for r in common.per_image] == [42, 7]


def test_duplicates_and_malformed_results_are_errors():
    duplicated = results_for([42, 7]) + [{"image_id": "42", "caption": "a surfer"}]  # "42" is image 42
    with pytest.raises(ClipCapError, match=r"r.json: 1 image ids occur more than once \(e.g. 42\)"):
        pair_up(duplicated, IMAGES, only_common_images=True, source="r.json")
    with pytest.raises(ClipCapError, match="r.json: entry 1 needs 'image_id' and a 'caption' string"):
        pair_up([{"image_id": 42, "caption": "x"}, {"image_id": 7, "caption": None}], IMAGES, source="r.json")
    with pytest.raises(ClipCapError, match="neither an integer nor a string"):
        pair_up([{"image_id": 4.2, "caption": "x"}], IMAGES)
    with pytest.raises(ClipCapError, match="images without reference captions"):
        match_images([42], {42: []})


@pytest.mark.java
def test_empty_captions_are_reported_and_score_zero(all_metrics, capsys):
    scorer, _ = all_metrics
    captions = {**CAPTIONS, 7: "  "}
    evaluation_ = scorer(results_for(IMAGES, captions), IMAGES, source="r.json")
    assert "warning: r.json: 1 empty caption(s) (e.g. image 7) score zero" in capsys.readouterr().err
    empty = next(row for row in evaluation_.per_image if row["image_id"] == 7)
    assert all(empty[k] == pytest.approx(0.0, abs=1e-6) for k in evaluation_.scores)
    assert all(row[k] > 0 for row in evaluation_.per_image if row["image_id"] != 7 for k in ("METEOR", "CIDEr"))


# --------------------------------------------------------------------------- reference and results files


def test_karpathy_split_file(tmp_path):
    path = tmp_path / "dataset_coco.json"
    images = [{"cocoid": i, "split": split, "filepath": "val2014", "sentences": [{"raw": f"caption {i} {j}"}
                                                                                  for j in range(2)]}
              for i, split in [(5, "test"), (1, "train"), (9, "val"), (2, "test"), (4, "restval")]]
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    assert load_references(path, "test") == {5: ["caption 5 0", "caption 5 1"], 2: ["caption 2 0", "caption 2 1"]}
    assert list(load_references(path, "val")) == [9]
    with pytest.raises(ClipCapError, match="pass --split test or --split val"):
        load_references(path)
    path.write_text(json.dumps({"images": [i for i in images if i["split"] != "val"]}))
    with pytest.raises(ClipCapError, match="no image in split 'val' \\(the file has restval, test, train\\)"):
        load_references(path, "val")


def test_coco_format_and_plain_lists(tmp_path):
    coco = write_coco(tmp_path / "captions.json")
    assert load_references(coco) == IMAGES and list(load_references(coco)) == [42, 7, 1000, 3]
    with pytest.raises(ClipCapError, match="--split applies to Karpathy's split files only"):
        load_references(coco, "test")
    flat = tmp_path / "test_caption.json"
    flat.write_text(json.dumps([{"image_id": "12", "caption": "a"}, {"image_id": 3, "caption": "b"},
                                {"image_id": 12, "caption": "c"}]))
    assert load_references(flat) == {12: ["a", "c"], 3: ["b"]}
    flat.write_text(json.dumps([{"image_id": 3}]))
    with pytest.raises(ClipCapError, match="annotation 0 needs 'image_id' and a 'caption' string"):
        load_references(flat)
    flat.write_text('{"images": ')
    with pytest.raises(ClipCapError, match="not valid JSON"):
        load_references(flat)


def test_conceptual_captions_tsv_rows_are_image_ids(tmp_path):
    tsv = tmp_path / "Validation_GCC-1.1.0-Validation.tsv"
    tsv.write_text("a dog on a beach\thttp://x/0.jpg\nactor attends the premiere\thttp://x/1.jpg\n"
                   "a bowl of soup\thttp://x/2.jpg\n")
    references = load_references(tsv)
    assert references == {0: ["a dog on a beach"], 1: ["actor attends the premiere"], 2: ["a bowl of soup"]}
    # Keys of downloaded images such as "00000001" name the same rows.
    assert match_images(["00000001", "00000002"], references, only_common_images=True) == [1, 2]
    tsv.write_text("a dog\thttp://x/0.jpg\nno url here\n")
    with pytest.raises(ClipCapError, match="line 2 is not 'caption<TAB>url'"):
        load_references(tsv)


def test_results_file_errors(tmp_path):
    path = tmp_path / "captions.json"
    with pytest.raises(ClipCapError, match="captions.json: results file not found"):
        load_results(path)
    path.write_text(json.dumps({"image_id": 1, "caption": "x"}))
    with pytest.raises(ClipCapError, match="expected a JSON list"):
        load_results(path)


# --------------------------------------------------------------------------- evaluate.py


def run_evaluate(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.mark.java
def test_evaluate_script_writes_metrics_and_table(tmp_path):
    annotations = write_coco(tmp_path / "captions_test.json")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(results_for([7, 42, 3, 1000])))
    run = run_evaluate("--results", results, "--annotations", annotations, "--metrics", ",".join(CHEAP),
                       "--out", "out/metrics.json", "--per_image", "per_image.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    expected = score(results_for([7, 42, 3, 1000]), IMAGES, metrics=CHEAP)
    assert metrics == expected
    header, _, row = run.stdout.splitlines()[:3]
    assert header == "| images | Bleu_1 | Bleu_2 | Bleu_3 | Bleu_4 | ROUGE_L | CIDEr |"
    assert row == "| 4 | " + " | ".join(f"{v:.2f}" for v in expected.values()) + " |"  # as in the file
    per_image = json.loads((tmp_path / "per_image.json").read_text())
    assert [r["image_id"] for r in per_image] == [42, 7, 1000, 3]
    assert sum(r["CIDEr"] for r in per_image) / 4 == pytest.approx(metrics["CIDEr"], rel=1e-12)

    results.write_text(json.dumps(results_for([7, 42])))
    run = run_evaluate("--results", results, "--annotations", annotations, "--metrics", "CIDEr", cwd=tmp_path)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "--only_common_images" in run.stderr


def test_evaluate_refuses_before_any_work(tmp_path, monkeypatch, capsys):
    """An output that is one of the inputs (after links), or a --metrics that names none, is refused before
    Java starts; without --out nothing is written, the table alone is printed."""
    from clipcap.cli import evaluate as cli_evaluate

    def no_scoring(*args, **kwargs):
        raise AssertionError("scoring started")

    annotations = write_coco(tmp_path / "captions_test.json")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(results_for(IMAGES)))
    (tmp_path / "link.json").symlink_to(results)
    (tmp_path / "images").mkdir()
    photo = tmp_path / "images" / "photo.jpg"
    photo.write_bytes(b"not read")
    inputs = {path: path.read_bytes() for path in (annotations, results, photo)}
    common = ["--results", str(results), "--annotations", str(annotations)]
    monkeypatch.setattr(cli_evaluate, "Scorer", no_scoring)
    for argv, message in [
            ([*common, "--out", str(results)], r"^--out .*results.json: is the input --results .*results.json; "
                                                r"writing it would destroy the input"),
            ([*common, "--out", str(tmp_path / "link.json")], "--out .*link.json: is the input --results"),
            ([*common, "--per_image", str(annotations)], "--per_image .*captions_test.json: is the input --annotations"),
            ([*common, "--clipscore", "--features", str(photo), "--out", str(photo)], "is the input --features"),
            (["--checkpoint", str(photo), "--features", str(results), "--annotations", str(annotations),
              "--save_captions", str(photo)], "--save_captions .*photo.jpg: is the input --checkpoint"),
            ([*common, "--metrics", ","], r"^--metrics ',': names no metric; choose from Bleu, METEOR, ROUGE_L, "
                                          r"CIDEr, SPICE, or leave it out for all$"),
            ([*common, "--metrics", " , "], "--metrics ' , ': names no metric")]:
        with pytest.raises(ClipCapError, match=message):
            evaluate(argv)
    assert {path: path.read_bytes() for path in inputs} == inputs

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    evaluate([*common, "--metrics", "CIDEr"])
    assert sorted(tmp_path.rglob("*")) == before  # no metrics.json in the current folder
    assert capsys.readouterr().out.splitlines()[:1] == ["| images | CIDEr |"]


@pytest.mark.java
def test_evaluate_captions_a_checkpoint_then_scores(tmp_path, gpt2_dir):
    from conftest import caption_corpus, write_feature_pickle

    from clipcap.captioner import Captioner
    from clipcap.checkpoint import save_checkpoint
    from clipcap.data import load_features
    from clipcap.decoding import DecodingOptions
    from clipcap.model import ClipCapConfig, build_model

    corpus = caption_corpus()
    per_image = [[corpus[5 * i], corpus[5 * i + 2]] for i in range(4)]
    features = write_feature_pickle(tmp_path / "test.pkl", per_image, dim=16)  # images 1000..1003
    annotations = write_coco(tmp_path / "refs.json", {1000 + i: caps for i, caps in enumerate(per_image)})
    checkpoint = save_checkpoint(build_model(ClipCapConfig(prefix_size=16, prefix_length=2, gpt2=gpt2_dir)),
                                 tmp_path / "tiny.safetensors")

    evaluate(["--checkpoint", str(checkpoint), "--features", str(features), "--annotations", str(annotations),
              "--metrics", "Bleu,CIDEr", "--beam_size", "3", "--device", "cpu",
              "--out", str(tmp_path / "metrics.json"), "--save_captions", str(tmp_path / "captions.json")])

    captions = json.loads((tmp_path / "captions.json").read_text())
    expected = Captioner.from_checkpoint(checkpoint).caption_features(
        load_features(features), strategy="beam", beam_size=3)
    assert captions == expected and sorted(c["image_id"] for c in captions) == [1000, 1001, 1002, 1003]
    assert json.loads((tmp_path / "metrics.json").read_text()) == score(
        captions, load_references(annotations), metrics=("Bleu", "CIDEr"))

    # The decoding flags are predict's: sampling, seeded, with a temperature.
    evaluate(["--checkpoint", str(checkpoint), "--features", str(features), "--annotations", str(annotations),
              "--metrics", "CIDEr", "--seed", "3", "--temperature", "1.5", "--max_length", "6",
              "--out", str(tmp_path / "sampled.json"), "--save_captions", str(tmp_path / "sampled_captions.json")])
    assert json.loads((tmp_path / "sampled_captions.json").read_text()) == \
        Captioner.from_checkpoint(checkpoint).caption_features(load_features(features), DecodingOptions(
            "sample", seed=3, temperature=1.5, max_length=6))
    with pytest.raises(SystemExit):  # the metrics score one caption per image
        evaluate(["--checkpoint", str(checkpoint), "--features", str(features), "--annotations", str(annotations),
                  "--num_captions", "2"])

    # Images missing from the references are found before any captioning (the checkpoint is not even read).
    annotations = write_coco(tmp_path / "refs.json", {1000: per_image[0]})
    with pytest.raises(ClipCapError, match=r"test.pkl: 3 of 4 captions are for images not in .*refs.json"):
        evaluate(["--checkpoint", str(tmp_path / "absent.safetensors"), "--features", str(features),
                  "--annotations", str(annotations), "--metrics", "CIDEr"])


# --------------------------------------------------------------------------- nocaps domains

# A nocaps-style validation set: COCO format, each image with its domain (ids out of order, domains mixed).
NOCAPS = {**IMAGES, 5: ["A kangaroo standing in a dry field.", "a kangaroo in the grass"],
          8: ["A jellyfish floating in blue water.", "a pink jellyfish swimming in the ocean"]}
NOCAPS_CAPTIONS = {**CAPTIONS, 5: "A kangaroo standing in the grass.", 8: "A jellyfish in the water."}
DOMAIN_OF = {42: "in-domain", 7: "near-domain", 1000: "in-domain", 3: "out-domain", 5: "near-domain", 8: "out-domain"}


def write_nocaps(path: Path) -> Path:
    images = [{"id": i, "file_name": f"{i:016x}.jpg", "open_images_id": f"{i:016x}", "domain": DOMAIN_OF[i],
               "coco_url": f"https://example.invalid/{i:016x}.jpg", "height": 32, "width": 48} for i in NOCAPS]
    annotations = [{"image_id": i, "id": 10 * i + j, "caption": c} for i, caps in NOCAPS.items() for j, c in enumerate(caps)]
    path.write_text(json.dumps({"licenses": [], "info": {}, "images": images, "annotations": annotations}))
    return path


@pytest.mark.java
def test_nocaps_domains_are_separate_runs(tmp_path):
    from clipcap.annotations import load_annotations

    references, images = load_annotations(write_nocaps(tmp_path / "nocaps_val_4500_captions.json"))
    assert references == NOCAPS and {k: v["domain"] for k, v in images.items()} == DOMAIN_OF
    assert images[42]["file"] == "000000000000002a.jpg"
    results = results_for(NOCAPS, NOCAPS_CAPTIONS)
    with Scorer(CHEAP) as scorer:
        evaluations = scorer.by_domain(results, references, {k: v["domain"] for k, v in images.items()})
    assert list(evaluations) == ["entire", "in-domain", "near-domain", "out-domain"]
    assert evaluations["entire"].scores == score(results, NOCAPS, metrics=CHEAP)
    for domain in ("in-domain", "near-domain", "out-domain"):
        ids = [k for k in NOCAPS if DOMAIN_OF[k] == domain]
        assert evaluations[domain].scores == score(results_for(ids, NOCAPS_CAPTIONS), {k: NOCAPS[k] for k in ids},
                                                   metrics=CHEAP)  # equal, not close
        assert [row["image_id"] for row in evaluations[domain].per_image] == ids
        # CIDEr's document frequencies are the subset's: not the entire run's per-image CIDEr averaged.
        entire_cider = [row["CIDEr"] for row in evaluations["entire"].per_image if row["image_id"] in ids]
        assert evaluations[domain].scores["CIDEr"] != pytest.approx(sum(entire_cider) / len(ids))
    assert [(row["image_id"], row["domain"]) for row in evaluations["entire"].per_image] == list(DOMAIN_OF.items())


@pytest.mark.java
def test_evaluate_script_reports_nocaps_domains(tmp_path):
    annotations = write_nocaps(tmp_path / "nocaps_val_4500_captions.json")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(results_for(NOCAPS, NOCAPS_CAPTIONS)))
    run = run_evaluate("--results", results, "--annotations", annotations, "--metrics", "Bleu,CIDEr",
                       "--out", "metrics.json", "--per_image", "per_image.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics) == ["entire", "in-domain", "near-domain", "out-domain"]
    keys = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"]
    assert all(list(scores) == keys for scores in metrics.values())
    ids = [k for k in NOCAPS if DOMAIN_OF[k] == "out-domain"]
    assert metrics["out-domain"] == score(results_for(ids, NOCAPS_CAPTIONS), {k: NOCAPS[k] for k in ids},
                                          metrics=("Bleu", "CIDEr"))
    lines = run.stdout.splitlines()
    assert lines[0] == "| subset | images | " + " | ".join(keys) + " |"
    assert lines[2] == "| entire | 6 | " + " | ".join(f"{metrics['entire'][k]:.2f}" for k in keys) + " |"
    assert [line.split(" | ")[:2] for line in lines[3:6]] == [["| in-domain", "2"], ["| near-domain", "2"],
                                                              ["| out-domain", "2"]]
    per_image = json.loads((tmp_path / "per_image.json").read_text())
    assert [(r["image_id"], r["domain"]) for r in per_image] == list(DOMAIN_OF.items())


# --------------------------------------------------------------------------- SPICE's jars and Java


def make_jar(path: Path, name: str) -> Path:
    """A real (empty-classed) jar: a zip with a manifest."""
    import zipfile

    with zipfile.ZipFile(path, "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", f"Manifest-Version: 1.0\nCreated-By: {name}\n")
    return path


def corenlp_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for jar in toolkit.SPICE_JARS:
        make_jar(folder / jar, jar)
    return folder


@pytest.mark.java
def test_spice_jars_from_a_folder_and_from_the_zip(tmp_path, monkeypatch):
    import zipfile

    from clipcap.toolkit import find_spice_jars

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(toolkit.SPICE_JARS_ENV, raising=False)
    folder = corenlp_folder(tmp_path / "jars")
    assert find_spice_jars(folder) == {jar: folder / jar for jar in toolkit.SPICE_JARS}

    # The zip pycocoevalcap downloads: its jars sit in a top folder, beside many others.
    zipped = tmp_path / "download" / toolkit.CORENLP_ZIP
    zipped.parent.mkdir()
    with zipfile.ZipFile(zipped, "w") as archive:
        for name in (*toolkit.SPICE_JARS, "stanford-corenlp-3.6.0-javadoc.jar", "README.txt"):
            archive.write(make_jar(tmp_path / name, name), f"stanford-corenlp-full-2015-12-09/{name}")
    for source in (zipped, zipped.parent):  # the zip, or a folder holding it
        jars = find_spice_jars(source)
        assert list(jars) == list(toolkit.SPICE_JARS)
        for name, path in jars.items():
            assert path.read_bytes() == (tmp_path / name).read_bytes() and str(path).startswith(str(tmp_path / "cache"))
    monkeypatch.setenv(toolkit.SPICE_JARS_ENV, str(zipped))  # the environment variable, when no flag
    assert find_spice_jars() == jars and spice_problem() is None

    monkeypatch.setenv(toolkit.SPICE_JARS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ClipCapError, match=r"nowhere \(CLIPCAP_SPICE_JARS\): not found"):
        find_spice_jars()
    with pytest.raises(ClipCapError, match=r"empty \(--spice_jars\): holds neither stanford-corenlp-3.6.0.jar"):
        (tmp_path / "empty").mkdir()
        find_spice_jars(tmp_path / "empty")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("README.txt", "")
    with pytest.raises(ClipCapError, match="other.zip: zip lacks stanford-corenlp-3.6.0.jar, "
                                           "stanford-corenlp-3.6.0-models.jar"):
        find_spice_jars(tmp_path / "other.zip")


@pytest.mark.java
def test_java_version_of_the_real_java_and_an_old_one(tmp_path, monkeypatch):
    from clipcap.toolkit import java_version

    printed = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
    version = java_version()
    assert version >= 8 and f'version "{version}' in printed  # 17.0.15 -> 17 (a Java 8 would print "1.8.0")
    old = tmp_path / "bin" / "java"
    old.parent.mkdir()
    old.write_text('#!/bin/sh\necho \'java version "1.7.0_80"\' >&2\n')
    old.chmod(0o755)
    assert java_version(str(old)) == 7
    monkeypatch.setenv("PATH", f"{old.parent}{os.pathsep}{os.environ['PATH']}")
    folder = corenlp_folder(tmp_path / "jars")
    assert spice_problem(folder) == "SPICE 1.0 needs Java 8 or newer; java on PATH is Java 7"
    with pytest.raises(ClipCapError, match="^SPICE unavailable: SPICE 1.0 needs Java 8 or newer; java on PATH is Java 7$"):
        Scorer(["SPICE"], spice_jars=folder)


# CoreNLP's SemgrexPattern, which SPICE's scene-graph parser calls first: this one records the patterns it
# is given, and whether java.lang is open to it (SPICE's cache needs --add-opens on Java 9+).
SEMGREX_STAND_IN = """package edu.stanford.nlp.semgraph.semgrex;

public class SemgrexPattern {
    public static SemgrexPattern compile(String pattern) {
        boolean open = Object.class.getModule().isOpen("java.lang", SemgrexPattern.class.getModule());
        try (java.io.FileWriter marker = new java.io.FileWriter(System.getenv("CLIPCAP_TEST_MARKER"), true)) {
            marker.write("java.lang open: " + open + "\\t" + pattern.replace("\\n", " ") + "\\n");
        } catch (java.io.IOException e) {
            throw new RuntimeException(e);
        }
        return new SemgrexPattern();
    }
}
"""


def stand_in_corenlp(folder: Path) -> Path:
    """CoreNLP's two jars, the main one holding only the compiled stand-in above (the real ones cannot be
    downloaded here)."""
    import zipfile

    if shutil.which("javac") is None:
        pytest.skip("javac (a JDK) is needed to compile the stand-in CoreNLP class")
    source = folder / "src" / "edu/stanford/nlp/semgraph/semgrex/SemgrexPattern.java"
    source.parent.mkdir(parents=True)
    source.write_text(SEMGREX_STAND_IN)
    subprocess.run(["javac", "-d", str(folder / "classes"), str(source)], check=True, capture_output=True)
    corenlp, models = (folder / jar for jar in toolkit.SPICE_JARS)
    make_jar(corenlp, "stand-in")
    with zipfile.ZipFile(corenlp, "a") as jar:
        for path in (folder / "classes").rglob("*.class"):
            jar.write(path, path.relative_to(folder / "classes").as_posix())
    make_jar(models, "stand-in")
    return folder


@pytest.mark.java
def test_spice_loads_its_corenlp_jars_and_reports_javas_own_error(tmp_path, monkeypatch):
    """The real SPICE reaches the CoreNLP class of --spice_jars, with java.lang opened, and when it then fails
    (the stand-in has no other class) the error is Java's own last line, not a guess."""
    folder = stand_in_corenlp(tmp_path / "jars")
    marker = tmp_path / "marker.txt"
    monkeypatch.setenv("CLIPCAP_TEST_MARKER", str(marker))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    scorer = Scorer(["SPICE"], spice_jars=folder)  # offline: pycocoevalcap would download, were the jars not found
    with pytest.raises(ClipCapError, match=r"^SPICE \(Java\) failed with exit status 1: Caused by: "
                                           r"java.lang.ClassNotFoundException: edu.stanford.nlp.pipeline.Annotation$"):
        scorer(results_for([42, 7]), {k: IMAGES[k] for k in (42, 7)})
    calls = marker.read_text().splitlines()
    assert len(calls) > 5 and all(call.startswith("java.lang open: true\t") for call in calls)
    assert any(">nsubj" in call for call in calls)  # SPICE's own scene-graph patterns
    installed = toolkit.installed_toolkit() / "spice"
    assert not any((installed / "lib" / jar).exists() for jar in toolkit.SPICE_JARS)  # site-packages untouched
    assert not (installed / "tmp").exists() and not (installed / "cache").exists()


def test_javas_own_error_line():
    from clipcap.toolkit import java_error

    trace = ('Exception in thread "main" java.lang.NoClassDefFoundError: a/B\n\tat x.Y.z(Y.java:72)\n'
             "Caused by: java.lang.ClassNotFoundException: a.B\n\tat java.base/C.d(C.java:641)\n\t... 6 more\n")
    assert java_error(trace) == "Caused by: java.lang.ClassNotFoundException: a.B"
    assert java_error("Error occurred during initialization of VM\nCould not reserve enough space for object heap\n"
                      "Error: Could not create the Java Virtual Machine.\n"
                      "Error: A fatal exception has occurred. Program will exit.\n") == \
        "Could not reserve enough space for object heap"
    assert java_error("") == "it printed no error"


def test_image_files_of_karpathy_and_coco_references(tmp_path):
    from clipcap.annotations import image_files, load_annotations

    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [
        {"cocoid": i, "split": "test", "filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg",
         "sentences": [{"raw": f"caption {i}"}]} for i in (5, 2, 9)]}))
    references, images = load_annotations(karpathy, "test")
    assert images == {i: {"file": f"val2014/COCO_val2014_{i:012d}.jpg"} for i in (5, 2, 9)}
    (tmp_path / "coco" / "val2014").mkdir(parents=True)
    (tmp_path / "coco" / "val2014" / "COCO_val2014_000000000005.jpg").write_bytes(b"")
    (tmp_path / "coco" / "COCO_val2014_000000000002.jpg").write_bytes(b"")  # all images in one folder also do
    with pytest.raises(ClipCapError, match=r"coco \(--images\): 1 of the 3 images of refs are missing "
                                           r"\(e.g. 'val2014/COCO_val2014_000000000009.jpg'\)"):
        image_files(references, images, tmp_path / "coco", ref_source="refs")
    assert image_files(references, images, tmp_path / "coco", only_common_images=True) == {
        5: tmp_path / "coco/val2014/COCO_val2014_000000000005.jpg", 2: tmp_path / "coco/COCO_val2014_000000000002.jpg"}
    with pytest.raises(ClipCapError, match=r"^references: no image file named for 4 images .*images\[\].file_name"):
        image_files(IMAGES, load_annotations(write_coco(tmp_path / "refs.json"))[1], tmp_path / "coco")
