"""Positioning checks validated against geometry they were not written from (issue 24).

``tests/phantom_positioning.py`` was written by a helper who never read ``triage/positioning.py``: 32
breasts (CC and MLO) with known nipple, pectoral edge, posterior nipple line, inframammary fold and
motion blur, defects planted one at a time, and sharp images from a detector with anisotropic
resolution.  This file computes each check's sensitivity and specificity on that set, and the false
``recheck``s on the well-positioned images (the issue's bar: under 5 %); ``python -m pytest -s`` prints
the table that docs/triage.md quotes.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import pytest

from medsendx_edge.config import Config

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def judged():
    import phantom_positioning as pp

    from medsendx_edge.triage.stage import triage_dataset

    cfg = Config()
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(pp.N_CASES):
            ds, info = pp.case(i)
            side = triage_dataset(ds, cfg).sidecar
            checks = {c["check"]: c for c in side["positioning"]["checks"]}
            out.append((info, side, checks))
    return out


def _truth(check: str, info: dict) -> bool | None:
    """Does the image truly fail ``check``?  None: the check does not apply, or a grey zone."""
    if check == "pectoral_to_pnl":
        return None if info["view"] != "MLO" else not info["pectoral_reaches_pnl"]
    if check == "nipple_in_profile":
        return not info["nipple_in_profile"]
    if check == "imf_visible":
        return None if info["view"] != "MLO" else not info["imf_visible"]
    if check == "motion_blur":
        return None if 0 < info["blur_mm"] < 0.4 else info["blur_mm"] >= 0.4
    raise KeyError(check)


def table(judged) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"tp": 0, "fn": 0, "tn": 0, "fp": 0, "not measured": 0})
    for info, _side, checks in judged:
        for name in ("pectoral_to_pnl", "nipple_in_profile", "imf_visible", "motion_blur"):
            truth = _truth(name, info)
            if truth is None:
                continue
            c = checks.get(name)
            if c is None or c["result"] not in ("pass", "fail"):
                counts[name]["not measured"] += 1
                continue
            said = c["result"] == "fail"
            counts[name]["tp" if truth and said else "fn" if truth else "fp" if said else "tn"] += 1
    # The exam's check, by the exam book itself: each breast (a CC and an MLO) one exam.
    import tempfile
    from pathlib import Path

    from medsendx_edge.triage.exam import ExamBook

    with tempfile.TemporaryDirectory() as tmp:
        book = ExamBook(Path(tmp) / "exams.db")
        pairs: dict[object, list[dict]] = defaultdict(list)
        for n, (info, side, _checks) in enumerate(judged):
            if info["defects"] and info["defects"] != ["cc_too_shallow"]:
                continue   # a pair with another planted defect says nothing about this check
            pairs[info["breast"]].append(info)
            summary = book.record(str(n), {**side, "exam": str(info["breast"])}, now=float(n))
        for breast, infos in pairs.items():
            if {i["view"] for i in infos} != {"CC", "MLO"}:
                continue
            summary = book.summary(str(breast))
            side = infos[0]["laterality"]
            if f"{side}CC" not in summary.pnl_mm or f"{side}MLO" not in summary.pnl_mm:
                counts["pnl_cc_mlo"]["not measured"] += 1
                continue
            truth = any("cc_too_shallow" in i["defects"] for i in infos)
            said = "pnl_cc_mlo" in summary.recheck.get(side, {})
            counts["pnl_cc_mlo"]["tp" if truth and said else "fn" if truth else "fp" if said else "tn"] += 1
    return dict(counts)


def _rates(c: dict[str, int]) -> tuple[float | None, float | None]:
    sens = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else None
    spec = c["tn"] / (c["tn"] + c["fp"]) if c["tn"] + c["fp"] else None
    return sens, spec


def test_per_check_table_and_the_checks_that_may_recheck(judged):
    t = table(judged)
    print("\ncheck               sens   spec   tp fn tn fp  not measured")
    for name, c in t.items():
        sens, spec = _rates(c)
        print(f"{name:18} {'-' if sens is None else f'{sens:.2f}':>5}  {'-' if spec is None else f'{spec:.2f}':>5}  "
              f"{c['tp']:2} {c['fn']:2} {c['tn']:2} {c['fp']:2}  {c['not measured']}")
    assert set(t) == {"pectoral_to_pnl", "nipple_in_profile", "imf_visible", "motion_blur", "pnl_cc_mlo"}
    # A check that raises recheck by default makes no false failure here and finds what it is for; the
    # advisory ones (pectoral, fold, blur) still hold a floor, so a regression shows.
    for name, c in t.items():
        sens, spec = _rates(c)
        strict = name in Config().triage.positioning_recheck
        assert spec is not None and spec >= (1.0 if strict else 0.9), (name, c)
        assert sens is not None and sens >= (1.0 if strict else 0.75), (name, c)
        assert c["not measured"] <= 0.1 * sum(c.values()), (name, c)


def test_false_rechecks_on_well_positioned_images_under_5_percent(judged):
    """Image rechecks and the breast's (the exam book's: nipple on neither view, CC short of the MLO)."""
    import tempfile
    from pathlib import Path

    from medsendx_edge.triage.exam import ExamBook

    good = [(info, side) for info, side, _c in judged if info["well_positioned"]]
    false = [(info["index"], side["reasons"]) for info, side in good if side["priority"] == "recheck"]
    with tempfile.TemporaryDirectory() as tmp:
        book = ExamBook(Path(tmp) / "exams.db")
        breasts = defaultdict(list)
        for n, (info, side) in enumerate(good):
            if not str(info["breast"]).count("copy"):
                book.record(str(n), {**side, "exam": str(info["breast"])}, now=float(n))
                breasts[info["breast"]].append(info["view"])
        pairs = [b for b, views in breasts.items() if sorted(views) == ["CC", "MLO"]]
        false += [(b, book.summary(str(b)).recheck) for b in pairs if book.summary(str(b)).recheck]
    print(f"\nfalse recheck on well-positioned images: {len(false)} of {len(good)} images and {len(pairs)} breasts",
          false)
    assert len(good) >= 40 and len(pairs) >= 18 and len(false) < 0.05 * len(good), false


def test_pnl_lengths_agree_with_the_geometry(judged):
    """The posterior nipple line in mm against the phantom's own, where the nipple is in profile."""
    errs = [abs(side["positioning"]["pnl_mm"] - info["pnl_mm"]) for info, side, _c in judged
            if info["nipple_in_profile"] and side["positioning"]["pnl_mm"] is not None]
    errs.sort()
    median, p90 = errs[len(errs) // 2], errs[int(0.9 * len(errs))]
    print(f"\nPNL |error|: median {median:.1f} mm, 90th percentile {p90:.1f} mm over {len(errs)} views")
    assert len(errs) >= 50 and median <= 3.0 and p90 <= 10.0


def test_real_films_as_looked_at_by_eye():
    """The 8 CBIS-DDSM films (two four-view exams), looked at by eye with the landmarks drawn
    (docs/triage.md, Positioning): every MLO shows its nipple in profile (so no breast fails the nipple
    rule, though exam 0's RCC shows none); exam 0's RCC shows 21 mm less tissue than its RMLO at the
    nipple line: the breast's one recheck; the other CC-MLO differences come with a short or misfound
    muscle and stay advisory; no image rechecks on its own."""
    import tempfile
    from pathlib import Path

    from test_triage_validation import _real_films, _relabel

    from medsendx_edge.triage.exam import ExamBook
    from medsendx_edge.triage.stage import triage_dataset

    cfg = Config()
    rechecks, nipples, cc_pnl = set(), {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        book = ExamBook(Path(tmp) / "exams.db")
        for n, (exam, lat, view, ds) in enumerate(_real_films()):
            side = triage_dataset(_relabel(ds, lat, view), cfg, ds.pixel_array).sidecar
            summary = book.record(str(n), {**side, "exam": f"x{exam}"}, now=float(n))
            name = f"{exam}{lat}{view}"
            checks = {c["check"]: c["result"] for c in side["positioning"]["checks"]}
            nipples[name] = checks["nipple_in_profile"]
            if view == "CC":
                cc_pnl[name] = side["positioning"]["pnl_mm"]
            if side["priority"] == "recheck":
                rechecks.add(name)
            if summary.recheck:
                rechecks |= {f"{exam}{s}" for s in summary.recheck}
    assert all(nipples[n] == "pass" for n in nipples if n.endswith("MLO")), nipples
    assert rechecks == {"0R"}, rechecks
    assert all(50 <= mm <= 90 for mm in cc_pnl.values()), cc_pnl
