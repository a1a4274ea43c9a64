"""The anonymize stage: inbox/.queue -> anonymized/.  Shares :class:`Anonymizer` with the CLI."""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydicom.uid import UID

from medsendx_edge.anonymize.profile import Context, anonymize_dataset, burned_in_reason
from medsendx_edge.config import Config
from medsendx_edge.anonymize.dicomio import SplitFile, image_without_pixels, read_split, write_split
from medsendx_edge.errors import QuarantineError, RetryLater
from medsendx_edge.anonymize.linkage import LinkageStore, holds_pseudonymized_data, site_secret
from medsendx_edge.spool import ANONYMIZED, INCOMING, Claimed, Spool
from medsendx_edge.stage import Facts, Output, Result, Stage


@dataclass
class Prepared:
    """A file read and anonymized in memory, ready to be written."""

    split: SplitFile
    modality: str
    sop_class: str
    transfer_syntax: str
    sop_uid: str = ""   # the anonymized SOP Instance UID


class Anonymizer:
    """Reads a file, applies the profile, records the linkage, writes the result."""

    def __init__(self, cfg: Config, linkage: LinkageStore | None = None, *, durable: bool = True) -> None:
        self.cfg = cfg
        acfg = cfg.anonymize
        db = cfg.spool_dir / "state" / "linkage.db"
        # A spool that has pseudonymized data must keep its secret: a new one would give every patient
        # new pseudonyms and UIDs (the same woman twice at the PACS).  Refuse to start instead.
        used = holds_pseudonymized_data(db)
        secret = site_secret(acfg.secret_file, create=not used,
                             why=f" but this spool already holds pseudonymized data ({db})")
        self.ctx = Context.create(secret, acfg, cfg.station_name)
        self.linkage = linkage if linkage is not None else LinkageStore(db, acfg.linkage_key_file, durable=durable)
        self.linkage.check_site_secret(secret, acfg.secret_file)

    def prepare(self, path: Path) -> Prepared:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
            raise QuarantineError("not a regular file", error_class="NotRegularFile")
        split = read_split(path)
        ds = split.dataset
        missing = image_without_pixels(split)
        if missing:
            raise QuarantineError(missing, error_class="Truncated")
        if self.cfg.anonymize.burned_in == "quarantine":
            why = burned_in_reason(ds)
            if why:
                raise QuarantineError(why, error_class="BurnedInAnnotation")
        sop_class = UID(str(ds.get("SOPClassUID", "") or ""))
        if not str(sop_class):
            raise QuarantineError("no SOPClassUID: not a composite DICOM object", error_class="NoSOPClass")
        modality = str(ds.get("Modality", "") or "")
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        link = anonymize_dataset(ds, self.ctx, split.trailing)
        if not link.sop_uid:
            raise QuarantineError("no SOPInstanceUID", error_class="NoSOPInstance")
        self.linkage.record(link)  # before anything is published: a recall must always be reachable
        name = sop_class.name if sop_class.is_valid else "unknown"
        return Prepared(split, modality if modality.isalnum() else "", name, ts, link.sop_uid)

    def write(self, prepared: Prepared, out: IO[bytes]) -> None:
        write_split(prepared.split, out)

    @staticmethod
    def unchanged(prepared: Prepared) -> bool:
        """True if the source still has the size and mtime it had when read."""
        try:
            st = os.stat(prepared.split.path)
        except FileNotFoundError:
            return False
        return st.st_size == prepared.split.size and st.st_mtime_ns == prepared.split.mtime_ns


class AnonymizeStage(Stage):
    name = "anonymize"
    input_queue = INCOMING
    output_queue = ANONYMIZED

    def __init__(self, spool: Spool, anonymizer: Anonymizer) -> None:
        super().__init__(spool)
        self.anonymizer = anonymizer

    def reconfigure(self, anonymizer: Anonymizer) -> None:
        """A reload: the anonymizer of the new config (built, and so validated, before the swap)."""
        self.anonymizer = anonymizer

    def process(self, item: Claimed) -> Result:
        try:
            prepared = self.anonymizer.prepare(item.path)
        except QuarantineError as exc:
            grace = self.anonymizer.cfg.watch.incomplete_grace_s
            if exc.error_class == "Truncated" and time.time() - os.lstat(item.path).st_mtime < grace:
                # A modality that paused mid-write looks stable for a moment: give it time to finish.
                raise RetryLater("truncated, but written to recently: waiting for the rest") from None
            raise

        def write(fh: IO[bytes]) -> None:
            self.anonymizer.write(prepared, fh)
            if not self.anonymizer.unchanged(prepared):
                # The modality was still writing: nothing is published, read again later.
                raise RetryLater("the file changed while being read")

        return Result.done(Output(writer=write, facts=Facts(sop_uid=prepared.sop_uid)),
                           modality=prepared.modality, sop_class=prepared.sop_class,
                           transfer_syntax=prepared.transfer_syntax)
