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
