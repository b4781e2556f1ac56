"""The table of bad options and inputs per command (check-ds-config, plan, train, sweep, export, generate, sync,
launch, bench, env, doctor, hostfile, SLURM/PBS): each through the real CLI, exit 2, one `error: ` line
starting as listed, no traceback, nothing written."""

from dataclasses import replace

import pytest

from bad_input_harness import GOOD_DS_JSON, GOOD_HOSTFILE, GOOD_RECIPE, Case, assert_refused

FILES = {"r.yaml": GOOD_RECIPE, "hosts": GOOD_HOSTFILE, "ds.json": GOOD_DS_JSON}
NO_SCHEDULER = {"PATH": "{tmp}/bin"}   # an empty PATH dir: no squeue, sbatch, qsub on any machine
CHECK_DS = ("check-ds-config", "d.json", "--nodes", "1", "--gpus-per-node", "1", "--accelerator", "cpu")
# (DeepSpeed JSON, start of the error line after `error: d.json`)
DEEPSPEED_MISTAKES = [
    ("{", ":1:2: not valid JSON: Bad key name (eof)"),
    ("[1]", ": a DeepSpeed config must be a JSON object"),
    ('{"a": 1,\n "a": 2}', ':2: duplicate key "a" (first on line 1); DeepSpeed refuses it'),
    ('{"a": 1e999}', ": not valid JSON: OverflowError"),
    ("{\n a: 1,\n /* ", ":3: not valid JSON: the text ends inside a comment, string or bracket"),
    ('{"train_micro_batch_size_per_gpu": -1}', ":train_micro_batch_size_per_gpu: train_micro_batch_size_per_gpu must be a positive integer"),
    ('{"zero_optimization": {"stage": 7}}', ":zero_optimization.stage: zero_optimization.stage must be an integer 0-3"),
    ('{"train_batch_size": 3, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}',
     ":train_batch_size: train_batch_size 3 != train_micro_batch_size_per_gpu 2"),
    ('{"zero_optimzation": {}}', ':zero_optimzation: unknown DeepSpeed key zero_optimzation (did you mean "zero_optimization"?)'),
    (b'{"a": "\xff"}', ":1: DeepSpeed config is not UTF-8 text (byte 0xff)"),
]

CASES = [Case(CHECK_DS, f"error: d.json{expected}", files={"d.json": text}) for text, expected in DEEPSPEED_MISTAKES]
CASES += [
    Case(("check-ds-config", "missing.json"), "error: missing.json: cannot read DeepSpeed config: No such file"),
    Case(("check-ds-config", "ds.json", "--recipe", "missing.yaml"), "error: missing.yaml: cannot read recipe"),
    Case(("check-ds-config", "ds.json", "--recipe", "r.yaml"), "error: r.yaml:1: unknown key trian", files={"r.yaml": "trian: 1\n"}),
    Case(("check-ds-config", "ds.json", "--accelerator", "tpu"), "error: --accelerator: unknown accelerator 'tpu'"),
    Case(("check-ds-config", "ds.json", "--fleet", "hosts", "--nodes", "2"), "error: command line: both --fleet and --nodes given"),
    Case(("plan", "r.yaml", "--gpu-mem", "lots", "--nodes", "1"), "error: --gpu-mem: cannot read memory size 'lots'"),
    Case(("plan", "r.yaml", "--host-mem", "-5GiB", "--nodes", "1"), "error: --host-mem: cannot read memory size '-5GiB'"),
    Case(("plan", "r.yaml", "--facts", "missing.json"), "error: missing.json: cannot read facts record: No such file"),
    Case(("plan", "r.yaml", "--facts", "facts.json"), "error: facts.json: not a `deepfleet doctor --record` file",
         files={"facts.json": "{"}),
    Case(("plan", "r.yaml", "--nodes", "abc"), "error: deepfleet plan: Invalid value for '--nodes'"),
    Case(("train", "--dry-run", "--facts", "facts.json", "--hostfile", "hosts", "r.yaml"),
         "error: facts.json: no facts for host(s) gpu1, gpu2 of hosts", files={"facts.json": "[]"}),
    Case(("train", "r.yaml", "--dry-run", "--fleet", "f.yaml", "--hostfile", "hosts"),
         "error: command line: both --fleet and --hostfile given"),
    Case(("train", "r.yaml", "--dry-run", "--include", "gpu9", "--hostfile", "hosts"),
         "error: --include: no host 'gpu9' in hosts (did you mean \"gpu2\"?)"),
    Case(("train", "r.yaml", "--dry-run", "--exclude", "gpu1:x", "--hostfile", "hosts"), "error: --exclude: cannot read 'gpu1:x'"),
    Case(("train", "r.yaml", "--dry-run", "--nproc", "0"), "error: deepfleet train: Invalid value for '--nproc'"),
    Case(("train", "r.yaml", "--slurm", "--pbs"), "error: --pbs: --slurm and --pbs both given"),
    Case(("train", "r.yaml", "--slurm", "--time", "forever"), "error: --time forever: not a time limit: 'forever'"),
    Case(("train", "r.yaml", "--slurm", "--hostfile", "hosts"), "error: --slurm: --hostfile does not go with --slurm"),
    Case(("train", "r.yaml", "--pbs", "--fleet", "f.yaml"), "error: --pbs: --fleet does not go with --pbs"),
    Case(("train", "r.yaml", "--pbs"), "error: --pbs: qsub not found on PATH", env=NO_SCHEDULER),
    Case(("train", "r.yaml", "--slurm", "--nodes", "0"), "error: deepfleet train: Invalid value for '--nodes'"),
    Case(("train", "r.yaml", "--slurm", "--gpus-per-node", "-1"), "error: deepfleet train: Invalid value for '--gpus-per-node'"),
    Case(("train", "r.yaml", "--dry-run", "--nodes", "2"), "error: --nodes: --nodes is for a job submitted with --slurm or --pbs"),
    Case(("train", "r.yaml", "--dry-run", "--partition", "gpu"), "error: --partition: --partition is for a job submitted"),
    Case(("train", "r.yaml", "--detach"), "error: --detach: --detach is for a job submitted with --slurm or --pbs"),
    Case(("export", "nope", "--to", "out"), "error: {tmp}/nope: no complete checkpoint in {tmp}/nope"),
    Case(("export", "run", "--to", "out"), "error: {tmp}/run: no complete checkpoint in {tmp}/run", files={"run/x": "x"}),
    Case(("export", "r.yaml", "--to", "out"), "error: {tmp}/r.yaml: no complete checkpoint"),
    Case(("export", "run"), "error: deepfleet export: Missing option '--to'"),
    Case(("generate", "nope", "hi"), "error: MODEL_DIR: 'nope' is not a saved model dir"),
    Case(("generate", "m", "hi"), "error: m: the saved model is damaged or incomplete: no tokenizer files",
         files={"m/config.json": "{"}),
    Case(("generate", "m", "hi", "--max-new-tokens", "0"), "error: deepfleet generate: Invalid value for '--max-new-tokens'"),
    Case(("status",), "error: squeue: squeue not found on PATH", env=NO_SCHEDULER),
    Case(("logs", "12"), "error: scontrol: scontrol not found on PATH", env=NO_SCHEDULER),   # was a traceback
    Case(("cancel", "12"), "error: scancel: scancel not found on PATH", env=NO_SCHEDULER),
    Case(("logs", "12", "--follow"), "error: scontrol: scontrol not found on PATH", env=NO_SCHEDULER),
    Case(("logs", "abc"), "error: deepfleet logs: Invalid value for 'job_id'"),
    Case(("cancel", "-1"), "error: deepfleet cancel: No such option: -1"),
    Case(("sync", "missing", "--hostfile", "hosts"), "error: head:{tmp}/missing: no such file or directory"),
    Case(("sync", "r.yaml", "--hostfile", "hosts", "--shape", "star"), "error: --shape: unknown value 'star'"),
    Case(("sync", "r.yaml", "--hostfile", "hosts", "--outside-links", "follow"), "error: --outside-links: unknown value 'follow'"),
    Case(("sync", "r.yaml", "--hostfile", "hosts", "--to", "relative/dir"), "error: --to relative/dir: the destination must be an absolute path"),
    Case(("sync", "r.yaml", "--hostfile", "hosts", "--include", "gpu7"), "error: --include: no host 'gpu7' in hosts"),
    Case(("launch", "--hostfile", "hosts", "--dry-run", "--master-port", "0", "--", "true"), "error: deepfleet launch: Invalid value for '--master-port'"),
    Case(("launch", "--hostfile", "hosts", "--fleet", "f.yaml", "--dry-run", "--", "true"), "error: command line: both --fleet and --hostfile given"),
    Case(("launch", "--hostfile", "missing", "--dry-run", "--", "true"), "error: missing: cannot read hostfile"),
    Case(("launch", "--hostfile", "hosts", "--exclude", "gpu1@gpu2", "--dry-run", "--", "true"), "error: --exclude: --exclude leaves no host"),
    Case(("launch", "--backend", "bogus", "--", "true"), "error: deepfleet launch: Invalid value for '--backend'"),
    Case(("bench", "comm", "--hostfile", "hosts", "--sizes", "huge"), "error: --sizes: cannot read size 'huge'"),
    Case(("bench", "comm", "--hostfile", "hosts", "--ops", "all_scream"), "error: --ops: unknown collective(s) all_scream"),
    Case(("bench", "comm", "--hostfile", "hosts", "--sizes", "1GiB..1KiB"), "error: --sizes: range '1GiB..1KiB' runs backwards"),
    Case(("bench", "comm", "--png", "plot.txt"), "error: deepfleet bench comm: Invalid value for '--png'"),
    Case(("bench", "train", "r.yaml", "--hostfile", "hosts", "--nodes", "0,x"), "error: --nodes: cannot read node counts '0,x'"),
    Case(("bench", "train", "missing.yaml", "--hostfile", "hosts"), "error: missing.yaml: cannot read recipe"),
    Case(("bench", "train", "r.yaml", "--hostfile", "hosts", "--nodes", "3"), "error: --nodes: 3 nodes asked for, the fleet has 2"),
    Case(("bench", "train", "r.yaml", "--hostfile", "hosts", "--steps", "1"), "error: deepfleet bench train: Invalid value for '--steps'"),
    Case(("env", "check", "--hostfile", "hosts", "--package", "no-such-dist-xyz"), "error: --package: no-such-dist-xyz not installed on the head"),
    Case(("env", "sync", "--hostfile", "hosts", "--wheel-dir", "missing", "--dry-run"), "error: --wheel-dir missing: is not a directory"),
    Case(("env", "sync", "--hostfile", "hosts", "--include", "zz", "--dry-run"), "error: --include: no host 'zz' in hosts"),
    Case(("doctor", "--hostfile", "hosts", "--record", "missing/x.json"), "error: deepfleet doctor: Invalid value for '--record'"),
    Case(("doctor", "--hostfile", "hosts", "--include", "gpu1:a"), "error: --include: cannot read 'gpu1:a'"),
    Case(("doctor", "--hostfile", "hosts", "--recipe", "bad.yaml"), "error: bad.yaml:1: unknown key trian", files={"bad.yaml": "trian: 1\n"}),
    Case(("hostfile", "--hostfile", "hosts", "--ssh-config", "missing"), "error: missing: ssh config file not found"),
    Case(("hostfile", "--hostfile", "hosts", "-o", "{tmp}"), "error: deepfleet hostfile: Invalid value for '-o' / '--output'"),
    Case(("sweep", "r.yaml", "--grid", "train.lrr=1e-4,2e-4"), 'error: --grid train.lrr=1e-4,2e-4: unknown key train.lrr (did you mean "lr"?)'),
    Case(("sweep", "r.yaml", "--grid", "train.lr=-1,1e-4,abc", "--grid", "lora.r=0,8"),
         "error: --grid: 3 grid value(s) fail the recipe schema: train.lr=-1: train.lr: Input should be greater than 0; "
         "train.lr=abc: train.lr: Input should be a valid number, unable to parse string as a number; "
         "lora.r=0: lora.r: Input should be greater than 0 (fix: change or drop those values"),
    Case(("sweep", "r.yaml"), "error: --grid: no --grid given"),
    Case(("sweep", "r.yaml", "--grid", "train.lr="), "error: --grid train.lr=: no values for train.lr"),
    Case(("sweep", "r.yaml", "--grid", "train.lr=1e-4,2e-4", "--hostfile", "hosts", "--parallel", "3"),
         "error: --parallel 3: 3 trials at a time need 3 hosts, hosts has 2 (gpu1, gpu2)"),
    Case(("sweep", "r.yaml", "--grid", "train.lr=1e-4", "--parallel", "0"), "error: deepfleet sweep: Invalid value for '--parallel'"),
    Case(("sweep", "r.yaml", "--grid", "train.lr=1e-4", "--random", "2"), "error: --random 2: 2 trials asked for, the grid has 1"),
    Case(("sweep", "r.yaml", "--grid", "train.lr=1e-4", "--seed", "1"), "error: --seed 1: a seed without --random"),
    Case(("sweep", "r.yaml", "--grid", "train.lr=1e-4", "--slurm", "--hostfile", "hosts"), "error: --slurm: --hostfile does not go with --slurm"),
    Case(("sweep", "r.yaml", "--grid", "train.lr=1e-4", "--nodes", "2"), "error: --nodes: --nodes is for a sweep submitted with --slurm"),
    Case(("sweep", "r.yaml", "--grid", "train.lr=1e-4"), "error: runs/r/sweep/sweep.json: this dir holds another sweep (its recipe has",
         files={"runs/r/sweep/sweep.json": '{"format": 1, "recipe": {"train": {"lr": 5}}, "trials": []}'}),
    Case(("sweep", "r.yaml", "--grid", "train.lr=1e-4", "--out", "full"), "error: full: the sweep dir is not empty and holds no sweep",
         files={"full/x": "x"}),
    Case(("sweep", "r.yaml", "--grid", "train.lr=1e-4", "--slurm"), "error: --slurm: sbatch not found on PATH", env=NO_SCHEDULER),
    Case(("demo", "train.lr=abc"), "error: command line (train.lr=abc): train.lr: Input should be a valid number"),
    Case(("demo", "--nproc", "0"), "error: deepfleet demo: Invalid value for '--nproc'"),
    Case(("bogus",), "error: deepfleet: No such command 'bogus'."),
]


@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_bad_command_input(case, tmp_path, monkeypatch, capsys):
    (tmp_path / "bin").mkdir()
    assert_refused(replace(case, files={**FILES, **case.files}), tmp_path, monkeypatch, capsys)
