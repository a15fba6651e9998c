"""A real MLflow tracking server on 127.0.0.1 for the ``mlflow`` integration tests.

``mlflow_server(workdir)`` starts ``mlflow server`` with a SQLite backend and proxied
artifacts (``--artifacts-destination``: clients upload over HTTP, as on a real shared server)
in ``workdir``, waits until ``/health`` answers and yields a :class:`MlflowServer`; on exit it
stops the server's process group (the server runs uvicorn/gunicorn workers).

``python tests/cluster/mlflow_server.py`` starts one, logs a run and stops it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class MlflowServerError(RuntimeError):
    """The server did not start; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mlflow_command() -> list[str]:
    """``mlflow`` from the PATH, else ``python -m mlflow`` of this interpreter."""
    exe = shutil.which("mlflow")
    return [exe] if exe else [sys.executable, "-m", "mlflow"]


@dataclass
class MlflowServer:
    uri: str
    workdir: Path
    process: subprocess.Popen

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


def _healthy(uri: str) -> bool:
    import requests

    try:
        return requests.get(uri + "/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def mlflow_server(
    workdir: str | Path, port: int | None = None, start_timeout: float = 120
) -> Iterator[MlflowServer]:
    """Start ``mlflow server`` on 127.0.0.1:<free port> with its files in ``workdir``."""
    workdir = Path(workdir).resolve()
    (workdir / "artifacts").mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = mlflow_command() + [
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        str(workdir / "artifacts"),
        "--workers",
        "1",
    ]
    log = open(workdir / "server.log", "w")  # noqa: SIM115 - open for the server's lifetime
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    # Its own session: stopping the group also stops the web server's worker processes.
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + start_timeout
        while not _healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = (workdir / "server.log").read_text()[-3000:]
                raise MlflowServerError(f"mlflow server did not start ({' '.join(cmd)}):\n{tail}")
            time.sleep(0.5)
        yield MlflowServer(uri=uri, workdir=workdir, process=proc)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mofo-mlflow-") as tmp:
        t0 = time.monotonic()
        with mlflow_server(tmp) as server:
            print(f"server up at {server.uri} in {time.monotonic() - t0:.1f} s")
            client = server.client()
            exp = client.create_experiment("smoke")
            run = client.create_run(exp)
            client.log_metric(run.info.run_id, "x", 1.0)
            Path(tmp, "a.txt").write_text("artifact\n")
            client.log_artifact(run.info.run_id, str(Path(tmp, "a.txt")))
            print([a.path for a in client.list_artifacts(run.info.run_id)])
        print(f"stopped after {time.monotonic() - t0:.1f} s")
