"""FeatureSet and the original's feature pickle: read without running code, checked, written back."""
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import write_feature_pickle

from clipcap import store
from clipcap.data import load_features
from clipcap.featureset import FeatureSet, load_original_pickle, save_original_pickle
from clipcap.files import ClipCapError


def test_reads_original_pickle_and_upcasts_fp16(tmp_path):
    path = write_feature_pickle(tmp_path / "f.pkl", [["a dog on a bench.", "a cat."], ["a cow."]], dim=8,
                                dtype=torch.float16)
    features = load_original_pickle(path)
    assert len(features) == 3 and features.dim == 8
    for caption, row, image_id in zip(features.captions, features.image_index, features.image_ids):
        assert (row == 0) == (caption != "a cow.") and image_id == 1000 + row
    emb = features.embeddings_at(np.array([1]))[0]
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb, features.embeddings[1].float())


def test_pickle_round_trip(tmp_path):
    features = load_original_pickle(write_feature_pickle(tmp_path / "f.pkl", [["a.", "b."], ["c."]]))
    save_original_pickle(features, tmp_path / "g.pkl")
    again = load_original_pickle(tmp_path / "g.pkl")
    assert list(again.captions) == list(features.captions)
    assert again.image_index.tolist() == features.image_index.tolist()
    torch.testing.assert_close(torch.as_tensor(again.embeddings), torch.as_tensor(features.embeddings))


def test_missing_file(tmp_path):
    with pytest.raises(ClipCapError, match=r"nope\.pkl: feature file not found"):
        load_original_pickle(tmp_path / "nope.pkl")


def test_truncated_pickle(tmp_path):
    path = write_feature_pickle(tmp_path / "f.pkl", [["a."]] * 20)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ClipCapError, match=r"f\.pkl: not a readable feature pickle"):
        load_original_pickle(path)


def test_caption_index_out_of_range(tmp_path):
    path = tmp_path / "f.pkl"
    with open(path, "wb") as f:
        pickle.dump({"clip_embedding": torch.zeros(2, 4),
                     "captions": [{"image_id": 1, "caption": "a.", "clip_embedding": 5}]}, f)
    with pytest.raises(ClipCapError, match="caption 0 points at embedding row 5, but the file has 2 rows"):
        load_original_pickle(path)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pkl", "wb") as f:
        pickle.dump({"clip_embedding": torch.zeros(1, 2), "captions": [Boom()]}, f)
    with pytest.raises(ClipCapError, match="refusing to load"):
        load_original_pickle("evil.pkl")
    assert not (tmp_path / "pwned").exists()


def test_embeddings_without_width_are_refused(tmp_path):
    """[N, 0] embeddings: nothing to train on, however well-formed the file."""
    path = tmp_path / "f.pkl"
    with open(path, "wb") as f:
        pickle.dump({"clip_embedding": torch.zeros(2, 0),
                     "captions": [{"image_id": 1, "caption": "a dog.", "clip_embedding": 1}]}, f)
    with pytest.raises(ClipCapError, match=r"f\.pkl: the embeddings are 0-dimensional \(\[2, 0\]\)"):
        load_original_pickle(path)
    features = FeatureSet(np.zeros((2, 0), np.float16), ["a dog."], np.array([1]), [1])
    store.write(features, tmp_path / "store")
    with pytest.raises(ClipCapError, match=r"store: the embeddings are 0-dimensional \(\[2, 0\]\)"):
        load_features(tmp_path / "store")
