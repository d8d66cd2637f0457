"""One command that proves a GPU machine runs this project: every GPU path on tiny data, in minutes.

    make gpu-check                            # = python bench/gpu_check.py: all checks, tiny backbones
    python bench/gpu_check.py --real          # GPT-2 and CLIP ViT-B/32 from the local Hugging Face cache
    python bench/gpu_check.py --checks training,decoding --out my_check

Each check is a line of the table, with its figures:
- training steps in fp32, bf16 and fp16 (grad scaler), GPT-2 fine-tuned and prefix-only, eager and
  --compile: finite losses, no host sync per step, samples/s and peak GPU memory (gpu_check_training.py);
- projection: the time of 10 COCO epochs for each row of the paper's Table 1, from samples/s at
  batch 40 with GPT-2 small's shapes (random weights, unless --real);
- extraction in float16 against float32 for a ViT and a ResNet CLIP; decoding: batched greedy and
  beam search against one image at a time, and captions/s (gpu_check_inference.py);
- multi-GPU, through torchrun on 2 GPUs: DDP training, a kill and a resume equal to the uninterrupted
  run, --skip_nonfinite with a NaN loss on one rank, extraction across ranks (gpu_check_ddp.py).
The table goes to OUT/gpu_check.md and the figures to OUT/gpu_check.json, each check's output to
OUT/gpu_check_logs/. Exit status 1 when a check failed. Without a GPU it says so and exits 0;
``--device cpu`` rehearses every check on the CPU (tests/test_gpu_check.py runs it), so that the
checks keep working between runs on a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from gpu_check_common import (
    FAIL,
    PASS,
    SKIPPED,
    Check,
    Context,
    check_real_cache,
    failure,
    print_line,
    real_backbones,
    tiny_backbones,
)
from gpu_check_ddp import ddp_checks
from gpu_check_inference import decoding_checks, extraction_checks
from gpu_check_training import projection_checks, training_checks
from transformers.utils import logging as hf_logging

from clipcap.cli.common import positive, run
from clipcap.files import ClipCapError, atomic_write, check_output_path, markdown_table, write_json

GROUPS: dict[str, Callable[[Context], list[Check]]] = {
    "training": training_checks, "projection": projection_checks, "extraction": extraction_checks,
    "decoding": decoding_checks, "multi-gpu": ddp_checks}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check_out", help="folder of gpu_check.json, gpu_check.md and the logs")
    p.add_argument("--checks", default=",".join(GROUPS),
                   help=f"which, comma-separated (default: all of {', '.join(GROUPS)})")
    p.add_argument("--real", action="store_true",
                   help="GPT-2 and CLIP ViT-B/32 from the local Hugging Face cache (and OpenAI's RN50 from "
                        "~/.cache/clip if there)")
    p.add_argument("--device", default=None,
                   help="cuda (the default when a GPU is visible), or cpu: a rehearsal of the same checks, "
                        "without GPU figures")
    p.add_argument("--processes", type=positive, default=None,
                   help="processes of the multi-GPU checks, one GPU each (default: 2 when there are 2 GPUs; the kill "
                        "and resume check always runs on 2)")
    p.add_argument("--steps", type=positive, default=30, help="training steps of each mode (3 log windows)")
    p.add_argument("--size", choices=("small", "tiny"), default=None,
                   help="GPT-2 shapes of the Table 1 projections (default: small on a GPU, tiny on the CPU)")
    p.add_argument("--compile_backend", default=None, help=argparse.SUPPRESS)  # the CPU rehearsal's "eager"
    p.add_argument("--training_modes", default=None, help=argparse.SUPPRESS)  # a short rehearsal: "fp32 fine-tune,..."
    return p.parse_args(argv)


def machine(device: str) -> dict[str, Any]:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    if device.startswith("cuda"):
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def report_markdown(info: dict[str, Any], checks: list[Check]) -> str:
    where = (f"{info['gpus']} x {info['gpu']}, CUDA {info['cuda']}" if "gpu" in info else
             f"CPU rehearsal ({info['cpu']}, {info['threads']} threads)")
    counts = {status: sum(c.status == status for c in checks) for status in (PASS, FAIL, SKIPPED)}
    rows = [["check", "result", "detail", "figures"]]
    for c in checks:
        figures = ", ".join(f"{k} {v}" for k, v in c.figures.items() if v is not None)
        rows.append([f"{c.group}: {c.name}", c.status, c.detail, figures])
    table = markdown_table([[cell.replace("|", "\\|") for cell in row] for row in rows])
    return (f"GPU check: {where}, torch {info['torch']}, {info['backbones']} backbones, {info['date']}: "
            f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIPPED]} skipped\n\n{table}\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device is None:
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no GPU visible"
            print(f"gpu_check: no CUDA device ({build}, torch {torch.__version__}): nothing to check, nothing measured")
            return 0
        args.device = "cuda"
    cuda = args.device == "cuda"
    if args.device not in ("cuda", "cpu"):
        raise ClipCapError(f"--device {args.device}: cuda or cpu (the checks choose their GPUs)")
    if cuda and not torch.cuda.is_available():
        raise ClipCapError("--device cuda: no CUDA device visible")
    groups = [name.strip() for name in args.checks.split(",") if name.strip()]
    unknown = [name for name in groups if name not in GROUPS]
    if unknown or not groups:
        raise ClipCapError(f"--checks {args.checks}: choose from {', '.join(GROUPS)}")
    gpus = torch.cuda.device_count() if cuda else 0
    processes = args.processes or (2 if gpus >= 2 else 1)
    if cuda and processes > gpus:
        raise ClipCapError(f"--processes {processes}: this machine has {gpus} GPU(s), and each process needs its own")
    if args.steps < 3:
        raise ClipCapError(f"--steps {args.steps}: at least 3 (the first of 3 log windows is warm-up)")
    if args.real:
        check_real_cache()
    out = Path(args.out)
    for name in ("gpu_check.json", "gpu_check.md"):
        check_output_path(out / name, "--out")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    logs = out / "gpu_check_logs"
    shutil.rmtree(logs, ignore_errors=True)
    info = {**machine(args.device), "backbones": "real" if args.real else "tiny", "date": time.strftime("%Y-%m-%d")}
    print(f"gpu_check on {info.get('gpu', 'the CPU (a rehearsal)')}: {', '.join(groups)}; logs in {logs}", flush=True)
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        backbones = real_backbones(work / "backbones") if args.real else tiny_backbones(work / "backbones")
        for note in backbones.notes:
            print(f"note: {note}")
        ctx = Context(args.device, processes, backbones, work, logs, args.steps,
                      args.size or ("small" if cuda else "tiny"), args.compile_backend,
                      args.training_modes.split(",") if args.training_modes else None)
        for name in groups:
            start = time.perf_counter()
            try:
                found = GROUPS[name](ctx)
            except Exception as e:  # a bug of the check itself: reported, and the other groups still run
                found = [Check(name, "(the check itself)", FAIL, failure(e))]
            for check in found:
                print_line(check)
            print(f"         ({name}: {time.perf_counter() - start:.0f} s)", flush=True)
            checks += found
    markdown = report_markdown(info, checks)
    write_json(out / "gpu_check.json", {"machine": info, "checks": [dataclasses.asdict(c) for c in checks]})
    with atomic_write(out / "gpu_check.md") as tmp_md:
        tmp_md.write_text(markdown)
    print(f"\n{markdown}\nwritten: {out / 'gpu_check.md'}, {out / 'gpu_check.json'}")
    return 1 if any(c.status == FAIL for c in checks) else 0


if __name__ == "__main__":
    run(lambda: sys.exit(main()))
