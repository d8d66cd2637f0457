"""The inference notebook runs top to bottom (against a tiny checkpoint, offline) and shows its captions."""
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient
from PIL import Image
from skimage import data as photos

from clipcap.captioner import Captioner
from clipcap.checkpoint import save_checkpoint
from clipcap.model import ClipCapConfig, build_model

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "clip_prefix_captioning_inference.ipynb"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")


def test_inference_notebook_executes(tmp_path, gpt2_dir, clip_dir, monkeypatch):
    torch.manual_seed(0)
    model = build_model(ClipCapConfig(gpt2=gpt2_dir, clip_model=clip_dir, prefix_size=16, prefix_length=4))
    with torch.no_grad():
        model.gpt.transformer.wte.weight[13] *= 5  # captions that end
    checkpoint = save_checkpoint(model, tmp_path / "tiny.safetensors")
    monkeypatch.setenv("CLIPCAP_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

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
