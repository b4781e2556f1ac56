"""`deepfleet sync` on hosts that do not share a filesystem: each host's sshd has a private tmpfs."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from namespace_cluster import HostSpec, fleet_yaml_text, on_host

sys.path.insert(0, str(Path(__file__).parent.parent / "integration"))
from training_fixtures import DEEPFLEET, run_cli, write_recipe, write_task_data  # noqa: E402

BIG = 200 * 2**20


def write_tree(root: Path, big_bytes: int) -> None:
    """Nested dirs, links inside the tree (to a file and to a dir), and one big file."""
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    (root / "a" / "one.json").write_text('{"x": 1}\n')
    (root / "empty.txt").write_bytes(b"")
    (root / "latest").symlink_to("a/b")
    (root / "a" / "same.json").symlink_to("one.json")
    block = hashlib.sha256(b"seed").digest() * 32768   # 1 MiB, not all zeros
    with open(root / "weights.bin", "wb") as handle:
        for index in range(big_bytes // len(block)):
            handle.write(block[:-1] + bytes([index % 256]))


def listing_on_host(cluster, name: str, root: Path) -> str:
    """Every file's sha256 and every link's target under root, as host `name` sees it."""
    script = (f"cd {shlex.quote(str(root))} && find . -path ./.deepfleet-sync -prune -o -type f "
              f"! -name '.deepfleet-manifest.json' -print | sort | xargs -r sha256sum && "
              f"find . -type l | sort | while read l; do echo \"$l -> $(readlink \"$l\")\"; done")
    done = on_host(cluster, name, script)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


def listing_here(root: Path) -> str:
    done = subprocess.run(["sh", "-c", f"cd {shlex.quote(str(root))} && find . -type f ! -name "
                           f"'.deepfleet-manifest.json' -print | sort | xargs -r sha256sum && find . -type l | sort | "
                           f"while read l; do echo \"$l -> $(readlink \"$l\")\"; done"],
                          capture_output=True, text=True, check=True)
    return done.stdout


def exists_on_host(cluster, name: str, path: Path) -> bool:
    return on_host(cluster, name, f"test -e {shlex.quote(str(path))}").returncode == 0


def throttle(cluster, name: str, rate: str | None) -> None:
    """Slow what the head sends to a host (its veth's egress), so a test can cut a transfer midway."""
    veth = cluster.host(name).veth
    subprocess.run(["tc", "qdisc", "del", "dev", veth, "root"], capture_output=True, timeout=10)
    if rate:
        subprocess.run(["tc", "qdisc", "add", "dev", veth, "root", "tbf", "rate", rate, "burst", "64kb",
                        "latency", "2s"], check=True, timeout=10)


def partial_bytes(cluster, name: str, staging: Path) -> int:
    done = on_host(cluster, name, f"cat {shlex.quote(str(staging))}/*.partial 2>/dev/null | wc -c")
    return int(done.stdout.decode().strip() or 0)


def wait_for_partial(cluster, name: str, staging: Path, at_least: int, process) -> None:
    deadline = time.monotonic() + 60
    while partial_bytes(cluster, name, staging) < at_least:
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the transfer never started"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def private_cluster(cluster_factory, tmp_path_factory):
    private = tmp_path_factory.mktemp("sync") / "node-local"
    cluster = cluster_factory([HostSpec(name=f"s{i}", private_dirs=(str(private),)) for i in (1, 2, 3)])
    return cluster, private


def test_sync_tree_to_three_hosts_then_resync_and_repair(private_cluster, deepfleet, tmp_path):
    cluster, private = private_cluster
    source = tmp_path / "dataset"
    write_tree(source, BIG)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(fleet_yaml_text(cluster, ["s1", "s2", "s3"]))
    dest = private / "dataset"

    done = deepfleet("sync", str(source), "--to", str(private), "--fleet", str(fleet))
    assert done.returncode == 0, done.stderr
    assert "chain: head -> s1 -> s2 -> s3" in done.stdout
    expected = listing_here(source)
    for name in ("s1", "s2", "s3"):
        assert listing_on_host(cluster, name, dest) == expected, name
        assert not exists_on_host(cluster, name, dest / ".deepfleet-sync"), name
    rows = [line for line in done.stdout.splitlines() if line.startswith("│ s")]
    assert len(rows) == 3 and all("verified" in row and "200.0 MiB" in row for row in rows), done.stdout
    assert not dest.exists(), "the head saw a host's private dir: storage was shared after all"

    started = time.monotonic()
    again = deepfleet("sync", str(source), "--to", str(private), "--fleet", str(fleet))
    assert again.returncode == 0 and again.stdout.count("unchanged") == 3, again.stdout
    assert "nothing to send" in again.stdout and time.monotonic() - started < 10

    on_host(cluster, "s2", f"printf X | dd of={dest}/weights.bin bs=1 seek=4096 conv=notrunc status=none")
    repaired = deepfleet("sync", str(source), "--to", str(private), "--fleet", str(fleet))
    assert repaired.returncode == 0, repaired.stderr
    rows = {line.split()[1]: line for line in repaired.stdout.splitlines() if line.startswith("│ s")}
    assert "verified" in rows["s2"] and "200.0 MiB" in rows["s2"], repaired.stdout
    assert "unchanged" in rows["s1"] and "unchanged" in rows["s3"], repaired.stdout
    assert listing_on_host(cluster, "s2", dest) == expected

    # Damage that keeps size and mtime is invisible to the stored manifest; --rehash finds it.
    on_host(cluster, "s3", f"cd {dest}/a && cp -p one.json keep && printf '{{\"x\": 2}}\\n' > one.json && "
                           f"touch -r keep one.json && rm keep")
    trusting = deepfleet("sync", str(source), "--to", str(private), "--fleet", str(fleet))
    assert trusting.stdout.count("unchanged") == 3
    rehashed = deepfleet("sync", str(source), "--to", str(private), "--fleet", str(fleet), "--rehash")
    assert rehashed.returncode == 0 and listing_on_host(cluster, "s3", dest) == expected


def test_tree_shape_forwards_between_hosts(private_cluster, deepfleet, tmp_path):
    cluster, private = private_cluster
    source = tmp_path / "model"
    write_tree(source, 3 * 2**20)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(fleet_yaml_text(cluster, ["s1", "s2", "s3"]))
    done = deepfleet("sync", str(source), "--to", str(private / "tree"), "--fleet", str(fleet), "--shape", "tree")
    assert done.returncode == 0, done.stderr
    assert "tree: head -> s1, s2; s1 -> s3" in done.stdout
    for name in ("s1", "s2", "s3"):
        assert listing_on_host(cluster, name, private / "tree" / "model") == listing_here(source), name


def test_killed_head_leaves_nothing_visible_and_the_next_sync_resumes(private_cluster, deepfleet, tmp_path):
    cluster, private = private_cluster
    source = tmp_path / "shard.bin"
    source.write_bytes(os.urandom(24 * 2**20))
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(fleet_yaml_text(cluster, ["s1", "s2"]))
    target, staging = private / "resume" / "shard.bin", private / "resume" / ".deepfleet-sync"
    for name in ("s1", "s2"):
        throttle(cluster, name, "40mbit")
    try:
        head = subprocess.Popen([DEEPFLEET, "sync", str(source), "--to", str(private / "resume"), "--fleet", str(fleet)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for_partial(cluster, "s1", staging, 4 * 2**20, head)
        head.send_signal(signal.SIGKILL)
        head.wait(10)
    finally:
        for name in ("s1", "s2"):
            throttle(cluster, name, None)
    time.sleep(0.5)
    kept = partial_bytes(cluster, "s1", staging)
    assert 4 * 2**20 <= kept < source.stat().st_size
    assert not exists_on_host(cluster, "s1", target) and not exists_on_host(cluster, "s2", target)

    done = deepfleet("sync", str(source), "--to", str(private / "resume"), "--fleet", str(fleet))
    assert done.returncode == 0, done.stderr
    rows = {line.split()[1]: line.split("│") for line in done.stdout.splitlines() if line.startswith("│ s")}
    sent_mib = float(rows["s1"][2].split()[0])
    assert sent_mib <= (source.stat().st_size - kept) / 2**20 + 0.1, done.stdout   # resumed, not restarted
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    for name in ("s1", "s2"):
        assert on_host(cluster, name, f"sha256sum {target}").stdout.decode().split()[0] == digest
        assert not exists_on_host(cluster, name, staging)


@pytest.fixture(scope="module")
def fault_hosts(cluster_factory, tmp_path_factory):
    """`full`: a 32 MiB private disk; `ro`: a read-only one."""
    private = tmp_path_factory.mktemp("sync-faults") / "node-local"
    cluster = cluster_factory([HostSpec(name="full", private_dirs=(str(private),), private_size="32m"),
                               HostSpec(name="ro", readonly_dirs=(str(private),))])
    return cluster, private


def one_error_line(done, *parts: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (done.returncode, done.stderr)
    assert "Traceback" not in done.stdout and all(part in lines[0] for part in parts), lines[0]
    return lines[0]


def test_bad_input_gets_one_line_and_leaves_nothing_partial(fault_hosts, deepfleet, tmp_path):
    cluster, private = fault_hosts
    full, ro = tmp_path / "full.yaml", tmp_path / "ro.yaml"
    full.write_text(fleet_yaml_text(cluster, ["full"]))
    ro.write_text(fleet_yaml_text(cluster, ["ro"]))
    one_error_line(deepfleet("sync", str(tmp_path / "absent"), "--to", str(private), "--fleet", str(full)),
                   f"head:{tmp_path / 'absent'}: no such file or directory")
    one_error_line(deepfleet("sync", str(tmp_path), "--to", "relative/dir", "--fleet", str(full)), "absolute")

    big = tmp_path / "big.bin"
    big.write_bytes(b"\1" * (40 * 2**20))
    one_error_line(deepfleet("sync", str(big), "--to", str(private), "--fleet", str(full)),
                   f"full:{private}: no space: needs 40.0 MiB", "fix: free space on full")
    one_error_line(deepfleet("sync", str(big), "--to", str(private / "x"), "--fleet", str(ro)),
                   f"ro:{private}: is not writable")
    assert not exists_on_host(cluster, "full", private / "big.bin")

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_text("f\n")
    (tree / "hostname").symlink_to("/etc/hostname")
    one_error_line(deepfleet("sync", str(tree), "--to", str(private), "--fleet", str(full)),
                   f"head:{tree / 'hostname'}: symlink to /etc/hostname points outside", "--outside-links keep")
    kept = deepfleet("sync", str(tree), "--to", str(private), "--fleet", str(full), "--outside-links", "keep")
    assert kept.returncode == 0, kept.stderr
    assert "hostname -> /etc/hostname" in listing_on_host(cluster, "full", private / "tree")

    # A directory of the tree that is a symlink on the host would take the writes outside the destination.
    on_host(cluster, "full", f"rm -r {private}/tree/sub && mkdir -p {private}/elsewhere && "
                             f"ln -s {private}/elsewhere {private}/tree/sub")
    (tree / "sub" / "g.txt").write_text("g\n")
    one_error_line(deepfleet("sync", str(tree), "--to", str(private), "--fleet", str(full), "--outside-links", "keep"),
                   f"full:{private}/tree/sub: is a symlink to {private}/elsewhere")
    assert not exists_on_host(cluster, "full", private / "elsewhere" / "g.txt")


def test_disk_filling_up_mid_transfer_is_one_line_and_no_partial_file(fault_hosts, deepfleet, tmp_path):
    cluster, private = fault_hosts
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(fleet_yaml_text(cluster, ["full"]))
    source = tmp_path / "shard.bin"
    source.write_bytes(os.urandom(16 * 2**20))
    staging = private / "fill" / ".deepfleet-sync"
    throttle(cluster, "full", "40mbit")
    try:
        head = subprocess.Popen([DEEPFLEET, "sync", str(source), "--to", str(private / "fill"), "--fleet", str(fleet)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_partial(cluster, "full", staging, 2 * 2**20, head)
        on_host(cluster, "full", f"dd if=/dev/zero of={private}/filler bs=1M status=none; true")
        out, err = head.communicate(timeout=120)
    finally:
        throttle(cluster, "full", None)
        on_host(cluster, "full", f"rm -f {private}/filler")
    done = subprocess.CompletedProcess(head.args, head.returncode, out, err)
    one_error_line(done, f"full:{private}/fill/shard.bin: No space left on device", "fix: free space on full")
    assert not exists_on_host(cluster, "full", private / "fill" / "shard.bin")
    assert partial_bytes(cluster, "full", staging) == 0


def test_training_refuses_other_data_then_syncs_trains_and_exports_spread_shards(private_cluster, tmp_path):
    """No shared storage: a host with other data is refused; `train --sync` copies it, the launch sends
    the prepared data to both hosts, and it trains ZeRO-2 (each host keeps its own rank's optimizer
    shard); export from the head, which holds none of the checkpoint, collects both over ssh and
    writes the weights the run saved as final/."""
    from safetensors.torch import load as load_safetensors

    cluster, private = private_cluster
    train, _ = write_task_data(private / "train-data", n_train=120, n_validation=4)   # the head's own copy
    on_host(cluster, "s1", f"mkdir -p {train.parent} && cat > {train}", input=train.read_bytes())
    on_host(cluster, "s2", f"mkdir -p {train.parent} && cat > {train}", input=train.read_bytes()[:-500])
    output = private / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", model="builtin:tiny", method="full",
                          data={"train": [str(train)], "max_length": 64, "cache_dir": str(private / "cache")},
                          train={"max_steps": 2, "global_batch": 4, "micro_batch": 2, "warmup": 1},
                          deepspeed={"zero": 2}, logging={"tensorboard": False}, env={"OMP_NUM_THREADS": "1"},
                          checkpoint={"every_steps": 2}, output_dir=str(output))
    (tmp_path / "fleet.yaml").write_text(fleet_yaml_text(cluster, ["s1", "s2"]))

    refused = run_cli("train", str(recipe), "--fleet", "fleet.yaml", cwd=tmp_path)
    line = one_error_line(refused, f"s2:{train}: differs from the head's copy: 1 differ: train.jsonl",
                          f"deepfleet sync {train}", "train --sync")
    assert "s1" not in line
    doctor = run_cli("doctor", "--fleet", "fleet.yaml", "--recipe", str(recipe), "--no-matrix", "--no-network",
                     "--json", cwd=tmp_path)
    data_findings = [(f["host"], f["severity"], f["message"]) for f in json.loads(doctor.stdout)["findings"]
                     if f["check"] == "data"]
    assert doctor.returncode == 2 and data_findings == [("s2", "fail", f"{train} differs from s1's: 1 differ: train.jsonl")]

    trained = run_cli("train", str(recipe), "--fleet", "fleet.yaml", "--sync", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    rows = {row.split()[1]: row for row in trained.stdout.splitlines() if row.startswith("│ s")}
    assert "unchanged" in rows["s1"] and "verified" in rows["s2"], trained.stdout
    assert "done in" in trained.stdout
    assert on_host(cluster, "s2", f"cat {train}").stdout == train.read_bytes()
    [entry] = (private / "cache").iterdir()
    assert "data: sent the prepared data" in trained.stdout and "to s1, s2" in trained.stdout, trained.stdout
    for host in ("s1", "s2"):
        assert on_host(cluster, host, f"cat {entry}/train.ids.npy").stdout == (entry / "train.ids.npy").read_bytes()
    assert not (output / "checkpoints").exists(), "the head saw the hosts' checkpoints: storage was shared"

    (tmp_path / "elsewhere").mkdir()   # no ./fleet.yaml there: this machine alone has no checkpoint
    alone = run_cli("export", str(output), "--to", str(tmp_path / "nothing"), cwd=tmp_path / "elsewhere")
    assert alone.returncode == 2 and "no complete checkpoint" in alone.stderr

    done = run_cli("export", str(output), "--to", str(tmp_path / "exported"), "--fleet", "fleet.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "from s1 (sha256 verified)" in done.stdout and "from s2 (sha256 verified)" in done.stdout
    assert not (tmp_path / ".exported.collecting").exists()
    exported = load_safetensors((tmp_path / "exported" / "model.safetensors").read_bytes())
    final = load_safetensors(on_host(cluster, "s1", f"cat {output}/final/model.safetensors").stdout)
    assert exported.keys() == final.keys() and len(exported) > 4
    assert all((exported[k].float() == final[k].float()).all() for k in final)


def test_a_frozen_host_is_cut_loose_and_the_others_finish(private_cluster, tmp_path):
    cluster, private = private_cluster
    source = tmp_path / "frozen.bin"
    source.write_bytes(os.urandom(16 * 2**20))
    (tmp_path / "fleet.yaml").write_text(fleet_yaml_text(cluster, ["s1", "s2"]))
    staging = private / "frozen" / ".deepfleet-sync"
    stopped: list[int] = []
    for name in ("s1", "s2"):
        throttle(cluster, name, "40mbit")
    try:
        head = subprocess.Popen([DEEPFLEET, "sync", str(source), "--to", str(private / "frozen"), "--fleet",
                                 str(tmp_path / "fleet.yaml"), "--stall-timeout", "3"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_partial(cluster, "s2", staging, 2**20, head)
        stopped = cluster.pids_running("s2", b"deepfleet-sync")
        assert stopped
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        throttle(cluster, "s1", None)
        out, err = head.communicate(timeout=90)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGKILL)
        for name in ("s1", "s2"):
            throttle(cluster, name, None)
    assert head.returncode == 1, (out, err)
    assert err.strip().splitlines() == ["error: s2: no report (via s2: it took no data for 3 s) "
                                        "(fix: run the same `deepfleet sync` again: it resumes)"]
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ s")}
    assert "verified" in rows["s1"] and "failed" in rows["s2"]
    assert not exists_on_host(cluster, "s2", private / "frozen" / "frozen.bin")
