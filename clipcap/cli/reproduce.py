"""Table 1 in one command: each row's recipe run stage by stage (features, train, score), then one report.

    make reproduce                          # every row, Table 1's then those beyond it (coco_siglip2_qwen,
                                            # capdec_coco); the report lands in $RUNS/report/ (runs/report/)
    make reproduce ROWS=coco_mlp,nocaps     # chosen rows: clipcap-reproduce --rows coco_mlp,nocaps
    make data ROWS=coco_mlp                 # download what the rows need, then stop: --fetch_only
    clipcap-reproduce --fetch               # download what is missing, then run
    clipcap-reproduce --dry_run             # what would run, and the projected training time
    clipcap-reproduce --report_only         # the report again from the finished runs (seconds)

Every row takes the recipes' environment: COCO NOCAPS CC (data folders), RUNS, CLIP, GPT2, EPOCHS, BS (the
global batch), VAL_CAPTIONS, K, PY, GPUS (torchrun processes; default: every visible GPU); the modern pair's
tower and LM are TOWER and LM, not CLIP and GPT2 (recipes/coco_siglip2_qwen.sh). A stage whose
outputs are complete for the same commands is skipped, so a killed run resumes where it stopped, and a
changed setting re-runs what depends on it. Rows whose data is missing are skipped, with the command
that fetches it.
"""
from __future__ import annotations

import argparse
import os

from ..reproduce import Options, parse_rows, reproduce


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=os.environ.get("ROWS"),
                   help="comma-separated rows (recipe names), or all (default: $ROWS, else all)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--fetch", action="store_true", help="download the data the rows lack, then run")
    what.add_argument("--fetch_only", action="store_true", help="download the data the rows lack, then stop")
    what.add_argument("--dry_run", action="store_true", help="show what would run and the projected time; run nothing")
    what.add_argument("--report_only", action="store_true", help="write the report from the finished runs")
    p.add_argument("--budget_steps", type=int, default=20,
                   help="training steps measured per row for the projected time (0: no measuring)")
    p.add_argument("--gallery", type=int, default=8, help="test images shown per row, with greedy and beam captions")
    p.add_argument("--clipscore_model", default="ViT-B/32", help="CLIP of CLIPScore (name or folder with a tokenizer)")
    p.add_argument("--device", default="auto", help="for the measuring steps, the galleries and CLIPScore")
    p.add_argument("--download_processes", type=int, default=None,
                   help="img2dataset processes for Conceptual Captions (default: the CPUs)")
    p.add_argument("--download_threads", type=int, default=64, help="download threads per process")
    args = p.parse_args(argv)
    if args.budget_steps < 0 or args.gallery < 0:
        p.error("--budget_steps and --gallery must not be negative")
    return Options(rows=parse_rows(args.rows), **{k: v for k, v in vars(args).items() if k != "rows"})


def main(argv: list[str] | None = None) -> None:
    reproduce(parse_args(argv))
