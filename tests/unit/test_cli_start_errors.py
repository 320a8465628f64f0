"""Starting against a registry database that can't be reached is a clear one-line error and
exit status 1, before anything else starts (no engine, no model build, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.pg_server import free_port


@pytest.mark.parametrize("command", [["up"], ["unit"], ["worker"], ["up", "--units", "2"]])
def test_an_unreachable_database_is_a_clear_error(command: list[str], tmp_path: Path,
                                                  base_model_dir: Path) -> None:
    url = f"postgresql+asyncpg://loraplex:secret@127.0.0.1:{free_port()}/loraplex"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LORAPLEX_HOME": str(tmp_path),
           "LORAPLEX_DATABASE_URL": url, "LORAPLEX_MODEL_PATH": str(base_model_dir),
           "LORAPLEX_ENGINE_URL": "http://127.0.0.1:9", "LORAPLEX_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-m", "server.cli", *command], env=env, timeout=120,
                          capture_output=True, text=True)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "unreachable" in out and "Traceback" not in out, out
    assert "secret" not in out  # the password is never printed
    assert not (tmp_path / "logs").exists()  # nothing else was started
