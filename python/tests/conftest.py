"""Shared fixtures of the Python package's tests: the `zygote` binary, the model, and
:class:`Service`, a running ``zygote start`` in a temporary runtime directory that is stopped
(and, past its deadline, killed with everything it started) when the test ends.

The tests need the package installed in the running interpreter (scripts/python-setup.sh),
the binary built (``cargo build``; ``ZYGOTE_BIN`` overrides target/debug/zygote) and the
model (scripts/fetch-model.sh; ``ZYGOTE_MODEL_DIR`` overrides models/all-MiniLM-L6-v2).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APPS = Path(__file__).resolve().parent / "apps"
FIXTURE = REPO / "examples/embed/tests/fixtures/minilm_reference.json"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def zygote_bin() -> Path:
    path = Path(os.environ.get("ZYGOTE_BIN", REPO / "target/debug/zygote"))
    if not path.is_file():
        pytest.fail(f"{path} is missing: build it with `cargo build` (or set ZYGOTE_BIN)")
    return path


def model_dir() -> Path:
    path = Path(os.environ.get("ZYGOTE_MODEL_DIR", REPO / "models/all-MiniLM-L6-v2"))
    if not (path / "model.safetensors").is_file():
        pytest.fail(f"no model under {path}: run scripts/fetch-model.sh (or set ZYGOTE_MODEL_DIR)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], object], timeout: float, log: Path | None = None):
    """Polls ``check`` until it returns something truthy, or fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            tail = log.read_text()[-6000:] if log and log.exists() else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tail}")
        time.sleep(0.05)


class Service:
    """``zygote start`` with its own runtime directory, port and log, in its own session."""

    def __init__(self, args: list[str], workers: int, env: dict[str, str] | None = None):
        self.tmp = tempfile.TemporaryDirectory(prefix="zygote-py-")
        self.dir = Path(self.tmp.name)
        self.runtime_dir = self.dir / "rt"
        self.port = free_port()
        self.log = self.dir / "log"
        self.workers = workers
        venv_bin = str(Path(sys.executable).parent)
        full_env = {
            **os.environ,
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            **(env or {}),
        }
        self.cmd = [
            str(zygote_bin()),
            "start",
            "--runtime-dir",
            str(self.runtime_dir),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--workers",
            str(workers),
            "--backend",
            "host",
            *args,
        ]
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_serving(self, timeout: float = 300) -> None:
        want = f"all {self.workers} workers serving"

        def serving() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"zygote start exited with {self.proc.returncode}:\n{self.text()}")
            return want in self.text()

        wait_for(want, serving, timeout, self.log)

    def status(self) -> dict:
        out = subprocess.run(
            [str(zygote_bin()), "status", "--json", "--runtime-dir", str(self.runtime_dir)],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def worker_pids(self) -> list[int]:
        return [
            p["pid"]
            for p in self.status()["processes"]
            if p.get("role") == "worker" and p.get("state") == "serving"
        ]

    def pid_of(self, role: str) -> list[int]:
        """The pids of the serving processes of ``role`` (``template``, ``owner``)."""
        return [
            p["pid"]
            for p in self.status()["processes"]
            if p.get("role") == role and p.get("state") == "serving"
        ]

    _NONE = object()

    def template_pid(self, default: object = _NONE) -> int:
        """The serving app template's pid (the newest, during a reload)."""
        pids = self.pid_of("template")
        if not pids and default is not Service._NONE:
            return default  # type: ignore[return-value]
        assert pids, self.status()
        return max(pids)

    def owner_pid(self) -> int:
        (pid,) = self.pid_of("owner")
        return pid

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.close()

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        # Anything it started that is still there (its session) ends with it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log_file.close()
        self.tmp.cleanup()
        return self.proc.returncode


@pytest.fixture
def service() -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(args: list[str], workers: int = 2, env: dict[str, str] | None = None) -> Service:
        s = Service(args, workers, env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def post_json(url: str, body: object, timeout: float = 60) -> tuple[int, dict, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, dict(r.headers), json.loads(r.read())


def get(url: str, timeout: float = 60) -> tuple[int, dict, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, dict(r.headers), r.read()
