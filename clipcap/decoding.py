"""Caption decoding: greedy, beam search and nucleus sampling, all in one place.

The original decodes one image at a time and re-runs GPT-2 over the whole sequence at every
step. Here the LM keeps its key/value cache (transformers' ``DynamicCache``, which every causal
LM takes), and all images (times beams or samples) of a batch go through one forward pass per
step; an image leaves the batch as soon as it is finished, so its result is exactly what it
would be alone. For the same weights, ``greedy_tokens`` gives token for token the original's
``generate2`` (whose top-p filter is followed by an argmax, so it is greedy) and ``beam_tokens``
the original's ``generate_beam``, rules and arithmetic included; testing/reference.py holds
both against slow re-implementations of the original loops, for GPT-2 and every other LM.
``sample_tokens`` is real nucleus sampling, which the original never did.

A caption ends at a stop token: the LM's "." (the original's rule) or its end-of-text token, or
with ``stop="eos"`` at end-of-text only. ClipCap trains no end-of-text token (captions end with
"."), so a trained model says "." first; a frozen pretrained LM may end its text instead.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, get_args

import torch
from tqdm import tqdm
from transformers import DynamicCache

from . import lm as lms
from .files import ClipCapError
from .model import ClipCap

Strategy = Literal["beam", "greedy", "sample"]
Stop = Literal["period", "eos"]
STRATEGIES, STOPS = get_args(Strategy), get_args(Stop)
MIN_TEMPERATURE = 0.01  # below this the scaled logits overflow float32 and sampling gives NaN
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator takes

PERIOD = 13  # GPT-2's ".", the original's stop token


@functools.cache
def cache_argument(lm_class: type) -> str:
    """transformers renamed the cache argument within 5.x (past_key_values -> cache) and ignores an
    unknown keyword silently, which would decode without the cache: ask this LM's signature."""
    return "cache" if "cache" in inspect.signature(lm_class.forward).parameters else "past_key_values"

# A caption as token ids and its score: the mean log-probability per token (the beam's sum / length).
Scored = tuple[list[int], float]


@dataclass(frozen=True)
class DecodingOptions:
    """How to turn a prefix into captions; checked when made, so bad settings fail before any work.

    ``temperature`` divides the logits of beam search (as the original's did) and of sampling;
    greedy decoding ignores it. ``num_captions`` per image, best first (sampled captions ranked by
    mean log-probability). A ``seed`` makes sampling reproducible for the same batch size and
    device (each device type draws its own random numbers). ``max_length`` is the most tokens per
    caption; ``stop`` ends a caption at the LM's "." or its end-of-text token (``period``: the
    original's rule, and end-of-text) or at end-of-text only (``eos``). What depends on the model
    (the vocabulary, the LM's positions) is checked by :func:`check_options`.
    """

    strategy: Strategy = "beam"
    beam_size: int = 5
    temperature: float = 1.0
    top_p: float = 0.9
    num_captions: int = 1
    seed: int | None = None
    max_length: int = 67
    stop: Stop = "period"

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, rule: str) -> None:
            if not ok:
                raise ClipCapError(f"{field} must be {rule}, got {getattr(self, field)!r}")

        check(self.strategy in STRATEGIES, "strategy", f"one of {', '.join(STRATEGIES)}")
        check(self.stop in STOPS, "stop", f"one of {', '.join(STOPS)}")
        check(self.beam_size >= 1, "beam_size", "at least 1")
        check(self.max_length >= 1, "max_length", "at least 1")
        check(MIN_TEMPERATURE <= self.temperature < float("inf"), "temperature", f"at least {MIN_TEMPERATURE}")
        check(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        check(self.seed is None or 0 <= self.seed <= MAX_SEED, "seed", "between 0 and 2**64 - 1")
        most = {"greedy": 1, "beam": self.beam_size}.get(self.strategy)
        if self.num_captions < 1 or (most is not None and self.num_captions > most):
            raise ClipCapError(f"num_captions {self.num_captions} is not possible with {self.strategy} decoding"
                               + (f" and beam size {self.beam_size}" if self.strategy == "beam" else ""))


def stop_tokens(tokenizer: Any, stop: str) -> tuple[int, ...]:
    """``period``: the LM's "." token (GPT-2's 13, the original's rule) and its end-of-text token;
    ``eos``: end-of-text alone."""
    if stop not in STOPS:
        raise ClipCapError(f"stop must be one of {STOPS}, got {stop!r}")
    eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    if stop == "eos":
        if not eos:
            raise ClipCapError(f"LM {tokenizer.name_or_path}: its tokenizer has no end-of-text token; "
                               "use --stop period")
        return eos
    return (lms.period_token(tokenizer),) + eos


def check_options(model: ClipCap, options: DecodingOptions) -> None:
    """What ``options`` ask of this model, checked before any work: the length fits the LM's positions,
    and the beams (or samples) per image are at most its vocabulary."""
    _check_length(model, options.max_length)
    if options.strategy == "beam":
        _check_vocabulary(model, options.beam_size, "beam_size")
    _check_vocabulary(model, options.num_captions, "num_captions")


def _check_length(model: ClipCap, max_length: int) -> None:
    positions = lms.max_positions(model.gpt.config)
    if max_length < 1:
        raise ClipCapError(f"max_length must be at least 1, got {max_length}")
    if positions is not None and max_length > positions - model.prompt_length:
        raise ClipCapError(f"max_length must be between 1 and {positions - model.prompt_length} (the LM's "
                           f"{positions} positions minus the prefix of {model.prompt_length}), got {max_length}")


def _check_vocabulary(model: ClipCap, count: int, name: str) -> None:
    """Beam search starts from the top ``count`` tokens, so at most the vocabulary; more samples per image
    than tokens is a typo that would fill the memory (each is a row of the LM's batch)."""
    vocab = model.gpt.config.vocab_size
    if count > vocab:
        raise ClipCapError(f"{name} {count} is over the model's vocabulary of {vocab} tokens")


def model_device(model: ClipCap) -> torch.device:
    return next(model.parameters()).device


def _start(model: ClipCap, clip_embeds: torch.Tensor, repeats: int = 1) -> tuple[torch.Tensor, DynamicCache]:
    """Run the LM over the prompts (its BOS, if it takes one, and the prefix): next-token logits
    [B * repeats, V] (float32) and the cache, rows repeated in place."""
    cache = DynamicCache(config=model.gpt.config)
    prompt = model.prompt_embeds(clip_embeds.to(model_device(model)))
    logits = model.gpt(inputs_embeds=prompt, **{cache_argument(type(model.gpt)): cache}, use_cache=True,
                       logits_to_keep=1).logits[:, -1].float()
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        logits = logits.repeat_interleave(repeats, dim=0)
    return logits, cache


def _step(model: ClipCap, tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Feed one new token per row [N]; next-token logits [N, V] (float32)."""
    return model.gpt(input_ids=tokens[:, None], **{cache_argument(type(model.gpt)): cache},
                     use_cache=True).logits[:, -1].float()


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # softmax().log() rather than log_softmax: the original's arithmetic, so near-ties break the same way.
    return (logits / (temperature if temperature > 0 else 1.0)).softmax(-1).log()


def _stops(stop_token: int | Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([stop_token] if isinstance(stop_token, int) else list(stop_token), device=device)


def _extend(model: ClipCap, clip_embeds: torch.Tensor, choose: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
            repeats: int, max_length: int, stop_token: int | Sequence[int]) -> list[Scored]:
    """One token per row per step, picked by ``choose(logits) -> (tokens, log-probs)``, until each row stops.

    Rows are the images, each repeated ``repeats`` times; a row that emits a stop token
    (kept in its caption) leaves the batch and the cache.
    """
    logits, cache = _start(model, clip_embeds, repeats)
    stops = _stops(stop_token, logits.device)
    rows = torch.arange(logits.shape[0])  # which output row each batch row is
    tokens: list[list[int]] = [[] for _ in range(logits.shape[0])]
    totals = torch.zeros(logits.shape[0], dtype=torch.float64)
    for step in range(max_length):
        next_tokens, log_probs = choose(logits)
        for row, token in zip(rows.tolist(), next_tokens.tolist()):
            tokens[row].append(token)
        totals[rows] += log_probs.double().cpu()
        going = (~torch.isin(next_tokens, stops)).nonzero().squeeze(1)
        if step == max_length - 1 or going.numel() == 0:
            break
        if going.numel() < len(rows):
            rows = rows[going.cpu()]
            next_tokens = next_tokens[going]
            cache.batch_select_indices(going)
        logits = _step(model, next_tokens, cache)
    return [(t, float(total) / len(t)) for t, total in zip(tokens, totals)]


@torch.no_grad()
def greedy_tokens(model: ClipCap, clip_embeds: torch.Tensor, *, max_length: int = 67,
                  stop_token: int | Sequence[int] = PERIOD) -> list[list[int]]:
    """The most likely token at each step, per image: the original's ``generate2``."""
    _check_length(model, max_length)

    def argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = logits.argmax(-1)
        return tokens, logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)

    return [tokens for tokens, _ in _extend(model, clip_embeds, argmax, 1, max_length, stop_token)]


def nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep, per row, the most likely tokens until their probability reaches ``top_p``; the rest get -inf.

    A token is kept when the mass of the tokens more likely than it is below ``top_p``, so the
    top token always stays (the original's rule, which it then followed with an argmax).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs > top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def sample_tokens(model: ClipCap, clip_embeds: torch.Tensor, *, num_samples: int = 1, top_p: float = 0.9,
                  temperature: float = 1.0, max_length: int = 67, stop_token: int | Sequence[int] = PERIOD,
                  generator: torch.Generator | None = None) -> list[list[Scored]]:
    """``num_samples`` nucleus samples per image, each with its mean log-probability under the tempered model.

    Tokens are drawn where the model is, so ``generator`` must be on the model's device.
    """
    _check_length(model, max_length)
    _check_vocabulary(model, num_samples, "num_samples")
    if not 0 < top_p <= 1 or temperature <= 0:
        raise ClipCapError(f"sampling needs 0 < top_p <= 1 and temperature > 0, got {top_p} and {temperature}")
    device = model_device(model)
    if generator is not None and generator.device.type != device.type:
        raise ClipCapError(f"sampling on {device} needs a generator there, got one on {generator.device}")

    def sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float() / temperature
        probs = nucleus_filter(logits, top_p).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return tokens, logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)

    flat = _extend(model, clip_embeds, sample, num_samples, max_length, stop_token)
    return [flat[i:i + num_samples] for i in range(0, len(flat), num_samples)]


@torch.no_grad()
def beam_tokens(model: ClipCap, clip_embeds: torch.Tensor, *, beam_size: int = 5, max_length: int = 67,
                stop_token: int | Sequence[int] = PERIOD, temperature: float = 1.0) -> list[list[Scored]]:
    """Beam search per image, beams best first: the original's ``generate_beam``, batched.

    Step 0 takes the top ``beam_size`` tokens. At each later step every beam proposes every
    token, scored by (sum of its log-probabilities) / (its length); a finished beam (one that
    emitted a stop token) proposes only token 0, at zero cost and without growing, so it
    keeps its score and competes with the others. The best ``beam_size`` proposals over all
    beams survive. An image is done when all its beams are finished; the result is its beams
    sorted by score, each cut to its length.

    Only unfinished beams go through the LM (a finished beam's proposal needs no logits), so
    the cache holds one row per unfinished beam, in (image, beam) order.
    """
    _check_length(model, max_length)
    _check_vocabulary(model, beam_size, "beam_size")
    w = beam_size
    logits, cache = _start(model, clip_embeds)
    scores, first = _log_probs(logits, temperature).topk(w, -1)  # [B, W]
    vocab, device = logits.shape[-1], first.device
    stops = _stops(stop_token, device)
    tokens = first[:, :, None]  # [A, W, T]: the beams of the active images
    lengths = torch.ones(first.shape, device=device, dtype=scores.dtype)
    finished = torch.isin(first, stops)
    cache.reorder_cache((~finished).flatten().nonzero().squeeze(1) // w)
    images = torch.arange(first.shape[0])  # which input image each active image is
    results: list[list[Scored]] = [[] for _ in range(first.shape[0])]

    def retire(done: torch.Tensor) -> None:
        for i in done.nonzero().squeeze(1).tolist():
            final = scores[i] / lengths[i]
            results[int(images[i])] = [(tokens[i, j, :int(lengths[i, j])].tolist(), float(final[j]))
                                       for j in final.argsort(descending=True).tolist()]

    for _ in range(1, max_length):
        done = finished.all(-1)
        if done.any():  # a done image has no cache rows left
            retire(done)
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            images, tokens, scores = images[keep.cpu()], tokens[keep], scores[keep]
            lengths, finished = lengths[keep], finished[keep]
        a = tokens.shape[0]
        alive = (~finished).flatten().nonzero().squeeze(1)  # the cache's rows
        step = _log_probs(_step(model, tokens[:, :, -1].flatten()[alive], cache), temperature)
        log_probs = torch.full((a * w, vocab), float("-inf"), device=device, dtype=step.dtype)
        log_probs[:, 0] = 0.0  # what a finished beam proposes
        log_probs[alive] = step
        sums = scores[:, :, None] + log_probs.view(a, w, vocab)
        lengths = lengths + (~finished).to(lengths.dtype)
        best, index = (sums / lengths[:, :, None]).view(a, -1).topk(w, -1)
        source, token = index // vocab, index % vocab
        lengths = lengths.gather(1, source)
        scores = best * lengths
        tokens = torch.cat((tokens.gather(1, source[:, :, None].expand(-1, -1, tokens.shape[2])),
                            token[:, :, None]), dim=2)
        finished = finished.gather(1, source) | torch.isin(token, stops)
        row_of = torch.full((a * w,), -1, dtype=torch.long, device=device)
        row_of[alive] = torch.arange(len(alive), device=device)
        cache.reorder_cache(row_of[source + torch.arange(a, device=device)[:, None] * w][~finished])
    retire(torch.ones(len(images), dtype=torch.bool))
    return results


def caption_embeddings(model: ClipCap, tokenizer: Any, clip_embeds: torch.Tensor,
                       options: DecodingOptions = DecodingOptions(), batch_size: int = 16,
                       progress: bool = False) -> list[list[str]]:
    """Captions for CLIP embeddings [N, D]: ``options.num_captions`` per embedding, best first.

    ``batch_size`` images go through the LM together (times ``beam_size`` or ``num_captions`` rows).
    A caption that ends at end-of-text is written without it.
    """
    if clip_embeds.ndim != 2 or clip_embeds.shape[1] != model.config.prefix_size:
        raise ClipCapError(f"CLIP embeddings of shape {tuple(clip_embeds.shape)} do not fit the model, "
                           f"which takes [N, {model.config.prefix_size}]")
    check_options(model, options)
    o = options
    stop_token = stop_tokens(tokenizer, o.stop)
    eos = tokenizer.eos_token_id
    generator = torch.Generator(model_device(model)).manual_seed(o.seed) if o.seed is not None else None
    captions: list[list[str]] = []
    for start in tqdm(range(0, len(clip_embeds), batch_size), desc="captioning", unit="batch",
                      disable=not progress):
        batch = clip_embeds[start:start + batch_size]
        if o.strategy == "greedy":
            scored = [[(t, 0.0)] for t in greedy_tokens(model, batch, max_length=o.max_length, stop_token=stop_token)]
        elif o.strategy == "beam":
            scored = beam_tokens(model, batch, beam_size=o.beam_size, max_length=o.max_length,
                                 stop_token=stop_token, temperature=o.temperature)
        else:
            scored = [sorted(s, key=lambda c: -c[1]) for s in sample_tokens(
                model, batch, num_samples=o.num_captions, top_p=o.top_p, temperature=o.temperature,
                max_length=o.max_length, stop_token=stop_token, generator=generator)]
        captions.extend([tokenizer.decode(t[:-1] if t[-1:] == [eos] else t, skip_special_tokens=o.stop == "eos")
                         for t, _ in s[:o.num_captions]] for s in scored)
    return captions
