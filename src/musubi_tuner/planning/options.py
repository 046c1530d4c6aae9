"""What is being planned: the workload (model, video size, batch) and the memory options, as users type them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.config import DiTConfig
from musubi_tuner.hunyuan.vae import VAEConfig

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
PRECISIONS = {"bf16": 2, "fp16": 2, "no": 4}  # --mixed_precision -> bytes per activation
# The largest batch planned: the trace holds a Python int per sample, and every tensor's size must fit int64 at the
# largest video (8192x8192, 1,025 frames); no GPU holds a batch of even 64 such samples
MAX_PLANNED_BATCH = 2**16


@dataclass(frozen=True)
class Workload:
    config: DiTConfig
    height: int
    width: int
    frames: int
    batch: int = 1
    text_tokens: int = 256  # valid LLM tokens of the longest prompt (the DiT cuts padding away); at most 256
    text_lengths: tuple[int, ...] | None = None  # per sample, when prompts in a batch differ (masked attention)
    mode: str = "train"  # "train" | "generate"
    # the other models' configs, read from the files given (from_args.model_configs); None: the reference models'
    vae: VAEConfig | None = None
    llm_config: str | None = None  # JSON of the LLM's (text encoder 1) LlamaConfig
    clip_config: str | None = None  # JSON of CLIP-L's (text encoder 2) CLIPTextConfig
    video_input: bool = False  # generation's --video_path (V2V): the VAE encodes it first

    def __post_init__(self):
        if self.mode not in ("train", "generate"):
            raise UserError(f"mode {self.mode!r}: use train or generate")
        if self.height % 16 or self.width % 16:
            raise UserError(f"video size {self.height}x{self.width}: height and width must be multiples of 16")
        if (self.frames - 1) % 4:
            raise UserError(f"{self.frames} frames: must be 4N+1 (try {(self.frames - 1) // 4 * 4 + 1})")
        if not 1 <= self.batch <= MAX_PLANNED_BATCH:
            raise UserError(f"batch {self.batch:,}: the planner plans between 1 and {MAX_PLANNED_BATCH:,} samples per step")
        if not 1 <= self.text_tokens <= 256:
            raise UserError(f"text_tokens {self.text_tokens}: between 1 and 256 (the LLM cache holds 256)")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(frames, height, width) of the latent."""
        return self.vae_config.latent_shape(self.frames, self.height, self.width)[1:]

    @property
    def vae_config(self) -> VAEConfig:
        return self.vae or VAEConfig()

    @property
    def image_tokens(self) -> int:
        from musubi_tuner.hunyuan.cost import image_tokens

        return image_tokens(self.config, self.latent_shape)

    def local_tokens(self, context_parallel: int) -> tuple[int, int]:
        """(image, text) tokens each process holds when N share a sample (hunyuan.sequence_parallel: padded to N)."""
        n = context_parallel
        return -(-self.image_tokens // n), -(-self.text_tokens // n)

    def describe(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}f, batch {self.batch}, {self.image_tokens:,} image + {self.text_tokens} text tokens"


@dataclass(frozen=True)
class MemoryOptions:
    """The memory and speed flags of hv_train_network / hv_generate_video, same names and defaults."""

    fp8: bool = False  # --fp8_base (training) / --fp8 (generation)
    blocks_to_swap: int = 0
    use_pinned_memory_for_block_swap: bool = False
    gradient_checkpointing: bool = False
    gradient_checkpointing_cpu_offload: bool = False
    split_attn: bool = False
    attn_mode: str = "sdpa"  # the attention kernel: its speed enters the time (calibration.ATTENTION_SPEEDUP)
    img_in_txt_in_offloading: bool = False
    network_dim: int = 32  # LoRA rank (training; generation with LoRAs merges them unless --fp8)
    optimizer_type: str = "adamw"
    mixed_precision: str = "bf16"
    dit_dtype: str = "bf16"
    # generation
    guidance_scale: float = 1.0  # != 1: real CFG, the negative prompt runs too
    split_uncond: bool = False  # ... in a second call instead of a batch of two
    lora_at_generation: bool = False  # LoRAs given to hv_generate_video (applied beside fp8 weights, merged otherwise)
    infer_steps: int = 50
    step_cache: str | None = None  # --step_cache teacache | fbcache: skipped steps cost (almost) nothing
    step_cache_threshold: float | None = None  # None: the method's default
    step_cache_warmup: int = 1  # first steps always computed (and the last): the most a cache can skip is the rest
    # encoders
    fp8_llm: bool = False
    vae_tiling: bool = True  # hv_generate_video always tiles; cache_latents only with --vae_tiling
    vae_spatial_tile_sample_min_size: int = 256
    vae_chunk_size: int | None = None
    vae_dtype: str = "fp16"  # generation's --vae_dtype (the decode); cache_latents encodes in its default, float16
    # several processes
    context_parallel: int = 1  # --context_parallel N: each GPU holds 1/N of every sample's tokens
    cfg_parallel: bool = False  # generation with real CFG on 2N processes: each runs one of the two prompts

    def __post_init__(self):
        if self.optimizer_type.lower() not in OPTIMIZERS:
            raise UserError(f"--optimizer_type {self.optimizer_type}: the planner models {', '.join(OPTIMIZERS)}")
        if self.mixed_precision not in PRECISIONS:
            raise UserError(f"--mixed_precision {self.mixed_precision}: one of {', '.join(PRECISIONS)}")
        if self.gradient_checkpointing_cpu_offload and not self.gradient_checkpointing:
            raise UserError("--gradient_checkpointing_cpu_offload needs --gradient_checkpointing")
        if self.context_parallel < 1:
            raise UserError(f"--context_parallel {self.context_parallel}: 1 or more")
        if self.blocks_to_swap < 0 or self.blocks_to_swap > 38:
            raise UserError(f"--blocks_to_swap {self.blocks_to_swap}: between 0 and 38 (36 for training)")

    @property
    def act_bytes(self) -> int:
        return PRECISIONS[self.mixed_precision]

    @property
    def vae_bytes(self) -> int:
        return {"bf16": 2, "fp16": 2, "fp32": 4}[self.vae_dtype]

    @property
    def weight_bytes(self) -> int:
        return {"bf16": 2, "fp16": 2, "fp32": 4}[self.dit_dtype]

    @property
    def uses_cfg_parallel(self) -> bool:
        return self.cfg_parallel and self.guidance_scale != 1.0

    @property
    def cfg_batch(self) -> int:
        """Samples per DiT call while sampling: 2 with real CFG batched, else 1."""
        return 2 if self.guidance_scale != 1.0 and not self.split_uncond and not self.uses_cfg_parallel else 1

    @property
    def dit_calls(self) -> int:
        """DiT calls per denoising step: 2 with real CFG split (--split_uncond), else 1."""
        return 2 if self.guidance_scale != 1.0 and self.split_uncond and not self.uses_cfg_parallel else 1

    @property
    def processes(self) -> int:
        return self.context_parallel * (2 if self.uses_cfg_parallel else 1)

    def replace(self, **changes) -> "MemoryOptions":
        return dataclasses.replace(self, **changes)

    def flags(self, mode: str) -> str:
        """The command-line flags that select these options."""
        out = []
        if self.fp8:
            out.append("--fp8_base" if mode == "train" else "--fp8")
        if self.blocks_to_swap:
            out.append(f"--blocks_to_swap {self.blocks_to_swap}")
            if self.use_pinned_memory_for_block_swap:
                out.append("--use_pinned_memory_for_block_swap")
        if self.gradient_checkpointing and mode == "train":
            out.append("--gradient_checkpointing")
        if self.gradient_checkpointing_cpu_offload and mode == "train":
            out.append("--gradient_checkpointing_cpu_offload")
        if self.split_attn:
            out.append("--split_attn")
        if self.img_in_txt_in_offloading:
            out.append("--img_in_txt_in_offloading")
        if mode == "generate" and self.split_uncond and self.guidance_scale != 1.0:
            out.append("--split_uncond")
        if mode == "generate" and self.step_cache:
            out.append(f"--step_cache {self.step_cache}" + ("" if self.step_cache_threshold is None else f" --step_cache_threshold {self.step_cache_threshold:g}")
                       + ("" if self.step_cache_warmup == 1 else f" --step_cache_warmup {self.step_cache_warmup}"))
        if self.vae_spatial_tile_sample_min_size != 256:  # hv_generate_video's, or cache_latents' when training
            out.append(f"--vae_spatial_tile_sample_min_size {self.vae_spatial_tile_sample_min_size}")
        if mode == "generate":
            if self.vae_chunk_size:
                out.append(f"--vae_chunk_size {self.vae_chunk_size}")
        if self.fp8_llm:
            out.append("--fp8_llm")
        if self.context_parallel > 1 or self.uses_cfg_parallel:
            out.append(f"--context_parallel {self.context_parallel}" + (f" on {self.processes} processes" if self.uses_cfg_parallel else ""))
        return " ".join(out) or "(no memory options)"
