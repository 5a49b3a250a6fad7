"""Evaluation output: JSON in the output directory, a printed table, and wandb."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from scd_train.eval.metrics import HIGHER_IS_BETTER

TABLE_ROWS = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", "LPIPS"), ("mse", "MSE"), ("fvd", "FVD"))


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(data: dict, path: Path) -> Path:
    """Atomic write; non-finite floats become null so the file stays valid JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2))
    os.replace(tmp, path)
    return path


def metric_table(result: dict):
    """A rich Table: one row per metric, one column per model, the better value in bold."""
    from rich.table import Table

    models = result["models"]
    names = list(models)
    table = Table(title=f"held-out evaluation ({len(result['clips'])} clips, compat={result['protocol']['compat']})")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for key, label in TABLE_ROWS:
        values = {n: models[n]["metrics"].get(key) for n in names}
        if all(v is None for v in values.values()):
            continue
        present = [v for v in values.values() if v is not None]
        best = (max if HIGHER_IS_BETTER[key] else min)(present)
        arrow = "↑" if HIGHER_IS_BETTER[key] else "↓"
        selection = next(models[n]["selection"][key] for n in names if values[n] is not None)
        cells = [_cell(values[n], best, len(names) > 1) for n in names]
        table.add_row(f"{label} {arrow} [{selection}]", *cells)
    table.add_row("s/frame (steady)", *[f"{models[n]['timing']['steady_frame_seconds']:.4f}" for n in names])
    table.add_row("s (first frame)", *[f"{models[n]['timing']['first_frame_seconds']:.4f}" for n in names])
    for name in names:  # --horizons: PSNR of single generated frames
        by_horizon = models[name].get("by_horizon")
        if by_horizon:
            for h, value in zip(by_horizon["horizons"], by_horizon["psnr"]):
                table.add_row(f"PSNR (dB) of frame +{h}, {name}",
                              *[_cell(value, value, False) if n == name else "" for n in names])
    return table


def _cell(value: float | None, best: float, highlight: bool) -> str:
    if value is None:
        return "-"
    text = f"{value:.4g}"
    return f"[bold]{text}[/bold]" if highlight and value == best else text


def print_table(result: dict) -> None:
    from rich.console import Console

    Console().print(metric_table(result))


def flat_scalars(result: dict, prefix: str = "eval") -> dict[str, float]:
    out = {}
    for name, summary in result["models"].items():
        for key, value in summary["metrics"].items():
            out[f"{prefix}/{name}/{key}"] = value
        out[f"{prefix}/{name}/steady_frame_seconds"] = summary["timing"]["steady_frame_seconds"]
        by_horizon = summary.get("by_horizon", {})
        for h, value in zip(by_horizon.get("horizons", []), by_horizon.get("psnr", [])):
            out[f"{prefix}/{name}/psnr_at_{h}"] = value
    return out


def log_to_wandb(mode: str, out_dir: Path, project: str, name: str, config: dict, scalars: dict[str, float],
                 media: list[tuple[str, str, Path]]) -> None:
    """One wandb run per invocation, written under ``out_dir/wandb`` when offline; never fatal."""
    if mode == "disabled":
        return
    from scd_train.metrics.loggers import WandbRun

    run = WandbRun(mode, out_dir, project, name, config, run_id=None)
    run.log(scalars, step=0)
    for kind, key, path in media:
        run.log_media(kind, key, path, step=0)
    run.finish()
