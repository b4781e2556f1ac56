"""Hypothesis profiles: "ci" (the default: deterministic, bounded, writes no example database) and "fuzz"
(`make fuzz`: many more examples), chosen by DEEPFLEET_HYPOTHESIS_PROFILE."""

import os

from hypothesis import HealthCheck, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=60, deadline=5000, derandomize=True, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("fuzz", max_examples=3000, deadline=None, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.load_profile(os.environ.get("DEEPFLEET_HYPOTHESIS_PROFILE", "ci"))
