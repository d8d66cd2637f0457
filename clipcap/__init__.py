"""ClipCap: CLIP prefix captioning with GPT-2.

    from clipcap import Captioner
    captioner = Captioner.from_pretrained("owner/name")   # a Hub repo id, a saved folder or a checkpoint file
    captioner.caption(["photo.jpg"])

The public API is these four names, imported on first use, so ``import clipcap.evaluation``
(say) loads no torch.
"""
import importlib
from typing import Any

_HOMES = {"Captioner": "captioner", "load_checkpoint": "checkpoint", "ClipCap": "model", "ClipCapConfig": "model"}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'clipcap' has no attribute {name!r}")
