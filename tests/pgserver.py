"""A PostgreSQL server of Debian's package for tests and benchmarks: its own cluster (initdb) on a free
loopback port, started and stopped by pg_ctl (-w: until it accepts connections).  As root the cluster runs
as the package's postgres user (initdb refuses root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from orthanc_server import free_port


def pg_bindir() -> Path | None:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(bins[-1]).parent if bins else None


class PostgresServer:
    def __init__(self, fsync: bool = False) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL's initdb is missing: apt-get install postgresql")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="msx-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.root.chmod(0o755)
        self.data, self.port = self.root / "data", free_port()
        subprocess.run([*self.as_user, str(bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                        "--no-sync"], check=True, capture_output=True)
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not fsync:
            opts += " -c fsync=off"
        subprocess.run([*self.as_user, str(bindir / "pg_ctl"), "-D", str(self.data), "-w", "-l",
                        str(self.root / "log"), "-o", opts, "start"], check=True, capture_output=True)
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def pids(self) -> list[int]:
        """The server's processes (the postmaster and its children)."""
        head = int((self.data / "postmaster.pid").read_text().split()[0])
        out = subprocess.run(["pgrep", "-P", str(head)], capture_output=True, text=True).stdout.split()
        return [head, *map(int, out)]

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
