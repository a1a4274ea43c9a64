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
import re
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from medsendx_edge.errors import ConfigError
from medsendx_edge.vocabulary import RULE_METRICS

ENV_CONFIG = "MEDSENDX_EDGE_CONFIG"
DEFAULT_CONFIG_PATHS = (Path("config/medsendx-edge.yaml"), Path("/etc/medsendx-edge/medsendx-edge.yaml"))


def _opt(default: Any, *, min: float | None = None, max: float | None = None, doc: str = "") -> Any:
    return field(default=default, metadata={"min": min, "max": max, "doc": doc})


@dataclass(frozen=True)
class WatchConfig:
    mode: Literal["native", "polling"] = "native"
    stable_seconds: float = _opt(2.0, min=0.0)
    rescan_seconds: float = _opt(30.0, min=0.1)
    incomplete_grace_s: float = _opt(120.0, min=0.0)  # a truncated file this recent may still be written
    ignored_report_s: float = _opt(3600.0, min=0.0)   # hidden/temp-named inbox files older: reported


@dataclass(frozen=True)
class DestinationConfig:
    kind: Literal["directory", "dicomweb", "http", "dimse"] = "directory"
    path: Path | None = Path("./var/archive")
    url: str | None = None
    username: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None
    ca_bundle: Path | None = None
    verify_tls: bool = True
    http_method: Literal["PUT", "POST"] = "POST"
    #: http: what proves a delivery: a 2xx with a body, ETag or Location ("response"), or any 2xx ("status")
    delivery_proof: Literal["response", "status"] = "response"
    #: seconds without progress (bytes acknowledged) before a send is cut, and the bound on the whole
    #: answer once the body has been received
    timeout_s: float = _opt(60.0, min=0.1)
    #: lossless re-encoding before the outbox (upload/compress.py): verified identical, only when smaller;
    #: none for a destination that cannot take compressed syntaxes
    compression: Literal["none", "jpeg-ls", "jpeg2000", "rle", "deflate"] = "none"
    #: dimse: the PACS's DICOM address and AE titles (C-STORE over one reused association)
    host: str | None = None
    port: int | None = _opt(None, min=1, max=65535)
    called_aet: str = "ANY-SCP"
    calling_aet: str = "MEDSENDX"
    #: dimse: DICOM TLS to the PACS (certificates checked against ca_bundle; client certificate optional)
    tls: bool = False
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: dimse: Storage Commitment (PS3.4 Annex J): an item is delivered only once the PACS commits to it
    #: (N-EVENT-REPORT); until then it waits, 'committing', its file kept in the outbox
    storage_commitment: bool = False
    #: dimse: where the PACS's reports arrive on a reverse association (the PACS must know calling_aet at
    #: this address); null: only reports on the sending association are taken
    commitment_port: int | None = _opt(None, min=1, max=65535)
    commitment_bind: str = "127.0.0.1"
    #: dimse: seconds without a report before the commitment is requested again; after
    #: commitment_requests unanswered requests the instance is sent again
    commitment_timeout_s: float = _opt(600.0, min=1.0)
    commitment_requests: int = _opt(3, min=1)


@dataclass(frozen=True)
class UploadConfig:
    initial_backoff_s: float = _opt(2.0, min=0.01)
    max_backoff_s: float = _opt(600.0, min=0.01)
    sent_retention_days: float = _opt(30.0, min=0.0)
    bandwidth_limit_bps: int | None = _opt(None, min=1)


@dataclass(frozen=True)
class LogConfig:
    format: Literal["json", "console", "auto"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class AnonymizeConfig:
    secret_file: Path = Path("./var/secrets/site-secret.key")
    linkage_key_file: Path = Path("./var/secrets/linkage.key")
    patient_name: Literal["pseudonym", "empty"] = "pseudonym"
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_longitudinal: Literal["off", "modified_dates", "full_dates"] = "off"
    clean_descriptors: bool = False
    retain_safe_private: bool = False
    safe_private_tags: tuple[str, ...] = ()
    burned_in: Literal["quarantine", "allow"] = "quarantine"


@dataclass(frozen=True)
class TriageRule:
    """``metric op value`` gives ``priority``; e.g. ``{metric: pd, op: ">=", value: 0.5, priority: high}``."""

    metric: str = "pd"
    op: Literal[">", ">=", "<", "<=", "=="] = ">="
    value: float = 0.5
    priority: Literal["recheck", "high", "normal", "low"] = "high"
    reason: str | None = None


DEFAULT_RULES = (
    TriageRule("burnout_frac", ">", 0.01, "recheck",
               "burn-out: tissue at background values inside the skin line (over 1% of the breast)"),
    TriageRule("clipped_frac", ">", 0.05, "recheck", "clipping: a plateau at the top of the range over 5% of the breast"),
    TriageRule("snr_fat", "<", 12.0, "recheck", "underexposed or noisy: fat signal-to-noise under 12"),
    TriageRule("cut_off", ">=", 1.0, "recheck", "breast cut off by the edge of the field"),
    TriageRule("pd", ">=", 0.5, "high", "dense breast (BI-RADS c or d): supplemental screening"),
)


@dataclass(frozen=True)
class TriageConfig:
    enabled: bool = True
    k: int = _opt(3, min=2, max=8)
    rules: tuple[TriageRule, ...] = DEFAULT_RULES
    send_overlay: bool = False
    preview_max_px: int = _opt(768, min=64, max=4096)
    #: percent dense where BI-RADS categories b, c and d begin (area-based quartiles)
    birads_thresholds: tuple[float, ...] = (0.25, 0.50, 0.75)
    #: a left/right difference in percent dense at least this large flags the exam as asymmetric
    asymmetry_pd: float = _opt(0.15, min=0.0, max=1.0)


@dataclass(frozen=True)
class DicomListenerConfig:
    """A C-STORE SCP so the modality can push images (besides dropping files in the inbox); locked down:
    loopback unless told otherwise, known calling AE titles only, bounded associations and bytes."""

    enabled: bool = False
    ae_title: str = "MEDSENDX"
    bind: str = "127.0.0.1"
    port: int = _opt(11112, min=0, max=65535)
    #: calling AE titles allowed to associate (the modality's); required when the listener is enabled
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = _opt(16, min=1, max=256)
    #: a connection must send its A-ASSOCIATE-RQ within this long (idle sockets cannot lock the modality out)
    acse_timeout_s: float = _opt(5.0, min=0.5, max=300.0)
    #: an association silent this long is closed
    network_timeout_s: float = _opt(60.0, min=1.0, max=3600.0)
    #: bytes one association may store before it is answered "out of resources" (0xA700)
    max_bytes_per_association: int = _opt(8_000_000_000, min=1_000_000)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: with TLS: clients must present a certificate signed by this CA
    tls_ca_file: Path | None = None


@dataclass(frozen=True)
class FleetConfig:
    """Shipping this truck's feature rows to the fleet QC miner."""

    enabled: bool = False
    interval_s: float = _opt(3600.0, min=1.0)
    format: Literal["parquet", "csv"] = "parquet"
    destination: DestinationConfig = DestinationConfig(kind="directory", path=Path("./var/fleet"))


@dataclass(frozen=True)
class HealthConfig:
    """When ``medsendx-edge status`` exits non-zero (for monitoring scripts)."""

    uplink_down_max_s: float = _opt(3600.0, min=0.0)
    max_quarantined_per_hour: int = _opt(10, min=0)


@dataclass(frozen=True)
class Config:
    #: the fleet's station code, written into StationName (DICOM SH: at most 16 characters)
    station_name: str = "MOBILE_CLINIC_01"
    spool_dir: Path = Path("./var/spool")
    inbox_dir: Path | None = None
    watch: WatchConfig = WatchConfig()
    destination: DestinationConfig = DestinationConfig()
    upload: UploadConfig = UploadConfig()
    log: LogConfig = LogConfig()
    anonymize: AnonymizeConfig = AnonymizeConfig()
    triage: TriageConfig = TriageConfig()
    health: HealthConfig = HealthConfig()
    fleet: FleetConfig = FleetConfig()
    dicom_listener: DicomListenerConfig = DicomListenerConfig()
    max_recoveries: int = _opt(3, min=1)
    min_free_mb: float = _opt(500.0, min=0.0)
    config_watch: bool = False

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
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping (got {value!r})")
        return _build(tp, value, key + ".")
    if origin is Literal:
        # YAML 1.1 reads a bare `off` as False: accept it for the "off" choice.
        if value is False and "off" in args:
            value = "off"
        if value not in args:
            choices = " | ".join(str(a) for a in args)
            raise ConfigError(f"{key}: must be one of {choices} (got {value!r})")
        return value
    if origin is tuple and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list (got {value!r})")
        return tuple(_convert(f"{key}[{i}]", v, args[0], meta) for i, v in enumerate(value))
    if origin is tuple and args and args[0] is float:
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in value):
            raise ConfigError(f"{key}: must be a list of numbers (got {value!r})")
        return tuple(float(v) for v in value)
    if origin is tuple:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be a list of strings (got {value!r})")
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false (got {value!r})")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and not isinstance(value, int)):
            raise ConfigError(f"{key}: must be a number ({_type_name(tp)}) (got {value!r})")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number (got {value!r})")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            raise ConfigError(f"{key}: must be >= {lo} (got {value!r})")
        if hi is not None and value > hi:
            raise ConfigError(f"{key}: must be <= {hi} (got {value!r})")
        return tp(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a non-empty string (got {value!r})")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a path (got {value!r})")
        return Path(os.path.expanduser(value))
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - programming error


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{prefix}{key}: unknown key (got {data[key]!r}); known keys here: {known}")
    kwargs = {}
    for name, fld in names.items():
        if name in data:
            kwargs[name] = _convert(prefix + name, data[name], hints[name], fld.metadata)
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    up = cfg.upload
    if up.max_backoff_s < up.initial_backoff_s:
        raise ConfigError(
            f"upload.max_backoff_s: must be >= upload.initial_backoff_s "
            f"(got {up.max_backoff_s} < {up.initial_backoff_s})"
        )
    dest = cfg.destination
    if dest.kind == "directory" and dest.path is None:
        raise ConfigError("destination.path: required when destination.kind is directory (got null)")
    if dest.kind in ("dicomweb", "http"):
        if not dest.url or not dest.url.startswith(("http://", "https://")):
            raise ConfigError(f"destination.url: must be an http(s) URL for kind {dest.kind} (got {dest.url!r})")
    if dest.kind == "dimse":
        if not dest.host or not dest.port:
            raise ConfigError(f"destination.host, destination.port: required for kind dimse (got {dest.host!r}, "
                              f"{dest.port!r})")
        for key in ("called_aet", "calling_aet"):
            value = getattr(dest, key)
            if not 0 < len(value.strip()) <= 16 or "\\" in value:
                raise ConfigError(f"destination.{key}: an AE title has 1 to 16 characters (got {value!r})")
    if dest.storage_commitment and dest.kind != "dimse":
        raise ConfigError(f"destination.storage_commitment: needs kind dimse (got {dest.kind!r})")
    if dest.commitment_port is not None and cfg.dicom_listener.enabled and \
            dest.commitment_port == cfg.dicom_listener.port:
        raise ConfigError(f"destination.commitment_port: {dest.commitment_port} is the dicom_listener's port")
    fdest = cfg.fleet.destination
    if fdest.kind in ("dicomweb", "dimse"):
        raise ConfigError(f"fleet.destination.kind: must be http or directory (got {fdest.kind!r})")
    if fdest.kind == "http" and (not fdest.url or not fdest.url.startswith(("http://", "https://"))):
        raise ConfigError(f"fleet.destination.url: must be an http(s) URL (got {fdest.url!r})")
    if dest.password_file is not None and dest.username is None:
        raise ConfigError("destination.username: required with destination.password_file (got null)")
    lc = cfg.dicom_listener
    if len(lc.ae_title) > 16:
        raise ConfigError(f"dicom_listener.ae_title: at most 16 characters (got {lc.ae_title!r})")
    if lc.enabled and not lc.allowed_calling_aets:
        raise ConfigError("dicom_listener.allowed_calling_aets: required when the listener is enabled: list the "
                          "modality's calling AE title(s); an open listener takes images from anyone (got [])")
    for aet in lc.allowed_calling_aets:
        if not 0 < len(aet.strip()) <= 16 or "\\" in aet:
            raise ConfigError(f"dicom_listener.allowed_calling_aets: AE titles have 1 to 16 characters (got {aet!r})")
    if (lc.tls_cert_file is None) != (lc.tls_key_file is None):
        raise ConfigError("dicom_listener.tls_key_file: TLS needs both tls_cert_file and tls_key_file")
    if len(cfg.station_name) > 16 or "\\" in cfg.station_name or not cfg.station_name.isprintable():
        raise ConfigError(f"station_name: at most 16 characters (DICOM SH, StationName), no backslash "
                          f"(got {cfg.station_name!r}, {len(cfg.station_name)} characters)")
    bt = cfg.triage.birads_thresholds
    if len(bt) != 3 or not all(a < b for a, b in zip((0.0, *bt), (*bt, 1.0))):
        raise ConfigError(f"triage.birads_thresholds: three increasing numbers between 0 and 1 (got {list(bt)})")
    for i, rule in enumerate(cfg.triage.rules):
        if rule.metric not in RULE_METRICS:
            raise ConfigError(f"triage.rules[{i}].metric: unknown metric (got {rule.metric!r}); "
                              f"known: {', '.join(sorted(RULE_METRICS))}")
    for entry in cfg.anonymize.safe_private_tags:
        parts = entry.split(",", 2)
        if len(parts) != 3 or not all(parts) or len(parts[0]) != 4 or len(parts[1]) != 2:
            raise ConfigError(
                f"anonymize.safe_private_tags: entries are 'GGGG,EE,Private Creator' in hex (got {entry!r})"
            )
        try:
            group, elem = int(parts[0], 16), int(parts[1], 16)
        except ValueError:
            raise ConfigError(f"anonymize.safe_private_tags: bad hex in {entry!r}") from None
        if group % 2 == 0:
            raise ConfigError(f"anonymize.safe_private_tags: group must be odd (private) (got {entry!r})")
        del elem


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Build and validate a :class:`Config` from parsed YAML."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"<top>: the file must hold a mapping (got {type(data).__name__})")
    cfg = _build(Config, data)
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
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}") from None
    return resolve_paths(config_from_dict(data), p.resolve().parent)


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


SECRET_KEYS = ("anonymize.secret_file", "anonymize.linkage_key_file", "destination.password_file",
               "destination.token_file", "fleet.destination.password_file", "fleet.destination.token_file")


def secret_problems(cfg: Config) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the secret files: a secret that exists must be a readable regular
    file; one readable by group or others is a warning (``chmod 600`` it)."""
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
        if st.st_mode & 0o077:
            warnings.append(f"{key}: {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}): "
                            "run chmod 600 on it")
    return errors, warnings


_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]*@")


def redact_credentials(text: str) -> str:
    """``https://user:secret@host`` -> ``https://***@host``: a message may quote a URL value."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` re-exported for callers that tweak a frozen config."""
    return dataclasses.replace(cfg, **changes)
