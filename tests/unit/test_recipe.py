import sys

import pytest

from deepfleet.cli.app import main
from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe_io import load_recipe, parse_recipe


def problems(text, overrides=()):
    with pytest.raises(DeepfleetError) as info:
        parse_recipe(text, "r.yaml", overrides)
    return [p.render() for p in info.value.problems]


def test_defaults_are_the_builtin_demo():
    recipe = parse_recipe("", "r.yaml")
    assert recipe.model.name == "builtin:tiny"
    assert recipe.data.train == ["builtin:tasks"]


def test_unknown_keys_all_reported_with_line_and_suggestion():
    found = problems("model: builtin:tiny\ntrian:\n  lr: 1\ntrain:\n  lrr: 3\n")
    assert any(p.startswith("r.yaml:2: unknown key trian") and 'did you mean "train"' in p for p in found)
    assert any(p.startswith("r.yaml:5: unknown key train.lrr") and 'did you mean "lr"' in p for p in found)


def test_bad_values_name_key_path_and_line():
    found = problems("train:\n  micro_batch: 0\ndeepspeed:\n  zero: 5\n")
    assert any(p.startswith("r.yaml:2: train.micro_batch") for p in found)
    assert any(p.startswith("r.yaml:4: deepspeed.zero") for p in found)


def test_overrides_parse_yaml_values_and_reject_typos():
    recipe = parse_recipe("", "r.yaml", ["train.lr=1e-3", "data.train=a.jsonl", "deepspeed.zero=3"])
    assert recipe.train.lr == pytest.approx(1e-3)
    assert recipe.data.train == ["a.jsonl"]
    assert recipe.deepspeed.zero == 3
    assert any('did you mean "max_length"' in p for p in problems("", ["data.max_lenght=4"]))


def test_deepspeed_shorthands():
    assert parse_recipe("deepspeed: auto").deepspeed.zero == "auto"
    assert parse_recipe("deepspeed: my_ds.json").deepspeed.config == "my_ds.json"
    assert parse_recipe("deepspeed: 3").deepspeed.zero == 3


def test_invalid_yaml_reports_line():
    found = problems("model: [unclosed\ntrain: {}\n")
    assert found[0].startswith("r.yaml:")


@pytest.mark.parametrize("key,value", [("lr", ".inf"), ("lr", ".nan"), ("epochs", ".inf"), ("warmup", "-.inf")])
def test_infinite_and_nan_numbers_are_refused(key, value):
    [in_file] = problems(f"train:\n  {key}: {value}\n")
    assert in_file.startswith(f"r.yaml:2: train.{key}: Input should be a finite number")
    [overridden] = problems("", [f"train.{key}={value}"])
    assert overridden.startswith(f"command line (train.{key}={value}): train.{key}:")


@pytest.mark.parametrize("item", ["train.lr=[", "x={a: [", "x=!!python/object:os.system", "x={a: 1, a: 2}"])
def test_override_value_that_is_bad_yaml_is_one_line_error(item):
    [found] = problems("", [item])
    assert found.startswith(f"command line ({item}): value is not valid YAML")
    assert found.endswith("(fix: quote the value or fix its YAML)") and "\n" not in found


def test_recipe_that_is_not_utf8(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("model: builtin:tiny\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DeepfleetError) as info:
        load_recipe(path)
    [problem] = info.value.problems
    assert problem.where == f"{path}:2" and "not UTF-8 text" in problem.what


def test_overrides_reach_into_shorthand_sections():
    recipe = parse_recipe("model: builtin:tiny\ndeepspeed: auto\n", "r.yaml",
                          ["model.revision=main", "model.name=org/m", "deepspeed.zero=2"])
    assert (recipe.model.name, recipe.model.revision, recipe.deepspeed.zero) == ("org/m", "main", 2)
    recipe = parse_recipe("deepspeed: my_ds.json\n", "r.yaml", ["deepspeed.offload_optimizer=cpu"])
    assert (recipe.deepspeed.config, recipe.deepspeed.offload_optimizer) == ("my_ds.json", "cpu")
    assert parse_recipe("deepspeed: 3\n", "r.yaml", ["deepspeed.nvme_path=/n"]).deepspeed.zero == 3


def test_errors_caused_by_overrides_name_the_command_line():
    found = problems("train:\n  lr: 1\n  micro_batch: 0\n", ["train.lr=abc", "trian.lr=1"])
    assert any(p.startswith("command line (train.lr=abc): train.lr:") for p in found)
    assert any(p.startswith("command line (trian.lr=1): unknown key trian") and 'did you mean "train"' in p
               for p in found)
    assert any(p.startswith("r.yaml:3: train.micro_batch") for p in found)
    [whole_section] = problems("", ["deepspeed=7"])
    assert whole_section.startswith("command line (deepspeed=7): deepspeed.zero")


@pytest.mark.parametrize("seed", [-1, 2**32, 99999999999999999999])
def test_seed_must_fit_in_32_bits(seed):
    [found] = problems(f"train:\n  seed: {seed}\n")
    assert found.startswith("r.yaml:2: train.seed:")
    assert parse_recipe(f"train: {{seed: {2**32 - 1}}}").train.seed == 2**32 - 1


@pytest.mark.parametrize("name", ["A=B", "BAD NAME", "1X", ""])
def test_env_names_must_be_variable_names(name):
    [found] = problems(f'env:\n  NCCL_DEBUG: WARN\n  "{name}": x\n')
    assert found.startswith(f"r.yaml:3: env.{name}: not an environment variable name")
    assert parse_recipe("env: {NCCL_DEBUG: WARN, _X1: y}").env == {"NCCL_DEBUG": "WARN", "_X1": "y"}


@pytest.mark.parametrize("text,line,key", [("train:\n  lr: 1\n  lr: 2\n", 3, "lr"),
                                           ("model: a\ntrain: {}\nmodel: b\n", 3, "model"),
                                           ("env: {A: x, A: y}\n", 1, "A")])
def test_duplicate_keys_are_errors_at_the_second(text, line, key):
    [found] = problems(text)
    assert found.startswith(f"r.yaml:{line}: duplicate key {key} (first on line")


def test_yaml_merge_keys_may_be_overridden():
    recipe = parse_recipe("train:\n  <<: {lr: 0.1, seed: 1}\n  lr: 0.2\n")
    assert (recipe.train.lr, recipe.train.seed) == (0.2, 1)


@pytest.mark.parametrize("text,key", [("deepspeed: true", "deepspeed.zero"), ("deepspeed: {zero: true}", "deepspeed.zero"),
                                      ("train: {global_batch: true}", "train.global_batch"),
                                      ("train: {lr: false}", "train.lr"), ("checkpoint: {keep: yes}", "checkpoint.keep")])
def test_booleans_are_not_numbers(text, key):
    [found] = problems(text)
    assert found.startswith(f"r.yaml:1: {key}: ")
    assert "is not a number" in found


def test_booleans_still_fine_where_booleans_go():
    recipe = parse_recipe("data: {packing: false}\nresume: false\nmodel: {trust_remote_code: true}")
    assert (recipe.data.packing, recipe.resume, recipe.model.trust_remote_code) == (False, False, True)


def test_empty_output_dir_is_refused():
    with pytest.raises(DeepfleetError) as info:
        parse_recipe("", overrides=["output_dir="])
    assert info.value.render().startswith("error: command line (output_dir=): output_dir:")


EMPTY_RECIPES = {"zero bytes": b"", "whitespace": b"  \n\t\n", "comments": b"# a recipe, one day\n\n# maybe\n",
                 "byte-order mark": b"\xef\xbb\xbf", "mark and comment": b"\xef\xbb\xbf# todo\n",
                 "document marker": b"---\n"}


@pytest.mark.parametrize("content", EMPTY_RECIPES.values(), ids=EMPTY_RECIPES.keys())
def test_empty_recipe_file_is_an_error_not_every_default(tmp_path, content):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(DeepfleetError) as info:
        load_recipe(path)
    [problem] = info.value.problems
    assert (problem.where, problem.what) == (str(path), "recipe is empty")


def test_recipe_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xef\xbb\xbftrain: {lr: 0.002}\n")
    assert load_recipe(path).train.lr == 0.002


@pytest.mark.parametrize("args", [
    ["plan", "{recipe}"], ["train", "{recipe}", "--dry-run"], ["bench", "train", "{recipe}"],
    ["check-ds-config", "{ds}", "--recipe", "{recipe}"], ["doctor", "--hostfile", "{hosts}", "--recipe", "{recipe}"],
])
def test_every_command_that_reads_a_recipe_refuses_an_empty_one(monkeypatch, capsys, tmp_path, args):
    paths = {"recipe": tmp_path / "r.yaml", "ds": tmp_path / "ds.json", "hosts": tmp_path / "hosts"}
    paths["recipe"].write_text("# nothing yet\n")
    paths["ds"].write_text('{"zero_optimization": {"stage": 2}}')
    paths["hosts"].write_text("gpu1.invalid slots=1\n")
    monkeypatch.setattr(sys, "argv", ["deepfleet", *(a.format(**paths) for a in args)])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.splitlines() == [err.strip()], err
    assert err.startswith(f"error: {paths['recipe']}: recipe is empty (fix: ")


def test_chunked_loss_setting():
    assert parse_recipe("").train.chunked_loss == "auto"
    assert parse_recipe("train:\n  chunked_loss: false\n").train.chunked_loss is False
    assert parse_recipe("", "r.yaml", ["train.chunked_loss=true"]).train.chunked_loss is True
    assert any('did you mean "chunked_loss"' in p for p in problems("train:\n  chunked_los: true\n"))
    assert any(p.startswith("r.yaml:2: train.chunked_loss") for p in problems("train:\n  chunked_loss: sometimes\n"))


def test_compile_setting():
    assert parse_recipe("").train.compile == "auto"
    assert parse_recipe("train:\n  compile: false\n").train.compile is False
    assert parse_recipe("", "r.yaml", ["train.compile=true"]).train.compile is True
    assert any('did you mean "compile"' in p for p in problems("train:\n  compil: true\n"))
    assert any(p.startswith("r.yaml:2: train.compile: 'max-autotune' is not auto, true or false")
               for p in problems("train:\n  compile: max-autotune\n"))
