"""The checkpoint formats, in one place.

- Ours: ``NAME.safetensors`` holding the weights and, in its metadata, the model config as JSON.
  In prefix-only mode it holds only the mapper (``clip_project.*``), with LoRA the mapper and the
  adapters; the LM then comes from ``config.lm`` at the Hub commit ``config.lm_revision``.
  Otherwise it holds the whole model, and the config records the LM's architecture, so that it
  rebuilds offline.
- The original's: ``NAME.pt``, ``torch.save(model.state_dict())`` of the whole model, no config.
  Its own ``NAME.json`` (written with it by ``save_checkpoint``) gives the config; without one the
  config is inferred from tensor shapes, which is how the original's released weights load. A
  run-wide config file is never used for a ``.pt``: a later run could have changed it. The format
  holds GPT-2 alone, without adapters, as the original's code reads it.

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
import typing
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import lm as lms
from .files import ClipCapError, atomic_write, first_line, write_json
from .model import MAPPING_TYPES, ClipCap, ClipCapConfig, build_model, check_heads, renamed

CONFIG_KEY = "clipcap_config"
# Buffers that transformers 4.10/4.11 saved and current versions no longer have.
LEGACY_BUFFER = re.compile(r"^gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
# The index of an LM weight's block (``gpt.model.layers.3.mlp...``: 3): the first number in its name.
BLOCK_INDEX = re.compile(r"^gpt\.(?:[A-Za-z_]\w*\.)+?(\d+)\.")
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
    """A ClipCapConfig from JSON values (the names of earlier versions too), each checked: a one-line error
    naming the field otherwise."""
    if not isinstance(values, dict):
        raise ClipCapError(f"{source}: config must be a JSON object, got {type(values).__name__}")
    values = renamed(values)
    hints = typing.get_type_hints(ClipCapConfig)
    checked = {}
    for name, default in dataclasses.asdict(ClipCapConfig()).items():
        if name not in values:
            continue
        value = values[name]
        if name == "lm_config":
            value = lms.parse_architecture(value, source)
        elif name == "lm_bos":
            if not isinstance(value, bool) and value is not None:
                raise ClipCapError(f"{source}: config lm_bos must be true, false or null, got {value!r}")
        elif hints[name] is int and not lms.is_count(value, minimum=0 if name in ("num_layers", "lora_rank") else 1):
            raise ClipCapError(f"{source}: config {name} must be a positive integer, got {value!r}")
        elif hints[name] is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ClipCapError(f"{source}: config {name} must be a number of at least 0, got {value!r}")
            value = float(value)
        elif hints[name] is not int and not isinstance(value, type(default)):
            raise ClipCapError(f"{source}: config {name} must be a {type(default).__name__}, got {value!r}")
        checked[name] = value
    if checked.get("mapping_type", "mlp") not in MAPPING_TYPES:
        raise ClipCapError(f"{source}: config mapping_type must be one of {MAPPING_TYPES}, "
                           f"got {checked['mapping_type']!r}")
    config = ClipCapConfig(**checked)
    try:
        config.check()
    except ClipCapError as e:
        raise ClipCapError(f"{source}: config {str(e).removeprefix('--')}") from None
    return config


def check_finite(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse weights holding NaN or infinity (a diverged run), naming the first such tensor."""
    for key, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ClipCapError(f"{source}: weight {key} has {bad} non-finite values (NaN or inf); "
                               "the run that wrote it diverged")


def holds_lm(state: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint holds its LM's weights (not only the mapper, or the mapper and LoRA adapters)."""
    return any(k.startswith("gpt.") and not lms.is_adapter_key(k) for k in state)


def model_state_dict(model: ClipCap, full: bool) -> dict[str, torch.Tensor]:
    """The model's weights; without ``full``, a model whose LM is frozen keeps just its mapper (and its adapters)."""
    state = model.state_dict()
    if model.config.frozen_lm and not full:
        state = {k: v for k, v in state.items() if k.startswith("clip_project.") or lms.is_adapter_key(k)}
    return state


def tied_output_key(model: ClipCap) -> str | None:
    """The state-dict key of the LM's output head when it is its input embedding (stored once), else None."""
    head, embedding = model.gpt.get_output_embeddings(), model.gpt.get_input_embeddings()
    if head is None or head.weight is not embedding.weight:
        return None
    name = next(n for n, m in model.gpt.named_modules(remove_duplicate=False) if m is head)
    return f"gpt.{name}.weight"


def original_state_dict(model: ClipCap) -> dict[str, torch.Tensor]:
    """The whole model under the keys of the original's released files, which transformers 4.10 wrote:
    each attention layer also holds its causal mask ``attn.bias`` (uint8 [1, 1, P, P]) and
    ``attn.masked_bias`` (float32 -1e4), so the original's code loads the file strictly."""
    if not lms.is_gpt2(model.gpt.config) or model.config.lora_rank:
        what = "LoRA adapters" if model.config.lora_rank else f"a {model.gpt.config.model_type} LM"
        raise ClipCapError(f"the original's .pt format holds GPT-2 without adapters, not {what}: save as .safetensors")
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
    """Write ``path`` atomically: ``.safetensors`` is our format, ``.pt`` the original's (GPT-2 only)."""
    path = Path(path)
    check_finite(model.state_dict(), path)
    if path.suffix == ".pt":
        state = original_state_dict(model)
    elif path.suffix == ".safetensors":
        state = {k: v.detach().contiguous() for k, v in model_state_dict(model, full=False).items()}
        state.pop(tied_output_key(model), None)  # tied to the input embedding; stored once
    else:
        raise ClipCapError(f"{path}: checkpoint name must end in .safetensors or .pt")
    with atomic_write(path) as tmp:
        if path.suffix == ".pt":
            torch.save(state, tmp)
        else:
            save_file(state, str(tmp), metadata={CONFIG_KEY: json.dumps(model.config.to_dict())})
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
    """The GPT-2 sizes that an original checkpoint's tensor shapes fix (all but the head count)."""
    missing = [k for k in ("gpt.transformer.wte.weight", "gpt.transformer.wpe.weight") if k not in state]
    if missing:
        raise ClipCapError(f"checkpoint holds GPT-2 weights, but not {missing[0]}")
    vocab, width = state["gpt.transformer.wte.weight"].shape
    return {"vocab_size": vocab, "n_positions": state["gpt.transformer.wpe.weight"].shape[0], "n_embd": width,
            "n_layer": block_count(state)}


def block_count(state: dict[str, torch.Tensor]) -> int:
    """The LM's blocks (layers) a whole checkpoint holds: the distinct block indices of its weights' names."""
    return len({m.group(1) for k in state if not lms.is_adapter_key(k) and (m := BLOCK_INDEX.match(k))})


def mapper_fields(state: dict[str, torch.Tensor], width: int) -> dict[str, Any]:
    """The mapper's config fields that its tensor shapes fix, given the LM's width (a row count that is no
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
    """Recover the configuration of an original checkpoint (GPT-2, no config) from its tensor shapes."""
    if "gpt.transformer.wte.weight" not in state:
        raise ClipCapError("checkpoint has no GPT-2 weights and no config: cannot tell which LM it needs")
    shapes = gpt2_shapes(state)
    width = shapes["n_embd"]
    lm_config = {"model_type": "gpt2", **shapes, "n_head": max(1, width // 64),  # GPT-2 heads are 64 wide
                 "bos_token_id": 50256, "eos_token_id": 50256}
    fields = {k: int(v) for k, v in mapper_fields(state, width).items() if k != "mapping_type"}
    transformer = "prefix_length_clip" in fields
    return ClipCapConfig(**fields, mapping_type="transformer" if transformer else "mlp", only_prefix=transformer,
                         lm=GPT2_NAMES.get((width, shapes["n_layer"]), "gpt2"), lm_config=lm_config, lm_bos=False,
                         clip_model=clip_for_width(fields["prefix_size"]),
                         # the released COCO transformer (RN50x4, K=40) ran on L2-normalised embeddings
                         normalize_prefix=transformer and (fields["prefix_size"], fields["prefix_length"]) == (640, 40))


def check_fits(state: dict[str, torch.Tensor], config: ClipCapConfig, path: str | Path) -> None:
    """Before anything is built: every size in ``config`` is the one the weights' shapes give (the LM's
    width, for a mapper-only file, that of the LM it names), and its head counts divide the widths.
    A config that lies about a size, or holds an absurd one, would otherwise allocate something else,
    fail with a traceback, or decode differently."""
    if not holds_lm(state):
        width = lms.config_of(config.lm, config.lm_revision).hidden_size
        recorded = config.lm_config.get(lms.field_name(config.lm_config, "hidden_size"), width)
        trained = state["clip_project.prefix_const"].shape[1] if "clip_project.prefix_const" in state else recorded
        if trained != width:
            raise ClipCapError(f"{path}: the mapper was trained for an LM of width {trained}, but {config.lm} has "
                               f"width {width}; pass --lm naming the LM it was trained with")
    else:
        width = check_lm_fits(state, config.lm_config, path)
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


def check_lm_fits(state: dict[str, torch.Tensor], values: dict[str, Any], path: str | Path) -> int:
    """A whole checkpoint's LM weights are those of the architecture its config records: the block count
    first, then every weight's shape against the LM built on the meta device (no memory); returns its width."""
    depth, key = block_count(state), lms.field_name(values, "num_hidden_layers")
    if values.get(key, depth) != depth:
        raise ClipCapError(f"{path}: config lm_config {key} {values[key]} does not fit the weights, whose shapes "
                           f"give {depth}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm_config = lms.architecture_config(values)
            width, heads = lm_config.hidden_size, lm_config.num_attention_heads
            if "head_dim" not in values and width % heads:
                raise ClipCapError(f"{path}: config lm_config {lms.field_name(values, 'num_attention_heads')} {heads} "
                                   f"does not divide the LM's width {width}")
            with torch.device("meta"):
                lm = lms.from_architecture(values)
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:
        raise ClipCapError(f"{path}: config lm_config does not build a {values.get('model_type')} LM "
                           f"({first_line(e)})") from None
    own = {f"gpt.{k}": tuple(v.shape) for k, v in lm.state_dict().items()}
    for name, tensor in state.items():
        if name.startswith("gpt.") and not lms.is_adapter_key(name):
            if name not in own:
                raise ClipCapError(f"{path}: weight {name} is not one of the {values.get('model_type')} LM that "
                                   "config lm_config describes")
            if own[name] != tuple(tensor.shape):
                raise ClipCapError(f"{path}: config lm_config does not fit the weights: {name} has shape "
                                   f"{tuple(tensor.shape)}, the config gives {own[name]}")
    return width


def check_compatible(state: dict[str, torch.Tensor], model: ClipCap, path: str | Path,
                     config: ClipCapConfig | None = None) -> None:
    """Fail with one line naming the first setting that differs, instead of a shape traceback."""
    full = holds_lm(state)
    theirs = infer_config(state) if full and config is None else config
    if theirs is not None:
        fields = SHAPE_FIELDS if theirs.mapping_type == "transformer" else ("mapping_type", "prefix_length", "prefix_size")
        for name in fields + ("lora_rank",):
            a, b = getattr(theirs, name), getattr(model.config, name)
            if a != b:
                raise ClipCapError(f"{path}: checkpoint has {name} {a}, model built with {b}")
    if full and theirs.lm_config:
        for generic in ("hidden_size", "num_hidden_layers", "vocab_size"):
            key = lms.field_name(theirs.lm_config, generic)
            a, b = theirs.lm_config.get(key), getattr(model.gpt.config, generic)
            if a is not None and a != b:
                raise ClipCapError(f"{path}: checkpoint has an LM of {key} {a}, model built with {b}")
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
    """Load weights into the model, in its dtypes; the LM's own weights may be absent (a mapper-only or
    LoRA checkpoint), and a tied output head always is."""
    lm_absent = not holds_lm(state)
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (lm_absent and k.startswith("gpt.") and not lms.is_adapter_key(k))
               and k != tied_output_key(model)]
    if missing:
        raise ClipCapError(f"{path}: checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")


def named_lm(state: dict[str, torch.Tensor], config: ClipCapConfig) -> Any:
    """The config of the LM that a whole-model checkpoint names, when it is at hand and has the weights'
    block count and embedding shape (then it is the LM they were fine-tuned from, and its head counts are theirs)."""
    try:
        named = lms.config_of(config.lm, config.lm_revision)
    except ClipCapError:  # offline and not cached: the shapes alone decide
        return None
    embeddings = [t.shape for k, t in state.items() if k.startswith("gpt.") and t.ndim == 2]
    same = named.num_hidden_layers == block_count(state) and (named.vocab_size, named.hidden_size) in embeddings
    return named if same else None


def lm_architecture_for(state: dict[str, torch.Tensor], config: ClipCapConfig, path: str | Path) -> dict[str, Any]:
    """The LM architecture of a whole-model checkpoint. Shapes fix everything but the head counts: the
    config's, which must agree with the named LM's when that is at hand; without a config, the named
    LM's, else (an original checkpoint) GPT-2's 64-wide heads."""
    named = named_lm(state, config)
    values = config.lm_config
    if values:
        for generic in ("num_attention_heads", "num_key_value_heads"):
            key = lms.field_name(values, generic)
            if named is not None and key in values and values[key] != getattr(named, generic, values[key]):
                raise ClipCapError(f"{path}: config lm_config {key} {values[key]} disagrees with {config.lm}, the LM "
                                   f"these weights were fine-tuned from, which has {getattr(named, generic)} (a head "
                                   "count is in no weight's shape)")
        return values
    if named is not None:
        return lms.architecture(named)
    return infer_config(state).lm_config


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", lm: str | None = None,
                    **overrides: Any) -> ClipCap:
    """Load any ClipCap checkpoint (ours or the original's) with no configuration flags.

    ``lm`` overrides where the LM and its tokenizer come from; ``overrides`` set other config
    fields (``normalize_prefix=True`` for the original's transformer weights, for example).
    """
    state, config = read_checkpoint(path)
    full = holds_lm(state)
    if config is None:
        config = dataclasses.replace(infer_config(state), lm_config={})  # the head count is not in the shapes
    if lm is not None:
        overrides.update(lm=lm, lm_revision="")
    config = dataclasses.replace(config, **overrides)
    if full:
        config.lm_config = lm_architecture_for(state, config, path)
    check_fits(state, config, path)
    model = build_model(config, pretrained_lm=not full)
    check_compatible(state, model, path, config)
    load_state(model, state, path)
    if full:
        model.gpt.tie_weights()
    return model.to(device).eval()
