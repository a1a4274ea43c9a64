"""``medsendx-edge demo``: a realistic batch through the whole pipeline into a local directory."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any
from pathlib import Path

import pydicom
import pydicom.data

from medsendx_edge.config import AnonymizeConfig, Config, DestinationConfig, LogConfig, WatchConfig
from medsendx_edge.logs import configure_logging
from medsendx_edge.vocabulary import Priority, UploadState
from medsendx_edge.spool import OUTBOX, PIPELINE, QUARANTINE, REASON, SENT
from medsendx_edge.triage.phantom import phantom_dataset

# A selection of pydicom's bundled files: modalities, transfer syntaxes, and deliberately bad ones.
DEMO_FILES = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm",
    "JPEG-lossy.dcm", "rtplan.dcm", "rtstruct.dcm", "test-SR.dcm", "waveform_ecg.dcm", "SC_rgb_jpeg.dcm",
    "image_dfl.dcm", "MR_truncated.dcm", "no_meta.dcm", "rtplan_truncated.dcm", "README.txt",
]


class DemoWorkdirError(Exception):
    """The demo's work folder holds what the demo would delete and did not make."""


def pydicom_test_file(name: str) -> Path:
    return Path(pydicom.data.__file__).parent / "test_files" / name


def demo_config(workdir: Path) -> Config:
    return Config(
        station_name="MOBILE_CLINIC_01",
        spool_dir=workdir / "spool",
        watch=WatchConfig(mode="native", stable_seconds=0.2, rescan_seconds=5),
        destination=DestinationConfig(kind="directory", path=workdir / "archive"),
        log=LogConfig(format="json", level="info"),
        anonymize=AnonymizeConfig(secret_file=workdir / "secrets" / "site-secret.key",
                                  linkage_key_file=workdir / "secrets" / "linkage.key"),
    )


def drop_batch(inbox: Path, mammo_size: tuple[int, int], say: Any = None) -> int:
    """Copy the demo batch into the inbox, in a nested study folder; returns the file count.  ``say``:
    called with a progress line while the phantoms render (the slow part: about 4 s each at full size)."""
    say = say or (lambda _line: None)
    study = inbox / "study-0001"
    study.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in DEMO_FILES:
        src = pydicom_test_file(name)
        if src.exists():
            shutil.copyfile(src, study / name)
            n += 1
    (study / "empty.dcm").write_bytes(b"")
    n += 1
    # A real computed radiograph (pydicom-data's CR of a hand, MONOCHROME1, JPEG 2000), installed with the
    # demo extra: it gets a tissue map, as the CT does
    try:
        import data_store  # type: ignore[import-untyped, import-not-found, unused-ignore]

        cr = Path(data_store.__file__).parent / "data" / "RG3_J2KR.dcm"
        if cr.exists():
            shutil.copyfile(cr, study / "CR_hand.dcm")
            n += 1
    except ImportError:
        pass
    rows, cols = mammo_size
    spacing = 0.07 * 4096 / max(rows, cols)  # the same 29 cm field at any demo size
    # One woman's screening exam, four views (physics phantom), the left breast denser than the right.
    for i, (view, lat, density) in enumerate([("CC", "R", 0.30), ("CC", "L", 0.55), ("MLO", "R", 0.30),
                                              ("MLO", "L", 0.55)]):
        say(f"rendering the physics phantom mammograms ({rows}x{cols}): {i + 1} of 5, {lat}{view}")
        ds, _ = phantom_dataset(rows, cols, spacing_mm=spacing, view=view, laterality=lat, density=density,
                                seed=100 + i, study_uid="1.2.826.0.1.3680043.8.498.1", patient_id="PID-DEMO-1",
                                patient_name="DEMO^JANE", one_breast=True)
        ds.save_as(inbox / f"MG_{lat}{view}.dcm", enforce_file_format=True)
        n += 1
    # Another woman's RMLO, exposed with a fiftieth of the dose: the retake the radiographer must see
    # while she is still on the truck (priority recheck, "underexposed or noisy").
    say(f"rendering the physics phantom mammograms ({rows}x{cols}): 5 of 5, a low-dose RMLO")
    ds, _ = phantom_dataset(rows, cols, spacing_mm=spacing, view="MLO", laterality="R", density=0.25, seed=120,
                            photons=30, study_uid="1.2.826.0.1.3680043.8.498.2", patient_id="PID-DEMO-2",
                            patient_name="DEMO^ANNA")
    ds.save_as(inbox / "MG_2_RMLO_low_dose.dcm", enforce_file_format=True)
    n += 1
    old = time.time() - 3600  # copies of finished files: an hour old, nothing still being written
    for dirpath, _d, files in os.walk(inbox):
        for f in files:
            os.utime(os.path.join(dirpath, f), (old, old))
    return n


def summarize(cfg: Config) -> list[dict[str, str]]:
    """One row per item: outcome, stage reached, priority, reason. No patient data."""
    from medsendx_edge.spool import Spool

    spool = Spool(cfg.spool_dir, cfg.inbox)
    rows: list[dict[str, str]] = []
    for queue in PIPELINE:
        for item_id in spool.ready(queue) + spool.claimed(queue):
            row = spool.state.item(item_id)
            modality = ""
            if queue in (OUTBOX, SENT):
                try:
                    hdr = pydicom.dcmread(spool.path(queue, item_id), stop_before_pixels=True)
                    modality = str(hdr.get("Modality", ""))
                except (OSError, pydicom.errors.InvalidDicomError):
                    pass
            duplicate = row is not None and row.state is UploadState.DUPLICATE
            outcome = ("duplicate" if duplicate else "delivered") if queue == SENT else "waiting"
            prio = Priority(row.priority).label if row else "-"
            side = spool.sidecar(item_id, queue)
            made = {"report": ("the exam's triage result as a Mammography CAD SR (made on the truck)"
                               if side.get("exam_report") else
                               "why this image was not read, as a Mammography CAD SR (made on the truck)"),
                    "overlay": "the triage picture as a Secondary Capture (made on the truck)"}.get(str(side.get("triage")))
            note = made or "; ".join(side.get("reasons") or []) or (
                f"triage {side['triage']}: {side.get('reason', '')}" if side.get("triage") not in (None, "done") else "")
            pd = side.get("pd")
            rows.append({"id": item_id, "modality": modality, "outcome": outcome, "stage": queue, "made": "yes" if made else "",
                         "priority": prio, "density": f"{pd:.2f}" if isinstance(pd, float) else "",
                         "reason": (row.last_error or "") if row and (queue != SENT or duplicate) else note})
    for stage, item_id in spool.quarantined():
        info = json.loads((spool.root / QUARANTINE / stage / f"{item_id}{REASON}").read_text())
        rows.append({"id": item_id, "modality": "", "outcome": "quarantined", "stage": stage,
                     "priority": "-", "density": "", "reason": info["reason"]})
    return sorted(rows, key=lambda r: r["id"])


def print_table(rows: list[dict[str, str]], out=None) -> None:  # type: ignore[no-untyped-def]
    out = out or sys.stdout   # looked up now, not at import: a redirected stdout gets the table too
    cols = ["id", "modality", "outcome", "stage", "priority", "density", "reason"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) if rows else len(c) for c in cols}
    widths["reason"] = min(widths["reason"], 90)
    print("  ".join(c.upper().ljust(widths[c]) for c in cols), file=out)
    for r in rows:
        print("  ".join(r[c][: widths[c]].ljust(widths[c]) for c in cols), file=out)


#: The metrics the report shows: label, unit, scale (a fraction shown in percent is scaled by 100).
REPORT_METRICS: tuple[tuple[str, str, str, float], ...] = (
    ("pd", "percent dense (area), this view", "%", 100.0),
    ("breast_pd", "percent dense (area), the breast: the mean of its views", "%", 100.0),
    ("category", "the breast's density category (automated estimate, not a BI-RADS assessment)", "", 1.0),
    ("breast_area_cm2", "breast area", "cm²", 1.0),
    ("thickness_mm", "compressed thickness", "mm", 1.0),
    ("compression_n", "compression force", "N", 1.0),
    ("kvp", "tube voltage", "kV", 1.0),
    ("exposure_mas", "exposure", "mAs", 1.0),
    ("fat_c", "mean value of fat", "stored units", 1.0),
    ("dense_c", "mean value of dense tissue", "stored units", 1.0),
    ("contrast", "dense - fat contrast", "stored units", 1.0),
    ("noise_fat", "noise in fat", "stored units", 1.0),
    ("snr_fat", "signal to noise in fat", "", 1.0),
    ("cnr", "contrast to noise", "", 1.0),
    ("burnout_frac", "burn-out (breast at background values)", "% of breast", 100.0),
    ("clipped_frac", "clipped (a plateau at the top of the range)", "% of breast", 100.0),
    ("pectoral_frac", "pectoral muscle", "% of the image", 100.0),
    ("pnl_mm", "posterior nipple line", "mm", 1.0),
    ("blur_ratio", "sharpness, weakest direction / median", "", 1.0),
    ("chest_wall", "chest wall side (from the pixels)", "", 1.0),
)


def _metric(value: object, unit: str, scale: float) -> str:
    if value is None or value == "":
        return "not measured"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value * scale:.3g}" + (f" {unit}" if unit else "")
    return str(value)


def outcome_table(rows: list[dict[str, str]]) -> str:
    """Every file of the run, whatever became of it: delivered, quarantined (with the reason and the stage),
    or still waiting; triage's priority and density where it applies."""
    import html

    head = "<tr><th>item</th><th>outcome</th><th>where</th><th>priority</th><th>percent dense</th><th>why</th></tr>"
    def cells(r: dict[str, str]) -> list[str]:
        dense = f"{float(r['density']) * 100:.0f} %" if r["density"] else ""
        made = " (made on the truck)" if r.get("made") else ""
        return [r["id"], r["outcome"] + made, r["stage"], r["priority"], dense, r["reason"]]

    body = "".join(f"<tr class='{html.escape(r['outcome'])}'>" +
                   "".join(f"<td>{html.escape(c)}</td>" for c in cells(r)) + "</tr>" for r in rows)
    return f"<table class='outcomes'>{head}{body}</table>"


def write_report(cfg: Config, rows: list[dict[str, str]], out: Path) -> Path:
    """A small self-contained HTML page: every file's outcome, each exam hung as radiologists hang it, and
    each triaged image's picture with its metrics, named and with their units."""
    import base64
    import html

    from medsendx_edge.spool import Spool

    spool = Spool(cfg.spool_dir, cfg.inbox)
    cards = []
    latest = _latest_summaries(spool, rows)
    for r in rows:
        if r["outcome"] != "delivered":
            continue
        png = spool.dir(SENT) / f"{r['id']}.png"
        side = spool.sidecar(r["id"], SENT)
        if not png.exists():
            continue
        data = base64.b64encode(png.read_bytes()).decode()
        m = {**side.get("metrics", {}), **{k: side[k] for k in ("pd", "breast_pd", "category") if k in side}}
        # the breast's category as the exam stands now (an earlier view of the breast was triaged before it)
        exam, lat = latest.get(str(side.get("exam"))) or {}, str(side.get("laterality") or "").upper()
        if m.get("category") is None and (exam.get("breast_category") or {}).get(lat):
            m["category"], m["breast_pd"] = exam["breast_category"][lat], exam["breast_pd"][lat]
        tm = side.get("tissue_map") or {}
        if tm.get("status") == "done":
            areas = tm.get("areas_cm2") or {}
            cells = f"<tr><th colspan='2'>tissue map: {html.escape(str(tm.get('claim')))}</th></tr>" + "".join(
                f"<tr><th>{html.escape(c)}</th><td>{tm['fractions'][c] * 100:.0f} % of the field"
                f"{f', {areas[c]:.0f} cm²' if c in areas else ''} (centre {tm['centres'][i]:.0f} "
                f"{html.escape(str(tm.get('units')))})</td></tr>" for i, c in enumerate(tm.get("classes") or []))
        else:
            pending = {"breast_pd": "its other views not yet in", "category": "none yet: a breast's, once all its views are in"}
            cells = "".join(f"<tr><th>{html.escape(label)}</th><td>"
                            f"{html.escape(pending[k] if k in pending and m.get(k) is None and m.get('pd') is not None else _metric(m.get(k), unit, scale))}"
                            f"</td></tr>" for k, label, unit, scale in REPORT_METRICS)
        cards.append(f"<section><h2>{html.escape(r['id'])} &middot; {html.escape(r['modality'])} "
                     f"{html.escape(str(side.get('laterality') or ''))}{html.escape(str(side.get('view') or ''))} "
                     f"&middot; priority {html.escape(side.get('priority', '-'))}</h2>"
                     f"<img src='data:image/png;base64,{data}'><table>{cells}</table>"
                     f"<p>{html.escape('; '.join(side.get('reasons') or []))}</p></section>")
    sheet = exam_sheet(spool, rows)
    out.write_text("<!doctype html><meta charset='utf-8'><title>MedSendX Edge triage</title>"
                   "<style>body{font-family:sans-serif;background:#111;color:#eee}section{margin:1em 0}"
                   "img{max-width:100%}th{text-align:left;padding-right:1em}"
                   ".sheet{display:grid;grid-template-columns:1fr 1fr;gap:4px;max-width:1400px}"
                   ".sheet figure{margin:0}.sheet figcaption{font-weight:bold;padding:2px 0}"
                   ".outcomes td,.outcomes th{padding:2px 8px;border-bottom:1px solid #333;vertical-align:top}"
                   "tr.quarantined td:nth-child(2){color:#f80}tr.delivered td:nth-child(2){color:#8d8}</style>"
                   f"<h1>MedSendX Edge triage ({html.escape(cfg.station_name)})</h1>"
                   f"<h2>Every file</h2>{outcome_table(rows)}{sheet}"
                   f"<h2>Images</h2>{''.join(cards) or '<p>no images</p>'}")
    return out


HANGING = ("RCC", "LCC", "RMLO", "LMLO")


def _pct(fraction: object) -> str:
    """A breast's density in percent; "not measured" for a breast with no image (0 % would be a claim)."""
    return f"{float(fraction) * 100:.0f}%" if isinstance(fraction, (int, float)) else "not measured"  # as radiologists hang a screening exam: right on the left


def _latest_summaries(spool: Any, rows: list[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Each exam's summary as its last triaged image left it (the most images)."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        side = spool.sidecar(r["id"], SENT) if r["outcome"] == "delivered" else {}
        summary = side.get("exam_summary") or {}
        if side.get("exam") and summary.get("images", 0) >= out.get(side["exam"], {}).get("images", 0):
            out[side["exam"]] = summary
    return out


def exam_sheet(spool: Any, rows: list[dict[str, str]]) -> str:
    """Each exam's four views hung as radiologists hang them (RCC LCC / RMLO LMLO), with the exam's
    category, per-breast density, asymmetry and priority."""
    import base64
    import html

    exams: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}
    for r in rows:
        if r["outcome"] != "delivered":
            continue
        side = spool.sidecar(r["id"], SENT)
        if side.get("triage") != "done" or not side.get("exam"):
            continue
        name = f"{side.get('laterality') or ''}{side.get('view') or ''}"
        exams.setdefault(side["exam"], {})[name] = (r["id"], side)
    parts = []
    latest = _latest_summaries(spool, rows)
    for exam, views in exams.items():
        summary = latest.get(exam) or {}
        bpd = summary.get("breast_pd") or {}
        bcat = summary.get("breast_category") or {}

        def breast(lat: str) -> str:
            return _pct(bpd.get(lat)) + (f" (category {html.escape(str(bcat[lat]))})" if bcat.get(lat) else "")

        head = (f"Exam {html.escape(exam)}: density category {html.escape(str(summary.get('category') or '-'))} "
                "(automated area-based estimate, not a BI-RADS assessment; each breast's from all its views), "
                f"right {breast('R')} / left {breast('L')} dense, "
                f"{'asymmetric, ' if summary.get('asymmetry') else ''}priority {html.escape(summary.get('priority', '-'))}"
                f" ({html.escape(summary.get('status', '-'))})")
        cells = []
        for view in HANGING:
            if view in views:
                item_id, _side = views[view]
                data = base64.b64encode((spool.dir(SENT) / f"{item_id}.png").read_bytes()).decode()
                cells.append(f"<figure><figcaption>{view}</figcaption><img src='data:image/png;base64,{data}'></figure>")
            else:
                cells.append(f"<figure><figcaption>{view}: missing</figcaption></figure>")
        reasons = "; ".join(summary.get("reasons") or [])
        parts.append(f"<section><h2>{head}</h2><p>{html.escape(reasons)}</p><div class='sheet'>{''.join(cells)}</div>"
                     "</section>")
    return "".join(parts)


#: Written into a demo's work folder: the next demo may delete its spool and archive, nothing else's.
DEMO_MARK = ".medsendx-demo"


def claim_workdir(workdir: Path) -> int:
    """Make ``workdir`` ready for a demo (its ``spool`` and ``archive`` emptied) and return the lock on the
    new spool, held for the run.  Refused (:class:`DemoWorkdirError`, nothing deleted) when the folder
    holds a spool or an archive that no demo made (``--workdir /var/lib/medsendx-edge`` would delete a
    truck's undelivered images) or a daemon runs on its spool (``startup.lock_spool``)."""
    from medsendx_edge.startup import lock_spool

    found = [sub for sub in ("spool", "archive") if (workdir / sub).exists()]
    # a demo of an earlier release left its report.html and no mark
    made_by_demo = (workdir / DEMO_MARK).exists() or (workdir / "report.html").exists()
    if found and not made_by_demo:
        raise DemoWorkdirError(f"{workdir} holds {' and '.join(found)} that no demo made, and the demo empties "
                               "them: choose another --workdir (an empty or new folder)")
    if (workdir / "spool" / "state").is_dir():
        os.close(lock_spool(workdir / "spool"))   # SpoolBusyError while a daemon runs on it
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DEMO_MARK).touch()
    for sub in ("spool", "archive"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    return lock_spool(workdir / "spool")


def run_demo(workdir: Path, mammo_size: tuple[int, int] = (4096, 3328)) -> int:
    from medsendx_edge.daemon import Daemon
    from medsendx_edge.errors import SpoolBusyError

    workdir = workdir.resolve()
    try:
        lock = claim_workdir(workdir)
    except (DemoWorkdirError, SpoolBusyError) as exc:
        print(f"medsendx-edge demo: {exc}", file=sys.stderr)
        return 1
    cfg = demo_config(workdir)
    log_path = workdir / "daemon.log"
    log_stream = open(log_path, "a", buffering=1)
    configure_logging("info", "json", stream=log_stream)
    print(f"MedSendX Edge demo in {workdir}")
    daemon = Daemon(cfg)
    print(f"dropping the batch into {cfg.inbox} ...")
    tty = sys.stdout.isatty()

    def say(line: str) -> None:
        print("\r  " + line if tty else "  " + line, end="" if tty else "\n", flush=True)

    total = drop_batch(cfg.inbox, mammo_size, say)
    if tty:
        print()
    print(f"{total} files in the inbox; running the pipeline (logs: {log_path})")
    started = time.monotonic()
    last = [""]

    def progress(d: Daemon) -> None:
        c = d.spool.counts()
        line = (f"  [{time.monotonic() - started:5.1f}s] inbox {c['incoming']:>3}  anonymized {c['anonymized']:>3}  "
                f"triaged {c['triaged']:>3}  outbox {c['outbox']:>3}  sent {c['sent']:>3}  "
                f"quarantine {c['quarantine']:>3}")
        if line != last[0]:
            last[0] = line
            print("\r" + line if tty else line, end="" if tty else "\n", flush=True)

    waiting = daemon.run_once(progress=progress)
    print()
    rows = summarize(cfg)
    print_table(rows)
    delivered = sum(r["outcome"] == "delivered" and not r.get("made") for r in rows)   # of the inputs
    made = sum(r["outcome"] == "delivered" and bool(r.get("made")) for r in rows)
    quarantined = sum(r["outcome"] == "quarantined" for r in rows)
    duplicates = sum(r["outcome"] == "duplicate" for r in rows)
    page = write_report(cfg, rows, workdir / "report.html")
    print(f"\n{total} files in: {delivered} delivered to {cfg.destination.path}, "
          + (f"{duplicates} duplicates (the same image again: recorded, not sent twice), " if duplicates else "")
          + f"{quarantined} quarantined, "
          f"{waiting} waiting (and {made} triage reports made on the truck, delivered with their studies); "
          f"{time.monotonic() - started:.1f} s")
    print(f"triage pictures and metrics: {page}")
    log_stream.close()
    os.close(lock)
    return 0 if delivered + duplicates + quarantined == total and waiting == 0 else 1
