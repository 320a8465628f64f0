"""A real Redis server on loopback for tests, in a temporary folder, with nothing persisted.

    with RedisServer() as server:     # redis-server on a free port, answering PING
        server.url()                  # redis://127.0.0.1:PORT/0
        server.stop(); server.start() # an outage, then the same server back on the same port
                                      # (empty: nothing is saved)

The binary is the machine's `redis-server` (Debian's package, installed by
`scripts/install.sh --dev` where missing), found on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from tests.pg_server import free_port

START_LIMIT_S = 30  # only guards a hung start; redis-server answers within milliseconds
STOP_LIMIT_S = 10


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found on PATH: run `scripts/install.sh --dev` "
                               "(installs Debian's redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        if self.proc is not None:
            return
        self.dir = Path(tempfile.mkdtemp(prefix="loraplex-redis-"))
        with open(self.dir / "server.log", "wb") as out:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.dir)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.dir)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.proc is not None and self.dir is not None
        deadline = time.monotonic() + START_LIMIT_S
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            while True:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "server.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"redis-server on port {self.port} did not start "
                                       f"(exit {self.proc.returncode}):\n{log}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(STOP_LIMIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        folder, self.dir = self.dir, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
