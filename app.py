"""A captioning web page: upload an image or pick a sample, choose a checkpoint and a decoding, read the captions.

    python app.py --checkpoint coco_weights.pt --checkpoint conceptual_weights.pt
    # then open http://127.0.0.1:7860

``/`` is app.html, a self-contained page (no external assets, so it works offline).
``POST /api/caption`` takes a multipart form (``image`` file or ``sample`` name, ``checkpoint``,
decoding settings) and answers ``{"captions", "seconds", "load_seconds", "image"}``, or
``{"error"}`` with a 4xx status for bad input, which the page shows. Checkpoints load on first
use and stay loaded; requests use the model one at a time.
"""
from __future__ import annotations

import argparse
import io
import threading
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from clipcap.captioner import Captioner
from clipcap.encoder import load_image
from clipcap.files import ClipCapError, run_cli
from clipcap.runtime import resolve_device

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_PIXELS = 40_000_000  # 8000 x 5000; decoding one takes 120 MB
SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "camera")  # scikit-image's test photos
PAGE = Path(__file__).with_name("app.html")


class Decoding(BaseModel):
    """The page's decoding settings, checked before any work (the arguments of ``caption_embeddings``)."""

    strategy: Literal["beam", "greedy", "sample"] = "beam"
    beam_size: int = Field(5, ge=1, le=20)
    temperature: float = Field(1.0, ge=0.01, le=10)  # below 0.01 the scaled logits overflow to NaN
    top_p: float = Field(0.9, gt=0, le=1)
    num_captions: int = Field(1, ge=1, le=10)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)  # what torch.Generator takes


def sample_images() -> dict[str, bytes]:
    """The sample photos as PNG bytes: served to the page and captioned exactly as served."""
    import skimage.data

    images = {}
    for name in SAMPLES:
        buffer = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).save(buffer, format="PNG")
        images[name] = buffer.getvalue()
    return images


class Captioners:
    """One Captioner per checkpoint, loaded on first use and kept; one request at a time uses them."""

    def __init__(self, checkpoints: list[str], device: str, **options: Any):
        missing = [c for c in checkpoints if not Path(c).is_file()]
        if missing:
            raise ClipCapError(f"{missing[0]}: checkpoint not found")
        self.checkpoints = list(dict.fromkeys(checkpoints))
        self.device = device
        self.options = options
        self.loaded: dict[str, Captioner] = {}
        self.lock = threading.Lock()

    def caption(self, checkpoint: str, image: Image.Image, decoding: Decoding) -> tuple[list[str], float, float | None]:
        """Captions, seconds taken, and seconds spent loading the checkpoint (None if it was loaded)."""
        if checkpoint not in self.checkpoints:
            raise ClipCapError(f"unknown checkpoint {checkpoint!r}; this server offers {', '.join(self.checkpoints)}")
        with self.lock:
            load_seconds = None
            if checkpoint not in self.loaded:
                start = time.perf_counter()
                captioner = Captioner.from_checkpoint(checkpoint, device=self.device, **self.options)
                captioner.encoder  # CLIP loads on first use: now, so that it counts as loading
                self.loaded[checkpoint] = captioner
                load_seconds = time.perf_counter() - start
            start = time.perf_counter()
            captions = self.loaded[checkpoint].caption([image], **decoding.model_dump())[0]
            return captions, time.perf_counter() - start, load_seconds


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(checkpoints: list[str], device: str = "cpu", max_bytes: int = MAX_UPLOAD_BYTES,
               max_pixels: int = MAX_PIXELS, **options: Any) -> FastAPI:
    """The app; ``options`` go to ``Captioner.from_checkpoint`` (gpt2, clip_model, normalize_prefix)."""
    captioners = Captioners(checkpoints, device, **options)
    samples = sample_images()
    app = FastAPI(title="ClipCap", docs_url=None, redoc_url=None)

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
    def caption(decoding: Decoding = Form(), checkpoint: str = Form(), sample: str | None = Form(None),
                image: UploadFile | None = File(None)) -> dict[str, Any]:
        if image is not None and image.filename:
            name = image.filename
            if image.size == 0:
                raise ClipCapError(f"{name}: empty file")
            picture = load_image(image.file, name=name, max_pixels=max_pixels)
        elif sample is not None:
            if sample not in samples:
                raise ClipCapError(f"no sample named {sample!r}")
            name, picture = sample, load_image(io.BytesIO(samples[sample]), name=sample)
        else:
            raise ClipCapError("no image: upload one or choose a sample")
        captions, seconds, load_seconds = captioners.caption(checkpoint, picture, decoding)
        return {"captions": captions, "seconds": seconds, "load_seconds": load_seconds,
                "image": f"{name} ({picture.width}x{picture.height})"}

    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a checkpoint to offer (repeat for several; the first is the default)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--gpt2", default=None, help="GPT-2 name or directory (default: each checkpoint's)")
    p.add_argument("--clip_model", default=None, help="CLIP name or directory (default: each checkpoint's)")
    p.add_argument("--normalize_prefix", action="store_true",
                   help="L2-normalise CLIP embeddings (default: each checkpoint's setting)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    device = resolve_device(args.device)
    app = create_app(args.checkpoint, device, gpt2=args.gpt2, clip_model=args.clip_model,
                     normalize_prefix=True if args.normalize_prefix else None)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    run_cli(main)
