"""Structured logs a technician can tail: JSON lines, or a console renderer on a terminal.

Patient data must never reach a log line.  Two guards:

* :func:`redact_phi` lets through only the keys this package uses, with plain
  scalar values; anything that looks like DICOM data (a Dataset, an element, a
  person name, bytes) is replaced, and an unknown key is dropped and counted.
* :func:`format_exc_safe` renders tracebacks as frames (file, line, function)
  and the exception class, without the exception message or frame locals:
  library messages can quote values from the file.
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from typing import Any

import structlog

# Keys a log line may carry.  Values are produced by this package, never read from DICOM.
SAFE_KEYS = frozenset(
    {
        "event", "level", "timestamp", "logger", "thread", "exception",
        "file_id", "stage", "outcome", "reason", "error_class", "attempts", "count", "counts",
        "duration_ms", "bytes", "priority", "queue", "destination", "kind", "status", "state",
        "next_attempt_s", "delay_s", "mode", "path", "key", "station_name", "version", "pid",
        "recoveries", "removed", "files", "delivered", "quarantined", "waiting", "pending",
        "modality", "sop_class", "http_status", "free_mb", "min_free_mb", "config", "signal",
        "transfer_syntax", "triage", "percent_dense", "uplink", "since_s", "workers", "name",
    }
)

_REDACTED = "[redacted]"


def _safe_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return [_safe_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _safe_value(v) for k, v in value.items()}
    # Datasets, DataElements, PersonName, bytes, Paths from the inbox...: never rendered.
    return _REDACTED


def redact_phi(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: keep only known keys with plain values."""
    out: dict[str, Any] = {}
    dropped = 0
    for key, value in event_dict.items():
        if key in SAFE_KEYS:
            out[key] = _safe_value(value)
        else:
            dropped += 1
    if dropped:
        out["redacted_keys"] = dropped
    return out


def format_exc_safe(exc_info: Any) -> str:
    """A traceback without the message and without frame locals."""
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    etype, _value, tb = exc_info
    frames = traceback.extract_tb(tb)
    lines = [f"{f.filename}:{f.lineno} in {f.name}" for f in frames]
    lines.append(f"{etype.__module__}.{etype.__qualname__}")
    return "\n".join(lines)


def _exc_processor(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    exc_info = event_dict.pop("exc_info", None)
    if exc_info:
        event_dict["exception"] = format_exc_safe(exc_info)
    return event_dict


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def quiet_pydicom() -> None:
    """pydicom's warnings quote values from the file ("Invalid value for VR UI: '1.2...'"): silence them.

    Validation problems become our own quarantine reasons instead.
    """
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom")
    for name in ("pydicom", "pynetdicom"):  # pynetdicom's debug output dumps datasets
        plog = logging.getLogger(name)
        plog.handlers.clear()
        plog.addHandler(logging.NullHandler())
        plog.propagate = False
        plog.setLevel(logging.CRITICAL + 1)


def configure_logging(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    """Configure structlog for the whole process (idempotent; called again on reload)."""
    quiet_pydicom()
    stream = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _exc_processor,
            redact_phi,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**bind: Any) -> Any:
    return structlog.get_logger("medsendx_edge").bind(**bind)
