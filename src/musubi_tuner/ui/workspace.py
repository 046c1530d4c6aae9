"""The folder the studio may write to: every path it writes is checked to lie inside, and the demo lives there."""

from __future__ import annotations

import os
from pathlib import Path

from musubi_tuner.errors import UserError
from musubi_tuner.files import atomic_write, require_writable_folder

DEMO_MARKER = ".demo-complete"
# The studio's demo: small enough that caching, a 1-epoch run with samples, and a video take a minute on a CPU.
DEMO_ITEMS = 2
DEMO_FRAMES = 5
DEMO_VALIDATION_SPLIT = 0.5
DEMO_SAMPLE_PROMPT = "a red circle moving left on a black background --w 64 --h 64 --f 5 --d 7 --s 4"


class Workspace:
    def __init__(self, root: str | os.PathLike):
        # (as every command proves its output folder: a file given was "cannot write (File exists)": fuzz_ac 12)
        root = require_writable_folder(Path(root).expanduser(), "--workspace")
        self.root = Path(os.path.realpath(root))

    def inside(self, value: str | os.PathLike) -> bool:
        if "\0" in str(value):
            raise UserError(f"{str(value)!r}: a path cannot hold a NUL character")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.root / path
        real = Path(os.path.realpath(path))  # symlinks resolved: a link inside may not lead a write outside
        return real == self.root or self.root in real.parents

    def writable(self, value: str | os.PathLike, what: str) -> Path:
        """`value` (relative to the workspace, or absolute) as an absolute path inside the workspace, or a UserError."""
        if not str(value).strip():
            raise UserError(f"{what}: empty; give a path inside the workspace {self.root}")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.root / path
        if not self.inside(path):
            raise UserError(f"{what} = {value}: outside the workspace {self.root}; the studio writes only there "
                            f"(start it with --workspace to choose another folder)")
        return Path(os.path.abspath(path))

    def resolve(self, value: str) -> str:
        """A path a form gives: relative ones are the workspace's (as writable takes them), absolute ones as they are, and
        `~/...` expanded (it was passed on as typed, and the form called the file there "not found": fuzz_ba 6)."""
        if not value.strip():
            return value
        expanded = Path(value).expanduser()
        return str(expanded) if expanded.is_absolute() else str(self.root / value)

    def readable(self, value: str | os.PathLike) -> Path:
        """A file the studio may serve to the browser: only those inside the workspace."""
        if not self.inside(value):
            raise UserError(f"{value}: outside the workspace {self.root}; the studio serves only files inside it")
        return self.writable(value, "file")

    # ------------------------------------------------------------------ the demo

    @property
    def demo(self) -> Path:
        return self.root / "demo"

    def has_demo_assets(self) -> bool:
        return (self.demo / DEMO_MARKER).exists()

    def demo_assets(self) -> dict[str, Path]:
        """The demo's tiny models, dataset and sample prompts (written on the first call, then reused)."""
        work = self.demo
        assets = {
            "dit": work / "ckpts" / "hunyuan-video-t2v-720p" / "transformers" / "mp_rank_00_model_states.pt",
            "vae": work / "ckpts" / "hunyuan-video-t2v-720p" / "vae" / "pytorch_model.pt",
            "te1": work / "ckpts" / "text_encoder", "te2": work / "ckpts" / "text_encoder_2",
            "toml": work / "dataset" / "dataset.toml", "sample_prompts": work / "sample_prompts.txt",
        }
        if not self.has_demo_assets():
            from musubi_tuner.demo.__main__ import write_assets

            written = write_assets(work, DEMO_FRAMES, items=DEMO_ITEMS)
            assert all(written[k] == assets[k] for k in written), "the demo's layout changed"
            toml = assets["toml"].read_text(encoding="utf-8")
            assert "\n[general]\n" in toml, "the demo's dataset config changed"
            with atomic_write(assets["toml"]) as tmp:  # one item of each dataset held out: the validation curve
                tmp.write_text(toml.replace("\n[general]\n", f"\n[general]\nvalidation_split = {DEMO_VALIDATION_SPLIT}\n"), encoding="utf-8")
            with atomic_write(assets["sample_prompts"]) as tmp:
                tmp.write_text(DEMO_SAMPLE_PROMPT + "\n", encoding="utf-8")
            (work / DEMO_MARKER).write_text("written by the studio\n")
        return assets
