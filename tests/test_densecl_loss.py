"""DenseCLLoss and dense_argmax_match against formulas written out here; queues; two ranks."""

import pytest
import torch
import torch.nn.functional as F

from _distributed import run_ranks
from mgc_kernels.losses.densecl import DenseCLLoss, dense_argmax_match

TAU = 0.2


def loop_match(f1, f2):
    """argmax_j cos(f1[b, i], f2[b, j]) one pair at a time."""
    out = torch.empty(f1.shape[:2], dtype=torch.long)
    for b in range(f1.shape[0]):
        for i in range(f1.shape[1]):
            cos = [
                F.cosine_similarity(f1[b, i].double(), f2[b, j].double(), dim=0)
                for j in range(f2.shape[1])
            ]
            out[b, i] = int(torch.stack(cos).argmax())
    return out


def moco_ce(q, k, queue):
    """Mean over rows of CE(cat([l_pos, q @ queue.T]) / tau, 0), logits materialised."""
    qn, kn, un = (F.normalize(x, dim=1) for x in (q, k, queue))  # queue rows: unit up to fp32
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ un.T], 1) / TAU
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


def direct_loss(q, k, dq, dk, f1, f2, global_queue, dense_queue, lam):
    """(1 - lambda) L_global + lambda L_dense with [B, S, *] dense inputs."""
    dim = q.shape[1]
    match = loop_match(f1, f2)
    positives = torch.stack([dk[b, match[b]] for b in range(len(dk))])
    l_global = moco_ce(q, k.detach(), global_queue)
    l_dense = moco_ce(dq.reshape(-1, dim), positives.reshape(-1, dim).detach(), dense_queue)
    return (1 - lam) * l_global + lam * l_dense


def batch(gen, b=3, s1=5, s2=6, dim=8, c=7, dtype=torch.float64):
    shapes = [(b, dim), (b, dim), (b, s1, dim), (b, s2, dim), (b, s1, c), (b, s2, c)]
    return [torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]


def leaves(xs):
    return [x.clone().requires_grad_() for x in xs]


# ---- dense_argmax_match -------------------------------------------------------------------------


def test_match_equals_loop():
    gen = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 9, 7, generator=gen)
    f2 = f2 * torch.rand(3, 9, 1, generator=gen) * 10  # scale must not matter: cosine
    got = dense_argmax_match(f1, f2)
    assert got.dtype == torch.long and got.shape == (3, 5)
    assert torch.equal(got, loop_match(f1, f2))
    assert torch.equal(
        dense_argmax_match(f1.bfloat16(), f2.bfloat16()),
        loop_match(f1.bfloat16().float(), f2.bfloat16().float()),
    )


def test_match_known_permutation_and_no_grad():
    gen = torch.Generator().manual_seed(1)
    f1 = torch.randn(2, 6, 16, generator=gen, requires_grad=True)
    perm = torch.stack([torch.randperm(6, generator=gen) for _ in range(2)])
    f2 = torch.stack([f1[b, perm[b]] for b in range(2)]) * 3.0  # f2[b, j] = 3 f1[b, perm[b, j]]
    got = dense_argmax_match(f1, f2)
    assert torch.equal(perm.gather(1, got), torch.arange(6).expand(2, 6))
    assert not got.requires_grad


def test_match_accepts_maps_row_major():
    gen = torch.Generator().manual_seed(2)
    m1, m2 = torch.randn(2, 5, 3, 4, generator=gen), torch.randn(2, 5, 2, 3, generator=gen)
    t1 = torch.stack([m1[:, :, h, w] for h in range(3) for w in range(4)], 1)  # [B, 12, C]
    t2 = torch.stack([m2[:, :, h, w] for h in range(2) for w in range(3)], 1)  # [B, 6, C]
    want = loop_match(t1, t2)
    assert torch.equal(dense_argmax_match(m1, m2), want)
    assert torch.equal(dense_argmax_match(m1, t2), want)
    assert torch.equal(dense_argmax_match(t1, m2), want)


@pytest.mark.parametrize(
    "f1, f2, pattern",
    [
        (torch.zeros(2, 4), torch.zeros(2, 4, 3), "f1 must be"),
        (torch.zeros(2, 4, 3), torch.zeros(3, 4, 3), "f2 must have 2 images"),
        (torch.zeros(2, 4, 3), torch.zeros(2, 4, 5), "f2 must have 3 channels"),
        (torch.zeros(2, 4, 3), torch.zeros(2, 5, 2, 2), "f2 must have 3 channels"),
        (torch.zeros(2, 4, 3, dtype=torch.long), torch.zeros(2, 4, 3), "f1 must have dtype"),
    ],
)
def test_match_errors(f1, f2, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        dense_argmax_match(f1, f2)


# ---- the loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.5, 0.0, 0.3, 1.0])
def test_loss_and_gradients_equal_direct_formula(lam):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    crit = DenseCLLoss(dim=8, queue_size=16, loss_lambda=lam).double()
    gq, dqueue = crit.global_queue.clone(), crit.dense_queue.clone()
    assert torch.allclose(gq.norm(dim=1), torch.ones(16, dtype=torch.float64))
    data = batch(gen)
    ins, ref = leaves(data), leaves(data)
    loss, l_global, l_dense = crit(*ins, return_terms=True)
    expected = direct_loss(*ref, gq, dqueue, lam)
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, expected, rtol=1e-12, atol=0)
    assert torch.allclose((1 - lam) * l_global + lam * l_dense, loss, rtol=1e-12, atol=0)
    assert torch.allclose(l_global, moco_ce(ref[0], ref[1], gq), rtol=1e-12, atol=0)
    loss.backward()
    expected.backward()
    for i in (0, 2):  # q_global, q_dense
        assert torch.allclose(ins[i].grad, ref[i].grad, rtol=1e-9, atol=1e-13)
    for i in (1, 3, 4, 5):  # keys and backbone features: no gradient
        assert ins[i].grad is None


def test_default_hyperparameters_and_buffers():
    crit = DenseCLLoss()
    assert (crit.dim, crit.queue_size, crit.temperature, crit.loss_lambda) == (128, 65536, 0.2, 0.5)
    assert not crit.gather_distributed
    state = crit.state_dict()
    assert set(state) == {"global_queue", "dense_queue", "global_queue_ptr", "dense_queue_ptr"}
    assert state["global_queue"].shape == state["dense_queue"].shape == (65536, 128)
    assert not torch.equal(state["global_queue"], state["dense_queue"])
    assert int(state["global_queue_ptr"]) == 0 and state["dense_queue_ptr"].dtype == torch.long


def test_maps_equal_tokens():
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 8, generator=gen), torch.randn(2, 8, generator=gen)
    dq, dk = torch.randn(2, 8, 2, 3, generator=gen), torch.randn(2, 8, 3, 2, generator=gen)
    f1, f2 = torch.randn(2, 5, 2, 3, generator=gen), torch.randn(2, 5, 3, 2, generator=gen)
    torch.manual_seed(0)
    crit = DenseCLLoss(dim=8, queue_size=16)
    state = {n: t.clone() for n, t in crit.state_dict().items()}  # state_dict() aliases
    maps = crit(q, k, dq, dk, f1, f2)
    crit.load_state_dict(state)
    tokens = crit(q, k, *(x.flatten(2).transpose(1, 2) for x in (dq, dk, f1, f2)))
    assert torch.allclose(maps, tokens, rtol=1e-6)


def test_bf16_inputs_give_fp32_loss_and_fp32_queues():
    gen = torch.Generator().manual_seed(5)
    data = batch(gen, dtype=torch.bfloat16)
    torch.manual_seed(0)
    crit = DenseCLLoss(dim=8, queue_size=16)
    queues = [crit.global_queue.bfloat16().double(), crit.dense_queue.bfloat16().double()]
    loss = crit(*data)
    assert loss.dtype == torch.float32
    expected = direct_loss(*(x.double() for x in data), *queues, 0.5)
    assert torch.allclose(loss.double(), expected, rtol=2e-2)
    assert crit.global_queue.dtype == crit.dense_queue.dtype == torch.float32


def test_compile_fullgraph_matches_eager_including_queues():
    gen = torch.Generator().manual_seed(11)
    steps = [batch(gen, dtype=torch.float32) for _ in range(2)]
    torch.manual_seed(0)
    eager = DenseCLLoss(dim=8, queue_size=16)
    compiled_module = DenseCLLoss(dim=8, queue_size=16)
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for data in steps:
        q_e, q_c = leaves(data[:1]) + leaves(data[:1])
        loss_e, loss_c = eager(q_e, *data[1:]), compiled(q_c, *data[1:])
        loss_e.backward()
        loss_c.backward()
        assert torch.allclose(loss_c, loss_e, rtol=1e-5)
        assert torch.allclose(q_c.grad, q_e.grad, rtol=1e-5, atol=1e-7)
    for name, value in eager.state_dict().items():
        assert torch.allclose(compiled_module.state_dict()[name], value, atol=1e-6), name


# ---- queues -------------------------------------------------------------------------------------


def simulate_enqueue(queue, ptr, keys):
    """Write keys one at a time at ptr, ptr + 1, ... modulo K."""
    queue = queue.clone()
    for key in keys:
        queue[ptr] = key
        ptr = (ptr + 1) % len(queue)
    return queue, ptr


@pytest.mark.parametrize("size, b", [(10, 4), (5, 12), (6, 6)])
def test_enqueue_contents_and_pointer_with_wrap_around(size, b):
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(1)
    crit = DenseCLLoss(dim=8, queue_size=size)
    gq, dq, ptr = crit.global_queue.clone(), crit.dense_queue.clone(), 0
    for step in range(4):
        q, k, qd, kd, f1, f2 = batch(gen, b=b, dtype=torch.float32)
        crit(q, k, qd, kd, f1, f2)
        pooled = F.normalize(kd.mean(1), dim=1)  # normalised per-image mean of raw keys
        gq, new_ptr = simulate_enqueue(gq, ptr, F.normalize(k, dim=1))
        dq, _ = simulate_enqueue(dq, ptr, pooled)
        ptr = new_ptr
        assert int(crit.global_queue_ptr) == int(crit.dense_queue_ptr) == ptr
        assert ptr == (step + 1) * b % size
        assert torch.allclose(crit.global_queue, gq, atol=1e-6)
        assert torch.allclose(crit.dense_queue, dq, atol=1e-6)
        assert torch.allclose(crit.dense_queue.norm(dim=1), torch.ones(size), atol=1e-6)


def test_pooled_key_is_normalised_after_pooling():
    kd = torch.tensor([[[10.0, 0.0], [0.0, 1.0]]])  # mean (5, 0.5): normalise-then-pool differs
    torch.manual_seed(0)
    crit = DenseCLLoss(dim=2, queue_size=3)
    crit(
        torch.randn(1, 2),
        torch.randn(1, 2),
        torch.randn(1, 2, 2),
        kd,
        torch.randn(1, 2, 4),
        torch.randn(1, 2, 4),
    )
    assert torch.allclose(crit.dense_queue[0], F.normalize(torch.tensor([5.0, 0.5]), dim=0))


def test_eval_mode_and_update_flag():
    gen = torch.Generator().manual_seed(7)
    data = batch(gen, dtype=torch.float32)
    crit = DenseCLLoss(dim=8, queue_size=16).eval()
    before = {n: t.clone() for n, t in crit.state_dict().items()}
    crit(*data)
    assert all(torch.equal(t, before[n]) for n, t in crit.state_dict().items())
    crit(*data, update=True)
    assert int(crit.global_queue_ptr) == 3
    crit.train()
    crit(*data, update=False)
    assert int(crit.global_queue_ptr) == 3


def test_state_dict_round_trip_resumes_exactly():
    gen = torch.Generator().manual_seed(8)
    steps = [batch(gen, dtype=torch.float32) for _ in range(3)]
    torch.manual_seed(2)
    crit = DenseCLLoss(dim=8, queue_size=7)
    for data in steps[:2]:
        crit(*data)
    torch.manual_seed(3)  # a fresh module starts from other queues
    fresh = DenseCLLoss(dim=8, queue_size=7)
    assert not torch.equal(fresh.global_queue, crit.global_queue)
    fresh.load_state_dict(crit.state_dict())
    assert torch.equal(crit(*steps[2]), fresh(*steps[2]))
    for name, value in crit.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert int(fresh.global_queue_ptr) == 3 * 3 % 7


# ---- two ranks ----------------------------------------------------------------------------------


def _two_rank_steps(rank, world, seed, steps, b):
    gen = torch.Generator().manual_seed(seed)
    data = [batch(gen, b=b * world, dtype=torch.float64) for _ in range(steps)]
    torch.manual_seed(seed)
    crit = DenseCLLoss(dim=8, queue_size=10, gather_distributed=True).double()
    out = []
    for full in data:
        mine = leaves([x.chunk(world)[rank] for x in full])
        loss = crit(*mine)
        loss.backward()
        out.append({"loss": loss.detach(), "grad_q": mine[0].grad, "grad_dq": mine[2].grad})
    return {"steps": out, "state": crit.state_dict()}


def test_two_ranks_equal_one_process():
    seed, steps, b, world = 9, 3, 3, 2  # 6 keys a step into a queue of 10: wraps around
    ranks = run_ranks(_two_rank_steps, world, seed, steps, b)
    gen = torch.Generator().manual_seed(seed)
    data = [batch(gen, b=b * world, dtype=torch.float64) for _ in range(steps)]
    torch.manual_seed(seed)
    crit = DenseCLLoss(dim=8, queue_size=10).double()
    for t, full in enumerate(data):
        ins = leaves(full)
        loss = crit(*ins)
        loss.backward()
        mean = sum(r["steps"][t]["loss"] for r in ranks) / world
        assert torch.allclose(mean, loss.detach(), rtol=1e-12, atol=0)
        for r, res in enumerate(ranks):  # each rank: world_size x its share of the gradient
            for key, i in (("grad_q", 0), ("grad_dq", 2)):
                assert torch.allclose(
                    res["steps"][t][key], world * ins[i].grad.chunk(world)[r], rtol=1e-9, atol=1e-13
                )
    for name, value in crit.state_dict().items():
        for res in ranks:
            got = res["state"][name].to(value.dtype)
            assert torch.allclose(got, value, rtol=0, atol=1e-12), name
    assert int(crit.global_queue_ptr) == steps * b * world % 10


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"queue_size": 0}, "queue_size"),
        ({"queue_size": -4}, "queue_size"),
        ({"queue_size": 2.5}, "queue_size"),
        ({"queue_size": True}, "queue_size"),
        ({"loss_lambda": -0.1}, "loss_lambda"),
        ({"loss_lambda": 1.5}, "loss_lambda"),
        ({"loss_lambda": float("nan")}, "loss_lambda"),
        ({"loss_lambda": "0.5"}, "loss_lambda"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": -0.2}, "temperature"),
        ({"dim": 0}, "dim"),
    ],
)
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DenseCLLoss(**kwargs)


def _replace(data, i, x):
    data = list(data)
    data[i] = x
    return data


@pytest.mark.parametrize(
    "i, shape, pattern",
    [
        (0, (3, 6), "q_global must have 8 features"),
        (0, (3, 8, 1), "q_global must have 2 dimensions"),
        (1, (2, 8), "k_global must be"),
        (2, (3, 4, 8), "q_dense must have 5 positions"),
        (2, (2, 5, 8), "q_dense must have 3 images"),
        (2, (3, 5, 6), "q_dense must have 8 features"),
        (2, (3, 8), "q_dense must be"),
        (3, (3, 5, 8), "k_dense must have 6 positions"),
        (3, (3, 8, 2, 2), "k_dense must have 6 positions"),
        (4, (3, 5, 4), "f2 must have 4 channels"),
        (5, (4, 6, 7), "f2 must have 3 images"),
    ],
)
def test_mismatched_shapes_name_the_argument(i, shape, pattern):
    gen = torch.Generator().manual_seed(10)
    data = batch(gen, dtype=torch.float32)
    crit = DenseCLLoss(dim=8, queue_size=16)
    with pytest.raises(ValueError, match=pattern):
        crit(*_replace(data, i, torch.zeros(shape)))
