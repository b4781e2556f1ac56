"""The `slurm_cluster` fixture is a real SLURM: slurmctld on the head, one slurmd per namespace host.

Jobs run inside their node's network and UTS namespace (they see the node's address and hostname);
the filesystem is shared, like NFS. Client commands run from the head with `slurm.env`.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

DEEPFLEET = str(Path(sys.executable).with_name("deepfleet"))

# Prints "<hostname> <address>": the address this process's namespace uses towards the head.
WHERE_AM_I = ("import socket, os; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
              "s.connect((os.environ['HEAD'], 9)); print(socket.gethostname(), s.getsockname()[0], "
              "os.environ['SLURMD_NODENAME'], os.environ['SLURM_PROCID'])")


@pytest.fixture
def workdir(slurm_cluster) -> Path:
    path = slurm_cluster.root / "tmp" / secrets.token_hex(4)
    path.mkdir(parents=True)
    return path


def _wait_for_file(path: Path, predicate, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if predicate(text):
            return text
        time.sleep(0.1)
    raise TimeoutError(f"{path}: {text!r} after {timeout}s")


def test_nodes_register_idle_at_their_namespace_addresses(slurm_cluster):
    states = slurm_cluster.node_states()
    assert states == {n.name: "idle" for n in slurm_cluster.nodes}
    for node in slurm_cluster.nodes:
        shown = slurm_cluster.run(["scontrol", "show", "node", "-o", node.name], check=True).stdout
        assert f"NodeAddr={node.address} " in shown
        assert "Gres=(null)" in shown
    # The underlying namespace cluster is still there for ssh-based tests.
    assert [h.name for h in slurm_cluster.cluster.hosts] == slurm_cluster.node_names


def test_srun_runs_one_task_on_each_node_in_its_namespace(slurm_cluster):
    n = len(slurm_cluster.nodes)
    done = slurm_cluster.run(["srun", f"-N{n}", f"-n{n}", "--label", sys.executable, "-c", WHERE_AM_I],
                             env={"HEAD": slurm_cluster.cluster.bridge_address}, check=True, timeout=60)
    rows = sorted(line.split(": ", 1)[1].split() for line in done.stdout.splitlines())
    assert len(rows) == n
    assert {(host, address) for host, address, _, _ in rows} == {(x.name, x.address) for x in slurm_cluster.nodes}
    assert all(host == nodename for host, _, nodename, _ in rows)
    assert sorted(int(rank) for *_, rank in rows) == list(range(n))


def test_sbatch_wrap_runs_and_writes_its_output_file(slurm_cluster, workdir):
    out = workdir / "job-%j.out"
    job = slurm_cluster.sbatch("-N1", "-o", str(out), "--wrap", 'echo "hello from $SLURMD_NODENAME $(hostname)"')
    info = slurm_cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL"})
    assert info["JobState"] == "COMPLETED", info
    node = info["NodeList"]
    assert (workdir / f"job-{job}.out").read_text() == f"hello from {node} {node}\n"
    record = next(r for r in slurm_cluster.completed_jobs() if r.get("JobId") == str(job))
    assert record["JobState"] == "COMPLETED"


def test_scancel_ends_a_running_job(slurm_cluster, workdir):
    pid_file = workdir / "pid"
    job = slurm_cluster.sbatch("-N1", "-o", "/dev/null", "--wrap", f"echo $$ > {pid_file}; exec sleep 300")
    slurm_cluster.wait_job(job, "RUNNING")
    pid = int(_wait_for_file(pid_file, lambda t: t.strip().isdigit()).strip())   # one pid namespace
    assert Path(f"/proc/{pid}").exists()
    queued = slurm_cluster.run(["squeue", "-h", "-j", str(job), "-o", "%i %T"], check=True).stdout.split()
    assert queued == [str(job), "RUNNING"]

    slurm_cluster.run(["scancel", str(job)], check=True)
    info = slurm_cluster.wait_job(job, "CANCELLED", timeout=20)
    assert info["JobState"] == "CANCELLED"
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the job's process outlived scancel"
    assert slurm_cluster.run(["squeue", "-h", "-j", str(job), "-t", "all", "-o", "%T"]).stdout.split() in (
        [], ["CANCELLED"])
    record = next(r for r in slurm_cluster.completed_jobs() if r.get("JobId") == str(job))
    assert record["JobState"] == "CANCELLED"


def test_requeue_runs_the_job_again_with_a_higher_restart_count(slurm_cluster, workdir):
    log = workdir / "runs"
    job = slurm_cluster.sbatch("-N1", "--requeue", "-o", "/dev/null", "--wrap",
                               f'echo "${{SLURM_RESTART_COUNT:-0}}" >> {log}; exec sleep 300')
    slurm_cluster.wait_job(job, "RUNNING")
    _wait_for_file(log, lambda t: t.split() == ["0"])

    slurm_cluster.run(["scontrol", "requeue", str(job)], check=True)
    slurm_cluster.start_requeued(job)
    info = slurm_cluster.wait_job(job, "RUNNING", timeout=30)
    assert info["Restarts"] == "1"
    assert _wait_for_file(log, lambda t: len(t.split()) == 2).split() == ["0", "1"]
    slurm_cluster.run(["scancel", str(job)], check=True)
    slurm_cluster.wait_job(job, "CANCELLED")


def test_salloc_gives_an_allocation_that_srun_uses(slurm_cluster):
    n = len(slurm_cluster.nodes)
    done = slurm_cluster.run(["salloc", f"-N{n}", "srun", "--label", "hostname"], check=True, timeout=60)
    hosts = sorted(line.split(": ", 1)[1] for line in done.stdout.splitlines() if ": " in line)
    assert hosts == sorted(slurm_cluster.node_names)
    assert "Granted job allocation" in done.stderr


def test_session_files_and_ports_are_private(slurm_cluster):
    conf = slurm_cluster.conf.read_text()
    assert str(slurm_cluster.root) in conf
    assert f"SlurmctldPort={slurm_cluster.ctld_port}\n" in conf and slurm_cluster.ctld_port != 6817
    assert slurm_cluster.env["SLURM_CONF"] == str(slurm_cluster.conf)
    assert not any(k.startswith("SLURM_") and k != "SLURM_CONF" for k in slurm_cluster.env)
    assert os.environ.get("SLURM_CONF") != str(slurm_cluster.conf)


STEPS = 60   # ~0.05 s each: long enough that SIGTERM lands mid-run


def _training_recipe(workdir: Path, output: str) -> Path:
    sys.path.insert(0, str(Path(__file__).parent.parent / "integration"))
    from training_fixtures import write_recipe, write_task_data

    train, _ = write_task_data(workdir / "data", n_train=160, n_validation=4)
    return write_recipe(workdir / f"{output}.yaml", model="builtin:tiny", method="full",
                        data={"train": [str(train)], "max_length": 64},
                        train={"max_steps": STEPS, "global_batch": 4, "micro_batch": 2, "warmup": 1, "seed": 3},
                        deepspeed={"zero": 2}, logging={"tensorboard": False}, env={"OMP_NUM_THREADS": "1"},
                        checkpoint={"every_steps": 5}, output_dir=str(workdir / output))


def _train_records(output: Path) -> list[dict]:
    lines = (output / "metrics.jsonl").read_text().splitlines() if (output / "metrics.jsonl").exists() else []
    return [json.loads(line) for line in lines if '"kind": "train"' in line]


def test_train_in_salloc_then_a_preempted_and_requeued_slurm_job_ends_at_the_same_loss(slurm_cluster, workdir):
    """`deepfleet train` under salloc reaches the nodes as srun steps (their names resolve only inside
    the nodes, so ssh from the head could not); `train --slurm` of the same recipe, sent SIGTERM mid-run,
    checkpoints and exits 75; requeued, it resumes and ends at the uninterrupted run's loss."""
    n = len(slurm_cluster.nodes)
    reference = _training_recipe(workdir, "reference")
    done = slurm_cluster.run(["salloc", f"-N{n}", DEEPFLEET, "train", str(reference)], timeout=400, cwd=workdir)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    logs = sorted(path.name for path in (workdir / "reference" / "logs" / "attempt-0").glob("*.log"))
    assert logs == sorted(f"{name}.log" for name in slurm_cluster.node_names)
    expected = _train_records(workdir / "reference")[-1]
    assert expected["step"] == STEPS

    recipe = _training_recipe(workdir, "preempted")
    output = workdir / "preempted"
    head = subprocess.Popen([DEEPFLEET, "train", str(recipe), "--slurm", f"--nodes={n}", "--time=15"],
                            cwd=workdir, env=slurm_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 300
    while not any(r["step"] >= 3 for r in _train_records(output)):
        assert head.poll() is None and time.monotonic() < deadline, head.communicate()[0][-3000:]
        time.sleep(0.2)
    job = int(next(path.stem.split("-")[1] for path in (output / "slurm").glob("job-*.log")))
    slurm_cluster.run(["scancel", "--signal=TERM", "--batch", str(job)], check=True)
    out, _ = head.communicate(timeout=300)
    assert head.returncode == 75, out[-3000:]
    assert f"submitted job {job}" in out and "stopped by signal after step" in out
    assert f"`scontrol requeue {job}` resumes it" in out
    slurm_cluster.run(["scontrol", "requeue", str(job)], check=True)
    slurm_cluster.start_requeued(job)
    resumed = subprocess.run([DEEPFLEET, "logs", str(job), "--follow"], cwd=workdir, env=slurm_cluster.env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert f"# job {job} COMPLETED" in resumed.stdout and "resuming from" in resumed.stdout
    final = _train_records(output)[-1]
    assert final["step"] == STEPS and abs(final["loss"] - expected["loss"]) <= 1e-5, (final, expected)


def test_slurm_bad_input_is_one_line_and_cancel_stops_the_job(slurm_cluster, workdir):
    recipe = _training_recipe(workdir, "refused")

    def deepfleet(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([DEEPFLEET, *args], cwd=workdir, env=env or slurm_cluster.env, capture_output=True,
                              text=True, timeout=120)

    def one_line(done: subprocess.CompletedProcess, *parts: str) -> None:
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and all(p in lines[0] for p in parts), done.stderr

    one_line(deepfleet("train", str(recipe), "--slurm", "--partition=nope"),
             "error: --partition nope: Batch job submission failed: Invalid partition name specified", "sinfo -s")
    one_line(deepfleet("train", str(recipe), "--slurm", "--gpus-per-node=1"),
             "error: --gpus-per-node 1: the default partition has 0 GPU(s) per node")
    one_line(deepfleet("train", str(recipe), "--slurm", "--time=3"), "error: --time 3: 180 s leaves under")
    one_line(deepfleet("train", str(recipe), "--slurm", "--fleet=fleet.yaml"), "--fleet does not go with --slurm")
    no_slurm = {**slurm_cluster.env, "PATH": str(Path(sys.executable).parent)}   # /bin is /usr/bin on Debian
    one_line(deepfleet("train", str(recipe), "--slurm", env=no_slurm), "sbatch not found on PATH")
    assert not (workdir / "refused").exists(), "a refused submission left its output dir behind"

    long_run = _training_recipe(workdir, "cancelled")
    submitted = deepfleet("train", str(long_run), "train.max_steps=100000", "--slurm", "--nodes=2", "--detach")
    assert submitted.returncode == 0, submitted.stderr
    job = int(submitted.stdout.split("submitted job ")[1].split()[0])
    deadline = time.monotonic() + 120
    while not all(slurm_cluster.cluster.pids_running(node, b"deepfleet.launch.host_agent")
                  for node in slurm_cluster.node_names):   # an agent on every node
        assert time.monotonic() < deadline, slurm_cluster.job(job)
        time.sleep(0.2)
    status = deepfleet("status")
    assert status.returncode == 0 and str(job) in status.stdout and "RUNNING" in status.stdout
    cancelled = deepfleet("cancel", str(job))
    assert cancelled.returncode == 0 and f"cancelled job {job}" in cancelled.stdout
    state = slurm_cluster.wait_job(job, {"CANCELLED"}, timeout=60)
    assert state["JobState"] == "CANCELLED"
    deadline = time.monotonic() + 30
    while any(slurm_cluster.cluster.pids_running(node, b"deepfleet") for node in slurm_cluster.node_names):
        assert time.monotonic() < deadline, "a process of the cancelled job survived on a node"
        time.sleep(0.2)



def test_a_node_killed_mid_job_is_torn_down_and_the_same_command_resumes(slurm_cluster, workdir):
    """The last node dies after a checkpoint (link silent, every process SIGKILLed): within a minute
    the job is over (deepfleet's teardown after --hang-timeout: FAILED, naming the node; or SLURM's
    own after SlurmdTimeout: requeued, then cancelled here), nothing is left on the survivor, and
    once the node is back the same command resumes to the end.
    (A new job, not `scontrol requeue`: slurmctld may still deliver the dead node's pending kill of
    the old job id to a requeued job's step there.)"""
    n = len(slurm_cluster.nodes)
    output = workdir / "nodekill"
    command = [DEEPFLEET, "train", str(_training_recipe(workdir, "nodekill")), "--slurm", f"--nodes={n}",
               "--hang-timeout=10"]
    head = subprocess.Popen(command, cwd=workdir, env=slurm_cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not any(r["step"] >= 7 for r in _train_records(output)):    # past the step-5 checkpoint
        assert head.poll() is None and time.monotonic() < deadline, head.communicate()[0][-3000:]
        time.sleep(0.2)
    job = int(next(path.stem.split("-")[1] for path in (output / "slurm").glob("job-*.log")))
    victim, survivor = slurm_cluster.node_names[-1], slurm_cluster.node_names[0]
    killed = time.monotonic()
    slurm_cluster.kill_node(victim)
    try:
        # deepfleet tears the training down after --hang-timeout and the job ends FAILED; if slurmctld
        # marks the node down first (SlurmdTimeout), it kills and requeues the job itself (NODE_FAIL).
        while slurm_cluster.job(job).get("JobState") in ("RUNNING", "COMPLETING"):
            assert time.monotonic() - killed < 60, "the job still runs 60 s after its node died"
            time.sleep(0.5)
        state = slurm_cluster.job(job)["JobState"]
        while slurm_cluster.cluster.pids_running(survivor, b"deepfleet"):
            assert time.monotonic() - killed < 90, "training left running on the survivor"
            time.sleep(0.5)
        if state != "FAILED":
            slurm_cluster.run(["scancel", str(job)])
        out, _ = head.communicate(timeout=120)
        assert head.returncode not in (0, 75), out[-3000:]
        if state == "FAILED":
            assert victim in out.split(f"# job {job} FAILED")[0], out[-3000:]
            assert "the same `deepfleet train ... --slurm` command submits it again" in out
    finally:
        slurm_cluster.revive_node(victim)
    slurm_cluster.wait_nodes("idle", timeout=90)
    again = subprocess.run(command, cwd=workdir, env=slurm_cluster.env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stdout[-3000:] + again.stderr[-1000:]
    assert _train_records(output)[-1]["step"] == STEPS
