"""Training throughput of the real train() loop, and the projected time for the paper's 10 COCO epochs.

Runs clipcap.training.train on synthetic features (COCO-like caption lengths) with a randomly
initialised GPT-2, for the paper's two rows: MLP mapper + GPT-2 fine-tuning (K=10, bs 40) and
the prefix-only transformer mapper (K=10, 8 layers). Needs no network. Each mode trains in a folder
of its own and prints its row as soon as it is measured, with the GPU memory peak of that mode alone.

    python bench/bench_train_throughput.py                      # GPU: GPT-2 small, bs 40, bf16
    python bench/bench_train_throughput.py --device cpu         # CPU: the same figures at a small size
    PYTHONPATH=. python3 bench/bench_train_throughput.py        # from the repository root, not installed

Needs torch, transformers, tokenizers, safetensors, tensorboard, matplotlib and tqdm, nothing else.

The paper: 7 h (MLP + GPT-2 tuning) and 6 h (transformer) for 10 COCO epochs on one GTX1080.
bench/gpu_check.py projects all four Table 1 rows with :func:`measure`.
"""
from __future__ import annotations

import argparse
import gc
import pickle
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from clipcap.model import ClipCapConfig
from clipcap.training import TrainConfig, train

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout's testing/, which is not installed
from testing.tiny import train_tokenizer  # noqa: E402

COCO_CAPTIONS = 566_747  # Karpathy train + restval
WORDS = ("a man woman dog cat group of people sitting standing on top the table street with next to in front "
         "red blue white black green large small two three old young is are riding holding playing eating "
         "plate pizza bus train car bike field grass water beach snow room kitchen bed tree sign clock").split()
MODES = {"finetune (MLP + GPT-2)": dict(mapping_type="mlp"),
         "prefix-only transformer": dict(mapping_type="transformer", only_prefix=True, num_layers=8)}
SIZES = {"small": dict(), "cpu": dict(n_embd=256, n_layer=2, n_head=4)}  # GPT-2 small / a CPU-sized one


def coco_like_caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(5, round(rng.gauss(10.5, 2.5))))) + "."


def coco_like_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [coco_like_caption(rng) for _ in range(n)]


def make_gpt2(folder: Path, size: str) -> str:
    """A random GPT-2 of ``SIZES[size]`` (vocabulary of 50,257 like the real one), with a small BPE tokenizer."""
    tokenizer = train_tokenizer(coco_like_captions(2000) + [" ".join(WORDS)], vocab_size=600)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, **SIZES[size])).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_features(path: Path, captions: list[str], dim: int, captions_per_image: int = 5) -> str:
    """The original's feature pickle: random fp16 embeddings [N / captions_per_image, dim] and the captions."""
    n_images = max(1, len(captions) // captions_per_image)
    with open(path, "wb") as f:
        pickle.dump({"clip_embedding": torch.randn(n_images, dim, generator=torch.Generator().manual_seed(0)).half(),
                     "captions": [{"image_id": i % n_images, "caption": c, "clip_embedding": i % n_images}
                                  for i, c in enumerate(captions)]}, f)
    return str(path)


@dataclass
class Measured:
    """One mode's figures: speeds after the first log window (warm-up, compilation), the GPU memory peak."""

    samples_per_s: float
    tokens_per_s: float
    peak_gb: float | None  # None on the CPU
    losses: list[float]
    seconds: float

    @property
    def coco_hours(self) -> float:
        """10 epochs of COCO's Karpathy train + restval at this speed."""
        return 10 * COCO_CAPTIONS / self.samples_per_s / 3600


def measure(cfg: TrainConfig) -> Measured:
    """Train ``cfg`` (log_every at most half its max_steps) and measure it; the memory peak is this run's own."""
    cuda = torch.device(cfg.device).type == "cuda"
    if cuda:
        torch.cuda.init()  # the allocator's statistics exist once CUDA is initialised
        gc.collect()  # the previous mode's model and optimizer state, if still referenced by a cycle
        torch.cuda.reset_peak_memory_stats(cfg.device)
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    history = [r for r in result["history"] if "loss" in r]
    timed = history[1:] or history  # the first window holds warm-up (and compilation)
    return Measured(samples_per_s=sum(r["samples_per_s"] for r in timed) / len(timed),
                    tokens_per_s=sum(r["tokens_per_s"] for r in timed) / len(timed),
                    peak_gb=torch.cuda.max_memory_allocated(cfg.device) / 2**30 if cuda else None,
                    losses=[r["loss"] for r in history], seconds=seconds)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--bs", type=int, default=None, help="default: 40 on GPU (the paper), 8 on CPU")
    p.add_argument("--steps", type=int, default=None, help="default: 150 on GPU, 12 on CPU")
    p.add_argument("--size", choices=SIZES, default=None, help="default: small (GPT-2 small) on GPU, cpu on CPU")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (train.py's default: 0)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    precision = args.precision or ("bf16" if gpu else "fp32")
    bs, steps = args.bs or (40 if gpu else 8), args.steps or (150 if gpu else 12)
    size = args.size or ("small" if gpu else "cpu")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    device_name = torch.cuda.get_device_name() if gpu else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"{device_name}; torch {torch.__version__}; GPT-2 {size} (random), bs {bs}, {precision}, "
          f"{steps} steps per mode{', compiled' if args.compile else ''}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        gpt2 = make_gpt2(Path(tmp) / "gpt2", size)
        data = write_features(Path(tmp) / "features.pkl", coco_like_captions(bs * (steps + 1)), 512)
        try:
            for k, (mode, settings) in enumerate(MODES.items()):
                model = ClipCapConfig(lm=gpt2, prefix_length=10, prefix_length_clip=10, **settings)
                m = measure(TrainConfig(model=model, data=data, out_dir=str(Path(tmp) / f"mode{k}"), batch_size=bs,
                                        epochs=1, max_steps=steps, log_every=max(1, steps // 6), precision=precision,
                                        device=args.device, compile=args.compile, num_workers=args.num_workers,
                                        warmup=100))
                memory = "-" if m.peak_gb is None else f"{m.peak_gb:.1f}"
                rows.append(f"{mode:<26} {m.samples_per_s:>10.1f} {m.tokens_per_s:>10.0f} {memory:>7} "
                            f"{m.coco_hours * 60:>11.1f} min {m.seconds:>8.0f}")
        finally:  # the figures measured so far, even when a later mode fails
            print(f"\n{'mode':<26} {'samples/s':>10} {'tokens/s':>10} {'GPU GB':>7} {'10 COCO epochs':>15} "
                  f"{'bench s':>8}", *rows, sep="\n")
    print(f"(projection: 10 x {COCO_CAPTIONS:,} captions / samples/s; paper: 7 h and 6 h on a GTX1080)")


if __name__ == "__main__":
    main()
