"""Run logging: metrics.jsonl, a progress bar and wandb (rank 0 only, never fatal)."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

# How long an online run may take to learn whether the wandb server answers at all; without an
# answer it logs offline instead (wandb's own wait is minutes: its init_timeout and retries).
WANDB_PROBE_TIMEOUT_S = 5.0
WANDB_INIT_TIMEOUT_S = 60


def wandb_base_url() -> str:
    """The server an online run talks to: WANDB_BASE_URL, else wandb's default."""
    url = os.environ.get("WANDB_BASE_URL")
    if url:
        return url
    try:
        import wandb

        return str(wandb.Settings().base_url)
    except Exception:  # noqa: BLE001 - only used to name the server in a message
        return "https://api.wandb.ai"


def server_unreachable(url: str, timeout_s: float = WANDB_PROBE_TIMEOUT_S) -> str | None:
    """Why ``url`` cannot be reached within ``timeout_s`` (any HTTP answer counts as reachable), or
    None. Proxy variables apply; the probe runs in a thread so that a hanging DNS lookup is bounded too."""
    outcome: dict[str, str | None] = {}

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
            outcome["error"] = None
        except urllib.error.HTTPError:  # the server answered (401, 404, ...): it is there
            outcome["error"] = None
        except Exception as exc:  # noqa: BLE001 - every failure means "not reachable"
            reason = getattr(exc, "reason", exc)
            outcome["error"] = f"{type(reason).__name__}: {reason}"

    thread = threading.Thread(target=probe, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    if "error" not in outcome:
        return f"no answer within {timeout_s:.0f} s"
    return outcome["error"]


class JsonlWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self._file.close()


class WandbRun:
    """A wandb run that degrades to a warning: no wandb failure can stop training.

    Offline runs write under ``<run_dir>/wandb`` (``wandb sync`` uploads them later). The run id
    lives in the checkpoint, so a resumed or requeued job continues the same run. An online run
    first checks, within seconds, that the server answers; when it does not (a compute node without
    network), the run logs offline instead, with a warning, rather than blocking start-up.
    """

    def __init__(self, mode: str, run_dir: Path, project: str, name: str | None, config: dict,
                 run_id: str | None) -> None:
        self.run = None
        self.run_id = run_id
        self.mode = mode
        if mode == "disabled":
            return
        try:
            import wandb

            for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "wandb-cache"),
                             ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_CONFIG_DIR", "wandb-config")):
                os.environ.setdefault(var, str(run_dir / sub) if sub else str(run_dir))
            self.run_id = run_id or uuid.uuid4().hex[:8]
            if mode == "online":
                url = wandb_base_url()
                problem = server_unreachable(url)
                if problem is not None:
                    log.warning("wandb: the server %s is unreachable (%s); logging offline under %s/wandb instead "
                                "(upload later with `wandb sync`)", url, problem, run_dir)
                    mode = "offline"
            self.mode = mode
            self.run = wandb.init(project=project, name=name, id=self.run_id, resume="allow", mode=mode,
                                  dir=str(run_dir), config=config,
                                  settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, console="off"))
        except Exception as exc:  # noqa: BLE001 - a logger must never end the run
            log.warning("wandb disabled: %s", exc)
            self.run = None

    def log(self, record: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(record, step=step)
        except Exception as exc:  # noqa: BLE001
            log.warning("wandb.log failed, disabling wandb: %s", exc)
            self.run = None

    def log_media(self, kind: str, key: str, path: Path, step: int) -> None:
        """``kind``: 'image' or 'video' (an mp4 path; arrays would need moviepy)."""
        if self.run is None:
            return
        try:
            import wandb

            item = wandb.Image(str(path)) if kind == "image" else wandb.Video(str(path))
            self.run.log({key: item}, step=step)
        except Exception as exc:  # noqa: BLE001
            log.warning("wandb media logging failed: %s", exc)

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as exc:  # noqa: BLE001
            log.warning("wandb.finish failed: %s", exc)


class Progress:
    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step",
                        mininterval=1.0) if enabled else None

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, fields: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
