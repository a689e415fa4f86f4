"""Build entry point. Metadata lives in pyproject.toml; the native csrc/ extension is added here
by its own issue (built only when MGC_KERNELS_BUILD_EXT=1, so a plain install needs no compiler)."""
from setuptools import setup

setup()
