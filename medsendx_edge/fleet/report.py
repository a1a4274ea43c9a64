"""The miner's outputs: report.json, stations.csv, a self-contained report.html with PNG plots, and the
terminal summary the fleet manager reads."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from medsendx_edge.fleet.data import CALIBRATION, PARAMETERS
from medsendx_edge.fleet.miner import EPOCH, LABELS, MineResult, _pct
from medsendx_edge.fsutil import write_bytes_atomic

FLAG = "#d62728"
HEALTHY = "#6baed6"
BAND = "#d9ead3"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)  # no bbox_inches="tight": it draws every figure twice
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plots(res: MineResult) -> dict[str, str]:
    """The report's figures as base64 PNGs: the stations against the healthy band, the flagged stations
    over time, and every station's raw features."""
    import matplotlib

    matplotlib.use("Agg")
    flagged = [res.agg.names.index(n) for n in res.flagged]
    out = {"band": _png(_band(res, set(flagged)))}
    if flagged and res.agg.days.size:
        out["timeline"] = _png(_timeline(res, flagged))
    out["boxplots"] = _png(_boxplots(res, set(flagged)))
    return out


def _moved(res: MineResult, i: int) -> str:
    """The parameter that moved most at station i (its strongest finding)."""
    st = res.report["stations"][res.agg.names[i]]
    if st["findings"]:
        return str(max(st["findings"], key=lambda f: abs(f["z"] or 0))["parameter"])
    return "gain"


def _band(res: MineResult, flagged: set[int]) -> Any:
    """One panel per QC parameter: every scored station's shift against its peers (95% interval), the
    band healthy stations stay in (grey-green), flagged stations in red with their names."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PARAMETERS), 1, figsize=(11, 2.3 * len(PARAMETERS)))
    scored = np.flatnonzero(res.groups >= 0)
    for ax, p in zip(axes, PARAMETERS):
        shift, (lo, hi) = res.shift[p], res.interval[p]
        ok = scored[np.isfinite(shift[scored])]
        order = ok[np.argsort(shift[ok])]
        xs = np.arange(order.size)
        band = float(np.nanmedian(res.band[p][ok])) if ok.size else 0.0
        ax.axhspan(-band, band, color=BAND, zorder=0, label=f"healthy stations (±{band:.1f}%)")
        ax.axhline(0, color="#888888", lw=0.6, zorder=1)
        colours = [FLAG if i in flagged and p in _params_of(res, i) else HEALTHY for i in order]
        ax.errorbar(xs, shift[order], yerr=[shift[order] - lo[order], hi[order] - shift[order]], fmt="none",
                    ecolor="#999999", elinewidth=0.8, zorder=2)
        ax.scatter(xs, shift[order], c=colours, s=22, zorder=3)
        labelled = 0
        for x, i in zip(xs, order):
            if i in flagged and p in _params_of(res, i):
                right = x > order.size / 2  # names read inwards, never off the plot, and never on each other
                dy = (0, -11, 11, -22, 22)[labelled % 5]
                labelled += 1
                ax.annotate(res.agg.names[i], (x, shift[i]), textcoords="offset points",
                            xytext=(-6 if right else 6, dy), ha="right" if right else "left", va="center",
                            fontsize=8, color=FLAG)
        ax.set_ylabel(f"{LABELS[p]}\n% vs peers", fontsize=8)
        ax.set_xticks([])
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(loc="upper left", fontsize=7, frameon=False)
    axes[0].set_title("Each station now against its peers, same view, thickness, kV and filter "
                      "(red: flagged on that parameter)", fontsize=10)
    axes[-1].set_xlabel("stations, sorted by shift", fontsize=8)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.95, bottom=0.05, hspace=0.25)
    return fig


def _params_of(res: MineResult, i: int) -> set[str]:
    return {f["parameter"] for f in res.report["stations"][res.agg.names[i]]["findings"]}


def _timeline(res: MineResult, flagged: list[int]) -> Any:
    """Each flagged station's strongest parameter day by day (% against its peers), the healthy band,
    and the day it changed."""
    import matplotlib.pyplot as plt

    agg = res.agg
    shown = flagged[:8]
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 1.9 * len(shown) + 0.6), sharex=True, squeeze=False)
    x = agg.days.astype(float)
    for ax, i in zip(axes[:, 0], shown):
        p = _moved(res, i)
        centre = res.centre[p][i]
        daily = agg.daily[p][i]
        seen = np.isfinite(daily)
        y = _pct(p, daily[seen] - centre) if np.isfinite(centre) else _pct(p, daily[seen])
        band = res.band[p][i]
        if np.isfinite(band):
            ax.axhspan(-band, band, color=BAND, zorder=0)
        ax.axhline(0, color="#888888", lw=0.6)
        sizes = 6 + 30 * agg.daily_n[p][i][seen] / max(1, agg.daily_n[p][i].max())
        ax.plot(x[seen], y, color=FLAG, lw=0.8)
        ax.scatter(x[seen], y, s=sizes, color=FLAG, zorder=3)
        since = res.change_day[p][i]
        label = f"{agg.names[i]}: {LABELS[p]}"
        if np.isfinite(since):
            ax.axvline(since - 0.5, color="black", ls="--", lw=0.8)
            label += f", changed {EPOCH + dt.timedelta(days=int(since))}"
        ax.set_title(label, fontsize=8, loc="left")
        ax.set_ylabel("% vs peers", fontsize=7)
        ax.tick_params(labelsize=7)
    ticks = np.linspace(x.min(), x.max(), min(8, x.size)).round()
    axes[-1, 0].set_xticks(ticks)
    axes[-1, 0].set_xticklabels([str(EPOCH + dt.timedelta(days=int(t))) for t in ticks], rotation=30, fontsize=7)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.95, bottom=0.12 if len(shown) < 3 else 0.07, hspace=0.45)
    return fig


def _boxplots(res: MineResult, flagged: set[int]) -> Any:
    """Per-station box plots of each raw feature, drawn as three collections per axis (whiskers, boxes,
    medians) from the precomputed quantiles: 200 stations stay cheap to draw."""
    import matplotlib.pyplot as plt

    agg = res.agg
    n_st = len(agg.names)
    order = np.array(sorted(range(n_st), key=lambda i: (i not in flagged, agg.names[i])))
    xs = np.arange(n_st)
    colours = np.array([FLAG if i in flagged else HEALTHY for i in order])
    fig, axes = plt.subplots(len(CALIBRATION), 1, figsize=(max(8.0, n_st * 0.09 + 2), 2.1 * len(CALIBRATION)),
                             sharex=True)
    for ax, f in zip(axes, CALIBRATION):
        q = agg.box[f][:, order]
        ax.vlines(xs, q[0], q[4], colors=colours, linewidth=0.8)
        ax.bar(xs, q[3] - q[1], bottom=q[1], width=0.7, color=colours, edgecolor=colours, linewidth=0.3)
        ax.hlines(q[2], xs - 0.35, xs + 0.35, colors="black", linewidth=0.8)
        ax.set_ylabel(f, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    axes[-1].set_xticks(xs)
    axes[-1].set_xticklabels([agg.names[i] for i in order], rotation=90, fontsize=5 if n_st > 60 else 7)
    axes[0].set_title("Raw features per station, all views and thicknesses mixed (flagged first, in red): "
                      "p5-p95 whiskers, quartile boxes, median", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.97, bottom=0.14, hspace=0.08)
    return fig


CSV_PARAMS = ("shift_pct", "interval_pct", "z", "changed_since")


def write_outputs(res: MineResult, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    report_json = out_dir / "report.json"
    write_bytes_atomic(report_json, json.dumps(res.report, indent=2).encode(), durable=False)
    csv_path = out_dir / "stations.csv"
    buf = io.StringIO()
    w = csv.writer(buf)
    head = ["station_name", "flagged", "score", "likely_cause", "group", "n_images", "left_out_for_processing",
            "left_out_implant", "model", "first_date", "last_date"]
    for p in PARAMETERS:
        head += [f"{p}_shift_pct", f"{p}_low_pct", f"{p}_high_pct", f"{p}_z", f"{p}_changed_since"]
    head += [f"median_{f}" for f in (*CALIBRATION, "pd")] + ["reasons"]
    w.writerow(head)
    for name, st in res.report["stations"].items():
        row = [name, st["flagged"], st["score"], st["likely_cause"] or "", st["group"], st["n_images"],
               st["left_out"]["for_processing"], st["left_out"]["implant"], st["model"], st["first_date"],
               st["last_date"]]
        for p in PARAMETERS:
            q = st["parameters"][p]
            row += [q["shift_pct"], *q["interval_pct"], q["z"], q["changed_since"] or ""]
        row += [st["medians"].get(f) for f in (*CALIBRATION, "pd")] + [" | ".join(st["reasons"])]
        w.writerow(row)
    write_bytes_atomic(csv_path, buf.getvalue().encode(), durable=False)
    html_path = out_dir / "report.html"
    images = plots(res)
    if (out_dir / "dose.png").exists() and (res.report.get("dose") or {}).get("n_images"):
        images["dose"] = base64.b64encode((out_dir / "dose.png").read_bytes()).decode()
    write_bytes_atomic(html_path, render_html(res, images).encode(), durable=False)
    return {"json": report_json, "csv": csv_path, "html": html_path}


def render_html(res: MineResult, images: dict[str, str]) -> str:
    r = res.report
    rows = []
    for name in r["flagged_stations"]:
        st = r["stations"][name]
        what = "<br>".join(f"<span class='sev {html.escape(f['severity'])}'>{html.escape(f['severity'])}</span>"
                           f"{' <b>new</b>' if f.get('new') else ''} {html.escape(x)}"
                           for f, x in zip(st["findings"], st["reasons"]))
        rows.append(f"<tr><td><b>{html.escape(name)}</b><br><small>{st['n_images']} images"
                    f"{', ' + html.escape(st['model']) if st['model'] else ''}</small></td>"
                    f"<td>{html.escape(st.get('severity') or '')}</td><td>{what}</td>"
                    f"<td>{html.escape(st['likely_cause'] or '')}</td></tr>")
    table = ("<table><tr><th>station</th><th>severity</th><th>what moved, by how much, since when</th>"
             "<th>likely cause</th></tr>" + "".join(rows) + "</table>") if rows else "<p>No station stands out.</p>"
    since = r.get("since_previous") or {}
    if since.get("previous_report"):
        resolved = "".join(f"<li>{html.escape(k.replace('|', ' '))}</li>" for k in since["resolved"])
        table = (f"<p>Since the previous report: <b>{len(since['new'])} new</b> finding(s), "
                 f"{len(since['resolved'])} resolved.</p>" + (f"<ul>{resolved}</ul>" if resolved else "") + table)
    figs = "".join(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                   f"src='data:image/png;base64,{images[key]}'>"
                   for key, title in (("band", "Stations against the healthy band"),
                                      ("timeline", "Flagged stations day by day"),
                                      ("boxplots", "Raw features per station")) if key in images)
    dose = r.get("dose") or {}
    if dose.get("n_images"):
        items = "".join(f"<li><b>{html.escape(u)}</b>: {html.escape('; '.join(dose['units'][u]['findings']))}</li>"
                        for u in dose.get("flagged") or [])
        figs += (f"<h2>Dose: average glandular dose against thickness</h2><p>{dose['n_images']} images with a dose. "
                 + (f"<ul>{items}</ul>" if items else "No unit stands out against its peers at the same thickness "
                    "or over the EUREF acceptable levels.")
                 + "</p>" + (f"<img alt='dose' src='data:image/png;base64,{images['dose']}'>" if "dose" in images else ""))
    m = r["method"]
    within = ", ".join(f"{v} by {html.escape(k)}" for k, v in r["compared_within"].items() if v)
    left = r["left_out"]
    detect = "; ".join(f"{p} {d['against_peers']}% against peers, {d['over_time']}% over time"
                       for p, d in r["detectable_shift_pct"].items() if d["against_peers"] is not None)
    return ("<!doctype html><meta charset='utf-8'><title>MedSendX fleet QC</title>"
            "<style>body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em}td,th{padding:6px 8px;"
            "border-bottom:1px solid #ddd;text-align:left;vertical-align:top}img{max-width:100%}"
            "small{color:#666}.sev{padding:0 4px;border-radius:3px;color:#fff}.sev.high{background:#c00}"
            ".sev.medium{background:#d80}.sev.low{background:#888}</style>"
            f"<h1>Fleet QC: {len(r['flagged_stations'])} of {r['n_stations']} stations flagged</h1>"
            + (f"<p><b>{html.escape(r['note'])}</b></p>" if r.get("note") else "") +
            f"{table}{figs}"
            f"<h2>How</h2><p>{r['n_images']} images (left out: {left.get('for_processing', 0)} FOR PROCESSING, "
            f"{left.get('implant', 0)} implant views). Each image was compared with the fleet's images of the same "
            f"stratum: {within}. A station is flagged when a parameter stands outside its healthy peers' spread "
            f"(allowing for its own image count), or changed during the record away from them; at most "
            f"{m['alpha']} healthy station is expected to be flagged per run and test. Percent density and other "
            f"population features are not scored.</p><p>The smallest shift this fleet can show (90% power): "
            f"{html.escape(detect)}.</p>")


def summary_table(res: MineResult) -> str:
    r = res.report
    lines = [f"{r['n_images']} images from {r['n_stations']} stations; {len(r['flagged_stations'])} flagged"]
    since = r.get("since_previous")
    if since and since["previous_report"]:
        lines.append(f"since the previous report: {len(since['new'])} new finding(s), "
                     f"{len(since['resolved'])} resolved" +
                     "".join(f"\n  resolved: {k.replace('|', ' ')}" for k in since["resolved"]))
    if r.get("note"):
        lines.append(f"note: {r['note']}")
    if not r["flagged_stations"]:
        return "\n".join(lines)
    w = max(len(n) for n in r["flagged_stations"])
    for name in r["flagged_stations"]:
        st = r["stations"][name]
        lines.append(f"{name:<{w}}  [{(st.get('severity') or '-').upper()}]"
                     f"{' NEW' if st.get('new') else ''}  {st['likely_cause']}")
        for f, reason in zip(st["findings"], st["reasons"]):
            mark = f"{f['severity']}{', new' if f.get('new') else ''}"
            lines.append(f"{'':<{w}}    ({mark}) {reason}")
    return "\n".join(lines)


def mine_to(inputs: Any, out_dir: Path, settings: Any = None, *, engine: str = "numpy",
            previous_path: Path | None = None, warn: Any = None) -> tuple[MineResult, dict[str, Path]]:
    """One run of the miner into ``out_dir``: the scanner findings against the previous report (what is
    new, what is resolved), the dose QC with its plot, and the outputs (report.json, stations.csv,
    report.html, dose.png).  ``mine`` by hand and the fleet service's schedule both run this."""
    from medsendx_edge.fleet import dose
    from medsendx_edge.fleet.data import expand_inputs
    from medsendx_edge.fleet.miner import compare_with, mine

    res = mine(inputs, engine=engine, settings=settings)
    previous_path = previous_path or out_dir / "report.json"
    try:
        previous = json.loads(previous_path.read_text()) if previous_path.exists() else None
    except (OSError, ValueError) as exc:
        if warn is not None:
            warn(f"the previous report {previous_path} cannot be read ({type(exc).__name__}): everything is "
                 "reported as new")
        previous = None
    compare_with(res.report, previous)
    dosed = dose.load(expand_inputs(inputs))
    res.report["dose"] = dose.dose_qc(dosed)
    res.report["mined_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
    out_dir.mkdir(parents=True, exist_ok=True)
    if dosed["dose"].size:
        dose.plot(dosed, res.report["dose"], out_dir / "dose.png")
    return res, write_outputs(res, out_dir)
