"""Validation during training: the loss on held-out items at fixed noise levels with fixed noise.

The training loss of a diffusion model jumps with every random noise level, so it hardly shows
progress. Here each held-out item is noised to the same levels (the midpoints of `count` equal
intervals of [0, 1]: 0.05, 0.15, ... 0.95 by default) with the same noise at every evaluation, so the
number moves only when the LoRA does. The loss is the plain MSE of the velocity (no loss weighting),
per level and averaged over levels.

The LoRA's effect is measured on the same items: how far the DiT's prediction moves with the LoRA
against without it (multiplier 0), ||v_lora - v_base|| / ||v_base|| at the middle noise level. It is 0
for a fresh LoRA (its up weights start at zero) and tells "my LoRA does nothing" from "my LoRA
learned nothing useful".

Evaluation leaves training untouched: the noise comes from its own seeded generator, the global RNG
states are restored afterwards, dropout is off. With several processes each evaluates every world-th
batch and the sums are reduced, so every process gets the same numbers, equal to a one-process run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from musubi_tuner.data.training_dataset import BatchPlan, load_batch
from musubi_tuner.errors import SharedError, UserError
from musubi_tuner.hunyuan.vae import SCALING_FACTOR
from musubi_tuner.training.flow_matching import predict_velocity
from musubi_tuner.networks.lora_metadata import OURS
from musubi_tuner.training.optimizers import is_schedule_free
from musubi_tuner.training.timesteps import TimestepConfig, model_timesteps

logger = logging.getLogger(__name__)

DEFAULT_LEVELS = 10
MEASURE = OURS + "validation_measure"  # a saved LoRA's metadata: how its validation loss was measured (Validator.measure)


def noise_levels(count: int = DEFAULT_LEVELS) -> torch.Tensor:
    """(count,) float32: the midpoints of `count` equal intervals of [0, 1] (deciles for 10)."""
    return (torch.arange(count, dtype=torch.float32) + 0.5) / count


@dataclass(frozen=True)
class ValidationResult:
    step: int
    loss: float  # mean over the noise levels
    per_level: tuple[tuple[float, float], ...]  # (sigma, mean MSE over the items)
    lora_effect: float | None  # relative change of the prediction; None if the network has no multiplier
    seconds: float

    def logs(self) -> dict[str, float]:
        """TensorBoard tags: validation/loss, validation/loss_t0050 (sigma 0.05), ..., lora_effect/prediction."""
        logs = {"validation/loss": self.loss}
        tags = [f"validation/loss_t{round(sigma * 1000):04d}" for sigma, _ in self.per_level]
        if len(set(tags)) < len(tags):  # more than 500 levels: some round to one tag and overwrote each other (fuzz_ak 6)
            tags = [f"validation/loss_t{round(sigma * 10000):05d}" for sigma, _ in self.per_level]
        logs.update({tag: loss for tag, (_, loss) in zip(tags, self.per_level)})
        if self.lora_effect is not None:
            logs["lora_effect/prediction"] = self.lora_effect
        return logs

    def line(self) -> str:
        digits = 2 if len(self.per_level) <= 50 else 4  # (1,000 levels showed "0.00: ..., 0.00: ...")
        levels = ", ".join(f"{sigma:.{digits}f}: {loss:.4f}" for sigma, loss in self.per_level)
        effect = f"; LoRA moves the prediction by {self.lora_effect:.2%}" if self.lora_effect is not None else ""
        return f"validation at step {self.step}: loss {self.loss:.4f} (by noise level {levels}){effect} [{self.seconds:.1f} s]"


@contextmanager
def evaluation_mode(network, optimizer=None, device: torch.device | None = None):
    """No gradients, no dropout, the averaged weights of a schedule-free optimizer (pass it only if it is
    in training mode), and the global RNG states as they were before: training goes on as if nothing ran."""
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    was_training = network.training
    switch = optimizer is not None and is_schedule_free(optimizer)
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        network.eval()
        if switch:
            optimizer.eval()
        try:
            yield
        finally:
            if switch:
                optimizer.train()
            network.train(was_training)


class Validator:
    """Computes the validation loss of the DiT + network on fixed batches."""

    def __init__(self, batches: list[BatchPlan], ts_cfg: TimestepConfig, guidance_value: float, *, levels: int = DEFAULT_LEVELS,
                 seed: int = 0):
        if not batches:
            raise ValueError("no validation batches")
        self.batches = batches
        self.ts_cfg = ts_cfg
        self.guidance_value = guidance_value
        self.levels = noise_levels(levels)
        self.seed = seed
        self.effect_level = levels // 2
        self._item_losses: list[tuple[list[str], torch.Tensor]] = []  # the last partial_sums' (item names, per-item losses)

    @property
    def measure(self) -> dict:
        """What two validation losses must share to compare: the held-out batches (their cache files by name, in
        order: batch b's noise is seeded with seed + b), the noise levels, the seed, the guidance given to the DiT and
        the timestep convention. Recorded in the training state and in each saved LoRA's metadata."""
        batches = "\n".join(",".join(item.latent_path.name for item in b.items) for b in self.batches)
        return {"levels": len(self.levels), "seed": self.seed, "guidance": self.guidance_value,
                "sigma_timesteps": self.ts_cfg.mode == "sigma",
                "held_out": f"{sum(len(b.items) for b in self.batches)} items, {hashlib.sha256(batches.encode()).hexdigest()[:12]}"}

    def partial_sums(self, dit, network, accelerator, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Sums over this process's share of the batches (every world-th): (2 * levels + 2,) float64 on the
        accelerator's device = [squared error per level, items per level, ||v_lora - v_base||², ||v_base||²].

        Call inside `evaluation_mode`. Batch b's noise comes from a generator seeded with seed + b, so the
        numbers do not depend on how the batches are shared out."""
        device = accelerator.device
        n = len(self.levels)
        sums = torch.zeros(2 * n + 2, dtype=torch.float64, device=device)
        multiplier = getattr(network, "multiplier", None)
        self._item_losses = []
        for b in range(rank, len(self.batches), world):
            batch = load_batch(self.batches[b])
            latents = batch["latents"].to(device, torch.float32) * SCALING_FACTOR
            B = latents.shape[0]
            generator = torch.Generator().manual_seed((self.seed + b) % 2**64)  # (every seed the flag takes: past 2^64 - b,
            # "Overflow when unpacking long long" after the DiT had loaded: fuzz_ak 4)
            for j, level in enumerate(self.levels):
                noise = torch.randn(latents.shape, generator=generator).to(device)
                sigma = torch.full((B,), level.item(), device=device)
                timesteps = model_timesteps(self.ts_cfg, sigma)
                pred, target = predict_velocity(dit, latents, noise, sigma, timesteps, batch, accelerator, self.guidance_value)
                per_item = (pred - target).square().mean(dim=(1, 2, 3, 4))
                self._item_losses.append((batch["item_names"], per_item.detach()))  # (read only if the sum is not finite)
                sums[j] += per_item.sum().double()
                sums[n + j] += B
                if j == self.effect_level and multiplier is not None and hasattr(network, "set_multiplier"):
                    network.set_multiplier(0.0)
                    try:
                        base, _ = predict_velocity(dit, latents, noise, sigma, timesteps, batch, accelerator, self.guidance_value)
                    finally:
                        network.set_multiplier(multiplier)
                    sums[2 * n] += (pred - base).square().sum().double()
                    sums[2 * n + 1] += base.square().sum().double()
        return sums

    def evaluate(self, dit, network, accelerator, step: int, optimizer=None, layout=None) -> ValidationResult:
        """The validation loss of the current weights; the same on every process.

        With a `layout` (distributed.Layout) the replicas share out the batches and the processes of a
        context-parallel group evaluate theirs together (each gets the group's sums)."""
        started = time.perf_counter()
        rank, world, copies = accelerator.process_index, accelerator.num_processes, 1
        if layout is not None:
            rank, world, copies = layout.replica, layout.replicas, layout.context_parallel
        with evaluation_mode(network, optimizer, accelerator.device):
            sums = self.partial_sums(dit, network, accelerator, rank, world)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum") / copies
        sums = sums.cpu()
        n = len(self.levels)
        per_level = tuple((round(level.item(), 6), (sums[j] / sums[n + j]).item()) for j, level in enumerate(self.levels))
        effect = math.sqrt(sums[2 * n].item() / sums[2 * n + 1].item()) if sums[2 * n + 1] > 0 else None
        loss = sum(v for _, v in per_level) / n
        if not math.isfinite(loss):  # (the same on every process: each raises; the LoRA's own finiteness is the step's check)
            items = sorted({name for names, losses in self._item_losses
                            for name, finite in zip(names, torch.isfinite(losses).tolist()) if not finite})
            named = (f"{', '.join(items[:4])}{', ...' if len(items) > 4 else ''}" if items else
                     "items evaluated by another process")
            raise SharedError(f"validation loss is {loss} at step {step}: the loss of {named} is not finite (values in their "
                              f"caches past what the model can hold, or an fp16 overflow); check those caches, or run "
                              f"cache_latents.py and cache_text_encoder_outputs.py again")
        return ValidationResult(step, loss, per_level, effect, time.perf_counter() - started)


class Validation:
    """When validation runs in a training run, where its numbers go, and which saved checkpoint is best.

    It runs before the first step, every --validate_every_n_steps / --validate_every_n_epochs, and at
    every save (so every LoRA file carries its validation loss and the best one can be named).
    """

    def __init__(self, validator: Validator, *, dit, network, optimizer, accelerator, losses, every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, layout=None):
        self.validator = validator
        self.dit, self.network, self.optimizer, self.accelerator, self.layout = dit, network, optimizer, accelerator, layout
        self.losses = losses  # LossHistory: validation points go into the loss curve
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.last: ValidationResult | None = None
        self.saved: list[tuple[Path, ValidationResult]] = []

    def run(self, step: int, *, optimizer_in_eval_mode: bool = False) -> ValidationResult:
        """Evaluate at `step` (once per step: the weights do not change between steps), log, record."""
        if self.last is not None and self.last.step == step:
            return self.last
        result = self.validator.evaluate(self.dit, self.network, self.accelerator, step,
                                         optimizer=None if optimizer_in_eval_mode else self.optimizer, layout=self.layout)
        self.last = result
        self.losses.add(step, result.loss, kind="validation")
        self.accelerator.log(result.logs(), step=step)
        if self.accelerator.is_main_process:
            logger.info(result.line())
        return result

    def after_step(self, step: int) -> None:
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.run(step)

    def after_epoch(self, epoch: int, step: int) -> None:
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            self.run(step)

    def checkpoint_metadata(self, step: int, path: Path) -> dict[str, str]:
        """Called by the saver before it writes `path` (the optimizer already shows its averaged weights):
        this file's validation loss and the best file so far, it included."""
        result = self.run(step, optimizer_in_eval_mode=True)
        self.saved = [(p, r) for p, r in self.saved if p != path] + [(path, result)]
        best_path, best = self.best()
        meta = {OURS + "validation_loss": f"{result.loss:.6g}", OURS + "best_checkpoint": best_path.name,
                OURS + "best_validation_loss": f"{best.loss:.6g}", OURS + "best_step": str(best.step),
                MEASURE: json.dumps(self.validator.measure, sort_keys=True)}
        if result.lora_effect is not None:
            meta[OURS + "lora_effect"] = f"{result.lora_effect:.6g}"
        return meta

    def recall_saved(self, folder: Path, name: str, up_to_step: int) -> None:
        """On resume: the LoRA files an earlier run saved (with their validation loss), so the best is named among all:
        those on disk, and the best one they name that --save_last_n_* removed since (its loss and step are in the later
        files' metadata: fuzz_ak 2). Files validated otherwise (other held-out items, levels or seed: their metadata's
        measure) are not compared (fuzz_ak 7); files saved before the measure was recorded are."""
        from musubi_tuner.files import lora_file_names, read_safetensors_header

        own = lora_file_names(name)  # (this run's files only: a glob of "tin*" took "tin_v2"'s best: fuzz_ak 1)
        measure = json.dumps(self.validator.measure, sort_keys=True)
        named_best: dict[str, tuple[float, int]] = {}  # a file's name -> (loss, step), as a later file names it best
        other_measure = []
        for path in sorted(Path(folder).glob("*.safetensors")):
            if path.name.endswith(".comfyui.safetensors") or not own.fullmatch(path.name):
                continue
            try:
                _, meta = read_safetensors_header(path)
                loss, step = float(meta[OURS + "validation_loss"]), int(meta["ss_steps"])
                if not math.isfinite(loss):  # (-inf, written by something else, was "the best" for ever: fuzz_ar 16)
                    raise ValueError(loss)
            except (UserError, KeyError, ValueError):  # unreadable, or saved without validation
                continue
            if step > up_to_step:
                continue
            if meta.get(MEASURE, measure) != measure:
                other_measure.append(path.name)
                continue
            self.saved.append((path, ValidationResult(step, loss, (), None, 0.0)))
            try:
                best = (float(meta[OURS + "best_validation_loss"]), int(meta[OURS + "best_step"]))
            except (KeyError, ValueError):
                continue
            if math.isfinite(best[0]):
                named_best[meta[OURS + "best_checkpoint"]] = best
        on_disk = {p.name for p, _ in self.saved}
        for file_name, (loss, step) in named_best.items():
            if file_name not in on_disk and own.fullmatch(file_name) and step <= up_to_step:
                self.saved.append((Path(folder) / file_name, ValidationResult(step, loss, (), None, 0.0)))
        self.saved.sort(key=lambda s: s[1].step)
        if other_measure and self.accelerator.is_main_process:
            logger.warning("%s: validated otherwise than this run validates (another validation set-up in the earlier run): "
                           "not compared for the best checkpoint", ", ".join(other_measure[:4]) + (", ..." if len(other_measure) > 4 else ""))

    def best(self) -> tuple[Path, ValidationResult] | None:
        """The saved file of lowest validation loss; of equals (the same weights saved twice), the latest."""
        return min(reversed(self.saved), key=lambda s: s[1].loss) if self.saved else None

    def report_best(self) -> None:
        found = self.best()
        if found is None or not self.accelerator.is_main_process:
            return
        path, result = found
        note = "" if path.exists() else " (since removed by --save_last_n_*)"
        logger.info("best checkpoint by validation loss: %s%s, loss %.4f at step %d", path, note, result.loss, result.step)
