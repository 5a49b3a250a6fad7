"""Endless streaming on CPU: per-frame time and memory over a long stream, four models interleaved.

    python bench/endless_stream.py                        # 2,000 frames, tiny dims, 4 steps/frame (minutes)
    python bench/endless_stream.py --frames 300           # a quick look
    python bench/endless_stream.py --out /tmp/s.json --threads 1

Candidates, all streaming the same context and actions frame by frame, interleaved (each frame
index runs every model once, in an order that flips from one frame to the next):

* ``scd_window``: the tiny SCD with ``model.encoder_window`` (and sinks), eager decoder loop;
* ``scd_window_compiled``: the same weights with the compiled decoder loop (compiled before timing);
* ``scd_full``: the same weights with full history (``model.max_frames`` raised to the stream
  length so it can run it at all), whose encoder cache and attention grow with every frame;
* ``dense_window``: the dense baseline of the same width and total depth with the same window.

Reported per model: wall and process CPU seconds per frame (medians over blocks of 100 frames),
flatness = median per-frame time around the last frame / around frame 100 (wall, and CPU time,
which other load on the machine moves far less), the KV cache's
allocated and in-use bytes along the stream, and the encoder / decoder split of the last frames
(``stream.last_timing``); the compile speed-up is scd_window / scd_window_compiled per frame.
Random weights: speed does not depend on what a model learned. JSON goes to bench/results/.

(Not named streaming.py: with bench/ first on sys.path that would shadow the mosaicml-streaming
package for every other script run from here.)
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

from scd_train.config import load_config
from scd_train.diffusion.sampling import SamplerSettings, new_stream
from scd_train.env import library_versions
from scd_train.eval.report import write_json
from scd_train.metrics.timing import MachineLoad, time_call
from scd_train.models import build_model

BLOCK = 100  # frames per reported median
MODELS = ("scd_window", "scd_window_compiled", "scd_full", "dense_window")


def build_candidates(args: argparse.Namespace) -> dict[str, tuple[torch.nn.Module, SamplerSettings]]:
    window = [f"model.encoder_window={args.window}", f"model.encoder_sink_frames={args.sinks}"]
    scd_cfg = load_config(args.config, window)
    full_cfg = load_config(args.config, [f"model.max_frames={args.frames + args.context}"])
    depth = scd_cfg.model.encoder_layers + scd_cfg.model.decoder_layers
    dense_cfg = load_config(args.config, ["model.arch=causal_dit", f"model.layers={depth}", *window])
    torch.manual_seed(0)
    scd = build_model(scd_cfg.model).eval()
    full = build_model(full_cfg.model).eval()
    full.load_state_dict(scd.state_dict())  # the same weights: only the history differs
    dense = build_model(dense_cfg.model).eval()
    for model in (scd, full, dense):  # zero-initialised layers would make some paths trivially cheap
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    full.load_state_dict(scd.state_dict())
    eager = SamplerSettings(steps=args.steps, compile="off")
    compiled = SamplerSettings(steps=args.steps, compile="on")
    dense_settings = SamplerSettings(steps=args.steps, cfg_mode="action")
    candidates = {"scd_window": (scd, eager), "scd_window_compiled": (scd, compiled), "scd_full": (full, eager),
                  "dense_window": (dense, dense_settings)}
    unknown = set(args.models) - set(candidates)
    if unknown:
        raise SystemExit(f"--models: unknown {sorted(unknown)}; choose from {', '.join(candidates)}")
    return {name: candidates[name] for name in args.models}


def cache_bytes(stream) -> tuple[int, int]:
    """(allocated, in use) bytes of a stream's KV cache."""
    cache = stream.cache
    allocated = cache.nbytes
    if cache.capacity == 0 or allocated == 0:
        return allocated, 0
    return allocated, allocated * cache.length // cache.capacity


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    load_before = MachineLoad.now()
    candidates = build_candidates(args)
    cfg = next(iter(candidates.values()))[0].cfg  # every candidate shares the latent shape and actions
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, args.context, cfg.latent_channels, cfg.latent_height, cfg.latent_width, generator=g)
    actions = torch.randint(0, cfg.num_actions, (args.context + args.frames,), generator=g)
    streams, compile_seconds = {}, {}
    for name, (model, settings) in candidates.items():
        stream = new_stream(model, settings, 1, None if model.cfg.encoder_window else args.frames + args.context - 1,
                            torch.Generator().manual_seed(1))
        start = time.perf_counter()
        stream.warm_up()  # compiles the decoder loop where it is on; outside every timed frame
        compile_seconds[name] = time.perf_counter() - start
        stream.prefill(context, actions[None, :args.context])
        streams[name] = stream
    names = list(streams)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    split = {n: [] for n in names}
    memory = {n: [] for n in names}
    for frame in range(args.frames):
        action = actions[None, args.context + frame]
        order = names if frame % 2 == 0 else names[::-1]
        for name in order:
            seconds, cpu_seconds = time_call(lambda s=streams[name], a=action: s.next_frame(a))
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
            timing = streams[name].last_timing
            split[name].append((timing.encoder, timing.decoder))
        if (frame + 1) % BLOCK == 0 or frame == 0:
            for name in names:
                allocated, used = cache_bytes(streams[name])
                memory[name].append({"frame": frame + 1, "cache_allocated_bytes": allocated,
                                     "cache_in_use_bytes": used})
        if (frame + 1) % (5 * BLOCK) == 0:
            print(f"frame {frame + 1}: " + ", ".join(f"{n} {1e3 * statistics.median(wall[n][-BLOCK:]):.1f} ms"
                                                     for n in names), flush=True)
    results = {name: summarize(wall[name], cpu[name], split[name], memory[name], compile_seconds[name])
               for name in names}
    speedups = {}
    if "scd_window" in results and "scd_window_compiled" in results:
        eager, compiled = results["scd_window"], results["scd_window_compiled"]
        speedups = {"compile_speedup": eager["wall_s_median"] / compiled["wall_s_median"],
                    "compile_speedup_cpu": eager["cpu_s_median"] / compiled["cpu_s_median"],
                    "compile_speedup_decoder": eager["decoder_s_median"] / compiled["decoder_s_median"]}
    return {
        "benchmark": "streaming",
        "date": datetime.date.today().isoformat(),
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "config": args.config,
        "settings": {"frames": args.frames, "context": args.context, "steps": args.steps, "window": args.window,
                     "sinks": args.sinks, "batch": 1, "dtype": "float32"},
        "machine_load": {"before": load_before.to_dict(), "after": MachineLoad.now().to_dict()},
        "versions": library_versions(),
        "models": list(results),
        **speedups,
        "results": results,
    }


def summarize(wall: list[float], cpu: list[float], split: list[tuple[float, float]], memory: list[dict],
              compile_seconds: float) -> dict:
    frames = len(wall)
    early = min(BLOCK, frames) - 1  # frame 100 (index 99), or the last one in a short run

    def around(series: list[float], index: int) -> float:
        lo, hi = max(0, index - 10), min(len(series), index + 10)
        return statistics.median(series[lo:hi])

    blocks = [{"frames": f"{i + 1}-{min(i + BLOCK, frames)}", "wall_s_median": statistics.median(wall[i:i + BLOCK]),
               "cpu_s_median": statistics.median(cpu[i:i + BLOCK])} for i in range(0, frames, BLOCK)]
    return {
        "wall_s_median": statistics.median(wall), "wall_s_min": min(wall), "cpu_s_median": statistics.median(cpu),
        "encoder_s_median": statistics.median(e for e, _ in split[-BLOCK:]),
        "decoder_s_median": statistics.median(d for _, d in split[-BLOCK:]),
        "frame_100_s": around(wall, early), "last_frame_s": around(wall, frames - 1),
        "flatness": around(wall, frames - 1) / around(wall, early),
        "flatness_point": wall[-1] / wall[early],
        # process CPU time is far less sensitive to other load on the machine than wall time
        "flatness_cpu": around(cpu, frames - 1) / around(cpu, early),
        "compile_or_warm_up_s": compile_seconds,
        "per_block": blocks,
        "memory": memory,
        "cache_peak_allocated_bytes": max(m["cache_allocated_bytes"] for m in memory),
        "cache_peak_in_use_bytes": max(m["cache_in_use_bytes"] for m in memory),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--frames", type=int, default=2000, help="generated frames per stream")
    parser.add_argument("--context", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="Euler steps per frame")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--sinks", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (pinned for the run)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="candidates to interleave (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/streaming_cpu.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    for name, row in report["results"].items():
        print(f"{name:20s} {1e3 * row['wall_s_median']:7.1f} ms/frame (cpu {1e3 * row['cpu_s_median']:7.1f} ms), "
              f"frame {args.frames} / frame 100 = {row['flatness']:.2f} (cpu {row['flatness_cpu']:.2f}), "
              f"KV cache {row['cache_peak_allocated_bytes'] / 2**20:.1f} MiB allocated")
    if "compile_speedup" in report:
        print(f"compile speed-up (scd_window eager / compiled, per frame): {report['compile_speedup']:.2f}x")
    write_json(report, args.out)  # atomic: a killed run never leaves half a file
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
