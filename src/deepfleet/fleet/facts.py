"""Head side of the probe: build its argv and stdin, run it on every host, parse typed facts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Sequence

from deepfleet.fleet.inventory import Host
from deepfleet.fleet.ssh import RemoteResult, SshFailure, SshOptions, run_on_hosts
from deepfleet.env_vars import masked

# Exec the fleet's python when it exists there, else any python3, so a missing interpreter is
# reported as a finding instead of hiding every other fact of that host.
_PICK_PYTHON = 'if [ -x "$1" ]; then exec "$1" -; else exec python3 -; fi'


def probe_argv(python: str) -> list[str]:
    return ["sh", "-c", _PICK_PYTHON, "sh", python]


PROBE_FILES = ("remote_probe_gpus.py", "remote_probe_build.py", "remote_probe_manifest.py", "remote_probe.py")   # in the order they run


def probe_source() -> str:
    return "\n".join(resources.files("deepfleet.fleet").joinpath(name).read_text() for name in PROBE_FILES)


def probe_stdin(params: dict[str, Any]) -> bytes:
    """The probe program plus its parameters; parameters travel on stdin, never on argv."""
    return (probe_source() + f"\nmain(json.loads({json.dumps(params)!r}))\n").encode()


@dataclass(frozen=True, kw_only=True)
class HostFacts:
    host: Host
    data: dict[str, Any] | None        # the probe's JSON; None when the host could not be probed
    failure: SshFailure | None = None
    error: str | None = None           # probe ran but failed (e.g. no python at all)
    sent_at: float = 0.0               # head clock (time.time) just before ssh started
    received_at: float = 0.0           # head clock when the answer arrived
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.data is not None

    def get(self, *path: str, default: Any = None) -> Any:
        value: Any = self.data
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return default
            value = value[key]
        return value

    def skew_bounds(self) -> tuple[float, float] | None:
        """Interval that must contain (host clock - head clock), from the probe's two readings."""
        if self.data is None or "time_start" not in self.data:
            return None
        low = self.data["time_end"] - self.received_at
        high = self.data["time_start"] - self.sent_at
        return (low, max(low, high))

    def to_record(self) -> dict[str, Any]:
        """A JSON-able record, used by `doctor --record` and by the unit tests' recorded facts."""
        env = masked(dict(self.host.env))   # records are shared to debug; secrets stay out
        return {"host": vars(self.host) | {"env": [list(p) for p in env.items()]}, "data": self.data,
                "failure": vars(self.failure) if self.failure else None, "error": self.error,
                "sent_at": self.sent_at, "received_at": self.received_at, "seconds": self.seconds}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "HostFacts":
        host_fields = dict(record["host"])
        host_fields["env"] = tuple(tuple(p) for p in host_fields.get("env", ()))
        failure = SshFailure(**record["failure"]) if record.get("failure") else None
        return cls(host=Host(**host_fields), data=record["data"], failure=failure, error=record.get("error"),
                   sent_at=record["sent_at"], received_at=record["received_at"], seconds=record["seconds"])


def facts_from_result(result: RemoteResult) -> HostFacts:
    # Per host: the fleet's ssh processes start one after another, and a shared start time would
    # make the skew's lower bound (time_end - received_at) too high.
    sent_at = result.started_at
    received_at = sent_at + result.seconds
    common = dict(host=result.host, sent_at=sent_at, received_at=received_at, seconds=result.seconds)
    if result.failure:
        return HostFacts(data=None, failure=result.failure, **common)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    try:
        data = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        data = None
    if not result.ok or data is None:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return HostFacts(data=None, error=f"probe failed (exit {result.returncode}): {tail}", **common)
    return HostFacts(data=data, **common)


async def probe_hosts(hosts: Sequence[Host], *, python_for: Callable[[Host], str],
                      params_for: Callable[[Host], dict[str, Any]], options: SshOptions,
                      timeout: float, on_done: Callable[[RemoteResult], None] | None = None) -> list[HostFacts]:
    results = await run_on_hosts(hosts, lambda h: probe_argv(python_for(h)), options=options, timeout=timeout,
                                 stdin=lambda h: probe_stdin(params_for(h)), on_done=on_done)
    return [facts_from_result(result) for result in results]
