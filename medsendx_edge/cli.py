"""``medsendx-edge``: run, status, check-config, requeue, anonymize, reidentify, export-linkage, rotate-linkage, segment,
export-features, mine, apply-config, backup, install, demo (the README's Commands section says what each does)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

# numpy's BLAS in one thread (startup.one_blas_thread says why), told before numpy loads it: OpenBLAS then
# starts no threads at all (50 ms less for a ``segment`` process), unless the operator chose otherwise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from medsendx_edge.config import Config, load_config  # noqa: E402
from medsendx_edge.errors import ConfigError, MedSendXError, QuarantineError  # noqa: E402
from medsendx_edge.logs import configure_logging  # noqa: E402


def _config(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def cmd_run(args: argparse.Namespace) -> int:
    from medsendx_edge.startup import hold_gc

    hold_gc()   # the start's imports and tables without the collector: the daemon's warm-up releases it
    from medsendx_edge.daemon import Daemon
    from medsendx_edge.deaths import arm
    from medsendx_edge.startup import lock_inbox, lock_spool, wait_for_inbox

    from medsendx_edge.config import DEFAULT_CONFIG_PATHS, ENV_CONFIG

    path = args.config or os.environ.get(ENV_CONFIG) or next((p for p in DEFAULT_CONFIG_PATHS if p.exists()), None)
    cfg = load_config(path)
    configure_logging(cfg.log.level, cfg.log.format, cfg.log.stream)
    if not args.once and not wait_for_inbox(cfg):   # (which gives the collector back before it waits)
        return 0   # stopped before the share came: nothing was started (not even the spool's folder)
    _SPOOL_LOCK.append(lock_spool(cfg.spool_dir))   # one daemon a spool: held until the process ends
    if cfg.inbox.is_dir():
        inbox_lock = lock_inbox(cfg.inbox, cfg.spool_dir)   # ... and an inbox
        if inbox_lock is not None:
            _SPOOL_LOCK.append(inbox_lock)
    daemon = Daemon(cfg, config_path=path)
    if not arm(daemon.spool.root / "state"):   # a fatal signal is recorded: the next start blames the file in flight
        daemon.log.warning("fatal_record_unwritable", reason="state/fatal.log belongs to another user: a crash "
                           "will count as a death that left no trace")
    if args.once:
        global _DURABLE_EXIT
        waiting = daemon.run_once()
        _DURABLE_EXIT = True   # every result is on disk (fsynced, the state committed): see entry()
        if waiting:
            print(f"{waiting} file(s) still waiting to be retried", file=sys.stderr)
            return 3
        return 0
    return daemon.run_forever()


def status_data(cfg: Config) -> dict[str, object]:
    from medsendx_edge.health import status_data as data
    from medsendx_edge.spool import Spool

    from medsendx_edge.health import quarantine_by_cause

    spool = Spool(cfg.spool_dir, cfg.inbox)
    spool.ensure_layout()
    return {**data(cfg, spool), "quarantine_by_cause": quarantine_by_cause(spool)}


def _running_daemons_config() -> Config | None:
    """The spool the running daemon recorded at start (startup.runtime_dir()), as a default config around
    it; None when there is no record."""
    from medsendx_edge.startup import RUNTIME_FILE, runtime_dir

    where = runtime_dir() or Path("/run/medsendx-edge")
    try:
        rec = json.loads((where / RUNTIME_FILE).read_text())
        return Config(spool_dir=Path(rec["spool_dir"]), inbox_dir=Path(rec["inbox"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 when healthy, 1 when not (uplink down too long, disk low, quarantine growing, the config file
    broken since the daemon started: then from the running daemon's spool, saying so)."""
    config_error = None
    try:
        cfg = _config(args)
    except ConfigError as exc:
        running = _running_daemons_config()
        if running is None:
            raise
        cfg, config_error = running, str(exc)
    data = status_data(cfg)
    if config_error:
        data["config_error"] = config_error
        data["healthy"] = False
        problems = data["problems"]
        assert isinstance(problems, list)
        problems.insert(0, f"the config file is broken (the daemon runs on the one it started with): {config_error}")
    code = 0 if data["healthy"] else 1
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return code
    counts = data["counts"]
    assert isinstance(counts, dict)
    print(f"spool: {data['spool_dir']}")
    for name, n in counts.items():
        print(f"  {name:<11} {n}")
    q = data["upload_queue"]
    assert isinstance(q, dict)
    from medsendx_edge.vocabulary import Priority

    by_prio = {Priority(int(k)): v for k, v in dict(q["queued_by_priority"]).items()}
    print("upload queue: " + (", ".join(f"{by_prio[p]} {p.label}" for p in sorted(by_prio)) or "empty"))
    if q["recheck_last_24h"]:
        print(f"RETAKE? images flagged recheck in the last 24 h: {', '.join(q['recheck_last_24h'])}")
    print(f"oldest queued item age: {q['oldest_age_s'] if q['oldest_age_s'] is not None else '-'} s")
    b = q["backlog"]
    assert isinstance(b, dict)
    down = q["uplink_status"] != "up"
    drain = (f"- (uplink {q['uplink_status']})" if down else
             "-" if b["drain_s"] is None else f"{b['drain_s'] / 60:.1f} min")
    print(f"backlog: {b['items']} item(s), {b['bytes'] / 1e6:.1f} MB to send; goodput (last 10 min) "
          f"{b['goodput_bps_10min'] * 8 / 1e6:.2f} Mbit/s; time to drain {drain}; "
          f"{b['bytes_not_resent'] / 1e6:.1f} MB not re-sent (already at the destination)")
    print(f"uplink: {q['uplink']}   last success: {q['last_success'] or '-'}")
    for dest, err in dict(q["last_error_by_destination"]).items():
        print(f"last error ({dest}): {err}")
    groups = data.get("quarantine_by_cause") or []
    assert isinstance(groups, list)
    for g in groups:
        print(f"quarantine: {g['count']} x {g['stage']} {g['error_class']}: {g['example']}\n"
              f"    once the cause is fixed: {g['requeue']}")
    print(f"free disk: {data['free_mb']} MB")
    if data.get("restart_pending"):
        print(f"RESTART PENDING: the config file changes {data['restart_pending']}; the daemon runs on the values "
              "it started with until `systemctl restart medsendx-edge`")
    problems = data["problems"]
    assert isinstance(problems, list)
    for problem in problems:
        print(f"UNHEALTHY: {problem}")
    return code


def cmd_check_config(args: argparse.Namespace) -> int:
    from medsendx_edge.config import missing_file_problems, path_problems, secret_problems

    cfg = load_config(args.file)
    errors, warnings = secret_problems(cfg)
    errors += missing_file_problems(cfg)
    path_errors, path_warnings = path_problems(cfg)
    errors, warnings = errors + path_errors, warnings + path_warnings
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if errors:
        raise ConfigError("; ".join(errors))
    print(f"{args.file}: OK")
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    """One item by id, or in bulk (``--all``, ``--stage``, ``--reason``) after fixing a cause that parked
    many (a TLS certificate, a full disk, a wrong URL)."""
    from medsendx_edge.spool import Spool

    cfg = _config(args)
    spool = Spool(cfg.spool_dir, cfg.inbox)
    bulk = args.all or args.stage or args.reason or args.error_class
    if bool(args.id) == bool(bulk):
        print("requeue: give one ID, or --all / --stage STAGE / --reason TEXT / --error-class NAME", file=sys.stderr)
        return 2
    if args.id:
        try:
            queue = spool.requeue(args.id)
        except KeyError:
            print(f"no quarantined item with id {args.id}", file=sys.stderr)
            return 2
        print(f"{args.id}: back in {queue}")
        return 0
    needle = (args.reason or "").lower()
    picked = []
    for stage, item_id in list(spool.quarantined()):
        if args.stage and stage != args.stage:
            continue
        if needle or args.error_class:
            try:
                info = spool.reason(stage, item_id)
            except (OSError, ValueError):
                info = {}   # an unreadable reason file: its item matches no reason, only "unknown"
            if needle and needle not in f"{info.get('reason', '')} {info.get('error_class', '')}".lower():
                continue
            if args.error_class and str(info.get("error_class") or "unknown") != args.error_class:
                continue
        picked.append(item_id)
    by_queue: dict[str, int] = {}
    for item_id in picked:
        try:
            queue = spool.requeue(item_id)
        except (KeyError, FileNotFoundError) as exc:
            print(f"{item_id}: not requeued ({type(exc).__name__})", file=sys.stderr)
            continue
        by_queue[queue] = by_queue.get(queue, 0) + 1
    summary = ", ".join(f"{n} to {q}" for q, n in sorted(by_queue.items())) or "nothing matched"
    print(f"requeued {sum(by_queue.values())} item(s): {summary}")
    return 0


def _walk_inputs(root: Path) -> list[Path]:
    if root.is_file() or root.is_symlink():
        return [root]
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames))
    return out


def _short_digest(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read(1 << 20)).hexdigest()[:12]
    except OSError:
        return "unreadable"


_WORKER: dict[str, object] = {}


def _anonymize_init(cfg: Config, out_dir: Path, durable: bool) -> None:
    from medsendx_edge.anonymize.stage import Anonymizer

    _WORKER.update(anonymizer=Anonymizer(cfg, durable=durable), out_dir=out_dir, durable=durable)


def _anonymize_one(path: Path) -> str | None:
    """Anonymize one input into the output folder; the reason (no patient data) if it could not be."""
    from medsendx_edge.anonymize.stage import Anonymizer
    from medsendx_edge.fsutil import atomic_write
    from medsendx_edge.spool import new_id

    anonymizer = _WORKER["anonymizer"]
    assert isinstance(anonymizer, Anonymizer)
    try:
        prepared = anonymizer.prepare(path)
        atomic_write(Path(str(_WORKER["out_dir"])) / f"{new_id()}.dcm", lambda fh: anonymizer.write(prepared, fh),
                     durable=bool(_WORKER["durable"]))
    except QuarantineError as exc:
        return exc.reason
    except Exception as exc:  # noqa: BLE001 - report, never crash, never quote the file
        return f"unexpected {type(exc).__name__}"
    return None


def cmd_anonymize(args: argparse.Namespace) -> int:
    cfg = _config(args)
    configure_logging(cfg.log.level, cfg.log.format, cfg.log.stream)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = _walk_inputs(Path(args.input))
    jobs = max(1, min(args.jobs or os.cpu_count() or 1, len(inputs)))
    if jobs == 1:
        _anonymize_init(cfg, out_dir, args.fsync)
        reasons = [_anonymize_one(p) for p in inputs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _anonymize_init(cfg, out_dir, args.fsync)  # creates the secrets once, before the workers fork
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_anonymize_init,
                                 initargs=(cfg, out_dir, args.fsync)) as pool:
            reasons = list(pool.map(_anonymize_one, inputs, chunksize=4))
    failures = 0
    for n, (path, reason) in enumerate(zip(inputs, reasons), 1):
        if reason is not None:
            failures += 1
            print(f"input {n}/{len(inputs)} (sha256 {_short_digest(path)}): not anonymized: {reason}",
                  file=sys.stderr)
    print(f"{len(inputs) - failures} of {len(inputs)} file(s) anonymized into {out_dir}")
    return 1 if failures else 0


def cmd_fleet_server(args: argparse.Namespace) -> int:
    from medsendx_edge.fleet.server import FleetDB, create_app
    from medsendx_edge.upload.destinations._http import read_secret

    if not args.dsn:
        raise ConfigError("fleet-server: --dsn (or MEDSENDX_FLEET_DSN) is required")
    version = FleetDB(args.dsn).migrate()
    print(f"fleet database at schema {version}", file=sys.stderr)
    if args.migrate_only:
        return 0
    password = read_secret(Path(args.password_file), "--password-file")
    if not password:
        raise ConfigError(f"--password-file: {args.password_file} is empty")
    from werkzeug.serving import make_server

    from medsendx_edge.fleet.server import request_handler, tls_context

    tls = None
    if args.tls_cert is not None or args.tls_key is not None:   # an empty value is a mistake, never plain HTTP
        if not args.tls_cert or not args.tls_key:
            raise ConfigError("fleet-server: --tls-cert and --tls-key go together, and neither may be empty")
        tls = tls_context(Path(args.tls_cert), Path(args.tls_key))
    reports = Path(args.reports) if args.reports else None
    if reports is not None and args.mine_every > 0:
        from medsendx_edge.fleet.server import MineSchedule

        MineSchedule(Path(args.storage), reports, args.mine_every).start()
    server = make_server(args.bind, args.port, create_app(args.dsn, Path(args.storage), password, reports),
                         threaded=True, ssl_context=tls, request_handler=request_handler())
    scheme = "https" if tls else "http"
    print(f"fleet service on {scheme}://{args.bind}:{server.server_port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def cmd_fleet_token(args: argparse.Namespace) -> int:
    from medsendx_edge.fleet.server import FleetDB

    if not args.dsn:
        raise ConfigError("fleet-token: --dsn (or MEDSENDX_FLEET_DSN) is required")
    db = FleetDB(args.dsn)
    db.migrate()
    if args.action == "add":
        print(db.add_truck(args.station))   # shown once: only its hash is kept
        return 0
    return 0 if db.revoke(args.station) else 1


def cmd_apply_config(args: argparse.Namespace) -> int:
    from medsendx_edge.apply_config import apply

    if bool(args.file) == bool(args.rollback):
        print("apply-config: give the new file, or --rollback", file=sys.stderr)
        return 2
    done = apply(Path(args.file or args.config), Path(args.config), wait_s=args.wait, rollback=args.rollback)
    print(f"{done.outcome}: {done.detail}")
    return 0 if done.outcome in ("applied", "no daemon") else 1


def cmd_note_exit(args: argparse.Namespace) -> int:
    """The unit's ExecStopPost=: how systemd saw the daemon end, for the next start's recovery
    (:mod:`medsendx_edge.deaths`).  Never fails the stop: a config that no longer loads leaves no record, and
    the death then counts as one that left no trace."""
    from medsendx_edge.deaths import note_exit

    try:
        cfg = _config(args)
        record = note_exit(cfg.spool_dir / "state")
    except (ConfigError, OSError) as exc:
        print(f"note-exit: nothing recorded ({type(exc).__name__})", file=sys.stderr)
        return 0
    print(f"note-exit: {record['service_result'] or 'no result'}")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    import time as _time

    from medsendx_edge import __version__
    from medsendx_edge.install import backup_databases

    cfg = _config(args)
    dest = cfg.spool_dir.parent / "backups" / f"{__version__}-{_time.strftime('%Y%m%dT%H%M%SZ', _time.gmtime())}"
    copied = backup_databases(cfg.spool_dir, dest)
    if not copied:
        print(f"backup: no database in {cfg.spool_dir / 'state'}", file=sys.stderr)
        return 1
    print(f"backed up {', '.join(copied)} to {dest}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from medsendx_edge.install import install

    done = install(prefix=Path(sys.prefix), user=args.user, config_dir=Path(args.config_dir),
                   state_dir=Path(args.state_dir), unit_dir=Path(args.unit_dir) if args.unit_dir else None,
                   wheel=Path(args.wheel) if args.wheel else None,
                   find_links=tuple(Path(d) for d in args.find_links), no_index=args.no_index)
    for line in done.done or ["nothing to do: already in place"]:
        print(line)
    change = f"{done.previous} -> {done.version}" if done.previous and done.previous != done.version else done.version
    print(f"medsendx-edge {change} in {sys.prefix}" + (f"; databases backed up in {done.backup}" if done.backup else ""))
    return 0


def cmd_reidentify(args: argparse.Namespace) -> int:
    from medsendx_edge.anonymize.linkage import LinkageStore

    cfg = _config(args)
    store = LinkageStore(cfg.spool_dir / "state" / "linkage.db", cfg.anonymize.linkage_key_file, create_key=False)
    records = store.lookup(args.key)
    if not records:
        print(f"no linkage for {args.key}", file=sys.stderr)
        return 2
    print(json.dumps(records, indent=2, sort_keys=True))
    return 0


def cmd_export_linkage(args: argparse.Namespace) -> int:
    from medsendx_edge.anonymize.linkage import LinkageStore

    cfg = _config(args)
    store = LinkageStore(cfg.spool_dir / "state" / "linkage.db", cfg.anonymize.linkage_key_file, create_key=False)
    key = Path(args.key_file).read_bytes().strip() if args.key_file else None
    n = store.export(Path(args.out), key)
    print(f"{n} record(s) written encrypted to {args.out} "
          f"(Fernet; key: {args.key_file or cfg.anonymize.linkage_key_file})")
    return 0


def cmd_rotate_linkage(args: argparse.Namespace) -> int:
    from medsendx_edge.anonymize.linkage import LinkageStore

    cfg = _config(args)
    store = LinkageStore(cfg.spool_dir / "state" / "linkage.db", cfg.anonymize.linkage_key_file, create_key=False)
    n = store.rotate()
    print(f"{n} linkage row(s) re-encrypted with the first key of {cfg.anonymize.linkage_key_file}; "
          "the keys below it can now leave the file")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from medsendx_edge.logs import quiet_pydicom
    from medsendx_edge.fsutil import write_bytes_atomic
    from medsendx_edge.triage.stage import triage_file

    quiet_pydicom()
    cfg = _config(args)
    path = Path(args.file)
    if not path.is_file():
        print(f"no such file: {path}", file=sys.stderr)
        return 1
    outcome, _ds = triage_file(path, cfg)
    side = outcome.sidecar  # exactly what the daemon writes beside the file (without the spool id)
    out = dict(side)
    text = json.dumps(out, indent=2, sort_keys=True)
    if args.png and outcome.png:
        write_bytes_atomic(Path(args.png), outcome.png, durable=False)
    if args.json:
        write_bytes_atomic(Path(args.json), text.encode(), durable=False)
    else:
        print(text)
    return 0 if side["triage"] in ("done", "not applicable") else 1


def cmd_mine(args: argparse.Namespace) -> int:
    from medsendx_edge.fleet.miner import Settings
    from medsendx_edge.fleet.report import summary_table

    if not 0 < args.alpha < 10:
        print("mine: --alpha must be above 0 (and is a count of false flags per run, not a percentage)",
              file=sys.stderr)
        return 2
    settings = Settings(alpha=args.alpha, min_images=args.min_images)
    from medsendx_edge.fleet.report import mine_to

    try:
        res, paths = mine_to(args.inputs, Path(args.out), settings, engine=args.engine,
                             previous_path=Path(args.previous) if args.previous else None,
                             warn=lambda msg: print(f"mine: {msg}", file=sys.stderr))
    except (FileNotFoundError, ValueError) as exc:
        print(f"mine: {exc}", file=sys.stderr)
        return 2
    print(summary_table(res))
    for unit in res.report["dose"]["flagged"]:
        print(f"dose: {unit}: {'; '.join(res.report['dose']['units'][unit]['findings'])}")
    print(f"\nreport: {paths['html']}\n        {paths['json']}\n        {paths['csv']}")
    return 0


def cmd_export_features(args: argparse.Namespace) -> int:
    from medsendx_edge.triage.features import FeatureStore, write_rows

    cfg = _config(args)
    store = FeatureStore(cfg.spool_dir / "state" / "features.db")
    rows = store.rows()
    out = write_rows(rows, Path(args.out))
    print(f"{len(rows)} feature row(s) written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from medsendx_edge.demo import run_demo

    return run_demo(Path(args.workdir), mammo_size=(args.rows, args.cols))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medsendx-edge", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", help="YAML config (default: $MEDSENDX_EDGE_CONFIG, then config/medsendx-edge.yaml)")
        return sp

    sp = with_config(sub.add_parser("run", help="run the daemon"))
    sp.add_argument("--once", action="store_true", help="process the inbox through every stage, then exit")
    sp.set_defaults(func=cmd_run)
    sp = with_config(sub.add_parser("note-exit", help="the unit's ExecStopPost=: record systemd's $SERVICE_RESULT "
                                    "for the next start (an out-of-memory kill counts against the file in flight)"))
    sp.set_defaults(func=cmd_note_exit)
    sp = with_config(sub.add_parser("status", help="spool and upload queue state"))
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)
    sp = sub.add_parser("check-config", help="validate a config file")
    sp.add_argument("file")
    sp.set_defaults(func=cmd_check_config)
    sp = with_config(sub.add_parser("requeue", help="put quarantined items back in their queues"))
    sp.add_argument("id", nargs="?", help="one quarantined item")
    sp.add_argument("--all", action="store_true", help="every quarantined item")
    sp.add_argument("--stage", help="the items quarantined by this stage (anonymize, triage, route, upload)")
    sp.add_argument("--reason", help="the items whose reason or error class contains this text")
    sp.add_argument("--error-class", help="the items of exactly this error class (as status groups them)")
    sp.set_defaults(func=cmd_requeue)
    sp = with_config(sub.add_parser("anonymize", help="anonymize a file or a folder (recursively) into a folder"))
    sp.add_argument("input")
    sp.add_argument("output")
    sp.add_argument("--fsync", action="store_true", help="fsync every output (as the daemon's spool always does)")
    sp.add_argument("--jobs", type=int, default=0, help="worker processes (default: one per CPU)")
    sp.set_defaults(func=cmd_anonymize)
    sp = with_config(sub.add_parser("reidentify", help="original identifiers for a pseudonym or a new UID"))
    sp.add_argument("key")
    sp.set_defaults(func=cmd_reidentify)
    sp = with_config(sub.add_parser("export-linkage", help="write an encrypted copy of the linkage table"))
    sp.add_argument("--out", required=True)
    sp.add_argument("--key-file", help="Fernet key to encrypt with (default: the linkage key)")
    sp.set_defaults(func=cmd_export_linkage)
    sp = with_config(sub.add_parser("rotate-linkage", help="re-encrypt the linkage table with the key file's "
                                    "first key (a new key on top, the old ones below)"))
    sp.set_defaults(func=cmd_rotate_linkage)
    sp = with_config(sub.add_parser("segment", help="triage one file: density metrics, priority, picture"))
    sp.add_argument("file")
    sp.add_argument("--png", help="write the triage picture here")
    sp.add_argument("--json", help="write the metrics here instead of stdout")
    sp.set_defaults(func=cmd_segment)
    sp = sub.add_parser("mine", help="fleet QC: flag outlier scanners from feature files of many trucks")
    sp.add_argument("inputs", nargs="+", help="feature files (Parquet or CSV) or folders of them")
    sp.add_argument("--out", required=True, help="folder for report.json, stations.csv, report.html")
    sp.add_argument("--engine", choices=["numpy", "duckdb"], default="numpy",
                    help="duckdb: aggregate out of core over the files (fleets larger than memory)")
    sp.add_argument("--alpha", type=float, default=0.1,
                    help="expected healthy stations flagged per run, per test (default 0.1)")
    sp.add_argument("--min-images", type=int, default=20, help="stations with fewer images are not scored")
    sp.add_argument("--previous", help="the previous report.json to mark what is new against (default: the "
                    "report.json already in --out, before it is replaced)")
    sp.set_defaults(func=cmd_mine)
    sp = with_config(sub.add_parser("export-features", help="write this truck's feature rows (Parquet or CSV)"))
    sp.add_argument("--out", required=True, help="FILE.parquet or FILE.csv")
    sp.set_defaults(func=cmd_export_features)
    sp = sub.add_parser("fleet-server", help="the fleet service: trucks report to it (REST, PostgreSQL, dashboard)")
    sp.add_argument("--dsn", default=os.environ.get("MEDSENDX_FLEET_DSN", ""),
                    help="PostgreSQL connection string (default: $MEDSENDX_FLEET_DSN)")
    sp.add_argument("--storage", required=True, help="folder of the feature files (Parquet by station and day)")
    sp.add_argument("--password-file", required=True, help="the operator's password (dashboard, truck list)")
    sp.add_argument("--bind", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8760)
    sp.add_argument("--migrate-only", action="store_true", help="apply the database migrations, then exit")
    sp.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM; with --tls-key); "
                    "trucks then check it against their fleet destination's ca_bundle")
    sp.add_argument("--tls-key", help="the certificate's private key (PEM, mode 0600)")
    sp.add_argument("--reports", help="where the miner's reports go (report.json/html, dose.png) for the dashboard")
    sp.add_argument("--mine-every", type=float, default=3600.0,
                    help="seconds between runs of the miner over the feature files (with --reports; 0: never)")
    sp.set_defaults(func=cmd_fleet_server)
    sp = sub.add_parser("fleet-token", help="a truck's token for the fleet service: add (printed once) or revoke")
    sp.add_argument("action", choices=["add", "revoke"])
    sp.add_argument("station")
    sp.add_argument("--dsn", default=os.environ.get("MEDSENDX_FLEET_DSN", ""))
    sp.set_defaults(func=cmd_fleet_token)
    sp = sub.add_parser("apply-config", help="check a new config file, keep the current one as .previous, put "
                        "the new one in place atomically and have the running daemon reload it")
    sp.add_argument("file", nargs="?", help="the new config file (not with --rollback)")
    sp.add_argument("--config", required=True, help="the config file the daemon runs on")
    sp.add_argument("--rollback", action="store_true", help="apply the .previous file instead")
    sp.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the daemon to confirm")
    sp.set_defaults(func=cmd_apply_config)
    sp = with_config(sub.add_parser("backup", help="copy the spool's databases (SQLite online backup) beside the "
                                    "spool, before an upgrade: <spool>/../backups/<version>-<time>/"))
    sp.set_defaults(func=cmd_backup)
    sp = sub.add_parser("install", help="lay out a truck (user, folders, config, systemd unit); with --wheel, "
                        "upgrade or roll back this venv, the spool's databases backed up first")
    sp.add_argument("--user", default="medsendx")
    sp.add_argument("--config-dir", default="/etc/medsendx-edge")
    sp.add_argument("--state-dir", default="/var/lib/medsendx-edge")
    sp.add_argument("--unit-dir", default="/etc/systemd/system", help="where the unit goes ('' for none)")
    sp.add_argument("--wheel", help="the release to install into this venv (an upgrade, or a rollback)")
    sp.add_argument("--find-links", action="append", default=[], help="a folder of wheels for pip")
    sp.add_argument("--no-index", action="store_true", help="pip takes nothing from an index (an offline truck)")
    sp.set_defaults(func=cmd_install)
    sp = sub.add_parser("demo", help="run the pipeline on a realistic batch into a local directory")
    sp.add_argument("--workdir", default="var/demo")
    sp.add_argument("--rows", type=int, default=4096)
    sp.add_argument("--cols", type=int, default=3328)
    sp.set_defaults(func=cmd_demo)
    return p


#: Set once ``run --once`` has finished its work.  Every file and record it made is durable by then (the
#: spool's fsyncs, SQLite commits with synchronous=FULL): the daemon survives a SIGKILL at any step, so its
#: process may end here without Python's finalization, 0.3 s of it (SQLite's checkpoints when the last
#: connections close, and object teardown) in a 6.5 s ``run --once`` of 20 films (benchmarks/bench_e2e.py).
_DURABLE_EXIT = False
_SPOOL_LOCK: list[int] = []   # cmd_run's locks (startup.lock_spool): open until the process ends


def entry() -> None:
    """The ``medsendx-edge`` command: :func:`main`, then the exit (the fast one after ``run --once``)."""
    rc = main()
    if _DURABLE_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except MedSendXError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    entry()
