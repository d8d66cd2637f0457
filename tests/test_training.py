"""The training loop end to end: learning, resume, processes, accumulation, precision, the CLI."""
import functools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import caption_corpus, write_feature_pickle
from safetensors.torch import load_file
from torchrun_worker import nan_batch_at
from warm_python import warm_python

from clipcap import training
from clipcap.checkpoint import load_checkpoint
from clipcap.cli import run as run_command
from clipcap.cli.predict import main as predict
from clipcap.cli.train import main as train_command
from clipcap.data import CaptionDataset, load_features
from clipcap.decoding import DecodingOptions, caption_embeddings
from clipcap.files import ClipCapError
from clipcap.model import ClipCapConfig, build_model, load_tokenizer
from clipcap.runtime import Processes
from clipcap.training import TrainConfig, pick_precision, train
from testing.tiny import make_tiny_gpt2

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def no_dropout_gpt2(tmp_path_factory):
    """Without dropout, runs that split the same batch differently must agree exactly."""
    return str(make_tiny_gpt2(tmp_path_factory.mktemp("gpt2_nodrop"), caption_corpus(), dropout=0.0))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    corpus = caption_corpus()
    path = tmp_path_factory.mktemp("data") / "train.pkl"
    return str(write_feature_pickle(path, [[corpus[i * 9], corpus[i * 9 + 4]] for i in range(12)]))


def run(tmp_path, data, gpt2, name="run", **overrides):
    """train() with small settings; ``overrides`` name fields of the run or of the model."""
    cfg = dict(data=data, out_dir=str(tmp_path / name), gpt2=gpt2, batch_size=4, epochs=2, warmup=2, lr=1e-3,
               prefix_length=3, num_workers=0, log_every=1)
    cfg.update(overrides)
    model = {k: cfg.pop(k) for k in list(cfg) if k in ClipCapConfig.__dataclass_fields__ and k != "clip_model"}
    return train(TrainConfig(model=ClipCapConfig(**model), **cfg))


def weights(path):
    return load_file(path)


def assert_same_weights(a, b, **tol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], msg=k, **tol)


def test_learns_and_reproduces_training_captions(tmp_path, capsys):
    """Loss falls at least tenfold, then greedy decoding gives back every training caption. With the
    default --warmup of 5,000 steps: on a run of 108 it is capped at a tenth, or nothing is learned."""
    corpus = caption_corpus()
    captions = [corpus[i * 13] for i in range(8)] + ["a dog on a bench! a cat in a field."]  # "!" is learned
    gpt2 = str(make_tiny_gpt2(tmp_path / "gpt2", corpus, n_embd=64))
    data = str(write_feature_pickle(tmp_path / "train.pkl", [[c] * 8 for c in captions]))
    result = run(tmp_path, data, gpt2, batch_size=8, epochs=12, lr=3e-3, warmup=TrainConfig.warmup, prefix_length=4,
                 save_every=100, log_every=5)
    assert "warm-up: 10 steps, a tenth of this run's 108 (--warmup 5000 would" in capsys.readouterr().out
    losses = [r["loss"] for r in result["history"]]
    assert losses[-1] < losses[0] / 10, losses
    model = load_checkpoint(result["checkpoint"])
    features = load_features(data)
    embeds = features.embeddings_at(np.arange(len(captions)))
    generated = [c[0] for c in caption_embeddings(model, load_tokenizer(gpt2), embeds, DecodingOptions("greedy"))]
    assert generated == captions
    assert Path(result["loss_plot"]).stat().st_size > 1000
    log = [json.loads(line) for line in Path(result["log"]).read_text().splitlines()]
    assert {"loss", "lr", "samples_per_s", "tokens_per_s"} <= log[0].keys()


def test_resume_ends_with_the_same_weights(tmp_path, small_data, gpt2_dir):
    """Stopped mid-epoch and resumed, a run (with dropout) ends exactly where an uninterrupted one does."""
    whole = run(tmp_path, small_data, gpt2_dir, "whole", epochs=3)
    first = run(tmp_path, small_data, gpt2_dir, "parts", epochs=3, max_steps=4)
    assert not first["finished"] and Path(first["resume"]).is_file()
    second = run(tmp_path, small_data, gpt2_dir, "parts", epochs=3, resume=str(tmp_path / "parts"))
    assert second["finished"]
    assert_same_weights(whole["checkpoint"], second["checkpoint"], rtol=0, atol=0)
    assert [r["loss"] for r in second["history"]] == pytest.approx([r["loss"] for r in whole["history"]])


def one_line_error(argv, capsys):
    """train.py's exit status 2 and its one line ``error: ...``, as ``clipcap.cli.run`` prints them."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        run_command(lambda: train_command(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert done.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resume_alone_continues_the_run_and_logs_each_step_once(tmp_path, small_data, gpt2_dir, monkeypatch):
    """Killed after logging a step past its last resume state, a run continued with ``--resume DIR`` alone,
    from another folder, ends with the weights of the uninterrupted run (dropout on), and its JSONL and
    TensorBoard logs hold each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    whole = run(tmp_path, small_data, gpt2_dir, "whole", prefix="photos", seed=7, save_latest_every=2)
    (tmp_path / "start").mkdir()
    monkeypatch.chdir(tmp_path / "start")  # the data path is relative to where the run started
    argv = ["--data", os.path.relpath(small_data), "--out_dir", "../parts", "--gpt2", gpt2_dir, "--prefix", "photos",
            "--bs", "4", "--epochs", "2", "--warmup", "2", "--lr", "1e-3", "--prefix_length", "3", "--seed", "7",
            "--log_every", "1", "--save_latest_every", "2"]
    scalars = training.RunLog.scalars

    def killed_after_step_5(log, record):
        scalars(log, record)
        if record["step"] == 5:  # logged; the last resume state is step 4's
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(training.RunLog, "scalars", killed_after_step_5)
        with pytest.raises(KeyboardInterrupt):
            train_command(argv)
    monkeypatch.chdir(tmp_path)
    # A later run is a later process; within this one, TensorBoard orders two event files of one second by a
    # counter that sorts as text (".9" after ".10"): give the resumed run's file a later second.
    now = time.time
    monkeypatch.setattr(time, "time", lambda: now() + 2)
    resumed = train_command(["--resume", "parts"])
    assert resumed["finished"] and Path(resumed["checkpoint"]).name == "photos-001.safetensors"
    assert_same_weights(whole["checkpoint"], resumed["checkpoint"], rtol=0, atol=0)
    log = [json.loads(line) for line in (tmp_path / "parts" / "photos_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [r["step"] for r in whole["history"]] == list(range(1, 13))
    assert [r["loss"] for r in log] == [r["loss"] for r in whole["history"]]
    events = EventAccumulator(str(tmp_path / "parts" / "tensorboard" / "photos")).Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 13))


def test_resume_refuses_what_would_make_another_run(tmp_path, small_data, gpt2_dir, capsys):
    """A changed setting is one line naming old and new; where and how long it runs may change."""
    out = tmp_path / "a"
    other = write_feature_pickle(tmp_path / "other.pkl", [["a dog on a bench."] * 2] * 12)
    train_command(["--data", small_data, "--out_dir", str(out), "--gpt2", gpt2_dir, "--bs", "4", "--epochs", "2",
                   "--warmup", "2", "--prefix_length", "3", "--max_steps", "1"])
    state = f"the run being resumed ({out / 'coco_prefix_resume.pt'})"
    for flags, message in [(["--prefix_length", "5"], f"--prefix_length 5: {state} has 3; a resumed run keeps its"),
                           (["--lr", "0.1"], f"--lr 0.1: {state} has 2e-05"),
                           (["--only_prefix"], f"--only_prefix True: {state} has False"),
                           (["--data", str(other)], f"--data {other}: {state} has {small_data}"),
                           (["--epochs", "1"], f"--epochs 1: {state} has 2; a resumed run may get more epochs"),
                           (["--bs", "2"], "global batch 2 (1 process(es) x --batch_size 2 x --grad_accum 1), but "
                                           f"{state} has 4")]:
        assert message in one_line_error(["--resume", str(out), *flags], capsys)
    # a second run in the folder: --resume names which
    train_command(["--data", small_data, "--out_dir", str(out), "--gpt2", gpt2_dir, "--bs", "4", "--prefix", "b",
                   "--prefix_length", "3", "--max_steps", "1"])
    assert f"continue with --resume {out / 'b_resume.pt'}" in capsys.readouterr().out
    assert one_line_error(["--resume", str(out)], capsys) == (
        f"error: {out}: holds the resume states of several runs (b_resume.pt, coco_prefix_resume.pt); "
        "pass --prefix to name one")
    result = train_command(["--resume", str(out), "--prefix", "coco_prefix", "--epochs", "3", "--bs", "2",
                            "--grad_accum", "2", "--log_every", "4"])
    assert result["finished"] and [r["step"] for r in result["history"]] == [4, 6, 8, 12, 16, 18]

def test_gradient_accumulation_equals_the_bigger_batch(tmp_path, small_data, no_dropout_gpt2):
    big = run(tmp_path, small_data, no_dropout_gpt2, "big", batch_size=4)
    accumulated = run(tmp_path, small_data, no_dropout_gpt2, "acc", batch_size=2, grad_accum=2, num_workers=2)  # same batches
    assert_same_weights(big["checkpoint"], accumulated["checkpoint"], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory):
    """tests/torchrun_worker.py (train.py's command) in 2 CPU processes (gloo), launched as torchrun launches
    them (tests/forked_torchrun.py, from a warm interpreter); returns the finished launch."""
    base = {**os.environ, "OMP_NUM_THREADS": "1"}
    with warm_python(tmp_path_factory.mktemp("warm"), base) as python:
        def launch(*flags, env=None):
            command = [python, str(REPO / "tests" / "forked_torchrun.py"), "--nproc_per_node", "2",
                       str(REPO / "tests" / "torchrun_worker.py"), *flags]
            return subprocess.run(command, capture_output=True, text=True, env={**base, **(env or {})}, timeout=300)

        yield launch


def ddp_flags(data, gpt2):
    return ["--data", data, "--gpt2", gpt2, "--bs", "2", "--epochs", "2", "--warmup", "2", "--lr", "1e-3",
            "--prefix_length", "3", "--log_every", "1", "--device", "cpu"]


def each_process(folder):
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


@pytest.mark.distributed
def test_two_processes_equal_one_also_when_one_skips_a_nonfinite_step(tmp_path, small_data, no_dropout_gpt2,
                                                                      monkeypatch, torchrun):
    """torchrun with 2 CPU processes (gloo) and bs 2 gives the weights of 1 process with bs 4. At step 3 the
    second process alone has a NaN loss: with --skip_nonfinite both skip that step (one process skips it
    too) and the processes end identical."""
    with monkeypatch.context() as m:
        m.setattr(training, "train_step", nan_batch_at(3))
        one = run(tmp_path, small_data, no_dropout_gpt2, "one", batch_size=4, skip_nonfinite=True)
    two = tmp_path / "two"
    done = torchrun(*ddp_flags(small_data, no_dropout_gpt2), "--out_dir", str(two), "--skip_nonfinite",
                    env={"CLIPCAP_TEST_NAN": "1:3"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) x batch 2" in done.stderr + done.stdout
    assert "rank 0: process group left" in done.stdout and "rank 1: process group left" in done.stdout
    assert_same_weights(one["checkpoint"], two / "coco_prefix-001.safetensors", rtol=1e-5, atol=1e-6)
    first, second = each_process(two)
    for key, tensor in first["weights"].items():
        torch.testing.assert_close(tensor, second["weights"][key], rtol=0, atol=0, msg=key)
    two_log = [json.loads(line) for line in (two / "coco_prefix_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two_log if "loss" not in r] == [3]  # only skipped steps since the last line
    assert [r.get("loss", 0) for r in two_log] == pytest.approx([r.get("loss", 0) for r in one["history"]], rel=1e-5)
    assert two_log[-1]["skipped_nonfinite"] == one["history"][-1]["skipped_nonfinite"] == 1


@pytest.mark.distributed
def test_two_processes_stopped_and_resumed_equal_an_uninterrupted_run(tmp_path, small_data, gpt2_dir, capsys,
                                                                      torchrun):
    """With dropout, each process draws its own masks and keeps its own RNG states in the resume state:
    stopped and resumed (--resume DIR alone), the run ends bit-identical to an uninterrupted one, each
    process's RNG included. A changed setting is refused in every process, which leaves the process
    group; the run resumes in one process too when the global batch stays the same."""
    flags = ddp_flags(small_data, gpt2_dir)
    whole, parts, fewer = tmp_path / "whole", tmp_path / "parts", tmp_path / "fewer"
    for out, stop in ((whole, []), (parts, ["--max_steps", "3"])):
        done = torchrun(*flags, "--out_dir", str(out), *stop)
        assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(parts, fewer)
    refused = torchrun("--resume", str(parts), "--lr", "0.1")
    assert refused.returncode != 0 and refused.stderr.count("error: --lr 0.1: the run being resumed") == 2
    assert "rank 0: process group left" in refused.stdout and "rank 1: process group left" in refused.stdout
    done = torchrun("--resume", str(parts))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(whole / "coco_prefix-001.safetensors", parts / "coco_prefix-001.safetensors", rtol=0, atol=0)
    uninterrupted, resumed = each_process(whole), each_process(parts)
    assert not torch.equal(uninterrupted[0]["rng"], uninterrupted[1]["rng"])  # each process its own dropout
    for rank in (0, 1):
        assert torch.equal(uninterrupted[rank]["rng"], resumed[rank]["rng"])
    logs = [[json.loads(line)["loss"] for line in (folder / "coco_prefix_log.jsonl").read_text().splitlines()]
            for folder in (whole, parts)]
    assert logs[0] == logs[1]

    assert one_line_error(["--resume", str(fewer)], capsys) == (
        "error: global batch 2 (1 process(es) x --batch_size 2 x --grad_accum 1), but the run being resumed "
        f"({fewer / 'coco_prefix_resume.pt'}) has 4: choose --batch_size and --grad_accum for that")
    assert train_command(["--resume", str(fewer), "--bs", "4"])["finished"]


def test_prefix_only_trains_the_mapper_alone(tmp_path, small_data, gpt2_dir):
    result = run(tmp_path, small_data, gpt2_dir, only_prefix=True, mapping_type="transformer", num_layers=1,
                 prefix_length_clip=2, epochs=1, save_original_format=True)
    saved = weights(result["checkpoint"])
    assert saved and all(k.startswith("clip_project.") for k in saved)
    original = torch.load(result["checkpoint"].replace(".safetensors", ".pt"), weights_only=True)
    from transformers import GPT2LMHeadModel

    pretrained = GPT2LMHeadModel.from_pretrained(gpt2_dir).state_dict()
    for k, v in pretrained.items():  # GPT-2 untouched, and present in the original's layout
        torch.testing.assert_close(original["gpt." + k], v, rtol=0, atol=0)


def test_bf16_autocast_trains_on_cpu(tmp_path, small_data, gpt2_dir):
    result = run(tmp_path, small_data, gpt2_dir, precision="bf16", epochs=3, lr=3e-3)
    losses = [r["loss"] for r in result["history"]]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("major, expected", [(7, None), (8, torch.bfloat16)])
def test_auto_precision_is_bf16_only_where_gpus_compute_in_it(monkeypatch, major, expected):
    """A V100 or T4 (compute capability 7) only emulates bf16, slowly: auto trains in fp32 there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major, minor=0))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # a bf16 tensor can be made
    assert pick_precision("auto", torch.device("cuda", 0)) == expected
    assert pick_precision("auto", torch.device("cpu")) is None


@pytest.mark.parametrize("flags, message", [
    (["--seed", str(2**64)], f"--seed must be between 0 and 2**64 - 1, got {2**64}"),
    (["--seed", "-1"], "--seed must be between 0 and 2**64 - 1, got -1"),
    (["--num_workers", "-1"], "--num_workers must not be negative, got -1"),
    (["--device", "bogus"], "--device bogus: not a device name; use auto (a GPU when there is one), cpu, cuda"),
    (["--device", "cuda"], "--device cuda: no cuda device on this machine; use --device cpu (or auto)"),
    (["--device", "cuda:7"], "--device cuda:7: no cuda device on this machine"),
    (["--prefix", "../x"], "--prefix '../x': must be a plain file name start (no folder)"),
    (["--prefix", "runs/x"], "--prefix 'runs/x': must be a plain file name start (no folder)"),
    (["--val_captions", "5"], "--val_captions 5: needs --val_data, the features to caption"),
    (["--prefix_length", "120"], "--prefix_length 120 leaves 8 of {gpt2}'s 128 positions for a caption, fewer than the "
                                 "{length} tokens {data}'s captions are cut to; use --prefix_length {most} or less"),
])
def test_bad_flags_are_one_line_errors_before_any_work(flags, message, tmp_path, small_data, gpt2_dir, capsys):
    out = tmp_path / "out"
    length = CaptionDataset(load_features(small_data), load_tokenizer(gpt2_dir)).max_length
    argv = ["--data", small_data, "--out_dir", str(out), "--gpt2", gpt2_dir, "--bs", "4", "--prefix_length", "3",
            *flags]
    message = message.format(gpt2=gpt2_dir, data=small_data, length=length, most=128 - length)
    assert one_line_error(argv, capsys).startswith("error: " + message)
    assert not out.exists() or not any(out.iterdir())


def test_validation_cider_without_java_stops_before_training(tmp_path, small_data, gpt2_dir, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no_java_here"))
    with pytest.raises(ClipCapError, match="java not found on PATH"):
        run(tmp_path, small_data, gpt2_dir, val_data=small_data, val_captions=5, epochs=1)
    assert not (tmp_path / "run").exists()


def test_compiled_training_loss_is_one_graph_equal_to_eager(gpt2_dir, monkeypatch):
    """--compile compiles the step's model in place (then DDP wraps it: PyTorch's way for the two) and captures
    the whole loss (fullgraph raises on any graph break) over changing batch shapes."""
    graphs = []

    def eager_backend(graph, example_inputs):  # dynamo's capture, without C++ builds
        graphs.append(graph)
        return graph.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, fullgraph=True, backend=eager_backend))
    model = build_model(ClipCapConfig(gpt2=gpt2_dir, prefix_size=16, prefix_length=3)).eval()
    step_model = training.step_module(model, Processes(), torch.device("cpu"), compile=True)
    for lengths in ([5, 2, 3], [1, 7, 2], [4, 4, 4, 1]):
        tokens = torch.randint(1, 200, (len(lengths), max(lengths)))
        positions = (torch.arange(tokens.shape[1])[None] < torch.tensor(lengths)[:, None]).flatten().nonzero()[:, 0]
        batch = torch.randn(len(lengths), 16), tokens, positions
        torch.testing.assert_close(step_model(*batch, reduction="sum"), model.forward(*batch, reduction="sum"))
    assert graphs


def test_validation_keeps_the_best_checkpoint(tmp_path, small_data, gpt2_dir):
    result = run(tmp_path, small_data, gpt2_dir, val_data=small_data, epochs=2)
    val = [r for r in result["history"] if "val_loss" in r]
    assert len(val) == 2 and result["best"]["epoch"] == min(val, key=lambda r: r["val_loss"])["epoch"]
    assert (tmp_path / "run" / "coco_prefix_best.safetensors").is_file()


@pytest.mark.java
def test_validation_cider_is_logged(tmp_path, small_data, gpt2_dir):
    result = run(tmp_path, small_data, gpt2_dir, val_data=small_data, val_captions=5, epochs=1)
    record = [r for r in result["history"] if "val_CIDEr" in r][0]
    assert result["best"]["val_CIDEr"] == record["val_CIDEr"]
    # the same number by hand: greedy captions of the first 5 images against all their captions
    from clipcap.evaluation import score

    features = load_features(small_data)
    first = list(dict.fromkeys(features.image_ids))[:5]
    references = {i: [c for c, j in zip(features.captions, features.image_ids) if j == i] for i in first}
    rows = [int(features.image_index[features.image_ids.index(i)]) for i in first]
    model = load_checkpoint(result["checkpoint"])
    captions = caption_embeddings(model, load_tokenizer(gpt2_dir), features.embeddings_at(np.asarray(rows)),
                                  DecodingOptions("greedy"))
    expected = score([{"image_id": i, "caption": c[0]} for i, c in zip(first, captions)], references, ("CIDEr",))
    assert record["val_CIDEr"] == pytest.approx(expected["CIDEr"])


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    from PIL import Image
    from skimage import data as photos

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(photos, name)()).resize((64, 48)).save(folder / f"{name}.jpg")
    return folder


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory, clip_dir, photo_dir):
    """Features of the photos made by the real extraction with the tiny CLIP, which the store records."""
    from clipcap.extraction import ImageItem, extract
    from clipcap.sources import chunked

    corpus = caption_corpus()
    items = [ImageItem(i, [corpus[i * 5 + j] for j in range(3)], str(path))
             for i, path in enumerate(sorted(photo_dir.iterdir()))]
    store = tmp_path_factory.mktemp("features") / "train"
    assert extract(chunked(items, 2), store, clip_dir, num_workers=0) == 0
    return str(store)


def test_checkpoint_names_the_clip_of_its_features_and_captions_images_without_flags(
        tmp_path, clip_store, clip_dir, gpt2_dir, photo_dir):
    result = run(tmp_path, clip_store, gpt2_dir, epochs=1)
    assert json.loads(Path(result["config"]).read_text())["clip_model"] == clip_dir
    assert load_checkpoint(result["checkpoint"]).config.clip_model == clip_dir
    out = tmp_path / "captions.json"
    predict(
        ["--checkpoint", result["checkpoint"], "--images", str(photo_dir), "--out", str(out), "--greedy",
         "--max_length", "5", "--device", "cpu"])
    captions = json.loads(out.read_text())
    assert sorted(c["image_id"] for c in captions) == sorted(str(p) for p in photo_dir.iterdir())


def test_clip_contradictions_stop_before_training(tmp_path, clip_store, clip_dir, gpt2_dir):
    from clipcap.featureset import save_original_pickle
    from clipcap.files import ClipCapError

    with pytest.raises(ClipCapError) as error:
        run(tmp_path, clip_store, gpt2_dir, "flag", clip_model="ViT-B/32")
    assert str(error.value) == f"--clip_model ViT-B/32: {clip_store} was made with CLIP {clip_dir}"
    assert not (tmp_path / "flag").exists()  # nothing written, nothing trained

    val = load_features(clip_store)
    val.clip_model = "ViT-L/14"
    save_original_pickle(val, tmp_path / "val.pkl")
    with pytest.raises(ClipCapError) as error:
        run(tmp_path, clip_store, gpt2_dir, "val", val_data=str(tmp_path / "val.pkl"))
    assert str(error.value) == (f"--val_data {tmp_path / 'val.pkl'}: made with CLIP ViT-L/14, "
                                f"the training features with {clip_dir}")
    assert not (tmp_path / "val").exists()
    wide = write_feature_pickle(tmp_path / "wide.pkl", [["a dog on a bench."]], dim=24)
    with pytest.raises(ClipCapError, match=f"--val_data {wide}: 24-d embeddings, but the training features are 16-d"):
        run(tmp_path, clip_store, gpt2_dir, "wide", val_data=str(wide))

    # One CLIP under two names is no contradiction, and the flag is what the checkpoint records.
    same = load_features(clip_store)
    same.clip_model = "openai/clip-vit-base-patch32"
    save_original_pickle(same, tmp_path / "same.pkl")
    result = run(tmp_path, str(tmp_path / "same.pkl"), gpt2_dir, "same", clip_model="ViT-B/32", max_steps=1)
    assert json.loads(Path(result["config"]).read_text())["clip_model"] == "ViT-B/32"


def test_features_without_a_clip_fall_back_to_the_clip_of_their_width(tmp_path, gpt2_dir, capsys):
    corpus = caption_corpus()
    data = str(write_feature_pickle(tmp_path / "rn.pkl", [[corpus[i], corpus[i + 20]] for i in range(4)], dim=640))
    result = run(tmp_path, data, gpt2_dir, "rn", max_steps=1)
    assert json.loads(Path(result["config"]).read_text())["clip_model"] == "RN50x4"
    assert f"{data} does not name its CLIP: recording RN50x4, the CLIP of 640-d embeddings" in capsys.readouterr().out

    tiny = str(write_feature_pickle(tmp_path / "tiny.pkl", [[corpus[i], corpus[i + 20]] for i in range(4)]))
    run(tmp_path, tiny, gpt2_dir, "tiny", max_steps=1)
    assert "no known CLIP gives 16-d embeddings" in capsys.readouterr().out
    result = run(tmp_path, tiny, gpt2_dir, "named", max_steps=1, clip_model="RN50")
    assert json.loads(Path(result["config"]).read_text())["clip_model"] == "RN50"
    assert "does not name its CLIP" not in capsys.readouterr().out
    train_command(["--data", tiny, "--out_dir", str(tmp_path / "cli"), "--gpt2", gpt2_dir, "--bs", "4",
                   "--prefix_length", "3", "--max_steps", "1", "--clip_model", "RN50"])  # train.py records it too
    assert json.loads((tmp_path / "cli" / "coco_prefix_config.json").read_text())["clip_model"] == "RN50"
    assert "does not name its CLIP" not in capsys.readouterr().out
