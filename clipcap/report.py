"""The reproduction's report: Table 1 beside this run's numbers, and per row what explains them.

:func:`collect` gathers everything from the finished runs (the record ``$RUNS/reproduce.json`` that
clipcap.reproduce keeps, the metrics, training logs, checkpoints and galleries) into one dictionary,
written as ``report.json``; ``index.html`` (opens from disk: its images sit beside it) and
``report.md`` show exactly that dictionary, nothing else. Scores are in percent, like the paper's,
under pycocoevalcap's names; CLIP-S and RefCLIP-S too (x100), as evaluate.py writes them.
The run files are read by the small readers below, one per file kind.
"""
from __future__ import annotations

import datetime
import html
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from . import paper
from .files import atomic_write, markdown_table, write_json
from .gallery import gallery_folder
from .stages import REPO, Plan, Step, resolve

CIDER_TOLERANCE = 1.0  # a row reproduces when its CIDEr is within the paper's +/- 1


# --------------------------------------------------------------------------- readers of run files


def read_metrics(path: Path) -> dict[str, Any] | None:
    """evaluate.py's scores (the paper's units), per domain for nocaps (``{"entire": {...}, "in-domain": ...}``),
    or None without them."""
    values = read_json_file(path)
    if not isinstance(values, dict):
        return None
    if all(isinstance(v, dict) for v in values.values()):
        return {domain: {k: float(v) for k, v in scores.items()} for domain, scores in values.items()}
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}


def read_log(path: Path) -> list[dict[str, Any]]:
    """The training log's records (``{prefix}_log.jsonl``); a record repeated by a resumed run counts once."""
    records: dict[tuple, dict[str, Any]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        records[(record.get("step"), "val_loss" in record)] = record
    return list(records.values())


def read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_run_config(run_dir: Path, prefix: str) -> dict[str, Any] | None:
    """The model config a training run recorded (``{prefix}_config.json``)."""
    return read_json_file(run_dir / f"{prefix}_config.json")


# --------------------------------------------------------------------------- what the runs say


def epochs_of(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per epoch: the last logged training loss, validation loss and CIDEr."""
    epochs: dict[int, dict[str, Any]] = {}
    last_epoch = 0
    for record in sorted(log, key=lambda r: (r.get("step", 0), "val_loss" in r)):
        if "loss" in record and "epoch" in record:
            last_epoch = record["epoch"]
            epochs.setdefault(last_epoch, {"epoch": last_epoch})["train_loss"] = record["loss"]
        if "val_loss" in record:
            epoch = record.get("epoch", last_epoch)
            entry = epochs.setdefault(epoch, {"epoch": epoch})
            entry.update(val_loss=record["val_loss"], step=record.get("step"))
            if "val_CIDEr" in record:
                entry["val_CIDEr"] = record["val_CIDEr"]
    return [epochs[e] for e in sorted(epochs)]


def chosen_epoch(epochs: list[dict[str, Any]], scored: str | None) -> int | None:
    """The epoch whose checkpoint was scored: the best by val CIDEr (else val loss) for ``{prefix}_best``,
    as training keeps it (the first of equals), else the epoch in the checkpoint's name."""
    if scored and scored.endswith("_best.safetensors"):
        if any("val_CIDEr" in e for e in epochs):
            return max((e for e in epochs if "val_CIDEr" in e), key=lambda e: e["val_CIDEr"])["epoch"]
        if any("val_loss" in e for e in epochs):
            return min((e for e in epochs if "val_loss" in e), key=lambda e: e["val_loss"])["epoch"]
        return None
    if scored and scored.endswith(".safetensors") and scored[-16:-12] == "-" and scored[-15:-12].isdigit():
        return int(scored[-15:-12]) + 1
    return epochs[-1]["epoch"] if epochs else None


def epoch_seconds(run_dir: Path, prefix: str, started: float | None) -> dict[int, float]:
    """Seconds per epoch, from the times its checkpoints were written (the first from when training started)."""
    times = {}
    previous = started
    for epoch in range(1, 10_000):
        path = run_dir / f"{prefix}-{epoch - 1:03d}.safetensors"
        if not path.is_file():
            break
        written = path.stat().st_mtime
        if previous is not None:
            times[epoch] = round(written - previous, 1)
        previous = written
    return times


def differences(train: Step, clip_model: str | None, row: paper.Row) -> list[str]:
    """The row's training settings that are not those its source states, as ``epochs: 2 (paper: 10)``."""
    from .budget import processes
    from .cli.train import parse_args

    cfg = parse_args(train.script_args())
    model = cfg.model
    ours = {"epochs": cfg.epochs, "batch_size": cfg.batch_size * cfg.grad_accum * processes(train), "lr": cfg.lr,
            "warmup": cfg.warmup, "gpt2": model.lm, "prefix_length": model.prefix_length,
            "mapping_type": model.mapping_type, "only_prefix": model.only_prefix, "num_layers": model.num_layers,
            "normalize_prefix": model.normalize_prefix, "noise_variance": model.noise_variance,
            "lora_rank": model.lora_rank, "lm_dtype": model.lm_dtype, "clip_model": clip_model}
    names = {"batch_size": "batch (global)", "prefix_length": "K (prefix length)", "only_prefix": "LM frozen",
             "num_layers": "transformer layers", "clip_model": "CLIP", "gpt2": "LM", "lora_rank": "LoRA rank",
             "normalize_prefix": "normalised embeddings", "noise_variance": "noise variance", "lm_dtype": "LM dtype"}
    return [f"{names.get(k, k)}: {ours[k]} ({row.source}: {v})" for k, v in paper.paper_settings(row).items()
            if k in ours and ours[k] != v]


def machine() -> dict[str, Any]:
    """What this report was made on: GPUs, driver, CUDA, library versions, commit."""
    import torch
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "cuda": torch.version.cuda,
                            "cpus": os.cpu_count(), "platform": platform.platform()}
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["gpu"] = ", ".join(f"{n} x {name}" for name, n in {g: gpus.count(g) for g in gpus}.items()) or "none (CPU)"
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info["driver"] = driver.splitlines()[0] if driver else None
    commit = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    info["commit"] = (commit + (" (with uncommitted changes)" if dirty else "")) if commit else None
    return info


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def collect(record: dict[str, Any], report_dir: Path) -> dict[str, Any]:
    """Everything the report shows, from the record of the reproduction and the runs' files; copies each row's
    gallery thumbnails into ``report_dir/images/``."""
    plans = {name: _plan(entry["plan"]) for name, entry in record.get("rows", {}).items() if entry.get("plan")}
    makers = {path: name for name, plan in plans.items() for step in plan.stage_steps("train") for path in step.paths()}
    rows = []
    for row in (*paper.ROWS, *paper.EXTRA_ROWS):
        entry = record.get("rows", {}).get(row.name, {})
        rows.append(_row(row, entry, plans.get(row.name), makers, report_dir))
    total = sum(stage.get("seconds", 0) for entry in record.get("rows", {}).values()
                for stage in entry.get("stages", {}).values())
    return {"generated": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine(), "total_seconds": round(total, 1), "cider_tolerance": CIDER_TOLERANCE,
            "units": "the paper's: pycocoevalcap's scores x100 (CIDEr 108.35), CLIP-S and RefCLIP-S alike",
            "rows": rows}


def _plan(values: dict[str, Any]) -> Plan:
    return Plan(values["row"], values["run_dir"], values["prefix"], [tuple(n) for n in values["needs"]],
                [Step(s["stage"], s["command"], s["outputs"]) for s in values["steps"]])


def _row(row: paper.Row, entry: dict[str, Any], plan: Plan | None, makers: dict[Path, str],
         report_dir: Path) -> dict[str, Any]:
    status = entry.get("status") or "skipped"
    reason = entry.get("reason") or {"done": "", "running": "stopped before it finished: make reproduce resumes it"
                                     }.get(status, "not run")
    result: dict[str, Any] = {
        "row": row.name, "title": row.title, "dataset": row.dataset, "status": status if status in (
            "done", "failed") else "skipped", "reason": reason,
        "paper": row.scores, "paper_params": row.params, "paper_training_time": row.training_time,
        "paper_notes": list(row.notes), "beyond_paper": row.name in paper.EXTRA_BY_NAME, "settings_source": row.source,
        "paper_scores_note": row.scores_note, "ours": {}, "difference": {}, "stages": entry.get("stages", {})}
    if plan is None:
        return result
    result["commands"] = {stage: [s.text() for s in plan.stage_steps(stage)] for stage in plan.stages
                          if stage != "gallery"}  # the gallery is made in the reproduction's own process
    result["run_dir"] = plan.run_dir
    if status != "done":  # whatever its folder holds is not this row's result
        return result
    scores = plan.stage_steps("score")
    if row.dataset == "nocaps":
        for step in scores:
            name = makers.get(resolve(step.flag("--checkpoint") or ""), step.flag("--checkpoint") or "")
            metrics = read_metrics(resolve(step.flag("--out") or ""))
            if metrics:
                result["ours"][name] = {d: {k: metrics[d][k] for k in paper.NOCAPS_METRICS if k in metrics[d]}
                                        for d in paper.NOCAPS_DOMAINS if d in metrics}
                result["difference"][name] = {d: _difference(row.scores.get(name, {}).get(d, {}), v)
                                              for d, v in result["ours"][name].items()}
            result.setdefault("galleries", {})[name] = _gallery(step, report_dir, f"{row.name}_{name}")
        return result
    if scores:
        metrics = read_metrics(resolve(scores[0].flag("--out") or ""))
        if metrics:
            result["ours"] = metrics.get("entire", metrics)
            result["difference"] = _difference(row.scores, result["ours"])
            if "CIDEr" in result["difference"]:
                result["within_tolerance"] = abs(result["difference"]["CIDEr"]) <= CIDER_TOLERANCE
        result["galleries"] = {row.name: _gallery(scores[0], report_dir, row.name)}
    run_dir = resolve(plan.run_dir)
    log = read_log(run_dir / f"{plan.prefix}_log.jsonl")
    epochs = epochs_of(log)
    train = plan.stage_steps("train")
    started = entry.get("stages", {}).get("train", {}).get("started")
    for epoch, seconds in epoch_seconds(run_dir, plan.prefix, started).items():
        if epoch <= len(epochs):
            epochs[epoch - 1]["seconds"] = seconds
    result.update(epochs=epochs, chosen_epoch=chosen_epoch(epochs, scores[0].flag("--checkpoint") if scores else None),
                  loss=[[r["step"], r["loss"]] for r in sorted(log, key=lambda r: r["step"]) if "loss" in r],
                  config=read_run_config(run_dir, plan.prefix))
    if train:
        features = plan.stage_steps("features")
        clip = next((s.flag("--clip_model_type") or s.flag("--clip_model") for s in features
                     if s.flag("--clip_model_type") or s.flag("--clip_model")), None)
        result["differences_from_paper"] = differences(train[0], clip, row)
    return result


def _difference(paper_scores: dict[str, float], ours: dict[str, float]) -> dict[str, float]:
    return {k: round(ours[k] - v, 2) for k, v in paper_scores.items() if isinstance(v, (int, float)) and k in ours}


def _gallery(score: Step, report_dir: Path, name: str) -> dict[str, Any] | None:
    """A scored run's gallery (made by clipcap.gallery beside its metrics), its thumbnails copied into the report."""
    folder = gallery_folder(score)
    gallery = read_json_file(folder / "gallery.json")
    if gallery is None:
        return None
    target = report_dir / "images" / name
    target.mkdir(parents=True, exist_ok=True)
    for image in gallery["images"]:
        shutil.copyfile(folder / image["file"], target / Path(image["file"]).name)
        image["file"] = f"images/{name}/{Path(image['file']).name}"
    return gallery


# --------------------------------------------------------------------------- plots


def plot_curves(row: dict[str, Any], folder: Path) -> dict[str, str]:
    """The row's loss curves and val CIDEr per epoch (the scored epoch marked) as PNGs; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {}
    epochs = row.get("epochs", [])
    if row.get("loss"):
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot(*zip(*row["loss"]), label="training loss")
        val = [(e["step"], e["val_loss"]) for e in epochs if "val_loss" in e and e.get("step") is not None]
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set(xlabel="optimizer step", ylabel="cross-entropy per token", title=f"{row['row']}: loss")
        ax.grid(alpha=0.3)
        ax.legend()
        names["loss"] = _save(fig, folder / f"{row['row']}_loss.png")
    cider = [(e["epoch"], e["val_CIDEr"]) for e in epochs if "val_CIDEr" in e]
    if cider:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot(*zip(*cider), "o-", label="val CIDEr (greedy)")
        chosen = row.get("chosen_epoch")
        if chosen is not None and any(e == chosen for e, _ in cider):
            ax.plot([chosen], [dict(cider)[chosen]], "r*", markersize=16, label=f"scored: epoch {chosen}")
        ax.set(xlabel="epoch", ylabel="CIDEr", title=f"{row['row']}: validation CIDEr per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        names["cider"] = _save(fig, folder / f"{row['row']}_cider.png")
    return names


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path.name


# --------------------------------------------------------------------------- the pages


def _number(value: Any, signed: bool = False) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def duration(seconds: float | None) -> str:
    if not seconds:
        return "—"
    seconds = int(round(seconds))
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min" if seconds >= 3600 else \
        f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def table_rows(data: dict[str, Any], beyond_paper: bool = False) -> list[list[str]]:
    """Table 1's COCO and Conceptual Captions rows (or the rows beyond the paper): per row the paper's scores,
    this run's and the difference; a row beyond the paper without scores to compare with has neither."""
    header = ["row", "", *(paper.METRIC_LABELS[m] for m in paper.METRICS)]
    lines = [header]
    for row in data["rows"]:
        if row["dataset"] == "nocaps" or row.get("beyond_paper", False) != beyond_paper:
            continue
        compared = bool(row["paper"]) or not beyond_paper
        label = "paper" if compared else f"paper: {row.get('paper_scores_note') or 'none'}"
        lines.append([row["row"], label, *(_number(row["paper"].get(m)) for m in paper.METRICS)])
        lines.append(["", "this run" if row["status"] == "done" else row["status"],
                      *(_number(row["ours"].get(m)) for m in paper.METRICS)])
        if compared:
            lines.append(["", "difference", *(_number(row["difference"].get(m), True) for m in paper.METRICS)])
    return lines


def nocaps_rows(data: dict[str, Any]) -> list[list[str]]:
    """nocaps CIDEr / SPICE per domain: the paper's beside this run's, per COCO model."""
    row = next(r for r in data["rows"] if r["dataset"] == "nocaps")
    names = {"entire": "overall"}
    lines = [["model", "", *(names.get(d, d) for d in paper.NOCAPS_DOMAINS)]]
    for model, domains in row["paper"].items():
        for label, source in (("paper", domains), ("this run", row["ours"].get(model, {}))):
            lines.append([model if label == "paper" else "", label, *(
                " / ".join(_number(source.get(d, {}).get(m)) for m in paper.NOCAPS_METRICS)
                for d in paper.NOCAPS_DOMAINS)])
    return lines


CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 10px 0; font-size: 14px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
tr.paper td { color: #555; } tr.sep td { border-top: 2px solid #888; }
.on { background: #dff3e3; } .off { background: #fbe0dd; }
.status-done { color: #11772d; } .status-failed { color: #b3261e; } .status-skipped { color: #8a6d00; }
.meta { color: #555; font-size: 14px; } code, pre { background: #f5f5f3; font-size: 12px; }
pre { padding: 8px; overflow-x: auto; white-space: pre-wrap; }
.curves img { max-width: 560px; width: 48%; margin-right: 1%; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 12px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; font-size: 13px; }
.card { overflow-wrap: anywhere; }
.card img { width: 100%; max-width: 256px; display: block; margin: auto; image-rendering: pixelated; }
.card p { margin: 4px 0; } .refs { color: #666; } a { color: inherit; }
"""


def _html_table(lines: list[list[str]], data: dict[str, Any] | None = None) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in lines[0]) + "</tr>"]
    cider = lines[0].index("CIDEr") if "CIDEr" in lines[0] else None
    within = {r["row"]: r.get("within_tolerance") for r in (data or {}).get("rows", [])}
    current = None
    for line in lines[1:]:
        current = line[0] or current
        kind = "paper" if line[1].startswith("paper") else ""
        cells = []
        for i, cell in enumerate(line):
            css = ""
            if i == cider and line[1] in ("this run", "difference") and within.get(current) is not None:
                css = ' class="on"' if within[current] else ' class="off"'
            cells.append(f"<td{css}>{html.escape(cell)}</td>")
        out.append(f'<tr class="{kind}{" sep" if line[0] else ""}">' + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _html_row(row: dict[str, Any]) -> str:
    e = html.escape
    parts = [f'<h2 id="{e(row["row"])}">{e(row["row"])}: {e(row["title"])} '
             f'<span class="status-{e(row["status"])}">({e(row["status"])})</span></h2>']
    if row.get("reason"):
        parts.append(f"<p>{e(row['reason'])}</p>")
    meta = [f"paper: {row['paper_params']} parameters, {row['paper_training_time']}" if row.get("paper_params") else ""]
    stages = row.get("stages", {})
    if stages:
        meta.append("time here: " + ", ".join(f"{s} {duration(v.get('seconds'))}" for s, v in stages.items()))
    parts.append("<p class='meta'>" + "<br>".join(e(m) for m in meta if m) + "</p>")
    for note in [*row.get("paper_notes", []), *([f"Scores to compare with: {row['paper_scores_note']}."]
                                               if row.get("paper_scores_note") else [])]:
        parts.append(f"<p class='meta'>{e(note)}</p>")
    source = row.get("settings_source", "paper")
    whose = {"paper": "the paper's", "recipe": "its recipe's defaults"}.get(source, f"{source}'s")
    if row.get("differences_from_paper"):
        parts.append(f"<p><b>Settings that differ from {e(whose)}:</b></p><ul>" +
                     "".join(f"<li>{e(d)}</li>" for d in row["differences_from_paper"]) + "</ul>")
    elif "differences_from_paper" in row:
        parts.append(f"<p>Settings: {e(whose)}.</p>")
    curves = row.get("curves", {})
    if curves:
        parts.append('<div class="curves">' + "".join(
            f'<img src="{e(name)}" alt="{e(row["row"])} {kind}" data-kind="curve">' for kind, name in curves.items())
            + "</div>")
    if row.get("epochs"):
        lines = [["epoch", "train loss", "val loss", "val CIDEr", "time"]]
        for epoch in row["epochs"]:
            mark = " (scored)" if epoch["epoch"] == row.get("chosen_epoch") else ""
            lines.append([f"{epoch['epoch']}{mark}", _number(epoch.get("train_loss")), _number(epoch.get("val_loss")),
                          _number(epoch.get("val_CIDEr")), duration(epoch.get("seconds"))])
        parts.append(_html_table(lines))
    for name, gallery in (row.get("galleries") or {}).items():
        if not gallery:
            continue
        score = gallery.get("clipscore", {})
        if "CLIP-S" in score:
            parts.append(f"<p><b>{e(name)}</b>: CLIP-S {score['CLIP-S']:.2f}, RefCLIP-S {score['RefCLIP-S']:.2f} "
                         f"({score['images']} images, {e(score['model'])})</p>")
        elif score.get("skipped"):
            parts.append(f"<p class='meta'>CLIPScore not computed: {e(score['skipped'])}</p>")
        cards = []
        for image in gallery["images"]:
            refs = "<br>".join(e(r) for r in image["references"])
            alt = f"test image {image['image_id']}"
            cards.append(f'<div class="card"><img src="{e(image["file"])}" alt="{e(alt)}" '
                         f'data-kind="gallery"><p><b>beam:</b> {e(image["beam"])}</p>'
                         f'<p><b>greedy:</b> {e(image["greedy"])}</p><p class="refs"><b>references:</b><br>{refs}</p>'
                         "</div>")
        parts.append('<div class="grid">' + "".join(cards) + "</div>")
    if row.get("commands"):
        parts.append("<p><b>Commands</b> (from the repository root):</p><pre>" +
                     e("\n".join(c for commands in row["commands"].values() for c in commands)) + "</pre>")
    if row.get("config"):
        parts.append("<details><summary>model config</summary><pre>" + e(json.dumps(row["config"], indent=1)) +
                     "</pre></details>")
    return "\n".join(parts)


def write_html(data: dict[str, Any], path: Path) -> None:
    m = data["machine"]
    e = html.escape
    header = (f"generated {e(data['generated'])} · commit {e(m.get('commit') or '—')} · GPU {e(m['gpu'])} · driver "
              f"{e(m.get('driver') or '—')} · CUDA {e(m.get('cuda') or '—')} · torch {e(m['torch'])} · transformers "
              f"{e(m['transformers'])} · total time {e(duration(data['total_seconds']))}")
    rows = "\n".join(_html_row(row) for row in data["rows"])
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ClipCap: Table 1 reproduced</title><style>{CSS}</style></head>
<body>
<h1>ClipCap: Table 1 reproduced</h1>
<p class="meta">{header}</p>
<p>Scores in percent (pycocoevalcap). Green: CIDEr within the paper's ±{CIDER_TOLERANCE:g}; red: outside.</p>
<h2>COCO (Karpathy test) and Conceptual Captions (validation)</h2>
{_html_table(table_rows(data), data)}
<h2>nocaps validation: CIDEr / SPICE per domain</h2>
{_html_table(nocaps_rows(data))}
<h2>Beyond the paper</h2>
<p>Recipes beyond Table 1, run as its rows are; a row's own source states its settings.</p>
{_html_table(table_rows(data, beyond_paper=True), data)}
{rows}
</body></html>
"""
    with atomic_write(path) as tmp:
        tmp.write_text(page)


def write_markdown(data: dict[str, Any], path: Path) -> None:
    m = data["machine"]
    lines = ["# ClipCap: Table 1 reproduced", "",
             f"Generated {data['generated']}, commit {m.get('commit') or '—'}, GPU {m['gpu']}, driver "
             f"{m.get('driver') or '—'}, CUDA {m.get('cuda') or '—'}, torch {m['torch']}, transformers "
             f"{m['transformers']}; total time "
             f"{duration(data['total_seconds'])}. Scores in percent.", "",
             markdown_table(table_rows(data)), "", "nocaps validation, CIDEr / SPICE:", "",
             markdown_table(nocaps_rows(data)), "", "Beyond the paper:", "",
             markdown_table(table_rows(data, beyond_paper=True))]
    for row in data["rows"]:
        lines += ["", f"## {row['row']}: {row['title']} ({row['status']})", ""]
        if row.get("reason"):
            lines.append(row["reason"])
        for d in row.get("differences_from_paper", []):
            lines.append(f"- {d}")
        for kind, name in row.get("curves", {}).items():
            lines.append(f"![{row['row']} {kind}]({name})")
        for commands in row.get("commands", {}).values():
            lines += [f"    {c}" for c in commands]
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def write_report(record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Write ``report.json``, ``index.html``, ``report.md`` and their images into ``folder``; returns the data."""
    folder.mkdir(parents=True, exist_ok=True)
    data = collect(record, folder)
    for row in data["rows"]:
        row["curves"] = plot_curves(row, folder)
    write_json(folder / "report.json", data, indent=1)
    write_html(data, folder / "index.html")
    write_markdown(data, folder / "report.md")
    return data
