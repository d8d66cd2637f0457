"""bench/gpu_check.py rehearsed on the CPU, so that its checks keep working between runs on a GPU: the table
and JSON it writes, what it finds, its one line on a machine without a GPU; and bench_train_throughput.py."""
from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import torch
from warm_python import warm_python

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_train_throughput  # noqa: E402
import gpu_check  # noqa: E402
import gpu_check_ddp  # noqa: E402

from clipcap import training  # noqa: E402
from clipcap.files import ClipCapError  # noqa: E402

SHORT_MATRIX = "fp32 fine-tune,bf16 prefix-only,fp16 fine-tune compiled"  # every precision, mode and --compile
REHEARSAL = ["--device", "cpu", "--steps", "3", "--compile_backend", "eager", "--training_modes", SHORT_MATRIX]


def checks_of(out: Path) -> dict[str, dict]:
    report = json.loads((out / "gpu_check.json").read_text())
    return {f"{c['group']}: {c['name']}": c for c in report["checks"]}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """The single-process checks, once, on the CPU."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    status = gpu_check.main([*REHEARSAL, "--out", str(out), "--checks", "training,projection,extraction,decoding"])
    return status, out, checks_of(out)


def test_without_a_gpu_it_says_so_in_one_line_and_measures_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out and "nothing measured" in out
    assert list(tmp_path.iterdir()) == []


def test_rehearsal_trains_every_precision_and_mode_and_writes_the_table(rehearsal):
    _, out, checks = rehearsal
    for name in SHORT_MATRIX.split(","):
        check = checks[f"training: {name}"]
        assert check["status"] == "pass", check
        assert check["figures"]["samples/s"] > 0 and check["figures"]["peak GB"] is None  # no GPU memory on the CPU
        assert "2 steady-state steps watched" in check["detail"]
    for row in ("MLP + GPT-2 tuning", "Transformer, GPT-2 frozen", "(ablation) Transformer + GPT-2 tuning",
                "(ablation) MLP, GPT-2 frozen"):
        check = checks[f"projection: {row}"]
        assert check["status"] == "skipped" and "needs GPT-2 small's shapes" in check["detail"], check
        assert check["figures"]["samples/s"] > 0
    markdown = (out / "gpu_check.md").read_text()
    assert markdown.startswith("GPU check: CPU rehearsal")
    assert "| training: fp16 fine-tune compiled | pass |" in markdown
    assert len([line for line in markdown.splitlines() if line.startswith("| ")]) == 1 + len(checks)
    assert (out / "gpu_check_logs" / "train_fp16_fine-tune_compiled.log").stat().st_size > 0


def test_rehearsal_decodes_a_batch_as_one_image_at_a_time(rehearsal):
    _, _, checks = rehearsal
    for decoder in ("greedy", "beam 5"):
        check = checks[f"decoding: {decoder}: batched = one image at a time"]
        assert check["status"] == "pass", check
        shortest, longest = map(int, check["figures"]["tokens per caption"].split("-"))
        assert shortest < longest < 40  # captions end at different steps, so images leave the batch
        assert check["figures"]["captions/s batched"] > 0


def test_rehearsal_extracts_vit_features_in_float16_close_to_float32(rehearsal):
    _, _, checks = rehearsal
    check = checks["extraction: ViT CLIP float16 vs float32"]
    assert check["status"] == "pass", check
    assert check["figures"]["max relative error"] < 0.02


def test_rehearsal_extracts_resnet_features_in_float16_close_to_float32(rehearsal):
    """The tiny ResNet's BatchNorm variances are beyond float16's range: its BatchNorm must stay float32."""
    status, _, checks = rehearsal
    check = checks["extraction: ResNet CLIP float16 vs float32"]
    assert check["status"] == "pass", check
    assert status == 0  # nothing failed


@pytest.mark.filterwarnings("ignore:called a synchronizing CUDA operation")
def test_a_host_sync_in_a_training_step_fails_its_mode_naming_the_line(tmp_path, monkeypatch):
    """On a GPU, CUDA's sync debug mode warns at each sync; a step that warns so must fail its row."""
    observe = training.LossGuard.observe

    def syncing_observe(self, *args):
        warnings.warn("called a synchronizing CUDA operation")
        return observe(self, *args)

    monkeypatch.setattr(training.LossGuard, "observe", syncing_observe)
    out = tmp_path / "out"
    assert gpu_check.main([*REHEARSAL, "--out", str(out), "--checks", "training", "--training_modes",
                           "fp32 prefix-only"]) == 1
    check = checks_of(out)["training: fp32 prefix-only"]
    assert check["status"] == "FAIL"
    assert check["detail"].startswith("2 host syncs in 2 steady-state steps (first at test_gpu_check.py:")
    assert training.train_step.__name__ == "train_step"  # the watch let go of it


def test_bad_flags_are_one_line_errors_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    for flags, message in ((["--checks", "training,speed"], "--checks training,speed: choose from training, "),
                           (["--steps", "2"], "--steps 2: at least 3"),
                           (["--device", "cuda:1"], "--device cuda:1: cuda or cpu"),
                           (["--real"], "--real: gpt2 and openai/clip-vit-base-patch32 not in the local Hugging Face "
                                        "cache; fetch with python -c \"from transformers import")):
        with pytest.raises(ClipCapError, match=re.escape(message)):
            gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def across_ranks(tmp_path_factory):
    """The multi-GPU checks, once, with two CPU processes (gloo) launched as torchrun launches them
    (tests/forked_torchrun.py, from a warm interpreter; torchrun's launcher itself runs in test_extraction.py)."""
    out = tmp_path_factory.mktemp("gpu_check_ranks") / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with warm_python(tmp_path_factory.mktemp("warm"), env) as python, pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu_check_ddp, "TORCHRUN", [python, str(REPO / "tests" / "forked_torchrun.py")])
        gpu_check.main([*REHEARSAL, "--out", str(out), "--checks", "multi-gpu", "--processes", "2"])
    return {name.removeprefix("multi-GPU: "): check for name, check in checks_of(out).items()}


@pytest.mark.distributed
def test_rehearsal_trains_with_ddp_and_extracts_across_ranks(across_ranks):
    for name in ("DDP training", "extraction across ranks = one process"):
        assert across_ranks[name]["status"] == "pass", across_ranks[name]
    assert across_ranks["DDP training"]["figures"]["processes"] == 2


@pytest.mark.distributed
def test_rehearsal_kill_and_resume_equals_the_uninterrupted_run(across_ranks):
    """With dropout on, this needs every rank to restore its own RNG states."""
    check = across_ranks["kill and resume = uninterrupted (float32, dropout)"]
    assert check["status"] == "pass", check


@pytest.mark.distributed
def test_rehearsal_a_nan_loss_on_one_rank_is_skipped_by_every_rank(across_ranks):
    check = across_ranks["--skip_nonfinite, NaN loss on one rank (float16)"]
    assert check["status"] == "pass", check
    assert check["figures"]["skipped steps logged"] >= 1


def test_multi_gpu_checks_say_why_they_skip_on_one_process(tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main([*REHEARSAL, "--out", str(out), "--checks", "multi-gpu"]) == 0
    checks = checks_of(out)
    assert len(checks) == 4 and all(c["status"] == "skipped" and c["detail"] == "needs --processes 2 or more"
                                    for c in checks.values())


def test_throughput_bench_prints_both_modes_on_the_cpu(monkeypatch, capsys):
    """Each mode trains in its own folder (the second was refused as another run's), and the table prints."""
    monkeypatch.setattr(sys, "argv", ["bench_train_throughput.py", "--device", "cpu", "--steps", "3", "--bs", "2"])
    bench_train_throughput.main()
    table = capsys.readouterr().out.split("mode ")[-1].splitlines()
    assert [line.split("  ")[0] for line in table[1:3]] == list(bench_train_throughput.MODES)
    assert all("min" in line for line in table[1:3])
