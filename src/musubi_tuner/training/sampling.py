"""Samples during training (--sample_prompts): the prompts at fixed seeds with the DiT + LoRA being trained.

Every evaluation writes each sample (mp4, or PNG for one frame) to output_dir/sample under musubi-tuner's
names, and one grid PNG, rows = prompts, columns = first, middle and last frame, so evaluations compare
side by side. The prompts are encoded once at start-up and the text encoders freed; the VAE waits in host
memory between evaluations.

The LoRA's effect on the samples: ||x_lora - x_base|| / ||x_base|| of the final latents, where x_base is the
same prompt, seed and step count with the LoRA at multiplier 0. The base DiT is frozen, so x_base is
computed once, at the first evaluation.
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import logging
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from musubi_tuner.dtypes import str_to_dtype
from musubi_tuner.errors import UserError
from musubi_tuner.distributed import patient_wait
from musubi_tuner.files import atomic_write, require_file
from musubi_tuner.hunyuan.vae import VAEConfig
from musubi_tuner.inference import step_cache
from musubi_tuner.inference.sampler import Guidance, denoise, initial_noise, sigma_schedule
from musubi_tuner.inference.step_cache import StepCache
from musubi_tuner.training.sample_prompts import SamplePrompt, load_sample_prompts
from musubi_tuner.training.validation import evaluation_mode

logger = logging.getLogger(__name__)

LABEL_HEIGHT = 14  # a text line above each row of the grid
CELL_GAP = 2
GRID_COLUMNS = ("first", "middle", "last")
MOST_LABEL_LINES = 4


def _free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _uses_cfg(p: SamplePrompt) -> bool:
    """Real CFG, as musubi-tuner samples: a negative prompt (--n) and a scale (--l) other than 1; either alone is
    said to be ignored when the file is read (SamplePrompt.normalised)."""
    return bool(p.negative_prompt) and p.cfg_scale is not None and p.cfg_scale != 1.0


def encode_texts(texts: list[str], args, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """text -> {text_states (1, 256, D), text_mask (1, 256), text_states_2 (1, D2)} on the CPU; one encoder in memory at a time."""
    from musubi_tuner.hunyuan.text_encoders import load_text_encoder1, load_text_encoder2

    dtype = str_to_dtype(args.text_encoder_dtype, torch.float16 if device.type == "cuda" else torch.float32, "--text_encoder_dtype")
    te1 = load_text_encoder1(args.text_encoder1, dtype=dtype, device=device, fp8=args.fp8_llm)
    states, mask = _in_batches(te1, texts)
    _free(te1)
    te2 = load_text_encoder2(args.text_encoder2, dtype=dtype, device=device)
    pooled, _ = _in_batches(te2, texts)
    _free(te2)
    return {t: {"text_states": states[i : i + 1], "text_mask": mask[i : i + 1], "text_states_2": pooled[i : i + 1]}
            for i, t in enumerate(texts)}


TEXTS_PER_BATCH = 8  # the sample prompts go through a text encoder this many at a time


def _in_batches(encoder, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """encoder.encode(texts), TEXTS_PER_BATCH at a time, the outputs gathered on the CPU: all at once, the encoder's
    activations grew with the prompt file (3.2 GB for 2,000 prompts with a toy LLM: fuzz_am 9). Each prompt's output is
    padded to the encoder's fixed length, so the batches change no number."""
    from musubi_tuner.data.items import chunks

    parts = [encoder.encode(batch) for batch in chunks(texts, TEXTS_PER_BATCH)]
    return tuple(torch.cat([part[j].cpu() for part in parts]) for j in range(2))


LOGGED_PIXELS = 16_000_000  # a grid larger than this goes to TensorBoard reduced (its file keeps every pixel)


def _undecodable(latent: torch.Tensor) -> str | None:
    """Why a sampled latent cannot be decoded into a video (NaN/inf, or far past any VAE latent), None when it can: a huge
    finite one was written as a video of noise, exit 0, where hv_generate_video refuses it (fuzz_bb 1)."""
    from musubi_tuner.hunyuan.vae import LATENT_FAR

    if not bool(torch.isfinite(latent).all()):
        return "holds NaN/inf values"
    largest = float(latent.abs().max()) if latent.numel() else 0.0
    return f"reaches {largest:.3g}, where a VAE's latents stay within a few units" if largest > LATENT_FAR else None


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Where sample_grid draws: its size, the text lines of its title and of each row's label (wrapped to the grid's
    width: a label drawn as one line was cut at the image's edge, fuzz_ao 11), and the top of each row's cells."""

    width: int
    height: int
    title: list[str]
    labels: list[list[str]]
    cell_tops: list[int]


def grid_layout(title: str, labels: list[str], cell_w: int, cell_h: int) -> GridLayout:
    width = len(GRID_COLUMNS) * (cell_w + CELL_GAP) + CELL_GAP
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_lines = _wrapped(measure, title, width - 2 * CELL_GAP, most=3)
    label_lines = [_wrapped(measure, label, width - 2 * CELL_GAP, most=MOST_LABEL_LINES) for label in labels]
    tops, y = [], LABEL_HEIGHT * len(title_lines)
    for lines in label_lines:
        tops.append(y + LABEL_HEIGHT * len(lines))
        y = tops[-1] + cell_h + CELL_GAP
    return GridLayout(width, y, title_lines, label_lines, tops)


def _wrapped(draw: ImageDraw.ImageDraw, text: str, width: int, most: int) -> list[str]:
    """`text` in lines no wider than `width` pixels, broken at spaces (a word wider than the line, anywhere), at most
    `most` lines, the last one ending in "..." when some is left out."""
    lines, line = [], ""
    for word in " ".join(text.split()).split(" "):  # (a prompt's newline: Pillow measures no multiline text: fuzz_au 1)
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while draw.textlength(word) > width and len(word) > 1:  # a word wider than the line: cut where it fills it
            cut = next((i for i in range(len(word) - 1, 0, -1) if draw.textlength(word[:i]) <= width), 1)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    lines.append(line)
    if len(lines) > most:
        last = lines[most - 1]
        while last and draw.textlength(last + "...") > width:
            last = last[:-1]
        lines = lines[:most - 1] + [last + "..."]
    return lines


def sample_grid(rows: list[tuple[str, np.ndarray]], title: str) -> Image.Image:
    """One row per sample: its label, then its first, middle and last frame ((F, H, W, 3) uint8 each).
    A one-frame sample fills the first column only. Cells are as large as the largest sample."""
    cell_w = max(frames.shape[2] for _, frames in rows)
    cell_h = max(frames.shape[1] for _, frames in rows)
    layout = grid_layout(title, [label for label, _ in rows], cell_w, cell_h)
    grid = Image.new("RGB", (layout.width, layout.height), (48, 48, 48))
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(layout.title):
        draw.text((CELL_GAP, 1 + i * LABEL_HEIGHT), line, fill="white")
    for (_, frames), lines, top in zip(rows, layout.labels, layout.cell_tops):
        for i, line in enumerate(lines):
            draw.text((CELL_GAP, top - LABEL_HEIGHT * (len(lines) - i) + 1), line, fill="white")
        picks = [0, (len(frames) - 1) // 2, len(frames) - 1] if len(frames) > 1 else [0]
        for c, f in enumerate(picks):
            grid.paste(Image.fromarray(frames[f]), (CELL_GAP + c * (cell_w + CELL_GAP), top))
    return grid


def grid_name(output_name: str, tag: str) -> str:
    """The grid of one evaluation: `tag` is its step (000500) or its epoch (e000002)."""
    return f"{output_name}_{tag}_grid.png"


def grid_names(output_name: str) -> re.Pattern:
    """The names of every grid a run of `output_name` writes (not another run's: "lora" is not "lora-big")."""
    return re.compile(rf"{re.escape(output_name)}_(?:e\d+|\d+)_grid\.png")  # (grid_name's, of any tag)


def sample_prompts_for(path, in_channels: int) -> list[SamplePrompt]:
    """The prompts of --sample_prompts as a DiT of `in_channels` input channels samples them: read before any model
    loads, by the run and by its --dry_run (which had passed a file the run refused: fuzz_aj 4)."""
    from musubi_tuner.data.media import load_image

    prompts = load_sample_prompts(path)
    if in_channels != 32 and any(p.image_path for p in prompts):  # (a SkyReels I2V run's prompt file reused: its first
        # frames fed a 16-channel DiT 32 channels, a traceback at the first sample; musubi-tuner ignores them)
        for p in prompts:
            if p.image_path:
                logger.warning("%s: prompt %d: --i is for an image-to-video DiT (32 input channels); ignored for this "
                               "%d-channel DiT, as musubi-tuner ignores it", path, p.index + 1, in_channels)
        prompts = [dataclasses.replace(p, image_path=None) for p in prompts]
    if in_channels == 32 and any(p.image_path is None for p in prompts):
        missing = next(p for p in prompts if p.image_path is None)
        raise UserError(f"{path}: an image-to-video DiT needs a first frame for every sample prompt (--i image.png); prompt "
                        f"{missing.index + 1} has none")
    for p in prompts:
        if p.image_path:  # read now, not after the models load; a folder, a link to nothing, a truncated image tied to
            try:          # the prompt that names it (fuzz_aj 5)
                require_file(p.image_path, "image")
                load_image(p.image_path)
            except UserError as e:
                raise UserError(f"{path}: prompt {p.index + 1} (--i): {e}") from None
    return prompts


class TrainingSampler:
    """Generates the sample prompts during training, on the main process (the others wait). With context parallel the
    processes of the main one's group run the DiT together (each holds part of the tokens); the main one writes."""

    def __init__(self, args, accelerator, *, in_channels: int, seed: int, layout=None):
        self.args, self.accelerator = args, accelerator
        shared = layout is not None and layout.context_parallel > 1
        self.participates = accelerator.is_main_process or (shared and layout.replica == 0)
        self.prompts = sample_prompts_for(args.sample_prompts, in_channels)
        self.seeds = [p.seed if p.seed is not None else seed + p.index for p in self.prompts]  # fixed for the whole run
        from musubi_tuner.training.checkpointing import check_names_fit

        check_names_fit(args.output_dir, args.output_name, self.seeds)  # a seed of 19 digits makes a long sample name
        self.every_n_steps, self.every_n_epochs = args.sample_every_n_steps, args.sample_every_n_epochs
        self.folder = Path(args.output_dir) / "sample"
        self.base_latents: dict[int, torch.Tensor] = {}  # prompt index -> final latents at multiplier 0
        self.last_step: int | None = None
        # a resumed run replays the steps a stopped run made after its state: their samples replace that run's
        self.replaces_earlier = False
        self.texts: dict = {}
        self.vae = None
        self.image_latents: dict[int, torch.Tensor] = {}
        if accelerator.is_main_process:
            device = accelerator.device
            # Whatever building the encoders and the VAE draws from the global RNG (nothing today), training's draws stay as they were.
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                self._prepare()
        if shared:  # the encoders ran once; the group's other processes get the embeddings (and I2V latents)
            from musubi_tuner.distributed import broadcast_tensors, broadcast_value

            texts = broadcast_value(sorted(self.texts) if accelerator.is_main_process else None)
            self.texts = {t: broadcast_tensors(self.texts.get(t), torch.device("cpu")) for t in texts}
            indices = broadcast_value(sorted(self.image_latents) if accelerator.is_main_process else None)
            self.image_latents = {i: broadcast_tensors({"latent": self.image_latents[i]} if accelerator.is_main_process else None,
                                                       torch.device("cpu"))["latent"] for i in indices}

    def _prepare(self) -> None:
        from musubi_tuner.inference.pipeline import load_vae_for

        device = self.accelerator.device
        texts = sorted({p.prompt for p in self.prompts} | {p.negative_prompt or "" for p in self.prompts if _uses_cfg(p)})
        logger.info("encoding %d sample prompts", len(texts))
        self.texts = encode_texts(texts, self.args, device)
        self.vae = load_vae_for(self.args, device)  # tiled as hv_generate_video decodes, so samples match its output
        self.image_latents = {p.index: self._encode_image(p) for p in self.prompts if p.image_path}
        self.vae.to("cpu")  # back on the device only to decode

    def _encode_image(self, p: SamplePrompt) -> torch.Tensor:
        from musubi_tuner.data.buckets import resize_to_bucket
        from musubi_tuner.data.media import load_image
        from musubi_tuner.hunyuan.vae import SCALING_FACTOR

        image = torch.from_numpy(resize_to_bucket(load_image(p.image_path), (p.width, p.height)))
        x = image.permute(2, 0, 1)[None, :, None].to(self.vae.device, self.vae.dtype) / 127.5 - 1.0
        with torch.no_grad():
            latent = self.vae.encode(x).sample(torch.Generator(self.vae.device).manual_seed(self.seeds[p.index])).float() * SCALING_FACTOR
        F = VAEConfig().latent_shape(p.frames, p.height, p.width)[1]
        padded = torch.zeros((*latent.shape[:2], F, *latent.shape[3:]))
        padded[:, :, :1] = latent.cpu()
        return padded

    # -- when
    def after_step(self, dit, network, optimizer, step: int) -> None:
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.sample(dit, network, optimizer, step)

    def after_epoch(self, dit, network, optimizer, step: int, epoch: int) -> None:
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            self.sample(dit, network, optimizer, step, epoch=epoch)

    def catch_up(self, dit, network, optimizer, step: int, epoch: int | None) -> None:
        """On a resume from the state saved at `step` (or at the end of `epoch`): the samples the stopped run was to make
        right after writing that state, where one of them is missing (it stopped before, or while, it made them)."""
        due_step = bool(self.every_n_steps) and step % self.every_n_steps == 0
        due_epoch = bool(epoch and self.every_n_epochs) and epoch % self.every_n_epochs == 0
        # a step due for both is sampled once, named by its step (`sample`): either name is that step's samples (an
        # epoch ending on a sampling step was sampled again on resuming, as e00000N: fuzz_ai 5)
        made = self._made(f"{step:06d}") or bool(epoch) and self._made(f"e{epoch:06d}")
        if (due_step or due_epoch) and not made:
            self.sample(dit, network, optimizer, step, epoch=None if due_step else epoch)

    def _made(self, tag: str) -> bool:
        """Whether every prompt's sample and the grid of `tag` (a step or an epoch) are in the sample folder."""
        name = self.args.output_name
        return (self.folder / grid_name(name, tag)).is_file() and all(
            any(self.folder.glob(f"{glob.escape(name)}_{tag}_{p.index:02d}_*")) for p in self.prompts)

    # -- what
    def _latents(self, dit, p: SamplePrompt, cache: StepCache | None = None) -> torch.Tensor:
        device = self.accelerator.device
        cond = {k: v.to(device) for k, v in self.texts[p.prompt].items()}
        uncond = {k: v.to(device) for k, v in self.texts[p.negative_prompt or ""].items()} if _uses_cfg(p) else None
        noise = initial_noise((1, *VAEConfig().latent_shape(p.frames, p.height, p.width)), self.seeds[p.index]).to(device)
        image = self.image_latents.get(p.index)
        guidance = Guidance(embedded_scale=p.guidance, scale=p.cfg_scale if _uses_cfg(p) else 1.0)
        if cache is not None:
            cache.new_video()
        with self.accelerator.autocast():
            latents = denoise(dit, noise, sigma_schedule(p.steps, p.flow_shift), cond=cond, uncond=uncond, guidance=guidance,
                              image_latents=None if image is None else image.to(device), step_cache=cache)
        return latents.cpu()

    def sample(self, dit, network, optimizer, step: int, epoch: int | None = None) -> Path | None:
        """Generate every prompt; returns the grid's path (None on the other processes). Once per step."""
        if self.last_step == step:  # musubi-tuner samples twice when an epoch ends on a sampling step; once is enough
            return None
        self.last_step = step
        grid_path = None
        if self.participates:
            started = time.perf_counter()
            with evaluation_mode(network, optimizer, self.accelerator.device):
                latents, effects = self._all_latents(dit, network, step)
            if self.accelerator.is_main_process:
                grid_path, grid = self._write(latents, step, epoch)
                logs = {f"lora_effect/sample_{i:02d}": e for i, e in enumerate(effects)}
                if effects:
                    logs["lora_effect/sample"] = sum(effects) / len(effects)
                self.accelerator.log(logs, step=step)
                if grid is not None:
                    self._log_image(grid, step)
                shown = ", ".join(f"{e:.2%}" if math.isfinite(e) else "(not finite)" for e in effects)
                logger.info("samples at step %d: %s [%.1f s]; the LoRA moves them by %s", step, grid_path or "none written (see above)",
                            time.perf_counter() - started, shown or "n/a")
        patient_wait()  # (the others wait for process 0's samples: not a hang, however long they take)
        return grid_path

    def _all_latents(self, dit, network, step: int) -> tuple[dict[int, torch.Tensor], list[float]]:
        """Final latents per prompt index, and the LoRA's effect on each (when the network can be switched off)."""
        multiplier = getattr(network, "multiplier", None)
        can_switch_off = multiplier is not None and hasattr(network, "set_multiplier")
        latents, effects = {}, []
        cache = step_cache.from_args(self.args)  # the base latents skip alike, so the LoRA's effect compares like with like
        for p in self.prompts:
            latents[p.index] = self._latents(dit, p, cache)
            if can_switch_off and p.index not in self.base_latents:
                network.set_multiplier(0.0)
                try:
                    self.base_latents[p.index] = self._latents(dit, p, cache)
                finally:
                    network.set_multiplier(multiplier)
            base = self.base_latents.get(p.index)
            if base is not None:
                effects.append(((latents[p.index] - base).norm() / base.norm().clamp_min(1e-12)).item())
        if cache is not None and self.accelerator.is_main_process:
            logger.info("samples at step %d: %s", step, cache.summary())
        return latents, effects

    def _write(self, latents: dict[int, torch.Tensor], step: int, epoch: int | None) -> tuple[Path | None, Image.Image | None]:
        """Decode, write each sample and the grid; returns the grid's path and image (None: no sample decoded, or the
        grid not written)."""
        from musubi_tuner.data.media import write_video
        from musubi_tuner.inference.outputs import NonFinitePixels, decode_to_frames

        self.folder.mkdir(parents=True, exist_ok=True)
        tag = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
        stamp = time.strftime("%Y%m%d%H%M%S")
        self.vae.to(self.accelerator.device)
        rows = []
        for p in self.prompts:
            problem = _undecodable(latents[p.index])  # (decode_to_frames would blame the VAE, or write a video of noise)
            if problem is not None:
                cfg = "none" if p.cfg_scale is None else f"{p.cfg_scale:g}"
                options = f"the prompt's options (guidance {p.guidance:g}, flow shift {p.flow_shift:g}, CFG {cfg})"
                base = self.base_latents.get(p.index)  # the same sample without the LoRA, when the network can be switched off
                why = (f"{options} are the likely cause, the LoRA is not: the DiT without it gives such a latent too" if base
                       is not None and _undecodable(base) is not None else
                       "the LoRA at this step is the likely cause: without it the sample is decodable" if base is not None else
                       f"the LoRA at this step, or {options}, are the likely cause")
                logger.warning("sample %d at step %d: the sampled latent %s: %s; no video was written", p.index, step, problem, why)
                continue
            try:
                frames = decode_to_frames(self.vae, latents[p.index][0]).numpy()
            except NonFinitePixels as e:  # the samples are lost, not the training run
                logger.warning("sample %d at step %d: %s", p.index, step, e)
                continue
            stem = f"{self.args.output_name}_{tag}_{p.index:02d}_{stamp}_{self.seeds[p.index]}"
            # (one frame: musubi-tuner's frame-indexed image name, which scripts collecting its samples look for: fuzz_al 10)
            written = self.folder / f"{stem}{'.mp4' if len(frames) > 1 else '_000.png'}"
            try:
                if len(frames) > 1:
                    write_video(written, frames, fps=24, bitrate=4_000_000)
                else:
                    with atomic_write(written) as tmp:
                        Image.fromarray(frames[0]).save(tmp, format="PNG")
            except UserError as e:  # a side output: the sample is lost, not the run (a full disk stops the next save)
                logger.warning("sample %d at step %d not written: %s", p.index, step, e)
                continue
            if self.replaces_earlier:
                self._remove_earlier(tag, p.index, written)
            picks = sorted({0, (len(frames) - 1) // 2, len(frames) - 1})  # (the grid's frames only: every prompt's whole
            rows.append((f"#{p.index} seed {self.seeds[p.index]}: {p.prompt}"[:90], frames[picks]))  # video was held)
        self.vae.to("cpu")
        if not rows:
            return None, None
        title = f"step {step}" + (f", epoch {epoch}" if epoch is not None else "") + " - columns: first, middle, last frame"
        grid_path, grid = self.folder / grid_name(self.args.output_name, tag), sample_grid(rows, title)
        try:
            with atomic_write(grid_path) as tmp:
                grid.save(tmp, format="PNG")
        except UserError as e:
            logger.warning("the samples' grid at step %d not written: %s", step, e)
            return None, None
        return grid_path, grid

    def _remove_earlier(self, tag: str, index: int, written: Path) -> None:
        """The same sample (step or epoch, prompt) written at another time: by the run this one resumes."""
        same = re.compile(rf"{re.escape(self.args.output_name)}_{tag}_{index:02d}_\d{{14}}_-?\d+(?:\.mp4|_000\.png|\.png)")
        for path in self.folder.iterdir():
            if path != written and same.fullmatch(path.name):
                path.unlink(missing_ok=True)
                logger.info("removed %s (replaced by %s)", path.name, written.name)

    def _log_image(self, grid: Image.Image, step: int) -> None:
        """The grid into TensorBoard, from memory, at most LOGGED_PIXELS (a grid of many prompts, reopened from its file,
        passed Pillow's limit on an image's size: a traceback that ended the run without its LoRA: fuzz_am 3)."""
        writers = [tracker.writer for tracker in getattr(self.accelerator, "trackers", []) if tracker.name == "tensorboard"]
        if not writers:
            return
        if grid.width * grid.height > LOGGED_PIXELS:
            factor = math.ceil(math.sqrt(grid.width * grid.height / LOGGED_PIXELS))
            grid = grid.reduce(factor)
        image = np.asarray(grid.convert("RGB"))

        def add_image():
            for writer in writers:
                writer.add_image("samples", image, step, dataformats="HWC")

        if hasattr(self.accelerator, "tracking"):  # loop.TrackedAccelerator: logs that cannot be written never cost the run
            self.accelerator.tracking(add_image)
        else:
            add_image()
