"""Train ClipCap on cached CLIP features.

    python train.py --data ./data/coco/oscar_split_ViT-B_32_train.pkl --out_dir ./coco_train/
    python train.py --only_prefix --mapping_type transformer --num_layers 8 --prefix_length 40 \\
        --prefix_length_clip 40 --data ./data/coco/oscar_split_RN50x4_train.pkl --out_dir ./coco_train/
    torchrun --nproc_per_node 4 train.py --bs 10 ...   # the paper's global batch of 40 on 4 GPUs
    python train.py --resume ./coco_train/             # continue a stopped run with its own settings

Every flag of the original train.py keeps its spelling, meaning and default. The flags are the
fields of TrainConfig and of the model's ClipCapConfig (clipcap/training.py, clipcap/model.py).
With --resume, the defaults are the resumed run's settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from ..model import ClipCapConfig
from ..training import FROM_THE_DATA, TrainConfig, resumed_config, train


def add_fields(group: argparse._ArgumentGroup, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass ``cls``: its name (or ``flags``), type, default, help and choices."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        flags = f.metadata.get("flags", (f"--{f.name}",))
        kind = hints[f.name]
        if kind is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                               help=f.metadata["help"])
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None -> X
        group.add_argument(*flags, dest=f.name, type=base, default=f.default, choices=f.metadata.get("choices"),
                           help=f.metadata["help"] + (" (default: %(default)s)" if f.default is not None else ""))


def given_prefix(argv: list[str] | None) -> str | None:
    """``--prefix`` when the command line gives it: it names the run to resume in a folder of several."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--prefix")
    return parser.parse_known_args(argv)[0].prefix


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fields(parser.add_argument_group("the model"), ClipCapConfig, skip=FROM_THE_DATA)
    add_fields(parser.add_argument_group("the run"), TrainConfig)
    parser.add_argument("--is_rn", action="store_true", help=argparse.SUPPRESS)  # the original's; the width is read
    args = parser.parse_args(argv)
    if args.resume:  # --resume DIR alone continues the run as it was; a flag given changes (or is refused)
        parser.set_defaults(**resumed_config(args.resume, given_prefix(argv)).flat())
        args = parser.parse_args(argv)
    values = vars(args)
    values.pop("is_rn")
    return TrainConfig.from_flat(values)


def main(argv: list[str] | None = None) -> Any:
    return train(parse_args(argv))
