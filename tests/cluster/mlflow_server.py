"""A real MLflow tracking server on 127.0.0.1 for the ``mlflow`` integration tests.

``mlflow_server(workdir)`` starts ``mlflow server`` with a SQLite backend and proxied
artifacts (``--artifacts-destination``: clients upload over HTTP, as on a real shared server)
in ``workdir``, waits until ``/health`` answers and yields a :class:`MlflowServer`; on exit it
stops the server's process group (the server runs uvicorn/gunicorn workers).

``mlflow_server(workdir, auth=True)`` starts MLflow's basic-auth app instead
(``--app-name basic-auth``, needs ``mlflow[auth]``): users in ``workdir/basic_auth.db``, an
admin whose password comes from the environment (never written to a file), every request but
``/health`` refused without valid credentials; ``server.create_user`` adds job accounts.

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


#: The admin of an ``auth=True`` server (a test server only: never reuse the password).
AUTH_ADMIN = ("admin", "mofo-test-admin-pw")


def write_auth_config(workdir: Path, default_permission: str = "READ") -> Path:
    """``basic_auth.ini`` for ``--app-name basic-auth`` (read via ``MLFLOW_AUTH_CONFIG_PATH``):
    the user database in ``workdir``; no password in it (``MLFLOW_AUTH_ADMIN_PASSWORD``)."""
    path = workdir / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = sqlite:///{workdir / 'basic_auth.db'}\n"
        f"admin_username = {AUTH_ADMIN[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Without the cache every request pays a PBKDF2 password check (~1 s on a busy core).
        "auth_cache_ttl_seconds = 300\n"
    )
    return path


@dataclass
class MlflowServer:
    uri: str
    workdir: Path
    process: subprocess.Popen
    auth: bool = False

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    def client(self):
        """An ``MlflowClient``; on an auth server it needs the admin's (or a user's) credentials
        in ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` when it makes a request
        (see :meth:`admin_env`)."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def admin_env(self) -> dict[str, str]:
        """The environment variables that authenticate as the admin of an ``auth=True`` server."""
        return {
            "MLFLOW_TRACKING_USERNAME": AUTH_ADMIN[0],
            "MLFLOW_TRACKING_PASSWORD": AUTH_ADMIN[1],
        }

    def create_user(self, username: str, password: str) -> None:
        """Create an account as the admin (REST ``POST /api/2.0/mlflow/users/create``)."""
        import requests

        resp = requests.post(
            f"{self.uri}/api/2.0/mlflow/users/create",
            json={"username": username, "password": password},
            auth=AUTH_ADMIN,
            timeout=30,
        )
        resp.raise_for_status()


def _healthy(uri: str) -> bool:
    import requests

    try:
        return requests.get(uri + "/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def mlflow_server(
    workdir: str | Path, port: int | None = None, start_timeout: float = 120, auth: bool = False
) -> Iterator[MlflowServer]:
    """Start ``mlflow server`` on 127.0.0.1:<free port> with its files in ``workdir``; with
    ``auth`` the basic-auth app (admin :data:`AUTH_ADMIN`)."""
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
    log = open(workdir / "server.log", "w")  # open for the server's lifetime
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    # MLflow 3's server also starts a job runner (8 huey consumer processes, each importing
    # mlflow) for its GenAI jobs, which tracking never uses: on 2 busy cores it doubled the
    # time to /health (~20 s -> ~40 s) and cost ~25 s of CPU per server started.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    if auth:
        cmd += ["--app-name", "basic-auth"]
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(write_auth_config(workdir))
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = AUTH_ADMIN[1]
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = os.urandom(16).hex()  # CSRF key of the web UI
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
        yield MlflowServer(uri=uri, workdir=workdir, process=proc, auth=auth)
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
