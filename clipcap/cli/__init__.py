"""The installed commands (``clipcap-train`` ...): one function each, running its command's module.

Each command is a module of this package, thin over the library, with ``main(argv=None)``, which raises
ClipCapError for bad input; :func:`~clipcap.cli.common.run` turns that into one line on stderr and exit
status 2. The flags they share are in :mod:`clipcap.cli.common`. These functions are pyproject.toml's
``[project.scripts]`` and what the top-level scripts run; each imports its module when it runs, so that one
command's --help does not load every other's imports.
"""
from __future__ import annotations

from .common import run


def run_train() -> None:
    from .train import main
    run(main)


def run_predict() -> None:
    from .predict import main
    run(main)


def run_evaluate() -> None:
    from .evaluate import main
    run(main)


def run_parse_coco() -> None:
    from .parse_coco import main
    run(main)


def run_parse_conceptual() -> None:
    from .parse_conceptual import main
    run(main)


def run_parse_nocaps() -> None:
    from .parse_nocaps import main
    run(main)


def run_parse_captions() -> None:
    from .parse_captions import main
    run(main)


def run_convert() -> None:
    from .convert import main
    run(main)


def run_store() -> None:
    from .store import main
    run(main)


def run_app() -> None:
    from .app import main
    run(main)


def run_reproduce() -> None:
    from .reproduce import main
    run(main)


def run_fetch() -> None:
    from .fetch import main
    run(main)
