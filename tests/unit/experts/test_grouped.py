"""Padded groups of experts: the plan's layout and optimality, and grouped_linear's values and gradients."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.experts.grouped import MAX_GROUP, group_bounds, group_cost, grouped_linear, grouped_relu_mlp, plan_groups


def _cost(bounds, counts, threads):
    return sum(group_cost(e - s, max(counts[s:e]), threads) for s, e in bounds)


def _compositions(n):
    """Every split of range(n) into contiguous blocks of 1..MAX_GROUP."""
    if n == 0:
        yield []
        return
    for size in range(1, min(MAX_GROUP, n) + 1):
        for rest in _compositions(n - size):
            yield [(0, size)] + [(s + size, e + size) for s, e in rest]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=40))
def test_plan_is_a_contiguous_padded_layout(counts):
    plan = plan_groups(counts, threads=2)
    assert plan.groups[0].start == 0 and plan.groups[-1].end == len(counts)
    row = 0
    for g, nxt in itertools.zip_longest(plan.groups, plan.groups[1:]):
        if nxt is not None:
            assert nxt.start == g.end
        assert 1 <= g.end - g.start <= MAX_GROUP
        assert g.cap >= max(counts[g.start:g.end]) and g.row == row
        row += (g.end - g.start) * g.cap
    assert plan.rows == row
    # Each group of the split is computed whole but for its experts without rows, at its own cap.
    for start, end in group_bounds(counts, threads=2):
        cap = max(counts[start:end])
        spans = [g for g in plan.groups if start <= g.start < end]
        assert spans[0].start == start and spans[-1].end == end
        for g in spans:
            if g.cap == 0:
                assert not any(counts[g.start:g.end])
            else:
                assert g.cap == cap
                # A lone expert keeps a neighbour: bmm over one matrix may sum differently.
                assert g.end - g.start >= 2 or end - start == 1
    # Every routed row gets its own padded row, inside its expert's block, in order.
    rows_N = plan.padded_rows(torch.tensor(counts))
    assert rows_N.numel() == sum(counts) and rows_N.unique().numel() == rows_N.numel()
    n = 0
    for e, c in enumerate(counts):
        assert rows_N[n:n + c].tolist() == list(range(plan.base[e], plan.base[e] + c))
        n += c


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_plan_is_optimal_against_brute_force(seed, threads):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 60, (12,), generator=gen).tolist()
    bounds = group_bounds(counts, threads=threads)
    best = min(_cost(b, counts, threads) for b in _compositions(len(counts)))
    assert _cost(bounds, counts, threads) == best


def test_groups_fill_every_thread():
    # Equal counts: with 2 threads the plan never leaves a thread idle on an odd group.
    plan = plan_groups([50] * 20, threads=2)
    assert all((g.end - g.start) % 2 == 0 for g in plan.groups) and plan.rows == 1000


def test_plan_pads_far_less_than_one_batch_at_many_experts():
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.randint(0, 256, (32768,), generator=gen), minlength=256).tolist()
    plan = plan_groups(counts, threads=2)
    one_batch = 256 * max(counts)
    assert plan.rows < 1.1 * sum(counts) < one_batch / 1.1


def _per_expert(x_RI, w_EIO, b_EO, plan):
    """The definition, one expert block at a time."""
    y = x_RI.new_zeros(x_RI.shape[0], w_EIO.shape[-1])
    for g in plan.groups:
        for i, e in enumerate(range(g.start, g.end)):
            r = g.row + i * g.cap
            y[r:r + g.cap] = x_RI[r:r + g.cap] @ w_EIO[e] + (0 if b_EO is None else b_EO[e])
    return y


@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_values_and_gradients(bias):
    # Runs of empty experts make a group with no rows, whose weights must get a zero gradient.
    counts = [3, 0, 5, 1, 0, 0, 0, 0, 0, 0, 2, 7, 1, 1, 0, 4, 6, 0]
    plan = plan_groups(counts, threads=2)
    assert any(g.cap == 0 for g in plan.groups) and len(plan.groups) > 2
    x = torch.randn(plan.rows, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(counts), 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(len(counts), 4, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = [x, w] + ([b] if bias else [])
    y = grouped_linear(x, w, b, plan)
    torch.testing.assert_close(y, _per_expert(x, w, b, plan))
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, dy)
    want = torch.autograd.grad(_per_expert(x, w, b, plan), inputs, dy)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)
    empty = [e for g in plan.groups if g.cap == 0 for e in range(g.start, g.end)]
    assert (got[1][empty] == 0).all()
    assert torch.autograd.gradcheck(lambda *t: grouped_linear(*t[:2], t[2] if bias else None, plan),
                                    tuple(inputs))


def test_grouped_linear_rejects_a_buffer_of_the_wrong_size():
    plan = plan_groups([2, 3])
    with pytest.raises(ValueError, match="x has 7 rows; the plan lays out 6"):
        grouped_linear(torch.zeros(7, 2), torch.zeros(2, 2, 2), None, plan)


def test_one_group_pads_every_expert_to_the_largest():
    from moekit.experts.grouped import one_group

    plan = one_group([3, 0, 5])
    assert plan.groups == [(0, 3, 5, 0)] and plan.rows == 15 and plan.base == [0, 5, 10]


def test_grouped_relu_mlp_equals_the_unfused_layers():
    from moekit.experts.grouped import grouped_relu_mlp

    counts = [4, 0, 0, 0, 0, 0, 6, 1, 3, 0, 2, 5]
    plan = plan_groups(counts, threads=2)
    assert any(g.cap == 0 for g in plan.groups)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(plan.rows, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w1, b1 = torch.randn(12, 3, 5, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64)
    w2, b2 = torch.randn(12, 5, 3, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)
    params = [t.requires_grad_() for t in (w1, b1, w2, b2)]
    fused = grouped_relu_mlp(x, w1, b1, w2, b2, plan)
    unfused = grouped_linear(grouped_linear(x, w1, b1, plan).relu(), w2, b2, plan)
    torch.testing.assert_close(fused, unfused)
    dy = torch.randn_like(fused)
    for a, e in zip(torch.autograd.grad(fused, [x, *params], dy), torch.autograd.grad(unfused, [x, *params], dy),
                    strict=True):
        torch.testing.assert_close(a, e)
    assert torch.autograd.gradcheck(lambda *t: grouped_relu_mlp(*t, plan), (x, *params))
    with pytest.raises(ValueError, match="the plan lays out"):
        grouped_relu_mlp(x[1:], w1, b1, w2, b2, plan)


def _bank_and_batch(activation="relu", seed=0):
    import moekit
    from moekit.dispatch import sort_by_expert

    torch.manual_seed(seed)
    experts = moekit.Experts(4, 8, 16, activation, backend="bmm")
    x = torch.randn(40, 8)
    perm = sort_by_expert(torch.randint(0, 4, (40, 2)), 4)
    return experts, x, perm, torch.rand(40, 2)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_reused_gradient_storage_gives_the_same_gradients_and_is_reused(activation):
    experts, x, perm, w = _bank_and_batch(activation)
    grads = []
    for _ in range(3):
        experts.zero_grad(set_to_none=True)  # what optimizers do: the .grad objects go
        experts.forward_tokens(x, perm, w).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in experts.named_parameters()})
        pointers = {n: p.grad.data_ptr() for n, p in experts.named_parameters() if p.dim() == 3}
    for g in grads[1:]:
        for n in g:
            assert torch.equal(g[n], grads[0][n]), n
    # The weight gradients of the last step live in the storage of the first step's.
    experts.zero_grad(set_to_none=True)
    experts.forward_tokens(x, perm, w).pow(2).sum().backward()
    assert {n: p.grad.data_ptr() for n, p in experts.named_parameters() if p.dim() == 3} == pointers


def test_gradients_still_held_are_never_overwritten():
    experts, x, perm, w = _bank_and_batch()
    # Accumulating over two backwards (no zero_grad): the first .grad is alive, so the second
    # backward must not write into its storage; the sum is twice one backward's gradient.
    experts.forward_tokens(x, perm, w).pow(2).sum().backward()
    once = experts.w1.grad.clone()
    experts.forward_tokens(x, perm, w).pow(2).sum().backward()
    torch.testing.assert_close(experts.w1.grad, 2 * once)
    # A view kept after the .grad object is dropped keeps the storage from being reused.
    experts.zero_grad(set_to_none=True)
    experts.forward_tokens(x, perm, w).pow(2).sum().backward()
    kept = experts.w1.grad[0]
    snapshot = kept.clone()
    experts.zero_grad(set_to_none=True)
    experts.forward_tokens(x * 3, perm, w).pow(2).sum().backward()
    assert torch.equal(kept, snapshot)


@pytest.mark.parametrize("relu_mlp", [False, True])
def test_without_a_graph_the_kernels_skip_autograd_and_give_the_same_values(relu_mlp):
    torch.manual_seed(0)
    counts = [3, 0, 5, 2]
    plan = plan_groups(counts, threads=2)
    x = torch.randn(plan.rows, 8)
    w1, b1 = torch.randn(4, 8, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    w2, b2 = torch.randn(4, 6, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)

    def run():
        if relu_mlp:
            return grouped_relu_mlp(x, w1, b1, w2, b2, plan)
        return grouped_linear(x, w1, b1, plan)

    with_graph = run()
    with torch.no_grad():
        without = run()
    assert with_graph.grad_fn is not None and without.grad_fn is None
    assert torch.equal(with_graph.detach(), without)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "swiglu", "clamped_swiglu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [16, 37])
def test_mlp_groups_gives_the_layer_by_layer_values(activation, bias, dtype, hidden):
    import moekit
    from moekit.experts.bank import FUSED_MIN_BLOCK_ROWS
    from moekit.experts.grouped import mlp_groups

    torch.manual_seed(0)
    counts = [400, 0, 0, 270, 330, 1, 0, 250]
    plan = plan_groups(counts, threads=2)
    assert any(g.cap == 0 for g in plan.groups) and len(plan.groups) > 2
    assert plan.block_rows() >= FUSED_MIN_BLOCK_ROWS  # the bank takes the fused kernels
    bank = moekit.Experts(len(counts), 24, hidden, activation, bias=bias, backend="bmm").to(dtype)
    if bias:
        with torch.no_grad():
            for b in (bank.b1, bank.b2, bank.b3):
                if b is not None:
                    b.normal_()
    x = torch.randn(plan.rows, 24, dtype=dtype)
    w1, b1, w2, b2, w3, b3 = (None if t is None else t.detach()
                              for t in (bank.w1, bank.b1, bank.w2, bank.b2, bank.w3, bank.b3))
    up = None if w3 is None else grouped_linear(x, w3, b3, plan)
    expected = grouped_linear(bank.hidden(grouped_linear(x, w1, b1, plan), up), w2, b2, plan)
    got = mlp_groups(x, w1, b1, w3, b3, w2, b2, plan, bank._hidden_in_place)
    with_graph = bank.forward_rows(x, plan)
    assert with_graph.grad_fn is not None
    with torch.no_grad():
        no_graph = bank.forward_rows(x, plan)  # the bank takes mlp_groups without autograd
    assert got.shape == expected.shape
    # The same kernels on blocks instead of the whole: bit for bit, unless an activation with a
    # vectorised approximation (not ReLU) runs over blocks whose size is not a multiple of the
    # vector width, where the block's last elements take the scalar form and may round the last
    # bit differently.
    if activation == "relu" or hidden % 16 == 0:
        assert torch.equal(got, expected) and torch.equal(no_graph, with_graph.detach())
    else:
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(no_graph, with_graph.detach())


def test_mlp_groups_refuses_inputs_that_need_a_graph():
    from moekit.experts.grouped import mlp_groups

    plan = plan_groups([2, 3], threads=2)
    x = torch.randn(plan.rows, 4)
    w1, w2 = torch.randn(2, 4, 6, requires_grad=True), torch.randn(2, 6, 4)
    with pytest.raises(RuntimeError, match="no autograd graph"):
        mlp_groups(x, w1, None, None, None, w2, None, plan, lambda h, up: h.relu_())
    with pytest.raises(ValueError, match="the plan lays out"):
        mlp_groups(x[1:], w1.detach(), None, None, None, w2, None, plan, lambda h, up: h.relu_())


@pytest.mark.parametrize("activation", ["relu", "swiglu", "gelu"])
def test_a_padded_forward_without_autograd_equals_the_forward_with_it(activation):
    experts, x, perm, w = _bank_and_batch(activation)
    with_graph = experts.forward_tokens(x, perm, w)
    assert with_graph.grad_fn is not None
    with torch.no_grad():
        assert torch.equal(experts.forward_tokens(x, perm, w), with_graph.detach())


def _swiglu_inputs(counts, hidden, bias1, bias2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    plan = plan_groups(counts, threads=2)
    num_experts, dim = len(counts), 24

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    x = rand(plan.rows, dim)
    w1, w3, w2 = rand(num_experts, dim, hidden), rand(num_experts, dim, hidden), rand(num_experts, hidden, dim)
    b1 = rand(num_experts, hidden) if bias1 else None
    b2 = rand(num_experts, dim) if bias2 else None
    return plan, (x, w1, b1, w3, w2, b2)


def _swiglu_layer_by_layer(x, w1, b1, w3, w2, b2, plan):
    up = grouped_linear(x, w3, None, plan)
    return grouped_linear(torch.nn.functional.silu(grouped_linear(x, w1, b1, plan)) * up, w2, b2, plan)


@pytest.mark.parametrize("bias1", [False, True])
@pytest.mark.parametrize("bias2", [False, True])
@pytest.mark.parametrize("hidden", [16, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_swiglu_mlp_gives_the_layer_by_layer_values_and_gradients(bias1, bias2, hidden, dtype):
    from moekit.experts.grouped import grouped_swiglu_mlp

    plan, inputs = _swiglu_inputs([40, 0, 0, 7, 33, 1, 0, 25], hidden, bias1, bias2, dtype=dtype)
    assert any(g.cap == 0 for g in plan.groups)
    params = [t for t in inputs if t is not None]
    fused = grouped_swiglu_mlp(*inputs, plan)
    unfused = _swiglu_layer_by_layer(*inputs, plan)
    dy = torch.randn_like(fused)
    got, expected = torch.autograd.grad(fused, params, dy), torch.autograd.grad(unfused, params, dy)
    # Bit for bit where the blocks' widths are whole vectors (see the test of mlp_groups), else
    # within rounding: SiLU and its derivative run on blocks instead of the whole.
    same = torch.equal if hidden % 16 == 0 else (lambda a, b: torch.testing.assert_close(a, b) is None)
    assert same(fused, unfused)
    for a, e in zip(got, expected, strict=True):
        assert same(a, e)
    with torch.no_grad():
        assert same(grouped_swiglu_mlp(*inputs, plan), unfused.detach())
    with pytest.raises(ValueError, match="the plan lays out"):
        grouped_swiglu_mlp(inputs[0][1:], *inputs[1:], plan)


def test_grouped_swiglu_mlp_passes_gradcheck():
    from moekit.experts.grouped import grouped_swiglu_mlp

    plan, inputs = _swiglu_inputs([3, 0, 2, 4], 5, True, True, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: grouped_swiglu_mlp(*t, plan), inputs)


def test_a_swiglu_bank_with_large_blocks_trains_through_the_fused_kernel(monkeypatch):
    import moekit
    import moekit.experts.bank as bank_module
    from moekit.dispatch import sort_by_expert

    calls = []
    fused = bank_module.grouped_swiglu_mlp
    monkeypatch.setattr(bank_module, "grouped_swiglu_mlp", lambda *a: calls.append(1) or fused(*a))
    torch.manual_seed(0)
    experts = moekit.Experts(4, 8, 16, "swiglu", bias=False, backend="bmm")
    x = torch.randn(600, 8)
    perm = sort_by_expert(torch.randint(0, 4, (600, 2)), 4)
    w = torch.rand(600, 2)
    grads = []
    for _ in range(2):
        experts.zero_grad(set_to_none=True)
        experts.forward_tokens(x, perm, w).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in experts.named_parameters()})
    assert len(calls) == 2
    # The same gradients as the layer by layer kernels, and the same from step to step (the
    # gradient storage is reused).
    monkeypatch.setattr(bank_module, "FUSED_MIN_BLOCK_ROWS", 10**9)
    experts.zero_grad(set_to_none=True)
    experts.forward_tokens(x, perm, w).pow(2).sum().backward()
    assert len(calls) == 2
    for n, p in experts.named_parameters():
        assert torch.equal(p.grad, grads[0][n]) and torch.equal(grads[1][n], grads[0][n]), n


# Experts 2, 5, 6 and 9 have no rows but sit between experts that have some: the cost model puts
# them in a padded group with their neighbours; the plan leaves them out.
SPARSE_COUNTS = [3, 1, 0, 2, 1, 0, 0, 1, 2, 0, 3, 1]


def _train_step(bank: moekit.Experts, counts: list[int], seed: int = 0):
    """One forward and backward of the layer's path (``forward_tokens``: padding rows read token 0
    and are combined with weight 0), one token per routed row. Returns (y, dx, weight grads)."""
    from moekit.dispatch import sort_by_expert

    gen = torch.Generator().manual_seed(seed)
    expert_T = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    order = torch.randperm(expert_T.numel(), generator=gen)
    perm = sort_by_expert(expert_T[order, None], len(counts))
    assert perm.counts == counts
    x = torch.randn(expert_T.numel(), bank.dim, generator=gen, requires_grad=True)
    y = bank.forward_tokens(x, perm, torch.rand(expert_T.numel(), 1, generator=gen))
    y.backward(torch.randn(y.shape, generator=gen))
    return y, x.grad, {n: p.grad for n, p in bank.named_parameters()}


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("relu", True), ("gelu", True)])
def test_experts_without_rows_are_never_read(activation, bias):
    counts = SPARSE_COUNTS
    plan, bounds = plan_groups(counts), group_bounds(counts)
    # Left out: the experts of the plan's cap-0 groups, some of them inside a group with rows.
    unread = [e for g in plan.groups if g.cap == 0 for e in range(g.start, g.end)]
    assert any(max(counts[s:e]) > 0 and any(s <= u < e for u in unread) for s, e in bounds)
    bank = moekit.Experts(len(counts), 8, 16, activation, bias=bias, backend="bmm")
    with torch.no_grad():  # NaN weights would poison any output or gradient that read them
        for p in bank.parameters():
            p[unread] = float("nan")
    y, dx, grads = _train_step(bank, counts)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    read = [e for e in range(len(counts)) if e not in unread]
    for name, g in grads.items():
        assert torch.isfinite(g[read]).all(), name
        assert (g[unread] == 0).all(), name


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("relu", True)])
def test_leaving_out_experts_without_rows_keeps_every_value(activation, bias, monkeypatch):
    # The same step with each group computed whole: the same bits, outputs and every gradient
    # (torch's CPU bmm computes each matrix of a batch of two or more alike).
    import moekit.experts.grouped as grouped

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        bank = moekit.Experts(len(SPARSE_COUNTS), 64, 128, activation, bias=bias, backend="bmm")
        skipped = _train_step(bank, SPARSE_COUNTS)
        bank.zero_grad(set_to_none=True)
        monkeypatch.setattr(grouped, "_skip_empty", lambda s, e, c: [(s, e, max(c[s:e]))])
        assert any(g.cap > 0 and 0 in SPARSE_COUNTS[g.start:g.end] for g in plan_groups(SPARSE_COUNTS).groups)
        whole = _train_step(bank, SPARSE_COUNTS)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(skipped[0], whole[0]) and torch.equal(skipped[1], whole[1])
    for name in skipped[2]:
        assert torch.equal(skipped[2][name], whole[2][name]), name


def _cpu_grouped_gemm() -> bool:
    from moekit.experts.bank import cpu_grouped_mm_available

    return cpu_grouped_mm_available(torch.float32)


@pytest.mark.skipif(not _cpu_grouped_gemm(), reason="this torch has no CPU grouped GEMM")
def test_grouped_mm_linear_values_gradients_and_reused_storage():
    from moekit.experts.grouped import GradientBuffers, grouped_mm_linear

    counts = [0, 3, 0, 0, 5, 1, 2, 0]  # runs of experts without rows, first and last among them
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(len(counts), 16, 8, generator=gen, requires_grad=True)
    buffers = GradientBuffers()
    storage = []
    for _ in range(2):
        x = torch.randn(sum(counts), 16, generator=gen, requires_grad=True)
        dy = torch.randn(sum(counts), 8, generator=gen)
        w.grad = None
        y = grouped_mm_linear(x, w, counts, (buffers, "w"))
        want = torch.cat([xe @ w[e] for e, xe in enumerate(x.split(counts))])
        torch.testing.assert_close(y, want)
        y.backward(dy)
        dx_want, dw_want = torch.autograd.grad(want, (x, w), dy)
        torch.testing.assert_close(x.grad, dx_want)
        torch.testing.assert_close(w.grad, dw_want)
        assert (w.grad[[e for e, c in enumerate(counts) if c == 0]] == 0).all()
        storage.append(w.grad.data_ptr())
        assert w.grad.data_ptr() == buffers._buffers["w"].data_ptr()  # the bank's storage, not a new tensor
    # The second step's weight gradient went over the first one's storage: it was freed (w.grad = None).
    assert storage[0] == storage[1]
    with torch.no_grad():  # no graph: the plain grouped GEMM
        torch.testing.assert_close(grouped_mm_linear(x, w, counts), y)
    with pytest.raises(ValueError, match="counts"):
        grouped_mm_linear(x, w, counts[:-1])


@pytest.mark.skipif(not _cpu_grouped_gemm(), reason="this torch has no CPU grouped GEMM")
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_a_bank_without_biases_trains_at_few_rows_through_the_grouped_gemm(activation, monkeypatch):
    import moekit.experts.bank as bank_module

    calls = []
    real = bank_module.grouped_mm_linear
    monkeypatch.setattr(bank_module, "grouped_mm_linear", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    bank = moekit.Experts(len(SPARSE_COUNTS), 16, 32, activation, bias=False)
    got = _train_step(bank, SPARSE_COUNTS)  # 2 rows per expert on average: the grouped GEMM
    assert calls
    bank.zero_grad(set_to_none=True)
    bank.backend = "bmm"
    want = _train_step(bank, SPARSE_COUNTS)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name])
