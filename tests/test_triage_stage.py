"""The triage stage on physics phantoms and real files: gating (non-mammograms, raw, blank exposures,
tomosynthesis read one frame at a time), implants, quality rules that mean what they say, and the exam's
priority reaching every image.  (The validation set is in test_triage_validation.py.)"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import make_config
from medsendx_edge.daemon import Daemon
from medsendx_edge.spool import SENT
from medsendx_edge.vocabulary import Priority
from medsendx_edge.triage.analysis import analyse
from medsendx_edge.triage.phantom import phantom_dataset
from medsendx_edge.triage.stage import triage_dataset

BTO = "1.2.840.10008.5.1.4.1.1.13.1.3"


@pytest.mark.parametrize("edge_eq", [0.0, 0.5, 1.0])
def test_fatty_breast_is_fatty_whatever_the_periphery(edge_eq):
    """fe570f1 read 0.80-0.88 for 5-20 % dense breasts with a thin, un-equalised periphery."""
    ds, truth = phantom_dataset(1024, 832, density=0.10, edge_eq=edge_eq, seed=11)
    an = analyse(ds, 3, "T")
    assert abs(an.metrics["pd"] - truth.pd) <= 0.05


def test_raw_for_processing_is_log_transformed_not_nonsense():
    ds, truth = phantom_dataset(1024, 832, density=0.4, raw=True, seed=5)
    side = triage_dataset(ds, make_config(Path("/x")), ds.pixel_array).sidecar
    assert side["triage"] == "done" and side["metrics"]["domain"] == "processing"
    assert abs(side["pd"] - truth.pd) <= 0.05 and side["metrics"]["chest_wall"] == "left"


def test_blank_exposure_is_a_recheck_without_a_density():
    ds, _ = phantom_dataset(512, 416, density=0.3)
    flat = np.random.default_rng(0).normal(2000, 20, size=(512, 416)).clip(0, 4095).astype(np.uint16)
    ds.PixelData = flat.tobytes()
    side = triage_dataset(ds, make_config(Path("/x")), flat).sidecar
    assert side["priority"] == "recheck" and side["pd"] is None and side["category"] is None
    assert "no breast in the field" in side["reasons"][0]
    assert not any("dense" in r for r in side["reasons"])


def test_tomosynthesis_decodes_one_frame_and_reads_the_functional_groups(tmp_path):
    ds, truth = phantom_dataset(512, 416, spacing_mm=0.5, view="MLO", laterality="R", density=0.3,
                                header_view=False, seed=3)
    frame = ds.pixel_array
    frames = 9
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BTO
    ds.NumberOfFrames = frames
    stack = np.stack([np.zeros_like(frame)] * 4 + [frame] + [np.zeros_like(frame)] * 4)
    ds.PixelData = stack.tobytes()
    anatomy = pydicom.Dataset()
    anatomy.FrameLaterality = "R"
    group = pydicom.Dataset()
    group.FrameAnatomySequence = [anatomy]
    ds.SharedFunctionalGroupsSequence = [group]
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "R-10226", "SRT", "medio-lateral oblique"
    ds.ViewCodeSequence = [code]
    path = tmp_path / "tomo.dcm"
    ds.save_as(path, enforce_file_format=True)
    from medsendx_edge.triage.stage import triage_file

    out, _ = triage_file(path, make_config(tmp_path))
    side = out.sidecar
    assert side["frame"] == 5 and "frame 5 of 9" in side["metrics"]["pixels_note"]
    assert side["laterality"] == "R" and side["view"] == "MLO"
    assert side["metrics"]["pectoral_corner"] == "top" and abs(side["pd"] - truth.pd) <= 0.05


def test_implant_is_left_out_and_named():
    ds, truth = phantom_dataset(1024, 832, density=0.3, implant=True, seed=8)
    out = triage_dataset(ds, make_config(Path("/x")), ds.pixel_array)
    side = out.sidecar
    assert side["metrics"]["implant"] and "implant: density not comparable" in side["reasons"]
    assert side["category"] is None and "implant" in side["labels"]
    assert abs(side["pd"] - truth.pd) <= 0.05  # the glands around it, not the silicone


def _positioning_counted() -> float:
    from medsendx_edge.metrics import REGISTRY

    return sum(REGISTRY.get_sample_value("medsendx_positioning_checks_total", {"check": c, "result": r}) or 0
               for c in ("nipple_in_profile", "motion_blur") for r in ("pass", "fail", "not measured"))


def _exam_files(inbox: Path, densities: dict[str, float], study: str, seed: int) -> None:
    for n, (name, dens) in enumerate(densities.items()):
        lat, view = name[0], name[1:]
        ds, _ = phantom_dataset(512, 416, spacing_mm=0.5, view=view, laterality=lat, density=dens,
                                study_uid=study, seed=seed + n, one_breast=True)
        ds.save_as(inbox / f"{name}.dcm", enforce_file_format=True)


def test_exam_priority_reaches_every_image_and_asymmetry_is_flagged(tmp_path):
    cfg = make_config(tmp_path)
    cfg.inbox.mkdir(parents=True)
    # One woman at 0.55 on every view: the same priority for all four (not three normal, one high).
    _exam_files(cfg.inbox, {"RCC": 0.55, "LCC": 0.55, "RMLO": 0.55, "LMLO": 0.55}, "2.25.1", 10)
    # Another: 0.15 left, 0.55 right: an asymmetry, and the denser breast sets the exam's category.
    (cfg.inbox / "b").mkdir()
    _exam_files(cfg.inbox / "b", {"LCC": 0.15, "LMLO": 0.15, "RCC": 0.55, "RMLO": 0.55}, "2.25.2", 20)
    for f in cfg.inbox.rglob("*.dcm"):
        os.utime(f, (0, 0))
    daemon = Daemon(cfg)
    counted_before = _positioning_counted()
    daemon.recover()
    daemon.scanner.scan()
    daemon.process_pipeline()
    rows = daemon.spool.state.due(time.time() + 1, limit=20)
    assert len(rows) == 8 and {r.priority for r in rows} == {Priority.HIGH}
    assert daemon.run_once() == 0
    sides = [json.loads((daemon.spool.dir(SENT) / f"{i}.json").read_text()) for i in daemon.spool.ready(SENT)]
    by_exam: dict[str, list[dict]] = {}
    for s in sides:
        by_exam.setdefault(s["exam"], []).append(s)
    assert len(by_exam) == 2
    finals = [max(v, key=lambda s: s["exam_summary"]["images"])["exam_summary"] for v in by_exam.values()]
    sym = next(f for f in finals if not f["asymmetry"])
    asym = next(f for f in finals if f["asymmetry"])
    assert sym["category"] == "c" and sym["status"] == "complete" and sorted(sym["views"]) == [
        "LCC", "LMLO", "RCC", "RMLO"]
    assert asym["category"] == "c" and abs(asym["breast_pd"]["L"] - 0.15) <= 0.05
    assert any(r.startswith("asymmetry") for r in asym["reasons"])
    assert all(s["exam"] and len(s["exam"]) == 16 for s in sides)  # a pseudonymous key, no UID
    # issue 24: every image's positioning checks are counted for the fleet's dashboard
    assert _positioning_counted() - counted_before == 16   # 8 images, each with a nipple and a blur check


def test_header_that_disagrees_with_the_pixels_is_reported():
    ds, _ = phantom_dataset(512, 416, spacing_mm=0.5, view="CC", laterality="R", density=0.3, seed=31)
    ds.ImageLaterality = "L"  # the header says left; the chest wall is on the right of the pixels
    ds.PatientOrientation = ["A", "R"]
    side = triage_dataset(ds, make_config(Path("/x")), ds.pixel_array).sidecar
    assert side["metrics"]["chest_wall"] == "right"
    assert any(r.startswith("orientation: the pixels put the chest wall on the right") for r in side["reasons"])


def test_a_breast_recheck_lands_on_the_take_that_completes_it_and_a_good_retake_clears_it(tmp_path, monkeypatch):
    """Review of issue 24: the breast's checks (CC short of the MLO at the nipple line; the nipple on neither
    view) flag the take that completes the pair or a retake that does not mend it, never a duplicate, a
    superseded take or the other breast; the failed check joins the image's own for the fleet."""
    from medsendx_edge.spool import ANONYMIZED, TRIAGED, Spool
    from medsendx_edge.stage import Runner
    from medsendx_edge.triage import stage as S

    cfg = make_config(tmp_path)
    spool = Spool(cfg.spool_dir)
    spool.ensure_layout()
    planned: dict[str, dict] = {}
    monkeypatch.setattr(S, "triage_file", lambda path, _cfg, defer=False: (S.TriageOutcome(dict(planned[path.name.split(".")[0]]),
                                                                                None), None))
    stage = S.TriageStage(spool, cfg)

    def take(lat, view, pnl, instance, short=-20.0):
        item_id = f"{len(planned) + 1:024x}"
        planned[item_id] = {"triage": "done", "priority": "normal", "reasons": [], "exam": "E1", "laterality": lat,
                            "view": view, "pd": 0.2, "instance": instance, "frame": None,
                            "positioning": {"checks": [{"check": "nipple_in_profile", "result": "pass"}]},
                            "metrics": {"pnl_mm": pnl, "pectoral_shortfall_mm": short if view == "MLO" else None}}
        spool.path(ANONYMIZED, item_id).write_bytes(b"placeholder")
        assert Runner(stage).drain() == 1
        return json.loads((spool.dir(TRIAGED) / f"{item_id}.json").read_text())

    assert take("R", "CC", 55, "a")["priority"] == "normal"          # alone: nothing to compare
    mlo = take("R", "MLO", 80, "b")                                    # completes the pair: 25 mm short
    assert mlo["priority"] == "recheck" and any(r.startswith("CC shorter") for r in mlo["reasons"])
    assert "pnl_cc_mlo" in mlo["positioning_failed"]
    assert take("R", "MLO", 80, "b")["priority"] == "normal"          # the same image again: no second alert
    assert take("L", "CC", 70, "c")["priority"] == "normal"           # the other breast
    assert take("L", "MLO", 75, "d")["priority"] == "normal"
    assert take("R", "CC", 56, "e")["priority"] == "recheck"          # a retake that does not mend it
    assert take("R", "CC", 76, "f")["priority"] == "normal"           # a good retake clears it


def _frames_of(path):
    with open(path, "rb") as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        at = fh.tell()
    return ds, at


def test_the_native_frame_reader_gives_pydicoms_pixels_or_steps_aside(tmp_path):
    """triage/stage.py:native_frame reads a native 16-bit frame straight into its array (pydicom's pixel_array
    took 18 ms of a 2560x3328 mammogram's triage in three passes over fresh memory).  pydicom is the oracle:
    on every file of its test data the reader takes (stored bits 10-16, signed and unsigned, implicit and
    explicit VR, multi-frame) it gives the same values, dtype and shape; it steps aside (None: pydicom
    decodes) for compressed, 8-bit, colour, big endian, a truncated pixel data element, and a header that
    does not parse."""
    import warnings

    from pydicom.data import get_testdata_files
    from pydicom.pixels import pixel_array

    from medsendx_edge.triage.stage import native_frame

    taken, kinds = 0, set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # pydicom's test data is deliberately odd in places
        for f in get_testdata_files("*"):
            try:
                ds, at = _frames_of(f)
                frames = int(ds.get("NumberOfFrames", 1) or 1)
            except Exception:  # noqa: BLE001 - a file pydicom itself cannot read, or an odd frame count
                continue
            for index in ([None] if frames == 1 else [0, frames // 2, frames - 1]):
                fast = native_frame(Path(f), ds, at, index)
                if fast is None:
                    continue
                ref = pixel_array(f, index=index)
                assert fast.dtype == ref.dtype and fast.shape == ref.shape and np.array_equal(fast, ref), (f, index)
                taken += 1
                kinds.add((int(ds.BitsStored), int(ds.PixelRepresentation), frames > 1, ds.original_encoding[0]))
    assert taken >= 20
    assert {b for b, _s, _m, _i in kinds} >= {12, 16} and {s for _b, s, _m, _i in kinds} == {0, 1}
    assert any(m for _b, _s, m, _i in kinds) and {i for _b, _s, _m, i in kinds} == {True, False}
    # our own phantom, 12 bits stored: the frame the triage reads
    ds, _ = phantom_dataset(416, 320, density=0.3, seed=2)
    path = tmp_path / "p.dcm"
    ds.save_as(path, enforce_file_format=True)
    head, at = _frames_of(path)
    assert np.array_equal(native_frame(path, head, at, None), pixel_array(path))
    # bits above BitsStored that are not zero (allowed: they are not part of the value), unsigned and signed
    for signed in (0, 1):
        noisy = ds.copy()
        raw = np.frombuffer(ds.PixelData, dtype="<u2").copy()
        raw[::7] |= 0xA000           # garbage in the 4 unused bits
        raw[::11] = 0x0800           # the stored bits' top bit set: negative when signed
        noisy.BitsStored, noisy.HighBit, noisy.PixelRepresentation = 12, 11, signed
        noisy.PixelData = raw.tobytes()
        odd = tmp_path / f"noisy{signed}.dcm"
        noisy.save_as(odd, enforce_file_format=True)
        head, at = _frames_of(odd)
        fast, ref = native_frame(odd, head, at, None), pixel_array(odd)
        assert fast.dtype == ref.dtype and np.array_equal(fast, ref) and int(ref.max()) < 4096
        assert (int(ref.min()) < 0) == bool(signed)
    # a pixel data element cut short (a file truncated in the share): pydicom says what it makes of it
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-1000])
    head, at = _frames_of(cut)
    assert native_frame(cut, head, at, None) is None
    # headers pydicom refuses (a hostile review's cases): it refuses them, the reader steps aside
    def refused(change):
        odd = ds.copy()
        change(odd)
        bad = tmp_path / "bad.dcm"
        odd.save_as(bad, enforce_file_format=True)
        head, at = _frames_of(bad)
        with pytest.raises((AttributeError, TypeError, ValueError)):
            pixel_array(bad)
        return native_frame(bad, head, at, None) is None

    assert refused(lambda d: setattr(d, "BitsStored", 0))          # was read as 16
    assert refused(lambda d: delattr(d, "BitsStored"))
    assert refused(lambda d: delattr(d, "PixelRepresentation"))
    assert refused(lambda d: setattr(d, "PhotometricInterpretation", "FOO"))
    assert refused(lambda d: d.add_new(0x00280008, "DS", "1.5"))    # NumberOfFrames, not a whole number
    # a frame declared far larger than the file (46000 x 46000, its pixel data's length patched to 4 GB):
    # the reader stops at the file's size before asking numpy for 4 GB
    huge = ds.copy()
    huge.Rows = huge.Columns = 46000
    big = tmp_path / "huge.dcm"
    huge.save_as(big, enforce_file_format=True)
    head, at = _frames_of(big)
    raw = bytearray(big.read_bytes())
    raw[at + 8:at + 12] = (0xFFFFFFFE).to_bytes(4, "little")
    big.write_bytes(bytes(raw))
    assert native_frame(big, head, at, None) is None
    # compressed: not ours
    jpeg = get_testdata_files("JPEG2000.dcm")[0]
    head, at = _frames_of(jpeg)
    assert native_frame(Path(jpeg), head, at, None) is None
