"""FP8 configuration, layer selection, pre-flight validation and extra-state checkpointing.

None of these need FP8 hardware or torchao: the GEMM shapes are traced on the meta device.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from scd_train.config import ConfigError, dump_yaml, load_config
from scd_train.ema import EMA
from scd_train.models import build_model
from scd_train.parallel.backend import SingleBackend
from scd_train.parallel.runtime import Runtime
from scd_train.precision import Fp8Error, select_fp8_linears
from scd_train.precision.extra_state import TE_UNSAFE_PICKLE_ENV
from scd_train.precision.preflight import (
    GemmTrace,
    check_gemm_shapes,
    check_hardware,
    check_repeated_calls,
    run_preflight,
    trace_training_gemms,
)

CPU = torch.device("cpu")
# A small SCD: 16 tokens per frame (8x8 latents, patch 2), width 32, every dimension a multiple of 16.
SMALL = ["model.width=32", "model.num_heads=2", "model.head_dim=16", "model.rope_axes=[4,6,6]",
         "model.encoder_layers=2", "model.decoder_layers=1", "model.layers=3", "data.batch_size=2",
         "data.clip_frames=4"]


def small_config(*overrides: str, repo: Path):
    return load_config(repo / "configs" / "tiny.yaml", [*SMALL, *overrides])


@pytest.fixture
def cfg(repo_root):
    return small_config("precision.fp8.enabled=true", "precision.fp8.backend=torchao",
                        "precision.fp8.cpu_emulation=true", repo=repo_root)


# -- config ----------------------------------------------------------------------------------------
def test_fp8_is_off_by_default_and_round_trips_through_yaml(repo_root, tmp_path):
    default = load_config(repo_root / "configs" / "tiny.yaml")
    assert default.precision.fp8.enabled is False
    cfg = small_config("precision.fp8.enabled=true", "precision.fp8.recipe=delayed",
                       "precision.fp8.modules=[encoder,decoder.blocks.0.mlp.*]", repo=repo_root)
    dump_yaml(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.precision.fp8 == cfg.precision.fp8
    assert again.precision.fp8.modules == ["encoder", "decoder.blocks.0.mlp.*"]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["precision.fp8.backend=torchao", "precision.fp8.recipe=delayed"], "recipe='delayed' is not available"),
    (["precision.fp8.backend=te", "precision.fp8.recipe=rowwise"], "backend 'torchao'"),
    (["precision.fp8.modules=[]"], "precision.fp8.modules is empty"),
    (["precision.fp8.amax_history_len=0"], "amax_history_len=0"),
    (["precision.fp8.backend=torchao", "precision.fp8.fsdp_float8_all_gather=true"], "train.backend=fsdp2"),
    (["precision.fp8.backend=te", "precision.fp8.cpu_emulation=true"], "no CPU path"),
    (["precision.fp8.recipe=fp4"], "precision.fp8.recipe='fp4' is not one of"),
])
def test_bad_fp8_settings_fail_at_load_naming_the_key(repo_root, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        small_config("precision.fp8.enabled=true", *overrides, repo=repo_root)


def test_misspelt_fp8_key_suggests_the_right_one(repo_root):
    with pytest.raises(ConfigError, match="did you mean 'precision.fp8.recipe'"):
        small_config("precision.fp8.recipie=current", repo=repo_root)


# -- selection -------------------------------------------------------------------------------------
def test_default_selection_is_the_encoders_per_token_linears(cfg):
    model = build_model(cfg.model)
    selection = select_fp8_linears(model, cfg.precision.fp8)
    expected = [f"encoder.blocks.{i}.{leaf}" for i in range(2) for leaf in ("qkv", "out", "mlp.0", "mlp.2")]
    assert selection.selected == expected
    for small in ("encoder.time_embed.mlp.0", "encoder.patch_embed.proj", "encoder.blocks.0.attn_modulation",
                  "encoder.output_norm.modulation", "decoder.proj_out", "decoder.blocks.0.qkv"):
        assert small not in selection.selected
    assert "modulation" in selection.auto_excluded["encoder.blocks.0.mlp_modulation"]
    assert "outside the transformer blocks" in selection.auto_excluded["decoder.proj_out"]


def test_all_patterns_and_exclusions(cfg):
    model = build_model(cfg.model)
    fp8 = cfg.precision.fp8
    fp8.modules = ["all"]
    assert len(select_fp8_linears(model, fp8).selected) == 4 * 3
    fp8.modules, fp8.exclude = ["encoder.blocks.1.*", "decoder"], ["*.mlp.*"]
    selection = select_fp8_linears(model, fp8)
    assert selection.selected == ["encoder.blocks.1.qkv", "encoder.blocks.1.out", "decoder.blocks.0.qkv",
                                  "decoder.blocks.0.out"]
    assert selection.user_excluded == ["decoder.blocks.0.mlp.0", "decoder.blocks.0.mlp.2",
                                       "encoder.blocks.1.mlp.0", "encoder.blocks.1.mlp.2"]


@pytest.mark.parametrize(("modules", "exclude", "expected"), [
    (["decoder.proj_out"], [], r"decoder.proj_out: embedding or output layer"),
    (["*time_embed*"], [], "only layers that stay in high precision"),
    (["encoder.blockz.*"], [], "matches no linear layer"),
    (["encoder"], ["decoder.*"], "exclude entry 'decoder.\\*' matches no FP8-selected"),
    (["encoder.blocks.0.qkv"], ["*qkv"], "removes every selected layer"),
])
def test_selection_errors_name_the_entry(cfg, modules, exclude, expected):
    model = build_model(cfg.model)
    cfg.precision.fp8.modules, cfg.precision.fp8.exclude = modules, exclude
    with pytest.raises(Fp8Error, match=expected):
        select_fp8_linears(model, cfg.precision.fp8)


def test_encoder_scope_on_the_dense_baseline_points_to_its_blocks(repo_root):
    cfg = small_config("model.arch=causal_dit", "precision.fp8.enabled=true", repo=repo_root)
    with pytest.raises(Fp8Error, match=r"scopes with FP8-eligible layers: blocks; use 'all'"):
        select_fp8_linears(build_model(cfg.model), cfg.precision.fp8)
    cfg.precision.fp8.modules = ["all"]
    assert len(select_fp8_linears(build_model(cfg.model), cfg.precision.fp8).selected) == 4 * 3


# -- hardware --------------------------------------------------------------------------------------
def test_hardware_refusals(cfg):
    fp8 = cfg.precision.fp8
    check_hardware(fp8, CPU)  # torchao emulation explicitly allowed
    fp8.cpu_emulation = False
    with pytest.raises(Fp8Error, match="cpu_emulation=true"):
        check_hardware(fp8, CPU)
    fp8.backend, fp8.recipe = "te", "delayed"
    with pytest.raises(Fp8Error, match="no CPU build"):
        check_hardware(fp8, CPU)
    cuda = torch.device("cuda", 0)
    with pytest.raises(Fp8Error, match=r"compute capability >= 8.9, but .* has 8.0; disable"):
        check_hardware(fp8, cuda, capability=(8, 0))
    check_hardware(fp8, cuda, capability=(8, 9))
    check_hardware(fp8, cuda, capability=(9, 0))
    fp8.recipe = "mxfp8"
    with pytest.raises(Fp8Error, match=r"MXFP8 .* >= 10.0, but .* 9.0; use precision.fp8.recipe=current"):
        check_hardware(fp8, cuda, capability=(9, 0))
    check_hardware(fp8, cuda, capability=(10, 0))


# -- GEMM shapes -----------------------------------------------------------------------------------
def test_trace_sees_exact_token_counts_and_single_calls(cfg):
    cfg.precision.fp8.modules = ["all"]
    names = select_fp8_linears(build_model(cfg.model), cfg.precision.fp8).selected
    trace = trace_training_gemms(cfg, names)
    tokens = {n: {s[0] * s[1] for s in shapes} for n, shapes in trace.shapes.items()}
    assert tokens["encoder.blocks.0.qkv"] == {2 * 4 * 16}  # batch x frames x tokens per frame
    k, targets = cfg.diffusion.decoder_multi_batch, 4 - 1
    assert tokens["decoder.blocks.0.mlp.2"] == {k * 2 * targets * 2 * 16}  # draws x clips x targets x [ctx;noisy]
    assert trace.features["encoder.blocks.0.mlp.2"] == (128, 32)
    # The decoder's noise draws are batched into one call: no module runs twice per micro-batch.
    assert set(trace.max_calls.values()) == {1}
    run_preflight(cfg, names, CPU)
    cfg.model.attention = "flex"  # a GPU-only kernel choice must not break the meta trace
    run_preflight(cfg, names, CPU)


def test_misaligned_tokens_are_reported_per_module(repo_root):
    # 6x6 latents with patch 2 give 9 tokens per frame: 2 clips x 4 frames x 9 = 72 tokens.
    cfg = small_config("model.latent_height=6", "model.latent_width=6", "precision.fp8.enabled=true",
                       "precision.fp8.backend=torchao", "precision.fp8.cpu_emulation=true", repo=repo_root)
    names = select_fp8_linears(build_model(cfg.model), cfg.precision.fp8).selected
    with pytest.raises(Fp8Error, match=r"(?s)multiple of 16.*encoder.blocks.0.qkv: tokens per micro-batch \[72\]"
                                       r".*precision.fp8.exclude"):
        run_preflight(cfg, names, CPU)


def test_misaligned_features_are_reported(repo_root):
    cfg = small_config("model.width=40", "model.head_dim=20", "model.rope_axes=[4,8,8]",
                       "precision.fp8.enabled=true", "precision.fp8.backend=torchao",
                       "precision.fp8.cpu_emulation=true", repo=repo_root)
    names = select_fp8_linears(build_model(cfg.model), cfg.precision.fp8).selected
    with pytest.raises(Fp8Error, match=r"encoder.blocks.0.qkv: in_features 40, out_features 120 \(change model.width"):
        check_gemm_shapes(trace_training_gemms(cfg, names), cfg.precision.fp8)


def test_mxfp8_alignment_checks_every_random_clip_length(repo_root):
    # One clip of 2..4 frames x 16 tokens: 32, 48, 64 tokens; only 48 breaks MXFP8's multiple of 32.
    cfg = small_config("data.batch_size=1", "data.random_clip_min_frames=2", "precision.fp8.enabled=true",
                       "precision.fp8.recipe=mxfp8", repo=repo_root)
    names = select_fp8_linears(build_model(cfg.model), cfg.precision.fp8).selected
    trace = trace_training_gemms(cfg, names)
    cfg.precision.fp8.recipe = "current"
    check_gemm_shapes(trace, cfg.precision.fp8)
    cfg.precision.fp8.recipe = "mxfp8"
    with pytest.raises(Fp8Error, match=r"multiple of 32(?s:.*)tokens per micro-batch \[48\]"):
        check_gemm_shapes(trace, cfg.precision.fp8)


def test_repeated_calls_are_refused_only_for_delayed_scaling_with_amax_reduction(cfg):
    trace = GemmTrace()
    trace.max_calls.update({"decoder.blocks.0.qkv": 3, "encoder.blocks.0.qkv": 1})
    fp8 = cfg.precision.fp8
    fp8.backend, fp8.recipe = "te", "delayed"
    with pytest.raises(Fp8Error, match=r"decoder.blocks.0.qkv \(3 calls\)"):
        check_repeated_calls(trace, fp8)
    fp8.reduce_amax = False
    check_repeated_calls(trace, fp8)
    fp8.reduce_amax, fp8.recipe = True, "current"
    check_repeated_calls(trace, fp8)


# -- extra state through DCP -----------------------------------------------------------------------
class StatefulLinear(nn.Linear):
    """A linear whose extra state is a byte tensor of varying size, as Transformer Engine's is."""

    def __init__(self) -> None:
        super().__init__(16, 16)
        self.blob = torch.empty(0, dtype=torch.uint8)

    def get_extra_state(self) -> torch.Tensor:
        return self.blob

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.blob = state.clone()
        self.unpickle_permission = os.environ.get(TE_UNSAFE_PICKLE_ENV)


def _backend(model: nn.Module, cfg) -> tuple[SingleBackend, EMA]:
    backend = SingleBackend(model, [{"params": list(model.parameters())}], cfg, Runtime(0, 1, 0, CPU))
    return backend, EMA(backend.ema_parameters(), 0.9)


def test_variable_size_extra_state_round_trips_through_dcp(cfg, tmp_path):
    torch.manual_seed(0)
    saved_model = nn.Sequential(StatefulLinear(), nn.Linear(16, 16))
    saved_model[0].blob = torch.arange(37, dtype=torch.uint8)
    backend, ema = _backend(saved_model, cfg)
    backend.save(tmp_path, ema)

    fresh = nn.Sequential(StatefulLinear(), nn.Linear(16, 16))
    assert fresh[0].blob.numel() == 0
    backend, ema = _backend(fresh, cfg)
    backend.load(tmp_path, ema)
    assert torch.equal(fresh[0].blob, torch.arange(37, dtype=torch.uint8))
    assert torch.equal(fresh[0].weight, saved_model[0].weight)
    # TE may unpickle delayed-scaling state only while our own checkpoint loads.
    assert fresh[0].unpickle_permission == "1"
    assert TE_UNSAFE_PICKLE_ENV not in os.environ


def test_checkpoint_without_extra_state_keeps_the_fresh_state(cfg, tmp_path):
    plain = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    backend, ema = _backend(plain, cfg)
    backend.save(tmp_path, ema)
    stateful = nn.Sequential(StatefulLinear(), nn.Linear(16, 16))
    stateful[0].blob = torch.ones(5, dtype=torch.uint8)
    backend, ema = _backend(stateful, cfg)
    backend.load(tmp_path, ema)
    assert torch.equal(stateful[0].weight, plain[0].weight)
    assert torch.equal(stateful[0].blob, torch.ones(5, dtype=torch.uint8))


# -- activation checkpointing glue (TE passes te.checkpoint; torch's checkpoint stands in here) ------
def test_fp8_checkpoint_wrapping_keeps_names_and_gradients(cfg):
    from scd_train.diffusion.objective import build_objective
    from scd_train.parallel.checkpointing import apply_activation_checkpointing
    from scd_train.precision.fp8 import wrap_blocks_for_checkpointing

    calls = []

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(kwargs["use_reentrant"])
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    plain = build_model(cfg.model)
    wrapped = build_model(cfg.model)
    wrapped.load_state_dict(plain.state_dict())
    assert wrap_blocks_for_checkpointing(wrapped, counting_checkpoint) == 3
    assert apply_activation_checkpointing(wrapped) == 0  # the backend's pass leaves them alone
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    latents, actions = torch.randn(2, 4, cfg.model.latent_channels, 8, 8), torch.randint(0, 4, (2, 4))
    grads = []
    for model in (plain, wrapped):
        torch.manual_seed(0)
        build_objective(cfg.model, cfg.diffusion)(model, latents, actions).loss.backward()
        grads.append(model.decoder.proj_out.weight.grad)
    assert calls == [False] * 3  # non-reentrant, once per block in forward
    torch.testing.assert_close(grads[0], grads[1])


def test_cli_refuses_fp8_it_cannot_run_with_a_message(repo_root, python_exe, subprocess_env, tmp_path):
    import subprocess

    cmd = [python_exe, "-m", "scd_train.train", "--config", "configs/tiny.yaml", *SMALL, "train.steps=1",
           "train.device=cpu", f"train.run_dir={tmp_path}", "log.wandb=disabled", "precision.fp8.enabled=true"]
    done = subprocess.run(cmd, cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "precision.fp8.backend='te' needs a CUDA GPU" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "checkpoints").exists()
