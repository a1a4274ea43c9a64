"""highdicom's table of DICOM modules, only the part our SRs read: an extract checked against highdicom's
own table at each start, the rest of the table loaded if anything asks for it.

highdicom answers "is this attribute in that IOD" (its SOP class constructor asks for Content Date and
Content Time, its image items ask for the referenced image's frames) and "which attributes does the
Patient module hold" (the SR's patient and study from its evidence) from one table of every module of the
standard: ``highdicom/_standard/module_attribute_map.json``, 22.6 MB of JSON decoded into 99,740 objects
on the first SR.  Measured (highdicom 0.28.2, the collector off as ``run`` holds it): 0.12 s of
interpreter-locked CPU at every start and 69 MB resident for the process's life (109 MB at its peak), for
59 of its 436 modules: those of the Mammography CAD SR IOD and of the images the triage reads
(``triage/gate.py``'s SOP classes).

The extract (``medsendx_edge/data/highdicom_modules.json.gz``, written by ``python -m
medsendx_edge.triage.hdtables``) holds those modules as highdicom's table has them, with the SHA-256 of the
table it was cut from.  :func:`install` reads highdicom's table file and hashes it (about 25 ms, no
decoding): only when it is the same table does highdicom's table function return the extract, in each of
highdicom's modules that imported it.  Any module outside it (an image of another IOD referenced, a
highdicom feature we do not use) loads the whole table first, as highdicom would have: the answers are
highdicom's in every case, sooner for ours.  A highdicom whose table or function differs gets no extract.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import pkgutil
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

#: The extract, beside the package's other data.
EXTRACT = Path(__file__).resolve().parent.parent / "data" / "highdicom_modules.json.gz"
_TABLE = "_standard/module_attribute_map.json"
_NAME = "get_module_attribute_map"

_lock = threading.Lock()
_installed: dict[str, Any] = {}   # "original": highdicom's function, "table": ours


class _Table(dict[str, Any]):
    """The extract's modules; a module outside it, or a question about the whole table (its keys, its
    length), completes it from highdicom's own table first."""

    def __init__(self, modules: dict[str, Any], load_whole: Callable[[], dict[str, Any]]) -> None:
        super().__init__(modules)
        self._load_whole = load_whole
        self.complete = False
        self._completing = threading.Lock()

    def _complete(self) -> None:
        with self._completing:
            if not self.complete:
                whole = self._load_whole()
                dict.update(self, {k: v for k, v in whole.items() if not dict.__contains__(self, k)})
                self.complete = True

    def __missing__(self, key: str) -> Any:
        if not self.complete:
            self._complete()
            return super().__getitem__(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        if super().__contains__(key):
            return True
        if not self.complete:
            self._complete()
            return super().__contains__(key)
        return False

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def copy(self) -> dict[str, Any]:
        self._complete()
        return dict(dict.items(self))

    def __reduce__(self) -> tuple[Any, ...]:   # pickled or deep-copied: the whole table, as a plain dict
        return (dict, (self.copy(),))

    __hash__ = None


def _whole_first(name: str) -> Callable[..., Any]:
    method = getattr(dict, name)

    def whole_first(self: _Table, *args: Any, **kwargs: Any) -> Any:
        self._complete()
        return method(self, *args, **kwargs)

    whole_first.__name__ = name
    return whole_first


# A question about the table as a whole (its keys, its length, equality, what no caller of highdicom's asks
# today) is answered as the whole table would answer it: completed first.
for _name in ("__iter__", "__len__", "__reversed__", "__eq__", "__ne__", "__repr__", "keys", "values", "items",
              "setdefault", "pop", "popitem"):
    setattr(_Table, _name, _whole_first(_name))


def sop_classes() -> list[str]:
    """The SOP classes whose IODs' modules the extract holds: our SR's and those of the images the triage
    reads (the images an SR references)."""
    from pydicom.uid import MammographyCADSRStorage   # report.MAMMOGRAPHY_CAD_SR (which imports this module)

    from medsendx_edge.triage.gate import MAMMO_SOP_CLASSES

    return sorted({str(MammographyCADSRStorage), *MAMMO_SOP_CLASSES})


def cut(whole: dict[str, Any], iod_modules: dict[str, Any], sop_iods: dict[str, str],
        classes: list[str]) -> dict[str, Any]:
    """The modules of the IODs of ``classes``, as ``whole`` has them."""
    keys = {m["key"] for sop in classes if sop in sop_iods for m in iod_modules[sop_iods[sop]]}
    return {k: whole[k] for k in sorted(keys) if k in whole}


def _source() -> bytes:
    data = pkgutil.get_data("highdicom", _TABLE)
    if data is None:
        raise FileNotFoundError(_TABLE)
    return data


def write(path: Path = EXTRACT) -> dict[str, Any]:
    """(Re)write the extract from the installed highdicom's table; returns what was written."""
    import highdicom
    from highdicom import _standard_utils as tables

    raw = _source()
    classes = sop_classes()
    doc = {"highdicom": highdicom.__version__, "sha256": hashlib.sha256(raw).hexdigest(), "sop_classes": classes,
           "modules": cut(json.loads(raw), tables.get_iod_module_map(), tables.get_sop_class_iod_map(), classes)}
    # highdicom's records as its file has them (their keys in its order): only the modules are left out
    path.write_bytes(gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), 9, mtime=0))
    return doc


def install() -> bool:
    """highdicom's table function answers from the extract in every highdicom module bound to it, if
    highdicom's table is the one the extract was cut from (and its function the one we know); returns
    whether the extract is in use.  Idempotent; never raises (without it, highdicom loads its table)."""
    with _lock:
        if "installed" in _installed:
            return bool(_installed["installed"])   # tried once a process (a mismatch is read and hashed once)
        _installed["installed"] = False
        try:
            from highdicom import _standard_utils as tables

            original = getattr(tables, _NAME, None)
            if original is None or not hasattr(original, "cache_info"):
                return False   # not the cached table function this was made against
            doc = json.loads(gzip.decompress(EXTRACT.read_bytes()))
            if hashlib.sha256(_source()).hexdigest() != doc["sha256"]:
                return False   # another table: highdicom's own, whole
            table = _Table(doc["modules"], original)

            def get_module_attribute_map() -> dict[str, list[Any]]:
                return table

            functools.update_wrapper(get_module_attribute_map, original)
            # highdicom's function is an lru_cache: its cache's questions go to it (ours holds one table)
            get_module_attribute_map.cache_info = original.cache_info  # type: ignore[attr-defined]
            get_module_attribute_map.cache_clear = original.cache_clear  # type: ignore[attr-defined]
            for name, module in list(sys.modules.items()):
                if (name == "highdicom" or name.startswith("highdicom.")) and getattr(module, _NAME, None) is original:
                    setattr(module, _NAME, get_module_attribute_map)
            _installed.update(installed=True, original=original, table=table, function=get_module_attribute_map)
            return True
        except Exception:  # noqa: BLE001 - an extract that cannot be read or checked: highdicom's own table
            return False


def uninstall() -> None:
    """highdicom's own function back where :func:`install` put ours (for tests)."""
    with _lock:
        if not _installed.get("installed"):
            _installed.clear()   # the next install tries again
            return
        for name, module in list(sys.modules.items()):
            if (name == "highdicom" or name.startswith("highdicom.")) and getattr(module, _NAME, None) is _installed["function"]:
                setattr(module, _NAME, _installed["original"])
        _installed.clear()


def installed_table() -> _Table | None:
    """The extract in use, or None."""
    table = _installed.get("table")
    return table if isinstance(table, _Table) else None


if __name__ == "__main__":
    out = write()
    print(f"{EXTRACT}: {len(out['modules'])} modules of highdicom {out['highdicom']} ({EXTRACT.stat().st_size} bytes)")
