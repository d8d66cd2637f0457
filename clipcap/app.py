"""A captioning web page: upload an image or pick a sample, choose a checkpoint and a decoding, read the captions.

``/`` is app.html, a self-contained page (no external assets, so it works offline).
``POST /api/caption`` takes a multipart form (``image`` file or ``sample`` name, ``checkpoint``
(optional when the server offers one), the fields of :class:`clipcap.decoding.DecodingOptions`)
and answers ``{"captions", "seconds", "load_seconds", "image"}``, or ``{"error"}`` with a 4xx status
for bad input, which the page shows. Checkpoints load on first use and stay loaded; requests use
the model one at a time. Requests run in a pool of threads, so an :class:`ImageGate` bounds what
uploads cost together: a few images decode at once, and the decoded pixels held at once are
limited. The command is clipcap/cli/app.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import threading
import time
import typing
import warnings
from pathlib import Path
from typing import IO, Any, Iterator

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from pydantic import Field, create_model
from starlette.exceptions import HTTPException

from .captioner import Captioner
from .decoding import DecodingOptions
from .encoder import load_image
from .files import ClipCapError
from .hub import resolve_checkpoint

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_PIXELS = 40_000_000  # 8000 x 5000; decoding one takes 120 MB
DECODERS = 2  # images decoded at once, whatever the number of requests
SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "camera")  # scikit-image's test photos
PAGE = Path(__file__).with_name("app.html")
LIMITS = {"beam_size": 20, "num_captions": 10}  # the most decoding work one request may ask for

# The page's decoding form: DecodingOptions' fields and types (checked by pydantic, 422), under the
# server's limits; DecodingOptions itself checks the values (400).
DecodingForm = create_model("DecodingForm", **{
    f.name: (kind, Field(f.default, le=LIMITS.get(f.name)))
    for f, kind in zip(dataclasses.fields(DecodingOptions), typing.get_type_hints(DecodingOptions).values())})


def sample_images() -> dict[str, bytes]:
    """The sample photos as PNG bytes: served to the page and captioned exactly as served."""
    import skimage.data

    images = {}
    for name in SAMPLES:
        buffer = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).save(buffer, format="PNG")
        images[name] = buffer.getvalue()
    return images


def declared_pixels(file: IO[bytes]) -> int:
    """The pixels an image file's header declares (Pillow reads no more), or 0 when it cannot tell;
    decoding then says what is wrong with it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image judges the size
            with Image.open(file) as image:
                return image.width * image.height
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return 0
    finally:
        file.seek(0)


class ImageGate:
    """What image requests may cost together: at most ``decoders`` images decoding at once, and at most
    ``pixels`` decoded pixels held at once (from decoding until captioned). A request waits for its turn;
    one image larger than the whole allowance goes alone."""

    def __init__(self, decoders: int, pixels: int):
        self.decoding = threading.BoundedSemaphore(decoders)
        self.limit = pixels
        self.held = 0  # pixels of the images being decoded or captioned
        self.waiting = 0  # requests waiting for room
        self.turn = threading.Condition()

    @contextlib.contextmanager
    def room(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` of the allowance for the block, waiting until they fit."""
        pixels = min(pixels, self.limit)
        with self.turn:
            self.waiting += 1
            self.turn.wait_for(lambda: self.held + pixels <= self.limit)
            self.waiting -= 1
            self.held += pixels
        try:
            yield
        finally:
            with self.turn:
                self.held -= pixels
                self.turn.notify_all()


class Captioners:
    """One Captioner per checkpoint, loaded on first use and kept; one request at a time uses them."""

    def __init__(self, checkpoints: list[str], device: str, **options: Any):
        self.files = {c: resolve_checkpoint(c) for c in checkpoints}  # a Hub id downloads now, not on a request
        missing = [c for c, file in self.files.items() if not file.is_file()]
        if missing:
            raise ClipCapError(f"{missing[0]}: checkpoint not found")
        self.checkpoints = list(self.files)
        self.device = device
        self.options = options
        self.loaded: dict[str, Captioner] = {}
        self.lock = threading.Lock()

    def caption(self, checkpoint: str | None, image: Image.Image,
                options: DecodingOptions) -> tuple[list[str], float, float | None]:
        """Captions, seconds taken, and seconds spent loading the checkpoint (None if it was loaded).
        ``checkpoint`` None is the only one offered."""
        if checkpoint is None:
            if len(self.checkpoints) > 1:
                raise ClipCapError(f"no checkpoint chosen; this server offers {', '.join(self.checkpoints)}")
            checkpoint = self.checkpoints[0]
        if checkpoint not in self.checkpoints:
            raise ClipCapError(f"unknown checkpoint {checkpoint!r}; this server offers {', '.join(self.checkpoints)}")
        with self.lock:
            load_seconds = None
            if checkpoint not in self.loaded:
                start = time.perf_counter()
                captioner = Captioner.from_checkpoint(self.files[checkpoint], device=self.device, **self.options)
                captioner.encoder  # CLIP loads on first use: now, so that it counts as loading
                self.loaded[checkpoint] = captioner
                load_seconds = time.perf_counter() - start
            start = time.perf_counter()
            captions = self.loaded[checkpoint].caption([image], options)[0]
            return captions, time.perf_counter() - start, load_seconds


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(checkpoints: list[str], device: str = "cpu", max_bytes: int = MAX_UPLOAD_BYTES,
               max_pixels: int = MAX_PIXELS, decoders: int = DECODERS, pixels_in_flight: int | None = None,
               **options: Any) -> FastAPI:
    """The app; ``options`` go to ``Captioner.from_checkpoint`` (lm, clip_model, normalize_prefix, lm_dtype,
    merge_lora).

    ``max_pixels`` bounds one image; ``decoders`` and ``pixels_in_flight`` (default: two images of
    ``max_pixels``) bound all requests together (:class:`ImageGate`, at ``app.state.gate``).
    """
    captioners = Captioners(checkpoints, device, **options)
    samples = sample_images()
    app = FastAPI(title="ClipCap", docs_url=None, redoc_url=None)
    gate = app.state.gate = ImageGate(decoders, pixels_in_flight or 2 * max_pixels)

    @app.middleware("http")
    async def limit_upload(request: Request, call_next):
        """Refuse an oversized body before reading it (the page checks too, and so saves the upload)."""
        if request.method == "POST":
            length = request.headers.get("content-length", "")
            if not length.isdigit():
                return error(411, "uploads need a Content-Length header")
            if int(length) > max_bytes:
                return error(413, f"upload of {int(length) / 2**20:.1f} MB is over the {max_bytes / 2**20:g} MB limit")
        return await call_next(request)

    @app.exception_handler(ClipCapError)
    async def bad_input(request: Request, e: ClipCapError) -> JSONResponse:
        return error(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def bad_form(request: Request, e: RequestValidationError) -> JSONResponse:
        return error(422, "; ".join(f"{'.'.join(map(str, d['loc'][1:])) or 'form'}: {d['msg']}" for d in e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:  # logged by uvicorn; the server goes on
        return error(500, f"internal error ({type(e).__name__}: {e})")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE)

    @app.get("/api/options")
    def page_options() -> dict[str, Any]:
        return {"checkpoints": captioners.checkpoints, "samples": list(samples),
                "max_bytes": max_bytes, "max_pixels": max_pixels}

    @app.get("/samples/{name}.png")
    def sample(name: str) -> Response:
        if name not in samples:
            raise HTTPException(404, f"no sample named {name!r}")
        return Response(samples[name], media_type="image/png")

    @app.post("/api/caption")
    def caption(decoding: DecodingForm = Form(), checkpoint: str | None = Form(None), sample: str | None = Form(None),
                image: UploadFile | None = File(None)) -> dict[str, Any]:
        if image is not None and image.filename:
            name, file, limit = image.filename, image.file, max_pixels
            if image.size == 0:
                raise ClipCapError(f"{name}: empty file")
        elif sample is not None:
            if sample not in samples:
                raise ClipCapError(f"no sample named {sample!r}")
            name, file, limit = sample, io.BytesIO(samples[sample]), MAX_PIXELS  # ours, whatever the upload limit
        else:
            raise ClipCapError("no image: upload one or choose a sample")
        options = DecodingOptions(**decoding.model_dump())
        with gate.room(declared_pixels(file)):
            with gate.decoding:
                picture = load_image(file, name=name, max_pixels=limit)
            captions, seconds, load_seconds = captioners.caption(checkpoint, picture, options)
        return {"captions": captions, "seconds": seconds, "load_seconds": load_seconds,
                "image": f"{name} ({picture.width}x{picture.height})"}

    return app
