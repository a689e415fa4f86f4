"""What is measured: the op cases, the loss modules end to end, and a whole training step.

``CASES`` maps each case's name to its :class:`Case`, in the order they run.
"""

from . import losses, ops, train_step  # noqa: F401  (each module registers its cases)
from .base import CASES, FWD, FWD_BWD, STEP, Case, Problem, Unavailable, variant

__all__ = ["CASES", "FWD", "FWD_BWD", "STEP", "Case", "Problem", "Unavailable", "variant"]
