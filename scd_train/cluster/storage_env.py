"""Object-storage settings from the submitting shell to every task of a cluster job.

Shards in a bucket are reached with the standard AWS settings of the shell that submits the job.
SLURM normally exports that whole environment to the tasks, but sites that set ``SBATCH_EXPORT=NONE``
(or a login shell that resets it) drop it. So the launcher records the *non-secret* settings
(endpoint, profile, region, config file paths) in the job itself and sets them in each task where
they are missing. Secrets (access key, secret key, session token) are never written into the job
files: they must reach the task through SLURM's environment or a credentials file on a shared file
system, and a task that lacks one that the submitting shell had stops with a message saying so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from scd_train.config import Config

SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_DEFAULT_REGION",
            "AWS_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE", "AWS_MAX_ATTEMPTS")
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def uses_object_storage(cfg: Config) -> bool:
    from scd_train.storage import is_remote

    return any(is_remote(p) for p in (cfg.data.path, cfg.data.holdout_path))


def capture(environ: Mapping[str, str]) -> dict:
    """What the tasks need: the settings' values, and only the names of the secrets present."""
    return {"settings": {k: environ[k] for k in SETTINGS if environ.get(k)},
            "secrets": [k for k in SECRETS if environ.get(k)]}


def apply(captured: dict, environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Set the recorded settings a task lacks; returns their names. Stops if a secret did not arrive."""
    target = os.environ if environ is None else environ
    added = []
    for key, value in captured.get("settings", {}).items():
        if not target.get(key):
            target[key] = value
            added.append(key)
    lost = [k for k in captured.get("secrets", []) if not target.get(k)]
    if lost:
        from scd_train.storage import NoCredentials

        raise NoCredentials(f"{', '.join(lost)} {'was' if len(lost) == 1 else 'were'} set when the job was submitted "
                            "but did not reach this task (SLURM exported no environment: SBATCH_EXPORT / --export); "
                            "export them in a --setup line, or use AWS_PROFILE with a credentials file on a shared "
                            "file system (AWS_SHARED_CREDENTIALS_FILE)")
    return added


def describe(captured: dict) -> str:
    """One line for the dry run: settings with their values, secrets by name only."""
    parts = [f"{k}={v}" for k, v in captured["settings"].items()]
    parts += [f"{k} (value not shown)" for k in captured["secrets"]]
    return ", ".join(parts) if parts else "none set (the AWS defaults apply: ~/.aws, instance role)"
