"""The exam as radiologists read it: per breast, the denser breast for the exam, asymmetry, implants,
and when a streamed exam counts as complete."""

from __future__ import annotations

from medsendx_edge.triage.exam import EXAM_QUIET_S, ExamBook


def _side(lat, view, pd, exam="e1", implant=False, cut=False, displaced=False):
    return {"exam": exam, "triage": "done", "laterality": lat, "view": view, "pd": pd,
            "metrics": {"implant": implant, "cut_off": 1.0 if cut else 0.0, "implant_displaced": displaced}}


def test_per_breast_mean_and_the_denser_breast_for_the_exam(tmp_path):
    book = ExamBook(tmp_path / "exams.db")
    book.record("1", _side("R", "CC", 0.20), now=0)
    book.record("2", _side("R", "MLO", 0.30), now=1)
    book.record("3", _side("L", "CC", 0.52), now=2)
    s = book.record("4", _side("L", "MLO", 0.58), now=3)
    assert abs(s.breast_pd["L"] - 0.55) < 1e-9 and abs(s.breast_pd["R"] - 0.25) < 1e-9
    assert abs(s.pd - 0.55) < 1e-9 and s.category == "c" and s.complete
    assert s.asymmetry and s.priority == "high"
    assert any("asymmetry" in r for r in s.reasons) and any("category c" in r and "not a BI-RADS assessment" in r for r in s.reasons)
    assert book.exam_of("3") == "e1" and sorted(s.images) == ["1", "2", "3", "4"]


def test_a_partial_exam_completes_after_the_quiet_period(tmp_path):
    book = ExamBook(tmp_path / "exams.db")
    s = book.record("1", _side("R", "CC", 0.10), now=100)
    assert not s.complete and s.priority == "normal" and s.category is None and s.pd == 0.10   # a view to come
    late = book.summary("e1", now=100 + EXAM_QUIET_S)
    # complete (no more will come), and still no category: the breast's MLO was never taken
    assert late.complete and late.category is None and late.breast_category == {} and late.pd == 0.10


def test_implant_views_do_not_count_and_not_applicable_images_are_not_recorded(tmp_path):
    book = ExamBook(tmp_path / "exams.db")
    book.record("1", _side("R", "CC", 0.9, implant=True), now=0)
    s = book.record("2", _side("L", "CC", 0.2), now=1)
    assert s.breast_pd == {"L": 0.2} and s.category is None and not s.asymmetry   # the LMLO still to come
    assert any("implant" in r for r in s.reasons)
    assert book.record("3", {"exam": "e1", "triage": "not applicable"}) is None
    assert book.exam_of("3") is None


def test_a_retake_supersedes_and_a_cut_view_counts_only_without_a_better_one(tmp_path):
    """A cut RCC retaken: the retake, not the mean of both, is the breast's CC; a cut RMLO with no retake
    still counts when it is all the side has, never beside a view that is not cut."""
    book = ExamBook(tmp_path / "exams.db")
    book.record("1", _side("R", "CC", 0.10, cut=True), now=0)
    book.record("2", _side("R", "CC", 0.50), now=1)              # the retake
    book.record("3", _side("R", "MLO", 0.46), now=2)
    book.record("4", _side("L", "CC", 0.40, cut=True), now=3)
    s = book.record("5", _side("L", "MLO", 0.44), now=4)
    assert abs(s.breast_pd["R"] - 0.48) < 1e-9 and s.category == "c"
    assert abs(s.breast_pd["L"] - 0.44) < 1e-9                   # the cut LCC left out beside the LMLO


def test_the_implant_displaced_views_are_read_for_density(tmp_path):
    book = ExamBook(tmp_path / "exams.db")
    book.record("1", _side("R", "CC", 0.15, implant=True), now=0)
    book.record("2", _side("R", "CC", 0.42, displaced=True), now=1)
    s = book.record("3", _side("R", "MLO", 0.38, displaced=True), now=2)
    assert abs(s.breast_pd["R"] - 0.40) < 1e-9 and s.category == "c"


# --------------------------------------------------------------------------- issue 24: a complete exam
def _pos(lat, view, pnl, instance, exam="e2", pect_short=-20.0):
    side = _side(lat, view, 0.2, exam=exam)
    side["metrics"]["pnl_mm"] = pnl
    side["metrics"]["pectoral_shortfall_mm"] = pect_short if view == "MLO" else None
    side["instance"] = instance
    return side


def test_missing_views_are_named_while_the_exam_is_open_and_after(tmp_path):
    book = ExamBook(tmp_path / "exams.db")
    book.record("1", _pos("R", "CC", 80, "a"), now=0)
    s = book.record("2", _pos("L", "CC", 82, "b"), now=1)
    assert s.missing == ["RMLO", "LMLO"] and not s.complete
    late = book.summary("e2", now=1 + EXAM_QUIET_S)
    assert late.complete and late.missing == ["RMLO", "LMLO"]   # the console says "RMLO, LMLO missing"
    book.record("3", _pos("R", "MLO", 85, "c"), now=2)
    s = book.record("4", _pos("L", "MLO", 86, "d"), now=3)
    assert s.missing == [] and s.complete and s.pnl_mm == {"LCC": 82, "LMLO": 86, "RCC": 80, "RMLO": 85}
    assert not s.recheck and not s.positioning


def test_a_duplicate_counts_once_and_a_retake_supersedes(tmp_path):
    book = ExamBook(tmp_path / "exams.db")
    book.record("1", _pos("R", "CC", 60, "a"), now=0)
    book.record("2", _pos("R", "CC", 60, "a"), now=1)     # the same image again (same SOP instance)
    s = book.record("3", _pos("R", "MLO", 85, "b"), now=2)
    assert s.duplicates == ["RCC"] and s.retakes == []
    # CC 25 mm short of the MLO at the nipple line: tissue left out at the chest wall: recheck the right breast
    assert list(s.recheck) == ["R"] and "RCC 60 mm, RMLO 85 mm" in s.recheck["R"]["pnl_cc_mlo"]
    assert s.recheck["R"]["pnl_cc_mlo"].startswith("CC shorter than the MLO by more than 1 cm at the nipple line on RCC")
    assert s.latest == {"1", "3"}                          # the duplicate is no take of its own
    s = book.record("4", _pos("R", "CC", 80, "c"), now=3)  # the retake, well positioned
    assert s.retakes == ["RCC"] and s.pnl_mm["RCC"] == 80 and not s.recheck and s.priority == "normal"
    assert s.latest == {"3", "4"}                          # the retake supersedes the first take


def test_the_cc_mlo_check_is_advisory_when_the_mlo_pectoral_line_is_extrapolated(tmp_path):
    book = ExamBook(tmp_path / "exams.db")
    book.record("1", _pos("L", "CC", 50, "a"), now=0)
    s = book.record("2", _pos("L", "MLO", 75, "b", pect_short=30.0), now=1)
    assert not s.recheck and s.positioning[0].endswith("(advisory: the MLO's pectoral line is extrapolated)")


def test_the_cc_mlo_check_is_advisory_when_not_configured_to_recheck(tmp_path):
    book = ExamBook(tmp_path / "exams.db", positioning_recheck=())
    book.record("1", _pos("L", "CC", 50, "a"), now=0)
    s = book.record("2", _pos("L", "MLO", 75, "b"), now=1)
    assert not s.recheck and s.positioning and s.positioning[0].endswith("(advisory)")


def test_the_truck_declares_its_own_views(tmp_path):
    book = ExamBook(tmp_path / "exams.db", views=("RCC", "LCC", "RMLO", "LMLO", "RXCCL"))
    for n, (lat, view) in enumerate((("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))):
        s = book.record(str(n), _pos(lat, view, 80, str(n)), now=n)
    assert s.missing == ["RXCCL"] and not s.complete


def _nip(lat, view, result, instance, kind_frame=None):
    side = _pos(lat, view, 80, instance)
    side["positioning"] = {"checks": [{"check": "nipple_in_profile", "result": result}]}
    side["frame"] = kind_frame
    return side


def test_the_nipple_must_be_in_profile_on_one_view_of_the_breast(tmp_path):
    """ACR: the nipple in profile on at least one view: a CC without it is fine when the MLO shows it."""
    book = ExamBook(tmp_path / "exams.db")
    book.record("1", _nip("R", "CC", "fail", "a"), now=0)
    s = book.record("2", _nip("R", "MLO", "pass", "b"), now=1)
    assert not s.recheck
    book.record("3", _nip("L", "CC", "fail", "c"), now=2)
    s = book.record("4", _nip("L", "MLO", "fail", "d"), now=3)
    assert s.recheck == {"L": {"nipple_in_profile": "nipple not in profile on LCC nor LMLO"}}


def test_a_tomosynthesis_frame_is_not_a_retake_of_the_2d_view(tmp_path):
    book = ExamBook(tmp_path / "exams.db")
    book.record("1", _nip("R", "CC", "pass", "a"), now=0)
    s = book.record("2", _nip("R", "CC", "pass", "b", kind_frame=30), now=1)
    assert s.retakes == [] and s.latest == {"1", "2"}


def test_a_breast_has_a_category_only_once_all_its_views_are_in_from_their_mean(tmp_path):
    """One view gives its percent dense, no category (a CC 0.36 and an MLO 0.26 of one breast would
    each be a different category); with both, the breast's from their mean, naming the views it read;
    a retake replaces its view in it.  The exam's running category (partial) is unchanged."""
    book = ExamBook(tmp_path / "exams.db")
    s = book.record("1", _side("L", "CC", 0.36), now=0, sop=("1.2.840.10008.5.1.4.1.1.1.2", "9.1", "9.0"))
    assert s.breast_category == {} and s.breast_views == {} and s.category is None and not s.complete
    s = book.record("2", _side("L", "MLO", 0.26), now=1, sop=("1.2.840.10008.5.1.4.1.1.1.2", "9.2", "9.0"))
    assert s.breast_category == {"L": "b"} and s.breast_views == {"L": ["LCC", "LMLO"]}
    assert sorted(s.breast_refs["L"]) == [("1.2.840.10008.5.1.4.1.1.1.2", "9.1", "9.0"),
                                          ("1.2.840.10008.5.1.4.1.1.1.2", "9.2", "9.0")]
    assert abs(s.breast_pd["L"] - 0.31) < 1e-9 and "R" not in s.breast_category
    s = book.record("3", _side("L", "CC", 0.50), now=2, sop=("1.2.840.10008.5.1.4.1.1.1.2", "9.3", "9.0"))
    assert s.breast_category == {"L": "c"} and abs(s.breast_pd["L"] - 0.38) < 1e-9   # the retake, not the first CC
    assert {u for _c, u, _s in s.breast_refs["L"]} == {"9.2", "9.3"}
    assert s.as_dict()["breast_category"] == {"L": "c"} and "breast_refs" not in s.as_dict()
    # A truck that takes one view a side: that view is the breast's.
    one = ExamBook(tmp_path / "one.db", views=("RCC", "LCC"))
    assert one.record("4", _side("R", "CC", 0.2, exam="e9"), now=0).breast_category == {"R": "b"}


def test_only_views_that_count_complete_a_breast(tmp_path):
    """An implant view is in but does not count: the first ID view does not complete the breast (its
    category would be that one view's); a blank exposure (no pd) neither; a cut CC beside a good MLO
    is in, and the breast is graded from the MLO (the cut rule) until the retake; a tomosynthesis frame
    of a view already taken in 2D is not a third view."""
    book = ExamBook(tmp_path / "exams.db")
    book.record("1", _side("R", "CC", 0.15, implant=True), now=0)
    book.record("2", _side("R", "MLO", 0.14, implant=True), now=1)
    s = book.record("3", _side("R", "CC", 0.45, displaced=True), now=2)
    assert s.breast_category == {}                                   # RMLO ID still to come
    s = book.record("4", _side("R", "MLO", 0.15, displaced=True), now=3)
    assert s.breast_category == {"R": "b"} and s.breast_views == {"R": ["RCC ID", "RMLO ID"]}
    blank = ExamBook(tmp_path / "blank.db")
    blank.record("5", _side("L", "CC", None, exam="e5"), now=0)
    assert blank.record("6", _side("L", "MLO", 0.5, exam="e5"), now=1).breast_category == {}
    cut = ExamBook(tmp_path / "cut.db")
    cut.record("7", _side("L", "CC", 0.5, exam="e7", cut=True), now=0)
    s = cut.record("8", _side("L", "MLO", 0.2, exam="e7"), now=1)
    assert s.breast_category == {"L": "b"} and s.breast_views == {"L": ["LMLO"]}   # the cut rule: the view not cut
    s = cut.record("9", _side("L", "CC", 0.3, exam="e7"), now=2)       # the retake
    assert s.breast_category == {"L": "b"} and abs(s.breast_pd["L"] - 0.25) < 1e-9
    assert s.breast_views == {"L": ["LCC", "LMLO"]}
    tomo = ExamBook(tmp_path / "tomo.db")
    tomo.record("10", _side("L", "CC", 0.30, exam="e10"), now=0)
    frame = {**_side("L", "CC", 0.60, exam="e10"), "frame": 12}
    tomo.record("11", frame, now=1)
    s = tomo.record("12", _side("L", "MLO", 0.20, exam="e10"), now=2)
    assert abs(s.breast_pd["L"] - 0.25) < 1e-9 and s.breast_views == {"L": ["LCC", "LMLO"]}


def test_asymmetry_is_between_breasts_not_single_views(tmp_path):
    book = ExamBook(tmp_path / "exams.db")
    book.record("1", _side("R", "CC", 0.40), now=0)
    s = book.record("2", _side("L", "CC", 0.20), now=1)
    assert not s.asymmetry and s.priority == "normal"                # two single views: no breasts yet
    book.record("3", _side("R", "MLO", 0.40), now=2)
    s = book.record("4", _side("L", "MLO", 0.20), now=3)
    assert s.asymmetry and s.priority == "high"


def test_a_blank_retake_does_not_undo_the_breasts_category(tmp_path):
    book = ExamBook(tmp_path / "exams.db")
    book.record("1", _side("R", "CC", 0.40), now=0)
    book.record("2", _side("R", "MLO", 0.30), now=1)
    s = book.record("3", _side("R", "MLO", None), now=2)             # a blank exposure taken again
    assert s.breast_category == {"R": "c"} and abs(s.breast_pd["R"] - 0.35) < 1e-9 and "RMLO" in s.retakes


def test_a_redo_after_a_crash_keeps_the_images_place(tmp_path):
    """The image "1" is recorded, the daemon dies before its output is committed, a resend of the same
    image ("2") is triaged first after the restart, then "1" is redone: "1" is still the first copy and
    "2" the duplicate (by seq alone the redone "1" would be the later one, and both copies duplicates
    of each other: no SR for either); a take redone after its retake does not supersede the retake."""
    book = ExamBook(tmp_path / "exams.db")
    first = {**_side("R", "CC", 0.4), "instance": "same"}
    book.record("1", first, now=0)
    book.record("2", {**_side("R", "CC", 0.4), "instance": "same"}, now=1)
    s = book.record("1", first, now=2)                                # the redo
    assert s.duplicate_ids == {"2"} and s.duplicates == ["RCC"]
    assert book.updated_after(0)[0][2] == book.last_seq()             # the redo is shipped again
    retake = ExamBook(tmp_path / "retake.db")
    retake.record("a", {**_side("L", "CC", 0.10), "instance": "x"}, now=0)
    retake.record("b", {**_side("L", "CC", 0.50), "instance": "y"}, now=1)   # the retake
    retake.record("c", {**_side("L", "MLO", 0.40), "instance": "z"}, now=2)
    s = retake.record("a", {**_side("L", "CC", 0.10), "instance": "x"}, now=3)   # "a" redone
    assert abs(s.breast_pd["L"] - 0.45) < 1e-9 and "b" in s.latest and "a" not in s.latest
