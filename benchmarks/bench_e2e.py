"""End to end: 20 mammograms (5 studies of 4 views, 2560x3328 16-bit phantoms) dropped into the inbox until
they are stored in a loopback Orthanc, against Orthanc itself set up as the anonymizing gateway.

* **ours**: ``medsendx-edge run --once`` (triage on) with a fresh spool, destination a fresh Orthanc over
  STOW-RS; wall time of the process, its CPU, the peak of its process tree's summed RSS and PSS (sampled
  every 100 ms), the PACS's CPU over the same time (it shares the 2 cores), per-stage times from its
  JSON log.
* **ours, a running daemon**: ``medsendx-edge run`` started and warmed before the clock starts, then the
  files copied into its inbox; wall time until the Orthanc holds them all (the unit a truck lives by, and
  how the Orthanc gateway is measured: its servers are up before its clock starts).
* **Orthanc as the gateway**: an "edge" Orthanc receives the files (REST POST /instances), anonymizes each
  study (POST /studies/{id}/anonymize) and sends it by STOW-RS to a "cloud" Orthanc through the DICOMweb
  plugin (POST /dicom-web/servers/cloud/stow); wall time until the cloud holds all 20.

Rounds interleaved, medians.  Each contender's clock starts after an ``os.sync()``: the writes the previous
one left (up to a GB of dirty pages) are not written back on the next one's clock.
``python benchmarks/bench_e2e.py [--rounds 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import requests
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from orthanc_server import OrthancServer  # noqa: E402

from medsendx_edge.triage.phantom import phantom_dataset  # noqa: E402

VIEWS = [("CC", "R"), ("CC", "L"), ("MLO", "R"), ("MLO", "L")]


def make_inputs(folder: Path, rows: int, cols: int, source: str = "phantom") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    if source != "phantom":   # images this project did not generate (benchmarks/sources.py)
        import sources

        for i, ds in enumerate(sources.make(source, 20)):
            p = folder / f"{source}{i}.dcm"
            ds.save_as(p, enforce_file_format=True)
            out.append(p)
        return out
    for study in range(5):
        for i, (view, lat) in enumerate(VIEWS):
            ds, _ = phantom_dataset(rows, cols, spacing_mm=0.085, view=view, laterality=lat,
                                    density=0.1 + 0.15 * study, seed=10 * study + i,
                                    study_uid=f"1.2.826.0.1.3680043.8.498.{study + 1}",
                                    patient_id=f"PID-{study}", patient_name=f"DOE^JANE{study}")
            p = folder / f"s{study}_{lat}{view}.dcm"
            ds.save_as(p, enforce_file_format=True)
            out.append(p)
    return out


COMPRESSION = "none"
THREADS = 2


def _daemon_config(work: Path, cloud: OrthancServer) -> Path:
    """Our daemon's config (``work/cfg.yaml``) towards ``cloud`` over STOW-RS; returns its empty inbox."""
    pw = work / "pw"
    pw.write_text(cloud.password)
    pw.chmod(0o600)
    cfg = {"spool_dir": str(work / "spool"),
           "watch": {"stable_seconds": 0.05, "rescan_seconds": 1},
           "destination": {"kind": "dicomweb", "url": cloud.dicomweb, "username": cloud.user,
                           "password_file": str(pw), "compression": COMPRESSION},
           "anonymize": {"secret_file": str(work / "s.key"), "linkage_key_file": str(work / "l.key")},
           "log": {"format": "json", "level": "info"},
           "triage": {"threads": THREADS}}
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    inbox = work / "spool" / "inbox"
    inbox.mkdir(parents=True)
    return inbox


def _settle() -> None:
    """Each contender's clock starts with no other writes pending: the previous one's (or the inputs'
    generation's) dirty pages, up to a GB, written back during the next measurement cost our fsyncs 0.3-0.8 s
    of a 4 s run, and whichever contender followed the largest writer paid them."""
    os.sync()


def run_ours(inputs: list[Path], work: Path) -> dict[str, object]:
    cloud = OrthancServer(work / "cloud")
    try:
        inbox = _daemon_config(work, cloud)
        for p in inputs:
            shutil.copyfile(p, inbox / p.name)
            os.utime(inbox / p.name, (0, 0))
        _settle()   # the files at rest in the inbox, as the modality left them before the run
        wrapper = ("import resource, subprocess, sys, json, time; t = time.perf_counter(); "
                   "p = subprocess.run(sys.argv[1:], stderr=open(sys.argv[-1] + '.log', 'w')); "
                   "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
                   "print(json.dumps([time.perf_counter() - t, p.returncode, r.ru_maxrss, r.ru_utime + r.ru_stime]))")
        cmd = [sys.executable, "-m", "medsendx_edge.cli", "run", "--once", "--config", str(work / "cfg.yaml")]
        cloud_cpu0 = _cpu_s(cloud.proc.pid)
        proc = subprocess.Popen([sys.executable, "-c", wrapper, *cmd], stdout=subprocess.PIPE, text=True)
        watch = TreeWatch(proc.pid, include_root=False)   # the wrapper's own memory left out
        out, _ = proc.communicate()
        watch.stop()
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        seconds, rc, rss_kb, cpu_s = json.loads(out)
        cloud_cpu = _cpu_s(cloud.proc.pid) - cloud_cpu0
        stages: dict[str, list[float]] = defaultdict(list)
        for line in Path(str(work / "cfg.yaml") + ".log").read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") in ("file_processed", "file_delivered") and "duration_ms" in ev:
                stages[ev.get("stage", "?")].append(float(ev["duration_ms"]))
        stored = cloud.instance_count()
        return {"s": seconds, "rc": rc, "peak_rss_mb": rss_kb / 1024, "stored": stored, "cpu_s": cpu_s,
                "tree_peak_rss_mb": watch.peak_rss, "tree_peak_pss_mb": watch.peak_pss, "pacs_cpu_s": cloud_cpu,
                "stage_ms_per_image": {k: statistics.mean(v) for k, v in stages.items()},
                "stage_s_total": {k: sum(v) / 1000 for k, v in stages.items()}}
    finally:
        cloud.stop()


def run_ours_warm(inputs: list[Path], work: Path, expected: int) -> dict[str, object]:
    """Drop to delivered on a running daemon, the way a truck works (and the way the Orthanc gateway is
    measured: its servers are up before its clock starts): ``medsendx-edge run`` is started and waits
    with everything loaded (``READY=1`` on its notify socket, then its ``triage_warmed`` event),
    then the 20 files are copied into the inbox as a modality writes them; the clock stops when the
    PACS (a fresh Orthanc) has said it stored ``expected`` instances (the images and their SRs).  That
    is its ``OnStoredInstance`` event, not a poll of its REST API: polling every 20 ms took about half
    a core from the 2 measured and the PACS's index, while the Orthanc gateway (a synchronous STOW)
    is measured without one.  CPU is the daemon's over that window (/proc), RSS its high-water mark."""
    import signal
    import socket

    cloud = OrthancServer(work / "cloud", feed=True)
    proc = None
    try:
        inbox = _daemon_config(work, cloud)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(work / "notify.sock"))
        sock.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": str(work / "notify.sock")}
        proc = subprocess.Popen([sys.executable, "-m", "medsendx_edge.cli", "run", "--config", str(work / "cfg.yaml")],
                                env=env, stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "w"))
        watch = TreeWatch(proc.pid)
        while "READY=1" not in sock.recv(4096).decode():
            pass
        log = work / "daemon.log"
        deadline = time.monotonic() + 60
        while not any(e in log.read_text() for e in ("triage_warmed", "warm_up_failed")) and time.monotonic() < deadline:
            time.sleep(0.05)
        s = requests.Session()
        s.auth = (cloud.user, cloud.password)
        watch.sample()
        cpu0, cloud_cpu0 = dict(watch.cpu), _cpu_s(cloud.proc.pid)
        _settle()
        t0 = time.perf_counter()
        for p in inputs:
            shutil.copyfile(p, inbox / p.name)
        cloud.wait_stored(expected, 300)   # Orthanc's own word, as each instance is stored: no polling
        seconds = time.perf_counter() - t0
        stored = int(s.get(cloud.url + "/statistics", timeout=10).json()["CountInstances"])
        watch.stop()
        watch.sample()
        cpu = watch.cpu_s - sum(cpu0.values())
        return {"s": seconds, "stored": stored, "cpu_s": cpu, "peak_rss_mb": _hwm_mb(proc.pid),
                "tree_peak_rss_mb": watch.peak_rss, "tree_peak_pss_mb": watch.peak_pss,
                "pacs_cpu_s": _cpu_s(cloud.proc.pid) - cloud_cpu0}
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        cloud.stop()


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc (the daemon starts none today; a future worker process counts)."""
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class TreeWatch:
    """Samples a process tree every 100 ms while the work runs: the CPU of each live process with that of the
    children it reaped (a process that ended leaves the tally, its parent's count takes it: once), and the
    peak of the tree's summed RSS and PSS (the proportional set: pages shared between processes counted
    once; a peak shorter than 100 ms can be missed).  ``include_root``: False to leave out a measuring
    wrapper at the root (its own 12 MB)."""

    def __init__(self, pid: int, include_root: bool = True) -> None:
        import threading

        self.pid, self.include_root, self.peak_rss, self.peak_pss = pid, include_root, 0.0, 0.0
        self.cpu: dict[int, float] = {}
        self._pids: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self, rediscover: bool = True) -> None:
        if rediscover or not self._pids:
            self._pids = _tree(self.pid)
            for gone in set(self.cpu) - set(self._pids):
                del self.cpu[gone]      # ended and reaped: its parent's count has it
        rss = pss = 0.0
        for p in self._pids:
            try:
                self.cpu[p] = _cpu_s(p, reaped=True)
                if p == self.pid and not self.include_root:
                    continue
                for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) / 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) / 1024
            except (OSError, ValueError, IndexError):
                self.cpu.pop(p, None)   # it ended: its parent's reaped count has it
                continue
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.1):
            self.sample(rediscover=n % 10 == 0)   # the tree from /proc once a second: a light watch
            n += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())


def _cpu_s(pid: int, reaped: bool = False) -> float:
    """User and system CPU of ``pid``; with ``reaped``, also of the children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_orthanc_gateway(inputs: list[Path], work: Path) -> dict[str, object]:
    cloud = OrthancServer(work / "cloud", feed=True)   # the same PACS as ours (its Lua hook included)
    edge = OrthancServer(work / "edge", extra={"DicomWeb": {"Servers": {
        "cloud": {"Url": cloud.dicomweb + "/", "Username": cloud.user, "Password": cloud.password}}}})
    try:
        s = requests.Session()
        s.auth = (edge.user, edge.password)
        _settle()
        t0 = time.perf_counter()
        studies = set()
        for p in inputs:
            r = s.post(edge.url + "/instances", data=p.read_bytes(), timeout=60)
            r.raise_for_status()
            studies.add(r.json()["ParentStudy"])
        for study in studies:
            r = s.post(f"{edge.url}/studies/{study}/anonymize", json={}, timeout=120)
            r.raise_for_status()
            new = r.json()["ID"]
            r = s.post(f"{edge.url}/dicom-web/servers/cloud/stow", json={"Resources": [new]}, timeout=300)
            r.raise_for_status()
        seconds = time.perf_counter() - t0
        return {"s": seconds, "stored": cloud.instance_count()}
    finally:
        edge.stop()
        cloud.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=3328)
    ap.add_argument("--cols", type=int, default=2560)
    ap.add_argument("--compression", default="none", help="destination.compression for our daemon")
    ap.add_argument("--threads", type=int, default=2, help="triage.threads for our daemon")
    ap.add_argument("--source", default="phantom", help="phantom (the own, 2560x3328) | films (the 8 real "
                    "CBIS-DDSM films relabelled, 4560x2864 16-bit, cycled to 20) | independent")
    args = ap.parse_args()
    global COMPRESSION, THREADS
    COMPRESSION, THREADS = args.compression, args.threads
    # The package measured as installed: pip compiles an installed package's bytecode, and a running daemon
    # compiles it at its first start.  A working copy under PYTHONDONTWRITEBYTECODE=1 (this sandbox's shell
    # sets it) has none, and every `run --once` compiled its 27 modules again: 85 ms of each process's clock.
    import compileall
    import medsendx_edge

    compileall.compile_dir(str(Path(medsendx_edge.__file__).parent), quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(Path(tmp) / "inputs", args.rows, args.cols, args.source)
        mb = sum(p.stat().st_size for p in inputs) / 1e6
        ours, warm, gateway = [], [], []
        for r in range(args.rounds):
            for name, fn, out in (("ours", run_ours, ours), ("warm", None, warm), ("orthanc", run_orthanc_gateway, gateway)):
                work = Path(tmp) / f"{name}{r}"
                work.mkdir()
                if fn is None:   # the running daemon: it must store what run --once stored
                    out.append(run_ours_warm(inputs, work, int(ours[-1]["stored"])))  # type: ignore[call-overload]
                else:
                    out.append(fn(inputs, work))
                shutil.rmtree(work, ignore_errors=True)
    t_ours = statistics.median(float(x["s"]) for x in ours)
    t_gw = statistics.median(float(x["s"]) for x in gateway)
    print(f"20 mammograms, source {args.source} ({mb:.0f} MB), {args.rounds} interleaved rounds, medians")
    def mem(runs: list[dict[str, object]]) -> str:
        return (f"peak RSS {max(float(x['tree_peak_rss_mb']) for x in runs):.0f} MB summed over its processes "
                f"(PSS {max(float(x['tree_peak_pss_mb']) for x in runs):.0f} MB)")

    def cpu(runs: list[dict[str, object]], wall: float) -> str:
        return (f"CPU {statistics.median(float(x['cpu_s']) for x in runs):.1f} s, the PACS's "
                f"{statistics.median(float(x['pacs_cpu_s']) for x in runs):.1f} s (of {2 * wall:.1f} on 2 cores)")

    print(f"  ours (run --once, triage on, compression {COMPRESSION}, STOW-RS)  {t_ours:6.2f} s   stored "
          f"{[x['stored'] for x in ours]}   {mem(ours)}   {cpu(ours, t_ours)}")
    t_warm = statistics.median(float(x["s"]) for x in warm)
    print(f"  ours (a running daemon, drop to delivered)       {t_warm:6.2f} s   stored {[x['stored'] for x in warm]}   "
          f"{mem(warm)}   {cpu(warm, t_warm)}")
    print(f"  Orthanc as anonymizing gateway                    {t_gw:6.2f} s   stored {[x['stored'] for x in gateway]}")
    print(f"  ratio gateway / ours = {t_gw / t_ours:.2f}x for the process (target >= 2.5), "
          f"{t_gw / t_warm:.2f}x drop to delivered on a running daemon")
    # Each round's own ratio (the gateway against our runs of the same round, minutes apart): this machine's
    # speed moves by a fifth within an hour, and a median of each column can pair a fast round with a slow one.
    paired = [(float(g["s"]) / float(o["s"]), float(g["s"]) / float(w["s"])) for o, w, g in zip(ours, warm, gateway)]
    print("  per round: " + ", ".join(f"{a:.2f}x / {b:.2f}x" for a, b in paired)
          + f"   (median {statistics.median(a for a, _ in paired):.2f}x / {statistics.median(b for _, b in paired):.2f}x)")
    per = ours[len(ours) // 2]["stage_ms_per_image"]
    tot = ours[len(ours) // 2]["stage_s_total"]
    for stage in ("anonymize", "triage", "route", "upload"):
        if stage in per:  # type: ignore[operator]
            print(f"    {stage:10s} {per[stage]:7.1f} ms per image   {tot[stage]:6.2f} s in all")  # type: ignore[index]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"bench_e2e_{args.source}.json").write_text(json.dumps({"ours": ours, "ours_running_daemon": warm,
                                                                            "orthanc_gateway": gateway},
                                                                indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
