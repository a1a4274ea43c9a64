"""Masks and orientation: tissue against air, the chest-wall side, the breast outline, the pectoral muscle.
"""

from __future__ import annotations

import math

import numpy as np

from medsendx_edge.triage.arrays import (box_filter, fill_holes, label, median, robust_std, square_dilate,
                                         square_open)
from medsendx_edge.triage.density import fat_trend
from medsendx_edge.triage.kmeans import histogram, kmeans_hist


# --------------------------------------------------------------------------- masks and orientation
def foreground(v: np.ndarray, field: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """Tissue against air inside the exposed field: a 2-class split of the histogram, the threshold a
    quarter of the way from the air class to the tissue class (the thin periphery stays in).
    Returns (mask, air, tissue)."""
    inside = v if field is None or field.all() else v[field]
    q = np.rint(inside).astype(np.int64)
    counts, offset = histogram(q)
    cl = kmeans_hist(counts, 2)
    air, tissue = float(cl.centres[0] + offset), float(cl.centres[-1] + offset)
    # Air is a narrow peak; fat under a steep tone curve can sit close to it (a few percent of the
    # range): the threshold is the lower of a quarter of the way to the tissue class and air plus
    # 8 of air's standard deviations (at least 4 % of the way), so dark fat stays tissue.
    below = inside[inside <= float(cl.thresholds[0] + offset)] if cl.thresholds.size else inside
    sd_air = robust_std(below.ravel()) if below.size >= 10 else float("nan")
    if below.size >= 100:
        # Under a tone curve that keeps fat dark and muscle bright, the two classes are air with fat
        # against muscle and gland: the dark class's brighter part (fat) is then 15 % of the field or
        # more and near the bright class's share, and air is the darker of its own two, a narrow peak
        # standing clear (ten of its standard deviations).  On the real films that part is 5-7 % of the
        # field, far below the tissue class's 14-30 %: unchanged.
        qb = np.rint(below).astype(np.int64)
        cb, ob = histogram(qb)
        sub = kmeans_hist(cb, 2)
        if sub.thresholds.size:
            dark = below[below <= float(sub.thresholds[0] + ob)]
            sd_dark = robust_std(dark.ravel()) if dark.size >= 10 else float("nan")
            gap = float(sub.centres[-1] - sub.centres[0])
            upper = (below.size - dark.size) / inside.size        # the dark class's brighter part
            tissue_share = 1.0 - below.size / inside.size
            # A black strip at the border (a collimator blade the modality wrote as 0, no padding value)
            # is a narrow dark peak too, but a small part of the dark class: air is most of it.
            if (upper >= 0.15 and upper > 0.8 * tissue_share and dark.size >= 0.3 * below.size
                    and math.isfinite(sd_dark) and gap > 10.0 * max(sd_dark, 1.0)):
                air, sd_air = float(sub.centres[0] + ob), sd_dark
    thr = air + 0.25 * (tissue - air)
    if math.isfinite(sd_air):
        thr = min(thr, air + max(8.0 * sd_air, 0.04 * (tissue - air)))
    fg = v > thr
    return (fg if field is None else fg & field), air, tissue


def chest_wall_side(fg: np.ndarray) -> str:
    band = max(2, fg.shape[1] // 20)
    return "right" if fg[:, -band:].mean() > fg[:, :band].mean() else "left"


def breast_mask(fg: np.ndarray, spacing_mm: float | None = None) -> np.ndarray:
    """The breast on a chest-wall-left view: the tissue connected to the chest wall (labels, markers,
    and thin lines such as a paddle's edge are not), with holes inside the outline filled (a burned-out
    patch, or fat darkened by a vendor's unsharp masking next to bright gland, is still breast).

    Connected, not per row: a single dark pixel between the wall and the rest of a row (the undershoot
    of unsharp masking, retromammary fat) must not cut the row off (measured on the independent
    phantom family: up to half of a breast lost that way)."""
    h, w = fg.shape
    if not fg[:, 0].any():
        return np.zeros_like(fg)
    r = max(1, int(round(1.0 / spacing_mm))) if spacing_mm else max(1, w // 400)
    size = min(2 * r + 1, max(1, min(h, w) // 25))   # never more than a few percent of a small image
    # an opening by a square 2 mm across (separable min and max filters): a thinner line does not connect
    core = square_open(fg, size)
    labels, n = label(core)
    touching = np.bincount(labels[:, 0], minlength=n + 1)
    touching[0] = 0
    if touching.max() == 0:      # all of the tissue at the wall thinner than the opening: take it as is
        labels, n = label(fg)
        touching = np.bincount(labels[:, 0], minlength=n + 1)
        touching[0] = 0
    # components that meet the wall over at least 1 % of its height, or the one that meets it most
    keep = np.flatnonzero((touching >= max(1, h // 100)) | (touching == touching.max()))
    member = np.zeros(n + 1, dtype=bool)
    member[keep] = True
    attached = member[labels]
    grown = square_dilate(attached, size) & fg   # the opening's loss at the outline
    return fill_holes(grown | attached)


def fat_level(small: np.ndarray, body: np.ndarray) -> float:
    """The lower centre of a 2-class split of the body's values."""
    counts, offset = histogram(np.rint(small[body]).astype(np.int64))
    return float(kmeans_hist(counts, 2).centres[0] + offset)


def pectoral_mask(small: np.ndarray, body: np.ndarray, level_f: float | None = None) -> np.ndarray:
    """The pectoral muscle in the top chest-wall corner (chest wall on the left): the bright region
    bounded by a straight line fitted to its edge.  Empty if nothing plausible is found.

    The muscle's level P is the median of the corner; the fat level F the lower of a 2-class
    split of the body.  Along each row from the chest wall the edge is where the (smoothed)
    intensity first falls under P - (P - F) / 4: dense tissue, darker than muscle, stops it too,
    and the robust line fit through the row edges discards rows where tissue touches the muscle.
    """
    h, w = small.shape
    empty = np.zeros_like(body)
    ch, cw = max(2, h // 20), max(2, w // 20)
    wall = np.flatnonzero(body[:, :cw].mean(axis=1) > 0.9)
    if wall.size == 0:
        return empty
    r0 = int(wall[0])
    corner = small[r0:r0 + ch, :cw][body[r0:r0 + ch, :cw]]
    if corner.size < 0.5 * ch * cw:
        return empty
    level_p = float(median(corner))
    if level_f is None:
        level_f = fat_level(small, body)
    if level_p - level_f <= 0:
        return empty
    thr = level_p - (level_p - level_f) / 4.0
    smooth = box_filter(small, 5)
    below = (smooth < thr) | ~body
    r1 = int(h * 0.8)
    limit = int(w * 0.7)
    sub = below[r0:r1, :limit]
    hit = sub.any(axis=1)
    first = np.where(hit, np.argmax(sub, axis=1), limit)
    rows: list[int] = []
    edges: list[int] = []
    for i, c in enumerate(first.tolist()):
        if c == 0:
            if len(rows) >= 5:
                break  # below the muscle
            continue
        rows.append(r0 + i)
        edges.append(c)
    if len(rows) < 5:
        return empty
    rr_, ee = np.asarray(rows, dtype=np.float64), np.asarray(edges, dtype=np.float64)
    keep = np.ones(rr_.size, dtype=bool)
    b = a = 0.0
    for _ in range(3):
        if keep.sum() < 5:
            return empty
        b, a = np.polyfit(rr_[keep], ee[keep], 1)
        resid = ee - (a + b * rr_)
        mad = float(np.median(np.abs(resid[keep]))) + 0.5
        keep = np.abs(resid) <= 3.0 * 1.4826 * mad
    if b >= 0 or a <= 0:
        return empty
    rr = np.arange(h, dtype=np.float64)[:, None]
    cc = np.arange(w, dtype=np.float64)[None, :]
    pect = (cc < a + b * rr) & body
    frac = pect.sum() / max(1, body.sum())
    if not 0.01 <= frac <= 0.5:
        return empty
    # A muscle is brighter than the tissue beside it: a wedge of fat-level pixels is no muscle.
    beside = body & ~pect & (cc < a + b * rr + w * 0.1)
    if beside.any() and float(median(small[pect])) <= float(median(small[beside])):
        return empty
    out: np.ndarray = pect
    return out


PECTORAL_FIT_MM = 0.45    # the muscle's edge, followed row by row, lies this close to one smooth curve
PECTORAL_FOLLOWED = 0.75  # over this much of its length
PECTORAL_FIRST_START = 1.5  # the first start's edge stands unless another runs this much further
PECTORAL_MIN_MM = 15.0    # and its fitted edge runs this far down (a 9 mm gland edge at the foot is no muscle)


def edge_steps(small: np.ndarray, body: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Bright-to-dark steps along each row over +-1.5 mm (wall side minus inward side, box means), 0
    outside the body.  Row order does not matter to it: the steps of a vertically flipped image are
    these, flipped (OpenCV's box filter is symmetric, checked in tests/test_triage_masks.py)."""
    w = small.shape[1]
    g = max(2, int(round(1.5 / spacing_mm)))
    s = box_filter(small, max(3, 2 * g + 1))
    step = np.zeros_like(s)
    step[:, g:w - g] = s[:, :w - 2 * g] - s[:, 2 * g:]   # bright on the wall side, dark inwards
    step[~body] = 0
    return step


def track_pectoral(small: np.ndarray, body: np.ndarray, spacing_mm: float,
                   step: np.ndarray | None = None) -> np.ndarray:
    """The pectoral muscle in the top chest-wall corner (chest wall on the left), followed along the
    edge it makes: from the top of the breast, row by row, the strongest bright-to-dark step within a
    few millimetres of the previous row's (towards the wall; outwards only along the skin line),
    until the edge reaches the chest wall or is lost (20 mm without one).  It is followed from each of a
    few starting columns, and the longest muscle edge is kept (on woman 2's left MLO the strongest step
    in the top rows is an edge inside the muscle band, which meets the wall 35 mm down; the anterior
    edge beside it runs 100 mm).  The edge points are smoothed by a robust quadratic, so the boundary
    is a curve from the chest-wall corner; the muscle is what lies between it and the wall.  Empty
    when no such edge is found, or when what it bounds is not brighter than the tissue beside."""
    h, w = small.shape
    empty = np.zeros_like(body)
    rows_in = np.flatnonzero(body[:, 0])
    if rows_in.size < 10:
        return empty
    r0 = int(rows_in[0])
    g = max(2, int(round(1.5 / spacing_mm)))             # the step is measured over +-1.5 mm
    if step is None:
        step = edge_steps(small, body, spacing_mm)
    limit = int(w * 0.7)
    top_rows = slice(r0, min(h, r0 + max(3, int(3.0 / spacing_mm))))
    prof = np.median(step[top_rows, :limit], axis=0)
    prof[:g + 1] = 0
    # Candidate starts: the columns where the top rows step down most, each a local maximum (the
    # muscle band can carry an edge inside it beside its anterior one, stronger at the top but meeting
    # the wall early, and a gland edge can cross the top); each is followed, and the longest edge that
    # bounds a muscle passing the gates is kept.  Not the largest muscle (a band of tissue a little
    # brighter than fat along the muscle's front bounds a larger one: IoU 1.00 fell to 0.61-0.77), nor
    # the most step along the edge (an inner edge of high contrast outweighed the anterior one: 0.27);
    # two reviews' scenes, tests/test_triage_masks.py.
    peak = (prof > 0) & (prof >= np.maximum(np.roll(prof, 1), np.roll(prof, -1)))
    cands = np.flatnonzero(peak & (prof >= 0.25 * float(prof.max(initial=0.0))))
    chosen: list[int] = []
    for c in cands[np.argsort(prof[cands])[::-1]]:   # one start per step (+-1.5 mm): the strongest
        if all(abs(int(c) - o) > g for o in chosen):
            chosen.append(int(c))
    cands = np.asarray(chosen[:4], dtype=np.int64)
    # and the column each top row steps down most at, by the median (an edge crossing the top rows
    # at a slant is smeared in their median profile)
    c_rows = int(np.median(np.argmax(step[top_rows, g:limit], axis=1))) + g
    starts = [(c_rows, float(np.median(step[top_rows, c_rows])))]
    starts += [(int(c), float(prof[c])) for c in cands if abs(int(c) - c_rows) > g]
    best, best_key = empty, (0.0, 0.0)
    for i, (c, strength0) in enumerate(starts):
        if c <= g or strength0 <= 0:
            continue
        got = _follow_pectoral(small, body, spacing_mm, step, r0, c, strength0, g, limit)
        if got is None:
            continue
        # the longest muscle edge; the first start, where the top rows step down most, stands unless
        # another edge runs half as far again (an edge inside the muscle band meets the wall early,
        # whatever its contrast; a band along the muscle's front runs about as far as the muscle)
        key = (got[1] * (PECTORAL_FIRST_START if i == 0 else 1.0), got[2])
        if key > best_key:
            best, best_key = got[0], key
    return best


def _follow_pectoral(small: np.ndarray, body: np.ndarray, spacing_mm: float, step: np.ndarray,
                     r0: int, c: int, strength0: float, g: int,
                     limit: int) -> tuple[np.ndarray, float, float] | None:
    """One edge followed down from column ``c`` of the top row, made a muscle (mask, the rows its fitted
    edge spans, the steps summed at the tracked points the fit kept) or None when it is no muscle's edge."""
    h, w = small.shape
    span = max(1, int(round(2.0 / spacing_mm)))          # the edge moves at most 2 mm a row... per 2 rows
    pts_r: list[int] = []
    pts_c: list[int] = []
    inside = False   # the track has left the skin line (axilla) for the muscle's own edge
    back = max(2, int(round(5.0 / spacing_mm)))
    csum: tuple[list[int], ...] = ([0], [0], [0], [0])   # prefix sums of r, c, r*r, r*c (exact integers)
    faint, lost = 0, int(round(20.0 / spacing_mm))     # 20 mm without an edge: lost
    for r in range(r0, int(h * 0.85)):
        # Along the skin line the edge may move outwards as fast as inwards; inside, a muscle's edge
        # heads for the wall, a pixel a row outwards at most (a gland touching it is not followed out).
        lo, hi = max(1, c - span), min(limit, c + (2 if inside else span + 1))
        if hi <= lo:
            break
        seg = step[r, lo:hi]
        if not inside:
            # Along the skin line: an edge of its own (a local maximum of the step, not the skin step's
            # tail) with tissue 1.5 mm beyond it, the muscle's edge leaving the skin, comes first (else
            # the skin was followed out past the corner where the muscle leaves it, and on the own
            # phantom at 0.07 mm the muscle went to the slower residual search: IoU 0.91-0.99, now 0.99).
            cols = np.arange(lo, hi)
            nb = step[r, np.maximum(cols - 1, 0)], step[r, np.minimum(cols + 1, w - 1)]
            ins = body[r, np.minimum(cols + g, w - 1)] & (seg >= nb[0]) & (seg > nb[1])
            if ins.any() and float(seg[ins].max()) >= 0.25 * strength0:
                seg = np.where(ins, seg, -np.inf)
        k = int(np.argmax(seg))
        if seg[k] < 0.25 * strength0:
            faint += 1
            if c <= g + 1 or faint > lost:
                break                                     # reached the chest wall, or lost the edge
            # A faint stretch (a gland as bright as the muscle laid over its edge): keep heading for the
            # wall along the line through the last 10 mm of edge (a pixel a row before 5 mm of it),
            # so the edge is picked up again below the gland, not the gland's outline beside it.
            n = len(pts_r)
            if n > back:   # least squares over the last 10 mm from prefix sums (a fit a row: 90 ms an image)
                m = min(n, 2 * back)
                sx, sy = csum[0][n] - csum[0][n - m], csum[1][n] - csum[1][n - m]
                sxx, sxy = csum[2][n] - csum[2][n - m], csum[3][n] - csum[3][n - m]
                den = m * sxx - sx * sx
                lb = (m * sxy - sx * sy) / den if den > 0 else 0.0
                la = (sy - lb * sx) / m
                c = max(0, min(c - 1 if lb >= 0 else c, int(round(la + lb * r))))
            else:
                c = max(0, c - 1)
            continue
        c, faint = lo + k, 0
        pts_r.append(r)
        pts_c.append(c)
        for acc, val in zip(csum, (r, c, r * r, r * c)):
            acc.append(acc[-1] + val)
        if not inside:
            inside = bool(body[max(0, r - g):r + g + 1, c:c + 2 * g + 1].all())
        if c <= g:
            break
    if len(pts_r) < max(5, int(5.0 / spacing_mm)):
        return None
    rr_, cc_ = np.asarray(pts_r, dtype=np.float64), np.asarray(pts_c, dtype=np.float64)
    # Where the muscle fills the tissue from the wall to the skin (the axilla at the top of an MLO), the
    # step followed is the skin line: air already at the middle of the step's inward window (g pixels in;
    # air only at its far end is a muscle edge running close to the skin: those rows, taken for axilla,
    # gave the muscle a strip of breast 1-10 pixels wide).  Those rows are muscle up to the skin (g
    # pixels in, where it lies); the muscle's own edge, tissue on both sides, is what the curve is fitted to.
    ri, ci = rr_.astype(np.int64), cc_.astype(np.int64)
    inner = body[ri, np.minimum(ci + g, w - 1)]
    first_inner = int(np.argmax(inner)) if inner.any() else rr_.size
    axilla_rows, axilla_edge = ri[:first_inner], ci[:first_inner] + g
    rr_, cc_ = rr_[first_inner:], cc_[first_inner:]
    if rr_.size < max(5, int(5.0 / spacing_mm)):
        return None
    r_start = int(rr_[0])
    # A robust quadratic (a muscle's edge is straight, convex or concave) through the whole track or,
    # where its end strays onto a gland (an S bend the curve cannot follow), through the longest part
    # from the top that it fits, cut 5 mm at a time down to PECTORAL_FOLLOWED of the track.
    cut = max(1, int(round(5.0 / spacing_mm)))
    trials = [rr_.size] + list(range(rr_.size - cut, int(rr_.size * PECTORAL_FOLLOWED) - 1, -cut))
    for n in trials:
        rp, cp = rr_[:n], cc_[:n]
        keep = np.ones(n, dtype=bool)
        coef = np.zeros(3)
        for _ in range(3):
            if keep.sum() < 5:
                break
            coef = np.polyfit(rp[keep], cp[keep], 2)
            resid = cp - np.polyval(coef, rp)
            mad = float(np.median(np.abs(resid[keep]))) + 0.5
            keep = np.abs(resid) <= 3.0 * 1.4826 * mad
        if keep.sum() < 5:
            continue
        fit_mm = float(np.median(np.abs(resid[keep]))) * spacing_mm
        followed = keep.sum() / max(1, int(rp.max()) - r_start + 1)
        if fit_mm <= PECTORAL_FIT_MM and followed >= PECTORAL_FOLLOWED:
            rr_, cc_ = rp, cp
            break
    else:
        return None   # no one smooth edge: gland boundaries, not a muscle
    last = int(rr_[keep].max())
    if (last - r_start) * spacing_mm < PECTORAL_MIN_MM:
        return None
    rows = np.arange(h, dtype=np.float64)
    edge = np.polyval(coef, rows)
    edge[rows < r0] = 0
    edge[axilla_rows] = axilla_edge
    # below the last tracked row the curve goes on to the wall, never back out
    beyond = rows > last
    edge[beyond] = np.minimum(edge[beyond], np.interp(rows[beyond], [last, last + max(1, last - r0) * 0.25],
                                                      [edge[last], 0.0]))
    edge = np.clip(edge, 0, w)
    pect = (np.arange(w)[None, :] < edge[:, None]) & body
    frac = pect.sum() / max(1, body.sum())
    if not 0.01 <= frac <= 0.5:
        return None
    beside = body & ~pect & (np.arange(w)[None, :] < edge[:, None] + w * 0.1) & (edge[:, None] > 0)
    if beside.any() and float(median(small[pect])) <= float(median(small[beside])):
        return None
    kr, kc = rr_[keep].astype(np.int64), cc_[keep].astype(np.int64)
    return pect, float(last - r_start), float(step[kr, kc].sum())


def find_pectoral(small: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, str]:
    """The pectoral muscle in whichever chest-wall corner holds it (a vertically flipped MLO has it
    at the bottom): (mask, "top" | "bottom" | "none")."""
    level_f = fat_level(small, body) if body.any() else None   # the same values either way up
    top = pectoral_mask(small, body, level_f)
    bottom = pectoral_mask(small[::-1], body[::-1], level_f)[::-1]
    if top.any() and bottom.any():
        return (top, "top") if small[top].mean() >= small[bottom].mean() else (bottom, "bottom")
    if top.any():
        return top, "top"
    if bottom.any():
        return bottom, "bottom"
    return top, "none"


def pectoral(vw: np.ndarray, breast: np.ndarray, d_mm: np.ndarray,
             air: float, spacing: float) -> tuple[np.ndarray, str]:
    """The pectoral muscle, followed along its edge on the image first (:func:`track_pectoral`, either
    corner), then looked for on the thickness-corrected residual (there a full-thickness muscle stands
    clear of any gland, even in an 80 % dense breast, whatever the periphery does), then on the image."""
    step = edge_steps(vw, breast, spacing)
    top = track_pectoral(vw, breast, spacing, step)
    if top.any():
        return top, "top"   # where an MLO has it; a vertically flipped one is looked for below
    bottom = track_pectoral(vw[::-1], breast[::-1], spacing, step[::-1])[::-1]
    if bottom.any():
        return bottom, "bottom"
    trend0 = fat_trend(vw, d_mm, breast, air=air)
    resid0 = (vw - trend0) / np.maximum(trend0 - air, 0.05 * max(1.0, float(trend0.max()) - air))
    pect, corner = find_pectoral(np.clip(resid0, -1.0, 3.0) * 1000.0, breast)
    if corner == "none":
        pect, corner = find_pectoral(vw, breast)
    return pect, corner
