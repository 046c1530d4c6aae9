"""The DiT's flow-matching prediction at a given noise and noise level: one place for training and validation.

noisy = (1 - sigma) * x0 + sigma * noise; the DiT predicts the velocity noise - x0. training_step calls it
with the noise and levels it draws; validation with fixed ones.
"""

from __future__ import annotations

import torch

from musubi_tuner.hunyuan.dit import HunyuanVideoDiT


def predict_velocity(dit: HunyuanVideoDiT, latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, timesteps: torch.Tensor,
                     batch: dict, accelerator, guidance_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target), both (B, 16, F, H, W) float32, for scaled clean latents noised to `sigma` (B,).

    `batch` gives the text: `llm`, `llm_mask`, `clipL`. For a SkyReels I2V DiT (twice the latent channels)
    the clean first latent frame is concatenated to the input, as that model was trained.
    """
    device = accelerator.device
    B = latents.shape[0]
    s = sigma.view(B, 1, 1, 1, 1)
    model_input = (1.0 - s) * latents + s * noise
    if dit.config.in_channels == 2 * latents.shape[1]:  # SkyReels I2V: the clean first frame conditions the rest
        image_latents = torch.zeros_like(latents)
        image_latents[:, :, :1] = latents[:, :, :1]
        model_input = torch.cat([model_input, image_latents], dim=1)
    guidance = torch.full((B,), guidance_value, device=device, dtype=torch.float32)
    with accelerator.autocast():
        pred = dit(model_input, timesteps, batch["llm"].to(device), batch["llm_mask"].to(device), batch["clipL"].to(device), guidance)
    return pred.float(), noise - latents
