"""What a resume may and may not do, in one process: changed settings, damaged checkpoints, the
``latest`` pointer, used run directories, repeated metrics, bad batch sizes and an unreachable wandb."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from scd_train import weights
from scd_train.checkpoint import COMPLETE, DamagedCheckpointError
from scd_train.config import ConfigError, load_config
from scd_train.metrics.loggers import WandbRun
from scd_train.resume_policy import ResumeRefused
from scd_train.run_dir import RunDirectoryError
from scd_train.trainer import Trainer

SMALL = ["model.width=64", "model.num_heads=2", "model.head_dim=32", "model.rope_axes=[8,12,12]",
         "model.encoder_layers=1", "model.decoder_layers=1", "model.layers=2",
         "data.synthetic.num_videos=24", "data.synthetic.frames_per_video=8", "data.clip_frames=4",
         "data.clip_stride=2", "data.batch_size=4", "log.every=1", "log.progress_bar=false",
         "log.wandb=disabled", "optim.warmup_steps=3", "optim.ema_decay=0.5"]


def small_cfg(run_dir, *overrides):
    return load_config("configs/tiny.yaml", [*SMALL, f"train.run_dir={run_dir}", *overrides])


def metric_records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def warnings_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run of 4 steps with complete checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    Trainer(small_cfg(run_dir, "train.steps=4", "train.checkpoint_every=2")).run()
    return run_dir


def copy_run(source, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(source, target)
    (target / "run.lock").unlink(missing_ok=True)
    return target


# -- 1. optimizer settings ---------------------------------------------------------------------------
def test_changed_learning_rates_are_applied_from_the_resumed_step_and_logged(two_checkpoints, tmp_path, caplog):
    run_dir = copy_run(two_checkpoints, tmp_path)
    caplog.set_level(logging.WARNING)
    trainer = Trainer(small_cfg(run_dir, "train.steps=6", "optim.lr=2e-3", "optim.decoder_lr_ratio=3.0"))
    assert trainer.resumed_from.name == "step_00000004"
    groups = {g["name"]: g for g in trainer.backend.optimizer.param_groups}
    assert groups["encoder"]["base_lr"] == pytest.approx(2e-3) and groups["decoder"]["base_lr"] == pytest.approx(6e-3)
    log_text = warnings_text(caplog)
    assert "optim.lr: 0.001 (checkpoint) -> 0.002 (now)" in log_text
    assert "base learning rate 2.000e-03 from the checkpoint -> 6.000e-03 from the config" in log_text
    trainer.run()
    logged = {r["step"]: r for r in metric_records(run_dir)}
    for step in (5, 6):  # warmup (3 steps) is over: the full configured rates
        assert logged[step]["lr/encoder"] == pytest.approx(2e-3) and logged[step]["lr/decoder"] == pytest.approx(6e-3)
    assert logged[4]["lr/decoder"] == pytest.approx(2e-3)  # what the first run trained with
    assert "lr: 0.002" in (run_dir / "config.yaml").read_text()
    resume = json.loads((run_dir / "resumes.jsonl").read_text().splitlines()[-1])
    assert resume["changed"]["optim.lr"] == {"checkpoint": 0.001, "now": 0.002}


# -- 2. architecture and batch arithmetic ----------------------------------------------------------
@pytest.fixture(scope="module")
def deeper_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("deeper") / "run"
    Trainer(small_cfg(run_dir, "model.encoder_layers=2", "train.steps=2", "train.checkpoint_every=2")).run()
    return run_dir


@pytest.mark.parametrize("change, expected", [
    (["model.encoder_layers=1"], ["model.encoder_layers: 2 (checkpoint) -> 1 (now)",
                                  "in the checkpoint, not in the model now: encoder.blocks.1.* ("]),
    (["model.encoder_layers=2", "model.mlp_ratio=2.0"],
     ["model.mlp_ratio: 4.0 (checkpoint) -> 2.0 (now)",
      "encoder.blocks.0.mlp.0.weight: shape (256, 64) in the checkpoint, (128, 64) now"]),
    (["model.encoder_layers=2", "data.batch_size=2"], ["data.batch_size: 4 (checkpoint) -> 2 (now)"]),
])
def test_an_architecture_or_data_position_change_is_refused_before_anything_is_written(deeper_run, tmp_path, change,
                                                                                        expected):
    run_dir = copy_run(deeper_run, tmp_path)
    config_before = (run_dir / "config.yaml").read_bytes()
    metrics_before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(ResumeRefused) as refused:
        Trainer(small_cfg(run_dir, "train.steps=4", *change))
    message = str(refused.value)
    for text in expected:
        assert text in message
    assert "train.init_from" in message and "scd-export" in message
    assert (run_dir / "config.yaml").read_bytes() == config_before
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before
    assert not (run_dir / "resumes.jsonl").exists()


def test_a_grad_accum_change_is_accepted_with_a_logged_note(deeper_run, tmp_path, caplog):
    run_dir = copy_run(deeper_run, tmp_path)
    caplog.set_level(logging.WARNING)
    trainer = Trainer(small_cfg(run_dir, "model.encoder_layers=2", "train.steps=3", "train.grad_accum=2"))
    assert trainer.state.step == 2
    assert "train.grad_accum: 1 (checkpoint) -> 2 (now): each update now averages 2 micro-batches" in \
        warnings_text(caplog)
    trainer.run()
    resume = json.loads((run_dir / "resumes.jsonl").read_text())
    assert resume["changed"] == {"train.grad_accum": {"checkpoint": 1, "now": 2}}


# -- 3. damaged checkpoints -------------------------------------------------------------------------
def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated DCP shard": (lambda c: truncate(c / "state" / "__0_0.distcp"), "state/__0_0.distcp has"),
    "truncated rank file": (lambda c: truncate(c / "rank_00000.pt"), "rank_00000.pt has"),
    "truncated trainer state": (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json has"),
    "missing state folder": (lambda c: shutil.rmtree(c / "state"), "state/.metadata is missing"),
    "flipped bytes": (lambda c: flip_a_byte(c / "state" / "__0_0.distcp"), "state/__0_0.distcp has the right size "
                                                                            "but different contents"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_intact_one(two_checkpoints, tmp_path, caplog, damage):
    run_dir = copy_run(two_checkpoints, tmp_path)
    spoil, named = DAMAGE[damage]
    spoil(run_dir / "checkpoints" / "step_00000004")
    caplog.set_level(logging.WARNING)
    trainer = Trainer(small_cfg(run_dir, "train.steps=5"))
    assert trainer.resumed_from.name == "step_00000002" and trainer.state.step == 2
    assert named in warnings_text(caplog)
    assert (run_dir / "checkpoints" / "step_00000004.damaged").is_dir()  # set aside, files kept
    resume = json.loads((run_dir / "resumes.jsonl").read_text())
    assert any(named in p for problems in resume["skipped_damaged"].values() for p in problems)
    assert trainer.run().step == 5
    assert [r["step"] for r in metric_records(run_dir)] == [1, 2, 3, 4, 5]


def test_a_checkpoint_without_manifest_that_fails_to_load_falls_back_too(two_checkpoints, tmp_path, caplog):
    run_dir = copy_run(two_checkpoints, tmp_path)
    newest = run_dir / "checkpoints" / "step_00000004"
    marker = json.loads((newest / COMPLETE).read_text())
    del marker["files"]  # as an older version wrote it: nothing to verify against
    (newest / COMPLETE).write_text(json.dumps(marker))
    truncate(newest / "state" / "__0_0.distcp")
    caplog.set_level(logging.WARNING)
    trainer = Trainer(small_cfg(run_dir, "train.steps=5"))
    assert trainer.resumed_from.name == "step_00000002"
    assert "step_00000004 could not be loaded" in warnings_text(caplog)


def test_every_checkpoint_damaged_is_a_clear_error(two_checkpoints, tmp_path):
    run_dir = copy_run(two_checkpoints, tmp_path)
    for name in ("step_00000002", "step_00000004"):
        truncate(run_dir / "checkpoints" / name / "rank_00000.pt")
    with pytest.raises(DamagedCheckpointError, match=r"every complete checkpoint .* is damaged.*step_00000002"):
        Trainer(small_cfg(run_dir, "train.steps=5"))


def test_export_and_sample_take_the_newest_intact_checkpoint(two_checkpoints, tmp_path, caplog):
    run_dir = copy_run(two_checkpoints, tmp_path)
    flip_a_byte(run_dir / "checkpoints" / "step_00000004" / "state" / "__0_0.distcp")
    caplog.set_level(logging.WARNING)
    out = weights.export(run_dir, tmp_path / "ema.safetensors")
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["source"].endswith("step_00000002")
    assert "step_00000004 is damaged" in warnings_text(caplog)
    assert (run_dir / "checkpoints" / "step_00000004").is_dir()  # read-only tools set nothing aside
    model, _ = weights.load_model(run_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    explicit = str(run_dir / "checkpoints" / "step_00000004")
    assert weights.main([str(run_dir), "--checkpoint", explicit, "--out", str(tmp_path / "x.safetensors")]) == 2


# -- 4. the latest pointer --------------------------------------------------------------------------
def test_resume_takes_the_newest_complete_checkpoint_whatever_latest_says(two_checkpoints, tmp_path, caplog):
    run_dir = copy_run(two_checkpoints, tmp_path)
    # a kill between the rename of step_00000004 and the pointer update leaves latest one behind
    (run_dir / "checkpoints" / "latest").write_text("step_00000002")
    caplog.set_level(logging.WARNING)
    trainer = Trainer(small_cfg(run_dir, "train.steps=5"))
    assert trainer.resumed_from.name == "step_00000004"
    assert "incomplete" not in warnings_text(caplog)


# -- 5. fresh starts in used directories ------------------------------------------------------------
def test_a_fresh_start_in_a_used_directory_is_refused_naming_what_is_there(two_checkpoints, tmp_path):
    run_dir = copy_run(two_checkpoints, tmp_path)
    with pytest.raises(RunDirectoryError) as refused:
        Trainer(small_cfg(run_dir, "train.resume=false", "train.steps=2"))
    message = str(refused.value)
    assert "2 checkpoint(s) up to step 4" in message and "metrics.jsonl with 4 record(s) of steps 1..4" in message
    assert "train.on_used_run_dir=archive" in message and "train.on_used_run_dir=overwrite" in message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000004"]


@pytest.mark.parametrize("policy", ["archive", "overwrite"])
def test_archive_or_overwrite_starts_a_clean_run(two_checkpoints, tmp_path, policy):
    run_dir = copy_run(two_checkpoints, tmp_path)
    Trainer(small_cfg(run_dir, "train.resume=false", f"train.on_used_run_dir={policy}", "train.steps=2",
                      "train.checkpoint_every=1")).run()
    assert [r["step"] for r in metric_records(run_dir)] == [1, 2]
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert (checkpoints / (checkpoints / "latest").read_text().strip()).is_dir()
    archives = list((run_dir / "archive").iterdir()) if (run_dir / "archive").exists() else []
    if policy == "archive":
        (old,) = archives
        assert sorted(p.name for p in (old / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
        assert [r["step"] for r in metric_records(old)] == [1, 2, 3, 4]
    else:
        assert archives == []
    # the default run afterwards resumes the new run, not the old one
    resumed = Trainer(small_cfg(run_dir, "train.steps=3"))
    assert resumed.state.step == 2


def test_a_second_run_waits_for_the_directory_then_names_its_holder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from scd_train.run_dir import acquire_lock; "
        f"acquire_lock(Path({str(run_dir)!r}), 0); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match=rf"in use by pid {holder.pid} on host .*waited 1 s"):
            Trainer(small_cfg(run_dir, "train.steps=1", "train.run_dir_lock_wait_s=1"))
    finally:
        holder.kill()
        holder.wait()
    assert not (run_dir / "config.yaml").exists()
    Trainer(small_cfg(run_dir, "train.steps=1", "train.run_dir_lock_wait_s=1"))  # free once the holder is gone


# -- 6. metrics of repeated steps -------------------------------------------------------------------
def test_records_logged_after_the_resumed_checkpoint_are_moved_aside(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    killed = Trainer(small_cfg(run_dir, "train.steps=6", "train.checkpoint_every=4"))
    original_save = Trainer.save

    def die_after_step_4(self):
        if self.state.step > 4:
            raise KeyboardInterrupt("killed")  # stands in for SIGKILL: no save, no clean-up
        return original_save(self)

    monkeypatch.setattr(Trainer, "save", die_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    monkeypatch.setattr(Trainer, "save", original_save)
    killed._lock.release()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a record cut off by the kill
    resumed = Trainer(small_cfg(run_dir, "train.steps=8", "train.checkpoint_every=4"))
    assert resumed.state.step == 4 and resumed.discarded_records == 2
    resumed.run()
    assert [r["step"] for r in metric_records(run_dir)] == list(range(1, 9))
    discarded = [json.loads(line) for line in (run_dir / "metrics.discarded.jsonl").read_text().splitlines()]
    assert [(r["step"], r["discarded_on_resume_from_step"]) for r in discarded] == [(5, 4), (6, 4)]


# -- 7. batch sizes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [-4, 0])
def test_a_batch_size_below_one_is_refused_at_load(value):
    with pytest.raises(ConfigError, match=rf"data.batch_size={value} must be >= 1"):
        load_config("configs/tiny.yaml", [f"data.batch_size={value}"])


# -- 9. wandb without network -----------------------------------------------------------------------
def test_online_wandb_without_a_reachable_server_logs_offline_at_once(tmp_path, monkeypatch, caplog):
    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    url = f"http://127.0.0.1:{closed}"
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "c"), ("WANDB_DATA_DIR", "d"), ("WANDB_CONFIG_DIR", "e")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    run = WandbRun("online", tmp_path, "scd-test", "probe", {"x": 1}, None)
    try:
        assert run.run is not None and run.mode == "offline"
        assert f"the server {url} is unreachable" in warnings_text(caplog)
        run.log({"loss": 1.0}, step=1)
    finally:
        run.finish()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run.run_id}"))
    # Not a timing assertion: a record of how long the fallback took, for the log.
    print(f"online -> offline fallback took {time.monotonic() - start:.1f} s")

