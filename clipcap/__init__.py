"""ClipCap: CLIP prefix captioning with GPT-2.

    from clipcap import Captioner
    captioner = Captioner.from_pretrained("owner/name")   # a Hub repo id, a saved folder or a checkpoint file
    captioner.caption(["photo.jpg"])

``Captioner`` is imported on first use, so ``import clipcap.evaluation`` (say) loads no torch.
"""
from typing import Any

__all__ = ["Captioner"]


def __getattr__(name: str) -> Any:
    if name == "Captioner":
        from .captioner import Captioner

        return Captioner
    raise AttributeError(f"module 'clipcap' has no attribute {name!r}")
