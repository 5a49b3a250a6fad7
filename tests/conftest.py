"""Shared fixtures: paths and an environment for launching the package in subprocesses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _environment_restored():
    """Commands run in-process here may set process-wide variables (scd-demo pins the CPU kernels'
    instruction set, launchers export RANK and friends); each test starts from the same environment."""
    saved = dict(os.environ)
    yield
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    os.environ.update(saved)


@pytest.fixture
def one_torch_thread():
    """The CI machine's two cores are shared; one intra-op thread avoids oversubscription stalls
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Environment for child processes: this checkout first on the path, offline logging, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.setdefault("MPLBACKEND", "Agg")
    return env


@pytest.fixture
def python_exe() -> str:
    return sys.executable
