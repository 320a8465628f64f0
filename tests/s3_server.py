"""A real S3 endpoint on loopback for tests: moto's server as a subprocess.

    with MotoS3Server() as s3:           # started on a free port
        client = s3.client()              # boto3 client with dummy credentials
        s3.stop(); ...; s3.start()        # "S3 down, then back", same port (state is lost)

Tests talk to it over HTTP like to AWS, so botocore's real retry, timeout and error paths
run. `s3_env(monkeypatch)` sets dummy AWS credentials so that clients built from the
standard credential chain (as `S3Store` does) never reach a developer's real account.
Wrap it in a fixture where needed (a module-scoped one is cheap: tests keep apart by bucket).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import TracebackType
from typing import Any

import boto3
import pytest
from botocore.config import Config

REGION = "us-east-1"
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
START_LIMIT_S = 60.0  # only guards a hung start; moto answers in a few seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoS3Server:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        env = {**os.environ, **DUMMY_ENV}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + START_LIMIT_S
        while not self._answers():
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._proc.returncode} "
                                   f"(port {self.port} taken?)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not answer on {self.endpoint_url}")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop and start again on the same port; moto keeps no state across this."""
        self.stop()
        self.start()

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this endpoint with dummy credentials; without `config` one
        shared client (building one costs a noticeable bit of CPU)."""
        if not config and self._client is not None:
            return self._client
        client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=Config(**config) if config else None)
        if not config:
            self._client = client
        return client

    def new_bucket(self) -> str:
        """A bucket of its own for one test (tests sharing a server keep apart by bucket)."""
        bucket = f"b-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def store_client(self) -> Any:
        """A client as `S3Store` builds one (standard credential chain: call `s3_env` first),
        with short timeouts and few attempts, so a test that stops the server is quick."""
        from adapters.s3.store import make_client

        return make_client(endpoint_url=self.endpoint_url, region=REGION, connect_timeout_s=1,
                           read_timeout_s=5, max_attempts=2)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is serving
        except OSError:
            return False

    def __enter__(self) -> MotoS3Server:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy AWS credentials and no real config files for this test."""
    for name, value in DUMMY_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)

