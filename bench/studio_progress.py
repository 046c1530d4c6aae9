"""The studio's progress poll: CPU time of `Jobs.progress` on a long run's progress.jsonl, read whole by a studio that
has not read it before (a restarted one, the baseline) and read on from the last poll by one that has.

    PYTHONPATH=src python bench/studio_progress.py [--records 72000] [--rounds 7]

72,000 records is a ten-hour run's steps bar at two updates a second. Between polls the run appends one record, as
it does between two polls of an open page. The table shows the median of the rounds and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=72_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    from musubi_tuner.ui.jobs import Jobs

    with tempfile.TemporaryDirectory() as root:
        jobs = Jobs(Path(root) / "jobs")
        job = jobs.start("train", "bench", [[sys.executable, "-c", "pass"]])
        path = jobs.path(job) / "progress.jsonl"
        record = {"desc": "steps", "total": args.records, "elapsed": 1.0, "remaining": 1.0, "rate": 2.0, "unit": "it",
                  "postfix": "loss=0.1234, lr=1.00e-04"}
        with open(path, "w") as f:
            f.writelines(json.dumps({**record, "n": n, "time": n}) + "\n" for n in range(args.records))
        jobs.progress(job)  # this studio has read it once
        whole, on = [], []
        for n in range(args.rounds):
            with open(path, "a") as f:
                f.write(json.dumps({**record, "n": args.records + n, "time": args.records + n}) + "\n")
            restarted = Jobs(Path(root) / "jobs")
            start = time.process_time()
            fresh = restarted.progress(job)
            whole.append(time.process_time() - start)
            start = time.process_time()
            polled = jobs.progress(job)
            on.append(time.process_time() - start)
            assert polled == fresh, "the two reads disagree"
        size = path.stat().st_size / 1e6
    print(f"progress.jsonl: {args.records:,} records, {size:.1f} MB; median of {args.rounds} polls (CPU seconds)")
    print("| read | per poll | ratio |\n|---|---|---|")
    print(f"| whole (a studio that has not read it) | {statistics.median(whole):.4f} | 1.00 |")
    print(f"| from the last poll | {statistics.median(on):.6f} | {statistics.median(whole) / max(statistics.median(on), 1e-9):,.0f}x |")


if __name__ == "__main__":
    main()
