"""The feature store: round trips with the original's pickle, on-demand reads, clear errors."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from clipcap import store
from clipcap.data import CaptionDataset, load_features
from clipcap.featureset import load_original_pickle, save_original_pickle
from clipcap.files import ClipCapError
from clipcap.store import load_store


def test_pickle_store_pickle_round_trip(feature_pickle, tmp_path):
    original = load_original_pickle(feature_pickle)
    store.from_pickle(feature_pickle, tmp_path / "store")
    assert len(list((tmp_path / "store" / "shards").glob("*.npy"))) == 1
    loaded = load_features(tmp_path / "store")  # a directory is read as a store
    assert list(loaded.captions) == original.captions
    assert list(loaded.image_ids) == original.image_ids
    assert np.array_equal(loaded.image_index, original.image_index)
    assert loaded.embeddings.shape == original.embeddings.shape and loaded.embeddings.dtype == np.float16
    expected = original.embeddings.half().float()
    assert torch.equal(loaded.embeddings_at(np.arange(len(expected))), expected.float())

    store.to_pickle(tmp_path / "store", tmp_path / "back.pkl")
    back = load_original_pickle(tmp_path / "back.pkl")
    assert back.captions == original.captions and back.image_ids == original.image_ids
    assert torch.equal(back.embeddings.float(), expected)


def test_many_shards_read_like_one_array(feature_pickle, tmp_path):
    original = load_original_pickle(feature_pickle)
    store.write(original, tmp_path / "store", shard_rows=3, clip_model="ViT-B/32")
    meta = store.read_meta(tmp_path / "store")
    assert [s["rows"] for s in meta["shards"]] == [3, 3, 2] and meta["clip_model"] == "ViT-B/32"
    loaded = store.load_store(tmp_path / "store")
    whole = original.embeddings.half().numpy()
    assert np.array_equal(np.asarray(loaded.embeddings), whole)
    rows = np.array([7, 0, 3, 3, 5])
    assert np.array_equal(loaded.embeddings[rows], whole[rows])
    assert np.array_equal(loaded.embeddings[2:7:2], whole[2:7:2])
    assert np.array_equal(loaded.embeddings[-1], whole[-1])
    with pytest.raises(IndexError):
        loaded.embeddings[8]
    assert list(loaded.captions) == original.captions and loaded.captions[-1] == original.captions[-1]


def test_store_trains_through_dataloader_workers(feature_pickle, tmp_path, gpt2_dir):
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(gpt2_dir)
    store.write(load_original_pickle(feature_pickle), tmp_path / "store", shard_rows=3)
    in_memory = CaptionDataset(load_original_pickle(feature_pickle), tokenizer)
    on_disk = CaptionDataset(load_features(tmp_path / "store"), tokenizer)
    n = len(on_disk)
    batches = list(DataLoader(on_disk, sampler=[range(i, min(i + 5, n)) for i in range(0, n, 5)], batch_size=None,
                              num_workers=2))
    tokens, lengths, embeddings, _ = in_memory[range(n)]
    assert torch.equal(torch.cat([b[0][i, :k] for b in batches for i, k in enumerate(b[1])]),
                       torch.cat([row[:k] for row, k in zip(tokens, lengths)]))
    assert torch.equal(torch.cat([b[2] for b in batches]), embeddings.half().float())


def test_unfinished_or_damaged_stores_are_clear_errors(feature_pickle, tmp_path):
    path = store.from_pickle(feature_pickle, tmp_path / "store")
    shard = path / "shards" / "00000.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ClipCapError, match="truncated"):
        store.load_store(path)
    shard.write_bytes(data)
    (path / "store.json").unlink()
    with pytest.raises(ClipCapError, match="not a finished feature store"):
        store.load_store(path)
    (path / "shards" / "00000.parquet").unlink()
    with pytest.raises(ClipCapError, match="unfinished"):
        store.merge(path, ["00000"])


def test_loading_never_unpickles(feature_pickle, tmp_path):
    path = store.from_pickle(feature_pickle, tmp_path / "store")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    shard = path / "shards" / "00000.npy"
    np.save(shard, np.array([[Exploit()] * 16] * 8, dtype=object), allow_pickle=True)
    with pytest.raises(ClipCapError, match="float array"):
        store.load_store(path)
    assert not marker.exists()


def test_the_features_clip_survives_pickle_and_store(feature_pickle, tmp_path):
    features = load_original_pickle(feature_pickle)
    assert features.clip_model is None  # the original's pickles do not say
    features.clip_model = "RN50x4"
    save_original_pickle(features, tmp_path / "a.pkl")
    assert load_original_pickle(tmp_path / "a.pkl").clip_model == "RN50x4"
    store.from_pickle(tmp_path / "a.pkl", tmp_path / "store")
    assert load_store(tmp_path / "store").clip_model == "RN50x4"
    store.to_pickle(tmp_path / "store", tmp_path / "b.pkl")
    assert load_original_pickle(tmp_path / "b.pkl").clip_model == "RN50x4"


def test_the_store_command_lives_with_the_commands(feature_pickle, tmp_path, capsys):
    """store.py is a library: its conversion command is clipcap-store (clipcap/cli/store.py), so no import climbs up."""
    from clipcap.cli.store import main

    tree = ast.parse(Path(store.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [m for m in imported if m == "cli" or m.startswith(("cli.", "clipcap.cli"))], imported
    main([str(feature_pickle), str(tmp_path / "store")])
    main([str(tmp_path / "store"), str(tmp_path / "back.pkl")])
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / 'store'}", f"wrote {tmp_path / 'back.pkl'}"]
    assert load_original_pickle(tmp_path / "back.pkl").captions == load_original_pickle(feature_pickle).captions
    with pytest.raises(ClipCapError, match="one side must be a .pkl file"):
        main([str(tmp_path / "store"), str(tmp_path / "other")])


def test_damaged_store_folders_are_one_line_errors(feature_pickle, tmp_path):
    path = store.write(load_original_pickle(feature_pickle), tmp_path / "store", shard_rows=3)
    meta = json.loads((path / "store.json").read_text())

    def refused(store_json, match: str) -> None:
        (path / "store.json").write_text(json.dumps(store_json))
        with pytest.raises(ClipCapError, match=match) as error:
            store.load_store(path)
        assert "\n" not in str(error.value)

    listing = "'shards' must be a list of {\"name\": ..., \"rows\": ...}"
    refused({k: v for k, v in meta.items() if k != "shards"}, re.escape(f"{path / 'store.json'}: {listing}"))
    refused({**meta, "shards": "00000"}, re.escape(listing))
    refused({**meta, "shards": [{"name": "00000"}]}, re.escape(listing) + ".*entry 0")
    refused({**meta, "shards": [*meta["shards"][:2], {"name": 2, "rows": 2}]}, re.escape(listing) + ".*entry 2")
    refused({**meta, "shards": [*meta["shards"][:2], {"name": "00002", "rows": -2}]}, ".*entry 2")
    for name in ("../../../etc/passwd", "/etc/passwd", "..", "a/b", ""):
        refused({**meta, "shards": [{"name": name, "rows": 2}]}, re.escape(f"shard name {name!r} is not a file name"))
    refused([1, 2], "not a version-1 clipcap-feature-store file")
    (path / "store.json").write_text(json.dumps(meta))
    (path / "shards" / "00001.npy").rename(tmp_path / "away.npy")
    with pytest.raises(ClipCapError, match=re.escape(f"{path / 'shards' / '00001.npy'}: missing (store.json lists "
                                                     "shard 00001)")):
        store.load_store(path)
    (path / "shards" / "00001.npy").write_bytes(b"not an array")
    with pytest.raises(ClipCapError, match=re.escape(f"{path / 'shards' / '00001.npy'}: not a .npy file")):
        store.load_store(path)


def test_image_ids_go_into_a_store_as_integers_or_as_text(feature_pickle, tmp_path):
    features = load_original_pickle(feature_pickle)
    ids = list(features.image_ids)
    for name, image_ids, match in [
            ("mixed", ids[:3] + [str(ids[3])] + ids[4:], rf"image ids must be all integers or all text: caption 0 has "
                                                         rf"int {ids[0]}, caption 3 str '{ids[3]}'"),
            ("huge", ids[:5] + [2**64] + ids[6:], f"caption 5 has image id {2**64}, beyond 64-bit integers"),
            ("bool", [True] + ids[1:], "caption 0 has bool True as image id"),
            ("float", ids[:2] + [1.5] + ids[3:], "caption 2 has float 1.5 as image id")]:
        features.image_ids = image_ids
        with pytest.raises(ClipCapError, match=re.escape(f"{tmp_path / name}: ") + match):
            store.write(features, tmp_path / name)
        assert not (tmp_path / name).exists()  # refused before writing anything
    store.write_shard(tmp_path / "two_kinds", "a", np.zeros((1, 4)), ["a cat."], [7], [0])
    store.write_shard(tmp_path / "two_kinds", "b", np.zeros((1, 4)), ["a dog."], ["x"], [0])
    with pytest.raises(ClipCapError, match="two_kinds: shard a has int64 image ids, shard b string; a store's "
                                           "image ids are all integers or all text"):
        store.merge(tmp_path / "two_kinds", ["a", "b"])
    for name, image_ids in [("text", [f"image {i}" for i in ids]), ("numpy", list(np.array(ids, dtype=np.int32))),
                            ("big", [i + 2**62 for i in ids])]:
        features.image_ids = image_ids
        store.write(features, tmp_path / name, shard_rows=3)
        assert list(load_store(tmp_path / name).image_ids) == [i.item() if hasattr(i, "item") else i
                                                                 for i in image_ids]
