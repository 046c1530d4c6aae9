"""The time model against every published time it learns from or is checked on (planning/calibration.py).

    python bench/plan_calibration.py      # prints the markdown table kept in docs/memory_planner.md

Ours is the denoising only (steps x the planned step time, collectives and fp8 dequantization included); the
published figures are end to end (text encoders and VAE decode too), so a ratio a little under 1 is expected.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from musubi_tuner.planning.calibration import markdown_tables

if __name__ == "__main__":
    print(markdown_tables())
