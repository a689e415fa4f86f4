"""Hypothesis profiles: ``ci`` (the default; bounded examples so the suite fits a 2-core machine)
and ``thorough`` (select with ``HYPOTHESIS_PROFILE=thorough``)."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
