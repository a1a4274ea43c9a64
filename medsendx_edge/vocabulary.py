"""Names shared by the config, the stages and the fleet miner, defined once and importing nothing of
the package (the config validates triage rules against these without importing a stage)."""

from __future__ import annotations

import enum


class Priority(enum.IntEnum):
    """Upload priority, most urgent first: the number orders the upload queue."""

    RECHECK = 0  # technically unfit: retake while the woman is still on the truck
    HIGH = 1     # dense (estimated category c or d) or asymmetric exam: read first
    NORMAL = 2
    LOW = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def of(cls, name: str | None, default: "Priority | None" = None) -> "Priority":
        """The priority called ``name`` ("recheck", "high"...), else ``default`` (NORMAL)."""
        try:
            return cls[str(name).upper()]
        except KeyError:
            return default if default is not None else cls.NORMAL


PRIORITY_NAMES = tuple(p.label for p in Priority)

#: The per-image feature row (no patient data) that triage records and the fleet miner pools.
FEATURE_COLUMNS = (
    "station_name", "acquired_date", "manufacturer", "model", "kvp", "exposure_mas", "thickness_mm",
    "compression_n", "bg_c", "fat_c", "dense_c", "contrast", "noise_bg", "noise_fat", "snr_fat", "cnr",
    "mean_breast", "pd", "breast_frac", "saturated_frac",
    "view", "laterality", "presentation_intent", "implant", "exam", "category", "burnout_frac",
    "anode", "filter", "blur_ratio", "positioning_failed",
)
TEXT_COLUMNS = {"station_name", "acquired_date", "manufacturer", "model", "view", "laterality",
                "presentation_intent", "exam", "category", "anode", "filter", "positioning_failed"}
#: The positioning and sharpness checks (triage/positioning.py), by name.
POSITIONING_CHECKS = ("pectoral_to_pnl", "nipple_in_profile", "imf_visible", "motion_blur", "pnl_cc_mlo")
#: Every numeric metric a triage rule may test.
RULE_METRICS = frozenset(c for c in FEATURE_COLUMNS if c not in TEXT_COLUMNS) | {
    "body_frac", "breast_area_cm2", "pectoral_frac", "clipped_frac", "cut_off",
    "pnl_mm", "pectoral_shortfall_mm", "nipple_bump_mm", "imf_visible", "blur_ratio", "positioning_failures"}
