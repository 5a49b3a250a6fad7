"""``scd-data``: make latent datasets for scd-train (synthetic videos, a small VAE, encoding, checks)."""
