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


def test_no_import_cycles_between_modules():
    """Issue 25: config.py and errors.py imported each other (redact_credentials). Every import, lazy ones
    included, makes an edge; a package's factory reaching its own submodules (destinations/__init__ ->
    dicomweb) is the one kind of edge left out."""
    import ast

    root = Path(__file__).resolve().parents[1] / "medsendx_edge"
    mods = {}
    for p in root.rglob("*.py"):
        name = ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medsendx_edge"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods and t != m and not (mods[m].name == "__init__.py" and t.startswith(m + ".")):
                    graph[m].add(t)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            v = todo.pop()
            if v == goal:
                return True
            if v not in seen:
                seen.add(v)
                todo.extend(graph[v])
        return False

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert cycles == [], cycles
