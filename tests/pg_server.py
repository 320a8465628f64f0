"""A real PostgreSQL server on loopback for tests: a fresh cluster in a temporary folder.

    with PostgresServer() as pg:              # initdb + postgres on a free port
        url = pg.new_database()               # postgresql+asyncpg://... of a fresh database
        pg.url()                              # the `postgres` database
        pg.psql("SELECT 1", database=...)     # run SQL with the server's own psql

The binaries are the machine's PostgreSQL (Debian's `postgresql` package, installed by
`scripts/install.sh --dev` where missing): found on PATH or under /usr/lib/postgresql/*/bin,
or named by LORAPLEX_TEST_PG_BIN. PostgreSQL refuses to run as root, and sessions and CI run
as root: the cluster then belongs to the `postgres` OS user and every server command runs as
that user (`runuser`). The server is tuned for tests (no fsync), trusts loopback connections,
and everything it wrote is removed by `stop()`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

START_LIMIT_S = 60  # only guards a hung start; a fresh cluster is up in about a second
OS_USER = "postgres"  # the user the server runs as when we are root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_bin_dir() -> Path | None:
    """The folder with initdb, pg_ctl and postgres, or None where PostgreSQL is missing."""
    override = os.environ.get("LORAPLEX_TEST_PG_BIN")
    if override:
        return Path(override)
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    return Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self, port: int | None = None) -> None:
        bin_dir = find_bin_dir()
        if bin_dir is None or not (bin_dir / "initdb").exists():
            raise RuntimeError(
                "PostgreSQL server binaries (initdb, pg_ctl) not found: run "
                "`scripts/install.sh --dev` (installs Debian's postgresql) or set "
                "LORAPLEX_TEST_PG_BIN to their folder")
        self.bin_dir = bin_dir
        self.port = port or free_port()
        self.as_root = os.geteuid() == 0
        self.dir: Path | None = None
        self._databases = 0

    @property
    def data_dir(self) -> Path:
        assert self.dir is not None, "not started"
        return self.dir / "data"

    def _cmd(self, *args: str) -> list[str]:
        if self.as_root:
            return ["runuser", "-u", OS_USER, "--", *args]
        return list(args)

    def _run(self, *args: str, timeout: float = START_LIMIT_S) -> str:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout,
                              cwd=self.dir, check=False)
        if proc.returncode != 0:
            log = ""
            if self.dir is not None and (self.dir / "server.log").exists():
                log = (self.dir / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}\n{proc.stderr}\n{log}")
        return proc.stdout

    def start(self) -> None:
        if self.dir is not None:
            return
        # Not under pytest's tmp_path: that folder is root-only, the server user could not
        # reach its data folder there.
        self.dir = Path(tempfile.mkdtemp(prefix="loraplex-pg-"))
        try:
            if self.as_root:
                user = pwd.getpwnam(OS_USER)
                os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._run(str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-A", "trust",
                      "-U", "postgres", "-E", "UTF8", "--no-sync", "--no-instructions")
            options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                       "-c max_connections=200")
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir),
                      "-l", str(self.dir / "server.log"), "-o", options, "-w",
                      "-t", str(START_LIMIT_S), "start", timeout=START_LIMIT_S + 10)
        except BaseException:
            self._remove()
            raise

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m",
                          "immediate", "-w", "stop")
        finally:
            self._remove()

    def _remove(self) -> None:
        folder, self.dir = self.dir, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy async URL of `database` (the superuser `postgres`, trusted on loopback)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with psql (as the superuser); returns its unaligned, tuples-only output."""
        assert self.dir is not None, "not started"
        return self._run(str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v",
                         "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port), "-U",
                         "postgres", "-d", database, "-c", sql)

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database; returns its URL. Tests keep apart by database."""
        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}_{time.monotonic_ns() % 10**6}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
