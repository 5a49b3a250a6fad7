"""``scd-data encode``: videos -> fixed-length clips -> VAE latents -> webdataset and/or MDS shards.

Work is split into jobs of ``videos_per_shard`` consecutive inputs (sorted by name); job k writes
shard k of each format and then, last, its record ``records/shard-k.json``. The record is the
completion mark: a rerun skips jobs whose record and files are intact and redoes the others, so a
killed run finished by a rerun holds every clip exactly once. The layout depends only on the inputs
and options, never on the number of workers. ``manifest.json`` is written at the very end.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_prep.checks import check_encode_options
from data_prep.frame_rate import check_uniform_rate, probe_fps, resample_indices
from data_prep.inputs import BadInput, VideoInput, list_inputs, read_actions, read_frames, resize_crop
from data_prep.latent_bounds import check_encoded_statistics, video_extremes
from data_prep.publish import fetch, publish
from data_prep.writers import (
    as_float_array,
    atomic_write_json,
    mds_columns,
    merge_mds_index,
    remove_temporaries,
    write_mds,
    write_tar,
)
from scd_train.data.manifest import MANIFEST, MANIFEST_VERSION, latent_crc
from scd_train.data.vae import encode_pixels, load_vae, vae_info
from scd_train.errors import InputError, ScdWarning
from scd_train.storage import Location, RetryPolicy, open_location

OPTIONS_FILE = "encode_options.json"
FORMATS = ("webdataset", "mds")


@dataclass
class EncodeOptions:
    inputs: Path
    out: Path | str  # a directory, or an s3://bucket/prefix URL
    vae: Path
    formats: list[str] = field(default_factory=lambda: ["webdataset", "mds"])
    height: int = 64
    width: int = 64
    clip_frames: int = 16
    stride: int = 8
    videos_per_shard: int = 8
    dtype: str = "float16"
    normalization: str = "channel_stats"
    num_actions: int | None = None
    default_fps: float = 8.0
    encode_batch: int = 32
    workers: int | None = None
    device: str = "cpu"
    strict: bool = False
    overwrite: bool = False
    progress: bool = True
    # Frame rates: inputs of several rates are refused unless resampled to one or explicitly kept.
    resample_fps: float | None = None
    allow_mixed_fps: bool = False
    # s3:// --out: where a job's files are written before upload (None: a temporary directory)
    staging: Path | None = None
    # s3:// --out: tries per request on transient failures, first wait (doubling)
    retries: int = 5
    retry_delay_s: float = 0.5

    @property
    def work_dir(self) -> Path:
        """Where files are written: --out itself, or the staging directory of a bucket --out."""
        return Path(self.staging) if self.staging is not None else Path(self.out)

    def destination(self) -> Location:
        return open_location(self.out, RetryPolicy(self.retries, self.retry_delay_s))

    def layout(self, inputs: list[VideoInput], vae_hash: str) -> dict:
        """Everything that decides the bytes of the shards; a rerun must match it exactly."""
        return {"inputs": [i.name for i in inputs], "vae_config_sha256": vae_hash, "formats": sorted(self.formats),
                "height": self.height, "width": self.width, "clip_frames": self.clip_frames, "stride": self.stride,
                "videos_per_shard": self.videos_per_shard, "dtype": self.dtype, "num_actions": self.num_actions,
                "default_fps": self.default_fps,
                # only when set, so shards encoded before the option existed stay reusable
                **({"resample_fps": self.resample_fps} if self.resample_fps is not None else {})}


@dataclass
class Job:
    index: int
    inputs: list[VideoInput]
    with_actions: bool

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}"


@dataclass
class EncodeSummary:
    videos: int = 0
    clips: int = 0
    frames_encoded: int = 0
    jobs_done: int = 0
    jobs_reused: int = 0
    seconds: float = 0.0
    bad: list[dict] = field(default_factory=list)
    manifest: Path | None = None

    @property
    def frames_per_second(self) -> float:
        return self.frames_encoded / self.seconds if self.seconds > 0 else 0.0


class EncodeError(InputError):
    """Inputs or options that cannot be encoded as given; no manifest is written."""


# -- planning ---------------------------------------------------------------------------------------

def plan_jobs(inputs: list[VideoInput], videos_per_shard: int) -> list[Job]:
    with_actions = any(inp.actions_path.is_file() for inp in inputs)
    return [Job(k, inputs[start:start + videos_per_shard], with_actions)
            for k, start in enumerate(range(0, len(inputs), videos_per_shard))]


def _check_layout(out: Location, layout: dict, overwrite: bool) -> None:
    path = out / OPTIONS_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != layout and not overwrite:
            changed = [k for k in sorted(set(layout) | set(previous)) if layout.get(k) != previous.get(k)]
            detail = "; ".join(f"{k}: was {_short(previous.get(k))}, now {_short(layout.get(k))}" for k in changed)
            raise EncodeError(f"{out} holds shards made with other inputs or options ({detail}); "
                              "use a new --out or pass --overwrite to start again")
        if previous != layout:
            for name in ("webdataset", "mds", "records", MANIFEST, OPTIONS_FILE):
                (out / name).remove()
    path.write_json(layout)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) < 80 else text[:77] + "..."


def _record_intact(out: Location, record_rel: str, present: dict[str, int]) -> dict | None:
    """The job's record if it and every shard it lists are at ``out``; ``present``: one listing of ``out``."""
    if record_rel not in present:
        return None
    try:
        record = json.loads((out / record_rel).read_text())
    except json.JSONDecodeError:
        return None
    for shard in record["shards"]["webdataset"] + record["shards"]["mds"]:
        if present.get(shard["path"]) != shard["bytes"]:
            return None
    return record


# -- the work of one job (runs in a worker process) -----------------------------------------------

_WORKER: dict = {}


def _init_worker(opts: EncodeOptions, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["vae"] = load_vae(opts.vae, opts.device)
    _WORKER["opts"] = opts


def _encode_video(inp: VideoInput, job: Job, opts: EncodeOptions, vae, bad: list[dict]) -> tuple[list[dict], int]:
    frames, source_fps = read_frames(inp, opts.default_fps)
    source_count = len(frames)
    actions = read_actions(inp, source_count, opts.num_actions) if job.with_actions else None
    fps = source_fps
    if opts.resample_fps is not None:
        keep = resample_indices(source_count, source_fps, opts.resample_fps)
        frames, fps = frames[keep], float(opts.resample_fps)
        actions = None if actions is None else actions[keep]
    count = len(frames)
    if count < opts.clip_frames:
        raise BadInput(f"too short: {count} frames < --clip-frames {opts.clip_frames}"
                       + (f" (after resampling {source_fps:g} -> {fps:g} fps)" if fps != source_fps else ""))
    starts = list(range(0, count - opts.clip_frames + 1, opts.stride))
    used = starts[-1] + opts.clip_frames  # frames past the last clip are never encoded
    pixels = resize_crop(frames[:used], opts.height, opts.width)
    latents = torch.cat([encode_pixels(vae, part) for part in pixels.split(opts.encode_batch)]).cpu()
    samples = []
    for start in starts:
        key = f"{inp.key_stem}-{start:06d}"
        clip = as_float_array(latents[start:start + opts.clip_frames], opts.dtype)
        if not np.isfinite(clip).all():  # also catches float16 overflow
            bad.append({"input": inp.name, "reason": f"non-finite latents in clip starting at frame {start}"})
            continue
        meta = {"key": key, "video": inp.name, "start": start, "frames": opts.clip_frames, "stride": opts.stride,
                "fps": fps, "source_fps": source_fps, "source_frames": source_count, "latents_crc32": latent_crc(clip)}
        clip_actions = None if actions is None else np.ascontiguousarray(actions[start:start + opts.clip_frames])
        samples.append({"key": key, "latents": clip, "actions": clip_actions, "meta": meta})
    return samples, used


def run_job(job: Job) -> dict:
    opts: EncodeOptions = _WORKER["opts"]
    vae = _WORKER["vae"]
    samples, bad, frames_encoded, fps, source_fps = [], [], 0, set(), set()
    for inp in job.inputs:
        try:
            video_samples, used = _encode_video(inp, job, opts, vae, bad)
        except BadInput as exc:
            bad.append({"input": inp.name, "reason": str(exc)})
            continue
        frames_encoded += used
        samples += video_samples
        fps.update(s["meta"]["fps"] for s in video_samples)
        source_fps.update(s["meta"]["source_fps"] for s in video_samples)
    samples.sort(key=lambda s: s["key"])
    out = opts.work_dir
    shards = {"webdataset": [], "mds": []}
    if samples and "webdataset" in opts.formats:
        shards["webdataset"].append(write_tar(out, out / "webdataset" / f"{job.name}.tar", samples))
    if samples and "mds" in opts.formats:
        shape = samples[0]["latents"].shape
        columns = mds_columns(shape, opts.dtype, job.with_actions)
        shards["mds"] = write_mds(out, out / "mds" / job.name, samples, columns)
    record = {"job": job.index, "inputs": [i.name for i in job.inputs], "samples": len(samples), "shards": shards,
              "bad": bad, "frames_encoded": frames_encoded, "fps": sorted(fps), "source_fps": sorted(source_fps),
              "extremes": video_extremes(samples), "stats": _channel_stats(samples),
              "max_action": max((int(s["actions"].max()) for s in samples if s["actions"] is not None), default=-1)}
    atomic_write_json(out / "records" / f"{job.name}.json", record)  # last: marks the job complete
    shard_files = [s["path"] for s in shards["webdataset"] + shards["mds"]]
    mds_index = [f"mds/{job.name}/index.json"] if shards["mds"] else []
    publish(opts.destination(), out, shard_files, drop=True)  # shards first, the record last
    publish(opts.destination(), out, mds_index + [f"records/{job.name}.json"])
    return record


def _channel_stats(samples: list[dict]) -> dict:
    if not samples:
        return {"count": 0, "sum": [], "sumsq": []}
    stacked = np.stack([s["latents"] for s in samples]).astype(np.float64)  # (N, T, C, H, W)
    per_channel = stacked.transpose(2, 0, 1, 3, 4).reshape(stacked.shape[2], -1)
    return {"count": int(per_channel.shape[1]), "sum": per_channel.sum(1).tolist(),
            "sumsq": (per_channel ** 2).sum(1).tolist()}


# -- the driver ------------------------------------------------------------------------------------

def default_workers(device: str) -> int:
    return 1 if device.startswith("cuda") else max(1, os.cpu_count() or 1)


def encode(opts: EncodeOptions) -> EncodeSummary:
    check_encode_options(opts)
    bad_formats = [f for f in opts.formats if f not in FORMATS]
    if bad_formats or not opts.formats:
        raise EncodeError(f"--format {','.join(opts.formats)}: expected webdataset, mds or both")
    if opts.dtype not in ("float16", "float32"):
        raise EncodeError(f"--dtype {opts.dtype}: expected float16 or float32")
    info = vae_info(opts.vae)
    if "float16" in info.weights_dtype:
        warnings.warn(f"VAE {opts.vae} stores its weights in float16; they are loaded and run in float32 (an exact "
                      "upcast: float16 arithmetic, not storage, overflows to NaN latents)", ScdWarning, stacklevel=2)
    for side, value in (("height", opts.height), ("width", opts.width)):
        if value % info.spatial_compression:
            raise EncodeError(f"--size: {side} {value} is not divisible by the VAE's spatial compression "
                              f"{info.spatial_compression}")
    inputs = list_inputs(opts.inputs)
    if not inputs:
        raise EncodeError(f"no videos (.mp4/.webm/.avi), image folders or .npy arrays under {opts.inputs}")
    check_uniform_rate({i.name: probe_fps(i, opts.default_fps) for i in inputs}, opts.resample_fps,
                       opts.allow_mixed_fps)
    dest = opts.destination()
    _check_layout(dest, opts.layout(inputs, info.config_sha256), opts.overwrite)
    with tempfile.TemporaryDirectory(prefix="scd-encode-") as tmp:
        staging = (opts.staging or Path(tmp)) if dest.is_remote else None
        return _encode_jobs(replace(opts, staging=staging), dest, info, inputs)


def _encode_jobs(opts: EncodeOptions, dest: Location, info, inputs: list[VideoInput]) -> EncodeSummary:
    work = opts.work_dir
    for sub in ("webdataset", "mds", "records"):
        (work / sub).mkdir(parents=True, exist_ok=True)
        remove_temporaries(work / sub)
    remove_temporaries(work)
    dest.abort_incomplete_uploads()  # what a killed upload left: invisible to readers, but billed
    jobs = plan_jobs(inputs, opts.videos_per_shard)
    records: dict[int, dict] = {}
    present = dest.file_sizes()
    for job in jobs:
        if (rec := _record_intact(dest, f"records/{job.name}.json", present)) is not None:
            records[job.index] = rec
    todo = [job for job in jobs if job.index not in records]
    summary = EncodeSummary(jobs_reused=len(records))
    start = time.perf_counter()
    if todo:
        summary.frames_encoded = _run_jobs(todo, opts, records)
    summary.seconds = time.perf_counter() - start
    summary.jobs_done = len(todo)
    ordered = [records[job.index] for job in jobs]
    summary.videos = len(inputs)
    summary.clips = sum(r["samples"] for r in ordered)
    summary.bad = sorted((b for r in ordered for b in r["bad"]), key=lambda b: (b["input"], b["reason"]))
    if opts.strict and summary.bad:
        raise EncodeError(f"--strict: {len(summary.bad)} bad input(s), no manifest written; first: "
                          f"{summary.bad[0]['input']}: {summary.bad[0]['reason']}")
    if summary.clips == 0:
        raise EncodeError(f"no clip could be made from the {len(inputs)} inputs; first problem: "
                          f"{summary.bad[0]['input']}: {summary.bad[0]['reason']}" if summary.bad else "no clips")
    summary.manifest = _write_manifest(opts, info, jobs, ordered, dest)
    return summary


def _run_jobs(todo: list[Job], opts: EncodeOptions, records: dict[int, dict]) -> int:
    requested = opts.workers or default_workers(opts.device)
    workers = min(requested, len(todo))
    # from the requested count, not the jobs left, so a rerun computes with the same thread count;
    # never above torch's own setting (OMP_NUM_THREADS), since oversubscribed cores are far slower
    threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // requested))
    if "mds" in opts.formats:
        import streaming  # noqa: F401  imported once here so forked workers inherit it
    total_videos = sum(len(j.inputs) for j in todo)
    bar = tqdm(total=total_videos, desc="encode", unit="video", disable=not opts.progress, file=sys.stderr)
    frames = 0
    try:
        if workers == 1:
            _init_worker(opts, threads)
            for job in todo:
                rec = run_job(job)
                records[job.index], frames = rec, frames + rec["frames_encoded"]
                bar.update(len(job.inputs))
            return frames
        context = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(opts, threads)) as pool:
            futures = {pool.submit(run_job, job): job for job in todo}
            for future in as_completed(futures):
                job = futures[future]
                rec = future.result()
                records[job.index], frames = rec, frames + rec["frames_encoded"]
                bar.update(len(job.inputs))
    finally:
        bar.close()
    return frames


def _write_manifest(opts: EncodeOptions, info, jobs: list[Job], records: list[dict], dest: Location) -> Location:
    out = opts.work_dir
    count = sum(r["stats"]["count"] for r in records)
    total = np.sum([r["stats"]["sum"] for r in records if r["stats"]["count"]], axis=0)
    total_sq = np.sum([r["stats"]["sumsq"] for r in records if r["stats"]["count"]], axis=0)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
    if opts.normalization == "channel_stats":
        normalization = {"kind": "channel_stats", "mean": mean.tolist(), "std": std.tolist()}
    else:
        normalization = {"kind": "scaling_factor", "scaling_factor": info.scaling_factor,
                         "shift_factor": info.shift_factor}
    check_encoded_statistics(opts, normalization, mean, std, records)
    with_actions = jobs[0].with_actions
    num_classes = opts.num_actions if opts.num_actions is not None else max(r["max_action"] for r in records) + 1
    sample_shape = [opts.clip_frames, info.latent_channels, opts.height // info.spatial_compression,
                    opts.width // info.spatial_compression]
    formats = {}
    if "webdataset" in opts.formats:
        formats["webdataset"] = {"shards": [s for r in records for s in r["shards"]["webdataset"]]}
    if "mds" in opts.formats:
        job_dirs = [out / "mds" / job.name for job, r in zip(jobs, records) if r["shards"]["mds"]]
        fetch(dest, out, [f"mds/{d.name}/index.json" for d in job_dirs])  # jobs finished by an earlier run
        merge_mds_index(out / "mds", job_dirs)
        publish(dest, out, ["mds/index.json"])
        formats["mds"] = {"index": "mds/index.json", "shards": [s for r in records for s in r["shards"]["mds"]]}
    manifest = {
        "version": MANIFEST_VERSION,
        "created_unix": time.time(),
        "samples": sum(r["samples"] for r in records),
        "vae": info.to_dict(),
        "latent": {"shape": sample_shape, "dtype": opts.dtype, "layout": "frames, channels, height, width"},
        "normalization": normalization,
        "latent_stats": {"mean": mean.tolist(), "std": std.tolist(), "values_per_channel": count},
        "video": {"height": opts.height, "width": opts.width, "clip_frames": opts.clip_frames, "stride": opts.stride,
                  "fps": sorted({f for r in records for f in r["fps"]}),
                  "source_fps": sorted({f for r in records for f in r.get("source_fps", r["fps"])}),
                  "resample_fps": opts.resample_fps},
        "actions": {"present": with_actions, "num_classes": num_classes if with_actions else 0},
        "formats": formats,
        "bad_inputs": sorted((b for r in records for b in r["bad"]), key=lambda b: b["input"]),
        "encode_options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()
                           if k not in ("progress", "overwrite", "workers", "staging", "retries", "retry_delay_s")},
    }
    atomic_write_json(out / MANIFEST, manifest)
    publish(dest, out, [MANIFEST])  # last: the set is complete
    return dest / MANIFEST
