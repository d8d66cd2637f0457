"""Bad inputs to the scripts: each gives exit status 2 and one line ``error: ...`` naming the file or
flag and the problem, before any expensive step; never a traceback, never silent damage.

Most cases call a script's ``main`` in this process through ``clipcap.cli.run``, exactly as
``python SCRIPT.py`` runs it; the ``subprocess`` cases run the real scripts to prove there is no
traceback on the way out. The last tests check the guarded behaviours that do work: a resumed or
``--overwrite`` run, ``--skip_nonfinite``, and a non-numeric image id that scores.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import caption_corpus
from warm_python import warm_python

from clipcap.checkpoint import load_checkpoint, save_checkpoint, save_config
from clipcap.cli import app as cli_app
from clipcap.cli import evaluate as cli_evaluate
from clipcap.cli import predict as cli_predict
from clipcap.cli import run
from clipcap.cli import train as cli_train
from clipcap.data import load_features
from clipcap.files import ClipCapError
from clipcap.model import ClipCapConfig, build_model
from clipcap.training import epoch_batches

REPO = Path(__file__).resolve().parents[1]
MAINS = {"train": cli_train.main, "predict": cli_predict.main, "evaluate": cli_evaluate.main, "app": cli_app.main}
DIM = 16


def write_pickle(path: Path, embeddings, captions) -> str:
    with open(path, "wb") as f:
        pickle.dump({"clip_embedding": embeddings, "captions": captions}, f)
    return str(path)


def entries(n_images: int = 8, per_image: int = 2) -> list[dict]:
    corpus = caption_corpus()
    return [{"image_id": 1000 + i, "caption": corpus[(i * per_image + j) * 5], "clip_embedding": i}
            for i in range(n_images) for j in range(per_image)]


def with_caption(index: int, caption) -> list[dict]:
    captions = entries()
    captions[index] = {**captions[index], "caption": caption}
    return captions


@pytest.fixture(scope="module")
def d(tmp_path_factory, gpt2_dir) -> dict[str, str]:
    """Every input file of the cases, good and bad, made once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    g = torch.Generator().manual_seed(0)
    good = torch.randn(8, DIM, generator=g)
    nan = good.clone()
    nan[2, 3] = float("nan")
    nan[5, 0] = float("inf")
    huge = good.clone()
    huge[0] *= 1e38  # finite, but the transformer mapper turns it into a NaN loss
    files = {
        "good": write_pickle(root / "good.pkl", good, entries()),
        "nan": write_pickle(root / "nan.pkl", nan, entries()),
        "huge": write_pickle(root / "huge.pkl", huge, entries()),
        "narrow": write_pickle(root / "narrow.pkl", torch.randn(8, 8, generator=g), entries()),
        "mixed": write_pickle(root / "mixed.pkl", [[0.5] * DIM] * 7 + [[0.5] * 8], entries()),
        "string": write_pickle(root / "string.pkl", "not numbers", entries()),
        "unhashable": write_pickle(root / "unhashable.pkl", good,
                                   [{**e, "image_id": [1, 2]} if i == 3 else e for i, e in enumerate(entries())]),
        "none_caption": write_pickle(root / "none_caption.pkl", good, with_caption(4, None)),
        "int_caption": write_pickle(root / "int_caption.pkl", good, with_caption(6, 123)),
        "empty_caption": write_pickle(root / "empty_caption.pkl", good, with_caption(9, "")),
        "surrogate": write_pickle(root / "surrogate.pkl", good, with_caption(1, "a dog \ud800")),
        "no_captions": write_pickle(root / "no_captions.pkl", good, []),
        "text": str(root / "notes.txt"),
        "folder": str(root / "a_folder"),
        "gpt2": gpt2_dir,
        "root": str(root),
    }
    Path(files["text"]).write_text("not a checkpoint\n")
    Path(files["folder"]).mkdir()
    from clipcap.store import write

    nan_store = load_features(files["good"])
    nan_store.embeddings = nan
    write(nan_store, root / "nan_store", shard_rows=3)  # the bad rows land in two different shards
    files["nan_store"] = str(root / "nan_store")

    torch.manual_seed(0)
    model = build_model(ClipCapConfig(prefix_size=DIM, prefix_length=3, gpt2=gpt2_dir))
    files["pt"] = str(save_checkpoint(model, root / "model.pt"))
    save_config(model.config, root / "model.json")  # as save_checkpoint pairs it (spelled out for old code)
    files["safetensors"] = str(save_checkpoint(model, root / "model.safetensors"))
    prefix_only = build_model(ClipCapConfig(prefix_size=DIM, prefix_length=3, gpt2=gpt2_dir, only_prefix=True))
    files["prefix_only"] = str(save_checkpoint(prefix_only, root / "prefix_only.safetensors"))
    torch.save(model.state_dict(), root / "bare.pt")
    files["bare"] = str(root / "bare.pt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["clip_project.model.2.bias"][1] = float("nan")
    torch.save(state, root / "nan_weights.pt")
    (root / "nan_weights.json").write_text((root / "model.json").read_text())
    files["nan_weights"] = str(root / "nan_weights.pt")

    class Unsafe:
        def __reduce__(self):
            return (os.system, ("echo unpickled",))

    with open(root / "unsafe.pt", "wb") as f:
        pickle.dump({"model": Unsafe()}, f)
    files["unsafe"] = str(root / "unsafe.pt")
    config = json.loads((root / "model.json").read_text())
    for name, text in {"malformed": "{not json", "a_list": "[1, 2]",
                       "lstm": json.dumps({**config, "mapping_type": "lstm"}),
                       "negative": json.dumps({**config, "prefix_length": -3}),
                       "string_length": json.dumps({**config, "prefix_length": "3"}),
                       "yes": json.dumps({**config, "normalize_prefix": "yes"})}.items():
        (root / f"{name}.pt").write_bytes(Path(files["pt"]).read_bytes())
        (root / f"{name}.json").write_text(text)
        files[f"config_{name}"] = str(root / f"{name}.pt")
    files["references"] = str(root / "references.json")
    Path(files["references"]).write_text(json.dumps([{"image_id": 1, "caption": "a dog on a bench."},
                                                     {"image_id": 2, "caption": "a cat in a field."}]))
    files["results_sup2"] = str(root / "results_sup2.json")
    Path(files["results_sup2"]).write_text(json.dumps([{"image_id": "²", "caption": "a dog on a bench."},
                                                       {"image_id": 2, "caption": "a cat in a field."}]))
    return files


def train_args(d: dict[str, str], out: str, *extra: str, data: str = "good") -> list[str]:
    return ["--data", d[data], "--gpt2", d["gpt2"], "--out_dir", out, "--bs", "4", "--epochs", "1",
            "--prefix_length", "3", "--device", "cpu", "--warmup", "1", *extra]


def run_main(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """``python SCRIPT.py ARGV`` in this process: (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: MAINS[script](argv))
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, message: str) -> None:
    # progress bars ("epoch 1/1:  25%|##  | 1/4 ...", redrawn after \r) may precede the message
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not re.search(r"\d+%\|", line)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert message in lines[0], lines[0]


# Each case: (script, argv built from the files ``d`` and a fresh folder ``out``, message fragment).
CASES = {
    # training flags, refused before any work
    "bs 0": ("train", lambda d, out: train_args(d, out, "--bs", "0"), "--batch_size must be at least 1, got 0"),
    "bs -1": ("train", lambda d, out: train_args(d, out, "--bs", "-1"), "--batch_size must be at least 1, got -1"),
    "grad_accum 0": ("train", lambda d, out: train_args(d, out, "--grad_accum", "0"), "--grad_accum must be at least 1"),
    "save_every 0": ("train", lambda d, out: train_args(d, out, "--save_every", "0"), "--save_every must be at least 1"),
    "log_every 0": ("train", lambda d, out: train_args(d, out, "--log_every", "0"), "--log_every must be at least 1"),
    "save_latest_every 0": ("train", lambda d, out: train_args(d, out, "--save_latest_every", "0"),
                            "--save_latest_every must be at least 1"),
    "epochs 0": ("train", lambda d, out: train_args(d, out, "--epochs", "0"), "--epochs must be at least 1"),
    "max_steps 0": ("train", lambda d, out: train_args(d, out, "--max_steps", "0"), "--max_steps must be at least 1"),
    "prefix_length 0": ("train", lambda d, out: train_args(d, out, "--prefix_length", "0"),
                        "--prefix_length must be at least 1"),
    "prefix_length 200": ("train", lambda d, out: train_args(d, out, "--prefix_length", "200"),
                          "--prefix_length 200 leaves no room for a caption"),
    "data file missing": ("train", lambda d, out: ["--data", d["root"] + "/none.pkl", "--out_dir", out],
                          "error: {root}/none.pkl: feature file not found"),
    "gpt2 missing folder": ("train", lambda d, out: train_args(d, out, "--gpt2", d["root"] + "/no_gpt2"),
                            "no_gpt2: no such folder"),
    "gpt2 folder without tokenizer": ("train", lambda d, out: train_args(d, out, "--gpt2", d["folder"]),
                                      "a_folder: folder has no tokenizer"),
    "out_dir is a file": ("train", lambda d, out: train_args(d, d["text"]), "--out_dir {text}: not a folder"),
    "val_data of another width": ("train", lambda d, out: train_args(d, out, "--val_data", d["narrow"]),
                                  "narrow.pkl: 8-d embeddings, but the training features are 16-d"),
    # resume states that are not one
    "resume text file": ("train", lambda d, out: train_args(d, out, "--resume", d["text"]),
                         "notes.txt: unreadable resume state"),
    "resume safetensors": ("train", lambda d, out: train_args(d, out, "--resume", d["safetensors"]),
                           "model.safetensors: not a resume state of train.py"),
    "resume bare state dict": ("train", lambda d, out: train_args(d, out, "--resume", d["bare"]),
                               "bare.pt: not a resume state of train.py"),
    "resume unpicklable": ("train", lambda d, out: train_args(d, out, "--resume", d["unsafe"]),
                           "unsafe.pt: unreadable resume state"),
    # feature files
    "NaN embeddings": ("train", lambda d, out: train_args(d, out, data="nan"),
                       "nan.pkl: 2 embedding rows hold NaN or inf: rows 2, 5 (captions 4, 5, 10, 11)"),
    "NaN embeddings in a store": ("train", lambda d, out: train_args(d, out, data="nan_store"),
                                  "nan_store: 2 embedding rows hold NaN or inf: rows 2, 5"),
    "mixed widths": ("train", lambda d, out: train_args(d, out, data="mixed"), "mixed.pkl: 'clip_embedding' is not"),
    "embedding a string": ("train", lambda d, out: train_args(d, out, data="string"),
                           "string.pkl: 'clip_embedding' is not"),
    "unhashable image id": ("train", lambda d, out: train_args(d, out, data="unhashable"),
                            "unhashable.pkl: caption 3 has image_id [1, 2]"),
    "caption None": ("train", lambda d, out: train_args(d, out, data="none_caption"),
                     "none_caption.pkl: caption 4 (image id 1002) is NoneType None, not text"),
    "caption an integer": ("train", lambda d, out: train_args(d, out, data="int_caption"),
                           "int_caption.pkl: caption 6 (image id 1003) is int 123, not text"),
    "empty caption": ("train", lambda d, out: train_args(d, out, data="empty_caption"),
                      "empty_caption.pkl: caption 9 (image id 1004) is empty"),
    "lone surrogate": ("train", lambda d, out: train_args(d, out, data="surrogate"),
                       "surrogate.pkl: caption 1 (image id 1000) is not valid Unicode"),
    "zero captions": ("train", lambda d, out: train_args(d, out, data="no_captions"),
                      "no_captions.pkl: no captions to train on"),
    # checkpoints and their configs
    "non-finite weights": ("predict", lambda d, out: ["--checkpoint", d["nan_weights"], "--features", d["good"]],
                           "nan_weights.pt: weight clip_project.model.2.bias has 1 non-finite values"),
    "config malformed": ("predict", lambda d, out: ["--checkpoint", d["config_malformed"], "--features", d["good"]],
                         "malformed.json: config is not valid JSON"),
    "config a list": ("predict", lambda d, out: ["--checkpoint", d["config_a_list"], "--features", d["good"]],
                      "a_list.json: config must be a JSON object, got list"),
    "config mapping_type": ("predict", lambda d, out: ["--checkpoint", d["config_lstm"], "--features", d["good"]],
                            "lstm.json: config mapping_type must be one of"),
    "config negative prefix_length": ("predict", lambda d, out: ["--checkpoint", d["config_negative"],
                                                                 "--features", d["good"]],
                                      "negative.json: config prefix_length must be a positive integer, got -3"),
    "config prefix_length a string": ("predict", lambda d, out: ["--checkpoint", d["config_string_length"],
                                                                 "--features", d["good"]],
                                      "string_length.json: config prefix_length must be a positive integer, got '3'"),
    "config bool a string": ("predict", lambda d, out: ["--checkpoint", d["config_yes"], "--features", d["good"]],
                             "yes.json: config normalize_prefix must be a bool, got 'yes'"),
    "predict gpt2 missing folder": ("predict", lambda d, out: ["--checkpoint", d["prefix_only"], "--features",
                                                               d["good"], "--gpt2", d["root"] + "/no_gpt2"],
                                    "no_gpt2: no such folder"),
    # outputs checked before any work, and decoding settings
    "predict out a folder": ("predict", lambda d, out: ["--checkpoint", d["pt"], "--features", d["good"],
                                                        "--out", d["folder"]], "--out " + "{folder}: is a folder"),
    "predict out under a file": ("predict", lambda d, out: ["--checkpoint", d["pt"], "--features", d["good"],
                                                            "--out", d["text"] + "/x.json"], "notes.txt is not a folder"),
    "predict temperature 1e-300": ("predict", lambda d, out: ["--checkpoint", d["pt"], "--features", d["good"],
                                                              "--temperature", "1e-300"],
                                   "temperature must be at least 0.01, got 1e-300"),
    "predict seed 2**80": ("predict", lambda d, out: ["--checkpoint", d["pt"], "--features", d["good"],
                                                      "--seed", str(2**80)], "seed must be between 0 and 2**64 - 1"),
    "evaluate out a folder": ("evaluate", lambda d, out: ["--checkpoint", d["pt"], "--features", d["good"],
                                                          "--annotations", d["references"], "--out", d["folder"]],
                              "--out " + "{folder}: is a folder"),
    "evaluate per_image under a file": ("evaluate", lambda d, out: ["--results", d["results_sup2"], "--annotations",
                                                                    d["references"], "--per_image", d["text"] + "/p.json"],
                                        "--per_image"),
    "evaluate image id ²": ("evaluate", lambda d, out: ["--results", d["results_sup2"], "--annotations",
                                                        d["references"], "--metrics", "Bleu",
                                                        "--out", out + "/m.json"], "'²'"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_error(case, d, tmp_path, capsys):
    script, argv, message = CASES[case]
    code, err = run_main(script, argv(d, str(tmp_path / "out")), capsys)
    assert_one_line_error(code, err, message.format(**d))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


SUBPROCESS_CASES = ["bs 0", "data file missing", "NaN embeddings", "caption None", "config negative prefix_length",
                    "predict out a folder", "evaluate image id ²", "resume unpicklable"]
HUB_NAME = "gpt2 hub name offline"  # a real process only: offline from its start, with an empty cache


@pytest.fixture(scope="module")
def real_processes(d, tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """Each subprocess case, and HUB_NAME, run as ``python SCRIPT.py ARGV`` in a real process: case -> (exit
    status, stdout, stderr). The processes come from the warm interpreter (tests/warm_python.py), so that
    each case does not spend seconds importing torch and transformers again."""
    root = tmp_path_factory.mktemp("real_processes")
    cases = {case: CASES[case][:2] for case in SUBPROCESS_CASES}
    cases[HUB_NAME] = ("train", lambda d, out: train_args(d, out, "--gpt2", "openai-community/no-such-gpt2"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf")}  # offline, nothing cached
    results = {}
    with warm_python(root / "warm", env) as python:
        for i, (case, (script, argv)) in enumerate(cases.items()):
            folder = root / str(i)
            folder.mkdir()
            done = subprocess.run([python, str(REPO / f"{script}.py"), *argv(d, str(folder / "out"))],
                                  capture_output=True, text=True, env=env, cwd=folder, timeout=300)
            results[case] = (done.returncode, done.stdout, done.stderr)
    return results


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process_has_no_traceback(case, d, real_processes):
    status, out, err = real_processes[case]
    assert_one_line_error(status, err, CASES[case][2].format(**d))
    assert "unpickled" not in out  # nothing in the unsafe file ran


def test_gpt2_hub_name_offline_is_one_line(real_processes):
    """Offline, transformers returns an empty tokenizer for an uncached hub name: caught, named."""
    status, _, err = real_processes[HUB_NAME]
    assert_one_line_error(status, err, "LM openai-community/no-such-gpt2: no such folder")


# --------------------------------------------------------------------------- guarded runs that work


def test_fresh_run_over_another_is_refused_unless_overwrite(d, tmp_path, capsys):
    out, run = str(tmp_path / "run"), tmp_path / "run"
    MAINS["train"](train_args(d, out, "--save_original_format", "--epochs", "2", "--normalize_prefix"))
    new_run = ["--mapping_type", "transformer", "--only_prefix", "--prefix_length_clip", "2", "--num_layers", "1"]
    code, err = run_main("train", train_args(d, out, *new_run), capsys)
    assert_one_line_error(code, err, f"--out_dir {out}: holds a run with prefix 'coco_prefix'")
    MAINS["train"](train_args(d, out, "--epochs", "3", "--normalize_prefix", "--resume", out))  # continues
    MAINS["train"](train_args(d, out, *new_run, "--save_original_format", "--overwrite"))
    # epoch 0's .pt is the new run's, with its own config; epoch 1's, left from the first run, keeps its own
    assert load_checkpoint(run / "coco_prefix-000.pt").config.mapping_type == "transformer"
    old = load_checkpoint(run / "coco_prefix-001.pt")
    assert old.config.mapping_type == "mlp" and old.config.normalize_prefix
    log = [json.loads(line) for line in (run / "coco_prefix_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]  # the new run's log, not appended to the old one's three epochs


def test_nonfinite_loss_stops_before_any_checkpoint(d, tmp_path, capsys):
    args = train_args(d, str(tmp_path / "run"), "--mapping_type", "transformer", "--prefix_length_clip", "2",
                      "--num_layers", "1", "--save_latest_every", "1", data="huge")
    code, err = run_main("train", args, capsys)
    assert_one_line_error(code, err, "huge.pkl: non-finite loss at step ")
    step = int(err.split("at step ")[1].split(",")[0])
    bad = epoch_batches(16, 4, seed=0, epoch=0)[step - 1].tolist()
    assert f"captions {', '.join(map(str, bad))} (image ids" in err and "1000" in err  # image 0 overflows
    assert not list((tmp_path / "run").glob("coco_prefix-*"))  # no epoch checkpoint
    latest = tmp_path / "run" / "coco_prefix_latest.safetensors"
    if step > 1:  # the steps before were saved, finite; the bad one was not
        load_checkpoint(latest, lm=d["gpt2"])
        resumed = torch.load(tmp_path / "run" / "coco_prefix_resume.pt", weights_only=True)
        assert json.loads(resumed["state"])["global_step"] == step - 1
    else:
        assert not latest.exists()


def test_deferred_loss_check_names_the_first_bad_step(d):
    """The GPU path of LossGuard (flag kept on the device, read by check()), run on CPU tensors."""
    from clipcap.training import LossGuard, NonFiniteLoss

    features = load_features(d["good"])
    guard = LossGuard(torch.device("cpu"), skip=False, features=features, source="data.pkl")
    guard.eager = False
    batches = epoch_batches(16, 4, seed=0, epoch=0)
    for step, loss in enumerate([1.0, 2.0, float("nan"), float("inf")], start=1):
        assert guard.observe([torch.tensor(0.5), torch.tensor(loss)], step, batches[step - 1])
    with pytest.raises(NonFiniteLoss, match="data.pkl: non-finite loss at step 3, in the batch of captions "
                                            + ", ".join(map(str, batches[2].tolist()))):
        guard.check()


def test_skip_nonfinite_skips_those_batches_and_counts_them(d, tmp_path):
    args = train_args(d, str(tmp_path / "run"), "--mapping_type", "transformer", "--prefix_length_clip", "2",
                      "--num_layers", "1", "--skip_nonfinite", "--log_every", "100", data="huge")
    MAINS["train"](args)
    bad_captions = {i for i, e in enumerate(entries()) if e["clip_embedding"] == 0}
    expected = sum(bool(bad_captions & set(b.tolist())) for b in epoch_batches(16, 4, seed=0, epoch=0))
    assert expected >= 1
    log = [json.loads(line) for line in (tmp_path / "run" / "coco_prefix_log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_nonfinite"] == expected and np.isfinite(log[-1]["loss"])
    model = load_checkpoint(tmp_path / "run" / "coco_prefix-000.safetensors", lm=d["gpt2"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.java
def test_superscript_image_id_is_scored_as_text(d, tmp_path, capsys):
    """"²" passes str.isdigit but is no number: it stays an id of its own, matching itself."""
    references = tmp_path / "refs.json"
    references.write_text(json.dumps([{"image_id": "²", "caption": "a dog on a bench."},
                                      {"image_id": 2, "caption": "a cat in a field."}]))
    MAINS["evaluate"](["--results", d["results_sup2"], "--annotations", str(references),
                                 "--metrics", "Bleu", "--out", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text())["Bleu_1"] > 0.99


def test_saving_nonfinite_weights_is_refused(d, tmp_path):
    model = load_checkpoint(d["pt"])
    with torch.no_grad():
        model.clip_project.model[0].weight[0, 0] = float("nan")
    with pytest.raises(ClipCapError, match=r"m\.safetensors: weight clip_project\.model\.0\.weight has 1 non-finite"):
        save_checkpoint(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("form, message", [({"temperature": "1e-300"}, "temperature"),
                                           ({"seed": str(2**80)}, "seed")])
def test_app_refuses_bad_decoding_settings(d, clip_dir, form, message):
    from fastapi.testclient import TestClient

    from clipcap.app import create_app

    client = TestClient(create_app([d["safetensors"]], clip_model=clip_dir))
    answer = client.post("/api/caption", data={"checkpoint": d["safetensors"], "sample": "coffee",
                                               "strategy": "sample", **form})
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text


def test_feature_set_names_nonfinite_rows_of_a_store_in_chunks(d):
    """The store scan reads a chunk at a time; a chunk smaller than a shard still finds every row."""
    from clipcap.store import ShardedEmbeddings

    shards = sorted((Path(d["nan_store"]) / "shards").glob("*.npy"))
    embeddings = ShardedEmbeddings(shards)
    assert len(shards) == 3
    for chunk_bytes in (1, 2 * DIM * 2, 2**20):  # one row, two rows, everything at a time
        assert embeddings.nonfinite_rows(chunk_bytes=chunk_bytes).tolist() == [2, 5]


@pytest.mark.java
def test_evaluate_prints_the_scores_before_writing_them(d, tmp_path, capsys, monkeypatch):
    """A failure writing --out (disk full, say) cannot take the scores: they are printed first."""
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cli_evaluate, "write_scores", disk_full)
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 1, "caption": "a dog on a bench."},
                                   {"image_id": 2, "caption": "a cat in a field."}]))
    with pytest.raises(OSError, match="disk full"):
        MAINS["evaluate"](["--results", str(results), "--annotations", d["references"],
                                     "--metrics", "Bleu", "--out", str(tmp_path / "m.json")])
    assert "| 2 | 100.00 | 100.00 | 100.00 | 100.00 |" in capsys.readouterr().out
