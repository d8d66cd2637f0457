"""The inference notebook runs top to bottom (against a tiny checkpoint, offline) and shows its captions."""
import contextlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import types
import urllib.parse
from pathlib import Path
from typing import Iterator

import nbformat
import pytest
import torch
from PIL import Image
from skimage import data as photos

from clipcap.captioner import Captioner
from clipcap.checkpoint import save_checkpoint
from clipcap.model import ClipCapConfig, build_model

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "clip_prefix_captioning_inference.ipynb"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")


def local_run_command() -> str:
    """The command the notebook gives for running it locally; the README gives the same one."""
    intro = nbformat.read(NOTEBOOK, as_version=4).cells[0].source
    command = re.search(r"`(\.venv/bin/jupyter execute [^`]+)`", intro)[1]
    assert command in " ".join((REPO / "README.md").read_text().split())
    return command


def test_inference_notebook_runs_with_its_own_instruction(tmp_path, gpt2_dir, clip_dir):
    """The local instruction run as written, from a copy of the repository's layout (so that its output
    lands there), against a tiny checkpoint, offline."""
    torch.manual_seed(0)
    model = build_model(ClipCapConfig(gpt2=gpt2_dir, clip_model=clip_dir, prefix_size=16, prefix_length=4))
    with torch.no_grad():
        model.gpt.transformer.wte.weight[13] *= 5  # captions that end
    checkpoint = save_checkpoint(model, tmp_path / "tiny.safetensors")
    root = tmp_path / "repository"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, root / "notebooks")
    (root / ".venv").symlink_to(sys.prefix)  # this environment, where `make test` builds it
    env = {**os.environ, "CLIPCAP_CHECKPOINT": str(checkpoint), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}  # the kernel imports this checkout's clipcap
    done = subprocess.run(["bash", "-c", local_run_command()], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    notebook = nbformat.read(root / "notebooks" / "captioned.ipynb", as_version=4)

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    captioner = Captioner.from_checkpoint(checkpoint)
    captions = captioner.caption([Image.fromarray(getattr(photos, name)()) for name in PHOTOS])
    for name, caption in zip(PHOTOS, captions):
        assert f"{name}: {caption[0]}\n" in text
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
    samples = captioner.caption([Image.fromarray(photos.chelsea())], strategy="sample", top_p=0.9, num_captions=5,
                                seed=0)[0]
    assert text.endswith("".join(f"{s}\n" for s in samples))
    assert not any(o.output_type == "error" for o in outputs)


def install_cell() -> str:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    return next(cell.source for cell in notebook.cells if cell.cell_type == "code" and "IN_COLAB" in cell.source)


@contextlib.contextmanager
def colab_sessions(sessions: list[dict]) -> Iterator[str]:
    """A stand-in for Colab's Jupyter server: its /api/sessions answer, the notebooks open in this runtime."""
    class Sessions(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(sessions).encode() if self.path == "/api/sessions" else b""
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sessions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/sessions"
    finally:
        server.shutdown()
        server.server_close()


def github_session(url: str) -> dict:
    return {"name": url.rpartition("/")[2], "path": "fileId=" + urllib.parse.quote(url, safe="")}


THIS = "notebooks/clip_prefix_captioning_inference.ipynb"
OTHER = github_session(f"https://github.com/someone/other/blob/main/{THIS.replace('clip_prefix', 'not_this')}")
DRIVE = {"name": "clip_prefix_captioning_inference.ipynb", "path": "fileId=1AbCdEfGhIjK"}


@pytest.mark.parametrize("sessions, form_value, installed", [
    ([OTHER, github_session(f"https://github.com/you/clipcap/blob/v1.2/{THIS}")], "", "https://github.com/you/clipcap@v1.2"),
    ([DRIVE], "https://github.com/me/clipcap@dev", "https://github.com/me/clipcap@dev"),  # the form field wins
    ([DRIVE, OTHER], "", None),  # opened from Drive: nothing to tell the repository by
    (None, "", None),  # no session server answers
])
def test_colab_install_cell_installs_from_where_the_notebook_was_opened(monkeypatch, sessions, form_value, installed):
    """The first cell, run as on Colab (google.colab imported, Colab's session server) with pip recorded."""
    source = install_cell()
    assert 'REPO_URL = ""  # @param' in source and 'COLAB_SESSIONS = "http://172.28.0.12:9000/api/sessions"' in source
    source = source.replace('REPO_URL = ""', f'REPO_URL = "{form_value}"')  # what Colab's form field does
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    pip = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: pip.append(command))
    with contextlib.ExitStack() as stack:
        if sessions is None:
            with socket.socket() as s:  # a port nothing listens on
                s.bind(("127.0.0.1", 0))
                url = f"http://127.0.0.1:{s.getsockname()[1]}/api/sessions"
        else:
            url = stack.enter_context(colab_sessions(sessions))
        source = source.replace("http://172.28.0.12:9000/api/sessions", url)
        if installed is None:
            with pytest.raises(SystemExit, match="^Set REPO_URL in this cell"):
                exec(source, {})
            assert pip == []
        else:
            exec(source, {})
            assert pip == [[sys.executable, "-m", "pip", "install", "-q", f"clipcap @ git+{installed}"]]


def test_install_cell_installs_nothing_outside_colab(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("pip run outside Colab"))
    exec(install_cell(), {})


def test_released_weights_cell_fetches_where_make_weights_does_and_fails_in_one_line(tmp_path, monkeypatch):
    """Without CHECKPOINT the released MODEL comes from data/weights/ (fetched there once); a download that
    fails ends the cell with the one-line error, not a traceback of gdown's."""
    from clipcap import fetch

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    source = next(cell.source for cell in notebook.cells if cell.cell_type == "code" and "RELEASED" in cell.source)
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:  # a port nobody listens on: the download is refused at once
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}/coco_weights.pt"
    monkeypatch.setitem(fetch.WEIGHTS, "coco_weights.pt", nowhere)
    with pytest.raises(SystemExit, match=r"^error: coco_weights.pt from .*: download failed") as error:
        exec(source, {"MODEL": "coco", "CHECKPOINT": None})
    assert "\n" not in str(error.value)
    (tmp_path / "data" / "weights" / "coco_weights.pt").write_bytes(b"fetched before")
    fetch.mark_done(tmp_path / "data" / "weights", "coco_weights.pt")
    namespace = {"MODEL": "coco", "CHECKPOINT": None}
    exec(source, namespace)
    assert namespace["CHECKPOINT"] == str(Path("data/weights/coco_weights.pt"))
