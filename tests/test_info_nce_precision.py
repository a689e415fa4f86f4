"""``benchmarks.info_nce_precision``: the emulated roundings behave as the error analysis says.

Notation: u = 2**-8 is bf16's unit roundoff (8 significant bits: ``|bf16(x) - x| <= u |x|``).
The bounds below hold per row; ``k`` rows are unit (up to bf16 rounding) and at these sizes a
key's cosine with another random key stays below ~0.35 (4 standard deviations at D = 128).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.info_nce_precision import (
    OPTIONS,
    bf16,
    fp16,
    make_setting,
    reference,
    round_bits,
    row_errors,
    softmax_and_p_pos,
    study,
)

U = 2.0**-8
LEVEL = 0.99
TAU = 0.1


@pytest.fixture(scope="module")
def rows():
    found = study(n=64, m=512, d=128, levels=(LEVEL,), kinds=("sparse", "dense"))
    return {(r["setting"], r["option"]): r for r in found}


def test_round_bits_matches_torch_casts():
    # fp32 values (so no double rounding) within fp16's normal range, random signs
    gen = torch.Generator().manual_seed(0)
    magnitude = torch.exp2(torch.empty(10000).uniform_(-14, 15, generator=gen))
    x = torch.where(torch.rand(10000, generator=gen) < 0.5, -magnitude, magnitude).double()
    assert torch.equal(round_bits(x, 8), bf16(x))
    assert torch.equal(round_bits(x, 11), fp16(x))


def test_settings_reach_the_requested_p_pos(rows):
    assert {r["option"] for r in rows.values()} == set(OPTIONS)
    for kind in ("sparse", "dense"):
        assert abs(rows[f"{kind} {LEVEL}", "reference"]["p_pos"] - LEVEL) < 1e-3
    assert rows["random", "reference"]["p_pos"] < 0.1


def test_reference_is_one_bf16_rounding(rows):
    # every entry of the exact result moves by at most u |x|, so every row by at most u |row|
    for (setting, option), r in rows.items():
        if option == "reference":
            assert max(r["dq_max"], r["dk_max_all"]) <= U, setting


def test_bf16_p_degrades_like_u_over_one_minus_p_pos(rows):
    # Sparse row i with target key k_t, p_t = p_pos_i: exact dq_i = g/tau ((p_t - 1) k_t +
    # sum_neg p_j k_j), of norm <= 2 g/tau (1 - p_t) (|k| = 1 up to u). bf16_p's error before the
    # final rounding is g/tau sum_j delta_j k_j, delta_j = bf16(p_j) - p_j; its component along k_t
    # is at least |delta_t| - u sum_neg p_j = |delta_t| - u (1 - p_t). So the relative error is
    # >= |delta_t| / (2 (1 - p_t)) - u/2 before, and >= that - u - O(u^2) after, the final rounding.
    # |delta_t| is a fraction of u (the bf16 grid spacing just below 1 is 2u): the error grows
    # like u / (1 - p_pos), while the reference's stays <= u.
    q, k, t, _ = make_setting("sparse", LEVEL, 64, 512, 128, TAU, torch.Generator().manual_seed(1))
    p, p_pos = softmax_and_p_pos(q, k, t, TAU)
    g = torch.full((64, 1), 1 / 64, dtype=torch.float64)
    exact = reference(p, t, q, k, g, TAU)[0]
    rel = row_errors(bf16(OPTIONS["bf16_p"](p, t, q, k, g, TAU)[0]), exact)
    delta = (bf16(p_pos) - p_pos).abs()
    assert (rel >= 0.9 * delta / (2 * (1 - p_pos)) - 2 * U).all()
    assert rel.median() > 10 * rows[f"sparse {LEVEL}", "reference"]["dq_med"]


@pytest.mark.parametrize("setting", ["random", f"sparse {LEVEL}", f"dense {LEVEL}"])
@pytest.mark.parametrize("option", ["ds_bf16", "hilo_bf16_p"])
def test_rounding_after_the_subtraction_stays_within_a_few_u(rows, setting, option):
    # ds_bf16: bf16(p - t) errs by <= u |p - t| per entry, so row i by <= u sum_j |p_ij - t_ij|
    # = 2u (1 - p_pos) (p is proportional to t on the targets), while |exact_i| >= (1 - p_pos) times
    # 1 - max cos ~ 0.65 (sparse) or |sum_j t_j k_j| - max cos ~ 0.55 (dense, 4 near-orthogonal
    # keys): at most ~3.6u, plus u for the final rounding. That worst case needs every rounding
    # aligned; the per-entry errors are independent and add in quadrature, so < 4u holds with room.
    # hilo_bf16_p: hi + lo = p within u^2 p per entry (lo's rounding of |p - hi| <= u p), so row i
    # errs by <= u^2 sum_j p_ij = u^2, i.e. u^2 / (0.55 (1 - p_pos)) ~ 0.7u relative at
    # p_pos = 0.99, plus u. dk sums over rows whose terms could cancel; here a key is the target of
    # few rows, so the same bounds apply to its rows.
    r = rows[setting, option]
    for metric in ("dq_max", "dk_max", "dk_max_all", "dq_fro", "dk_fro"):
        assert r[metric] < 4 * U, metric


def test_unconverged_gradients_are_fine_for_every_option(rows):
    # random queries: p_t ~ 1/M so |exact_i| ~ |k_t| ~ 1, and rounding p errs by <= u sum_j p_j = u
    for option in OPTIONS:
        assert rows["random", option]["dq_max"] < 4 * U, option
