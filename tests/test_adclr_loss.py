"""ADCLRLoss against the formula written out here (materialised softmaxes), centre updates,
the teacher-temperature schedule, state_dict round trip, two gloo ranks, bad hyperparameters,
and query_attention_mask."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from _distributed import run_ranks
from mgc_kernels.losses.adclr import ADCLRLoss, query_attention_mask

K, D, DT, B, Q, V = 11, 6, 5, 3, 4, 4


def inputs(gen, batch=B, views=V, logits=False):
    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    tw = None if logits else r(K, DT)
    t_width = K if logits else DT
    return dict(
        student_cls=r(views, batch, D).requires_grad_(),
        teacher_cls=r(2, batch, t_width),
        student_query=r(2, batch, Q, D).requires_grad_(),
        teacher_query=r(2, batch, Q, t_width),
        student_weight=(0.5 * r(K, D)).requires_grad_(),
        teacher_weight=tw,
    )


def h(teacher_logits, student_logits, center, tau_t, tau_s=0.1):
    """Mean over rows of -sum softmax((t - c) / tau_t) * log_softmax(s / tau_s)."""
    t = F.softmax((teacher_logits - center) / tau_t, dim=-1)
    return -(t * F.log_softmax(student_logits / tau_s, dim=-1)).sum(-1).mean()


def direct(x, c_cls, c_query, tau_t, query_weight=1.0, query_pairs="cross"):
    w = x["student_weight"]
    tw = x["teacher_weight"]
    t_cls = x["teacher_cls"] if tw is None else x["teacher_cls"] @ tw.T
    t_query = x["teacher_query"] if tw is None else x["teacher_query"] @ tw.T
    s_cls, s_query = x["student_cls"] @ w.T, x["student_query"] @ w.T
    terms = [
        h(t_cls[a], s_cls[b], c_cls, tau_t) for a in range(2) for b in range(len(s_cls)) if b != a
    ]
    cls = sum(terms) / len(terms)
    other = (1, 0) if query_pairs == "cross" else (0, 1)
    query = sum(h(t_query[a], s_query[other[a]], c_query, tau_t) for a in range(2)) / 2
    return cls + query_weight * query, t_cls.reshape(-1, K).mean(0), t_query.reshape(-1, K).mean(0)


@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize("query_pairs", ["cross", "same"])
def test_equals_direct_formula_and_updates_centers(logits, query_pairs):
    gen = torch.Generator().manual_seed(0)
    crit = ADCLRLoss(num_prototypes=K, query_weight=0.7, query_pairs=query_pairs).double()
    crit.center_cls.copy_(torch.randn(K, generator=gen, dtype=torch.float64))
    crit.center_query.copy_(torch.randn(K, generator=gen, dtype=torch.float64))
    c_cls, c_query = crit.center_cls.clone(), crit.center_query.clone()
    x = inputs(gen, logits=logits)
    loss = crit(**x, epoch=7)
    tau_t = 0.04 + 0.03 * 7 / 29
    want, m_cls, m_query = direct(x, c_cls, c_query, tau_t, 0.7, query_pairs)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    leaves = [x["student_cls"], x["student_query"], x["student_weight"]]
    for g, e in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(crit.center_cls, 0.9 * c_cls + 0.1 * m_cls, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        crit.center_query, 0.9 * c_query + 0.1 * m_query, rtol=1e-12, atol=1e-12
    )


def test_without_queries_is_dino_and_leaves_query_center_alone():
    gen = torch.Generator().manual_seed(1)
    crit = ADCLRLoss(num_prototypes=K).double()
    x = inputs(gen, views=2)
    loss = crit(
        x["student_cls"],
        x["teacher_cls"],
        None,
        None,
        x["student_weight"],
        x["teacher_weight"],
        epoch=100,
    )
    t = x["teacher_cls"] @ x["teacher_weight"].T
    s = x["student_cls"] @ x["student_weight"].T
    zero = torch.zeros(K, dtype=torch.float64)
    want = (h(t[0], s[1], zero, 0.07) + h(t[1], s[0], zero, 0.07)) / 2
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(crit.center_query, zero)
    torch.testing.assert_close(crit.center_cls, 0.1 * t.reshape(-1, K).mean(0))


def test_eval_mode_does_not_update_centers():
    gen = torch.Generator().manual_seed(2)
    crit = ADCLRLoss(num_prototypes=K).double().eval()
    crit(**inputs(gen), epoch=0)
    assert not crit.center_cls.any() and not crit.center_query.any()


def test_teacher_temperature_schedule():
    crit = ADCLRLoss(num_prototypes=K)
    assert crit.teacher_temperature_at(0) == pytest.approx(0.04)
    assert crit.teacher_temperature_at(29) == pytest.approx(0.07)
    assert crit.teacher_temperature_at(15) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert crit.teacher_temperature_at(14.5) == pytest.approx(0.04 + 0.03 * 14.5 / 29)
    assert crit.teacher_temperature_at(30) == crit.teacher_temperature_at(800) == 0.07
    assert (
        ADCLRLoss(num_prototypes=K, warmup_teacher_temperature_epochs=0).teacher_temperature_at(0)
        == 0.07
    )
    assert (
        ADCLRLoss(num_prototypes=K, warmup_teacher_temperature_epochs=1).teacher_temperature_at(0)
        == 0.04
    )
    with pytest.raises(ValueError, match="epoch"):
        crit.teacher_temperature_at(-1)


def test_state_dict_round_trip_gives_identical_next_loss():
    gen = torch.Generator().manual_seed(3)
    crit = ADCLRLoss(num_prototypes=K)
    for epoch in range(3):
        crit(**{k: None if v is None else v.float() for k, v in inputs(gen).items()}, epoch=epoch)
    buffer = io.BytesIO()
    torch.save(crit.state_dict(), buffer)
    fresh = ADCLRLoss(num_prototypes=K)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert set(crit.state_dict()) == {"center_cls", "center_query"}
    x = {k: None if v is None else v.float() for k, v in inputs(gen).items()}
    a, b = crit(**x, epoch=3), fresh(**x, epoch=3)
    assert torch.equal(a, b)
    assert torch.equal(crit.center_cls, fresh.center_cls)
    assert torch.equal(crit.center_query, fresh.center_query)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_prototypes=0), "num_prototypes"),
        (dict(num_prototypes=2.5), "num_prototypes"),
        (dict(student_temperature=0), "student_temperature"),
        (dict(teacher_temperature=-1), "teacher_temperature"),
        (dict(warmup_teacher_temperature=0), "warmup_teacher_temperature"),
        (dict(warmup_teacher_temperature_epochs=-1), "warmup_teacher_temperature_epochs"),
        (dict(warmup_teacher_temperature_epochs=2.5), "warmup_teacher_temperature_epochs"),
        (dict(center_momentum=1.5), "center_momentum"),
        (dict(query_weight=-1), "query_weight"),
        (dict(query_pairs="all"), "query_pairs"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ADCLRLoss(**kwargs)


def test_bad_forward_inputs():
    gen = torch.Generator().manual_seed(4)
    crit = ADCLRLoss(num_prototypes=K).double()
    x = inputs(gen)
    with pytest.raises(ValueError, match="student_weight"):
        crit(**{**x, "student_weight": torch.randn(K + 1, D, dtype=torch.float64)}, epoch=0)
    with pytest.raises(ValueError, match="student_cls"):
        crit(**{**x, "student_cls": x["student_cls"][:1]}, epoch=0)
    with pytest.raises(ValueError, match="teacher_cls"):
        crit(**{**x, "teacher_cls": x["teacher_cls"][:, :2]}, epoch=0)
    with pytest.raises(ValueError, match="teacher_query"):
        crit(**{**x, "teacher_query": x["teacher_query"][:, :, :2]}, epoch=0)
    with pytest.raises(ValueError, match="both be given"):
        crit(**{**x, "teacher_query": None}, epoch=0)
    with pytest.raises(ValueError, match="epoch"):
        crit(**x, epoch=-2)


# --------------------------------------------------------------------------- two ranks


def _two_rank_losses(rank, world, gather):
    """Every rank builds the full batch from one seed, keeps its half; rank -1 is the single
    process over the whole batch. Two steps, so the second uses the updated centres."""
    gen = torch.Generator().manual_seed(5)
    crit = ADCLRLoss(num_prototypes=K, gather_distributed=gather).double()
    results = []
    for step in range(2):
        full = inputs(gen, batch=4)
        part = slice(None) if rank < 0 else slice(rank * 4 // world, (rank + 1) * 4 // world)
        mine = {}
        for name, v in full.items():
            if name.endswith("weight"):
                mine[name] = (
                    None
                    if v is None
                    else v.detach().clone().requires_grad_(name == "student_weight")
                )
            else:
                mine[name] = v.detach()[:, part].clone().requires_grad_(name.startswith("student"))
        loss = crit(**mine, epoch=step)
        leaves = [mine["student_cls"], mine["student_query"], mine["student_weight"]]
        grads = torch.autograd.grad(loss, leaves)
        results.append(
            {
                "loss": loss.detach(),
                "grads": [g.detach() for g in grads],
                "center_cls": crit.center_cls.clone(),
                "center_query": crit.center_query.clone(),
            }
        )
    return results


@pytest.mark.parametrize("gather", [True, False])
def test_two_ranks_equal_one_process_over_the_whole_batch(gather):
    single = _two_rank_losses(-1, 1, gather)
    ranks = run_ranks(_two_rank_losses, 2, gather)
    for step in range(2):
        one, r0, r1 = single[step], ranks[0][step], ranks[1][step]
        torch.testing.assert_close(
            (r0["loss"] + r1["loss"]) / 2, one["loss"], rtol=1e-10, atol=1e-12
        )
        # per-rank gradients / world size: the rows' share of the one-process gradient
        for i in (0, 1):
            halves = torch.cat([r0["grads"][i], r1["grads"][i]], dim=1) / 2
            torch.testing.assert_close(halves, one["grads"][i], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(
            (r0["grads"][2] + r1["grads"][2]) / 2, one["grads"][2], rtol=1e-8, atol=1e-12
        )
        for name in ("center_cls", "center_query"):
            assert torch.equal(r0[name], r1[name])
            torch.testing.assert_close(r0[name], one[name], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- attention mask


def test_query_attention_mask_values():
    mask = query_attention_mask(3, 2)
    assert mask.shape == (5, 5) and mask.dtype == torch.bool
    expected = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    additive = query_attention_mask(3, 2, dtype=torch.float32)
    assert torch.equal(additive == 0, expected)
    assert torch.isneginf(additive[~expected]).all()
    assert torch.equal(query_attention_mask(4, 0), torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_global"):
        query_attention_mask(0, 3)
    with pytest.raises(ValueError, match="n_query"):
        query_attention_mask(3, -1)
    with pytest.raises(TypeError, match="dtype"):
        query_attention_mask(3, 1, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_sdpa_global_outputs_ignore_the_queries(dtype):
    gen = torch.Generator().manual_seed(6)
    b, heads, n_global, n_query, d = 2, 3, 5, 4, 8
    mask = query_attention_mask(n_global, n_query, dtype=dtype)

    def attend(queries):
        x = torch.cat([glob, queries], dim=2)
        return F.scaled_dot_product_attention(x, x, x, attn_mask=mask)

    glob = torch.randn(b, heads, n_global, d, generator=gen)
    out1 = attend(torch.randn(b, heads, n_query, d, generator=gen))
    out2 = attend(100 * torch.randn(b, heads, n_query, d, generator=gen))
    torch.testing.assert_close(out1[:, :, :n_global], out2[:, :, :n_global], rtol=0, atol=1e-6)
    plain = F.scaled_dot_product_attention(glob, glob, glob)
    torch.testing.assert_close(out1[:, :, :n_global], plain, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out1[:, :, n_global:], out2[:, :, n_global:])
