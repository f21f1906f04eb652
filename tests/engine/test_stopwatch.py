"""The phase stopwatch: phases add up over repeats; a spanning phase starts once."""

from __future__ import annotations

import time

import torch

from nst.engine.stopwatch import Stopwatch


def test_phases_add_up_and_span_once():
    clock = Stopwatch(torch.device("cpu"))
    for _ in range(2):
        with clock.phase("images"):
            time.sleep(0.01)
    assert clock.seconds["images"] >= 0.02
    assert clock.since("optimisation") == 0.0
    clock.start("optimisation")
    time.sleep(0.01)
    clock.start("optimisation")  # a later scale: the clock keeps running from the first start
    with clock.phase("targets", sync=True):
        pass
    clock.stop("optimisation")
    assert clock.seconds["optimisation"] >= 0.01 and clock.seconds["targets"] < clock.seconds["optimisation"]
