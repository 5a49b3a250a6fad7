"""Latent data pipeline throughput: encoding (frames/s) and the shard loaders (samples/s, latent
frames/s) for webdataset and MDS with 2 workers, against the rate the trainer consumes clips.

    python bench/data_pipeline.py                  # CPU: 64x64 frames, the default small VAE shape
    python bench/data_pipeline.py --bucket         # loaders from a local S3 server vs the local disk

``--bucket`` starts moto's S3 server on 127.0.0.1 (the ``dev`` extra), encodes the same shards into a
bucket and onto the disk, and times the loaders side by side (interleaved, wall and CPU time): local
disk, bucket with a cold cache (a fresh cache directory each time: every MDS shard is downloaded;
webdataset scans the tar headers again) and bucket with a warm cache (MDS shards already cached on
disk; webdataset reads each sample with one ranged GET either way).

The VAE has the shape ``scd-data train-vae`` makes, with random weights: speed does not depend on
what the weights learned. The trainer rate is the tiny_shards model's training step on the same
device with the same batch. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.encode import EncodeOptions, encode
from data_prep.train_vae import tiny_vae_config
from scd_train.config import load_config
from scd_train.data.manifest import load_manifest
from scd_train.data.shard_loader import ShardLoader
from scd_train.data.synthetic import render_video
from scd_train.env import library_versions


def make_inputs(folder: Path, videos: int, frames: int, size: int) -> int:
    from scd_train.config import SyntheticDataConfig

    folder.mkdir(parents=True)
    cfg = SyntheticDataConfig(frames_per_video=frames, image_size=size, digit_scale=size // 16)
    for i in range(videos):
        video, actions = render_video(cfg, 0, i)
        np.save(folder / f"v{i:04d}.npy", video.transpose(0, 2, 3, 1))
        np.save(folder / f"v{i:04d}.actions.npy", actions)
    return videos * frames


def bench_encode(root: Path, vae: Path, size: int, clip_frames: int, workers: int) -> dict:
    out = root / f"shards-w{workers}"
    opts = EncodeOptions(root / "videos", out, vae, height=size, width=size, clip_frames=clip_frames,
                         stride=clip_frames // 2, videos_per_shard=4, workers=workers, progress=False)
    start = time.perf_counter()
    summary = encode(opts)
    wall = time.perf_counter() - start
    return {"workers": workers, "frames_encoded": summary.frames_encoded, "clips": summary.clips,
            "seconds": wall, "frames_per_s": summary.frames_encoded / wall, "formats": opts.formats,
            "path": str(out)}


def bench_loader(root: Path, fmt: str, batch: int, clip_frames: int, workers: int, batches: int) -> dict:
    loader = ShardLoader(load_manifest(root), fmt, batch_size=batch, seed=0, clip_frames=clip_frames,
                         use_actions=True, num_workers=workers)
    it = iter(loader)
    start = time.perf_counter()
    next(it)  # worker start-up, reported separately
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    wall = time.perf_counter() - start
    del it
    samples = batches * batch
    return {"format": fmt, "workers": workers, "batch_size": batch, "batches": batches,
            "first_batch_s": first, "samples_per_s": samples / wall,
            "latent_frames_per_s": samples * clip_frames / wall}


def bench_trainer(config: str, batch: int, clip_frames: int, steps: int) -> dict:
    from scd_train.diffusion.objective import build_objective
    from scd_train.models import build_model

    cfg = load_config(config, [f"data.batch_size={batch}", f"data.clip_frames={clip_frames}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objective = build_objective(cfg.model, cfg.diffusion)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    m = cfg.model
    latents = torch.randn(batch, clip_frames, m.latent_channels, m.latent_height, m.latent_width)
    actions = torch.randint(0, m.num_actions, (batch, clip_frames))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = objective(model, latents, actions).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        times.append(time.perf_counter() - start)
    step = float(np.median(times[1:]))
    return {"config": config, "batch_size": batch, "clip_frames": clip_frames, "median_step_s": step,
            "samples_per_s": batch / step, "latent_frames_per_s": batch * clip_frames / step}


def bench_bucket(args: argparse.Namespace) -> dict:
    """Loader samples/s: local disk vs a bucket on a local S3 server, cold and warm cache, interleaved."""
    import itertools
    import shutil

    from diffusers import AutoencoderKL

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test suite's S3 server
    from s3_server import MotoServer

    from scd_train.metrics.timing import MachineLoad, interleaved
    from scd_train.storage import CacheSettings

    load_start = MachineLoad.now()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = MotoServer(root / "moto.log")
        try:
            os.environ.update(server.env({}))
            server.create_bucket("bench")
            torch.manual_seed(0)
            AutoencoderKL(**tiny_vae_config(4, 8, 16, args.size)).save_pretrained(str(root / "vae"))
            make_inputs(root / "videos", args.videos, args.frames, args.size)
            common = dict(height=args.size, width=args.size, clip_frames=args.clip_frames,
                          stride=args.clip_frames // 2, videos_per_shard=4, workers=args.workers, progress=False)
            encode(EncodeOptions(root / "videos", root / "shards", root / "vae", **common))
            start = time.perf_counter()
            encode(EncodeOptions(root / "videos", "s3://bench/shards", root / "vae", **common))
            upload_s = time.perf_counter() - start
            sources = {"disk": load_manifest(root / "shards"), "bucket": load_manifest("s3://bench/shards")}
            fresh = itertools.count()

            def read(source: str, fmt: str, cache: str | None) -> None:
                loader = ShardLoader(sources[source], fmt, batch_size=args.batch_size, seed=0,
                                     clip_frames=args.clip_frames, use_actions=True, num_workers=0,
                                     cache=CacheSettings(cache) if cache else None)
                it = iter(loader)
                for _ in range(args.bucket_batches):
                    next(it)
                del it, loader  # releases the cache claim before the next reader of that directory

            def cold_dir() -> str:
                return str(root / f"cold-{next(fresh)}")

            warm = str(root / "warm")
            candidates = {
                "webdataset disk": lambda: read("disk", "webdataset", None),
                "webdataset bucket (new reader: header scan)": lambda: read("bucket", "webdataset", None),
                "mds disk": lambda: read("disk", "mds", None),
                "mds bucket, cold cache": lambda: read("bucket", "mds", cold_dir()),
                "mds bucket, warm cache": lambda: read("bucket", "mds", warm),
            }
            stats = interleaved(candidates, repeats=args.repeats, warmup=1)
            for path in root.glob("cold-*"):
                shutil.rmtree(path, ignore_errors=True)
        finally:
            server.stop()
    samples = args.bucket_batches * args.batch_size
    rows = []
    for name, st in stats.items():
        rows.append({"reader": name, **st.summary(), "samples_per_call": samples,
                     "samples_per_s": samples / st.median, "cpu_s_per_sample": st.cpu_median / samples})
    disk = {r["reader"].split()[0]: r["samples_per_s"] for r in rows if r["reader"].endswith("disk")}
    for row in rows:
        row["vs_disk"] = row["samples_per_s"] / disk[row["reader"].split()[0]]
    return {"benchmark": "data_pipeline_bucket", "device": "cpu", "date": args.date,
            "machine_load": {"start": load_start.to_dict(), "end": MachineLoad.now().to_dict()},
            "versions": library_versions(),
            "setup": {"server": "moto standalone server on 127.0.0.1 (python -m moto.server)",
                      "videos": args.videos, "frames_per_video": args.frames, "frame_size": args.size,
                      "latent_shape": [args.clip_frames, 4, args.size // 8, args.size // 8],
                      "batch_size": args.batch_size, "batches_per_call": args.bucket_batches,
                      "loader_workers": 0, "repeats": args.repeats, "encode_to_bucket_s": upload_s},
            "loaders": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--clip-frames", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--config", default="configs/tiny_shards.yaml")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--out", type=Path, default=None,
                        help="default: bench/results/data_pipeline_cpu.json (data_pipeline_bucket_cpu.json)")
    parser.add_argument("--bucket", action="store_true", help="loaders from a local S3 server vs the local disk")
    parser.add_argument("--bucket-batches", type=int, default=12, help="--bucket: batches per timed call")
    parser.add_argument("--repeats", type=int, default=3, help="--bucket: timed calls per reader")
    args = parser.parse_args(argv)
    if args.bucket:
        out = args.out or Path("bench/results/data_pipeline_bucket_cpu.json")
        result = bench_bucket(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        for row in result["loaders"]:
            print(f"{row['reader']:>44}: {row['samples_per_s']:8.0f} samples/s ({row['vs_disk']:.2f}x disk), "
                  f"{row['cpu_s_per_sample'] * 1e3:.2f} ms CPU/sample")
        print(f"load average {result['machine_load']['start']['loadavg_1m']:.1f} -> "
              f"{result['machine_load']['end']['loadavg_1m']:.1f} on {os.cpu_count()} cores; wrote {out}")
        return 0
    args.out = args.out or Path("bench/results/data_pipeline_cpu.json")
    from diffusers import AutoencoderKL

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        AutoencoderKL(**tiny_vae_config(4, 8, 16, args.size)).save_pretrained(str(root / "vae"))
        make_inputs(root / "videos", args.videos, args.frames, args.size)
        encoding = [bench_encode(root, root / "vae", args.size, args.clip_frames, w) for w in (1, args.workers)]
        shards = Path(encoding[-1]["path"])
        loaders = [bench_loader(shards, fmt, args.batch_size, args.clip_frames, args.workers, args.batches)
                   for fmt in ("webdataset", "mds")]
    trainer = bench_trainer(args.config, args.batch_size, args.clip_frames, steps=5)
    for row in loaders:
        row["loader_over_trainer"] = row["samples_per_s"] / trainer["samples_per_s"]
    result = {"benchmark": "data_pipeline", "device": "cuda" if torch.cuda.is_available() else "cpu",
              "date": args.date, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              # the machine is shared: a load average above the core count means the numbers are pessimistic
              "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
              "versions": library_versions(),
              "setup": {"videos": args.videos, "frames_per_video": args.frames, "frame_size": args.size,
                        "vae": "AutoencoderKL, 4 latent channels, spatial compression 8 (random weights)",
                        "latent_shape": [args.clip_frames, 4, args.size // 8, args.size // 8]},
              "encode": [{k: v for k, v in row.items() if k != "path"} for row in encoding],
              "loader": loaders, "trainer_consumption": trainer}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["encode"]:
        print(f"encode, {row['workers']} worker(s): {row['frames_per_s']:.1f} frames/s")
    for row in loaders:
        print(f"{row['format']:>10} loader, {row['workers']} workers: {row['samples_per_s']:.0f} samples/s, "
              f"{row['latent_frames_per_s']:.0f} latent frames/s ({row['loader_over_trainer']:.1f}x the trainer)")
    print(f"trainer ({args.config}): {trainer['samples_per_s']:.1f} samples/s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
