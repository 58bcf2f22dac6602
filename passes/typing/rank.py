"""Rank certificates for linear maps: a null vector, exact rational elimination, the float64 SVD with its
tolerance and margin, the Gram lower bound, and the verdict of a linear map from its weight (full
column rank: S; rank-nullity: K; inside the rounding margin: GRAY). Shared by linear, convolution and
pooling rules.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from bwskc.evidence import Verdict, erasing, gray, injective
from bwskc.leaf import Leaf


def null_vector(w: torch.Tensor) -> torch.Tensor:
    """A unit vector v with w @ v = 0 (w has more columns than its rank)."""
    _, _, vh = torch.linalg.svd(w.double(), full_matrices=True)
    return vh[-1]


_EXACT_LIMIT = 32 * 32 * 128  # k d min(k, d): exact rational elimination well under a second


def _exact_rank(w: torch.Tensor) -> tuple[int, torch.Tensor | None] | None:
    """The rank of ``w`` in exact rational arithmetic on its stored values (every float is a dyadic
    rational), with a null vector (float64, unit norm) when it is deficient; None when too large."""
    from fractions import Fraction
    k, d = w.shape
    if k * d * min(k, d) > _EXACT_LIMIT:
        return None
    rows = [[Fraction(v) for v in row] for row in w.double().tolist()]
    pivots: list[int] = []
    r = 0
    for c in range(d):
        p = next((i for i in range(r, k) if rows[i][c] != 0), None)
        if p is None:
            continue
        rows[r], rows[p] = rows[p], rows[r]
        inv = 1 / rows[r][c]
        rows[r] = [v * inv for v in rows[r]]
        for i in range(k):
            if i != r and rows[i][c] != 0:
                f = rows[i][c]
                rows[i] = [a - f * b for a, b in zip(rows[i], rows[r])]
        pivots.append(c)
        r += 1
        if r == k:
            break
    if r == d:
        return r, None
    free = next(c for c in range(d) if c not in pivots)
    v = [Fraction(0)] * d
    v[free] = Fraction(1)
    for i, c in enumerate(pivots):  # reduced row echelon form: x_c = -R[i, free] x_free
        v[c] = -rows[i][free]
    out = torch.tensor([float(x) for x in v], dtype=torch.float64)
    return r, out / out.norm()


def _rank_info(w: torch.Tensor) -> tuple[str, dict, torch.Tensor | None]:
    """Whether ``w`` (k x d) has full column rank d, from its exact stored values:

    * "full": a float64 SVD of the stored values (exact in float64) gives sigma_min > tol =
      max(k, d) eps64 sigma_max. The computed singular values are those of w + E with
      ||E|| <= c eps64 ||w|| (backward stability), so each is within that of the true one: the true
      sigma_min > 0. The certificate records the method, tolerance and margin sigma_min / tol.
    * "deficient": exact rational elimination on the stored values finds rank < d (with an exact null
      vector), or d > k (rank-nullity).
    * "numerical": sigma_min <= tol and no exact decision (too large, or exactly full rank but
      sigma_min inside the rounding bound: injective in the reals, with no inverse to working precision).
    Returns (status, certificate, null vector or None)."""
    w64 = w.detach().to(torch.float64)
    k, d = w64.shape
    if d > k and k * d > _SVD_LIMIT and gram_certificate(w64.T) is not None:
        # rank-nullity, and rank exactly k (full row rank, certified on W^T): no SVD of a large map
        return "deficient", {"method": "rank-nullity; full row rank by the Gram certificate of W^T",
                             "rank": k, "numerical_rank": k}, null_vector_of(w64)
    if k * d > _SVD_LIMIT:
        gram = gram_certificate(w64)
        if gram is not None:
            return "full", gram, None
    s = torch.linalg.svdvals(w64)
    smax = float(s.max()) if len(s) else 0.0
    smin = float(s[-1]) if k >= d and len(s) else 0.0
    tol = max(k, d) * float(torch.finfo(torch.float64).eps) * smax
    cert = {"method": "float64 SVD of the stored weight", "sigma_min": smin, "sigma_max": smax,
            "tolerance": tol, "tolerance_rule": "max(k, d) * eps64 * sigma_max",
            "margin": (smin / tol) if tol > 0 else 0.0, "numerical_rank": int((s > tol).sum())}
    if k >= d and smin > tol:
        cert["rank"] = d
        return "full", cert, None
    if d > k:
        cert["rank"] = int((s > tol).sum())
        return "deficient", cert, null_vector(w64)
    exact = _exact_rank(w64)
    if exact is not None:
        cert["exact_rank"] = exact[0]
        cert["rank"] = exact[0]
        if exact[0] < d:
            cert["method"] = "exact rational elimination of the stored weight"
            return "deficient", cert, exact[1]
    cert["rank"] = cert["numerical_rank"]
    return "numerical", cert, None


_SVD_LIMIT = 1 << 16  # weight elements above which the Gram bound is tried before a float64 SVD


def gram_certificate(w64: torch.Tensor) -> dict | None:
    """Full column rank of a large ``w`` (k x d, k >= d) from its float64 Gram matrix and Cholesky
    factorisations of shifted copies: a verified lower bound of sigma_min at a fraction of an SVD's
    cost (one d x d product and a few d x d Choleskys; the 50257 x 768 GPT-2 head included).

    The computed Gram G' = fl(W^T W) satisfies ||G' - W^T W||_2 <= e1 = gamma_k ||W||_F^2. A Cholesky
    of H = G' - s I that runs to completion in floating point factors H + E exactly with
    ||E||_2 <= e2 = c (||G'||_2 + s), c = d gamma_{d+1} / (1 - d gamma_{d+1}) (Demmel; Higham 10.5),
    so H + E is positive definite and
    lambda_min(W^T W) >= s - e1 - e2. With s = e1 + e2 + t, sigma_min(W) >= sqrt(t). The target t is
    tried from a tenth of the mean eigenvalue down; the last Cholesky pivot alone would bound sigma_min
    from above, not below, which is why the shift carries the bound. None when no shift succeeds (the
    caller falls back to the SVD)."""
    k, d = w64.shape
    u = float(torch.finfo(torch.float64).eps) / 2

    def gamma(n):
        return n * u / (1 - n * u)
    g = w64.T @ w64
    fro2 = float(w64.pow(2).sum())  # >= ||G'||_2 up to rounding
    e1 = gamma(k) * fro2
    mean = fro2 / d
    eye = torch.eye(d, dtype=torch.float64)
    c = d * gamma(d + 1) / (1 - d * gamma(d + 1))  # Higham, Theorem 10.5, with its 1/(1 - d gamma)
    for t in (mean * 1e-1, mean * 1e-3, mean * 1e-6, mean * 1e-10):
        # s = e1 + t + c (||G'|| + s), solved for s; then a relative 1e-6 and 8 u ||W||_F^2 more for the
        # rounding of fro2 itself and of forming G' - s I
        shift = (e1 + t + c * fro2 * (1 + gamma(k))) / (1 - c) * (1 + 1e-6) + 8 * u * fro2
        _, info = torch.linalg.cholesky_ex(g - shift * eye)
        if int(info) == 0:
            tol = (shift - t) ** 0.5
            return {"method": "float64 Gram matrix, Cholesky of a shifted copy (verified bound)",
                    "sigma_min": t ** 0.5, "sigma_min_is": "a verified lower bound",
                    "sigma_max_upper_bound": fro2 ** 0.5, "tolerance": tol,
                    "tolerance_rule": "sqrt(s - t): gamma_k ||W||_F^2 + c (||W||_F^2 + s), "
                                      "c = d gamma_(d+1) / (1 - d gamma_(d+1)), plus rounding slack",
                    "margin": t ** 0.5 / tol if tol > 0 else float("inf"), "numerical_rank": d, "rank": d}
    return None


def linear_verdict(leaf: Leaf, w: torch.Tensor | None, d: int, k: int, rows: int, apply_pinv,
                    shift_input) -> Verdict:
    """y = x W^T (+ b) per row, x in R^d, y in R^k, ``rows`` independent rows."""
    if w is None:
        if k < d:
            return erasing("rank-nullity", f"a linear map R^{d} -> R^{k} has a null space of dimension "
                           f">= {d - k}", None, "x and x + v, v in the weight's null space (needs the "
                           "weights)", (d - k) * rows, "per row: d - k")
        return gray("rank", f"a linear map R^{d} -> R^{k} is injective iff its weight has full column "
                    f"rank {d}", f"rank(W) = {d}", "the weights (an SVD)", None)
    status, cert, null = _rank_info(w)
    if status == "full":
        cert["columns"] = d
        return injective("full column rank", f"W ({k}x{d}) has rank {d} = its column count "
                         f"({cert['method']}: sigma_min {cert['sigma_min']:.3g} > tolerance "
                         f"{cert['tolerance']:.3g}): W^+ W = I", apply_pinv,
                         "pseudo-inverse: x = (y - b) W^+^T", rank=cert, surjective=k == d)
    if status == "numerical":
        exact = "; exact rank full: injective in the reals" if cert.get("exact_rank") == d else ""
        v = gray("rank", f"W ({k}x{d}) is numerically rank-deficient: sigma_min {cert['sigma_min']:.3g} "
                 f"at tolerance {cert['tolerance']:.3g}{exact}", f"rank(W) = {d}",
                 "exact arithmetic on the weight (too large here), or a better-conditioned weight", None)
        v.rank = cert
        return v
    r = cert["rank"]

    def witness(g, null=null):
        a = leaf.random(g)
        return a, shift_input(a, null)
    v = erasing("rank-nullity", f"W ({k}x{d}) has rank {r} < {d} ({cert['method']}): x and x + v collide "
                "for v in its null space", witness, "x and x + v, v a null vector of W", (d - r) * rows,
                "per row: d - rank(W)")
    v.rank = cert
    return v


def null_vector_of(a: torch.Tensor) -> torch.Tensor:
    """A unit vector v with a @ v = 0, for a matrix with fewer rows than columns (float64). Small: the
    SVD; large: solve on the first columns (a check, and QR as the fallback)."""
    rows, cols = a.shape
    if rows == 0:
        return torch.nn.functional.one_hot(torch.tensor(0), cols).double()
    if cols <= 1024:
        return null_vector(a)
    try:
        z = torch.linalg.solve(a[:, :rows], -a[:, rows])
        v = torch.cat([z, torch.ones(1, dtype=a.dtype), torch.zeros(cols - rows - 1, dtype=a.dtype)])
        v = v / v.norm()
        if bool(torch.isfinite(v).all()) and float((a @ v).norm()) <= 1e-10 * float(a.norm()):
            return v
    except RuntimeError:  # singular leading block
        pass
    q, _ = torch.linalg.qr(a.T, mode="complete")
    return q[:, -1]


def local_witness(leaf: Leaf, plan: Callable[[], tuple[tuple, torch.Tensor]]):
    """The witness x and x + v, v a null vector of a linear op supported on one block of example 0.
    ``plan()`` gives (the block's index into an example, v shaped as the block); computed once."""
    cache: list = []

    def witness(g):
        if not cache:
            cache.append(plan())
        index, v = cache[0]
        a = leaf.random(g)[0]
        b = a.clone()
        b[(0, *index)] += (v * a.abs().max().clamp(min=1)).to(a.dtype)
        return (a,), (b,)
    return witness
