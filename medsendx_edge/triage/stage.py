"""The triage stage: anonymized/ -> triaged/, with ``<id>.json`` (metrics, priority) and ``<id>.png``
(the radiologist's picture) beside the file, and a features row in the local store.

Triage never blocks an anonymized file: objects without pixels pass with triage "not applicable",
pixels that cannot be decoded or analysed pass with the reason recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, UID

from medsendx_edge.anonymize.dicomio import PIXEL_KEYWORDS, decoding_plugin
from medsendx_edge.config import Config
from medsendx_edge.triage.exam import ExamBook
from medsendx_edge.triage.features import FeatureStore
from medsendx_edge.vocabulary import FEATURE_COLUMNS, Priority
from medsendx_edge.logs import get_logger
from medsendx_edge.spool import ANONYMIZED, OUTBOX, SENT, TRIAGED, Claimed, Spool, derived_id
from medsendx_edge.stage import NewItem, Output, Result, Stage

#: The largest single frame triage decodes (a 4096x5200 16-bit mammogram is 42 MB).
MAX_FRAME_BYTES = 512 << 20


@dataclass
class TriageOutcome:
    sidecar: dict[str, Any]
    png: bytes | None
    later: Callable[[], bytes] | None = None   # the picture, to draw later (``png`` is then None)


class NotTriaged(Exception):
    """This object cannot be triaged; ``str(exc)`` says why (no patient data).  ``ds``: its header, when
    it was read (a radiograph or a CT slice then gets a tissue map instead)."""

    def __init__(self, reason: str, ds: pydicom.Dataset | None = None) -> None:
        super().__init__(reason)
        self.ds = ds


def exam_key(ds: pydicom.Dataset) -> str | None:
    """A pseudonymous exam key: a hash of the (already pseudonymized) StudyInstanceUID."""
    study = str(ds.get("StudyInstanceUID", "") or "")
    return hashlib.sha256(f"exam:{study}".encode()).hexdigest()[:16] if study else None


def read_for_triage(path: Path) -> tuple[pydicom.Dataset, Any, Any]:
    """The header, the gate's decision, and the one frame triage uses (decoded alone).

    Nothing is decoded for an object triage does not apply to.  Memory stays at one frame whatever
    the object: the header is read without the pixel data, and ``pydicom.pixels.pixel_array(path,
    index=...)`` decodes only the frame asked for, reading it from the file (a 1 GB tomosynthesis
    object costs one 2D frame, not 1 GB, nor 2 GB decoded)."""
    from pydicom.pixels import pixel_array  # type: ignore[attr-defined]

    from medsendx_edge.triage.gate import gate

    with open(path, "rb") as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        header_end = fh.tell()
        has_pixels = header_end < os.fstat(fh.fileno()).st_size or any(k in ds for k in PIXEL_KEYWORDS)
    deflated = ds.file_meta.get("TransferSyntaxUID", "") == DeflatedExplicitVRLittleEndian
    if deflated:
        # A deflated file (the route's ``compression: deflate``) is one stream: its header read inflated all of
        # it, so where the read stopped says nothing of the pixel data.  One frame is read whole, inflated (the
        # anonymizer read it so too); a deflated multi-frame object is not: its frames cannot be read one at a
        # time, and all of them inflated and decoded is what this function promises never to hold.
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise NotTriaged("a deflated multi-frame object (its frames are not read one at a time)", ds)
        has_pixels = True   # known once it is read whole, below the gate's and the size's checks
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 16) or 16)
    if not (rows and cols) or not has_pixels:
        raise NotTriaged("no pixel data")
    g = gate(ds)
    if not g.applicable:
        raise NotTriaged(g.reason, ds)
    if rows * cols * spp * max(1, bits // 8) > MAX_FRAME_BYTES:
        raise NotTriaged(f"a frame of {rows}x{cols} is larger than triage decodes")
    if deflated:
        whole = pydicom.dcmread(path)
        if not any(k in whole for k in PIXEL_KEYWORDS):
            raise NotTriaged("no pixel data")
        return ds, g, whole.pixel_array
    frame = native_frame(path, ds, header_end, g.frame)
    if frame is None:
        frame = pixel_array(path, index=g.frame,
                            decoding_plugin=decoding_plugin(ds.file_meta.get("TransferSyntaxUID", "")))
    return ds, g, frame


_NATIVE_LE = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")   # explicit and implicit VR little endian
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def _whole(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    """A header value that must be a whole number (``default`` when absent or empty, if there is one)."""
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise ValueError(keyword)
        return default
    number = float(value)
    if not number.is_integer():
        raise ValueError(keyword)
    return int(number)


def native_frame(path: Path, ds: pydicom.Dataset, at: int, index: int | None) -> Any:
    """One frame of a native (uncompressed, little-endian) 16-bit grey-scale image, read straight into its
    array, or None for anything else (pydicom's ``pixel_array`` decodes that).

    pydicom reads the pixel data into a bytes object, copies it into a writable array and then corrects
    the unused high bits: 18 ms of a 2560x3328 mammogram's triage, three passes over 17 MB of fresh
    memory; this is one read into the array and one in-place pass (8 ms with the header read).  The same values, the same
    dtype and shape as ``pixel_array(path, index=index)``: tests/test_triage_stage.py holds them equal on
    every native file of pydicom's test data and on our phantoms.  A header pydicom would refuse (a value
    missing, empty or not a whole number, a photometric interpretation that is not grey) and a command set
    in the body are left to pydicom too (a hostile review's cases).  ``at``: where the header read stopped
    (the pixel data element's tag)."""
    import numpy as np

    try:
        implicit, little = ds.original_encoding   # from the transfer syntax
        native = str(ds.file_meta.get("TransferSyntaxUID", "")) in _NATIVE_LE
        bits, spp, rows, cols, stored, signed = (_whole(ds, kw) for kw in (
            "BitsAllocated", "SamplesPerPixel", "Rows", "Columns", "BitsStored", "PixelRepresentation"))
        frames = _whole(ds, "NumberOfFrames", default=1)
        grey = str(ds.get("PhotometricInterpretation", "") or "").strip() in ("MONOCHROME1", "MONOCHROME2")
    except (TypeError, ValueError):
        return None   # missing, empty, not a whole number: pydicom's own checks say what is wrong
    if not (native and little and grey and bits == 16 and spp == 1 and 0 < rows <= 0xFFFF and 0 < cols <= 0xFFFF
            and 1 <= stored <= 16 and signed in (0, 1) and frames >= 1):
        return None
    if any(tag.group == 0 for tag in ds.keys()):
        return None   # a command set in the file's body: pydicom's pixel reader parses it its own way
    explicit = not implicit
    if index is None and frames != 1 or index is not None and not 0 <= index < frames:
        return None   # (all frames at once: pydicom's shape, not ours)
    with open(path, "rb") as fh:
        fh.seek(at)
        head = fh.read(12 if explicit else 8)
        if head[:4] != _PIXEL_DATA_TAG or (explicit and head[4:6] not in (b"OW", b"OB")):
            return None
        length = int.from_bytes(head[8:12] if explicit else head[4:8], "little")
        size = rows * cols * 2
        if length == 0xFFFFFFFF or length < size * frames:
            return None   # encapsulated, or shorter than its header says: pydicom says what it makes of it
        if at + len(head) + size * ((index or 0) + 1) > os.fstat(fh.fileno()).st_size:
            return None   # the file ends before the frame (nothing allocated for a frame that is not there)
        fh.seek(at + len(head) + size * (index or 0))
        arr = np.fromfile(fh, dtype="<i2" if signed else "<u2", count=rows * cols)
    if arr.size != rows * cols:
        return None
    arr = arr.reshape(rows, cols)
    if stored < 16:
        if signed:   # the sign of the stored bits extended over the unused ones, as pydicom does
            arr <<= 16 - stored
            arr >>= 16 - stored
        else:
            arr &= (1 << stored) - 1
    return arr


def warm_up(send_sr: bool) -> str | None:
    """What the first triaged image would otherwise load on its own clock: the analysis's modules, OpenCV's
    and Pillow's, and (with the SR on) highdicom and the DICOM tables it reads on its first SR (its module
    table as the extract our SRs read: triage/hdtables.py).  The daemon runs this in a thread at start,
    beside the first files' anonymization; a failure here only means the first image loads them.  Returns
    which module table the SR reads ("extract" or "whole", :mod:`~medsendx_edge.triage.hdtables`), None
    without the SR."""
    import cv2  # noqa: F401
    from PIL import ImageFont

    from medsendx_edge.triage import analysis, display, picture  # noqa: F401

    ImageFont.load_default(size=18)
    if send_sr:
        import highdicom  # noqa: F401
        from pydicom.sr.codedict import codes

        from medsendx_edge.triage import hdtables
        from medsendx_edge.triage.report import _category_code, _document_class

        _category_code("d")
        _ = codes.DCM.Comment
        _document_class()   # which puts the table extract in place (triage/hdtables.py)
        from highdicom import _standard_utils as tables   # the IOD tables its SR checks read, cached

        for load in ("get_module_attribute_map", "get_iod_module_map", "get_sop_class_iod_map"):
            getattr(tables, load, lambda: None)()
        return "extract" if hdtables.installed_table() is not None else "whole"
    return None


def not_applicable(reason: str, ds: pydicom.Dataset | None = None, status: str = "not applicable") -> TriageOutcome:
    side: dict[str, Any] = {"triage": status, "reason": reason, "priority": "normal", "reasons": [], "pd": None,
                            "category": None}
    if ds is not None:
        side["exam"] = exam_key(ds)
    return TriageOutcome(side, None)


def triage_file(path: Path, cfg: Config, defer: bool = False) -> tuple[TriageOutcome, pydicom.Dataset | None]:
    """The whole per-image triage of one file (the stage and ``segment`` share this).  ``defer``: see
    :func:`triage_dataset`."""
    try:
        ds, g, frame = read_for_triage(path)
    except NotTriaged as exc:
        out = not_applicable(str(exc))
        if exc.ds is not None and cfg.triage.tissue_map:
            with_tissue_map(out, exc.ds, path)
        return out, None
    except Exception as exc:  # noqa: BLE001 - never quote the file
        return not_applicable(f"could not be read for triage ({type(exc).__name__})", status="failed"), None
    return triage_dataset(ds, cfg, frame, g, defer=defer), ds


def with_tissue_map(out: TriageOutcome, ds: pydicom.Dataset, path: Path | None = None, frame: Any = None) -> None:
    """A radiograph or a CT slice gets the tissue map (triage/tissue.py): a picture and the class areas, a
    visual aid; the density result stays "not applicable" and the priority normal.  Never raises."""
    from medsendx_edge.triage import tissue

    try:
        why = tissue.applies(ds)
    except Exception as exc:  # noqa: BLE001 - a visual aid never fails a file
        why = f"the header cannot be read for a tissue map ({type(exc).__name__})"
    if why is None:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if rows * cols * max(1, int(ds.get("BitsAllocated", 16) or 16) // 8) > MAX_FRAME_BYTES:
            why = f"a frame of {rows}x{cols} is larger than triage decodes"
    if why is not None:
        out.sidecar["tissue_map"] = {"status": "not applicable", "reason": why}
        return
    try:
        if frame is None:
            from pydicom.pixels import pixel_array  # type: ignore[attr-defined]

            frame = pixel_array(path) if path is not None else ds.pixel_array
        tm = tissue.tissue_map(ds, frame)
        out.png = tissue.render_png(tm)
        out.sidecar["tissue_map"] = {"status": "done", **tm.summary()}
    except Exception as exc:  # noqa: BLE001 - a visual aid never fails a file
        out.sidecar["tissue_map"] = {"status": "failed", "reason": f"pixels could not be mapped ({type(exc).__name__})"}


def triage_dataset(ds: pydicom.Dataset, cfg: Config, frame: Any = None, g: Any = None,
                   defer: bool = False) -> TriageOutcome:
    """Gate, analysis, priority, category and picture for one dataset.

    ``frame``: the frame :func:`read_for_triage` decoded (``ds`` then holds the header only).  ``defer``:
    the picture of an image that is not to be rechecked is left to draw later (``later``: the daemon's
    picture desk, triage/pictures.py), from what it needs of the analysis; a recheck's is drawn now."""
    from medsendx_edge.triage.analysis import analyse
    from medsendx_edge.triage.categories import priority
    from medsendx_edge.triage.gate import gate
    from medsendx_edge.triage.picture import draw_png, picture_source, render_png

    tcfg = cfg.triage
    g = g or gate(ds)
    if not g.applicable:
        return not_applicable(g.reason, ds)
    if frame is None and not any(k in ds for k in PIXEL_KEYWORDS):
        return not_applicable("no pixel data", ds)
    try:
        an = analyse(ds, tcfg.k, cfg.station_name, frame, g.frame_note, g.domain)
    except Exception as exc:  # noqa: BLE001 - undecodable or unusual pixels: record and pass on
        out = not_applicable(f"pixels could not be analysed ({type(exc).__name__})", ds, status="failed")
        out.sidecar["pixels_note"] = g.frame_note or None
        return out
    if an.no_breast:
        prio, reasons = "recheck", ["no breast in the field: blank or dark exposure"]
        an.metrics["pd"] = None
    else:
        prio, reasons = priority(an.metrics, tcfg.rules)
        reasons = list(g.flags) + an.findings + reasons
        failed, advisory = positioning_reasons(an.positioning.checks, an.metrics, tcfg.positioning_recheck)
        if failed:
            prio = "recheck"
        reasons += failed + advisory
    # No category from one view: a breast's category comes from its views together, once they are all in
    # (the exam book; :meth:`TriageStage.process`).
    an.metrics["category"] = None
    an.metrics["exam"] = exam_key(ds)  # a feature column too: the fleet miner groups by it
    instance = str(ds.get("SOPInstanceUID", "") or "")
    present = ["background"] + [name for code, name in ((1, "fat"), (2, "dense"), (254, "implant"),
                                                          (255, "pectoral")) if (an.labels_small == code).any()]
    sidecar = {"triage": "done", "priority": prio, "reasons": reasons, "category": None,
               "instance": hashlib.sha256(f"instance:{instance}".encode()).hexdigest()[:16] if instance else None,
               "category_claim": None,
               "labels": present, "frame": (g.frame + 1) if g.frame is not None else None,
               **{c: an.metrics.get(c) for c in FEATURE_COLUMNS}, "metrics": an.metrics,
               "positioning": an.positioning.as_dict()}
    if defer and prio != Priority.RECHECK.label:
        source, max_px, shown, note = picture_source(an), tcfg.preview_max_px, list(reasons), g.frame_note
        return TriageOutcome(sidecar, None,
                             lambda: draw_png(source, prio, max_px, reasons=shown, frame_note=note))
    return TriageOutcome(sidecar, render_png(an, prio, tcfg.preview_max_px, reasons=reasons, frame_note=g.frame_note))


def _breast_category(sidecar: dict[str, Any], summary: Any) -> None:
    """The breast's density category on each of its images once all its views are in (the exam book):
    from the views together, never from this view alone; with the views it comes from and its pd (the
    sidecar, the console, the fleet's row; the exam's SR has it from the exam book)."""
    side = str(sidecar.get("laterality") or "").upper()
    metrics = sidecar.get("metrics") or {}
    # an implant view's own density is not comparable; an implant-displaced view (often with a sliver of
    # implant in its field) is one the breast is read from
    not_comparable = metrics.get("implant") and not metrics.get("implant_displaced")
    category = None if not_comparable else summary.breast_category.get(side)
    if not category:
        return
    from medsendx_edge.triage.categories import CATEGORY_CLAIM

    sidecar.update(category=category, category_claim=CATEGORY_CLAIM, breast_pd=summary.breast_pd[side],
                   category_views=summary.breast_views[side])
    sidecar.setdefault("metrics", {})["category"] = category


def _breast_checks(sidecar: dict[str, Any], failed_checks: dict[str, str]) -> None:
    """The breast's failed checks join the image's own (sidecar, metrics, the Prometheus count, the fleet
    row's ``positioning_failed``) on the image that carries its recheck."""
    pos = sidecar.setdefault("positioning", {})
    checks = pos.setdefault("checks", [])
    names = {c.get("check") for c in checks}
    from medsendx_edge.triage.positioning import RULES

    for name, words in failed_checks.items():
        if name not in names:   # the nipple's own check is there already (failed on this view too)
            checks.append({"check": name, "result": "fail", "value": None, "unit": "", "rule": RULES[name],
                           "note": words})
            names.add(name)
    failed = sorted({c["check"] for c in checks if c.get("result") == "fail"})
    sidecar["positioning_failed"] = ",".join(failed) or None
    sidecar.setdefault("metrics", {})["positioning_failed"] = sidecar["positioning_failed"]


def positioning_reasons(checks: Any, metrics: dict[str, Any], recheck: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The failed positioning checks in a radiographer's words ("pectoral does not reach the nipple line
    on LMLO"): those that raise ``recheck`` (``triage.positioning_recheck``), and the advisory ones."""
    from medsendx_edge.triage.positioning import message

    where = f"{metrics.get('laterality') or ''}{metrics.get('view') or ''}"
    failed, advisory = [], []
    for c in checks:
        if c.result != "fail":
            continue
        if c.name == "nipple_in_profile":
            # The breast's check (ACR: in profile on at least one view): the exam book raises it.
            advisory.append(message(c.name, where) + " (recheck if the breast's other view does not show it)")
        elif c.name in recheck:
            failed.append(message(c.name, where))
        else:
            advisory.append(message(c.name, where) + " (advisory)")
    return failed, advisory


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def overlay_secondary_capture(source: pydicom.Dataset, png: bytes, uid: Any) -> pydicom.Dataset:
    """The triage picture as a DICOM Secondary Capture in the source's (anonymized) study.

    ``uid(text)`` is the anonymizer's UID scheme (HMAC of the site secret), so a re-run gives the
    same instance and the PACS stores it once.  Only anonymized values are copied from the source.
    """
    import io

    import numpy as np
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    src_uid = str(source.SOPInstanceUID)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    meta.MediaStorageSOPInstanceUID = UID(uid("triage-overlay:" + src_uid))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    for kw in ("PatientName", "PatientID", "PatientIdentityRemoved", "DeidentificationMethod",
               "DeidentificationMethodCodeSequence", "LongitudinalTemporalInformationModified",
               "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
               "PatientBirthDate", "PatientSex", "StationName"):
        if kw in source:
            setattr(ds, kw, source[kw].value)
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = uid("triage-overlay-series:" + str(source.get("SeriesInstanceUID", src_uid)))
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesDescription = "MedSendX triage overlay (not for diagnosis)"
    ds.ImageComments = "Automated triage picture: not for diagnosis"
    ds.SeriesNumber = 9901
    ds.InstanceNumber = int(source.get("InstanceNumber", 1) or 1)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"  # our legend only: no identifying text
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = src_uid
    ds.SourceImageSequence = [ref]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = rgb.shape[0], rgb.shape[1]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    return ds


class TriageStage(Stage):
    name = "triage"
    input_queue = ANONYMIZED
    output_queue = TRIAGED

    def __init__(self, spool: Spool, cfg: Config, features: FeatureStore | None = None,
                 uid: Any = None) -> None:
        super().__init__(spool)
        self.cfg = cfg
        self.uid = uid  # the anonymizer's UID scheme, for the optional overlay object
        self.features = features or FeatureStore(spool.root / "state" / "features.db")
        self.exams = ExamBook(spool.root / "state" / "exams.db", cfg.triage.birads_thresholds,
                              cfg.triage.asymmetry_pd, cfg.triage.exam_views, cfg.triage.positioning_recheck)
        self.log = get_logger(stage=self.name)
        self.lookahead = cfg.triage.threads - 1
        self._seen: dict[str, tuple[int, float]] = {}   # the sweep's: exam -> (its last record, when first seen)
        spool.quarantine_listeners.append(self.withdraw)
        spool.requeue_listeners.append(self.restore)
        self.pictures: Any = None   # the daemon's PictureDesk (triage/pictures.py): pictures that can wait

    def withdraw(self, item_id: str) -> None:
        """An image quarantined after its record (a refused upload, a placement that failed for good): its exam
        is read without it, and its SR made again without it once the exam is quiet.  A failure here is caught
        up by :meth:`reconcile` (at start, and before each sweep)."""
        if self.exams.withdraw([item_id]):
            self.log.info("exam_image_withdrawn", file_id=item_id)

    def restore(self, item_id: str) -> None:
        if self.exams.restore([item_id]):
            self.log.info("exam_image_restored", file_id=item_id)

    def reconcile(self) -> None:
        """The exam book against the spool: every image in quarantine withdrawn, every withdrawn one back in a
        queue restored (a requeue by the command line, another process; a crash between a quarantine and its
        listener).  One deleted from quarantine stays withdrawn: it never reaches the PACS."""
        # (a reason beside no file is not a quarantine: a requeue cut short after its move, a quarantine cut short
        # before it; the image is on its way, or delivered and pruned from sent/ since)
        quarantined = {item_id for stage, item_id in self.spool.quarantined()
                       if self.spool.in_quarantine(stage, item_id)}
        for item_id in self.exams.recorded(quarantined):
            self.withdraw(item_id)
        for item_id in self.exams.withdrawn():
            if item_id not in quarantined and self.spool.holds(item_id):
                self.restore(item_id)

    def reconfigure(self, cfg: Config, uid: Any = None) -> None:
        """A reload: the next image is triaged, and its exam judged, under the new settings."""
        self.cfg, self.uid = cfg, uid if uid is not None else self.uid
        t = cfg.triage
        self.lookahead = t.threads - 1
        self.exams.thresholds, self.exams.asymmetry_pd = t.birads_thresholds, t.asymmetry_pd
        self.exams.views, self.exams.positioning_recheck = t.exam_views, t.positioning_recheck

    def exam_priority(self, item_id: str) -> Priority | None:
        """The priority of the exam ``item_id`` belongs to (the route stage applies it)."""
        exam = self.exams.exam_of(item_id)
        return None if exam is None else Priority.of(self.exams.summary(exam).priority)

    def prepare(self, item: Claimed) -> tuple[TriageOutcome, pydicom.Dataset | None]:
        """The image's own analysis and picture (``triage.threads`` of them at once): the file alone."""
        return triage_file(item.path, self.cfg, defer=self._may_defer())

    def _may_defer(self) -> bool:
        """Pictures may wait for the desk: it runs, and the picture is no object that is sent (the overlay)."""
        return self.pictures is not None and self.pictures.running and not self.cfg.triage.send_overlay

    def process(self, item: Claimed) -> Result:
        outcome, ds = self.prepared(item)
        sidecar = {"id": item.id, **outcome.sidecar}
        sop = ((str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID))
               if ds is not None and all(k in ds for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID")) else None)
        report = header = None
        if sop is not None and ds is not None and sidecar.get("triage") == "done" and sidecar.get("exam"):
            from medsendx_edge.triage.report import report_header, view_report

            report, header = view_report(sidecar), report_header(ds)
        summary = self.exams.record(item.id, sidecar, sop=sop, report=report, header=header)
        if summary is not None:
            sidecar["exam_summary"] = summary.as_dict()
            _breast_category(sidecar, summary)
            if Priority.of(summary.priority) < Priority.of(sidecar["priority"]):
                sidecar["priority"] = summary.priority  # the exam's urgency reaches all its images
                sidecar["reasons"] = [*sidecar["reasons"], *(f"exam: {r}" for r in summary.reasons)]
            side = str(sidecar.get("laterality") or "").upper()
            metrics = sidecar.get("metrics") or {}
            if (side in summary.recheck and item.id in summary.latest and not metrics.get("implant_displaced")
                    and str(sidecar.get("view") or "").upper() in ("CC", "MLO")):
                # The breast's views fail together (the CC short of the MLO at the nipple line, the nipple
                # in profile on neither): the take that completes the pair, or a retake that does not mend
                # it, says so while the woman is on the truck; a duplicate or a superseded take does not.
                sidecar["priority"] = Priority.RECHECK.label
                sidecar["reasons"] = [*sidecar["reasons"], *summary.recheck[side].values()]
                _breast_checks(sidecar, summary.recheck[side])
            raised = self.spool.state.raise_priority([i for i in summary.images if i != item.id],
                                                     Priority.of(summary.priority))
            if raised:
                self.log.info("exam_priority_raised", count=raised, priority=summary.priority)
        png, later = outcome.png, outcome.later
        if later is not None and (sidecar["priority"] == Priority.RECHECK.label or not self._may_defer()):
            # the exam made it a recheck (the radiographer's alert shows it now), or the desk stopped meanwhile
            png, later = later(), None
        out = Output(companions={".json": sidecar})
        if png is not None:
            out.companions[".png"] = png
        if png is not None and self.cfg.triage.send_overlay and self.uid is not None and ds is not None:
            out.new_items.append(self._overlay(ds, png, sidecar["priority"], derived_id(item.id, "overlay")))
        duplicate = summary is not None and item.id in summary.duplicate_ids
        # A duplicate (the same image sent again) is not delivered twice, nor is its SR: made now, with the
        # exam further on, the SR would differ from the first one under the same instance UID.
        if summary is not None and not self.cfg.triage.send_sr:
            # SRs off: no SR for the exam as it is now (turned on later, the sweep makes one only once an image
            # joins it again); a failure to say so is no reason to hold the image back
            try:
                self.exams.report_none(summary.exam, summary.report_key, summary.seq)
            except sqlite3.Error:
                pass
        if self.cfg.triage.send_sr and self.uid is not None and ds is not None and not duplicate:
            if summary is None:
                # not an exam's image (no density measured, not a mammogram): its own SR says so
                out.new_items.append(self._report(ds, sidecar, derived_id(item.id, "report")))
            elif summary.complete:
                # The exam's SR, made by the image that completes its views (or that joins an exam quiet for
                # 10 minutes); a change after it (a retake, a view more) is the sweep's, once the exam is
                # quiet again: one version for the whole change, not one for each image of a combo exam.
                try:
                    exam_sr = self._exam_report(summary, derived_id(item.id, "exam-report"), in_commit=True)
                except Exception as exc:  # noqa: BLE001 - the image goes on without it: the sweep tries again
                    exam_sr = None
                    self.log.error("report_not_made", file_id=item.id, error_class=type(exc).__name__, exc_info=exc)
                if exam_sr is not None:
                    out.new_items.append(exam_sr)
        if sidecar["triage"] == "done":
            self.features.append(item.id, sidecar)
            from medsendx_edge.metrics import POSITIONING

            for check in (sidecar.get("positioning") or {}).get("checks") or []:
                POSITIONING.labels(check["check"], check["result"]).inc()
        if sidecar["priority"] == "recheck":
            self.log.warning("triage_recheck", file_id=item.id, priority="recheck", reason="; ".join(sidecar["reasons"]))
        return Result.done(out, after=later, triage=sidecar["triage"], priority=sidecar["priority"],
                           percent_dense=sidecar.get("pd"), reason=sidecar.get("reason"))

    def placed(self, item: Claimed, result: Result) -> None:
        assert result.output is not None
        for new in result.output.new_items:
            self._made(new)
            self.log.info("report_queued" if new.sidecar["triage"] == "report" else "overlay_queued",
                          file_id=new.id, priority=new.sidecar["priority"])
        draw = result.after
        if draw is not None and not (self.pictures is not None and self.pictures.defer(item.id, draw)):
            self.spool.place_picture(item.id, draw())   # the desk stopped after the image was triaged

    def missing_pictures(self) -> int:
        """At start: the images a crash or a power cut left without the picture their triage deferred (a
        sidecar that says the triage was done, no ``.png`` beside it, in triaged/, outbox/ or sent/) are
        drawn again from their files, at the desk, while the triage is idle.  Returns how many."""
        if self.pictures is None or not self.pictures.running:
            return 0
        n = left = 0
        for queue in (TRIAGED, OUTBOX, SENT):
            d = self.spool.dir(queue)
            try:
                names = set(os.listdir(d))
            except FileNotFoundError:
                continue
            for name in sorted(names):
                item_id, ext = os.path.splitext(name)
                if ext != ".json" or f"{item_id}.png" in names:
                    continue
                try:
                    done = json.loads((d / name).read_text()).get("triage") == "done"
                except (OSError, ValueError, AttributeError):
                    continue
                if not done or self.picture_given_up(item_id):
                    continue
                if self.pictures.defer(item_id, lambda i=item_id: self._redraw(i)):
                    n += 1
                else:
                    left += 1   # more than the desk holds: the next start
        if n or left:
            self.log.info("pictures_redrawn", count=n, left=left,
                          reason="deferred before a crash: drawn again from the images")
        return n

    def _redraw(self, item_id: str) -> bytes | None:
        """The picture of ``item_id`` drawn again from its file (read through a descriptor opened under its lock,
        so a claim or a move meanwhile changes nothing).  One that gives no picture is counted; so is a death of
        the daemon blamed on it (the desk notes the image in hand: :meth:`Daemon.recover`), not a power cut:
        after ``max_recoveries`` it is given up (:func:`picture_given_up`), not redrawn at every start."""
        if self.picture_given_up(item_id):
            return None
        fd = self.spool.open_placed(item_id)
        if fd is None:
            return None
        try:
            outcome, _ = triage_file(Path(f"/proc/self/fd/{fd}"), self.cfg)
        finally:
            os.close(fd)
        if outcome.png is None:
            self.picture_failed(item_id, f"its file gave no picture ({outcome.sidecar.get('reason')})")
        return outcome.png

    def picture_given_up(self, item_id: str) -> bool:
        return self.spool.state.recoveries(f"{item_id}:picture") >= self.spool.max_recoveries

    def picture_failed(self, item_id: str, reason: str) -> None:
        """A redraw of ``item_id`` gave no picture, or the daemon died drawing it: counted, and said."""
        count = self.spool.state.bump_recoveries(f"{item_id}:picture")
        if count >= self.spool.max_recoveries:
            self.log.warning("picture_given_up", file_id=item_id, attempts=count, reason=reason)
        else:
            self.log.warning("picture_not_redrawn", file_id=item_id, attempts=count, reason=reason)

    def _made(self, new: NewItem) -> None:
        """An exam's SR is in the spool: marked in the exam book with the exam's records it covers (the sweep
        looks again only once another image joins the exam).  A mark that cannot be written leaves the exam
        to the sweep, which finds the SR made and marks it then."""
        made = new.sidecar.get("exam_report")
        if not made:
            return
        try:
            self.exams.report_placed(made["exam"], made["key"], made["seq"])
        except sqlite3.Error as exc:
            self.log.warning("report_not_recorded", file_id=new.id, error_class=type(exc).__name__,
                             reason="the exam book cannot be written: the sweep marks the SR later")

    def _exam_sr(self, summary: Any, version: int, previous: str | None) -> tuple[pydicom.Dataset, str] | None:
        """The exam's SR from what the exam book holds of its takes that count, and its priority; None when
        the book holds no header for it (every take recorded by a release before the exam's SR)."""
        from medsendx_edge.triage.report import exam_cad_sr, exam_priority

        header_json, inputs = self.exams.report_inputs(summary.exam)
        if header_json is None:
            return None
        views: list[dict[str, Any]] = []
        unrecorded = 0
        for image_id in summary.images:
            if image_id not in summary.latest:
                continue
            report, sop = inputs.get(image_id, (None, None))
            if report is None or sop is None:
                unrecorded += 1
                continue
            views.append({**json.loads(report), "sop": sop})
        if not views:
            return None
        sr = exam_cad_sr(pydicom.Dataset.from_json(header_json), views, summary, self.uid, self.cfg.station_name,
                         version, previous, unrecorded, header_json)
        return sr, exam_priority(views, summary).label

    def _exam_report(self, summary: Any, new_id: str, in_commit: bool = False) -> NewItem | None:
        """The exam's SR as the new item ``new_id``, its version recorded in the exam book first (the next
        version names it, whatever becomes of this one); None when the exam book has it already.

        ``in_commit``: an image's commit makes the exam's first SR only, or the same SR again when it is
        that image's redo (the commit did not happen: a crash, a full disk); later versions are the sweep's.
        The SR's instance UID follows from everything it is made of (the takes, what the book holds of them,
        the version and the one it replaces, the station, the software), so the same SR made twice is the
        same instance and the same bytes (the route stage sends it once), and an SR made of anything else
        is another instance, never a conflict under one UID."""
        key = summary.report_key
        last = self.exams.last_report(summary.exam)
        # The last version recorded, but never found in the spool and not there (its image quarantined, a
        # crash before its publish, a write refused): it is made again in its place, under its number and
        # naming what it named, whoever makes it now, and nothing ever names it.
        unpublished = (last is not None and last[1] != "" and last[5] is None and last[4] != new_id
                       and not self._in_spool(last[4]))   # (a row without an instance UID marks "none to make")
        if last is not None and last[0] == key and not unpublished:
            if last[4] != new_id or self._in_spool(new_id):
                return None                      # made already, by another image or a sweep, or this one's is out
            version, previous = last[2], last[3]  # the same item again, not out yet (a redo): the same SR
        elif last is not None and unpublished:
            version, previous = last[2], last[3]
        elif last is not None and in_commit:
            return None                          # a change after the first SR: the sweep's, once quiet
        else:
            version, previous = (1, None) if last is None else (last[2] + 1, last[1] or None)
        built = self._exam_sr(summary, version, previous)
        if built is None:
            return None
        sr, prio = built
        sop = str(sr.SOPInstanceUID)
        # the exam's last record number read with the rows the SR is made of: a withdrawal by the uploader thread
        # while it was built is after it, and the sweep looks at the exam again
        seq = summary.seq
        self.exams.report_made(summary.exam, key, sop, version, previous, new_id)
        return NewItem(lambda fh: sr.save_as(fh, enforce_file_format=True),
                       {"id": new_id, "triage": "report", "priority": prio,
                        "exam_report": {"exam": summary.exam, "key": key, "sop": sop, "version": version, "seq": seq}},
                       sop, new_id)

    def _in_spool(self, item_id: str) -> bool:
        """Is the item in the spool (triaged/ or after, claimed or not, quarantine too) or known to the upload
        queue?"""
        return self.spool.exists_after(ANONYMIZED, item_id) or self.spool.state.item(item_id) is not None

    def sweep_reports(self, final: bool = False, now: float | None = None) -> int:
        """The SRs of exams that changed after their last SR, or never completed: quiet for ``EXAM_QUIET_S``
        (with ``final``, all of them: ``run --once``'s end), made outside any image's commit and published
        into triaged/ like a stage's new item; returns how many.  The version is recorded before the publish
        and the exam marked after it: a crash in between makes the same item again at the next sweep (the
        same id, instance and bytes), which is published once."""
        from medsendx_edge.stage import publish_new
        from medsendx_edge.triage.exam import EXAM_QUIET_S

        self.reconcile()
        if not (self.cfg.triage.send_sr and self.uid is not None):
            return 0
        now = time.time() if now is None else now
        made = 0
        waiting = self.exams.unreported()
        seen, self._seen = self._seen, {}
        for exam, seq, recorded in waiting:
            # Quiet: by the wall clock since its last record, or, when the clock was wrong then (a record
            # from the future), for as long by this process's own clock since the sweep first saw that record.
            first = seen.get(exam, (seq, time.monotonic()))
            first = first if first[0] == seq else (seq, time.monotonic())
            self._seen[exam] = first
            if not final and recorded > now - EXAM_QUIET_S and time.monotonic() - first[1] < EXAM_QUIET_S:
                continue
            try:
                summary = self.exams.summary(exam, float("inf"))
                key = summary.report_key
                if not summary.images:
                    # Every image withdrawn: nothing to read, and an SR needs evidence.  A version out names
                    # images the PACS will not get: said, for the operator (requeued, they are read again).
                    out = self.exams.last_placed(exam)
                    if out is not None:
                        self.log.warning("report_names_withdrawn", version=out, count=len(summary.withdrawn),
                                         reason="every image of the exam is in quarantine: its SR out stays")
                    self.exams.report_none(exam, key, summary.seq)
                    continue
                # The item named by the key and the version it would be: a key may come back (an image withdrawn,
                # then requeued), a version of it never does (the same item again only as a redo of this one).
                last = self.exams.last_report(exam)
                version = 1 if last is None else last[2] if last[0] == key else last[2] + 1
                new = self._exam_report(summary, derived_id(summary.images[-1], f"exam-report:{key}:{version}"))
                if new is None:   # made already (a duplicate joined: nothing new), or nothing the book can read
                    self.exams.report_none(exam, key, summary.seq)
                    continue
                if not self._in_spool(new.id):
                    publish_new(self.spool, TRIAGED, new)
                self._made(new)
                self.log.info("report_queued", file_id=new.id, priority=new.sidecar["priority"], exam_sweep=True)
                made += 1
            except Exception as exc:  # noqa: BLE001 - one exam's SR that cannot be made now holds no other
                self.log.error("report_not_made", error_class=type(exc).__name__, exc_info=exc)
        return made

    def _report(self, source: pydicom.Dataset, sidecar: dict[str, Any], new_id: str) -> NewItem:
        """An image's own SR (triage/report.py: an image with no reading in an exam says why), queued like an
        image at the image's priority."""
        from medsendx_edge.triage.report import mammography_cad_sr

        sr = mammography_cad_sr(source, sidecar, self.uid, self.cfg.station_name)
        new = NewItem(lambda fh: sr.save_as(fh, enforce_file_format=True),
                      {"id": new_id, "triage": "report", "priority": sidecar["priority"]}, str(sr.SOPInstanceUID),
                      new_id)
        return new

    def _overlay(self, source: pydicom.Dataset, png: bytes, prio: str, new_id: str) -> NewItem:
        sc = overlay_secondary_capture(source, png, self.uid)
        new = NewItem(lambda fh: sc.save_as(fh, enforce_file_format=True),
                      {"id": new_id, "triage": "overlay", "priority": prio}, str(sc.SOPInstanceUID), new_id)
        return new


def skipped_sidecar(item_id: str, why: str) -> dict[str, Any]:
    """The sidecar of an image that crashed the daemon in triage again and again (``why``, the spool's
    words): it goes on untriaged (an upload is never held back by triage), at normal priority, saying why."""
    return {"id": item_id, "triage": "failed", "priority": Priority.NORMAL.label, "reason": f"{why}: skipped"}
