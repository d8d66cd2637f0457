"""cog_predict.py, the Replicate/Cog predictor, under a stand-in for the ``cog`` package (which only
Cog's image has): in this environment, and in a venv holding only what cog.yaml installs."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from filelock import FileLock
from skimage import data as photos
from test_app import png, tiny_checkpoint

from clipcap.captioner import Captioner
from clipcap.files import user_cache

REPO = Path(__file__).resolve().parent.parent
# The part of Cog's SDK that cog_predict.py uses: a predictor base class, Input() giving its default.
STAND_IN_COG = '''\
from pathlib import Path

class BasePredictor:
    pass

def Input(description=None, default=None, **_):
    return default
'''
# What Cog does with the predictor: setup() once, then predictions; here both models, greedy and beam.
RUN_PREDICTOR = '''\
import json, sys
from pathlib import Path
import cog_predict

cog_predict.WEIGHTS = Path(sys.argv[1])
predictor = cog_predict.Predictor()
predictor.setup()
image = Path(sys.argv[2])
print(json.dumps({f"{model} {beam}": predictor.predict(image=image, model=model, use_beam_search=beam)
                  for model in cog_predict.MODELS for beam in (False, True)}))
'''


def cog_packages() -> list[str]:
    return yaml.safe_load((REPO / "cog.yaml").read_text())["build"]["python_packages"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory, gpt2_dir, clip_dir) -> Path:
    """weights/ as cog_predict.py expects it: two different tiny models in the original's .pt format."""
    folder = tmp_path_factory.mktemp("weights")
    for seed, file in enumerate(("coco_weights.pt", "conceptual_weights.pt")):
        tiny_checkpoint(folder / file, gpt2_dir, clip_dir, seed)
    (folder / "cat.png").write_bytes(png(photos.chelsea()))
    return folder


@pytest.fixture(scope="module")
def stand_in_cog(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stand_in_cog")
    (folder / "cog.py").write_text(STAND_IN_COG)
    return folder


@pytest.fixture
def cog_predict(stand_in_cog, monkeypatch):
    """cog_predict.py imported here, with the stand-in ``cog``."""
    monkeypatch.syspath_prepend(str(stand_in_cog))
    monkeypatch.syspath_prepend(str(REPO))
    for name in ("cog", "cog_predict"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import cog_predict

    for name in ("cog", "cog_predict"):  # gone again after the test
        monkeypatch.setitem(sys.modules, name, sys.modules[name])
    return cog_predict


def expected_captions(cog_predict, weights: Path) -> dict[str, str]:
    """What the Captioner, run directly, says for each model and decoding the predictor offers."""
    captions = {}
    for model, file in cog_predict.MODELS.items():
        captioner = Captioner.from_checkpoint(weights / file)
        for beam in (False, True):
            strategy = "beam" if beam else "greedy"
            captions[f"{model} {beam}"] = captioner.caption([weights / "cat.png"], strategy=strategy)[0][0]
    assert captions["coco True"] != captions["conceptual-captions True"]  # the two models are told apart
    return captions


def test_cog_predictor_captions_with_either_released_model(weights, cog_predict, monkeypatch):
    monkeypatch.setattr(cog_predict, "WEIGHTS", weights)
    predictor = cog_predict.Predictor()
    predictor.setup()
    for key, caption in expected_captions(cog_predict, weights).items():
        model, beam = key.split()
        assert predictor.predict(image=weights / "cat.png", model=model, use_beam_search=beam == "True") == caption


@contextlib.contextmanager
def cog_venv() -> Iterator[Path]:
    """A venv with torch and cog.yaml's python_packages, nothing else, as pip installs them into a fresh one.

    Installing torch takes a minute, so the venv is kept in the user's cache folder and built again
    only when what it was built from changes: the package list or this Python. It is locked while
    in use, so that parallel test runs neither build it twice nor rebuild it under each other.
    """
    packages = ["torch==2.13.0", *cog_packages()]  # torch first, by the Makefile's pin
    built_from = json.dumps({"python": sys.version, "base": sys.base_prefix, "packages": packages})
    venv = user_cache("tests-cog-venv")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{venv}.lock"):
        if not (venv / "built-from.json").is_file() or (venv / "built-from.json").read_text() != built_from:
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
            pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet"]
            subprocess.run(pip + packages[:1], check=True)
            subprocess.run(pip + packages[1:], check=True)
            (venv / "built-from.json").write_text(built_from)  # last: a build cut short is built again
        yield venv


@pytest.mark.slow
@pytest.mark.timeout(1200)  # when the venv is built: pip installing torch on a busy machine
def test_cog_image_packages_are_enough_for_the_predictor(weights, stand_in_cog, cog_predict):
    """A venv with torch and cog.yaml's python_packages, nothing else, runs the predictor from the
    repository folder as Cog does from /src (where Cog copies it; clipcap is imported from there)."""
    env = {**os.environ, "PYTHONPATH": str(stand_in_cog), "PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1"}
    with cog_venv() as venv:
        run = subprocess.run([str(venv / "bin" / "python"), "-c", RUN_PREDICTOR, str(weights),
                              str(weights / "cat.png")], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout) == expected_captions(cog_predict, weights)


def test_cog_image_pins_what_make_installs():
    """The image gets the versions the test suite runs on: cog.yaml's pins are constraints.txt's."""
    def pin(line: str) -> tuple[str, str]:
        name, version = line.split("==")
        return re.sub(r"[-_.]+", "-", name).lower(), version

    pins = dict(pin(line) for line in (REPO / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    for package in cog_packages():
        name, version = pin(package)
        if name != "torch":  # installed first by its own pin, the Makefile's
            assert pins[name] == version, package
