"""Which VAE made a set of latents: the identity ``scd-data encode`` records in the manifest, checked
wherever latents meet a VAE (training with ``data.vae_path``, decoding for samples and evaluation,
held-out shards next to training shards).

The identity is the sha256 of the VAE's config and of its weight files, plus its temporal
compression (1: one latent frame per video frame, the only kind the models here read). A manifest
without it is refused unless ``data.allow_unverified_vae`` is true, so an edited or foreign
manifest cannot pass for a verified one.
"""

from __future__ import annotations

import warnings

from scd_train.config import Config
from scd_train.data.manifest import Manifest, ManifestError
from scd_train.errors import ScdWarning

IDENTITY_KEYS = ("config_sha256", "weights_sha256", "temporal_compression")


def missing_identity(vae: dict) -> list[str]:
    return [k for k in IDENTITY_KEYS if not vae.get(k) and vae.get(k) != 0]


def describe(vae: dict) -> str:
    """A short name of a recorded VAE for messages (never 'None')."""
    name = vae.get("id") or vae.get("path") or "an unnamed VAE"
    weights = vae.get("weights_sha256")
    return f"{name}" + (f" (weights {weights[:12]})" if weights else " (no weights hash recorded)")


def check_recorded_identity(manifest: Manifest, cfg: Config, where: str) -> bool:
    """Refuse a manifest that does not say which VAE made it (unless allowed) or records a video VAE.

    Returns whether the identity is complete, i.e. whether VAE comparisons are possible.
    """
    vae = manifest.vae
    temporal = vae.get("temporal_compression")
    if temporal not in (None, 1):
        raise ManifestError(f"{where} records vae.temporal_compression={temporal!r}: latents of a video VAE "
                            "(several video frames per latent frame) are not supported; the models count frames, "
                            "actions and positions per latent frame of an image VAE (temporal_compression 1)")
    missing = missing_identity(vae)
    if not missing:
        return True
    text = ", ".join(f"vae.{k}" for k in missing)
    if not cfg.data.allow_unverified_vae:
        raise ManifestError(f"{where} does not identify the VAE that made its latents ({text} missing); re-encode "
                            "with `scd-data encode`, or set data.allow_unverified_vae=true to use the latents "
                            "without checking which VAE they belong to")
    warnings.warn(f"{where}: {text} missing; data.allow_unverified_vae=true, so the VAE is not checked",
                  ScdWarning, stacklevel=2)
    return False


def compare(folder_info: dict, recorded: dict, folder_label: str, recorded_label: str) -> None:
    """The VAE in a folder against the one a manifest records: config and weights hashes."""
    for key, what in (("config_sha256", "config"), ("weights_sha256", "weights")):
        mine, theirs = folder_info.get(key), recorded.get(key)
        if theirs and mine != theirs:
            raise ManifestError(f"{folder_label} has {what} sha256 {str(mine)[:12]} but {recorded_label} was encoded "
                                f"by {describe(recorded)} with {what} sha256 {theirs[:12]}; point it at the VAE "
                                "that encoded the latents")


def same_vae(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("config_sha256", "weights_sha256"))
