"""Configuration: frozen dataclasses built by one :func:`load_config`.

Every bad key or value is rejected with a message that names the key and the
value, for example ``upload.max_backoff_s: must be >= 2 (got 1)``.
Relative paths in a config file are resolved against that file's folder (the daemon started from
another working directory finds the same spool and, above all, the same secrets); the built-in
defaults, used without a file, against the working directory.
Secrets are never in the YAML: only the names of the files that hold them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from medsendx_edge.errors import ConfigError
from medsendx_edge.vocabulary import POSITIONING_CHECKS, RULE_METRICS

ENV_CONFIG = "MEDSENDX_EDGE_CONFIG"
DEFAULT_CONFIG_PATHS = (Path("config/medsendx-edge.yaml"), Path("/etc/medsendx-edge/medsendx-edge.yaml"))


def _opt(default: Any, doc: str, *, min: float | None = None, max: float | None = None,
         restart: bool = False) -> Any:
    """A config option: its default, what it does (the example YAML and docs/operations.md are generated
    from it, see config_reference.py), its bounds, and whether a reload applies it or it needs a restart."""
    return field(default=default, metadata={"min": min, "max": max, "doc": doc, "restart": restart})


@dataclass(frozen=True)
class WatchConfig:
    """How the inbox (the modality's drop folder) is watched."""

    mode: Literal["native", "polling"] = _opt(
        "native", "native (inotify) | polling (network shares that send no events)")
    stable_seconds: float = _opt(2.0, "a file is taken once its size and mtime are unchanged this long", min=0.0)
    take_on_close: bool = _opt(
        True, "native mode: a file closed after writing (inotify's close-write) or renamed into place that is a "
        "whole image (Rows, Columns and all its pixel data in the file) is taken at once, without the "
        "stable_seconds wait (a retake alert 2 s sooner); anything else waits as before; off for a modality "
        "that writes a whole image, closes it, then reopens it to append")
    rescan_seconds: float = _opt(30.0, "full rescan of the inbox, whatever the events say", min=0.1)
    incomplete_grace_s: float = _opt(
        120.0, "a stable file that is visibly unfinished (cut inside an element, an image header without its "
        "pixel data, a preamble still being written) and modified this recently stays in the inbox (the "
        "modality may have paused, or reopens the file to append); after that it is quarantined with the reason; "
        "an emptied sub-folder of the inbox is removed once untouched this long",
        min=0.0)
    ignored_report_s: float = _opt(
        3600.0, "inbox files with hidden or temporary names untouched this long are reported "
        "(inbox_files_ignored; status turns unhealthy)", min=0.0)


@dataclass(frozen=True)
class DestinationConfig:
    """Where anonymized images go (the uploader's one destination)."""

    kind: Literal["directory", "dicomweb", "http", "dimse", "s3"] = _opt(
        "directory", "directory | dicomweb (STOW-RS) | http (PUT/POST) | dimse (C-STORE) | s3 (an S3-compatible "
        "object store: resumable multipart uploads)")
    path: Path | None = _opt(Path("./var/archive"), "directory: the folder files are copied into")
    url: str | None = _opt(None, "dicomweb / http: e.g. https://pacs.example/dicom-web; redirects are never followed")
    username: str | None = _opt(None, "dicomweb / http: basic authentication user")
    password_file: Path | None = _opt(None, "a file holding the password (mode 0600; never the password itself)")
    token_file: Path | None = _opt(None, "a file holding a bearer token (or MEDSENDX_EDGE_TOKEN in the environment)")
    require_mount: bool = _opt(False, "directory: the folder (or its parent) is the mount point of a share or "
                               "disk; while it is not mounted nothing is copied (the local disk never fills "
                               "in its place) and the queue waits")
    ca_bundle: Path | None = _opt(None, "extra CA bundle for TLS (dicomweb, http, dimse)")
    verify_tls: bool = _opt(True, "check the server's certificate")
    http_method: Literal["PUT", "POST"] = _opt("POST", "http: PUT | POST")
    delivery_proof: Literal["response", "status"] = _opt(
        "response", "http: what proves a delivery: a 2xx with a body, ETag or Location (response) | any 2xx (status)")
    timeout_s: float = _opt(
        60.0, "seconds without progress (bytes acknowledged by the peer) before a send is cut (a slow link that "
        "moves is never cut), and the bound on the whole answer once the body is acknowledged", min=0.1)
    compression: Literal["none", "jpeg-ls", "jpeg2000", "rle", "deflate"] = _opt(
        "jpeg-ls", "lossless re-encoding in the route stage (never the uploader): verified identical, only when "
        "smaller, compressed inputs untouched; jpeg-ls for a 4G uplink (about 2:1 on real mammograms for "
        "0.2 s of CPU each), none on a LAN; a destination that refuses the syntax gets the file decoded and "
        "sent again, and is remembered (docs/compression.md)")
    host: str | None = _opt(None, "dimse: the PACS's DICOM host")
    port: int | None = _opt(None, "dimse: the PACS's DICOM port", min=1, max=65535)
    called_aet: str = _opt("ANY-SCP", "dimse: the PACS's AE title")
    calling_aet: str = _opt("MEDSENDX", "dimse: our AE title (the PACS must know it)")
    tls: bool = _opt(False, "dimse: DICOM TLS to the PACS (its certificate checked against ca_bundle)")
    tls_cert_file: Path | None = _opt(None, "dimse: our client certificate, when the PACS asks for one")
    tls_key_file: Path | None = _opt(None, "dimse: its private key")
    storage_commitment: bool = _opt(
        False, "dimse: Storage Commitment (PS3.4 Annex J): a stored instance is 'committing', its file kept in "
        "the outbox, until the PACS's N-EVENT-REPORT commits to it; a failure it names is sent again")
    commitment_port: int | None = _opt(
        None, "dimse: port where the PACS's reports arrive on a reverse association (from called_aet only; the "
        "PACS must know calling_aet at this address); null: reports on the sending association only",
        min=1, max=65535)
    commitment_bind: str = _opt("127.0.0.1", "dimse: address of that port")
    commitment_timeout_s: float = _opt(
        600.0, "dimse: seconds without a report before the commitment is asked for again", min=1.0)
    commitment_requests: int = _opt(
        3, "dimse: unanswered requests after which the instance is sent again", min=1)
    bucket: str | None = _opt(None, "s3: the bucket (url: the endpoint; username: the access key id; "
                              "password_file: the secret access key)")
    key_prefix: str | None = _opt(None, "s3: prefix of the object keys, e.g. truck-07/ (the key is prefix + export id)")
    region: str = _opt("us-east-1", "s3: the region the signature names")
    part_size_mb: float = _opt(8.0, "s3: multipart part size: a cut loses at most one part (S3's minimum is 5)",
                               min=5.0, max=5120.0)
    sse: Literal["AES256", "aws:kms", "none"] = _opt(
        "AES256", "s3: server-side encryption requested for every object")


@dataclass(frozen=True)
class UploadConfig:
    """The uploader thread: retries and the sent/ folder."""

    initial_backoff_s: float = _opt(2.0, "first retry delay (exponential backoff with full jitter)", min=0.01)
    max_backoff_s: float = _opt(
        600.0, "longest retry delay, and the probe period while the destination is at fault", min=0.01)
    sent_retention_days: float = _opt(
        30.0, "sent/ keeps delivered files (with their pictures and sidecars) this long", min=0.0)
    bandwidth_limit_bps: int | None = _opt(None, "cap on upload bytes per second (metered links)", min=1)


@dataclass(frozen=True)
class LogConfig:
    """JSON lines on stderr (journald) or stdout (a container), without patient data."""

    format: Literal["json", "console", "auto"] = _opt("json", "json | console | auto (console on a terminal)")
    level: Literal["debug", "info", "warning", "error"] = _opt("info", "debug | info | warning | error")
    stream: Literal["stderr", "stdout"] = _opt("stderr", "stderr (journald) | stdout (a container's log)",
                                               restart=True)


@dataclass(frozen=True)
class AnonymizeConfig:
    """PS3.15 Annex E Basic Profile and its options (docs/privacy.md); the defaults are the safest."""

    secret_file: Path = _opt(Path("./var/secrets/site-secret.key"),
                             "HMAC key for pseudonyms and UIDs; created 0600 if missing")
    linkage_key_file: Path = _opt(Path("./var/secrets/linkage.key"),
                                  "Fernet key of the re-identification table (state/linkage.db)")
    patient_name: Literal["pseudonym", "empty"] = _opt("pseudonym", "pseudonym | empty")
    retain_patient_characteristics: bool = _opt(False, "Retain Patient Characteristics Option: sex, age, size, weight")
    retain_device_identity: bool = _opt(False, "Retain Device Identity Option: serial numbers, detector ids")
    retain_institution_identity: bool = _opt(False, "Retain Institution Identity Option")
    retain_longitudinal: Literal["off", "modified_dates", "full_dates"] = _opt(
        "off", "off | modified_dates (shifted per patient) | full_dates (Retain Longitudinal Temporal Information)")
    clean_descriptors: bool = _opt(False, "Clean Descriptors Option: keep descriptions made of safe words only")
    retain_safe_private: bool = _opt(False, "Retain Safe Private Option, for the tags listed below")
    safe_private_tags: tuple[str, ...] = _opt((), 'private tags known safe, "GGGG,EE,Private Creator" (hex)')
    burned_in: Literal["quarantine", "allow"] = _opt(
        "quarantine", "images that say they carry burned-in annotation: quarantine | allow")


@dataclass(frozen=True)
class TriageRule:
    """``metric op value`` gives ``priority``; e.g. ``{metric: pd, op: ">=", value: 0.5, priority: high}``."""

    metric: str = _opt("pd", "a feature column or a quality metric (docs/triage.md)")
    op: Literal[">", ">=", "<", "<=", "=="] = _opt(">=", "> | >= | < | <= | ==")
    value: float = _opt(0.5, "the threshold")
    priority: Literal["recheck", "high", "normal", "low"] = _opt("high", "recheck | high | normal | low")
    reason: str | None = _opt(None, "what the radiographer reads")


DEFAULT_RULES = (
    TriageRule("burnout_frac", ">", 0.01, "recheck",
               "burn-out: tissue at background values inside the skin line (over 1% of the breast)"),
    TriageRule("clipped_frac", ">", 0.05, "recheck", "clipping: a plateau at the top of the range over 5% of the breast"),
    TriageRule("snr_fat", "<", 7.0, "recheck", "underexposed or noisy: fat signal-to-noise under 7"),
    TriageRule("cut_off", ">=", 1.0, "recheck", "breast cut off by the edge of the field"),
    TriageRule("pd", ">=", 0.33, "high",
               "dense view: this view's automated area density is 33% or more (an estimate; a category is a "
               "breast's)"),
)


@dataclass(frozen=True)
class TriageConfig:
    """Breast density and image quality while the woman is still on the truck (docs/triage.md)."""

    enabled: bool = _opt(True, "run the triage stage")
    k: int = _opt(3, "K-Means classes on the thickness-corrected breast: background + (k-1) tissue classes, "
                  "dense is the top one", min=2, max=8)
    rules: tuple[TriageRule, ...] = _opt(
        DEFAULT_RULES, "the most urgent matching rule sets the priority (recheck > high > normal > low); "
        "metrics: the numeric feature columns plus body_frac, breast_area_cm2, pectoral_frac, clipped_frac, cut_off")
    send_overlay: bool = _opt(False, "also upload the triage picture as a DICOM Secondary Capture in the study "
                              "(labelled not for diagnosis)")
    tissue_map: bool = _opt(True, "radiographs (CR, DX) and CT slices get a three-class tissue map (air, soft "
                            "tissue, bone) as a picture on the console and in reports: a visual aid, never a "
                            "priority, never sent (docs/triage.md, Tissue map)")
    send_sr: bool = _opt(True, "upload the triage result as DICOM Mammography CAD SR in the study (TID 4000): one "
                         "an exam, once its views are in or it has been quiet for 10 minutes, a new version "
                         "10 quiet minutes after a retake changes it (each view's density, each breast's "
                         "category, priority and reasons); an image not measured, one of its own saying why")
    preview_max_px: int = _opt(768, "the PNG picture's longest side", min=64, max=4096)
    threads: int = _opt(2, "images analysed at once, each in a thread of its own (numpy and OpenCV release the "
                        "interpreter lock for most of the work; the exam is still judged in arrival order): 2 "
                        "on a 2-core mini-PC, 1 to leave a core to the rest", min=1, max=8)
    birads_thresholds: tuple[float, ...] = _opt(
        (0.104, 0.330, 0.648), "automated area density where categories b, c and d begin: the midpoints "
        "between radiologists' median area densities per BI-RADS category (6.0, 14.8, 51.2 and 78.4%, "
        "Acad Radiol 2006;13:1143, 200 exams); an estimate, not a BI-RADS assessment")
    asymmetry_pd: float = _opt(
        0.15, "a left/right percent dense difference this large flags the exam as asymmetric (priority high)",
        min=0.0, max=1.0)
    positioning_recheck: tuple[str, ...] = _opt(
        ("nipple_in_profile", "pnl_cc_mlo"),
        "the positioning checks whose failure raises recheck (the others are shown as advisory): "
        "pectoral_to_pnl, nipple_in_profile, imf_visible, motion_blur, pnl_cc_mlo; by default the two the "
        "literature finds reliable and that made no false failure on the validation set; the pectoral, fold "
        "and blur checks are advisory (docs/triage.md, Positioning)")
    exam_views: tuple[str, ...] = _opt(
        ("RCC", "LCC", "RMLO", "LMLO"), "the views a complete exam has, once each (a missing one is named on "
        "the console before the woman leaves)")


@dataclass(frozen=True)
class DicomListenerConfig:
    """A C-STORE SCP so the modality can push images (besides dropping files in the inbox); locked down:
    loopback unless told otherwise, known calling AE titles only, bounded associations and bytes."""

    enabled: bool = _opt(False, "images are streamed to disk and fsynced into the queue before Success is "
                         "answered", restart=True)
    ae_title: str = _opt("MEDSENDX", "the listener's AE title", restart=True)
    bind: str = _opt("127.0.0.1", "loopback unless the modality is on another host: then the interface address",
                     restart=True)
    port: int = _opt(11112, "the listener's port", min=0, max=65535, restart=True)
    allowed_calling_aets: tuple[str, ...] = _opt(
        (), "required when enabled (check-config refuses an empty list): the modality's calling AE titles; "
        "others are rejected at association time and logged once with the AE title and peer address", restart=True)
    max_associations: int = _opt(16, "associations served at once", min=1, max=256, restart=True)
    acse_timeout_s: float = _opt(5.0, "a connection must associate within this long (idle sockets cannot lock "
                                 "the modality out)", min=0.5, max=300.0, restart=True)
    network_timeout_s: float = _opt(60.0, "an association silent this long is closed", min=1.0, max=3600.0,
                                    restart=True)
    max_bytes_per_association: int = _opt(
        8_000_000_000, "bytes one association may store before it is answered out of resources (0xA700)",
        min=1_000_000, restart=True)
    tls_cert_file: Path | None = _opt(None, "DICOM TLS: the listener's certificate", restart=True)
    tls_key_file: Path | None = _opt(None, "DICOM TLS: its private key", restart=True)
    tls_ca_file: Path | None = _opt(None, "with TLS: clients must present a certificate signed by this CA",
                                    restart=True)


@dataclass(frozen=True)
class FleetConfig:
    """Shipping this truck's per-image feature rows (no patient data) to the fleet QC miner."""

    enabled: bool = _opt(False, "ship feature rows", restart=True)
    interval_s: float = _opt(3600.0, "seconds between shipments", min=1.0)
    heartbeat_s: float = _opt(
        300.0, "seconds between heartbeats to the fleet service (destination kind http; the truck's status: "
        "queues, backlog, uplink, disk, rechecks today, version; no patient data), through the same outbox: a "
        "truck offline catches up",
        min=5.0)
    format: Literal["parquet", "csv"] = _opt("parquet", "parquet | csv", restart=True)
    destination: DestinationConfig = _opt(DestinationConfig(kind="directory", path=Path("./var/fleet")),
                                          "http or directory (keys as for destination)")


@dataclass(frozen=True)
class ConsoleConfig:
    """The truck's console: a local web page and JSON API (docs/console.md)."""

    enabled: bool = _opt(False, "serve the console (Flask, in its own thread)", restart=True)
    bind: str = _opt("127.0.0.1", "loopback by default; bound beyond loopback every request needs the token",
                     restart=True)
    port: int = _opt(8750, "the console's port", min=0, max=65535, restart=True)
    token_file: Path = _opt(Path("./var/secrets/console.token"), "the token acknowledging and requeueing need "
                            "(created 0600 if missing)", restart=True)
    show_accession: bool = _opt(
        False, "the modality's accession number on the alert, read from the truck's encrypted linkage table: it "
        "identifies the woman on the truck's own screen and never leaves the truck (the console binds to "
        "loopback); off by default")


@dataclass(frozen=True)
class MetricsConfig:
    """A Prometheus /metrics endpoint for the fleet's monitoring (docs/operations.md has alert rules)."""

    enabled: bool = _opt(False, "serve /metrics (prometheus-client)", restart=True)
    bind: str = _opt("127.0.0.1", "loopback unless the fleet's Prometheus scrapes over the VPN: then that "
                     "interface's address", restart=True)
    port: int = _opt(9464, "the endpoint's port", min=0, max=65535, restart=True)


@dataclass(frozen=True)
class HealthConfig:
    """When ``medsendx-edge status`` exits non-zero (for monitoring scripts)."""

    uplink_down_max_s: float = _opt(3600.0, "the uplink down longer than this is unhealthy", min=0.0)
    max_quarantined_per_hour: int = _opt(10, "more files quarantined in the last hour is unhealthy", min=0)


@dataclass(frozen=True)
class Config:
    """MedSendX Edge configuration (validated by ``medsendx-edge check-config FILE``)."""

    station_name: str = _opt(
        "MOBILE_CLINIC_01", "the fleet's station code, written into StationName after anonymization "
        "(DICOM SH: at most 16 characters; docs/privacy.md says what it reveals)")
    spool_dir: Path = _opt(Path("./var/spool"), "spool root: inbox/ anonymized/ triaged/ outbox/ sent/ "
                           "quarantine/ state/ live under it", restart=True)
    inbox_dir: Path | None = _opt(None, "the modality's drop folder (a network share); null: <spool_dir>/inbox; "
                                  "it must exist (never created)", restart=True)
    inbox_require_mount: bool = _opt(False, "the inbox (or its parent) is the mount point of a share: `run` waits "
                                     "for it to be mounted before starting (saying so in its status and log; it "
                                     "would sit empty for ever), `run --once` and check-config refuse",
                                     restart=True)
    watch: WatchConfig = _opt(WatchConfig(), "")
    destination: DestinationConfig = _opt(DestinationConfig(), "")
    upload: UploadConfig = _opt(UploadConfig(), "")
    log: LogConfig = _opt(LogConfig(), "")
    anonymize: AnonymizeConfig = _opt(AnonymizeConfig(), "")
    triage: TriageConfig = _opt(TriageConfig(), "")
    health: HealthConfig = _opt(HealthConfig(), "")
    fleet: FleetConfig = _opt(FleetConfig(), "")
    dicom_listener: DicomListenerConfig = _opt(DicomListenerConfig(), "", restart=True)
    metrics: MetricsConfig = _opt(MetricsConfig(), "", restart=True)
    console: ConsoleConfig = _opt(ConsoleConfig(), "", restart=True)
    max_recoveries: int = _opt(3, "a file blamed for this many deaths of the daemon (a fatal signal in the thread "
                               "that had it in hand; an out-of-memory kill under systemd with it alone in hand) is "
                               "quarantined, or skips triage", min=1, restart=True)
    max_interruptions: int = _opt(
        10, "a file in flight at this many deaths not blamed on it (SIGKILL, power cut, out of memory in a "
        "container, a crash with other files in hand) is quarantined, or skips triage; an upload never is",
        min=1, restart=True)
    min_free_mb: float = _opt(
        500.0, "the disk guard: below this, intake pauses (C-STORE answers 0xA700) and sent/ is pruned first",
        min=0.0)
    config_watch: bool = _opt(False, "reload when this file changes (besides SIGHUP)")

    @property
    def inbox(self) -> Path:
        return self.inbox_dir if self.inbox_dir is not None else self.spool_dir / "inbox"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(key: str, value: Any, tp: Any, meta: typing.Mapping[str, Any]) -> Any:
    """Convert ``value`` to ``tp`` or raise :class:`ConfigError` naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(key, value, inner[0], meta)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping (got {_short(value)})")
        return _build(tp, value, key + ".")
    if origin is Literal:
        # YAML 1.1 reads a bare `off` as False: accept it for the "off" choice.
        if value is False and "off" in args:
            value = "off"
        if value not in args:
            choices = " | ".join(str(a) for a in args)
            raise ConfigError(f"{key}: must be one of {choices} (got {_short(value)})")
        return value
    if origin is tuple and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list (got {_short(value)})")
        return tuple(_convert(f"{key}[{i}]", v, args[0], meta) for i, v in enumerate(value))
    if origin is tuple and args and args[0] is float:
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in value):
            raise ConfigError(f"{key}: must be a list of numbers (got {_short(value)})")
        return tuple(float(v) for v in value)
    if origin is tuple:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be a list of strings (got {_short(value)})")
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false (got {_short(value)})")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and not isinstance(value, int)):
            raise ConfigError(f"{key}: must be a number ({_type_name(tp)}) (got {_short(value)})")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number (got {_short(value)})")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            raise ConfigError(f"{key}: must be >= {lo} (got {_short(value)})")
        if hi is not None and value > hi:
            raise ConfigError(f"{key}: must be <= {hi} (got {_short(value)})")
        return tp(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a non-empty string (got {_short(value)})")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a path (got {_short(value)})")
        return Path(os.path.expanduser(value))
    raise ConfigError(f"{key}: unsupported type {_short(tp)}")  # pragma: no cover - programming error


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{prefix}{key}: unknown key (got {_short(data[key])}); known keys here: {known}")
    kwargs = {}
    for name, fld in names.items():
        if name in data:
            kwargs[name] = _convert(prefix + name, data[name], hints[name], fld.metadata)
    return cls(**kwargs)


def _within(inner: Path, outer: Path) -> bool:
    a, b = Path(os.path.normpath(inner)), Path(os.path.normpath(outer))
    return a == b or a.is_relative_to(b)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_overlaps(cfg: Config) -> None:
    """The inbox, the spool and a destination folder never nest: a spool or an archive inside the
    watched inbox is ingested again (one file delivered over and over), an inbox inside the spool is
    read by two stages."""
    inbox, spool = cfg.inbox, cfg.spool_dir
    if cfg.inbox_dir is not None and _within(spool, inbox):
        raise ConfigError(f"spool_dir: inside the inbox ({inbox}): every file the daemon writes would be "
                          "ingested again; put the spool beside the inbox")
    if cfg.inbox_dir is not None and _within(inbox, spool) and \
            os.path.normpath(inbox) != os.path.normpath(spool / "inbox"):
        raise ConfigError(f"inbox_dir: inside the spool ({spool}) but not its inbox/: use null or a folder "
                          "outside the spool")
    places = [("destination.path", cfg.destination.path if cfg.destination.kind == "directory" else None),
              ("fleet.destination.path", cfg.fleet.destination.path
               if cfg.fleet.enabled and cfg.fleet.destination.kind == "directory" else None)]
    for key, path in places:
        if path is None:
            continue
        for name, other in (("the inbox", inbox), ("the spool", spool)):
            if _within(path, other) or _within(other, path):
                raise ConfigError(f"{key}: {path} overlaps {name} ({other}): delivered files would be read "
                                  "again or mixed with the queues; use a folder outside both")


def _check(cfg: Config) -> None:
    _check_overlaps(cfg)
    if cfg.console.show_accession and not _loopback(cfg.console.bind):
        raise ConfigError(
            f"console.show_accession: the accession is shown on the truck's own screen only, and this console "
            f"is bound beyond loopback (console.bind {cfg.console.bind}): it would cross the network in clear; "
            "bind the console to 127.0.0.1 or turn show_accession off")
    up = cfg.upload
    if up.max_backoff_s < up.initial_backoff_s:
        raise ConfigError(
            f"upload.max_backoff_s: must be >= upload.initial_backoff_s "
            f"(got {up.max_backoff_s} < {up.initial_backoff_s})"
        )
    dest = cfg.destination
    if dest.kind == "directory" and dest.path is None:
        raise ConfigError("destination.path: required when destination.kind is directory (got null)")
    if dest.kind in ("dicomweb", "http", "s3"):
        if not dest.url or not dest.url.startswith(("http://", "https://")):
            raise ConfigError(f"destination.url: must be an http(s) URL for kind {dest.kind} (got {_short(dest.url)})")
    if dest.kind == "s3" and not dest.bucket:
        raise ConfigError("destination.bucket: required for kind s3 (got null)")
    if dest.kind == "dimse":
        if not dest.host or not dest.port:
            raise ConfigError(f"destination.host, destination.port: required for kind dimse (got {_short(dest.host)}, "
                              f"{_short(dest.port)})")
        for key in ("called_aet", "calling_aet"):
            value = getattr(dest, key)
            if not 0 < len(value.strip()) <= 16 or "\\" in value:
                raise ConfigError(f"destination.{key}: an AE title has 1 to 16 characters (got {_short(value)})")
    if dest.storage_commitment and dest.kind != "dimse":
        raise ConfigError(f"destination.storage_commitment: needs kind dimse (got {_short(dest.kind)})")
    if dest.tls and dest.storage_commitment and dest.commitment_port is not None and not (
            dest.tls_cert_file and dest.tls_key_file):
        raise ConfigError("destination.commitment_port: with tls: true the report listener is TLS too and needs "
                          "tls_cert_file and tls_key_file (its certificate and key)")
    if dest.commitment_port is not None and cfg.dicom_listener.enabled and \
            dest.commitment_port == cfg.dicom_listener.port:
        raise ConfigError(f"destination.commitment_port: {dest.commitment_port} is the dicom_listener's port")
    fdest = cfg.fleet.destination
    if fdest.kind in ("dicomweb", "dimse"):
        raise ConfigError(f"fleet.destination.kind: must be http or directory (got {_short(fdest.kind)})")
    if fdest.kind == "http" and (not fdest.url or not fdest.url.startswith(("http://", "https://"))):
        raise ConfigError(f"fleet.destination.url: must be an http(s) URL (got {_short(fdest.url)})")
    if dest.password_file is not None and dest.username is None:
        raise ConfigError("destination.username: required with destination.password_file (got null)")
    lc = cfg.dicom_listener
    if len(lc.ae_title) > 16:
        raise ConfigError(f"dicom_listener.ae_title: at most 16 characters (got {_short(lc.ae_title)})")
    if lc.enabled and not lc.allowed_calling_aets:
        raise ConfigError("dicom_listener.allowed_calling_aets: required when the listener is enabled: list the "
                          "modality's calling AE title(s); an open listener takes images from anyone (got [])")
    for aet in lc.allowed_calling_aets:
        if not 0 < len(aet.strip()) <= 16 or "\\" in aet:
            raise ConfigError(f"dicom_listener.allowed_calling_aets: AE titles have 1 to 16 characters (got {_short(aet)})")
    if (lc.tls_cert_file is None) != (lc.tls_key_file is None):
        raise ConfigError("dicom_listener.tls_key_file: TLS needs both tls_cert_file and tls_key_file")
    if len(cfg.station_name) > 16 or "\\" in cfg.station_name or not cfg.station_name.isprintable():
        raise ConfigError(f"station_name: at most 16 characters (DICOM SH, StationName), no backslash "
                          f"(got {_short(cfg.station_name)}, {len(cfg.station_name)} characters)")
    bt = cfg.triage.birads_thresholds
    if len(bt) != 3 or not all(a < b for a, b in zip((0.0, *bt), (*bt, 1.0))):
        raise ConfigError(f"triage.birads_thresholds: three increasing numbers between 0 and 1 (got {list(bt)})")
    for name in cfg.triage.positioning_recheck:
        if name not in POSITIONING_CHECKS:
            raise ConfigError(f"triage.positioning_recheck: unknown check (got {_short(name)}); "
                              f"known: {', '.join(POSITIONING_CHECKS)}")
    for view in cfg.triage.exam_views:
        if view[:1] not in ("L", "R") or not view[1:].isalnum():
            raise ConfigError(f"triage.exam_views: a laterality and a view, like RCC or LMLO (got {_short(view)})")
    for i, rule in enumerate(cfg.triage.rules):
        if rule.metric not in RULE_METRICS:
            raise ConfigError(f"triage.rules[{i}].metric: unknown metric (got {_short(rule.metric)}); "
                              f"known: {', '.join(sorted(RULE_METRICS))}")
    for entry in cfg.anonymize.safe_private_tags:
        parts = entry.split(",", 2)
        if len(parts) != 3 or not all(parts) or len(parts[0]) != 4 or len(parts[1]) != 2:
            raise ConfigError(
                f"anonymize.safe_private_tags: entries are 'GGGG,EE,Private Creator' in hex (got {_short(entry)})"
            )
        try:
            group, elem = int(parts[0], 16), int(parts[1], 16)
        except ValueError:
            raise ConfigError(f"anonymize.safe_private_tags: bad hex in {_short(entry)}") from None
        if group % 2 == 0:
            raise ConfigError(f"anonymize.safe_private_tags: group must be odd (private) (got {_short(entry)})")
        del elem


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error names the value, never prints a whole one."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


MAX_CONFIG_BYTES = 1 << 20   # a configuration is a few kilobytes; a megabyte is no configuration


class _NoAliasLoader(yaml.SafeLoader):  # type: ignore[misc]  # yaml ships no types
    """SafeLoader that refuses aliases: a config has no use for them, and nested aliases expand to
    gigabytes from a few hundred bytes (the billion laughs)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed in the configuration",
                                              event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str, where: str) -> Any:
    """The YAML document in ``text``, or a :class:`ConfigError` naming ``where`` and the line."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {len(text)} characters: larger than any configuration "
                          f"({MAX_CONFIG_BYTES} at most)")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where_in = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or ""
        detail = f": {problem}" if "alias" in problem else ""
        raise ConfigError(f"{where}: not valid YAML{where_in}{detail}") from None


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Build and validate a :class:`Config` from parsed YAML."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"<top>: the file must hold a mapping (got {type(data).__name__})")
    cfg: Config = _build(Config, data)
    _check(cfg)
    return cfg


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load, validate and freeze the configuration at ``path``.

    Without ``path``: ``$MEDSENDX_EDGE_CONFIG``, else the first existing of
    ``config/medsendx-edge.yaml`` and ``/etc/medsendx-edge/medsendx-edge.yaml``,
    else the built-in defaults.
    """
    if path is None:
        env = os.environ.get(ENV_CONFIG)
        if env:
            path = env
        else:
            path = next((p for p in DEFAULT_CONFIG_PATHS if p.exists()), None)
            if path is None:
                return config_from_dict({})
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (not UTF-8): is this the YAML config?") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the config file ({exc.strerror or type(exc).__name__})") from None
    if "\0" in text:
        raise ConfigError(f"{p}: not a text file (NUL bytes): is this the YAML config?")
    data = parse_yaml(text, str(p))
    cfg: Config = resolve_paths(config_from_dict(data), p.resolve().parent)
    return cfg


def resolve_paths(cfg: Any, base: Path) -> Any:
    """``cfg`` with every relative path made absolute against ``base``."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Path) and not value.is_absolute():
            changes[f.name] = base / value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            fixed = resolve_paths(value, base)
            if fixed is not value:
                changes[f.name] = fixed
    return dataclasses.replace(cfg, **changes) if changes else cfg


def mounted(path: Path) -> bool:
    """Is the share or disk ``path`` lives on mounted: the folder itself or its parent a mount point
    (``/mnt/share/archive`` with the share at ``/mnt/share``)?  An unmounted share's mount point is an
    empty folder on the file system below it; any mount further up (``/run``, ``/var``) proves nothing."""
    p = Path(os.path.abspath(path))
    return any(folder.exists() and os.path.ismount(folder) and folder != Path(folder.anchor)
               for folder in (p, p.parent))


def path_problems(cfg: Config) -> tuple[list[str], list[str]]:
    """(errors, warnings) about folders that must exist or be mounted.  An inbox outside the spool that
    does not exist, or that must be mounted and is not, would sit empty for ever: the daemon does not
    start.  A destination folder whose share is not mounted is a warning: the destination holds its
    queue until the share is back (copied now, files would fill the local disk and count delivered)."""
    errors, warnings = [], []
    outside = cfg.inbox_dir is not None and not _within(cfg.inbox_dir, cfg.spool_dir)
    if outside and not cfg.inbox.is_dir():
        errors.append(f"inbox_dir: {cfg.inbox} is not a folder (a typo, or a share not mounted): create it "
                      "or mount the share")
    elif cfg.inbox_require_mount and not mounted(cfg.inbox):
        errors.append(f"inbox_require_mount: {cfg.inbox} is not on a mounted share (neither it nor its "
                      "parent is a mount point): mount the share")
    for key, dest in (("destination", cfg.destination), ("fleet.destination", cfg.fleet.destination)):
        if dest.kind == "directory" and dest.require_mount and dest.path is not None and not mounted(dest.path):
            warnings.append(f"{key}.require_mount: {dest.path} is not on a mounted share or disk: nothing is "
                            "copied until it is")
    return errors, warnings


SECRET_KEYS = ("anonymize.secret_file", "anonymize.linkage_key_file", "console.token_file", "destination.password_file",
               "destination.token_file", "fleet.destination.password_file", "fleet.destination.token_file")


def secret_problems(cfg: Config) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the secret files: a secret that exists must be a readable regular
    file that other users cannot open (``chmod 600`` it); one its group can read is a warning."""
    errors: list[str] = []
    warnings: list[str] = []
    for key in SECRET_KEYS:
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj is None:
            continue
        path = Path(obj)
        try:
            st = path.stat()
        except FileNotFoundError:
            continue  # created on first use (site secret, linkage key), or reported by its user
        except OSError as exc:
            errors.append(f"{key}: cannot reach the file ({exc.strerror})")
            continue
        if not stat.S_ISREG(st.st_mode):
            errors.append(f"{key}: must be a regular file, {path} is "
                          f"{'a directory' if stat.S_ISDIR(st.st_mode) else 'not a file'}")
            continue
        if not os.access(path, os.R_OK):
            errors.append(f"{key}: {path} is not readable by this user (uid {os.getuid()})")
            continue
        if st.st_mode & 0o007:
            errors.append(f"{key}: {path} is open to every user of this machine (mode {stat.S_IMODE(st.st_mode):o}): "
                          f"run chmod 600 {path}")
        elif st.st_mode & 0o070:
            warnings.append(f"{key}: {path} is readable by its group (mode {stat.S_IMODE(st.st_mode):o}): "
                            "run chmod 600 on it")
    return errors, warnings


#: Files the configuration names that must exist before the daemon starts (secrets the daemon creates on
#: first use, the site secret, the linkage key and the console token, are not among them).
NEEDED_FILES = ("destination.password_file", "destination.token_file", "destination.ca_bundle",
                "destination.tls_cert_file", "destination.tls_key_file", "fleet.destination.password_file",
                "fleet.destination.token_file", "fleet.destination.ca_bundle", "dicom_listener.tls_cert_file",
                "dicom_listener.tls_key_file", "dicom_listener.tls_ca_file")


def missing_file_problems(cfg: Config) -> list[str]:
    """Every file the configuration needs that is not there, or not readable: check-config says so
    before the daemon finds out at its first send (a password file missing said OK before)."""
    out = []
    for key in NEEDED_FILES:
        section = key.rsplit(".", 1)[0]
        if section.startswith("fleet.") and not cfg.fleet.enabled:
            continue                      # a feature that is off needs none of its files
        if section == "dicom_listener" and not cfg.dicom_listener.enabled:
            continue
        dest = cfg.fleet.destination if section.startswith("fleet.") else cfg.destination
        if section.endswith("destination") and (dest.kind == "directory" or (
                key.endswith(("tls_cert_file", "tls_key_file")) and dest.kind != "dimse")):
            continue                      # a kind that does not use the file
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            continue
        path = Path(obj)
        if not path.exists():
            out.append(f"{key}: {path} does not exist")
        elif not path.is_file():
            out.append(f"{key}: {path} is not a file")
        elif not os.access(path, os.R_OK):
            out.append(f"{key}: {path} is not readable by this user (uid {os.getuid()})")
    return out




def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` re-exported for callers that tweak a frozen config."""
    return dataclasses.replace(cfg, **changes)
