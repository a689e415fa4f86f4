"""Everything under tests/gpu/ needs CUDA; without it the tests are reported as skipped.

Under ``python -m benchmarks.gpu_check`` the tests share a time cap: past the moment in
``MGC_GPU_CHECK_DEADLINE`` (``time.time()``) the remaining tests are skipped with that reason, so
that pytest still ends with its report instead of being killed."""

import os
import time

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


def pytest_runtest_setup(item):
    deadline = os.environ.get("MGC_GPU_CHECK_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("the GPU check's time for tests/gpu was up")
