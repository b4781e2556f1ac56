"""torchrun whose rendezvous store listens on the master's address only, not on every interface: for
the scripts a user runs by hand (`launch --backend slurm|manual`); supervised jobs do not use torchrun.

With `--master-addr/--master-port` (static rendezvous), node 0's torchrun hosts a TCPStore that
binds the wildcard address: torch has no option for the listen address. This entry point first
creates that server itself, on a socket bound to the master address, with `multi_tenant=True`;
torchrun's own `TCPStore(master_addr, master_port, ..., multi_tenant=True)` in the same process
then reuses it instead of opening a second listener. Workers use the agent's store (static
rendezvous shares it), so nothing else listens for the rendezvous.

`--master-port=0` binds a free port first and hands torchrun the port it got, so a single-machine
run has no window between choosing a port and listening on it.

    python -m deepfleet.launch.bound_torchrun [torchrun arguments]
"""

from __future__ import annotations

import sys
from datetime import timedelta

from torch.distributed import TCPStore
from torch.distributed.run import get_args_parser
from torch.distributed.run import main as torchrun_main

from deepfleet.fleet.inventory import is_ip_address
from deepfleet.launch.host_ranks import bind_listener


def hosts_rendezvous(argv: list[str]) -> tuple[str, int] | None:
    """(address, port) when this torchrun hosts a static rendezvous at an IP literal, else None.

    A host name is left to torchrun: it may resolve differently on the master (127.0.1.1 on Debian)
    than on the other hosts, and binding there would shut them out.
    """
    args, _ = get_args_parser().parse_known_args(argv)
    if args.standalone or args.rdzv_backend != "static" or args.node_rank != 0 or not is_ip_address(args.master_addr):
        return None
    return args.master_addr, args.master_port


def with_master_port(argv: list[str], port: int) -> list[str]:
    """argv with torchrun's own --master-port set to `port` (the training command's arguments untouched)."""
    args, _ = get_args_parser().parse_known_args(argv)
    split = len(argv) - 1 - len(args.training_script_args)
    values, kept = iter(argv[:split]), []
    for arg in values:
        if arg in ("--master-port", "--master_port"):
            next(values, None)
        elif not arg.startswith(("--master-port=", "--master_port=")):
            kept.append(arg)
    return [*kept, f"--master-port={port}", *argv[split:]]


def main(argv: list[str]) -> None:
    target = hosts_rendezvous(argv)
    if target is None:
        torchrun_main(argv)
        return
    try:
        listener = bind_listener(*target)
    except OSError as exc:
        sys.exit(f"error: {target[0]}:{target[1]}: cannot listen for the rendezvous: {exc.strerror} "
                 "(fix: free the port or choose another master_port)")
    port = listener.getsockname()[1]
    # Held for the life of torchrun; torchrun's static rendezvous reuses it by port.
    store = TCPStore(target[0], port, is_master=True, wait_for_workers=False, multi_tenant=True,  # noqa: F841
                     timeout=timedelta(seconds=60), master_listen_fd=listener.fileno())
    torchrun_main(argv if port == target[1] else with_master_port(argv, port))


if __name__ == "__main__":
    main(sys.argv[1:])
