"""The miner's outputs: report.json, stations.csv, a self-contained report.html with PNG plots, and the
terminal summary the fleet manager reads."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from medsendx_edge.fleet.miner import CALIBRATION, EPOCH, MineResult
from medsendx_edge.fsutil import write_bytes_atomic

FLAG = "#d62728"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)  # no bbox_inches="tight": it draws every figure twice
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plots(res: MineResult) -> dict[str, str]:
    """The report's figures as base64 PNGs: per image, per station, over time."""
    import matplotlib

    matplotlib.use("Agg")
    flagged = {res.agg.names.index(n) for n in res.flagged}
    out = {"scatter": _png(_scatter(res, flagged)), "boxplots": _png(_boxplots(res, flagged))}
    if res.agg.days.size:
        out["timeline"] = _png(_timeline(res, flagged))
    return out


def _scatter(res: MineResult, flagged: set[int]) -> Any:
    """Density centre vs contrast per image, coloured by station group; flagged stations ringed."""
    import matplotlib.pyplot as plt

    sample = res.agg.sample
    fig, ax = plt.subplots(figsize=(8, 5.5))
    station = sample["station"]
    group = res.groups[station]
    cmap = plt.get_cmap("tab10")
    for g in np.unique(group):
        in_group = group == g
        ax.scatter(sample["dense_c"][in_group], sample["contrast"][in_group], s=4, alpha=0.35,
                   color=cmap(int(g) % 10), label=f"station group {g}" if g >= 0 else "unscored")
    of_flagged = np.isin(station, list(flagged))
    if of_flagged.any():
        ax.scatter(sample["dense_c"][of_flagged], sample["contrast"][of_flagged], s=14, facecolors="none",
                   edgecolors=FLAG, linewidths=0.7, label="flagged stations")
    ax.set_xlabel("dense class centre (dense_c)")
    ax.set_ylabel("contrast (dense_c - fat_c)")
    ax.set_title("Per image: density centre vs contrast")
    ax.legend(markerscale=3, fontsize=8)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.93, bottom=0.1)
    return fig


def _boxplots(res: MineResult, flagged: set[int]) -> Any:
    """Per-station box plots of each calibration feature, drawn as three collections per axis
    (whiskers, boxes, medians) from the precomputed quantiles: 200 stations stay cheap to draw."""
    import matplotlib.pyplot as plt

    agg = res.agg
    n_st = len(agg.names)
    order = np.array(sorted(range(n_st), key=lambda i: (i not in flagged, agg.names[i])))
    xs = np.arange(n_st)
    colours = np.array([FLAG if i in flagged else "#6baed6" for i in order])
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
    axes[0].set_title("Per station (flagged first, in red): p5-p95 whiskers, quartile boxes, median")
    fig.subplots_adjust(left=0.06, right=0.99, top=0.97, bottom=0.14, hspace=0.08)
    return fig


def _timeline(res: MineResult, flagged: set[int]) -> Any:
    """Features over time: every station in grey (one collection per axis), flagged ones in colour."""
    import datetime as dt

    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    agg = res.agg
    x = agg.days.astype(float)
    fig, axes = plt.subplots(len(CALIBRATION), 1, figsize=(10, 2.0 * len(CALIBRATION)), sharex=True)
    for ax, f in zip(axes, CALIBRATION):
        daily = agg.daily[f]
        segments = []
        for i in range(len(agg.names)):
            seen = ~np.isnan(daily[i])
            if i not in flagged and seen.sum() > 1:
                segments.append(np.column_stack([x[seen], daily[i][seen]]))
        ax.add_collection(LineCollection(segments, colors="#bbbbbb", linewidths=0.5))
        for c, i in enumerate(sorted(flagged)):
            seen = ~np.isnan(daily[i])
            ax.plot(x[seen], daily[i][seen], lw=1.4, color=plt.get_cmap("tab10")(c % 10), label=agg.names[i])
        ax.autoscale_view()
        ax.set_ylabel(f, fontsize=8)
        ax.tick_params(labelsize=7)
    ticks = np.linspace(x.min(), x.max(), min(8, x.size)).round()
    axes[-1].set_xticks(ticks)
    axes[-1].set_xticklabels([str(EPOCH + dt.timedelta(days=int(t))) for t in ticks], rotation=30, fontsize=7)
    if flagged:
        axes[0].legend(fontsize=7, ncol=4)
    axes[0].set_title("Daily medians per station (grey: the fleet; colour: flagged)")
    fig.subplots_adjust(left=0.08, right=0.99, top=0.96, bottom=0.07, hspace=0.08)
    return fig


def write_outputs(res: MineResult, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    report_json = out_dir / "report.json"
    payload = json.dumps(res.report, indent=2, sort_keys=False).encode()
    write_bytes_atomic(report_json, payload, durable=False)
    csv_path = out_dir / "stations.csv"
    buf = io.StringIO()
    w = csv.writer(buf)
    head = ["station_name", "flagged", "score", "group", "n_images", "model", "first_date", "last_date",
            *[f"median_{f}" for f in (*CALIBRATION, "pd")], *[f"z_{f}" for f in CALIBRATION], "reasons"]
    w.writerow(head)
    for name, st in res.report["stations"].items():
        w.writerow([name, st["flagged"], st["score"], st["group"], st["n_images"], st["model"], st["first_date"],
                    st["last_date"], *[st["medians"].get(f) for f in (*CALIBRATION, "pd")],
                    *[st["z"].get(f) for f in CALIBRATION], " | ".join(st["reasons"])])
    data = buf.getvalue().encode()
    write_bytes_atomic(csv_path, data, durable=False)
    images = plots(res)
    html_path = out_dir / "report.html"
    page = render_html(res, images).encode()
    write_bytes_atomic(html_path, page, durable=False)
    return {"json": report_json, "csv": csv_path, "html": html_path}


def render_html(res: MineResult, images: dict[str, str]) -> str:
    r = res.report
    rows = []
    for name in r["flagged_stations"]:
        st = r["stations"][name]
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{st['score']}</td><td>{st['n_images']}</td>"
                    f"<td>{html.escape(st['model'] or '')}</td>"
                    f"<td>{'<br>'.join(html.escape(x) for x in st['reasons'])}</td></tr>")
    table = ("<table><tr><th>station</th><th>score</th><th>images</th><th>model</th><th>why</th></tr>"
             + "".join(rows) + "</table>") if rows else "<p>No station stands out.</p>"
    figs = "".join(f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{images[key]}'>"
                   for key, title in (("scatter", "Density centre vs contrast, per image"),
                                      ("boxplots", "Calibration features per station"),
                                      ("timeline", "Calibration features over time")) if key in images)
    m = r["method"]
    return ("<!doctype html><meta charset='utf-8'><title>MedSendX fleet QC</title>"
            "<style>body{font-family:sans-serif;max-width:1400px;margin:1em auto}td,th{padding:4px 8px;"
            "border-bottom:1px solid #ddd;text-align:left;vertical-align:top}img{max-width:100%}</style>"
            f"<h1>Fleet QC: {len(r['flagged_stations'])} of {r['n_stations']} stations flagged</h1>"
            f"<p>{r['n_images']} images. Scored on calibration features ({', '.join(m['calibration_features'])}) "
            f"against each station's group (robust z >= {m['z_flag']}), and drift over the last "
            f"{m['recent_days']} days; percent density and other population features are not scored.</p>"
            f"{table}{figs}")


def summary_table(res: MineResult) -> str:
    r = res.report
    lines = [f"{r['n_images']} images from {r['n_stations']} stations; "
             f"{len(r['flagged_stations'])} flagged"]
    if not r["flagged_stations"]:
        return lines[0]
    w = max(len(n) for n in r["flagged_stations"])
    lines.append(f"{'STATION':<{w}}  SCORE  WHY")
    for name in r["flagged_stations"]:
        st = r["stations"][name]
        reasons = st["reasons"] or ["-"]
        lines.append(f"{name:<{w}}  {st['score']:5.1f}  {reasons[0]}")
        for extra in reasons[1:]:
            lines.append(f"{'':<{w}}         {extra}")
    return "\n".join(lines)
