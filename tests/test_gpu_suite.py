"""bench/gpu_suite.py --smoke: the GPU suite's code path at tiny dims on CPU, in a subprocess.

The subprocess (and every section process it starts) runs with the packages that the GPU
machine's image lacks made unimportable, so the suite is proven to need only what that image has
plus the carried wheels (omegaconf, antlr4, torchao).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

# Project dependencies absent from the GPU image (docs/gpu.md); none may be imported by the suite.
ABSENT_ON_GPU_IMAGE = ("av", "wandb", "webdataset", "streaming", "diffusers", "deepspeed", "transformer_engine",
                       "submitit", "gymnasium", "ale_py", "crafter", "s3fs", "boto3", "botocore", "starlette",
                       "uvicorn", "moto", "playwright")


def write_import_blocker(folder: Path, log: Path) -> None:
    """A ``sitecustomize`` that refuses (and logs) imports of the absent packages in every process."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys

        BLOCKED = {ABSENT_ON_GPU_IMAGE!r}

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    with open({str(log)!r}, "a") as f:
                        f.write(name + "\\n")
                    raise ImportError(f"{{name}} is not installed on the GPU image")
                return None

        sys.meta_path.insert(0, Refuse())
    """))


def test_smoke_run_compares_tensors_and_records_every_section(tmp_path, repo_root, subprocess_env, python_exe):
    blocker, attempts = tmp_path / "site", tmp_path / "blocked_imports.log"
    write_import_blocker(blocker, attempts)
    env = {**subprocess_env, "PYTHONPATH": f"{blocker}:{subprocess_env['PYTHONPATH']}"}
    out = tmp_path / "suite.json"
    proc = subprocess.run([python_exe, str(repo_root / "bench" / "gpu_suite.py"), "--smoke", "--out", str(out)],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not attempts.exists(), f"imports the GPU image lacks: {attempts.read_text()}"
    record = json.loads(out.read_text())
    assert record["kind"] == "smoke" and record["status"] == "complete" and record["checks_failed"] == []
    assert record["environment"]["torch"] and record["environment"]["device_name"] == "cpu"
    assert record["date"] and "machine_load_start" in record
    sections = record["sections"]
    assert list(sections) == ["correctness", "training", "fp8", "inference"]
    assert all(s["status"] == "ok" and s["seconds"] > 0 for s in sections.values()), sections

    check = sections["correctness"]["results"]
    for case in ("full_clip", "prefill_after_cache"):
        result = check["mask_kernel"]["cases"][case]
        assert result["boolean_mask_equals_definition"]
        for part in ("output", "grad_q", "grad_k", "grad_v"):
            compared = result["sdpa_vs_reference"][part]
            assert compared["reference_max_abs"] > 0.1  # real tensors, not zeros
            assert 0 <= compared["max_abs_diff"] < 1e-4 and compared["pass"]
    for model in ("scd_encoder", "dense_baseline"):
        for policy, cache in (("full_history", "KVCache"), ("window_3_sink_1", "RingKVCache")):
            cached = check["kv_cache"]["float32"][f"{model}_{policy}"]
            assert cached["cache"] == cache and cached["reference_max_abs"] > 0.1
            assert cached["max_rel_diff"] < 1e-4 and cached["pass"]
    assert check["mask_encoder"]["status"] == "needs CUDA"
    assert check["compiled_loop"]["status"] == "needs CUDA"

    training = sections["training"]["results"]
    for variant in training["variants"].values():
        assert variant["step_ms_median"] > 0 and variant["tokens_per_s"] > 0
        assert len(variant["losses"]) == training["summary"]["repeats"] and variant["losses_finite"]
    # same weights, clips and noise: checkpointing recomputes activations and changes no number
    assert training["summary"]["max_loss_diff_on_vs_off"] < 1e-5
    assert training["summary"]["mfu"].startswith("not computed")  # no peak for a CPU: no invented MFU

    fp8 = sections["fp8"]["results"]
    assert fp8["eager"]["fp8_layers"] > 0 and fp8["setup"]["emulated"]
    # FP8 was really applied (the encoder's numbers moved) and stayed close to the baseline
    assert 0 < fp8["eager"]["encoder_numerics"]["hidden_rel_l2"] < 0.1
    assert math.isfinite(fp8["eager"]["loss_max_rel_diff"]) and fp8["compiled"]["status"] == "needs CUDA"

    inference = sections["inference"]["results"]
    rows = inference["eager"]["candidates"]
    assert set(rows) == {f"{m}_{g}" for m in ("scd", "dense", "student") for g in ("unguided", "guided")}
    assert all(r["frame_ms_median"] > 0 and r["flops_per_frame"] > 0 for r in rows.values())
    assert rows["student_unguided"]["steps"] < rows["scd_unguided"]["steps"]
    assert inference["eager"]["ratios"]["dense_over_scd_unguided"]["flop_ratio"] > 1
    assert inference["setup"]["student"]["source"] == "random weights"
    assert record["headline"]["frame_ms"]["scd_unguided"] == rows["scd_unguided"]["frame_ms_median"]


def test_full_run_refuses_a_machine_without_cuda(tmp_path, repo_root, subprocess_env, python_exe):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here, so the refusal on a CPU-only machine cannot be shown")
    proc = subprocess.run([python_exe, str(repo_root / "bench" / "gpu_suite.py"), "--out", str(tmp_path / "x.json")],
                          cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_budget_skips_are_recorded_not_overrun(tmp_path, repo_root, subprocess_env, python_exe):
    """9 s in all: the FP8 section starts but has no room for its 10 s comparison and says so; the
    inference section after it is not started at all. Neither is dropped from the JSON."""
    out = tmp_path / "suite.json"
    proc = subprocess.run([python_exe, str(repo_root / "bench" / "gpu_suite.py"), "--smoke", "--budget-s", "9",
                           "--sections", "fp8", "inference", "--out", str(out)],
                          cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert record["status"] == "partial" and list(record["sections"]) == ["fp8", "inference"]
    fp8 = record["sections"]["fp8"]
    assert fp8["status"] == "ok" and 8.5 <= fp8["budget_s"] <= 9
    assert fp8["results"]["eager"]["status"] == "skipped for time"
    assert "needs about 10 s" in fp8["results"]["eager"]["reason"]
    assert record["sections"]["inference"]["status"] == "skipped for time"


def test_every_failed_comparison_is_listed_by_its_path(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "bench"))
    spec = importlib.util.spec_from_file_location("gpu_suite", repo_root / "bench" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    sections = {"correctness": {"results": {"mask_kernel": {"cases": {"full_clip": {"flex_vs_sdpa": {
        "output": {"pass": True}, "grad_k": {"pass": False}, "pass": False}}}, "pass": False},
        "kv_cache": {"pass": True}}}}
    assert suite.failed_checks(sections) == [
        "correctness.results.mask_kernel", "correctness.results.mask_kernel.cases.full_clip.flex_vs_sdpa",
        "correctness.results.mask_kernel.cases.full_clip.flex_vs_sdpa.grad_k"]
    assert suite.headline({})["fp8_step_time_ratio"] == {"eager": None, "compiled": None}
