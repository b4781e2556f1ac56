"""Experiment trackers without a training run: the recipe keys, the guarded sink (resume, steps sent once,
a failing tracker), the head-side checks, and that deepfleet imports no tracker library it is not using."""

import http.server
import json
import socket
import subprocess
import sys
import threading

import pytest

from deepfleet.plan.recipe import TRACKERS, LoggingSpec
from deepfleet.plan.recipe_io import parse_recipe
from deepfleet.train import tracker_checks
from deepfleet.train.metrics import MetricsWriter, StepMetrics, read_metrics
from deepfleet.train.tracker_checks import mlflow_server_error, tracker_problems
from deepfleet.train.tracker_set import TRACKERS_FILE, Trackers
from deepfleet.train.trackers import TRACKER_TYPES, TrackerRun, flat_config, tracker_values


class FakeTracker:
    """Records what it was sent; `fail_at` makes log raise at that step (a server gone mid-run)."""

    name = "wandb"
    rewrites_steps = False
    opened: list["FakeTracker"] = []

    def __init__(self, run, previous, fail_at=None):
        self.previous, self.logged, self.finished, self.fail_at = previous, [], [], fail_at
        self.run_id = (previous or {}).get("run_id") or f"run-{len(FakeTracker.opened)}"
        FakeTracker.opened.append(self)

    def reference(self):
        return {"run_id": self.run_id}

    def log(self, values, step):
        if step == self.fail_at:
            raise ConnectionError("server went away")
        self.logged.append((step, values))

    def finish(self, final_dir):
        self.finished.append(final_dir)


class FakeBoard(FakeTracker):
    name = "tensorboard"
    rewrites_steps = True

    def reference(self):
        return None


def open_fakes(tmp_path, resume_after_step=0, warnings=None, fail_at=None, names=("tensorboard", "wandb")):
    types = {"wandb": lambda run, previous: FakeTracker(run, previous, fail_at), "tensorboard": FakeBoard}
    run = TrackerRun(output_dir=tmp_path, run_name="r", resume_after_step=resume_after_step)
    return Trackers.open(names, run, warn=(warnings if warnings is not None else []).append, types=types)


def train(step):
    return {"kind": "train", "step": step, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": float("nan"),
            "rank_step_seconds": [0.1, 0.2], "router_aux_loss": None}


def test_every_tracker_the_recipe_accepts_has_an_adapter():
    assert set(TRACKER_TYPES) == set(TRACKERS)


@pytest.mark.parametrize("logging, expected", [
    ({}, ("tensorboard",)),
    ({"tensorboard": False}, ()),
    ({"tensorboard": True}, ("tensorboard",)),
    ({"trackers": ["wandb", "mlflow"]}, ("wandb", "mlflow")),
    ({"trackers": "mlflow"}, ("mlflow",)),
    ({"trackers": ["wandb"], "tensorboard": True}, ("tensorboard", "wandb")),
    ({"trackers": ["tensorboard", "wandb", "wandb"], "tensorboard": False}, ("wandb",)),
    ({"trackers": []}, ()),
])
def test_trackers_with_the_older_tensorboard_switch(logging, expected):
    assert LoggingSpec(**logging).enabled_trackers == expected


def test_recipe_tracker_keys_parse_and_unknown_names_get_a_did_you_mean():
    recipe = parse_recipe("logging:\n  trackers: [wandb]\n  run_name: exp1\n  tags: [sft, tiny]\n  project: p\n")
    assert (recipe.logging.run_name, recipe.logging.tags, recipe.logging.project) == ("exp1", ["sft", "tiny"], "p")
    with pytest.raises(Exception, match='unknown tracker .wandbb. \\(did you mean "wandb"\\?\\)'):
        parse_recipe("logging:\n  trackers: [wandbb]\n")


def test_tracker_values_are_metrics_jsonl_fields_under_tensorboards_names():
    assert tracker_values(train(2)) == {"train/loss": 0.5, "train/lr": 1e-3, "train/rank_step_seconds/0": 0.1,
                                        "train/rank_step_seconds/1": 0.2}
    assert tracker_values({"kind": "validation", "step": 4, "val_loss": 0.25}) == {"val_loss": 0.25}
    assert flat_config({"recipe": {"train": {"lr": 0.1, "data": ["a"]}, "x": "s"}, "deepspeed": {}}) == {
        "recipe.train.lr": "0.1", "recipe.train.data": '["a"]', "recipe.x": "s", "deepspeed": "{}"}


def test_a_resumed_run_continues_the_tracker_run_and_sends_no_step_twice(tmp_path):
    FakeTracker.opened = []
    first = open_fakes(tmp_path)
    for step in range(1, 6):                      # steps 1-5 sent, then the run dies (checkpoint at step 3)
        first.log(train(step))
    first.log({"kind": "validation", "step": 4, "val_loss": 0.5})
    wandb_run = FakeTracker.opened[1]
    state = json.loads((tmp_path / TRACKERS_FILE).read_text())
    assert state == {"wandb": {"run": {"run_id": wandb_run.run_id}, "sent": {"train": 5, "validation": 4}}}

    resumed = open_fakes(tmp_path, resume_after_step=3)
    board, continued = FakeTracker.opened[2:]
    assert continued.previous == {"run_id": wandb_run.run_id}
    for step in range(4, 8):                      # steps 4 and 5 are trained again
        resumed.log(train(step))
        if step == 4:
            resumed.log({"kind": "validation", "step": 4, "val_loss": 0.4})
    resumed.finish(tmp_path / "final")
    assert [step for step, _ in continued.logged] == [6, 7]      # W&B/MLflow: never a step twice
    assert [step for step, _ in board.logged] == [4, 4, 5, 6, 7]  # TensorBoard purges and takes them again
    assert continued.finished == [tmp_path / "final"]


def test_a_tracker_that_cannot_start_on_resume_keeps_its_run_for_the_next_one(tmp_path):
    FakeTracker.opened = []
    open_fakes(tmp_path).log(train(1))
    run_id = FakeTracker.opened[1].run_id

    def unreachable(run, previous):
        raise OSError("connection refused")

    run = TrackerRun(output_dir=tmp_path, run_name="r", resume_after_step=1)
    Trackers.open(("wandb",), run, warn=[].append, types={"wandb": unreachable})
    assert json.loads((tmp_path / TRACKERS_FILE).read_text()) == {"wandb": {"run": {"run_id": run_id},
                                                                            "sent": {"train": 1}}}


def test_training_from_step_zero_starts_new_tracker_runs(tmp_path):
    FakeTracker.opened = []
    open_fakes(tmp_path).log(train(1))
    again = open_fakes(tmp_path, resume_after_step=0)
    again.log(train(1))
    old, new = FakeTracker.opened[1], FakeTracker.opened[3]
    assert new.previous is None and new.run_id != old.run_id and [s for s, _ in new.logged] == [1]


def test_a_tracker_that_fails_mid_run_warns_once_and_the_rest_goes_on(tmp_path):
    FakeTracker.opened, warnings = [], []
    trackers = open_fakes(tmp_path, warnings=warnings, fail_at=3)
    writer = MetricsWriter(tmp_path, trackers=trackers)
    for step in range(1, 6):
        writer.write_step(StepMetrics(step=step, epoch=0, loss=1.0, lr=1e-3, grad_norm=1.0, tokens=10,
                                      step_seconds=0.1, tokens_per_second=100.0, model_flops=1.0, mfu=0.1,
                                      rank_step_seconds=[0.1]))
    writer.close(final_dir=tmp_path / "final")
    board, failing = FakeTracker.opened
    assert [step for step, _ in failing.logged] == [1, 2] and failing.finished == []
    assert [step for step, _ in board.logged] == [1, 2, 3, 4, 5] and board.finished == [tmp_path / "final"]
    assert warnings == ["warning: wandb tracker stopped (ConnectionError: server went away); training goes on "
                        "without it, metrics.jsonl has every step"]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]
    state = json.loads((tmp_path / TRACKERS_FILE).read_text())   # a resume continues its run, after step 2
    assert state == {"wandb": {"run": {"run_id": failing.run_id}, "sent": {"train": 2}}}


def test_a_tracker_that_cannot_start_warns_and_is_left_out(tmp_path):
    warnings = []

    def unreachable(run, previous):
        raise OSError("connection refused")

    trackers = Trackers.open(("tensorboard", "mlflow"), TrackerRun(output_dir=tmp_path, run_name="r"),
                             warn=warnings.append, types={"tensorboard": FakeBoard, "mlflow": unreachable})
    trackers.log(train(1))
    assert [t.name for t in trackers.active] == ["tensorboard"]
    assert not (tmp_path / TRACKERS_FILE).exists()     # no run to continue
    assert warnings == ["warning: mlflow tracker could not start (OSError: connection refused); training goes on "
                        "without it, metrics.jsonl has every step"]


def recipe(trackers, **env):
    return parse_recipe(f"logging:\n  trackers: {json.dumps(trackers)}\n", overrides=[
        f"env.{name}={value}" for name, value in env.items()])


def test_a_tracker_library_that_is_not_installed_is_named_with_its_pip_install(monkeypatch):
    monkeypatch.setattr(tracker_checks.importlib.util, "find_spec", lambda name: None)
    problems = tracker_problems(recipe(["tensorboard", "wandb", "mlflow"]), {"WANDB_MODE": "offline"})
    assert [p.render() for p in problems] == [
        "logging.trackers: wandb: tracker wandb is not installed (fix: pip install wandb (or pip install "
        "'deepfleet[tracking]') on every host, or remove wandb from logging.trackers)",
        "logging.trackers: mlflow: tracker mlflow is not installed (fix: pip install mlflow-skinny (or pip install "
        "'deepfleet[tracking]') on every host, or remove mlflow from logging.trackers)"]


def test_wandb_online_needs_a_key_from_the_environment_the_recipe_or_netrc(tmp_path):
    no_netrc = tmp_path / "none"
    assert "no API key" in tracker_problems(recipe(["wandb"]), {}, netrc_path=no_netrc)[0].what
    assert tracker_problems(recipe(["wandb"]), {"WANDB_API_KEY": "k"}, netrc_path=no_netrc) == []
    assert tracker_problems(recipe(["wandb"], WANDB_API_KEY="k"), {}, netrc_path=no_netrc) == []
    assert tracker_problems(recipe(["wandb"]), {"WANDB_MODE": "offline"}, netrc_path=no_netrc) == []
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert tracker_problems(recipe(["wandb"]), {}, netrc_path=netrc) == []
    other_server = {"WANDB_BASE_URL": "https://wandb.example.org"}
    assert "no ~/.netrc entry for wandb.example.org" in tracker_problems(recipe(["wandb"]), other_server,
                                                                         netrc_path=netrc)[0].what


def test_mlflow_server_that_does_not_answer_is_one_problem_without_its_password():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    uri = f"http://user:hunter2@127.0.0.1:{port}"
    problems = tracker_problems(recipe(["mlflow"]), {"MLFLOW_TRACKING_URI": uri})
    assert len(problems) == 1 and problems[0].where == "MLFLOW_TRACKING_URI"
    assert "hunter2" not in problems[0].render() and f"http://user:****@127.0.0.1:{port}" in problems[0].what
    assert tracker_problems(recipe(["mlflow"]), {"MLFLOW_TRACKING_URI": "sqlite:///x.db"}) == []


def test_mlflow_probe_takes_any_answer_and_gives_up_after_its_timeout():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401 if self.path == "/private/health" else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)                # accepts the connection, never answers
    try:
        assert mlflow_server_error(f"http://127.0.0.1:{server.server_port}") is None
        assert mlflow_server_error(f"http://127.0.0.1:{server.server_port}/private") is None
        assert "timed out" in mlflow_server_error(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
    finally:
        server.shutdown()
        silent.close()


def test_importing_deepfleet_loads_no_tracker_library():
    code = ("import sys, deepfleet.cli.app, deepfleet.train.tracker_set, deepfleet.train.preflight, deepfleet.prepare;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'mlflow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_rank0_hosts_probe_decides_which_tracker_libraries_are_installed():
    from deepfleet.fleet.facts import HostFacts
    from deepfleet.fleet.host_hardware import hardware_from_facts
    from deepfleet.fleet.inventory import Host

    def probed(packages):
        return hardware_from_facts(HostFacts(host=Host(name="gpu1", address="10.0.0.1"), data={"packages": packages}))

    assert probed({"wandb": {"version": "0.31.0"}, "mlflow_skinny": {"version": None}}).trackers == {"wandb"}
    assert probed({"torch": {"version": "2.13.0"}}).trackers is None     # recorded before the probe asked
    problems = tracker_problems(recipe(["wandb", "mlflow"]), {"WANDB_MODE": "offline"}, installed=frozenset({"wandb"}),
                                host="gpu1")
    assert [p.what for p in problems] == ["tracker mlflow is not installed on gpu1 (rank 0's host)"]
