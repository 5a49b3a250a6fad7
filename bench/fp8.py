"""FP8 against bf16 training: step time, tokens/s and loss, same data, seed and steps.

    python bench/fp8.py                                   # GPU: SCD-M and a 24-layer encoder, 300 steps
    python bench/fp8.py --backend torchao                 # GPU without Transformer Engine
    python bench/fp8.py --device cpu --tiny               # CPU smoke of the harness (not a performance claim)

Each model trains twice from the same initial weights on the embedded moving-digits videos
(32x32 RGB -> 8x8x48 latents, 64 tokens per frame like SCD-M's latents): once in the high-precision
baseline (bf16 autocast on GPU, fp32 on CPU) and once with the encoder's block linears in FP8
(``precision.fp8.modules=[encoder]``, decoder in bf16). A step is forward + backward + clip +
optimizer step on one device, timed with device synchronisation after ``--warmup`` untimed steps.
Tokens/s counts encoder tokens (clips x frames x tokens per frame) per second of step time.
Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from scd_train.config import Config, load_config
from scd_train.data import build_train_loader
from scd_train.diffusion.objective import build_objective
from scd_train.env import hardware, library_versions
from scd_train.metrics.flops import tokens_per_frame
from scd_train.models import build_model
from scd_train.optim import build_param_groups, set_learning_rates
from scd_train.parallel.backend import build_backend
from scd_train.parallel.runtime import Runtime
from scd_train.precision import prepare_fp8
from scd_train.trainer import seed_everything

REPO = Path(__file__).resolve().parents[1]
# 32x32 RGB frames, space-to-depth by 4: 8x8x48 latents.
MOVING_DIGITS_32 = ["data.synthetic.image_size=32", "data.synthetic.codec_factor=4", "data.synthetic.digit_scale=2",
                    "data.synthetic.speed=2", "model.latent_channels=48", "model.latent_height=8",
                    "model.latent_width=8"]
SCD_M = ["model.width=1024", "model.num_heads=16", "model.head_dim=64", "model.rope_axes=[16,24,24]",
         "model.encoder_layers=8", "model.decoder_layers=4", "model.patch_size=1", "model.max_frames=300"]
MODELS = {
    "scd_m": SCD_M,
    "encoder_24": [*SCD_M, "model.encoder_layers=24"],
}
_TINY = ["model.width=64", "model.num_heads=2", "model.head_dim=32", "model.rope_axes=[8,12,12]",
         "model.decoder_layers=1", "model.patch_size=2"]
TINY_MODELS = {"scd_m": [*_TINY, "model.encoder_layers=2"], "encoder_24": [*_TINY, "model.encoder_layers=6"]}


def bench_config(model_overrides: list[str], args: argparse.Namespace, fp8: bool) -> Config:
    overrides = [*model_overrides, *MOVING_DIGITS_32, f"data.batch_size={args.batch_size}",
                 f"data.clip_frames={args.clip_frames}",
                 f"data.clip_stride={args.clip_frames // 2}", "data.synthetic.num_videos=64",
                 f"data.synthetic.frames_per_video={max(args.clip_frames, 24)}", "optim.warmup_steps=20",
                 "optim.lr=3e-4", f"train.device={args.device}", "train.backend=single",
                 f"train.precision={'bf16' if args.device == 'cuda' else 'fp32'}",
                 f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}"]
    if fp8:
        overrides += ["precision.fp8.enabled=true", f"precision.fp8.backend={args.backend}",
                      f"precision.fp8.recipe={args.recipe}", "precision.fp8.modules=[encoder]"]
        if args.device == "cpu":
            overrides.append("precision.fp8.cpu_emulation=true")
    return load_config(REPO / "configs" / "tiny.yaml", overrides)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_variant(cfg: Config, steps: int, warmup: int) -> dict:
    device = torch.device(cfg.train.device)
    runtime = Runtime(0, 1, 0, device)
    seed_everything(cfg.train.seed, 0)
    model = build_model(cfg.model)
    fp8 = prepare_fp8(model, cfg, runtime)
    backend = build_backend(model, build_param_groups(model, cfg.optim), cfg, runtime)
    objective = build_objective(cfg.model, cfg.diffusion)
    batches = iter(build_train_loader(cfg))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for step in range(warmup + steps):
        set_learning_rates(backend.optimizer, step, cfg.optim)
        batch = next(batches).to(device)
        synchronize(device)
        start = time.perf_counter()
        with backend.autocast(), fp8.autocast():
            out = objective(backend.module, batch.latents, batch.actions)
        backend.backward(out.loss)
        backend.clip_grad_norm(cfg.optim.grad_clip)
        backend.step()
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(out.loss.item())
    tokens = cfg.data.batch_size * cfg.data.clip_frames * tokens_per_frame(cfg.model)
    median = statistics.median(times)
    tail = losses[-max(1, len(losses) // 10):]
    return {"fp8": fp8.summary(), "step_time_s_median": median, "step_time_s_mean": statistics.fmean(times),
            "encoder_tokens_per_step": tokens, "encoder_tokens_per_s": tokens / median,
            "loss_first": losses[0], "loss_last_10pct_mean": statistics.fmean(tail),
            "loss_every_10": losses[::10], "peak_memory_gb": _peak_gb(device)}


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small dims and few steps: checks the harness runs")
    parser.add_argument("--backend", choices=["te", "torchao"], default=None,
                        help="default: te when it imports, else torchao (always torchao on CPU)")
    parser.add_argument("--recipe", default="current", choices=["delayed", "current", "rowwise", "mxfp8"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--clip-frames", type=int, default=32)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.backend is None:
        args.backend = "te" if args.device == "cuda" and _te_importable() else "torchao"
    if args.tiny:
        args.steps, args.warmup, args.batch_size, args.clip_frames = min(args.steps, 6), min(args.warmup, 2), 2, 4
    return args


def _te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = {}
    for name in args.models:
        model_overrides = TINY_MODELS[name] if args.tiny else MODELS[name]
        baseline = train_variant(bench_config(model_overrides, args, fp8=False), args.steps, args.warmup)
        fp8 = train_variant(bench_config(model_overrides, args, fp8=True), args.steps, args.warmup)
        results[name] = {"baseline": baseline, "fp8": fp8,
                         "speedup": baseline["step_time_s_median"] / fp8["step_time_s_median"],
                         "loss_gap_last_10pct": fp8["loss_last_10pct_mean"] - baseline["loss_last_10pct_mean"]}
        print(f"{name}: baseline {baseline['step_time_s_median'] * 1e3:.1f} ms/step, fp8 "
              f"{fp8['step_time_s_median'] * 1e3:.1f} ms/step, speedup {results[name]['speedup']:.2f}x, "
              f"loss gap {results[name]['loss_gap_last_10pct']:+.4f}")
    kind = "cpu-smoke" if args.device == "cpu" else "gpu"
    record = {
        "benchmark": "fp8-vs-bf16-training", "kind": kind,
        "note": ("CPU smoke run of the harness with torchao float8 emulation: NOT a performance claim"
                 if kind == "cpu-smoke" else "single GPU, encoder block linears in FP8, decoder in bf16"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "baseline_precision": "bf16" if args.device == "cuda" else "fp32",
        "hardware": hardware(), "versions": library_versions(), "results": results,
    }
    out = args.out or REPO / "bench" / "results" / f"fp8_{kind}_{args.backend}_{args.recipe}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
