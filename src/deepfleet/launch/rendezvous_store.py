"""The job's rendezvous store, on node 0: `python -m deepfleet.launch.rendezvous_store --listen-fd N ...`.

The host agent binds the listening socket (on the master address only, see host_ranks.py) and
passes it here; this process serves torch's TCPStore on it until its stdin closes (the agent's
ranks have ended) or it is signalled. Every rank connects as a client (TORCHELASTIC_USE_AGENT_STORE).
"""

from __future__ import annotations

import argparse
import signal
import sys
from datetime import timedelta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepfleet.launch.rendezvous_store")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from torch.distributed import TCPStore

    store = TCPStore(args.host, args.port, is_master=True, wait_for_workers=False,  # noqa: F841 (held until exit)
                     timeout=timedelta(seconds=60), master_listen_fd=args.listen_fd)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
