"""DAG family: linear maps. The term's matrix is read off basis vectors in float64; with integer
coefficients its rank is exact (rational elimination, a null vector as K witness), otherwise float64
singular values decide with a margin.
"""
from __future__ import annotations

from typing import Any

import torch

from bwskc.evidence import S, Verdict, erasing, gray
from bwskc.passes.typing.dag import MOVE, Node, Var, alpha_of, literal_scalar, term_call
from bwskc.passes.typing.movement import out_parts


_LINEAR_LIMIT = 256  # inputs whose matrix is read off basis vectors
_EXACT_LIMIT = 64  # inputs for exact rational elimination


def _linear_tags(dag):
    """Each node's linearity: "int" (linear with integer coefficients, computed exactly in float64 on
    integer inputs), "real" (affine in x), None (not affine)."""
    tags: dict[int, Any] = {}

    def tag(v):
        if isinstance(v, Var):
            return "int"
        if isinstance(v, Node) and v.active:
            return tags[id(v)]
        return "const"

    def join(ts):
        ts = [t for t in ts if t != "const"]
        return "int" if all(t == "int" for t in ts) else "real"
    for n in dag.nodes:
        p, a = n.packet, n.args
        ins = [tag(o) for o in n.operands]
        t = None
        if any(i is None for i in ins):
            t = None
        elif p in MOVE or p == "aten.neg":
            t = join(ins)
        elif p in ("aten.add", "aten.sub", "aten.rsub"):
            alpha = alpha_of(n)
            if alpha is not None:
                consts = [v for v in a[:2] if tag(v) == "const" and literal_scalar(v) != 0.0]
                t = join(ins) if not consts and alpha == int(alpha) else "real"
        elif p in ("aten.mul", "aten.div") and "rounding_mode" not in n.kwargs:
            if sum(1 for v in a[:2] if tag(v) != "const") == 1:
                s = [literal_scalar(v) for v in a[:2] if tag(v) == "const"][0]
                if p == "aten.div":
                    s = (1 / s) if s else None
                t = join(ins) if s is not None and s == int(s) else "real"
        elif p == "aten.sum":
            t = join(ins)
        elif p == "aten.mean":
            t = "real"
        elif p in ("aten.linear", "aten.matmul", "aten.mm", "aten.bmm", "aten.conv1d", "aten.conv2d"):
            if sum(1 for v in a[:2] if tag(v) != "const") == 1:
                t = "real"
        tags[id(n)] = t
    return tags


def _rref_null(rows: list[list[int]], n: int):
    """(rank, a null vector or None) of an integer matrix, by exact rational elimination."""
    from fractions import Fraction
    m = [[Fraction(v) for v in r] for r in rows]
    pivots, r = [], 0
    for c in range(n):
        piv = next((i for i in range(r, len(m)) if m[i][c] != 0), None)
        if piv is None:
            continue
        m[r], m[piv] = m[piv], m[r]
        inv = 1 / m[r][c]
        m[r] = [v * inv for v in m[r]]
        for i in range(len(m)):
            if i != r and m[i][c] != 0:
                f = m[i][c]
                m[i] = [vi - f * vr for vi, vr in zip(m[i], m[r])]
        pivots.append(c)
        r += 1
        if r == len(m):
            break
    if r == n:
        return r, None
    free = next(c for c in range(n) if c not in pivots)
    v = [Fraction(0)] * n
    v[free] = Fraction(1)
    for i, c in enumerate(pivots):
        v[c] = -m[i][free]
    import math
    lcm = 1
    for q in v:
        lcm = lcm * q.denominator // math.gcd(lcm, q.denominator)
    return r, [int(q * lcm) for q in v]


def decide_linear(dag, result) -> Verdict | None:
    """S, K or GRAY for a term affine in x (at most ``_LINEAR_LIMIT`` inputs), else None."""
    x_type = dag.x.type
    n = x_type.numel
    if not x_type.torch_dtype.is_floating_point or not 0 < n <= _LINEAR_LIMIT:
        return None
    tags = _linear_tags(dag)
    kind = tags.get(id(dag.root))
    if kind not in ("int", "real"):
        return None
    fn64 = term_call(dag.term, result, f64=True)

    def flat(y):
        parts = out_parts(y)
        return torch.cat([q.double() for q in parts]) if parts else torch.zeros(0, dtype=torch.float64)
    zero = torch.zeros(x_type.shape, dtype=torch.float64)
    b = flat(fn64(zero))
    eye = torch.eye(n, dtype=torch.float64)
    cols = [flat(fn64(eye[i].reshape(x_type.shape))) - b for i in range(n)]
    A = torch.stack(cols, 1)  # (outputs, n)
    dtype = x_type.torch_dtype
    exact = kind == "int" and n <= _EXACT_LIMIT and bool((A == A.round()).all()) and bool((b == 0).all()) \
        and (A.numel() == 0 or float(A.abs().max()) < 2 ** 20)
    shape = x_type.shape

    def s_verdict(rank_cert, claim):
        pinv = torch.linalg.pinv(A)

        def inverse(y, pinv=pinv):
            return ((pinv @ (flat(y) - b)).reshape(shape).to(dtype),)
        return Verdict(S, "linear composite", claim, 0, inverse=inverse, rank=rank_cert,
                       extra={"inverse_text": "pseudo-inverse of the map's matrix (read off basis vectors, "
                              "float64) applied to y - f(0)", "domain": "reals"})
    if exact:
        rank, null = _rref_null([[int(v) for v in row] for row in A.tolist()], n)
        if null is None:
            return s_verdict({"method": "exact rational elimination of the integer matrix", "rank": rank,
                              "columns": n}, f"the composite is linear with integer coefficients; its "
                             f"{A.shape[0]}x{n} matrix has rank {n} (exact rational elimination)")
        v = torch.tensor(null, dtype=torch.float64)
        v = v / v.abs().max()

        def witness(g, v=v):
            from bwskc.leaf import random_value
            a = random_value(x_type, g)
            return (a,), ((a.double() + v.reshape(shape)).to(dtype),)
        verdict = erasing("linear composite", f"the composite is linear with integer coefficients; its "
                          f"{A.shape[0]}x{n} matrix has rank {rank} < {n} (exact rational elimination), "
                          f"so f(x + v) = f(x) for its null vector v", witness,
                          f"x and x + v, v = {null if n <= 16 else 'a null vector'} (scaled)", n - rank)
        verdict.extra["domain"] = "reals"
        return verdict
    s = torch.linalg.svdvals(A)
    smax = float(s[0]) if len(s) else 0.0
    smin = float(s[n - 1]) if len(s) >= n else 0.0
    floor = max(A.shape) * torch.finfo(torch.float64).eps * smax
    tol = 1e3 * floor
    if smin > tol:
        return s_verdict({"method": "float64 SVD of the matrix read off basis vectors", "rank": n,
                          "columns": n, "sigma_min": smin, "sigma_max": smax, "tolerance": tol,
                          "margin": smin / tol if tol else None},
                         f"the composite is affine; its matrix has sigma_min {smin:.3g} above the "
                         f"tolerance {tol:.3g} (1e3 times the SVD's rounding bound)")
    return gray("linear composite", f"the composite is affine, but its matrix is numerically "
                f"rank-deficient: sigma_min {smin:.3g} at tolerance {tol:.3g}",
                "the matrix has full column rank in exact arithmetic",
                "exact arithmetic on the map's coefficients", None)
