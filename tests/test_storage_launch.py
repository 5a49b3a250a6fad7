"""Bucket-backed runs on a cluster: the launcher carries the object-storage settings of the
submitting shell to every task (secrets only through SLURM's environment, never in job files)."""

from __future__ import annotations

import os
import pickle

import pytest

from launchers import slurm as launcher
from scd_train.cluster import storage_env
from scd_train.cluster.job import TrainingJob
from scd_train.config import load_config
from scd_train.storage import NoCredentials

BUCKET_RUN = ["data.source=mds", "data.path=s3://team-latents/minecraft/train", "data.cache_dir=/local/scd-cache"]


@pytest.fixture
def shell(monkeypatch):
    for key in (*storage_env.SETTINGS, *storage_env.SECRETS):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.cluster.internal:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSUBMITTER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def test_dry_run_names_what_each_task_gets_and_hides_secrets(shell, capsys, repo_root, tmp_path):
    assert launcher.main(["--nodes", "2", "--gpus-per-node", "4", "--backend", "ddp", "--config",
                          str(repo_root / "configs" / "tiny.yaml"), "--run-dir", str(tmp_path / "run"),
                          *BUCKET_RUN, "--dry-run"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("object storage"))
    assert "AWS_ENDPOINT_URL=https://minio.cluster.internal:9000" in line and "AWS_DEFAULT_REGION=eu-west-1" in line
    assert "AWS_ACCESS_KEY_ID (value not shown)" in line and "AWS_SECRET_ACCESS_KEY (value not shown)" in line
    assert "very-secret-value" not in out and "AKIDSUBMITTER" not in out


def test_no_credentials_fail_on_the_login_node(shell, capsys, repo_root, tmp_path):
    shell.delenv("AWS_ACCESS_KEY_ID")
    shell.delenv("AWS_SECRET_ACCESS_KEY")
    shell.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    shell.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    assert launcher.main(["--gpus-per-node", "1", "--config", str(repo_root / "configs" / "tiny.yaml"),
                          "--run-dir", str(tmp_path / "run"), *BUCKET_RUN, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no AWS credentials found for s3://team-latents/minecraft/train" in err and "AWS_PROFILE" in err


def test_task_gets_the_settings_but_the_job_file_holds_no_secret(shell, repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml", BUCKET_RUN)
    job = TrainingJob(cfg, storage_env.capture(dict(os.environ)))
    blob = pickle.dumps(job)  # what submitit writes into the job folder
    assert b"very-secret-value" not in blob and b"AKIDSUBMITTER" not in blob

    task = {"AWS_ACCESS_KEY_ID": "AKIDSUBMITTER", "AWS_SECRET_ACCESS_KEY": "from-slurm-export"}
    added = storage_env.apply(pickle.loads(blob).storage_env, task)  # a task where SLURM dropped the settings
    assert sorted(added) == ["AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"]
    assert task["AWS_ENDPOINT_URL"] == "https://minio.cluster.internal:9000"
    own = {"AWS_ENDPOINT_URL": "https://node-local-proxy:9000", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    storage_env.apply(job.storage_env, own)
    assert own["AWS_ENDPOINT_URL"] == "https://node-local-proxy:9000"  # the task's own value wins

    with pytest.raises(NoCredentials) as err:  # SLURM exported nothing: say so, do not fail later in boto
        storage_env.apply(job.storage_env, {})
    assert "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY were set when the job was submitted" in str(err.value)
    assert "SBATCH_EXPORT" in str(err.value)


def test_config_refuses_unsupported_urls_and_sizes(repo_root):
    from scd_train.config import ConfigError

    tiny = repo_root / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"data.path: 'gs://b/x': only local paths and s3:// URLs"):
        load_config(tiny, ["data.source=mds", "data.path=gs://b/x"])
    with pytest.raises(ConfigError, match=r"data.path: 's3://': an s3:// URL needs a bucket"):
        load_config(tiny, ["data.source=mds", "data.path=s3://"])
    with pytest.raises(ConfigError, match=r"data.cache_limit='plenty': expected a size such as 500mb"):
        load_config(tiny, ["data.cache_limit=plenty"])
    with pytest.raises(ConfigError, match=r"data.remote_retries=0 must be >= 1"):
        load_config(tiny, ["data.remote_retries=0"])
    cfg = load_config(tiny, [*BUCKET_RUN, "data.cache_limit=200gb"])
    assert cfg.data.path == "s3://team-latents/minecraft/train" and cfg.data.cache_limit == "200gb"
