"""Round 4 of the front end's per-request cost: its cyclic collector's settings."""

from __future__ import annotations

import gc

from jacobian_service.heap import FRONT_END_YOUNG, freeze_heap


def test_a_front_ends_heap_is_frozen_with_its_own_young_threshold_the_older_ones_kept():
    """``serve``'s front ends call ``freeze_heap(young=FRONT_END_YOUNG)``: the youngest
    generation collected after that many container objects made than freed (Python's
    700 walked the live requests in flight every few requests under load), the older
    generations' thresholds and everything else about the collector left as they were."""
    before = gc.get_threshold()
    try:
        freeze_heap(young=FRONT_END_YOUNG)
        assert gc.get_threshold() == (FRONT_END_YOUNG, *before[1:])
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
