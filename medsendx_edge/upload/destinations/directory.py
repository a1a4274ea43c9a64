"""Directory destination: copy with fsync into a folder (the embedded default, a USB disk, a share)."""

from __future__ import annotations

import errno
import hashlib

from collections.abc import Callable
from pathlib import Path
from typing import IO

from medsendx_edge.config import mounted
from medsendx_edge.errors import DestinationFaultError, PermanentUploadError, TransientUploadError
from medsendx_edge.fsutil import TMP_PREFIX, atomic_write


class DirectoryDestination:
    kind = "directory"

    def __init__(self, path: Path, require_mount: bool = False) -> None:
        self.path = Path(path)
        self.require_mount = require_mount
        self.progress: Callable[[], None] | None = None

    def send(self, path: Path, item_id: str, sha256: str, suffix: str = ".dcm", retry: bool = False,
             sop_uid: str | None = None) -> str | None:
        """Copy ``path`` to ``<folder>/<id><suffix>`` atomically; verify the bytes written."""
        digest = hashlib.sha256()

        def copy(out: IO[bytes]) -> None:
            with open(path, "rb") as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
                    if self.progress is not None:
                        self.progress()
            if digest.hexdigest() != sha256:
                raise PermanentUploadError("the outbox file does not match the sha256 recorded when queued")

        if self.require_mount and not mounted(self.path):
            # the share or disk came off: copied now, the file would land on the local disk and count as
            # delivered; the whole queue waits instead
            raise DestinationFaultError(f"directory destination: {self.path} is not on a mounted file system "
                                        "(destination.require_mount): mount the share or disk")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if retry:
                # An earlier attempt (cut, or killed by a power cut mid-copy) may have left this item's temp
                # file: it goes now (only this item's: another writer's temp files are theirs).  A first
                # attempt cannot have one, so the folder is not listed on every send.
                for stale in self.path.glob(f"{TMP_PREFIX}*-{item_id}{suffix}"):
                    stale.unlink(missing_ok=True)
            atomic_write(self.path / f"{item_id}{suffix}", copy)
        except OSError as exc:
            # A missing USB disk, a full share: may change later.
            raise TransientUploadError(f"directory destination: {errno.errorcode.get(exc.errno or 0, 'OSError')}") from None
        return None

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass
