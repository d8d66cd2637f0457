"""Batched, cached decoding against the original's loops (testing/reference.py) on tiny models."""
import copy

import pytest
import torch

from clipcap.decoding import (
    MAX_SEED,
    DecodingOptions,
    beam_tokens,
    caption_embeddings,
    greedy_tokens,
    nucleus_filter,
    sample_tokens,
    stop_tokens,
)
from clipcap.files import ClipCapError
from clipcap.model import ClipCapConfig, build_model, load_tokenizer
from testing.reference import original_beam, original_greedy

MAX_LENGTH = 24


def stopping_model(gpt2_dir, token: int = 13, **config):
    """A tiny random ClipCap whose GPT-2 emits ``token`` now and then, so captions end at many lengths.

    A random GPT-2 almost never picks "."; scaling that token's (tied) embedding makes its logit
    large in some states and small in others.
    """
    torch.manual_seed(0)
    model = build_model(ClipCapConfig(lm=gpt2_dir, **{"prefix_size": 16, "prefix_length": 4, **config})).eval()
    with torch.no_grad():
        model.gpt.transformer.wte.weight[token] *= 5
    return model


@pytest.fixture(scope="module")
def model(gpt2_dir):
    return stopping_model(gpt2_dir)


@pytest.fixture(scope="module")
def embeds():
    return torch.randn(12, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference_beams(model, embeds):
    return [original_beam(model, e, max_length=MAX_LENGTH) for e in embeds]


def test_greedy_equals_original_generate2(model, embeds):
    expected = [original_greedy(model, e, max_length=MAX_LENGTH) for e in embeds]
    lengths = {len(t) for t in expected}
    assert len(lengths) >= 3 and MAX_LENGTH in lengths  # images stop at different steps, some never
    for batch_size in (1, 5, 12):
        got = [t for i in range(0, 12, batch_size)
               for t in greedy_tokens(model, embeds[i:i + batch_size], max_length=MAX_LENGTH)]
        assert got == expected


@pytest.mark.parametrize("batch_size", [1, 5, 12])
def test_beam_equals_original_generate_beam(model, embeds, reference_beams, batch_size):
    ends = [[tokens[-1] == 13 for tokens, _ in beams] for beams in reference_beams]
    assert any(all(e) for e in ends) and any(any(e) and not all(e) for e in ends)  # finished beams compete
    assert len({len(beams[0][0]) for beams in reference_beams}) >= 3
    got = [b for i in range(0, 12, batch_size)
           for b in beam_tokens(model, embeds[i:i + batch_size], max_length=MAX_LENGTH)]
    assert [[tokens for tokens, _ in beams] for beams in got] == \
           [[tokens for tokens, _ in beams] for beams in reference_beams]
    for beams, ref in zip(got, reference_beams):
        assert [score for _, score in beams] == pytest.approx([score for _, score in ref], abs=1e-5)


def test_beam_options_equal_original(model, embeds):
    """Other beam widths and a temperature, on a batch where beams finish at different steps."""
    for beam_size, temperature in ((3, 1.0), (5, 0.7)):
        expected = [original_beam(model, e, beam_size=beam_size, max_length=12, temperature=temperature)
                    for e in embeds[:6]]
        got = beam_tokens(model, embeds[:6], beam_size=beam_size, max_length=12, temperature=temperature)
        assert [[t for t, _ in b] for b in got] == [[t for t, _ in b] for b in expected]


def test_beam_of_one_is_greedy(model, embeds):
    assert [b[0][0] for b in beam_tokens(model, embeds, beam_size=1, max_length=MAX_LENGTH)] == \
           greedy_tokens(model, embeds, max_length=MAX_LENGTH)


@pytest.mark.parametrize("config", [dict(mapping_type="transformer", prefix_length_clip=3, num_layers=2,
                                         num_heads=4, normalize_prefix=True),
                                    dict(normalize_prefix=True)])
def test_other_mappers_and_normalized_prefix(gpt2_dir, embeds, config):
    model = stopping_model(gpt2_dir, **config)
    scaled = embeds[:6] * torch.linspace(0.5, 3, 6)[:, None]  # normalised: the scale must not matter
    assert greedy_tokens(model, scaled, max_length=16) == greedy_tokens(model, embeds[:6], max_length=16) == \
           [original_greedy(model, e, max_length=16) for e in embeds[:6]]
    assert [b[0][0] for b in beam_tokens(model, scaled, max_length=16)] == \
           [original_beam(model, e, max_length=16)[0][0] for e in embeds[:6]]


def test_stop_on_end_of_text(gpt2_dir, embeds):
    tokenizer = load_tokenizer(gpt2_dir)
    (eos,) = stop_tokens(tokenizer, "eos")
    assert stop_tokens(tokenizer, "period") == (13, eos)  # GPT-2's ".", the original's stop, and end-of-text
    model = stopping_model(gpt2_dir, token=eos)
    expected = [original_greedy(model, e, max_length=16, stop_token=eos) for e in embeds[:6]]
    assert any(t[-1] == eos for t in expected)
    assert greedy_tokens(model, embeds[:6], max_length=16, stop_token=eos) == expected
    texts = caption_embeddings(model, tokenizer, embeds[:6], DecodingOptions("greedy", stop="eos", max_length=16))
    assert [t[0] for t in texts] == [tokenizer.decode(t, skip_special_tokens=True) for t in expected]
    assert not any("<|endoftext|>" in t[0] for t in texts)


def test_caption_embeddings_decodes_the_original_tokens(model, embeds, reference_beams, gpt2_dir):
    tokenizer = load_tokenizer(gpt2_dir)
    beams = caption_embeddings(model, tokenizer, embeds, DecodingOptions(max_length=MAX_LENGTH, num_captions=3),
                               batch_size=5)
    assert beams == [[tokenizer.decode(t) for t, _ in ref[:3]] for ref in reference_beams]
    assert any(text.endswith(".") for text, *_ in beams)  # the stop token is part of the caption, as before
    greedy = caption_embeddings(model, tokenizer, embeds[:4], DecodingOptions("greedy", max_length=MAX_LENGTH))
    assert greedy == [[tokenizer.decode(original_greedy(model, e, max_length=MAX_LENGTH))] for e in embeds[:4]]


def test_nucleus_filter_keeps_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.7, 0.1, 0.1, 0.1]]))
    kept = nucleus_filter(logits, 0.75).isfinite()
    assert kept.tolist() == [[False, True, True, True], [True, True, False, False]]  # 0.5+0.25 < 0.8 needs 0.15
    assert nucleus_filter(logits, 0.6).isfinite().tolist() == [[False, True, False, True], [True] + [False] * 3]
    assert nucleus_filter(logits, 1e-9).isfinite().sum(-1).tolist() == [1, 1]


def test_sampling_is_real_and_reproducible(model, embeds, gpt2_dir):
    tokenizer = load_tokenizer(gpt2_dir)
    run = lambda seed: caption_embeddings(model, tokenizer, embeds[:4], DecodingOptions(
        "sample", num_captions=4, top_p=0.95, seed=seed, max_length=MAX_LENGTH))
    first = run(0)
    assert first == run(0)
    assert first != run(1)
    assert all(len(set(captions)) > 1 for captions in first)  # several different captions per image
    samples = sample_tokens(model, embeds[:4], num_samples=4, top_p=0.95, max_length=MAX_LENGTH,
                            stop_token=stop_tokens(tokenizer, "period"), generator=torch.Generator().manual_seed(0))
    eos = tokenizer.eos_token_id
    assert any(t[-1] == eos for s in samples for t, _ in s)  # a caption that ends at end-of-text is written without it
    for captions, scored in zip(first, samples):  # best first: sorted by mean log-probability
        best_first = sorted(scored, key=lambda s: -s[1])
        assert captions == [tokenizer.decode(t[:-1] if t[-1] == eos else t) for t, _ in best_first]


def test_sampling_with_a_tiny_nucleus_is_greedy(model, embeds):
    samples = sample_tokens(model, embeds, num_samples=2, top_p=1e-9, max_length=MAX_LENGTH,
                            generator=torch.Generator().manual_seed(0))
    greedy = greedy_tokens(model, embeds, max_length=MAX_LENGTH)
    assert [[t for t, _ in s] for s in samples] == [[g, g] for g in greedy]


@pytest.mark.parametrize("fields, message", [
    (dict(strategy="greedy", num_captions=2), "num_captions 2 is not possible with greedy decoding"),
    (dict(strategy="beam", beam_size=3, num_captions=4), "num_captions 4 is not possible with beam decoding and beam size 3"),
    (dict(strategy="sample", num_captions=0), "num_captions 0 is not possible with sample decoding"),
    (dict(strategy="nucleus"), "strategy must be one of beam, greedy, sample, got 'nucleus'"),
    (dict(stop="comma"), "stop must be one of period, eos, got 'comma'"),
    (dict(beam_size=0), "beam_size must be at least 1, got 0"),
    (dict(max_length=0), "max_length must be at least 1, got 0"),
    (dict(strategy="sample", temperature=0), "temperature must be at least 0.01, got 0"),
    (dict(temperature=float("inf")), "temperature must be at least 0.01, got inf"),
    (dict(temperature=float("nan")), "temperature must be at least 0.01, got nan"),
    (dict(top_p=0), "top_p must be in (0, 1], got 0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(seed=-1), "seed must be between 0 and 2**64 - 1, got -1"),
    (dict(seed=MAX_SEED + 1), f"seed must be between 0 and 2**64 - 1, got {MAX_SEED + 1}"),
])
def test_decoding_options_check_themselves(fields, message):
    with pytest.raises(ClipCapError) as error:
        DecodingOptions(**fields)
    assert str(error.value) == message


def test_decoding_options_edges_are_allowed(model, embeds, gpt2_dir):
    """The extremes each check allows give captions (the largest seed torch.Generator takes, top_p = 1 ...)."""
    tokenizer = load_tokenizer(gpt2_dir)
    for options in (DecodingOptions("sample", seed=MAX_SEED, top_p=1.0, temperature=0.01, num_captions=3),
                    DecodingOptions("beam", beam_size=2, num_captions=2, temperature=0.01),
                    DecodingOptions("greedy", max_length=1)):
        captions = caption_embeddings(model, tokenizer, embeds[:2], options)
        assert [len(c) for c in captions] == [options.num_captions] * 2


def test_max_length_must_fit_the_model(model, embeds, gpt2_dir):
    with pytest.raises(ClipCapError, match="max_length must be between 1 and"):
        caption_embeddings(model, load_tokenizer(gpt2_dir), embeds[:1], DecodingOptions(max_length=500))


def test_embedding_width_must_match(model, gpt2_dir):
    with pytest.raises(ClipCapError, match=r"takes \[N, 16\]"):
        caption_embeddings(model, load_tokenizer(gpt2_dir), torch.randn(2, 512))


@pytest.mark.parametrize("fields, name, count", [({}, "beam_size", 1),
                                                 (dict(strategy="sample"), "num_captions", 100_000)])
def test_options_beyond_the_vocabulary_are_one_line(model, embeds, gpt2_dir, fields, name, count):
    from clipcap.decoding import check_options

    vocab = model.gpt.config.vocab_size
    options = DecodingOptions(**fields, **{name: vocab + count})
    with pytest.raises(ClipCapError) as error:
        check_options(model, options)
    assert str(error.value) == f"{name} {vocab + count} is over the model's vocabulary of {vocab} tokens"
    with pytest.raises(ClipCapError, match=str(error.value)):
        caption_embeddings(model, load_tokenizer(gpt2_dir), embeds[:1], options)
    check_options(model, DecodingOptions(**fields, **{name: vocab}))  # the vocabulary itself is allowed


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_draws_on_the_model_device(model, embeds, device):
    """Each step draws from the tempered nucleus with the generator where the model is (no copy of the
    [N, vocab] probabilities to the CPU): the same tokens as drawing by hand, one step at a time, without cache."""
    on_device = copy.deepcopy(model).to(device)
    samples = sample_tokens(on_device, embeds[:2], num_samples=3, top_p=0.8, temperature=0.7, max_length=8,
                            generator=torch.Generator(device).manual_seed(5))
    generator = torch.Generator(device).manual_seed(5)
    rows = [[] for _ in range(6)]
    prefix = on_device.prefix(embeds[:2].to(device)).repeat_interleave(3, dim=0)
    for _ in range(8):
        going = [i for i, tokens in enumerate(rows) if not tokens or tokens[-1] != 13]
        if not going:
            break
        tokens = torch.tensor([rows[i] for i in going], dtype=torch.long, device=device).view(len(going), -1)
        inputs = torch.cat((prefix[going], on_device.gpt.transformer.wte(tokens)), dim=1)
        with torch.no_grad():
            logits = on_device.gpt(inputs_embeds=inputs).logits[:, -1].float() / 0.7
        drawn = torch.multinomial(nucleus_filter(logits, 0.8).softmax(-1), 1, generator=generator).squeeze(1)
        for i, token in zip(going, drawn.tolist()):
            rows[i].append(token)
    assert [tokens for image in samples for tokens, _ in image] == rows
    if device != "cpu":
        with pytest.raises(ClipCapError, match="needs a generator there"):
            sample_tokens(on_device, embeds[:1], generator=torch.Generator("cpu"))
