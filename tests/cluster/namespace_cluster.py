"""A real multi-host cluster on one machine: network namespaces on a bridge, one sshd each.

Used by tests/cluster/conftest.py and benchmarks/doctor_scaling.py. Each host is a namespace
with a veth on a per-session bridge, its own address and its own sshd (per-session host key,
config, pid file, authorized_keys). ssh reaches hosts through a generated ssh_config (ssh -F)
with the session's key and known_hosts, so the real ~/.ssh is never touched.

Hosts share the filesystem; each sshd runs in the private mount namespace `ip netns exec`
creates, where empty files are bind-mounted over root's ~/.bashrc and ~/.profile: a fresh
host's login shell, instead of this machine's (pyenv init costs ~0.1 CPU-s per ssh command).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_TOOLS = ("ip", "ssh", "ssh-keygen", "/usr/sbin/sshd")


@dataclass(frozen=True, kw_only=True)
class HostSpec:
    name: str
    other_subnet: bool = False               # address in a second subnet, reachable from the head only
    sshd: bool = True                        # False: the namespace exists but no sshd runs
    sshd_options: tuple[str, ...] = ()       # extra sshd_config lines; "{root}" is the session dir
    password_only: bool = False              # sshd refuses keys, offers passwords only
    private_dirs: tuple[str, ...] = ()       # tmpfs over these paths for this host only: storage not shared
    private_size: str = "512m"               # each private tmpfs's size (a small one is a full disk)
    readonly_dirs: tuple[str, ...] = ()      # read-only tmpfs over these paths: a host that refuses writes


@dataclass(frozen=True, kw_only=True)
class ClusterHost:
    name: str
    namespace: str
    veth: str                  # the root-namespace end, on the bridge (ip link set <veth> down = cut)
    address: str
    sshd_pid_file: Path
    sshd_config: Path
    spec: HostSpec


@dataclass(kw_only=True)
class Cluster:
    prefix: str
    root: Path                 # per-session temp dir: keys, configs, logs
    bridge: str
    bridge_address: str        # head's address in the main subnet
    subnet: str                # e.g. "10.213.37.0/24"
    other_bridge_address: str
    hosts: list[ClusterHost] = field(default_factory=list)
    ssh_config: Path = Path()
    identity_file: Path = Path()
    known_hosts: Path = Path()
    authorized_keys: Path = Path()
    user_ssh_dir: Path = Path()   # also authorized by every sshd: for ssh-setup tests
    control_dir: Path = Path()

    def host(self, name: str) -> ClusterHost:
        return next(h for h in self.hosts if h.name == name)

    def namespace_pids(self, name: str) -> list[int]:
        out = _run(["ip", "netns", "pids", self.host(name).namespace], check=False).stdout
        return [int(p) for p in out.split()]

    def pids_running(self, name: str, marker: bytes) -> list[int]:
        """Processes in host `name`'s namespace whose command line contains `marker`."""
        pids = []
        for pid in self.namespace_pids(name):
            try:
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
            except OSError:
                continue
        return pids


def missing_prerequisites() -> str | None:
    """Why the cluster cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in REQUIRED_TOOLS:
        if not shutil.which(tool) and not Path(tool).exists():
            return f"{tool} not installed (scripts/install-os-deps.sh)"
    probe = f"dfprobe{secrets.token_hex(3)}"
    if _run(["ip", "netns", "add", probe], check=False).returncode != 0:
        return "cannot create network namespaces here"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def _run(argv: list[str], *, check: bool = True, timeout: float = 20, input: str | None = None,
         ) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done


def _free_third_octet() -> int:
    used = _run(["ip", "-4", "-o", "addr"], check=False).stdout
    for _ in range(100):
        octet = secrets.randbelow(240) + 10
        if f"10.213.{octet}." not in used and f"10.214.{octet}." not in used:
            return octet
    raise RuntimeError("no free 10.213.x.0/24 subnet")


def _keygen(path: Path) -> None:
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deepfleet-test", "-f", str(path)])


def _sshd_config(cluster: Cluster, host: ClusterHost, host_key: Path) -> str:
    spec = host.spec
    lines = [f"ListenAddress {host.address}", f"HostKey {host_key}", f"PidFile {host.sshd_pid_file}",
             f"AuthorizedKeysFile {cluster.authorized_keys} {cluster.user_ssh_dir}/authorized_keys",
             "UsePAM no", "StrictModes no", "KbdInteractiveAuthentication no",
             "MaxStartups 200:30:400", "MaxSessions 100", "LogLevel ERROR", "AcceptEnv LANG LC_*",
             "Subsystem sftp /usr/lib/openssh/sftp-server"]
    if spec.password_only:
        lines += ["PubkeyAuthentication no", "PasswordAuthentication yes", "PermitRootLogin yes"]
    else:
        lines += ["PubkeyAuthentication yes", "PasswordAuthentication no", "PermitRootLogin prohibit-password"]
    extra = [line.format(root=cluster.root) for line in spec.sshd_options]
    return "\n".join([*extra, *lines]) + "\n"   # first value wins in sshd_config


def start_sshd(cluster: Cluster, host: ClusterHost) -> None:
    empty = cluster.root / "empty_rc"
    binds = " ".join(f"mount --bind {empty} {rc} &&" for rc in ("/root/.bashrc", "/root/.profile")
                     if Path(rc).exists())
    # `ip netns exec` gives sshd its own mount namespace, so these mounts are seen by this host only.
    for directory in host.spec.private_dirs:
        Path(directory).mkdir(parents=True, exist_ok=True)
        binds += f" mount -t tmpfs -o size={host.spec.private_size} tmpfs {directory} &&"
    for directory in host.spec.readonly_dirs:
        Path(directory).mkdir(parents=True, exist_ok=True)
        binds += f" mount -t tmpfs -o ro,size=1m tmpfs {directory} &&"
    log = cluster.root / f"{host.name}.sshd.log"
    _run(["ip", "netns", "exec", host.namespace, "sh", "-c",
          f"{binds} exec /usr/sbin/sshd -f {host.sshd_config} -E {log}"])
    wait_for_port(host.address, 22, 10)


def on_host(cluster: Cluster, name: str, script: str, *, input: bytes | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a shell script as host `name` sees the filesystem: inside its sshd's mount namespace."""
    sshd = cluster.host(name).sshd_pid_file.read_text().strip()
    return subprocess.run(["nsenter", "-t", sshd, "-m", "sh", "-c", script], input=input, capture_output=True,
                          timeout=timeout)


def stop_sshd(host: ClusterHost) -> None:
    try:
        os.kill(int(host.sshd_pid_file.read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


def wait_for_port(address: str, port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {address}:{port} after {seconds}s")


def build_cluster(specs: list[HostSpec] | int, *, prefix: str | None = None) -> Cluster:
    """Build the cluster; on any error, tear down what was built and re-raise."""
    if isinstance(specs, int):
        specs = [HostSpec(name=f"h{i + 1}") for i in range(specs)]
    prefix = prefix or f"df{secrets.token_hex(2)}"
    octet = _free_third_octet()
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    cluster = Cluster(prefix=prefix, root=root, bridge=f"{prefix}br", bridge_address=f"10.213.{octet}.1",
                      subnet=f"10.213.{octet}.0/24", other_bridge_address=f"10.214.{octet}.1")
    try:
        _populate(cluster, specs, octet)
    except BaseException:
        teardown_cluster(cluster)
        raise
    return cluster


def _populate(cluster: Cluster, specs: list[HostSpec], octet: int) -> None:
    root = cluster.root
    (root / "empty_rc").write_text("")
    cluster.identity_file, cluster.known_hosts = root / "id_ed25519", root / "known_hosts"
    cluster.authorized_keys, cluster.user_ssh_dir = root / "authorized_keys", root / "user" / ".ssh"
    cluster.control_dir, cluster.ssh_config = root / "cm", root / "ssh_config"
    cluster.user_ssh_dir.mkdir(parents=True, mode=0o700)
    cluster.control_dir.mkdir(mode=0o700)
    _keygen(cluster.identity_file)
    shutil.copy(cluster.identity_file.with_suffix(".pub"), cluster.authorized_keys)
    _run(["ip", "link", "add", cluster.bridge, "type", "bridge"])
    _run(["ip", "addr", "add", f"{cluster.bridge_address}/24", "dev", cluster.bridge])
    _run(["ip", "addr", "add", f"{cluster.other_bridge_address}/24", "dev", cluster.bridge])
    _run(["ip", "link", "set", cluster.bridge, "up"])
    Path("/run/sshd").mkdir(exist_ok=True)
    known = []
    for index, spec in enumerate(specs):
        subnet = "10.214" if spec.other_subnet else "10.213"
        host_dir = root / spec.name
        host_dir.mkdir()
        host = ClusterHost(name=spec.name, namespace=f"{cluster.prefix}-{spec.name}", veth=f"{cluster.prefix}v{index}",
                           address=f"{subnet}.{octet}.{index + 2}", sshd_pid_file=host_dir / "sshd.pid",
                           sshd_config=host_dir / "sshd_config", spec=spec)
        cluster.hosts.append(host)
        _run(["ip", "netns", "add", host.namespace])
        _run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.namespace])
        _run(["ip", "link", "set", host.veth, "master", cluster.bridge, "up"])
        in_ns = ["ip", "netns", "exec", host.namespace]
        _run([*in_ns, "ip", "addr", "add", f"{host.address}/24", "dev", "eth0"])
        _run([*in_ns, "ip", "link", "set", "eth0", "up"])
        _run([*in_ns, "ip", "link", "set", "lo", "up"])
        gateway = cluster.other_bridge_address if spec.other_subnet else cluster.bridge_address
        _run([*in_ns, "ip", "route", "add", "default", "via", gateway])
        host_key = host_dir / "ssh_host_ed25519_key"
        _keygen(host_key)
        known.append(f"{host.address} {' '.join(host_key.with_suffix('.pub').read_text().split()[:2])}")
        host.sshd_config.write_text(_sshd_config(cluster, host, host_key))
        write_name_files(cluster)   # before sshd: `ip netns exec` binds the file as it starts it
        if spec.sshd:
            start_sshd(cluster, host)
    cluster.known_hosts.write_text("\n".join(known) + "\n")
    write_name_files(cluster)
    cluster.ssh_config.write_text(
        "Host *\n"
        f"  IdentityFile {cluster.identity_file}\n"
        f"  UserKnownHostsFile {cluster.known_hosts}\n"
        "  User root\n  StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n")


def hosts_file_dir(namespace: str) -> Path:
    """`ip netns exec NS` bind-mounts each file of /etc/netns/NS/ over the same name in /etc."""
    return Path("/etc/netns") / namespace


def write_name_files(cluster: Cluster) -> None:
    """Every host resolves every other by name and address, as cluster nodes do (DNS or /etc/hosts),
    and this machine's own names as before; any other name fails at once (no DNS server).
    Without it a reverse lookup waits for this machine's resolver, unreachable from the namespaces,
    for 10 s: torch.distributed's store looks up each client that connects, so each rendezvous
    stalled 10-40 s on it. Rewritten in place as hosts are added: a bind mount shows the same inode."""
    machine = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else "127.0.0.1 localhost\n"
    lines = [machine.rstrip("\n"), f"{cluster.bridge_address} head",
             *(f"{host.address} {host.name}" for host in cluster.hosts)]
    for host in cluster.hosts:
        directory = hosts_file_dir(host.namespace)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts").write_text("\n".join(lines) + "\n")
        (directory / "resolv.conf").write_text("nameserver 127.0.0.1\n")   # no DNS here: fail at once


def firewall_tool() -> str | None:
    return "nft" if shutil.which("nft") else "iptables" if shutil.which("iptables") else None


def firewall_port(cluster: Cluster, name: str, port: int) -> None:
    """Drop incoming TCP to `port` inside one host's namespace (nftables, else iptables)."""
    in_ns = ["ip", "netns", "exec", cluster.host(name).namespace]
    if firewall_tool() == "nft":
        rules = (f"table inet {cluster.prefix}fw {{\n  chain input {{\n    type filter hook input priority 0;\n"
                 f"    tcp dport {port} drop\n  }}\n}}\n")
        _run([*in_ns, "nft", "-f", "-"], input=rules)
    else:
        _run([*in_ns, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"])


def teardown_cluster(cluster: Cluster) -> list[str]:
    """Kill every process in the namespaces, delete links, namespaces and files. Returns leftovers."""
    for host in cluster.hosts:
        stop_sshd(host)
    for host in cluster.hosts:
        for pid in cluster.namespace_pids(host.name):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    for host in cluster.hosts:
        _run(["ip", "link", "del", host.veth], check=False)
        _run(["ip", "netns", "del", host.namespace], check=False)
        shutil.rmtree(hosts_file_dir(host.namespace), ignore_errors=True)
    _run(["ip", "link", "del", cluster.bridge], check=False)
    shutil.rmtree(cluster.root, ignore_errors=True)
    names = _run(["ip", "netns", "list"], check=False).stdout
    links = _run(["ip", "-o", "link"], check=False).stdout
    return [n for n in [h.namespace for h in cluster.hosts] + [cluster.bridge] if n in names or f" {n}:" in links
            or f" {n}@" in links]


def fleet_yaml_text(cluster: Cluster, names: list[str], *, slots: int = 1, user: str = "root",
                    extra: str = "") -> str:
    """A fleet.yaml for some of the cluster's hosts, using the session's ssh config."""
    hosts = "".join(f"  - {{name: {n}, address: {cluster.host(n).address}}}\n" for n in names)
    return (f"defaults: {{user: {user}, slots: {slots}}}\n"
            f"ssh: {{config_file: {cluster.ssh_config}, connect_timeout: 3}}\n{extra}hosts:\n{hosts}")


def fleet_for(cluster: Cluster, names: list[str], **fields):
    """The same as a typed Fleet (deepfleet.fleet.inventory), for tests that call the API."""
    from deepfleet.fleet.inventory import Fleet, Host, SshSettings
    hosts = tuple(Host(name=n, address=cluster.host(n).address, user="root") for n in names)
    return Fleet(hosts=hosts, source="namespace cluster",
                 ssh=SshSettings(config_file=str(cluster.ssh_config), connect_timeout=3), **fields)
