"""What every command shares: one spelling per flag, and :func:`run`, which ends a command on bad input.

One spelling per concept across all of them, the original's spellings kept as aliases:
``--out`` (a file, or the run folder of training; alias ``--out_path`` / ``--out_dir``),
``--clip_model`` (alias ``--clip_model_type``), ``--batch_size`` (alias ``--bs``), ``--device``
(``auto``: a GPU when there is one), ``--lm`` (alias ``--gpt2``, the original's). ``--checkpoint``
takes a checkpoint file, a folder written by save_pretrained or a Hugging Face Hub id.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Callable

from ..files import ClipCapError

if TYPE_CHECKING:
    from ..decoding import DecodingOptions


def run(main: Callable[[], object]) -> None:
    """Run a command's main: a ClipCapError becomes ``error: ...`` on stderr and exit status 2."""
    try:
        main()
    except ClipCapError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_out(parser: argparse.ArgumentParser, *aliases: str, **kwargs) -> None:
    """``--out``, with the original's spelling of it as an alias."""
    parser.add_argument("--out", *aliases, dest="out", **kwargs)


def add_clip_model(parser: argparse.ArgumentParser, **kwargs) -> None:
    """``--clip_model`` (alias ``--clip_model_type``, the original's): a CLIP name, folder or OpenAI file."""
    parser.add_argument("--clip_model", "--clip_model_type", dest="clip_model", **kwargs)


def add_batch_size(parser: argparse.ArgumentParser, default: int, help: str) -> None:
    """``--batch_size`` (alias ``--bs``, the original's)."""
    parser.add_argument("--batch_size", "--bs", dest="batch_size", type=positive, default=default, help=help)


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1 ...")


CHECKPOINT_HELP = ("a checkpoint (ours, or the original's .pt), a folder written by save_pretrained, "
                   "or a Hugging Face Hub id owner/name[@revision]")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """What may replace a checkpoint's own settings when loading it, and the device to load it on."""
    from ..checkpoint import CLIP_BY_WIDTH

    widths = ", ".join(f"{width} {name}" for width, name in CLIP_BY_WIDTH.items())
    add_clip_model(parser, help=f"CLIP for images (default: the checkpoint's, or by its embedding width: {widths})")
    parser.add_argument("--lm", "--gpt2", dest="lm",
                        help="the language model and tokenizer, a name or folder (default: the checkpoint's)")
    parser.add_argument("--lm_dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="the LM's weights (default: the checkpoint's; bfloat16 halves a large LM's memory)")
    parser.add_argument("--merge_lora", action="store_true",
                        help="fold a LoRA checkpoint's adapters into the LM before captioning (same captions, faster)")
    parser.add_argument("--normalize_prefix", action=argparse.BooleanOptionalAction, default=None,
                        help="L2-normalise CLIP embeddings (default: the checkpoint's; on for the original's "
                             "released transformer)")
    add_device(parser)


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of Captioner.from_checkpoint given by :func:`add_model_options`' flags."""
    from ..runtime import resolve_device

    return dict(device=resolve_device(args.device), lm=args.lm, clip_model=args.clip_model,
                normalize_prefix=args.normalize_prefix, lm_dtype=args.lm_dtype, merge_lora=args.merge_lora)


def add_decoding(parser: argparse.ArgumentParser) -> None:
    """The flags of :class:`clipcap.decoding.DecodingOptions`: beam search by default, ``--greedy``, or
    nucleus sampling with ``--sample`` (implied by ``--top_p`` or ``--seed``)."""
    from ..decoding import MIN_TEMPERATURE, STOPS, DecodingOptions

    default = DecodingOptions()
    group = parser.add_argument_group(f"decoding (default: beam search, beam {default.beam_size})")
    strategy = group.add_mutually_exclusive_group()
    strategy.add_argument("--greedy", action="store_true", help="greedy decoding (the original's generate2)")
    strategy.add_argument("--sample", action="store_true", help="nucleus sampling (implied by --top_p or --seed)")
    group.add_argument("--beam_size", type=positive, default=default.beam_size)
    group.add_argument("--top_p", type=float, default=None, help=f"nucleus sampling mass (default {default.top_p})")
    group.add_argument("--temperature", type=float, default=default.temperature,
                       help=f"divides the logits (at least {MIN_TEMPERATURE})")
    group.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    group.add_argument("--num_captions", type=positive, default=default.num_captions,
                       help="captions per image (beam or sampling)")
    group.add_argument("--max_length", type=positive, default=default.max_length, help="most tokens per caption")
    group.add_argument("--stop", choices=STOPS, default=default.stop,
                       help='end a caption at "." (the original\'s rule) or at end-of-text')


def decoding_options(args: argparse.Namespace) -> DecodingOptions:
    """The DecodingOptions of :func:`add_decoding`'s flags (a bad value raises ClipCapError)."""
    import dataclasses

    from ..decoding import DecodingOptions

    sample = args.sample or args.top_p is not None or args.seed is not None
    if args.greedy and sample:
        raise ClipCapError("--greedy does not go with --top_p or --seed")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DecodingOptions)
             if getattr(args, f.name, None) is not None}  # unset --top_p and --seed keep the defaults
    return DecodingOptions(strategy="greedy" if args.greedy else "sample" if sample else "beam", **given)
