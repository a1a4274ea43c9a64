"""One file's journey, inbox to DICOMweb (a real Orthanc), measured from outside the code (issue 25):

- **modules touched**: the package's modules whose functions ran while ``run --once`` took the file
  through (a profile hook on every thread, start-up and config loading left out);
- **header parses**: calls of pydicom's ``read_partial`` (every ``dcmread``, whatever the import style);
- **whole-file reads**: openings of one of the file's own copies (inbox, queues, sent) that read more than
  half of it, counted by ``strace`` on the process (reads of a header only are counted apart).

    python benchmarks/journey.py            # prints a JSON line (the film as the package ships it: JPEG)
    python benchmarks/journey.py --native   # the same film with uncompressed pixel data
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def child(cfg_path: str, out_path: str) -> None:
    """Runs in the traced process: the daemon's ``run --once`` with a profile hook."""
    import pydicom.filereader

    from medsendx_edge.config import load_config
    from medsendx_edge.daemon import Daemon
    from medsendx_edge.logs import configure_logging

    configure_logging("warning", "json", stream=open(os.devnull, "w"))
    cfg = load_config(cfg_path)
    d = Daemon(cfg, cfg_path)
    modules: set[str] = set()
    parses = Counter()
    parse_code = pydicom.filereader.read_partial.__code__

    def hook(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "call":
            if frame.f_code is parse_code:
                parses["read_partial"] += 1
                if os.environ.get("JOURNEY_WHERE"):
                    f, chain = frame.f_back, []
                    while f is not None and len(chain) < 4:
                        if f.f_globals.get("__name__", "").startswith("medsendx_edge"):
                            chain.append(f"{f.f_globals['__name__']}:{f.f_code.co_name}")
                        f = f.f_back
                    os.write(2, ("PARSE " + " <- ".join(chain) + "\n").encode())
            name = frame.f_globals.get("__name__", "")
            if name.startswith("medsendx_edge"):
                modules.add(name)
        return None

    threading.setprofile(hook)
    sys.setprofile(hook)
    os.write(2, b"JOURNEY-START\n")
    waiting = d.run_once()
    sys.setprofile(None)
    threading.setprofile(None)  # type: ignore[arg-type]
    os.write(2, b"JOURNEY-END\n")
    Path(out_path).write_text(json.dumps({"modules": sorted(modules), "header_parses": parses["read_partial"],
                                          "waiting": waiting}))


def main() -> int:
    import yaml
    from orthanc_server import OrthancServer

    import pydicom
    from mammograms import gen_cases

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        orthanc = OrthancServer(tmp / "orthanc")
        try:
            (tmp / "secrets").mkdir()
            pw = tmp / "secrets" / "pw"
            pw.write_text(orthanc.password)
            pw.chmod(0o600)
            inbox = tmp / "inbox"
            inbox.mkdir()
            ds = pydicom.dcmread(next(iter(gen_cases()))["rcc"])
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.Modality, ds.PresentationIntentType = "MG", "FOR PRESENTATION"
            ds.ImageLaterality, ds.ViewPosition, ds.ImagerPixelSpacing = "R", "CC", [0.05, 0.05]
            if "--native" in sys.argv:   # the film's pixels uncompressed, as most modalities write them
                ds.decompress()
            src = inbox / "IMG0001.dcm"
            ds.save_as(src)
            old = os.path.getmtime(src) - 60
            os.utime(src, (old, old))
            size = src.stat().st_size
            cfg = {"station_name": "JOURNEY", "spool_dir": str(tmp / "spool"), "inbox_dir": str(inbox),
                   "watch": {"mode": "polling", "stable_seconds": 0.1},
                   "destination": {"kind": "dicomweb", "url": orthanc.dicomweb, "username": orthanc.user,
                                   "password_file": str(pw)},
                   "triage": {"send_sr": True},
                   "anonymize": {"secret_file": str(tmp / "secrets" / "site.key"),
                                 "linkage_key_file": str(tmp / "secrets" / "linkage.key")}}
            cfg_path = tmp / "cfg.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            trace = tmp / "strace.txt"
            out = tmp / "out.json"
            subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat,read,pread64,close,write", "-e",
                            "abbrev=none", "-s", "40", "-o", str(trace), sys.executable, __file__, "--child",
                            str(cfg_path), str(out)], check=True, cwd=ROOT,
                           # this tree's package, not whichever one the venv has installed in editable mode
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
            res = json.loads(out.read_text())
            res["whole_file_reads"], res["header_reads"] = _reads(trace.read_text(), str(tmp), size)
            res["delivered"] = orthanc.instance_count()
        finally:
            orthanc.stop()
    res["modules_touched"] = len(res["modules"])
    res["pixels"] = "native" if "--native" in sys.argv else "encapsulated (JPEG)"
    print(json.dumps(res))
    return 0


def _reads(trace: str, root: str, size: int) -> tuple[int, int]:
    """Openings of the file's copies (under the inbox or the spool's queues, not the state databases)
    and the bytes each read, from strace's lines ``PID openat(..., "path", ...) = fd`` and
    ``PID read(fd, ..., n) = got``."""
    open_re = re.compile(r'^(\d+)\s+openat\([^,]+, "([^"]+)", [^)]*\) = (\d+)')
    read_re = re.compile(r'^(\d+)\s+p?read(?:64)?\((\d+),.* = (\d+)$')
    close_re = re.compile(r'^(\d+)\s+close\((\d+)\)')
    fds: dict[tuple[str, str], list] = {}
    done: list[tuple[str, int]] = []
    # strace -f writes each pid's lines; file descriptors are shared by the threads of the process.
    for line in trace.splitlines():
        if m := open_re.match(line):
            path = m.group(2)
            if path.startswith(root) and re.search(r"/(inbox|incoming|anonymized|triaged|outbox|sent)/", path) \
                    and not path.endswith((".json", ".png", ".db", "-wal", "-journal")):
                fds[("p", m.group(3))] = [path, 0]
        elif m := read_re.match(line):
            if ("p", m.group(2)) in fds:
                fds[("p", m.group(2))][1] += int(m.group(3))
        elif m := close_re.match(line):
            rec = fds.pop(("p", m.group(2)), None)
            if rec:
                done.append((rec[0], rec[1]))
    done += [(p, n) for p, n in fds.values()]
    if os.environ.get("JOURNEY_WHERE"):
        for p, n in done:
            print("READ", n, p.replace(root, ""), file=sys.stderr)
    whole = sum(1 for _p, n in done if n > size / 2)
    header = sum(1 for _p, n in done if 0 < n <= size / 2)
    return whole, header


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        sys.exit(0)
    sys.exit(main())
