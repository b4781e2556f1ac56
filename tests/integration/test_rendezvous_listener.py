"""The rendezvous store listens on the master address only, on the port it was given or, for
--master-port=0, on a free one that every rank is told: the host agent's own (supervised jobs) and
bound_torchrun's (the scripts a user runs by hand)."""

import json
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


# A real process group through the agent's store: every rank all-reduces its rank.
ALL_REDUCE = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(total)
    sys.stdout.write(f"rank {dist.get_rank()}/{dist.get_world_size()} local {os.environ['LOCAL_RANK']} sum {total.item():g}\\n")
    dist.destroy_process_group()
""")


def run_agent(tmp_path, script: str, *, nproc: int, port: int = 0) -> tuple[int, list[str], list[dict]]:
    """The host agent alone on this machine; (exit code, rank output lines, events)."""
    (tmp_path / "rank.py").write_text(script)
    agent = subprocess.Popen([sys.executable, "-m", "deepfleet.launch.host_agent", "--job-id=df-test.0",
                              f"--cwd={tmp_path}", "--lifeline-timeout=120", f"--nproc={nproc}",
                              "--master-addr=127.0.0.1", f"--master-port={port}", "--", sys.executable,
                              str(tmp_path / "rank.py")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    agent.stdin.write(json.dumps({"env": {"OMP_NUM_THREADS": "1"}}) + "\n")
    agent.stdin.flush()
    out = agent.stdout.read()   # the agent keeps stdin open: EOF on it would be the head's teardown
    code = agent.wait(timeout=120)
    events = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("@@deepfleet ")]
    return code, [line for line in out.splitlines() if not line.startswith("@@deepfleet ")], events


def test_the_agents_store_listens_on_the_master_address_only(tmp_path):
    code, lines, _ = run_agent(tmp_path, RANK, nproc=2)
    assert code == 0, lines
    assert sorted(lines) == ["[0]:rank 0 listening 0100007F", "[1]:rank 1 listening 0100007F"], lines


def test_ranks_form_a_process_group_through_the_agents_store(tmp_path):
    code, lines, events = run_agent(tmp_path, ALL_REDUCE, nproc=2)
    assert code == 0, lines
    assert sorted(lines) == ["[0]:rank 0/2 local 0 sum 1", "[1]:rank 1/2 local 1 sum 1"], lines
    assert events[-1] == {"event": "exit", "code": 0, "reason": "", "rank": None}


def test_the_first_failed_rank_stops_the_others_and_is_named(tmp_path):
    script = "import os, sys, time\nif os.environ['RANK'] == '1': sys.exit(3)\ntime.sleep(300)\n"
    code, _, events = run_agent(tmp_path, script, nproc=2)
    assert code == 3 and events[-1]["rank"] == 1 and events[-1]["code"] == 3


def test_a_busy_master_port_is_the_agents_one_exit_reason(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        code, _, events = run_agent(tmp_path, RANK, nproc=1, port=busy.getsockname()[1])
    assert code == 127 and "cannot listen for the rendezvous on 127.0.0.1:" in events[-1]["reason"]


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
