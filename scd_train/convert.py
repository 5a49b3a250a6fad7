"""``scd-convert``: initialise an SCD model from a trained dense causal baseline.

    scd-convert runs/dense --encoder-layers 4 --decoder-layers 0,5 --out runs/converted
    scd-train --config runs/converted/finetune.yaml

The encoder takes the dense model's first k blocks; the decoder takes any chosen blocks (the
paper's split of a pretrained model: the first a plus the last b) together with the dense
model's output head. Both take the patch, timestep and action embeddings. The encoder's output
modulation starts at zero, as in a freshly built SCD encoder: the dense output head was trained to
read the last layer, not to hand layer-k features to a decoder.

A leave-one-out layer-importance report (held-out loss with each layer skipped) helps choose the
split; ``--importance-only`` writes just that. The fine-tune config merges the dense run's config,
the recipe (default: configs/convert_finetune.yaml) and the new model shape, and points
``train.init_from`` at the converted weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import save_file

from scd_train.cli import command
from scd_train.config import Config, ConfigError, config_from_text, dump_yaml, to_dict
from scd_train.models.causal_dit import CausalDiT
from scd_train.models.scd import SCDModel

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "convert_finetune.yaml"
SHARED_EMBEDDINGS = ("patch_embed.", "time_embed.", "action_embed.")


def parse_layer_spec(spec: str) -> list[int]:
    """'0-1,10-11' -> [0, 1, 10, 11]."""
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            if "-" in part:
                start, end = (int(v) for v in part.split("-", 1))
                layers += list(range(start, end + 1))
            else:
                layers.append(int(part))
        except ValueError:
            raise ConfigError(f"decoder layer spec {spec!r}: {part!r} is not an index or a range like 3-5") from None
    return layers


def check_split(dense_layers: int, encoder_layers: int, decoder_layers: list[int]) -> None:
    if not 1 <= encoder_layers <= dense_layers:
        raise ConfigError(f"--encoder-layers={encoder_layers} must be in [1, {dense_layers}] (the dense model's depth)")
    if not decoder_layers:
        raise ConfigError("--decoder-layers is empty; name at least one dense layer")
    bad = [i for i in decoder_layers if not 0 <= i < dense_layers]
    if bad:
        raise ConfigError(f"--decoder-layers {bad} out of range for a {dense_layers}-layer dense model")
    if len(set(decoder_layers)) != len(decoder_layers):
        raise ConfigError(f"--decoder-layers {decoder_layers} repeats a layer")


def conversion_map(encoder_layers: int, decoder_layers: list[int]) -> dict[str, str]:
    """SCD parameter-name prefix -> dense parameter-name prefix it is copied from."""
    mapping = {}
    for part in ("encoder", "decoder"):
        for name in SHARED_EMBEDDINGS:
            mapping[f"{part}.{name}"] = name
    for i in range(encoder_layers):
        mapping[f"encoder.blocks.{i}."] = f"blocks.{i}."
    for j, src in enumerate(decoder_layers):
        mapping[f"decoder.blocks.{j}."] = f"blocks.{src}."
    mapping["decoder.output_norm."] = "output_norm."
    mapping["decoder.proj_out."] = "proj_out."
    return mapping


def scd_config_from_dense(dense: Config, encoder_layers: int, decoder_layers: list[int]) -> Config:
    raw = to_dict(dense)
    raw["model"].update(arch="scd", encoder_layers=encoder_layers, decoder_layers=len(decoder_layers))
    return config_from_text(yaml.safe_dump(raw))


@torch.no_grad()
def convert(dense: CausalDiT, scd_cfg: Config, encoder_layers: int, decoder_layers: list[int]
            ) -> tuple[SCDModel, dict[str, str]]:
    """The SCD model and {scd parameter: dense parameter} for every copied tensor."""
    if not isinstance(dense, CausalDiT):
        raise TypeError(f"conversion needs a dense causal model, got {type(dense).__name__}")
    check_split(len(dense.blocks), encoder_layers, decoder_layers)
    scd = SCDModel(scd_cfg.model)
    source = dense.state_dict()
    copied = {}
    for name, tensor in scd.state_dict().items():
        for prefix, src_prefix in conversion_map(encoder_layers, decoder_layers).items():
            if name.startswith(prefix):
                src = src_prefix + name[len(prefix):]
                if source[src].shape != tensor.shape:
                    raise ValueError(f"{name} {tuple(tensor.shape)} cannot take {src} {tuple(source[src].shape)}")
                tensor.copy_(source[src])
                copied[name] = src
                break
    return scd.to(next(dense.parameters()).device), copied


def finetune_config(dense: Config, scd_cfg: Config, recipe: Path, weights: Path, run_dir: Path) -> Config:
    """Dense run config <- recipe <- the SCD model shape and the converted weights."""
    if not recipe.is_file():
        raise FileNotFoundError(f"fine-tune recipe {recipe} does not exist")
    merged = OmegaConf.merge(OmegaConf.create(to_dict(dense)), OmegaConf.create(yaml.safe_load(recipe.read_text())),
                             OmegaConf.create({"model": to_dict(scd_cfg)["model"],
                                               "train": {"init_from": str(weights), "run_dir": str(run_dir)}}))
    try:
        return config_from_text(yaml.safe_dump(OmegaConf.to_container(merged)))
    except ConfigError as exc:
        raise ConfigError(f"{recipe}: {exc}") from None


def write_weights(model: SCDModel, cfg: Config, path: Path, metadata: dict[str, str]) -> Path:
    """safetensors with the config in its metadata, loadable by scd-sample/scd-eval and train.init_from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    weights = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp), metadata={"config": yaml.safe_dump(to_dict(cfg), sort_keys=False), **metadata})
    tmp.replace(path)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scd-convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("source", type=Path, help="dense baseline run directory or exported .safetensors")
    p.add_argument("--checkpoint", help="checkpoint directory (default: newest complete)")
    p.add_argument("--raw", action="store_true", help="convert the raw weights instead of the EMA")
    p.add_argument("--encoder-layers", type=int, help="k: the encoder is the dense model's first k layers")
    p.add_argument("--decoder-layers", help="dense layers for the decoder, e.g. '0-1,10-11'")
    p.add_argument("--importance-only", action="store_true", help="write the layer-importance report only")
    p.add_argument("--importance-clips", type=int, default=8, help="held-out clips for the importance report "
                   "(0 skips it)")
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="fine-tune recipe YAML")
    p.add_argument("--out", type=Path, help="default: <source run directory>/converted")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def importance_report(model: CausalDiT, cfg: Config, clips: int, device: str) -> dict:
    from scd_train.eval.clips import holdout_eval_clips, stack_clips
    from scd_train.eval.layer_importance import layer_importance

    held, _ = holdout_eval_clips(cfg, cfg.data.clip_frames, clips)
    latents, actions = stack_clips(held, cfg.data.clip_frames)
    report = layer_importance(model, cfg, latents.to(device), None if actions is None else actions.to(device))
    print("layer  loss without it  increase")
    for row in report["layers"]:
        print(f"{row['layer']:5d}  {row['loss_without']:15.5f}  {row['increase']:+.5f}")
    print(f"full model: {report['full_model_loss']:.5f}; least important first: {report['least_important_first']}")
    return report


def run(args: argparse.Namespace) -> int:
    from scd_train.eval.report import write_json
    from scd_train.parallel.runtime import check_device_option
    from scd_train.weights import load_model

    if args.importance_clips < 0:
        raise ConfigError(f"--importance-clips {args.importance_clips} must be >= 0")
    check_device_option(args.device)
    dense, cfg = load_model(args.source, args.checkpoint, use_ema=not args.raw, device=args.device)
    if cfg.model.arch != "causal_dit":
        raise ConfigError(f"{args.source} holds a model.arch={cfg.model.arch!r} model; scd-convert reads a dense "
                          "causal baseline (model.arch='causal_dit')")
    out = args.out or (args.source if args.source.is_dir() else args.source.parent) / "converted"
    if args.importance_clips > 0:
        write_json(importance_report(dense, cfg, args.importance_clips, args.device), out / "layer_importance.json")
    if args.importance_only:
        return 0
    if args.encoder_layers is None or args.decoder_layers is None:
        raise ConfigError("give --encoder-layers and --decoder-layers (or --importance-only)")
    decoder_layers = parse_layer_spec(args.decoder_layers)
    check_split(cfg.model.layers, args.encoder_layers, decoder_layers)
    scd_cfg = scd_config_from_dense(cfg, args.encoder_layers, decoder_layers)
    scd, copied = convert(dense, scd_cfg, args.encoder_layers, decoder_layers)
    weights = write_weights(scd, scd_cfg, out / "scd_init.safetensors",
                            {"source": str(args.source), "weights": "converted from a dense baseline"})
    tune = finetune_config(cfg, scd_cfg, args.recipe, weights, out / "finetune")
    dump_yaml(tune, out / "finetune.yaml")
    fresh = [n for n in scd.state_dict() if n not in copied]
    write_json({"source": str(args.source), "encoder_layers": list(range(args.encoder_layers)),
                "decoder_layers": decoder_layers, "copied": copied, "initialised_fresh": fresh},
               out / "conversion.json")
    print(f"wrote {weights} ({len(copied)} tensors copied, {len(fresh)} fresh); fine-tune with:\n"
          f"  scd-train --config {out / 'finetune.yaml'}")
    return 0


@command("scd-convert")
def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
