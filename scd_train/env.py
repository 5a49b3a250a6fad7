"""What a run ran on: library versions and hardware, written into every run directory."""

from __future__ import annotations

import importlib.metadata
import platform
import socket

import torch

LIBRARIES = ("torch", "torchvision", "numpy", "deepspeed", "transformer-engine", "torchao", "webdataset",
             "mosaicml-streaming", "diffusers", "wandb", "submitit", "av", "omegaconf", "einops", "s3fs", "boto3",
             "scd-train")


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "host": socket.gethostname(),
            "cpus": torch.get_num_threads(), "cuda": torch.version.cuda, "gpus": []}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cudnn"] = torch.backends.cudnn.version()
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None
    return info


def environment_report() -> dict:
    return {"libraries": library_versions(), "hardware": hardware()}
