"""Runs ON each host (sent over ssh stdin, stdlib only, Python >= 3.8): one JSON line of facts.

The head sends remote_probe_gpus.py, remote_probe_build.py, remote_probe_manifest.py and this file's
text, then `main(<params>)`,
to `python -`, so collecting everything about a host (versions, GPUs, what building DeepSpeed's ops
needs, dirs, interfaces, ssh to peers, the master port, bandwidth to the head) costs one ssh round trip.
Mode "listen" instead opens the master port and reports who connected. Nothing here imports torch
or deepspeed unless a GPU exists (then torch only).
"""

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

if __name__ != "__main__":   # imported (tests, the head); over ssh their text comes first on stdin
    from deepfleet.fleet.remote_probe_build import build_facts
    from deepfleet.fleet.remote_probe_gpus import accelerator_facts
    from deepfleet.fleet.remote_probe_manifest import path_summary

# The last two decide the attention kernel and whether QLoRA can run (planning reads them).
# deepfleet itself: its rank code runs on every host, so its version must match too.
PACKAGES = ("torch", "deepspeed", "transformers", "accelerate", "peft", "flash_attn", "bitsandbytes", "deepfleet",
            "wandb", "mlflow_skinny")


_LISTINGS = {}
REVERSE_LOOKUP_LIMIT = 3.0   # seconds; glibc's resolver gives up after 5 s x 2 attempts by default


def _installed_version(name):
    """(version, path entry, info dir) from a `<name>-<version>.dist-info` dir on sys.path, in import order.

    Reading the dir name costs a fraction of importlib.metadata (which parses METADATA with the
    email parser), and the probe's CPU time is what doctor's wall time scales with.
    """
    wanted = re.sub(r"[-_.]+", "_", name).lower()
    for entry in sys.path:
        if entry not in _LISTINGS:
            try:
                _LISTINGS[entry] = os.listdir(entry or ".")
            except OSError:
                _LISTINGS[entry] = []
        for item in _LISTINGS[entry]:
            if item.endswith((".dist-info", ".egg-info")):
                dist, _, version = item.rsplit(".", 1)[0].partition("-")
                # A `setup.py develop` egg-info has no version in its name: leave it to importlib.metadata.
                if version and re.sub(r"[-_.]+", "_", dist).lower() == wanted:
                    return version.split("-py")[0], os.path.abspath(entry or "."), os.path.join(entry or ".", item)
    return None, None, None


def _is_editable(direct_url_json):
    """PEP 610: an editable install's code lives outside site-packages by design."""
    try:
        return bool(json.loads(direct_url_json or "{}").get("dir_info", {}).get("editable"))
    except ValueError:
        return False


def package_facts(name):
    """Installed version (no import) and where `import name` would load it from."""
    import importlib.util
    fact = {"version": None, "origin": None, "dist_path": None, "editable": False}
    fact["version"], fact["dist_path"], info_dir = _installed_version(name)
    if info_dir:
        try:
            with open(os.path.join(info_dir, "direct_url.json")) as handle:
                fact["editable"] = _is_editable(handle.read())
        except OSError:
            pass
    if fact["version"] is None:
        try:
            import importlib.metadata as metadata
            dist = metadata.distribution(name)
            fact["version"], fact["dist_path"] = dist.version, str(dist.locate_file(""))
            fact["editable"] = _is_editable(dist.read_text("direct_url.json"))
        except Exception:
            pass
    try:
        spec = importlib.util.find_spec(name)
        fact["origin"] = spec.origin if spec else None
    except Exception:
        pass
    return fact


def interface_facts():
    try:
        out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, timeout=5).stdout
        entries = json.loads(out)
    except Exception:
        return None   # unknown (no iproute2, or one without -j), not "no addresses"
    interfaces = []
    for entry in entries:
        for addr in entry.get("addr_info", []):
            if addr.get("family") == "inet":
                interfaces.append({"name": entry.get("ifname"), "address": addr.get("local"),
                                   "prefix": addr.get("prefixlen"), "up": _link_up(entry)})
    return interfaces


def _link_up(entry):
    """A bridge with nothing attached (docker0, virbr0) has the UP flag but no carrier."""
    flags = entry.get("flags", [])
    return "UP" in flags and "NO-CARRIER" not in flags and entry.get("operstate") != "DOWN"


def infiniband_facts():
    base = "/sys/class/infiniband"
    devices = []
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        ports_dir = os.path.join(base, name, "ports")
        for port in sorted(os.listdir(ports_dir)) if os.path.isdir(ports_dir) else []:
            def read(leaf):
                try:
                    with open(os.path.join(ports_dir, port, leaf)) as handle:
                        return handle.read().strip()
                except OSError:
                    return None
            devices.append({"device": name, "port": port, "state": read("state"), "link_layer": read("link_layer")})
    return devices


def dir_facts(path):
    if not path:
        return None
    facts = {"path": path, "exists": os.path.isdir(path), "writable": os.access(path, os.W_OK)}
    if facts["exists"]:
        usage = shutil.disk_usage(path)
        facts["free_bytes"], facts["total_bytes"] = usage.free, usage.total
        facts["fs_type"] = mount_type(path)
    return facts


def mount_type(path):
    best, kind = "", None
    try:
        with open("/proc/mounts") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) > 2 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def memory_available_bytes():
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def ssh_hop(argv, timeout):
    started = time.monotonic()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        code, err = done.returncode, done.stderr
    except subprocess.TimeoutExpired:
        code, err = None, "timed out"
    except OSError as exc:
        code, err = 127, str(exc)
    return {"returncode": code, "stderr": err.strip()[-400:], "seconds": round(time.monotonic() - started, 3)}


def run_hops(hops, timeout, parallel):
    """ssh to every peer, at most `parallel` at once, in the order given."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        done = pool.map(lambda argv: ssh_hop(argv, timeout), hops.values())
        return dict(zip(hops, done))


def connect_master(address, port, deadline):
    """Connect to the master port, retrying while the listener starts, until the deadline."""
    started, error = time.monotonic(), None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                return {"ok": True, "seconds": round(time.monotonic() - started, 3)}
        except socket.timeout:
            error = "timed out (packets dropped: firewall?)"
        except OSError as exc:
            error = exc.strerror or str(exc)
            time.sleep(0.1)
    return {"ok": False, "error": error or "deadline passed", "seconds": round(time.monotonic() - started, 3)}


def iperf3_test(address, port, seconds):
    """iperf3 client against the head's one-off server; None when iperf3 is missing or fails."""
    if not port or not shutil.which("iperf3"):
        return None
    argv = ["iperf3", "-c", address, "-p", str(port), "-t", str(max(1, round(seconds))), "-J"]
    try:
        report = json.loads(subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 15).stdout)
        total = report["end"]["sum_received"]
        return {"tool": "iperf3", "bytes": int(total["bytes"]), "seconds": round(total["seconds"], 4),
                "gbit_s": round(total["bits_per_second"] / 1e9, 3)}
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        return None


def send_bandwidth(address, port, name, seconds, max_bytes, go_timeout, iperf3_port=None):
    """Say hello, wait for the head's "g" (all hosts start together), then run iperf3 when both
    sides have it, else send for `seconds` (at most max_bytes) and read back the head's count."""
    block, sent = b"\0" * (1 << 20), 0
    try:
        with socket.create_connection((address, port), timeout=3) as conn:
            conn.sendall((name + "\n").encode())
            conn.settimeout(go_timeout)
            if conn.recv(1) != b"g":
                return {"error": "the head did not start the test"}
            measured = iperf3_test(address, iperf3_port, seconds)
            if measured:
                return measured
            conn.settimeout(10)
            started = time.monotonic()
            while sent < max_bytes and time.monotonic() - started < seconds:
                conn.sendall(block)
                sent += len(block)
            conn.shutdown(socket.SHUT_WR)
            received = int(conn.recv(64).decode() or 0)
            elapsed = time.monotonic() - started
        return {"tool": "builtin", "bytes": received, "seconds": round(elapsed, 4),
                "gbit_s": round(received * 8 / elapsed / 1e9, 3)}
    except (OSError, ValueError) as exc:
        return {"error": getattr(exc, "strerror", None) or str(exc)}


def in_thread(results, key, function, *args):
    """Start function(*args) in a daemon thread that stores its return value in results[key]."""
    def run():
        results[key] = function(*args)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def start_master_connect(params, results):
    """The master port connect, in a thread; [] when there is no master to reach."""
    if not params.get("master"):
        return []
    deadline = time.monotonic() + params.get("network_seconds", 6)
    return [in_thread(results, "master", connect_master, params["master"][0], params["master"][1], deadline)]


def network_facts(params, results, threads):
    """ssh to peers (beside the master connect already in `threads`); then the bandwidth test, which
    waits for the head's go so that every host's window is the same and overlaps no other work."""
    hop_timeout, network_seconds = params.get("hop_timeout", 8), params.get("network_seconds", 6)
    if params.get("hops"):
        threads.append(in_thread(results, "hops", run_hops, params["hops"], hop_timeout, params.get("hop_parallel", 8)))
    waves = -(-len(params.get("hops", {})) // params.get("hop_parallel", 8))
    joined_by = time.monotonic() + max(hop_timeout * max(1, waves), network_seconds) + 2
    for thread in threads:
        thread.join(max(0.0, joined_by - time.monotonic()))
    if params.get("bandwidth"):
        address, port, name, iperf3_port = params["bandwidth"]
        results["bandwidth"] = send_bandwidth(address, port, name, params.get("bandwidth_seconds", 0.5), 256 << 20,
                                              params.get("bandwidth_go_timeout", 20), iperf3_port)
    return {"hops": results.get("hops", {}), "master": results.get("master"), "bandwidth": results.get("bandwidth")}


def facts(params):
    started = time.time()
    # Connect to the master port now, beside the slow facts (nvidia-smi, torch, checksums): the
    # master's listener opens when its own probe starts and closes network_seconds later.
    network = {}
    network_threads = start_master_connect(params, network)
    listener, accepting, stop = None, None, threading.Event()
    if params.get("listen"):   # this host is the master: its port is open while the others probe
        server, listener = open_master_port(params["listen"])
        if server:
            accepting = threading.Thread(target=accept_peers, daemon=True, args=(
                server, listener, params["listen"]["expect"], params["listen"]["seconds"], stop))
            accepting.start()
    packages = {name: package_facts(name) for name in PACKAGES}
    result = {
        "hostname": socket.gethostname(), "time_start": started,
        "python": {"executable": sys.executable, "version": platform.python_version(),
                   "wanted": params.get("python"),
                   "wanted_found": bool(params.get("python")) and os.access(params["python"], os.X_OK)},
        "packages": packages, "accelerators": accelerator_facts(),
        "build": build_facts(packages["deepspeed"]["origin"]),
        "workdir": dir_facts(params.get("workdir")),
        "output_dir": dir_facts(params.get("output_dir")),
        "share_token_seen": None, "memory_available_bytes": memory_available_bytes(),
        "cpu_count": os.cpu_count(), "interfaces": interface_facts(), "infiniband": infiniband_facts(),
        "iperf3": shutil.which("iperf3") is not None,
        "checksums": {path: path_summary(path, params.get("checksum_limit", 1 << 34))
                      for path in params.get("checksum", [])},
    }
    token = params.get("share_token")
    if token and params.get("output_dir"):
        try:
            with open(os.path.join(params["output_dir"], token[0])) as handle:
                result["share_token_seen"] = handle.read().strip() == token[1]
        except OSError:
            result["share_token_seen"] = False
    result["network"] = network_facts(params, network, network_threads)
    if accepting:
        # Past the bandwidth barrier every other host has finished its connect attempts.
        if params.get("bandwidth") and "error" not in (result["network"]["bandwidth"] or {}):
            stop.set()
        accepting.join(params["listen"]["seconds"] + REVERSE_LOOKUP_LIMIT + 1)
    result["listener"] = listener
    result["torch_imported"] = "torch" in sys.modules    # only with an NVIDIA device: it costs seconds
    result["time_end"] = time.time()
    return result


def open_master_port(params):
    """Bind the master port now (before facts are collected) -> (socket or None, report)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as torch's TCPStore does
    try:
        server.bind((params.get("address", "0.0.0.0"), params["port"]))
        server.listen(128)
    except OSError as exc:
        server.close()
        return None, {"ready": False, "error": exc.strerror or str(exc)}
    return server, {"ready": True, "peers": []}


def reverse_lookup_seconds(address):
    """Seconds to look up the name of `address`, as torch's TCPStore does for each client that connects."""
    started = time.monotonic()
    try:
        socket.getnameinfo((address, 0), socket.NI_NAMEREQD)
    except OSError:
        pass   # no name is fine; only the wait matters
    return round(time.monotonic() - started, 2)


def accept_peers(server, report, expect, seconds, stop=None):
    """Accept until `expect` peers connected, `seconds` passed or `stop` is set; record peers and how
    long each one's reverse lookup took (None: not done after REVERSE_LOOKUP_LIMIT seconds)."""
    deadline = time.monotonic() + seconds
    lookups, lookup_threads = {}, {}
    while len(report["peers"]) < expect and time.monotonic() < deadline and not (stop and stop.is_set()):
        server.settimeout(max(0.05, min(0.2, deadline - time.monotonic())))
        try:
            conn, peer = server.accept()
            report["peers"].append(peer[0])
            conn.close()
            if peer[0] not in lookup_threads:
                lookup_threads[peer[0]] = (time.monotonic(), in_thread(lookups, peer[0], reverse_lookup_seconds,
                                                                       peer[0]))
        except socket.timeout:
            continue
        except OSError:
            break
    server.close()
    for started, thread in lookup_threads.values():
        thread.join(max(0.0, started + REVERSE_LOOKUP_LIMIT - time.monotonic()))
    report["reverse_lookup"] = {address: lookups.get(address) for address in lookup_threads}


def listen(params):
    server, report = open_master_port(params)
    print(json.dumps({"ready": report["ready"], "error": report.get("error")}), flush=True)
    if server:
        accept_peers(server, report, params.get("expect", 1), params.get("seconds", 6))
    print(json.dumps(report), flush=True)


def main(params):
    if params.get("mode") == "listen":
        listen(params)
    elif params.get("mode") == "hops":
        results = {}
        print(json.dumps(network_facts(params, results, start_master_connect(params, results))), flush=True)
    else:
        print(json.dumps(facts(params)), flush=True)
