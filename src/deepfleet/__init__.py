"""deepfleet: a checked path from a few GPU servers to a fine-tuned LLM trained across all of them.

The Python API (see `deepfleet.api`): `load_recipe`, `plan`, `train`, `export`, and the one error
type `DeepfleetError`. They are imported on first use, so `import deepfleet` stays light (the
host agent on every host imports this package).
"""

import sys
import types

__version__ = "0.1.0"
__all__ = ["DeepfleetError", "export", "load_recipe", "plan", "train"]
_API = ("export", "load_recipe", "plan", "train")


def __getattr__(name: str):
    if name == "DeepfleetError":
        from deepfleet.errors import DeepfleetError
        return DeepfleetError
    if name in _API:
        from deepfleet import api
        return getattr(api, name)
    raise AttributeError(f"module 'deepfleet' has no attribute {name!r}")


class _Package(types.ModuleType):
    # `deepfleet.plan` and `deepfleet.train` are also subpackages; importing one would make the
    # package attribute the module and hide the function. The submodules stay in sys.modules,
    # where `from deepfleet.train.x import y` finds them.
    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
