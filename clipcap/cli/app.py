"""Serve the captioning web page (clipcap/app.py) for one or more checkpoints.

    python app.py --checkpoint coco_weights.pt --checkpoint conceptual_weights.pt
    clipcap-app --checkpoint OWNER/clipcap-coco     # a Hugging Face Hub id; then open http://127.0.0.1:7860
"""
from __future__ import annotations

import argparse

from .common import CHECKPOINT_HELP, add_model_options, model_options


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help=f"{CHECKPOINT_HELP}; repeat to offer several (the first is the default)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=7860)
    add_model_options(p)
    args = p.parse_args(argv)

    import uvicorn

    from ..app import create_app

    uvicorn.run(create_app(args.checkpoint, **model_options(args)), host=args.host, port=args.port)
