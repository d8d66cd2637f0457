"""Feature-store memory: training-style random access to a synthetic 3M-caption store, peak RSS printed.

The original loads its whole feature pickle into RAM (CC3M with ViT-B/32: 3.3M x 512 float32
embeddings, 6.3 GB, plus 3.3M caption dicts). A store is read on demand. This script writes a
synthetic store (random float16 embeddings, COCO-like captions), then, in a fresh process, does
what training does: load it, tokenise every caption (clipcap.data.CaptionDataset), and draw
shuffled batches of 40 (in the training process, or through DataLoader workers with --num_workers).
It prints each process's peak RSS.

    python bench/bench_store.py                     # 3M images, 1 caption each (CC3M-like); ~3.2 GB of disk
    python bench/bench_store.py --images 600000 --captions_per_image 5     # COCO-like, 3M captions
"""
import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clipcap import store

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout's testing/, which is not installed

WORDS = ("a man woman dog cat bird horse train bus car plate pizza table room kitchen street field beach "
         "sitting standing riding holding eating walking on in of with next to near the and two three "
         "red blue green white black small large old young wooden grassy busy empty").split()


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports kB


def synthetic_store(path: Path, images: int, captions_per_image: int, dim: int, shard_rows: int = 100_000) -> None:
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    names = []
    for k, start in enumerate(tqdm(range(0, images, shard_rows), desc="writing synthetic store", unit="shard")):
        rows = min(shard_rows, images - start)
        embeddings = rng.standard_normal((rows, dim), dtype=np.float32).astype(np.float16)
        lengths = rng.integers(8, 15, rows * captions_per_image)
        picks = words[rng.integers(0, len(words), lengths.sum())]
        cut = np.cumsum(lengths)[:-1]
        captions = [" ".join(p) + "." for p in np.split(picks, cut)]
        local = np.repeat(np.arange(rows), captions_per_image)
        names.append(f"{k:05d}")
        store.write_shard(path, names[-1], embeddings, captions, (local + start).tolist(), local)
    store.merge(path, names)


def measure(path: Path, batches: int, num_workers: int) -> None:
    """What training does with the store, in this (fresh) process."""
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    from clipcap.data import CaptionDataset, load_features
    from testing.tiny import train_tokenizer

    start = time.perf_counter()
    features = load_features(path)
    tokenizer = train_tokenizer([features.captions[i] for i in range(0, 20_000)], vocab_size=2000)
    dataset = CaptionDataset(features, tokenizer)
    print(f"loaded and tokenised {len(dataset):,} captions over {features.embeddings.shape[0]:,} images "
          f"in {time.perf_counter() - start:.0f} s; peak RSS so far {peak_rss_mb():.0f} MB")
    shuffled = BatchSampler(RandomSampler(dataset, generator=torch.Generator().manual_seed(0)), 40, drop_last=True)
    loader = DataLoader(dataset, sampler=shuffled, batch_size=None, num_workers=num_workers)
    start = time.perf_counter()
    seen = 0
    for i, (tokens, lengths, embeddings, _) in enumerate(tqdm(loader, total=batches, desc="random batches")):
        seen += len(tokens)
        if i + 1 == batches:
            break
    elapsed = time.perf_counter() - start
    del loader  # workers exit, so their peak shows in RUSAGE_CHILDREN
    print(f"{seen:,} shuffled samples in {elapsed:.1f} s ({seen / elapsed:,.0f} samples/s, {num_workers} workers)")
    print(f"peak RSS: main process {peak_rss_mb():.0f} MB, largest DataLoader worker "
          f"{peak_rss_mb(resource.RUSAGE_CHILDREN):.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3_000_000)
    parser.add_argument("--captions_per_image", type=int, default=1)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batches", type=int, default=5000)
    parser.add_argument("--num_workers", type=int, default=0, help="train.py's default")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child's half
    args = parser.parse_args()
    if args.measure:
        measure(Path(args.measure), args.batches, args.num_workers)
        return
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_store(Path(tmp), args.images, args.captions_per_image, args.dim)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; store of "
              f"{args.images * args.captions_per_image:,} captions, {args.images:,} x {args.dim} float16 embeddings")
        subprocess.run([sys.executable, __file__, "--measure", tmp, "--batches", str(args.batches),
                        "--num_workers", str(args.num_workers)], check=True)


if __name__ == "__main__":
    main()
