"""Bad input across every command: one line ``prog: message`` on stderr, the right exit code (2 for
bad input, 1 for a runtime failure), no traceback, and nothing written or lost.

Each case of the table runs a command's ``main(argv)`` in this process. Cases that change data work
on copies; the shared dataset and run directory are fingerprinted around every case.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_data import (
    append_copy_of_first,
    append_extra_sample,
    bump_mds_index,
    change_first_sample,
    copy_dataset,
    edit_manifest,
    every_sample,
    every_tar,
    first_tar,
    rewrite_tar,
    scatter_first_sample,
)
from shard_helpers import encode_options, save_random_vae, write_inputs

from data_prep import cli as data_cli
from data_prep.encode import encode
from launchers import slurm
from scd_train import convert, demo, sample, train, weights
from scd_train.eval import cli as eval_cli
from scd_train.eval import probe_cli
from scd_train.video import write_mp4

SMALL_MODEL = ["model.width=64", "model.num_heads=2", "model.head_dim=32", "model.rope_axes=[8,12,12]",
               "model.encoder_layers=1", "model.decoder_layers=1", "model.layers=2"]
QUIET = ["log.progress_bar=false", "log.wandb=disabled"]
SYNTH = ["--config", "configs/tiny.yaml", *SMALL_MODEL, "data.synthetic.num_videos=16",
         "data.synthetic.frames_per_video=8", "data.clip_frames=4", "data.batch_size=4", "train.steps=2", *QUIET]
SHARDS = ["--config", "configs/tiny_shards.yaml", *SMALL_MODEL, "model.latent_channels=4", "model.latent_height=4",
          "model.latent_width=4", "model.patch_size=1", "model.max_frames=16", "data.clip_frames=4",
          "data.batch_size=2", "data.num_workers=0", "train.steps=1", "train.checkpoint_every=0", *QUIET]

MAINS = {"scd-train": train.main, "scd-sample": sample.main, "scd-export": weights.main, "scd-data": data_cli.main,
         "scd-eval": eval_cli.main, "scd-probe": probe_cli.main, "scd-convert": convert.main, "scd-demo": demo.main,
         "launchers/slurm.py": slurm.main}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """A small encoded dataset (2 tar + 2 MDS shards, 15 clips of 4 frames) and a 2-step SCD run."""
    root = tmp_path_factory.mktemp("bad-inputs")
    torch.set_num_threads(1)
    vae = save_random_vae(root / "vae")
    write_inputs(root / "videos", lengths=(8, 10, 12, 9))
    encode(encode_options(root / "videos", root / "shards", vae, videos_per_shard=2))
    assert train.main([*SYNTH, f"train.run_dir={root / 'run'}"]) == 0
    return {"root": root, "vae": vae, "videos": root / "videos", "shards": root / "shards", "run": root / "run"}


def fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@dataclass
class Env:
    tmp: Path
    shared: dict[str, Path]

    def __getattr__(self, name: str) -> Path:
        try:
            return self.shared[name]
        except KeyError:
            raise AttributeError(name) from None

    def ds(self, damage: Callable[[Path], None] | None = None) -> Path:
        """A copy of the shared shards, damaged by ``damage(root)``."""
        root = copy_dataset(self.shards, self.tmp / "ds")
        if damage is not None:
            damage(root)
        return root

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def run_copy(self) -> Path:
        return copy_dataset(self.run, self.tmp / "run-copy")


@dataclass
class Case:
    id: str
    prog: str  # the command (a key of MAINS)
    argv: Callable[[Env], list[str]]
    code: int
    first_line: str  # regex the message's first line must match
    absent: tuple[str, ...] = ()  # globs under the case's tmp dir that must match nothing afterwards
    check: Callable[[Env], None] | None = None  # anything else that must hold afterwards
    no_cuda: bool = False  # run as on a machine without a GPU
    stdout: bool = False  # the report goes to stdout (scd-data verify's problem list), not one stderr line
    environ: tuple[tuple[str, str], ...] = ()  # environment variables set for the case

    def __str__(self) -> str:
        return self.id


def train_shards(e: Env, data: Path, *extra: str) -> list[str]:
    return [*SHARDS, f"data.path={data}", f"train.run_dir={e.tmp / 'run'}", *extra]


def synth_run(e: Env, *extra: str) -> list[str]:
    return [*SYNTH, f"train.run_dir={e.tmp / 'run'}", *extra]


def flip_latent_bytes(members):
    """Every sample's latents altered without updating its CRC (bit rot inside a re-hashed shard)."""
    out = []
    for name, data in members:
        if name.endswith(".latents.npy"):
            data = data[:-2] + bytes([data[-2] ^ 0x40]) + data[-1:]
        out.append((name, data))
    return out


def truncate(path: Path, nbytes: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-nbytes])


def flip_byte_in_place(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def drop_identity(root: Path) -> None:
    def change(m):
        m["vae"].pop("config_sha256")
        m["vae"].pop("weights_sha256")
    edit_manifest(root, change)


def retrained_vae(e: Env) -> Path:
    from safetensors.torch import load_file, save_file

    folder = copy_dataset(e.vae, e.tmp / "vae-other")
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(path))
    return folder


def vae_with_scaling(e: Env, factor: float) -> Path:
    folder = copy_dataset(e.vae, e.tmp / "vae-scaled")
    config = json.loads((folder / "config.json").read_text())
    config["scaling_factor"] = factor
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def mixed_rate_videos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, fps in (("a.mp4", 8), ("b.mp4", 12)):
        write_mp4(rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8), folder / name, fps)
    return folder


def videos_with_actions(e: Env, actions: np.ndarray) -> Path:
    folder = copy_dataset(e.videos, e.tmp / "videos")
    np.save(folder / "video-00.actions.npy", actions)
    return folder


def encode_args(e: Env, *extra: str, inputs: Path | None = None, vae: Path | None = None) -> list[str]:
    return ["encode", str(inputs or e.videos), "--vae", str(vae or e.vae), "--out", str(e.tmp / "out"),
            "--size", "32", "--clip-frames", "4", "--stride", "2", "--workers", "1", "--quiet", *extra]


def resumed_with_other_batch(e: Env) -> list[str]:
    run = e.run_copy()
    return [*SYNTH, f"train.run_dir={run}", "data.batch_size=2", "train.steps=3"]


def resumed_with_other_model(e: Env) -> list[str]:
    run = e.run_copy()
    return [*SYNTH, f"train.run_dir={run}", "model.width=128", "model.num_heads=4", "train.steps=3"]


def run_config_unchanged(e: Env) -> None:
    assert (e.tmp / "run-copy" / "config.yaml").read_bytes() == (e.run / "config.yaml").read_bytes()


def no_checkpoint(e: Env) -> None:
    assert not list((e.tmp / "run").glob("checkpoints/step_*"))


CASES = [
    # -- scd-train: configuration -----------------------------------------------------------------
    Case("train-unknown-override", "scd-train", lambda e: synth_run(e, "optim.decoder_lr_ration=2"), 2,
         r"^scd-train: command-line override 'optim.decoder_lr_ration=2': unknown config key "
         r"'optim.decoder_lr_ration'; did you mean 'optim.decoder_lr_ratio'\?", absent=("run",)),
    Case("train-unknown-yaml-key", "scd-train",
         lambda e: ["--config", str(e.write("bad.yaml", "optim:\n  decoder_lr_ration: 2\n"))], 2,
         r"^scd-train: \S+bad.yaml: unknown config key 'optim.decoder_lr_ration'; did you mean"),
    Case("train-yaml-syntax", "scd-train", lambda e: ["--config", str(e.write("bad.yaml", "model: [1, 2\n"))], 2,
         r"^scd-train: \S+bad.yaml: line \d+: invalid YAML"),
    Case("train-missing-config-file", "scd-train", lambda e: ["--config", str(e.tmp / "nope.yaml")], 2,
         r"^scd-train: config file \S+nope.yaml does not exist"),
    Case("train-wrong-type", "scd-train", lambda e: synth_run(e, "train.steps=abc"), 2,
         r"^scd-train: command-line override 'train.steps=abc': train.steps='abc': expected an integer"),
    Case("train-unparsable-override", "scd-train", lambda e: synth_run(e, "model.rope_axes=[8,12"), 2,
         r"^scd-train: command-line override 'model.rope_axes=\[8,12': cannot parse the value"),
    Case("train-cross-field-from-override", "scd-train", lambda e: synth_run(e, "model.num_heads=4"), 2,
         r"^scd-train: model.width=64 must equal model.num_heads\*model.head_dim \(4\*32=128\) "
         r"\(set on the command line: .*model.num_heads=4\b"),
    Case("train-no-encoder", "scd-train", lambda e: synth_run(e, "model.encoder_layers=0"), 2,
         r"^scd-train: model.encoder_layers=0 must be >= 1: the SCD encoder"),
    Case("train-no-decoder", "scd-train", lambda e: synth_run(e, "model.decoder_layers=0"), 2,
         r"^scd-train: model.decoder_layers=0 must be >= 1"),
    Case("train-dense-no-layers", "scd-train", lambda e: synth_run(e, "model.arch=causal_dit", "model.layers=0"), 2,
         r"^scd-train: model.layers=0 must be >= 1 for model.arch='causal_dit'"),
    Case("train-zero-patch", "scd-train", lambda e: synth_run(e, "model.patch_size=0"), 2,
         r"^scd-train: model.patch_size=0 must be >= 1"),
    Case("train-zero-batch", "scd-train", lambda e: synth_run(e, "data.batch_size=0"), 2,
         r"^scd-train: data.batch_size=0 must be >= 1"),
    Case("train-negative-lr", "scd-train", lambda e: synth_run(e, "optim.lr=-1e-3"), 2,
         r"^scd-train: optim.lr=-0.001 must be > 0"),
    Case("train-dense-decoder-guidance", "scd-train",
         lambda e: synth_run(e, "model.arch=causal_dit", "diffusion.cfg_scale=2.0", "diffusion.cfg_mode=decoder"), 2,
         r"^scd-train: diffusion.cfg_mode='decoder' with diffusion.cfg_scale=2.0: the dense baseline"),
    # -- scd-train: topology, hardware, DeepSpeed -------------------------------------------------
    Case("train-too-few-clips-for-a-batch", "scd-train",
         lambda e: synth_run(e, "data.synthetic.num_videos=2", "data.batch_size=4"), 2,
         r"^scd-train: \d+ clips cannot fill one batch of data.batch_size=4 on each of 1 rank\(s\) \(world size "
         r"detected\)", absent=("run",)),
    Case("train-cuda-without-gpu", "scd-train", lambda e: synth_run(e, "train.device=cuda"), 2,
         r"^scd-train: train.device='cuda' but no CUDA device is visible", absent=("run",), no_cuda=True),
    Case("train-srun-without-launcher", "scd-train", lambda e: synth_run(e), 2,
         r"^scd-train: SLURM started this step with 4 tasks \(SLURM_STEP_NUM_TASKS=4\), but WORLD_SIZE and RANK are "
         r"unset, so every task would train alone", absent=("run",), environ=(("SLURM_STEP_NUM_TASKS", "4"),)),
    Case("train-rank-outside-world", "scd-train", lambda e: synth_run(e), 2,
         r"^scd-train: rank 3: RANK=3 is outside WORLD_SIZE=2 \(ranks are 0..1\)",
         absent=("run",), environ=(("RANK", "3"), ("WORLD_SIZE", "2"))),
    Case("train-deepspeed-batch-key", "scd-train",
         lambda e: synth_run(e, "train.backend=deepspeed",
                             f"train.deepspeed_config={e.write('ds.json', json.dumps({'train_batch_size': 64}))}"),
         2, r"^scd-train: train.deepspeed_config='\S+ds.json' sets train_batch_size=64 but data.batch_size=4 per "
            r"rank x train.grad_accum=1 x world size 1 \(detected\) = 4 clips per optimizer step", absent=("run",)),
    Case("train-deepspeed-optimizer-block", "scd-train",
         lambda e: synth_run(e, "train.backend=deepspeed", "train.deepspeed_config="
                             f"{e.write('ds.json', json.dumps({'optimizer': {'type': 'Adam'}}))}"), 2,
         r"^scd-train: train.deepspeed_config='\S+ds.json' has a 'optimizer' block", absent=("run",)),
    Case("train-deepspeed-json-missing", "scd-train",
         lambda e: synth_run(e, "train.backend=deepspeed", f"train.deepspeed_config={e.tmp / 'nope.json'}"), 2,
         r"^scd-train: train.deepspeed_config='\S+nope.json' does not exist", absent=("run",)),
    Case("train-resume-other-batch-size", "scd-train", resumed_with_other_batch, 2,
         r"^scd-train: cannot resume from \S+step_00000002: this run differs from the one that wrote it$",
         check=run_config_unchanged),
    Case("train-resume-other-model", "scd-train", resumed_with_other_model, 2,
         r"^scd-train: cannot resume from \S+step_00000002: this run differs from the one that wrote it$",
         check=run_config_unchanged),
    # -- scd-train: data --------------------------------------------------------------------------
    Case("train-missing-shard-dir", "scd-train", lambda e: train_shards(e, e.tmp / "nowhere"), 2,
         r"^scd-train: \S+manifest.json does not exist: data.path='\S+nowhere' must be a directory", absent=("run",)),
    Case("train-nan-latents-at-read", "scd-train",
         lambda e: train_shards(e, e.ds(lambda r: every_tar(r, every_sample(latents=lambda a: a * np.nan)))), 2,
         r"^scd-train: corrupt data in shard \S+shard-00000\d.tar, member \S+latents.npy: latents contain NaN or Inf",
         check=no_checkpoint),
    Case("train-absurd-latents", "scd-train",
         lambda e: train_shards(e, e.ds(lambda r: every_tar(r, every_sample(latents=lambda a: a * 5000)))), 2,
         r"^scd-train: corrupt data in shard \S+, member \S+: latent values reach \S+ standard deviations from the "
         r"manifest's normalization", check=no_checkpoint),
    Case("train-rescaled-latents-spot-check", "scd-train",
         lambda e: train_shards(e, e.ds(lambda r: every_tar(r, every_sample(latents=lambda a: a * 6)))), 2,
         r"^scd-train: data.path=\S+: \d+ sampled clips have normalized mean \S+ and std \S+ in channel \d+, but the "
         r"manifest's latent_stats imply", absent=("run",)),
    Case("train-float-action-ids", "scd-train",
         lambda e: train_shards(e, e.ds(lambda r: every_tar(r, every_sample(actions=lambda a: a + 0.5)))), 2,
         r"^scd-train: corrupt data in shard \S+, member \S+: actions dtype float64: action ids must be integers",
         check=no_checkpoint),
    Case("train-vae-identity-removed", "scd-train", lambda e: train_shards(e, e.ds(drop_identity)), 2,
         r"^scd-train: \S+manifest.json \(data.path\) does not identify the VAE that made its latents "
         r"\(vae.config_sha256, vae.weights_sha256 missing\)", absent=("run",)),
    Case("train-temporal-compression", "scd-train",
         lambda e: train_shards(e, e.ds(lambda r: edit_manifest(
             r, lambda m: m["vae"].update(temporal_compression=4)))), 2,
         r"^scd-train: \S+manifest.json \(data.path\) records vae.temporal_compression=4: latents of a video VAE",
         absent=("run",)),
    Case("train-vae-other-weights", "scd-train",
         lambda e: train_shards(e, e.shards, f"data.vae_path={retrained_vae(e)}"), 2,
         r"^scd-train: data.vae_path=\S+vae-other has weights sha256 \w+ but .+ was encoded by AutoencoderKL:vae",
         absent=("run",)),
    Case("train-truncated-tar", "scd-train",
         lambda e: train_shards(e, e.ds(lambda r: truncate(r / first_tar(r), 3000))), 2,
         r"^scd-train: corrupt data in shard \S+shard-000000.tar, member \(file size\): \d+ bytes but the manifest "
         r"records \d+ \(truncated or rewritten\); ", absent=("run",)),
    Case("train-checksum-mismatch", "scd-train",
         lambda e: train_shards(e, e.ds(lambda r: every_tar(r, flip_latent_bytes))), 2,
         r"^scd-train: corrupt data in shard \S+, member \S+latents.npy: latents checksum \w+ != \w+ recorded at "
         r"encode time", check=no_checkpoint),
    Case("train-fp8-on-cpu", "scd-train",
         lambda e: synth_run(e, "precision.fp8.enabled=true", "precision.fp8.backend=torchao", "train.device=cpu"), 2,
         r"^scd-train: precision.fp8 is enabled but the device is CPU, which has no FP8 matmul units", absent=("run",)),
    Case("train-missing-tar", "scd-train",
         lambda e: train_shards(e, e.ds(lambda r: (r / "webdataset" / "shard-000001.tar").unlink())), 2,
         r"^scd-train: 1 shard\(s\) listed in \S+manifest.json are missing, first: \S+shard-000001.tar",
         absent=("run",)),
    Case("train-missing-mds-index", "scd-train",
         lambda e: train_shards(e, e.ds(lambda r: (r / "mds" / "shard-000000" / "index.json").unlink()),
                                "data.source=mds"), 2,
         r"^scd-train: MDS index \S+shard-000000/index.json for shard \S+ is missing", absent=("run",)),
    # -- scd-sample -------------------------------------------------------------------------------
    Case("sample-zero-steps", "scd-sample", lambda e: [str(e.run), "--steps", "0", "--out", str(e.tmp / "s")], 2,
         r"^scd-sample: --steps 0 must be at least 1", absent=("s",)),
    Case("sample-too-many-clips", "scd-sample",
         lambda e: [str(e.run), "--clips", "1000", "--steps", "1", "--context", "2", "--unroll", "2",
                    "--out", str(e.tmp / "s")], 2,
         r"^scd-sample: --clips 1000: the held-out data provides \d+ clips of 4 frames; ask for at most",
         absent=("s",)),
    Case("sample-zero-context", "scd-sample", lambda e: [str(e.run), "--context", "0", "--out", str(e.tmp / "s")], 2,
         r"^scd-sample: --context 0 must be at least 1", absent=("s",)),
    Case("sample-zero-unroll", "scd-sample", lambda e: [str(e.run), "--unroll", "0", "--out", str(e.tmp / "s")], 2,
         r"^scd-sample: --unroll 0 must be at least 1", absent=("s",)),
    Case("sample-beyond-max-frames", "scd-sample",
         lambda e: [str(e.run), "--context", "4", "--unroll", "61", "--out", str(e.tmp / "s")], 2,
         r"^scd-sample: --context 4 \+ --unroll 61 = 65 frames exceed the model's model.max_frames=64; ask for at "
         r"most 64", absent=("s",)),
    Case("sample-missing-source", "scd-sample", lambda e: [str(e.tmp / "nothing"), "--out", str(e.tmp / "s")], 2,
         r"^scd-sample: \S+nothing is neither a run directory nor an exported .safetensors file", absent=("s",)),
    Case("sample-missing-checkpoint", "scd-sample",
         lambda e: [str(e.run), "--checkpoint", str(e.tmp / "step_9"), "--out", str(e.tmp / "s")], 2,
         r"^scd-sample: --checkpoint \S+step_9 does not exist", absent=("s",)),
    Case("sample-damaged-safetensors", "scd-sample",
         lambda e: [str(e.write("m.safetensors", "not a tensor file")), "--out", str(e.tmp / "s")], 2,
         r"^scd-sample: \S+m.safetensors is not a readable safetensors file", absent=("s",)),
    Case("sample-cuda-without-gpu", "scd-sample", lambda e: [str(e.run), "--device", "cuda"], 2,
         r"^scd-sample: --device cuda: no CUDA device is visible", no_cuda=True),
    # -- scd-export -------------------------------------------------------------------------------
    Case("export-missing-run", "scd-export", lambda e: [str(e.tmp / "nothing"), "--out", str(e.tmp / "x.st")], 2,
         r"^scd-export: run directory \S+nothing does not exist", absent=("x.st",)),
    Case("export-no-checkpoint", "scd-export",
         lambda e: [str(e.write("config.yaml", (e.run / "config.yaml").read_text()).parent), "--out",
                    str(e.tmp / "x.st")], 2,
         r"^scd-export: no complete checkpoint under \S+checkpoints", absent=("x.st",)),
    # -- scd-data encode --------------------------------------------------------------------------
    Case("encode-zero-clip-frames", "scd-data", lambda e: encode_args(e, "--clip-frames", "0"), 2,
         r"^scd-data encode: --clip-frames 0 must be at least 2", absent=("out",)),
    Case("encode-zero-stride", "scd-data", lambda e: encode_args(e, "--stride", "0"), 2,
         r"^scd-data encode: --stride 0 must be at least 1", absent=("out",)),
    Case("encode-zero-videos-per-shard", "scd-data", lambda e: encode_args(e, "--videos-per-shard", "0"), 2,
         r"^scd-data encode: --videos-per-shard 0 must be at least 1", absent=("out",)),
    Case("encode-zero-workers", "scd-data", lambda e: encode_args(e, "--workers", "0"), 2,
         r"^scd-data encode: --workers 0 must be at least 1", absent=("out",)),
    Case("encode-zero-fps", "scd-data", lambda e: encode_args(e, "--fps", "0"), 2,
         r"^scd-data encode: --fps 0.0 must be a positive frame rate", absent=("out",)),
    Case("encode-missing-inputs", "scd-data", lambda e: encode_args(e, inputs=e.tmp / "none"), 2,
         r"^scd-data encode: input directory \S+none does not exist", absent=("out",)),
    Case("encode-missing-vae", "scd-data", lambda e: encode_args(e, vae=e.tmp / "novae"), 2,
         r"^scd-data encode: VAE folder \S+novae does not exist", absent=("out",)),
    Case("encode-vae-without-config", "scd-data", lambda e: encode_args(e, vae=e.write("w", "").parent), 2,
         r"^scd-data encode: \S+ is not a diffusers VAE folder: config.json is missing", absent=("out",)),
    Case("encode-mixed-frame-rates", "scd-data",
         lambda e: encode_args(e, inputs=mixed_rate_videos(e.tmp / "mixed")), 2,
         r"^scd-data encode: the inputs have 2 frame rates: 8 fps \(1 input\(s\), e.g. a.mp4\); 12 fps \(1 input\(s\), "
         r"e.g. b.mp4\). Pass --resample-fps N", absent=("out",)),
    Case("encode-resample-and-allow-mixed", "scd-data",
         lambda e: encode_args(e, "--resample-fps", "8", "--allow-mixed-fps"), 2,
         r"^scd-data encode: --resample-fps and --allow-mixed-fps exclude each other", absent=("out",)),
    Case("encode-cuda-without-gpu", "scd-data", lambda e: encode_args(e, "--device", "cuda"), 2,
         r"^scd-data encode: --device cuda: no CUDA device is visible", absent=("out",), no_cuda=True),
    Case("encode-scaling-factor-misfit", "scd-data",
         lambda e: encode_args(e, "--normalization", "scaling_factor", vae=vae_with_scaling(e, 1000.0)), 2,
         r"^scd-data encode: --normalization scaling_factor gives latents far from unit scale: channel 0: normalized "
         r"std \S+ is outside \[0.125, 8\].*use --normalization channel_stats\); no manifest was written",
         absent=("out/manifest.json",)),
    Case("encode-strict-float-actions", "scd-data",
         lambda e: encode_args(e, "--strict", inputs=videos_with_actions(e, np.full(8, 1.5))), 2,
         r"^scd-data encode: --strict: 1 bad input\(s\), no manifest written; first: video-00.npy: actions dtype "
         r"float64 is not an integer type", absent=("out/manifest.json",)),
    Case("encode-strict-negative-action", "scd-data",
         lambda e: encode_args(e, "--strict", inputs=videos_with_actions(e, np.full(8, -1))), 2,
         r"^scd-data encode: --strict: .*video-00.npy: negative action id -1 \(ids count from 0\)",
         absent=("out/manifest.json",)),
    Case("encode-zero-retries", "scd-data", lambda e: encode_args(e, "--retries", "0"), 2,
         r"^scd-data encode: --retries 0 must be at least 1", absent=("out",)),
    Case("encode-negative-retry-delay", "scd-data", lambda e: encode_args(e, "--retry-delay", "-1"), 2,
         r"^scd-data encode: --retry-delay -1.0 must be a non-negative number of seconds", absent=("out",)),
    Case("encode-unsupported-url", "scd-data", lambda e: [*encode_args(e), "--out", "gs://bucket/latents"], 2,
         r"^scd-data encode: --out 'gs://bucket/latents': only local paths and s3:// URLs are supported"),
    Case("encode-staging-is-a-file", "scd-data",
         lambda e: encode_args(e, "--staging", str(e.write("staging", ""))), 2,
         r"^scd-data encode: --staging \S+staging exists and is not a directory", absent=("out",)),
    # -- scd-data train-vae / synth ---------------------------------------------------------------
    Case("vae-zero-steps", "scd-data", lambda e: ["train-vae", str(e.videos), "--out", str(e.tmp / "v"),
                                                  "--steps", "0"], 2,
         r"^scd-data train-vae: --steps 0 must be at least 1", absent=("v",)),
    Case("vae-compression-not-power-of-two", "scd-data",
         lambda e: ["train-vae", str(e.videos), "--out", str(e.tmp / "v"), "--compression", "3"], 2,
         r"^scd-data train-vae: --compression 3 must be a power of two", absent=("v",)),
    Case("vae-size-not-multiple", "scd-data",
         lambda e: ["train-vae", str(e.videos), "--out", str(e.tmp / "v"), "--size", "60"], 2,
         r"^scd-data train-vae: --size 60 must be a multiple of --compression 8", absent=("v",)),
    Case("vae-zero-lr", "scd-data", lambda e: ["train-vae", str(e.videos), "--out", str(e.tmp / "v"), "--lr", "0"], 2,
         r"^scd-data train-vae: --lr 0.0 must be a positive number", absent=("v",)),
    Case("vae-output-exists", "scd-data", lambda e: ["train-vae", str(e.videos), "--out", str(e.vae)], 2,
         r"^scd-data train-vae: \S+vae exists; pass --overwrite to replace it"),
    Case("vae-missing-videos", "scd-data", lambda e: ["train-vae", str(e.tmp / "none"), "--out", str(e.tmp / "v")],
         2, r"^scd-data train-vae: input directory \S+none does not exist", absent=("v",)),
    Case("synth-too-few-videos", "scd-data", lambda e: ["synth", "--out", str(e.tmp / "v"), "--num-videos", "0"], 2,
         r"^scd-data synth: --num-videos 0 must be at least 2", absent=("v",)),
    Case("synth-digits-larger-than-frame", "scd-data", lambda e: ["synth", "--out", str(e.tmp / "v"), "--size", "16"],
         2, r"^scd-data synth: --size 16 is smaller than the 32px digits of --digit-scale 4", absent=("v",)),
    Case("synth-other-options-in-out", "scd-data",
         lambda e: ["synth", "--out", str(e.write("synth.json", json.dumps({"seed": 1})).parent), "--quiet"], 2,
         r"^scd-data synth: \S+ holds videos made with other options \(seed, fps, synthetic differ\)",
         absent=("train", "holdout")),
    # -- scd-data record --------------------------------------------------------------------------
    Case("record-unknown-env", "scd-data", lambda e: ["record", "--env", "ALE/Breakot-v5", "--out", str(e.tmp / "r")],
         2, r"^scd-data record: unknown env 'ALE/Breakot-v5'; did you mean ALE/Breakout-v5", absent=("r",)),
    Case("record-unknown-policy", "scd-data",
         lambda e: ["record", "--env", "crafter", "--policy", "wiggle", "--out", str(e.tmp / "r")], 2,
         r"^scd-data record: policy 'wiggle' is not 'random', 'sticky', 'sticky:K' or 'module:function'",
         absent=("r",)),
    Case("record-zero-frames", "scd-data",
         lambda e: ["record", "--env", "crafter", "--frames", "0", "--out", str(e.tmp / "r")], 2,
         r"^scd-data record: --frames 0 must be >= 2", absent=("r",)),
    # -- scd-data verify --------------------------------------------------------------------------
    Case("verify-missing-dir", "scd-data", lambda e: ["verify", str(e.tmp / "none")], 2,
         r"^scd-data verify: \S+manifest.json does not exist: the shard directory='\S+none' must be a directory"),
    Case("verify-zero-retries", "scd-data", lambda e: ["verify", str(e.shards), "--retries", "0"], 2,
         r"^scd-data verify: --retries 0 must be at least 1"),
    Case("verify-unsupported-url", "scd-data", lambda e: ["verify", "gs://bucket/latents"], 2,
         r"^scd-data verify: the shard directory: 'gs://bucket/latents': only local paths and s3:// URLs"),
    Case("verify-manifest-not-json", "scd-data",
         lambda e: ["verify", str(e.ds(lambda r: (r / "manifest.json").write_text("{oops")))], 2,
         r"^scd-data verify: \S+manifest.json is not valid JSON"),
    Case("verify-sha256-mismatch", "scd-data",
         lambda e: ["verify", "--quiet", str(e.ds(lambda r: flip_byte_in_place(r / first_tar(r))))], 1,
         r"webdataset shard \S+shard-000000.tar: sha256 differs from the manifest", stdout=True),
    Case("verify-duplicated-sample", "scd-data",
         lambda e: ["verify", "--quiet", str(e.ds(lambda r: rewrite_tar(r, first_tar(r), append_copy_of_first)))], 1,
         r"corrupt data in shard \S+shard-000000.tar, member \S+: members of sample '\S+' are not contiguous: .*a "
         r"duplicated or scattered sample; webdataset would yield it twice", stdout=True),
    Case("verify-extra-sample", "scd-data",
         lambda e: ["verify", "--quiet", str(e.ds(lambda r: rewrite_tar(r, first_tar(r), append_extra_sample)))], 1,
         r"corrupt data in shard \S+shard-000000.tar, member \S+-extra.\*: the tar holds 8 samples but the manifest "
         r"says 7", stdout=True),
    Case("verify-scattered-members", "scd-data",
         lambda e: ["verify", "--quiet", str(e.ds(lambda r: rewrite_tar(r, first_tar(r), scatter_first_sample)))], 1,
         r"member \S+\.json: members of sample '\S+' are not contiguous: '\S+\.json' follows", stdout=True),
    Case("verify-absurd-latents", "scd-data",
         lambda e: ["verify", "--quiet", str(e.ds(lambda r: rewrite_tar(
             r, first_tar(r), lambda m: change_first_sample(m, latents=lambda a: a * 5000))))], 1,
         r"member \S+latents.npy: latent values reach \S+ standard deviations", stdout=True),
    Case("verify-float-actions", "scd-data",
         lambda e: ["verify", "--quiet", str(e.ds(lambda r: rewrite_tar(
             r, first_tar(r), lambda m: change_first_sample(m, actions=lambda a: a.astype(np.float32)))))], 1,
         r"actions dtype float32: action ids must be integers", stdout=True),
    Case("verify-mds-index-disagrees", "scd-data", lambda e: ["verify", "--quiet", str(e.ds(bump_mds_index))], 1,
         r"MDS index \S+shard-000000/index.json records 8 samples and \d+ bytes for mds/shard-000000/shard.00000.mds "
         r"but the manifest records 7 samples", stdout=True),
    Case("verify-statistics-edited", "scd-data",
         lambda e: ["verify", "--quiet", "--format", "webdataset", str(e.ds(lambda r: edit_manifest(
             r, lambda m: m["latent_stats"].update(std=[2 * s for s in m["latent_stats"]["std"]]))))], 1,
         r"webdataset: the stored latents have mean \S+ and std \S+ in channel 0, but the manifest's latent_stats "
         r"record", stdout=True),
    # -- evaluation, probes, conversion, demo, launcher -------------------------------------------
    Case("eval-no-models", "scd-eval", lambda e: ["--out", str(e.tmp / "ev")], 2,
         r"^scd-eval: give --scd and/or --baseline", absent=("ev",)),
    Case("eval-missing-run", "scd-eval", lambda e: ["--scd", str(e.tmp / "none"), "--out", str(e.tmp / "ev")], 2,
         r"^scd-eval: \S+none is neither a run directory nor an exported .safetensors file", absent=("ev",)),
    Case("eval-missing-lpips-weights", "scd-eval",
         lambda e: ["--scd", str(e.run), "--lpips-backbone", str(e.tmp / "alex.pth"), "--out", str(e.tmp / "ev")], 2,
         r"^scd-eval: LPIPS backbone weights \(alexnet state dict\) not found: \S+alex.pth", absent=("ev",)),
    Case("eval-lpips-weights-not-a-state-dict", "scd-eval",
         lambda e: ["--scd", str(e.run), "--lpips-backbone", str(e.write("alex.pth", "text")),
                    "--out", str(e.tmp / "ev")], 2,
         r"^scd-eval: \S+alex.pth is not a torchvision state dict", absent=("ev",)),
    Case("eval-emulator-without-a-world", "scd-eval",
         lambda e: ["--scd", str(e.run), "--emulator", "--out", str(e.tmp / "ev")], 2,
         r"^scd-eval: \S+run: data.path is not set; the emulator evaluation reads the training manifest",
         absent=("ev",)),
    Case("eval-emulator-with-clip-flags", "scd-eval",
         lambda e: ["--scd", str(e.run), "--emulator", "--clips", "4", "--out", str(e.tmp / "ev")], 2,
         r"^scd-eval: --clips do not apply with --emulator", absent=("ev",)),
    Case("probe-on-scd-model", "scd-probe", lambda e: [str(e.run), "--out", str(e.tmp / "p")], 2,
         r"^scd-probe: \S+run holds a model.arch='scd' model; the probes need the dense", absent=("p",)),
    Case("probe-zero-context", "scd-probe", lambda e: [str(e.run), "--context", "0"], 2,
         r"^scd-probe: --context=0 and --clips=2 must be >= 1"),
    Case("convert-scd-model", "scd-convert", lambda e: [str(e.run), "--out", str(e.tmp / "c")], 2,
         r"^scd-convert: \S+run holds a model.arch='scd' model; scd-convert reads a dense", absent=("c",)),
    Case("demo-bad-override", "scd-demo", lambda e: ["--source", "synthetic", "optim.lr=abc"], 2,
         r"^scd-demo: command-line override 'optim.lr=abc': optim.lr='abc': expected a number"),
    Case("slurm-zero-nodes", "launchers/slurm.py", lambda e: ["--nodes", "0", "--config", "configs/tiny.yaml"], 2,
         r"^launchers/slurm.py: --nodes=0 must be at least 1"),
    Case("slurm-bad-override", "launchers/slurm.py",
         lambda e: ["--config", "configs/tiny.yaml", "--dry-run", "optim.decoder_lr_ration=2"], 2,
         r"^launchers/slurm.py: command-line override 'optim.decoder_lr_ration=2': unknown config key"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_one_clear_line(case: Case, shared, tmp_path, capsys, monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)
    for name, value in case.environ:
        monkeypatch.setenv(name, value)
    if case.no_cuda:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    before = {name: fingerprint(shared[name]) for name in ("shards", "run", "vae", "videos")}
    env = Env(tmp_path, shared)
    argv = case.argv(env)
    capsys.readouterr()
    code = MAINS[case.prog](argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == case.code, err
    if case.stdout:
        assert re.search(case.first_line, out), out
    else:
        prefix = case.first_line.lstrip("^").split(":", 1)[0].replace("\\", "")
        lines = [line for line in err.splitlines() if line.startswith(prefix + ": ")]
        assert len(lines) == 1, err  # printed once
        assert re.search(case.first_line, lines[0]), lines[0]
    for pattern in case.absent:
        assert not list(tmp_path.glob(pattern)), f"{pattern} was written"
    if case.check is not None:
        case.check(env)
    assert {name: fingerprint(shared[name]) for name in before} == before  # nothing shared was touched


def test_every_command_is_covered():
    assert {case.prog for case in CASES} == set(MAINS)
    assert len({case.id for case in CASES}) == len(CASES)
