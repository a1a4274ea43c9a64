"""The triage result in the study, as a DICOM Mammography CAD SR (PS3.16 TID 4000), built with highdicom.

One SR per triaged image (not for a copy of an image already received: its first copy's SR stands), in
its own series of the image's (anonymized) study, referencing the image:

    CONTAINER  Mammography CAD Report (TID 4000)
      HAS OBS CONTEXT  Observer Type = Device; Device Observer UID, Name, Manufacturer, Model (TID 1004)
      CONTAINS  CONTAINER Image Library
                  CONTAINS IMAGE  the source image (and the breast's other views, once it has a category)
      CONTAINS  CODE CAD Processing and Findings Summary = All algorithms succeeded; without findings
                                                         | No algorithms succeeded; without findings
                  HAS CONCEPT MOD  TEXT Algorithm Name, TEXT Algorithm Version (TID 4019)
      CONTAINS  CONTAINER Successful Analyses | Failed Analyses (beside the summary: the IOD's
                relationship constraints let no CODE contain a CONTAINER, dsrdump checks it)
                  CONTAINS TEXT Comment   what was done, or why not ("not applicable" reasons)
      CONTAINS  NUM Percent Fibroglandular Tissue (%)   this view's reading (when measured): no category
                  HAS CONCEPT MOD  CODE Laterality
                  HAS PROPERTIES  TEXT Comment   "this view; automated area-based density estimate, not a
                                                 BI-RADS assessment"
                  INFERRED FROM  IMAGE the source image
      CONTAINS  CODE Breast composition = CID 6001   the breast's, once all its views are in
                  HAS CONCEPT MOD  CODE Laterality
                  HAS PROPERTIES  NUM Percent Fibroglandular Tissue (%)   the mean of the views that count
                  HAS PROPERTIES  TEXT Comment   which views, and the same claim
                  INFERRED FROM  IMAGE each of those views
      CONTAINS  TEXT Comment   the priority and each of its reasons (the recheck a radiographer acted on),
                               and the positioning checks: a line each

A category is a breast's, never one view's (the exam book, triage/exam.py): the first view of a breast
has its percent dense only; the image that completes the breast, and any later image of that breast while
it has one, carries the breast's category too, inferred from every view it comes from (this image among
them, or not: a tomosynthesis frame of a view taken in 2D), and those views are in the SR's evidence.

It carries no time of its own (see :func:`_no_new_times`).  It holds exactly the sidecar's numbers (pd,
breast_pd, category, priority, reasons).  The document is marked
"not verified" and "complete": a device wrote it and no radiologist has read it.  UIDs come from the
anonymizer's scheme (an HMAC of the site secret over the source's UID), so a re-run gives the same
instance, and only anonymized values of the source are copied (highdicom takes the patient and study
modules from the source image, which is anonymized already).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.sequence import Sequence

from medsendx_edge import __version__
from medsendx_edge.triage.categories import CATEGORY_CLAIM

if TYPE_CHECKING:
    from highdicom.sr.sop import _SR

MAMMOGRAPHY_CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
ALGORITHM_NAME = "MedSendX Edge triage: thickness-corrected K-Means area density"
SR_SERIES_NUMBER = 9902
_PSEUDONYM_WARNING = r"The string .* is unlikely to represent the intended person name"
_HIGHDICOM = r"highdicom\."


def _quiet_pseudonym_warning() -> None:
    """The anonymizer's pseudonym is one name component by design (no given name to invent); highdicom
    warns about that on every SR, and each warning was a line in the technician's log.  Checked on every
    call (a caller's warning context may have dropped it, a later filter may stand in front of it) but
    added only then: adding a filter resets the record of warnings already shown once, everywhere."""
    first = warnings.filters[0] if warnings.filters else None
    if not (first is not None and first[0] == "ignore" and first[2] is UserWarning
            and getattr(first[1], "pattern", None) == _PSEUDONYM_WARNING
            and getattr(first[3], "pattern", None) == _HIGHDICOM):
        # missing, or something else put in front of it: (back) at the front
        warnings.filterwarnings("ignore", message=_PSEUDONYM_WARNING, category=UserWarning, module=_HIGHDICOM)


def _category_code(category: str) -> Any:
    from pydicom.sr.codedict import codes

    return {"a": codes.cid6001.AlmostEntirelyFat, "b": codes.cid6001.ScatteredFibroglandularDensities,
            "c": codes.cid6001.HeterogeneouslyDense, "d": codes.cid6001.ExtremelyDense}[category]


def mammography_cad_sr(source: pydicom.Dataset, sidecar: dict[str, Any], uid: Callable[[str], str],
                       station_name: str = "", breast_refs: list[tuple[str, str, str]] | None = None) -> pydicom.Dataset:
    """The Mammography CAD SR for one triaged image (``sidecar``: the triage stage's JSON; ``breast_refs``: the
    SOP class, instance and series UIDs of the views the breast's category comes from)."""
    import highdicom as hd
    from highdicom.sr import (CodeContentItem, ContainerContentItem, ImageContentItem, NumContentItem,
                              TextContentItem)
    from pydicom.sr.codedict import codes

    _quiet_pseudonym_warning()
    contains, mod, props = "CONTAINS", "HAS CONCEPT MOD", "HAS PROPERTIES"
    src_uid = str(source.SOPInstanceUID)
    image = (str(source.SOPClassUID), src_uid)
    root = _root()
    content: list[Any] = []
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid("triage-device:" + (station_name or "station")), name=(station_name or "MedSendX Edge")[:64],
            manufacturer_name="MedSendX", model_name="MedSendX Edge"))
    content.extend(observer)

    imaged: list[str] = []   # every image the tree names, as its items are made (the evidence must hold them)

    def image_item(sop_class: str, instance: str, relationship: str) -> Any:
        imaged.append(instance)
        return ImageContentItem(codes.DCM.SourceImageForImageProcessingOperation, sop_class, instance,
                                relationship_type=relationship)

    library = ContainerContentItem(codes.DCM.ImageLibrary, relationship_type=contains)
    others = [(c, i) for c, i, _s in breast_refs or [] if i != src_uid] if sidecar.get("category") else []
    library.ContentSequence = Sequence([image_item(c, i, contains) for c, i in [image, *others]])
    content.append(library)

    done = sidecar.get("triage") == "done" and sidecar.get("pd") is not None
    summary = CodeContentItem(codes.DCM.CADProcessingAndFindingsSummary,
                              codes.DCM.AllAlgorithmsSucceededWithoutFindings if done
                              else codes.DCM.NoAlgorithmsSucceededWithoutFindings, relationship_type=contains)
    analyses = ContainerContentItem(codes.DCM.SuccessfulAnalyses if done else codes.DCM.FailedAnalyses,
                                    relationship_type=contains)
    what = ("breast density (area), image quality and positioning checks" if done else
            f"triage {sidecar.get('triage', 'not applicable')}: {sidecar.get('reason') or 'no density measured'}")
    analyses.ContentSequence = Sequence([TextContentItem(codes.DCM.Comment, what[:1024], relationship_type=contains)])
    summary.ContentSequence = Sequence([
        TextContentItem(codes.DCM.AlgorithmName, ALGORITHM_NAME, relationship_type=mod),
        TextContentItem(codes.DCM.AlgorithmVersion, __version__, relationship_type=mod),
    ])
    content.append(summary)
    content.append(analyses)  # beside the summary: a CODE may not contain a CONTAINER in this IOD

    if done:
        lat = str(sidecar.get("laterality") or "").upper()
        laterality = ([CodeContentItem(codes.SCT.Laterality, codes.SCT.Left if lat == "L" else codes.SCT.Right,
                                       relationship_type=mod)] if lat in ("L", "R") else [])
        # This view's own reading: its percent dense, no category (a category is the breast's).
        view = NumContentItem(codes.DCM.PercentFibroglandularTissue, round(float(sidecar["pd"]) * 100.0, 1),
                              hd.sr.CodedConcept("%", "UCUM", "percent"), relationship_type=contains)
        view.ContentSequence = Sequence([
            *laterality,
            TextContentItem(codes.DCM.Comment, f"this view; {CATEGORY_CLAIM}", relationship_type=props),
            image_item(*image, "INFERRED FROM"),
        ])
        content.append(view)
        category = sidecar.get("category")
        if category and sidecar.get("breast_pd") is not None:
            # The breast's category, from all its views together (the exam book), inferred from each of them.
            named = sidecar.get("category_views") or []
            views = ", ".join(named)
            breast = CodeContentItem(codes.DCM.BreastComposition, _category_code(category), relationship_type=contains)
            refs = [(c, i) for c, i, _s in breast_refs or []] or [image]
            if len(refs) < len(named):
                # views recorded by a release that kept no UIDs (an upgrade in the middle of an exam)
                views += f" ({len(named) - len(refs)} of them recorded without its UID: not referenced)"
            breast.ContentSequence = Sequence([
                *laterality,
                NumContentItem(codes.DCM.PercentFibroglandularTissue, round(float(sidecar["breast_pd"]) * 100.0, 1),
                               hd.sr.CodedConcept("%", "UCUM", "percent"), relationship_type=props),
                TextContentItem(codes.DCM.Comment, f"the breast, mean of {views or 'its views'}; {CATEGORY_CLAIM}"[:1024],
                                relationship_type=props),
                *(image_item(c, i, "INFERRED FROM") for c, i in refs),
            ])
            content.append(breast)

    lines = [f"triage priority: {sidecar.get('priority', 'normal')}"]
    lines += [f"reason: {r}" for r in sidecar.get("reasons") or []]
    lines += _positioning_lines(sidecar.get("positioning") or {})
    # One comment of lines (CR LF, DICOM's line break in text): the same words as an item per line, and
    # each item of the content tree costs highdicom 0.8 ms to copy, parse and search (7 of the SR's 25 ms).
    content.append(TextContentItem(codes.DCM.Comment, "\r\n".join(str(line)[:1024] for line in lines),
                                   relationship_type=contains))
    root.ContentSequence = Sequence(content)

    sr = _document(
        root, imaged,
        evidence=[source, *_evidence_stubs(source, breast_refs if sidecar.get("category") else None)],
        series_instance_uid=uid("triage-sr-series:" + str(source.get("SeriesInstanceUID", src_uid))),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=uid("triage-sr:" + src_uid),
        sop_class_uid=MAMMOGRAPHY_CAD_SR, instance_number=int(source.get("InstanceNumber", 1) or 1),
        manufacturer="MedSendX", is_complete=True, is_final=False, is_verified=False,
        series_description="MedSendX triage (automated estimate, not a diagnosis)")
    for kw in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
               "LongitudinalTemporalInformationModified"):
        if kw in source:
            setattr(sr, kw, source[kw].value)
    if station_name:
        sr.StationName = station_name[:16]
    _no_new_times(sr, source)
    return sr


def _root() -> Any:
    from highdicom.sr import ContainerContentItem
    from pydicom.sr.codedict import codes

    return ContainerContentItem(codes.DCM.MammographyCADReport, template_id="4000")


def _document(root: Any, referenced: list[str], standard: bool = False, **kwargs: Any) -> _SR:
    """highdicom's SR document (its SR document modules, the patient and study modules from the evidence,
    the evidence sequence, its checks) holding the content tree ``root``; ``referenced``: the instance UIDs
    of the tree's image items, collected as they were made.

    highdicom's constructor deep-copies the tree, parses the copy back into content items and walks it for
    the images it references: 11 of the SR's 15 ms on the triage stage's serial path, for a tree built
    just now from highdicom's own content items.  So the document is made around an empty root of the same
    concept (all the rest as highdicom does it), then given the tree; what the walk checked (every image
    the tree names is in the evidence) is checked against ``referenced``.  ``standard``: highdicom's own
    way, for tests/test_triage_report.py, which holds the two equal, element for element.  (``sr.content``
    is the tree itself here, not a copy: nothing reads it, and the tree is made for this SR alone.)"""
    from highdicom.sr.value_types import ContentSequence

    cls = _document_class()
    if standard:
        return cls(content=root, **kwargs)
    known = {str(e.SOPInstanceUID) for e in kwargs["evidence"]}
    if not set(referenced) <= known:
        raise ValueError("the SR names an image that is not in its evidence")
    shell = _root()
    shell.ContentSequence = Sequence([])
    sr = cls(content=shell, **kwargs)
    for tag, value in root.items():
        sr[tag] = value
    sr._content = ContentSequence([root], is_root=True)
    return sr


@functools.cache
def _document_class() -> type[_SR]:
    """highdicom's generic SR document, without the contributing-equipment record it adds from the source
    image: the record's time stamp is a time the truck has not declared (:func:`_no_new_times` takes it out
    again), and building it was 2 of the SR's 23 ms, on the triage stage's serial path."""
    import highdicom as hd

    class _CadSR(hd.sr.sop._SR):
        def _add_contributing_equipment(self, *args: Any, **kwargs: Any) -> None:
            return None

    return _CadSR


def _evidence_stubs(source: pydicom.Dataset, refs: list[tuple[str, str, str]] | None) -> list[pydicom.Dataset]:
    """The breast's other views as evidence (the SR's Current Requested Procedure Evidence Sequence lists
    every instance its content references): their UIDs only, in the source's study."""
    out = []
    for sop_class, instance, series in refs or []:
        if instance == str(source.SOPInstanceUID):
            continue
        stub = pydicom.Dataset()
        stub.StudyInstanceUID = source.StudyInstanceUID
        stub.SeriesInstanceUID, stub.SOPClassUID, stub.SOPInstanceUID = series, sop_class, instance
        out.append(stub)
    return out


def _positioning_lines(pos: dict[str, Any]) -> list[str]:
    """The positioning checks as the SR's comments: each check, its result and value, and its rule."""
    lines = []
    if pos.get("pnl_mm") is not None:
        lines.append(f"posterior nipple line: {pos['pnl_mm']:.0f} mm")
    for c in pos.get("checks") or []:
        value = f" ({c['value']} {c['unit']})" if c.get("value") is not None else ""
        note = f" ({c['note']})" if c.get("note") else ""
        lines.append(f"positioning check {c['check']}: {c['result']}{value}{note}; rule: {c['rule']}")
    return lines


def _no_new_times(sr: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """Nothing that leaves may carry a time the truck has not declared: the SR's creation and content
    times (highdicom's "now", the exam's day) become the source's own anonymized content date and time
    (or study date and time, else the anonymizer's dummy), and the contributing-equipment record with
    its time stamp (Type 3) goes."""
    for kw in ("InstanceCreationDate", "InstanceCreationTime", "ContributingEquipmentSequence"):
        if kw in sr:
            delattr(sr, kw)
    date = str(source.get("ContentDate", "") or source.get("StudyDate", "") or "") or "19000101"
    time_ = str(source.get("ContentTime", "") or source.get("StudyTime", "") or "") or "000000"
    sr.ContentDate, sr.ContentTime = date, time_
