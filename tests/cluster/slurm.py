"""A real one-node SLURM cluster on localhost for the ``slurm`` integration tests.

``local_slurm(workdir)`` writes ``slurm.conf`` and ``gres.conf`` into ``workdir``, starts
munged (if it is not already running), slurmctld and slurmd as root, waits until the node is
idle and yields a :class:`LocalSlurm`. On exit it stops the daemons it started by their PID
files. Client commands (sbatch, squeue, Snakemake's SLURM executor) find the cluster through
the ``SLURM_CONF`` environment variable, which :meth:`LocalSlurm.env` provides.

What makes SLURM 22.05 (Debian 12, ``apt-get install slurm-wlm munge``) work on one machine:
``proctrack/linuxproc`` and ``task/none`` (no cgroups in containers), ``select/cons_tres``
with ``CR_Core_Memory`` plus ``DefMemPerCPU`` (without a default memory every job takes the
whole node and jobs run one at a time), no accounting storage (so ``sacct`` does not work and
Snakemake must query ``squeue``), ``MinJobAge=3600`` (finished jobs stay visible to squeue
for an hour: the tests read every job of a pipeline run back from it),
and fake GPUs: ``Gres=gpu:N`` on the node with ``gres.conf`` entries whose ``File=`` are
character devices (a GPU without a device file is dropped and the node drains).

Run as a script for a manual check: ``python tests/cluster/slurm.py`` starts a cluster, runs a
CPU and a GPU job and stops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_SCRIPT = Path(__file__).with_name("install_slurm.sh")
MUNGE_SOCKET_DIR = Path("/run/munge")
MUNGE_PIDFILE = MUNGE_SOCKET_DIR / "munged.pid"
PARTITION = "debug"


class SlurmError(RuntimeError):
    """The local cluster could not be started or a job did not behave."""


def unavailable_reason(install: bool = True) -> str | None:
    """Why a local SLURM cannot run here (None when it can).

    With ``install`` the packages are installed by ``install_slurm.sh`` when missing (root only).
    """
    if os.name != "posix" or os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd runs jobs as root)"
    if not shutil.which("slurmctld", path="/usr/sbin:/usr/bin") and install:
        proc = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            return f"slurm-wlm/munge not installable: {proc.stderr.strip()[-500:]}"
    for tool in ("slurmctld", "slurmd", "sbatch", "squeue", "munged"):
        if not shutil.which(tool, path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")):
            return f"{tool} not installed (run tests/cluster/install_slurm.sh)"
    return None


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_hardware() -> dict[str, str]:
    """The ``key=value`` pairs of ``slurmd -C`` (NodeName, CPUs, ..., RealMemory)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0]
    return dict(item.split("=", 1) for item in first.split())


@dataclass
class LocalSlurm:
    """A running cluster: its config file, state directory and helpers to talk to it."""

    workdir: Path
    conf: Path
    nodename: str
    gpus: int
    cpus: int
    memory_mb: int
    partition: str = PARTITION
    pids: dict[str, int] = field(default_factory=dict)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) plus ``SLURM_CONF`` pointing at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM client command (``squeue``, ``scontrol``...) against this cluster."""
        proc = subprocess.run(
            list(args), capture_output=True, text=True, env=self.env(), timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def sbatch(self, *args: str) -> int:
        """Submit with ``sbatch --parsable ARGS``; return the job id."""
        out = self.run("sbatch", "--parsable", f"--partition={self.partition}", *args)
        return int(out.strip().split(";")[0])

    def job_state(self, job_id: int) -> str:
        """State of a job from squeue (finished jobs stay visible for MinJobAge)."""
        out = self.run("squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T", check=False)
        return out.strip() or "UNKNOWN"

    def wait_job(self, job_id: int, timeout: float = 60) -> str:
        """Wait until the job is no longer pending or running; return its final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "UNKNOWN"):
                return state
            time.sleep(0.5)
        raise SlurmError(f"job {job_id} still {self.job_state(job_id)} after {timeout} s")

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller still knows (id, name, state, comment, tres)."""
        fmt = "%i|%j|%T|%k|%b"
        out = self.run("squeue", "-h", "-t", "all", "-o", fmt)
        keys = ("id", "name", "state", "comment", "tres_per_node")
        return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line]

    def job_info(self, job_id: int) -> str:
        """``scontrol show job`` text (command, TRES, time limit, exit code...)."""
        return self.run("scontrol", "show", "job", str(job_id), check=False)

    @property
    def ctld_log(self) -> Path:
        return self.workdir / "slurmctld.log"

    @property
    def slurmd_log(self) -> Path:
        return self.workdir / "slurmd.log"


def write_confs(
    workdir: Path,
    ctld_port: int,
    slurmd_port: int,
    gpus: int = 2,
    cpus: int | None = None,
    memory_mb: int | None = None,
    min_job_age: int = 3600,
) -> tuple[Path, dict[str, str]]:
    """Write slurm.conf + gres.conf (and the fake GPU devices) into ``workdir``.

    ``cpus``/``memory_mb`` override what ``slurmd -C`` reports (``config_overrides``), so a
    small machine can host jobs that ask for more; the work itself then shares the real cores.
    """
    hw = node_hardware()
    host = hw["NodeName"]
    node = dict(hw)
    node.pop("UpTime", None)
    overrides = False
    if cpus is not None and str(cpus) != hw["CPUs"]:
        # A flat CPU count; keep the socket/core layout consistent with it.
        node.update(
            CPUs=str(cpus),
            Boards="1",
            SocketsPerBoard="1",
            CoresPerSocket=str(cpus),
            ThreadsPerCore="1",
        )
        overrides = True
    if memory_mb is not None:
        node["RealMemory"] = str(memory_mb)
        overrides = True
    for sub in ("state", "spool", "dev"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    gres_lines = []
    if gpus:
        node["Gres"] = f"gpu:{gpus}"
        for i in range(gpus):
            dev = workdir / "dev" / f"fakegpu{i}"
            if not dev.exists():
                # /dev/null's major/minor: slurmd only needs a character device to exist.
                subprocess.run(["mknod", str(dev), "c", "1", "3"], check=True)
            gres_lines.append(f"NodeName={host} Name=gpu File={dev}")
    node_line = " ".join(f"{k}={v}" for k, v in node.items()) + " State=UNKNOWN"
    lines = [
        "ClusterName=mofotest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        f"StateSaveLocation={workdir / 'state'}",
        f"SlurmdSpoolDir={workdir / 'spool'}",
        f"SlurmctldPidFile={workdir / 'slurmctld.pid'}",
        f"SlurmdPidFile={workdir / 'slurmd.pid'}",
        f"SlurmctldLogFile={workdir / 'slurmctld.log'}",
        f"SlurmdLogFile={workdir / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "DefMemPerCPU=1000",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "MailProg=/bin/true",
        f"MinJobAge={min_job_age}",
        "ReturnToService=2",
        "SlurmdTimeout=60",
        "InactiveLimit=0",
        "KillWait=5",
        "Waittime=0",
        "MpiDefault=none",
        "GresTypes=gpu",
    ]
    if overrides:
        lines.append("SlurmdParameters=config_overrides")
    lines += [
        node_line,
        f"PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = workdir / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    # gres.conf is read from the directory of slurm.conf.
    (workdir / "gres.conf").write_text("\n".join(gres_lines) + "\n")
    return conf, node


SYSTEM_CONF_DIR = Path("/etc/slurm")


def link_system_conf(conf: Path) -> list[Path]:
    """Symlink ``/etc/slurm/slurm.conf`` (and gres.conf) to this cluster's files.

    SLURM_CONF is not enough: the Snakemake job step plugin removes every ``SLURM_*``
    variable before its nested ``srun``, which then only finds the compiled-in default path.
    A stale link from an earlier run is replaced; a real file (a real cluster's config) is
    never touched: then the local cluster cannot be used here.
    """
    SYSTEM_CONF_DIR.mkdir(parents=True, exist_ok=True)
    made = []
    for name in ("slurm.conf", "gres.conf"):
        target = SYSTEM_CONF_DIR / name
        if target.is_symlink():
            target.unlink()
        elif target.exists():
            raise SlurmError(f"{target} exists (a real SLURM config?); not overwriting it")
        target.symlink_to(conf.parent / name)
        made.append(target)
    return made


LOCK_FILE = Path("/run/mofo-test-slurm.lock")


def _other_live_cluster() -> Path | None:
    """The slurm.conf that ``/etc/slurm/slurm.conf`` links to while that cluster's slurmctld
    still runs (another test session on this machine), else None (no link or a stale one)."""
    link = SYSTEM_CONF_DIR / "slurm.conf"
    try:
        target = Path(os.readlink(link))
        pid = int((target.parent / "slurmctld.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return target


@contextlib.contextmanager
def one_cluster_per_machine(timeout: float = 3600, interval: float = 2) -> Iterator[None]:
    """Wait until no other local cluster runs on this machine, and keep others out meanwhile.

    The clusters share ``/etc/slurm/slurm.conf`` (see :func:`link_system_conf`) and munged: a
    second session relinking it sends the first one's job steps to the wrong controller. An
    flock on LOCK_FILE serialises sessions; a session with an older copy of this file takes no
    lock, so its live controller (behind the current link) is waited for as well.
    """
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with open(LOCK_FILE, "a") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SlurmError(f"another local SLURM test cluster held {LOCK_FILE}") from None
                time.sleep(interval)
        try:
            waited = False
            while (other := _other_live_cluster()) is not None:
                if not waited:  # past pytest's capture: a wait of up to an hour must say why
                    print(f"mofo tests: waiting for the local SLURM test cluster of {other.parent} "
                          "to stop (another test session; a killed one leaves its slurmctld and "
                          f"slurmd running: stop them with kill <pid in {other.parent}/*.pid>)",
                          file=sys.__stderr__, flush=True)
                waited = True
                if time.monotonic() > deadline:
                    raise SlurmError(f"another local SLURM test cluster runs ({other})")
                time.sleep(interval)
            # Such a session removes its link only after stopping its daemons (munged takes up
            # to 15 s): wait for that, or a link made now would be removed under us.
            link = SYSTEM_CONF_DIR / "slurm.conf"
            grace = time.monotonic() + 60
            while waited and link.is_symlink() and time.monotonic() < grace:
                time.sleep(interval)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def munge_works() -> bool:
    """True when a credential can be made and decoded (munged is up)."""
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5, check=False)
        if cred.returncode != 0:
            return False
        dec = subprocess.run(
            ["unmunge"], input=cred.stdout, capture_output=True, timeout=5, check=False
        )
        return dec.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def start_munged() -> int | None:
    """Start munged as the ``munge`` user unless it already runs; return its PID if started."""
    if munge_works():
        return None
    MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
    os.chmod(MUNGE_SOCKET_DIR, 0o755)
    key = Path("/etc/munge/munge.key")
    if not key.exists() or key.stat().st_size == 0:
        subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    _wait(munge_works, 10, "munged did not come up")
    return int(MUNGE_PIDFILE.read_text().split()[0]) if MUNGE_PIDFILE.exists() else None


def _wait(predicate, timeout: float, message: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise SlurmError(message)


def _stop_pid(pid: int, timeout: float = 15) -> None:
    """SIGTERM, wait, then SIGKILL one process we started."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # Reap it if it is our child (slurm daemons fork away, so usually it is not).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _read_pid(path: Path, timeout: float = 10) -> int:
    _wait(
        lambda: path.exists() and path.read_text().strip() != "",
        timeout,
        f"{path} was not written (see the daemon log next to it)",
    )
    return int(path.read_text().split()[0])


def _node_state(conf: Path, nodename: str) -> str:
    env = dict(os.environ, SLURM_CONF=str(conf))
    proc = subprocess.run(
        ["sinfo", "-h", "-N", "-n", nodename, "-o", "%T"],
        capture_output=True,
        text=True,
        env=env,
        timeout=10,
        check=False,
    )
    return proc.stdout.strip()


@contextlib.contextmanager
def local_slurm(
    workdir: str | Path,
    gpus: int = 2,
    cpus: int | None = None,
    memory_mb: int | None = None,
    min_job_age: int = 3600,
    start_timeout: float = 60,
) -> Iterator[LocalSlurm]:
    """Start a one-node cluster whose files all live in ``workdir``; stop it on exit."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    reason = unavailable_reason()
    if reason:
        raise SlurmError(reason)
    conf, node = write_confs(workdir, free_port(), free_port(), gpus, cpus, memory_mb, min_job_age)
    env = dict(os.environ, SLURM_CONF=str(conf))
    started: dict[str, int] = {}
    with one_cluster_per_machine():
        links = link_system_conf(conf)
        munge_pid = start_munged()
        if munge_pid:
            started["munged"] = munge_pid
        try:
            # -c: clean start, ignoring saved jobs from an earlier run in the same directory.
            subprocess.run(["slurmctld", "-c", "-f", str(conf)], check=True, env=env)
            started["slurmctld"] = _read_pid(workdir / "slurmctld.pid")
            subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
            started["slurmd"] = _read_pid(workdir / "slurmd.pid")
            nodename = node["NodeName"]

            def idle() -> bool:
                state = _node_state(conf, nodename)
                if "drain" in state or ("down" in state and "~" not in state):
                    log = (workdir / "slurmctld.log").read_text()[-2000:]
                    raise SlurmError(f"node {nodename} is {state}; slurmctld.log:\n{log}")
                return state == "idle"

            _wait(idle, start_timeout, f"node {nodename} did not become idle", interval=0.5)
            yield LocalSlurm(
                workdir=workdir,
                conf=conf,
                nodename=nodename,
                gpus=gpus,
                cpus=int(node["CPUs"]),
                memory_mb=int(node["RealMemory"]),
                pids=dict(started),
            )
        finally:
            # Cancel what is left so no job outlives the cluster, then stop the daemons.
            if "slurmctld" in started:
                subprocess.run(
                    ["scancel", "--full", "-u", "root"],
                    env=env,
                    capture_output=True,
                    timeout=10,
                    check=False,
                )
            for name in ("slurmd", "slurmctld", "munged"):
                if name in started:
                    _stop_pid(started[name])
            for link in links:  # only our own links: another session may have its own now
                with contextlib.suppress(OSError):
                    if os.readlink(link) == str(conf.parent / link.name):
                        link.unlink()


def local_profile(
    src: str | Path,
    dest: str | Path,
    cluster: LocalSlurm,
    status_seconds: int = 1,
    resources: dict[str, dict] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a copy of the profile ``src`` (a folder with config.yaml) fitted to ``cluster``.

    Kept from the real profile: the executor, every rule's resource keys, ``slurm_extra``
    (``--signal``) and the threads. Changed for the local one-node cluster: its partition, no
    account, status via ``squeue`` (no accounting database, so no sacct) polled every
    ``status_seconds``, and CPUs / memory / GPUs capped at what the node has so every job fits.
    ``resources`` (rule -> {resource: value}) and ``extra`` (profile keys) are applied last.
    """
    import yaml

    src, dest = Path(src), Path(dest)
    profile = yaml.safe_load((src / "config.yaml").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    mem_cap = max(500, cluster.memory_mb // max(1, cluster.cpus) // 2)

    def fit(res: dict) -> dict:
        res = dict(res)
        res.pop("slurm_account", None)
        res["slurm_partition"] = cluster.partition
        if "cpus_per_task" in res:
            res["cpus_per_task"] = min(int(res["cpus_per_task"]), cluster.cpus)
        if "cpus_per_gpu" in res:
            res["cpus_per_gpu"] = 1
        if "gpu" in res:
            res["gpu"] = min(int(res["gpu"]), cluster.gpus)
        if "mem_mb" in res:
            res["mem_mb"] = min(int(res["mem_mb"]), mem_cap)
        return res

    profile["default-resources"] = fit(profile.get("default-resources") or {})
    profile["set-resources"] = {
        rule: fit(res) for rule, res in (profile.get("set-resources") or {}).items()
    }
    profile["set-threads"] = {
        rule: min(int(n), cluster.cpus) for rule, n in (profile.get("set-threads") or {}).items()
    }
    profile.update(
        {
            "slurm-status-command": "squeue",
            "slurm-init-seconds-before-status-checks": status_seconds,
            "seconds-between-status-checks": status_seconds,
            "slurm-no-account": True,
            "slurm-keep-successful-logs": True,
            "latency-wait": 5,
        }
    )
    for rule, res in (resources or {}).items():
        target = profile["set-resources"].setdefault(rule, {})
        for key, value in res.items():
            if value is None:  # None removes a resource the real profile sets
                target.pop(key, None)
            else:
                target[key] = value
    profile.update(extra or {})
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def _demo() -> None:
    """Start a cluster in a temp dir, run a CPU and a GPU job, print what happened."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mofo-slurm-") as tmp:
        t0 = time.monotonic()
        with local_slurm(Path(tmp) / "cluster") as cluster:
            print(f"cluster up in {time.monotonic() - t0:.1f} s: {cluster.conf}")
            out = Path(tmp)
            cpu = cluster.sbatch(f"--output={out}/cpu.out", "--wrap", "hostname; nproc")
            gpu = cluster.sbatch(
                "--gpus=1",
                f"--output={out}/gpu.out",
                "--wrap",
                "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES",
            )
            for job, name in ((cpu, "cpu"), (gpu, "gpu")):
                state = cluster.wait_job(job)
                print(name, job, state, (out / f"{name}.out").read_text().strip())
        print(f"total {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    _demo()
