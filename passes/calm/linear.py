"""Contractions: linear, matmul, mm, bmm, addmm... and einsum. Contracting the partitioned dim is an
all-reduce; partitioned rows or columns are free."""
from __future__ import annotations

from bwskc.passes.calm.context import Ctx
from bwskc.passes.calm.letters import by_letters, contract_reason, right_aligned
from bwskc.passes.calm.plan import Plan
from bwskc.passes.calm.table import rule

MATMUL = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "outer", "ger",
          "linear", "matmul"}


@rule(*MATMUL)
def rule_matmul(ctx: Ctx) -> Plan:
    name = ctx.op.split(".")[1]
    out_shape = ctx.out_type.shape
    if name in ("mm", "addmm"):
        a, b = ctx.si("mat1" if name == "addmm" else "self"), ctx.si("mat2")
        letters = {a: ("m", "k"), b: ("k", "n")}
        ol = ("m", "n")
    elif name in ("bmm", "baddbmm"):
        a, b = ctx.si("batch1" if name == "baddbmm" else "self"), ctx.si("batch2" if name == "baddbmm"
                                                                         else "mat2")
        letters = {a: ("b", "m", "k"), b: ("b", "k", "n")}
        ol = ("b", "m", "n")
    elif name == "addbmm":
        a, b = ctx.si("batch1"), ctx.si("batch2")
        letters = {a: ("b", "m", "k"), b: ("b", "k", "n")}
        ol = ("m", "n")
    elif name in ("mv", "addmv"):
        a, b = ctx.si("mat" if name == "addmv" else "self"), ctx.si("vec")
        letters = {a: ("m", "k"), b: ("k",)}
        ol = ("m",)
    elif name in ("dot", "vdot"):
        letters = {ctx.si("self"): ("k",), ctx.si("tensor"): ("k",)}
        ol = ()
    elif name in ("outer", "ger"):
        letters = {ctx.si("self"): ("i",), ctx.si("vec2"): ("j",)}
        ol = ("i", "j")
    elif name == "linear":
        x, w, bias = ctx.si("input"), ctx.si("weight"), ctx.si("bias")
        rx = len(ctx.shape(x))
        xl = tuple(("b", k) for k in range(rx - 1)) + ("k",)
        wl = ("n", "k") if len(ctx.shape(w)) == 2 else ("k",)
        ol = xl[:-1] + (("n",) if len(ctx.shape(w)) == 2 else ())
        letters = {x: xl, w: wl}
        if bias is not None:
            letters[bias] = right_aligned(ctx.shape(bias), ol, out_shape)
        return by_letters(ctx, letters, ol, contract=contract_reason(ctx), prefer=x)
    else:  # matmul
        a, b = ctx.si("self"), ctx.si("other")
        ra, rb = len(ctx.shape(a)), len(ctx.shape(b))
        if ra == 1 and rb == 1:
            letters, ol = {a: ("k",), b: ("k",)}, ()
        else:
            nb = len(out_shape) - (ra >= 2) - (rb >= 2)
            bl = tuple(("b", k) for k in range(nb))
            bshape = out_shape[:nb]
            al = (right_aligned(ctx.shape(a)[:-2], bl, bshape) + ("m", "k")) if ra >= 2 else ("k",)
            blt = (right_aligned(ctx.shape(b)[:-2], bl, bshape) + ("k", "n")) if rb >= 2 else ("k",)
            letters = {a: al, b: blt}
            ol = bl + (("m",) if ra >= 2 else ()) + (("n",) if rb >= 2 else ())
        return by_letters(ctx, letters, ol, contract=contract_reason(ctx), prefer=a)
    bias = ctx.si("self") if name in ("addmm", "baddbmm", "addbmm", "addmv") else None
    if bias is not None:
        letters[bias] = right_aligned(ctx.shape(bias), ol, out_shape)
    return by_letters(ctx, letters, ol, contract=contract_reason(ctx),
                      prefer=next(iter(letters)) if name not in ("dot", "vdot") else None)


@rule("einsum")
def rule_einsum(ctx: Ctx) -> Plan:
    eq = ctx.val("equation").replace(" ", "")
    tens = ctx.sis("tensors")
    lhs, arrow, rhs = eq.partition("->")
    specs = lhs.split(",")
    if len(specs) != len(tens) or any(t is None for t in tens):
        return ctx.barrier("unknown", "einsum: unsupported equation")
    ell_rank = 0
    for s, t in zip(specs, tens):
        if "..." in s:
            ell_rank = max(ell_rank, len(ctx.shape(t)) - (len(s) - 3))
    if not arrow:
        # implicit output: letters appearing once, sorted, ellipsis first
        counts = {}
        for s in specs:
            for c in s.replace("...", ""):
                counts[c] = counts.get(c, 0) + 1
        rhs = ("..." if ell_rank else "") + "".join(sorted(c for c, n in counts.items() if n == 1))
    ell = tuple(("e", k) for k in range(ell_rank))
    ell_shape = ()

    def expand(s, t):
        if "..." not in s:
            return tuple(s)
        pre, post = s.split("...")
        n = len(ctx.shape(t)) - len(pre) - len(post) if t is not None else ell_rank
        return tuple(pre) + ell[ell_rank - n:] + tuple(post)

    out_l = expand(rhs, None)
    ell_shape = ctx.out_type.shape[rhs.find("..."):rhs.find("...") + ell_rank] if "..." in rhs else ()
    letters = {}
    for s, t in zip(specs, tens):
        ls = list(expand(s, t))
        for k, L in enumerate(ls):  # broadcast ellipsis dims of size 1
            if isinstance(L, tuple) and ell_shape and ctx.shape(t)[k] == 1 and \
                    ell_shape[L[1]] != 1:
                ls[k] = None
        letters[t] = tuple(ls)
    return by_letters(ctx, letters, out_l, contract=contract_reason(ctx))
