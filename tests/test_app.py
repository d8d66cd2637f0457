"""The web page (app.py): its API on bad and good input, and the page itself in headless Chromium.

Every caption the page or the API shows is checked against the Captioner run directly on the
same image with the same settings.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest
from PIL import Image
from skimage import data as photos

from clipcap.app import create_app
from clipcap.captioner import Captioner
from clipcap.checkpoint import save_checkpoint
from clipcap.cli.app import main
from clipcap.files import ClipCapError
from clipcap.model import ClipCapConfig, build_model

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium's own connections get refused on an offline machine.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def tiny_checkpoint(path: Path, gpt2_dir: str, clip_dir: str, seed: int = 0) -> str:
    """A tiny random ClipCap whose config names the tiny GPT-2 and CLIP, so it loads with no flags.

    Its weight matrices are scaled up: at GPT-2's initial scale the prefix barely reaches the
    logits and every image gets the same caption, which would make the comparisons below blind.
    """
    import torch

    from clipcap.checkpoint import config_path_for, save_config

    torch.manual_seed(seed)
    model = build_model(ClipCapConfig(prefix_size=16, prefix_length=4, gpt2=gpt2_dir, clip_model=clip_dir))
    with torch.no_grad():
        for weight in model.parameters():
            if weight.ndim == 2:
                weight.mul_(20)
    if path.suffix == ".pt":  # the original's format: the config goes beside it
        save_config(model.config, config_path_for(path))
    return str(save_checkpoint(model, path))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gpt2_dir, clip_dir) -> str:
    return tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors", gpt2_dir, clip_dir)


@pytest.fixture(scope="module")
def captioner(checkpoint) -> Captioner:
    return Captioner.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def client(checkpoint):
    from fastapi.testclient import TestClient

    return TestClient(create_app([checkpoint], max_bytes=2**20, max_pixels=100_000))


def png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def post(client, checkpoint, files=None, **form):
    return client.post("/api/caption", data={"checkpoint": checkpoint, **form}, files=files)


def test_api_captions_an_upload_and_a_sample_as_the_captioner_does(client, checkpoint, captioner):
    photo = png(photos.chelsea()[::2, ::2])  # 226 x 150: under the test's 100,000-pixel limit
    answer = post(client, checkpoint, files={"image": ("cat.png", photo, "image/png")}, beam_size="3")
    assert answer.status_code == 200, answer.text
    result = answer.json()
    sample = client.get("/samples/coffee.png").content
    expected = captioner.caption([Image.open(io.BytesIO(photo)), Image.open(io.BytesIO(sample))],
                                 strategy="beam", beam_size=3)
    assert result["captions"] == expected[0] != expected[1]  # the caption of this image, no other
    assert result["image"] == "cat.png (226x150)" and result["seconds"] > 0

    answer = post(client, checkpoint, sample="coffee", strategy="sample", num_captions="3", top_p="0.8",
                  temperature="1.5", seed="7").json()
    expected = captioner.caption([Image.open(io.BytesIO(sample))], strategy="sample", num_captions=3, top_p=0.8,
                                 temperature=1.5, seed=7)[0]
    assert answer["captions"] == expected and len(expected) == 3
    assert answer["load_seconds"] is None  # loaded by the first request, kept since


@pytest.mark.parametrize("files, form, status, message", [
    ({"image": ("notes.txt", b"just some text", "text/plain")}, {}, 400, "notes.txt: unreadable image"),
    ({"image": ("empty.jpg", b"", "image/jpeg")}, {}, 400, "empty.jpg: empty file"),
    ({"image": ("big.png", png(photos.chelsea()), "image/png")}, {}, 400, "big.png: 451x300 image is over the 100,000-pixel limit"),
    ({"image": ("huge.jpg", b"\xff" * (2**20 + 1), "image/jpeg")}, {}, 413, "MB is over the 1 MB limit"),
    (None, {}, 400, "no image: upload one or choose a sample"),
    (None, {"sample": "mona-lisa"}, 400, "no sample named 'mona-lisa'"),
    (None, {"sample": "coffee", "checkpoint": "other.pt"}, 400, "unknown checkpoint 'other.pt'"),
    (None, {"sample": "coffee", "beam_size": "21", "strategy": "best"}, 422,
     "strategy: Input should be 'beam', 'greedy' or 'sample'; beam_size: Input should be less than or equal to 20"),
    (None, {"sample": "coffee", "beam_size": "0"}, 400, "beam_size must be at least 1, got 0"),
    (None, {"sample": "coffee", "strategy": "greedy", "num_captions": "2"}, 400, "num_captions 2 is not possible"),
])
def test_api_answers_bad_input_with_a_message(client, checkpoint, files, form, status, message):
    answer = post(client, form.pop("checkpoint", checkpoint), files=files, **form)
    assert answer.status_code == status and message in answer.json()["error"]


def test_checkpoint_may_be_left_out_when_the_server_offers_one(client, checkpoint, captioner, tmp_path, gpt2_dir,
                                                              clip_dir):
    from fastapi.testclient import TestClient

    answer = client.post("/api/caption", data={"sample": "coffee", "strategy": "greedy"})
    assert answer.status_code == 200, answer.text
    sample = Image.open(io.BytesIO(client.get("/samples/coffee.png").content))
    assert answer.json()["captions"] == captioner.caption([sample], strategy="greedy")[0]
    other = tiny_checkpoint(tmp_path / "other.safetensors", gpt2_dir, clip_dir, seed=1)
    two = TestClient(create_app([checkpoint, other]))
    answer = two.post("/api/caption", data={"sample": "coffee"})
    assert answer.status_code == 400 and answer.json()["error"] == f"no checkpoint chosen; this server offers " \
                                                                    f"{checkpoint}, {other}"


def test_concurrent_uploads_are_bounded_in_decoding_and_pixels(checkpoint, monkeypatch):
    """Six uploads at once: one image decodes at a time, and two images' pixels at most are held (decoded
    and waiting to be captioned); the others wait for room. Each request's decoding is held open until the
    gate shows that state, so nothing here depends on timing."""
    import threading

    from fastapi.testclient import TestClient

    import clipcap.app

    app = create_app([checkpoint], max_pixels=100_000, decoders=1, pixels_in_flight=2 * 150 * 100)
    gate = app.state.gate
    seen, release, inside = [], threading.Event(), []
    decode = clipcap.app.load_image

    def held_open(*args, **kwargs):
        inside.append(1)
        seen.append((len(inside), gate.held))
        release.wait(60)
        inside.pop()
        return decode(*args, **kwargs)

    monkeypatch.setattr(clipcap.app, "load_image", held_open)
    client = TestClient(app)
    photo = png(photos.chelsea()[:100, :150])  # 150 x 100 pixels
    answers = []
    upload = {"image": ("cat.png", photo, "image/png")}

    def request() -> None:
        answers.append(post(client, checkpoint, files=upload, strategy="greedy"))

    threads = [threading.Thread(target=request) for _ in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while not (len(inside) == 1 and gate.held == 2 * 150 * 100 and gate.waiting == 4) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (len(inside), gate.held, gate.waiting) == (1, 2 * 150 * 100, 4), answers
    release.set()
    for thread in threads:
        thread.join(120)
    assert [a.status_code for a in answers] == [200] * 6 and len({str(a.json()["captions"]) for a in answers}) == 1
    assert len(seen) == 6 and all(count == 1 and pixels <= 2 * 150 * 100 for count, pixels in seen)
    assert (gate.held, gate.waiting) == (0, 0)


def test_app_refuses_missing_checkpoints(tmp_path):
    with pytest.raises(ClipCapError, match="absent.safetensors: checkpoint not found"):
        main(["--checkpoint", str(tmp_path / "absent.safetensors")])


@contextlib.contextmanager
def running_app(checkpoint: str, log: Path) -> Iterator[Callable[[], str]]:
    """Start app.py as the user runs it, on a free loopback port; yields a wait for its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--checkpoint", checkpoint, "--host",
                                    "127.0.0.1", "--port", str(port), "--device", "cpu"], stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/"

    def wait() -> str:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with status {process.returncode}:\n{log.read_text()}")
            try:
                urllib.request.urlopen(url + "api/options", timeout=5).close()
                return url
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"app.py did not answer within 120 s:\n{log.read_text()}")
                time.sleep(0.25)

    try:
        yield wait
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def page(checkpoint, tmp_path_factory):
    """The page of a running app.py, in headless Chromium (launched while the app starts)."""
    if CHROMIUM is None:
        pytest.skip("needs Chromium (Debian package chromium)")
    from playwright.sync_api import sync_playwright

    log = tmp_path_factory.mktemp("app") / "app.log"
    with running_app(checkpoint, log) as wait_for_app, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.set_default_timeout(60_000)
        page.goto(wait_for_app())
        page.wait_for_selector("body[data-ready=true]")
        yield page
        browser.close()


def shown_captions(page) -> list[str]:
    page.click("#caption")
    page.wait_for_function("!document.getElementById('caption').disabled")
    return page.locator("#captions li").all_text_contents()


@pytest.mark.browser
def test_page_captions_uploads_and_samples_and_survives_bad_files(page, captioner, tmp_path):
    from playwright.sync_api import expect

    photo = tmp_path / "rocket.png"
    photo.write_bytes(png(photos.rocket()))
    page.set_input_files("#file", str(photo))
    page.fill("#beam_size", "3")
    assert shown_captions(page) == captioner.caption([photo], strategy="beam", beam_size=3)[0]
    expect(page.locator("#status")).to_contain_text("rocket.png (640x427): captioned in ")
    expect(page.locator("#error")).to_be_empty()

    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "empty.png").write_bytes(b"")
    for name, message in [("notes.txt", "notes.txt: unreadable image"), ("empty.png", "empty.png: empty file")]:
        page.set_input_files("#file", str(tmp_path / name))
        assert shown_captions(page) == []
        expect(page.locator("#error")).to_contain_text(message)

    page.click("#samples button[data-name=astronaut]")
    page.check("input[name=strategy][value=greedy]")
    expect(page.locator("#beam_size")).to_be_hidden()
    with urllib.request.urlopen(page.url + "samples/astronaut.png") as response:
        sample = Image.open(io.BytesIO(response.read()))
    expected = captioner.caption([sample, photo], strategy="greedy")
    assert shown_captions(page) == expected[0] != expected[1]  # the sample's caption, not the last upload's
    expect(page.locator("#error")).to_be_empty()

