"""Play speed through the real path: scd-play in its own process, frames over its WebSocket.

    python bench/play.py                          # builds a small digits run with a VAE, then measures
    python bench/play.py --run runs/demo          # measure a run you have (a run dir or .safetensors)

The default run is the moving digits at 64x64 through a small KL VAE (4x8x8 latents) and
configs/tiny_shards.yaml's SCD, trained for a few steps only: speed depends on the architecture and
the number of decoder steps, not on what the weights learned, so a distilled few-step student plays
exactly as fast as this model at the same steps.

Two measurements, both from the client side of the WebSocket, so VAE decode and transfer count:

- frames/s with the server unpaced (``--fps 0``) at each decoder-step setting, the settings
  interleaved round by round (order flipped every round) on one server, changed live from the
  client as the page does; beside the wall rate, the server's CPU seconds per frame and its own
  per-frame encoder / decoder / render milliseconds;
- input-to-frame latency: a key press sent at a random moment within a tick until the first frame
  generated under it arrives (the server echoes the press's sequence number), at the target rate
  (``--target-fps``, the server's default 20) and unpaced.

Without an encoder window the run stops at model.max_frames; the client presses reset there and the
frame that follows a reset is left out of the intervals. Writes bench/results/play_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scd_train.env import hardware, library_versions  # noqa: E402
from scd_train.metrics.timing import MachineLoad, interleaved  # noqa: E402


def build_digits_run(work: Path, train_steps: int) -> Path:
    """Moving digits -> small VAE -> latent shards -> tiny_shards SCD (a few steps)."""
    from data_prep.demo import DemoScale, prepare_shards

    scale = DemoScale(videos=16, frames=24, size=64, vae_steps=20, vae_batch=8, context=4, unroll=12, progress=False)
    overrides = prepare_shards(work / "data", scale)
    run = work / "run"
    cmd = [sys.executable, "-m", "scd_train.train", "--config", "configs/tiny_shards.yaml", *overrides,
           f"train.steps={train_steps}", f"train.run_dir={run}", "data.num_workers=0", "data.batch_size=4",
           "log.progress_bar=false", "log.wandb=disabled"]
    subprocess.run(cmd, cwd=REPO, env=_env(1), check=True, stdout=subprocess.DEVNULL)
    return run


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


class PlayClient:
    """A WebSocket client that reads the page's protocol: JSON text, and binary frames."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.hello = json.loads(self.ws.recv())
        self.seq = 0
        self.since_reset = 0  # generated frames received since the last context

    def send(self, **message) -> None:
        self.ws.send(json.dumps(message))

    def next_frame(self) -> tuple[dict, float]:
        """The next generated frame's header and arrival time; presses reset at the frame limit."""
        while True:
            message = self.ws.recv(timeout=120)
            arrived = time.perf_counter()
            if isinstance(message, str):
                data = json.loads(message)
                if data["type"] == "notice" and data["kind"] == "limit":
                    self.send(type="reset")
                continue
            length = struct.unpack(">I", message[:4])[0]
            header = json.loads(message[4:4 + length])
            if not header["generated"]:
                self.since_reset = 0
                continue
            self.since_reset += 1
            return header, arrived

    def press(self, action: int) -> int:
        self.seq += 1
        self.send(type="press", action=action, seq=self.seq)
        return self.seq

    def release(self, action: int) -> None:
        self.seq += 1
        self.send(type="release", action=action, seq=self.seq)


def start_server(run: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "scd_train.play", str(run), "--port", "0", "--fps", "0", "--threads", str(threads),
           "--log", str(log)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(threads), stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    found = re.search(r"http://(\S+?)/", line)
    if not found:
        proc.kill()
        raise SystemExit(f"scd-play did not start: {line!r}")
    return proc, f"ws://{found.group(1)}/ws"


def measure_rate(client: PlayClient, server: psutil.Process, steps: int, frames: int, records: list) -> None:
    """Switch to ``steps`` decoder steps, skip frames made before the switch, then time ``frames`` frames."""
    client.send(type="steps", value=steps)
    header, _ = client.next_frame()
    while header["steps"] != steps:
        header, _ = client.next_frame()
    client.next_frame()  # one settling frame after the switch
    intervals, server_ms = [], []
    cpu0 = sum(server.cpu_times()[:2])
    _, last = client.next_frame()
    for _ in range(frames):
        header, arrived = client.next_frame()
        if client.since_reset > 1:  # the first frame after a reset also paid for the new context
            intervals.append(arrived - last)
            server_ms.append(header["panels"][0] | {"tick_ms": header["tick_ms"]})
        last = arrived
    cpu = sum(server.cpu_times()[:2]) - cpu0
    records.append({"intervals": intervals, "server_ms": server_ms, "cpu_s": cpu, "frames": frames + 1})


def summarize_rate(steps: int, runs: list[dict]) -> dict:
    intervals = [i for r in runs for i in r["intervals"]]
    server_ms = [m for r in runs for m in r["server_ms"]]
    frames = sum(r["frames"] for r in runs)

    def median_of(key: str) -> float:
        return round(statistics.median(m[key] for m in server_ms), 3)

    return {"steps": steps, "frames_timed": len(intervals),
            "frames_per_second_median": round(1.0 / statistics.median(intervals), 2),
            "frames_per_second_mean": round(len(intervals) / sum(intervals), 2),
            "frame_interval_ms_p90": round(1000 * sorted(intervals)[int(0.9 * (len(intervals) - 1))], 2),
            "server_cpu_s_per_frame": round(sum(r["cpu_s"] for r in runs) / frames, 4),
            "server_ms_median": {k: median_of(k) for k in ("encoder_ms", "decoder_ms", "render_ms", "tick_ms")}}


def measure_latency(client: PlayClient, steps: int, fps: float, presses: int, rng: random.Random) -> dict:
    """Key press (sent at a random moment of a tick) -> arrival of the first frame generated under it."""
    client.send(type="steps", value=steps)
    client.send(type="rate", fps=fps)
    arrivals = [client.next_frame()[1] for _ in range(4)]
    # presses land anywhere within one tick: the target period, or the measured frame time when unpaced
    period = 1.0 / fps if fps > 0 else statistics.median(b - a for a, b in zip(arrivals, arrivals[1:]))
    latencies = []
    actions = max(1, len(client.hello["actions"]["names"]))
    for i in range(presses):
        client.next_frame()
        time.sleep(rng.uniform(0.0, period))  # frames arriving meanwhile wait in the socket
        action = i % actions
        sent = time.perf_counter()
        seq = client.press(action)
        header, arrived = client.next_frame()
        while header["press_seq"] != seq:
            header, arrived = client.next_frame()
        latencies.append(arrived - sent)
        client.release(action)
    ordered = sorted(latencies)
    return {"steps": steps, "target_fps": fps, "presses": presses,
            "latency_ms_median": round(1000 * statistics.median(ordered), 2),
            "latency_ms_p90": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 2),
            "latency_ms_max": round(1000 * ordered[-1], 2)}


def measure(client: PlayClient, server: psutil.Process, args: argparse.Namespace) -> tuple[list, list]:
    records: dict[int, list] = {k: [] for k in args.steps}
    candidates = {f"steps={k}": (lambda k=k: measure_rate(client, server, k, args.frames, records[k]))
                  for k in args.steps}
    for k in args.steps:  # warm-up, not recorded
        measure_rate(client, server, k, 5, [])
    windows = interleaved(candidates, repeats=args.rounds, warmup=0)
    rates = [summarize_rate(k, records[k]) | {"window_wall_s_median": round(windows[f"steps={k}"].median, 3)}
             for k in args.steps]
    for row in rates:
        print(f"{row['steps']:3d} steps: {row['frames_per_second_median']:6.1f} frames/s (median interval), "
              f"server {row['server_ms_median']['tick_ms']:.1f} ms/frame, "
              f"{row['server_cpu_s_per_frame'] * 1e3:.1f} ms CPU/frame", flush=True)
    rng = random.Random(0)
    latency = [measure_latency(client, args.latency_steps, fps, args.presses, rng) for fps in (args.target_fps, 0.0)]
    for row in latency:
        print(f"latency at {row['target_fps']:g} fps target, {row['steps']} steps: "
              f"median {row['latency_ms_median']:.1f} ms, p90 {row['latency_ms_p90']:.1f} ms", flush=True)
    return rates, latency


def run(args: argparse.Namespace) -> dict:
    from websockets.sync.client import connect

    load_before = MachineLoad.now()
    print(f"machine load: {load_before.to_dict()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="scd-bench-play-") as tmp:
        work = Path(tmp)
        source = args.run or build_digits_run(work, args.train_steps)
        proc, url = start_server(source, args.threads, work / "frames.jsonl")
        try:
            with connect(url, max_size=None, compression=None, open_timeout=60) as ws:
                client = PlayClient(ws)
                hello = client.hello
                rates, latency = measure(client, psutil.Process(proc.pid), args)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    few = next((r for r in rates if r["steps"] == args.latency_steps), rates[0])
    return {
        "benchmark": "play",
        "date": datetime.date.today().isoformat(),
        "command": "python bench/play.py " + " ".join(sys.argv[1:]),
        "run": str(args.run) if args.run else f"built here: moving digits 64x64, small VAE, configs/tiny_shards.yaml, "
                                              f"{args.train_steps} training steps (speed does not depend on weights)",
        "model": {"panels": hello["panels"], "frame": [hello["height"], hello["width"]],
                  "max_frames": hello["max_frames"], "endless": hello["endless"],
                  "context_frames": hello["context_frames"]},
        "server_threads": args.threads,
        "throughput": rates,
        "latency": latency,
        "target": {"frames_per_second": 20, "steps": few["steps"],
                   "met": few["frames_per_second_median"] >= 20},
        "method": {"throughput": "server unpaced (--fps 0); frames/s = 1 / median interval between frame arrivals "
                                 "at the client (VAE decode and WebSocket transfer included); step settings "
                                 "interleaved over rounds with metrics.timing.interleaved",
                   "latency": "key press sent at a uniformly random moment of a tick until the first frame "
                              "generated under that press arrives at the client"},
        "machine_load": {"before": load_before.to_dict(), "after": MachineLoad.now().to_dict()},
        "hardware": hardware(),
        "versions": library_versions(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a run directory or .safetensors (default: build the digits run)")
    parser.add_argument("--train-steps", type=int, default=5, help="training steps of the built run")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 20], help="decoder-step settings to time")
    parser.add_argument("--frames", type=int, default=40, help="frames timed per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-steps", type=int, default=4, help="decoder steps for the latency measurement")
    parser.add_argument("--target-fps", type=float, default=20.0)
    parser.add_argument("--presses", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="the server's CPU threads")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "play_cpu.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
