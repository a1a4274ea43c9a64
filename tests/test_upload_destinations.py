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

from medsendx_edge.config import DestinationConfig
from medsendx_edge.errors import PermanentUploadError, TransientUploadError
from medsendx_edge.synthetic import synthetic_mammogram
from medsendx_edge.upload.destinations import make_destination


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
