"""A throw-away single-node Slurm cluster for tests: munged + slurmctld + slurmd started as root.

Everything lives in one temporary directory (config, munge key and socket, state, spool, logs, and
client wrappers that pin ``SLURM_CONF``) on free ports, so a system Slurm or munge on the same host is
left alone. Daemons are started in the foreground as our own children and stopped by the PIDs we recorded.
Run clients and snakemake with ``cluster.env``.

Use the ``slurm_cluster`` pytest fixture (session scoped) or the ``single_node_cluster`` context manager.
When the host cannot run the cluster (not root, no Slurm binaries and no working apt-get) the fixture
skips with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
CLIENT_COMMANDS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", *CLIENT_COMMANDS)
PARTITION = "debug"
# How long finished jobs stay visible to squeue. The plugin needs >= 3 * init-seconds (else it falls
# back to sacct, which without accounting storage never reports a state: snakemake waits for ever);
# the tests need every job of a whole workflow run still listed when they check it afterwards.
MIN_JOB_AGE_S = 3600
STARTUP_TIMEOUT_S = 90
APT_TIMEOUT_S = 600


@dataclass(frozen=True)
class SlurmJob:
    """One row of ``squeue --states=all``."""

    job_id: str
    name: str
    state: str
    comment: str


@dataclass
class SlurmCluster:
    """A running single-node cluster. ``env`` is the environment clients (and snakemake) need."""

    directory: Path
    slurm_conf: Path
    hostname: str
    partition: str
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    @property
    def pids(self) -> dict[str, int]:
        """PIDs of the daemons this cluster started, by daemon name."""
        return {name: proc.pid for name, proc in self.processes.items()}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster and return its completed process."""
        return subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, check=check, timeout=timeout
        )

    def jobs(self) -> list[SlurmJob]:
        """All jobs the controller still remembers (finished ones stay MinJobAge seconds)."""
        out = self.run("squeue", "--states=all", "--noheader", "--format=%i|%j|%T|%k").stdout
        rows = [line.split("|", 3) for line in out.splitlines() if line.strip()]
        return [SlurmJob(*(part.strip() for part in row)) for row in rows if len(row) == 4]

    def node_state(self) -> str:
        out = self.run("sinfo", "--noheader", "--Node", "--format=%T", check=False).stdout
        return out.strip()

    def log_tail(self, n_lines: int = 30) -> str:
        """The last lines of every daemon log, for error messages."""
        parts = []
        for log in sorted(self.directory.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-n_lines:]
            parts.append(f"--- {log.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports nobody listens on right now (so a second cluster or a system Slurm does not clash)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:  # all bound at once, so the ports differ
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def host_memory_mb() -> int:
    """Total memory in MiB as slurmd measures it (MemTotal); the node is configured a little below."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("/proc/meminfo has no MemTotal line")


def slurm_conf_text(
    directory: Path, hostname: str, cpus: int, real_memory_mb: int, ctld_port: int, slurmd_port: int
) -> str:
    """A minimal slurm.conf for one node on this host, with all state under ``directory``."""
    d = directory
    return "\n".join(
        [
            "ClusterName=weaksegtest",
            f"SlurmctldHost={hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={d / 'munge.socket'}",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'slurmd.log'}",
            # No cgroups in containers: track processes by parent PID, no task binding.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "ReturnToService=2",
            f"MinJobAge={MIN_JOB_AGE_S}",
            "KillWait=5",
            f"NodeName={hostname} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real_memory_mb} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={hostname} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def write_client_shims(bin_dir: Path, slurm_conf: Path) -> None:
    """Wrappers that pin SLURM_CONF for every client command.

    The slurm-jobstep plugin drops all SLURM_* variables (SLURM_CONF included) before its srun inside
    a job; a real cluster has its config at the compiled-in /etc/slurm path, ours is private.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    for command in CLIENT_COMMANDS:
        real = shutil.which(command)
        shim = bin_dir / command
        shim.write_text(
            f'#!/bin/sh\nexport SLURM_CONF={shlex.quote(str(slurm_conf))}\nexec {shlex.quote(real)} "$@"\n'
        )
        shim.chmod(0o755)


def missing_binaries() -> list[str]:
    return [name for name in REQUIRED_BINARIES if shutil.which(name) is None]


def install_packages() -> str | None:
    """apt-get install the Slurm packages; returns None on success, else why it failed."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for another apt/dpkg instead of failing on its lock.
    install = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", *SLURM_PACKAGES]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    if result.returncode != 0:
        # Fresh containers often have no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=APT_TIMEOUT_S)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    if result.returncode != 0:
        return f"`{' '.join(install)}` failed: {result.stderr.strip()[-500:]}"
    return None


def unavailable_reason(install: bool = True) -> str | None:
    """Why a cluster cannot be started here (None when it can); installs the packages if allowed and needed."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root: slurmctld/slurmd run as SlurmUser=root"
    if not missing_binaries():
        return None
    if not install or shutil.which("apt-get") is None:
        return f"Slurm binaries missing ({', '.join(missing_binaries())}) and apt-get is not available"
    failure = install_packages()
    if failure:
        return failure
    if missing_binaries():
        return f"still missing after apt-get install: {', '.join(missing_binaries())}"
    return None


def _start(cluster: SlurmCluster, name: str, argv: list[str]) -> None:
    log = open(cluster.directory / f"{name}.stdout", "wb")
    # Own session: a Ctrl-C on the test run reaches us, not the daemons; we stop them ourselves.
    proc = subprocess.Popen(
        argv, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    cluster.processes[name] = proc


def _wait_until(predicate, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} while waiting for {what}\n{cluster.log_tail()}"
                    + _stdout_tail(cluster, name)
                )
        if predicate():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.log_tail()}")


def _stdout_tail(cluster: SlurmCluster, name: str) -> str:
    path = cluster.directory / f"{name}.stdout"
    if not path.exists():
        return ""
    return f"\n--- {path.name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-20:])


def _stop(cluster: SlurmCluster) -> None:
    """Cancel remaining jobs, then stop exactly the daemons we started, newest first."""
    procs = cluster.processes
    if "slurmctld" in procs and procs["slurmctld"].poll() is None:
        with contextlib.suppress(Exception):
            cluster.run("scancel", "--full", f"--partition={cluster.partition}", check=False, timeout=10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(
                job.state in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING") for job in cluster.jobs()
            ):
                time.sleep(0.5)
    for name in reversed(list(procs)):
        proc = procs[name]
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@contextlib.contextmanager
def single_node_cluster(directory: Path) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd with all files in ``directory``; yield once the node is idle."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    # munged refuses group/world-writable directories on the key and socket paths.
    directory.chmod(0o700)
    for sub in ("state", "spool"):
        (directory / sub).mkdir(exist_ok=True)
    hostname = socket.gethostname().split(".")[0]
    # CPUs this process may use (nproc); configuring more than slurmd detects would drain the node.
    cpus = len(os.sched_getaffinity(0))
    # 95 % of MemTotal: a node configured above what slurmd measures is drained ("Low RealMemory").
    real_memory_mb = max(1, int(host_memory_mb() * 0.95))
    slurm_conf = directory / "slurm.conf"
    slurm_conf.write_text(slurm_conf_text(directory, hostname, cpus, real_memory_mb, *free_ports(2)))
    munge_key = directory / "munge.key"
    munge_key.write_bytes(os.urandom(1024))
    munge_key.chmod(0o400)

    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env["SLURM_CONF"] = str(slurm_conf)
    # Jobs inherit PATH (sbatch --export=ALL), so commands inside jobs find the shims too.
    write_client_shims(directory / "bin", slurm_conf)
    env["PATH"] = f"{directory / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    cluster = SlurmCluster(directory, slurm_conf, hostname, PARTITION, env)
    try:
        munge_socket = directory / "munge.socket"
        _start(
            cluster,
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={munge_socket}",
                f"--key-file={munge_key}",
                f"--pid-file={directory / 'munged.pid'}",
                f"--log-file={directory / 'munged.log'}",
                f"--seed-file={directory / 'munged.seed'}",
            ],
        )
        _wait_until(munge_socket.exists, STARTUP_TIMEOUT_S, "the munge socket", cluster)
        _start(cluster, "slurmctld", ["slurmctld", "-D", "-c", "-f", str(slurm_conf)])
        _wait_until(
            lambda: cluster.run("scontrol", "ping", check=False, timeout=10).stdout.count("UP") > 0,
            STARTUP_TIMEOUT_S,
            "slurmctld to answer `scontrol ping`",
            cluster,
        )
        _start(cluster, "slurmd", ["slurmd", "-D", "-f", str(slurm_conf), "-N", hostname])
        _wait_until(lambda: cluster.node_state() == "idle", STARTUP_TIMEOUT_S, "the node to be idle", cluster)
        yield cluster
    finally:
        _stop(cluster)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """A running single-node Slurm cluster for the whole session; skips when this host cannot run one."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no single-node Slurm cluster: {reason}")
    with single_node_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


if __name__ == "__main__":
    # Manual check: start a cluster, run one job, stop it.
    import tempfile

    problem = unavailable_reason()
    if problem:
        raise SystemExit(problem)
    with tempfile.TemporaryDirectory() as tmp, single_node_cluster(Path(tmp)) as running:
        print(running.run("sinfo").stdout)
        job = running.run(
            "sbatch", "--parsable", "--wrap", "echo $SLURM_JOB_ID", f"--output={tmp}/out"
        ).stdout
        print("submitted", job.strip())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(j.state == "COMPLETED" for j in running.jobs()):
            time.sleep(1)
        print(running.jobs())
