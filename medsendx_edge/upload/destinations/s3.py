"""S3 destination: an S3-compatible object store (AWS S3, MinIO, Ceph...) through boto3, built for a 4G
uplink that drops for minutes.

* **Resumable.** An object larger than one part goes up as a multipart upload of ``part_size_mb``
  parts.  Its upload id is kept in the state database (``multipart``) the moment it is created; after
  a cut, a crash or a restart the send asks the store which parts it holds (ListParts: the store's
  word, not ours), checks their sizes, and sends only the rest.  A cut costs at most one part.
* **Verified.** Each part goes with its Content-MD5 (the store refuses a corrupted part), and the ETag it
  answers must be that MD5 (in the clear and under SSE-S3; a contradicting one is no delivery); the object
  carries ``x-amz-meta-sha256``; a re-send first asks (HEAD) whether the object is already there with
  that hash, and then sends nothing.
* **Encrypted at rest**: ``ServerSideEncryption`` (``sse``) requested on every object.
* **Nothing left behind**: an upload the store no longer knows (expired, aborted) is started again; an
  item that cannot be delivered (quarantined) has its upload aborted (``forget``).

Errors: no connection, a timeout, 5xx and SlowDown are transient; bad credentials, a missing bucket, a
denied access or a bad endpoint pause the queue (DestinationFaultError); other 4xx are permanent.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from medsendx_edge.config import DestinationConfig
from medsendx_edge.errors import ConfigError, DestinationFaultError, PermanentUploadError, TransientUploadError
from medsendx_edge.upload.destinations import PRESENT
from medsendx_edge.upload.destinations._http import read_secret

FAULT_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "AllAccessDisabled",
               "InvalidBucketName", "AuthorizationHeaderMalformed", "ExpiredToken", "InvalidToken"}
TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}


class ResumeStore(Protocol):
    """Where upload ids live between attempts (the state database)."""

    def multipart_get(self, item_id: str) -> tuple[str, str, int] | None: ...

    def multipart_put(self, item_id: str, key: str, upload_id: str, part_size: int) -> None: ...

    def multipart_done(self, item_id: str) -> None: ...


class S3Destination:
    kind = "s3"

    def __init__(self, cfg: DestinationConfig) -> None:
        try:
            import boto3
            from botocore.config import Config as BotoConfig
        except ImportError:  # pragma: no cover - an install without the s3 extra
            raise ConfigError("destination.kind: s3 needs boto3 (pip install 'medsendx-edge[s3]')") from None
        assert cfg.url and cfg.bucket
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.part_size = int(cfg.part_size_mb * 1024 * 1024)
        secret = read_secret(cfg.password_file, "password_file")
        self.client = boto3.client(
            "s3", endpoint_url=cfg.url, region_name=cfg.region,
            aws_access_key_id=cfg.username or None, aws_secret_access_key=secret or None,
            verify=str(cfg.ca_bundle) if cfg.ca_bundle else cfg.verify_tls,
            config=BotoConfig(s3={"addressing_style": "path"}, connect_timeout=cfg.timeout_s,
                              read_timeout=cfg.timeout_s, retries={"max_attempts": 1, "mode": "standard"}))
        self.progress: Callable[[], None] | None = None
        self._sending = Path()   # the outbox file of the send in progress
        self.resume: ResumeStore | None = None   # wired by the uploader to the state database
        self.parts_sent = 0                      # parts uploaded by this process (tests, the benchmark)
        self.parts_skipped = 0                   # parts the store already held when a send resumed

    # ----------------------------------------------------------------- errors
    def _error(self, exc: Exception, what: str) -> Exception:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in FAULT_CODES or status in (401, 403):
                return DestinationFaultError(f"S3 {what}: {code or status}: check the bucket, the endpoint and "
                                             "the credentials")
            if code in TRANSIENT_CODES or status >= 500 or status == 0:
                return TransientUploadError(f"S3 {what}: {code or status}")
            return PermanentUploadError(f"S3 {what}: {code or status}")
        if isinstance(exc, BotoCoreError):
            return TransientUploadError(f"S3 {what}: network: {type(exc).__name__}")
        return TransientUploadError(f"S3 {what}: {type(exc).__name__}")

    def _call(self, what: str, fn: Callable[..., Any], **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kw)
        except (ClientError, BotoCoreError, OSError) as exc:
            raise self._error(exc, what) from None

    def _sse(self) -> dict[str, str]:
        return {} if self.cfg.sse == "none" else {"ServerSideEncryption": self.cfg.sse}

    # ----------------------------------------------------------------- send
    def send(self, path: Path, item_id: str, sha256: str, suffix: str = ".dcm", retry: bool = False,
             sop_uid: str | None = None) -> str | None:
        key = f"{self.cfg.key_prefix or ''}{item_id}{suffix}"
        size = path.stat().st_size
        self._sending = path
        if retry and self._holds(key, sha256, size):
            self._done(item_id)
            return PRESENT
        if size <= self.part_size:
            with open(path, "rb") as fh:
                body = fh.read()
            answer = self._call("PutObject", self.client.put_object, Bucket=self.bucket, Key=key, Body=body,
                                ContentMD5=_md5(body), Metadata={"sha256": sha256}, **self._sse())
            self._check_etag(answer, body, "PutObject")
            self.parts_sent += 1
            return None
        self._multipart(path, item_id, key, sha256, size)
        return None

    @staticmethod
    def _etag_is_md5(answer: Any) -> bool:
        """The store says how it encrypted (its answer, not our config: a bucket's default may be KMS):
        in the clear or under SSE-S3 an object's or a part's ETag is the MD5 of what it holds; under
        SSE-KMS or SSE-C it is no digest, and the store's own Content-MD5 check is the proof."""
        answer = answer or {}
        return answer.get("ServerSideEncryption") in (None, "AES256") and "SSECustomerAlgorithm" not in answer

    def _check_etag(self, answer: Any, body: bytes, what: str) -> None:
        """A 200 is no proof: an MD5 ETag that contradicts the Content-MD5 sent means the store holds
        something else (a proxy that rewrote the body, a store that ignored the header)."""
        etag = str((answer or {}).get("ETag", "")).strip('"').lower()
        if self._etag_is_md5(answer) and len(etag) == 32 and \
                etag != hashlib.md5(body, usedforsecurity=False).hexdigest():
            raise TransientUploadError(f"S3 {what}: the store answered success with an ETag that contradicts "
                                       "the Content-MD5 sent: not counted delivered, sent again")

    def _holds(self, key: str, sha256: str, size: int) -> bool:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError:
            return False  # 404, or a question it will not answer: send
        except Exception:  # noqa: BLE001 - asking never stops a delivery
            return False
        if not (head.get("Metadata", {}).get("sha256") == sha256 and head.get("ContentLength") == size):
            return False
        # Our own metadata proves what we sent, not what the store holds: where its ETag is a digest it
        # must be the one of this file (a store that answered a contradicting ETag before holds another body)
        etag = str(head.get("ETag", "")).strip('"').lower()
        return not self._etag_is_md5(head) or etag == self._expected_etag(size)

    def _expected_etag(self, size: int) -> str:
        """The ETag of the outbox file as the store computes it: its MD5, or for a multipart object the
        MD5 of the parts' MD5s and the part count."""
        path = self._sending
        with open(path, "rb") as fh:
            if size <= self.part_size:
                return hashlib.md5(fh.read(), usedforsecurity=False).hexdigest()
            digests = b""
            while chunk := fh.read(self.part_size):
                digests += hashlib.md5(chunk, usedforsecurity=False).digest()
        n = -(-size // self.part_size)
        return f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{n}"

    def _multipart(self, path: Path, item_id: str, key: str, sha256: str, size: int) -> None:
        upload_id = self._upload_id(item_id, key, sha256)
        held = self._held_parts(key, upload_id)
        if held is None:  # the store forgot this upload (expired, aborted): start again
            self._done(item_id)
            upload_id = self._upload_id(item_id, key, sha256)
            held = {}
        n_parts = -(-size // self.part_size)
        etags = []
        with open(path, "rb") as fh:
            for number in range(1, n_parts + 1):
                length = min(self.part_size, size - (number - 1) * self.part_size)
                fh.seek((number - 1) * self.part_size)
                chunk = fh.read(length)
                if number in held and held[number][1] == length and (
                        self.cfg.sse == "aws:kms" or len(held[number][0].strip('"')) != 32
                        or held[number][0].strip('"').lower() == hashlib.md5(chunk, usedforsecurity=False).hexdigest()):
                    etags.append({"PartNumber": number, "ETag": held[number][0]})   # the store holds this part
                    self.parts_skipped += 1
                    continue
                answer = self._call("UploadPart", self.client.upload_part, Bucket=self.bucket, Key=key,
                                    UploadId=upload_id, PartNumber=number, Body=chunk, ContentMD5=_md5(chunk))
                self._check_etag(answer, chunk, f"UploadPart {number}")
                etags.append({"PartNumber": number, "ETag": answer["ETag"]})
                self.parts_sent += 1
                if self.progress is not None:
                    self.progress()
        self._call("CompleteMultipartUpload", self.client.complete_multipart_upload, Bucket=self.bucket, Key=key,
                   UploadId=upload_id, MultipartUpload={"Parts": etags})
        self._done(item_id)

    def _upload_id(self, item_id: str, key: str, sha256: str) -> str:
        known = self.resume.multipart_get(item_id) if self.resume is not None else None
        if known is not None and known[0] == key and known[2] == self.part_size:
            return known[1]
        if known is not None:  # another key or part size (a reload): that upload is useless now
            self._abort(known[0], known[1])
        created = self._call("CreateMultipartUpload", self.client.create_multipart_upload, Bucket=self.bucket,
                             Key=key, Metadata={"sha256": sha256}, **self._sse())
        upload_id = str(created["UploadId"])
        if self.resume is not None:
            self.resume.multipart_put(item_id, key, upload_id, self.part_size)
        return upload_id

    def _held_parts(self, key: str, upload_id: str) -> dict[int, tuple[str, int]] | None:
        """Parts the store holds for this upload ({number: (etag, size)}), or None if it has no such upload."""
        from botocore.exceptions import ClientError

        held: dict[int, tuple[str, int]] = {}
        marker = 0
        while True:
            try:
                page = self.client.list_parts(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                              PartNumberMarker=marker)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                    return None
                raise self._error(exc, "ListParts") from None
            except Exception as exc:  # noqa: BLE001
                raise self._error(exc, "ListParts") from None
            for part in page.get("Parts", []):
                held[int(part["PartNumber"])] = (str(part["ETag"]), int(part["Size"]))
            if not page.get("IsTruncated"):
                return held
            marker = int(page.get("NextPartNumberMarker", 0))

    def _done(self, item_id: str) -> None:
        if self.resume is not None:
            self.resume.multipart_done(item_id)

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception:  # noqa: BLE001 - the store's lifecycle rule removes what we could not
            pass

    def forget(self, item_id: str) -> None:
        """The item will not be delivered (quarantined): its partial upload is aborted on the store."""
        known = self.resume.multipart_get(item_id) if self.resume is not None else None
        if known is not None:
            self._abort(known[0], known[1])
            self._done(item_id)

    def abort(self) -> None:
        pass  # a part in flight fails on its own timeout; the next send resumes after the last one held

    def close(self) -> None:
        pass


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
