"""The one learning-curve plot every training loop draws, and its smoothing."""

import numpy as np

from longmem.plots import plot_loss_curves, trailing_mean


def test_trailing_mean_is_the_mean_of_each_value_and_those_before_it():
    values = [5.0, 1.0, 4.0, 2.0, 8.0, 3.0]
    for k in (1, 2, 3, 10):
        naive = [np.mean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]
        np.testing.assert_allclose(trailing_mean(values, k), naive)


def test_loss_curves_are_written_as_png(tmp_path):
    train = [(s, 5.0 / s) for s in range(1, 60)]
    checks = {"val, with memory": [(10, 1.0), (50, 0.5)], "val, no memory": []}
    for i, kw in enumerate(({}, {"smooth": 25, "marks": [30], "title": "t", "xlabel": "optimizer step"})):
        plot_loss_curves(tmp_path / f"{i}.png", train, checks, **kw)
        assert (tmp_path / f"{i}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_loss_curves(tmp_path / "empty.png", [], {})  # a run stopped before its first logged step
    assert (tmp_path / "empty.png").is_file()
