"""How precisely can a fused bf16 kernel compute the InfoNCE gradients? A CPU emulation.

Run from the repository root::

    python -m benchmarks.info_nce_precision            # markdown table, N=256, M=4096, D=128
    python -m benchmarks.info_nce_precision --json     # one JSON object per row

The math. Queries ``q [N, D]`` and keys ``k [M, D]`` hold bf16 values (so a bf16 kernel sees
them exactly). Logits ``s = q k^T / tau`` (tau = 0.1), ``p = softmax(s)`` over the keys, targets
``t [N, M]`` with rows summing to 1: "sparse" (one key per row) or "dense" (4 keys per row with
weights 0.4, 0.3, 0.2, 0.1, like geometric overlap targets). With the loss the mean over rows,
row ``i`` receives the upstream gradient ``g_i = 1/N`` and::

    ds = g (p - t) / tau,    dq = ds @ k,    dk = ds^T @ q.

Near convergence the softmax mass on the targets, ``p_pos_i = sum over t_ij > 0 of p_ij``,
approaches 1, ``p - t`` is small (its entries sum in absolute value to ``2 (1 - p_pos)`` when
``p`` matches ``t`` on the targets) and so are ``dq`` and ``dk``. A kernel that rounds ``p`` to a
format of unit roundoff ``u`` *before* subtracting the target makes an error of about
``u * p_pos`` on a gradient of size ``1 - p_pos``: its relative error grows like
``u / (1 - p_pos)``. Forming ``p - t`` in fp32 and rounding the difference keeps it near ``u``.

What it measures. For each setting (inputs) and option (a way a kernel could round), the
gradients are emulated in float64 with explicit rounding steps (``x.to(bf16).to(float64)``; fp32
accumulation of the matmuls is taken as exact) and compared with float64 ``dq``, ``dk`` from the
same bf16 inputs: per-row relative error ``|dq_i - exact_i| / |exact_i|`` (median and max over
rows; for ``dk`` over the keys that are some row's target, and the max over all keys), and the
normwise error ``|dq - exact|_F / |exact|_F``. Every option's result is rounded to bf16 at the
end, as the op returns the input dtype. bf16's unit roundoff is ``2**-8``.

Options (``p`` is the fp32 softmax, taken as exact):

- ``bf16_p``: ``dq = g/tau (bf16(p) @ k - t @ k)``, ``dk = (bf16(g p)^T @ q - (g t)^T @ q) / tau``;
  the dense part goes through the bf16 matmul, the target part is subtracted afterwards in fp32
  (as attention's forward with V = K would compute ``p @ k``).
- ``tf32_p``: the same with ``p`` rounded to tf32 (10 explicit mantissa bits).
- ``hilo_bf16_p``: the same with ``p = hi + lo`` split into two bf16 matmuls,
  ``hi = bf16(p)``, ``lo = bf16(p - hi)``.
- ``fp16_p``: the same with ``p``, ``k`` and ``q`` in fp16, whose narrow range loses the tiny
  ``g p`` (subnormal below ``2**-14``, 0 below ``2**-25``): it shows in ``dk`` of untargeted keys.
- ``ds_bf16``: ``p - t`` formed in fp32 per tile, then rounded to bf16 before the matmul:
  ``dq = bf16(p - t) @ k * g/tau``, ``dk = bf16(g (p - t))^T @ q / tau``.
- ``reference``: the torch reference on bf16 inputs computes in fp32 and rounds ``dq``, ``dk`` to
  bf16: the exact value rounded once. It is the bar of the tolerance rule
  ``|fast - exact| <= |reference - exact| + tol``.

Inputs. Keys are random unit rows (normalised in fp32, rounded to bf16); each row's target keys
are distinct random keys (other rows may share them). In the "random" setting (unconverged)
queries are random unit rows too. In the converged settings query ``i`` lies in the span of its
target keys, chosen so that ``q_i . k_j = c + tau log t_ij`` on its targets: every target logit
is ``c / tau + log t_ij``, so ``p`` is proportional to ``t`` on the targets, and the logit scale
``c`` sets ``p_pos`` (bisected so that the median ``p_pos`` is the requested level). Unit queries
cannot get there: against 4096 random unit keys at tau = 0.1 the negatives' ``sum exp(s_ij)`` is
about ``4096 e^0.4`` while ``e^(1/tau)`` is 22026, which caps ``p_pos`` near 0.8. A query of norm
``r`` is a unit query at temperature ``tau / r``, so these settings stand for converged models at
a lower effective temperature.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

F64 = torch.float64
DENSE_WEIGHTS = (0.4, 0.3, 0.2, 0.1)
LEVELS = (0.5, 0.9, 0.99, 0.999)
METRICS = ("dq_med", "dq_max", "dq_fro", "dk_med", "dk_max", "dk_max_all", "dk_fro")


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` (round to nearest even), back in float64."""
    return x.to(dtype).to(F64)


def bf16(x):
    return cast(x, torch.bfloat16)


def fp16(x):
    return cast(x, torch.float16)


def fp32(x):
    return cast(x, torch.float32)


def round_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` rounded to ``bits`` significant bits (round to nearest even), exponent unbounded."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return torch.ldexp(torch.round(mantissa * 2**bits), exponent - bits)


def tf32(x):
    return round_bits(fp32(x), 11)  # 10 explicit mantissa bits + the implicit one


def hi_lo(x):
    """``hi + lo`` with ``hi = bf16(x)``, ``lo = bf16(x - hi)``: two bf16 matmuls summed in fp32."""
    hi = bf16(x)
    return hi + bf16(x - hi)


def targets_after(rnd):
    """Option: ``rnd(p)`` and ``rnd`` operands through the matmul, the target part after."""

    def option(p, t, q, k, g, tau):
        dq = g / tau * (rnd(p) @ rnd(k) - t @ k)
        dk = (rnd(g * p).T @ rnd(q) - (g * t).T @ q) / tau
        return dq, dk

    return option


def ds_bf16(p, t, q, k, g, tau):
    """Option: ``p - t`` formed in fp32, rounded to bf16 before the matmul."""
    d = fp32(fp32(p) - t)
    return bf16(d) @ k * (g / tau), bf16(fp32(g * d)).T @ q / tau


def reference(p, t, q, k, g, tau):
    """Option: the exact gradients (rounded to bf16 like every option's result)."""
    ds = g * (p - t) / tau
    return ds @ k, ds.T @ q


OPTIONS = {
    "bf16_p": targets_after(bf16),
    "tf32_p": targets_after(tf32),
    "hilo_bf16_p": targets_after(hi_lo),
    "fp16_p": targets_after(fp16),
    "ds_bf16": ds_bf16,
    "reference": reference,
}


def unit_bf16(x: torch.Tensor) -> torch.Tensor:
    return bf16(F.normalize(x.float(), dim=1))


def softmax_and_p_pos(q, k, t, tau):
    p = torch.softmax(q @ k.T / tau, dim=1)
    return p, (p * (t > 0)).sum(1)


def converged_queries(k, idx, weights, t, tau, level, iters=30):
    """Queries in the span of their target keys with ``p`` proportional to ``t`` on them and the
    logit scale ``c`` bisected (in log space) so that the median ``p_pos`` is ``level``."""
    kt = k[idx]  # [N, w, D] target keys
    gram = kt @ kt.transpose(1, 2)

    def queries(c):  # q_i . k_j = c + tau log t_ij on the targets
        alpha = torch.linalg.solve(gram, (1 + tau / c * weights.log()).expand_as(idx))
        return c * (alpha.unsqueeze(1) @ kt).squeeze(1)

    lo, hi = 0.05, 20.0
    for _ in range(iters):
        c = (lo * hi) ** 0.5
        if softmax_and_p_pos(queries(c), k, t, tau)[1].median() < level:
            lo = c
        else:
            hi = c
    c = (lo * hi) ** 0.5
    return bf16(queries(c)), c


def make_setting(kind, level, n, m, d, tau, gen):
    """``(q, k, t, c)`` for targets ``kind`` ("sparse"/"dense") at median ``p_pos`` ``level``
    (``None``: random queries); ``c`` is the queries' logit scale (``None`` when random)."""
    k = unit_bf16(torch.randn(m, d, generator=gen))
    weights = torch.tensor(DENSE_WEIGHTS if kind == "dense" else (1.0,), dtype=F64)
    idx = torch.rand(n, m, generator=gen).argsort(dim=1)[:, : len(weights)]
    t = torch.zeros(n, m, dtype=F64).scatter_(1, idx, weights.expand_as(idx))
    if level is None:
        return unit_bf16(torch.randn(n, d, generator=gen)), k, t, None
    q, c = converged_queries(k, idx, weights, t, tau, level)
    return q, k, t, c


def row_errors(a, exact):
    return (a - exact).norm(dim=1) / exact.norm(dim=1)


def errors(dq, dk, exact_dq, exact_dk, is_target):
    eq, ek = row_errors(dq, exact_dq), row_errors(dk, exact_dk)
    return {
        "dq_med": eq.median().item(),
        "dq_max": eq.max().item(),
        "dq_fro": ((dq - exact_dq).norm() / exact_dq.norm()).item(),
        "dk_med": ek[is_target].median().item(),
        "dk_max": ek[is_target].max().item(),
        "dk_max_all": ek.max().item(),
        "dk_fro": ((dk - exact_dk).norm() / exact_dk.norm()).item(),
    }


def study(n=256, m=4096, d=128, tau=0.1, levels=LEVELS, kinds=("sparse", "dense"), seed=0):
    """One dict per (setting, option): the setting, its median ``p_pos`` and logit scale, and
    the relative errors ``METRICS`` of the option's bf16 ``dq``/``dk`` against float64."""
    gen = torch.Generator().manual_seed(seed)
    settings = [("sparse", None)] + [(kind, level) for kind in kinds for level in levels]
    rows = []
    for kind, level in settings:
        q, k, t, c = make_setting(kind, level, n, m, d, tau, gen)
        p, p_pos = softmax_and_p_pos(q, k, t, tau)
        g = torch.full((n, 1), 1.0 / n, dtype=F64)
        exact_dq, exact_dk = reference(p, t, q, k, g, tau)
        is_target = (t > 0).any(0)
        name = "random" if level is None else f"{kind} {level}"
        for option, fn in OPTIONS.items():
            dq, dk = fn(p, t, q, k, g, tau)
            rows.append(
                {
                    "setting": name,
                    "targets": kind,
                    "level": level,
                    "scale": c,
                    "option": option,
                    "p_pos": p_pos.median().item(),
                    **errors(bf16(dq), bf16(dk), exact_dq, exact_dk, is_target),
                }
            )
    return rows


def table(rows) -> str:
    head = [
        "setting",
        "option",
        "p_pos",
        "dq med",
        "dq max",
        "dq F",
        "dk med",
        "dk max",
        "dk max (all keys)",
        "dk F",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], r["option"], f"{r['p_pos']:.4g}"] + [f"{r[x]:.1e}" for x in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    args = ap.parse_args(argv)
    rows = study(args.n, args.m, args.d)
    print("\n".join(json.dumps(r) for r in rows) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
