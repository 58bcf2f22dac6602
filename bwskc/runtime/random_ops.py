"""Every random ATen op, drawn counter-based: a pure function of (step seed, site, element index).

A reversible backward recomputes each branch, and a checkpointed layer its interior; both are exact
only if every random number is drawn again as in the forward pass. ``bwskc.runtime.rng`` makes
dropout masks a hash of their coordinates; this module does the same for the other random ops, one
rule a op, registered with ``@replays`` (as ``bwskc.passes.typing`` registers typing rules): uniform,
normal, Bernoulli, exponential, geometric, Cauchy, log-normal, integer, permutation and multinomial
draws, alpha and feature dropout, and RReLU's random slopes. Each rule takes the op's filled
arguments, the step's seed (``(key, shard)``, or None in evaluation) and its site ``where`` (chain,
branch, number), so the same site draws the same numbers however often it runs.

An op is *random* if ATen tags it ``nondeterministic_seeded``. Some tagged ops are random only for
some arguments (attention with ``dropout_p > 0``, dropout with ``train=True``, an RNN with dropout in
training); ``draws`` decides it from the arguments. A random op without a rule here (``poisson``,
``binomial``, gamma and Dirichlet samples, the fused attention kernels with dropout, RNNs with dropout)
is *unreplayable*: the reversible pass leaves its block uncoupled and the runtime stores its layer
rather than checkpointing it, naming the op (``unreplayable_reason``).

Evaluation (``seed`` None) follows each op's eval meaning where it has one (dropout and RReLU are
deterministic in evaluation); a pure draw (``rand``) in a program that was captured in training mode
and is run in evaluation draws from a fixed key, the same numbers every call. Programs captured from a
module get an evaluation capture of their own (``bwskc.compile``), where these ops do not appear.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from bwskc.ir import Prim, Program, Term, walk_terms
from bwskc.runtime import rng

REPLAY: dict[str, Callable] = {}  # op name -> rule(args, kwargs, seed, where) -> value
_EVAL_KEY = 0x5EED  # the key of pure draws run in evaluation mode (no step seed)


def draw(op: str, args, kwargs, seed, where):
    """The fx call target of every random op: its rule (one module-level function, picklable by name)."""
    return REPLAY[op](args, kwargs, seed, where)


def replays(*ops: str):
    """Register a counter-based rule for the ops named."""
    def register(fn):
        for op in ops:
            REPLAY[op] = fn
        return fn
    return register


# ------------------------------------------------------------------------------------ which ops draw
def is_random_target(target) -> bool:
    """An fx call target ATen tags as drawing from a generator."""
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags


def _tagged(op: str) -> bool:
    parts = op.split(".")
    if len(parts) != 3 or parts[0] != "aten":
        return False
    packet = getattr(torch.ops.aten, parts[1], None)
    target = getattr(packet, parts[2], None) if packet is not None else None
    return is_random_target(target)


def _arg(args, kwargs, i: int, name: str, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


# ops that are random only for some arguments: name -> whether these arguments draw
_CONDITIONAL: dict[str, Callable] = {
    "aten.native_dropout.default": lambda a, k: bool(_arg(a, k, 2, "train", True)) and _arg(a, k, 1, "p") != 0,
    "aten.dropout.default": lambda a, k: bool(_arg(a, k, 2, "train")) and _arg(a, k, 1, "p") != 0,
    "aten.alpha_dropout.default": lambda a, k: bool(_arg(a, k, 2, "train")) and _arg(a, k, 1, "p") != 0,
    "aten.feature_dropout.default": lambda a, k: bool(_arg(a, k, 2, "train")) and _arg(a, k, 1, "p") != 0,
    "aten.feature_alpha_dropout.default": lambda a, k: bool(_arg(a, k, 2, "train")) and _arg(a, k, 1, "p") != 0,
    "aten.scaled_dot_product_attention.default": lambda a, k: bool(_arg(a, k, 4, "dropout_p", 0.0)),
    "aten.rrelu.default": lambda a, k: bool(_arg(a, k, 3, "training", False)),
    "aten.rrelu_with_noise.default": lambda a, k: bool(_arg(a, k, 4, "training", False)),
    "aten.rrelu_with_noise_functional.default": lambda a, k: bool(_arg(a, k, 4, "training", False)),
    # the generator-free planner of the fused attention kernels: deterministic
    "aten._fused_sdp_choice.default": lambda a, k: False,
}
for _rnn in ("lstm", "gru", "rnn_tanh", "rnn_relu"):  # (.input: dropout at 6, train at 7)
    _CONDITIONAL[f"aten.{_rnn}.input"] = (
        lambda a, k, d=6: bool(_arg(a, k, d + 1, "train")) and _arg(a, k, d, "dropout") != 0)
    _CONDITIONAL[f"aten.{_rnn}.data"] = (
        lambda a, k, d=7: bool(_arg(a, k, d + 1, "train")) and _arg(a, k, d, "dropout") != 0)


def draws(op: str, args, kwargs) -> bool:
    """Whether this application of ``op`` draws random numbers."""
    if op in _CONDITIONAL:
        try:
            return _CONDITIONAL[op](args, dict(kwargs))
        except (IndexError, TypeError):
            return True  # arguments it cannot read: assume the worst
    return _tagged(op)


def unreplayable_reason(op: str, args, kwargs) -> str | None:
    """Why an application of ``op`` cannot be drawn again exactly, or None if it can (or draws nothing)."""
    if not draws(op, args, kwargs):
        return None
    if op in REPLAY:
        return None
    return (f"{op} draws random numbers and bwskc has no counter-based rule for it, so a recomputation "
            "could not draw them again")


# -------------------------------------------------------------------------------------- the draws

def unreplayable_draw(program: Program, term: Term) -> str | None:
    """The first random op ``term`` applies (through the definitions it calls) that the runtime cannot
    draw again exactly, with why; None if there is none."""
    for _, t in walk_terms(program, [term]):
        if isinstance(t, Prim):
            reason = unreplayable_reason(t.op, t.args, t.kwargs)
            if reason is not None:
                return reason
    return None

_EVAL_SHARD: list = []  # the window pure draws in evaluation are made through (a sharded run's)


@contextlib.contextmanager
def evaluating_through(window):
    """Pure draws in evaluation (no step seed) made through ``window`` (``rng.Window``, or 0): a
    sharded run's evaluation draws its slice of the single-process numbers, as training does."""
    _EVAL_SHARD.append(window)
    try:
        yield
    finally:
        _EVAL_SHARD.pop()


def _key(seed, where: tuple) -> tuple[int, int]:
    if seed is None:
        return rng.make_key(_EVAL_KEY, *where), (_EVAL_SHARD[-1] if _EVAL_SHARD else 0)
    key, shard = seed
    return rng.make_key(key, *where), shard


def _leading(seed, rank: int):
    """``seed`` for a draw that spans only the first ``rank`` dims of its op's result (feature
    dropout's ``[N, C, 1, ..]`` noise): a window on a later dim becomes the whole draw, the same on
    every shard, as one process draws it."""
    if seed is not None and isinstance(seed[1], rng.Window) and seed[1].dim >= rank:
        return seed[0], 0
    return seed


def _uniform(shape, seed, where, device, dtype=torch.float32, stream: int = 0) -> torch.Tensor:
    """Uniforms in [0, 1) (24 bits); ``stream`` selects an independent draw of the same site."""
    key, shard = _key(seed, where + ((stream,) if stream else ()))
    n = rng._numel(shape)
    return rng.uniform(shape, key, device, start=rng.origin(shard, shape, device)).to(dtype)


def _open_uniform(shape, seed, where, device, stream: int = 0) -> torch.Tensor:
    """Uniforms in (0, 1): safe under ``log``."""
    return _uniform(shape, seed, where, device, torch.float64, stream) + 2.0 ** -25


def _normal(shape, seed, where, device) -> torch.Tensor:
    """Standard normals by Box-Muller from two independent uniform streams (float64)."""
    u1 = _open_uniform(shape, seed, where, device, 1)
    u2 = _uniform(shape, seed, where, device, torch.float64, 2)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def _words64(shape, seed, where, device) -> torch.Tensor:
    """Non-negative 63-bit integers from two word streams."""
    key, shard = _key(seed, where)
    n = rng._numel(shape)
    start = rng.origin(shard, shape, device)
    hi = rng.words(n, rng._mix_int(key, 1), device, start).to(torch.int64) & 0x7FFFFFFF
    lo = rng.words(n, rng._mix_int(key, 2), device, start).to(torch.int64) & rng.M32
    return ((hi << 32) | lo).reshape(shape)


def _like(x: torch.Tensor, kwargs) -> dict:
    return {"dtype": kwargs.get("dtype") or x.dtype, "device": kwargs.get("device") or x.device}


def _factory(kwargs) -> dict:
    device = kwargs.get("device") or "cpu"
    return {"dtype": kwargs.get("dtype") or torch.get_default_dtype(), "device": device}


@replays("aten.rand.default", "aten.rand.generator")
def _rand(args, kwargs, seed, where):
    size, opts = args[0], _factory(kwargs)
    return _uniform(size, seed, where, opts["device"], opts["dtype"])


@replays("aten.rand_like.default", "aten.rand_like.generator")
def _rand_like(args, kwargs, seed, where):
    x, opts = args[0], _like(args[0], kwargs)
    return _uniform(x.shape, seed, where, opts["device"], opts["dtype"])


@replays("aten.uniform.default")
def _uniform_op(args, kwargs, seed, where):
    x = args[0]
    low, high = _arg(args, kwargs, 1, "from", 0.0), _arg(args, kwargs, 2, "to", 1.0)
    if seed is None:  # evaluation: the draw's mean, so a multiplicative jitter (Switch) is the identity
        return torch.full_like(x, (low + high) / 2)
    u = _uniform(x.shape, seed, where, x.device, torch.float64)
    return (low + (high - low) * u).to(x.dtype)


@replays("aten.randn.default", "aten.randn.generator")
def _randn(args, kwargs, seed, where):
    opts = _factory(kwargs)
    return _normal(args[0], seed, where, opts["device"]).to(opts["dtype"])


@replays("aten.randn_like.default", "aten.randn_like.generator")
def _randn_like(args, kwargs, seed, where):
    x, opts = args[0], _like(args[0], kwargs)
    return _normal(x.shape, seed, where, opts["device"]).to(opts["dtype"])


@replays("aten.normal_functional.default")
def _normal_functional(args, kwargs, seed, where):
    x = args[0]
    mean, std = _arg(args, kwargs, 1, "mean", 0.0), _arg(args, kwargs, 2, "std", 1.0)
    return (mean + std * _normal(x.shape, seed, where, x.device)).to(x.dtype)


@replays("aten.normal.Tensor_Tensor", "aten.normal.Tensor_float", "aten.normal.float_Tensor")
def _normal_tensors(args, kwargs, seed, where):
    mean, std = _arg(args, kwargs, 0, "mean"), _arg(args, kwargs, 1, "std", 1.0)
    ref = mean if isinstance(mean, torch.Tensor) else std
    shape = torch.broadcast_shapes(*(t.shape for t in (mean, std) if isinstance(t, torch.Tensor)))
    # detached: ATen defines no gradient through a sample's mean and std (its derivative is zero)
    mean = mean.detach() if isinstance(mean, torch.Tensor) else mean
    std = std.detach() if isinstance(std, torch.Tensor) else std
    return (mean + std * _normal(shape, seed, where, ref.device)).to(ref.dtype)


@replays("aten.normal.float_float")
def _normal_floats(args, kwargs, seed, where):
    mean, std, size = args[0], args[1], args[2]
    opts = _factory(kwargs)
    return (mean + std * _normal(size, seed, where, opts["device"])).to(opts["dtype"])


@replays("aten.bernoulli.p")
def _bernoulli_p(args, kwargs, seed, where):
    x, p = args[0], _arg(args, kwargs, 1, "p", 0.5)
    return (_uniform(x.shape, seed, where, x.device, torch.float64) < p).to(x.dtype)


@replays("aten.bernoulli.default", "aten.bernoulli.Tensor")
def _bernoulli_tensor(args, kwargs, seed, where):
    x = args[0]
    p = _arg(args, kwargs, 1, "p", x) if len(args) > 1 or "p" in kwargs else x
    return (_uniform(x.shape, seed, where, x.device, torch.float64) < p.double()).to(x.dtype)


@replays("aten.exponential.default")
def _exponential(args, kwargs, seed, where):
    x, lambd = args[0], _arg(args, kwargs, 1, "lambd", 1.0)
    return (-torch.log(_open_uniform(x.shape, seed, where, x.device)) / lambd).to(x.dtype)


@replays("aten.geometric.default")
def _geometric(args, kwargs, seed, where):
    x, p = args[0], _arg(args, kwargs, 1, "p")
    u = _open_uniform(x.shape, seed, where, x.device)
    return torch.ceil(torch.log(u) / math.log1p(-p)).clamp(min=1).to(x.dtype)


@replays("aten.cauchy.default")
def _cauchy(args, kwargs, seed, where):
    x = args[0]
    median, sigma = _arg(args, kwargs, 1, "median", 0.0), _arg(args, kwargs, 2, "sigma", 1.0)
    u = _open_uniform(x.shape, seed, where, x.device)
    return (median + sigma * torch.tan(math.pi * (u - 0.5))).to(x.dtype)


@replays("aten.log_normal.default")
def _log_normal(args, kwargs, seed, where):
    x = args[0]
    mean, std = _arg(args, kwargs, 1, "mean", 1.0), _arg(args, kwargs, 2, "std", 2.0)
    return torch.exp(mean + std * _normal(x.shape, seed, where, x.device)).to(x.dtype)


def _integers(shape, low: int, high: int, seed, where, device) -> torch.Tensor:
    """Integers uniform in [low, high) (63-bit words reduced modulo the range: bias below 2**-31
    for ranges below 2**32)."""
    return low + _words64(shape, seed, where, device) % (high - low)


@replays("aten.randint.default", "aten.randint.generator")
def _randint(args, kwargs, seed, where):
    high, size = args[0], args[1]
    opts = _factory(kwargs) | {"dtype": kwargs.get("dtype") or torch.int64}
    return _integers(size, 0, high, seed, where, opts["device"]).to(opts["dtype"])


@replays("aten.randint.low", "aten.randint.low_generator")
def _randint_low(args, kwargs, seed, where):
    low, high, size = args[0], args[1], args[2]
    opts = _factory(kwargs) | {"dtype": kwargs.get("dtype") or torch.int64}
    return _integers(size, low, high, seed, where, opts["device"]).to(opts["dtype"])


@replays("aten.randint_like.default", "aten.randint_like.generator", "aten.randint_like.Tensor",
         "aten.randint_like.Tensor_generator")
def _randint_like(args, kwargs, seed, where):
    x, opts = args[0], _like(args[0], kwargs)
    high = int(_arg(args, kwargs, 1, "high"))
    return _integers(x.shape, 0, high, seed, where, opts["device"]).to(opts["dtype"])


@replays("aten.randint_like.low_dtype", "aten.randint_like.low_generator_dtype")
def _randint_like_low(args, kwargs, seed, where):
    x, opts = args[0], _like(args[0], kwargs)
    low, high = int(_arg(args, kwargs, 1, "low")), int(_arg(args, kwargs, 2, "high"))
    return _integers(x.shape, low, high, seed, where, opts["device"]).to(opts["dtype"])


def _random_top(dtype: torch.dtype) -> int:
    """The largest value ``random_()`` draws for a dtype, inclusive: 2**digits for floating types (every
    integer up to it exact), the maximum for integer types, 1 for bool."""
    if dtype.is_floating_point:
        return 2 ** (1 - int(math.log2(torch.finfo(dtype).eps)))
    return 1 if dtype == torch.bool else torch.iinfo(dtype).max


@replays("aten.random.default", "aten.random.from", "aten.random.to")
def _random(args, kwargs, seed, where):
    """``random_()``: [0, top]; ``random_(to)``: [0, to); ``random_(from, to)``: [from, to), with
    ``to=None`` meaning [from, top] (``_random_top``), as ATen draws them."""
    x = args[0]
    if len(args) >= 3 or ("from" in kwargs and "to" in kwargs):
        low, high = _arg(args, kwargs, 1, "from"), _arg(args, kwargs, 2, "to")
    elif len(args) == 2 or "to" in kwargs:
        low, high = 0, _arg(args, kwargs, 1, "to")
    else:
        low, high = 0, None
    if high is None:
        high = _random_top(x.dtype) + 1
    return _integers(x.shape, int(low), int(high), seed, where, x.device).to(x.dtype)


@replays("aten.randperm.default", "aten.randperm.generator")
def _randperm(args, kwargs, seed, where):
    n = args[0]
    opts = _factory(kwargs) | {"dtype": kwargs.get("dtype") or torch.int64}
    keys = _words64((n,), seed, where, opts["device"])
    return torch.argsort(keys, stable=True).to(opts["dtype"])


@replays("aten.multinomial.default")
def _multinomial(args, kwargs, seed, where):
    probs, n = args[0], _arg(args, kwargs, 1, "num_samples")
    replacement = bool(_arg(args, kwargs, 2, "replacement", False))
    p = probs.double()
    p = p / p.sum(-1, keepdim=True)
    if replacement:  # inverse CDF, one uniform a sample
        u = _uniform(p.shape[:-1] + (n,), seed, where, p.device, torch.float64)
        cdf = p.cumsum(-1)
        return torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=p.shape[-1] - 1)
    if int((p > 0).sum(-1).min()) < n:  # ATen refuses this too
        raise RuntimeError("multinomial: cannot sample n_sample > prob_dist.size(-1) samples without "
                           "replacement (fewer categories with nonzero probability)")
    # without replacement: the top n of log p + Gumbel noise (the Gumbel-top-k trick)
    g = -torch.log(-torch.log(_open_uniform(p.shape, seed, where, p.device)))
    return torch.topk(torch.log(p) + g, n, dim=-1).indices


@replays("aten.native_dropout.default")
def _native_dropout(args, kwargs, seed, where):
    x, p = args[0], _arg(args, kwargs, 1, "p")
    train = _arg(args, kwargs, 2, "train", True)
    return rng.native_dropout(x, p, seed if train else None, where)


@replays("aten.dropout.default")
def _dropout(args, kwargs, seed, where):
    x, p, train = args[0], _arg(args, kwargs, 1, "p"), _arg(args, kwargs, 2, "train")
    return rng.dropout(x, p, seed if train else None, where)


def _noise_dropout(x, p: float, seed, where, *, feature: bool, alpha: bool):
    """ATen's dropout family: Bernoulli(1 - p) noise (one value a channel for feature dropout), scaled
    to keep the mean; alpha dropout keeps SELU's mean and variance instead (ATen's constants)."""
    if seed is None or p == 0:
        return x
    shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2) if feature else x.shape
    keep = (_uniform(shape, _leading(seed, 2) if feature else seed, where, x.device, torch.float64)
            >= p).to(x.dtype)
    if p >= 1:
        return x * 0
    if not alpha:
        return x * keep / (1.0 - p)
    a_ = 1.7580993408473766
    a = 1.0 / math.sqrt((a_ * a_ * p + 1) * (1 - p))
    b = (keep - 1) * (a_ * a) + a_ * a * p
    return x * (keep * a) + b


@replays("aten.alpha_dropout.default")
def _alpha_dropout(args, kwargs, seed, where):
    x, p, train = args[0], _arg(args, kwargs, 1, "p"), _arg(args, kwargs, 2, "train")
    return _noise_dropout(x, p, seed if train else None, where, feature=False, alpha=True)


@replays("aten.feature_dropout.default")
def _feature_dropout(args, kwargs, seed, where):
    x, p, train = args[0], _arg(args, kwargs, 1, "p"), _arg(args, kwargs, 2, "train")
    return _noise_dropout(x, p, seed if train else None, where, feature=True, alpha=False)


@replays("aten.feature_alpha_dropout.default")
def _feature_alpha_dropout(args, kwargs, seed, where):
    x, p, train = args[0], _arg(args, kwargs, 1, "p"), _arg(args, kwargs, 2, "train")
    return _noise_dropout(x, p, seed if train else None, where, feature=True, alpha=True)


def _rrelu_slopes(x, lower: float, upper: float, training: bool, seed, where):
    if not training or seed is None:
        return torch.full_like(x, (lower + upper) / 2)
    return (lower + (upper - lower) * _uniform(x.shape, seed, where, x.device, torch.float64)).to(x.dtype)


@replays("aten.rrelu.default")
def _rrelu(args, kwargs, seed, where):
    x = args[0]
    lower, upper = _arg(args, kwargs, 1, "lower", 1 / 8), _arg(args, kwargs, 2, "upper", 1 / 3)
    slopes = _rrelu_slopes(x, lower, upper, _arg(args, kwargs, 3, "training", False), seed, where)
    return torch.where(x > 0, x, x * slopes)  # ATen: x <= 0 takes the slope (its gradient at 0)


@replays("aten.rrelu_with_noise.default")
def _rrelu_with_noise(args, kwargs, seed, where):
    return _rrelu_with_noise_functional(args, kwargs, seed, where)[0]


@replays("aten.rrelu_with_noise_functional.default")
def _rrelu_with_noise_functional(args, kwargs, seed, where):
    x, noise = args[0], args[1]
    lower, upper = _arg(args, kwargs, 2, "lower", 1 / 8), _arg(args, kwargs, 3, "upper", 1 / 3)
    training = _arg(args, kwargs, 4, "training", False)
    slopes = _rrelu_slopes(x, lower, upper, training, seed, where)
    if training and seed is not None:  # ATen's noise: the slope where x < 0, 1 elsewhere
        noise = torch.where(x > 0, torch.ones_like(slopes), slopes).to(noise.dtype)
    return torch.where(x > 0, x, x * slopes), noise


@replays("aten.scaled_dot_product_attention.default")
def _attention(args, kwargs, seed, where):
    full = dict(zip(("attn_mask", "dropout_p", "is_causal"), args[3:]), **dict(kwargs))
    return rng.attention(*args[:3], **full, seed=seed, where=where)
