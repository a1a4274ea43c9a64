"""Independent, physics-based digital mammography phantoms with known POSITIONING geometry.

Purpose
-------
Known-truth validation of automated positioning checks: posterior nipple line (PNL) on CC and MLO,
pectoral muscle extent on the MLO, nipple in profile, inframammary fold (IMF) on the MLO, motion
blur.  Written without reading the method under test (``medsendx_edge/triage``).  Conventions
(header, storage orientation, physics and vendor-processing style) follow ``phantom_independent.py``;
the code is self-contained (numpy, scipy -- installed in the project venv, not a declared
dependency: a test may ``pytest.importorskip("scipy")`` -- and pydicom).

API
---
``N_CASES`` (84); ``case(index) -> (pydicom FileDataset, info dict)``, deterministic (byte-identical
pixels and header for a given index, whatever the call order); ``cases()`` = all of them;
``display_image(ds)`` = reference DICOM grayscale display (rescale, VOI LUT Sequence or window,
MONOCHROME1 inversion) in [0, 1], 1 = white, for thumbnails.  ``DEFECTS`` lists the defect names.

Case list
---------
* 0..63: 32 breasts ``B00``..``B31`` (``_BREASTS``), each a CC (index 2k) and an MLO (2k + 1) on the
  same detector.  20 breasts are well positioned in both views (k = 0 1 3 4 6 8 9 11 12 14 16 17 19
  20 22 23 25 27 29 30).  Defects (one per image except case 27):
    pectoral_short          MLO  5 11 27 63
    imf_missing             MLO  15 21 27
    nipple_not_in_profile   CC 20 42 56, MLO 31 37
    cc_too_shallow          CC   10 48 52
* 64..79: copies of well-positioned images (``_MOTION``: source index, blur length, angle) with
  linear motion blur of 0.15 mm (64 71 74 77: recorded, NOT a defect), 0.4 mm (65 68 75 78),
  0.6 mm (66 69 72 79), 1.0 mm (67 70 73 76), two CC and two MLO per length, angles 0-170 deg.
* 80..83: sharp copies (``_ANISO``) from a detector with mildly anisotropic resolution (MTF ratio
  0.82-0.88 between the two axes at 0.25 cycles/pixel); defect-free, must not be called blurred.
A copy keeps its source's anatomy, vendor processing and noise realisation (so source and copy
differ only by the motion / detector blur) but is its own exam: ``breast`` is ``"Bkk-copyN"``
(``source_breast`` = ``"Bkk"``, ``source_index`` = N's source), with its own PatientID and Study, so
pairing CC with MLO by ``breast`` (or by Study) only ever pairs the originals.

Pixel spacing 0.07, 0.085 or 0.1 mm (ImagerPixelSpacing = PixelSpacing, magnification 1.0), field
sized to the breast (rows 1792-2400, columns 984-1696; at most 2400 x 1900), compressed thickness
31-75 mm, target glandular area fraction 0.05-0.80, CC chest-wall semi-axis 55-112 mm, MLO depth
48-138 mm, nine vendor styles (MONOCHROME1/2, window / identity window / VOI LUT Sequence, 12/14
bits).  Rendering takes ~0.4-1.0 s per case (about a minute for all 84).

Orientation (as phantom_independent.py; DICOM PS3.3 C.8.11.7)
--------------------------------------------------------------
Stored with the chest wall on the LEFT image edge for ImageLaterality L (nipple pointing right) and
on the RIGHT edge for R.  PatientOrientation: L CC "A\\R", R CC "P\\L", L MLO "A\\FR", R MLO "P\\FL";
the top of an MLO is superior (axilla, where the pectoral muscle leaves the image), its bottom the
upper abdomen.  Everything is built in a canonical frame (chest wall at x = 0 on the left, y down,
mm) and flipped left-right for R.

Truth (``info``); coordinates are STORED (row, col) floats, pixel-centre convention: pixel (r, c)
covers [r - 0.5, r + 0.5] x [c - 0.5, c + 0.5], so the image edges are at -0.5 and N - 0.5.
------------------------------------------------------------------------------------------------
* ``nipple_rc``: in profile, the nipple's tip ON the skin line (the outline row through the
  nipple's axis; the outline is where the tissue covers half a pixel); not in profile, the centre
  of the projected nipple disk.
* ``nipple_in_profile``; ``nipple_offset`` ("over"/"under" on MLO, "lateral"/"medial" on CC, None
  in profile); ``nipple_skin_distance_mm``: shortest distance from the projected nipple centre to
  the skin line (6.7-15.7 mm; 0 in profile).
* ``pectoral_line`` (MLO; None on CC): ((r0, c0), (r1, c1)) = the CHORD of the muscle's visible
  anterior edge, from where it leaves the top image edge (r0 = -0.5) to its lowest visible point
  where it meets the chest-wall image edge (c1 = -0.5 for L, cols - 0.5 for R).  The edge itself is
  straight or gently curved: x_b(s) = a_top (1 - s) + 4 bow s (1 - s) along s = y / y_p;
  ``pectoral_sagitta_mm`` is its largest perpendicular deviation from the chord (-2.5 % to +4.5 %
  of the chord length: -2.8 to +6.9 mm; + = convex towards the nipple, the relaxed muscle).
  ``pectoral_angle_deg``: chord angle from the vertical; ``pectoral_top_width_mm``.
* ``pectoral_lowest_rc`` = the chord's lower end (on the chest-wall edge).
* ``pnl_mm``: MLO: perpendicular distance from ``nipple_rc`` to the pectoral chord's LINE (extended
  below the image's chest-wall edge when the muscle stops short); CC: horizontal distance from
  ``nipple_rc`` to the chest-wall image edge (no pectoral muscle is shown on the CCs).
  ``pnl_foot_rc`` (MLO): the foot of that perpendicular (may lie outside the image when the
  muscle is short).  ``partner_pnl_mm``: the other view's PNL; ``cc_minus_mlo_pnl_mm``: CC PNL -
  MLO PNL of the breast (-8.0 to -0.5 mm when the CC is fine, -28.0 to -18.3 mm when too shallow).
* ``pectoral_reaches_pnl`` (MLO): the foot lies on the visible chord;
  ``pectoral_reach_mm``: signed distance along the chord from the foot down to the lowest point
  (well positioned: +35 to +88 mm and the lowest point 5-30 mm below the nipple's row; short: -12
  to -22 mm, i.e. the muscle ends 12-22 mm above the PNL).
* ``imf_visible`` (MLO): the lower breast skin folds against the abdomen inside the image, with
  abdominal tissue entering from the bottom edge next to the chest wall; ``imf_rc``: the fold's
  apex (where the two skin lines meet).  Missing: the lower contour curves back to the chest-wall
  edge 8-20 mm above the bottom edge, air below, no abdomen.
* ``blur_mm``, ``blur_angle_deg``: motion length and direction in the stored image, degrees from
  +column towards row 0 (counter-clockwise as displayed), modulo 180.  ``anisotropic_detector``
  ("vertical" = softer along the column direction, i.e. across rows; "horizontal"; None),
  ``detector_mtf_ratio_mid`` (soft/sharp MTF at 0.25 cycles/pixel; 1.0 when isotropic),
  ``detector_sigma_px`` (vertical, horizontal total Gaussian presampling sigmas).
* ``defects`` (subset of DEFECTS; "motion_blur" only for blur_mm >= 0.4), ``well_positioned`` =
  no defect at all, ``positioning_defects`` = defects without motion_blur.
* ``pd_approx``: fraction of the breast (muscle and abdomen excluded) inside the dense tissue
  (fat lobules excluded), for information; also thickness, vendor parameters, etc.

Geometry (canonical frame, per breast in ``_breast``)
-----------------------------------------------------
* Outlines are row functions x_skin(y): a super-ellipse "D" b (1 - |u|^q)^(1/q), q 1.8-2.6, with
  different upper/lower semi-axes and a 2 % smooth wobble; a pixel's tissue coverage is computed
  analytically (4 sub-rows where the outline is steep), so the skin line is anti-aliased.
* Nipple in profile: a knob wn = 8-12 mm wide, hn = 3-6 mm high, super-elliptic (exponent 2-3),
  base corners filleted (0.6 mm), on the outline near its most anterior point; made of nipple tissue,
  with the areolar skin thickened to ~3 mm around it.  Not in profile: the outline stays the smooth D
  there; the nipple is a disk (diameter wn) 6-16 mm inside the skin line, 8-20 mm above/below (MLO)
  or lateral/medial (CC) of the outline's apex row, whose nipple tissue plus 3-6 mm of subareolar
  ducts replace fat along the ray (mu 0.085 /mm), with a thin air halo (0.6-1.2 mm of fat missing on a
  0.3 mm ring) and the areola's 0.5-1 mm extra skin on a 22-32 mm disk.
* MLO: the outline leaves the top edge (axillary tail, 60-80 % of the depth wide there).  The
  pectoral muscle occupies x < x_b(y) for y < y_p, with a 0.5-1.2 mm wide edge ramp; it replaces the
  interior tissue over the full compressed path (mu 0.085 /mm), so it is the brightest band, wide at
  the top (well positioned: 25-82 mm, 50-90 % of the tissue width at the top edge; chords 14-33
  deg from vertical; lowest point 5-30 mm below the nipple's row).  A short muscle is designed
  from the wanted reach (solving chord length - foot position = reach for the chord angle) and is
  small (top width 18-23 mm), as in the clinic; those breasts also sit lower in the field.
  IMF visible: the abdomen's skin line x_a(y) = x_f + s1 (y - y_f) + s2 (y - y_f)^2 (s1 0.25-0.65)
  rises from the bottom edge next to the chest wall and meets the breast's lower contour at the
  fold apex (11-28 mm from the chest-wall edge, 19-31 mm above the bottom edge); the tissue is the
  union of breast and abdomen (a notch of air between them) and the fold itself is a tangential
  double-skin ridge (1.5-3.5 mm of skin instead of fat, 0.35-0.6 mm wide) from the apex to the
  chest wall.  The abdomen is fat (no gland).
* CC: the D against the chest-wall edge, semi-axes 92-100 % of the table's a, centred with margins;
  its depth is solved so that its PNL = MLO PNL - delta, delta 0.5-8 mm (well positioned: real CCs
  miss a little posterior tissue) or 14-28 mm drawn, 18-28 mm realised (too shallow: tissue pulled
  out of the field at the chest wall, which shows only in the comparison with the MLO).  A CC with
  the nipple not in profile keeps delta 0.5-8 mm measured from the projected nipple, so it is not
  also "too shallow".

Physics (as phantom_independent.py unless said)
-----------------------------------------------
* Compressed thickness T = BodyPartThickness.  Edge profile t(d) = T h(d / W), d = distance to the
  skin line (EDT on a 2x grid, the chest-wall edge, and on the MLO the top edge and, with the IMF,
  the bottom edge, continue the tissue), W 14-30 mm, h(u) = (1 + u^(-p n))^(-1/n) with p 0.35-0.65,
  n = 2.5: the power law u^p of the compressed-breast edge (Rodriguez-Ruiz et al. 2016) joined
  SMOOTHLY to the plateau (a slope break shows after processing as a false line parallel to the skin).
* Skin: 2 mm shell, mu 0.080 /mm, interior t_in = max(0, T h((d - 2) / W) - 4 mm); the tangential
  skin path makes the skin line.
* Fibroglandular tissue (0.6 mm grid, then full resolution): a field F = radial noise (polar
  coordinates about the nipple: correlated 5-12 mm along rays, 0.035-0.07 rad across, i.e. ducts and
  trabeculae converging on the nipple; isotropic within ~1 cm of it) + lobules (2-4 mm) + lobes
  (8-14 mm) + fine edge noise (0.9 mm) + a cone prior behind the nipple (towards the axilla on the
  MLO), minus a soft penalty outside the allowed region (subcutaneous fat 3-10 mm, 2-4.5 mm in
  dense breasts, with a 12 mm smooth jitter; retromammary fat 1.5-7 mm in front of the chest wall /
  pectoral edge; muscle; abdomen).  Dense where F > quantile (target area fraction); the interface
  is a sigmoid 0.08-0.2 mm wide (the sharp fat/gland borders carry the detail that motion blurs);
  glandular fraction along the ray inside 0.35-0.95 (lobular and radial texture, more gland deeper
  inside); sharp-edged fat lobules (holes, 8-30 % of the dense area); 0.15-0.25 mm mottle (finest
  anatomical noise, +-8-15 %); thin (0.15-0.4 mm) curvilinear strands (Cooper's ligaments, ducts,
  vessels: zero crossings of a ray-correlated field) over about half the breast; 0-16 benign
  calcifications (0.2-0.7 mm spheres, mu 2.6 /mm, half in a loose group).
* mu at ~20 keV: fat 0.046, gland 0.080, skin 0.080, muscle 0.085, calcification 2.6 /mm (Johns &
  Yaffe 1987; ICRU 44).  Fixed spectrum.
* Acquisition: primary I0 exp(-line integral); MOTION: the breast moves during the exposure, so the
  transmitted (primary) fluence is convolved with a uniform line kernel of the motion length and
  direction (the detector integrates the moving image) BEFORE detection -- i.e. before scatter and
  quantum noise, which motion does not blur.  (Blurring exp(-A) rather than the line integral A is
  the exact time integral; for these lengths the two differ only at calcifications.)  Then the
  detector presampling blur (Gaussian, 0.48-0.58 px), scatter (SPR 0.30-0.60 with T, 15-30 mm
  kernel), quantum noise (Gaussian, variance = signal; 1.5-3 10^5 quanta / mm^2 behind fat), and for
  the anisotropic detector an extra converter spread along one axis AFTER absorption (it blurs
  signal and noise alike, as light / charge spread does; the total sigma gives the MTF ratio),
  then 2 quanta electronic noise.
* Vendor processing to FOR PRESENTATION: log; periphery equalisation (vendor segmentation, a
  fraction 0.3-0.8 of the thickness deficit added back); unsharp masking (sigma 2-5 mm, gain
  0.3-1.0) in the log domain, and for some units a fine-detail gain (0.15-0.4 at 0.25-0.45 mm);
  sigmoid tone curve with a linear toe (fat reference = the darkest interior tissue, capped at the
  unit's estimate of fat at this thickness, so a dense breast's fat bands stay grey); 12- or 14-bit
  MONOCHROME2 (air dark) or MONOCHROME1, window, identity window or VOI LUT Sequence.

Caveats (what an automatic measurement may reasonably disagree on)
------------------------------------------------------------------
* MLO PNL is measured to the CHORD of the anterior pectoral edge; a method fitting a line to the
  curved edge (sagitta up to ~7 mm), or to a curve, can differ by a few mm and a few degrees; the
  foot moves along the line by ~PNL x angle difference.  The muscle's edge ramp (0.5-1.2 mm) and the
  retromammary fat make the "edge" +-1 mm.
* The nipple tip is on the outline (tissue coverage 1/2); detectors that take the knob's centre or
  its base differ by up to ~hn (3-6 mm) along the PNL.  For a nipple not in profile the truth is
  the disk centre; the disk is soft-edged and sits on converging dense tissue.
* CC PNL is horizontal to the image edge; a method that draws it perpendicular to a (not present)
  pectoral edge or along the nipple's axis to the chest-wall edge differs by <1-2 mm.
* The short-pectoral muscles are small (18-23 mm wide at the top) and their PNL foot often lies
  beyond the chest-wall image edge (the line extended); ``pectoral_reach_mm`` is -12 to -22 mm.
* The 0.15 mm blur is recorded but is not a defect; 0.4 mm is subtle (mostly visible on the
  calcifications, strands and sharp gland borders); structure-poor fatty images carry less evidence.
* pd_approx is a rough area fraction of a continuous, textured glandular model (realised
  0.05-0.78), not a BI-RADS density and not comparable with phantom_independent's exact pd_true.
* ``cases()`` holds all 84 datasets at once (~0.5 GB of pixel data); tests should iterate
  ``case(i)``.  The last three anatomies are cached (``_anatomy``), so a copy rendered right after
  its source is faster.
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
from scipy import fft as sfft
from scipy import ndimage as ndi
from scipy.special import expit

__all__ = ["case", "cases", "display_image", "N_CASES", "N_BREASTS", "DEFECTS"]

SEED = 6_204_2025
MU_FAT = 0.046  # /mm, ~0.46 /cm at ~20 keV effective (Johns & Yaffe 1987)
MU_GLAND = 0.080  # /mm
MU_SKIN = 0.080  # /mm
MU_MUSCLE = 0.085  # /mm (ICRU 44 muscle, slightly above glandular)
MU_NIPPLE = 0.080  # /mm (nipple: skin, ducts and smooth muscle ~ glandular)
MU_CALC = 2.6  # /mm (~26 /cm hydroxyapatite at ~20 keV)
SKIN_MM = 2.0
MAX_ROWS, MAX_COLS = 2400, 1900
SOP_CLASS_MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"

PS, NN, CS, IM, MB = "pectoral_short", "nipple_not_in_profile", "cc_too_shallow", "imf_missing", "motion_blur"
DEFECTS = (PS, NN, CS, IM, MB)

# Vendor styles: (photometric, voi, bits stored, manufacturer tag)
#   voi "window": processed image in a sub-range + window; "identity": full range + identity window;
#   "lut": linear log-domain values in the pixels, the sigmoid tone curve in a VOI LUT Sequence.
_STYLES = {
    "A": ("MONOCHROME2", "window", 14, "PhantomPosA"),
    "B": ("MONOCHROME2", "lut", 12, "PhantomPosB"),
    "C": ("MONOCHROME1", "window", 12, "PhantomPosC"),
    "D": ("MONOCHROME2", "identity", 12, "PhantomPosD"),
    "E": ("MONOCHROME2", "window", 12, "PhantomPosE"),
    "F": ("MONOCHROME1", "lut", 12, "PhantomPosF"),
    "G": ("MONOCHROME2", "lut", 14, "PhantomPosG"),
    "H": ("MONOCHROME2", "identity", 14, "PhantomPosH"),
    "I": ("MONOCHROME1", "window", 14, "PhantomPosI"),
}

# Breast table.  lat, pixel spacing (mm), compressed thickness T (mm), target glandular area fraction,
# CC chest-wall semi-axis a (mm), MLO depth b (mm, chest-wall image edge to the skin at the nipple base),
# CC defects, MLO defects, vendor style.
_BREASTS: list[tuple] = [
    ("L", 0.085, 48, 0.25, 85, 95, (), (), "A"),  # 0
    ("R", 0.100, 62, 0.10, 105, 125, (), (), "B"),  # 1
    ("L", 0.085, 54, 0.20, 86, 100, (), (PS,), "E"),  # 2
    ("R", 0.070, 35, 0.55, 62, 60, (), (), "C"),  # 3
    ("L", 0.085, 55, 0.80, 78, 80, (), (), "A"),  # 4
    ("R", 0.100, 47, 0.40, 102, 115, (CS,), (PS,), "H"),  # 5
    ("L", 0.100, 70, 0.05, 112, 138, (), (), "D"),  # 6
    ("R", 0.085, 63, 0.55, 80, 85, (), (IM,), "F"),  # 7
    ("L", 0.070, 40, 0.40, 58, 48, (), (), "G"),  # 8
    ("R", 0.085, 44, 0.65, 90, 70, (), (), "E"),  # 9
    ("L", 0.100, 57, 0.33, 96, 108, (NN,), (IM,), "G"),  # 10
    ("R", 0.100, 58, 0.18, 98, 110, (), (), "F"),  # 11
    ("L", 0.070, 31, 0.30, 66, 75, (), (), "A"),  # 12
    ("R", 0.085, 36, 0.65, 72, 62, (), (PS, IM), "E"),  # 13
    ("L", 0.085, 66, 0.08, 88, 118, (), (), "D"),  # 14
    ("R", 0.085, 72, 0.06, 90, 128, (), (NN,), "A"),  # 15
    ("L", 0.100, 52, 0.45, 112, 100, (), (), "E"),  # 16
    ("R", 0.070, 46, 0.72, 55, 55, (), (), "I"),  # 17
    ("L", 0.100, 41, 0.48, 110, 102, (), (NN,), "B"),  # 18
    ("R", 0.085, 38, 0.15, 74, 88, (), (), "G"),  # 19
    ("L", 0.100, 75, 0.35, 108, 132, (), (), "E"),  # 20
    ("L", 0.070, 59, 0.25, 72, 80, (NN,), (), "D"),  # 21
    ("R", 0.070, 42, 0.60, 70, 68, (), (), "H"),  # 22
    ("L", 0.085, 60, 0.22, 92, 105, (), (), "E"),  # 23
    ("R", 0.085, 33, 0.70, 76, 72, (CS,), (), "I"),  # 24
    ("R", 0.100, 34, 0.50, 100, 85, (), (), "C"),  # 25
    ("L", 0.100, 65, 0.15, 106, 135, (CS,), (), "B"),  # 26
    ("L", 0.070, 50, 0.12, 64, 90, (), (), "G"),  # 27
    ("R", 0.085, 49, 0.38, 84, 78, (NN,), (), "A"),  # 28
    ("L", 0.085, 68, 0.28, 82, 92, (), (), "H"),  # 29
    ("R", 0.100, 45, 0.78, 104, 95, (), (), "G"),  # 30
    ("L", 0.085, 39, 0.10, 80, 70, (), (PS,), "E"),  # 31
]
N_BREASTS = len(_BREASTS)

# Motion-blurred copies of well-positioned images: (source index, blur length mm, angle deg in the
# stored image, 0 = along +column, counter-clockwise as displayed, i.e. towards row 0).
_MOTION: list[tuple[int, float, float]] = [
    (0, 0.15, 0.0), (3, 0.4, 90.0), (6, 0.6, 30.0), (9, 1.0, 135.0),
    (12, 0.4, 60.0), (17, 0.6, 160.0), (18, 1.0, 15.0), (23, 0.15, 110.0),
    (24, 0.6, 45.0), (29, 1.0, 75.0), (32, 0.15, 120.0), (35, 0.4, 170.0),
    (38, 1.0, 5.0), (41, 0.15, 95.0), (44, 0.4, 140.0), (47, 0.6, 20.0),
]
# Sharp copies from a detector with mildly anisotropic resolution: (source index, soft axis, MTF ratio
# soft/sharp at 0.25 cycles/pixel).  soft axis "vertical" = blur along the column direction (across rows).
_ANISO: list[tuple[int, str, float]] = [
    (50, "vertical", 0.85), (55, "horizontal", 0.82), (59, "vertical", 0.88), (60, "horizontal", 0.86),
]
N_ORIGINAL = 2 * N_BREASTS
N_CASES = N_ORIGINAL + len(_MOTION) + len(_ANISO)


# ----------------------------------------------------------------------------- small helpers
def _down(a: np.ndarray, f: int) -> np.ndarray:
    """Block mean by f (edge-padded to a multiple of f)."""
    h, w = a.shape
    ph, pw = (-h) % f, (-w) % f
    if ph or pw:
        a = np.pad(a, ((0, ph), (0, pw)), mode="edge")
    return a.reshape(a.shape[0] // f, f, a.shape[1] // f, f).mean(axis=(1, 3), dtype=np.float32)


def _up_axis(a: np.ndarray, f: int, n_out: int, axis: int) -> np.ndarray:
    """Linear interpolation by an integer factor f along one axis, pixel-centre aligned, edge-clamped
    (output sample k of each block of f sits at input position (k + 0.5) / f - 0.5)."""
    a = np.moveaxis(a, axis, 0)
    ap = np.concatenate([a[:1], a, a[-1:]], axis=0)
    out = np.empty((n_out,) + a.shape[1:], np.float32)
    for k in range(f):
        pos = (k + 0.5) / f - 0.5
        o = int(math.floor(pos))
        w = np.float32(pos - o)
        n = len(range(k, n_out, f))
        lo = ap[1 + o: 1 + o + n]
        if w:
            out[k::f] = lo + w * (ap[2 + o: 2 + o + n] - lo)
        else:
            out[k::f] = lo
    return np.moveaxis(out, 0, axis)


def _up(a: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Linear upsampling by f with pixel-centre alignment, cropped to shape."""
    t = np.ascontiguousarray(_up_axis(a.astype(np.float32, copy=False), f, shape[1], 1))  # small array
    return _up_axis(t, f, shape[0], 0)  # whole contiguous rows


def _smooth_noise(rng: np.random.Generator, shape, sigma, mode="reflect") -> np.ndarray:
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode=mode)
    return (n - n.mean()) / (n.std() + 1e-12)


def _polar_noise(rng: np.random.Generator, rr: np.ndarray, th: np.ndarray, sig_r: float, sig_th: float,
                 rmax: float) -> np.ndarray:
    """Gaussian noise correlated sig_r (mm) along rays from the nipple and sig_th (rad) across them,
    sampled at radius rr (mm) and angle th (rad)."""
    dr, dth = sig_r / 4.0, sig_th / 4.0  # 4 samples per correlation length is ample for linear sampling
    nr, nth = int(rmax / dr) + 3, int(round(2 * math.pi / dth))
    dth = 2 * math.pi / nth
    Z = ndi.gaussian_filter(rng.standard_normal((nr, nth)).astype(np.float32), (sig_r / dr, sig_th / dth),
                            mode=("nearest", "wrap"))
    Z = (Z - Z.mean()) / (Z.std() + 1e-9)
    return ndi.map_coordinates(Z, [rr / dr, (th + math.pi) / dth], order=1, mode="nearest").astype(np.float32)


def _edt_mm(mask: np.ndarray, px: float, pads: tuple[bool, bool, bool], pad_mm: float = 36.0) -> np.ndarray:
    """Distance (mm) from each tissue pixel to the skin line.  pads = (top, bottom, left): those image
    edges are not skin (the tissue continues beyond the field: axilla, abdomen, chest wall)."""
    n = int(math.ceil(pad_mm / px))
    pt, pb, pl = (n if p else 0 for p in pads)
    m = np.pad(mask, ((pt, pb), (pl, 0)), mode="edge")
    d = ndi.distance_transform_edt(m)
    return (d[pt: pt + mask.shape[0], pl:] * px).astype(np.float32)


def _edge_profile(u: np.ndarray, p: float, n: float = 2.5) -> np.ndarray:
    """Compressed-breast edge: thickness fraction u**p near the skin (u = distance / W), joining the
    plateau 1 smoothly (soft minimum of u**p and 1, no slope break that processing would show as a line)."""
    u = np.maximum(u, 1e-4).astype(np.float32)
    return (1.0 + u ** np.float32(-p * n)) ** np.float32(-1.0 / n)


def _dshape(y: np.ndarray, yc: float, a_up: float, a_dn: float, b: float, q: float) -> np.ndarray:
    """Super-ellipse 'D' against the chest wall: depth (mm) of the skin line for each row."""
    u = np.where(y < yc, (yc - y) / a_up, (y - yc) / a_dn)
    return b * np.clip(1.0 - np.abs(u) ** q, 0.0, None) ** (1.0 / q)


def _wobble(rng: np.random.Generator, y: np.ndarray, span: float) -> np.ndarray:
    w = np.interp(y, np.linspace(0.0, span, 10), rng.standard_normal(10))
    w = ndi.gaussian_filter1d(w, 25.0 / max(y[1] - y[0], 1e-6), mode="nearest")
    return w / (np.abs(w).max() + 1e-9)


def _bump(y: np.ndarray, yn: float, wn: float, hn: float, kn: float, px: float) -> np.ndarray:
    """Nipple in profile: a rounded knob wn wide, hn high, its base corners filleted (0.6 mm)."""
    u = np.abs(2.0 * (y - yn) / wn)
    b = hn * np.clip(1.0 - u**kn, 0.0, None) ** (1.0 / kn)
    return ndi.gaussian_filter1d(b, 0.6 / px, mode="constant")


def _inside_point(y: np.ndarray, xs: np.ndarray, y_r: float, depth_in: float):
    """The point depth_in (mm) inside the skin line along the inward normal at row y_r, and its true
    shortest distance to the skin line (polyline of the row samples)."""
    slope = np.gradient(xs, y)
    s = float(np.interp(y_r, y, slope))
    x0 = float(np.interp(y_r, y, xs))
    nrm = math.hypot(1.0, s)
    yc, xc = y_r + depth_in * s / nrm, x0 - depth_in / nrm
    sel = xs > 0
    dist = float(np.min(np.hypot(y[sel] - yc, xs[sel] - xc)))
    return (yc, xc), dist


def _point_line_distance(p, a, b) -> tuple[float, float, float]:
    """(perpendicular distance, position of the foot along a->b in mm, length of a->b)."""
    (py, px_), (ay, ax), (by, bx) = p, a, b
    L = math.hypot(by - ay, bx - ax)
    uy, ux = (by - ay) / L, (bx - ax) / L
    s = (py - ay) * uy + (px_ - ax) * ux
    dist = abs((py - ay) * ux - (px_ - ax) * uy)
    return dist, s, L


# ----------------------------------------------------------------------------- geometry (cheap, 1-D)
@functools.lru_cache(maxsize=None)
def _breast(k: int) -> dict:
    """Both views of breast k in the canonical frame (chest wall on the left at x = 0, nipple to the
    right, y down, mm; row i has its centre at y = (i + 0.5) px)."""
    lat, px, T, pd, a, depth, cc_def, mlo_def, style = _BREASTS[k]
    rng = np.random.default_rng([SEED, k, 0])
    imf_vis = IM not in mlo_def
    wn, hn, kn = rng.uniform(8.0, 12.0), rng.uniform(3.0, 6.0), rng.uniform(2.0, 3.0)

    # --- field (one detector for both views)
    q_m = rng.uniform(1.8, 2.4)
    a_dn = a * rng.uniform(0.85, 1.0)
    below, gap = rng.uniform(18.0, 32.0), rng.uniform(8.0, 20.0)
    x_imf = rng.uniform(10.0, min(28.0, 0.3 * depth))
    u_imf = (1.0 - (x_imf / depth) ** q_m) ** (1.0 / q_m)
    q_c = rng.uniform(1.8, 2.6)
    a_up_c, a_dn_c = a * rng.uniform(0.92, 1.0), a * rng.uniform(0.92, 1.0)
    m_cc = rng.uniform(6.0, 12.0)
    h_cc = a_up_c + a_dn_c + 2 * m_cc
    # a short pectoral goes with a breast imaged low in the field (nipple far below the top edge)
    yc_min = a_dn * (rng.uniform(1.3, 1.6) if PS in mlo_def else 0.85)
    h_mlo = yc_min + (a_dn * u_imf + below if imf_vis else a_dn + gap)
    rows = min(MAX_ROWS, int(math.ceil(max(h_cc, h_mlo) / px / 8.0)) * 8)
    H = rows * px
    if a_up_c + a_dn_c + 10.0 > H:  # the CC must fit with 5 mm margins
        f = (H - 10.0) / (a_up_c + a_dn_c)
        a_up_c, a_dn_c = a_up_c * f, a_dn_c * f
    y = ((np.arange(rows) + 0.5) * px).astype(np.float64)

    # --- MLO outline
    mlo: dict = dict(view="MLO", defects=tuple(mlo_def))
    if imf_vis:
        y_imf0 = H - below
        y_c = y_imf0 - a_dn * u_imf
    else:
        y_c = H - gap - a_dn
    assert y_c > 0.6 * a_dn, (k, y_c, a_dn)
    w_top = depth * rng.uniform(0.6, 0.8)
    a_up = max(y_c * rng.uniform(1.1, 1.35), y_c / (1.0 - (w_top / depth) ** q_m) ** (1.0 / q_m))
    wob = _wobble(rng, y, H)
    base = _dshape(y, y_c, a_up, a_dn, depth, q_m) * (1.0 + 0.02 * wob)
    y_ref = y_c + rng.uniform(0.02, 0.10) * a_dn
    if NN in mlo_def:
        side = float(rng.choice([-1.0, 1.0]))
        y_r = y_ref + side * rng.uniform(8.0, 20.0)
        (yn, xn), skin_d = _inside_point(y, base, y_r, rng.uniform(6.0, 16.0))
        xt = base.copy()
        mlo.update(nipple_in_profile=False, nipple_offset="over" if side < 0 else "under", nipple_skin_mm=skin_d)
    else:
        xt = base + _bump(y, y_ref, wn, hn, kn, px)
        yn, xn = y_ref, float(np.interp(y_ref, y, xt))
        mlo.update(nipple_in_profile=True, nipple_offset=None, nipple_skin_mm=0.0)
    mlo.update(nipple=(yn, xn), y_c=y_c, a_up=a_up, a_dn=a_dn, b=depth, q=q_m, base=base)

    # pectoral muscle: anterior edge from (0, a_top) on the top edge to (y_p, 0) on the chest-wall edge
    xs0 = float(base[0])
    a_top_max = xs0 - rng.uniform(8.0, 16.0)
    y_floor = (y_imf0 - 15.0) if imf_vis else (y_c + 0.8 * a_dn)
    if PS not in mlo_def:
        y_p = min(yn + rng.uniform(5.0, 30.0), y_floor)
        a_top = rng.uniform(max(24.0, 0.4 * xs0), max(a_top_max, 26.0))
        a_top = min(a_top, y_p * math.tan(math.radians(38.0)))
    else:
        # the muscle's edge ends |reach| = 12-24 mm above the PNL (measured along the pectoral line):
        # a_top solves L - s_foot = reach for the edge angle phi; keep the widest plausible muscles
        reach = -rng.uniform(12.0, 24.0)
        phis = np.radians(np.arange(8.0, 40.0, 0.25))
        while True:
            at = np.sin(phis) * (reach + yn * np.cos(phis) - xn * np.sin(phis)) / np.cos(phis) ** 2
            good = (at >= 12.0) & (at <= a_top_max) & (at / np.tan(phis) >= 30.0)
            if good.any() or reach > -12.5:
                break
            reach = min(reach + 1.0, -12.0)
        assert good.any(), (k, yn, xn)
        cand = np.flatnonzero(good & (at >= 0.85 * at[good].max()))
        j = int(cand[int(rng.integers(cand.size))])
        phi, a_top = float(phis[j]), float(at[j])
        y_p = a_top / math.tan(phi)
    p0, p1 = (0.0, a_top), (y_p, 0.0)
    pnl, s_foot, L = _point_line_distance((yn, xn), p0, p1)
    phi = math.atan2(a_top, y_p)
    sag = L * rng.uniform(-0.025, 0.045)  # + = convex towards the nipple (relaxed muscle)
    mlo.update(a_top=a_top, y_p=y_p, bow_h=sag / math.cos(phi), sagitta=sag, phi=phi, pnl=pnl,
               reach=L - s_foot, foot=(p0[0] + s_foot * math.cos(phi), p0[1] - s_foot * math.sin(phi)),
               w_muscle=rng.uniform(0.5, 1.2))
    if PS in mlo_def:
        assert -40.0 <= mlo["reach"] <= -11.5, (k, mlo["reach"])
    else:
        assert mlo["reach"] >= 5.0 and y_p >= yn + 3.0, (k, mlo["reach"], y_p, yn)
    assert 0.0 < s_foot and a_top < xs0 - 4.0, k

    # inframammary fold and abdomen
    if imf_vis:
        s1, s2 = rng.uniform(0.25, 0.65), rng.uniform(0.0, 0.006)
        dyv = y - y_imf0
        xa = np.clip(np.where(dyv >= 0, x_imf + s1 * dyv + s2 * dyv**2, x_imf + s1 * dyv), 0.0, None)
        below_n = y > yn + 10.0
        cross = np.flatnonzero(below_n & (xa >= xt))
        i = int(cross[0])
        f = (xt[i - 1] - xa[i - 1]) / ((xt[i - 1] - xa[i - 1]) - (xt[i] - xa[i]))
        y_imf = float(y[i - 1] + f * px)
        x_imf_r = float(np.interp(y_imf, y, xa))
        abd_row = y >= y_imf
        xt_all = np.where(abd_row, np.maximum(xt, xa), xt)
        mlo.update(imf_visible=True, imf=(y_imf, x_imf_r), xa=xa, abd_row=abd_row,
                   crease_dy=rng.uniform(-2.0, 6.0), crease_amp=rng.uniform(1.5, 3.5),
                   crease_sigma=rng.uniform(0.35, 0.6))
    else:
        xt_all = xt
        mlo.update(imf_visible=False, imf=None, xa=None, abd_row=None)
    mlo.update(xt=xt_all)
    assert y_p < (mlo["imf"][0] - 8.0 if imf_vis else y_c + a_dn - 8.0), k

    # --- CC outline: its PNL is the MLO PNL minus delta (0.5-8 mm, or 14-28 mm when too shallow)
    cc: dict = dict(view="CC", defects=tuple(cc_def))
    slack = H - a_up_c - a_dn_c - 10.0
    cy = 5.0 + a_up_c + rng.uniform(0.3, 0.7) * slack
    y_ref = cy + rng.uniform(-0.08, 0.08) * a
    delta = rng.uniform(14.0, 28.0) if CS in cc_def else rng.uniform(0.5, 8.0)
    pnl_cc = pnl - delta
    wob = _wobble(rng, y, H)
    nn_cc = NN in cc_def
    if nn_cc:
        side = float(rng.choice([-1.0, 1.0]))
        y_r, din = y_ref + side * rng.uniform(8.0, 20.0), rng.uniform(6.0, 16.0)
    b = pnl_cc + (din if nn_cc else -hn)
    for _ in range(6):
        base_c = _dshape(y, cy, a_up_c, a_dn_c, b, q_c) * (1.0 + 0.02 * wob)
        if nn_cc:
            (ync, xnc), skin_d = _inside_point(y, base_c, y_r, din)
            xt_c = base_c
        else:
            xt_c = base_c + _bump(y, y_ref, wn, hn, kn, px)
            ync, xnc, skin_d = y_ref, float(np.interp(y_ref, y, xt_c)), 0.0
        err = pnl_cc - xnc
        b += err
        if abs(err) < 1e-4:
            break
    cc.update(nipple=(ync, xnc), nipple_in_profile=not nn_cc, nipple_skin_mm=skin_d,
              nipple_offset=(None if not nn_cc else ("lateral" if side < 0 else "medial")),
              y_c=cy, a_up=a_up_c, a_dn=a_dn_c, b=b, q=q_c, base=base_c, xt=xt_c, pnl=xnc,
              delta=pnl - xnc)

    # --- columns
    xmax = max(float(xt_all.max()), float(xt_c.max()))
    cols = min(MAX_COLS, int(math.ceil((xmax + rng.uniform(12.0, 25.0)) / px / 8.0)) * 8)
    assert xmax < cols * px - 6.0, (k, xmax, cols * px)
    common = dict(k=k, lat=lat, px=px, T=float(T), pd=pd, a=a, depth=depth, style=style, rows=rows, cols=cols,
                  y=y, wn=wn, hn=hn, kn=kn)
    for g in (mlo, cc):
        g.update(common)
    return dict(MLO=mlo, CC=cc)


def _source(index: int) -> tuple[int, dict]:
    """(index of the original image, modifications) for any case index."""
    if not 0 <= index < N_CASES:
        raise IndexError(f"case index {index} outside 0..{N_CASES - 1}")
    if index < N_ORIGINAL:
        return index, {}
    i = index - N_ORIGINAL
    if i < len(_MOTION):
        src, L, ang = _MOTION[i]
        return src, dict(blur_mm=L, blur_angle_deg=ang)
    src, axis, ratio = _ANISO[i - len(_MOTION)]
    return src, dict(aniso_axis=axis, aniso_ratio=ratio)


def _check_sources() -> None:
    """Copies are made of well-positioned originals only."""
    for src, *_ in _MOTION + _ANISO:
        assert 0 <= src < N_ORIGINAL and not _geom(src)["defects"], src


def _abdomen(G: dict, yv: np.ndarray, xv: np.ndarray) -> np.ndarray:
    """MLO with the IMF: the abdomen = below the fold line (apex -> chest wall) next to the chest wall,
    and below the apex row inside the abdominal skin line x_a further out (grid yv x xv, mm)."""
    yi, xi = G["imf"]
    Y, Xg = yv[:, None], xv[None, :]
    yline = yi + G["crease_dy"] * (1.0 - np.clip(Xg / xi, 0.0, 1.0))
    xa = np.interp(yv, G["y"], G["xa"])[:, None]
    return ((Xg <= xi) & (Y > yline)) | ((Xg > xi) & (Y > yi) & (Xg < xa))


def _geom(index: int) -> dict:
    k, view = index // 2, ("CC", "MLO")[index % 2]
    return _breast(k)[view]


# ----------------------------------------------------------------------------- anatomy (2-D)
@functools.lru_cache(maxsize=3)
def _anatomy(index: int) -> dict:
    """Attenuation line integral (canonical frame) of original image `index` plus masks."""
    G = _geom(index)
    k, view, px, T = G["k"], G["view"], G["px"], G["T"]
    rows, cols, y = G["rows"], G["cols"], G["y"]
    rng = np.random.default_rng([SEED, index, 1])
    shape = (rows, cols)
    x = ((np.arange(cols) + 0.5) * px).astype(np.float32)
    X = x[None, :]
    xt = G["xt"].astype(np.float32)
    mlo = view == "MLO"

    # coverage of each pixel by tissue (row-wise outline, 4 sub-rows where the outline is steep)
    cov = np.clip((xt[:, None] - X) / px + 0.5, 0.0, 1.0)
    ys4 = y[:, None] + (np.arange(4) - 1.5) / 4.0 * px
    xt4 = np.interp(ys4.ravel(), y, G["xt"]).reshape(ys4.shape).astype(np.float32)
    steep = np.flatnonzero(xt4.max(1) - xt4.min(1) > 0.5 * px)
    if steep.size:
        cov[steep] = np.mean([np.clip((xt4[steep, j][:, None] - X) / px + 0.5, 0.0, 1.0) for j in range(4)], axis=0)
    cov = cov.astype(np.float32)

    # distance to the skin line on a 2x grid
    pads = (mlo, mlo and G["imf_visible"], True)
    m2 = _down(cov, 2) > 0.5
    d = _up(_edt_mm(m2, 2 * px, pads) - px, 2, shape)
    np.maximum(d, 0.0, out=d)

    W, pw = rng.uniform(14.0, 30.0), rng.uniform(0.35, 0.65)
    t = T * _edge_profile(d / W, pw) * cov
    t_in = np.maximum(0.0, T * _edge_profile((d - SKIN_MM) / W, pw) - 2 * SKIN_MM) * cov

    # pectoral muscle (MLO)
    m = None
    if mlo:
        r1 = min(rows, int(math.ceil(G["y_p"] / px)) + 1)
        c1 = min(cols, int(math.ceil((G["a_top"] + abs(G["bow_h"]) + 5.0) / px)))
        s = np.clip(y[:r1] / G["y_p"], 0.0, 1.0)
        xb = (G["a_top"] * (1.0 - s) + 4.0 * G["bow_h"] * s * (1.0 - s)).astype(np.float32)
        mw = np.clip((xb[:, None] - X[:, :c1]) / G["w_muscle"] + 0.5, 0.0, 1.0)
        mw *= (y[:r1] < G["y_p"])[:, None]
        m = (r1, c1, mw)

    # ---------------- glandular tissue on the ~0.6 mm grid
    f = max(1, int(round(0.6 / px)))
    lp = px * f
    lr, lc = -(-rows // f), -(-cols // f)
    yl = ((np.arange(lr) + 0.5) * lp)
    xl = ((np.arange(lc) + 0.5) * lp)
    XL = xl[None, :]
    tissue_lo = XL < np.interp(yl, y, G["xt"])[:, None]
    d_lo = _down(d, f)
    excl = np.zeros((lr, lc), bool)
    retro_line = np.zeros(lr)
    retro = rng.uniform(1.5, 2.5) if G["pd"] > 0.6 else rng.uniform(2.0, 7.0)
    if mlo:
        sl = np.clip(yl / G["y_p"], 0.0, 1.0)
        xbl = np.where(yl < G["y_p"], G["a_top"] * (1 - sl) + 4 * G["bow_h"] * sl * (1 - sl), 0.0)
        excl |= XL < xbl[:, None]
        retro_line = xbl
        if G["imf_visible"]:
            excl |= _abdomen(G, yl, xl)
            yi, xi = G["imf"]
            fold_e = np.where(XL <= xi, yi + G["crease_dy"] * (1.0 - np.clip(XL / xi, 0.0, 1.0)) - yl[:, None], 1e3)
    breast_lo = tissue_lo & ~excl
    n_breast = int(breast_lo.sum())
    yn, xn = G["nipple"]
    # texture.  Polar coordinates about the nipple: ducts, the fibroglandular trabeculae and Cooper's
    # ligaments converge on the nipple, so part of the noise is correlated along rays (5-12 mm) and
    # short across them (angular sigma 0.035-0.07 rad); the rest is isotropic (lobules 2-4 mm,
    # lobes 8-14 mm).  A cone prior concentrates the tissue behind the nipple.
    ry = yl[:, None] - yn
    rx = XL - xn
    rr = np.hypot(ry, rx).astype(np.float32)
    th = np.arctan2(ry, -rx).astype(np.float32)  # 0 = from the nipple straight towards the chest wall
    th = th + 0.04 * _smooth_noise(rng, (lr, lc), 20.0 / lp)  # gently curved rays
    rmax = math.hypot(rows * px, cols * px) + 5.0
    near = np.exp(-((rr / 10.0) ** 2))  # within ~1 cm of the nipple the rays are too fine: isotropic there
    Frad = _polar_noise(rng, rr, th, rng.uniform(5.0, 12.0), rng.uniform(0.035, 0.07), rmax)
    Frad = Frad * (1.0 - near) + _smooth_noise(rng, (lr, lc), 3.0 / lp) * near
    s1, s2 = rng.uniform(2.0, 4.0), rng.uniform(8.0, 14.0)
    w_rad, w_1 = rng.uniform(0.5, 0.7), rng.uniform(0.3, 0.45)
    w_2 = math.sqrt(max(1.0 - w_rad**2 - w_1**2, 0.05))
    F = w_rad * Frad + w_1 * _smooth_noise(rng, (lr, lc), s1 / lp) + w_2 * _smooth_noise(rng, (lr, lc), s2 / lp)
    F = F + rng.uniform(0.2, 0.35) * _smooth_noise(rng, (lr, lc), 0.9 / lp)  # irregular, scalloped edges
    if mlo:  # glandular cone from the nipple towards the chest wall and up towards the axilla
        pc_y, pc_x, sy, sx = yn - 0.2 * G["a_dn"], 0.45 * xn, 0.65 * G["a_dn"], 0.6 * xn
    else:
        pc_y, pc_x, sy, sx = yn, 0.5 * xn, 0.55 * G["a"], 0.6 * xn
    prior = np.exp(-(((yl[:, None] - pc_y) / sy) ** 2) - ((XL - pc_x) / sx) ** 2)
    F = F + rng.uniform(0.9, 1.6) * prior.astype(np.float32)
    # soft exclusion: subcutaneous fat (3-10 mm, 2.5-4.5 mm in dense breasts, with a smooth 12 mm
    # jitter), retromammary fat in front of the chest wall / pectoral edge, muscle and abdomen
    sub_jit = _smooth_noise(rng, (lr, lc), 12.0 / lp)
    subcut = rng.uniform(2.5, 4.5) if G["pd"] > 0.6 else rng.uniform(3.0, 10.0)
    for _ in range(8):
        e = np.minimum(d_lo - subcut - 1.5 * sub_jit, XL - retro_line[:, None] - retro)
        if mlo and G["imf_visible"]:  # the fold is skin too: subcutaneous fat above it
            e = np.minimum(e, fold_e - subcut)
        e = np.where(breast_lo, e, -20.0).astype(np.float32)
        room = int((e > 0).sum()) / max(n_breast, 1)
        if room >= G["pd"] / 0.9 or subcut <= 2.0:
            break
        subcut = max(2.0, subcut - 1.0)
    F = F - 6.0 * expit(-e / 1.0)
    hole_frac = rng.uniform(0.08, 0.15) if G["pd"] > 0.6 else rng.uniform(0.12, 0.3)
    thr = float(np.quantile(F[breast_lo], 1.0 - min(0.97, G["pd"] / (1.0 - 0.8 * hole_frac))))
    gy, gx = np.gradient(F)
    grad = np.hypot(gy, gx) / f + 1e-3  # per full-resolution pixel
    # dense/fat interfaces are sharp: 0.08-0.2 mm wide (the sigmoid of (F - thr) / (|grad F| * width))
    delta = rng.uniform(0.08, 0.2) / px
    Z = (F - thr) / (grad * delta)
    # strands: zero crossings of a ray-correlated field = thin radial lines (ligaments, ducts, vessels),
    # 0.15-0.4 mm wide, evaluated at full resolution from the upsampled field / |gradient| ratio
    strands = _polar_noise(rng, rr, th, rng.uniform(20.0, 40.0), rng.uniform(0.012, 0.025), rmax)
    sgy, sgx = np.gradient(strands)
    s_ratio = strands / (np.hypot(sgy, sgx) / f * rng.uniform(0.15, 0.4) / px + 1e-4)
    sparse = expit((_smooth_noise(rng, (lr, lc), 10.0 / lp) - 0.2) / 0.25)  # strands in ~1/2 of the area
    s_amp = (rng.uniform(0.15, 0.30) * sparse * (1.0 - near) * expit((d_lo - 1.0) / 0.5) * breast_lo)
    # glandular fraction along the ray inside the dense tissue: 0.35-0.95, lobular and radial texture,
    # more gland deeper inside the dense region
    fine = (0.6 * _smooth_noise(rng, (lr, lc), 1.2 / lp)
            + 0.6 * _polar_noise(rng, rr, th, 4.0, 0.02, rmax) * (1 - near))
    gmax = (rng.uniform(0.62, 0.75) + 0.25 * np.tanh(fine)) * (0.6 + 0.4 * np.tanh(np.maximum(F - thr, 0.0) / 0.5))
    # fat lobules inside the dense tissue: sharp-edged (0.08-0.15 mm) holes, 1-4 mm, partly elongated
    Hn = (0.8 * _smooth_noise(rng, (lr, lc), rng.uniform(0.8, 1.4) / lp)
          + 0.6 * _polar_noise(rng, rr, th, 3.0, 0.03, rmax))
    dense_lo = Z > 0
    thr_h = float(np.quantile(Hn[dense_lo], 1.0 - hole_frac)) if dense_lo.any() else 10.0
    hgy, hgx = np.gradient(Hn)
    h_ratio = (Hn - thr_h) / (np.hypot(hgy, hgx) / f * rng.uniform(0.08, 0.15) / px + 1e-4)
    h_depth = rng.uniform(0.35, 0.55) if G["pd"] > 0.5 else rng.uniform(0.45, 0.75)
    Zu = _up(np.clip(Z, -30.0, 30.0), f, shape)
    strand = _up(s_amp, f, shape) * np.exp(-np.square(_up(np.clip(s_ratio, -30.0, 30.0), f, shape)))
    hole = expit(_up(np.clip(h_ratio, -30.0, 30.0), f, shape))
    g = _up(gmax, f, shape) * expit(Zu) * (1.0 - h_depth * hole)
    # fine mottle (0.15-0.25 mm) of the glandular fraction: anatomical noise at the finest scales
    f2 = 2
    mott = _up(_smooth_noise(rng, (-(-rows // f2), -(-cols // f2)), rng.uniform(0.5, 0.9)), f2, shape)
    g *= 1.0 + rng.uniform(0.08, 0.15) * mott
    g = g + strand * (1.0 - g)
    np.clip(g, 0.0, 1.0, out=g)
    g *= cov > 0
    del strand, mott

    # ---------------- attenuation line integral
    mu = MU_FAT + (MU_GLAND - MU_FAT) * g
    if m is not None:
        r1, c1, mw = m
        mu[:r1, :c1] = (1.0 - mw) * mu[:r1, :c1] + mw * MU_MUSCLE
    attn = MU_SKIN * (t - t_in) + t_in * mu

    wn, hn = G["wn"], G["hn"]
    # nipple and areola
    r0, r1_ = max(0, int((yn - 25.0) / px)), min(rows, int((yn + 25.0) / px) + 1)
    c0, c1_ = max(0, int((xn - 35.0) / px)), cols
    yy = y[r0:r1_, None].astype(np.float32)
    xx = X[:, c0:c1_]
    rn = np.hypot(yy - yn, xx - xn)
    win = (slice(r0, r1_), slice(c0, c1_))
    if G["nipple_in_profile"]:
        # areolar skin thickening along the skin line near the nipple (2 -> ~3.2 mm)
        s_ar = SKIN_MM + rng.uniform(0.8, 1.5) * np.exp(-0.5 * (rn / rng.uniform(8.0, 12.0)) ** 2)
        dw, cw = d[win], cov[win]
        t_in_w = np.maximum(0.0, T * _edge_profile((dw - s_ar) / W, pw) - 2 * s_ar) * cw
        gw, tw = g[win], t[win]
        # the nipple knob itself: nipple tissue instead of fat / skin mixture
        knob = np.clip((xx - np.interp(y[r0:r1_], y, G["base"])[:, None].astype(np.float32)) / 0.5 + 0.5, 0.0, 1.0)
        mu_w = MU_FAT + (MU_GLAND - MU_FAT) * gw
        mu_w = (1 - knob) * mu_w + knob * MU_NIPPLE
        attn[win] = MU_SKIN * (tw - t_in_w) + t_in_w * mu_w
    else:
        # en face: the nipple (diameter wn) folded against the breast: its hn mm plus 3-6 mm of the
        # subareolar ducts replace fat along the ray; a thin air halo where the skin folds round it;
        # the areola's extra skin (0.5-1 mm) over a 22-32 mm disk
        R = wn / 2.0
        nip = (hn + rng.uniform(3.0, 6.0)) * np.sqrt(np.clip(1.0 - (rn / R) ** 2, 0.0, None))
        nip = ndi.gaussian_filter(nip, 0.3 / px)
        halo = rng.uniform(0.6, 1.2) * np.exp(-0.5 * ((rn - 1.08 * R) / 0.3) ** 2)
        ar_r = rng.uniform(11.0, 16.0)
        areola = rng.uniform(0.5, 1.0) * expit((ar_r - rn) / 0.8)
        extra = (MU_MUSCLE - MU_FAT) * nip - MU_FAT * halo + (MU_SKIN - MU_FAT) * areola
        attn[win] += extra * (cov[win] > 0.5)

    # inframammary fold: the two skin layers in contact along the crease (tangential double skin)
    if mlo and G["imf_visible"]:
        yi, xi = G["imf"]
        dyc = G["crease_dy"]
        ra, rb = max(0, int((yi - 6.0) / px)), min(rows, int((yi + dyc + 6.0 + abs(dyc)) / px) + 1)
        cb = min(cols, int((xi + 2.0) / px) + 1)
        yy = y[ra:rb, None].astype(np.float32)
        xx = X[:, :cb]
        yline = yi + dyc * (1.0 - np.clip(xx / xi, 0.0, 1.0))
        dist = np.abs(yy - yline) * math.cos(math.atan2(dyc, xi))
        ridge = G["crease_amp"] * np.exp(-0.5 * (dist / G["crease_sigma"]) ** 2)
        ridge *= expit((xi - xx) / 0.5) * (0.6 + 0.4 * xx / xi)
        attn[ra:rb, :cb] += (MU_SKIN - MU_FAT) * ridge * (t_in[ra:rb, :cb] > G["crease_amp"])

    # benign calcifications: 0.2-0.7 mm spheres, scattered and partly in a loose group (most breasts
    # have a few; they are among the sharpest details, hence the clearest motion-blur cue)
    n_calc = int(rng.choice([0, 3, 6, 10, 16]))
    cand = np.flatnonzero((breast_lo & (d_lo > 4.0)).ravel())
    if n_calc and cand.size:
        seed_c = divmod(int(cand[rng.integers(cand.size)]), lc)
        sub = (np.arange(3) - 1) / 3.0
        for j in range(n_calc):
            if j % 2:
                cyx = ((seed_c[0] + 0.5) * lp + rng.normal(0, 6.0), (seed_c[1] + 0.5) * lp + rng.normal(0, 6.0))
            else:
                ii, jj = divmod(int(cand[rng.integers(cand.size)]), lc)
                cyx = ((ii + rng.random()) * lp, (jj + rng.random()) * lp)
            r_mm = rng.uniform(0.1, 0.35)
            iy, ix = int(cyx[0] / px), int(cyx[1] / px)
            h = int(math.ceil(r_mm / px)) + 1
            if not (h <= iy < rows - h and h <= ix < cols - h) or cov[iy, ix] < 1.0:
                continue
            yy = ((np.arange(iy - h, iy + h + 1) + 0.5) * px)[:, None]
            xx = ((np.arange(ix - h, ix + h + 1) + 0.5) * px)[None, :]
            acc = np.zeros((2 * h + 1, 2 * h + 1))
            for oy in sub:
                for ox in sub:
                    rho2 = (yy + oy * px - cyx[0]) ** 2 + (xx + ox * px - cyx[1]) ** 2
                    acc += 2.0 * np.sqrt(np.clip(r_mm**2 - rho2, 0.0, None))
            attn[iy - h: iy + h + 1, ix - h: ix + h + 1] += ((MU_CALC - MU_FAT) * acc / 9.0).astype(np.float32)

    # truth masks (subsampled 2x) for the glandular fraction
    breast_fr = cov[::2, ::2] > 0.5
    if m is not None:
        r1, c1, mw = m
        mm = np.zeros(shape, bool)
        mm[:r1, :c1] = mw >= 0.5
        breast_fr &= ~mm[::2, ::2]
    if mlo and G["imf_visible"]:
        breast_fr &= ~_abdomen(G, y[::2], x[::2])
    dense_fr = (Zu[::2, ::2] > 0) & (hole[::2, ::2] < 0.5)
    pd_approx = float(dense_fr[breast_fr].sum() / max(int(breast_fr.sum()), 1))
    return dict(attn=attn.astype(np.float32), cov=cov, pd_approx=pd_approx, edge_W=W, edge_p=pw,
                subcut_mm=subcut, retro_mm=retro)


# ----------------------------------------------------------------------------- acquisition + processing
def _motion_kernel(length_px: float, angle_canon_deg: float) -> np.ndarray:
    """Normalised line kernel (uniform motion during the exposure), bilinear splatting."""
    th = math.radians(angle_canon_deg)
    dr, dc = -math.sin(th), math.cos(th)
    n = max(2, int(math.ceil(8 * length_px)))
    tt = (np.arange(n) + 0.5) / n - 0.5
    rr, cc = tt * length_px * dr, tt * length_px * dc
    h = int(math.ceil(length_px / 2.0)) + 1
    K = np.zeros((2 * h + 1, 2 * h + 1), np.float64)
    for r, c in zip(rr + h, cc + h):
        r0, c0 = int(math.floor(r)), int(math.floor(c))
        fr, fc = r - r0, c - c0
        K[r0, c0] += (1 - fr) * (1 - fc)
        K[r0 + 1, c0] += fr * (1 - fc)
        K[r0, c0 + 1] += (1 - fr) * fc
        K[r0 + 1, c0 + 1] += fr * fc
    return (K / K.sum()).astype(np.float32)


def _convolve_fft(img: np.ndarray, K: np.ndarray) -> np.ndarray:
    h = K.shape[0] // 2
    p = np.pad(img, h + 2, mode="reflect")
    s = (sfft.next_fast_len(p.shape[0], real=True), sfft.next_fast_len(p.shape[1], real=True))
    Kp = np.zeros(s, np.float32)
    Kp[: K.shape[0], : K.shape[1]] = K
    Kp = np.roll(Kp, (-h, -h), axis=(0, 1))
    out = sfft.irfft2(sfft.rfft2(p, s) * sfft.rfft2(Kp), s)
    return out[h + 2: h + 2 + img.shape[0], h + 2: h + 2 + img.shape[1]].astype(np.float32)


def _render(index: int) -> tuple[np.ndarray, dict]:
    src, mod = _source(index)
    G = _geom(src)
    A = _anatomy(src)
    px, T = G["px"], G["T"]
    rows, cols = G["rows"], G["cols"]
    shape = (rows, cols)
    rng = np.random.default_rng([SEED, src, 2])  # a copy keeps its source's noise and vendor draws
    brng = np.random.default_rng([SEED, G["k"], 3])  # detector / vendor constants of the breast's unit
    mlo = G["view"] == "MLO"
    sigma_det = float(brng.uniform(0.48, 0.58))
    detail_gain = float(brng.choice([0.0, 0.0, brng.uniform(0.15, 0.4)]))
    detail_sigma = float(brng.uniform(0.25, 0.45))
    spr = float(np.clip(0.30 + 0.30 * (T - 30.0) / 45.0 + rng.uniform(-0.03, 0.03), 0.30, 0.60))
    sig_s = float(rng.uniform(15.0, 30.0))
    n_fat = float(rng.uniform(1.5e5, 3.0e5)) * px * px  # quanta per pixel behind the fatty interior
    f_eq = float(rng.uniform(0.3, 0.8))
    d_ref = float(rng.uniform(30.0, 40.0))
    k_tone, x0_tone = float(rng.uniform(3.0, 5.0)), float(rng.uniform(0.35, 0.55))
    beta_toe = float(rng.uniform(0.15, 0.25))
    usm_sigma, usm_gain = float(rng.uniform(2.0, 5.0)), float(rng.uniform(0.3, 1.0))

    # --- acquisition: primary fluence, motion during the exposure, detector presampling blur
    i0 = n_fat * math.exp(MU_FAT * (T - 2 * SKIN_MM) + MU_SKIN * 2 * SKIN_MM) / (1.0 + spr)
    prim = np.exp(-A["attn"]) * np.float32(i0)
    blur_mm = float(mod.get("blur_mm", 0.0))
    ang = float(mod.get("blur_angle_deg", 0.0))
    if blur_mm > 0:
        ang_c = (180.0 - ang) % 180.0 if G["lat"] == "R" else ang
        prim = _convolve_fft(prim, _motion_kernel(blur_mm / px, ang_c))
    prim = ndi.gaussian_filter(prim, sigma_det, mode="nearest")
    sig_v = sig_h = sigma_det
    excess = None
    if "aniso_axis" in mod:  # extra spread in the converter, after quantum absorption
        e2 = -math.log(mod["aniso_ratio"]) / (2 * math.pi**2 * 0.25**2)
        excess = math.sqrt(e2)
        if mod["aniso_axis"] == "vertical":
            sig_v = math.sqrt(sigma_det**2 + e2)
        else:
            sig_h = math.sqrt(sigma_det**2 + e2)
    # scatter (low-frequency, from the primary inside the breast)
    f8 = max(1, int(round(1.0 / px)))
    src_lo = _down(prim * A["cov"], f8)
    scat = spr * _up(ndi.gaussian_filter(src_lo, sig_s / (px * f8), mode="constant"), f8, shape)
    q = prim + scat
    nrng = np.random.default_rng([SEED, src, 4])
    det = q + np.sqrt(q) * nrng.standard_normal(shape, dtype=np.float32)
    if excess is not None:
        sg = (excess, 0.0) if mod["aniso_axis"] == "vertical" else (0.0, excess)
        det = ndi.gaussian_filter(det, sg, mode="nearest")
    det += 2.0 * nrng.standard_normal(shape, dtype=np.float32)
    det = np.maximum(det, 0.5)
    L = np.log(np.float32(i0) / det).astype(np.float32)

    # --- vendor processing: periphery equalisation on a ~0.6 mm grid
    fl = max(1, int(round(0.6 / px)))
    lp = px * fl
    Lb = _down(L, fl)
    seg = Lb > 0.06
    lab, nlab = ndi.label(seg)
    if nlab > 1:
        sizes = ndi.sum(seg, lab, index=np.arange(1, nlab + 1))
        seg = lab == (1 + int(np.argmax(sizes)))
    seg = ndi.binary_fill_holes(seg)
    pads = (mlo, mlo and G["imf_visible"], True)
    d_est = _edt_mm(seg, lp, pads, 45.0)
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
    for kk in range(edges.size - 1):
        vals = lsorted[starts[kk]: starts[kk + 1]]
        if vals.size >= 5:
            prof[kk] = np.percentile(vals, 20)
    prof = np.where(np.isnan(prof), plateau, prof)
    prof = np.minimum(np.maximum.accumulate(prof), plateau)
    centres = 0.5 * (edges[:-1] + edges[1:])
    deficit_lo = np.interp(d_est, centres, plateau - prof, right=0.0) * segf
    deficit_lo = ndi.gaussian_filter(deficit_lo, 1.0).astype(np.float32)
    weight = np.clip(L / 0.15, 0.0, 1.0) * (_up(segf, fl, shape) > 0.5)
    L_eq = L + f_eq * _up(deficit_lo, fl, shape) * weight
    Lb_eq = Lb + f_eq * deficit_lo

    # tone curve
    stat = seg & (d_est > d_ref)
    if stat.sum() < 2000:
        stat = seg & (d_est > 8.0)
    # fat reference: the darkest interior tissue, but never above the vendor's own estimate of fat at
    # this thickness (from BodyPartThickness), so that a dense breast's few fat bands stay grey
    l_fat_phys = MU_FAT * (T - 2 * SKIN_MM) + MU_SKIN * 2 * SKIN_MM - math.log(1.0 + spr)
    l_fat = min(float(np.percentile(Lb_eq[stat], 3)), l_fat_phys + 0.02)
    l_hi = float(np.percentile(Lb_eq[stat], 99.7))
    rng_l = max(l_hi - l_fat, 0.5 * (MU_GLAND - MU_FAT) * T)
    x_air = -l_fat / rng_l
    y_air = expit(k_tone * (x_air - x0_tone))

    def tone(xv):
        sig = (expit(k_tone * (xv - x0_tone)) - y_air) / (1.0 - y_air)
        lin = (xv - x_air) / (1.0 - x_air)
        return np.clip((1.0 - beta_toe) * sig + beta_toe * lin, 0.0, 1.0)

    def usm(img):
        blur = _up(ndi.gaussian_filter(_down(img, fl), usm_sigma / lp, mode="nearest"), fl, shape)
        out = img + usm_gain * (img - blur)
        if detail_gain > 0:  # fine-detail enhancement of some vendors
            out = out + detail_gain * (img - ndi.gaussian_filter(img, detail_sigma / px, mode="nearest"))
        return out

    xv = (L_eq - l_fat) / rng_l
    photometric, voi, bits, maker = _STYLES[G["style"]]
    vmax = (1 << bits) - 1
    out: dict = dict(spr=spr, scatter_sigma_mm=sig_s, quanta_fat=n_fat, equalisation_fraction=f_eq,
                     tone_slope=k_tone, tone_centre=x0_tone, usm_sigma_mm=usm_sigma, usm_gain=usm_gain,
                     detail_gain=detail_gain, detail_sigma_mm=detail_sigma,
                     detector_sigma_px=(sig_v, sig_h), photometric=photometric, voi=voi, bits=bits,
                     manufacturer=maker)
    if voi == "lut":
        x_lo, x_hi = x_air - 0.1, 1.8
        r = np.clip((usm(xv) - x_lo) / (x_hi - x_lo), 0.0, 1.0)
        v = 1 + np.rint(r * (vmax - 1)).astype(np.int32)
        grid = x_lo + (np.arange(vmax + 1) - 1) / (vmax - 1) * (x_hi - x_lo)
        out["lut_bright"] = tone(grid)
    else:
        g0, g1, ng = x_air - 2.0, 4.0, 1 << 18  # tone curve through a fine table (same values, faster)
        table = tone(np.linspace(g0, g1, ng)).astype(np.float32)
        yv = table[np.clip(np.rint((usm(xv) - g0) * ((ng - 1) / (g1 - g0))), 0, ng - 1).astype(np.int32)]
        if voi == "window":
            lo = int(round(rng.uniform(0.05, 0.20) * vmax))
            hi = int(round(rng.uniform(0.75, 0.95) * vmax))
        else:
            lo, hi = 1, vmax
        v = lo + np.rint(yv * (hi - lo)).astype(np.int32)
        out["window_lo_hi"] = (lo, hi)
    stored = (vmax - v) if photometric == "MONOCHROME1" else v
    return stored.astype(np.uint16), out


# ----------------------------------------------------------------------------- DICOM
def _uid(key: int | str, what: str) -> str:
    h = hashlib.sha256(f"medsendx phantom_positioning|{SEED}|{key}|{what}".encode()).digest()
    return "2.25." + str(int.from_bytes(h[:16], "big"))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _dataset(index: int, stored: np.ndarray, G: dict, R: dict, exam: str) -> FileDataset:
    sop_uid = _uid(index, "sop")
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = SOP_CLASS_MG_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid("impl", "implementation")
    meta.ImplementationVersionName = "PHANTOM_POS1"
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\x00" * 128)
    px, lat, view = G["px"], G["lat"], G["view"]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = SOP_CLASS_MG_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20250301"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = f"{8 + index // 10:02d}{index % 60:02d}00"
    ds.AccessionNumber = f"PPOS{exam}"
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = R["manufacturer"]
    ds.ManufacturerModelName = f"Pos{int(round(px * 1000)):03d}"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Positioning phantom"
    ds.SeriesDescription = f"{lat} {view}"
    ds.PatientName = f"PHANTOM^POSITIONING^{exam}"
    ds.PatientID = f"PPOS-{exam}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.BodyPartExamined = "BREAST"
    ds.BodyPartThickness = f"{G['T']:.1f}"
    ds.CompressionForce = "100"
    ds.KVP = "28"
    ds.DetectorType = "DIRECT" if px < 0.08 else "SCINTILLATOR"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.ViewPosition = view
    ds.ImageLaterality = lat
    ds.PatientOrientation = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"],
                             ("L", "MLO"): ["A", "FR"], ("R", "MLO"): ["P", "FL"]}[(lat, view)]
    ds.AnatomicRegionSequence = Sequence([_code("76752008", "SCT", "Breast")])
    view_code = _code(*{"CC": ("399162004", "SCT", "cranio-caudal"),
                        "MLO": ("399368009", "SCT", "medio-lateral oblique")}[view])
    view_code.ViewModifierCodeSequence = Sequence([])
    ds.ViewCodeSequence = Sequence([view_code])
    ds.StudyInstanceUID = _uid(exam, "study")
    ds.SeriesInstanceUID = _uid(index, "series")
    ds.FrameOfReferenceUID = _uid(exam, "for")
    ds.StudyID = exam[:16]
    ds.SeriesNumber = 1 + index % 2
    ds.InstanceNumber = 1
    ds.ImagerPixelSpacing = [px, px]
    ds.PixelSpacing = [px, px]
    ds.EstimatedRadiographicMagnificationFactor = "1.0"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = R["photometric"]
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = R["bits"]
    ds.HighBit = R["bits"] - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if R["photometric"] == "MONOCHROME1" else -1
    ds.PresentationLUTShape = "INVERSE" if R["photometric"] == "MONOCHROME1" else "IDENTITY"
    vmax = (1 << R["bits"]) - 1
    if R["voi"] == "lut":
        bright = R["lut_bright"]
        lut = np.rint((1.0 - bright[::-1]) * 65535) if R["photometric"] == "MONOCHROME1" else np.rint(bright * 65535)
        item = Dataset()
        item.LUTDescriptor = [vmax + 1, 0, 16]
        item.LUTExplanation = "SIGMOID TONE"
        item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())
        ds.VOILUTSequence = Sequence([item])
    else:
        lo, hi = R["window_lo_hi"]
        if R["photometric"] == "MONOCHROME1":
            lo, hi = vmax - hi, vmax - lo
        ds.WindowCenter = f"{(lo + hi) / 2 + 0.5:.1f}"
        ds.WindowWidth = f"{hi - lo + 1:.1f}"
        ds.VOILUTFunction = "LINEAR"
        ds.WindowCenterWidthExplanation = "DEFAULT"
    ds.PixelData = stored.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


# ----------------------------------------------------------------------------- truth
def _stored_rc(G: dict, p: tuple[float, float]) -> tuple[float, float]:
    """Canonical (y, x) in mm -> stored (row, col), pixel-centre coordinates (image edges at -0.5 and
    N - 0.5)."""
    px = G["px"]
    r, c = p[0] / px - 0.5, p[1] / px - 0.5
    if G["lat"] == "R":
        c = G["cols"] - 1 - c
    return (float(r), float(c))


def _truth(index: int) -> dict:
    src, mod = _source(index)
    G = _geom(src)
    k, view = G["k"], G["view"]
    other = _breast(k)["CC" if view == "MLO" else "MLO"]
    mlo = view == "MLO"
    defects = list(G["defects"])
    blur_mm = float(mod.get("blur_mm", 0.0))
    if blur_mm >= 0.4:
        defects.append(MB)
    breast = f"B{k:02d}" if index < N_ORIGINAL else f"B{k:02d}-copy{index}"
    info = dict(
        index=index, breast=breast, laterality=G["lat"], view=view, spacing_mm=G["px"],
        rows=G["rows"], cols=G["cols"],
        nipple_rc=_stored_rc(G, G["nipple"]), nipple_in_profile=bool(G["nipple_in_profile"]),
        nipple_offset=G["nipple_offset"], nipple_skin_distance_mm=float(G["nipple_skin_mm"]),
        pnl_mm=float(G["pnl"]),
        blur_mm=blur_mm, blur_angle_deg=float(mod.get("blur_angle_deg", 0.0)),
        defects=defects, well_positioned=not defects,
        positioning_defects=[d for d in defects if d != MB],
        source_index=src if index >= N_ORIGINAL else None, source_breast=f"B{k:02d}",
        anisotropic_detector=mod.get("aniso_axis"), detector_mtf_ratio_mid=float(mod.get("aniso_ratio", 1.0)),
        thickness_mm=G["T"], pd_target=G["pd"], cc_semi_axis_mm=G["a"], mlo_depth_mm=G["depth"],
    )
    if mlo:
        info.update(
            pectoral_line=(_stored_rc(G, (0.0, G["a_top"])), _stored_rc(G, (G["y_p"], 0.0))),
            pectoral_lowest_rc=_stored_rc(G, (G["y_p"], 0.0)),
            pectoral_reaches_pnl=bool(G["reach"] >= 0.0),
            pectoral_reach_mm=float(G["reach"]),
            pnl_foot_rc=_stored_rc(G, G["foot"]),
            pectoral_sagitta_mm=float(G["sagitta"]),
            pectoral_angle_deg=float(math.degrees(G["phi"])),
            pectoral_top_width_mm=float(G["a_top"]),
            imf_visible=bool(G["imf_visible"]),
            imf_rc=_stored_rc(G, G["imf"]) if G["imf_visible"] else None,
            partner_pnl_mm=float(other["pnl"]), cc_minus_mlo_pnl_mm=float(other["pnl"] - G["pnl"]),
        )
    else:
        info.update(pectoral_line=None, pectoral_lowest_rc=None, pectoral_reaches_pnl=None,
                    pectoral_reach_mm=None, pnl_foot_rc=None, pectoral_sagitta_mm=None, pectoral_angle_deg=None,
                    pectoral_top_width_mm=None, imf_visible=None, imf_rc=None,
                    partner_pnl_mm=float(other["pnl"]), cc_minus_mlo_pnl_mm=float(G["pnl"] - other["pnl"]))
    return info


# ----------------------------------------------------------------------------- public API
def case(index: int) -> tuple[FileDataset, dict]:
    """Deterministic case ``index`` (0..N_CASES-1): (DICOM dataset, truth/info dict)."""
    src, _mod = _source(index)
    if index >= N_ORIGINAL:
        _check_sources()
    G = _geom(src)
    info = _truth(index)
    stored, R = _render(index)
    if G["lat"] == "R":
        stored = stored[:, ::-1].copy()
    exam = f"B{G['k']:02d}" if index < N_ORIGINAL else f"B{G['k']:02d}C{index}"
    ds = _dataset(index, stored, G, R, exam)
    A = _anatomy(src)
    info.update(pd_approx=A["pd_approx"], edge_width_mm=float(A["edge_W"]), edge_power=float(A["edge_p"]),
                subcutaneous_fat_mm=float(A["subcut_mm"]), retromammary_fat_mm=float(A["retro_mm"]))
    info.update({k: v for k, v in R.items() if k not in ("lut_bright",)})
    return ds, info


def cases() -> list[tuple[FileDataset, dict]]:
    return [case(i) for i in range(N_CASES)]


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
        yv = lut[np.clip(a.astype(np.int64) - first, 0, n - 1)] / ((1 << nbits) - 1)
    elif "WindowCenter" in ds:
        c = float(ds.WindowCenter if not isinstance(ds.WindowCenter, pydicom.multival.MultiValue) else ds.WindowCenter[0])
        w = float(ds.WindowWidth if not isinstance(ds.WindowWidth, pydicom.multival.MultiValue) else ds.WindowWidth[0])
        yv = np.clip((a - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    else:
        yv = (a - a.min()) / max(a.max() - a.min(), 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        yv = 1.0 - yv
    return yv
