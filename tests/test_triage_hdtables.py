"""highdicom's table of modules as our SRs read it (triage/hdtables.py): an extract of highdicom's own table,
checked against it, giving highdicom's answers and our SRs' bytes, and stepping aside for any other table."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from medsendx_edge.config import Config
from medsendx_edge.triage import hdtables
from medsendx_edge.triage.report import mammography_cad_sr
from medsendx_edge.triage.stage import not_applicable, triage_dataset
from test_triage_report import _anonymized


@pytest.fixture
def tables():
    """highdicom's table module; afterwards the extract installed, as a process has it after its first SR
    (report._document_class installs it once and is cached: the session's later SRs must not find it out)."""
    from highdicom import _standard_utils

    yield _standard_utils
    hdtables.uninstall()
    hdtables.install()


def _whole(tables):
    """highdicom's own function and its whole table, whatever is installed."""
    original = hdtables._installed.get("original", tables.get_module_attribute_map)
    return original, original()


def test_the_extract_is_the_installed_highdicoms_modules_of_our_sop_classes(tables):
    doc = json.loads(gzip.decompress(hdtables.EXTRACT.read_bytes()))
    raw = hdtables._source()
    if hashlib.sha256(raw).hexdigest() == doc["sha256"]:
        # The table it was cut from: the extract is that table's modules of the IODs of our SR and of the
        # images the triage reads, exactly; and those SOP classes are still the triage's.
        assert doc["sop_classes"] == hdtables.sop_classes()
        cut = hdtables.cut(json.loads(raw), tables.get_iod_module_map(), tables.get_sop_class_iod_map(),
                           doc["sop_classes"])
        assert doc["modules"] == cut
        assert {"patient", "general-study", "sr-document-general", "mammography-image"} <= set(cut)
        assert hdtables.install()
    else:
        # Another highdicom's table: the extract stays out, highdicom answers from its own.
        hdtables.uninstall()
        assert not hdtables.install()
        assert hdtables.installed_table() is None


def test_highdicom_answers_the_same_from_the_extract(tables):
    hdtables.uninstall()
    assert hdtables.install(), "the extract is cut from this highdicom's table (the test above)"
    original, whole = _whole(tables)
    table = tables.get_module_attribute_map()
    assert table is hdtables.installed_table() and not table.complete
    from highdicom import base

    assert base.get_module_attribute_map is tables.get_module_attribute_map   # every module bound to it
    sop_iods, iod_modules = tables.get_sop_class_iod_map(), tables.get_iod_module_map()
    for sop in hdtables.sop_classes():
        keywords = sorted({a["keyword"] for m in iod_modules[sop_iods[sop]] for a in whole[m["key"]]})
        asked = ["ContentDate", "ContentTime", "PerFrameFunctionalGroupsSequence", "PatientName", "NotAKeyword"]
        for keyword in asked + keywords[::max(1, len(keywords) // 60)]:
            with_extract = tables.is_attribute_in_iod(keyword, sop)
            assert with_extract == any(a["keyword"] == keyword for m in iod_modules[sop_iods[sop]]
                                       for a in whole[m["key"]]), (sop, keyword)
        for module in {m["key"] for m in iod_modules[sop_iods[sop]]}:
            assert table[module] == whole[module]
    assert not table.complete, "our SOP classes' questions never needed the whole table"


def test_a_module_outside_the_extract_loads_highdicoms_whole_table_first(tables):
    hdtables.uninstall()
    assert hdtables.install()
    original, whole = _whole(tables)
    table = hdtables.installed_table()
    assert table is not None and "ct-image" not in dict.keys(table) and not table.complete
    assert tables.is_attribute_in_iod("CTDIvol", "1.2.840.10008.5.1.4.1.1.2")   # a CT image's IOD
    assert table.complete and table["ct-image"] == whole["ct-image"]
    assert len(table) == len(whole) and set(table) == set(whole)
    assert "no-such-module" not in table and table.get("no-such-module") is None
    with pytest.raises(KeyError):
        table["no-such-module"]


def test_our_srs_are_the_same_bytes_with_the_extract_and_with_the_whole_table(tables):
    ds, ctx = _anonymized()
    side = triage_dataset(ds, Config(), ds.pixel_array).sidecar
    failed = not_applicable("pixels could not be analysed (ValueError)", ds, status="failed").sidecar

    def encoded(sidecar):
        out = io.BytesIO()
        mammography_cad_sr(ds, sidecar, ctx.uid, "TRUCK01").save_as(out, enforce_file_format=True)
        return out.getvalue()

    hdtables.uninstall()
    assert hdtables.install()
    fast = [encoded(s) for s in (side, failed)]
    assert not hdtables.installed_table().complete
    original = hdtables._installed["original"]
    hdtables.uninstall()
    assert tables.get_module_attribute_map is original
    assert [encoded(s) for s in (side, failed)] == fast


def test_another_highdicom_table_or_no_extract_leaves_highdicom_its_own(tables, monkeypatch):
    hdtables.uninstall()
    original = tables.get_module_attribute_map
    monkeypatch.setattr(hdtables, "_source", lambda: b'{"patient": []}')
    assert not hdtables.install()
    assert tables.get_module_attribute_map is original and hdtables.installed_table() is None
    monkeypatch.undo()
    monkeypatch.setattr(hdtables, "EXTRACT", hdtables.EXTRACT.with_name("no-such-extract.json.gz"))
    assert not hdtables.install()
    assert tables.get_module_attribute_map is original


def test_a_fresh_process_makes_its_sr_from_the_extract_without_the_whole_table():
    """What a run's process holds: the SR made, highdicom's whole table never decoded."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_triage_report import _anonymized\n"
        "from medsendx_edge.config import Config\n"
        "from medsendx_edge.triage.report import mammography_cad_sr\n"
        "from medsendx_edge.triage.stage import triage_dataset\n"
        "from medsendx_edge.triage import hdtables\n"
        "ds, ctx = _anonymized()\n"
        "sr = mammography_cad_sr(ds, triage_dataset(ds, Config(), ds.pixel_array).sidecar, ctx.uid, 'T1')\n"
        "print(hdtables._installed['original'].cache_info().currsize, hdtables.installed_table().complete,"
        " len(sr.ContentSequence) > 3)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.split() == ["0", "False", "True"], out.stderr[-2000:]


def test_the_extract_as_a_whole_is_highdicoms_table_and_its_function_keeps_the_caches_questions(tables):
    """What no caller of highdicom asks today still gets the whole table's answer: equality, a copy, a
    pickle; the function's lru_cache questions go to highdicom's own."""
    import pickle

    hdtables.uninstall()
    assert hdtables.install()
    original, whole = _whole(tables)
    fn = tables.get_module_attribute_map
    assert fn is not original and fn.__wrapped__ is original and fn.cache_info() == original.cache_info()
    table = fn()
    assert table == whole and table.copy() == whole and pickle.loads(pickle.dumps(table)) == whole
    assert table.complete


def test_a_failed_install_is_tried_once_and_another_function_gets_no_extract(tables, monkeypatch):
    hdtables.uninstall()
    reads = []

    def other_table() -> bytes:
        reads.append(1)
        return b'{"patient": []}'

    monkeypatch.setattr(hdtables, "_source", other_table)
    assert not hdtables.install() and not hdtables.install()
    assert len(reads) == 1   # a mismatch is read and hashed once a process
    monkeypatch.undo()
    hdtables.uninstall()
    monkeypatch.setattr(tables, "get_module_attribute_map", lambda: {})   # not highdicom's cached function
    assert not hdtables.install() and hdtables.installed_table() is None


def test_the_extracts_sr_class_is_the_reports():
    from medsendx_edge.triage.report import MAMMOGRAPHY_CAD_SR

    assert MAMMOGRAPHY_CAD_SR in hdtables.sop_classes()
