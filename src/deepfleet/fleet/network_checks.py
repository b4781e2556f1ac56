"""Doctor's network checks: the shared interface, InfiniBand, the master port and bandwidth."""

from __future__ import annotations

from deepfleet.fleet.findings import FLEET, Collected, Finding
from deepfleet.fleet.network import choose_fabric
from deepfleet.fleet.remote_probe import REVERSE_LOOKUP_LIMIT

SLOW_LOOKUP_SECONDS = 1.0


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
    mixed_fix = ("fix the HCA; until then deepfleet sets NCCL_IB_DISABLE=1 on every host at launch "
                 "(NCCL over TCP sockets)")
    active = {h: [d for d in devices[h] if "ACTIVE" in str(d.get("state"))] for h in with_ib}
    found = [Finding(check="infiniband", host=h, severity="fail", message="no InfiniBand device, others have one",
                     fix=mixed_fix) for h in sorted(set(devices) - set(with_ib))]
    found += [Finding(check="infiniband", host=h, severity="fail",
                      message=f"no InfiniBand port is ACTIVE ({', '.join(d['device'] + '/' + str(d['port']) for d in devices[h])})",
                      fix="check the cable and subnet manager (`ibstat`); " + mixed_fix) for h in with_ib if not active[h]]
    fabric = choose_fabric(devices)
    if fabric.env:
        found.append(Finding(check="infiniband", host=FLEET, severity="ok",
                             message=f"{fabric.note} (set at launch; `infiniband: off` in fleet.yaml to leave NCCL alone)"))
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


def check_reverse_dns(c: Collected) -> list[Finding]:
    """torch.distributed's TCPStore looks up the name of every process that connects to it, one at a
    time; a resolver that does not answer stalls each start by its timeout (10 s by default)."""
    lookups = (c.listener or {}).get("reverse_lookup") or {}
    if not lookups:
        return []
    master = c.fleet.master.name
    slow = {address: seconds for address, seconds in lookups.items() if seconds is None or seconds >= SLOW_LOOKUP_SECONDS}
    if not slow:
        return [Finding(check="reverse-dns", host=master, severity="ok",
                        message=f"{master} looks up every host's name at once")]
    took = ", ".join(f"{address} {'over %g' % REVERSE_LOOKUP_LIMIT if s is None else '%.1f' % s} s"
                     for address, s in sorted(slow.items()))
    return [Finding(check="reverse-dns", host=master, severity="warn",
                    message=f"looking up the name of a connecting host takes long on {master} ({took}): the "
                            "rendezvous store does that for every process that connects, and waits each time",
                    fix=f"list every host's address and name in /etc/hosts on {master}, or fix the DNS server "
                        "in its /etc/resolv.conf")]


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
