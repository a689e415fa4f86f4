"""Test-session set-up.

Without a GPU, Triton kernels run through Triton's interpreter: ``TRITON_INTERPRET=1`` must be
set before anything imports triton, so it is set here, first. Hypothesis profiles: ``ci`` (the
default; bounded examples so the suite fits a 2-core machine) and ``thorough``
(``HYPOTHESIS_PROFILE=thorough``).
"""

import os

import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
