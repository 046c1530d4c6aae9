"""The loss CSV beside the LoRA is kept current during the run, for whoever watches it."""

from musubi_tuner.training import loss_curve
from musubi_tuner.training.loss_curve import LossHistory


def test_the_csv_is_rewritten_at_most_every_few_seconds_and_reads_back(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(loss_curve.time, "monotonic", lambda: clock[0])
    history = LossHistory(tmp_path / "run-loss.csv")
    history.add(1, 0.5)
    history.write_csv_if_due()
    assert not history.csv_path.exists()  # not yet due
    clock[0] += loss_curve.LIVE_SECONDS
    history.add(2, 0.25)
    history.add(2, 0.75, kind="validation")
    history.write_csv_if_due()
    again = LossHistory(tmp_path / "run-loss.csv")
    assert (again.train, again.validation) == ([(1, 0.5), (2, 0.25)], [(2, 0.75)])
    history.add(3, 0.125)
    history.write_csv_if_due()  # written a moment ago: waits
    assert LossHistory(tmp_path / "run-loss.csv").train == [(1, 0.5), (2, 0.25)]


def test_the_moving_average_is_each_points_mean_of_its_window():
    """fuzz_am 1: the average summed each window anew (a save of a 40,000-step run spent 2 s drawing it); the running
    sum gives each point the mean of its last `window` values, fewer at the start."""
    import random

    from musubi_tuner.training.loss_curve import _smooth

    rng = random.Random(0)
    points = [(step, rng.random()) for step in range(1, 1001)]
    for window in (1, 7, 50):
        want = [(s, sum(v for _, v in points[max(0, i - window + 1):i + 1]) / len(points[max(0, i - window + 1):i + 1]))
                for i, (s, _) in enumerate(points)]
        got = _smooth(points, window)
        assert [s for s, _ in got] == [s for s, _ in want]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) < 1e-12


def test_a_damaged_csv_keeps_the_points_it_can_read_and_says_how_many_it_left_out(tmp_path, caplog):
    """fuzz_ar 1: a CSV cut by a crash, with other bytes, or with a second header stopped every run into the folder with a
    traceback, after the DiT had loaded; the studio's run page too."""
    import logging

    path = tmp_path / "run-loss.csv"
    path.write_bytes(b"kind,step,loss\ntrain,1,0.5\nkind,step,loss\ntrain,2,\xff\xfe\nvalidation,2,0.75\ntrain,3")
    with caplog.at_level(logging.WARNING):
        history = LossHistory(path)
    assert (history.train, history.validation) == ([(1, 0.5)], [(2, 0.75)])
    assert f"{path}: 2 line(s) that are not a loss point" in caplog.text  # (the second header is a header)
    caplog.clear()
    # fuzz_au 6: a nan point (the studio's page a 500), a BOM (validation rows read as training), a line past csv's limit
    # (every point after it dropped)
    other = tmp_path / "other-loss.csv"
    other.write_bytes(b"\xef\xbb\xbfkind,step,loss\r\ntrain,1,nan\r\n" + b"x" * 200_000 + b"\r\nvalidation,2,0.75\r\ntrain,3,0.25\r\n")
    with caplog.at_level(logging.WARNING):
        history = LossHistory(other)
    assert (history.train, history.validation) == ([(3, 0.25)], [(2, 0.75)])
    assert f"{other}: 2 line(s) that are not a loss point" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert LossHistory(path, say=False).train == [(1, 0.5)] and not caplog.text
    path.unlink()
    path.mkdir()  # a folder at its name
    with caplog.at_level(logging.WARNING):
        assert LossHistory(path).train == []
    assert "not read" in caplog.text
