"""The IR's text form: a Lark (LALR, strict) parser with one Transformer, for what ``bwskc.printer``
prints (re-exported here: ``print_program``, ``name_text``...).

``parse_program(print_program(p)) == p`` for every program, and printing is deterministic byte for byte.
Names that are not plain identifiers, or that collide with a keyword, are printed in backquotes. A
definition's role (``Def.role``, set by the pass that made it) is printed after its name,
``phase transformer.residual0 {role=residual} : (f32[2,16,64]) -> f32[2,16,64] =``; text without it
(a definition no pass made, or text older than roles) parses with no role.
"""
from __future__ import annotations

import json
import math
import re
from functools import lru_cache

import torch
from lark import Lark, Token, Transformer_NonRecursive, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
)

from bwskc._deep import run_deep
from bwskc.errors import IRSyntaxError
from bwskc.grammar import grammar_text
from bwskc.ir import (
    DTYPE_BY_NAME,
    HOLE,
    ROLES,
    SCALAR_KINDS,
    Comb,
    Const,
    ConstRef,
    Def,
    Entry,
    Prim,
    Program,
    Ref,
    ScalarType,
    TensorDecl,
    TensorRef,
    TensorType,
    TupleType,
)
from bwskc.placement import Part, PlanStep, ShardPlan
from bwskc.printer import (  # noqa: F401  (the text form's printing half, re-exported)
    FORMAT_VERSION,
    KEYWORDS,
    TORCH_ATTRS,
    literal_text,
    name_text,
    prim_text,
    print_program,
    term_text,
    type_text,
)

# Bounds on untrusted text, each refused with its position. Deeper nesting than any lowering produces
# (Mamba's unrolled scan: hundreds) would only exhaust the recursive stages (typing, printing, equality).
MAX_NESTING = 10_000
MAX_INT_BITS = 64  # ATen's integers are 64-bit (uint64 fill values included)
# A declared tensor of more bytes than this is refused: no model has one (a 7B model's logits at
# batch 8, sequence 8192 and vocabulary 256k are 64 GiB), and the bound keeps every later stage's
# allocation bounded by what the text says.
MAX_TENSOR_BYTES = 2**40
DEF_ATTRIBUTES = ("role",)  # what ``{key=value}`` after a definition's name may set


# -------------------------------------------------------------------------------------------- parser

@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(grammar_text(), parser="lalr", strict=True, propagate_positions=True,
                maybe_placeholders=True)


class _Semantic(Exception):
    def __init__(self, message: str, token_or_meta):
        self.message = message
        self.line = getattr(token_or_meta, "line", None) or 1
        self.column = getattr(token_or_meta, "column", None) or 1


def _pos(meta):
    return (meta.line, meta.column) if not getattr(meta, "empty", True) else None


def _unquote(tok: Token) -> str:
    s = str(tok)
    return s[1:-1] if s.startswith("`") else s


def _int(tok: Token, what: str = "integer") -> int:
    """An INT token as an int, refusing more than MAX_INT_BITS (and so never parsing a huge string)."""
    text = str(tok).lstrip("-%")
    if len(text) > 20 or int(text) >= 2**MAX_INT_BITS:
        raise _Semantic(f"{what} {_clip(str(tok))} is out of range (at most {MAX_INT_BITS} bits)", tok)
    return -int(text) if str(tok).startswith("-") else int(text)


def _clip(text: str, width: int = 24) -> str:
    return text if len(text) <= width else text[:width] + "..."


def _json_string(tok: Token) -> str:
    try:
        return json.loads(str(tok))
    except ValueError as exc:  # an escape JSON does not know, such as \q
        reason = getattr(exc, "msg", None) or str(exc)
        raise _Semantic(f"bad string literal {_clip(str(tok))}: {reason}", tok) from None


def _tensor_dims(dims) -> tuple[int, ...]:
    shape = []
    for d in dims:
        n = _int(d, "dimension")
        if n < 0:
            raise _Semantic(f"negative dimension {n}", d)
        shape.append(n)
    return tuple(shape)


@v_args(inline=True)
class _ToIR(Transformer_NonRecursive):
    """Parse tree -> IR, bottom-up without recursion (terms nest as deep as MAX_NESTING)."""

    # types
    def tensor_type(self, dtype, *dims):
        if str(dtype) not in DTYPE_BY_NAME:
            raise _Semantic(f"unknown dtype {str(dtype)!r}", dtype)
        t = TensorType(str(dtype), _tensor_dims(d for d in dims if d is not None))
        if t.numel * t.torch_dtype.itemsize > MAX_TENSOR_BYTES:
            raise _Semantic(f"tensor type {_clip(str(t), 60)} is too large "
                            f"(more than {MAX_TENSOR_BYTES} bytes)", dtype)
        return t

    def tuple_type(self, *items):
        return TupleType(tuple(i for i in items if i is not None))

    def scalar_type(self, kind):
        if str(kind) not in SCALAR_KINDS:
            raise _Semantic(f"unknown type {str(kind)!r} (a tensor type needs [dims])", kind)
        return ScalarType(str(kind))

    # literals
    def int(self, tok):
        return _int(tok)

    def float(self, tok):
        return float(tok)

    def inf(self):
        return math.inf

    def ninf(self):
        return -math.inf

    def nan(self):
        return math.nan

    def string(self, tok):
        return _json_string(tok)

    def true(self):
        return True

    def false(self):
        return False

    def none(self):
        return _NONE  # not None: Lark uses None for an empty optional list

    def list(self, *items):
        return () if items == (None,) else tuple(_lit(i) for i in items)

    def hole(self):
        return HOLE

    def device(self, name, tok):
        if _unquote(name) != "torch.device":
            raise _Semantic(f"unknown literal {_unquote(name)}(...): expected torch.device(...)", name)
        try:
            return torch.device(_json_string(tok))
        except (RuntimeError, ValueError, TypeError):
            raise _Semantic(f"bad device {_clip(str(tok))}", tok) from None

    def const_arg(self, tok):
        return ConstRef(_int(tok, "constant"))

    def name_arg(self, tok):
        name = _unquote(tok)
        if str(tok) in TORCH_ATTRS:
            return TORCH_ATTRS[str(tok)]
        if str(tok).startswith("torch."):
            raise _Semantic(f"unknown torch constant {name}", tok)
        return TensorRef(name)

    def kwarg(self, key, value):
        return _Kwarg(_unquote(key), value)

    # terms
    @v_args(meta=True, inline=True)
    def prim(self, meta, op, *rest):
        *args, typ = rest
        pos, kw = [], []
        for a in args:
            if a is None:
                continue
            if isinstance(a, _Kwarg):
                if any(k == a.key for k, _ in kw):
                    raise _Semantic(f"keyword argument {a.key!r} given twice", meta)
                kw.append((a.key, _lit(a.value)))
            elif kw:
                raise _Semantic("positional argument after a keyword argument", meta)
            else:
                pos.append(_lit(a))
        return Prim(_unquote(op), tuple(pos), tuple(kw), typ, pos=_pos(meta))

    def comb_kind(self, tok):
        return tok

    @v_args(meta=True, inline=True)
    def comb(self, meta, kind, *args):
        args = tuple(a for a in args if a is not None)
        try:
            return Comb(str(kind), args, pos=_pos(meta))
        except ValueError as exc:
            raise _Semantic(str(exc), kind) from None

    @v_args(meta=True, inline=True)
    def ref(self, meta, tok):
        return Ref(_unquote(tok), pos=_pos(meta))

    @v_args(meta=True, inline=True)
    def const_term(self, meta, tok):
        return Const(_int(tok, "constant"), pos=_pos(meta))

    # declarations
    def header(self, version, name):
        if _int(version, "format version") != FORMAT_VERSION:
            raise _Semantic(f"unsupported format version {version} (this bwskc reads {FORMAT_VERSION})",
                            version)
        return ("header", _unquote(name))

    def tensor_kind(self, tok):
        return tok

    def tensor_decl(self, kind, name, typ):
        if not isinstance(typ, TensorType):
            raise _Semantic(f"{_unquote(name)}: a tensor declaration needs a tensor type", name)
        return ("tensor", _unquote(name), TensorDecl(str(kind), typ), name)

    def const_def(self, tok, prim):
        return ("const", _int(tok, "constant"), prim, tok)

    @v_args(meta=True, inline=True)
    def def_(self, meta, name, attrs, inputs, output, body):
        return ("def", Def(_unquote(name), inputs, output, body, pos=_pos(meta), **(attrs or {})), name)

    @v_args(meta=True, inline=True)
    def phase_def(self, meta, name, attrs, inputs, output, body):
        return ("def", Def(_unquote(name), inputs, output, body, pos=_pos(meta), kind="phase",
                           **(attrs or {})), name)

    def def_attr(self, key, value):
        return (key, value)

    def def_attrs(self, *items):
        """``{role=NAME}``: the definition's attributes as ``Def`` keywords (each known, given once)."""
        out = {}
        for key, value in items:
            k, v = _unquote(key), _unquote(value)
            if k not in DEF_ATTRIBUTES:
                raise _Semantic(f"unknown definition attribute {_clip(k)!r} (known: "
                                f"{', '.join(DEF_ATTRIBUTES)})", key)
            if k in out:
                raise _Semantic(f"definition attribute {k!r} given twice", key)
            if k == "role" and v not in ROLES:
                raise _Semantic(f"unknown role {_clip(v)!r} (known: {', '.join(ROLES)})", value)
            out[k] = v
        return out

    def type_list(self, *items):
        return tuple(t for t in items if t is not None)

    def named_list(self, *items):
        return tuple(t for t in items if t is not None)

    def named_type(self, name, typ):
        return (_unquote(name), typ)

    @v_args(meta=True, inline=True)
    def entry(self, meta, ins, outs, body):
        if not outs:
            raise _Semantic("the entry needs at least one output", meta)
        return ("entry", Entry(tuple(n for n, _ in ins), tuple(t for _, t in ins),
                               tuple(n for n, _ in outs), tuple(t for _, t in outs), body,
                               pos=_pos(meta)), meta)

    # sharding plans
    def placement_kw(self, key, value):
        return (_unquote(key), _int(value, "placement factor"), key)

    def placement_one(self, kind, *args):
        args = [a for a in args if a is not None]
        k = _unquote(kind)
        if k == "Replicate":
            if args:
                raise _Semantic("Replicate() takes no arguments", kind)
            return _REPLICATE
        if k != "Shard":
            raise _Semantic(f"unknown placement {_clip(k)!r} (expected Shard(DIM) or Replicate())", kind)
        if not args or isinstance(args[0], tuple):
            raise _Semantic("Shard needs its dim: Shard(DIM)", kind)
        dim, kws = _int(args[0], "dim"), {}
        for key, value, tok in args[1:]:
            if key not in ("outer", "inner") or key in kws:
                raise _Semantic(f"Shard: unknown or repeated factor {_clip(key)!r} (outer=, inner=)", tok)
            if value < 1:
                raise _Semantic(f"Shard: {key}={value} must be positive", tok)
            kws[key] = value
        if dim < 0:
            raise _Semantic(f"Shard: negative dim {dim}", args[0])
        return Part(dim, kws.get("outer", 1), kws.get("inner", 1))

    def placement_tuple(self, *items):
        return _PlacementTuple(i for i in items if i is not None)  # None: Lark's empty optional

    def coll_gather(self, name, *slots):
        if _unquote(name) != "all_gather":
            raise _Semantic(f"unknown collective {_clip(_unquote(name))!r}[...]: expected all_gather[SLOTS]",
                            name)
        return ("gather", tuple(_int(t, "operand slot") for t in slots if t is not None))

    def coll_reduce(self, name, executor):
        if _unquote(name) != "all_reduce":
            raise _Semantic(f"unknown collective {_clip(_unquote(name))!r}(...): expected "
                            "all_reduce(EXECUTOR)", name)
        return ("reduce", _unquote(executor))

    @v_args(meta=True, inline=True)
    def shard_input(self, meta, name, part):
        return ("input", _unquote(name), _placement(part), _pos(meta))

    @v_args(meta=True, inline=True)
    def shard_step(self, meta, site, op, coll, made, want, note):
        kind, what = coll
        made = _placement(made)
        step = PlanStep(_int(site, "site"), _unquote(op), what if kind == "gather" else (),
                        what if kind == "reduce" else None, made,
                        made if want is None else _placement(want),
                        None if note is None else _json_string(note))
        return ("step", step, _pos(meta))

    @v_args(meta=True, inline=True)
    def shard_output(self, meta, name, part):
        return ("output", _unquote(name), _placement(part), _pos(meta))

    @v_args(meta=True, inline=True)
    def shard_def(self, meta, axis, nproc, *items):
        n = _int(nproc, "process count")
        if n < 1:
            raise _Semantic(f"shard: {n} processes (at least 1)", nproc)
        plan = ShardPlan(_unquote(axis), n, {}, [], {}, pos={"header": _pos(meta)})
        for item in items:
            if item is None:
                continue
            kind = item[0]
            if kind == "step":
                plan.pos[("step", len(plan.steps))] = item[2]
                plan.steps.append(item[1])
                continue
            _, name, part, pos = item
            table = plan.inputs if kind == "input" else plan.outputs
            if isinstance(part, tuple):
                raise _Semantic(f"shard: {kind} {name!r} is one tensor, not a tuple", _At(pos))
            if name in table:
                raise _Semantic(f"shard: {kind} {name!r} placed twice", _At(pos))
            table[name] = part
            plan.pos[(kind, name)] = pos
        plan.pos["end"] = (meta.end_line, meta.end_column)
        return ("shard", plan, meta)

    def start(self, header, *decls):
        return _assemble((header,) + decls)


class _NoneLiteral:
    pass


_REPLICATE = _NoneLiteral()  # Replicate() as parsed (None is Lark's empty optional)


class _PlacementTuple(tuple):
    """A tuple placement as parsed."""


def _placement(p):
    """A parsed placement as the schedule writes it: a Part, None (replicated), or a tuple of them."""
    if isinstance(p, _PlacementTuple):
        return tuple(_placement(q) for q in p)
    return None if p is _REPLICATE else p


class _At:
    def __init__(self, pos):
        self.line, self.column = pos or (1, 1)


_NONE = _NoneLiteral()


def _lit(v):
    return None if v is _NONE else v


class _Kwarg:
    __slots__ = ("key", "value")

    def __init__(self, key, value):
        self.key, self.value = key, value



def _assemble(items) -> Program:
    header, *decls = items
    name = header[1]
    tensors: dict[str, TensorDecl] = {}
    consts: list[Prim] = []
    defs: dict[str, Def] = {}
    plans: dict = {}
    entry = None
    for item in decls:
        kind = item[0]
        if kind == "shard":
            plan = item[1]
            if plan.axis in plans:
                raise _Semantic(f"a second shard plan along {plan.axis!r}", item[2])
            plans[plan.axis] = plan
        elif kind == "tensor":
            _, tname, decl, tok = item
            if tname in tensors:
                raise _Semantic(f"tensor {tname!r} declared twice", tok)
            tensors[tname] = decl
        elif kind == "const":
            _, index, prim, tok = item
            if index != len(consts):
                raise _Semantic(f"constant %{index} out of order: expected %{len(consts)}", tok)
            consts.append(prim)
        elif kind == "def":
            _, d, tok = item
            if d.name in defs:
                raise _Semantic(f"definition {d.name!r} defined twice", tok)
            if d.name in tensors:
                raise _Semantic(f"{d.name!r} is already a tensor", tok)
            defs[d.name] = d
        else:
            if entry is not None:
                raise _Semantic("a second entry", item[2])
            entry = item
    if entry is None:
        raise _Semantic("no entry: a program needs `entry (...) -> (...) = term`", None)
    return Program(name, tensors, consts, defs, entry[1], analyses={"shard": plans} if plans else None)


def parse_program(text: str, filename: str = "<string>") -> Program:
    """Parse and verify IR text; errors are IRSyntaxError / VerifyError with file:line:col."""
    return run_deep(_parse_program, text, filename)


def parse_syntax(text: str, filename: str = "<string>") -> Program:
    """Parse IR text without verifying it (names, types and ops unchecked): for tests of the text
    form itself. What it returns may be ill-formed; ``parse_program`` is the safe entry point."""
    return run_deep(_parse_syntax, text, filename)


def _parse_program(text: str, filename: str) -> Program:
    from bwskc.verify import verify_program
    program = _parse_syntax(text, filename)
    verify_program(program, filename=filename)
    return program


def _parse_syntax(text: str, filename: str) -> Program:
    if not text.strip():
        raise IRSyntaxError("empty file: expected `bwsk 1 program NAME`", file=filename, line=1,
                            column=1, source_line="")
    # Lark counts lines by \n only (splitlines would also split at \f, \x1c or \u2028)
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    too_deep = _nesting_beyond(text, MAX_NESTING)
    if too_deep is not None:
        line, column = too_deep
        raise _syntax_error(f"nesting deeper than {MAX_NESTING} levels", line, column, lines,
                            filename)
    try:
        program = _ToIR().transform(_parser().parse(text))
    except _Semantic as exc:
        raise _syntax_error(exc.message, exc.line, exc.column, lines, filename) from None
    except UnexpectedInput as exc:
        raise _syntax_error(_describe(exc), exc.line, exc.column, lines, filename) from None
    except Exception as exc:  # Lark wraps transformer errors in VisitError
        inner = getattr(exc, "orig_exc", None)
        if isinstance(inner, _Semantic):
            raise _syntax_error(inner.message, inner.line, inner.column, lines, filename) from None
        raise
    return program


# brackets outside strings, quoted names and comments (an unterminated string is left to the parser)
_BRACKETS = re.compile(r'"(?:[^"\\\n]|\\.)*"|`[^`\n]*`|#[^\n]*|[(\[]|[)\]]')


def _nesting_beyond(text: str, limit: int):
    """(line, column) of the first bracket nested deeper than ``limit``, or None."""
    depth = 0
    for m in _BRACKETS.finditer(text):
        c = m.group()
        if c in "([":
            depth += 1
            if depth > limit:
                start = m.start()
                line = text.count("\n", 0, start) + 1
                return line, start - (text.rfind("\n", 0, start) + 1) + 1
        elif c in ")]":
            depth = max(depth - 1, 0)
    return None


def _syntax_error(message, line, column, lines, filename) -> IRSyntaxError:
    line = max(int(line or 1), 1)
    column = max(int(column or 1), 1)
    src = lines[line - 1] if 0 < line <= len(lines) else ""
    return IRSyntaxError(message, file=filename, line=line, column=column, source_line=src)


_TERMINAL_TEXT = {"NAME": "a name", "QNAME": "a `quoted name`", "INT": "an integer",
                  "FLOAT": "a float", "STRING": "a string", "CONST": "a constant %N", "$END": "end of file"}


def _describe(exc: UnexpectedInput) -> str:
    expected = sorted(getattr(exc, "expected", None) or getattr(exc, "allowed", None) or [])
    parser = _parser()
    names = []
    for t in expected:
        if t in _TERMINAL_TEXT:
            names.append(_TERMINAL_TEXT[t])
            continue
        try:
            pattern = parser.get_terminal(t).pattern
            names.append(f"'{pattern.value}'" if pattern.type == "str" else t)
        except KeyError:
            names.append(t)
    want = f", expected {', '.join(sorted(set(names)))}" if names else ""
    if isinstance(exc, UnexpectedToken):
        if exc.token.type == "$END":
            return f"unexpected end of file{want}"
        return f"unexpected {str(exc.token)!r}{want}"
    if isinstance(exc, UnexpectedCharacters):
        return f"unexpected character {exc.char!r}{want}"
    if isinstance(exc, UnexpectedEOF):
        return f"unexpected end of file{want}"
    return str(exc).splitlines()[0]
