"""LoRA training and video generation for HunyuanVideo and SkyReels V1."""

__version__ = "0.1.0"
