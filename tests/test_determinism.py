"""What the demo's numbers depend on: the loader never touches the training RNG, whatever its worker
count, and the demo pins the thread count and the CPU kernels' instruction set."""

from __future__ import annotations

import platform

import torch
from shard_helpers import CLIP_FRAMES, build_dataset

from scd_train.data.manifest import load_manifest
from scd_train.data.shard_loader import ShardLoader


def test_loader_workers_leave_the_training_rng_alone(tmp_path):
    root = build_dataset(tmp_path / "latents", formats=["webdataset"])
    seen = []
    for workers in (0, 2):
        torch.manual_seed(0)
        loader = ShardLoader(load_manifest(root), "webdataset", batch_size=4, seed=3, clip_frames=CLIP_FRAMES,
                             use_actions=True, num_workers=workers)
        batch = next(iter(loader))
        seen.append((batch.keys, torch.rand(4)))  # what the trainer's noise and timesteps would draw next
    (keys0, draws0), (keys2, draws2) = seen
    assert keys0 == keys2
    assert torch.equal(draws0, draws2)


def test_demo_pins_threads_and_x86_kernels_but_keeps_what_the_user_set(monkeypatch):
    from scd_train.demo import DEMO_THREADS, X86_KERNELS, pin_cpu_numerics

    for name in X86_KERNELS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    before = torch.get_num_threads()
    try:
        pinned = pin_cpu_numerics()
        assert torch.get_num_threads() == DEMO_THREADS and pinned["torch_threads"] == str(DEMO_THREADS)
    finally:
        torch.set_num_threads(before)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert pinned["ATEN_CPU_CAPABILITY"] == "avx2" and pinned["ONEDNN_MAX_CPU_ISA"] == "AVX2"
        assert pinned["MKL_CBWR"] == "COMPATIBLE"  # the user's choice wins
    else:
        assert set(pinned) == {"torch_threads"}
