"""ClipCap: CLIP prefix captioning with GPT-2, as the paper, or any decoder-only language model.

    from clipcap import Captioner
    captioner = Captioner.from_pretrained("owner/name")   # a Hub repo id, a saved folder or a checkpoint file
    captioner.caption(["photo.jpg"], DecodingOptions("sample", top_p=0.9, num_captions=5, seed=0))

The public API is these five names, imported on first use, so ``import clipcap.evaluation``
(say) loads no torch.
"""
import importlib
from typing import Any

_HOMES = {"Captioner": "captioner", "DecodingOptions": "decoding", "load_checkpoint": "checkpoint", "ClipCap": "model",
          "ClipCapConfig": "model"}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'clipcap' has no attribute {name!r}")
