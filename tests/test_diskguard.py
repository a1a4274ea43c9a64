"""The disk guard (diskguard.py): delivered copies pruned first, the inbox held while space is short, said
once each way.  (A real full file system is in test_service.py, on a small tmpfs.)"""

from __future__ import annotations

import json

from medsendx_edge.diskguard import DiskGuard


def test_prunes_first_holds_while_low_and_says_it_once_each_way(tmp_path, log_lines):
    free = iter([50.0, 200.0, 50.0, 80.0, 40.0, 300.0, 300.0])  # MB, one or two looks per check
    pruned = []
    guard = DiskGuard(tmp_path, lambda: pruned.append(1) or 3)
    guard.free_mb = lambda: next(free)  # type: ignore[method-assign]
    assert guard.check(100.0) is True and pruned == [1] and not guard.low   # pruning made room
    assert guard.check(100.0) is False and guard.low and pruned == [1, 1]  # not enough: low
    assert guard.check(100.0) is False and pruned == [1, 1]                # still low: no pruning again
    assert guard.check(100.0) is True and not guard.low                    # space back
    assert guard.check(100.0) is True
    events = [json.loads(x)["event"] for x in log_lines.getvalue().splitlines()]
    assert events == ["sent_pruned_for_space", "disk_low", "disk_ok"]
