"""The triage result in the study, as a DICOM Mammography CAD SR (PS3.16 TID 4000), built with highdicom.

**One SR per exam** (:func:`exam_cad_sr`), as a radiologist reads an exam and as density products report
it: made when the exam is complete (the truck's views, ``triage.exam_views``, are in: the image that
completes them carries it in its own commit), or, for an exam with a view missing, once it has been
quiet for ``EXAM_QUIET_S`` (the daemon's sweep; ``run --once`` sweeps its open exams at its end).  What
changes the exam afterwards (a retake, a view more) makes a new version once the exam is quiet again
(the sweep): Instance Number 2, 3..., naming the one it replaces in its Predecessor Documents Sequence; a
copy of an image already received changes nothing.  In its own series of the exam's (anonymized) study:

    CONTAINER  Mammography CAD Report (TID 4000)
      HAS OBS CONTEXT  Observer Type = Device; Device Observer UID, Name, Manufacturer, Model (TID 1004)
      CONTAINS  CONTAINER Image Library
                  CONTAINS IMAGE  each take that counts (and each view a breast's category comes from)
      CONTAINS  CODE CAD Processing and Findings Summary = All algorithms succeeded; without findings
                  HAS CONCEPT MOD  TEXT Algorithm Name, TEXT Algorithm Version (TID 4019)
      CONTAINS  CONTAINER Successful Analyses (beside the summary: the IOD's relationship constraints let no
                CODE contain a CONTAINER, dsrdump checks it)
                  CONTAINS TEXT Comment   what was done
      CONTAINS  NUM Percent Fibroglandular Tissue (%)   each view's own reading: no category
                  HAS CONCEPT MOD  CODE Laterality
                  HAS PROPERTIES  TEXT Comment   "RCC: this view; automated area-based density estimate, not
                                                 a BI-RADS assessment"
                  INFERRED FROM  IMAGE that view
      CONTAINS  CODE Breast composition = CID 6001   each breast whose views are all in
                  HAS CONCEPT MOD  CODE Laterality
                  HAS PROPERTIES  NUM Percent Fibroglandular Tissue (%)   the mean of the views that count
                  HAS PROPERTIES  TEXT Comment   which views, and the same claim
                  INFERRED FROM  IMAGE each of those views
      CONTAINS  TEXT Comment   the exam's priority (the most urgent of its own, its views', a breast's
                               recheck), the missing views, the exam's reasons and positioning across
                               views, then each view's own priority, reasons and positioning checks: a line each

A category is a breast's, never one view's (the exam book, triage/exam.py).  What the SR says of each
view, and the anonymized patient and study attributes it carries, are kept with the exam's images in
the exam book, so the sweep makes it after the images have left the spool.

**An image with no reading of its own** (not a mammogram the triage reads, a view it could not measure:
not in the exam book) has an SR of its own (:func:`mammography_cad_sr`) saying why: No algorithms
succeeded, Failed Analyses and the reason ("not applicable" reasons).

Either carries no time of its own (see :func:`_no_new_times`), and holds exactly the numbers of the
sidecars and of the exam book (pd, breast_pd, category, priority, reasons).  The document is marked
"not verified" and "complete": a device wrote it and no radiologist has read it.  UIDs come from the
anonymizer's scheme (an HMAC of the site secret: over the source's UID; for an exam's SR over the study's
UID and its takes), so a re-run gives the same instance, and only anonymized values are copied (highdicom
takes the patient and study modules from an image that is anonymized already).
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
                       station_name: str = "") -> pydicom.Dataset:
    """The Mammography CAD SR of one image (``sidecar``: the triage stage's JSON).  The daemon makes it for
    an image with no reading in an exam (not in the exam book: its SR says why); a measured view's reading,
    and its breast's category, are in its exam's SR (:func:`exam_cad_sr`)."""
    import highdicom as hd
    from highdicom.sr import ContainerContentItem, NumContentItem, TextContentItem
    from pydicom.sr.codedict import codes

    _quiet_pseudonym_warning()
    src_uid = str(source.SOPInstanceUID)
    image = (str(source.SOPClassUID), src_uid)
    root = _root()
    content: list[Any] = _observer(uid, station_name)
    imaged: list[str] = []   # every image the tree names, as its items are made (the evidence must hold them)
    library = ContainerContentItem(codes.DCM.ImageLibrary, relationship_type="CONTAINS")
    library.ContentSequence = Sequence([_image_item(imaged, *image, "CONTAINS")])
    content.append(library)

    done = sidecar.get("triage") == "done" and sidecar.get("pd") is not None
    what = ("breast density (area), image quality and positioning checks" if done else
            f"triage {sidecar.get('triage', 'not applicable')}: {sidecar.get('reason') or 'no density measured'}")
    content += _cad_summary(done, what)

    if done:
        # This view's own reading: its percent dense, no category (a category is the breast's).
        view = NumContentItem(codes.DCM.PercentFibroglandularTissue, round(float(sidecar["pd"]) * 100.0, 1),
                              hd.sr.CodedConcept("%", "UCUM", "percent"), relationship_type="CONTAINS")
        view.ContentSequence = Sequence([
            *_laterality(str(sidecar.get("laterality") or "").upper()),
            TextContentItem(codes.DCM.Comment, f"this view; {CATEGORY_CLAIM}", relationship_type="HAS PROPERTIES"),
            _image_item(imaged, *image, "INFERRED FROM"),
        ])
        content.append(view)

    lines = [f"triage priority: {sidecar.get('priority', 'normal')}"]
    lines += [f"reason: {r}" for r in sidecar.get("reasons") or []]
    lines += _positioning_lines(sidecar.get("positioning") or {})
    content.append(_lines_item(lines))
    root.ContentSequence = Sequence(content)

    sr = _document(
        root, imaged, evidence=[source],
        series_instance_uid=uid("triage-sr-series:" + str(source.get("SeriesInstanceUID", src_uid))),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=uid("triage-sr:" + src_uid),
        sop_class_uid=MAMMOGRAPHY_CAD_SR, instance_number=int(source.get("InstanceNumber", 1) or 1),
        manufacturer="MedSendX", is_complete=True, is_final=False, is_verified=False,
        series_description="MedSendX triage (automated estimate, not a diagnosis)")
    _finish(sr, source, station_name)
    return sr


def _observer(uid: Callable[[str], str], station_name: str) -> list[Any]:
    """The device that wrote the SR (TID 1004)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return list(hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid("triage-device:" + (station_name or "station")), name=(station_name or "MedSendX Edge")[:64],
            manufacturer_name="MedSendX", model_name="MedSendX Edge")))


def _image_item(imaged: list[str], sop_class: str, instance: str, relationship: str) -> Any:
    """An image item, its instance noted in ``imaged`` (the images the tree names, for the evidence check)."""
    from highdicom.sr import ImageContentItem
    from pydicom.sr.codedict import codes

    imaged.append(instance)
    return ImageContentItem(codes.DCM.SourceImageForImageProcessingOperation, sop_class, instance,
                            relationship_type=relationship)


def _laterality(side: str) -> list[Any]:
    from highdicom.sr import CodeContentItem
    from pydicom.sr.codedict import codes

    return ([CodeContentItem(codes.SCT.Laterality, codes.SCT.Left if side == "L" else codes.SCT.Right,
                             relationship_type="HAS CONCEPT MOD")] if side in ("L", "R") else [])


def _cad_summary(done: bool, what: str) -> list[Any]:
    """The CAD processing summary with the algorithm's name and version (TID 4019), and beside it (a CODE
    may not contain a CONTAINER in this IOD) the successful or failed analyses saying ``what``."""
    from highdicom.sr import CodeContentItem, ContainerContentItem, TextContentItem
    from pydicom.sr.codedict import codes

    summary = CodeContentItem(codes.DCM.CADProcessingAndFindingsSummary,
                              codes.DCM.AllAlgorithmsSucceededWithoutFindings if done
                              else codes.DCM.NoAlgorithmsSucceededWithoutFindings, relationship_type="CONTAINS")
    summary.ContentSequence = Sequence([
        TextContentItem(codes.DCM.AlgorithmName, ALGORITHM_NAME, relationship_type="HAS CONCEPT MOD"),
        TextContentItem(codes.DCM.AlgorithmVersion, __version__, relationship_type="HAS CONCEPT MOD"),
    ])
    analyses = ContainerContentItem(codes.DCM.SuccessfulAnalyses if done else codes.DCM.FailedAnalyses,
                                    relationship_type="CONTAINS")
    analyses.ContentSequence = Sequence([TextContentItem(codes.DCM.Comment, what[:1024], relationship_type="CONTAINS")])
    return [summary, analyses]


def _lines_item(lines: list[str]) -> Any:
    """One comment of lines (CR LF, DICOM's line break in text): the same words as an item per line, and
    each item of the content tree costs highdicom 0.8 ms to copy, parse and search."""
    from highdicom.sr import TextContentItem
    from pydicom.sr.codedict import codes

    return TextContentItem(codes.DCM.Comment, "\r\n".join(str(line)[:1024] for line in lines),
                           relationship_type="CONTAINS")


def _finish(sr: pydicom.Dataset, source: pydicom.Dataset, station_name: str) -> None:
    """The source's de-identification record, the station, and no time of the SR's own."""
    for kw in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
               "LongitudinalTemporalInformationModified"):
        if kw in source:
            setattr(sr, kw, source[kw].value)
    if station_name:
        sr.StationName = station_name[:16]
    _no_new_times(sr, source)


#: The anonymized attributes an exam's SR takes from its study (highdicom's patient and study modules, the
#: de-identification record, the content date and time it keeps instead of "now"): stored with the exam's
#: images (exams.db), so a sweep makes the SR of an exam whose images have left the spool.
HEADER_KEYWORDS = ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                   "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                   "ReferringPhysicianName", "PatientIdentityRemoved", "DeidentificationMethod",
                   "DeidentificationMethodCodeSequence", "LongitudinalTemporalInformationModified",
                   "ContentDate", "ContentTime")


def report_header(source: pydicom.Dataset) -> str:
    """The anonymized image's attributes the exam's SR carries (:data:`HEADER_KEYWORDS`), as DICOM JSON."""
    import json

    header = pydicom.Dataset()
    for kw in HEADER_KEYWORDS:
        if kw in source:
            header[kw] = source[kw]
    return json.dumps(header.to_json_dict(), sort_keys=True)


def view_report(sidecar: dict[str, Any]) -> str:
    """What the exam's SR says of one view, from its triage sidecar (before the exam's own reasons join
    it: those are the exam's), as JSON."""
    import json

    metrics = sidecar.get("metrics") or {}
    pos = sidecar.get("positioning") or {}
    synthesised = any(str(r).startswith("synthesised") for r in sidecar.get("reasons") or [])
    return json.dumps({"laterality": sidecar.get("laterality"), "view": sidecar.get("view"), "pd": sidecar.get("pd"),
                       "frame": sidecar.get("frame"), "displaced": bool(metrics.get("implant_displaced")),
                       "implant": bool(metrics.get("implant")), "synthesised": synthesised,
                       "priority": sidecar.get("priority", "normal"), "reasons": list(sidecar.get("reasons") or []),
                       "positioning": {"pnl_mm": pos.get("pnl_mm"), "checks": pos.get("checks") or []}},
                      sort_keys=True)


def _view_name(view: dict[str, Any]) -> str:
    """The take as the SR names it: the view, and what kind of take it is when not a plain 2D view (an
    implant-displaced view, an implant view, a synthesised 2D, a tomosynthesis frame)."""
    name = f"{str(view.get('laterality') or '').upper()}{str(view.get('view') or '').upper()}" or "view"
    if view.get("displaced"):
        name += " ID"
    elif view.get("implant"):
        name += " implant"
    if view.get("synthesised"):
        name += " synthesised 2D"
    if view.get("frame") is not None:
        name += f" tomosynthesis frame {view['frame']}"
    return name


def exam_priority(views: list[dict[str, Any]], summary: Any) -> Any:
    """The exam's priority: its own (a dense or asymmetric exam), its views', a breast's recheck: the most urgent."""
    from medsendx_edge.vocabulary import Priority

    return min([Priority.of(summary.priority), *(Priority.of(v.get("priority", "normal")) for v in views),
                *([Priority.RECHECK] if summary.recheck else [])])


def exam_cad_sr(header: pydicom.Dataset, views: list[dict[str, Any]], summary: Any, uid: Callable[[str], str],
                station_name: str = "", version: int = 1, previous: str | None = None,
                unrecorded: int = 0, header_json: str | None = None) -> pydicom.Dataset:
    """The exam's Mammography CAD SR: every take that counts (``views``, in the order recorded: each its
    :func:`view_report` with its SOP class, instance and series UIDs under ``sop``), each breast's category
    once all its views are in (``summary``: the exam book's), the exam's priority and findings.

    ``version``: the exam's SRs are numbered (the Instance Number); ``previous``: the SOP instance UID of
    the version this one replaces (a retake, a late view), named in its Predecessor Documents Sequence.
    ``unrecorded``: takes recorded by a release that kept no report of them (named, not read).

    Its instance UID follows from all of that (and the station and the software's version): the same SR
    made twice is the same instance with the same bytes, and one made of anything else is another
    instance (never two contents under one UID, which the route stage would hold as a conflict)."""
    import hashlib
    import json

    import highdicom as hd
    from highdicom.sr import CodeContentItem, ContainerContentItem, NumContentItem, TextContentItem
    from pydicom.sr.codedict import codes

    _quiet_pseudonym_warning()
    props = "HAS PROPERTIES"
    study = str(header.StudyInstanceUID)
    percent = hd.sr.CodedConcept("%", "UCUM", "percent")
    root = _root()
    content: list[Any] = _observer(uid, station_name)
    imaged: list[str] = []
    refs: dict[str, tuple[str, str, str]] = {}   # instance -> (class, instance, series): the library's images
    for v in views:
        refs.setdefault(v["sop"][1], tuple(v["sop"]))
    for side in sorted(summary.breast_category):
        for r in summary.breast_refs.get(side) or []:
            refs.setdefault(r[1], tuple(r))
    library = ContainerContentItem(codes.DCM.ImageLibrary, relationship_type="CONTAINS")
    library.ContentSequence = Sequence([_image_item(imaged, c, i, "CONTAINS") for c, i, _s in refs.values()])
    content.append(library)
    content += _cad_summary(True, "breast density (area), image quality and positioning checks, per view and per breast")
    for v in views:   # each view's own reading: its percent dense, no category (a category is the breast's)
        if v.get("pd") is None:
            continue
        item = NumContentItem(codes.DCM.PercentFibroglandularTissue, round(float(v["pd"]) * 100.0, 1), percent,
                              relationship_type="CONTAINS")
        item.ContentSequence = Sequence([
            *_laterality(str(v.get("laterality") or "").upper()),
            TextContentItem(codes.DCM.Comment, f"{_view_name(v)}: this view; {CATEGORY_CLAIM}"[:1024],
                            relationship_type=props),
            _image_item(imaged, v["sop"][0], v["sop"][1], "INFERRED FROM"),
        ])
        content.append(item)
    for side in ("R", "L"):   # each breast's category, from all its views together (the exam book)
        category = summary.breast_category.get(side)
        if not category:
            continue
        named = summary.breast_views.get(side) or []
        breast_refs = summary.breast_refs.get(side) or []
        words = ", ".join(named)
        if len(breast_refs) < len(named):
            # views recorded by a release that kept no UIDs (an upgrade in the middle of an exam)
            words += f" ({len(named) - len(breast_refs)} of them recorded without its UID: not referenced)"
        breast = CodeContentItem(codes.DCM.BreastComposition, _category_code(category), relationship_type="CONTAINS")
        breast.ContentSequence = Sequence([
            *_laterality(side),
            NumContentItem(codes.DCM.PercentFibroglandularTissue, round(float(summary.breast_pd[side]) * 100.0, 1),
                           percent, relationship_type=props),
            TextContentItem(codes.DCM.Comment, f"the breast, mean of {words or 'its views'}; {CATEGORY_CLAIM}"[:1024],
                            relationship_type=props),
            *(_image_item(imaged, c, i, "INFERRED FROM") for c, i, _s in breast_refs),
        ])
        content.append(breast)
    priority = exam_priority(views, summary)
    state = "the truck's views all in" if not summary.missing and not summary.withdrawn else "partial"
    lines = [f"exam priority: {priority.label}", f"exam: {state}; {len(views)} takes read"]
    lines += [f"no reading: {m} (not received, or not read: an image not read has its own SR saying why)"
              for m in summary.missing]
    lines += [f"no reading: {w} (taken, but held on the truck in quarantine: not sent)" for w in summary.withdrawn]
    lines += [f"exam reason: {r}" for r in summary.reasons]
    lines += [f"recheck: {w}" for side in sorted(summary.recheck) for w in summary.recheck[side].values()]
    lines += [f"positioning across views: {p}" for p in summary.positioning]
    if unrecorded:
        lines.append(f"{unrecorded} take(s) recorded by an earlier release: counted in the exam, not read here")
    for v in views:
        name = _view_name(v)
        lines.append(f"{name} own priority: {v.get('priority', 'normal')}")
        lines += [f"{name} reason: {r}" for r in v.get("reasons") or []]
        lines += [f"{name} {line}" for line in _positioning_lines(v.get("positioning") or {})]
    content.append(_lines_item(lines))
    root.ContentSequence = Sequence(content)
    first = next(iter(refs.values()))
    lead = pydicom.Dataset()
    lead.update(header)
    lead.SeriesInstanceUID, lead.SOPClassUID, lead.SOPInstanceUID = first[2], first[0], first[1]
    stubs = _evidence_stubs(lead, list(refs.values()))
    predecessors = None
    if previous:
        before = pydicom.Dataset()
        before.StudyInstanceUID, before.SOPClassUID, before.SOPInstanceUID = study, MAMMOGRAPHY_CAD_SR, previous
        before.SeriesInstanceUID = uid("triage-exam-sr-series:" + study)
        predecessors = [before]
    made_of = {"header": header_json if header_json is not None else json.dumps(header.to_json_dict(), sort_keys=True),
               "views": views, "unrecorded": unrecorded, "version": version, "previous": previous,
               "station": station_name, "software": __version__, "takes": summary.report_key,
               "breasts": [[side, summary.breast_category.get(side), summary.breast_pd.get(side),
                            summary.breast_views.get(side), summary.breast_refs.get(side)] for side in ("R", "L")],
               "exam": [summary.priority, summary.reasons, summary.recheck, summary.positioning, summary.missing,
                        # (only when some: an exam without has the identity, so the UID, of the release before)
                        *([summary.withdrawn] if summary.withdrawn else [])]}
    identity = hashlib.sha256(json.dumps(made_of, sort_keys=True, default=str).encode()).hexdigest()[:32]
    sr = _document(
        root, imaged, evidence=[lead, *stubs],
        series_instance_uid=uid("triage-exam-sr-series:" + study), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uid(f"triage-exam-sr:{study}:{identity}"), sop_class_uid=MAMMOGRAPHY_CAD_SR,
        instance_number=version, manufacturer="MedSendX", is_complete=True, is_final=False, is_verified=False,
        previous_versions=predecessors, series_description="MedSendX triage (automated estimate, not a diagnosis)")
    _finish(sr, header, station_name)
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

    from medsendx_edge.triage import hdtables

    hdtables.install()   # before highdicom's SR constructor first reads its module table: the part we need

    class _CadSR(hd.sr.sop._SR):
        def _add_contributing_equipment(self, *args: Any, **kwargs: Any) -> None:
            return None

    return _CadSR


def _evidence_stubs(source: pydicom.Dataset, refs: list[tuple[str, str, str]] | None) -> list[pydicom.Dataset]:
    """The exam's other images as evidence (the SR's Current Requested Procedure Evidence Sequence lists
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
