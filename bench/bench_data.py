"""Training batches per second: the original's per-caption dataset against ours, fetched a batch at a time.

The original's ClipCocoDataset pads one caption per __getitem__ call (to the global length,
with its mask) and lets the DataLoader stack 40 of them; ours gathers a whole batch with a
few NumPy operations. Both read the same in-memory features and token ids, shuffled, bs 40.
The GPU loop needs about 160 batches/s for 10 COCO epochs in 15 minutes, and every millisecond of
CPU the training process spends on a batch is one it cannot spend queueing GPU work; workers' own
CPU time is not counted in the "CPU ms/batch here" column, only the cost of receiving their batches.

    python bench/bench_data.py                     # in the training process (num_workers 0)
    python bench/bench_data.py --num_workers 2     # through DataLoader worker processes
"""
import argparse
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_train_throughput import WORDS, coco_like_caption
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from clipcap.data import CaptionDataset
from clipcap.featureset import FeatureSet

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout's testing/, which is not installed
from testing.tiny import train_tokenizer  # noqa: E402


class OriginalDataset(Dataset):
    """The original's ClipCocoDataset item path: pad to the global length, mask, look up the prefix."""

    def __init__(self, ours: CaptionDataset, prefix_length: int = 10):
        self.captions_tokens = [torch.from_numpy(ours.ids[a:b].astype(np.int64))
                                for a, b in zip(ours.offsets[:-1], ours.offsets[1:])]
        self.prefixes = ours.features.embeddings
        self.caption2embedding = ours.features.image_index.tolist()
        self.max_seq_len, self.prefix_length = ours.max_length, prefix_length

    def __len__(self) -> int:
        return len(self.captions_tokens)

    def __getitem__(self, item: int):
        tokens = self.captions_tokens[item]
        padding = self.max_seq_len - tokens.shape[0]
        if padding > 0:
            tokens = torch.cat((tokens, torch.zeros(padding, dtype=torch.int64) - 1))
            self.captions_tokens[item] = tokens
        elif padding < 0:
            tokens = tokens[:self.max_seq_len]
            self.captions_tokens[item] = tokens
        mask = tokens.ge(0)
        tokens[~mask] = 0
        mask = torch.cat((torch.ones(self.prefix_length), mask.float()), dim=0)
        return tokens, mask, self.prefixes[self.caption2embedding[item]]


def synthetic(n_captions: int, dim: int) -> CaptionDataset:
    """COCO-like captions, 5 per image, with fp32 embeddings, tokenised by a BPE trained on them."""
    rng = random.Random(0)
    captions = [coco_like_caption(rng) for _ in range(n_captions)]
    features = FeatureSet(torch.randn(n_captions // 5, dim), captions, np.arange(n_captions) // 5,
                          list(range(n_captions)))
    return CaptionDataset(features, train_tokenizer(captions[:2000] + [" ".join(WORDS)], vocab_size=600))


def measure(loader: DataLoader, batches: int) -> tuple[float, float]:
    """Batches per second, and this process's CPU milliseconds per batch (what a GPU loop has to spare)."""
    iterator = iter(loader)
    next(iterator)  # workers started, first batch out
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - start), (time.process_time() - cpu) * 1000 / batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=200_000)
    p.add_argument("--batches", type=int, default=1500)
    p.add_argument("--bs", type=int, default=40)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="alternate the two sides this many times")
    args = p.parse_args()
    ours = synthetic(args.captions, 512)
    original = OriginalDataset(ours)

    def loaders():
        g = torch.Generator().manual_seed(0)
        yield "original", DataLoader(original, batch_size=args.bs, shuffle=True, drop_last=True,
                                     num_workers=args.num_workers, generator=g)
        shuffled = BatchSampler(RandomSampler(ours, generator=g), args.bs, drop_last=True)
        yield "ours", DataLoader(ours, sampler=shuffled, batch_size=None, num_workers=args.num_workers)

    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.captions:,} captions, bs {args.bs}, num_workers {args.num_workers}")
    results: dict[str, list[tuple[float, float]]] = {"original": [], "ours": []}
    for _ in range(args.rounds):
        for name, loader in loaders():
            results[name].append(measure(loader, args.batches))
    best = {name: max(r) for name, r in results.items()}
    print(f"{'side':<10} {'batches/s':>10} {'CPU ms/batch here':>18}  (best of {args.rounds} alternating rounds)")
    for name, (rate, cpu_ms) in best.items():
        print(f"{name:<10} {rate:>10.0f} {cpu_ms:>18.2f}")
    print(f"ratio: {best['ours'][0] / best['original'][0]:.1f}x")


if __name__ == "__main__":
    main()
