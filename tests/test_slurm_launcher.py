"""The SLURM launcher without a cluster: node lists, rank derivation, dry runs, sweeps, and the
stop -> checkpoint -> requeue -> resume hand-over to submitit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import DelayedSubmission, JobPaths
from submitit.local.local import LocalJobEnvironment

from launchers import slurm as launcher
from scd_train.cluster import dist_env
from scd_train.cluster.hostlist import expand_hostlist, expand_tasks_per_node
from scd_train.cluster.job import TrainingJob
from scd_train.cluster.submission import LaunchError, load_sweep, parse_time_minutes, sweep_member_name
from scd_train.config import load_config

MICRO = {"model.latent_channels": 48, "model.latent_height": 4, "model.latent_width": 4, "model.patch_size": 2,
         "model.width": 32, "model.num_heads": 2, "model.head_dim": 16, "model.rope_axes": "[4,6,6]",
         "model.encoder_layers": 1, "model.decoder_layers": 1, "model.max_frames": 16,
         "diffusion.decoder_multi_batch": 1, "optim.warmup_steps": 5, "data.clip_frames": 4, "data.clip_stride": 2,
         "data.batch_size": 2, "data.synthetic.num_videos": 16, "data.synthetic.frames_per_video": 8,
         "data.synthetic.image_size": 16, "data.synthetic.digit_scale": 1, "data.synthetic.speed": 1,
         "train.precision": "fp32", "train.device": "cpu", "train.checkpoint_every": 1000, "log.every": 1,
         "log.wandb": "disabled", "log.progress_bar": "false"}
MICRO_OVERRIDES = [f"{k}={v}" for k, v in MICRO.items()]


# -- node lists and ranks --------------------------------------------------------------------------
@pytest.mark.parametrize("text, hosts", [
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("node7", ["node7"]),
    ("a[1-2],b3,c[009-011]", ["a1", "a2", "b3", "c009", "c010", "c011"]),
    ("rack[1-2]-gpu[1,3]", ["rack1-gpu1", "rack1-gpu3", "rack2-gpu1", "rack2-gpu3"]),
    ("gpu-[8-10].ib", ["gpu-8.ib", "gpu-9.ib", "gpu-10.ib"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text, message", [("gpu[01-03", "unbalanced"), ("gpu[3-1]", "backwards"),
                                           ("gpu[a-b]", "cannot read range"), ("", "empty"), ("a,,b", "empty")])
def test_expand_hostlist_rejects_malformed_lists(text, message):
    with pytest.raises(ValueError, match=message):
        expand_hostlist(text)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match="cannot read"):
        expand_tasks_per_node("2x3")


def slurm_task_env(rank: int, nodes: str = "gpu[01-03,07]", per_node: int = 4, job_id: str = "778899") -> dict:
    world = per_node * len(expand_hostlist(nodes))
    return {"SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": nodes, "SLURM_STEP_NODELIST": nodes,
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node),
            "SLURM_NTASKS": str(world), "SLURM_STEP_NUM_TASKS": str(world),
            "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{len(expand_hostlist(nodes))})", "SLURM_STEP_ID": "0",
            "SUBMITIT_EXECUTOR": "slurm"}


def test_multi_node_ranks_agree_on_one_rendezvous():
    envs = [dist_env.derive(slurm_task_env(rank)) for rank in range(16)]
    assert {(e.master_addr, e.master_port) for e in envs} == {("gpu01", dist_env.port_for_job("778899"))}
    assert [e.rank for e in envs] == list(range(16))
    assert {e.world_size for e in envs} == {16} and {e.local_world_size for e in envs} == {4}
    e = envs[13]
    assert (e.node_rank, e.local_rank, e.num_nodes) == (3, 1, 4)
    assert e.variables() == {"MASTER_ADDR": "gpu01", "MASTER_PORT": str(dist_env.port_for_job("778899")),
                             "RANK": "13", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "4",
                             "NODE_RANK": "3"}


def test_uneven_tasks_per_node():
    env = slurm_task_env(4, nodes="n[1-2]") | {"SLURM_STEP_TASKS_PER_NODE": "3,2", "SLURM_STEP_NUM_TASKS": "5",
                                                "SLURM_NODEID": "1", "SLURM_LOCALID": "1"}
    derived = dist_env.from_slurm(env)
    assert (derived.world_size, derived.local_world_size, derived.master_addr) == (5, 2, "n1")


def test_ports_differ_between_jobs_and_stay_below_the_ephemeral_range():
    ports = {dist_env.port_for_job(job) for job in range(1000, 1100)}
    assert len(ports) == 100
    assert all(20000 <= p < 32768 for p in ports)


@pytest.mark.parametrize("change, message", [
    ({"SLURM_PROCID": "16"}, "do not fit"),
    ({"SLURM_STEP_TASKS_PER_NODE": "4(x3)"}, "tasks for 3"),
    ({"SLURM_STEP_NUM_TASKS": "12"}, "add up to 16"),
    ({"SLURM_LOCALID": "x"}, "SLURM_LOCALID='x' is not an integer"),
])
def test_inconsistent_slurm_variables_are_named(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dist_env.from_slurm(slurm_task_env(3) | change)


def test_missing_slurm_variables_say_what_is_missing():
    env = slurm_task_env(0)
    del env["SLURM_PROCID"]
    with pytest.raises(KeyError, match="SLURM_PROCID"):
        dist_env.from_slurm(env)


def test_export_replaces_inherited_values():
    target = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "29500"}
    dist_env.derive(slurm_task_env(6)).export(target)
    assert (target["RANK"], target["WORLD_SIZE"], target["LOCAL_RANK"]) == ("6", "16", "2")


def test_local_and_plain_processes():
    local = dist_env.derive({"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242",
                             "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
                             "SUBMITIT_LOCAL_LOCALID": "1"})
    assert (local.rank, local.world_size, local.master_addr) == (1, 2, "127.0.0.1")
    assert dist_env.derive({}).world_size == 1


# -- arguments ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-12", 2160),
                                           ("1-12:30", 2190), ("0-00:00:30", 1)])
def test_parse_time(text, minutes):
    assert parse_time_minutes(text) == minutes


def test_parse_time_rejects_garbage():
    with pytest.raises(LaunchError, match="--time"):
        parse_time_minutes("two hours")


def test_sweep_file_forms(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("- {optim.lr: 1.0e-4, data.path: /data/x}\n- [optim.lr=2e-4]\n")
    sets = load_sweep(path)
    assert sets == [['optim.lr=0.0001', 'data.path="/data/x"'], ["optim.lr=2e-4"]]
    assert sweep_member_name(3, sets[0]) == "003_lr-0.0001_path-_data_x"
    path.write_text("optim.lr: 1\n")
    with pytest.raises(LaunchError, match="non-empty YAML list"):
        load_sweep(path)


# -- dry runs -------------------------------------------------------------------------------------
def dry_run(capsys, *argv: str) -> str:
    assert launcher.main([*argv, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_dry_run_prints_sbatch_ranks_and_run_dir(capsys, repo_root, tmp_path):
    run_dir = tmp_path / "run"
    out = dry_run(capsys, "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--account", "proj",
                  "--qos", "high", "--time", "1-12:00", "--mem", "500G", "--constraint", "a100",
                  "--cpus-per-task", "8", "--job-name", "scd-m", "--backend", "deepspeed",
                  "--config", str(repo_root / "configs" / "tiny.yaml"), "--run-dir", str(run_dir), "train.steps=7")
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--account=proj",
                 "--qos=high", "--time=2160", "--mem=500G", "--constraint=a100", "--cpus-per-task=8",
                 "--job-name=scd-m", "--signal=USR2@180", "--open-mode=append"):
        assert f"#SBATCH {flag}\n" in out, flag
    assert "world size 8 = 2 node(s) x 4 task(s)" in out and "backend deepspeed" in out
    assert "global batch 128" in out  # 16 clips per rank x 8 ranks
    assert f"run directory {run_dir}" in out
    assert "train.steps=7 train.backend=deepspeed" in out
    assert f"--output {run_dir}/slurm/%j_%t_log.out" in out  # one log per rank
    ranks = re.findall(r"^  RANK=(\d+) LOCAL_RANK=(\d+) NODE_RANK=(\d+) WORLD_SIZE=8 LOCAL_WORLD_SIZE=4 "
                       r"MASTER_ADDR=node01 MASTER_PORT=(\d+)$", out, flags=re.MULTILINE)
    assert [tuple(map(int, r[:3])) for r in ranks] == [(r, r % 4, r // 4) for r in range(8)]
    assert len({r[3] for r in ranks}) == 1
    assert not run_dir.exists()  # nothing written, nothing submitted


def test_dry_run_of_a_sweep_is_one_job_array(capsys, repo_root, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("- {optim.lr: 1.0e-4}\n- {optim.lr: 2.0e-4}\n- {optim.lr: 4.0e-4}\n")
    out = dry_run(capsys, "--gpus-per-node", "2", "--backend", "ddp", "--sweep", str(sweep),
                  "--array-parallelism", "2", "--config", str(repo_root / "configs" / "tiny.yaml"),
                  "--run-dir", str(tmp_path / "lr"))
    assert "#SBATCH --array=0-2%2\n" in out
    assert f"--output={tmp_path}/lr/slurm/%A_%a_0_log.out" in out
    for i, lr in enumerate(("0.0001", "0.0002", "0.0004")):
        assert f"[{i}] run directory {tmp_path}/lr/{i:03d}_lr-{lr}\n" in out
        assert f"overrides: train.backend=ddp optim.lr={lr}\n" in out


@pytest.mark.parametrize("argv, message", [
    (["--gpus-per-node", "4", "--tasks-per-node", "2"], "one task per GPU"),
    (["--gpus-per-node", "2"], "pass --backend ddp, fsdp2 or deepspeed"),
    (["--gpus-per-node", "1", "optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
    (["--gpus-per-node", "1", "--time", "soon"], "--time='soon'"),
    (["--gpus-per-node", "1", "--time", "2", "--signal-delay", "300"], "shorter than the time limit"),
    (["--gpus-per-node", "1", "--mem", "lots"], "--mem='lots'"),
    (["--nodes", "2", "--gpus-per-node", "1", "--cluster", "local"], "runs on this machine only"),
])
def test_bad_requests_fail_before_submission(capsys, argv, message):
    assert launcher.main(argv) == 2
    assert message in capsys.readouterr().err


def test_preemption_signal_the_trainer_ignores_is_refused(capsys, monkeypatch):
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "HUP")
    assert launcher.main(["--gpus-per-node", "1", "--dry-run"]) == 2
    assert "SUBMITIT_PREEMPT_SIGNAL=HUP" in capsys.readouterr().err


def test_script_runs_as_a_file(repo_root, subprocess_env, python_exe):
    proc = subprocess.run([python_exe, str(repo_root / "launchers" / "slurm.py"), "--nodes", "3",
                           "--gpus-per-node", "8", "--backend", "fsdp2", "--dry-run"],
                          env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "world size 24 = 3 node(s) x 8 task(s)" in proc.stdout and "MASTER_ADDR=node01" in proc.stdout


# -- stop, requeue, resume through submitit's own signal handler ------------------------------------------
class RecordingEnvironment(LocalJobEnvironment):
    """submitit's local job environment, recording requeues instead of exiting with the requeue code."""

    requeues: list[int] = []

    def _requeue(self, countdown: int) -> None:
        RecordingEnvironment.requeues.append(countdown)


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _signal_after_steps(run_dir: Path, steps: int, sig: int) -> threading.Thread:
    def wait_and_signal():
        deadline = time.monotonic() + 60
        while len(metric_steps(run_dir)) < steps and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=wait_and_signal, daemon=True)
    thread.start()
    return thread


def test_preemption_signal_saves_requeues_via_submitit_and_resumes(tmp_path, monkeypatch):
    run_dir, folder, total = tmp_path / "run", tmp_path / "submitit", 150
    for var, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "1",
                       "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0", "SUBMITIT_FOLDER": str(folder),
                       "OMP_NUM_THREADS": "1", **dist_env.single_process().variables()}.items():
        monkeypatch.setenv(var, value)  # restored afterwards, including what the job exports
    # a fresh start (train.resume=false): its requeue must resume, not refuse or archive its own run
    cfg = load_config(None, MICRO_OVERRIDES + [f"train.steps={total}", f"train.run_dir={run_dir}",
                                               "train.resume=false"])
    paths = JobPaths(folder, job_id="4242", task_id=0)
    paths.folder.mkdir(parents=True)
    delayed = DelayedSubmission(TrainingJob(cfg))
    delayed.set_timeout(timeout_min=600, max_num_timeout=3)
    handler = SignalHandler(RecordingEnvironment(), paths, delayed)
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy 2-core machine make every step 10x slower
    RecordingEnvironment.requeues.clear()
    try:
        signal.signal(signal.SIGTERM, handler.bypass)  # what submitit installs in a job
        signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
        _signal_after_steps(run_dir, 10, signal.SIGUSR2)
        with pytest.raises(SystemExit):  # submitit exits after requeueing
            delayed.result()
        assert RecordingEnvironment.requeues == [3]  # a preemption, not a timeout: no countdown used
        stopped_at = len(metric_steps(run_dir))
        assert 10 <= stopped_at < total
        resubmission = DelayedSubmission.load(paths.submitted_pickle)
        assert resubmission.function.cfg.train.resume is True
        summary = resubmission.result()
        assert summary["status"] == "finished" and summary["step"] == total
        assert metric_steps(run_dir) == list(range(1, total + 1))  # no gap, no repeat
        assert f"at step {stopped_at}" in (run_dir / "train.log").read_text()
        # A finished job is never requeued: the signal is ignored and checkpoint() declines.
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.1)
        assert resubmission.function.checkpoint() is None
        assert RecordingEnvironment.requeues == [3]
    finally:
        torch.set_num_threads(threads)
        for sig, old in previous.items():
            signal.signal(sig, old)
