"""bound_torchrun: the rendezvous store listens on the master address only, on the port it was given
or, for --master-port=0, on a free one that every rank is told."""

import socket
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

# Each rank prints the local addresses listening on MASTER_PORT, from its own network namespace.
RANK = textwrap.dedent("""
    import os, sys
    port = int(os.environ["MASTER_PORT"])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in open(table).read().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                found.append(local.split(":")[0])
    sys.stdout.write(f"rank {os.environ['RANK']} listening {','.join(sorted(found))}\\n")   # one write: ranks interleave
""")


def run_torchrun(module: str, tmp_path, port: int) -> subprocess.CompletedProcess:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    return subprocess.run([sys.executable, "-m", module, "--nnodes=1", "--node-rank=0", "--nproc-per-node=2",
                           "--master-addr=127.0.0.1", f"--master-port={port}", "--no-python",
                           sys.executable, str(script)], capture_output=True, text=True, timeout=120)


def test_rendezvous_listens_on_the_master_address_only(tmp_path):
    done = run_torchrun("deepfleet.launch.bound_torchrun", tmp_path, 0)
    assert done.returncode == 0, done.stderr
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    assert lines == ["rank 0 listening 0100007F", "rank 1 listening 0100007F"], done.stdout


def test_stock_torchrun_listens_on_every_interface(tmp_path):
    """The behaviour bound_torchrun exists for: if torch ever binds the master address itself, this fails."""
    done = run_torchrun("torch.distributed.run", tmp_path, 29731)
    assert done.returncode == 0, done.stderr
    assert "0100007F" not in done.stdout and "listening 000000" in done.stdout


def test_a_busy_master_port_is_one_error_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        done = run_torchrun("deepfleet.launch.bound_torchrun", tmp_path, busy.getsockname()[1])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: 127.0.0.1:") and "cannot listen for the rendezvous" in done.stderr
