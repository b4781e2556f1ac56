"""The table of bad recipes and overrides: each through the real CLI (`train --dry-run`, `plan`, `prepare`),
exit 2, one `error: ` line starting as listed, no traceback, nothing written."""

import pytest

from bad_input_harness import GOOD_RECIPE, Case, assert_refused

FIX_VALUES = "(fix: see the commented example in examples/ for allowed values)"
# (recipe text, start of the error line after `error: r.yaml`)
RECIPE_MISTAKES: list[tuple[str | bytes, str]] = [
    ("", ": recipe is empty"),
    ("# only a comment\n---\n", ": recipe is empty"),
    ("model: [\n", ":2: not valid YAML: expected the node content, but found '<stream end>'"),
    ("\x00model: x\n", ":1: not valid YAML: character U+0000 is not allowed in YAML"),
    ("model: x\n\x1b[31m: 1\n", ":2: not valid YAML: character U+001B is not allowed in YAML"),
    (b"model: \xff\n", ":1: recipe is not UTF-8 text (byte 0xff)"),
    ("train:\n  lr: 1\n  lr: 2\n", ":3: duplicate key lr (first on line 2)"),
    ("trian:\n  lr: 1\n", ':1: unknown key trian (did you mean "train"?)'),
    ("\ufefftrian:\n  lr: 1\n", ':1: unknown key trian (did you mean "train"?)'),
    ("train:\n  lrr: 1\n", ':2: unknown key train.lrr (did you mean "lr"?)'),
    ("model:\n  nmae: x\n", ':2: unknown key model.nmae (did you mean "name"?)'),
    ("? \"a\\nb\"\n: 1\n", ":1: unknown key 'a\\nb'"),
    ("train:\n  lr: -1\n", f":2: train.lr: Input should be greater than 0 {FIX_VALUES}"),
    ("train:\n  lr: .nan\n", ":2: train.lr: Input should be a finite number"),
    ("train:\n  global_batch: true\n", ":2: train.global_batch: true is not a number"),
    ("train:\n  max_steps: 1e999\n", ":2: train.max_steps: Input should be a valid integer"),
    ("train:\n  seed: 99999999999999999999\n", ":2: train.seed: Input should be less than 4294967296"),
    ("method: lorra\n", ":1: method: Input should be 'full', 'lora' or 'qlora'"),
    ("precision: bf32\n", ":1: precision: Input should be 'auto', 'bf16', 'fp16' or 'fp32'"),
    ("deepspeed: 5\n", ":1: deepspeed.zero: Input should be 'auto', 0, 1, 2 or 3"),
    ("deepspeed:\n  zero: 4\n", ":2: deepspeed.zero: Input should be 'auto', 0, 1, 2 or 3"),
    ("data:\n  max_length: 4\n", ":2: data.max_length: Input should be greater than or equal to 8"),
    ("data:\n  format: csv\n", ":2: data.format: Input should be 'auto', 'messages', 'alpaca', 'sharegpt' or 'text'"),
    ("train:\n  compile: yes please\n", ":2: train.compile: 'yes please' is not auto, true or false"),
    ("- a\n- b\n", ": a recipe must be a YAML mapping of sections"),
    ("lora:\n  dropout: 1.5\n", ":2: lora.dropout: Input should be less than 1"),
    ("env:\n  1BAD: x\n", ":2: env.1BAD: not an environment variable name"),
    ("output_dir: ''\n", ":1: output_dir: String should have at least 1 character"),
    ("data:\n  validation:\n    split: 2\n", ":3: data.validation.split: Input should be less than 1"),
    ("checkpoint:\n  keep: 0\n", ":2: checkpoint.keep: Input should be greater than or equal to 1"),
    ("logging:\n  every_steps: 0\n", ":2: logging.every_steps: Input should be greater than 0"),
    ("logging:\n  trackers: [tensorboard, wandbb]\n",
     ":2: logging.trackers: unknown tracker 'wandbb' (did you mean \"wandb\"?); trackers are tensorboard, wandb, mlflow"),
]
COMMANDS = [("train", "r.yaml", "--dry-run"), ("plan", "r.yaml", "--nodes", "1", "--gpus-per-node", "1"),
            ("prepare", "r.yaml")]
# (override, start of the error line)
OVERRIDE_MISTAKES = [
    ("logging.trackers=[mlfow]",
     "error: command line (logging.trackers=[mlfow]): logging.trackers: unknown tracker 'mlfow' (did you mean \"mlflow\"?)"),
    ("train.lr=abc", "error: command line (train.lr=abc): train.lr: Input should be a valid number"),
    ("train.lr", "error: command line: override 'train.lr' is not key=value"),
    ("=1", "error: command line: override '=1' is not key=value"),
    ("trian.lr=1", 'error: command line (trian.lr=1): unknown key trian (did you mean "train"?)'),
    ("output_dir.x=1", "error: command line (output_dir.x=1): output_dir is not a section"),
    ("train.lr=[1", "error: command line (train.lr=[1): value is not valid YAML: expected ',' or ']'"),
    ("train.lr=\x1b", "error: command line ('train.lr=\\x1b'): value is not valid YAML: character U+001B"),
    ("train.lr=a\nb", "error: command line ('train.lr=a\\nb'): train.lr: Input should be a valid number"),
    ("model.revision.x=1", "error: command line (model.revision.x=1): model.revision: Input should be a valid string"),
    ("env.1X=a", "error: command line (env.1X=a): env.1X: not an environment variable name"),
]

CASES = [Case(args=command, expected=f"error: r.yaml{expected}", files={"r.yaml": text})
         for text, expected in RECIPE_MISTAKES for command in COMMANDS]
CASES += [Case(args=(command, "r.yaml", override, *extra), expected=expected, files={"r.yaml": GOOD_RECIPE})
          for override, expected in OVERRIDE_MISTAKES for command, *extra in (("train", "--dry-run"), ("prepare",))]
CASES += [
    Case(("train", "missing.yaml", "--dry-run"), "error: missing.yaml: cannot read recipe: No such file or directory"),
    Case(("plan", "missing.yaml"), "error: missing.yaml: cannot read recipe: No such file or directory"),
    Case(("prepare", "r.yaml"), "error: missing.jsonl: data file not found (fix: check data.train",
         files={"r.yaml": "data:\n  train: missing.jsonl\n"}),
    Case(("prepare", "r.yaml"), "error: d.txt: unsupported data file type '.txt'",
         files={"r.yaml": "data:\n  train: d.txt\n", "d.txt": "x\n"}),
    Case(("prepare", "r.yaml"), "error: v.csv: unsupported data file type '.csv' (fix: use .jsonl",
         files={"r.yaml": "data:\n  validation:\n    files: [v.csv]\n", "v.csv": "x\n"}),
    Case(("prepare", "r.yaml"), "error: d.jsonl:2: malformed JSON line: Expecting value (column 1)",
         files={"r.yaml": "data:\n  train: d.jsonl\n", "d.jsonl": '{"text": "a"}\n}\n'}),
    Case(("prepare", "r.yaml"), "error: d.jsonl:1: cannot tell the data format from keys txt",
         files={"r.yaml": "data:\n  train: d.jsonl\n", "d.jsonl": '{"txt": "a"}\n'}),
    Case(("prepare", "r.yaml"), "error: d.json:2: malformed JSON: Expecting value",
         files={"r.yaml": "data:\n  train: d.json\n", "d.json": "[\n"}),
    Case(("prepare", "r.yaml"), "error: d.jsonl: data file holds no records",
         files={"r.yaml": "data:\n  train: d.jsonl\n", "d.jsonl": "\n"}),
    Case(("prepare", "r.yaml"), "error: d.jsonl:1: record has keys text but messages format needs {\"messages\"}",
         files={"r.yaml": "data:\n  train: d.jsonl\n  format: messages\n", "d.jsonl": '{"text": "a"}\n'}),
    Case(("train", "r.yaml", "--dry-run"), "error: nope.json: cannot read DeepSpeed config: No such file",
         files={"r.yaml": "deepspeed: nope.json\n"}),
    Case(("plan", "r.yaml", "--nodes", "1"), "error: ds.json:2: duplicate key \"a\" (first on line 1)",
         files={"r.yaml": "deepspeed: ds.json\n", "ds.json": '{"a": 1,\n "a": 2}\n'}),
    Case(("train", "r.yaml", "--dry-run"), "error: train.global_batch: train.global_batch 4 is not micro_batch 3",
         files={"r.yaml": "train:\n  micro_batch: 3\n  global_batch: 4\n"}),    # Trackers: checked on the head before any rank starts (the key or server rank 0 would need).
    Case(("train", "r.yaml", "--dry-run"), "error: logging.trackers: wandb: W&B logs online (WANDB_MODE online) but "
         "has no API key", files={"r.yaml": GOOD_RECIPE + "logging:\n  trackers: [wandb]\n"},
         env={"WANDB_API_KEY": "", "WANDB_MODE": "online", "NETRC": "{tmp}/no-netrc"}),
    Case(("train", "r.yaml", "--dry-run"), "error: logging.trackers: mlflow: tracker mlflow needs MLFLOW_TRACKING_URI",
         files={"r.yaml": GOOD_RECIPE + "logging:\n  trackers: [tensorboard, mlflow]\n"},
         env={"MLFLOW_TRACKING_URI": ""}),
    Case(("train", "r.yaml", "--dry-run"), "error: MLFLOW_TRACKING_URI: MLflow tracking server http://127.0.0.1:9 "
         "does not answer (ConnectionRefusedError", files={"r.yaml": GOOD_RECIPE + "logging:\n  trackers: mlflow\n"},
         env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
]


@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_bad_recipe_input(case, tmp_path, monkeypatch, capsys):
    assert_refused(case, tmp_path, monkeypatch, capsys)
