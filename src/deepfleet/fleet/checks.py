"""Doctor checks: each a small pure function from collected facts to findings with a fix.

They read only `Collected` (recorded facts work as well as live ones), so every conclusion,
such as "output dir not shared" or "deepspeed differs on gpu3", is unit-tested on recorded facts.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from deepfleet.fleet.facts import HostFacts
from deepfleet.fleet.inventory import Fleet
from deepfleet.fleet.network import InterfaceChoice, select_shared_interface
from deepfleet.fleet.ssh import SshOptions, diagnose

Severity = Literal["ok", "warn", "fail"]
FLEET = "(fleet)"
GIB = 1 << 30


@dataclass(frozen=True, kw_only=True)
class Finding:
    check: str
    host: str
    severity: Severity
    message: str
    fix: str = ""


@dataclass(frozen=True, kw_only=True)
class Collected:
    fleet: Fleet
    facts: list[HostFacts]
    listener: dict[str, Any] | None = None        # the master port listener's report
    matrix: bool = True                           # whether host->host ssh was probed
    checksum_paths: tuple[str, ...] = ()
    ssh_options: SshOptions = field(default_factory=SshOptions)
    head_hosts: frozenset[str] = frozenset()      # fleet hosts that are the machine doctor ran on

    @property
    def reachable(self) -> list[HostFacts]:
        return [f for f in self.facts if f.ok]

    @property
    def interfaces_unknown(self) -> list[str]:
        """Hosts whose probe could not list addresses (no iproute2 `ip -j`)."""
        return [f.host.name for f in self.reachable if f.get("interfaces") is None]

    def interface_choice(self) -> InterfaceChoice:
        preferred = {h.name: h.interface for h in self.fleet.hosts if h.interface}
        known = {f.host.name: f.get("interfaces") for f in self.reachable if f.get("interfaces") is not None}
        return select_shared_interface(known, preferred, {h.name: h.address for h in self.fleet.hosts})


def _differs(values: dict[str, Any]) -> tuple[Any, list[str]] | None:
    """(majority value, hosts that differ from it), or None when all agree."""
    counts = Counter(values.values())
    if len(counts) <= 1:
        return None
    majority = counts.most_common(1)[0][0]
    return majority, sorted(h for h, v in values.items() if v != majority)


def check_ssh(c: Collected) -> list[Finding]:
    found = []
    for f in c.facts:
        if f.failure:
            found.append(Finding(check="ssh", host=f.host.name, severity="fail",
                                 message=f"head -> {f.host.destination}: {f.failure.what}", fix=f.failure.fix))
        elif f.error:
            found.append(Finding(check="ssh", host=f.host.name, severity="fail", message=f.error,
                                 fix="check that python3 exists on the host (the probe needs any python >= 3.8)"))
        else:
            found.append(Finding(check="ssh", host=f.host.name, severity="ok",
                                 message=f"head -> host ok ({f.seconds:.2f}s incl. probe)"))
    return found


def check_ssh_matrix(c: Collected) -> list[Finding]:
    """Host -> host ssh. Sources failing the same way to one target are one finding; targets the
    head cannot reach either are left to the ssh check (same cause, already reported)."""
    if not c.matrix or len(c.fleet.hosts) < 2:
        return []
    by_name = {h.name: h for h in c.fleet.hosts}
    head_failed = {f.host.name for f in c.facts if not f.ok}
    failed: dict[tuple[str, str, str], list[str]] = {}
    pairs = 0
    for f in c.reachable:
        hops = f.get("network", "hops", default={})
        for peer in sorted(h.name for h in c.fleet.hosts if h.name != f.host.name):
            pairs += 1
            hop = hops.get(peer, {"returncode": None, "stderr": "no answer from the ssh test"})
            if hop.get("returncode") == 0 or peer in head_failed:
                continue
            failure = diagnose(by_name.get(peer, f.host), hop.get("returncode"), hop.get("stderr", ""),
                               timed_out=hop.get("returncode") is None, options=c.ssh_options)
            what = failure.what if failure else f"exit {hop.get('returncode')}: {hop.get('stderr', '')[-120:]}"
            fix = ("run `deepfleet ssh-setup` to build the full mesh"
                   if not failure or failure.kind in ("auth", "host-key-unknown") else failure.fix)
            failed.setdefault((peer, what, fix), []).append(f.host.name)
    found = [Finding(check="ssh-matrix", host=sources[0] if len(sources) == 1 else FLEET, severity="fail",
                     message=f"{', '.join(sources)} -> {peer}: {what}", fix=fix)
             for (peer, what, fix), sources in failed.items()]
    if not found and pairs:
        found.append(Finding(check="ssh-matrix", host=FLEET, severity="ok",
                             message=f"all {pairs} host->host ssh pairs work"))
    return found


def check_python(c: Collected) -> list[Finding]:
    found, versions = [], {}
    for f in c.reachable:
        wanted = f.get("python", "wanted")
        if not f.get("python", "wanted_found"):
            found.append(Finding(check="python", host=f.host.name, severity="fail",
                                 message=f"{wanted} does not exist here (the launcher needs the same path everywhere)",
                                 fix=f"create the same environment at {wanted} on this host, or set python: in fleet.yaml"))
        else:
            versions[f.host.name] = f.get("python", "version")
    if (diff := _differs(versions)):
        minor = _differs({h: ".".join(str(v).split(".")[:2]) for h, v in versions.items()})
        found += [Finding(check="python", host=h, severity="fail" if minor else "warn",
                          message=f"python {versions[h]} here, {diff[0]} on the others",
                          fix=f"install python {diff[0]} in the environment on {h}" if minor
                          else "patch releases work together; align them when convenient") for h in diff[1]]
    elif versions:
        found.append(Finding(check="python", host=FLEET, severity="ok",
                             message=f"python {next(iter(versions.values()))} at the same path on all hosts"))
    return found


def check_packages(c: Collected) -> list[Finding]:
    found = []
    hosts = [f for f in c.reachable if f.get("python", "wanted_found")]
    for package in ("torch", "deepspeed", "transformers", "accelerate", "peft"):
        versions = {f.host.name: f.get("packages", package, "version") for f in hosts}
        if all(v is None for v in versions.values()):
            continue
        for f in hosts:
            origin, dist = f.get("packages", package, "origin"), f.get("packages", package, "dist_path")
            editable = f.get("packages", package, "editable")
            if origin and dist and not editable and not _inside(origin, dist):
                found.append(Finding(check="versions", host=f.host.name, severity="warn",
                                     message=f"`import {package}` loads {origin}, not the installed {versions[f.host.name]}",
                                     fix="remove the shadowing copy from PYTHONPATH or the working dir"))
        diff = _differs(versions)
        if diff:
            majority = diff[0]
            for h in diff[1]:
                have = versions[h] or "not installed"
                found.append(Finding(check="versions", host=h, severity="fail",
                                     message=f"{package} {have} here, {majority or 'missing'} on the others",
                                     fix=f"pip install {package}=={majority} on {h}" if majority
                                     else f"pip uninstall {package} on {h}, or install it everywhere"))
        else:
            found.append(Finding(check="versions", host=FLEET, severity="ok",
                                 message=f"{package} {next(iter(versions.values()))} everywhere"))
    for key in ("cuda", "nccl"):
        values = {f.host.name: f.get("accelerators", key) for f in hosts if f.get("accelerators", "count")}
        if (diff := _differs(values)):
            found += [Finding(check="versions", host=h, severity="fail",
                              message=f"torch built with {key.upper()} {values[h]} here, {diff[0]} on the others",
                              fix="install the same torch build (same CUDA) on every host") for h in diff[1]]
    return found


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    return os.path.commonpath([path, directory]) == directory


def check_accelerators(c: Collected) -> list[Finding]:
    found, models = [], {}
    for f in c.reachable:
        count, slots = f.get("accelerators", "count", default=0), f.host.slots
        if count == 0:
            found.append(Finding(check="accelerators", host=f.host.name, severity="ok",
                                 message=f"no GPU: CPU host, {slots} rank(s) as configured"))
        elif slots > count:
            found.append(Finding(check="accelerators", host=f.host.name, severity="fail",
                                 message=f"slots={slots} but only {count} GPU(s)",
                                 fix=f"set slots={count} for this host (or run `deepfleet hostfile --discover`)"))
        else:
            severity: Severity = "warn" if slots < count else "ok"
            found.append(Finding(check="accelerators", host=f.host.name, severity=severity,
                                 message=f"{count} GPU(s), slots={slots}",
                                 fix=f"set slots={count} to use every GPU" if slots < count else ""))
        if count and (problem := _torch_gpu_problem(f)):
            found.append(Finding(check="accelerators", host=f.host.name, severity="fail", message=problem,
                                 fix="install a CUDA build of torch in this host's environment (same as the others)"))
        gpu_models = sorted(set(f.get("accelerators", "models", default=[])))
        models[f.host.name] = (",".join(gpu_models) or "GPU (model unknown)") if count else "cpu"
    kinds = {v == "cpu" for v in models.values()}
    if len(kinds) > 1:
        found.append(Finding(check="accelerators", host=FLEET, severity="fail",
                             message="some hosts have GPUs and some do not",
                             fix="use only GPU hosts in one job (NCCL needs a GPU per rank)"))
    elif (diff := _differs(models)):
        found += [Finding(check="accelerators", host=h, severity="warn",
                          message=f"GPU model {models[h]}, others have {diff[0]}",
                          fix="mixed GPUs run at the speed of the slowest; expect that") for h in diff[1]]
    return found


def _torch_gpu_problem(f: HostFacts) -> str | None:
    """Why torch on a GPU host cannot run NCCL ranks, or None."""
    count = f.get("accelerators", "count", default=0)
    if f.get("accelerators", "torch_error"):
        return f"{count} GPU(s), but importing torch failed: {f.get('accelerators', 'torch_error')}"
    if f.get("accelerators", "cuda") is None:
        return f"{count} GPU(s), but torch here is a CPU-only build"
    sees = f.get("accelerators", "torch_sees")
    if sees == 0:
        return f"{count} GPU(s), but torch sees none (CUDA_VISIBLE_DEVICES, driver, or container runtime)"
    return None


def check_workdir(c: Collected) -> list[Finding]:
    found = []
    for f in c.reachable:
        work = f.get("workdir")
        if work and not work.get("exists"):
            found.append(Finding(check="workdir", host=f.host.name, severity="fail",
                                 message=f"working dir {work['path']} missing (the launcher runs every rank there)",
                                 fix=f"create or mount {work['path']} on this host, or run from a dir every host has"))
    if not found and any(f.get("workdir") for f in c.reachable):
        found.append(Finding(check="workdir", host=FLEET, severity="ok",
                             message=f"working dir {c.reachable[0].get('workdir', 'path')} exists on all hosts"))
    return found


def check_output_dir(c: Collected) -> list[Finding]:
    hosts = [f for f in c.reachable if f.get("output_dir")]
    if not hosts:
        return []
    path = hosts[0].get("output_dir", "path")
    missing = [f.host.name for f in hosts if not f.get("output_dir", "exists") or not f.get("output_dir", "writable")]
    found = [Finding(check="output-dir", host=h, severity="fail", message=f"{path} missing or not writable",
                     fix=f"mkdir -p {path} (writable by the training user) on {h}") for h in missing]
    # The head's own host always sees the head's token: only the other hosts say whether it is shared.
    seen = {f.host.name: f.get("share_token_seen") for f in hosts
            if f.host.name not in missing and f.host.name not in c.head_hosts}
    if any(v is None for v in seen.values()) or not seen:
        return found
    if all(seen.values()):
        found.append(Finding(check="output-dir", host=FLEET, severity="ok",
                             message=f"{path} is shared: one checkpoint copy, visible to every host"))
    elif not any(seen.values()):
        found.append(Finding(check="output-dir", host=FLEET, severity="warn",
                             message=f"{path} is NOT shared: each host keeps its own checkpoint shards",
                             fix="resume needs every host's own dir intact; for one copy, use a shared "
                                 "filesystem (NFS) or collect shards with `deepfleet export`"))
    else:
        sharing = sorted(h for h, v in seen.items() if v)
        found.append(Finding(check="output-dir", host=FLEET, severity="fail",
                             message=f"{path} is shared with the head on {', '.join(sharing)} only",
                             fix="mount the same filesystem at that path on every host, or on none"))
    return found


def check_resources(c: Collected) -> list[Finding]:
    found = []
    for f in c.reachable:
        place = f.get("output_dir") or f.get("workdir") or {}
        free = place.get("free_bytes")
        if free is not None and free < 10 * GIB:
            found.append(Finding(check="resources", host=f.host.name, severity="fail" if free < GIB else "warn",
                                 message=f"{free / GIB:.1f} GiB free at {place.get('path')}",
                                 fix="free disk space: checkpoints of a 7B model need ~100 GiB"))
        memory = f.get("memory_available_bytes")
        if memory is not None and memory < 4 * GIB:
            found.append(Finding(check="resources", host=f.host.name, severity="warn",
                                 message=f"only {memory / GIB:.1f} GiB memory available",
                                 fix="stop other jobs on this host; model loading needs host memory"))
    if not found and c.reachable:
        found.append(Finding(check="resources", host=FLEET, severity="ok", message="disk and memory enough on all hosts"))
    return found


def check_clock_skew(c: Collected, limit_seconds: float = 1.0) -> list[Finding]:
    found = []
    for f in c.reachable:
        bounds = f.skew_bounds()
        if bounds is None:
            continue
        low, high = bounds
        if low > limit_seconds or high < -limit_seconds:
            skew = low if low > limit_seconds else high
            found.append(Finding(check="clock", host=f.host.name, severity="warn",
                                 message=f"clock is {skew:+.1f}s off the head's",
                                 fix="enable time sync (`sudo timedatectl set-ntp true` or chrony) on every host"))
    if not found and c.reachable:
        found.append(Finding(check="clock", host=FLEET, severity="ok",
                             message=f"clocks agree with the head within {limit_seconds:g}s"))
    return found


def check_interface(c: Collected) -> list[Finding]:
    if len(c.reachable) < 2:
        return []
    found = [Finding(check="interface", host=h, severity="warn", message="could not list this host's addresses",
                     fix="install iproute2 (`ip -j addr`), or set interface: for this host in fleet.yaml")
             for h in c.interfaces_unknown]
    if len(c.reachable) - len(found) < 2:
        return found
    choice = c.interface_choice()
    if choice.network is None:
        return found + [Finding(check="interface", host=FLEET, severity="fail", message="no subnet is shared by the hosts",
                                fix="put all hosts on one private network (NCCL/gloo need direct TCP between hosts)")]
    found += [Finding(check="interface", host=h, severity="fail",
                      message=f"no address in {choice.network}, the subnet the other hosts share",
                      fix=f"give {h} an address in {choice.network}, or remove it from the fleet")
              for h in choice.outside]
    names = sorted(set(choice.per_host.values()))
    proposal = (f"NCCL_SOCKET_IFNAME={names[0]} GLOO_SOCKET_IFNAME={names[0]}" if len(names) == 1
                else "per host: " + ", ".join(f"{h}={i}" for h, i in choice.per_host.items()))
    found.append(Finding(check="interface", host=FLEET, severity="ok",
                         message=f"shared subnet {choice.network}: {proposal}"))
    return found


def check_infiniband(c: Collected) -> list[Finding]:
    devices = {f.host.name: f.get("infiniband", default=[]) for f in c.reachable}
    with_ib = sorted(h for h, d in devices.items() if d)
    if not with_ib:
        return [Finding(check="infiniband", host=FLEET, severity="ok",
                        message="no InfiniBand devices: NCCL uses TCP sockets (NCCL_IB_DISABLE=1 skips the IB probe)")]
    # Ranks that pick IB and ranks that pick sockets hang in NCCL init (NVIDIA/nccl#234): all or none.
    mixed_fix = "fix the HCA, or set NCCL_IB_DISABLE=1 on every host (in the fleet's env, not on one host)"
    active = {h: [d for d in devices[h] if "ACTIVE" in str(d.get("state"))] for h in with_ib}
    found = [Finding(check="infiniband", host=h, severity="fail", message="no InfiniBand device, others have one",
                     fix=mixed_fix) for h in sorted(set(devices) - set(with_ib))]
    found += [Finding(check="infiniband", host=h, severity="fail",
                      message=f"no InfiniBand port is ACTIVE ({', '.join(d['device'] + '/' + str(d['port']) for d in devices[h])})",
                      fix="check the cable and subnet manager (`ibstat`); " + mixed_fix) for h in with_ib if not active[h]]
    hcas = sorted({d["device"] for h in with_ib for d in active[h]})
    roce = any(d.get("link_layer") == "Ethernet" for h in with_ib for d in devices[h])
    env = f"NCCL_IB_HCA={','.join(hcas)}" + (" NCCL_IB_GID_INDEX=3" if roce else "")
    if hcas:
        found.append(Finding(check="infiniband", host=FLEET, severity="ok", message=f"InfiniBand found: set {env}"))
    return found


def check_master_port(c: Collected) -> list[Finding]:
    if c.listener is None or len(c.fleet.hosts) < 2:
        return []
    port, master = c.fleet.master_port, c.fleet.master.name
    if not c.listener.get("ready"):
        return [Finding(check="master-port", host=master, severity="fail",
                        message=f"cannot listen on port {port}: {c.listener.get('error', 'listener did not start')}",
                        fix=f"stop what uses port {port} on {master} (`ss -ltnp`), or set master_port: in fleet.yaml")]
    found = []
    for f in c.reachable:
        result = f.get("network", "master") or {}
        if not result.get("ok"):
            found.append(Finding(check="master-port", host=f.host.name, severity="fail",
                                 message=f"cannot connect to {master}:{port}: {result.get('error', 'no result')}",
                                 fix=f"open TCP {port} on {master} for the cluster subnet "
                                     f"(e.g. `sudo ufw allow from <subnet> to any port {port} proto tcp`)"))
    if not found:
        found.append(Finding(check="master-port", host=FLEET, severity="ok",
                             message=f"every host reaches {master}:{port}"))
    return found


def check_bandwidth(c: Collected, warn_gbit: float = 1.0) -> list[Finding]:
    found = []
    for f in c.reachable:
        result = f.get("network", "bandwidth")
        if not result:
            continue
        if "error" in result:
            found.append(Finding(check="bandwidth", host=f.host.name, severity="warn",
                                 message=f"host -> head bandwidth test failed: {result['error']}",
                                 fix="check firewalls between head and host (ephemeral TCP ports)"))
            continue
        rate = result["gbit_s"]
        found.append(Finding(check="bandwidth", host=f.host.name, severity="warn" if rate < warn_gbit else "ok",
                             message=f"host -> head {rate:.2f} Gbit/s ({result.get('tool', 'builtin')}, "
                                     f"{result['bytes'] >> 20} MiB in {result['seconds']:.2f}s, all hosts at once)",
                             fix="use a faster link (NCCL_SOCKET_IFNAME on the fast interface)" if rate < warn_gbit else ""))
    return found


def check_checksums(c: Collected) -> list[Finding]:
    found = []
    for path in c.checksum_paths:
        sums = {f.host.name: (f.get("checksums", path, default={}) or {}).get("sha256") for f in c.reachable}
        if (diff := _differs(sums)):
            found += [Finding(check="data", host=h, severity="fail",
                              message=f"{path} differs ({'missing' if sums[h] is None else sums[h][:12]})",
                              fix=f"copy {path} from a host with sha256 {str(diff[0])[:12]}…") for h in diff[1]]
        elif None in sums.values():
            found.append(Finding(check="data", host=FLEET, severity="fail", message=f"{path} missing everywhere",
                                 fix="check the path"))
        else:
            found.append(Finding(check="data", host=FLEET, severity="ok", message=f"{path} identical on all hosts"))
    return found


ALL_CHECKS: list[Callable[[Collected], list[Finding]]] = [
    check_ssh, check_ssh_matrix, check_python, check_packages, check_accelerators, check_workdir,
    check_output_dir, check_resources, check_clock_skew, check_interface, check_infiniband,
    check_master_port, check_bandwidth, check_checksums]


def run_checks(collected: Collected) -> list[Finding]:
    return [finding for check in ALL_CHECKS for finding in check(collected)]
