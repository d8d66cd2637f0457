"""`make reproduce` end to end: served data fetched, every Table 1 row run through its recipe, killed and
resumed, a changed setting, the report in Chromium; and the one source of the paper's numbers.

The data (COCO, nocaps and Conceptual Captions in their published layouts, drawn shapes) is served by
a local HTTP server and fetched the way `make data` fetches it (pooch, img2dataset); the rows run with
tiny backbones, two epochs and small batches, through the real recipes, scripts and Java metrics. A
recipe that drifts from the scripts' flags, or a CLIP that is not carried from the features into the
checkpoint, fails here.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import caption_corpus
from PIL import Image, ImageDraw
from safetensors import safe_open

from clipcap import fetch, paper
from clipcap.cli.reproduce import main
from clipcap.data import load_features
from clipcap.files import ClipCapError
from clipcap.report import collect, read_metrics
from clipcap.stages import Fingerprints, read_plan

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 214)}
SHAPES = ("circle", "square")


# --------------------------------------------------------------------------- the data, as published


def draw(path: Path, k: int) -> list[str]:
    """An image of one coloured shape, and two captions naming it."""
    colour, shape = list(COLOURS)[k % 3], SHAPES[k // 3 % 2]
    image = Image.new("RGB", (48, 40), (245, 245, 240))
    box = (10, 8, 38, 32)
    (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return [f"a {colour} {shape}.", f"a {shape} that is {colour}."]


def zip_folder(folder: Path, archive: Path) -> None:
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            z.write(path, path.relative_to(folder.parent))


def publish_coco(site: Path) -> None:
    """COCO's train2014.zip and val2014.zip, and Karpathy's caption_datasets.zip (with other files beside
    dataset_coco.json)."""
    work, images = site / "work", []
    for k, split in enumerate(["train"] * 10 + ["restval"] * 2 + ["val"] * 4 + ["test"] * 4):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        name = f"COCO_{folder}_{k + 1:012d}.jpg"
        captions = draw(work / folder / name, k)
        images.append({"filepath": folder, "filename": name, "cocoid": k + 1, "split": split,
                       "sentences": [{"raw": c, "sentid": 2 * k + j} for j, c in enumerate(captions)]})
    (site / "coco").mkdir(parents=True)
    for folder in ("train2014", "val2014"):
        zip_folder(work / folder, site / "coco" / f"{folder}.zip")
    (work / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    (work / "dataset_flickr8k.json").write_text("{}")
    with zipfile.ZipFile(site / "coco" / "caption_datasets.zip", "w") as z:
        for name in ("dataset_coco.json", "dataset_flickr8k.json"):
            z.write(work / name, name)
    shutil.rmtree(work)


def publish_nocaps(site: Path, base: str) -> None:
    """nocaps_val_4500_captions.json: COCO format, a domain per image, ten references each, images by coco_url."""
    domains = ["in-domain", "near-domain", "out-domain"]
    images, annotations = [], []
    for k in range(6):
        name = f"{k:016x}.jpg"
        captions = draw(site / "nocaps" / "val" / name, k)
        images.append({"id": k, "file_name": name, "open_images_id": f"{k:016x}", "domain": domains[k % 3],
                       "coco_url": f"{base}/nocaps/val/{name}", "height": 40, "width": 48})
        annotations += [{"image_id": k, "caption": captions[j % 2], "id": 10 * k + j} for j in range(10)]
    (site / "nocaps" / "nocaps_val_4500_captions.json").write_text(json.dumps({"images": images,
                                                                               "annotations": annotations}))


def publish_conceptual(site: Path, base: str) -> None:
    """Google's two TSVs (caption TAB url, no header); the images at their URLs, the last of each split vanished."""
    for split, tsv, n in (("train", "Train_GCC-training.tsv", 12), ("val", "Validation_GCC-1.1.0-Validation.tsv", 5)):
        lines = []
        for row in range(n):
            path = site / "cc" / split / f"{row:08d}.jpg"
            caption = draw(path, row + (0 if split == "train" else 1))[0]
            if row == n - 1:
                path.unlink()  # a URL that no longer answers
            lines.append(f"{caption}\t{base}/cc/{split}/{row:08d}.jpg")
        (site / "cc" / tsv).write_text("\n".join(lines) + "\n")


class Site(http.server.SimpleHTTPRequestHandler):
    """Serves the site's folder, records each request, and cuts the paths in ``broken`` off halfway."""

    requests: list[str]
    broken: set[str]

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.path in self.broken:
            data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def serve(folder: Path):
    """A local HTTP server for ``folder``: yields its base URL, the requests it answered and the broken paths."""
    requests, broken = [], set()
    handler = functools.partial(type("Handler", (Site,), {"requests": requests, "broken": broken}),
                                directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests, broken
    finally:
        server.shutdown()
        server.server_close()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- downloads


def test_an_interrupted_download_leaves_nothing_and_the_next_one_completes(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "big.bin").write_bytes(os.urandom(300_000))
    with serve(tmp_path / "site") as (base, requests, broken):
        broken.add("/big.bin")
        target = tmp_path / "data" / "big.bin"
        with pytest.raises(ClipCapError, match=r"big\.bin from .*: download failed .*nothing was kept: fetch again"):
            fetch.download(f"{base}/big.bin", target, progress=False)
        assert not target.exists() and list(target.parent.iterdir()) == []
        broken.clear()
        fetch.download(f"{base}/big.bin", target, md5(tmp_path / "site" / "big.bin"), progress=False)
        assert target.read_bytes() == (tmp_path / "site" / "big.bin").read_bytes()
        fetch.download(f"{base}/big.bin", target, md5(target), progress=False)
        assert requests == ["/big.bin", "/big.bin"]  # a complete, verified file is not fetched again


def test_a_download_with_the_wrong_checksum_is_removed_and_data_put_there_by_hand_is_kept(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "train2014.zip").write_bytes(b"not what COCO published")
    coco = tmp_path / "coco"
    with serve(tmp_path / "site") as (base, requests, _):
        remote = fetch.Remote("train2014.zip", f"{base}/train2014.zip", "train2014", "0" * 32, ())
        with pytest.raises(ClipCapError, match=r"train2014\.zip from .*: the checksum does not match \(expected "
                                               r"MD5 0{32}\); the file was removed"):
            fetch.fetch_remote(remote, coco)
        assert not (coco / "train2014.zip").exists() and not fetch.is_done(coco, "train2014.zip", "train2014")
        (coco / "val2014").mkdir()
        fetch.fetch_remote(fetch.Remote("val2014.zip", f"{base}/val2014.zip", "val2014", "0" * 32, ()), coco)
        assert requests == ["/train2014.zip"] and fetch.is_done(coco, "val2014.zip", "val2014")


def test_released_weights_are_fetched_once_and_checked(tmp_path, gpt2_dir, monkeypatch):
    from clipcap.checkpoint import read_checkpoint, save_checkpoint
    from clipcap.model import ClipCapConfig, build_model

    site = tmp_path / "site"
    site.mkdir()
    save_checkpoint(build_model(ClipCapConfig(gpt2=gpt2_dir, prefix_size=16, prefix_length=2)), site / "w.pt")
    (site / "quota.html").write_text("<html>Too many users have viewed or downloaded this file recently</html>")
    with serve(site) as (base, requests, _):
        monkeypatch.setattr(fetch, "WEIGHTS", {"coco_weights.pt": f"{base}/w.pt",
                                               "conceptual_weights.pt": f"{base}/quota.html"})
        folder = tmp_path / "weights"
        assert fetch.fetch_weights(folder, ["coco_weights.pt"]) == [folder / "coco_weights.pt"]
        assert read_checkpoint(folder / "coco_weights.pt")[0].keys() == read_checkpoint(site / "w.pt")[0].keys()
        fetch.fetch_weights(folder, ["coco_weights.pt"])
        assert requests.count("/w.pt") == 1
        with pytest.raises(ClipCapError, match="conceptual_weights.pt from .*: what came is not the checkpoint .*"
                                               "it was removed. Google Drive answers with a page"):
            fetch.fetch_weights(folder, ["conceptual_weights.pt"])
        assert not (folder / "conceptual_weights.pt").exists()


# --------------------------------------------------------------------------- plans and fingerprints


def test_recipe_plans_use_torchrun_across_gpus_and_split_the_global_batch():
    env = {**os.environ, "GPUS": "2", "BS": "40", "PY": "python"}
    train = read_plan("coco_mlp", env).stage_steps("train")[0]
    assert train.command[:6] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert train.flag("--bs") == "20"
    assert all(s.command[1:3] == ["-m", "torch.distributed.run"] for s in read_plan("coco_mlp", env).steps
               if s.stage in ("features", "train"))
    assert read_plan("coco_mlp", env).stage_steps("score")[0].command[:2] == ["python", "evaluate.py"]
    assert read_plan("coco_mlp", {**env, "GPUS": "1"}).stage_steps("train")[0].command[:2] == ["python", "train.py"]
    with pytest.raises(ClipCapError, match="recipes/coco_mlp.sh: BS=5 .* does not split evenly over GPUS=2"):
        read_plan("coco_mlp", {**env, "BS": "5"})
    run = subprocess.run(["bash", "recipes/coco_mlp.sh", "bogus"], cwd=REPO, capture_output=True, text=True, env=env)
    assert run.returncode == 2 and run.stderr == "error: coco_mlp has no stage 'bogus' (its stages: features train " \
                                                 "score; or plan)\n"
    run = subprocess.run(["bash", "recipes/nocaps.sh"], cwd=REPO, capture_output=True, text=True,
                         env={**env, "NOCAPS": "/nowhere"})
    assert run.stderr == "error: /nowhere/nocaps_val_4500_captions.json is missing: fetch it with 'make data " \
                         "ROWS=nocaps' (data/README.md)\n"


def test_a_changed_setting_changes_the_fingerprints_of_what_depends_on_it():
    base = {**os.environ, "GPUS": "1", "PY": "python"}

    def prints(**env):
        plans = {row: read_plan(row, {**base, **env}) for row in ("coco_mlp", "coco_transformer", "nocaps")}
        fingerprints = Fingerprints(plans, plans)
        return {(row, step.stage, i): fingerprints(row, i) for row, plan in plans.items()
                for i, step in enumerate(plan.steps)}

    before, epochs, clip = prints(), prints(EPOCHS="3"), prints(CLIP="ViT-L/14")
    changed = lambda other: {key[:2] for key in before if before[key] != other[key]}  # noqa: E731
    assert changed(prints(PY="/elsewhere/python")) == set()  # the interpreter changes no result
    assert changed(epochs) == {("coco_mlp", "train"), ("coco_mlp", "score"), ("coco_transformer", "train"),
                               ("coco_transformer", "score"), ("nocaps", "score")}  # nocaps scores their models
    assert changed(clip) == {(row, stage) for row in ("coco_mlp", "coco_transformer")
                             for stage in ("features", "train", "score")} | {("nocaps", "score")}


def test_nocaps_scores_the_transformer_runs_that_coco_transformer_left(tmp_path):
    """nocaps.sh needs no K of its own: it scores the runs coco_transformer.sh wrote, whatever their K."""
    env = {**{k: v for k, v in os.environ.items() if k != "K"}, "GPUS": "1", "PY": "python", "RUNS": str(tmp_path)}

    def scored(**more):
        return [s.flag("--checkpoint") for s in read_plan("nocaps", {**env, **more}).stage_steps("score")]

    mlp, k10 = (f"{tmp_path}/{run}/{run}_best.safetensors" for run in ("coco_mlp", "coco_transformer_k10"))
    assert scored() == [mlp, k10]  # none yet: the run coco_transformer.sh makes by default
    (tmp_path / "coco_transformer_k40").mkdir()
    assert scored() == [mlp, f"{tmp_path}/coco_transformer_k40/coco_transformer_k40_best.safetensors"]
    assert scored(K="10") == [mlp, k10]


def test_a_row_brings_along_the_rows_whose_models_it_needs(tmp_path, capsys):
    from clipcap.reproduce import ROWS, with_dependencies

    env = {**os.environ, "GPUS": "1", "PY": "python", "RUNS": str(tmp_path)}
    plans = {row: read_plan(row, env) for row in ROWS}
    assert with_dependencies(["nocaps"], plans) == ["coco_transformer", "coco_mlp", "nocaps"]
    assert capsys.readouterr().out.splitlines() == [
        f"nocaps needs {tmp_path}/coco_mlp/coco_mlp_best.safetensors, which coco_mlp makes: running coco_mlp too",
        f"nocaps needs {tmp_path}/coco_transformer_k10/coco_transformer_k10_best.safetensors, which coco_transformer "
        "makes: running coco_transformer too"]
    (tmp_path / "coco_mlp").mkdir()
    (tmp_path / "coco_mlp" / "coco_mlp_best.safetensors").touch()  # a model that is there is used as it is
    assert with_dependencies(["nocaps"], plans) == ["coco_transformer", "nocaps"]


def test_the_modern_pair_recipe_plans_its_tower_language_model_and_adapters(tmp_path):
    """coco_siglip2_qwen.sh's plan: SigLIP 2 features of the three splits, Qwen2.5-0.5B with LoRA trained on them, its
    best epoch scored on test; and the environment's overrides reach the commands."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("CLIP", "TAG", "GPT2", "EPOCHS", "BS", "LR")},
           "GPUS": "1", "PY": "python", "RUNS": str(tmp_path / "runs"), "COCO": str(tmp_path / "coco")}
    steps = read_plan("coco_siglip2_qwen", env).steps
    features = tmp_path / "coco" / "oscar_split_google_siglip2-so400m-patch14-224"
    assert [s.script() for s in steps] == ["parse_coco.py"] * 3 + ["train.py", "evaluate.py"]
    assert all(s.flag("--clip_model_type") == "google/siglip2-so400m-patch14-224" for s in steps[:3])
    train = steps[3].text()
    for flags in (f"--data {features}_train.pkl", "--epochs 4", "--bs 40", "--gpt2 Qwen/Qwen2.5-0.5B",
                  "--lm_dtype bfloat16 --lora_rank 16 --lr 1e-4 --normalize_prefix"):
        assert flags in train
    run = tmp_path / "runs" / "coco_siglip2_qwen"
    assert (steps[4].flag("--checkpoint"), steps[4].flag("--features")) == (
        f"{run}/coco_siglip2_qwen_best.safetensors", f"{features}_test.pkl")
    steps = read_plan("coco_siglip2_qwen", {**env, "GPT2": "HuggingFaceTB/SmolLM2-360M", "LORA_RANK": "8",
                                            "EPOCHS": "2"}).steps
    assert (steps[3].flag("--epochs"), steps[3].flag("--gpt2"), steps[3].flag("--lora_rank")) == (
        "2", "HuggingFaceTB/SmolLM2-360M", "8")


# --------------------------------------------------------------------------- the paper's numbers


def readme_tables() -> list[list[list[str]]]:
    """The markdown tables of the README's section on Table 1."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Reproducing the paper's Table 1"):]
    section = section[:section.index("\n## ", 5)]
    tables, current = [], []
    for line in section.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_report_readme_and_recipes_state_the_papers_numbers_exactly(tmp_path):
    data = collect({"rows": {}}, tmp_path)
    assert [row["row"] for row in data["rows"]] == [row.name for row in paper.ROWS]
    for row in data["rows"]:
        assert row["paper"] == paper.BY_NAME[row["row"]].scores and row["status"] == "skipped"
    tables = {tuple(t[0]): t[1:] for t in readme_tables() if t[0][0] == "Table 1 row"}
    stated = {}
    for header, rows in tables.items():
        for cells in rows:
            recipe = re.search(r"recipes/(\w+)\.sh", cells[-1])[1]
            if recipe == "nocaps":
                model = "coco_mlp" if "MLP" in cells[0] else "coco_transformer"
                for domain, cell in zip(("in-domain", "near-domain", "out-domain", "entire"), cells[1:5]):
                    cider, spice = (float(v.rstrip("*")) for v in cell.split(" / "))
                    stated.setdefault("nocaps", {}).setdefault(model, {})[domain] = {"CIDEr": cider, "SPICE": spice}
            else:
                names = [{v: k for k, v in paper.METRIC_LABELS.items()}.get(h) for h in header]
                stated[recipe] = {name: float(cell) for name, cell in zip(names, cells) if name and cell}
    assert stated.keys() == paper.BY_NAME.keys()
    for name, row in paper.BY_NAME.items():
        expected = row.scores if name == "nocaps" else {k: v for k, v in row.scores.items()
                                                         if k in paper.METRICS}
        assert stated[name] == expected, name
    for recipe in REPO.glob("recipes/*.sh"):  # the headers' "Paper:" lines, where a recipe has one
        header = recipe.read_text().split("set -euo")[0]
        row = paper.BY_NAME.get(recipe.stem)
        for label, value in re.findall(r"(B@4|METEOR|CIDEr|SPICE|ROUGE-L) (\d+\.\d+)", header):
            name = {v: k for k, v in paper.METRIC_LABELS.items()}[label]
            assert row.scores[name] == float(value), (recipe.name, label)
        for cider, spice in re.findall(r"(\d+\.\d+) / (\d+\.\d+)", header):
            assert {"CIDEr": float(cider), "SPICE": float(spice)} in [d["entire"] for d in row.scores.values()]


# --------------------------------------------------------------------------- the whole command


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, gpt2_dir):
    """The published data fetched into data folders as `make data` does, and the environment that points the
    recipes at it: one tiny CLIP (with a tokenizer, for CLIPScore) for every row, a tiny GPT-2, 2 epochs."""
    from testing.tiny import make_tiny_clip

    root = tmp_path_factory.mktemp("reproduce")
    site = root / "site"
    clip = str(make_tiny_clip(root / "clip", corpus=caption_corpus()))
    env = {"PY": sys.executable, "COCO": str(root / "data" / "coco"), "CC": str(root / "data" / "conceptual"),
           "NOCAPS": str(root / "data" / "nocaps"), "RUNS": str(root / "runs"), "GPT2": gpt2_dir, "CLIP": clip,
           "TAG": "tiny", "MLP_CLIP": clip, "MLP_TAG": "tiny", "TRANSFORMER_CLIP": clip, "TRANSFORMER_TAG": "tiny",
           "EPOCHS": "2", "BS": "4", "VAL_CAPTIONS": "4", "K": "3", "LR": "3e-3", "WARMUP": "2", "GPUS": "1",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ROWS": "all"}
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
        hidden = site / "nocaps" / "val" / "0000000000000005.jpg"
        hidden.rename(site / "hidden.jpg")  # unavailable on the first try
        main(["--fetch_only", "--download_processes", "1", "--download_threads", "4"])
        failed = json.loads((root / "data" / "nocaps" / ".fetched" / "val_failed.json").read_text())
        assert list(failed) == [f"{base}/nocaps/val/0000000000000005.jpg"]
        (site / "hidden.jpg").rename(hidden)
        before = len(requests)
        main(["--fetch_only", "--download_processes", "1", "--download_threads", "4"])
        assert requests[before:] == ["/nocaps/val/0000000000000005.jpg"]  # only what failed is fetched again
    return root, env


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
@pytest.mark.timeout(2400)
def test_reproduce_runs_every_row_resumes_after_a_kill_and_reports(workspace, capsys, monkeypatch):
    """Then the report opened from disk in Chromium: the table, the curves and the gallery's images load.
    CLIPCAP_REPORT_SCREENSHOT=PATH saves a picture of it (the README's docs/reproduce_report.png)."""
    if CHROMIUM is None:
        pytest.skip("needs Chromium (Debian package chromium)")
    root, env = workspace
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    clip = env["CLIP"]
    options = ["--budget_steps", "2", "--gallery", "3", "--clipscore_model", clip]

    main([*options, "--dry_run", "--rows", "coco_mlp,conceptual_mlp"])  # the plan and the projected time; nothing runs
    out = capsys.readouterr().out
    assert "coco_mlp: features to run; train to run; score to run; gallery to run" in out
    assert re.search(r"coco_mlp +[\d.]+ s/step +6 steps/epoch x 2 epochs on 1 process", out)  # 24 captions, batch 4
    assert re.search(r"conceptual_mlp +[\d.]+ s/step +3 steps/epoch", out)  # the TSV's 12 rows, batch 4
    assert not (root / "runs").exists()

    # The installed command, killed once the first row's training has saved an epoch.
    first = root / "runs" / "coco_transformer_k3"
    process = subprocess.Popen([str(Path(sys.executable).with_name("clipcap-reproduce")), *options[2:],
                                "--budget_steps", "0"], env={**os.environ, **env}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=open(root / "killed.err", "w"))
    deadline = time.time() + 900
    while not (first / "coco_transformer_k3_resume.pt").exists():
        assert process.poll() is None, (root / "killed.err").read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    main(options)
    out = capsys.readouterr().out
    assert "coco_transformer: features done; train resume; score to run; gallery to run" in out
    assert "coco_mlp: features done; train to run" in out  # the features all COCO rows share, made once
    assert "coco_transformer train: done" in out and "Traceback" not in out

    report = json.loads((root / "runs" / "report" / "report.json").read_text())
    rows = {row["row"]: row for row in report["rows"]}
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(rows, "done")
    runs = {"coco_mlp": ("coco_mlp", "coco_mlp_best", False), "coco_mlp_frozen": ("coco_mlp_frozen", None, True),
            "coco_transformer": ("coco_transformer_k3", None, True),
            "coco_transformer_tuned": ("coco_transformer_tuned_k3", None, False),
            "conceptual_mlp": ("conceptual_mlp", "conceptual_mlp-001", False),
            "conceptual_transformer": ("conceptual_transformer_k3", "conceptual_transformer_k3-001", True)}
    for row, (run, best, only_prefix) in runs.items():
        folder = root / "runs" / run
        metrics = json.loads((folder / "metrics.json").read_text())
        assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(metrics)
        assert rows[row]["ours"] == read_metrics(folder / "metrics.json")
        assert rows[row]["paper"] == paper.BY_NAME[row].scores
        assert rows[row]["difference"]["CIDEr"] == round(rows[row]["ours"]["CIDEr"] - rows[row]["paper"]["CIDEr"], 2)
        scored = json.loads(next(folder.glob("captions_*.json")).read_text())
        assert len(scored) == 4  # CC: of the 5 validation images, the 4 that downloaded
        with safe_open(str(folder / f"{best or run + '_best'}.safetensors"), framework="pt") as f:
            config = json.loads(f.metadata()["clipcap_config"])
        assert config["clip_model"] == clip  # the features' CLIP, recorded without a flag
        assert config["only_prefix"] is only_prefix
        assert config["mapping_type"] == ("transformer" if "transformer" in row else "mlp")
        assert [e["epoch"] for e in rows[row]["epochs"]] == [1, 2] and len(rows[row]["loss"]) >= 2
        assert rows[row]["chosen_epoch"] in (1, 2) if row.startswith("coco") else rows[row]["chosen_epoch"] == 2
        assert "epochs: 2 (paper: 10)" in rows[row]["differences_from_paper"]
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

    # The report in Chromium, opened from disk.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox",
                                                                               "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((root / "runs" / "report" / "index.html").as_uri())
        assert page.locator("table").first.locator("tr").count() == 1 + 3 * 6  # per row: paper, this run, difference
        assert page.locator("td.on, td.off").count() == 2 * 6  # CIDEr against the paper's +/- 1, coloured
        for kind, count in (("curve", 4 * 2 + 2), ("gallery", 8 * 3)):  # loss and val CIDEr (COCO), loss (CC)
            images = page.locator(f"img[data-kind={kind}]")
            assert images.count() == count
            widths = images.evaluate_all("images => images.map(i => i.complete ? i.naturalWidth : 0)")
            assert all(w > 0 for w in widths), (kind, widths)
        if os.environ.get("CLIPCAP_REPORT_SCREENSHOT"):
            page.screenshot(path=os.environ["CLIPCAP_REPORT_SCREENSHOT"], full_page=True,
                            clip={"x": 0, "y": 0, "width": 1200, "height": 1500})
        browser.close()


# --------------------------------------------------------------------------- recipes beyond Table 1


@pytest.mark.java
def test_capdec_recipe_trains_on_captions_alone_and_scores_the_test_images(workspace, tmp_path):
    """CapDec's COCO row (beyond Table 1: its recipe runs alone) on a copy of the COCO layout without its train
    images: their captions are all it reads of them. The workspace's tiny CLIP has a tokenizer for its text tower."""
    root, env = workspace
    coco = tmp_path / "coco"
    coco.mkdir()
    shutil.copy(root / "data" / "coco" / "dataset_coco.json", coco)
    shutil.copytree(root / "data" / "coco" / "val2014", coco / "val2014")
    done = subprocess.run(["bash", str(REPO / "recipes" / "capdec_coco.sh")], capture_output=True, text=True,
                          env={**os.environ, **env, "COCO": str(coco), "RUNS": str(tmp_path / "runs")}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    clip = env["CLIP"]
    text = load_features(coco / "oscar_split_tiny_text_train.pkl")
    assert text.modality == "text" and len(text) == 24 and text.clip_model == clip  # train + restval, 2 captions each
    run = tmp_path / "runs" / "capdec_coco"
    with safe_open(str(run / "capdec_coco-001.safetensors"), framework="pt") as f:
        config = json.loads(f.metadata()["clipcap_config"])
    assert (config["noise_variance"], config["normalize_prefix"], config["clip_model"]) == (0.016, True, clip)
    assert (config["mapping_type"], config["prefix_length"], config["only_prefix"]) == ("transformer", 3, False)
    assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(json.loads((run / "metrics.json").read_text()))
    assert len(json.loads((run / "captions_test.json").read_text())) == 4
