"""Argument checks shared by the whole library: every message names the argument, what it got
and what was expected.

Shape, dtype and device checks are free and always run. Checks of tensor *values* (finite boxes,
target indices in range) need one host sync per op call; they run in eager mode unless switched
off with ``mgc_kernels.set_value_checks(False)`` or ``MGC_KERNELS_VALUE_CHECKS=0``, and are
skipped while ``torch.compile`` traces (a traced graph cannot raise on data).
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Sequence

import torch
from torch import nn

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_value_checks = os.environ.get("MGC_KERNELS_VALUE_CHECKS", "1").strip() not in (
    "0",
    "false",
    "False",
)


def set_value_checks(enabled: bool) -> None:
    """Turn the data-dependent input checks (one host sync per op call) on or off."""
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled() -> bool:
    return _value_checks and not torch.compiler.is_compiling()


def describe(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def tensor(name: str, x, *, ndim: int | None = None, dtypes=None, kind: str = "") -> torch.Tensor:
    """``x`` is a tensor with ``ndim`` dimensions and one of ``dtypes``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{kind}, got {describe(x)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {describe(x)}")
    return x


def float_tensor(name: str, x, *, ndim: int | None = None, kind: str = "") -> torch.Tensor:
    return tensor(name, x, ndim=ndim, dtypes=FLOAT_DTYPES, kind=kind)


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors live on one device; returns it."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on one device"
            )
    return first.device


def on_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {describe(x)}")


def same_dtype(name: str, x: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if x.dtype != other.dtype:
        raise TypeError(
            f"{name} must have the dtype of {other_name} ({other.dtype}), got {describe(x)}"
        )


def dim_size(name: str, x: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if x.shape[dim] != expected:
        raise ValueError(
            f"{name} must have size {expected} in dimension {dim} ({what}), got {describe(x)}"
        )


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """An integer in ``[low, high]`` (Python's or numpy's, never a bool); returns it as an int."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or not _inside(number, low, high):
        where = _interval(low, high)
        raise ValueError(f"{name} must be an int{' ' + where if where else ''}, got {value!r}")
    return number


def real(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = False,
) -> float:
    """A real number (never a bool) in the interval from ``low`` to ``high``, each end closed
    unless ``*_open``; with ``finite``, also not infinite. Returns it as a float."""
    inside = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and not (finite and not math.isfinite(value))
        and _inside(value, low, high, low_open, high_open)
    )
    if not inside:
        kind = "finite number" if finite else "number"
        where = _interval(low, high, low_open, high_open)
        if low == 0 and low_open and high is None:
            kind, where = f"positive {kind}", ""
        raise ValueError(f"{name} must be a {kind}{' ' + where if where else ''}, got {value!r}")
    return float(value)


def positive(name: str, value) -> float:
    return real(name, value, 0, low_open=True)


def positive_range(name: str, value) -> tuple[float, float]:
    """A pair ``(low, high)`` of finite numbers with ``0 < low <= high``; returns it as floats."""
    try:
        low, high = value
    except (TypeError, ValueError):
        low = high = None
    both_numbers = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (low, high))
    if not (both_numbers and 0 < low <= high < math.inf):
        raise ValueError(
            f"{name} must be a pair (low, high) of numbers with 0 < low <= high < inf, "
            f"got {value!r}"
        )
    return float(low), float(high)


def flag(name: str, value) -> bool:
    # a ValueError like every other hyperparameter check: the caller gave a wrong value for a
    # switch, and 0/1 are refused rather than read as False/True
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def module(name: str, value) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


def _inside(value, low, high, low_open: bool = False, high_open: bool = False) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return bool(above and below)  # False for NaN: every comparison with it is False


def _interval(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if high is None:
        return "" if low is None else f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def per_item(name: str, values, count: int, what: str) -> list:
    """A list or tuple with one entry per ``what`` (``count`` of them)."""
    if isinstance(values, torch.Tensor) or not isinstance(values, Sequence) or len(values) != count:
        length = f" of length {len(values)}" if isinstance(values, Sequence) else ""
        raise ValueError(
            f"{name} must be a list with one entry per {what} ({count}), got "
            f"{type(values).__name__}{length}"
        )
    return list(values)


def positive_ints(name: str, values, min_length: int = 1) -> tuple[int, ...]:
    """A sequence of at least ``min_length`` ints >= 1; a bad entry is named ``name[i]``."""
    if (
        isinstance(values, (str, bytes))
        or not isinstance(values, Sequence)
        or len(values) < min_length
    ):
        size = "non-empty sequence of" if min_length == 1 else f"sequence of at least {min_length}"
        raise ValueError(f"{name} must be a {size} positive ints, got {values!r}")
    return tuple(integer(f"{name}[{i}]", v, 1) for i, v in enumerate(values))


def mixing_weights(name: str, weights, count: int, what: str) -> tuple[float, ...]:
    """One finite non-negative number per ``what`` with a positive sum."""
    if (
        isinstance(weights, (int, float))
        or not isinstance(weights, Sequence)
        or len(weights) != count
        or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
            for w in weights
        )
        or not sum(weights) > 0
    ):
        raise ValueError(
            f"{name} must hold one finite non-negative number per {what} ({count}) "
            f"with a positive sum, got {weights!r}"
        )
    return tuple(float(w) for w in weights)


def grid_cell(grid: int, cell: int) -> int:
    """``cell`` divides ``grid``; returns the number of regions per side, ``grid // cell``."""
    for name, v in (("grid", grid), ("cell", cell)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if grid % cell:
        raise ValueError(f"cell must divide grid, got cell={cell} and grid={grid}")
    return grid // cell


def choice(name: str, value, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def boxes_shape(name: str, b, batch: int | None = None) -> torch.Tensor:
    """Float ``[B, 4]`` (x0, y0, x1, y1) boxes; their values are checked by ``boxes_values``."""
    float_tensor(name, b, ndim=2, kind=" ([B, 4] boxes as x0, y0, x1, y1)")
    dim_size(name, b, 1, 4, "x0, y0, x1, y1")
    if batch is not None:
        dim_size(name, b, 0, batch, "the batch size of the first view")
    return b


def boxes_values(name: str, b: torch.Tensor) -> torch.Tensor:
    """Finite (x0, y0, x1, y1) boxes with positive width and height along the last axis."""
    if not (value_checks_enabled() and b.numel()):
        return b
    # Valid boxes have finite positive widths and heights (a NaN or infinite corner makes its
    # size NaN or infinite): one reduction and one host sync, cheap enough for the single-image
    # calls of data-loader workers. Only when that fails (or a huge valid box overflows its
    # size) are the corners checked one by one, to name the bad box.
    sizes = b[..., 2:] - b[..., :2]
    smallest, largest = torch.stack(torch.aminmax(sizes)).tolist()
    if 0 < smallest <= largest < math.inf:
        return b
    bad = ~(torch.isfinite(b).all(-1) & (b[..., 2] > b[..., 0]) & (b[..., 3] > b[..., 1]))
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"{name} must hold finite (x0, y0, x1, y1) boxes with x1 > x0 and "
            f"y1 > y0; {name}[{', '.join(map(str, i))}] is {b[i].tolist()}"
        )
    return b


def flip_flags(name: str, f, batch: int) -> torch.Tensor:
    tensor(name, f, ndim=1, dtypes=(torch.bool,), kind=" ([B] bool flags)")
    dim_size(name, f, 0, batch, "the batch size of the boxes")
    return f


def view(
    boxes_name: str,
    boxes,
    flips_name: str,
    flips,
    *,
    batch: int | None = None,
    device: torch.device | None = None,
) -> None:
    """One view's ``[B, 4]`` boxes and ``[B]`` flips, on one device (``device`` if given)."""
    boxes_shape(boxes_name, boxes, batch)
    flip_flags(flips_name, flips, boxes.shape[0])
    device = boxes.device if device is None else device
    on_device(boxes_name, boxes, device)
    on_device(flips_name, flips, device)
    boxes_values(boxes_name, boxes)


def views(boxes1, flips1, boxes2, flips2) -> None:
    """Two views of the same ``B`` images, all on one device, boxes of one dtype."""
    view("boxes1", boxes1, "flips1", flips1)
    view("boxes2", boxes2, "flips2", flips2, batch=boxes1.shape[0], device=boxes1.device)
    same_dtype("boxes2", boxes2, "boxes1", boxes1)


def index_range(name: str, idx: torch.Tensor, upper: int, what: str) -> None:
    """Every entry of ``idx`` lies in ``[0, upper)``."""
    if value_checks_enabled() and idx.numel():
        lo, hi = torch.aminmax(idx)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= upper:
            raise ValueError(
                f"{name} must index {what} in [0, {upper}), got values in [{lo}, {hi}]"
            )


def nonnegative_finite(name: str, x: torch.Tensor) -> None:
    if value_checks_enabled() and x.numel():
        if not bool((torch.isfinite(x) & (x >= 0)).all()):
            raise ValueError(
                f"{name} must be finite and >= 0, got {describe(x)} with "
                "negative or non-finite entries"
            )


def embeddings(q, k) -> None:
    """Queries ``[N, D]`` and keys ``[M, D]`` of one float dtype, on one device."""
    float_tensor("q", q, ndim=2, kind=" ([N, D] queries)")
    float_tensor("k", k, ndim=2, kind=" ([M, D] keys)")
    dim_size("k", k, 1, q.shape[1], "the feature width D of q")
    same_dtype("k", k, "q", q)
    same_device(q=q, k=k)


def targets(targets, rows: int, keys: int, device: torch.device, dtype: torch.dtype):
    """``(index [N, P] long, weight [N, P] dtype)`` from hard targets (a ``[N]`` index tensor) or
    sparse soft ones (a pair ``(index, weight)``), each row's weights summing to 1 or 0."""
    if isinstance(targets, torch.Tensor):
        tensor(
            "targets", targets, ndim=1, dtypes=(torch.int64, torch.int32), kind=" ([N] key indices)"
        )
        dim_size("targets", targets, 0, rows, "one target per row of q")
        index = targets.long()[:, None]
        weight = torch.ones(rows, 1, device=targets.device, dtype=dtype)
    elif isinstance(targets, (tuple, list)) and len(targets) == 2:
        index, weight = targets
        tensor(
            "targets[0]",
            index,
            ndim=2,
            dtypes=(torch.int64, torch.int32),
            kind=" ([N, P] key indices)",
        )
        float_tensor("targets[1]", weight, ndim=2, kind=" ([N, P] target weights)")
        if index.shape != weight.shape or index.shape[0] != rows:
            raise ValueError(
                f"targets index and weight must both be [N={rows}, P], got "
                f"{tuple(index.shape)} and {tuple(weight.shape)}"
            )
        on_device("targets[1]", weight, device)
        nonnegative_finite("targets[1]", weight)
        # scale by the row maximum first so that a sum of huge finite weights cannot overflow
        weight = weight.to(dtype)
        peak = weight.amax(1, keepdim=True)
        weight = torch.where(peak > 0, weight / peak, 0.0)
        total = weight.sum(1, keepdim=True)
        index, weight = index.long(), torch.where(total > 0, weight / total, 0.0)
    else:
        got = repr(targets) if isinstance(targets, str) else type(targets).__name__
        raise TypeError(
            "targets must be a LongTensor [N], a tuple (index [N, P], weight [N, P]) "
            f"or 'paired', got {got}"
        )
    on_device("targets", index, device)
    index_range("targets", index, keys, "the rows of k")
    return index.contiguous(), weight.contiguous()
