"""Recorded worlds end to end: record -> train-vae -> encode (the manifest's action vocabulary and
source block) -> train (num_actions checked) -> scd-eval --emulator (rollouts and branches scored
against the real game), on a few short Breakout and crafter episodes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.cli import main as data_cli
from data_prep.encode import EncodeOptions, encode
from data_prep.sources import SourceError
from data_prep.synth import write_synthetic
from scd_train.config import SyntheticDataConfig, load_config
from scd_train.data.manifest import load_manifest
from scd_train.eval.against_emulator import action_accuracy
from scd_train.eval.cli import main as eval_cli
from scd_train.eval.emulator import EmulatorProtocol, WorldSpec, collect_states
from scd_train.eval.emulator_run import run_emulator_eval
from scd_train.eval.evaluate import Candidate
from scd_train.models import build_model
from scd_train.train import main as train_cli
from scd_train.video import write_mp4
from scd_train.weights import load_model

REPO = Path(__file__).resolve().parents[1]
SIZE, CLIP = 32, 12
# configs/<world>.yaml shrunk for the suite: 32x32 frames -> 4x4x4 latents, 16 tokens, 2 + 1 layers
TINY = ["model.latent_height=4", "model.latent_width=4", "model.patch_size=1", "model.width=64",
        "model.num_heads=2", "model.encoder_layers=2", "model.decoder_layers=1", "model.layers=3",
        "diffusion.sample_steps=2", "diffusion.decoder_multi_batch=1", f"data.clip_frames={CLIP}",
        "data.batch_size=4", "data.num_workers=0", "optim.warmup_steps=2", "train.steps=12",
        "train.checkpoint_every=12", "log.every=4", "log.progress_bar=false", "log.wandb=disabled"]
EVAL = ["--emulator", "--starts", "2", "--context", "3", "--horizons", "1,4", "--branch-frames", "4", "--warmup", "6",
        "--videos", "1", "--device", "cpu", "--wandb", "disabled"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_world_data(root: Path, env: str, episodes: int, frames: int) -> Path:
    """record -> train-vae -> encode through the CLI, as a user would; returns the training shards."""
    assert data_cli(["record", "--env", env, "--episodes", str(episodes), "--holdout-episodes", "1", "--frames",
                     str(frames), "--size", str(SIZE), "--out", str(root / "rec"), "--workers", "2", "--quiet"]) == 0
    assert data_cli(["train-vae", str(root / "rec" / "train"), "--out", str(root / "vae"), "--size", str(SIZE),
                     "--steps", "4", "--batch-size", "4", "--base-channels", "8", "--quiet"]) == 0
    assert data_cli(["encode", str(root / "rec" / "train"), "--vae", str(root / "vae"), "--out", str(root / "shards"),
                     "--size", str(SIZE), "--clip-frames", str(CLIP), "--stride", "4", "--format", "webdataset",
                     "--workers", "1", "--quiet"]) == 0
    return root / "shards"


def train(config: str, shards: Path, run_dir: Path, *extra: str) -> Path:
    assert train_cli(["--config", str(REPO / "configs" / config), *TINY, f"data.path={shards}",
                      "data.holdout_path=null", f"train.run_dir={run_dir}", *extra]) == 0
    return run_dir


@pytest.fixture(scope="module")
def breakout(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("breakout")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    shards = make_world_data(root, "ALE/Breakout-v5", episodes=4, frames=40)
    runs = {"scd": train("breakout.yaml", shards, root / "scd"),
            "dense": train("breakout.yaml", shards, root / "dense", "model.arch=causal_dit")}
    torch.set_num_threads(previous)
    return {"root": root, "shards": shards, **runs}


def test_encode_carries_the_recording_into_the_manifest(breakout):
    manifest = load_manifest(breakout["shards"])
    assert manifest.action_names == ("NOOP", "FIRE", "RIGHT", "LEFT") and manifest.num_action_classes == 4
    source = manifest.source
    assert source["kind"] == "record" and source["env"] == "ALE/Breakout-v5" and source["size"] == SIZE
    assert source["resize"] == "stretch" and source["world"]["frameskip"] == 4
    assert source["world"]["sticky_actions"] == 0.0 and source["policy"] == {"kind": "sticky", "max_hold": 8}
    recording = source["recordings"][0]
    assert recording["split"] == "train" and recording["episode_seeds"] == [0, 2, 4, 6]
    world = WorldSpec.from_source(source, "manifest")
    assert (world.env, world.size, world.seed) == ("ALE/Breakout-v5", SIZE, 0)


def test_synth_records_its_action_names_in_the_manifest(breakout, tmp_path):
    cfg = SyntheticDataConfig(num_videos=4, frames_per_video=12, image_size=SIZE, digit_scale=2, holdout_fraction=0.25)
    write_synthetic(tmp_path / "digits", cfg, seed=0, progress=False)
    encode(EncodeOptions(tmp_path / "digits" / "train", tmp_path / "shards", breakout["root"] / "vae", formats=["mds"],
                         height=SIZE, width=SIZE, clip_frames=8, stride=4, workers=1, progress=False))
    manifest = load_manifest(tmp_path / "shards")
    assert manifest.action_names == ("right", "left", "down", "up") and manifest.source["kind"] == "synth"


def test_encode_refuses_mixed_worlds_recording_roots_unfinished_recordings_and_wrong_sizes(breakout, tmp_path):
    rec, vae = breakout["root"] / "rec", breakout["root"] / "vae"
    assert data_cli(["record", "--env", "crafter", "--episodes", "1", "--holdout-episodes", "0", "--frames", "14",
                     "--size", str(SIZE), "--out", str(tmp_path / "crafter"), "--quiet"]) == 0

    def opts(inputs, out=tmp_path / "out", **kw):
        base = dict(formats=["webdataset"], height=SIZE, width=SIZE, clip_frames=CLIP, stride=4, workers=1,
                    progress=False)
        return EncodeOptions(inputs, out, vae, **{**base, **kw})

    with pytest.raises(SourceError) as mixed:
        encode(opts([rec / "train", tmp_path / "crafter" / "train"]))
    assert str(rec / "train") in str(mixed.value) and "crafter" in str(mixed.value)
    assert "ALE/Breakout-v5" in str(mixed.value)
    with pytest.raises(SourceError, match="root of a recording"):
        encode(opts(rec))
    # two recordings of the same world (another seed) make one set with both listed
    assert data_cli(["record", "--env", "ALE/Breakout-v5", "--episodes", "1", "--holdout-episodes", "0", "--frames",
                     "14", "--size", str(SIZE), "--seed", "5", "--out", str(tmp_path / "second"), "--quiet"]) == 0
    both = encode(opts([rec / "train", tmp_path / "second" / "train"], clip_frames=8, out=tmp_path / "both"))
    source = load_manifest(tmp_path / "both").source
    assert [r["seed"] for r in source["recordings"]] == [0, 5] and both.videos == 5 and not both.bad
    with pytest.raises(SourceError, match="recorded at 32x32"):
        encode(opts(rec / "train", height=64, width=64))
    with pytest.raises(SourceError, match=r"--num-actions 5 .* records 4 actions \(NOOP, FIRE, RIGHT, LEFT\)"):
        encode(opts(rec / "train", num_actions=5))
    copy = tmp_path / "copy"
    shutil.copytree(rec, copy)
    info = json.loads((copy / "record.json").read_text())
    (copy / "record.json").write_text(json.dumps({**info, "complete": False}))
    with pytest.raises(SourceError, match="incomplete"):
        encode(opts(copy / "train"))
    (copy / "record.json").write_text(json.dumps(info))
    # replaced at the recording's own frame rate, so only its frame size is wrong
    write_mp4(np.zeros((40, 40, 40, 3), np.uint8), copy / "train" / "episode-000001.mp4", fps=info["settings"]["fps"],
              lossless=True)
    summary = encode(opts(copy / "train"))
    assert [b["input"] for b in summary.bad] == ["episode-000001.mp4"]
    assert "frames are 40x40 but its recording's record.json says 32x32" in summary.bad[0]["reason"]


def test_training_checks_num_actions_against_the_recorded_vocabulary(breakout, tmp_path, capsys):
    code = train_cli(["--config", str(REPO / "configs" / "breakout.yaml"), *TINY, f"data.path={breakout['shards']}",
                      "model.num_actions=17", f"train.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "model.num_actions=17" in err and "4 action classes (NOOP, FIRE, RIGHT, LEFT)" in err


def test_action_accuracy_counts_the_right_branch_and_ignoring_actions_scores_half():
    real = torch.rand(3, 2, 4, 3, 8, 8)
    assert action_accuracy(real.clone(), real).accuracy == 1.0
    assert action_accuracy(real.flip(1), real).accuracy == 0.0  # every state's branches swapped
    blind = real[:, :1].expand_as(real).clone() * 0.5  # the same rollout whatever the actions
    result = action_accuracy(blind, real)
    assert result.accuracy == 0.5 and result.pairs == 6
    same = real.clone()
    same[1, 1] = same[1, 0]  # a state where the actions made no difference in the game
    result = action_accuracy(same, same)
    assert result.pairs == 4 and result.identical_pairs == 2 and result.per_state[1] is None


@pytest.mark.slow
def test_breakout_scd_and_dense_scored_against_the_emulator(breakout, tmp_path, capsys):
    out = tmp_path / "eval"
    runs = ["--scd", str(breakout["scd"]), "--baseline", str(breakout["dense"])]
    assert eval_cli([*runs, *EVAL, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "action accuracy" in table and "copy last frame" in table
    data = json.loads((out / "emulator_eval.json").read_text())
    assert data["world"]["env"] == "ALE/Breakout-v5" and len(data["states"]) == 2
    assert all(s["episode_seed"] % 2 == 1 for s in data["states"])  # held-out (odd) seeds only
    models = data["models"]
    assert set(models) == {"scd", "baseline", "copy_last", "vae_ceiling"}
    assert models["scd"]["arch"] == "scd" and models["baseline"]["arch"] == "causal_dit"
    for scores in models.values():
        assert set(scores["horizons"]) == {"1", "4"} and len(scores["curve"]["psnr"]) == 4
        assert all(np.isfinite(v["psnr"]) and -1 <= v["ssim"] <= 1 for v in scores["horizons"].values())
        if scores["action_pairs"]:
            assert 0.0 <= scores["action_accuracy"] <= 1.0
    if models["copy_last"]["action_pairs"]:
        assert models["copy_last"]["action_accuracy"] == 0.5  # one frame for every branch: half right by design
    assert models["scd"]["horizons"]["1"]["psnr"] != models["baseline"]["horizons"]["1"]["psnr"]
    videos = [Path(v) for v in data["videos"]]
    assert [v.name for v in videos] == ["state_000.mp4", "state_000.gif"] and all(v.stat().st_size for v in videos)

    # a model that cannot see actions gives every branch the same rollout: exactly 50%
    model, cfg = load_model(breakout["scd"])
    blind_cfg = load_config(breakout["scd"] / "config.yaml", ["model.num_actions=0"])
    torch.manual_seed(0)
    blind = Candidate("scd", build_model(blind_cfg.model).eval(), blind_cfg, "blind")
    protocol = EmulatorProtocol(starts=2, context=3, horizons=[1], branch_frames=4, warmup=6, steps=2, videos=0)
    result = run_emulator_eval([blind], protocol, tmp_path / "blind", log=lambda m: None)
    assert result["models"]["scd"]["action_accuracy"] == 0.5
    # the states are the emulator's own frames, through the recording's resize rule
    states, _ = collect_states(WorldSpec.from_source(load_manifest(breakout["shards"]).source, "m"), protocol)
    assert states[0].context_frames.shape == (3, SIZE, SIZE, 3) and states[0].branch_frames.shape[:2] == (2, 4)
    assert [s.episode_seed for s in states] == [s["episode_seed"] for s in result["states"]]


def test_emulator_eval_errors_name_the_problem(breakout, tmp_path, capsys):
    digits = tmp_path / "digits"
    assert eval_cli(["--scd", str(breakout["scd"]), *EVAL, "--unroll", "8"]) == 2
    assert "--unroll do not apply with --emulator" in capsys.readouterr().err
    assert eval_cli(["--scd", str(breakout["scd"]), *EVAL, "--horizons", "1,x"]) == 2
    assert "--horizons '1,x'" in capsys.readouterr().err
    model, cfg = load_model(breakout["scd"])
    wide = load_config(breakout["scd"] / "config.yaml", ["model.latent_height=8", "model.latent_width=8"])
    with pytest.raises(Exception, match=r"encode to latents \(4, 4, 4\) but the model expects"):
        run_emulator_eval([Candidate("scd", build_model(wide.model), wide, "wide")], EmulatorProtocol(starts=1),
                          digits, log=lambda m: None)


@pytest.mark.slow
def test_crafter_end_to_end(tmp_path, capsys):
    shards = make_world_data(tmp_path, "crafter", episodes=2, frames=30)
    assert load_manifest(shards).action_names[:3] == ("noop", "move_left", "move_right")
    run = train("crafter.yaml", shards, tmp_path / "scd", "train.steps=6", "train.checkpoint_every=6")
    assert eval_cli(["--scd", str(run), *EVAL, "--branches", "3", "--out", str(tmp_path / "eval")]) == 0
    data = json.loads((tmp_path / "eval" / "emulator_eval.json").read_text())
    assert data["world"]["env"] == "crafter" and set(data["models"]) == {"scd", "copy_last", "vae_ceiling"}
    assert data["models"]["scd"]["action_pairs"] + data["models"]["scd"]["identical_real_pairs"] == 2 * 6
    assert "crafter vs the emulator" in capsys.readouterr().out


def test_vae_foreground_weighting_finds_what_moves_over_a_static_background():
    from data_prep.train_vae import foreground_mask, median_frame

    frames = torch.zeros(9, 3, 16, 16, dtype=torch.uint8)
    frames[:, 0, :2] = 200  # a static red band (like Breakout's bricks)
    for i in range(9):
        frames[i, :, 12:14, i:i + 3] = 255  # a small paddle sliding along the bottom
    background = median_frame(frames)
    assert torch.allclose(background[0, :2], torch.full((2, 16), 200 / 127.5 - 1)) and background[:, 12:].max() == -1
    mask = foreground_mask(frames.float() / 127.5 - 1, background)
    assert mask.shape == (9, 1, 16, 16)
    assert mask[:, 0, 12:14].sum(dim=(1, 2)).tolist() == [6.0] * 9 and mask[:, 0, :12].sum() == 0
