"""The disk guard: while free space on the spool's file system is under ``min_free_mb`` the inbox is not
taken (the files stay safe on the share, the C-STORE listener answers "out of resources") and delivered
copies in ``sent/`` are pruned first.  Said once each way."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from medsendx_edge.logs import get_logger


class DiskGuard:
    def __init__(self, root: Path, prune_sent: Callable[[], int]) -> None:
        self.root = root
        self.prune_sent = prune_sent   # removes delivered copies, returns how many
        self.low = False
        self.log = get_logger()

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 1e6

    def check(self, min_free_mb: float) -> bool:
        """True while there is room to take files from the inbox."""
        free = self.free_mb()
        if free < min_free_mb:
            if not self.low:
                removed = self.prune_sent()  # delivered copies go first
                free = self.free_mb()
                if free >= min_free_mb:
                    self.log.info("sent_pruned_for_space", removed=removed, free_mb=round(free, 1))
                    return True
                self.low = True
                self.log.warning("disk_low", free_mb=round(free, 1), min_free_mb=min_free_mb, removed=removed)
            return False
        if self.low:
            self.low = False
            self.log.info("disk_ok", free_mb=round(free, 1), min_free_mb=min_free_mb)
        return True
