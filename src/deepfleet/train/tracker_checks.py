"""Head-side checks of `logging.trackers` before any rank starts: the library is installed, W&B online
has an API key, an MLflow tracking server answers. One problem each, with the fix.

The environment checked is the one rank 0 gets from the head: the launching shell's (WANDB_* and
MLFLOW_* are forwarded) and the recipe's `env:`. A ~/.netrc holding the W&B key counts only on the
head; on a fleet, rank 0's host needs its own (or WANDB_API_KEY, which is forwarded).
"""

from __future__ import annotations

import importlib.util
import netrc
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Mapping

from deepfleet.errors import Problem, exception_summary
from deepfleet.plan.recipe import Recipe

WHERE = "logging.trackers"
INSTALL = {"wandb": "pip install wandb", "mlflow": "pip install mlflow-skinny"}   # the library's import name is the tracker's
WANDB_QUIET_MODES = frozenset({"offline", "disabled", "dryrun"})
WANDB_DEFAULT_HOST = "api.wandb.ai"
PROBE_SECONDS = 3.0


def tracker_problems(recipe: Recipe, environ: Mapping[str, str], *, installed: frozenset[str] | None = None,
                     host: str | None = None, netrc_path: Path | None = None,
                     probe: Callable[[str], str | None] | None = None) -> list[Problem]:
    """Every tracker problem rank 0 would meet at its start; [] when there are none. `installed`: the
    tracker libraries on rank 0's host `host` (from its probe); None: those importable here, on the head."""
    env = {**environ, **recipe.env}
    problems: list[Problem] = []
    for name in recipe.logging.enabled_trackers:
        missing = (name not in installed) if installed is not None else importlib.util.find_spec(name) is None
        if name in INSTALL and missing:
            on_host = f" on {host} (rank 0's host)" if installed is not None and host else ""
            problems.append(Problem(what=f"tracker {name} is not installed{on_host}", where=f"{WHERE}: {name}",
                                    fix=f"{INSTALL[name]} (or pip install 'deepfleet[tracking]') on every host, "
                                        f"or remove {name} from {WHERE}"))
        elif name == "wandb":
            problems += _wandb_problems(env, netrc_path)
        elif name == "mlflow":
            problems += _mlflow_problems(env, probe or mlflow_server_error)
    return problems


def _wandb_problems(env: Mapping[str, str], netrc_path: Path | None) -> list[Problem]:
    mode = env.get("WANDB_MODE", "online").lower()
    if mode in WANDB_QUIET_MODES or env.get("WANDB_API_KEY"):
        return []
    host = urllib.parse.urlparse(env.get("WANDB_BASE_URL", "")).hostname or WANDB_DEFAULT_HOST
    if _netrc_has(netrc_path or Path(env.get("NETRC") or Path.home() / ".netrc"), host):
        return []
    return [Problem(what=f"W&B logs online (WANDB_MODE {mode}) but has no API key: no WANDB_API_KEY and no "
                         f"~/.netrc entry for {host}", where=f"{WHERE}: wandb",
                    fix="export WANDB_API_KEY (forwarded to rank 0, never printed), run `wandb login`, "
                        "or export WANDB_MODE=offline")]


def _netrc_has(path: Path, host: str) -> bool:
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _mlflow_problems(env: Mapping[str, str], probe: Callable[[str], str | None]) -> list[Problem]:
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return [Problem(what="tracker mlflow needs MLFLOW_TRACKING_URI", where=f"{WHERE}: mlflow",
                        fix="export MLFLOW_TRACKING_URI=http://<server>:5000 (or put it in the recipe's env:)")]
    if urllib.parse.urlparse(uri).scheme not in ("http", "https"):
        return []
    error = probe(uri)
    if error is None:
        return []
    return [Problem(what=f"MLflow tracking server {shown_uri(uri)} does not answer ({error})",
                    where="MLFLOW_TRACKING_URI",
                    fix="start the server, or fix MLFLOW_TRACKING_URI (the head must reach it as rank 0 will)")]


def shown_uri(uri: str) -> str:
    """The URI without a password in it."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":****@")))


def mlflow_server_error(uri: str, timeout: float = PROBE_SECONDS) -> str | None:
    """None when an HTTP server answers at `uri` within `timeout` seconds (any status: a server behind
    authentication still answers), else why not."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return reason if isinstance(reason, str) else exception_summary(reason)
