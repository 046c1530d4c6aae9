"""The DiT's configuration: one dataclass that the model, the loader, LoRA targeting and the planner read.

The official checkpoint files carry no config, so `DiTConfig.from_shapes` reads it off the tensor
shapes: the full model, SkyReels I2V (32 input channels), merged files and tiny test models all load
from the file alone.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Mapping, Sequence

from musubi_tuner.errors import UserError


def default_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) rotary dims summing to head_dim: HunyuanVideo's (16, 56, 56) for 128, the same proportions otherwise."""
    t = max(2, head_dim // 8 // 2 * 2)
    while (head_dim - t) % 4:
        t += 2
    return (t, (head_dim - t) // 2, (head_dim - t) // 2)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Sizes of HunyuanVideo's diffusion transformer. Defaults are the released T2V 720p model (HYVideo-T/2-cfgdistill)."""

    in_channels: int = 16  # 32 for SkyReels V1 I2V (noisy latents + image latents)
    out_channels: int = 16
    hidden_size: int = 3072
    heads_num: int = 24
    mlp_hidden_size: int = 12288  # mlp_width_ratio 4
    mm_double_blocks_depth: int = 20
    mm_single_blocks_depth: int = 40
    refiner_depth: int = 2
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w)
    rope_dim_list: tuple[int, int, int] | None = None  # None: (16, 56, 56) for head dim 128, same proportions otherwise
    rope_theta: float = 256.0
    text_states_dim: int = 4096  # LLM hidden size
    text_states_dim_2: int = 768  # CLIP-L pooled size
    guidance_embed: bool = True
    timestep_freq_dim: int = 256

    def __post_init__(self):
        if self.hidden_size % self.heads_num:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads_num {self.heads_num}")
        rope = default_rope_axes(self.head_dim) if self.rope_dim_list is None else tuple(self.rope_dim_list)
        object.__setattr__(self, "rope_dim_list", rope)
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if sum(self.rope_dim_list) != self.head_dim:
            raise ValueError(f"rope_dim_list {self.rope_dim_list} must sum to the head dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads_num

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    @property
    def num_blocks(self) -> int:
        return self.mm_double_blocks_depth + self.mm_single_blocks_depth

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "DiTConfig":
        raw = json.loads(text)
        fields = {f.name for f in dataclasses.fields(cls)}
        raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields}
        return cls(**raw)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], source: str = "checkpoint", rope_dim_list: Sequence[int] | None = None) -> "DiTConfig":
        """Infer the config from state-dict key names and shapes (official names).

        Raises UserError naming `source` and the missing key when the file is not a HunyuanVideo DiT.
        """

        def need(key: str) -> tuple[int, ...]:
            if key not in shapes:
                sample = ", ".join(sorted(shapes)[:4]) or "no keys"
                raise UserError(f"{source}: not a HunyuanVideo DiT in the official layout (missing {key!r}; first keys: {sample})")
            return tuple(shapes[key])

        def count(pattern: str) -> int:
            rx = re.compile(pattern)
            return len({m.group(1) for k in shapes if (m := rx.match(k))})

        img_in = need("img_in.proj.weight")  # (hidden, in_channels, pt, ph, pw)
        hidden, in_channels, patch = img_in[0], img_in[1], tuple(img_in[2:])
        head_dim = need("double_blocks.0.img_attn_q_norm.weight")[0]
        final = need("final_layer.linear.weight")
        pt, ph, pw = patch
        return cls(
            in_channels=in_channels,
            out_channels=final[0] // (pt * ph * pw),
            hidden_size=hidden,
            heads_num=hidden // head_dim,
            mlp_hidden_size=need("double_blocks.0.img_mlp.fc1.weight")[0],
            mm_double_blocks_depth=count(r"double_blocks\.(\d+)\."),
            mm_single_blocks_depth=count(r"single_blocks\.(\d+)\."),
            refiner_depth=count(r"txt_in\.individual_token_refiner\.blocks\.(\d+)\."),
            patch_size=patch,
            rope_dim_list=tuple(rope_dim_list) if rope_dim_list else None,
            text_states_dim=need("txt_in.input_embedder.weight")[1],
            text_states_dim_2=need("vector_in.in_layer.weight")[1],
            guidance_embed="guidance_in.mlp.0.weight" in shapes,
            timestep_freq_dim=need("time_in.mlp.0.weight")[1],
        )


HUNYUAN_T2V = DiTConfig()
SKYREELS_I2V = dataclasses.replace(HUNYUAN_T2V, in_channels=32)


def task_of(in_channels: int) -> str:
    """What a DiT of `in_channels` input channels generates from, in words: 16 text-to-video, 32 image-to-video."""
    return {16: "text-to-video", 32: "image-to-video"}.get(in_channels, f"{in_channels}-channel")
