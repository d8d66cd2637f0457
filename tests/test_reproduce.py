"""`make reproduce`'s parts: downloads from a local server, the recipes' plans and fingerprints, the rows it runs
(the paper's and those beyond it), and the one source of the paper's numbers.

The whole command runs end to end in tests/test_reproduce_end_to_end.py.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from served_data import md5, serve

from clipcap import fetch, paper
from clipcap.files import ClipCapError
from clipcap.report import collect, differences
from clipcap.reproduce import ROWS, fetch_command, parse_rows, with_dependencies
from clipcap.stages import Fingerprints, read_plan

REPO = Path(__file__).resolve().parents[1]
# The variables the recipes read: unset, each recipe plans its row's own settings.
RECIPE_VARIABLES = ("COCO", "CC", "NOCAPS", "RUNS", "CLIP", "TAG", "GPT2", "EPOCHS", "BS", "LR", "WARMUP", "K",
                    "VAL_CAPTIONS", "TOWER", "TOWER_TAG", "LM", "LORA_RANK", "NOISE", "MLP_CLIP", "MLP_TAG",
                    "TRANSFORMER_CLIP", "TRANSFORMER_TAG")


def recipe_env(**values: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in RECIPE_VARIABLES}, "GPUS": "1", "PY": "python",
            **values}


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


def test_the_rows_beyond_the_paper_run_after_table_1s_and_fetch_coco():
    assert parse_rows(None) == parse_rows("all") == list(ROWS)
    assert ROWS == tuple(row.name for row in (*paper.ROWS, *paper.EXTRA_ROWS))
    assert ROWS[-2:] == ("coco_siglip2_qwen", "capdec_coco")
    assert parse_rows("capdec_coco, coco_mlp") == ["coco_mlp", "capdec_coco"]  # in the reproduction's order
    with pytest.raises(ClipCapError, match="^--rows capdec: unknown row capdec; the rows: coco_transformer, .*, "
                                           "coco_siglip2_qwen, capdec_coco$"):
        parse_rows("capdec")
    env = recipe_env(COCO="/data/coco")
    for row in ("coco_siglip2_qwen", "capdec_coco"):
        plan = read_plan(row, env)
        assert {kind for kind, _ in plan.needs} == {"coco"}  # make data fetches COCO for them, nothing else
        assert fetch_command(plan, env) == f"COCO=/data/coco make data ROWS={row}"
        assert plan.stages == ["features", "train", "score"]


def test_the_modern_pair_recipe_plans_its_tower_language_model_and_adapters(tmp_path):
    """coco_siglip2_qwen.sh's plan: SigLIP 2 features of the three splits, Qwen2.5-0.5B with LoRA trained on them, its
    best epoch scored on test; its own variables reach the commands, the Table 1 rows' CLIP, TAG and GPT2 do not."""
    env = recipe_env(RUNS=str(tmp_path / "runs"), COCO=str(tmp_path / "coco"))
    steps = read_plan("coco_siglip2_qwen", env).steps
    features = tmp_path / "coco" / "oscar_split_google_siglip2-so400m-patch14-224"
    assert [s.script() for s in steps] == ["parse_coco.py"] * 3 + ["train.py", "evaluate.py"]
    assert all(s.flag("--clip_model_type") == "google/siglip2-so400m-patch14-224" for s in steps[:3])
    train = steps[3].text()
    for flags in (f"--data {features}_train.pkl", "--epochs 4", "--bs 40", "--gpt2 Qwen/Qwen2.5-0.5B",
                  "--lm_dtype bfloat16 --lora_rank 16 --normalize_prefix", "--lr 1e-4"):
        assert flags in train
    assert steps[3].command.count("--lr") == 1 and read_plan("coco_siglip2_qwen", {**env, "LR": "3e-4"}).stage_steps(
        "train")[0].command.count("--lr") == 1
    run = tmp_path / "runs" / "coco_siglip2_qwen"
    assert (steps[4].flag("--checkpoint"), steps[4].flag("--features")) == (
        f"{run}/coco_siglip2_qwen_best.safetensors", f"{features}_test.pkl")
    table_1 = {"CLIP": "ViT-L/14", "TAG": "L14", "GPT2": "gpt2-medium"}
    assert read_plan("coco_siglip2_qwen", {**env, **table_1}).steps == steps
    steps = read_plan("coco_siglip2_qwen", {**env, **table_1, "TOWER": "google/siglip2-base-patch16-224",
                                            "TOWER_TAG": "b16", "LM": "HuggingFaceTB/SmolLM2-360M",
                                            "LORA_RANK": "8", "EPOCHS": "2"}).steps
    assert (steps[0].flag("--clip_model_type"), steps[0].flag("--out_path")) == (
        "google/siglip2-base-patch16-224", f"{tmp_path}/coco/oscar_split_b16_train.pkl")
    assert (steps[3].flag("--epochs"), steps[3].flag("--gpt2"), steps[3].flag("--lora_rank")) == (
        "2", "HuggingFaceTB/SmolLM2-360M", "8")


def test_each_recipe_states_its_rows_settings_and_a_run_lists_what_it_changes():
    """With no variable set, each recipe's training is the settings its source states for the row (the paper's,
    CapDec's, the modern pair recipe's own): the rows the end-to-end test does not run differ from those it runs
    in these flags only. A variable set shows up in the report's list of differences."""
    for row in (*paper.ROWS, *paper.EXTRA_ROWS):
        plan = read_plan(row.name, recipe_env())
        if row.dataset == "nocaps":  # scores the COCO rows' models: no training of its own
            assert plan.stages == ["features", "score"]
            continue
        clip = next(s.flag("--clip_model_type") or s.flag("--clip_model") for s in plan.stage_steps("features"))
        assert differences(plan.stage_steps("train")[0], clip, row) == [], row.name
    changed = recipe_env(EPOCHS="2", BS="8", GPT2="/tiny/gpt2", CLIP="/tiny/clip", LM="/tiny/qwen")
    train = read_plan("coco_mlp_frozen", changed).stage_steps("train")[0]
    assert differences(train, "/tiny/clip", paper.BY_NAME["coco_mlp_frozen"]) == [
        "epochs: 2 (paper: 10)", "batch (global): 8 (paper: 40)", "LM: /tiny/gpt2 (paper: gpt2)",
        "CLIP: /tiny/clip (paper: ViT-B/32)"]
    train = read_plan("coco_siglip2_qwen", changed).stage_steps("train")[0]
    assert differences(train, "google/siglip2-so400m-patch14-224", paper.EXTRA_BY_NAME["coco_siglip2_qwen"]) == [
        "epochs: 2 (recipe: 4)", "batch (global): 8 (recipe: 40)", "LM: /tiny/qwen (recipe: Qwen/Qwen2.5-0.5B)"]
    train = read_plan("capdec_coco", recipe_env(NOISE="0")).stage_steps("train")[0]
    assert differences(train, "RN50x4", paper.EXTRA_BY_NAME["capdec_coco"]) == ["noise variance: 0.0 (CapDec: 0.016)"]


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
    assert [row["row"] for row in data["rows"]] == list(ROWS)
    for row in data["rows"]:
        source = paper.BY_NAME.get(row["row"]) or paper.EXTRA_BY_NAME[row["row"]]
        assert row["paper"] == source.scores and row["status"] == "skipped"
        assert row["beyond_paper"] == (row["row"] in paper.EXTRA_BY_NAME)
    assert [row["paper"] for row in data["rows"] if row["beyond_paper"]] == [{}, {}]  # none checked against a paper
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
