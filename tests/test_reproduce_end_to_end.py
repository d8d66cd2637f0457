"""`make reproduce` end to end: served data fetched, the rows run through their recipes, killed and resumed, a
changed setting, rows skipped and failing, the report in Chromium.

The data (COCO, nocaps and Conceptual Captions in their published layouts, drawn shapes: tests/served_data.py)
is served by a local HTTP server and fetched the way `make data` fetches it (pooch, img2dataset); the rows run with
tiny backbones (a CLIP and a GPT-2 for the paper's rows and CapDec's, a SigLIP and a Qwen2 for the modern pair),
two epochs and small batches, through the real recipes, scripts and Java metrics. Every stage kind runs in each
data layout: COCO (the MLP with GPT-2 tuned; the transformer with GPT-2 frozen, killed and resumed; both rows
beyond the paper), Conceptual Captions (its MLP row), nocaps (scoring the two COCO models). The paper's other
three rows are these code paths with other flags: tests/test_reproduce.py holds their plans to the paper's
settings. The recipes' commands are real processes forked from a warm interpreter (tests/warm_python.py).
A recipe that drifts from the scripts' flags, or a CLIP that is not carried from the features into the
checkpoint, fails here.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import caption_corpus
from safetensors import safe_open
from served_data import md5, publish_coco, publish_conceptual, publish_nocaps, serve
from warm_python import warm_python

from clipcap import fetch, paper
from clipcap.cli.reproduce import main
from clipcap.data import load_features
from clipcap.files import ClipCapError
from clipcap.report import read_metrics

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The rows run here; the killed run, with every row chosen, stops in the first.
RUN = ("coco_transformer", "coco_mlp", "conceptual_mlp", "nocaps", "coco_siglip2_qwen", "capdec_coco")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, gpt2_dir):
    """The published data fetched into data folders as `make data` does, and the environment that points the
    recipes at it: one tiny CLIP (with a tokenizer: CLIPScore, CapDec's text tower) and a tiny GPT-2 for the
    paper's rows and CapDec's, a tiny SigLIP tower and Qwen2 LM for the modern pair, 2 epochs; PY a warm
    interpreter."""
    from testing.tiny import make_tiny_clip, make_tiny_lm, make_tiny_siglip

    root = tmp_path_factory.mktemp("reproduce")
    site = root / "site"
    clip = str(make_tiny_clip(root / "clip", corpus=caption_corpus()))
    env = {"COCO": str(root / "data" / "coco"), "CC": str(root / "data" / "conceptual"),
           "NOCAPS": str(root / "data" / "nocaps"), "RUNS": str(root / "runs"), "GPT2": gpt2_dir, "CLIP": clip,
           "TAG": "tiny", "MLP_CLIP": clip, "MLP_TAG": "tiny", "TRANSFORMER_CLIP": clip, "TRANSFORMER_TAG": "tiny",
           "TOWER": str(make_tiny_siglip(root / "siglip")), "TOWER_TAG": "siglip",
           "LM": str(make_tiny_lm(root / "qwen2", "qwen2", caption_corpus())),
           "EPOCHS": "2", "BS": "4", "VAL_CAPTIONS": "4", "K": "3", "LR": "3e-3", "WARMUP": "2", "GPUS": "1",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ROWS": "all"}
    with warm_python(root / "warm", {**os.environ, **env, "PYTHONUNBUFFERED": "1"}) as python:
        env["PY"] = python
        with serve(site) as (base, requests, _), pytest.MonkeyPatch.context() as mp:
            publish_coco(site)
            publish_nocaps(site, base)
            publish_conceptual(site, base)
            mp.setattr(fetch, "COCO", tuple(fetch.Remote(r.name, f"{base}/coco/{r.name}", r.leaves,
                                                         md5(site / "coco" / r.name) if r.md5 else None, r.members)
                                            for r in fetch.COCO))
            mp.setattr(fetch, "NOCAPS", (fetch.Remote(fetch.NOCAPS[0].name, f"{base}/nocaps/{fetch.NOCAPS[0].name}",
                                                      fetch.NOCAPS[0].leaves),))
            mp.setattr(fetch, "CONCEPTUAL", tuple(fetch.Remote(r.name, f"{base}/cc/{r.name}", r.leaves)
                                                  for r in fetch.CONCEPTUAL))
            # img2dataset fetches the validation images; the training images are in the original's layout
            # ({row:08d}.jpg beside the TSV, which the recipes read too), copied here: one img2dataset run is enough.
            mp.setattr(fetch, "CONCEPTUAL_SPLITS", {"val": fetch.CONCEPTUAL_SPLITS["val"]})
            shutil.copytree(site / "cc" / "train", root / "data" / "conceptual" / "train")
            for name, value in env.items():
                mp.setenv(name, value)
            fetching = ["--fetch_only", "--download_processes", "1", "--download_threads", "4"]
            main([*fetching, "--rows", "coco_siglip2_qwen,capdec_coco"])  # the rows beyond the paper: COCO alone
            assert requests and all(r.startswith("/coco/") for r in requests)
            assert not (root / "data" / "nocaps").exists()
            hidden = site / "nocaps" / "val" / "0000000000000005.jpg"
            hidden.rename(site / "hidden.jpg")  # unavailable on the first try
            before = len(requests)
            main(fetching)
            assert not any(r.startswith("/coco/") for r in requests[before:])  # fetched already
            failed = json.loads((root / "data" / "nocaps" / ".fetched" / "val_failed.json").read_text())
            assert list(failed) == [f"{base}/nocaps/val/0000000000000005.jpg"]
            (site / "hidden.jpg").rename(hidden)
            before = len(requests)
            main(fetching)
            assert requests[before:] == ["/nocaps/val/0000000000000005.jpg"]  # only what failed is fetched again
        yield root, env


def test_fetch_lays_the_data_out_as_the_recipes_read_it(workspace):
    root, _ = workspace
    coco, nocaps, cc = (root / "data" / name for name in ("coco", "nocaps", "conceptual"))
    assert sorted(p.name for p in coco.iterdir() if not p.name.startswith(".")) == [
        "dataset_coco.json", "train2014", "val2014"]  # archives unpacked, then deleted; only the chosen member
    assert len(list((coco / "train2014").iterdir())) == 12 and len(list((coco / "val2014").iterdir())) == 8
    assert len(list((nocaps / "val").iterdir())) == 6
    stats = fetch.shard_counts(cc / "val")
    assert (stats["images"], stats["downloaded"], stats["failed"]) == (5, 4, 1)  # a vanished URL, counted
    assert json.loads((cc / ".fetched" / "val.json").read_text())["failed"] == 1
    assert (cc / "Train_GCC-training.tsv").is_file() and len(list((cc / "train").iterdir())) == 11


@pytest.mark.java
@pytest.mark.browser
@pytest.mark.timeout(1200)
def test_reproduce_runs_the_rows_resumes_after_a_kill_and_reports(workspace, capsys, monkeypatch):
    """Then the report opened from disk in Chromium: the tables, the curves and the gallery's images load.
    CLIPCAP_REPORT_SCREENSHOT=PATH saves a picture of it (the README's docs/reproduce_report.png)."""
    if CHROMIUM is None:
        pytest.skip("needs Chromium (Debian package chromium)")
    root, env = workspace
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    clip, tower, lm = env["CLIP"], env["TOWER"], env["LM"]
    options = ["--budget_steps", "2", "--gallery", "3", "--clipscore_model", clip]

    # The plan and the projected time, the rows beyond the paper among them; nothing runs.
    main([*options, "--dry_run", "--rows", "coco_mlp,conceptual_mlp,coco_siglip2_qwen,capdec_coco"])
    out = capsys.readouterr().out
    for row in ("coco_mlp", "coco_siglip2_qwen", "capdec_coco"):
        assert f"{row}: features to run; train to run; score to run; gallery to run" in out
    for row in ("coco_mlp", "coco_siglip2_qwen", "capdec_coco"):  # 24 captions (train + restval), batch 4
        assert re.search(rf"{row} +[\d.]+ s/step +6 steps/epoch x 2 epochs on 1 process", out), row
    assert re.search(r"conceptual_mlp +[\d.]+ s/step +3 steps/epoch", out)  # the TSV's 12 rows, batch 4
    assert not (root / "runs").exists()

    # The installed command, every row chosen, killed once the first row's training has saved an epoch.
    first = root / "runs" / "coco_transformer_k3"
    process = subprocess.Popen([str(Path(sys.executable).with_name("clipcap-reproduce")), *options[2:],
                                "--budget_steps", "0"], env={**os.environ, **env}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=open(root / "killed.err", "w"))
    deadline = time.time() + 600
    while not (first / "coco_transformer_k3_resume.pt").exists():
        assert process.poll() is None, (root / "killed.err").read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    main([*options, "--rows", ",".join(RUN)])
    out = capsys.readouterr().out
    assert "coco_transformer: features done; train resume; score to run; gallery to run" in out
    assert "coco_mlp: features done; train to run" in out  # the features all COCO rows share, made once
    assert "capdec_coco: features to run" in out  # its captions' text embeddings; the test images' are shared
    assert "coco_transformer train: done" in out and "Traceback" not in out

    report = json.loads((root / "runs" / "report" / "report.json").read_text())
    rows = {row["row"]: row for row in report["rows"]}
    assert list(rows) == [row.name for row in (*paper.ROWS, *paper.EXTRA_ROWS)]
    assert {name: row["status"] for name, row in rows.items() if row["status"] == "done"} == dict.fromkeys(RUN, "done")
    assert all(rows[name]["reason"] == "not run" for name in rows if name not in RUN)
    # row: (run folder, scored checkpoint, CLIP, LM frozen, mapper, epochs against: the source of the settings)
    runs = {"coco_mlp": ("coco_mlp", "coco_mlp_best", clip, False, "mlp", "paper: 10"),
            "coco_transformer": ("coco_transformer_k3", None, clip, True, "transformer", "paper: 10"),
            "conceptual_mlp": ("conceptual_mlp", "conceptual_mlp-001", clip, False, "mlp", "paper: 10"),
            "coco_siglip2_qwen": ("coco_siglip2_qwen", None, tower, False, "mlp", "recipe: 4"),
            "capdec_coco": ("capdec_coco", "capdec_coco-001", clip, False, "transformer", "CapDec: 10")}
    for row, (run, best, tower_of_row, only_prefix, mapper, epochs) in runs.items():
        folder = root / "runs" / run
        metrics = json.loads((folder / "metrics.json").read_text())
        assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(metrics)
        assert rows[row]["ours"] == read_metrics(folder / "metrics.json")
        stated = (paper.BY_NAME.get(row) or paper.EXTRA_BY_NAME[row]).scores
        assert rows[row]["paper"] == stated and rows[row]["beyond_paper"] == (row in paper.EXTRA_BY_NAME)
        if stated:
            assert rows[row]["difference"]["CIDEr"] == round(rows[row]["ours"]["CIDEr"] - stated["CIDEr"], 2)
        else:  # nothing to compare with: no difference, no colour
            assert rows[row]["difference"] == {} and "within_tolerance" not in rows[row]
        scored = json.loads(next(folder.glob("captions_*.json")).read_text())
        assert len(scored) == 4  # CC: of the 5 validation images, the 4 that downloaded
        with safe_open(str(folder / f"{best or run + '_best'}.safetensors"), framework="pt") as f:
            config = json.loads(f.metadata()["clipcap_config"])
        assert config["clip_model"] == tower_of_row  # the features' tower, recorded without a flag
        assert (config["only_prefix"], config["mapping_type"]) == (only_prefix, mapper)
        assert [e["epoch"] for e in rows[row]["epochs"]] == [1, 2] and len(rows[row]["loss"]) >= 2
        has_val = row.startswith("coco")  # the others score their last epoch
        assert rows[row]["chosen_epoch"] in (1, 2) if has_val else rows[row]["chosen_epoch"] == 2
        assert f"epochs: 2 ({epochs})" in rows[row]["differences_from_paper"]
        gallery = rows[row]["galleries"][row]
        references = 1 if row.startswith("conceptual") else 2  # CC has one caption per image
        assert len(gallery["images"]) == 3 and all(len(i["references"]) == references for i in gallery["images"])
        assert 0 <= gallery["clipscore"]["CLIP-S"] <= 250 and gallery["clipscore"]["images"] == len(scored)
    for model, run in (("coco_mlp", "coco_mlp"), ("coco_transformer", "coco_transformer_k3")):
        scores = json.loads((root / "runs" / run / "metrics_nocaps.json").read_text())
        assert set(scores) == {"entire", "in-domain", "near-domain", "out-domain"}
        assert all("CIDEr" in s for s in scores.values())
        assert rows["nocaps"]["ours"][model]["near-domain"]["CIDEr"] == scores["near-domain"]["CIDEr"]
    assert rows["coco_transformer"]["stages"]["train"]["seconds"] > 0 and report["total_seconds"] > 0

    # The modern pair: the SigLIP tower's features, the Qwen2 LM frozen in bf16 under LoRA adapters.
    with safe_open(str(root / "runs" / "coco_siglip2_qwen" / "coco_siglip2_qwen_best.safetensors"),
                   framework="pt") as f:
        config = json.loads(f.metadata()["clipcap_config"])
    assert (config["lm"], config["lm_dtype"], config["lora_rank"], config["normalize_prefix"]) == (
        lm, "bfloat16", 16, True)
    assert load_features(root / "data" / "coco" / "oscar_split_siglip_test.pkl").clip_model == tower
    # CapDec: trained on the text embeddings of the train + restval captions (2 each), noised.
    text = load_features(root / "data" / "coco" / "oscar_split_tiny_text_train.pkl")
    assert text.modality == "text" and len(text) == 24 and text.clip_model == clip
    with safe_open(str(root / "runs" / "capdec_coco" / "capdec_coco-001.safetensors"), framework="pt") as f:
        config = json.loads(f.metadata()["clipcap_config"])
    assert (config["noise_variance"], config["normalize_prefix"], config["prefix_length"]) == (0.016, True, 3)

    # A changed setting: only what depends on it is to run again.
    monkeypatch.setenv("VAL_CAPTIONS", "3")
    main([*options, "--rows", "coco_mlp", "--dry_run", "--budget_steps", "0"])
    out = capsys.readouterr().out
    assert "coco_mlp: features done; train to run (settings changed: --val_captions 4 -> 3); score to run (what it " \
           "depends on changed); gallery to run (what it depends on changed)" in out
    monkeypatch.setenv("VAL_CAPTIONS", "4")

    # The report again, from the finished runs alone.
    start = time.perf_counter()
    main(["--report_only"])
    seconds = time.perf_counter() - start
    again = json.loads((root / "runs" / "report" / "report.json").read_text())
    assert {k: v for k, v in again.items() if k != "generated"} == {k: v for k, v in report.items() if k != "generated"}
    print(f"--report_only: {seconds:.1f} s")

    # Into another folder: a row whose data is missing is skipped with the command that fetches it; rows whose
    # training fails are reported, the others run on, and a row that needs a failed row's model is skipped.
    other = root / "runs_failing"
    monkeypatch.setenv("RUNS", str(other))
    monkeypatch.setenv("CC", str(root / "nowhere"))
    monkeypatch.setenv("GPT2", str(root / "nowhere" / "gpt2"))
    (other / "coco_transformer_k3").mkdir(parents=True)  # nocaps' other model, there already
    shutil.copy(root / "runs" / "coco_transformer_k3" / "coco_transformer_k3_best.safetensors",
                other / "coco_transformer_k3")
    with pytest.raises(ClipCapError, match=r"^1 row\(s\) failed: coco_mlp \(train: error: LM .*; the report "
                                           r"shows the rest: .*index.html$"):
        main(["--rows", "conceptual_mlp,coco_mlp,nocaps", "--budget_steps", "0"])
    out = capsys.readouterr().out.splitlines()
    skipped = f"conceptual_mlp: skipped: {root / 'nowhere'}/Validation_GCC-1.1.0-Validation.tsv is missing (and 2 " \
              f"more); fetch it with: CC={root / 'nowhere'} make data ROWS=conceptual_mlp"  # into the folder given
    assert skipped in out
    assert "nocaps: skipped: it needs the model of coco_mlp, which failed" in out
    rows = {row["row"]: row for row in json.loads((other / "report" / "report.json").read_text())["rows"]}
    assert [(rows[r]["status"], rows[r]["reason"].split(" (")[0]) for r in ("conceptual_mlp", "coco_mlp", "nocaps")] \
        == [("skipped", skipped.split("skipped: ", 1)[1].split(" (")[0]),
            ("failed", f"train: error: LM {root / 'nowhere' / 'gpt2'}: no such folder"), ("skipped", "coco_mlp failed")]
    assert rows["coco_mlp_frozen"]["status"] == "skipped" and rows["coco_mlp_frozen"]["reason"] == "not run"

    # CapDec reads no training image: on a COCO layout without train2014/, it runs where a Table 1 row is skipped.
    captions_only = root / "coco_without_training_images"
    captions_only.mkdir()
    shutil.copy(root / "data" / "coco" / "dataset_coco.json", captions_only)
    shutil.copytree(root / "data" / "coco" / "val2014", captions_only / "val2014")
    monkeypatch.setenv("COCO", str(captions_only))
    monkeypatch.setenv("RUNS", str(root / "runs_captions_only"))
    monkeypatch.setenv("GPT2", env["GPT2"])
    main([*options, "--rows", "coco_mlp,capdec_coco", "--budget_steps", "0"])
    out = capsys.readouterr().out
    assert f"coco_mlp: skipped: {captions_only}/train2014 is missing; fetch it with: COCO={captions_only} make data " \
           "ROWS=coco_mlp" in out
    rows = {row["row"]: row for row in json.loads((root / "runs_captions_only" / "report" / "report.json").read_text())
            ["rows"]}
    assert (rows["coco_mlp"]["status"], rows["capdec_coco"]["status"]) == ("skipped", "done")
    assert len(load_features(captions_only / "oscar_split_tiny_text_train.pkl")) == 24

    # The report in Chromium, opened from disk.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox",
                                                                               "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((root / "runs" / "report" / "index.html").as_uri())
        tables = page.locator("table")
        assert tables.first.locator("tr").count() == 1 + 3 * 6  # per Table 1 row: paper, this run, difference
        assert tables.first.locator("td.on, td.off").count() == 2 * 3  # CIDEr against the paper's +/- 1, coloured
        beyond = page.locator("h2:text-is('Beyond the paper') + p + table")
        assert beyond.locator("tr").count() == 1 + 2 * 2  # per row: no paper numbers, this run's
        assert beyond.locator("td.on, td.off").count() == 0  # nothing to colour against
        assert "none: in no paper" in beyond.inner_text()
        # loss and val CIDEr (the COCO rows), loss (CC, CapDec); three images per gallery, nocaps' two among them
        for kind, count in (("curve", 3 * 2 + 2), ("gallery", 7 * 3)):
            images = page.locator(f"img[data-kind={kind}]")
            assert images.count() == count
            widths = images.evaluate_all("images => images.map(i => i.complete ? i.naturalWidth : 0)")
            assert all(w > 0 for w in widths), (kind, widths)
        if os.environ.get("CLIPCAP_REPORT_SCREENSHOT"):
            page.screenshot(path=os.environ["CLIPCAP_REPORT_SCREENSHOT"], full_page=True,
                            clip={"x": 0, "y": 0, "width": 1200, "height": 1500})
        browser.close()
