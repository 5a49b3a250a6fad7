"""configs/scd_m_release.yaml: SCD-M plus the release's quirks, exactly those and nothing else."""

from __future__ import annotations

import pytest
import torch

from scd_train.config import load_config, to_dict
from scd_train.diffusion.objective import build_objective
from scd_train.eval.cli import guidance_scales
from scd_train.eval.protocol import build_protocol
from scd_train.models import build_model
from scd_train.models.rope import round_through_bf16
from scd_train.optim import expected_lr

RELEASE_QUIRKS = {
    "model.reference_bf16_rope": (False, True),
    "model.reference_bf16_timesteps": (False, True),
    "diffusion.reference_bf16_inputs": (False, True),
    "diffusion.reference_first_pass_next_action": (False, True),
    "diffusion.eval_cfg_scales": (None, [1.5, 1.0]),
    "optim.reference_warmup_from_zero": (False, True),
    "train.steps": (200_000, 1_000_000),
    "train.run_dir": ("runs/scd_m", "runs/scd_m_release"),  # its own runs, never mixed with SCD-M's
}
# the tiny dims the behaviour tests run the two recipes at
SMALL = ["model.width=64", "model.num_heads=2", "model.head_dim=32", "model.rope_axes=[8,12,12]",
         "model.encoder_layers=1", "model.decoder_layers=1", "model.latent_channels=4", "model.latent_height=4",
         "model.latent_width=4", "model.patch_size=2", "data.clip_frames=5"]


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipes(*overrides: str):
    return (load_config("configs/scd_m.yaml", [*SMALL, *overrides]),
            load_config("configs/scd_m_release.yaml", [*SMALL, *overrides]))


def test_release_config_differs_from_scd_m_in_exactly_the_release_quirks():
    ours = flat(to_dict(load_config("configs/scd_m.yaml")))
    release = flat(to_dict(load_config("configs/scd_m_release.yaml")))
    assert ours.keys() == release.keys()
    diff = {k: (ours[k], release[k]) for k in ours if ours[k] != release[k]}
    assert diff == RELEASE_QUIRKS
    assert release["model.encoder_input"] == "noisy" and release["model.fusion"] == "token_concat"


def test_both_recipes_build_identical_initial_weights():
    ours, release = recipes()
    torch.manual_seed(0)
    a = build_model(ours.model).state_dict()
    torch.manual_seed(0)
    b = build_model(release.model).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def paired_models(*overrides: str):
    ours, release = recipes(*overrides)
    torch.manual_seed(0)
    model = build_model(ours.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    quirky = build_model(release.model).eval()
    quirky.load_state_dict(model.state_dict())
    return ours, model, quirky


def test_bf16_rope_collapses_frame_ids_above_256_only():
    ids = torch.tensor([0, 7, 255, 256, 257, 258, 259, 299, 513])
    assert round_through_bf16(ids).tolist() == [0, 7, 255, 256, 256, 258, 260, 300, 512]
    cfg, model, quirky = paired_models()
    m = cfg.model
    # RoPE is relative: it takes two frames, here t and t+1, to see what a frame id changes
    pair = torch.randn(1, 2, m.latent_channels, m.latent_height, m.latent_width)
    act = torch.tensor([[1, 2]])
    at = lambda net, offset: net.encoder(pair, act, frame_offset=offset)  # noqa: E731
    assert torch.equal(at(quirky, 100), at(model, 100))  # below 256 nothing changes
    # frames 256 and 257 share an id in the release, so it sees them as one position
    assert not torch.allclose(at(quirky, 256), at(model, 256), atol=1e-4)


def test_bf16_timesteps_quantize_the_embedding_above_256_only():
    cfg, model, quirky = paired_models()
    m, n = cfg.model, model.decoder.tokens_per_frame
    noisy = torch.randn(1, m.latent_channels, m.latent_height, m.latent_width)
    context, act = torch.randn(1, n, m.width), torch.tensor([2])
    run = lambda net, t: net.decoder(noisy, torch.tensor([t]), context, act)  # noqa: E731
    assert torch.equal(run(quirky, 999.0), run(quirky, 1000.0))  # bf16 steps of 4 above 512
    assert not torch.allclose(run(model, 999.0), run(model, 1000.0), atol=1e-5)
    assert torch.equal(run(quirky, 200.0), run(model, 200.0))


class DecoderInputs(torch.nn.Module):
    """Wraps an SCD model and records what its training forward hands the decoder."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, encoder_latents, encoder_actions, noisy, timesteps, decoder_actions, context_index):
        self.calls.append({"noisy": noisy, "timesteps": timesteps, "actions": decoder_actions,
                           "encoder_latents": encoder_latents})
        return self.model(encoder_latents, encoder_actions, noisy, timesteps, decoder_actions, context_index)


@pytest.mark.parametrize("release", [False, True])
def test_first_decoder_pass_reads_the_next_frames_action_only_under_the_release_switch(release):
    ours, rel = recipes()
    cfg = rel if release else ours
    spy = DecoderInputs(build_model(cfg.model))
    actions = torch.tensor([[0, 1, 2, 3, 0], [3, 3, 1, 0, 2]])
    m = cfg.model
    latents = torch.randn(2, 5, m.latent_channels, m.latent_height, m.latent_width)
    build_objective(cfg.model, cfg.diffusion)(spy, latents, actions)
    k, targets = cfg.diffusion.decoder_multi_batch, [1, 2, 3, 4]
    per_draw = spy.calls[0]["actions"].view(k, 2, len(targets))
    own = actions[:, targets]
    following = torch.cat([actions[:, 2:], actions[:, -1:]], dim=1)  # t+1, the last one repeated
    assert torch.equal(per_draw[0], following if release else own)
    assert torch.equal(per_draw[1], own)  # the second pass uses frame t's own action either way


@pytest.mark.parametrize("release", [False, True])
def test_bf16_inputs_make_noise_and_noisy_frames_bf16_without_rounding_the_noise_levels(release):
    ours, rel = recipes()
    cfg = rel if release else ours
    spy = DecoderInputs(build_model(cfg.model))
    m = cfg.model
    torch.manual_seed(0)
    build_objective(cfg.model, cfg.diffusion)(spy, torch.randn(8, 5, m.latent_channels, m.latent_height,
                                                                m.latent_width), torch.zeros(8, 5, dtype=torch.long))
    call = spy.calls[0]
    assert call["noisy"].dtype == (torch.bfloat16 if release else torch.float32)
    assert call["encoder_latents"].dtype == call["noisy"].dtype
    t = call["timesteps"]
    noised = t[t > 512]
    assert noised.numel() > 0 and torch.equal(noised, noised.round())
    assert bool((noised.remainder(4) != 0).any())  # the labels stay integers, unrounded


def test_release_warmup_starts_at_lr_zero_ours_one_step_in():
    ours, release = load_config("configs/scd_m.yaml"), load_config("configs/scd_m_release.yaml")
    group = {"base_lr": 1e-4, "module": "encoder"}
    w = ours.optim.warmup_steps
    assert expected_lr(group, 0, release.optim) == 0.0
    assert expected_lr(group, 0, ours.optim) == pytest.approx(1e-4 / w)
    assert expected_lr(group, w - 1, release.optim) == pytest.approx(1e-4 * (w - 1) / w)
    assert expected_lr(group, w - 1, ours.optim) == expected_lr(group, w, release.optim) == pytest.approx(1e-4)


def test_release_evaluates_at_guidance_1_5_and_1_0_unless_told_otherwise():
    ours, release = load_config("configs/scd_m.yaml"), load_config("configs/scd_m_release.yaml")
    protocol = build_protocol("minecraft")
    assert guidance_scales(release, protocol) == [1.5, 1.0]
    assert guidance_scales(ours, protocol) == [ours.diffusion.cfg_scale]
    assert guidance_scales(release, build_protocol("minecraft", {"cfg_scale": 3.0})) == [3.0]
