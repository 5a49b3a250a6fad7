"""Probes on a tiny dense model with a planted frame-diagonal layer, and dense-to-SCD conversion."""

from __future__ import annotations

import pytest
import torch

from scd_train.config import Config, ConfigError, ModelConfig
from scd_train.convert import check_split, convert, parse_layer_spec, scd_config_from_dense, write_weights
from scd_train.diffusion.sampling import CausalDiTStream, SamplerSettings
from scd_train.eval.layer_importance import layer_importance
from scd_train.eval.probes import BlockRecorder, attention_probabilities, probe_dense_model, step_similarity
from scd_train.models.causal_dit import CausalDiT
from scd_train.models.scd import SCDModel

FRAME_AXIS_DIMS = 8  # rope_axes[0]


def _config(layers: int = 3) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(arch="causal_dit", latent_channels=4, latent_height=4, latent_width=4, patch_size=1,
                            width=64, num_heads=2, head_dim=32, rope_axes=[FRAME_AXIS_DIMS, 12, 12], layers=layers,
                            encoder_layers=2, decoder_layers=1, num_actions=4, max_frames=16, attention="sdpa")
    return cfg


def _dense(layers: int = 3, seed: int = 0) -> CausalDiT:
    """A dense model with every weight random (the zero-initialised gates would make blocks no-ops)."""
    torch.manual_seed(seed)
    model = CausalDiT(_config(layers).model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model.eval()


def _plant_frame_diagonal(block) -> None:
    """Constant queries and keys that live only in the frame-axis RoPE channels, scaled up: the
    logit between frames f and g then peaks sharply at f == g, so attention stays in the frame."""
    width = block.qkv.in_features
    with torch.no_grad():
        block.qkv.weight[: 2 * width].zero_()
        per_head = torch.zeros(block.head_dim)
        per_head[0:FRAME_AXIS_DIMS:2] = 1.0  # (real, imag) = (1, 0) in every frame-axis pair
        block.qkv.bias[: 2 * width] = per_head.repeat(2 * block.num_heads)
        block.q_norm.weight.fill_(20.0)
        block.k_norm.weight.fill_(20.0)


def _clip(frames: int = 4, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 4, 4, 4, generator=g), torch.randint(0, 4, (batch, frames), generator=g)


def test_planted_frame_diagonal_layer_shows_no_attention_to_earlier_frames():
    model = _dense()
    _plant_frame_diagonal(model.blocks[-1])
    latents, actions = _clip(frames=4)
    result = probe_dense_model(model, latents[:, :3], actions, steps=3)
    share = result.earlier_share
    assert share.shape == (3, 3)  # layers x steps
    assert float(share[-1].max()) < 1e-6
    assert float(share[:-1].min()) > 0.05
    assert torch.allclose(result.frame_mass.sum(dim=-1), torch.ones(3, 3), atol=1e-5)
    summary = result.summary()
    assert summary["attention_to_earlier_frames"]["mean_over_steps"][-1] < 1e-6
    sim = result.similarity
    assert sim.shape == (3, 3, 3)
    assert torch.allclose(sim.diagonal(dim1=1, dim2=2), torch.ones(3, 3, dtype=sim.dtype))
    assert torch.allclose(sim, sim.transpose(1, 2))


def test_probe_hooks_leave_the_rollout_unchanged():
    model = _dense()
    latents, actions = _clip(frames=4)
    settings = SamplerSettings(steps=3)

    def next_frame(record: bool) -> torch.Tensor:
        stream = CausalDiTStream(model, settings, 2, 3, torch.Generator().manual_seed(0))
        stream.prefill(latents[:, :3], actions[:, :3])
        recorder = BlockRecorder(model)
        recorder.active = record
        try:
            return stream.next_frame(actions[:, 3])
        finally:
            recorder.remove()

    assert torch.equal(next_frame(False), next_frame(True))


def test_recomputed_attention_reproduces_the_blocks_attention_output():
    model = _dense()
    block, layer = model.blocks[1], 1
    captured = {}

    def before_block(module, args):
        x, ctx = args[0], args[1]
        probs = attention_probabilities(module, x, ctx, layer)
        from scd_train.models.layers import modulate

        shift, scale, _ = module.attn_modulation(ctx.cond_act).chunk(3, dim=-1)
        _, _, v = module.project_qkv(modulate(module.attn_norm(x), shift, scale, ctx.tokens_per_frame), ctx)
        v = torch.cat([ctx.kv_cache.values[layer, :, :, :ctx.kv_cache.length], v], dim=2)
        captured["expected"] = (probs @ v.float()).transpose(1, 2).flatten(2)

    def before_out(module, args):
        captured["actual"] = args[0]

    latents, actions = _clip(frames=4)
    stream = CausalDiTStream(model, SamplerSettings(steps=1), 2, 3)
    stream.prefill(latents[:, :3], actions[:, :3])
    handles = [block.register_forward_pre_hook(before_block), block.out.register_forward_pre_hook(before_out)]
    try:
        stream.next_frame(actions[:, 3])
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(captured["expected"], captured["actual"].float(), atol=1e-5)


def test_step_similarity_known_values():
    same = [torch.ones(1, 2, 4)] * 3
    assert torch.allclose(step_similarity(same), torch.ones(3, 3, dtype=torch.float64))
    basis = [torch.eye(4)[i].view(1, 1, 4) for i in range(3)]
    assert torch.allclose(step_similarity(basis), torch.eye(3, dtype=torch.float64))


def test_probes_reject_scd_models():
    cfg = _config()
    cfg.model.arch = "scd"
    with pytest.raises(TypeError, match="dense causal model"):
        probe_dense_model(SCDModel(cfg.model), torch.zeros(1, 2, 4, 4, 4), None, steps=2)


def test_conversion_copies_chosen_layers_exactly(tmp_path):
    dense = _dense(layers=4)
    cfg = _config(layers=4)
    scd_cfg = scd_config_from_dense(cfg, 2, [0, 3])
    assert (scd_cfg.model.arch, scd_cfg.model.encoder_layers, scd_cfg.model.decoder_layers) == ("scd", 2, 2)
    scd, copied = convert(dense, scd_cfg, 2, [0, 3])
    source, target = dense.state_dict(), scd.state_dict()
    for dst, src in copied.items():
        assert torch.equal(target[dst], source[src]), dst
    pairs = {("encoder.blocks.0.qkv.weight", "blocks.0.qkv.weight"), ("encoder.blocks.1.out.bias", "blocks.1.out.bias"),
             ("decoder.blocks.0.mlp.0.weight", "blocks.0.mlp.0.weight"),
             ("decoder.blocks.1.attn_modulation.weight", "blocks.3.attn_modulation.weight"),
             ("decoder.proj_out.weight", "proj_out.weight"), ("encoder.action_embed.table.weight",
                                                               "action_embed.table.weight")}
    assert pairs <= set(copied.items())
    fresh = set(target) - set(copied)
    assert fresh == {"encoder.output_norm.modulation.weight", "encoder.output_norm.modulation.bias"}
    assert not target["encoder.output_norm.modulation.weight"].any()

    from scd_train.weights import load_model

    path = write_weights(scd, scd_cfg, tmp_path / "scd_init.safetensors", {})
    loaded, loaded_cfg = load_model(path)
    assert isinstance(loaded, SCDModel) and loaded_cfg.model.encoder_layers == 2
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, target[name]), name


def test_layer_split_validation():
    assert parse_layer_spec("0-1, 10-11") == [0, 1, 10, 11]
    assert parse_layer_spec("3") == [3]
    with pytest.raises(ConfigError, match="'x' is not an index"):
        parse_layer_spec("1,x")
    with pytest.raises(ConfigError, match=r"--encoder-layers=7 must be in \[1, 6\]"):
        check_split(6, 7, [0])
    with pytest.raises(ConfigError, match=r"--decoder-layers \[6\] out of range"):
        check_split(6, 3, [0, 6])
    with pytest.raises(ConfigError, match="repeats"):
        check_split(6, 3, [1, 1])


def test_leave_one_out_importance_finds_a_planted_identity_layer():
    model = _dense(layers=3)
    with torch.no_grad():  # zero gates: block 1 adds nothing to the residual stream
        for mod in (model.blocks[1].attn_modulation, model.blocks[1].mlp_modulation):
            width = mod.out_features // 3
            mod.weight[2 * width:].zero_()
            mod.bias[2 * width:].zero_()
    latents, actions = _clip(frames=4)
    report = layer_importance(model, _config(layers=3), latents, actions)
    increases = [row["increase"] for row in report["layers"]]
    assert increases[1] == 0.0
    assert abs(increases[0]) > 1e-4 and abs(increases[2]) > 1e-4
    assert [increases[i] for i in report["least_important_first"]] == sorted(increases)
