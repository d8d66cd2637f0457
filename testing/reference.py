"""The original's two decoders, step for step: the slow reference for clipcap.decoding.

No key/value cache (the LM runs over the prompt and every token so far at each step), one image
at a time, the arithmetic of the original's ``generate2`` and ``generate_beam``
(docs/original.md). For GPT-2 and the stop token 13 they are the original's loops; for another
LM they run the same rules over its prompt (:meth:`clipcap.model.ClipCap.prompt_embeds`) and
embeddings. The tests hold the fast decoders against these; the benchmark times both.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _stopped(token: torch.Tensor, stop_token: int | Sequence[int]) -> torch.Tensor:
    return torch.isin(token, torch.tensor([stop_token] if isinstance(stop_token, int) else list(stop_token)))


@torch.no_grad()
def original_greedy(model, clip_embed: torch.Tensor, max_length: int = 67, stop_token: int | Sequence[int] = 13,
                    top_p: float = 0.8, temperature: float = 1.0) -> list[int]:
    """``generate2`` for one embedding [D]: top-p filter, then argmax, until the stop token."""
    generated = model.prompt_embeds(clip_embed[None])
    tokens: list[int] = []
    for _ in range(max_length):
        logits = model.gpt(inputs_embeds=generated).logits[:, -1, :].float() / (temperature if temperature > 0 else 1.0)
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(sorted_logits.softmax(-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[:, sorted_indices[remove]] = float("-inf")
        token = int(logits.argmax(-1))
        tokens.append(token)
        generated = torch.cat((generated, model.token_embeds(torch.tensor([[token]]))), dim=1)
        if _stopped(torch.tensor(token), stop_token):
            break
    return tokens


@torch.no_grad()
def original_beam(model, clip_embed: torch.Tensor, beam_size: int = 5, max_length: int = 67,
                  stop_token: int | Sequence[int] = 13, temperature: float = 1.0) -> list[tuple[list[int], float]]:
    """``generate_beam`` for one embedding [D]: the beams best first, as (tokens, sum / length)."""
    generated = model.prompt_embeds(clip_embed[None])
    lengths = torch.ones(beam_size)
    stopped = torch.zeros(beam_size, dtype=torch.bool)
    tokens = scores = None
    for _ in range(max_length):
        logits = model.gpt(inputs_embeds=generated).logits[:, -1, :].float()
        log_probs = (logits / (temperature if temperature > 0 else 1.0)).softmax(-1).log()
        if scores is None:
            scores, next_tokens = log_probs.topk(beam_size, -1)
            scores, next_tokens = scores.squeeze(0), next_tokens.permute(1, 0)
            generated = generated.expand(beam_size, *generated.shape[1:])
            tokens = next_tokens
        else:
            log_probs[stopped] = float("-inf")
            log_probs[stopped, 0] = 0
            sums = scores[:, None] + log_probs
            lengths[~stopped] += 1
            averages, flat = (sums / lengths[:, None]).view(-1).topk(beam_size, -1)
            source = flat // sums.shape[1]
            lengths = lengths[source]
            next_tokens = (flat % sums.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[source], next_tokens), dim=1)
            generated = generated[source]
            scores = averages * lengths
            stopped = stopped[source]
        embeds = model.token_embeds(next_tokens.squeeze(1)).view(generated.shape[0], 1, -1)
        generated = torch.cat((generated, embeds), dim=1)
        stopped = stopped | _stopped(next_tokens, stop_token).squeeze(1)
        if stopped.all():
            break
    scores = scores / lengths
    order = scores.argsort(descending=True)
    return [(tokens[i, :int(lengths[i])].tolist(), float(scores[i])) for i in order.tolist()]


def original_logits(model, clip_embeds: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original's forward: the LM over prompt and caption under an attention mask, logits [B, P + T, V]."""
    embeds = torch.cat((model.prompt_embeds(clip_embeds), model.token_embeds(tokens)), dim=1)
    return model.gpt(inputs_embeds=embeds, attention_mask=mask).logits


def full_logits_loss(model, clip_embeds: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                     reduction: str = "mean") -> torch.Tensor:
    """The plain computation the fast loss must equal: logits everywhere under a mask, cross-entropy
    over the real tokens only."""
    k, width = model.prompt_length, tokens.shape[1]
    real = torch.arange(width)[None] < lengths[:, None]
    mask = torch.cat((torch.ones(len(tokens), k), real.float()), dim=1)
    logits = original_logits(model, clip_embeds, tokens, mask)[:, k - 1:-1]
    targets = tokens.masked_fill(~real, -100)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.flatten(),
                                             ignore_index=-100, reduction=reduction)
