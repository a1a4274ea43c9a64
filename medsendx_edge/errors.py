"""Named exceptions.

Every message in these exceptions is written by this package and must never
contain a value read from a DICOM file or a file name from the inbox: they
end up in logs and in quarantine reasons.
"""

import re

_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]*@")


def redact_credentials(text: str) -> str:
    """``https://user:secret@host`` -> ``https://***@host``: a message may quote a URL value."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


class MedSendXError(Exception):
    """Base class; ``str(exc)`` is safe to log (no patient data)."""


class ConfigError(MedSendXError):
    """The configuration file is invalid; the message names the key and the value (a URL's
    credentials never: ``https://***@host``)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact_credentials(message))


class QuarantineError(MedSendXError):
    """The input can never be processed as it is; park it with this reason."""

    def __init__(self, reason: str, *, error_class: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error_class = error_class or type(self).__name__


class StateVersionError(MedSendXError):
    """A database of the spool was written by a newer release than this one (a rollback): refused, with
    what to do, rather than misread or stripped of what this release does not know."""


class SpoolBusyError(MedSendXError):
    """Another ``medsendx-edge run`` holds this spool: one daemon a spool (two would each put back the other's
    files in flight at their start, and process, or send, them twice)."""


class RetryLater(MedSendXError):
    """The input is not ready (still changing, resource busy): try again later."""


class TransientUploadError(MedSendXError):
    """The destination failed in a way that may change on retry."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class PermanentUploadError(MedSendXError):
    """The destination refused this object for good: quarantine it."""


class SyntaxRefusedError(MedSendXError):
    """The destination refused this file's transfer syntax, not the instance (a STOW-RS 415, a failure
    reason 0xC122, a DIMSE presentation context rejected): the uploader decodes the file losslessly in
    the outbox, sends it again, and the route stage stops compressing for that destination."""

    def __init__(self, reason: str, syntax: str) -> None:
        super().__init__(reason)
        self.syntax = syntax


class DestinationFaultError(MedSendXError):
    """The destination, not this file, is at fault (a redirect, a wrong path, a certificate that does
    not match, a size limit, no proof of delivery): the whole queue waits, nothing is quarantined,
    and the fault is reported once."""


class AuthUploadError(DestinationFaultError):
    """The destination refused our credentials: a configuration problem."""
