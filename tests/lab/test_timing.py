"""How one kernel benchmark row is timed (batchnorm_lab.timing)."""

from batchnorm_lab import timing


def test_minimal_traffic_model():
    # forward: read x, write y; backward: read x, dy, write dx; a residual adds a read
    # forward and a dresidual write backward.
    assert timing.minimal_bytes(10, 4, "eval", False) == 80
    assert timing.minimal_bytes(10, 4, "train", True) == 120
    assert timing.minimal_bytes(10, 4, "train_fb", False) == 200
    assert timing.minimal_bytes(10, 4, "train_fb", True) == 280
