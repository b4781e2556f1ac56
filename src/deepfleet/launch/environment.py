"""Which environment variables reach the ranks, and how secrets are kept out of sight (pure).

Propagated: the interface variables chosen for the fleet, every variable of the launching shell
whose name starts with an allowed prefix, and the recipe's or fleet's `env:` section, in that order
(later wins). Values travel to hosts on ssh's stdin, never in argv, so `ps` on a host shows none.
"""

from __future__ import annotations

from typing import Mapping

PROPAGATED_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "CUDA_", "HF_", "WANDB_", "MLFLOW_", "PYTHON", "OMP_")
# Variables that describe the launching machine, not the job; never forwarded.
LOCAL_ONLY = frozenset({"PYTHONHOME", "PYTHONSTARTUP", "PYTHONBREAKPOINT", "CUDA_VISIBLE_DEVICES"})


def interface_env(interface: str | None) -> dict[str, str]:
    """Both gloo and NCCL must be told the interface: gloo otherwise resolves the hostname to 127.0.0.1."""
    if not interface:
        return {}
    return {"GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface}


def job_environment(parent: Mapping[str, str], *, interface: str | None = None,
                    fabric: Mapping[str, str] | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables every rank gets, in precedence order: interface and InfiniBand choice < launching
    shell < recipe/fleet env (so a user's own NCCL_IB_* always wins)."""
    forwarded = {name: value for name, value in parent.items()
                 if name.startswith(PROPAGATED_PREFIXES) and name not in LOCAL_ONLY}
    return {**interface_env(interface), **dict(fabric or {}), **forwarded, **dict(extra or {})}
