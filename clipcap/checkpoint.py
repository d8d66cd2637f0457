"""The checkpoint formats, in one place.

- Ours: ``NAME.safetensors`` holding the weights and, in its metadata, the model config as JSON.
  In prefix-only mode it holds only the mapper (``clip_project.*``); GPT-2 comes from ``config.gpt2``.
- The original's: ``NAME.pt``, ``torch.save(model.state_dict())`` of the whole model, no config.
  Its own ``NAME.json`` (written with it by ``save_checkpoint``) gives the config; without one the
  config is inferred from tensor shapes, which is how the original's released weights load. A
  run-wide config file is never used for a ``.pt``: a later run could have changed it.

Weights and configs are checked on load: a non-finite tensor, a bad config value or a config
whose sizes are not the weights' is a one-line error naming it, before anything is built; never
a silently broken model.

Both are read with ``weights_only=True`` / safetensors: loading never unpickles code.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import GPT2Config

from . import hub_access
from .files import ClipCapError, atomic_write, first_line, write_json
from .model import GPT2_FIELDS, MAPPING_TYPES, ClipCap, ClipCapConfig, build_model, check_heads, gpt2_config_of

CONFIG_KEY = "clipcap_config"
# Buffers that transformers 4.10/4.11 saved and current versions no longer have.
LEGACY_BUFFER = re.compile(r"^gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
# Hub names of the GPT-2 sizes, by (width, depth): the tokenizer of an inferred checkpoint.
GPT2_NAMES = {(768, 12): "gpt2", (1024, 24): "gpt2-medium", (1280, 36): "gpt2-large", (1600, 48): "gpt2-xl"}
# The CLIP behind an original checkpoint, by embedding width D: what captioning images needs.
CLIP_BY_WIDTH = {512: "ViT-B/32", 640: "RN50x4", 768: "ViT-L/14", 1024: "RN50"}
# The CLIP recorded for embeddings of a width no known CLIP gives, until someone names it.
UNKNOWN_CLIP = "unknown"
# Fields whose disagreement between checkpoint and model is reported by name.
SHAPE_FIELDS = ("mapping_type", "prefix_length", "prefix_length_clip", "prefix_size", "num_layers")


def clip_for_width(width: int) -> str:
    """The CLIP assumed for embeddings of this width when nothing names it (:data:`UNKNOWN_CLIP` for other widths)."""
    return CLIP_BY_WIDTH.get(width, UNKNOWN_CLIP)


def config_path_for(weights: str | Path) -> Path:
    """The config of one ``.pt`` file, paired with it alone: ``out/coco_prefix-009.pt`` -> ``out/coco_prefix-009.json``."""
    return Path(weights).with_suffix(".json")


def save_config(config: ClipCapConfig, path: str | Path) -> None:
    write_json(path, config.to_dict(), indent=2)


def parse_config(values: Any, source: str | Path) -> ClipCapConfig:
    """A ClipCapConfig from JSON values, each checked: a one-line error naming the field otherwise."""
    if not isinstance(values, dict):
        raise ClipCapError(f"{source}: config must be a JSON object, got {type(values).__name__}")
    checked = {}
    for name, default in dataclasses.asdict(ClipCapConfig()).items():
        if name not in values:
            continue
        value = values[name]
        kind = type(default)
        if name == "gpt2_config":
            value = parse_gpt2_config(value, source)
        elif kind is int and not is_count(value, minimum=0 if name == "num_layers" else 1):
            raise ClipCapError(f"{source}: config {name} must be a positive integer, got {value!r}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ClipCapError(f"{source}: config {name} must be a number of at least 0, got {value!r}")
            value = float(value)
        elif kind is not int and not isinstance(value, kind):
            raise ClipCapError(f"{source}: config {name} must be a {kind.__name__}, got {value!r}")
        checked[name] = value
    if checked.get("mapping_type", "mlp") not in MAPPING_TYPES:
        raise ClipCapError(f"{source}: config mapping_type must be one of {MAPPING_TYPES}, "
                           f"got {checked['mapping_type']!r}")
    return ClipCapConfig(**checked)


def parse_gpt2_config(values: Any, source: str | Path) -> dict[str, Any]:
    """``gpt2_config``: GPT-2's sizes (positive integers) and token ids, nothing else (it builds a GPT2Config)."""
    if not isinstance(values, dict):
        raise ClipCapError(f"{source}: config gpt2_config must be a JSON object, got {values!r}")
    for name, value in values.items():
        if name not in GPT2_FIELDS:
            raise ClipCapError(f"{source}: config gpt2_config has an unknown field {name!r} "
                               f"(known: {', '.join(GPT2_FIELDS)})")
        token_id = name.endswith("_token_id")
        if not (is_count(value, minimum=0 if token_id else 1) or (token_id and value is None)):
            raise ClipCapError(f"{source}: config gpt2_config {name} must be a "
                               f"{'token id' if token_id else 'positive integer'}, got {value!r}")
    return values


def is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_finite(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse weights holding NaN or infinity (a diverged run), naming the first such tensor."""
    for key, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ClipCapError(f"{source}: weight {key} has {bad} non-finite values (NaN or inf); "
                               "the run that wrote it diverged")


def model_state_dict(model: ClipCap, full: bool) -> dict[str, torch.Tensor]:
    """The model's weights; without ``full``, a prefix-only model keeps just its mapper."""
    state = model.state_dict()
    if model.config.only_prefix and not full:
        state = {k: v for k, v in state.items() if k.startswith("clip_project.")}
    return state


def original_state_dict(model: ClipCap) -> dict[str, torch.Tensor]:
    """The whole model under the keys of the original's released files, which transformers 4.10 wrote:
    each attention layer also holds its causal mask ``attn.bias`` (uint8 [1, 1, P, P]) and
    ``attn.masked_bias`` (float32 -1e4), so the original's code loads the file strictly."""
    state = model_state_dict(model, full=True)
    positions = model.gpt.config.n_positions
    causal = torch.tril(torch.ones((positions, positions), dtype=torch.uint8)).view(1, 1, positions, positions)
    legacy = {}
    for key, tensor in state.items():
        legacy[key] = tensor
        if (m := re.match(r"gpt\.transformer\.h\.(\d+)\.ln_1\.bias$", key)):  # 4.10's order: ln_1, then attn
            legacy[f"gpt.transformer.h.{m.group(1)}.attn.bias"] = causal
            legacy[f"gpt.transformer.h.{m.group(1)}.attn.masked_bias"] = torch.tensor(-1e4)
    return legacy


def save_checkpoint(model: ClipCap, path: str | Path) -> Path:
    """Write ``path`` atomically: ``.safetensors`` is our format, ``.pt`` the original's."""
    path = Path(path)
    check_finite(model.state_dict(), path)
    with atomic_write(path) as tmp:
        if path.suffix == ".pt":
            torch.save(original_state_dict(model), tmp)
        elif path.suffix == ".safetensors":
            state = {k: v.detach().contiguous() for k, v in model_state_dict(model, full=False).items()}
            if "gpt.lm_head.weight" in state:  # tied to the input embedding; stored once
                del state["gpt.lm_head.weight"]
            save_file(state, str(tmp), metadata={CONFIG_KEY: json.dumps(model.config.to_dict())})
        else:
            raise ClipCapError(f"{path}: checkpoint name must end in .safetensors or .pt")
    if path.suffix == ".pt":
        save_config(model.config, config_path_for(path))
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], ClipCapConfig | None]:
    """Weights (checked finite) and the config: a ``.safetensors``'s own, a training state's own,
    or a ``.pt``'s paired ``NAME.json``; None when there is none (then shapes decide)."""
    path = Path(path)
    if not path.is_file():
        raise ClipCapError(f"{path}: checkpoint not found")
    config_dict: dict[str, Any] | None = None
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
            if CONFIG_KEY in meta:
                config_dict = _json(meta[CONFIG_KEY], path)
        else:
            state = load_pt(path)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise ClipCapError(f"{path}: not a readable checkpoint ({first_line(e)})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        if isinstance(state.get("config"), str):  # a training state of ours: it holds its own config
            config_dict = _json(state["config"], path)
        state = state["model"]  # a training checkpoint of ours that also holds optimizer state
    if not isinstance(state, dict) or not any(isinstance(k, str) and k.startswith("clip_project.") for k in state):
        raise ClipCapError(f"{path}: not a ClipCap checkpoint (no clip_project.* weights)")
    state = {k: v for k, v in state.items() if not LEGACY_BUFFER.match(k)}
    check_finite(state, path)
    if config_dict is None and path.suffix == ".pt" and config_path_for(path).is_file():
        config_dict = _json(config_path_for(path).read_text(), config_path_for(path))
        return state, parse_config(config_dict, config_path_for(path))
    return state, (parse_config(config_dict, path) if config_dict is not None else None)


def load_pt(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; its warning about a plain pickle's protocol is
    dropped: such a file is refused (or read safely) anyway, and the message says which."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def _json(text: str, source: str | Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ClipCapError(f"{source}: config is not valid JSON ({e})") from None


def gpt2_shapes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The GPT-2 sizes that a whole-model checkpoint's tensor shapes fix (all but the head count)."""
    missing = [k for k in ("gpt.transformer.wte.weight", "gpt.transformer.wpe.weight") if k not in state]
    if missing:
        raise ClipCapError(f"checkpoint holds GPT-2 weights, but not {missing[0]}")
    vocab, width = state["gpt.transformer.wte.weight"].shape
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"gpt\.transformer\.h\.(\d+)\.", k))), default=-1)
    return {"vocab_size": vocab, "n_positions": state["gpt.transformer.wpe.weight"].shape[0], "n_embd": width,
            "n_layer": depth}


def mapper_fields(state: dict[str, torch.Tensor], width: int) -> dict[str, Any]:
    """The mapper's config fields that its tensor shapes fix, given GPT-2's width (a row count that is no
    multiple of it gives a fraction, which no config matches)."""
    def per_vector(rows: int) -> int | float:
        return rows // width if rows % width == 0 else rows / width

    if "clip_project.model.0.weight" in state and "clip_project.model.2.weight" in state:
        return {"mapping_type": "mlp", "prefix_size": state["clip_project.model.0.weight"].shape[1],
                "prefix_length": per_vector(state["clip_project.model.2.weight"].shape[0])}
    if "clip_project.linear.weight" in state and "clip_project.prefix_const" in state:
        layers = {int(m.group(1)) for k in state if (m := re.match(r"clip_project\.transformer\.layers\.(\d+)\.", k))}
        rows, prefix_size = state["clip_project.linear.weight"].shape
        return {"mapping_type": "transformer", "prefix_size": prefix_size,
                "prefix_length": state["clip_project.prefix_const"].shape[0], "prefix_length_clip": per_vector(rows),
                "num_layers": len(layers)}
    raise ClipCapError("checkpoint mapper is neither the MLP nor the transformer layout")


def infer_config(state: dict[str, torch.Tensor]) -> ClipCapConfig:
    """Recover the configuration of an original checkpoint from its tensor shapes."""
    if "gpt.transformer.wte.weight" not in state:
        raise ClipCapError("checkpoint has no GPT-2 weights and no config: cannot tell which GPT-2 it needs")
    shapes = gpt2_shapes(state)
    width = shapes["n_embd"]
    gpt2_config = {**shapes, "n_head": max(1, width // 64),  # GPT-2 heads are 64 wide
                   "bos_token_id": 50256, "eos_token_id": 50256}
    fields = {k: int(v) for k, v in mapper_fields(state, width).items() if k != "mapping_type"}
    transformer = "prefix_length_clip" in fields
    return ClipCapConfig(**fields, mapping_type="transformer" if transformer else "mlp", only_prefix=transformer,
                         gpt2=GPT2_NAMES.get((width, shapes["n_layer"]), "gpt2"), gpt2_config=gpt2_config,
                         clip_model=clip_for_width(fields["prefix_size"]),
                         # the released COCO transformer (RN50x4, K=40) ran on L2-normalised embeddings
                         normalize_prefix=transformer and (fields["prefix_size"], fields["prefix_length"]) == (640, 40))


def check_fits(state: dict[str, torch.Tensor], config: ClipCapConfig, path: str | Path) -> None:
    """Before anything is built: every size in ``config`` is the one the weights' shapes give (GPT-2's
    width, for a mapper-only file, that of the GPT-2 it names), and its head counts divide the widths.
    A config that lies about a size, or holds an absurd one, would otherwise allocate something else,
    fail with a traceback, or decode differently."""
    if not any(k.startswith("gpt.") for k in state):
        width = gpt2_config_of(config.gpt2).n_embd
        trained = state["clip_project.prefix_const"].shape[1] if "clip_project.prefix_const" in state \
            else config.gpt2_config.get("n_embd", width)
        if trained != width:
            raise ClipCapError(f"{path}: the mapper was trained for a GPT-2 of width {trained}, but {config.gpt2} has "
                               f"width {width}; pass --gpt2 naming the GPT-2 it was trained with")
    else:
        shapes = gpt2_shapes(state)
        for name, value in shapes.items():
            if config.gpt2_config.get(name, value) != value:
                raise ClipCapError(f"{path}: config gpt2_config {name} {config.gpt2_config[name]} does not fit the "
                                   f"weights, whose shapes give {value}")
        width, heads = shapes["n_embd"], config.gpt2_config.get("n_head", 1)
        if width % heads:
            raise ClipCapError(f"{path}: config gpt2_config n_head {heads} does not divide GPT-2's width {width}")
    fields = mapper_fields(state, width)
    for name, value in fields.items():
        if getattr(config, name) != value:
            given = value if isinstance(value, (str, int)) else f"{value:.3g}"
            raise ClipCapError(f"{path}: config {name} {getattr(config, name)} does not fit the weights, "
                               f"whose shapes give {given}")
    if config.mapping_type == "transformer":
        try:
            check_heads(config, state["clip_project.prefix_const"].shape[1])
        except ClipCapError as e:
            raise ClipCapError(f"{path}: config {e}") from None


def check_compatible(state: dict[str, torch.Tensor], model: ClipCap, path: str | Path,
                     config: ClipCapConfig | None = None) -> None:
    """Fail with one line naming the first setting that differs, instead of a shape traceback."""
    full = any(k.startswith("gpt.") for k in state)
    theirs = infer_config(state) if full else config
    if theirs is not None:
        fields = SHAPE_FIELDS if theirs.mapping_type == "transformer" else ("mapping_type", "prefix_length", "prefix_size")
        for name in fields:
            a, b = getattr(theirs, name), getattr(model.config, name)
            if a != b:
                raise ClipCapError(f"{path}: checkpoint has {name} {a}, model built with {b}")
    if full:
        for name in ("n_embd", "n_layer", "vocab_size"):
            a, b = theirs.gpt2_config[name], getattr(model.gpt.config, name)
            if a != b:
                raise ClipCapError(f"{path}: checkpoint has GPT-2 {name} {a}, model built with {b}")
    own = model.state_dict()
    for key, tensor in state.items():
        if key not in own:
            raise ClipCapError(f"{path}: checkpoint has weight {key} that the model does not")
        if own[key].shape != tensor.shape:
            raise ClipCapError(f"{path}: checkpoint has {key} of shape {tuple(tensor.shape)}, "
                               f"model built with {tuple(own[key].shape)}")


def load_weights(model: ClipCap, path: str | Path) -> None:
    """Load a checkpoint's weights into an existing model, checking that it fits first."""
    state, config = read_checkpoint(path)
    check_compatible(state, model, path, config)
    load_state(model, state, path)


def load_state(model: ClipCap, state: dict[str, torch.Tensor], path: str | Path) -> None:
    mapper_only = not any(k.startswith("gpt.") for k in state)
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (mapper_only and k.startswith("gpt.")) and k != "gpt.lm_head.weight"]
    if missing:
        raise ClipCapError(f"{path}: checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")


def named_gpt2(state: dict[str, torch.Tensor], gpt2: str) -> GPT2Config | None:
    """The config of the GPT-2 that a whole-model checkpoint names, when it is at hand and has the
    weights' shapes (then it is the GPT-2 they were fine-tuned from, and its head count is theirs)."""
    hub_access.prepare(gpt2)
    try:
        named = GPT2Config.from_pretrained(gpt2)
    except OSError:  # offline and not cached: the shapes alone decide
        return None
    shapes = gpt2_shapes(state)
    return named if (named.n_embd, named.n_layer, named.vocab_size) == \
        (shapes["n_embd"], shapes["n_layer"], shapes["vocab_size"]) else None


def gpt2_architecture_for(state: dict[str, torch.Tensor], config: ClipCapConfig, path: str | Path) -> dict[str, Any]:
    """The GPT-2 architecture of a whole-model checkpoint. Shapes fix everything but the head count:
    the config's, which must agree with the named GPT-2's when that is at hand; without a config,
    the named GPT-2's, else GPT-2's 64-wide heads."""
    named = named_gpt2(state, config.gpt2)
    if config.gpt2_config:
        if named is not None and config.gpt2_config.get("n_head") != named.n_head:
            raise ClipCapError(f"{path}: config gpt2_config n_head {config.gpt2_config.get('n_head')} disagrees with "
                               f"{config.gpt2}, the GPT-2 these weights were fine-tuned from, which has {named.n_head} "
                               "heads (a head count is in no weight's shape)")
        return config.gpt2_config
    inferred = infer_config(state).gpt2_config
    if named is not None:
        inferred.update(n_head=named.n_head, bos_token_id=named.bos_token_id, eos_token_id=named.eos_token_id)
    return inferred


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", gpt2: str | None = None,
                    **overrides: Any) -> ClipCap:
    """Load any ClipCap checkpoint (ours or the original's) with no configuration flags.

    ``gpt2`` overrides where GPT-2 and its tokenizer come from; ``overrides`` set other config
    fields (``normalize_prefix=True`` for the original's transformer weights, for example).
    """
    state, config = read_checkpoint(path)
    full = any(k.startswith("gpt.") for k in state)
    if config is None:
        config = dataclasses.replace(infer_config(state), gpt2_config={})  # the head count is not in the shapes
    config = dataclasses.replace(config, **overrides, **({} if gpt2 is None else {"gpt2": gpt2}))
    if full:
        config.gpt2_config = gpt2_architecture_for(state, config, path)
    check_fits(state, config, path)
    model = build_model(config, pretrained_gpt2=not full)
    check_compatible(state, model, path, config)
    load_state(model, state, path)
    if full:
        model.gpt.tie_weights()
    return model.to(device).eval()
