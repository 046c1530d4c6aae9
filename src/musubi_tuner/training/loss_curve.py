"""The loss history of a run, kept beside the LoRA as CSV and drawn as a PNG at every save (for users without TensorBoard).

The CSV is also rewritten during the run, at most every LIVE_SECONDS, so that whoever watches it (a spreadsheet,
`tail`, the studio's live curve) sees the run as it goes; the PNG waits for the saves.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path

from PIL import Image, ImageDraw

from musubi_tuner.errors import UserError
from musubi_tuner.files import atomic_write

logger = logging.getLogger(__name__)

LIVE_SECONDS = 2.0


class LossHistory:
    """(step, loss) pairs, and optionally (step, validation loss); continues a file written by an earlier run."""

    def __init__(self, csv_path: Path, say: bool = True):
        """The file's points, if it is there. It is a side output: lines that cannot be read (a file cut by a crash,
        other bytes, a second header) are left out, with a warning when `say` (a traceback stopped every run into the
        folder after the DiT had loaded: fuzz_ar 1); the studio, which reads it every second, says nothing."""
        self.csv_path = Path(csv_path)
        self.train: list[tuple[int, float]] = []
        self.validation: list[tuple[int, float]] = []
        self._written_at = time.monotonic()
        self._said: set[str] = set()  # the write failures said: each once (a folder at the PNG's name was said at every save)
        bad = 0
        try:
            with open(self.csv_path, encoding="utf-8-sig", errors="replace") as f:  # (-sig: a BOM an editor put there)
                for line in f:
                    fields = line.strip().split(",")
                    if fields == ["kind", "step", "loss"] or fields == [""]:  # the header (again, where files were joined)
                        continue
                    try:
                        kind, step, loss = fields
                        point = (int(step), float(loss))
                    except ValueError:
                        bad += 1
                        continue
                    if kind not in ("train", "validation") or not math.isfinite(point[1]):  # (a nan point made the studio's
                        bad += 1                                                        # run page a 500: fuzz_au 6)
                        continue
                    (self.validation if kind == "validation" else self.train).append(point)
        except FileNotFoundError:
            return
        except OSError as e:
            if say:
                logger.warning("%s: not read (%s): the loss curve starts again from this run's steps", self.csv_path,
                               e.strerror or e)
            return
        if bad and say:
            logger.warning("%s: %d line(s) that are not a loss point (a file cut or changed by something else) left out of "
                           "the loss curve", self.csv_path, bad)

    def add(self, step: int, loss: float, kind: str = "train") -> None:
        if kind == "validation":  # one point per step: a resumed run re-evaluates the step it resumed at
            self.validation = [p for p in self.validation if p[0] != step] + [(step, loss)]
        else:
            self.train.append((step, loss))

    def truncate(self, step: int) -> None:
        """Forget entries after `step` (a resumed run replays them)."""
        self.train = [p for p in self.train if p[0] <= step]
        self.validation = [p for p in self.validation if p[0] <= step]

    def save(self, png_path: Path) -> Path | None:
        """The CSV and the PNG; a side output, so one that cannot be written (a folder at its name, a full disk, which
        the LoRA's own save then meets) is a warning, not the end of the run before its state is saved."""
        try:
            self.write_csv()
            return draw_curve(self.train, self.validation, png_path)
        except UserError as e:
            self._say_once("the loss curve not written: %s", e)
            return None

    def _say_once(self, message: str, error: UserError) -> None:
        if str(error) not in self._said:
            self._said.add(str(error))
            logger.warning(message, error)

    def write_csv(self) -> None:
        with atomic_write(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["kind", "step", "loss"])
            writer.writerows([("train", s, v) for s, v in self.train] + [("validation", s, v) for s, v in self.validation])
        self._written_at = time.monotonic()

    def write_csv_if_due(self, at_once: bool = False) -> None:
        """The CSV, if LIVE_SECONDS have passed since it was last written (called after every step by the main process),
        or `at_once`; a failure to write is a warning, said once."""
        if at_once or time.monotonic() - self._written_at >= LIVE_SECONDS:
            try:
                self.write_csv()
            except UserError as e:
                self._written_at = time.monotonic()  # (tried again every LIVE_SECONDS)
                self._say_once("the live loss curve not written: %s", e)


def _smooth(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """The mean of each point's last `window` values (fewer at the start), by a running sum: the sum of each window,
    drawn at every save, made a save of a 40,000-step run cost 2 s, a 1M-step one 20 minutes (fuzz_am 1)."""
    out, total = [], 0.0
    for i, (step, value) in enumerate(points):
        total += value
        if i >= window:
            total -= points[i - window][1]
        out.append((step, total / min(i + 1, window)))
    return out


def _range(values: list[float]) -> tuple[float, float]:
    return min(values), max(max(values), min(values) + 1e-9)


def draw_curve(train: list[tuple[int, float]], validation: list[tuple[int, float]], path: Path, size=(800, 400)) -> Path:
    """Raw training loss (light) and its moving average (dark) on the left scale; validation loss (orange) on
    its own right scale: measured at fixed noise it moves far less than the training loss, and would look flat."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    margin = 40
    points = train + validation
    if points:
        steps = [s for s, _ in points]
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)

        def xy(s, v, scale):
            v0, v1 = scale
            return (margin + (s - s0) / (s1 - s0) * (w - 2 * margin), h - margin - (v - v0) / (v1 - v0) * (h - 2 * margin))

        scales = {"train": _range([v for _, v in train]) if train else None,
                  "validation": _range([v for _, v in validation]) if validation else None}
        for series, color, scale in ((train, (170, 190, 230), scales["train"]),
                                     (_smooth(train, max(1, len(train) // 20)), (30, 60, 160), scales["train"]),
                                     (validation, (230, 120, 20), scales["validation"])):
            if len(series) > 1:
                draw.line([xy(s, v, scale) for s, v in series], fill=color, width=2)
            elif series:
                x, y = xy(*series[0], scale)
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        title = f"steps {s0} .. {s1}"
        if train:
            title += f"; train loss (blue, left) {scales['train'][0]:.4f} .. {scales['train'][1]:.4f}"
        if validation:
            title += f"; validation loss (orange, right) {scales['validation'][0]:.4f} .. {scales['validation'][1]:.4f}"
        draw.text((margin, 8), title, fill="black")
        for name, x in (("train", 2), ("validation", w - margin + 2)):
            if scales[name]:
                low, high = scales[name]
                color = "black" if name == "train" else (200, 90, 0)
                draw.text((x, margin - 6), f"{high:.3f}", fill=color)
                draw.text((x, h - margin - 6), f"{low:.3f}", fill=color)
    draw.rectangle([margin, margin, w - margin, h - margin], outline="black")
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def write_loss_curve_from_logs(output_dir: Path) -> Path | None:
    """The newest loss-curve PNG in an output folder (the trainer writes one at every save)."""
    found = sorted(Path(output_dir).glob("*-loss.png"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
