"""The DeepSpeed JSON of a run: generated from our config, optionally merged with a user file."""

from __future__ import annotations

import json
from pathlib import Path

from scd_train.config import Config, ConfigError
from scd_train.errors import MissingInput

# Blocks that would make DeepSpeed build its own optimizer or schedule and so override the
# per-group learning rates that scd_train sets every step.
REFUSED_BLOCKS = ("optimizer", "scheduler")
# Keys our config owns; a user file may repeat them only with the same value.
OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def generated_config(cfg: Config, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True},
        # ZeRO-3 keeps fp32 master partitions and reduces gradients in fp32 even when compute is bf16.
        "bf16": {"enabled": bf16},
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_user_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"train.deepspeed_config={str(path)!r} does not exist")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train.deepspeed_config={str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"train.deepspeed_config={str(path)!r} must hold a JSON object")
    return user


def batch_arithmetic(cfg: Config, world_size: int) -> str:
    """The global batch spelled out, with the world size this process detected."""
    micro, accum = cfg.data.batch_size, cfg.train.grad_accum
    return (f"data.batch_size={micro} per rank x train.grad_accum={accum} x world size {world_size} (detected) = "
            f"{micro * accum * world_size} clips per optimizer step")


def build_deepspeed_config(cfg: Config, bf16: bool, world_size: int = 1) -> dict:
    """Our generated JSON, with ``train.deepspeed_config`` merged over it after validation."""
    ours = generated_config(cfg, bf16)
    if cfg.train.deepspeed_config is None:
        return ours
    source = cfg.train.deepspeed_config
    user = load_user_config(source)
    refused = [k for k in REFUSED_BLOCKS if k in user]
    if refused:
        raise ConfigError(
            f"train.deepspeed_config={source!r} has a {refused[0]!r} block; scd_train builds the AdamW "
            "optimizer and sets each group's learning rate every step (optim.* in the config), so remove "
            f"{' and '.join(repr(k) for k in refused)} from the JSON")
    for key in OWNED_KEYS:
        if key in user and user[key] != ours[key]:
            raise ConfigError(f"train.deepspeed_config={source!r} sets {key}={user[key]!r} but the run config "
                              f"implies {ours[key]!r} ({batch_arithmetic(cfg, world_size)}); drop the key from "
                              "the JSON or change the config")
    implied = cfg.data.batch_size * cfg.train.grad_accum * world_size
    if "train_batch_size" in user and user["train_batch_size"] != implied:
        raise ConfigError(f"train.deepspeed_config={source!r} sets train_batch_size={user['train_batch_size']!r} "
                          f"but {batch_arithmetic(cfg, world_size)}; drop the key from the JSON (it follows from "
                          "the config) or change data.batch_size / train.grad_accum")
    merged = _merge(ours, user)
    stage = merged.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"train.deepspeed_config={source!r} sets zero_optimization.stage={stage!r}; "
                          "train.backend=deepspeed runs ZeRO stage 3 (use ddp or fsdp2 otherwise)")
    return merged
