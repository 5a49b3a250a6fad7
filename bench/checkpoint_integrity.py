"""What checkpoint file digests cost: SHA-256 at save and verification at resume, next to the I/O.

    python bench/checkpoint_integrity.py                          # CPU: tiny and a 64M-parameter SCD
    python bench/checkpoint_integrity.py --presets medium --repeats 5

Each preset builds a real model, optimizer (one AdamW step, so its moments exist) and EMA on the
single-process backend, then times, interleaved (order flipped every repeat):

* ``write``: the DCP save of model, optimizer and EMA plus the rank file, as a checkpoint save does;
* ``write+digest``: the same followed by the SHA-256 of every file written (what a save now adds);
* ``load``: restoring model, optimizer and EMA from a saved checkpoint;
* ``verify+load``: checking every file's size and SHA-256 against the manifest first, then loading.

Files are written to a temporary directory on the machine's disk; right after a write they are
mostly in the page cache, as they are when a save hashes what it just wrote. Results go to
bench/results/checkpoint_integrity_<device>.json with the machine load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {
    "tiny": ("configs/tiny.yaml", []),
    # SCD-M's width and heads with 2 + 1 blocks: about 64M parameters, 1 GB of checkpoint
    "medium": ("configs/scd_m.yaml", ["model.encoder_layers=2", "model.decoder_layers=1"]),
}


def build_state(config: str, overrides: list[str]):
    import torch

    from scd_train.config import load_config
    from scd_train.ema import EMA
    from scd_train.models import build_model
    from scd_train.optim import build_param_groups
    from scd_train.parallel.backend import build_backend
    from scd_train.parallel.runtime import Runtime

    cfg = load_config(REPO / config, [*overrides, "train.device=cpu", "train.precision=fp32", "train.backend=single"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    runtime = Runtime(0, 1, 0, torch.device("cpu"))
    backend = build_backend(model, build_param_groups(model, cfg.optim), cfg, runtime)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    backend.step()  # AdamW moments now exist, as in any checkpoint after step 1
    ema = EMA(backend.ema_parameters(), cfg.optim.ema_decay)
    params = sum(p.numel() for p in model.parameters())
    return backend, ema, params


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(preset: str, repeats: int, scratch: Path) -> dict:
    from scd_train.checkpoint import atomic_torch_save, capture_rng, rank_file
    from scd_train.checkpoint_integrity import check_files, digest_files, list_files
    from scd_train.metrics.timing import interleaved

    config, overrides = PRESETS[preset]
    backend, ema, params = build_state(config, overrides)
    counter = {"n": 0}

    def fresh_dir() -> Path:
        counter["n"] += 1
        path = scratch / f"{preset}_{counter['n']:04d}"
        path.mkdir()
        return path

    def write(digest: bool) -> None:
        path = fresh_dir()
        backend.save(path, ema)
        atomic_torch_save({"rng": capture_rng()}, path / rank_file(0))
        if digest:
            digest_files(path, list_files(path))
        shutil.rmtree(path)

    saved = fresh_dir()
    backend.save(saved, ema)
    atomic_torch_save({"rng": capture_rng()}, saved / rank_file(0))
    manifest = digest_files(saved, list_files(saved))

    def load(verify: bool) -> None:
        if verify:
            problems = check_files(saved, manifest)
            assert not problems, problems
        backend.load(saved, ema)

    stats = interleaved({"write": lambda: write(False), "write+digest": lambda: write(True),
                         "load": lambda: load(False), "verify+load": lambda: load(True)}, repeats=repeats, warmup=1)
    summary = {name: s.summary() for name, s in stats.items()}
    ratios = {"save_with_digests_over_save": stats["write+digest"].median / stats["write"].median,
              "resume_load_with_verification_over_load": stats["verify+load"].median / stats["load"].median}
    return {"preset": preset, "config": config, "overrides": overrides, "parameters": params,
            "checkpoint_bytes": directory_bytes(saved), "files": len(manifest), "timings": summary, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "checkpoint_integrity_cpu.json")
    args = parser.parse_args(argv)

    import torch

    from scd_train.metrics.timing import MachineLoad

    load_before = MachineLoad.now().to_dict()
    results = []
    with tempfile.TemporaryDirectory(prefix="scd-ckpt-bench-", dir=tempfile.gettempdir()) as scratch:
        for preset in args.presets:
            result = measure(preset, args.repeats, Path(scratch))
            results.append(result)
            t = result["timings"]
            size_mib = result["checkpoint_bytes"] / 2**20
            millions = result["parameters"] / 1e6
            print(f"{preset}: {millions:.1f}M parameters, {size_mib:.0f} MiB in {result['files']} files")
            for name in ("write", "write+digest", "load", "verify+load"):
                print(f"  {name:13s} median {t[name]['wall_s_median']:.3f} s wall, {t[name]['cpu_s_median']:.3f} s CPU")
            r = result["ratios"]
            print(f"  save with digests / save: {r['save_with_digests_over_save']:.2f}x; "
                  f"verified load / load: {r['resume_load_with_verification_over_load']:.2f}x")
    report = {"benchmark": "checkpoint_integrity", "device": "cpu", "torch": torch.__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "repeats": args.repeats,
              "machine_load_before": load_before, "machine_load_after": MachineLoad.now().to_dict(),
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
