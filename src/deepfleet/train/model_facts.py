"""What the head knows and checks of the model before launch, without importing torch or transformers.

The head needs the model's family (one deepfleet trains correctly, with this packing and these LoRA
targets) and its shape (the planner's memory table, the checkpoint size). Both come from transformers:
its config classes fill in what config.json leaves out, and the parameter counts come from the model
built on the meta device. Importing transformers (and torch under it) costs the head 4-5 s of every
launch, so the facts are computed through transformers once and kept in
$XDG_CACHE_HOME/deepfleet/models, keyed by everything they are computed from: config.json's bytes
(the built-in model: its tokenizer's files), the transformers version, the deepfleet code that
computes them, and the recipe fields they depend on. Hub ids and models that ship their own code are
never kept: there is no file here to key them on.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from deepfleet.data_cache import default_cache_root
from deepfleet.errors import DeepfleetError
from deepfleet.plan.memory import ModelShape
from deepfleet.plan.recipe import TINY_MODEL_NAME, Recipe
from deepfleet.train.families import FAMILIES, Family, check_packing
from deepfleet.train.tokenizer import tiny_tokenizer_dir

FACTS_FORMAT = 1
# The code the facts are computed by: a change to any of these computes them again.
FACTS_CODE = ("plan/memory.py", "train/families.py", "train/model.py", "train/builtin.py", "train/model_facts.py")


@dataclass(frozen=True, kw_only=True)
class ModelFacts:
    model_type: str     # a key of FAMILIES: the family check passed
    shape: ModelShape   # for the recipe's method, LoRA rank and targets

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]


def model_facts(recipe: Recipe, *, cache_dir: Path | None = None) -> ModelFacts:
    """The model's family and shape, checked against the recipe (a DeepfleetError names what is wrong)."""
    key = facts_key(recipe)
    path = (cache_dir or facts_cache_dir()) / f"{key}.json" if key else None
    facts = _read(path) if path else None
    if facts is None:
        facts = _facts_through_transformers(recipe)
        if path:
            _write(path, facts)
    check_packing(facts.family, packing=recipe.data.packing)
    return facts


def facts_cache_dir() -> Path:
    return default_cache_root().parent / "models"


def facts_key(recipe: Recipe) -> str | None:
    """A digest of everything the facts depend on; None when the config is not a plain local file."""
    source = _config_source(recipe)
    if source is None:
        return None
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for part in (str(FACTS_FORMAT).encode(), importlib.metadata.version("transformers").encode(),
                 *((package / name).read_bytes() for name in FACTS_CODE), source,
                 json.dumps([recipe.method, recipe.lora.r, recipe.lora.target_modules,
                             recipe.model.trust_remote_code]).encode()):
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()


def _config_source(recipe: Recipe) -> bytes | None:
    if recipe.model.name == TINY_MODEL_NAME:   # its config is built from the tokenizer's vocabulary and tokens
        files = sorted(p for p in tiny_tokenizer_dir().rglob("*") if p.is_file())
        return b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in files)
    config = Path(recipe.model.name).expanduser() / "config.json"
    try:
        raw = config.read_bytes()
        own_code = "auto_map" in json.loads(raw)
    except (OSError, ValueError, TypeError):   # a Hub id, or a config transformers will name the problem of
        return None
    return None if own_code else raw


def _facts_through_transformers(recipe: Recipe) -> ModelFacts:
    from deepfleet.plan.memory import model_shape_from_config
    from deepfleet.train.model import load_model_config, model_family

    config = load_model_config(recipe.model)
    family = model_family(recipe, config)
    shape = model_shape_from_config(config, method=recipe.method, lora_rank=recipe.lora.r,
                                    lora_targets=recipe.lora.target_modules)
    return ModelFacts(model_type=family.model_type, shape=shape)


def _read(path: Path) -> ModelFacts | None:
    """The kept facts, or None when there are none (or they are unreadable: they are computed again)."""
    try:
        data = json.loads(path.read_text())
        facts = ModelFacts(model_type=data["model_type"], shape=ModelShape(**data["shape"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return facts if facts.model_type in FAMILIES else None


def _write(path: Path, facts: ModelFacts) -> None:
    """Complete or absent (atomic rename); a cache that cannot be written only costs the next launch time."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"model_type": facts.model_type, "shape": asdict(facts.shape)}) + "\n")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def check_model_source(recipe: Recipe) -> None:
    """A local model dir must exist and hold a config.json (Hub ids are checked when they load)."""
    name = recipe.model.name
    if name == TINY_MODEL_NAME:
        return
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        state = "has no config.json" if path.is_dir() else "does not exist"
        raise DeepfleetError(f"model path {str(path)!r} {state}", where="model.name",
                             fix="point model.name at a local HF model dir (with config.json) or use a Hub id")


def check_method_supported(recipe: Recipe, *, cuda_available: bool | None = None,
                           bitsandbytes_installed: bool | None = None) -> None:
    """QLoRA needs CUDA and bitsandbytes (on the hosts: the head passes their facts, a rank looks at its
    own); say so before any rank starts."""
    if recipe.method != "qlora":
        return
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise DeepfleetError("method qlora needs a CUDA GPU (4-bit bitsandbytes kernels); none is visible",
                             where="method", fix="use method: lora on this machine, or run on GPU hosts")
    if bitsandbytes_installed is None:
        bitsandbytes_installed = importlib.util.find_spec("bitsandbytes") is not None
    if not bitsandbytes_installed:
        raise DeepfleetError("method qlora needs the bitsandbytes package, which is not installed",
                             where="method", fix="pip install 'deepfleet[qlora]', or use method: lora")
    if recipe.deepspeed.zero == 3:
        raise DeepfleetError("method qlora cannot be combined with ZeRO-3 here", where="deepspeed.zero",
                             fix="use deepspeed.zero: 2 with qlora")
