"""The CPU engine's C++ decode attention against the PyTorch reference, and the engine with
it against the engine without it (batched SDPA): the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cluster.engine import cpu_kernels
from cluster.engine.attention import paged_attention_ref
from cluster.engine.sequence import SamplingParams
from tests.skips import skip_or_fail
from tests.test_engine import PROMPTS, make_engine


@pytest.fixture(scope="module")
def kernel():
    if cpu_kernels.load() is None:
        skip_or_fail(f"the CPU attention kernel does not build here: {cpu_kernels.failure()}")
    return cpu_kernels.paged_decode


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 4, 32), (14, 2, 64), (4, 4, 128)])
@pytest.mark.parametrize("threads", [1, 4])
def test_kernel_equals_reference(kernel, heads, kv_heads, dim, threads):
    """Six sequences: on one thread the kernel walks each sequence's heads together, on
    four (fewer than two sequences a thread) each (sequence, KV head) apart."""
    g = torch.Generator().manual_seed(heads * dim)
    num_blocks, bs = 64, 16
    k_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=g)
    ctx = [1, 15, 16, 17, 100, 200]  # block boundaries and a one-key context
    tables = torch.zeros(len(ctx), 13, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    used = 0
    for i, c in enumerate(ctx):
        n = -(-c // bs)
        tables[i, :n] = perm[used:used + n]
        used += n
    q = torch.randn(len(ctx), heads, dim, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel(q, k_cache, v_cache, tables, torch.tensor(ctx, dtype=torch.int32), 0.125)
    finally:
        torch.set_num_threads(before)
    want = paged_attention_ref(q, k_cache, v_cache, tables, list(range(len(ctx) + 1)), ctx,
                               0.125)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_engine_tokens_equal_with_and_without_the_kernel(kernel, model_dir):
    from cluster.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    prompts = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    with_kernel = make_engine(model_dir)
    assert with_kernel.runner.model.backend.decode_kernel is not None
    without = make_engine(model_dir, cpu_attention_kernel=False)
    assert without.runner.model.backend.decode_kernel is None
    assert with_kernel.generate(prompts, params) == without.generate(prompts, params)


def test_fused_small_ops_equal_pytorchs(kernel):
    """add + RMS norm, SiLU x up and rotary (on strided views of a qkv projection, as the
    model passes them) against the eager PyTorch ops, to fp32 rounding."""
    from cluster.engine import model

    mod = cpu_kernels.load()
    g = torch.Generator().manual_seed(1)
    x, res = torch.randn(37, 256, generator=g), torch.randn(37, 256, generator=g)
    w = torch.randn(256, generator=g)
    got, want = mod.add_rms_norm(x, res, w, 1e-6), model._add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(got[1], want[1])
    assert torch.allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    gu = torch.randn(37, 2 * 96, generator=g) * 6  # both tails of the sigmoid
    assert torch.allclose(mod.silu_and_mul(gu), model._silu_and_mul(gu), atol=1e-5,
                          rtol=1e-5)
    qkv = torch.randn(37, 8 * 32 + 2 * 4 * 32, generator=g)
    q = qkv[:, :256].view(37, 8, 32)
    k = qkv[:, 256:384].view(37, 4, 32)
    inv = 1.0 / (10000 ** (torch.arange(0, 32, 2) / 32))
    freqs = torch.outer(torch.arange(1024, dtype=torch.float32), inv)
    cos, sin = freqs.cos(), freqs.sin()
    pos = torch.randint(0, 1024, (37,), generator=g)
    (gq, gk), (wq, wk) = mod.rope(q, k, cos, sin, pos), model._rope(q, k, cos, sin, pos)
    assert gq.is_contiguous() and torch.allclose(gq, wq, atol=1e-5, rtol=1e-5)
    assert torch.allclose(gk, wk, atol=1e-5, rtol=1e-5)


def test_attention_runs_on_its_own_threads_and_gives_the_others_back(kernel):
    """From ATTENTION_PARALLEL_MIN_ROWS decode rows the kernel runs on its own thread count
    (here two while the engine has one): the same output, and the engine's thread count
    is back after the call; fewer rows stay on the engine's thread."""
    g = torch.Generator().manual_seed(5)
    rows, bs = cpu_kernels.ATTENTION_PARALLEL_MIN_ROWS, 16
    k_cache = torch.randn(rows * 4, bs, 4, 32, generator=g)
    v_cache = torch.randn(rows * 4, bs, 4, 32, generator=g)
    ctx = [10 + 3 * i for i in range(rows)]  # at most 4 blocks each
    tables = torch.arange(rows * 4, dtype=torch.int32).view(rows, 4)
    q = torch.randn(rows, 8, 32, generator=g)
    want = paged_attention_ref(q, k_cache, v_cache, tables, list(range(rows + 1)), ctx, 0.2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    seen = []
    real = cpu_kernels._module.paged_decode
    try:
        cpu_kernels._module = _Spy(cpu_kernels._module, seen)
        got = cpu_kernels.paged_decode(q, k_cache, v_cache, tables,
                                       torch.tensor(ctx, dtype=torch.int32), 0.2, threads=2)
        few = cpu_kernels.paged_decode(q[:2], k_cache, v_cache, tables[:2],
                                       torch.tensor(ctx[:2], dtype=torch.int32), 0.2,
                                       threads=2)
        assert torch.get_num_threads() == 1
    finally:
        cpu_kernels._module = _Spy.unwrap(cpu_kernels._module)
        torch.set_num_threads(before)
    assert cpu_kernels._module.paged_decode is real
    assert seen == [2, 1]  # torch's thread count inside each call
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(few, want[:2], atol=1e-5, rtol=1e-5)


class _Spy:
    """The built module with paged_decode recording torch's thread count at each call."""

    def __init__(self, mod, seen: list):
        self.mod, self.seen = mod, seen

    def __getattr__(self, name):
        return getattr(self.mod, name)

    def paged_decode(self, *args):
        self.seen.append(torch.get_num_threads())
        return self.mod.paged_decode(*args)

    @staticmethod
    def unwrap(x):
        return x.mod if isinstance(x, _Spy) else x


def test_an_engine_with_its_own_attention_threads_gives_the_same_tokens(kernel, model_dir):
    """engine.cpu_attention_threads reaches this model's kernel (not the process's), and
    24 greedy tokens of 16 prompts (the attention on two threads) equal the default's."""
    from cluster.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]) + [5 + i] for i in range(16)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    own = make_engine(model_dir, cpu_attention_threads=2)
    default = make_engine(model_dir)
    assert own.runner.model.backend.decode_kernel.keywords == {"threads": 2}
    assert default.runner.model.backend.decode_kernel.keywords == {"threads": None}
    assert own.generate(prompts, params) == default.generate(prompts, params)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["sgemm", "onednn"])
def test_packed_linear_equals_unpacked(bias, layout):
    """A packed projection in either layout gives nn.Linear's output at decode and prefill
    row counts, bias added (oneDNN's rows padded and cut back); its plain weight is dropped,
    dense_weight gives it back, and it repacks into the other layout."""
    from cluster.engine import cpu_linear
    from cluster.engine.model import Linear

    if not cpu_linear.onednn_available():
        skip_or_fail("this torch has no oneDNN linear")
    other = {"sgemm": "onednn", "onednn": "sgemm"}[layout]
    torch.manual_seed(0)
    lin = Linear(96, 160, bias=bias).requires_grad_(False)
    ref = nn.Linear(96, 160, bias=bias).requires_grad_(False)
    ref.load_state_dict(lin.state_dict())
    lin.pack(other)
    lin.pack(layout)
    assert lin.weight.numel() == 0 and lin.layout == layout
    torch.testing.assert_close(lin.dense_weight(), ref.weight, rtol=0, atol=0)
    for rows in (1, 13, 64, 80, 200, 300):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(lin(x), ref(x), rtol=1e-5, atol=1e-5)


def test_onednn_rows_pad_by_at_most_a_quarter_to_few_counts():
    """Rows padded for oneDNN cover the rows given, add at most a quarter above 64 rows
    (a chunk of 80 tokens once paid for 256), and take few distinct counts (oneDNN keeps
    memory per count)."""
    from cluster.engine.cpu_linear import padded_rows

    counts = set()
    for m in range(1, 8193):
        rows = padded_rows(m)
        counts.add(rows)
        assert rows >= m
        assert rows <= (max(m, 8) + 7) // 8 * 8 if m <= 64 else rows <= 1.25 * m, m
    assert padded_rows(80) == 80 and padded_rows(65) == 80 and padded_rows(256) == 256
    assert len(counts) <= 36


def test_projections_bench_times_every_path():
    from cluster.bench import projections

    shapes = projections.step_shapes({"hidden_size": 64, "intermediate_size": 96,
                                      "num_attention_heads": 4, "num_key_value_heads": 2,
                                      "num_hidden_layers": 2, "vocab_size": 128})
    assert shapes == [(64, 128), (64, 64), (64, 192), (96, 64)] * 2 + [(64, 128)]
    got = projections.paths(shapes, 8)
    assert {"F.linear", "sgemm"} <= set(got)
    outs = {name: fn() for name, fn in got.items()}
    for name, out in outs.items():  # every path multiplies the same weights
        for a, b in zip(out, outs["F.linear"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_layout_decision_takes_onednn_only_when_clearly_faster_and_once_per_shape():
    from cluster.engine import cpu_linear

    if not cpu_linear.onednn_available():
        skip_or_fail("this torch has no oneDNN linear")
    calls = []

    def timer(times):
        return lambda name: calls.append(name) or times[name]

    assert cpu_linear.decide(("t", 1), timer({"sgemm": 1.0, "onednn": 0.95})) == "sgemm"
    assert cpu_linear.decide(("t", 2), timer({"sgemm": 1.0, "onednn": 0.8})) == "onednn"
    n = len(calls)
    assert cpu_linear.decide(("t", 2), timer({"sgemm": 0.1, "onednn": 9.0})) == "onednn"
    assert len(calls) == n  # decided once per process: engines of one shape round alike


def test_engine_packs_every_projection_in_its_models_layout(model_dir):
    """The runner times the model both ways at load and packs every projection alike; a
    second engine of the same shape in this process gets the same layout untimed."""
    from cluster.engine import cpu_linear
    from cluster.engine.model import Linear

    eng = make_engine(model_dir)
    layouts = {m.layout for m in eng.runner.model.modules() if isinstance(m, Linear)}
    assert len(layouts) == 1 and layouts <= set(cpu_linear.LAYOUTS)
    assert layouts.pop() in cpu_linear.chosen().values()
    again = make_engine(model_dir)
    assert {m.layout for m in again.runner.model.modules() if isinstance(m, Linear)} == \
        {m.layout for m in eng.runner.model.modules() if isinstance(m, Linear)}
