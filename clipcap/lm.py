"""The language model that continues the prefix: any decoder-only causal LM of transformers, with its tokenizer.

What ClipCap needs of an LM is the same for all of them: its input embeddings (the prefix is fed
as ``inputs_embeds``), its decoder body and output head (the loss), its tokenizer's BOS, "." and
EOS tokens, its positions and its cache (transformers' cache classes). This module reads them
from the LM and its config, so that GPT-2, OPT, GPT-NeoX, Llama, Qwen, Gemma or Phi load the same
way (``AutoModelForCausalLM`` and ``AutoTokenizer``, never with code from the folder or repo).

A checkpoint records of its LM the name, the Hub commit, the dtype, the LoRA settings and the
architecture (:func:`architecture`: the model type and its config's own fields), so that a whole
fine-tuned model rebuilds offline and a mapper-only or LoRA checkpoint reloads the very LM it was
trained on.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from . import hub_access
from .files import ClipCapError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# LoRA's default targets: peft's name for every linear layer of the decoder blocks (the attention and
# MLP projections; not the output head).
ALL_LINEAR = "all-linear"
# Config fields that say how a model runs, not what it is: never recorded, and refused in a checkpoint.
RUNTIME_FIELDS = {f.name for f in dataclasses.fields(PretrainedConfig)} | {"use_cache", "transformers_version"}
# Sizes that must be positive integers in a recorded architecture (by their generic names).
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def is_gpt2(config: PretrainedConfig | dict[str, Any]) -> bool:
    """Whether an LM (its config, or a recorded architecture) is GPT-2: the only one the original's formats hold."""
    model_type = config.get("model_type") if isinstance(config, dict) else config.model_type
    return model_type == "gpt2"


def config_of(name: str, revision: str = "") -> PretrainedConfig:
    """The LM's config (no weights) from a Hub name or folder, or a one-line error."""
    if hub_access.is_local(name) and not Path(name).expanduser().is_dir():
        raise ClipCapError(f"LM {name}: no such folder")
    hub_access.prepare(name)
    try:
        config = AutoConfig.from_pretrained(name, revision=revision or None, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:  # a folder without config, a hub name offline, custom code
        at = f" at revision {revision}" if revision else ""
        raise ClipCapError(f"LM {name}: cannot load its config{at} ({first_line(e)}){hub_access.unreachable_hint()}") \
            from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ClipCapError(f"LM {name}: a {config.model_type} model, which transformers has no causal LM "
                           "(AutoModelForCausalLM) for; ClipCap needs a decoder-only language model")
    return config


def hub_commit(name: str, revision: str = "") -> str:
    """The Hub commit that ``name`` at ``revision`` (a branch, tag or commit) loads from; "" for a local folder.

    Recorded in checkpoints that do not hold the LM's weights, so that they reload the LM they were
    trained on, not whatever the branch holds later.
    """
    if hub_access.is_local(name):
        return ""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, "config.json", revision=revision or None)).parent.name
    except (OSError, ValueError) as e:
        raise ClipCapError(f"LM {name}: cannot resolve revision {revision or 'main'} ({first_line(e)})"
                           f"{hub_access.unreachable_hint()}") from None


def load_pretrained(name: str, revision: str, config: PretrainedConfig, dtype: str) -> nn.Module:
    """The LM's weights, in ``dtype`` (a name of :data:`DTYPES`)."""
    try:
        return AutoModelForCausalLM.from_pretrained(name, revision=revision or None, config=config,
                                                    dtype=DTYPES[dtype], trust_remote_code=False)
    except OSError as e:
        raise ClipCapError(f"LM {name}: cannot load its weights ({first_line(e)})") from None


def from_architecture(values: dict[str, Any], dtype: str = "float32") -> nn.Module:
    """A randomly initialised LM of a recorded architecture (the weights come from a checkpoint)."""
    model = AutoModelForCausalLM.from_config(architecture_config(values))
    return model.to(DTYPES[dtype])


def architecture(config: PretrainedConfig) -> dict[str, Any]:
    """What a checkpoint records of an LM to rebuild it offline: its model type and its config class's own
    fields (sizes, norms, positions, token ids), not the settings of how it runs."""
    fields = {f.name for f in dataclasses.fields(type(config))} - RUNTIME_FIELDS
    return {"model_type": config.model_type, **{name: getattr(config, name) for name in sorted(fields)}}


def architecture_config(values: dict[str, Any]) -> PretrainedConfig:
    """The transformers config of a recorded architecture (checked with :func:`parse_architecture`)."""
    fields = {k: v for k, v in values.items() if k != "model_type"}
    return AutoConfig.for_model(values.get("model_type", "gpt2"), **fields)


def field_name(values: dict[str, Any], generic: str) -> str:
    """The name under which a recorded architecture holds a generic size (GPT-2's ``n_embd`` for ``hidden_size``)."""
    cls = CONFIG_MAPPING[values.get("model_type", "gpt2")]
    return cls.attribute_map.get(generic, generic)


def parse_architecture(values: Any, source: str | Path, name: str = "lm_config") -> dict[str, Any]:
    """A recorded architecture, checked: a model type that transformers knows, only that config's own fields,
    sizes that are positive integers and token ids that are ids. An architecture recorded before the model
    type was (GPT-2's) is GPT-2's."""
    if not isinstance(values, dict):
        raise ClipCapError(f"{source}: config {name} must be a JSON object, got {values!r}")
    model_type = values.get("model_type", "gpt2")
    cls = CONFIG_MAPPING[model_type] if isinstance(model_type, str) and model_type in CONFIG_MAPPING else None
    if cls is None or cls not in AutoModelForCausalLM._model_mapping:
        raise ClipCapError(f"{source}: config {name} model_type {model_type!r} is not a causal LM of transformers")
    known = {f.name for f in dataclasses.fields(cls)} - RUNTIME_FIELDS
    sizes = {cls.attribute_map.get(generic, generic) for generic in SIZE_FIELDS}
    for key, value in values.items():
        if key == "model_type":
            continue
        if key not in known:
            raise ClipCapError(f"{source}: config {name} has an unknown field {key!r} (not one of {cls.__name__}'s)")
        token_id = key.endswith("_token_id")
        if (key in sizes and not is_count(value, 1)) or \
                (token_id and not (value is None or is_count(value, 0) or
                                   (isinstance(value, list) and all(is_count(v, 0) for v in value)))):
            raise ClipCapError(f"{source}: config {name} {key} must be a "
                               f"{'token id' if token_id else 'positive integer'}, got {value!r}")
    return {"model_type": model_type, **{k: v for k, v in values.items() if k != "model_type"}}


def is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def max_positions(config: PretrainedConfig) -> int | None:
    """The most positions the LM takes (prefix and caption together), when its config says."""
    return getattr(config, "max_position_embeddings", None)


def output_logits(lm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM's logits of final hidden states: its output head, then the soft cap some LMs (Gemma 2) put
    on their logits, as their own forward does."""
    logits = lm.get_output_embeddings()(hidden)
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def checkpoint_activations(lm: nn.Module) -> None:
    """Recompute the LM's activations in the backward pass instead of keeping them (in training mode only).
    transformers calls it ``activation_checkpointing_enable`` since 5.2x, ``gradient_checkpointing_enable`` before."""
    enable = getattr(lm, "activation_checkpointing_enable", None)
    try:
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as e:  # an LM whose code does not support it
        raise ClipCapError(f"--gradient_checkpointing: {first_line(e)}") from None


# --------------------------------------------------------------------------- the tokenizer


def load_tokenizer(name_or_dir: str, revision: str = "") -> Any:
    """The LM's own tokenizer from the Hub or a local folder, or a one-line error.

    Offline, transformers 5 may answer a hub name it has not cached (or a folder without tokenizer
    files) with an empty tokenizer instead of an error; an LM's vocabulary has at least the 256 byte
    tokens, so fewer means nothing was found.
    """
    if hub_access.is_local(name_or_dir) and not Path(name_or_dir).expanduser().is_dir():
        raise ClipCapError(f"LM {name_or_dir}: no such folder")
    hub_access.prepare(name_or_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir, revision=revision or None, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as e:
        tokenizer, reason = None, first_line(e)
    if tokenizer is None or len(tokenizer) < 256:
        where = "folder has no tokenizer" if Path(name_or_dir).is_dir() else \
            "no such folder, and not loadable from the Hugging Face Hub (offline, or not an LM's name?)"
        raise ClipCapError(f"LM {name_or_dir}: {where}" + (f" ({reason})" if tokenizer is None and not
                                                           Path(name_or_dir).is_dir() else "")
                           + hub_access.unreachable_hint())
    return tokenizer


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts every text with its BOS token (Llama's, OPT's and Gemma's do; GPT-2's,
    Qwen's and Pythia's do not): such an LM was trained with BOS first, so ClipCap puts it before the prefix."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos is not None and len(ids) > 0 and ids[0] == bos


def period_token(tokenizer: Any) -> int:
    """The token of a caption's final "." as the LM's tokenizer writes it after a word (GPT-2's 13)."""
    ids = tokenizer("a dog.", add_special_tokens=False).input_ids
    if ids and tokenizer.decode(ids[-1:]).strip() == ".":
        return ids[-1]
    token = tokenizer.convert_tokens_to_ids(".")
    if token is None or token == tokenizer.unk_token_id:
        raise ClipCapError(f"LM {tokenizer.name_or_path}: its tokenizer has no token for \".\", which ends a "
                           "caption; use --stop eos")
    return token


# --------------------------------------------------------------------------- LoRA


def add_lora(lm: nn.Module, rank: int, alpha: float, targets: str) -> None:
    """Put LoRA adapters of ``rank`` on the LM's ``targets`` (module names, comma-separated, or
    :data:`ALL_LINEAR`), in place; only the adapters keep ``requires_grad``. The adapters are float32
    also on a half-precision LM, so that the optimizer updates them in full precision."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    names: str | list[str] = targets if targets == ALL_LINEAR else [t.strip() for t in targets.split(",") if t.strip()]
    with warnings.catch_warnings():  # GPT-2's Conv1D layers: peft transposes them itself, and says so
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        try:
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=names), lm)
        except ValueError as e:  # no module matches
            raise ClipCapError(f"--lora_targets {targets}: {first_line(e)}") from None
    cast_adapter_dtype(lm, "default")


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is a LoRA adapter's weight (peft names them ``lora_A``, ``lora_B`` ...)."""
    return ".lora_" in key


def merge_lora(lm: nn.Module) -> None:
    """Fold every LoRA adapter into the weight it adapts and drop it, in place: the plain LM, as fast as
    one without adapters, with the same outputs."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(lm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent) if parent else lm, child, module.get_base_layer())
