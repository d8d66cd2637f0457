"""What training reads: features by path, the token cache, truncation and per-batch padding."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import caption_corpus, write_feature_pickle

from clipcap.data import CaptionDataset, load_features, max_caption_length, tokenize_captions, tokens_cache_path
from clipcap.files import ClipCapError
from clipcap.model import load_tokenizer
from testing.tiny import train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_token_cache_is_reused_and_invalidated(tmp_path, gpt2_dir):
    tokenizer = load_tokenizer(gpt2_dir)
    cache = tokens_cache_path(tmp_path / "train.pkl")
    assert cache == tmp_path / "train_tokens.npz"
    captions = ["a red circle.", "a dog on a bench!"]
    ids, offsets = tokenize_captions(captions, tokenizer, cache)
    assert cache.is_file()
    assert ids[offsets[1]:offsets[2]].tolist() == tokenizer.encode("a dog on a bench!")
    stamp = cache.stat().st_mtime_ns
    tokenize_captions(captions, tokenizer, cache)
    assert cache.stat().st_mtime_ns == stamp  # reused
    ids2, offsets2 = tokenize_captions(["a blue square."], tokenizer, cache)  # data changed
    assert ids2.tolist() == tokenizer.encode("a blue square.") and cache.stat().st_mtime_ns != stamp
    other = train_tokenizer(["zebra crossing."] * 5, vocab_size=300)  # tokenizer changed
    ids3, _ = tokenize_captions(["a blue square."], other, cache)
    assert ids3.tolist() == other.encode("a blue square.")


def test_truncation_rule():
    lengths = np.array([10] * 999 + [1000])
    expected = int(min(lengths.mean() + 10 * lengths.std(), lengths.max()))
    assert max_caption_length(lengths) == expected < 1000
    assert max_caption_length(lengths, limit=20) == 20
    assert max_caption_length(np.array([5, 7])) == 7


def test_dataset_truncates_within_gpt2_positions(tmp_path, gpt2_dir):
    long = " ".join(["a red circle"] * 80) + "."
    path = write_feature_pickle(tmp_path / "f.pkl", [[long], ["a cat."]])
    features, tokenizer = load_features(path), load_tokenizer(gpt2_dir)
    dataset = CaptionDataset(features, tokenizer, max_positions=30)
    assert dataset.max_length == 30
    tokens, lengths, _, positions = dataset[range(len(dataset))]
    assert tokens.shape[1] == 30 and len(positions) == int(lengths.sum())
    for row, n, caption in zip(tokens, lengths, features.captions):
        assert row[:n].tolist() == tokenizer.encode(caption)[:30]


def test_a_batch_is_its_captions_padded_to_the_longest(gpt2_dir, tmp_path):
    corpus = caption_corpus()
    captions = [corpus[0], "a cat.", corpus[-2], "two dogs!"]
    path = write_feature_pickle(tmp_path / "f.pkl", [[c] for c in captions])
    features, tokenizer = load_features(path), load_tokenizer(gpt2_dir)
    dataset = CaptionDataset(features, tokenizer)
    order = [2, 1, 3]
    tokens, lengths, embeds, positions = dataset[order]
    expected = [tokenizer.encode(features.captions[i]) for i in order]
    assert torch.equal(tokens.flatten()[positions], torch.tensor([t for e in expected for t in e]))
    assert lengths.tolist() == [len(e) for e in expected]
    assert tokens.shape == (3, max(map(len, expected))) and tokens.dtype == torch.long
    for row, e in zip(tokens, expected):
        assert row[:len(e)].tolist() == e and not row[len(e):].any()
    assert torch.equal(embeds, features.embeddings_at(features.image_index[order]))


def test_padding_is_ignored_and_exclamation_mark_is_learned(gpt2_dir):
    """Padding never changes the loss; the real token "!" (id 0, the original's pad id) does."""
    from clipcap.model import ClipCapConfig, build_model

    tokenizer = load_tokenizer(gpt2_dir)
    assert tokenizer.encode("!") == [0]
    torch.manual_seed(0)
    model = build_model(ClipCapConfig(gpt2=gpt2_dir, prefix_size=16, prefix_length=2)).eval()
    clip = torch.randn(1, 16)
    caption = torch.tensor([tokenizer.encode("a dog!")])
    n = caption.shape[1]
    padded = torch.cat((caption, torch.full((1, 5), 7)), dim=1)
    positions = torch.arange(n)
    base = model(clip, caption, positions)
    torch.testing.assert_close(model(clip, padded, positions), base)
    other_end = caption.clone()
    other_end[0, -1] = tokenizer.encode(".")[0]
    assert not torch.isclose(model(clip, other_end, positions), base)


def test_token_cache_of_a_read_only_data_folder_goes_to_the_user_cache(tmp_path):
    # chmod stops no write by root: as root the folder is made read-only by a bind mount in a
    # private mount namespace instead. The script first proves that it cannot write there.
    data, cache_home = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    write_feature_pickle(data / "train.pkl", [["a dog on a bench.", "a cat."], ["a cow."]])
    script = f"""
from pathlib import Path
from clipcap.data import load_features, tokenize_captions, tokens_cache_path
from testing.tiny import train_tokenizer
data = Path({str(data)!r})
try:
    (data / "probe").write_text("")
    raise SystemExit("the data folder is writable: the test proves nothing")
except OSError:
    pass
tokenizer = train_tokenizer(["a dog on a bench.", "a cat.", "a cow."] * 5, vocab_size=300)
cache = tokens_cache_path(data / "train.pkl")
ids, _ = tokenize_captions(load_features(data / "train.pkl").captions, tokenizer, cache)
assert cache.is_file() and len(ids) > 0
"""
    command = [sys.executable, "-c", script]
    if os.geteuid() == 0:
        read_only = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(data)]
        if shutil.which("unshare") is None or subprocess.run([*read_only, "true"]).returncode != 0:
            pytest.skip("running as root without mount namespaces: no way to make a folder read-only")
        command = [*read_only, *command]
    else:
        data.chmod(0o555)
    try:
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "XDG_CACHE_HOME": str(cache_home)})
    finally:
        data.chmod(0o755)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    cached = list((cache_home / "clipcap" / "tokens").glob("train_*_tokens.npz"))
    assert len(cached) == 1
    assert f"{data} is not writable: caption tokens cached in {cached[0]}" in run.stdout
    assert sorted(p.name for p in data.iterdir()) == ["train.pkl"]


def test_blank_captions_are_refused_as_empty_ones(tmp_path, gpt2_dir):
    """Readers drop empty and whitespace-only captions; a feature file holding one is refused, naming it."""
    tokenizer = load_tokenizer(gpt2_dir)
    for blank in ["", " \t\n", "\u3000"]:
        path = write_feature_pickle(tmp_path / "f.pkl", [["a cat.", blank], ["a dog."]])
        features = load_features(path)
        i = features.captions.index(blank)
        with pytest.raises(ClipCapError, match=re.escape(f"{path}: caption {i} (image id 1000) is empty or only "
                                                         "whitespace")):
            CaptionDataset(features, tokenizer, source=path)
