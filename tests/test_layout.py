"""The layout the maintainers rely on: every module with logic has its own test file
(``medsendx_edge/a/b.py`` -> ``tests/test_a_b.py``; the HTTP-family destinations share one, DIMSE and S3
have their own), each
job of the truck is a subpackage, and config.py imports no stage (no loop between config and the jobs)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "medsendx_edge"
TESTS = Path(__file__).resolve().parent
NO_LOGIC = {"__init__.py", "errors.py"}  # package markers, exception classes
SHARED = {"upload/destinations/_http.py": "test_upload_destinations.py",
          "upload/destinations/dicomweb.py": "test_upload_destinations.py",
          "upload/destinations/http.py": "test_upload_destinations.py",
          "upload/destinations/directory.py": "test_upload_destinations.py",
          "upload/destinations/dimse.py": "test_upload_dimse.py",
          "upload/destinations/s3.py": "test_upload_s3.py"}


def _modules() -> list[str]:
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                  if p.name not in NO_LOGIC and "data" not in p.relative_to(PACKAGE).parts)


def test_every_module_with_logic_has_its_test_file():
    missing = []
    for module in _modules():
        expected = SHARED.get(module, "test_" + module[:-3].replace("/", "_") + ".py")
        path = TESTS / expected
        if not path.exists() or "def test_" not in path.read_text():
            missing.append(f"{module} -> tests/{expected}")
    assert missing == []


def test_each_job_is_a_subpackage_beside_the_flat_core():
    for job in ("anonymize", "triage", "upload", "fleet"):
        assert (PACKAGE / job / "__init__.py").exists()
    for core in ("spool.py", "state.py", "stage.py", "ingest.py", "daemon.py", "config.py", "cli.py"):
        assert (PACKAGE / core).exists()


def test_config_imports_no_job():
    tree = ast.parse((PACKAGE / "config.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    ours = {m for m in imported if m.startswith("medsendx_edge")}
    assert ours <= {"medsendx_edge.errors", "medsendx_edge.vocabulary"}, ours
