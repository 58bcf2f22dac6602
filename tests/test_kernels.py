"""Coupling kernels (``bwskc.kernels``): the torch reference, the Triton kernels against it, the seam.

The Triton checks (``test_triton_*``) need the kernels to run in this process: on a GPU, or on CPU under
the interpreter, which triton enables only if ``TRITON_INTERPRET=1`` is set before triton is first
imported (its own ``tl.rand`` is compiled or interpreted at that import; other test modules may import
triton earlier through torch). So when this process cannot run them, one test runs them in a fresh
``python -m pytest -k triton`` subprocess with ``TRITON_INTERPRET=1``, and the environment of the other
test modules is left alone. Under the interpreter bfloat16 stores truncate (triton's interpreter
converts float32 to bfloat16 without rounding, the GPU rounds to nearest), so bfloat16 results are
checked to one bfloat16 ulp; float32 and float16 additive results are checked for exact equality.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bwskc.kernels import dispatch
from bwskc.kernels import reference as ref

HERE = os.path.dirname(os.path.abspath(__file__))


def _kernels_here() -> tuple[bool, str]:
    """Whether the Triton kernels run in this process, and on which device."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from bwskc.kernels import coupling
        try:
            return coupling.interpreting(), "cpu"
        except RuntimeError:  # triton was imported before the variable was set
            return False, "cpu"
    return torch.cuda.is_available(), "cuda"


KERNELS_HERE, DEVICE = _kernels_here()
INTERPRETED = KERNELS_HERE and DEVICE == "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# ------------------------------------------------------------------------------ strategies

shapes = st.lists(st.one_of(st.integers(1, 9), st.sampled_from([16, 33])), min_size=0, max_size=3).map(tuple)
probs = st.one_of(st.just(0.0), st.floats(0.01, 0.95))
seeds = st.integers(0, 2 ** 63 - 1)
offsets = st.integers(0, 2 ** 40)


def _case(shape, dtype, bias: bool, scale: str, seed: int, device="cpu", transpose=False):
    """Inputs drawn from ``seed``: x, f (optionally non-contiguous views), bias, log-scale s
    (``none``, ``full``: x's shape, ``row``: the last dimension's) kept small so exp stays moderate."""
    gen = torch.Generator().manual_seed(seed % 2 ** 32)
    last = shape[-1:]

    def draw(shp, mult=1.0):
        t = (torch.randn(shp, generator=gen) * mult).to(dtype).to(device)
        if transpose and len(shp) >= 2:  # the same values, strided as a transposed view
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        return t

    x, f = draw(shape), draw(shape)
    b = draw(last) if bias else None
    s = {"none": None, "full": lambda: draw(shape, 0.5), "row": lambda: draw(last, 0.5)}[scale]
    return x, f, b, (s() if s else None)


def _ulp_close(got, want, dtype, slack=0.0):
    """``|got - want| <= eps(dtype) * |want| + slack``: at most one rounding of the result apart."""
    err = (got.double() - want.double()).abs()
    bound = torch.finfo(dtype).eps * want.double().abs() + slack + torch.finfo(dtype).tiny
    worst = int((err - bound).argmax()) if err.dim() else 0
    assert bool((err <= bound).all()), \
        f"error {float(err.flatten()[worst])} above its bound {float(bound.flatten()[worst])}"


def _grad_slack(g, y, f, b, p, dtype, reduced: bool):
    """What a gradient may differ by beyond one rounding: ``grad_s`` is read off ``y`` (``g * (y - t)``
    instead of ``g * x * exp(s)``), so y's rounding enters it, ``eps * |g| * |y|``; a gradient summed over
    R rows adds float32 summation in another order, ``R * eps32`` times the sum of the terms' magnitudes,
    which ``|g| (|y| + k (|f| + |b| + 1))`` bounds (``|x exp(s)| <= |y| + |t|``, ``|grad_f| <= k |g|``)."""
    k = 1.0 / (1.0 - p)
    gy = g.double().abs() * y.double().abs()
    if not reduced:
        return torch.finfo(dtype).eps * gy
    fb = f.double().abs() + (0.0 if b is None else b.double().abs())
    mag = gy + g.double().abs() * k * (fb + 1)
    n = y.shape[-1] if y.dim() else 1
    rows = y.numel() // n
    return (torch.finfo(dtype).eps * gy.reshape(rows, n).sum(0)
            + rows * torch.finfo(torch.float32).eps * mag.reshape(rows, n).sum(0))


def _check_round_trip(xr, x, y, s, dtype):
    """fp32: within 1e-5. Any dtype: ``|x' - x| <= eps (|x| + |y| exp(-s))``, one ulp for each of the two
    roundings (of y, then of x'; half an ulp each when rounding to nearest, a whole one where the
    interpreter truncates bfloat16), plus float32 arithmetic and the device's exp."""
    if dtype == torch.float32:
        torch.testing.assert_close(xr, x, rtol=1e-5, atol=1e-5)
    e = 1.0 if s is None else torch.exp(-s.detach().double())
    bound = (torch.finfo(dtype).eps + 2e-7) * (x.double().abs() + y.double().abs() * e) + 1e-30
    assert bool(((xr.double() - x.double()).abs() <= bound).all())


# ------------------------------------------------------------------------------ the reference

def test_philox_matches_the_random123_known_answers():
    """Philox4x32-10 test vectors (Random123's kat_vectors): the torch Philox is the published one."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        got = ref.philox4x32(*(torch.tensor([c]) for c in ctr), *key)
        assert tuple(int(w) for w in got) == want


def test_mask_counters_follow_seed_and_offset():
    """Element (r, c) of an [R, N] draw (N a multiple of 4) is counter ``offset + r * N / 4 + c // 4``:
    row 1 of a draw at offset 0 is row 0 at offset N / 4; another seed gives another draw; the four
    words of a counter are distinct streams (neighbouring columns are not copies)."""
    u = ref.uniforms((3, 8), seed=11, offset=0)
    assert torch.equal(u[1:], ref.uniforms((2, 8), seed=11, offset=2))
    assert not torch.equal(u, ref.uniforms((3, 8), seed=12, offset=0))
    assert bool(((u >= 0) & (u < 1)).all())
    words = ref.uniforms((64, 64), seed=3).reshape(64, 16, 4)
    for i in range(4):
        for j in range(i):
            assert not torch.equal(words[..., i], words[..., j])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_about_a_fraction_p_is_dropped(p):
    """The dropped count of n = 16384 elements is Binomial(n, p): within 5 standard deviations (a correct
    generator fails this with probability below 1e-6; the seeds are fixed, so the test is deterministic)."""
    n = 128 * 128
    for seed in (0, 1, 2 ** 40 + 5):
        dropped = int((~ref.keep_mask((128, 128), p, seed)).sum())
        assert abs(dropped - n * p) <= 5 * (n * p * (1 - p)) ** 0.5, (seed, dropped)


@settings(max_examples=100, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), p=probs, bias=st.booleans(),
       scale=st.sampled_from(["none", "full", "row"]), seed=seeds, offset=offsets)
def test_reference_backward_equals_autograd_and_inverse_inverts(shape, dtype, p, bias, scale, seed, offset):
    """The reference's closed-form backward equals autograd through its forward (same mask), and its
    inverse returns x within one rounding of y's dtype: ``|x' - x| <= u (|x| + |y| exp(-s))``."""
    x, f, b, s = _case(shape, dtype, bias, scale, seed)
    kw = dict(p=p, seed=seed, offset=offset)
    leaves = [t.requires_grad_() for t in (x, f, b, s) if t is not None]
    y = ref.coupling_forward(x, f, bias=b, scale=s, **kw)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = torch.autograd.grad(y, leaves, g)
    y, f, b, s = (None if t is None else t.detach() for t in (y, f, b, s))
    xr, *grads = ref.coupling_backward(y, f, g, bias=b, scale=s, **kw)
    _check_grads([t for t in grads if t is not None], want, g, y, f, b, p, dtype)
    _check_round_trip(xr, x.detach(), y, s, dtype)


def _check_grads(got, want, g, y, f, b, p, dtype):
    assert len(got) == len(want)
    for a, w in zip(got, want):
        assert a.dtype == w.dtype and a.shape == w.shape
        # plus a few float32 ulps: exp's last bits differ between devices and libraries
        slack = _grad_slack(g, y, f, b, p, dtype, reduced=a.shape != y.shape) + 4e-7 * w.double().abs()
        _ulp_close(a, w, dtype, slack)


def test_seam_choice_and_torch_path(monkeypatch):
    """``BWSKC_KERNELS``: ``auto`` and ``torch`` on CPU take torch's own operators (so the runtime's CPU
    behaviour is unchanged); an unknown value is refused."""
    a, y = torch.randn(3, 5), torch.randn(3, 5)
    for value in ("auto", "torch", ""):
        monkeypatch.setenv("BWSKC_KERNELS", value)
        assert dispatch.implementation(a) is ref
        assert torch.equal(dispatch.stream_update(a, y), a + y)
        assert torch.equal(dispatch.stream_update(a, y, subtract=True), a - y)
    monkeypatch.setenv("BWSKC_KERNELS", "cuda")
    with pytest.raises(ValueError, match="BWSKC_KERNELS must be one of"):
        dispatch.stream_update(a, y)


if not INTERPRETED:  # in the interpreter's process triton compiles nothing and CPU tensors are allowed
    def test_forcing_the_kernels_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
        monkeypatch.setenv("BWSKC_KERNELS", "triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            dispatch.stream_update(torch.randn(4), torch.randn(4))

    @pytest.mark.parametrize("which,dtype,consts", [
        ("forward", "bf16", dict(HAS_BIAS=True, AFFINE=True, SCALE_ROW=False, DROPOUT=True, INVERSE=False,
                                 TILE=4096, BN=1024, BR=4)),
        ("forward", "fp32", dict(HAS_BIAS=False, AFFINE=True, SCALE_ROW=True, DROPOUT=True, INVERSE=True,
                                 TILE=1024, BN=4, BR=256)),
        ("backward", "fp16", dict(HAS_BIAS=True, AFFINE=True, SCALE_ROW=True, DROPOUT=True,
                                  TILE=2048, BN=512, BR=4)),
        ("backward", "fp32", dict(HAS_BIAS=True, AFFINE=False, SCALE_ROW=False, DROPOUT=False,
                                  TILE=8192, BN=8192, BR=1)),
    ])
    def test_kernels_compile_to_sm90_machine_code_without_a_gpu(which, dtype, consts):
        """The interpreter runs Python, not Triton's compiler: this checks the kernels also get through
        it (TTIR, TTGIR, LLVM, PTX and ptxas, for an H100/H200) with the flags and shapes a GPU would use."""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from bwskc.kernels import coupling as kernels
        fn = (kernels._coupling_kernel if which == "forward" else kernels._coupling_bwd_kernel).fn.fn
        floats = {"p": "fp32", "keep_scale": "fp32", "pb_ptr": "*fp32", "ps_ptr": "*fp32"}
        ints = {"R": "i32", "N": "i32", "rows_per_prog": "i32", "seed": "i64", "offset": "i64"}
        sig = {n: "constexpr" if n in consts else floats.get(n) or ints.get(n) or f"*{dtype}"
               for n in fn.arg_names}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert len(compiled.asm["cubin"]) > 1000 and ".target sm_90" in compiled.asm["ptx"]


def test_coupling_layer_gradients_through_the_reference(monkeypatch):
    """The autograd Function (fused backward, stores y not x) against autograd through the reference."""
    monkeypatch.setenv("BWSKC_KERNELS", "torch")
    x, f, b, s = _case((4, 6), torch.float32, True, "full", 5)
    leaves = [t.requires_grad_() for t in (x, f, b, s)]
    kw = dict(p=0.3, seed=9, offset=2)
    g = torch.randn(4, 6)
    want = torch.autograd.grad(ref.coupling_forward(x, f, bias=b, scale=s, **kw), leaves, g)
    got = torch.autograd.grad(dispatch.coupling_layer(x, f, bias=b, scale=s, **kw), leaves, g)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ the Triton kernels

if not KERNELS_HERE:
    def test_interpreter_run_of_the_triton_checks():
        """The ``test_triton_*`` checks below, in a fresh process with the interpreter on."""
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-k", "triton",
                               os.path.join(HERE, "test_kernels.py")], capture_output=True, text=True,
                              env=env, cwd=os.path.dirname(HERE))
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
        assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]

if KERNELS_HERE:
    import triton
    import triton.language as tl

    from bwskc.kernels import coupling as K

    @triton.jit
    def _rand4x_kernel(out_ptr, groups, seed, offset, BLOCK: tl.constexpr):
        """Triton's own ``tl.rand4x`` at counters ``offset + i``, its four words stored at ``4 i + w``."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        u1, u2, u3, u4 = tl.rand4x(seed, offset + i.to(tl.int64))
        m = i < groups
        tl.store(out_ptr + 4 * i, u1, mask=m)
        tl.store(out_ptr + 4 * i + 1, u2, mask=m)
        tl.store(out_ptr + 4 * i + 2, u3, mask=m)
        tl.store(out_ptr + 4 * i + 3, u4, mask=m)

    @pytest.mark.parametrize("seed,offset", [(0, 0), (7, 2 ** 32 - 3), (2 ** 31 + 1, 5),
                                             (2 ** 62 + 3, 2 ** 40)])
    def test_triton_rand4x_is_the_torch_philox_bit_for_bit(seed, offset):
        """The reference's uniforms are ``tl.rand4x``'s, bit for bit, for seeds and counters past 32 bits:
        so the two paths agree on the mask for every p, not only on the draws a test happens to make."""
        groups = 300
        out = torch.empty(4 * groups, device=DEVICE)
        _rand4x_kernel[(triton.cdiv(groups, 128),)](out, groups, seed, offset, BLOCK=128)
        want = ref.uniforms((4 * groups,), seed, offset, DEVICE)
        assert torch.equal(out.view(torch.int32), want.view(torch.int32))

    def _check_same(got, want, dtype, exact: bool):
        assert got.dtype == want.dtype and got.shape == want.shape
        if exact and (dtype != torch.bfloat16 or DEVICE == "cuda"):
            assert torch.equal(got, want)
        else:  # bfloat16 under the interpreter; exp's last bits differ between devices and libraries
            _ulp_close(got, want, dtype, slack=1e-6 * float(want.abs().max() + 1))

    @settings(max_examples=40, deadline=None)
    @given(shape=shapes, dtype=st.sampled_from(DTYPES), p=probs, bias=st.booleans(),
           scale=st.sampled_from(["none", "full", "row"]), seed=seeds, offset=offsets,
           transpose=st.booleans())
    @example(shape=(3, 300), dtype=torch.float32, p=0.5, bias=True, scale="row", seed=1, offset=0,
             transpose=True)  # several row and column tiles, strided input
    @example(shape=(), dtype=torch.float16, p=0.5, bias=True, scale="full", seed=2, offset=1, transpose=False)
    def test_triton_forward_and_inverse_equal_the_reference(shape, dtype, p, bias, scale, seed, offset,
                                                             transpose):
        x, f, b, s = _case(shape, dtype, bias, scale, seed, DEVICE, transpose)
        kw = dict(bias=b, scale=s, p=p, seed=seed, offset=offset)
        y = K.coupling_forward(x, f, **kw)
        _check_same(y, ref.coupling_forward(x, f, **kw), dtype, exact=s is None)
        xr = K.coupling_inverse(y, f, **kw)
        _check_same(xr, ref.coupling_inverse(y, f, **kw), dtype, exact=s is None)
        _check_round_trip(xr, x, y, s, dtype)

    @settings(max_examples=40, deadline=None)
    @given(shape=shapes, dtype=st.sampled_from(DTYPES), p=probs, bias=st.booleans(),
           scale=st.sampled_from(["none", "full", "row"]), seed=seeds, offset=offsets)
    # several tiles; rows per program (3) not a multiple of the tile's rows (4): the partial sums must not
    # overlap; one-element tensors
    @example(shape=(5, 300), dtype=torch.bfloat16, p=0.2, bias=True, scale="row", seed=3, offset=7)
    @example(shape=(5, 7), dtype=torch.float32, p=0.2, bias=True, scale="row", seed=3, offset=7)
    @example(shape=(2, 5, 6), dtype=torch.float16, p=0.0, bias=False, scale="full", seed=4, offset=0)
    def test_triton_fused_backward_equals_autograd_through_the_reference(shape, dtype, p, bias, scale,
                                                                        seed, offset):
        x, f, b, s = _case(shape, dtype, bias, scale, seed, DEVICE)
        kw = dict(p=p, seed=seed, offset=offset)
        leaves = [t.requires_grad_() for t in (x, f, b, s) if t is not None]
        y = ref.coupling_forward(x, f, bias=b, scale=s, **kw)
        g = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
        want = torch.autograd.grad(y, leaves, g)
        y = y.detach()
        b, s = (None if t is None else t.detach() for t in (b, s))
        xr, *grads = K.coupling_backward(y, f.detach(), g, bias=b, scale=s, **kw)
        _check_round_trip(xr, x.detach(), y, s, dtype)
        _check_grads([t for t in grads if t is not None], want, g, y, f.detach(), b, p, dtype)

    @pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
    def test_triton_masks_are_philox_and_replayed_by_inverse_and_backward(p):
        """With f = 1 and x = 0 the output is the mask times 1/(1-p): it equals the torch Philox mask bit
        for bit, the inverse gives back zeros (it subtracted the same mask), the backward's grad_f is
        nonzero exactly where the forward kept, and about a fraction p is dropped (binomial, 5 sigma)."""
        shape, seed, offset = (33, 65), 2 ** 33 + 17, 5
        x, f = torch.zeros(shape, device=DEVICE), torch.ones(shape, device=DEVICE)
        kept = ref.keep_mask(shape, p, seed, offset, DEVICE)
        y = K.coupling_forward(x, f, p=p, seed=seed, offset=offset)
        assert torch.equal(y != 0, kept)
        assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
        assert torch.equal(K.coupling_inverse(y, f, p=p, seed=seed, offset=offset), x)
        _, _, gf, _, _ = K.coupling_backward(y, f, torch.ones_like(y), p=p, seed=seed, offset=offset)
        assert torch.equal(gf != 0, kept)
        n = kept.numel()
        assert abs(int((~kept).sum()) - n * p) <= 5 * (n * p * (1 - p)) ** 0.5

    def test_triton_coupling_layer_function_uses_the_fused_backward(monkeypatch):
        monkeypatch.setenv("BWSKC_KERNELS", "triton")
        x, f, b, s = _case((3, 10), torch.float32, True, "row", 4, DEVICE)
        leaves = [t.requires_grad_() for t in (x, f, b, s)]
        kw = dict(p=0.25, seed=1, offset=0)
        g = torch.randn(3, 10, device=DEVICE)
        want = torch.autograd.grad(ref.coupling_forward(x, f, bias=b, scale=s, **kw), leaves, g)
        got = torch.autograd.grad(dispatch.coupling_layer(x, f, bias=b, scale=s, **kw), leaves, g)
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)

    def test_triton_seam_runs_a_reversible_gpt2_with_the_same_gradients(monkeypatch):
        """``BWSKC_KERNELS=triton``: a 2-layer reversible GPT-2 (dropout on) sends every coupling step's add
        and subtract through the kernels, and its gradients equal the torch path's exactly (additive
        float32 coupling without dropout is the same float32 sum in both)."""
        import torch.utils._pytree as pytree
        import transformers

        import bwskc
        from bwskc.frontend import default_inputs
        from conftest import ZOO_SPECS
        model_cls, config_cls, kwargs = ZOO_SPECS["gpt2"]
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
        args, kw = default_inputs(model, batch=1, seq=8)
        program = bwskc.lower(model, args, kw, train=True)
        values = dict(zip(program.entry.input_names, list(args) + list(kw.values())))
        inputs = [values[n].to(DEVICE) for n in program.entry.input_names]

        def grads(choice):
            monkeypatch.setenv("BWSKC_KERNELS", choice)
            rev = bwskc.compile(program, mode="reversible", seed=3).to(DEVICE)
            out = rev(*inputs)
            loss = sum(o.float().pow(2).mean() for o in pytree.tree_leaves(out)
                       if isinstance(o, torch.Tensor) and o.is_floating_point())
            loss.backward()
            return {n: p.grad for n, p in rev.named_parameters() if p.grad is not None}

        calls = {"add": 0, "sub": 0}
        fwd, inv = K.coupling_forward, K.coupling_inverse

        def counted(name, fn):
            def run(*a, **k):
                calls[name] += 1
                return fn(*a, **k)
            return run
        monkeypatch.setattr(K, "coupling_forward", counted("add", fwd))
        monkeypatch.setattr(K, "coupling_inverse", counted("sub", inv))
        want = grads("torch")
        assert calls == {"add": 0, "sub": 0}
        got = grads("triton")
        assert calls == {"add": 4, "sub": 4}  # 2 layers: 4 branches, one step each way
        assert got.keys() == want.keys() and len(want) > 10
        for name in want:
            assert torch.equal(got[name], want[name]), name


def test_public_entry_points_dispatch_to_the_reference_on_cpu(monkeypatch):
    """``bwskc.kernels.coupling_*`` run on CPU tensors by default (the torch path, the same mask), and
    round-trip: what users call works on any machine."""
    import bwskc.kernels as public
    monkeypatch.delenv("BWSKC_KERNELS", raising=False)
    g = torch.Generator().manual_seed(3)
    x, f, b = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g), torch.randn(7, generator=g)
    y = public.coupling_forward(x, f, bias=b, p=0.25, seed=11)
    assert torch.equal(y, ref.coupling_forward(x, f, bias=b, p=0.25, seed=11))
    assert torch.allclose(public.coupling_inverse(y, f, bias=b, p=0.25, seed=11), x, atol=1e-6)
    assert not torch.equal(y, public.coupling_forward(x, f, bias=b, p=0.25, seed=12))
