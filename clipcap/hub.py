"""ClipCap models as Hugging Face Hub repositories: a folder out, a folder or repo id in.

A saved model is a folder of three files, uploaded as it is:

- ``model.safetensors``: our checkpoint format (:mod:`clipcap.checkpoint`), config in its metadata.
  A prefix-only model holds only the mapper (a LoRA model the mapper and the adapters) and names
  its LM and the LM's Hub commit in the config; a fine-tuned one holds the LM too.
- ``config.json``: the same :class:`clipcap.model.ClipCapConfig` (the LM, its revision, dtype and
  LoRA settings among it), readable without the weights.
- ``README.md``: a model card (Hub metadata, paper, data, backbones, mapper, recipe, scores).

:func:`resolve_checkpoint` turns a checkpoint file, such a folder, or a Hub repo id into the
weights file to load; repo ids go through ``snapshot_download``, so the local cache and
``HF_HUB_OFFLINE`` work as they do for every Hugging Face library. Only weights (safetensors, or
``.pt`` read with ``weights_only``) and JSON configs are read: no pickled objects, no code.

Writing a folder replaces only what an earlier :func:`save_pretrained` wrote there, never a
foreign ``README.md`` or ``config.json``; a model goes to the Hub only when its backbones are
named by Hub ids, which load for everyone.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from . import hub_access
from . import lm as lms
from .checkpoint import CONFIG_KEY, UNKNOWN_CLIP, config_path_for, save_checkpoint, save_config
from .files import ClipCapError, atomic_write, markdown_table, read_json
from .model import ClipCap, ClipCapConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# File-name fragments of the original's released weights, and their training data.
DATASETS = {"conceptual": "Conceptual Captions (3.3M images)", "coco": "COCO (Karpathy train split)",
            "transformer_weights": "COCO (Karpathy train split)"}
PAPER = "https://arxiv.org/abs/2111.09734"
CODE = "https://github.com/rmokady/CLIP_prefix_caption"


def is_repo_id(name: str) -> bool:
    """``owner/name`` (optionally ``@revision``) that is not a local path or checkpoint file name."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = name.partition("@")[0]
    if Path(name).exists() or repo_id.count("/") != 1 or repo_id.lower().endswith(CHECKPOINT_SUFFIXES):
        return False
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A checkpoint file (ours or the original's ``.pt``), a saved folder, or a Hub repo id
    (``owner/name`` or ``owner/name@revision``) -> the weights file to load.

    A repo id is downloaded (or found in the Hugging Face cache, which is all that is tried
    under ``HF_HUB_OFFLINE=1``) by ``huggingface_hub.snapshot_download``.
    """
    name = str(name_or_path)
    if is_repo_id(name):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError

        repo_id, _, revision = name.partition("@")
        hub_access.prepare(repo_id)
        try:
            folder = Path(snapshot_download(repo_id, revision=revision or None,
                                            allow_patterns=[WEIGHTS_NAME, CONFIG_NAME]))
        except (HfHubHTTPError, OSError, ValueError) as e:  # not found, not cached offline, bad revision
            reason = str(e).partition("\n")[0][:200]
            raise ClipCapError(f"{name}: no such local file or folder, and not downloadable from the Hugging Face "
                               f"Hub ({type(e).__name__}: {reason}){hub_access.unreachable_hint()}") from None
        if not (folder / WEIGHTS_NAME).is_file():
            raise ClipCapError(f"{name}: the Hub repo has no {WEIGHTS_NAME} (not a ClipCap model saved by save_pretrained)")
        return folder / WEIGHTS_NAME
    path = Path(name)
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise ClipCapError(f"{path}: folder has no {WEIGHTS_NAME} (not a ClipCap model saved by save_pretrained)")
        return path / WEIGHTS_NAME
    return path  # a file; read_checkpoint reports one that is missing or unreadable


def checkpoint_files(name_or_path: str | Path) -> list[Path]:
    """The local files that loading ``name_or_path`` reads (none for a Hub id): what no output may replace."""
    path = Path(name_or_path)
    if path.is_dir():
        return [path / WEIGHTS_NAME, path / CONFIG_NAME]
    if is_repo_id(str(name_or_path)):
        return []
    return [path, config_path_for(path)] if path.suffix == ".pt" else [path]  # a .pt's config is beside it


def infer_dataset(path: str | Path) -> str | None:
    """The training data named by a checkpoint's file name, when it says (``coco_weights.pt``)."""
    name = Path(path).name.lower()
    return next((dataset for key, dataset in DATASETS.items() if key in name), None)


def read_metrics(path: str | Path) -> dict[str, float]:
    """evaluate.py's metrics JSON (pycocoevalcap's keys, the paper's units: the toolkit's x100)."""
    path = Path(path)
    metrics = read_json(path, "metrics")
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise ClipCapError(f"{path}: expected evaluate.py's metrics JSON, an object of metric name -> number")
    return metrics


def model_card(config: ClipCapConfig, dataset: str | None = None, recipe: str | None = None,
               metrics: dict[str, float] | None = None, source: str | None = None, repo_id: str | None = None) -> str:
    """The Hub model card (README.md with YAML metadata) of a model with ``config``.

    ``metrics`` are pycocoevalcap scores as evaluate.py writes them, in the paper's units (the
    toolkit's x100). ``source`` says where the weights came from (the original's file, say);
    ``repo_id`` goes into the usage example.
    """
    from huggingface_hub import ModelCardData

    config = ClipCapConfig.from_dict(config.to_dict())  # backbones named as the files record them
    model_type = config.lm_config.get("model_type", "gpt2")
    data = ModelCardData(license="mit", library_name="clipcap", pipeline_tag="image-to-text",
                         tags=["image-captioning", "clipcap", "clip", model_type],
                         base_model=None if hub_access.is_local(config.lm) else config.lm)
    if config.mapping_type == "mlp":
        mapper = f"MLP (CLIP embedding -> {config.prefix_length} prefix vectors)"
    else:
        mapper = (f"transformer, {config.num_layers} layers x {config.num_heads} heads (CLIP embedding -> "
                  f"{config.prefix_length_clip} tokens -> {config.prefix_length} prefix vectors)")
    lines = [
        "# ClipCap image captioning",
        "",
        f"[ClipCap: CLIP Prefix for Image Captioning]({PAPER}) (Ron Mokady, Amir Hertz, Amit H. Bermano, "
        f"2021, arXiv 2111.09734): a mapping network turns a CLIP image embedding into a prefix that a "
        f"language model continues as a caption. Original code: {CODE}.",
        "",
        "| | |",
        "|---|---|",
        f"| training data | {dataset or 'not recorded'} |",
        f"| CLIP image encoder | {clip_text(config)} |",
        f"| language model | {lm_text(config)} |",
        f"| mapping network | {mapper} |",
    ]
    if recipe:
        lines.append(f"| recipe | `{recipe}` |")
    if source:
        lines.append(f"| weights | converted from `{source}` |")
    if metrics:
        keys = list(metrics)  # in evaluate.py's order, which is pycocoevalcap's
        lines += ["", "## Scores", "", "pycocoevalcap, x100 (the paper's units):", "",
                  markdown_table([keys, [f"{metrics[k]:.2f}" for k in keys]])]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from clipcap import Captioner",
        "",
        f'captioner = Captioner.from_pretrained("{repo_id or "OWNER/NAME"}")',
        'captioner.caption(["photo.jpg"])  # [["A dog sitting on a bench."]]',
        "```",
        "",
        "## Licence",
        "",
        "MIT, as the original code. The CLIP and language model weights keep their own licences.",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def lm_text(config: ClipCapConfig) -> str:
    """The model card's LM: its name, revision and architecture, how it was trained and what is stored here."""
    values = config.lm_config
    name = f"`{config.lm}`" + (f" at commit `{config.lm_revision}`" if config.lm_revision else "")
    if values:
        layers, width = (values.get(lms.field_name(values, g)) for g in ("num_hidden_layers", "hidden_size"))
        name += f" ({values.get('model_type', 'gpt2')}, {layers} layers, width {width})"
    dtype = f", {config.lm_dtype} weights" if config.lm_dtype != "float32" else ""
    if config.lora_rank:
        return (f"{name}{dtype}, frozen, with LoRA adapters (rank {config.lora_rank}, alpha {config.lora_alpha:g}, "
                f"on {config.lora_targets}); the adapters are stored here, the LM is loaded by name")
    if config.only_prefix:
        return f"{name}{dtype}, frozen (not stored here; loaded by name)"
    return f"{name}, fine-tuned (stored here)"


def clip_text(config: ClipCapConfig) -> str:
    """The model card's CLIP: its name and embeddings, or how to name it when nothing recorded it."""
    details = f"{config.prefix_size}-d embeddings" + (", L2-normalised" if config.normalize_prefix else "")
    if config.clip_model == UNKNOWN_CLIP:
        return f"unknown ({details}; name it with `clipcap-convert --clip_model NAME`)"
    return f"`{config.clip_model}` ({details})"


def check_folder(folder: str | Path) -> None:
    """Refuse to write into ``folder`` when that would replace a file :func:`save_pretrained` did not write
    (a project's own README.md, say); its own earlier output may be replaced."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ClipCapError(f"{folder}: exists and is not a folder")
    for name, ours in ((WEIGHTS_NAME, _is_our_weights), (CONFIG_NAME, _is_our_config), (CARD_NAME, _is_our_card)):
        path = folder / name
        if path.exists() and not ours(path):
            raise ClipCapError(f"{path}: exists and is not a ClipCap model's (which save_pretrained writes): "
                               "writing the model there would replace it; choose another folder")


def _is_our_weights(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return CONFIG_KEY in (f.metadata() or {})
    except (SafetensorError, OSError):
        return False


def _is_our_config(path: Path) -> bool:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(values, dict) and {"mapping_type", "prefix_length", "prefix_size"} <= set(values) and \
        bool({"lm", "gpt2"} & set(values))


def _is_our_card(path: Path) -> bool:
    try:
        head = path.read_text(encoding="utf-8")[:4096]
    except (OSError, UnicodeDecodeError):
        return False
    return head.startswith("---\n") and "\nlibrary_name: clipcap\n" in head.partition("\n---\n")[0] + "\n"


def save_pretrained(model: ClipCap, folder: str | Path, dataset: str | None = None, recipe: str | None = None,
                    metrics: str | Path | dict[str, float] | None = None, source: str | None = None,
                    repo_id: str | None = None) -> Path:
    """Write ``model`` as a Hub-ready folder (weights, config.json, model card); returns the folder.

    ``metrics`` is evaluate.py's metrics.json (a path) or its contents; the other arguments go to
    :func:`model_card`.
    """
    folder = Path(folder)
    check_folder(folder)
    if isinstance(metrics, (str, Path)):
        metrics = read_metrics(metrics)
    save_checkpoint(model, folder / WEIGHTS_NAME)
    save_config(model.config, folder / CONFIG_NAME)
    with atomic_write(folder / CARD_NAME) as tmp:
        tmp.write_text(model_card(model.config, dataset, recipe, metrics, source, repo_id))
    return folder


def push_to_hub(model: ClipCap, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload ClipCap model", lm: str | None = None, clip_model: str | None = None,
                **card: Any) -> str:
    """Save ``model`` as :func:`save_pretrained` does and upload the folder to ``repo_id`` (created if
    needed); ``card`` as in :func:`save_pretrained`. Returns the commit URL.

    ``lm`` and ``clip_model`` rename the backbones the model records, to the Hub ids that its local
    copies came from: a model that names a local path would load for no one else, and is refused.
    A renamed LM's revision is dropped (its main branch then loads): a local copy's commit is not the Hub's.
    """
    from huggingface_hub import HfApi

    names = {"lm": lm or model.config.lm, "clip_model": clip_model or model.config.clip_model}
    for (field, name), example in zip(names.items(), ("gpt2", "openai/clip-vit-base-patch32")):
        if hub_access.is_local(name) or name == UNKNOWN_CLIP:
            raise ClipCapError(f"{repo_id}: not pushed: its {field} {name!r} would load for no one else; name the "
                               f"Hugging Face Hub id it stands for: push_to_hub(..., {field}=\"{example}\")")
    if lm and lm != model.config.lm:
        model.config.lm_revision = ""  # the local copy's commit, if any, is not the Hub id's
    model.config.lm, model.config.clip_model = names["lm"], names["clip_model"]
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="clipcap-push-") as folder:
        save_pretrained(model, folder, repo_id=repo_id, **card)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return commit.commit_url
