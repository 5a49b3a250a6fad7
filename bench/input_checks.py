"""What the input checks cost: the per-sample checks on every shard read (with and without the
value bounds added against absurd latents), the start-up spot check, and hashing a VAE's weights.

    python bench/input_checks.py                     # tiny_shards-sized clips and SCD-M-sized clips

Samples are written as a webdataset shard with the manifest ``scd-data encode`` would write
(float16 latents, actions, CRC32), then read back by the training reader: ``full`` runs every check,
``without_bounds`` the same reader with the finiteness check it had before the value bounds existed.
The two are timed side by side (interleaved, order flipped each repeat).
Writes JSON to bench/results/input_checks_cpu.json.
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

from data_prep.writers import write_tar
from scd_train.data import latent_checks, shard_readers
from scd_train.data.manifest import MANIFEST_VERSION, latent_crc, load_manifest
from scd_train.data.shard_readers import TarShardReader
from scd_train.data.vae import _hash_weights, weights_sha256
from scd_train.env import library_versions
from scd_train.metrics.timing import MachineLoad, interleaved

SHAPES = {"tiny_shards": (8, 4, 8, 8), "scd_m": (300, 32, 8, 8)}


def write_dataset(root: Path, shape: tuple[int, ...], samples: int, actions: int = 4) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(samples):
        lat = (rng.standard_normal(shape) * 2.0 + 0.5).astype(np.float16)
        act = rng.integers(0, actions, shape[0]).astype(np.int64)
        rows.append({"key": f"clip-{i:06d}", "latents": lat, "actions": act,
                     "meta": {"key": f"clip-{i:06d}", "latents_crc32": latent_crc(lat)}})
    (root / "webdataset").mkdir(parents=True)
    entry = write_tar(root, root / "webdataset" / "shard-000000.tar", rows)
    channels = shape[1]
    manifest = {
        "version": MANIFEST_VERSION, "samples": samples,
        "vae": {"id": "bench", "config_sha256": "0" * 64, "weights_sha256": "0" * 64, "temporal_compression": 1},
        "latent": {"shape": list(shape), "dtype": "float16"},
        "normalization": {"kind": "channel_stats", "mean": [0.5] * channels, "std": [2.0] * channels},
        "latent_stats": {"mean": [0.5] * channels, "std": [2.0] * channels},
        "actions": {"present": True, "num_classes": actions},
        "formats": {"webdataset": {"shards": [entry]}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def bench_reads(root: Path, repeats: int) -> dict:
    manifest = load_manifest(root)
    entry = manifest.shards_for("webdataset")[0]
    reader = TarShardReader(manifest, entry)
    reader.read(0)  # the header scan, once
    count = entry.samples
    original = shard_readers.sample_problem

    def read_all():
        for i in range(count):
            reader.read(i)

    def read_all_without_bounds():
        # what the reader checked before the bounds existed: finite values only
        shard_readers.sample_problem = lambda latents, norm: None if np.isfinite(latents).all() else "NaN"
        try:
            read_all()
        finally:
            shard_readers.sample_problem = original

    stats = interleaved({"full": read_all, "without_bounds": read_all_without_bounds}, repeats=repeats, warmup=1)
    out = {name: {**s.summary(), "per_sample_us_median": s.median / count * 1e6} for name, s in stats.items()}
    out["bounds_overhead_ratio"] = stats["full"].median / stats["without_bounds"].median
    start = time.perf_counter()
    latent_checks.spot_check_readers([reader], manifest)
    out["spot_check_s"] = time.perf_counter() - start
    out["samples"], out["shape"] = count, list(manifest.latent_shape)
    return out


def bench_weights_hash(root: Path, megabytes: int) -> dict:
    folder = root / "vae"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(megabytes << 20))
    _hash_weights.cache_clear()
    start = time.perf_counter()
    weights_sha256(folder)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    weights_sha256(folder)  # unchanged size and mtime: cached
    return {"megabytes": megabytes, "first_s": cold, "mb_per_s": megabytes / cold,
            "repeat_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="clips per shape")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--weights-mb", type=int, default=160, help="size of the VAE weight file hashed")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "input_checks_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = MachineLoad.now().to_dict()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            samples = args.samples if name == "tiny_shards" else max(4, args.samples // 8)
            root = write_dataset(Path(tmp) / name, shape, samples)
            results[name] = bench_reads(root, args.repeats)
            print(f"{name} {shape}: {results[name]['full']['per_sample_us_median']:.0f} us/sample with every check, "
                  f"{results[name]['without_bounds']['per_sample_us_median']:.0f} us without the value bounds "
                  f"(x{results[name]['bounds_overhead_ratio']:.3f}); spot check {results[name]['spot_check_s']:.3f} s")
        results["vae_weights_hash"] = bench_weights_hash(Path(tmp), args.weights_mb)
        print(f"VAE weights hash: {args.weights_mb} MB in {results['vae_weights_hash']['first_s']:.2f} s "
              f"({results['vae_weights_hash']['mb_per_s']:.0f} MB/s), cached repeat "
              f"{results['vae_weights_hash']['repeat_s'] * 1e3:.2f} ms")
    report = {"benchmark": "input_checks", "command": " ".join(["python", "bench/input_checks.py", *sys.argv[1:]]),
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(), "results": results,
              "machine_load": {"before": load_before, "after": MachineLoad.now().to_dict()},
              "versions": library_versions()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
