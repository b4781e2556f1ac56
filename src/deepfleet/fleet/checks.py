"""Doctor checks: each a small pure function from collected facts to findings with a fix.

They read only `Collected` (recorded facts work as well as live ones), so every conclusion,
such as "output dir not shared" or "deepspeed differs on gpu3", is unit-tested on recorded facts.
"""

from __future__ import annotations

import os
from typing import Callable

from deepfleet.fleet.build_checks import check_deepspeed_ops
from deepfleet.fleet.data_checks import check_checksums
from deepfleet.fleet.facts import HostFacts
from deepfleet.fleet.findings import FLEET, Collected, Finding, Severity, differs
from deepfleet.fleet.network_checks import (check_bandwidth, check_infiniband, check_interface, check_master_port,
                                            check_reverse_dns)
from deepfleet.fleet.ssh import diagnose

GIB = 1 << 30


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
    if (diff := differs(versions)):
        minor = differs({h: ".".join(str(v).split(".")[:2]) for h, v in versions.items()})
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
    for package in ("torch", "deepspeed", "transformers", "accelerate", "peft", "deepfleet"):
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
        diff = differs(versions)
        if diff:
            majority = diff[0]
            for h in diff[1]:
                have = versions[h] or "not installed"
                found.append(Finding(check="versions", host=h, severity="fail",
                                     message=f"{package} {have} here, {majority or 'missing'} on the others",
                                     fix=f"`deepfleet env sync` (or pip install {package}=={majority} on {h})"
                                     if majority
                                     else f"pip uninstall {package} on {h}, or install it everywhere"))
        else:
            found.append(Finding(check="versions", host=FLEET, severity="ok",
                                 message=f"{package} {next(iter(versions.values()))} everywhere"))
    for key in ("cuda", "nccl"):
        values = {f.host.name: f.get("accelerators", key) for f in hosts if f.get("accelerators", "count")}
        if (diff := differs(values)):
            found += [Finding(check="versions", host=h, severity="fail",
                              message=f"torch built with {key.upper()} {values[h]} here, {diff[0]} on the others",
                              fix="install the same torch build (same CUDA) on every host") for h in diff[1]]
    return found


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    return os.path.commonpath([path, directory]) == directory


def check_accelerators(c: Collected) -> list[Finding]:
    found, models, has_gpus = [], {}, set()
    for f in c.reachable:
        count, slots = f.get("accelerators", "count", default=0), f.host.slots
        if slots is None:   # not configured: one rank per GPU (1 on a CPU host)
            found.append(Finding(check="accelerators", host=f.host.name, severity="ok",
                                 message=f"{count} GPU(s), one rank each" if count else "no GPU: CPU host, 1 rank"))
        elif count == 0:
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
        has_gpus.add(bool(count))
        if gpu_models:   # a GPU model nvidia-smi did not name is compared with nothing
            models[f.host.name] = ",".join(gpu_models)
    if len(has_gpus) > 1:
        found.append(Finding(check="accelerators", host=FLEET, severity="fail",
                             message="some hosts have GPUs and some do not",
                             fix="use only GPU hosts in one job (NCCL needs a GPU per rank)"))
    elif (diff := differs(models)):
        found += [Finding(check="accelerators", host=h, severity="fail",
                          message=f"GPU model {models[h]}, others have {diff[0]}",
                          fix="train on one GPU model (deepfleet train refuses mixed models: the slowest GPU "
                              "would set the pace and the smallest its memory)") for h in diff[1]]
    return found


def _torch_gpu_problem(f: HostFacts) -> str | None:
    """Why torch on a GPU host cannot run NCCL ranks, or None."""
    count = f.get("accelerators", "count", default=0)
    if f.get("accelerators", "torch_error"):
        return f"{count} GPU(s), but importing torch failed: {f.get('accelerators', 'torch_error')}"
    if f.get("accelerators", "cuda") is None and f.get("accelerators", "hip") is None:
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


ALL_CHECKS: list[Callable[[Collected], list[Finding]]] = [
    check_ssh, check_ssh_matrix, check_python, check_packages, check_accelerators, check_deepspeed_ops, check_workdir,
    check_output_dir, check_resources, check_clock_skew, check_interface, check_infiniband,
    check_master_port, check_reverse_dns, check_bandwidth, check_checksums]


def run_checks(collected: Collected) -> list[Finding]:
    return [finding for check in ALL_CHECKS for finding in check(collected)]
