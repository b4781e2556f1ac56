"""Hypothesis profiles: "ci" (the default: deterministic, bounded, writes no example database) and "fuzz"
(`make fuzz`: many more examples), chosen by DEEPFLEET_HYPOTHESIS_PROFILE.

Every process the tests start has this environment's bin dir first on PATH, as deepfleet's ranks do
(`launch.host_agent.with_environment_bin`): DeepSpeed JIT-builds its CPU shm op with whichever `ninja`
is on PATH, and the pip package's ninja (1.13, in the venv) and /usr/bin/ninja (1.11) read each other's
build log as stale. Ranks started by deepfleet and ranks a test starts with its own torchrun then
rebuilt the op at every switch between the two (30-60 s each on 2 cores), instead of once per machine."""

import os
import sys

from hypothesis import HealthCheck, settings

_BIN = os.path.dirname(os.path.abspath(sys.executable))
os.environ["PATH"] = os.pathsep.join([_BIN, *(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                               if p and p != _BIN)])

_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=60, deadline=5000, derandomize=True, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("fuzz", max_examples=3000, deadline=None, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.load_profile(os.environ.get("DEEPFLEET_HYPOTHESIS_PROFILE", "ci"))
