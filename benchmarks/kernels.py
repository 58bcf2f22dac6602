"""Coupling kernels: achieved bandwidth, and the reversible step's time on a GPT-2-medium-size model.

On a GPU, for each kernel (forward, inverse, fused backward), coupling kind (additive; affine with an
elementwise log-scale) and dtype, with dropout 0.1 and a bias:

* ``GB/s``: the bytes the kernel must move (each input read once, each output written once; a bias is
  negligible) over its median time (``triton.testing.do_bench``, L2 flushed between runs);
* ``% copy``: that against the measured device-to-device copy bandwidth (``dst.copy_(src)``; goal: 80%);
* the same work as an unfused torch sequence (eager, torch's own dropout in the forward, a stored mask in
  the inverse and backward) and as ``torch.compile`` of it, in effective GB/s (same bytes over their time).

Then the end-to-end training step (forward + backward, median of ``--repeats``) of a GPT-2-medium-size
config (24 layers, d 1024, 16 heads, vocab 50257, ``--seq``, ``--batch``): conventional, reversible
(kernels through the seam), reversible with ``BWSKC_KERNELS=torch``, and per-block checkpointing, built
by ``benchmarks/memory.py``'s ``setup``.

Without a GPU the same code paths run once on tiny shapes through the Triton interpreter (results
checked against the torch reference) and every figure prints "not measured: no GPU".

    python benchmarks/kernels.py [--no-e2e] [--seq 1024] [--batch 4] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

GPU = torch.cuda.is_available()
if not GPU:  # must precede triton's first import: the CPU smoke run goes through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))

from bwskc.kernels import coupling as K  # noqa: E402
from bwskc.kernels import reference as ref  # noqa: E402

DEVICE = "cuda" if GPU else "cpu"
NAME = torch.cuda.get_device_name() if GPU else "cpu (Triton interpreter)"
NOT_MEASURED = "not measured: no GPU"
GPT2_MEDIUM = dict(n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
P = 0.1


def _bench(fn) -> float:
    """Median seconds of ``fn()``."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def copy_bandwidth(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * nbytes / _bench(lambda: dst.copy_(src))


def _case(kind: str, dtype, rows: int, cols: int):
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def draw(*shape, mult=1.0):
        return (torch.randn(*shape, generator=gen, device=DEVICE) * mult).to(dtype)

    x, f, g, b = draw(rows, cols), draw(rows, cols), draw(rows, cols), draw(cols)
    s = draw(rows, cols, mult=0.5) if kind == "affine" else None
    return x, f, g, b, s


def _torch_ops(kind, x, f, g, b, s, mask):
    """The unfused torch sequence for each kernel: torch's own dropout, the mask stored for replay."""
    k = 1.0 / (1.0 - P)
    e = (lambda v: v) if s is None else (lambda v: v * torch.exp(s))

    def forward():
        return e(x) + torch.nn.functional.dropout(f + b, P)

    def inverse():
        d = y - (f + b) * mask * k
        return d if s is None else d * torch.exp(-s)

    def backward():
        t = (f + b) * mask * k
        gf = g * mask * k
        out = [y - t if s is None else (y - t) * torch.exp(-s), gf, gf.sum(0)]
        if s is not None:
            out += [g * torch.exp(s), g * (y - t)]
        return out
    y = forward()
    return {"forward": forward, "inverse": inverse, "backward": backward}


def _kernel_ops(x, f, g, b, s):
    kw = dict(bias=b, scale=s, p=P, seed=1)
    y = K.coupling_forward(x, f, **kw)
    return {"forward": lambda: K.coupling_forward(x, f, **kw),
            "inverse": lambda: K.coupling_inverse(y, f, **kw),
            "backward": lambda: K.coupling_backward(y, f, g, **kw)}


def _bytes(op: str, kind: str, n: int, size: int) -> int:
    """Elements moved: forward/inverse read x (or y), f (and s), write one; the backward reads y, f, g (s),
    writes x, grad_f (and grad_x, grad_s for affine; additive grad_x is grad_y itself)."""
    affine = kind == "affine"
    tensors = (3 + affine) if op != "backward" else (5 + 3 * affine)
    return tensors * n * size


def kernels(rows: int, cols: int):
    print(f"# kernels: [{rows}, {cols}] elements, dropout {P}, bias; device: {NAME}")
    if GPU:
        copy = copy_bandwidth(rows * cols * 4)
        print(f"{NAME} | copy bandwidth | {copy / 1e9:.0f} GB/s")
    print("device | dtype | kind | kernel | GB/s | % copy | torch eager GB/s | torch.compile GB/s")
    for dname, dtype in DTYPES.items():
        for kind in ("additive", "affine"):
            x, f, g, b, s = _case(kind, dtype, rows, cols)
            ops = _kernel_ops(x, f, g, b, s)
            mask = torch.rand_like(x, dtype=torch.float32) >= P
            eager = _torch_ops(kind, x, f, g, b, s, mask)
            if not GPU:  # the smoke run: every path once, the kernels checked against the reference
                _smoke(ops, x, f, g, b, s)
                for op in ops:
                    eager[op]()
                    print(f"{NAME} | {dname} | {kind} | {op} | {NOT_MEASURED} | | | (kernel checked "
                          "against the reference; torch sequence ran)")
                continue
            compiled = {op: torch.compile(fn) for op, fn in eager.items()}
            for op in ops:
                nbytes = _bytes(op, kind, rows * cols, x.element_size())
                t = _bench(ops[op])
                te, tc = _bench(eager[op]), _bench(compiled[op])
                print(f"{NAME} | {dname} | {kind} | {op} | {nbytes / t / 1e9:.0f} | "
                      f"{100 * nbytes / t / copy:.0f}% | {nbytes / te / 1e9:.0f} | {nbytes / tc / 1e9:.0f}",
                      flush=True)


def _smoke(ops, x, f, g, b, s):
    kw = dict(bias=b, scale=s, p=P, seed=1)
    y = ops["forward"]()
    torch.testing.assert_close(y, ref.coupling_forward(x, f, **kw), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ops["inverse"](), ref.coupling_inverse(y, f, **kw), rtol=2e-2, atol=2e-2)
    got = ops["backward"]()
    want = ref.coupling_backward(y, f, g, **kw)
    for a, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(a, w, rtol=2e-2, atol=5e-2)


def _load(name: str):
    """A sibling benchmark script as a module, without putting benchmarks/ on sys.path."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def end_to_end(seq: int, batch: int, repeats: int):
    """Step time of reversible (kernels and torch seam), conventional and checkpointing, one process."""
    setup = _load("memory").setup
    blocks, extra = (48, GPT2_MEDIUM) if GPU else (4, dict(n_embd=32, n_head=2, n_positions=64))
    seq, batch = (seq, batch) if GPU else (8, 1)
    print(f"# end to end: GPT-2 {'medium size' if GPU else 'tiny (smoke)'}, {blocks} blocks, seq {seq}, "
          f"batch {batch}; device: {NAME}")
    runs, step, out, _ = setup("gpt2", blocks, seq, batch, device=DEVICE, extra=extra)
    modes = [("conventional", "auto"), ("reversible", "auto"), ("reversible", "torch"),
             ("checkpoint", "auto")]
    times = {}
    for mode, seam in modes:
        if mode not in runs:
            continue
        os.environ["BWSKC_KERNELS"] = seam if GPU else ("triton" if mode == "reversible" and seam == "auto"
                                                        else "torch")
        label = mode if seam == "auto" or mode != "reversible" else "reversible (torch seam)"
        mod = runs[mode]
        step(mod)  # warm up (and autotune)
        if not GPU:
            print(f"{NAME} | {label} | step time {NOT_MEASURED} | (one step ran)")
            continue
        torch.cuda.reset_peak_memory_stats()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step(mod)
            samples.append(time.perf_counter() - t0)
        times[label] = statistics.median(samples)
        ratio = times[label] / times.get("conventional", times[label])
        print(f"{NAME} | {label} | step {times[label] * 1e3:.1f} ms | {ratio:.2f}x conventional | peak "
              f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB", flush=True)
    os.environ.pop("BWSKC_KERNELS", None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32768, help="rows of the kernels' [rows, 1024] tensors")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-e2e", action="store_true")
    a = ap.parse_args()
    if GPU:
        kernels(a.rows, 1024)
    else:
        kernels(6, 40)
    if not a.no_e2e:
        end_to_end(a.seq, a.batch, a.repeats)


if __name__ == "__main__":
    main()
