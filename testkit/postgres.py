"""A real PostgreSQL for the tests, from Debian's ``postgresql`` package (scripts/install-system-deps.sh).

Started on a private loopback port with its socket in a private folder, like nginx and Prometheus
here, so it never meets the system's cluster. ``initdb`` and ``postgres`` refuse to run as root, so
when the tests run as root the server binaries run as the ``postgres`` user (``runuser``), in a
folder that user owns. Connections from the tests use TCP with a password (scram), as a fleet's do.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN_DIRS = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
BIN_DIR = Path(BIN_DIRS[0]) if BIN_DIRS else None
USER = "voxswap"
PASSWORD = "pw-a8f3c91e7d"  # the tests check that it never shows


def available() -> bool:
    return BIN_DIR is not None and (BIN_DIR / "initdb").exists() and (os.geteuid() != 0 or _has_postgres_user())


def _has_postgres_user() -> bool:
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return shutil.which("runuser") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PostgresServer:
    """One cluster in a temporary folder; ``url()`` for a database, ``restart()`` mid-test."""

    def __init__(self, *, durable: bool = False) -> None:
        """``durable``: fsync as in production (benchmarks); off by default, the tests need no disk safety."""
        assert BIN_DIR is not None
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="voxswap-pg-"))
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "postgres.log"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def init(self) -> PostgresServer:
        assert BIN_DIR is not None
        self.sock.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
            shutil.chown(pwfile, "postgres")
        subprocess.run(_as_server_user([str(BIN_DIR / "initdb"), "-D", str(self.data), "-U", USER,
                                        f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                                        "-E", "UTF8", "--locale=C", "--no-sync"]),
                       check=True, capture_output=True)
        pwfile.unlink()
        return self

    def start(self) -> PostgresServer:
        assert BIN_DIR is not None
        log = self.log.open("ab")
        if os.geteuid() == 0:
            with contextlib.suppress(OSError):
                shutil.chown(self.log, "postgres")
        self.proc = subprocess.Popen(
            _as_server_user([str(BIN_DIR / "postgres"), "-D", str(self.data), "-p", str(self.port),
                             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.sock}",
                             *([] if self.durable else ["-c", "fsync=off", "-c", "synchronous_commit=off",
                                                        "-c", "full_page_writes=off"]),
                             "-c", "max_connections=200"]),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self, timeout_s: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                assert self.proc is not None
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"postgres did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGINT: PostgreSQL's fast shutdown (sessions are ended, as in a restart or failover)."""
        if self.proc is not None and self.proc.poll() is None:
            # runuser forwards the signal to postgres
            os.killpg(self.proc.pid, 2)
            self.proc.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, db: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        """A fresh database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres(*, durable: bool = False) -> Iterator[PostgresServer]:
    server = PostgresServer(durable=durable).init().start()
    try:
        yield server
    finally:
        server.cleanup()
