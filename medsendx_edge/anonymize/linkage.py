"""The re-identification table: stays on the truck, encrypted at rest, never uploaded or logged.

Each row maps a lookup key (the patient pseudonym, a new study UID or a new
SOP instance UID) to a Fernet token holding the original identifiers.  The
key is a Fernet key in its own file, created with mode 0600 at first use.
The database lives in ``<spool>/state/linkage.db``, outside every queue.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from dataclasses import asdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from medsendx_edge.anonymize.profile import Linkage
from medsendx_edge.errors import ConfigError, MedSendXError
from medsendx_edge.fsutil import write_bytes_atomic
from medsendx_edge.state import LINKAGE_SCHEMA, SQLiteFile


def ensure_secret_file(path: Path, make: Callable[[], bytes], key: str = "secret file",
                       create: bool = True, why: str = "") -> bytes:
    """Read the secret at ``path``, creating it with mode 0600 (atomically) if missing and ``create``.

    A path that is a folder, unreadable or otherwise unusable is a :class:`ConfigError` naming
    ``key``: never a traceback, and never a daemon that exits on reload."""
    path = Path(path)
    try:
        data = path.read_bytes().strip()
        if data:
            return data
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise ConfigError(f"{key}: {path} is a directory, not a key file") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror or type(exc).__name__})") from None
    if not create:
        raise ConfigError(f"{key}: {path} does not exist{why}; restore it (relative paths resolve against the "
                          "config file's folder) rather than letting a new one be made")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = make()
    old = os.umask(0o077)
    try:
        write_bytes_atomic(path, secret + b"\n")
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return secret


def site_secret(path: Path, *, create: bool = True, why: str = "") -> bytes:
    """The HMAC key behind every pseudonym (share it across the fleet for consistent UIDs)."""
    return ensure_secret_file(path, lambda: os.urandom(32).hex().encode(), "anonymize.secret_file", create, why)


def holds_pseudonymized_data(db_path: Path) -> bool:
    """Has this spool anonymized anything already (a linkage row)?  Then its secrets must not change."""
    import sqlite3

    if not Path(db_path).exists():
        return False
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT 1 FROM linkage LIMIT 1").fetchone() is not None
        finally:
            conn.close()
    except sqlite3.Error:
        return True  # unreadable: assume the worst, never replace the keys silently


class LinkageStore(SQLiteFile):
    def __init__(self, db_path: Path, key_file: Path, *, durable: bool = True, create_key: bool = True) -> None:
        """``durable=False`` (batch CLI runs whose outputs are not fsynced either) commits without
        fsync (WAL, synchronous=NORMAL: consistent after a power cut, the last rows may be lost).

        The key is created only for a table that holds nothing yet, and only with ``create_key``
        (``reidentify`` never creates one: a new key decrypts nothing)."""
        has_rows = holds_pseudonymized_data(Path(db_path))
        key = ensure_secret_file(Path(key_file), Fernet.generate_key, "anonymize.linkage_key_file",
                                 create_key and not has_rows,
                                 f" but the linkage table {db_path} holds records encrypted with it" if has_rows
                                 else "")
        super().__init__(db_path, durable=durable)
        try:
            # One key a line: the first encrypts, every one decrypts (a rotation adds the new key on top
            # and keeps the old ones below until `rotate` has re-encrypted the table: docs/privacy.md).
            self.fernet = MultiFernet([Fernet(line.strip()) for line in key.splitlines() if line.strip()])
        except (ValueError, TypeError):
            raise ConfigError(f"anonymize.linkage_key_file: {key_file} does not hold valid Fernet keys "
                              "(32 url-safe base64-encoded bytes, one a line)") from None
        with self.tx() as conn:   # one commit, not one a statement
            self.schema_from(LINKAGE_SCHEMA, "the linkage table")
            conn.execute("CREATE TABLE IF NOT EXISTS linkage (key TEXT NOT NULL, token BLOB NOT NULL, "
                         "created REAL NOT NULL, PRIMARY KEY (key, token))")
            conn.execute("CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL)")
            self.schema_is(LINKAGE_SCHEMA)
        os.chmod(self.path, 0o600)

    def check_site_secret(self, secret: bytes, secret_file: Path) -> None:
        """The site secret's fingerprint is recorded with the first record; a different secret on a spool
        that has pseudonyms is refused (it would give the same woman a new pseudonym and new UIDs)."""
        fingerprint = hmac.new(secret, b"medsendx-edge site secret fingerprint", hashlib.sha256).hexdigest()[:16]
        conn = self._conn()
        row = conn.execute("SELECT fingerprint FROM secrets WHERE name = 'site'").fetchone()
        if row is None or (not hmac.compare_digest(str(row[0]), fingerprint)
                           and conn.execute("SELECT 1 FROM linkage LIMIT 1").fetchone() is None):
            conn.execute("INSERT OR REPLACE INTO secrets (name, fingerprint) VALUES ('site', ?)", (fingerprint,))
        elif not hmac.compare_digest(str(row[0]), fingerprint):
            raise ConfigError(f"anonymize.secret_file: {secret_file} is not the site secret this spool's pseudonyms "
                              f"were made with (fingerprint {fingerprint}, recorded {row[0]}): restore the original "
                              "file; a new secret would give every woman a new pseudonym and new UIDs")

    def rotate(self) -> int:
        """Re-encrypt every record with the first key of the key file (MultiFernet.rotate); returns the
        count.  After it the old keys can leave the file."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")   # the rows read and rewritten in one transaction
        try:
            rows = conn.execute("SELECT key, token FROM linkage").fetchall()
            for key, token in rows:
                conn.execute("UPDATE linkage SET token = ? WHERE key = ? AND token = ?",
                             (self._decrypting(self.fernet.rotate, token), key, token))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return len(rows)

    def _decrypting(self, fn: Callable[[bytes], bytes], token: bytes) -> bytes:
        try:
            return fn(token)
        except InvalidToken:
            raise MedSendXError("a linkage record cannot be decrypted with any key of anonymize.linkage_key_file: "
                                "put the key it was made with back in the file (below the new one)") from None

    def record(self, link: Linkage) -> None:
        """Store one instance's linkage under its pseudonym, its new study UID and new SOP UID."""
        token = self.fernet.encrypt(json.dumps(asdict(link), sort_keys=True).encode())
        now = time.time()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for key in {link.pseudonym, link.study_uid, link.sop_uid}:
                if key:
                    conn.execute("INSERT OR IGNORE INTO linkage (key, token, created) VALUES (?, ?, ?)",
                                 (key, token, now))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def lookup(self, key: str) -> list[dict[str, Any]]:
        """Original identifiers for a pseudonym or a new UID (distinct, oldest first)."""
        rows = self._conn().execute("SELECT token FROM linkage WHERE key = ? ORDER BY created",
                                    (key.strip(),)).fetchall()
        out: list[dict[str, Any]] = []
        seen = set()
        for (token,) in rows:
            rec = json.loads(self._decrypting(self.fernet.decrypt, token))
            ident = (rec["original_patient_id"], rec["original_study_uid"], rec["original_sop_uid"])
            if ident not in seen:
                seen.add(ident)
                out.append(rec)
        return out

    def export(self, out: Path, key: bytes | None = None) -> int:
        """Write every record, Fernet-encrypted as one token, to ``out``; returns the row count."""
        rows = self._conn().execute("SELECT DISTINCT token FROM linkage").fetchall()
        records = [json.loads(self._decrypting(self.fernet.decrypt, t)) for (t,) in rows]
        unique = {r["sop_uid"] + "|" + r["original_sop_uid"]: r for r in records}
        fernet: Fernet | MultiFernet = Fernet(key) if key else self.fernet
        blob = fernet.encrypt(json.dumps(sorted(unique.values(), key=lambda r: r["sop_uid"])).encode())
        old = os.umask(0o077)
        try:
            write_bytes_atomic(Path(out), blob)
        finally:
            os.umask(old)
        return len(unique)
