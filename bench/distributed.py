"""Peak memory per rank and step time against world size for the fsdp2 and deepspeed backends.

    python bench/distributed.py                       # CPU: 1 and 2 ranks, configs/tiny.yaml
    python bench/distributed.py --ranks 1 2 4 8 --device cuda --config configs/scd_m.yaml

Each (backend, world size) pair is a real training run under torchrun; every rank reports its
peak resident memory (peak allocated CUDA memory on GPUs) and the bytes of the training state it
holds (parameters, AdamW state and EMA), which is what sharding divides. Step time is the median
of the logged per-step wall times after warm-up. Results go to bench/results/distributed_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 3


def tensor_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def training_state_bytes(backend, ema) -> dict[str, int]:
    """Bytes of parameters, AdamW moments and EMA that this rank holds."""
    import torch

    if backend.name == "deepspeed":
        params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in backend.model.parameters())
        inner = backend.engine.optimizer.optimizer  # torch AdamW over the flat fp32 partitions
        optim = sum(tensor_bytes(v) for s in inner.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0)
    else:
        params = sum(tensor_bytes(p) for p in backend.model.parameters())
        optim = sum(tensor_bytes(v) for s in backend.optimizer.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"params": params, "optimizer": optim, "ema": sum(tensor_bytes(s) for s in ema.shadow)}


def peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> None:
    """One rank of one measured run (started by torchrun)."""
    import torch.distributed as dist

    from scd_train.config import load_config
    from scd_train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    result = trainer.run()
    report = {"rank": trainer.runtime.rank, "peak_memory_bytes": peak_memory_bytes(trainer.runtime.device),
              "state_bytes": training_state_bytes(trainer.backend, trainer.ema)}
    reports = [None] * trainer.runtime.world_size
    dist.all_gather_object(reports, report)
    if trainer.runtime.is_main:
        Path(args.report).write_text(json.dumps({"ranks": reports, "steps": result.step}))
    trainer.runtime.shutdown()
    sys.stdout.flush()
    os._exit(0)  # see scd_train.train: gloo can abort during interpreter finalization


def step_seconds(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["perf/step_seconds"] for r in records if r["step"] > WARMUP_STEPS]
    return statistics.median(times)


def measure(backend: str, ranks: int, args: argparse.Namespace, scratch: Path) -> dict:
    run_dir = scratch / f"{backend}_{ranks}"
    report = scratch / f"{backend}_{ranks}.json"
    overrides = [f"train.backend={backend}", f"train.run_dir={run_dir}", f"train.steps={args.steps}",
                 f"train.device={args.device}", f"train.precision={args.precision}", "train.checkpoint_every=0",
                 "train.resume=false", "log.every=1", "log.progress_bar=false", "log.wandb=disabled", *args.overrides]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(Path(__file__).resolve()), "--worker", "--report", str(report), "--config", args.config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TMPDIR": str(scratch)}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=args.timeout)
    measured = json.loads(report.read_text())
    ranks_out = sorted(measured["ranks"], key=lambda r: r["rank"])
    return {
        "backend": backend, "world_size": ranks, "steps": measured["steps"],
        "step_seconds_median": step_seconds(run_dir),
        "peak_memory_mb_per_rank": [round(r["peak_memory_bytes"] / 2**20, 1) for r in ranks_out],
        "state_mb_per_rank": [{k: round(v / 2**20, 3) for k, v in r["state_bytes"].items()} for r in ranks_out],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--backends", nargs="+", default=["fsdp2", "deepspeed"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="recorded in the JSON")
    parser.add_argument("--out", type=Path, help="default: bench/results/distributed_<device>.json")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="scd-bench-") as tmp:
        for backend in args.backends:
            for ranks in args.ranks:
                results.append(measure(backend, ranks, args, Path(tmp)))
                print(json.dumps(results[-1]), flush=True)
    out = args.out or REPO / "bench" / "results" / f"distributed_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "distributed", "device": args.device, "date": args.date, "config": args.config,
               "precision": args.precision, "overrides": args.overrides, "steps": args.steps,
               "step_time": f"median of per-step wall seconds after step {WARMUP_STEPS}",
               "peak_memory": "max resident set size per rank (CPU) or peak allocated CUDA memory",
               "state": "parameters, AdamW moments and EMA held by each rank",
               "results": results}
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(payload, indent=2) + "\n")
    tmp_out.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
