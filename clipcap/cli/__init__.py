"""The command-line programs, one module each, thin over the library.

One spelling per concept across all of them, the original's spellings kept as aliases:
``--out`` (a file, or the run folder of training; alias ``--out_path`` / ``--out_dir``),
``--clip_model`` (alias ``--clip_model_type``), ``--batch_size`` (alias ``--bs``), ``--device``
(``auto``: a GPU when there is one), ``--gpt2``. Each module has ``main(argv=None)``, which raises
ClipCapError for bad input; :func:`run` turns that into one line on stderr and exit status 2.
The ``run_*`` functions at the bottom are the installed commands (``clipcap-train`` ...).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from ..files import ClipCapError


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


def _command(module: str) -> Callable[[], None]:
    def command() -> None:
        run(importlib.import_module(f"{__name__}.{module}").main)

    command.__name__ = f"run_{module}"
    return command


# The installed commands (clipcap-train ...) and the top-level scripts call these.
run_train = _command("train")
run_predict = _command("predict")
run_evaluate = _command("evaluate")
run_parse_coco = _command("parse_coco")
run_parse_conceptual = _command("parse_conceptual")
run_parse_nocaps = _command("parse_nocaps")
run_parse_captions = _command("parse_captions")
run_convert = _command("convert")
run_app = _command("app")
