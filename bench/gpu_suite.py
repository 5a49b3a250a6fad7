"""What only a GPU can show, in one command: correctness on CUDA, training speed and MFU, FP8, latency.

    python3 bench/gpu_suite.py                  # CUDA: all four sections, under 8 minutes in all
    python3 bench/gpu_suite.py --smoke          # CPU: the same code at tiny dims (about 20 s on 2 idle cores)
    make gpu-wheels; make gpu-suite             # on a GPU machine whose Python lacks omegaconf/torchao

Sections (``bench/gpu_sections/``): 1. correctness (FlexAttention vs SDPA masks with gradients,
KV-cached streaming vs the uncached forward, compiled decoder loop vs eager); 2. SCD-M training
step under FSDP2 on one rank, activation checkpointing on and off (step time, tokens/s, MFU for
encoder and decoder, peak memory); 3. torchao FP8 on the encoder vs bf16 (step-time ratio, loss
agreement, peak memory); 4. SCD-M vs the dense 12-layer baseline per frame, 50 steps, context 144,
with and without guidance, eager and compiled, and the few-step student.

Each section runs in its own process with a time budget; one that fails or runs out of time is
recorded as such (with whatever it measured before) and the others still run. The JSON under
``bench/results/`` is rewritten atomically after every section, so a killed run keeps what it had.
Sections that need CUDA say so on a CPU (``--smoke``) rather than pretend.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:  # the checkout's own package, wherever the command is started from
    sys.path.insert(1, str(REPO))

from gpu_sections import SECTIONS, SectionSpec  # noqa: E402

TOTAL_BUDGET_S = 460.0  # the ceiling is 8 minutes; this leaves start-up and writing inside it
SMOKE_TOTAL_BUDGET_S = 240.0  # ceilings, not durations: a busy CPU must not turn slowness into kills
MIN_SECTION_S = {"gpu": 20.0, "smoke": 8.0}  # less than this left: the section is skipped for time
# fully_shard in torch.distributed.fsdp, torch.nn.utils.get_total_norm and FlexAttention's block masks,
# all on the suite's path, arrived by torch 2.6; the GPU image has 2.11
MIN_TORCH = (2, 6)
KILL_GRACE_S = 10.0  # a section past its budget gets this long to notice before it is killed
SECTION_LIBRARIES = ("torch", "triton", "torchao", "numpy", "einops", "safetensors", "pyyaml", "omegaconf",
                     "antlr4-python3-runtime", "scd-train")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny dims on CPU: proves the code path, measures nothing")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: bench/results/gpu_suite_<kind>.json)")
    parser.add_argument("--sections", nargs="+", choices=[s.name for s in SECTIONS], default=[s.name for s in SECTIONS])
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"total seconds (default {TOTAL_BUDGET_S:.0f}; {SMOKE_TOTAL_BUDGET_S:.0f} with --smoke)")
    parser.add_argument("--student-run", type=Path, default=None,
                        help="a distilled student's run directory for section 4 (default: random student weights)")
    parser.add_argument("--device", default=None, help="default: cuda without --smoke, cpu with it")
    # one section in this process: how the suite starts each section
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-results", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-deadline", type=float, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- the parent: environment, budgets, one process per section ----------------------------------------
def environment(device_name: str) -> dict:
    import importlib.metadata

    import torch

    versions = {}
    for name in SECTION_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "device": device_name, "libraries": versions}
    if device_name.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"device_name": props.name, "capability": list(torch.cuda.get_device_capability(0)),
                     "memory_gb": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count,
                     "cudnn": torch.backends.cudnn.version(), "cuda_available": True})
    else:
        info.update({"device_name": "cpu", "cuda_available": torch.cuda.is_available()})
    return info


def run_suite(args: argparse.Namespace) -> int:
    import torch

    from scd_train.metrics.timing import MachineLoad

    kind = "smoke" if args.smoke else "gpu"
    found = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if found < MIN_TORCH:
        print(f"gpu_suite: torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}, the oldest with "
              "every API the suite uses (fully_shard, get_total_norm, FlexAttention)", file=sys.stderr)
        return 2
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device is visible; the full suite needs one (use --smoke on a CPU)", file=sys.stderr)
        return 2
    budget = args.budget_s or (SMOKE_TOTAL_BUDGET_S if args.smoke else TOTAL_BUDGET_S)
    out = args.out or REPO / "bench" / "results" / f"gpu_suite_{kind}.json"
    start = time.monotonic()
    record = {"benchmark": "gpu-suite", "kind": kind,
              "note": ("CPU smoke run at tiny dims: proves the suite's code path, NOT a performance figure"
                       if args.smoke else "one GPU; figures from the sections below"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "budget_s": budget,
              "environment": environment(device), "machine_load_start": MachineLoad.now().to_dict(),
              "status": "running", "sections": {}}
    write_record(out, record)
    # section files and logs live in a scratch folder: the one JSON (with each log's tail) is the result
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as scratch:
        _run_sections(args, record, out, budget, start, device, kind, Path(scratch))
    statuses = [s["status"] for s in record["sections"].values()]
    record["checks_failed"] = failed_checks(record["sections"])
    record["headline"] = headline(record["sections"])
    record["status"] = "complete" if all(s == "ok" for s in statuses) else "partial"
    record["seconds"] = round(time.monotonic() - start, 2)
    record["machine_load_end"] = MachineLoad.now().to_dict()
    write_record(out, record)
    print(f"wrote {out} ({record['status']}, {record['seconds']:.0f} s)")
    ran = all(s in ("ok", "skipped for time") for s in statuses)
    return 0 if ran and not record["checks_failed"] else 1


def _run_sections(args: argparse.Namespace, record: dict, out: Path, budget: float, start: float, device: str,
                  kind: str, work: Path) -> None:
    for spec in [s for s in SECTIONS if s.name in args.sections]:
        left = budget - (time.monotonic() - start)
        section_budget = min(spec.smoke_budget_s if args.smoke else spec.budget_s, left)
        if section_budget < MIN_SECTION_S[kind]:
            record["sections"][spec.name] = {"status": "skipped for time", "summary": spec.summary,
                                             "reason": f"{left:.0f} s of the suite's {budget:.0f} s left"}
        else:
            record["sections"][spec.name] = run_section(spec, section_budget, args, device, work)
        write_record(out, record)
        print(f"{spec.name}: {record['sections'][spec.name]['status']} "
              f"({record['sections'][spec.name].get('seconds', 0):.1f} s)", flush=True)


def run_section(spec: SectionSpec, budget_s: float, args: argparse.Namespace, device: str, work: Path) -> dict:
    results = work / f"{spec.name}.json"
    log = work / f"{spec.name}.log"
    results.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", spec.name, "--child-results", str(results),
               "--child-deadline", str(time.time() + budget_s), "--device", device]
    if args.smoke:
        command.append("--smoke")
    if args.student_run:
        command += ["--student-run", str(args.student_run)]
    started = time.monotonic()
    # its own process group (not session): stopped with everything it started at its budget or when
    # the suite is stopped, and still ended by whoever ends the suite's session
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    with log.open("w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, **group)
        timed_out = False
        try:
            code = proc.wait(timeout=budget_s + KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:  # timed out, or the suite itself is being stopped
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
    payload = json.loads(results.read_text()) if results.is_file() else {}
    status = payload.get("status", "no results")
    if timed_out:
        status = "timed out"
    elif code != 0 and status in ("ok", "running", "no results"):
        status = "failed"
    entry = {"status": status, "summary": spec.summary, "budget_s": round(budget_s, 1),
             "seconds": round(time.monotonic() - started, 2), "exit_code": code,
             "results": payload.get("results", {}), "notes": payload.get("notes", [])}
    if "error" in payload:
        entry["error"] = payload["error"]
    # warnings (recompiles, fallbacks) matter even when a section passed; more of the log when it did not
    entry["log_tail"] = log.read_text(errors="replace")[-(1500 if status == "ok" else 4000):]
    return entry


def failed_checks(tree, path: str = "") -> list[str]:
    """Dotted paths of every comparison whose verdict is ``"pass": false``."""
    found = []
    if isinstance(tree, dict):
        if tree.get("pass") is False:
            found.append(path)
        for key, value in tree.items():
            found += failed_checks(value, f"{path}.{key}" if path else key)
    return found


def _dig(tree: dict, *keys):
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def headline(sections: dict) -> dict:
    """The figures a reader wants first, pulled from the sections (None where one did not measure it)."""
    train = _dig(sections, "training", "results", "variants") or {}
    infer = _dig(sections, "inference", "results") or {}
    ratios = {**(_dig(infer, "eager", "ratios") or {}), **(_dig(infer, "compiled", "ratios") or {})}
    return {
        "train_step_ms": {k: v.get("step_ms_median") for k, v in train.items()},
        "train_mfu": {k: v.get("mfu") for k, v in train.items()},
        "train_peak_memory_gb": {k: v.get("peak_memory_gb") for k, v in train.items()},
        "fp8_step_time_ratio": {phase: _dig(sections, "fp8", "results", phase, "step_time_ratio_fp8_over_bf16")
                                for phase in ("eager", "compiled")},
        "fp8_loss_max_rel_diff": _dig(sections, "fp8", "results", "eager", "loss_max_rel_diff"),
        "frame_ms": {name: row.get("frame_ms_median") for phase in ("eager", "compiled")
                     for name, row in (_dig(infer, phase, "candidates") or {}).items()},
        "frame_time_ratios": {name: r.get("wall_ratio") for name, r in ratios.items()},
    }


def write_record(path: Path, record: dict) -> None:
    from gpu_sections.common import write_json_atomic

    write_json_atomic(path, record)


# -- a child: one section ------------------------------------------------------------------------------
def run_child(args: argparse.Namespace) -> int:
    import torch
    from gpu_sections.common import SectionContext, allow_recompiles

    allow_recompiles()
    spec = next(s for s in SECTIONS if s.name == args.child)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # set_device and NCCL's device_id need an index
        device = torch.device("cuda", torch.cuda.current_device())
    ctx = SectionContext(spec.name, device, args.smoke, args.child_deadline - time.time(), args.child_results,
                         options={"student_run": args.student_run})
    ctx.save("running")
    module = importlib.import_module(f"gpu_sections.{spec.module}")
    try:
        module.run(ctx)
    except Exception as exc:
        ctx.save("failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}")
        return 1
    finally:
        _leave_process_group()
    failed = [k for k, v in ctx.results.items() if isinstance(v, dict) and v.get("status") == "failed"]
    ctx.save("failed" if failed else "ok", f"checks failed: {', '.join(failed)}" if failed else None)
    return 1 if failed else 0


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _stop(signum: int, frame) -> None:  # noqa: ARG001
    raise SystemExit(128 + signum)  # unwinds run_section, which stops the running section


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        return run_child(args)
    signal.signal(signal.SIGTERM, _stop)
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
