"""Inference weights: read EMA or raw weights out of any checkpoint, export them as safetensors.

DCP checkpoints are read by a single process whatever world size wrote them (DCP reshards on
load), so export and sampling never need the training topology.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from scd_train.checkpoint import CheckpointManager, DamagedCheckpointError, verify_checkpoint
from scd_train.cli import command
from scd_train.config import Config, config_from_text, load_config
from scd_train.errors import InputError, MissingInput
from scd_train.models import build_model


class WeightsError(InputError):
    """Weights that cannot be read, or that do not fit the model their config describes."""


def resolve_checkpoint(run_dir: Path, checkpoint: str | None = None) -> Path:
    """An explicit checkpoint directory, or the newest complete one of ``run_dir``."""
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_dir():
            raise MissingInput(f"--checkpoint {path} does not exist")
        if not (path / "COMPLETE").is_file():
            raise MissingInput(f"{path} is not a complete checkpoint (no COMPLETE marker)")
        problems = verify_checkpoint(path)
        if problems:
            raise DamagedCheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems[:5])}")
        return path

    class _Local:
        is_main, world_size, rank = True, 1, 0

        def barrier(self) -> None: ...

    found = CheckpointManager(run_dir / "checkpoints", keep=1, runtime=_Local()).find_resumable()
    if found is None:
        raise MissingInput(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    return found


def read_checkpoint_weights(checkpoint: Path, model: nn.Module, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Full fp32 weights named like ``model.state_dict()``."""
    reader = _read_deepspeed if (checkpoint / "state" / "deepspeed").is_dir() else _read_dcp
    try:
        return reader(checkpoint, model, use_ema)
    except InputError:
        raise
    # DCP reports damaged or mismatched files as CheckpointException, a BaseException
    except (Exception, CheckpointException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeightsError(f"checkpoint {checkpoint} cannot be read into this model ({type(exc).__name__}: "
                           f"{first[:300]}); it is damaged or was written for another model config") from exc


def stored_ema_names(checkpoint: Path) -> set[str]:
    """Names of the parameters whose EMA ``checkpoint`` holds (trained ones; a run that keeps some
    parameters frozen has no shadow for them: their EMA is the weights themselves)."""
    if (checkpoint / "state" / "deepspeed").is_dir():
        from scd_train.parallel import deepspeed_io

        return deepspeed_io.ema_names(checkpoint)
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(checkpoint / "state")).read_metadata().state_dict_metadata
    return {k.removeprefix("ema.") for k in keys if k.startswith("ema.")}


def _read_dcp(checkpoint: Path, model: nn.Module, use_ema: bool) -> dict[str, torch.Tensor]:
    full = {n: torch.empty_like(t, dtype=torch.float32) for n, t in model.state_dict().items()}
    request = {"model": full}
    if use_ema:
        shadowed = stored_ema_names(checkpoint)
        params = [n for n, _ in model.named_parameters()]
        request = {"ema": {n: full[n] for n in params if n in shadowed},
                   "model": {n: full[n] for n in params if n not in shadowed}}
        full = {n: full[n] for n in params}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
        dcp.load({k: v for k, v in request.items() if v}, checkpoint_id=str(checkpoint / "state"))
    return full


def _read_deepspeed(checkpoint: Path, model: nn.Module, use_ema: bool) -> dict[str, torch.Tensor]:
    from scd_train.parallel import deepspeed_io

    return deepspeed_io.read_weights(checkpoint, model, use_ema)


def load_model(source: str | Path, checkpoint: str | None = None, use_ema: bool = True,
               device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """A model in eval mode from a run directory (newest checkpoint) or an exported .safetensors."""
    source = Path(source)
    if source.suffix == ".safetensors":
        cfg = _config_from_safetensors(source)
        model = build_model(cfg.model)
        weights = read_safetensors(source)
    else:
        if not source.is_dir():
            raise MissingInput(f"{source} is neither a run directory nor an exported .safetensors file")
        if not (source / "config.yaml").is_file():
            raise MissingInput(f"{source} is not a run directory of scd-train: config.yaml is missing")
        cfg = load_config(source / "config.yaml")
        model = build_model(cfg.model)
        weights = read_checkpoint_weights(resolve_checkpoint(source, checkpoint), model, use_ema)
    _load_into(model, weights, str(source))
    return model.to(device).eval(), cfg


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MissingInput(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' SafetensorError on a damaged header
        raise WeightsError(f"{path} is not a readable safetensors file ({exc})") from None


def _load_into(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """All of the model's parameters from ``weights``, or an error naming what differs."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # size mismatches
        detail = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise WeightsError(f"{source}: weights do not fit the model: {'; '.join(detail[:3]) or exc}") from None
    missing = [m for m in missing if m in dict(model.named_parameters())]
    if missing or unexpected:
        raise WeightsError(f"{source}: weights do not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def load_initial_weights(model: nn.Module, path: str | Path) -> None:
    """Fill every parameter of ``model`` from a safetensors file (``train.init_from``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"train.init_from={str(path)!r} does not exist")
    _load_into(model, read_safetensors(path), f"train.init_from={str(path)!r}")


def _config_from_safetensors(path: Path) -> Config:
    from safetensors import safe_open

    if not path.is_file():
        raise MissingInput(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors' SafetensorError on a damaged header
        raise WeightsError(f"{path} is not a readable safetensors file ({exc})") from None
    if "config" not in meta:
        raise WeightsError(f"{path} carries no 'config' metadata; export it with scd-export")
    return config_from_text(meta["config"], source=f"{path} (config metadata)")


def export(run_dir: Path, out: Path, checkpoint: str | None = None, use_ema: bool = True) -> Path:
    if not run_dir.is_dir():
        raise MissingInput(f"run directory {run_dir} does not exist")
    cfg = load_config(run_dir / "config.yaml")
    model = build_model(cfg.model)
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    weights = {k: v.contiguous() for k, v in read_checkpoint_weights(ckpt, model, use_ema).items()}
    meta = {"config": (run_dir / "config.yaml").read_text(), "source": str(ckpt),
            "weights": "ema" if use_ema else "model",
            "trainer_state": json.dumps(json.loads((ckpt / "trainer_state.json").read_text()))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(weights, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


@command("scd-export")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scd-export", description="Write a checkpoint's EMA weights as one "
                                     "safetensors file for inference.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="default: <run_dir>/export/ema.safetensors")
    parser.add_argument("--checkpoint", help="a checkpoint directory (default: the newest complete one)")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    args = parser.parse_args(argv)
    out = args.out or args.run_dir / "export" / ("model.safetensors" if args.raw else "ema.safetensors")
    path = export(args.run_dir, out, args.checkpoint, use_ema=not args.raw)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
