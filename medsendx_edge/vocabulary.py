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


class UploadState(enum.StrEnum):
    """The states of an item in the durable upload queue (the ``state`` column of ``queue``)."""

    QUEUED = "queued"            # waiting to be sent (or sent again)
    COMMITTING = "committing"    # stored at a DIMSE PACS, waiting for its storage commitment
    DELIVERED = "delivered"      # the destination has it (and committed to it, where asked)
    DUPLICATE = "duplicate"      # an exact copy of an item already queued or delivered: never sent
    QUARANTINED = "quarantined"  # refused by the destination for good (moved to quarantine/upload)
    MISSING = "missing"          # its outbox file vanished (requeued when it comes back)


class Outcome(enum.StrEnum):
    """The ``outcome`` field of a file's log events: one word each, never a sentence (the reason goes in
    ``reason``)."""

    DONE = "done"                                # this stage's work is done (for the uploader: delivered)
    PRESENT = "present"                          # the destination already had it: nothing sent twice
    AWAITING_COMMITMENT = "awaiting_commitment"  # stored; the PACS's storage commitment is awaited
    RETRY_LATER = "retry_later"                  # deferred: the machine or the link, not the file
    RESEND = "resend"                            # to be sent again (a commitment failed or never came)
    QUARANTINE = "quarantine"                    # parked in quarantine/ with its reason


class Uplink(enum.StrEnum):
    """What the uploader last knew of its link (state key ``uplink``; the reason of a pause apart)."""

    UP = "up"
    DOWN = "down"      # the destination cannot be reached: retried with backoff
    PAUSED = "paused"  # the destination refuses us (credentials, certificate, a wrong path): one probe a while


class StateKey(enum.StrEnum):
    """The keys of the state database's key-value table; per-item or per-destination keys are a
    :class:`KeyPrefix` and a suffix (:func:`state_key`)."""

    UPLINK = "uplink"
    UPLINK_REASON = "uplink_reason"
    UPLINK_DOWN_SINCE = "uplink_down_since"
    LAST_SUCCESS = "last_success"
    BYTES_NOT_RESENT = "bytes_not_resent"
    INBOX_IGNORED = "inbox_ignored"
    FLEET_LAST_SHIPPED = "fleet_last_shipped"        # a time: the feature watermark of releases before seq (kept)
    FLEET_EXAMS_SHIPPED = "fleet_exams_shipped"      # a time: their exam watermark (kept, for a downgrade)
    FLEET_SHIPPED_SEQ = "fleet_shipped_seq"          # the number of the last feature row shipped
    FLEET_EXAMS_SHIPPED_SEQ = "fleet_exams_shipped_seq"   # the number of the last exam record shipped
    FLEET_LAST_SHIPPED_MINE = "fleet_last_shipped_mine"    # FLEET_LAST_SHIPPED as this release last wrote it
    FLEET_EXAMS_SHIPPED_MINE = "fleet_exams_shipped_mine"  # FLEET_EXAMS_SHIPPED likewise (else a downgrade ran)
    FLEET_SHIPPING = "fleet_shipping"     # a shipment begun by a release before seq: [since, until, id]
    FLEET_SHIPPING_SEQ = "fleet_shipping_seq"   # a feature shipment begun: {"seq": [after, upto], "until", "id"}
    RESTART_PENDING = "restart_pending"   # the keys a reload could not apply, until the next start
    CONFIG_APPLIED = "config_applied"     # sha256 of the config file the daemon runs on (start, reload)
    CONFIG_REJECTED = "config_rejected"   # "<sha256> <epoch s> <reason>" of the last file a reload refused


class KeyPrefix(enum.StrEnum):
    ACK = "ack"                # ack:<item id>: when the radiographer acknowledged a recheck alert
    LAST_ERROR = "last_error"  # last_error:<destination kind>: the destination's last error
    REFUSED_SYNTAX = "refused_syntax"  # refused_syntax:<destination key>: transfer syntaxes it refused (JSON)


def state_key(prefix: KeyPrefix, suffix: str) -> str:
    return f"{prefix.value}:{suffix}"

#: The per-image feature row (no patient data) that triage records and the fleet miner pools.
FEATURE_COLUMNS = (
    "station_name", "acquired_date", "manufacturer", "model", "kvp", "exposure_mas", "thickness_mm",
    "compression_n", "bg_c", "fat_c", "dense_c", "contrast", "noise_bg", "noise_fat", "snr_fat", "cnr",
    "mean_breast", "pd", "breast_frac", "saturated_frac",
    "view", "laterality", "presentation_intent", "implant", "exam", "category", "burnout_frac",
    "anode", "filter", "blur_ratio", "positioning_failed",
    "organ_dose_mgy", "entrance_dose_mgy", "exposure_control_mode",
)
TEXT_COLUMNS = {"station_name", "acquired_date", "manufacturer", "model", "view", "laterality",
                "presentation_intent", "exam", "category", "anode", "filter", "positioning_failed",
                "exposure_control_mode"}
#: The positioning and sharpness checks (triage/positioning.py), by name.
POSITIONING_CHECKS = ("pectoral_to_pnl", "nipple_in_profile", "imf_visible", "motion_blur", "pnl_cc_mlo")
#: Every numeric metric a triage rule may test.
RULE_METRICS = frozenset(c for c in FEATURE_COLUMNS if c not in TEXT_COLUMNS) | {
    "body_frac", "breast_area_cm2", "pectoral_frac", "clipped_frac", "cut_off",
    "pnl_mm", "pectoral_shortfall_mm", "nipple_bump_mm", "imf_visible", "blur_ratio", "positioning_failures"}
