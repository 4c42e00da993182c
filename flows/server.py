"""Start and stop a local Prefect server (SQLite, 127.0.0.1) for the demo and the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port(preferred: int = 4200) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port")


def prefect_env(home: Path, port: int) -> dict:
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_RUNNER_POLL_FREQUENCY="1",  # a local server: a run starts within a second of being created
        PREFECT_LOGGING_LEVEL=os.environ.get("PREFECT_LOGGING_LEVEL", "INFO"),
        PREFECT_SERVER_EPHEMERAL_ENABLED="false",
        PREFECT_WORKER_WEBSERVER_HOST="127.0.0.1",
    )
    return env


class LocalServer:
    """``with LocalServer(home) as srv:`` -> a healthy server on 127.0.0.1; ``srv.env`` for clients."""

    def __init__(
        self,
        home: str | Path,
        port: int | None = None,
        log_file: str | Path | None = None,
        timeout: float = 180,
    ):
        self.home = Path(home).resolve()
        self.port = port or free_port()
        self.env = prefect_env(self.home, self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = Path(log_file) if log_file else self.home / "server.log"
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> LocalServer:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Prefect server exited early; see {self.log_file}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"the Prefect server did not become healthy in {self.timeout:.0f} s; see {self.log_file}"
        )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
