"""Each destination on its own: what it writes or sends, and how it names what it cannot deliver.
(The fault matrix against real servers is in test_upload_uploader.py, Orthanc over DIMSE in
test_upload_dimse.py.)"""

from __future__ import annotations

import email
import hashlib
import os

import pydicom
import pytest
from werkzeug.wrappers import Response

from conftest import write_password
from medsendx_edge.config import DestinationConfig, UploadConfig
from medsendx_edge.errors import PermanentUploadError, TransientUploadError
from medsendx_edge.spool import OUTBOX, SENT, Spool, new_id
from medsendx_edge.synthetic import synthetic_mammogram
from medsendx_edge.upload.destinations import PRESENT, make_destination
from medsendx_edge.upload.uploader import Uploader


@pytest.fixture
def dicom_file(tmp_path):
    ds, _ = synthetic_mammogram(64, 64, seed=5)
    # the uploader hands destinations the claimed file: its name is the spool's, never the sent one
    path = tmp_path / "01a21c9399b1d42c3d90a095.dcm.work"
    ds.save_as(path, enforce_file_format=True)
    return ds, path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_directory_writes_the_export_name_with_the_suffix_and_checks_the_hash(tmp_path, dicom_file):
    ds, path, digest = dicom_file
    dest = make_destination(DestinationConfig(kind="directory", path=tmp_path / "archive"))
    dest.send(path, "e" * 24, digest)
    dest.send(path, "f" * 24, digest, suffix=".parquet")
    assert sorted(p.name for p in (tmp_path / "archive").iterdir()) == ["e" * 24 + ".dcm", "f" * 24 + ".parquet"]
    assert (tmp_path / "archive" / ("e" * 24 + ".dcm")).read_bytes() == path.read_bytes()
    with pytest.raises(PermanentUploadError, match="does not match the sha256"):
        dest.send(path, "g" * 24, "0" * 64)
    assert not (tmp_path / "archive" / ("g" * 24 + ".dcm")).exists()  # nothing half-written either


def test_directory_on_a_missing_disk_is_transient(tmp_path, dicom_file):
    _, path, digest = dicom_file
    (tmp_path / "usb").write_text("a file where the mount point should be")
    dest = make_destination(DestinationConfig(kind="directory", path=tmp_path / "usb" / "archive"))
    with pytest.raises(TransientUploadError, match="directory destination"):
        dest.send(path, "e" * 24, digest)


def test_http_fills_the_url_template_and_says_what_it_sends(tmp_path, httpserver, dicom_file):
    _, path, digest = dicom_file
    seen = []

    def handler(request):
        seen.append((request.path, request.headers.get("Content-Type"), request.headers.get("X-Content-SHA256"),
                     request.get_data()))
        return Response("stored", status=201)

    httpserver.expect_request(f"/bucket/{'e' * 24}/{digest}", method="PUT").respond_with_handler(handler)
    dest = make_destination(DestinationConfig(kind="http", path=None, http_method="PUT",
                                              url=httpserver.url_for("/bucket/{id}/{sha256}")))
    dest.send(path, "e" * 24, digest)
    dest.close()
    assert seen == [(f"/bucket/{'e' * 24}/{digest}", "application/dicom", digest, path.read_bytes())]


def test_dicomweb_sends_one_multipart_instance_and_reads_the_stow_answer(tmp_path, httpserver, dicom_file):
    ds, path, digest = dicom_file
    uid = str(ds.SOPInstanceUID)
    bodies = []

    def ok(request):
        bodies.append((request.headers["Content-Type"], request.get_data()))
        return Response('{"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["%s"]}}]}}' % uid,
                        status=200, content_type="application/dicom+json")

    httpserver.expect_oneshot_request("/dicom-web/studies", method="POST").respond_with_handler(ok)
    dest = make_destination(DestinationConfig(kind="dicomweb", path=None, url=httpserver.url_for("/dicom-web")))
    dest.send(path, "e" * 24, digest)
    ctype, body = bodies[0]
    msg = email.message_from_bytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
    parts = msg.get_payload()
    assert msg.get_content_type() == "multipart/related" and len(parts) == 1
    assert parts[0].get_content_type() == "application/dicom"
    assert parts[0].get_payload(decode=True) == path.read_bytes()
    # a PACS that refuses this instance by name: permanent, with its failure reason
    httpserver.expect_oneshot_request("/dicom-web/studies", method="POST").respond_with_data(
        '{"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["%s"]}, '
        '"00081197": {"vr": "US", "Value": [42752]}}]}}' % uid, status=409, content_type="application/dicom+json")
    with pytest.raises(PermanentUploadError, match="failure reason 42752"):
        dest.send(path, "e" * 24, digest)
    # 200 without this instance among the stored ones: not delivered
    httpserver.expect_oneshot_request("/dicom-web/studies", method="POST").respond_with_data(
        "{}", status=200, content_type="application/dicom+json")
    with pytest.raises(TransientUploadError, match="not stored"):
        dest.send(path, "e" * 24, digest)
    dest.close()
    assert pydicom.dcmread(path).SOPInstanceUID == uid and os.path.exists(path)


# --------------------------------------------------------------------------- never send twice
def test_dicomweb_asks_orthanc_before_a_resend(tmp_path, orthanc, dicom_file):
    ds, path, digest = dicom_file
    cfg = DestinationConfig(kind="dicomweb", path=None, url=orthanc.dicomweb, username=orthanc.user,
                            password_file=write_password(tmp_path, orthanc.password))
    dest = make_destination(cfg)
    assert dest.send(path, "e" * 24, digest, retry=True) is None          # not there yet: sent
    assert orthanc.instance_count() == 1
    assert dest.send(path, "e" * 24, digest, retry=True) == PRESENT       # there: QIDO-RS says so
    # a first attempt asks too (the PACS may hold the UID from elsewhere): the same bytes, nothing sent
    assert dest.send(path, "e" * 24, digest) == PRESENT
    dest.close()


def test_a_resend_found_at_the_destination_sends_nothing_and_is_counted(tmp_path, httpserver, dicom_file):
    ds, path, digest = dicom_file
    uid = str(ds.SOPInstanceUID)
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    httpserver.expect_request("/dicom-web/instances", method="GET", query_string={
        "SOPInstanceUID": uid, "includefield": "0020000D,0020000E,00080018"}).respond_with_json(
        [{"00080018": {"vr": "UI", "Value": [uid]}, "0020000D": {"vr": "UI", "Value": [study]},
          "0020000E": {"vr": "UI", "Value": [series]}}])
    # WADO-RS: the copy the PACS holds, byte for byte ours (compared by sha256 before it counts)
    httpserver.expect_request(f"/dicom-web/studies/{study}/series/{series}/instances/{uid}",
                              method="GET").respond_with_data(
        b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes() + b"\r\n--b1--\r\n",
        content_type='multipart/related; type="application/dicom"; boundary=b1')
    spool = Spool(tmp_path / "spool")
    item_id = new_id()
    size = path.stat().st_size
    spool.publish_file(OUTBOX, item_id, path)
    up = Uploader(spool, make_destination(DestinationConfig(kind="dicomweb", path=None,
                                                            url=httpserver.url_for("/dicom-web"))),
                  UploadConfig())
    up.reconcile()
    spool.state.mark_interrupted(item_id)  # as recovery does for an upload cut by a power cut
    assert up.step()
    assert spool.state.item(item_id).state == "delivered" and spool.path(SENT, item_id).exists()
    assert spool.state.get("bytes_not_resent") == str(size)
    assert [r.method for r, _ in httpserver.log] == ["GET", "GET"]  # QIDO-RS and WADO-RS, no STOW-RS
    up.destination.close()


def test_http_put_heads_before_a_resend(tmp_path, httpserver, dicom_file):
    _, path, digest = dicom_file
    url = f"/bucket/{'e' * 24}"
    httpserver.expect_request(url, method="HEAD").respond_with_response(Response(
        status=200, headers={"X-Content-SHA256": digest, "Content-Length": str(path.stat().st_size)}))
    dest = make_destination(DestinationConfig(kind="http", path=None, http_method="PUT",
                                              url=httpserver.url_for("/bucket/{id}")))
    assert dest.send(path, "e" * 24, digest, retry=True) == PRESENT
    assert [r.method for r, _ in httpserver.log] == ["HEAD"]
    httpserver.clear()
    httpserver.expect_request(url, method="HEAD").respond_with_response(Response(status=404))
    httpserver.expect_request(url, method="PUT").respond_with_data("ok", status=201)
    assert dest.send(path, "e" * 24, digest, retry=True) is None
    assert [r.method for r, _ in httpserver.log] == ["HEAD", "PUT"]
    dest.close()


def test_recovery_counts_an_interrupted_upload_as_an_attempt(tmp_path, dicom_file):
    _, path, digest = dicom_file
    spool = Spool(tmp_path / "spool")
    item_id = new_id()
    size = path.stat().st_size
    spool.publish_file(OUTBOX, item_id, path)
    spool.state.enqueue(item_id, 2, size, digest)
    spool.claim(OUTBOX, item_id)  # the power went during the send
    spool.recover()
    row = spool.state.item(item_id)
    assert spool.ready(OUTBOX) == [item_id] and row.attempts == 1 and row.last_error == "interrupted by a restart"


def test_describe_names_kind_and_host_never_a_user_password_path_or_query():
    """Upload events and status name where a destination sends (issue 26): never its credentials."""
    from medsendx_edge.config import DestinationConfig
    from medsendx_edge.upload.destinations import describe

    cases = {
        DestinationConfig(kind="http", url="https://user:pw@host.example:8443/up?token=abc"): "http host.example:8443",
        DestinationConfig(kind="dicomweb", url="http://[fe80::1]:8042/dicom-web"): "dicomweb [fe80::1]:8042",
        DestinationConfig(kind="s3", url="https://key:secret@s3.example:9000", bucket="b"): "s3 b at s3.example:9000",
        DestinationConfig(kind="dicomweb", url="https://pacs.example:84430/tenant-7/dicom-web"): "dicomweb pacs.example",
        DestinationConfig(kind="dimse", host="pacs.local", port=104): "dimse pacs.local:104",
    }
    for cfg, want in cases.items():
        assert describe(cfg) == want
