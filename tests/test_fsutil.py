"""The inbox walk: no recursion limit, symlinked folders never followed, unreadable folders counted."""

from __future__ import annotations

import os
import subprocess

from medsendx_edge.fsutil import WalkErrors, walk


def test_a_very_deep_tree_is_walked_without_recursion(tmp_path):
    d = tmp_path
    for _ in range(1500):  # deeper than Python's recursion limit
        d = d / "d"
        os.mkdir(d)
    (d / "x.dcm").write_bytes(b"x")
    try:
        found = [os.path.join(top, f) for top, _dirs, files in walk(tmp_path) for f in files]
        assert len(found) == 1 and found[0].endswith("x.dcm")
    finally:  # pytest's own clean-up recurses: remove it here
        subprocess.run(["rm", "-rf", str(tmp_path / "d")], check=True)


def test_symlinked_folders_are_files_and_descend_filters(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.dcm").write_bytes(b"a")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "b.dcm").write_bytes(b"b")
    os.symlink(tmp_path / "real", tmp_path / "loop")
    seen = {}
    for top, dirs, files in walk(tmp_path, descend=lambda name: not name.startswith(".")):
        seen[os.path.relpath(top, tmp_path)] = (sorted(dirs), sorted(files))
    assert seen["."][1] == ["loop"]                # the link is listed, never entered
    assert "real" in seen and ".hidden" not in seen


def test_unreadable_folders_are_counted_not_raised(tmp_path):
    errors = WalkErrors()
    list(walk(tmp_path / "does-not-exist", errors=errors))
    assert errors.total == 1 and errors.counts == {"ENOENT": 1}
