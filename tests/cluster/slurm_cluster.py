"""A real SLURM (Debian's slurm-wlm 22.05) on top of the namespace cluster (namespace_cluster.py).

- munged: one per session, with its own key, socket, pid, seed and log file in the session dir.
  Its socket is a path on the shared filesystem, so every namespace reaches it; slurm.conf points
  at it with AuthInfo=socket=... (used by auth/munge and cred/munge, daemons and clients alike).
- slurmctld: on the head, in the root namespace, `SlurmctldHost=<this machine's hostname>(<bridge
  address>)`; it listens on a per-session free port (SlurmctldPort).
- slurmd: one per namespace host, `slurmd -N <node>` inside that host's network namespace and in a
  UTS namespace of its own whose hostname is the node's name (so `hostname` in a job says which
  node it is on, as on a real host). NodeAddr is the host's namespace address; SlurmdPort is one
  per-session free port (each slurmd binds it in its own network namespace). SlurmdSpoolDir,
  SlurmdPidFile and SlurmdLogFile use %n, so the nodes never share a file.
- CPU-only nodes, no Gres, no cgroups: proctrack/linuxproc, task/none, no accounting daemon.
  Finished jobs are recorded by jobcomp/filetxt (`SlurmCluster.completed_jobs()`), since sacct
  needs slurmdbd; `scontrol show job` keeps finished jobs for MinJobAge seconds.

Everything lives in `<cluster.root>/slurm` (config, state, spool, logs) and all daemons run in
the foreground as children of the test process; `stop_slurm` kills them and returns anything
of this session still running.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from namespace_cluster import Cluster, _run

REQUIRED_BINARIES = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "/usr/sbin/mungekey",
                     "srun", "sbatch", "squeue", "scancel", "scontrol", "sinfo", "salloc", "unshare")


@dataclass(frozen=True, kw_only=True)
class SlurmNode:
    name: str           # NodeName, = the namespace host's name and its hostname inside slurmd's UTS ns
    address: str        # NodeAddr: the host's namespace address
    namespace: str


@dataclass(kw_only=True)
class SlurmCluster:
    cluster: Cluster                 # the underlying namespace cluster (ssh still works)
    root: Path                       # <cluster.root>/slurm
    conf: Path                       # slurm.conf
    partition: str
    controller: str                  # SlurmctldHost name (this machine's short hostname)
    ctld_port: int
    slurmd_port: int
    nodes: list[SlurmNode] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)   # what a client command needs: SLURM_CONF, PATH
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)   # "munged", "slurmctld", node names

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def node(self, name: str) -> SlurmNode:
        return next(n for n in self.nodes if n.name == name)

    def run(self, argv: list[str], *, check: bool = False, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client command (srun, sbatch, squeue, ...) from the head against this cluster."""
        env = {**self.env, **kw.pop("env", {})}
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **kw)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}\n"
                               f"{self.log_tail()}")
        return done

    def sbatch(self, *args: str, **kw) -> int:
        """Submit with --parsable; the job id."""
        out = self.run(["sbatch", "--parsable", *args], check=True, **kw).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict ({} once the job is gone)."""
        done = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        if done.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout.splitlines()[0]))

    def wait_job(self, job_id: int, states: set[str] | str, timeout: float = 30) -> dict[str, str]:
        """Wait until the job's JobState is one of `states`; its scontrol record."""
        states = {states} if isinstance(states, str) else states
        deadline, info = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info}\n{self.log_tail()}")

    def start_requeued(self, job_id: int) -> None:
        """Start a requeued job now instead of after cred_expire. slurmd refuses a launch whose
        credential is from the same second as the job's kill ("already killed"), so wait for the
        nodes to finish the old run and for the clock to pass that second first."""
        self.wait_job(job_id, "PENDING", timeout=60)
        self.wait_nodes("idle", timeout=60)
        time.sleep(1.1)
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)

    def kill_node(self, name: str) -> None:
        """The node dies: its link goes silent, then slurmd and every job process on it get SIGKILL."""
        _run(["ip", "link", "set", self.cluster.host(name).veth, "down"])
        self.daemons[name].kill()
        self.daemons[name].wait(timeout=10)
        for pid in _node_pids(self.node(name)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def revive_node(self, name: str, timeout: float = 60) -> None:
        """Boot the node again (link up, slurmd started); waits until SLURM has it back in service."""
        _run(["ip", "link", "set", self.cluster.host(name).veth, "up"])
        _start_slurmd(self, self.node(name))
        _wait_for(lambda: self.node_states().get(name) in ("idle", "allocated", "mixed"), f"{name} back", timeout, self)

    def node_states(self) -> dict[str, str]:
        out = self.run(["sinfo", "-N", "-h", "-o", "%N %T"], check=True).stdout
        return dict(line.split()[:2] for line in out.splitlines() if line.strip())

    def wait_nodes(self, state: str = "idle", timeout: float = 30) -> None:
        deadline, states = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if set(states) == set(self.node_names) and all(s == state for s in states.values()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"nodes not {state} after {timeout}s: {states}\n{self.log_tail()}")

    def completed_jobs(self) -> list[dict[str, str]]:
        """jobcomp/filetxt records (JobId, JobState, ExitCode, NodeList, ...), one per finished job."""
        path = self.root / "jobcomp.txt"
        if not path.exists():
            return []
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in path.read_text().splitlines() if line.strip()]

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)


def missing_slurm_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "needs root (slurmd in network namespaces)"
    for tool in REQUIRED_BINARIES:
        if not shutil.which(tool) and not Path(tool).exists():
            return f"{tool} not installed (scripts/install-os-deps.sh: slurmctld slurmd slurm-client munge)"
    return None


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def _node_hardware() -> str:
    """This machine's real CPU layout as slurmd reports it (`slurmd -C`), memory under-reported."""
    out = _run(["/usr/sbin/slurmd", "-C"]).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    keep = ["CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore"]
    memory = min(int(fields.get("RealMemory", "1024")) // 2, 4096)
    return " ".join(f"{k}={fields[k]}" for k in keep if k in fields) + f" RealMemory={memory}"


def slurm_conf_text(s: SlurmCluster, bridge_address: str, hardware: str) -> str:
    root = s.root
    lines = [
        f"ClusterName={s.cluster.prefix}",
        f"SlurmctldHost={s.controller}({bridge_address})",
        f"SlurmctldPort={s.ctld_port}",
        f"SlurmdPort={s.slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire also delays a requeued job's restart (cred_expire + 1 s; default 120 s).
        f"AuthInfo=socket={root}/munge/munge.sock,cred_expire=30",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # No cgroups: plain process tracking, no task binding, no accounting daemon.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root}/jobcomp.txt",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "MailProg=/bin/true",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "ReturnToService=2",
        "JobRequeue=1",
        # Fast tests: short timeouts, prompt kills, finished jobs stay visible to scontrol for 5 min.
        "SlurmctldTimeout=10",
        "SlurmdTimeout=30",        # longer than a test's --hang-timeout: deepfleet notices a dead node first
        "MessageTimeout=5",
        "TCPTimeout=3",
        "KillWait=2",
        "UnkillableStepTimeout=10",
        "InactiveLimit=0",
        "WaitTime=0",
        "MinJobAge=300",
        "BatchStartTimeout=10",
        "SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1",
        f"TmpFS={root}/tmp",
    ]
    for node in s.nodes:
        lines.append(f"NodeName={node.name} NodeAddr={node.address} NodeHostname={node.name} "
                     f"{hardware} State=UNKNOWN")
    lines.append(f"PartitionName={s.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


# slurmd 22.05 initialises a cgroup plugin even with proctrack/linuxproc and task/none, and its
# default (autodetect) fails inside `ip netns exec`, which mounts a fresh /sys without
# /sys/fs/cgroup ("No filesystem mounted on /sys/fs/cgroup"). Naming the v1 plugin skips detection;
# nothing ever creates a cgroup with these plugins.
CGROUP_CONF = "CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n"


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_for(check, what: str, seconds: float, s: SlurmCluster) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, proc in s.daemons.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode} while waiting for {what}\n{s.log_tail()}")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {seconds}s\n{s.log_tail()}")


def start_slurm(cluster: Cluster, *, partition: str = "debug", node_timeout: float = 30) -> SlurmCluster:
    """munged + slurmctld on the head + one slurmd per host of `cluster`; waits until all nodes are idle.
    On any error, stops what was started and re-raises."""
    root = cluster.root / "slurm"
    s = SlurmCluster(cluster=cluster, root=root, conf=root / "slurm.conf", partition=partition,
                     controller=socket.gethostname().split(".")[0],
                     ctld_port=_free_port(cluster.bridge_address), slurmd_port=0)
    while s.slurmd_port in (0, s.ctld_port):
        s.slurmd_port = _free_port(cluster.bridge_address)
    s.nodes = [SlurmNode(name=h.name, address=h.address, namespace=h.namespace) for h in cluster.hosts]
    try:
        _start(s, cluster, node_timeout)
    except BaseException:
        stop_slurm(s)
        raise
    return s


def _start(s: SlurmCluster, cluster: Cluster, node_timeout: float) -> None:
    root = s.root
    for sub in ("munge", "state", "spool", "run", "log", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for node in s.nodes:
        (root / "spool" / node.name).mkdir()
    root.chmod(0o755)
    (root / "munge").chmod(0o755)       # munged wants the socket's directory traversable by all
    _run(["/usr/sbin/mungekey", "-c", "-b", "1024", "-k", str(root / "munge" / "munge.key")])
    s.conf.write_text(slurm_conf_text(s, cluster.bridge_address, _node_hardware()))
    (root / "cgroup.conf").write_text(CGROUP_CONF)
    # Unresolvable names cost slurmd a DNS timeout (seconds at shutdown and job start).
    names = [f"{cluster.bridge_address} {s.controller}"] + [f"{n.address} {n.name}" for n in s.nodes]
    (root / "hosts").write_text(Path("/etc/hosts").read_text() + "\n".join(names) + "\n")
    s.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
    s.env["SLURM_CONF"] = str(s.conf)
    s.env["PATH"] = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin") + ":/usr/sbin:/sbin"

    munge = root / "munge"
    s.daemons["munged"] = _spawn(
        ["/usr/sbin/munged", "-F", "-f", f"--socket={munge}/munge.sock", f"--key-file={munge}/munge.key",
         f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed",
         f"--log-file={root}/log/munged.log"], root / "log" / "munged.out")
    _wait_for(lambda: (munge / "munge.sock").exists(), "munged socket", 10, s)

    s.daemons["slurmctld"] = _spawn(["/usr/sbin/slurmctld", "-D", "-i", "-f", str(s.conf)],
                                    root / "log" / "slurmctld.out")
    _wait_for(lambda: " UP" in s.run(["scontrol", "ping"], timeout=10).stdout, "slurmctld (scontrol ping)", 20, s)

    for node in s.nodes:
        _start_slurmd(s, node)
    _wait_for(lambda: _all_idle(s), "all nodes idle (sinfo)", node_timeout, s)


def _start_slurmd(s: SlurmCluster, node: SlurmNode) -> None:
    """Own network namespace (the host's) + own UTS namespace with the node's hostname. `ip netns
    exec` also gives it a private mount namespace: there the session's hosts file (node names and
    the controller's name) covers /etc/hosts, for slurmd and its jobs only."""
    s.daemons[node.name] = _spawn(
        ["ip", "netns", "exec", node.namespace, "unshare", "--uts", "sh", "-c",
         'mount --bind "$2" /etc/hosts && hostname "$0" && exec /usr/sbin/slurmd -D -f "$1" -N "$0"',
         node.name, str(s.conf), str(s.root / "hosts")],
        s.root / "log" / f"slurmd-{node.name}.out")


def _all_idle(s: SlurmCluster) -> bool:
    states = s.node_states()
    return set(states) == set(s.node_names) and set(states.values()) == {"idle"}


def _session_pids(s: SlurmCluster) -> list[int]:
    """Processes of this session still alive: our daemons, every node's processes, anything whose
    command line names our session dir."""
    pids = {proc.pid for proc in s.daemons.values() if proc.poll() is None}
    pids.update(pid for node in s.nodes for pid in _node_pids(node))
    marker = str(s.root).encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes():
                pids.add(int(entry.name))
        except OSError:
            continue                       # gone
    pids.discard(os.getpid())
    return sorted(pids)


def _node_pids(node: SlurmNode) -> list[int]:
    """slurmd and its descendants (slurmstepd, job tasks) on `node`: in its network namespace but not
    in this machine's UTS namespace, which the namespace cluster's sshd shares."""
    try:
        netns = os.stat(f"/run/netns/{node.namespace}").st_ino
    except OSError:
        return []
    own_uts = os.stat("/proc/self/ns/uts").st_ino
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and os.stat(entry / "ns" / "net").st_ino == netns
                    and os.stat(entry / "ns" / "uts").st_ino != own_uts):
                pids.append(int(entry.name))
        except OSError:
            continue                       # gone, or a zombie
    return pids


def stop_slurm(s: SlurmCluster, *, remove: bool = True) -> list[str]:
    """Stop slurmds, slurmctld, munged (TERM, then KILL); remove the slurm dir. Returns what survived."""
    order = [n.name for n in s.nodes] + ["slurmctld", "munged"]
    for name in order:
        proc = s.daemons.get(name)
        if proc is not None and proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 5
    for name in order:
        proc = s.daemons.get(name)
        if proc is None:
            continue
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for pid in _session_pids(s):     # stray slurmstepd / job tasks
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.1)
    leftovers = [f"pid {pid}: {_cmdline(pid)}" for pid in _session_pids(s)]
    if remove:
        shutil.rmtree(s.root, ignore_errors=True)
    return leftovers


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
