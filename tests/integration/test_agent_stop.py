"""Host agent stops and supervisor output handling, with stand-in ranks (fast)."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from deepfleet.launch.commands import new_job_id
from deepfleet.launch.host_agent import job_pids
from deepfleet.launch.host_ranks import shell_exit_code
from deepfleet.launch.supervisor import HostProcess, Supervisor, SupervisorOptions

pytestmark = pytest.mark.integration

# A rank that takes SAVE_SECONDS to "checkpoint" after SIGTERM, then writes `saved`, and `store-up`
# when the rendezvous store still answers then (ranks may need it until they have saved).
RANK = textwrap.dedent("""
    import os, signal, socket, sys, time
    def save(*_):
        time.sleep(float(os.environ["SAVE_SECONDS"]))
        open("saved", "w").close()
        try:
            socket.create_connection(("127.0.0.1", int(os.environ["MASTER_PORT"])), timeout=5).close()
            open("store-up", "w").close()
        except OSError:
            pass
        sys.exit(0)
    signal.signal(signal.SIGTERM, save)
    open("rank-up", "w").close()
    time.sleep(600)
""")


def start_agent(tmp_path, env, grace=30):
    (tmp_path / "rank.py").write_text(RANK)
    job_id = new_job_id() + ".0"
    agent = subprocess.Popen([sys.executable, "-m", "deepfleet.launch.host_agent", f"--job-id={job_id}",
                              f"--cwd={tmp_path}", f"--grace={grace}", "--lifeline-timeout=60", "--",
                              sys.executable, str(tmp_path / "rank.py")],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    agent.stdin.write('{"env": %s}\n' % str(env).replace("'", '"'))
    agent.stdin.flush()
    return agent, job_id


def wait_for(predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.1)
    return predicate()


def test_term_gives_the_ranks_their_grace_with_the_rendezvous_store_still_up(tmp_path):
    agent, job_id = start_agent(tmp_path, {"SAVE_SECONDS": "3"})
    assert wait_for(lambda: (tmp_path / "rank-up").exists(), 20)
    agent.stdin.write("term\n")
    agent.stdin.flush()
    asked = time.monotonic()
    agent.wait(timeout=40)
    assert (tmp_path / "saved").exists() and (tmp_path / "store-up").exists()
    assert time.monotonic() - asked < 20, "the agent waited out its 30 s grace after the ranks had ended"
    assert job_pids(job_id) == [], "the store must not outlive its agent"


def test_sigterm_to_the_agent_gives_the_ranks_their_grace_to_checkpoint(tmp_path):
    agent, job_id = start_agent(tmp_path, {"SAVE_SECONDS": "5"})
    assert wait_for(lambda: (tmp_path / "rank-up").exists(), 20)
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=40)
    assert (tmp_path / "saved").exists(), "the rank was killed mid-save"
    assert job_pids(job_id) == []


def supervise(tmp_path, script: str):
    host = HostProcess(label="node0", argv=[sys.executable, "-c", script], env={})
    supervisor = Supervisor([host], SupervisorOptions(log_dir=tmp_path / "logs"), write=lambda line: None)
    return asyncio.run(supervisor.run())


def test_a_line_over_the_reader_limit_does_not_stop_the_log(tmp_path):
    outcome = supervise(tmp_path, "print('x' * (3 << 20)); print('[0]:after the long line')")
    assert outcome.exit_code == 0 and outcome.failure is None
    assert "[0]:after the long line" in (tmp_path / "logs" / "node0.log").read_text()


def test_rank_bad_input_lines_make_the_job_exit_2(tmp_path):
    outcome = supervise(tmp_path, "import sys; print('[1]:error: train.lr: not a number (fix: use 1e-4)'); sys.exit(1)")
    assert outcome.exit_code == 2 and outcome.bad_input == ["error: train.lr: not a number (fix: use 1e-4)"]


def test_killed_by_signal_is_reported_as_128_plus_the_signal():
    assert shell_exit_code(-signal.SIGKILL) == 137 and shell_exit_code(3) == 3


def test_a_blocked_console_does_not_fail_the_job(tmp_path):
    """Writing to the console must not stall the event loop (Ctrl-S, a stalled terminal)."""
    script = "import time\nfor i in range(8):\n    print(f'[0]:step {i}', flush=True); time.sleep(0.5)"
    host = HostProcess(label="node0", argv=[sys.executable, "-c", script], env={})
    supervisor = Supervisor([host], SupervisorOptions(log_dir=tmp_path / "logs", link_timeout=2),
                            write=lambda line: time.sleep(4))
    outcome = asyncio.run(supervisor.run())
    assert outcome.exit_code == 0 and outcome.failure is None
