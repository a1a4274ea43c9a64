"""Independent, physics-based digital mammography phantom family (known-truth PD).

Purpose
-------
Known-truth validation of an automated *area* breast-density estimator
(percent dense area).  This module was written without reading the estimator
under test (``medsendx_edge/triage``) and deliberately uses physics that differ
from a "half-circle edge of radius thickness/2" model.  It depends on numpy,
scipy (``scipy.ndimage``; installed in the project venv, not a declared
dependency -- test modules may ``pytest.importorskip("scipy")``) and pydicom.

API
---
``case(index) -> (pydicom FileDataset, info dict)``   index 0..31, deterministic
``cases() -> list`` of the 32 ``case`` results
``truth_masks(index) -> {"breast", "pectoral", "dense", "tissue", "calcifications"}``
    boolean arrays at stored resolution and in stored orientation.
    ``breast`` EXCLUDES the pectoral muscle; ``tissue = breast | pectoral``;
    ``pd_true == dense.sum() / breast.sum()`` exactly.
``display_image(ds) -> float array in [0, 1]`` (1 = white): a small reference
    implementation of the DICOM grayscale pipeline (Rescale 1/0, VOI LUT
    Sequence or linear Window, MONOCHROME1 inversion) used for thumbnails.

Geometry and orientation (assumption, DICOM PS3.3 C.8.11.7 / C.7.6.1.1.1)
------------------------------------------------------------------------
Image 1800 rows x 1400 columns at 0.15 mm (270 x 210 mm).  Stored as the
modality stores a mammogram: the chest wall is on the LEFT image edge for
ImageLaterality L (nipple pointing right) and on the RIGHT edge for R.
PatientOrientation (row direction \\ column direction): L CC "A\\R", R CC
"P\\L", L MLO "A\\FR", R MLO "P\\FL" (top of a CC is lateral, top of an MLO is
superior/axillary, where the pectoral muscle sits).

Physics (each choice and its source / assumption)
-------------------------------------------------
* Outline: a super-ellipse "D" (exponent 1.8-2.6) against the chest wall, 3 %
  smooth contour wobble and a small nipple bump.  CC: centred, semi-axis along
  the chest wall 60-115 mm, depth 55-140 mm.  MLO: centre 36-46 % down, the
  upper lobe runs out of the top edge (axillary tail), inframammary fold at
  78-90 % of the height.
* Compressed thickness T = BodyPartThickness, 30-75 mm (table below).  Edge
  profile t(d) = T * min(1, d/W)**p with d the in-plane distance from the skin
  line (Euclidean distance transform; the chest-wall edge, and for MLO the top
  edge, are not skin), W (14-32 mm) and p (0.35-0.7) drawn independently of T.
  Power law chosen as an empirical stand-in for the measured compressed-breast
  edge shape (e.g. Rodriguez-Ruiz et al. 2016, Med Phys, compressed breast
  shape model: the thickness falls off over 1-3 cm, not over T/2).
* Skin: 2 mm shell at 0.80 /cm (skin ~ glandular, Hammerstein et al. 1979).
  Interior thickness t_in = max(0, T*min(1,(d-2)/W)**p - 4 mm); skin path =
  t - t_in, so the tangential skin line is naturally brighter.
* Tissue: adipose matrix with fibroglandular tissue as thresholded two-scale
  low-pass Gaussian noise (3-5 mm and 8-14 mm correlation) plus a central-cone
  anatomical prior (tissue radiates from the nipple towards the chest wall,
  slightly upper for MLO).  Glandular fraction along the ray
  g = glo + (ghi - glo) * sigmoid(signed_distance / 0.55-0.8 px) with
  glo in [0, 0.10] (thin strands) and ghi in [0.82, 0.98]: g is near 0 or 1
  with a ~1.5 px transition, hence an unambiguous truth.  Glandular tissue is
  confined away from a 3-10 mm subcutaneous fat layer (thinner, 3-4.5 mm, in
  dense breasts -- the glandular cone fills the breast), away from a 1.5-7 mm
  retromammary (pre-pectoral) fat band along the chest wall / pectoral edge,
  and out of the pectoral muscle.  The threshold is the quantile that hits the
  tabulated target PD; pd_true is then measured, not assumed.
* Attenuation at ~20 keV effective (Johns & Yaffe 1987, Phys Med Biol 32:675,
  order of magnitude): adipose 0.46 /cm, glandular 0.80 /cm, skin 0.80 /cm,
  pectoral muscle 0.85 /cm (over the full thickness in its region; ICRU 44
  muscle ~ slightly above glandular), microcalcification 26 /cm
  (hydroxyapatite, rho ~3.1 g/cm3, at 20 keV; spheres 0.25-0.7 mm, 3x3
  sub-pixel chord integration).
  Fixed spectrum (no kVp change with thickness): a simplification.
* Primary: I = I0 exp(-(mu_f (t_in - tg) + mu_g tg + mu_skin skin)), tg = g t_in
  (muscle replaces tissue where present); 0.6 px Gaussian detector blur.
  I0 chosen (AEC-like) so the fatty interior receives 2500-5000 quanta/pixel
  (primary + scatter); air (direct exposure) receives ~I0.
* Scatter: S = SPR * G(sigma_s) * (primary inside the breast) with
  SPR = 0.30 + 0.30 (T-30)/45 (+-0.03, clipped to 0.3-0.6; Boone et al. 2000,
  Med Phys 27:1818 order of magnitude) and sigma_s 15-30 mm; it also produces
  the scatter halo into the air next to the skin line.
* Noise: Gaussian with variance = signal (Poisson-like) + 2 quanta electronic.
* Collimation: unexposed strips receive no X-rays (dark current only).
* Processing to FOR PRESENTATION (vendor-style, assumption):
  1. log: L = ln(I0 / D);
  2. periphery equalisation: a vendor segmentation (L > 0.06 on a 0.6 mm grid)
     and its distance map; thickness deficit(d) = plateau - 20th-percentile of
     a 2 mm-blurred L at distance d (the fattest tissue at each distance is a
     thickness proxy), for d < 30-40 mm; a fraction 0.3-0.8 of it is added
     back, so the periphery stays partly darker;
  3. sigmoid tone curve (slope 3-5, centre 0.35-0.55 of the fat->dense range,
     air pinned to black) blended 15-25 % with a linear toe (air -> 0, fat
     reference -> ~0.1) so thin peripheral fat stays above the air level;
  4. unsharp masking, sigma 2-5 mm, gain 0.3-1.0;
  5. quantisation to 12 or 14 bits in 16-bit words, MONOCHROME2 brighter =
     denser, air dark; unexposed strips white (processed saturation, with
     edge ringing) or a constant near-white value.
  VOI LUT variant: the stored values are the linear (log-domain, equalised,
  unsharp-masked) image and the sigmoid lives in a VOI LUT Sequence (16-bit
  entries, one per stored value), so the raw stored values look flat and need
  the LUT.  MONOCHROME1 variant: stored = max - value, LUT/window adapted so
  the displayed brightness is identical.  Pixel Padding Value variant: a
  3-9 mm band (nipple-side edge and/or bottom) filled with the padding value
  (0 for MONOCHROME2, max for MONOCHROME1); image content never takes it.

Truth
-----
pd_true = #(breast pixels, pectoral excluded, exposed, not padding, g >= 0.5)
/ #(breast pixels, pectoral excluded, exposed, not padding).
ambiguous_frac = fraction of those breast pixels with 0.3 < g < 0.7 (< 0.05).
pectoral_frac_true (MLO) = fraction of the chest-wall edge, over the rows
where tissue touches it, that is pectoral muscle (designed 30-55 %); 0 for CC.

Case table (targets; realised pd_true is in the info dict)
----------------------------------------------------------
index: even = CC, odd = MLO; laterality L for index//2 even, else R.
See ``_TABLE``.  Calcifications in cases 20 and 25 (fatty breasts); very
fatty cases 0 and 14; extremely dense case 5.
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage as ndi
from scipy.special import expit

__all__ = ["case", "cases", "truth_masks", "display_image", "N_CASES", "ROWS", "COLS", "PIXEL_MM"]

ROWS, COLS = 1800, 1400
PIXEL_MM = 0.15
N_CASES = 32
SEED = 7_310_2024

MU_FAT = 0.046  # /mm, ~0.46 /cm at 20 keV
MU_GLAND = 0.080  # /mm
MU_SKIN = 0.080  # /mm
MU_MUSCLE = 0.085  # /mm
MU_CALC = 2.6  # /mm (~26 /cm hydroxyapatite)
SKIN_MM = 2.0

SOP_CLASS_MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"

# (pd_target, T_mm, photometric, voi, bits, padding_edges, collimation, calcifications)
# voi: "window" = stored range compressed, window needed; "window_identity" =
# full-range stored values with an identity window; "lut" = VOI LUT Sequence.
# collimation: None, "white" (processed saturation) or "constant".
_TABLE: list[tuple] = [
    (0.03, 52, "MONOCHROME2", "window_identity", 12, (), None, False),  # 0
    (0.45, 38, "MONOCHROME2", "window", 14, (), "white", False),  # 1
    (0.12, 66, "MONOCHROME2", "lut", 12, (), None, False),  # 2
    (0.70, 44, "MONOCHROME1", "window", 14, (), None, False),  # 3
    (0.22, 30, "MONOCHROME2", "window", 12, ("nipple",), None, False),  # 4
    (0.85, 58, "MONOCHROME2", "lut", 14, (), None, False),  # 5
    (0.05, 71, "MONOCHROME2", "window", 12, (), "constant", False),  # 6
    (0.35, 35, "MONOCHROME1", "lut", 12, (), None, False),  # 7
    (0.60, 48, "MONOCHROME2", "window", 14, (), None, False),  # 8
    (0.08, 62, "MONOCHROME2", "window_identity", 12, ("nipple", "bottom"), None, False),  # 9
    (0.28, 41, "MONOCHROME1", "window", 12, (), "white", False),  # 10
    (0.78, 55, "MONOCHROME2", "lut", 14, (), None, False),  # 11
    (0.16, 75, "MONOCHROME2", "window", 12, ("bottom",), None, False),  # 12
    (0.50, 33, "MONOCHROME2", "window_identity", 14, (), None, False),  # 13
    (0.02, 46, "MONOCHROME1", "window", 12, (), None, False),  # 14
    (0.40, 68, "MONOCHROME2", "window", 12, (), "constant", False),  # 15
    (0.65, 39, "MONOCHROME2", "lut", 14, (), None, False),  # 16
    (0.10, 60, "MONOCHROME2", "window", 12, ("nipple",), None, False),  # 17
    (0.32, 50, "MONOCHROME2", "window", 14, (), "white", False),  # 18
    (0.55, 72, "MONOCHROME1", "lut", 12, (), None, False),  # 19
    (0.04, 43, "MONOCHROME2", "window_identity", 12, (), None, True),  # 20
    (0.74, 31, "MONOCHROME2", "window", 14, ("nipple", "bottom"), None, False),  # 21
    (0.19, 64, "MONOCHROME1", "window", 12, (), None, False),  # 22
    (0.82, 56, "MONOCHROME2", "lut", 12, (), None, False),  # 23
    (0.25, 36, "MONOCHROME2", "window", 14, (), "constant", False),  # 24
    (0.06, 49, "MONOCHROME2", "window_identity", 12, (), None, True),  # 25
    (0.42, 70, "MONOCHROME1", "window", 14, ("nipple",), None, False),  # 26
    (0.14, 42, "MONOCHROME2", "lut", 12, (), "white", False),  # 27
    (0.68, 54, "MONOCHROME2", "window_identity", 12, (), None, False),  # 28
    (0.37, 61, "MONOCHROME2", "lut", 14, ("bottom",), None, False),  # 29
    (0.58, 34, "MONOCHROME1", "window", 12, (), "white", False),  # 30
    (0.30, 65, "MONOCHROME2", "lut", 12, ("nipple", "bottom"), None, False),  # 31
]
assert len(_TABLE) == N_CASES

_LOW = 4  # low-resolution factor for smooth fields / processing (0.6 mm grid)


# ----------------------------------------------------------------------------- helpers
def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    r, c = a.shape
    return a.reshape(r // f, f, c // f, f).mean(axis=(1, 3))


def _up(a: np.ndarray, f: int, order: int = 1) -> np.ndarray:
    """Upsample a low-resolution grid by f with pixel-centre alignment."""
    return ndi.zoom(a, f, order=order, grid_mode=True, mode="nearest").astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape, sigma_px: float) -> np.ndarray:
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px, mode="reflect")
    return (n - n.mean()) / (n.std() + 1e-12)


def _padded_edt(mask: np.ndarray, chest_left: bool, top_open: bool, pad: int, px: float) -> np.ndarray:
    """Distance (mm) to the skin line; the chest-wall edge (and the top edge of
    an MLO) continue the tissue instead of being skin."""
    pl = pad if chest_left else 0
    pt = pad if top_open else 0
    m = np.pad(mask, ((pt, 0), (pl, 0)), mode="edge")
    d = ndi.distance_transform_edt(m)
    return (d[pt:, pl:] * px).astype(np.float32)


def _params(index: int) -> dict:
    if not 0 <= index < N_CASES:
        raise IndexError(f"case index {index} outside 0..{N_CASES - 1}")
    pd_t, T, photometric, voi, bits, pad_edges, coll, calcs = _TABLE[index]
    rng = np.random.default_rng([SEED, index, 0])
    view = "CC" if index % 2 == 0 else "MLO"
    lat = "L" if (index // 2) % 2 == 0 else "R"
    p = dict(
        index=index, pd_target=pd_t, T=float(T), photometric=photometric, voi=voi, bits=bits,
        pad_edges=tuple(pad_edges), collimation=coll, calcs=calcs, view=view, lat=lat,
        W=float(rng.uniform(14.0, 32.0)), p=float(rng.uniform(0.35, 0.70)),
    )
    p["pad_mm"] = {e: float(rng.uniform(3.0, 9.0)) for e in pad_edges}
    if coll is None:
        p["coll_top_mm"] = p["coll_bottom_mm"] = 0.0
    elif view == "CC":
        p["coll_top_mm"], p["coll_bottom_mm"] = float(rng.uniform(6, 15)), float(rng.uniform(6, 15))
    else:
        p["coll_top_mm"], p["coll_bottom_mm"] = 0.0, float(rng.uniform(6, 15))
    p["subcut_mm"] = float(rng.uniform(3.0, 4.5) if pd_t > 0.6 else rng.uniform(3.0, 10.0))
    p["retro_mm"] = float(rng.uniform(1.5, 2.5) if pd_t > 0.6 else rng.uniform(2.0, 7.0))
    return p


# ----------------------------------------------------------------------------- anatomy
@functools.lru_cache(maxsize=4)
def _anatomy(index: int) -> dict:
    """Canonical frame: chest wall at column 0, nipple pointing right."""
    P = _params(index)
    rng = np.random.default_rng([SEED, index, 1])
    H_mm, W_mm = ROWS * PIXEL_MM, COLS * PIXEL_MM
    y = ((np.arange(ROWS) + 0.5) * PIXEL_MM).astype(np.float32)
    x = ((np.arange(COLS) + 0.5) * PIXEL_MM).astype(np.float32)
    T, W, pw = P["T"], P["W"], P["p"]

    exposed_rows = (y >= P["coll_top_mm"]) & (y <= H_mm - P["coll_bottom_mm"])
    valid = np.ones((ROWS, COLS), bool)
    pad_n = P["pad_mm"].get("nipple", 0.0)
    pad_b = P["pad_mm"].get("bottom", 0.0)
    if pad_n:
        valid[:, x > W_mm - pad_n] = False
    if pad_b:
        valid[y > H_mm - pad_b, :] = False
    exposed = np.broadcast_to(exposed_rows[:, None], (ROWS, COLS)) & valid

    q = rng.uniform(1.8, 2.6)
    b_max = min(150.0, W_mm - pad_n - 14.0)
    b = rng.uniform(60.0, b_max) if P["view"] == "CC" else rng.uniform(80.0, b_max)
    if P["view"] == "CC":
        cy = H_mm * rng.uniform(0.46, 0.54)
        m_top = P["coll_top_mm"] + 7.0
        m_bot = max(P["coll_bottom_mm"], pad_b) + 7.0
        a_max = min(cy - m_top, H_mm - m_bot - cy, 115.0)
        a = rng.uniform(60.0, a_max)
        a_up, a_dn = a * rng.uniform(0.9, 1.0), a * rng.uniform(0.9, 1.0)
        y_nip = cy + rng.uniform(-0.1, 0.1) * a
    else:
        cy = H_mm * rng.uniform(0.36, 0.46)
        fold = min(H_mm * rng.uniform(0.78, 0.90), H_mm - max(P["coll_bottom_mm"], pad_b) - 7.0)
        a_dn = fold - cy
        a_up = cy * rng.uniform(1.15, 1.45)
        y_nip = cy + rng.uniform(0.0, 0.15) * a_dn
    u = np.where(y < cy, (cy - y) / a_up, (y - cy) / a_dn)
    xs = b * np.clip(1.0 - np.abs(u) ** q, 0.0, None) ** (1.0 / q)
    wob = np.interp(y, np.linspace(0, H_mm, 12), rng.standard_normal(12))
    wob = ndi.gaussian_filter1d(wob, 60.0)
    wob = wob / (np.abs(wob).max() + 1e-9)
    xs = xs * (1.0 + 0.03 * wob)
    xs = xs + (xs > 0) * rng.uniform(2.0, 4.0) * np.exp(-(((y - y_nip) / rng.uniform(4.0, 7.0)) ** 2))
    X = x[None, :]
    outline = X < xs[:, None]

    # pectoral muscle (MLO)
    m = np.zeros((ROWS, COLS), np.float32)
    xb = np.zeros(ROWS, np.float32)
    if P["view"] == "MLO":
        a_top = rng.uniform(0.35, 0.60) * xs[0]
        y_p = rng.uniform(0.30, 0.55) * (cy + a_dn)
        bow = rng.uniform(0.08, 0.20) * a_top * rng.choice([-1.0, 1.0])
        s = np.clip(y / y_p, 0.0, 1.0)
        xb = np.where(y < y_p, (1.0 - s) * (a_top + 4.0 * bow * s), 0.0).astype(np.float32)
        m = np.clip((xb[:, None] - X) / 0.4 + 0.5, 0.0, 1.0).astype(np.float32) * (y < y_p)[:, None]
        m *= outline
        P.update(pect_top_mm=float(a_top), pect_len_mm=float(y_p), pect_bow_mm=float(bow))
    pect = m >= 0.5

    # distance from skin line and thickness
    d = _padded_edt(outline, True, P["view"] == "MLO", int(math.ceil(40.0 / PIXEL_MM)), PIXEL_MM)
    t = (T * np.minimum(1.0, d / W) ** pw * outline).astype(np.float32)
    t_in = np.maximum(0.0, T * np.minimum(1.0, np.maximum(d - SKIN_MM, 0.0) / W) ** pw - 2 * SKIN_MM)
    t_in = (t_in * outline).astype(np.float32)
    skin = t - t_in

    # glandular field on the 0.6 mm grid
    lr, lc = ROWS // _LOW, COLS // _LOW
    lp = PIXEL_MM * _LOW
    s0, s1, s2 = rng.uniform(1.5, 2.5), rng.uniform(3.0, 5.0), rng.uniform(8.0, 14.0)
    w0, w1 = rng.uniform(0.2, 0.35), rng.uniform(0.45, 0.7)
    w2 = math.sqrt(max(1.0 - w0 * w0 - w1 * w1, 0.05))
    F = (w0 * _smooth_noise(rng, (lr, lc), s0 / lp) + w1 * _smooth_noise(rng, (lr, lc), s1 / lp)
         + w2 * _smooth_noise(rng, (lr, lc), s2 / lp))
    yl = (np.arange(lr) + 0.5) * lp
    xl = (np.arange(lc) + 0.5) * lp
    yc = y_nip - (0.1 * a_dn if P["view"] == "MLO" else 0.0)
    prior = np.exp(-(((yl[:, None] - yc) / (0.6 * a_dn)) ** 2) - (((xl[None, :] - 0.45 * b) / (0.55 * b)) ** 2))
    F = F + rng.uniform(0.6, 1.2) * prior
    gy, gx = np.gradient(F)
    grad = _up(np.hypot(gy, gx), _LOW) / _LOW + 1e-4  # per full-res pixel
    F = _up(F, _LOW)
    tex_hi = _up(_smooth_noise(rng, (lr, lc), 1.5), _LOW)
    strands = _up(_smooth_noise(rng, (lr, lc), rng.uniform(4.0, 7.0)), _LOW)
    sub_jit = _up(_smooth_noise(rng, (lr, lc), 12.0), _LOW)

    tissue = outline & exposed
    breast = tissue & ~pect
    n_breast = int(breast.sum())
    retro = (xb + P["retro_mm"])[:, None]
    subcut = P["subcut_mm"]
    for _ in range(8):
        ok = breast & (m == 0) & (d >= subcut + 1.0 * sub_jit) & (X >= retro)
        q_frac = P["pd_target"] * n_breast / max(int(ok.sum()), 1)
        if q_frac <= 0.97 or subcut <= 3.0:
            break
        subcut = max(3.0, subcut - 1.0)
    P["subcut_mm"] = float(subcut)
    vals = F[ok]
    thr = float(np.quantile(vals[:: max(1, vals.size // 400_000)], 1.0 - min(q_frac, 0.999)))
    delta = rng.uniform(0.7, 1.1)
    sgm = expit((F - thr) / (grad * delta)).astype(np.float32)
    glo = 0.12 * np.exp(-((strands / 0.10) ** 2))  # thin curvilinear strands (zero crossings)
    ghi = 0.90 + 0.08 * np.tanh(tex_hi)
    g = (glo + (ghi - glo) * sgm * ok).astype(np.float32)
    g *= outline & ~pect
    g = np.where(pect, 0.0, g).astype(np.float32)

    # microcalcifications
    calc_trans = np.ones((ROWS, COLS), np.float32)
    n_calc = 0
    if P["calcs"]:
        cand = np.flatnonzero((breast & (d > 15.0) & (X > retro + 10.0)).ravel())
        c0 = cand[rng.integers(cand.size)]
        cy0, cx0 = divmod(int(c0), COLS)
        n_calc = int(rng.integers(8, 16))
        spread = rng.uniform(2.0, 4.0) / PIXEL_MM
        sub = (np.arange(3) - 1) / 3.0
        for _ in range(n_calc):
            r_mm = rng.uniform(0.125, 0.35)
            py = cy0 + rng.normal(0, spread)
            px_ = cx0 + rng.normal(0, spread)
            iy, ix = int(round(py)), int(round(px_))
            h = 4
            yy = np.arange(iy - h, iy + h + 1)
            xx = np.arange(ix - h, ix + h + 1)
            acc = np.zeros((yy.size, xx.size), np.float64)
            for oy in sub:
                for ox in sub:
                    rho2 = ((yy[:, None] + oy - py) ** 2 + (xx[None, :] + ox - px_) ** 2) * PIXEL_MM**2
                    chord = 2.0 * np.sqrt(np.clip(r_mm**2 - rho2, 0.0, None))
                    acc += np.exp(-MU_CALC * chord)
            calc_trans[iy - h: iy + h + 1, ix - h: ix + h + 1] *= (acc / 9.0).astype(np.float32)
        calc_trans = np.where(tissue, calc_trans, 1.0).astype(np.float32)

    dense = breast & (g >= 0.5)
    pd_true = float(dense.sum() / n_breast)
    amb = float((breast & (g > 0.3) & (g < 0.7)).sum() / n_breast)
    col0 = tissue[:, 0]
    pect_frac = float((pect[:, 0] & col0).sum() / max(int(col0.sum()), 1)) if P["view"] == "MLO" else 0.0
    return dict(
        P=P, outline=outline, exposed=exposed, valid=valid, tissue=tissue, breast=breast, pect=pect,
        m=m, d=d, t=t, t_in=t_in, skin=skin, g=g, dense=dense, calc_trans=calc_trans,
        calc_mask=calc_trans < 0.97, n_calc=n_calc, pd_true=pd_true, amb=amb, pect_frac=pect_frac,
        breast_depth_mm=float(b),
    )


# ----------------------------------------------------------------------------- imaging + processing
def _render(A: dict) -> tuple[np.ndarray, dict]:
    P = A["P"]
    idx, T = P["index"], P["T"]
    rng = np.random.default_rng([SEED, idx, 2])
    spr = float(np.clip(0.30 + 0.30 * (T - 30.0) / 45.0 + rng.uniform(-0.03, 0.03), 0.30, 0.60))
    sig_s = float(rng.uniform(15.0, 30.0))
    n_fat = float(rng.uniform(2500.0, 5000.0))
    f_eq = float(rng.uniform(0.3, 0.8))
    d_ref = float(rng.uniform(30.0, 40.0))
    k_tone, x0_tone = float(rng.uniform(3.0, 5.0)), float(rng.uniform(0.35, 0.55))
    beta_toe = float(rng.uniform(0.15, 0.25))
    usm_sigma, usm_gain = float(rng.uniform(2.0, 5.0)), float(rng.uniform(0.3, 1.0))
    exposed, outline = A["exposed"], A["outline"]
    chest_top_open = P["view"] == "MLO"

    # --- acquisition
    g, m, t_in = A["g"], A["m"], A["t_in"]
    mu_t = (1.0 - m) * (MU_FAT + (MU_GLAND - MU_FAT) * g) + m * MU_MUSCLE
    attn = MU_SKIN * A["skin"] + t_in * mu_t
    i0 = n_fat * math.exp(MU_FAT * (T - 2 * SKIN_MM) + MU_SKIN * 2 * SKIN_MM) / (1.0 + spr)
    prim = (i0 * np.exp(-attn) * A["calc_trans"]).astype(np.float32)
    prim = ndi.gaussian_filter(prim, 0.6) * exposed
    f8 = 8
    src = _block_mean(prim * outline, f8)
    scat = spr * _up(ndi.gaussian_filter(src, sig_s / (PIXEL_MM * f8), mode="constant"), f8)
    q = (prim + scat) * exposed
    det = q + np.sqrt(q) * rng.standard_normal(q.shape, dtype=np.float32) + 2.0 * rng.standard_normal(q.shape, dtype=np.float32)
    det = np.maximum(det, 0.5)
    L = np.log(np.float32(i0) / det).astype(np.float32)

    # --- periphery equalisation (vendor segmentation on the 0.6 mm grid)
    Lb = _block_mean(L, _LOW)
    exp_lo = _block_mean(exposed.astype(np.float32), _LOW) > 0.999
    seg = (Lb > 0.06) & exp_lo
    lab, nlab = ndi.label(seg)
    if nlab > 1:
        sizes = ndi.sum(seg, lab, index=np.arange(1, nlab + 1))
        seg = lab == (1 + int(np.argmax(sizes)))
    seg = ndi.binary_fill_holes(seg)
    lp = PIXEL_MM * _LOW
    d_est = _padded_edt(seg, True, chest_top_open, int(math.ceil(45.0 / lp)), lp)
    segf = seg.astype(np.float32)
    Lblur = ndi.gaussian_filter(Lb * segf, 2.0 / lp) / np.maximum(ndi.gaussian_filter(segf, 2.0 / lp), 1e-3)
    edges = np.arange(0.0, d_ref + lp, lp)
    dv, lv = d_est[seg], Lblur[seg]
    ring = (dv >= d_ref) & (dv < d_ref + 10.0)
    plateau = float(np.percentile(lv[ring], 20)) if ring.sum() > 50 else float(np.percentile(lv, 60))
    bins = np.digitize(dv, edges) - 1
    prof = np.full(edges.size - 1, np.nan)
    inb = bins < edges.size - 1
    order = np.argsort(bins[inb], kind="stable")
    bsorted, lsorted = bins[inb][order], lv[inb][order]
    starts = np.searchsorted(bsorted, np.arange(edges.size))
    for k in range(edges.size - 1):
        seg_vals = lsorted[starts[k]: starts[k + 1]]
        if seg_vals.size >= 5:
            prof[k] = np.percentile(seg_vals, 20)
    prof = np.where(np.isnan(prof), plateau, prof)
    prof = np.minimum(np.maximum.accumulate(prof), plateau)
    centres = 0.5 * (edges[:-1] + edges[1:])
    deficit_lo = np.interp(d_est, centres, plateau - prof, right=0.0) * segf
    deficit_lo = ndi.gaussian_filter(deficit_lo, 1.0)
    weight = np.clip(L / 0.15, 0.0, 1.0) * (_up(segf, _LOW) > 0.5)
    L_eq = L + f_eq * _up(deficit_lo, _LOW) * weight
    Lb_eq = Lb + f_eq * deficit_lo

    # --- tone curve
    stat = seg & (d_est > d_ref)
    if stat.sum() < 2000:
        stat = seg & (d_est > 8.0)
    l_fat = float(np.percentile(Lb_eq[stat], 3))
    l_hi = float(np.percentile(Lb_eq[stat], 99.7))
    rng_l = max(l_hi - l_fat, 0.5 * (MU_GLAND - MU_FAT) * T)
    x_air = -l_fat / rng_l
    y_air = expit(k_tone * (x_air - x0_tone))

    def tone(xv):  # sigmoid blended with a linear toe so thin fat stays above air
        sig = (expit(k_tone * (xv - x0_tone)) - y_air) / (1.0 - y_air)
        lin = (xv - x_air) / (1.0 - x_air)
        return np.clip((1.0 - beta_toe) * sig + beta_toe * lin, 0.0, 1.0)

    def usm(img):
        blur = _up(ndi.gaussian_filter(_block_mean(img, _LOW), usm_sigma / lp, mode="nearest"), _LOW)
        return img + usm_gain * (img - blur)

    x = (L_eq - l_fat) / rng_l
    bits = P["bits"]
    vmax = (1 << bits) - 1
    out: dict = dict(spr=spr, scatter_sigma_mm=sig_s, quanta_fat=n_fat, i0=i0, equalisation_fraction=f_eq,
                     equalisation_dref_mm=d_ref, tone_slope=k_tone, tone_centre=x0_tone, tone_linear_blend=beta_toe,
                     usm_sigma_mm=usm_sigma, usm_gain=usm_gain)
    coll_const = P["collimation"] == "constant"
    unexposed = ~exposed & A["valid"]
    if P["voi"] == "lut":
        x_lo, x_hi = x_air - 0.1, 1.8
        r = np.clip((x - x_lo) / (x_hi - x_lo), 0.0, 1.0)
        r = np.clip(usm(r), 0.0, 1.0)
        if coll_const:
            r[unexposed] = 1.0
        v = 1 + np.rint(r * (vmax - 1)).astype(np.int32)
        grid = x_lo + (np.arange(vmax + 1) - 1) / (vmax - 1) * (x_hi - x_lo)
        lut_bright = tone(grid)  # brightness for value v
        out["lut_bright"] = lut_bright
    else:
        yv = np.clip(usm(tone(x)), 0.0, 1.0)
        if coll_const:
            yv[unexposed] = 0.92
        if P["voi"] == "window":
            lo = int(round(rng.uniform(0.05, 0.20) * vmax))
            hi = int(round(rng.uniform(0.75, 0.95) * vmax))
        else:
            lo, hi = 1, vmax
        v = lo + np.rint(yv * (hi - lo)).astype(np.int32)
        out["window_lo_hi"] = (lo, hi)
    stored = (vmax - v) if P["photometric"] == "MONOCHROME1" else v
    pad_value = vmax if P["photometric"] == "MONOCHROME1" else 0
    stored = np.where(A["valid"], stored, pad_value)
    out["pad_value"] = pad_value
    return stored.astype(np.uint16), out


# ----------------------------------------------------------------------------- DICOM
def _uid(index: int | str, what: str) -> str:
    """Deterministic 2.25 (UUID-derived integer) UID from the seed, the case and the purpose."""
    h = hashlib.sha256(f"medsendx phantom_independent|{SEED}|{index}|{what}".encode()).digest()
    return "2.25." + str(int.from_bytes(h[:16], "big"))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _dataset(index: int, stored: np.ndarray, P: dict, R: dict) -> FileDataset:
    sop_uid = _uid(index, "sop")
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = SOP_CLASS_MG_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid("impl", "implementation")
    meta.ImplementationVersionName = "PHANTOM_INDEP1"
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\x00" * 128)

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = SOP_CLASS_MG_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = f"{9 + index // 8:02d}{index % 60:02d}00"
    ds.AccessionNumber = f"PIND{index:04d}"
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "PhantomIndependent"
    ds.ManufacturerModelName = "PowerLawEdge"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Independent physics phantom"
    ds.SeriesDescription = f"{P['lat']} {P['view']}"
    ds.PatientName = f"PHANTOM^INDEP^{index:03d}"
    ds.PatientID = f"PIND-{index:03d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.BodyPartExamined = "BREAST"
    ds.BodyPartThickness = f"{P['T']:.1f}"
    ds.CompressionForce = "100"
    ds.KVP = "28"
    ds.DetectorType = "DIRECT"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.ViewPosition = P["view"]
    ds.ImageLaterality = P["lat"]
    ds.PatientOrientation = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"],
                             ("L", "MLO"): ["A", "FR"], ("R", "MLO"): ["P", "FL"]}[(P["lat"], P["view"])]
    ds.AnatomicRegionSequence = Sequence([_code("76752008", "SCT", "Breast")])
    view_code = _code(*{"CC": ("399162004", "SCT", "cranio-caudal"),
                        "MLO": ("399368009", "SCT", "medio-lateral oblique")}[P["view"]])
    view_code.ViewModifierCodeSequence = Sequence([])
    ds.ViewCodeSequence = Sequence([view_code])
    ds.StudyInstanceUID = _uid(index, "study")
    ds.SeriesInstanceUID = _uid(index, "series")
    ds.FrameOfReferenceUID = _uid(index, "for")
    ds.StudyID = f"{index:04d}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImagerPixelSpacing = [PIXEL_MM, PIXEL_MM]
    ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
    ds.EstimatedRadiographicMagnificationFactor = "1.0"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = P["photometric"]
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = P["bits"]
    ds.HighBit = P["bits"] - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if P["photometric"] == "MONOCHROME1" else -1
    ds.PresentationLUTShape = "INVERSE" if P["photometric"] == "MONOCHROME1" else "IDENTITY"
    vmax = (1 << P["bits"]) - 1
    if P["voi"] == "lut":
        bright = R["lut_bright"]
        if P["photometric"] == "MONOCHROME1":  # stored s -> value v = vmax - s; display inverts
            lut = np.rint((1.0 - bright[::-1]) * 65535)
        else:
            lut = np.rint(bright * 65535)
        item = Dataset()
        item.LUTDescriptor = [vmax + 1, 0, 16]
        item.LUTExplanation = "SIGMOID TONE"
        item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())
        ds.VOILUTSequence = Sequence([item])
    else:
        lo, hi = R["window_lo_hi"]
        if P["photometric"] == "MONOCHROME1":
            lo, hi = vmax - hi, vmax - lo
        ds.WindowCenter = f"{(lo + hi) / 2 + 0.5:.1f}"
        ds.WindowWidth = f"{hi - lo + 1:.1f}"
        ds.VOILUTFunction = "LINEAR"
        ds.WindowCenterWidthExplanation = "DEFAULT"
    if P["pad_edges"]:
        ds.PixelPaddingValue = int(R["pad_value"])
    ds.PixelData = stored.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _flip(a: np.ndarray, lat: str) -> np.ndarray:
    return a[:, ::-1].copy() if lat == "R" else a.copy()


# ----------------------------------------------------------------------------- public API
def case(index: int) -> tuple[FileDataset, dict]:
    """Deterministic case ``index`` (0..31): (DICOM dataset, truth/info dict)."""
    A = _anatomy(index)
    P = A["P"]
    stored, R = _render(A)
    stored = _flip(stored, P["lat"])
    ds = _dataset(index, stored, P, R)
    variant = [P["photometric"], P["voi"], f"{P['bits']}bit"]
    if P["pad_edges"]:
        variant.append("padding:" + "+".join(P["pad_edges"]))
    if P["collimation"]:
        variant.append("collimation:" + P["collimation"])
    if P["calcs"]:
        variant.append("calcifications")
    info = dict(
        index=index, pd_true=A["pd_true"], pd_target=P["pd_target"], ambiguous_frac=A["amb"],
        thickness_mm=P["T"], edge_width_mm=P["W"], edge_power=P["p"], view=P["view"], laterality=P["lat"],
        photometric=P["photometric"], monochrome1=P["photometric"] == "MONOCHROME1", voi=P["voi"],
        voi_lut_sequence=P["voi"] == "lut", bits_stored=P["bits"], padding=bool(P["pad_edges"]),
        padding_edges=tuple("chest-wall-opposite" if e == "nipple" else e for e in P["pad_edges"]),
        pixel_padding_value=int(R["pad_value"]) if P["pad_edges"] else None,
        collimation=P["collimation"], has_calcifications=bool(P["calcs"]), n_calcifications=A["n_calc"],
        pectoral_frac_true=A["pect_frac"], subcutaneous_fat_mm=P["subcut_mm"], retromammary_fat_mm=P["retro_mm"],
        breast_area_cm2=float(A["breast"].sum() * PIXEL_MM**2 / 100.0), breast_depth_mm=A["breast_depth_mm"],
        variant=" ".join(variant), patient_orientation=list(ds.PatientOrientation),
        **{k: v for k, v in R.items() if k != "lut_bright"},
    )
    return ds, info


def cases() -> list[tuple[FileDataset, dict]]:
    return [case(i) for i in range(N_CASES)]


def truth_masks(index: int) -> dict[str, np.ndarray]:
    """Boolean truth masks at stored resolution and orientation."""
    A = _anatomy(index)
    lat = A["P"]["lat"]
    return dict(
        breast=_flip(A["breast"], lat), pectoral=_flip(A["pect"] & A["tissue"], lat), dense=_flip(A["dense"], lat),
        tissue=_flip(A["tissue"], lat), calcifications=_flip(A["calc_mask"] & A["tissue"], lat),
    )


def display_image(ds: Dataset) -> np.ndarray:
    """Reference grayscale display: brightness in [0, 1] (1 = white)."""
    a = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        n, first, nbits = (int(v) for v in item.LUTDescriptor)
        n = n or 65536
        raw = item.LUTData
        lut = np.frombuffer(raw, "<u2") if isinstance(raw, bytes) else np.asarray(raw)
        lut = lut[:n].astype(np.float64)
        y = lut[np.clip(a.astype(np.int64) - first, 0, n - 1)] / ((1 << nbits) - 1)
    elif "WindowCenter" in ds:
        c = float(ds.WindowCenter if not isinstance(ds.WindowCenter, pydicom.multival.MultiValue) else ds.WindowCenter[0])
        w = float(ds.WindowWidth if not isinstance(ds.WindowWidth, pydicom.multival.MultiValue) else ds.WindowWidth[0])
        y = np.clip((a - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    else:
        y = (a - a.min()) / max(a.max() - a.min(), 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        y = 1.0 - y
    return y
