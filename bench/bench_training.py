"""Training step speed: this project's loop against a re-creation of the original's per-step work.

Same model (GPT-2 small size, random weights), same batches, one run, ratios printed.
The original's step, as docs/original.md describes it: every caption padded to one global
length min(mean + 10 std, max), an attention mask, logits at every position, cross-entropy with
ignore_index=0, and in prefix-only mode gradients computed for all of GPT-2's weights (only the
mapper is in the optimizer). Ours: each batch padded to its own longest caption, no mask,
logits only where a real token is predicted, no GPT-2 gradients in prefix-only mode.

    python bench/bench_training.py            # both modes, a few steps each (CPU: ~5 min)
"""
import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap.data import max_caption_length
from clipcap.model import ClipCap, ClipCapConfig
from clipcap.training import make_optimizer

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout's testing/, which is not installed
from testing.reference import original_logits  # noqa: E402

MODES = {
    "finetune": dict(mapping_type="mlp", prefix_length=10),  # the paper's MLP + GPT-2 tuning row
    "prefix": dict(mapping_type="transformer", prefix_length=10, prefix_length_clip=10, num_layers=8,
                   only_prefix=True),  # the paper's transformer, GPT-2 frozen row
}


def coco_like_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """Caption token counts shaped like COCO's: about 13 +- 3, with a rare long tail."""
    lengths = np.clip(rng.normal(13, 3, n).round(), 6, 40).astype(int)
    tail = rng.random(n) < 0.002
    lengths[tail] = rng.integers(40, 70, tail.sum())
    return lengths


def build(mode: str, seed: int = 0) -> ClipCap:
    torch.manual_seed(seed)
    return ClipCap(ClipCapConfig(prefix_size=512, **MODES[mode]), GPT2LMHeadModel(GPT2Config()))


def original_step(model: ClipCap, optimizer, clip, tokens_global, lengths) -> float:
    """Global padding, a mask, full logits, ignore_index=0; GPT-2 keeps requires_grad in prefix-only mode."""
    k = model.config.prefix_length
    mask = torch.cat((torch.ones(len(lengths), k), (torch.arange(tokens_global.shape[1])[None] < lengths[:, None]).float()), 1)
    logits = original_logits(model, clip, tokens_global, mask)[:, k - 1:-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens_global.flatten(), ignore_index=0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


def real_positions(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The flat indices of the real tokens, as clipcap.data.Batch carries them."""
    return (torch.arange(tokens.shape[1])[None] < lengths[:, None]).flatten().nonzero()[:, 0]


def our_step(model: ClipCap, optimizer, clip, tokens, lengths) -> float:
    loss = model(clip, tokens, real_positions(tokens, lengths))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="finetune,prefix")
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed steps per method (after one warm-up step)")
    args = p.parse_args()

    rng = np.random.default_rng(0)
    all_lengths = coco_like_lengths(20_000, rng)
    global_length = max_caption_length(all_lengths)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"GPT-2 small size, random weights, bs {args.bs}; global padding length of the original: {global_length} "
          f"tokens (mean caption {all_lengths.mean():.1f})")
    batches = []
    for _ in range(args.steps + 1):
        lengths = torch.from_numpy(np.minimum(rng.choice(all_lengths, args.bs), global_length))
        tokens = torch.zeros(args.bs, global_length, dtype=torch.long)
        for row, n in zip(tokens, lengths):
            row[:n] = torch.randint(1, 50257, (int(n),))  # no id 0, so both losses see the same tokens
        batches.append((torch.randn(args.bs, 512), tokens, lengths))

    print(f"{'mode':<9} {'original samples/s':>19} {'ours samples/s':>15} {'ratio':>7} {'|loss diff|':>12}")
    for mode in args.modes.split(","):
        theirs = build(mode)
        if mode == "prefix":  # the original: GPT-2 in eval mode but still requires grad
            theirs.gpt.requires_grad_(True)
        ours = copy.deepcopy(theirs)
        ours.gpt.requires_grad_(not ours.config.only_prefix)
        theirs.train(), ours.train()
        clip, tokens, lengths = batches[0]
        with torch.no_grad():  # equal loss for equal batches, same weights, no dropout
            theirs.eval(), ours.eval()
            k = theirs.config.prefix_length
            mask = torch.cat((torch.ones(args.bs, k), (torch.arange(tokens.shape[1])[None] < lengths[:, None]).float()), 1)
            logits = original_logits(theirs, clip, tokens, mask)[:, k - 1:-1]
            loss_theirs = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), ignore_index=0)
            loss_ours = ours(clip, tokens[:, :int(lengths.max())], real_positions(tokens[:, :int(lengths.max())], lengths))
            theirs.train(), ours.train()
        opt_theirs = torch.optim.AdamW([p for n, p in theirs.named_parameters()
                                        if not (theirs.config.only_prefix and n.startswith("gpt."))], lr=2e-5, eps=1e-6)
        opt_ours = make_optimizer(ours, lr=2e-5)
        spent = {"theirs": 0.0, "ours": 0.0}
        for i, (clip, tokens, lengths) in enumerate(batches):  # interleaved, so machine noise hits both
            start = time.perf_counter()
            original_step(theirs, opt_theirs, clip, tokens, lengths)
            middle = time.perf_counter()
            our_step(ours, opt_ours, clip, tokens[:, :int(lengths.max())], lengths)
            end = time.perf_counter()
            if i > 0:  # the first step warms up
                spent["theirs"] += middle - start
                spent["ours"] += end - middle
        rate = {k: args.steps * args.bs / v for k, v in spent.items()}
        print(f"{mode:<9} {rate['theirs']:>19.2f} {rate['ours']:>15.2f} {rate['ours'] / rate['theirs']:>6.2f}x "
              f"{abs(float(loss_theirs) - float(loss_ours)):>12.2e}")
        del theirs, ours, opt_theirs, opt_ours


if __name__ == "__main__":
    main()
