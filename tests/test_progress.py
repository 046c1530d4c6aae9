"""Progress bars: tqdm's bar on a terminal; in a log, a few whole lines per bar instead of one per redraw."""

import io
import time

import pytest
from tqdm import tqdm

from musubi_tuner import progress
from musubi_tuner.progress import LogLines, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_tqdms_own_bar():
    bar = progress_bar(total=10, desc="steps", file=Terminal())
    assert type(bar) is tqdm
    bar.close()


@pytest.mark.parametrize("total", [7, 100, 2400])
def test_a_log_gets_a_line_per_ten_percent_whatever_the_number_of_updates(total):
    log = io.StringIO()
    bar = progress_bar(total=total, desc="steps", file=log, mininterval=0)
    for step in range(total):
        bar.update(1)
        bar.set_postfix(loss=1.0 / (step + 1))  # a refresh per step, as the training loop makes
    bar.close()
    text = log.getvalue()
    lines = text.splitlines()
    assert isinstance(bar, LogLines) and "\r" not in text and text.endswith("\n")
    assert lines[0].startswith("steps:   0%") and lines[-1].startswith("steps: 100%") and f"{total}/{total}" in lines[-1]
    assert len(lines) <= 100 // progress.LOG_PERCENT_STEP + 1  # the start and one per 10 %
    percents = [int(line.split("%")[0].split()[-1]) for line in lines]
    assert percents == sorted(set(percents))  # no line repeats a state


def test_an_interrupted_bar_ends_with_where_it_stopped():
    log = io.StringIO()
    bar = progress_bar(total=50, desc="denoising", file=log, mininterval=0)
    bar.update(12)
    bar.close()  # what errors.run_cli does to a bar a failure left open
    assert log.getvalue().splitlines()[-1].startswith("denoising:  24%") and "12/50" in log.getvalue()


def test_without_a_total_a_log_gets_the_start_the_end_and_a_line_a_minute(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    bar = progress_bar(desc="latents", unit="item", file=log, mininterval=0)
    for _ in range(30):
        bar.update(1)
        clock[0] += 5  # 150 s in all
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split(" ")[1] for line in lines] == ["0item", "13item", "25item", "30item"]


def test_a_total_too_large_for_a_tenth_to_come_still_gets_a_line_every_ten_minutes(monkeypatch):
    """fuzz_as 1: --max_train_steps 2**63 printed the start and nothing more: 10 % never came, and the log looked hung."""
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    bar = progress_bar(total=2**63, desc="steps", file=log, mininterval=0)
    for _ in range(25):
        bar.update(1)
        clock[0] += 60  # 25 minutes in all
    lines = log.getvalue().splitlines()
    assert [line.split("|")[-1].split("/")[0].strip() for line in lines] == ["0", "11", "21"]  # (the 11th update at 600 s)


@pytest.mark.parametrize("terminal", [False, True])
def test_a_watcher_gets_each_bars_state_as_json_lines_with_the_time_left(tmp_path, monkeypatch, terminal):
    import json

    watched = tmp_path / "progress.jsonl"
    monkeypatch.setenv(progress.PROGRESS_FILE_VARIABLE, str(watched))
    monkeypatch.setattr(progress, "REPORT_SECONDS", 0.0)
    bar = progress_bar(total=4, desc="steps", file=Terminal() if terminal else io.StringIO())
    assert isinstance(bar, tqdm) and isinstance(bar, LogLines) is not terminal  # the same bar as without a watcher
    for _ in range(2):
        bar.update(1)
    bar.set_postfix(loss=0.5)
    bar.close()
    lines = [json.loads(line) for line in watched.read_text().splitlines()]
    assert [(r["desc"], r["n"], r["total"], r["closed"]) for r in lines] == [("steps", 0, 4, False), ("steps", 1, 4, False),
                                                                             ("steps", 2, 4, False), ("steps", 2, 4, True)]
    at_two = lines[2]
    assert at_two["remaining"] == pytest.approx(2 / at_two["rate"], rel=1e-3)  # 2 steps left at the measured rate
    assert lines[-1]["postfix"] == "loss=0.5"


@pytest.mark.parametrize("terminal", [False, True])
def test_a_resumed_bars_time_left_counts_only_the_steps_it_made(tmp_path, monkeypatch, terminal):
    """fuzz_ao 11: a bar resumed at step 20 of 120 said "ETA 0:00" until its first step ended (20 steps in 0 s)."""
    import json

    watched = tmp_path / "progress.jsonl"
    monkeypatch.setenv(progress.PROGRESS_FILE_VARIABLE, str(watched))
    monkeypatch.setattr(progress, "REPORT_SECONDS", 0.0)
    bar = progress_bar(total=120, initial=20, desc="steps", file=Terminal() if terminal else io.StringIO())
    time.sleep(0.05)
    bar.update(1)
    bar.close()
    first, made_one = (json.loads(line) for line in watched.read_text().splitlines()[:2])
    assert (first["n"], first["rate"], first["remaining"]) == (20, None, None)  # unknown, not 0
    assert made_one["n"] == 21 and made_one["rate"] < 1 / 0.05 and made_one["remaining"] > 99 * 0.05 * 0.5


def test_without_a_watcher_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_FILE_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    bar = progress_bar(total=2, desc="steps", file=io.StringIO())
    bar.update(2)
    bar.close()
    assert type(bar) is LogLines and list(tmp_path.iterdir()) == []
