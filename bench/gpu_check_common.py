"""What bench/gpu_check.py's checks share: a check's result, the run's context, and the backbones and data.

The backbones are tiny random ones built from configs (testing/tiny.py) unless ``--real`` asks for
GPT-2 and CLIP ViT-B/32 from the local Hugging Face cache; the training data are synthetic
COCO-like captions with random embeddings, in the original's pickle format.
"""
from __future__ import annotations

import contextlib
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from bench_train_throughput import WORDS, coco_like_captions, write_features

from clipcap import resnet_clip
from clipcap.files import ClipCapError, atomic_write

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout's testing/, which is not installed
from testing.tiny import make_tiny_clip, make_tiny_gpt2, make_tiny_resnet_clip  # noqa: E402

PASS, FAIL, SKIPPED = "pass", "FAIL", "skipped"
REAL_GPT2, REAL_VIT = "gpt2", "openai/clip-vit-base-patch32"
FETCH = {REAL_GPT2: "from transformers import GPT2LMHeadModel as M; M.from_pretrained('gpt2'); "
                    "from clipcap.model import load_tokenizer; load_tokenizer('gpt2')",
         REAL_VIT: "from clipcap.encoder import load_image_encoder; load_image_encoder('openai/clip-vit-base-patch32')"}


@dataclass
class Check:
    """One line of the table: what was checked, whether it held, and what was measured."""

    group: str
    name: str
    status: str  # PASS, FAIL or SKIPPED
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


def verdict(group: str, name: str, problems: list[str], detail: str, figures: dict[str, Any]) -> Check:
    """PASS with ``detail``, or FAIL naming the problems."""
    if problems:
        return Check(group, name, FAIL, "; ".join(problems), figures)
    return Check(group, name, PASS, detail, figures)


@dataclass
class Backbones:
    """The models every check runs: a GPT-2 folder or hub name, a Hugging Face CLIP, an OpenAI ResNet CLIP file."""

    gpt2: str
    vit_clip: str
    resnet_clip: str
    dim: int  # the ViT CLIP's embedding width: the training features' width
    real: bool
    notes: list[str] = field(default_factory=list)


def tiny_backbones(folder: Path) -> Backbones:
    """Random tiny GPT-2 (with dropout, so that a resume must restore the RNGs), ViT CLIP and ResNet CLIP."""
    corpus = coco_like_captions(500) + [" ".join(WORDS)]
    gpt2 = make_tiny_gpt2(folder / "gpt2", corpus, n_embd=32, n_layer=2, n_positions=128, vocab_size=400)
    vit = make_tiny_clip(folder / "clip_vit", image_size=32, projection_dim=16, initializer_factor=4.0)
    return Backbones(str(gpt2), str(vit), tiny_resnet_clip(folder), 16, real=False)


def tiny_resnet_clip(folder: Path) -> str:
    """A random OpenAI ResNet CLIP file whose BatchNorm variances lie beyond float16's range (65,504), as
    trained ResNets' do. Each BatchNorm weight is scaled to match, so that float32 computes the same
    embeddings: a tower cast to float16 whole then divides by infinity, one that keeps BatchNorm in
    float32 (as OpenAI's does) does not."""
    path = make_tiny_resnet_clip(folder / "clip_rn.pt", image_size=64, width=16, output_dim=24)
    state = torch.load(path, map_location="cpu", weights_only=True)
    factor = 1e5
    for key in [k for k in state if k.endswith(".running_var")]:
        state[key] = state[key] * factor
        weight = key.removesuffix("running_var") + "weight"
        state[weight] = state[weight] * math.sqrt(factor)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return str(path)


def check_real_cache() -> None:
    """--real needs GPT-2 and CLIP ViT-B/32 in the local Hugging Face cache (this machine may be offline)."""
    from huggingface_hub import try_to_load_from_cache

    missing = [name for name in (REAL_GPT2, REAL_VIT)
               if not isinstance(try_to_load_from_cache(name, "config.json"), str)]
    if missing:
        fetch = "; ".join(FETCH[name] for name in missing)
        raise ClipCapError(f"--real: {' and '.join(missing)} not in the local Hugging Face cache; fetch with "
                           f"python -c \"{fetch}\" where the Hub can be reached (the cache: $HF_HOME, "
                           "~/.cache/huggingface by default), or drop --real")


def real_backbones(folder: Path) -> Backbones:
    """GPT-2 and CLIP ViT-B/32 from the local Hugging Face cache, OpenAI's RN50 from its cache (else a tiny one)."""
    rn50 = resnet_clip.CACHE / resnet_clip.URLS["RN50"].split("/")[-1]
    if rn50.is_file():
        return Backbones(REAL_GPT2, REAL_VIT, str(rn50), 512, real=True)
    return Backbones(REAL_GPT2, REAL_VIT, tiny_resnet_clip(folder), 512, real=True,
                     notes=[f"OpenAI's RN50 is not in {resnet_clip.CACHE}: the ResNet checks use a tiny one"])


def training_features(folder: Path, dim: int, n_captions: int) -> str:
    """A feature pickle of COCO-like captions (5 per image) with random ``dim``-wide embeddings."""
    path = folder / f"features_{dim}d_{n_captions}.pkl"
    if not path.exists():
        write_features(path, coco_like_captions(n_captions), dim)
    return str(path)


@dataclass
class Context:
    """What every check needs: where it runs, with what, and where its scratch files and logs go."""

    device: str  # "cuda", or "cpu" for the rehearsal the test suite runs
    processes: int  # processes of the torchrun checks; fewer than 2 skips them
    backbones: Backbones
    work: Path  # scratch, deleted at the end
    logs: Path  # each check's own output, kept beside the report
    steps: int  # training steps of each mode
    size: str  # GPT-2 shapes of the Table 1 projections: "small" (the paper's) or "tiny"
    compile_backend: str | None = None  # torch.compile's backend (None: inductor)
    training_modes: list[str] | None = None  # the training modes to run, by name (None: all)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


@contextlib.contextmanager
def logged(path: Path) -> Iterator[io.TextIOBase]:
    """Send what the project prints (progress bars, log lines) to ``path``, so that the table stays readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield log


def failure(e: BaseException) -> str:
    """An exception as one line for the table."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def print_line(check: Check) -> None:
    figures = ", ".join(f"{k} {v}" for k, v in check.figures.items() if v is not None)
    print(f"{check.status:>7}  {check.group}: {check.name}  {check.detail}" + (f"  [{figures}]" if figures else ""),
          flush=True)
