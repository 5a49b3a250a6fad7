"""Flow matching: noising, timesteps, losses, samplers and guidance."""
