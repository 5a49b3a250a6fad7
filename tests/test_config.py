from pathlib import Path

import pytest

from scd_train.config import ConfigError, config_from_text, dump_yaml, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.width == cfg.model.num_heads * cfg.model.head_dim


def test_unknown_key_names_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"optim\.decoder_lr_ration.*decoder_lr_ratio"):
        config_from_text("optim:\n  decoder_lr_ration: 2.0\n")


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="optimm.*optim"):
        config_from_text("optimm:\n  lr: 1.0\n")


def test_dotted_overrides_are_typed():
    cfg = load_config("configs/tiny.yaml", ["optim.decoder_lr_ratio=3.0", "model.encoder_layers=2",
                                            "train.precision=bf16"])
    assert cfg.optim.decoder_lr_ratio == 3.0 and isinstance(cfg.optim.decoder_lr_ratio, float)
    assert cfg.model.encoder_layers == 2
    assert cfg.train.precision == "bf16"


def test_wrong_type_and_choice_name_the_key():
    with pytest.raises(ConfigError, match="model.encoder_layers"):
        load_config("configs/tiny.yaml", ["model.encoder_layers=many"])
    with pytest.raises(ConfigError, match="model.fusion"):
        load_config("configs/tiny.yaml", ["model.fusion=sum"])


def test_cross_field_validation_says_what_to_change():
    with pytest.raises(ConfigError, match="model.rope_axes"):
        load_config("configs/tiny.yaml", ["model.rope_axes=[8,8,8]"])
    with pytest.raises(ConfigError, match="width"):
        load_config("configs/tiny.yaml", ["model.width=100"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises((ConfigError, FileNotFoundError), match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_dump_round_trips(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["optim.lr=0.003"])
    dump_yaml(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
