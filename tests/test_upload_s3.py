"""The S3 destination against moto's standalone server (an S3 emulator started by the test, on
loopback; not AWS): multipart uploads that resume from the parts the store holds after a cut or a
restart, server-side encryption, the hash in the object's metadata, nothing re-sent that is already
there, partial uploads aborted when an item is given up."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import pytest

from medsendx_edge.config import DestinationConfig, UploadConfig
from medsendx_edge.errors import DestinationFaultError, TransientUploadError
from medsendx_edge.spool import OUTBOX, SENT, Spool, export_id, new_id
from medsendx_edge.state import StateDB
from medsendx_edge.upload.destinations import PRESENT, make_destination
from medsendx_edge.upload.uploader import Uploader

MB = 1024 * 1024


@pytest.fixture
def s3():
    boto3 = pytest.importorskip("boto3")
    from botocore.config import Config
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="truck",
                          aws_secret_access_key="secret", config=Config(s3={"addressing_style": "path"}))
    client.create_bucket(Bucket="truck-images")
    yield url, client
    server.stop()


def _cfg(url, tmp_path, **kw) -> DestinationConfig:
    secret = tmp_path / "s3-secret"
    secret.write_text("secret\n")
    secret.chmod(0o600)
    return DestinationConfig(kind="s3", path=None, url=url, bucket="truck-images", username="truck",
                             password_file=secret, key_prefix="truck-07/", part_size_mb=5, **kw)


def _big(tmp_path, size=23 * MB):
    path = tmp_path / "tomo.dcm"
    path.write_bytes(os.urandom(size))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _fail_part(dest, number):
    """The link drops while part ``number`` is on the wire."""
    from botocore.exceptions import EndpointConnectionError

    real = dest.client.upload_part

    def flaky(**kw):
        if kw["PartNumber"] == number:
            raise EndpointConnectionError(endpoint_url="http://the-4g-link")
        return real(**kw)

    dest.client.upload_part = flaky


def test_a_large_object_goes_up_in_parts_encrypted_and_verified(tmp_path, s3):
    url, client = s3
    path, digest = _big(tmp_path)
    dest = make_destination(_cfg(url, tmp_path))
    dest.resume = StateDB(tmp_path / "state.db")
    assert dest.send(path, "e" * 24, digest) is None
    assert dest.parts_sent == 5  # 23 MB in 5 MB parts
    obj = client.get_object(Bucket="truck-images", Key=f"truck-07/{'e' * 24}.dcm")
    assert obj["Body"].read() == path.read_bytes()
    assert obj["Metadata"]["sha256"] == digest and obj["ServerSideEncryption"] == "AES256"
    assert dest.resume.multipart_get("e" * 24) is None  # finished: nothing to resume


def test_a_cut_resumes_from_the_parts_the_store_holds_even_after_a_restart(tmp_path, s3):
    url, client = s3
    path, digest = _big(tmp_path)
    state = StateDB(tmp_path / "state.db")
    dest = make_destination(_cfg(url, tmp_path))
    dest.resume = state
    _fail_part(dest, 4)
    with pytest.raises(TransientUploadError, match="network"):
        dest.send(path, "e" * 24, digest)
    assert dest.parts_sent == 3 and state.multipart_get("e" * 24) is not None
    # the daemon restarts: a new destination object, the same state database
    again = make_destination(_cfg(url, tmp_path))
    again.resume = StateDB(tmp_path / "state.db")
    assert again.send(path, "e" * 24, digest, retry=True) is None
    assert again.parts_skipped == 3 and again.parts_sent == 2  # only what the store did not hold
    body = client.get_object(Bucket="truck-images", Key=f"truck-07/{'e' * 24}.dcm")["Body"].read()
    assert body == path.read_bytes()
    assert client.list_multipart_uploads(Bucket="truck-images").get("Uploads") is None
    # asked again (a crash after the store completed it, before we recorded it): nothing is re-sent
    third = make_destination(_cfg(url, tmp_path))
    assert third.send(path, "e" * 24, digest, retry=True) == PRESENT and third.parts_sent == 0


def test_an_upload_the_store_forgot_starts_again(tmp_path, s3):
    url, client = s3
    path, digest = _big(tmp_path, 12 * MB)
    state = StateDB(tmp_path / "state.db")
    dest = make_destination(_cfg(url, tmp_path))
    dest.resume = state
    _fail_part(dest, 3)
    with pytest.raises(TransientUploadError):
        dest.send(path, "f" * 24, digest)
    key, upload_id, _ = state.multipart_get("f" * 24)
    client.abort_multipart_upload(Bucket="truck-images", Key=key, UploadId=upload_id)  # a lifecycle rule
    fresh = make_destination(_cfg(url, tmp_path))
    fresh.resume = state
    assert fresh.send(path, "f" * 24, digest) is None and fresh.parts_sent == 3
    assert client.head_object(Bucket="truck-images", Key=key)["ContentLength"] == 12 * MB


def test_the_uploader_keeps_the_upload_id_and_aborts_it_for_a_quarantined_item(tmp_path, s3):
    url, client = s3
    path, digest = _big(tmp_path, 11 * MB)
    spool = Spool(tmp_path / "spool")
    item_id = new_id()
    spool.publish_file(OUTBOX, item_id, path)
    up = Uploader(spool, make_destination(_cfg(url, tmp_path)), UploadConfig(initial_backoff_s=0.01))
    assert up.destination.resume is spool.state
    real_upload_part = up.destination.client.upload_part
    _fail_part(up.destination, 2)
    up.reconcile()
    up.step()
    assert spool.state.item(item_id).state == "queued"
    assert spool.state.multipart_get(export_id(item_id)) is not None
    assert len(client.list_multipart_uploads(Bucket="truck-images")["Uploads"]) == 1
    up.destination.forget(export_id(item_id))  # what a permanent failure does
    assert client.list_multipart_uploads(Bucket="truck-images").get("Uploads") is None
    up.destination.client.upload_part = real_upload_part  # the link is back
    assert up.drain_once() == 0
    assert spool.state.item(item_id).state == "delivered" and spool.path(SENT, item_id).exists()


def test_a_missing_bucket_pauses_the_queue(tmp_path, s3):
    url, _ = s3
    path, digest = _big(tmp_path, 1 * MB)
    dest = make_destination(dataclasses.replace(_cfg(url, tmp_path), bucket="no-such-bucket"))
    with pytest.raises(DestinationFaultError, match="check the bucket"):
        dest.send(path, "e" * 24, digest)


def test_a_success_whose_etag_contradicts_the_md5_sent_is_not_a_delivery(tmp_path, s3):
    """Issue 23, finding 10: a store (or a proxy before it) answering 200 with an ETag that is not the
    MD5 of what was sent was counted delivered.  The answer is checked for one object and for each part."""
    from medsendx_edge.upload.destinations.s3 import S3Destination

    url, _client = s3
    dest = S3Destination(_cfg(url, tmp_path))
    small = tmp_path / "one.dcm"
    small.write_bytes(os.urandom(1 * MB))
    real_put, real_part = dest.client.put_object, dest.client.upload_part

    def lying(real):
        def call(**kw):
            answer = real(**kw)
            return {**answer, "ETag": '"' + "0" * 32 + '"'}
        return call

    dest.client.put_object = lying(real_put)
    with pytest.raises(TransientUploadError, match="contradicts"):
        dest.send(small, "item1", hashlib.sha256(small.read_bytes()).hexdigest())
    dest.client.put_object = real_put
    assert dest.send(small, "item1", hashlib.sha256(small.read_bytes()).hexdigest()) is None
    big, digest = _big(tmp_path, 12 * MB)
    dest.client.upload_part = lying(real_part)
    with pytest.raises(TransientUploadError, match="UploadPart 1"):
        dest.send(big, "item2", digest)
    dest.client.upload_part = real_part
    # A store that holds other bytes under our name (and our metadata) is no delivery on a retry either:
    # its ETag is the MD5 of what it holds, not of the file
    other = tmp_path / "other.dcm"
    other.write_bytes(os.urandom(1 * MB))
    digest = hashlib.sha256(small.read_bytes()).hexdigest()
    dest.client.put_object(Bucket="truck-images", Key="truck-07/item3.dcm", Body=other.read_bytes(),
                           Metadata={"sha256": digest})
    assert dest.send(small, "item3", digest, retry=True) is None          # sent again, not "present"
    assert dest.send(small, "item3", digest, retry=True) == PRESENT       # now it holds the file
