"""timed: phases add up under timing_s/<phase>."""

import time

from rlprims.timing import timed


def test_adds_up():
    timings = {}
    for _ in range(2):
        with timed(timings, "gen"):
            time.sleep(0.01)
    with timed(timings, "step"):
        pass
    assert set(timings) == {"timing_s/gen", "timing_s/step"}
    assert 0.02 <= timings["timing_s/gen"] < 1.0 and timings["timing_s/step"] < timings["timing_s/gen"]
