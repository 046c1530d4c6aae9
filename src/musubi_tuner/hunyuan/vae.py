"""The causal 3D VAE (placeholder until the VAE lands: only the scaling factor the trainer needs)."""

SCALING_FACTOR = 0.476986
