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
import re
import sys
import threading
import traceback
import warnings
from collections.abc import MutableMapping
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
        "logger_name", "category", "truncated", "exam", "calling_ae", "peer", "commitment", "items", "requests",
        "host",  # the destination's kind and host (upload/destinations describe(): never a user or password)
        "tables",  # the SR's DICOM tables at the warm-up: highdicom's extract or its whole table (triage/hdtables.py)
    }
)
#: Bounds on one log line: a hostile file must not turn a line into 93 KB (a 10,000-deep sequence).
MAX_VALUE_CHARS = 2000
MAX_LIST_ITEMS = 50
MAX_FRAMES = 16

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


def redact_phi(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
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
    if len(lines) > MAX_FRAMES:  # deep recursion: the two ends say where, the middle repeats
        half = MAX_FRAMES // 2
        lines = lines[:half] + [f"... {len(lines) - 2 * half} frames ..."] + lines[-half:]
    lines.append(f"{etype.__module__}.{etype.__qualname__}")
    return "\n".join(lines)


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        return value[:MAX_VALUE_CHARS] + f"... [{len(value) - MAX_VALUE_CHARS} more characters]"
    if isinstance(value, list):
        items = [_bounded(v) for v in value[:MAX_LIST_ITEMS]]
        if len(value) > MAX_LIST_ITEMS:
            items.append(f"... [{len(value) - MAX_LIST_ITEMS} more items]")
        return items
    if isinstance(value, dict):
        return {k: _bounded(v) for k, v in list(value.items())[:MAX_LIST_ITEMS]}
    return value


def bound_sizes(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """structlog processor: no value longer than MAX_VALUE_CHARS, no list longer than MAX_LIST_ITEMS."""
    return {k: _bounded(v) for k, v in event_dict.items()}


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATHLIKE = re.compile(r"(?:[A-Za-z]:)?[\\/][^\s:,;]*")


def scrub_text(text: str) -> str:
    """A library's message with quoted values and paths taken out: folders in the inbox can be named
    after the patient (``DOE^JANE_...``), and libraries quote them."""
    return _PATHLIKE.sub("[path]", _QUOTED.sub("[value]", text))[:MAX_VALUE_CHARS]


def _showwarning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                 line: Any = None) -> None:
    get_logger().warning("python_warning", category=getattr(category, "__name__", "Warning"),
                         logger_name=filename.rsplit("/", 1)[-1], reason=scrub_text(str(message)))


class _LibraryLogs(logging.Handler):
    """Third-party ``logging`` records (watchdog, urllib3...) as JSON events, their text scrubbed."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = scrub_text(record.getMessage())
        except Exception:  # noqa: BLE001 - a bad format string must not lose the event
            text = "[unformattable]"
        level = record.levelname.lower()
        log = get_logger()
        getattr(log, level if level in ("debug", "info", "warning", "error") else "error")(
            "library_log", logger_name=record.name, reason=text)


def _thread_excepthook(args: Any) -> None:
    get_logger().error("thread_crashed", name=getattr(args.thread, "name", None),
                       error_class=getattr(args.exc_type, "__name__", "Exception"),
                       exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def capture_stray_output() -> None:
    """Every line on stderr is JSON: Python warnings, third-party log records and uncaught thread
    exceptions become structured events, with paths and quoted values scrubbed."""
    warnings.showwarning = _showwarning
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _LibraryLogs)] + [_LibraryLogs()]
    if root.level == logging.NOTSET or root.level < logging.WARNING:
        root.setLevel(logging.WARNING)
    threading.excepthook = _thread_excepthook


def _exc_processor(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    exc_info = event_dict.pop("exc_info", None)
    if exc_info:
        event_dict["exception"] = format_exc_safe(exc_info)
    return dict(event_dict)


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
    """Configure structlog for the whole process (idempotent; called again on reload).  ``stream``: a file,
    or "stdout" / "stderr" (the default)."""
    if stream == "stdout":
        stream = sys.stdout
    elif stream == "stderr":
        stream = None
    quiet_pydicom()
    capture_stray_output()
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
            bound_sizes,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # one write() a line, newline included: print() writes the line and its newline apart (two write
        # calls), and a SIGKILL between them glued the next start's first line onto it (the acceptance test's
        # kills found it); another writer of the stream could land between them too
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**bind: Any) -> Any:
    return structlog.get_logger("medsendx_edge").bind(**bind)
