"""Cog predictor (Replicate) for the original's released weights, with the original's inputs.

    weights/coco_weights.pt           COCO, MLP mapper + fine-tuned GPT-2, CLIP ViT-B/32
    weights/conceptual_weights.pt     Conceptual Captions, same configuration

    cog predict -i image=@photo.jpg -i model=conceptual-captions -i use_beam_search=true

Needs the ``cog`` package, which Cog's image provides (see cog.yaml). Both models load once, in
setup(); a prediction is one caption, greedy or beam search (beam 5), as the original's was.
"""
from pathlib import Path as FilePath

from cog import BasePredictor, Input, Path

from clipcap.captioner import Captioner
from clipcap.decoding import DecodingOptions
from clipcap.runtime import resolve_device

WEIGHTS = FilePath(__file__).with_name("weights")
MODELS = {"coco": "coco_weights.pt", "conceptual-captions": "conceptual_weights.pt"}


class Predictor(BasePredictor):
    def setup(self) -> None:
        device = resolve_device("auto")
        self.captioners = {name: Captioner.from_checkpoint(WEIGHTS / file, device=device)
                           for name, file in MODELS.items()}

    def predict(self, image: Path = Input(description="Input image"),
                model: str = Input(description="Model to use", choices=list(MODELS), default="coco"),
                use_beam_search: bool = Input(description="Beam search instead of greedy decoding", default=False),
                ) -> str:
        captions = self.captioners[model].caption([image], DecodingOptions(strategy="beam" if use_beam_search else "greedy"))
        return captions[0][0]
