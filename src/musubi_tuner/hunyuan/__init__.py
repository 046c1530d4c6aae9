"""The HunyuanVideo model family in the official parameter layout: DiT, causal 3D VAE, text encoders."""
