"""The reversible gradient check users can run: ``bwskc.compile(..., mode="reversible", check=True)``.

A reversible chain's backward reconstructs its inputs from its outputs and recomputes each branch; its
gradients are claimed equal to plain autograd through the same coupling architecture (the
``store_activations=True`` module). The check tests the claim on the example inputs: the program is
promoted to float64 (every floating type and dtype literal), both modules are built from it with the
same weights and the same dropout seed, and one backward with a fixed random cotangent gives the
relative error of every gradient (against a floor of ``FLOOR`` times the largest in its group), grouped
by the chain whose branches read the parameter. In float64 a
correct chain's error is rounding (about 1e-12); the tolerance is 1e-8. A chain above it is refused
by name (``BwskError``), since its gradients would be wrong in training.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from bwskc._deep import run_deep
from bwskc.errors import BwskError
from bwskc.ir import Comb, Entry, Prim, Program, TensorDecl, TensorType, TupleType

TOLERANCE = 1e-8
_FLOATS = ("f16", "bf16", "f32")
_TORCH_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def entry_inputs(program, args, kwargs) -> list | None:
    """The example inputs in the entry's order (positional, then keyword by name), or None (made up)."""
    args = args if isinstance(args, tuple) else (args,)
    values = dict(zip(program.entry.input_names, args))
    values.update({k: v for k, v in (kwargs or {}).items() if isinstance(v, torch.Tensor)})
    if set(values) != set(program.entry.input_names):
        return None
    return [values[n] for n in program.entry.input_names]


def _type64(t):
    if isinstance(t, TensorType) and t.dtype in _FLOATS:
        return TensorType("f64", t.shape)
    if isinstance(t, TupleType):
        return TupleType(tuple(_type64(i) for i in t.items))
    return t


def _arg64(a):
    if isinstance(a, tuple):
        return tuple(_arg64(b) for b in a)
    if isinstance(a, torch.dtype) and a in _TORCH_FLOATS:
        return torch.float64
    return a


def _term64(t):
    if isinstance(t, Prim):
        return Prim(t.op, _arg64(t.args), tuple((k, _arg64(v)) for k, v in t.kwargs), _type64(t.type), t.pos)
    if isinstance(t, Comb):
        return Comb(t.kind, tuple(_term64(a) for a in t.args))
    return t  # Ref, Const


def promote_to_float64(program: Program) -> Program:
    """The same program computing in float64: floating types, dtype literals and weights promoted."""
    def build():
        tensors = {k: TensorDecl(d.kind, _type64(d.type)) for k, d in program.tensors.items()}
        consts = [_term64(c) for c in program.consts]
        defs = {k: replace(d, inputs=tuple(_type64(i) for i in d.inputs), output=_type64(d.output),
                           body=_term64(d.body)) for k, d in program.defs.items()}
        e = program.entry
        entry = Entry(e.input_names, tuple(_type64(i) for i in e.inputs), e.output_names,
                      tuple(_type64(o) for o in e.outputs), _term64(e.body), e.pos)
        weights = {k: v.detach().double() if v.is_floating_point() else v.detach()
                   for k, v in program.weights.items()}
        return Program(program.name, tensors, consts, defs, entry, weights)
    return run_deep(build)


def example_inputs(program: Program) -> list[torch.Tensor]:
    """Inputs of the entry's types: normal floats; integers 0 or 1 (valid token ids for any vocabulary)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in program.entry.inputs:
        if not isinstance(t, TensorType):
            raise BwskError(f"cannot make an example input of type {t}: give example inputs")
        if t.torch_dtype.is_floating_point:
            out.append(torch.randn(t.shape, generator=gen, dtype=t.torch_dtype))
        elif t.torch_dtype == torch.bool:
            out.append(torch.ones(t.shape, dtype=torch.bool))
        else:
            out.append(torch.randint(0, 2, t.shape, generator=gen, dtype=t.torch_dtype))
    return out


def _gradients(module, inputs: list, seed: int):
    module.train()
    module.reseed(seed)
    leaves = [x.detach().double().requires_grad_() if x.is_floating_point() else x for x in inputs]
    outs = module(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(1)
    total = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
                for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)
    if not isinstance(total, torch.Tensor):
        raise BwskError("no output depends on a floating input or parameter: nothing to check")
    total.backward()
    grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    grads.update({f"input {i}": x.grad for i, x in enumerate(leaves) if getattr(x, "grad", None) is not None})
    return grads


FLOOR = 1e-6  # a gradient below this fraction of its group's largest is judged against that floor


def _group_error(names, got, want) -> dict:
    """The largest relative error of a group's gradients, each ``|g - g_ref| / max(|g_ref|, FLOOR *
    largest |g_ref| of the group)``: a parameter whose gradient is zero in exact arithmetic (an
    attention key bias) is judged against the group's scale, not its own rounding noise, while a
    wrong gradient of any other parameter, however small, still shows."""
    if not names:
        return {"max_rel_error": 0.0, "worst": None}
    norms = {n: want[n].norm().item() for n in names}
    floor = FLOOR * max(norms.values())
    errors = {n: (got[n] - want[n]).norm().item() / max(norms[n], floor) if max(norms[n], floor) > 0
              else (got[n] - want[n]).norm().item() for n in names}
    worst = max(names, key=errors.__getitem__)
    return {"max_rel_error": errors[worst], "worst": worst}


def check_reversible(program: Program, inputs=None, *, seed: int = 0, tolerance: float = TOLERANCE,
                     checkpoint: bool = True) -> dict:
    """Compare the reversible gradients of ``program`` (already rewritten) with the plain-autograd
    reference in float64; a report ``{"dtype", "tolerance", "chains": [...], "outside": ..., "ok"}``
    whose errors are the largest per parameter of each chain (and of the rest, inputs included), each
    relative to the parameter's gradient or ``FLOOR`` times its group's largest.
    Raises ``BwskError`` naming the first chain whose error exceeds ``tolerance``."""
    from bwskc.runtime.compiled import compile_program
    p64 = promote_to_float64(program)
    inputs = example_inputs(program) if inputs is None else list(inputs)
    rev = compile_program(p64, reversible=True, seed=seed, checkpoint=checkpoint)
    ref = compile_program(p64, reversible=False, seed=seed)
    got, want = _gradients(rev, inputs, seed), _gradients(ref, inputs, seed)
    missing = sorted(set(want) - set(got))
    if missing:
        raise BwskError(f"reversible backward gives no gradient for {missing[0]} (the reference does)")
    chains, in_chains = [], set()
    for i, spec in enumerate(rev.chains):
        names = [n for n in spec.tensor_names if n in want]
        in_chains.update(names)
        chains.append({"chain": i, "blocks": len(spec.branches), "parameters": len(names),
                       **_group_error(names, got, want)})
    outside = _group_error([n for n in want if n not in in_chains], got, want)
    report = {"dtype": "float64", "tolerance": tolerance, "chains": chains, "outside": outside,
              "max_rel_error": max([c["max_rel_error"] for c in chains] + [outside["max_rel_error"]])}
    report["ok"] = report["max_rel_error"] <= tolerance
    for c in chains:
        if c["max_rel_error"] > tolerance:
            raise BwskError(f"reversible chain {c['chain']} ({c['blocks']} blocks): gradient of {c['worst']} "
                            f"differs from plain autograd by {c['max_rel_error']:.2e} relative in float64 "
                            f"(tolerance {tolerance:.0e})")
    if outside["max_rel_error"] > tolerance:
        raise BwskError(f"reversible mode: gradient of {outside['worst']} (outside the chains) differs from plain "
                        f"autograd by {report['outside']['max_rel_error']:.2e} relative in float64")
    return report
