"""Captioning speed: the original's decoding loops against clipcap.decoding, same weights, same run.

The original runs GPT-2 over the whole sequence at every step, one image at a time
(testing/reference.py re-implements its generate2 / generate_beam). clipcap.decoding
keeps GPT-2's key/value cache and batches images (times beams). Both run on a GPT-2 of the real
small size (124M, random weights) with an MLP mapper (K=10, D=512).

A random GPT-2 never says ".", so every caption would run to the 67-token limit. To get
caption lengths like real ones, the position embeddings get a component along the "." token's
embedding that grows with the position (--stop_slope): "." becomes likely after about 10-20
tokens, at a step that differs from image to image. Lengths are printed with the results.

    python bench/bench_decoding.py --threads 1   # ~4 minutes on one free CPU core
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap.decoding import beam_tokens, greedy_tokens
from clipcap.model import ClipCap, ClipCapConfig

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout's testing/, which is not installed
from testing.reference import original_beam, original_greedy  # noqa: E402

PERIOD = 13  # GPT-2's "."


def end_captions(model: ClipCap, stop_slope: float, stop_token: int = PERIOD) -> ClipCap:
    """Bias a random GPT-2 towards ``stop_token`` more with every caption position: add to each position
    embedding after the prefix a component along the stop token's embedding that grows with the position."""
    k = model.config.prefix_length
    with torch.no_grad():
        wpe, stop = model.gpt.transformer.wpe.weight, model.gpt.transformer.wte.weight[stop_token]
        steps = torch.arange(1, wpe.shape[0] - k + 1, dtype=wpe.dtype, device=wpe.device)[:, None]
        wpe[k:] += stop_slope * steps * stop / stop.norm()
    return model


def random_clipcap(stop_slope: float, seed: int = 0) -> ClipCap:
    """GPT-2 small with random weights, MLP mapper K=10 / D=512, biased to end captions with "."."""
    torch.manual_seed(seed)
    model = ClipCap(ClipCapConfig(prefix_length=10, prefix_size=512), GPT2LMHeadModel(GPT2Config())).eval()
    return end_captions(model, stop_slope)


def timed(fn: Callable[[], list]) -> tuple[list, float, float]:
    """The result, wall-clock seconds and this process's CPU seconds (steadier on a shared machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--greedy_images", type=int, default=16, help="CLIP embeddings (random) for greedy")
    parser.add_argument("--beam_images", type=int, default=8, help="CLIP embeddings (random) for beam search")
    parser.add_argument("--beam_size", type=int, default=5)
    parser.add_argument("--max_length", type=int, default=67)
    parser.add_argument("--stop_slope", type=float, default=0.15, help="0 = captions never end before max_length")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = random_clipcap(args.stop_slope)
    embeds = torch.randn(max(args.greedy_images, args.beam_images), 512, generator=torch.Generator().manual_seed(1))
    print(f"GPT-2 small (random weights), MLP mapper K=10 D=512, max_length {args.max_length}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    greedy_tokens(model, embeds[:1], max_length=2)  # warm-up

    runs = {
        "greedy": (args.greedy_images,
                   lambda e: [original_greedy(model, x, max_length=args.max_length) for x in e],
                   lambda e: greedy_tokens(model, e, max_length=args.max_length)),
        f"beam {args.beam_size}": (
            args.beam_images,
            lambda e: [[t for t, _ in original_beam(model, x, beam_size=args.beam_size, max_length=args.max_length)]
                       for x in e],
            lambda e: [[t for t, _ in beams] for beams in
                       beam_tokens(model, e, beam_size=args.beam_size, max_length=args.max_length)]),
    }
    rows = []
    for name, (n, original, ours) in runs.items():
        images = embeds[:n]
        expected, *t_orig = timed(lambda: original(images))
        one, *t_one = timed(lambda: [c for i in range(n) for c in ours(images[i:i + 1])])
        batched, *t_batch = timed(lambda: ours(images))
        lengths = [len(c if name == "greedy" else c[0]) for c in expected]
        print(f"{name}: {n} images, caption lengths (tokens) mean {statistics.mean(lengths):.1f}, "
              f"min {min(lengths)}, max {max(lengths)}", flush=True)
        for method, (wall, cpu), result in (("original loop (no cache, 1 image)", t_orig, expected),
                                            ("clipcap, batch 1", t_one, one),
                                            (f"clipcap, batch {n}", t_batch, batched)):
            rows.append((name, method, wall, cpu, n / wall, t_orig[0] / wall, t_orig[1] / cpu, result == expected))

    print("\n| decoding | method | wall s | CPU s | captions/s (wall) | vs original (wall) | vs original (CPU) | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for name, method, wall, cpu, rate, ratio_wall, ratio_cpu, same in rows:
        print(f"| {name} | {method} | {wall:.1f} | {cpu:.1f} | {rate:.2f} | {ratio_wall:.1f}x | {ratio_cpu:.1f}x "
              f"| {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
