"""Running training jobs on clusters: SLURM through submitit, one task per GPU, no ssh."""
