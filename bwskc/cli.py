"""The ``bwskc`` command line: ``bwskc lower MODEL``, ``bwskc parse FILE`` and ``bwskc train``.

Exit status: 0 on success, 2 on bad input or usage (one line on stderr, no traceback, nothing written),
1 on an internal error. ``BWSKC_DEBUG=1`` shows the traceback of internal errors.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

from bwskc.errors import BwskError, IRSyntaxError

EMITS = ("ir", "json", "dot", "report")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage and two lines by default)
        raise BwskError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bwskc", description="Lower PyTorch models to BWSK combinator IR.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", parser_class=_Parser, required=True)

    lower = sub.add_parser("lower", help="lower a model to BWSK IR")
    lower.add_argument("model", help="ExportedProgram file (torch.export.save), Hugging Face directory "
                       "or config.json, BWSK IR text (.bwsk), or a pickled nn.Module (--trust-pickle)")
    lower.add_argument("--emit", default="ir", help="ir (text form, default), json (schema bwskc.ir/2), "
                       "dot (graphviz; rendered to FILE.svg too when -o FILE and graphviz are there) "
                       "or report (S/K, erasure, barriers and phases per layer)")
    lower.add_argument("--passes", default="", metavar="P1,P2",
                       help="passes to run in order: typing, calm, fusion (prerequisites are added)")
    lower.add_argument("--print-after", action="append", default=[], metavar="PASS",
                       help="print the IR to stderr after this pass (repeatable)")
    lower.add_argument("--axes", metavar="SPEC", help="CALM partition axes: batch,sequence (default) "
                       "or AXIS=INPUT:DIM,... e.g. batch=input_ids:0,sequence=input_ids:1")
    lower.add_argument("-o", "--output", help="write here instead of stdout (replaced atomically)")
    lower.add_argument("--input", action="append", default=[], metavar="SPEC",
                       help="example input, repeatable: DTYPE[D0,...] or NAME=DTYPE[...], "
                       "e.g. int64[2,128]")
    lower.add_argument("--trust-pickle", action="store_true",
                       help="allow unpickling a pickled nn.Module (unpickling runs arbitrary code)")
    lower.add_argument("--meta", action="store_true",
                       help="lower on the meta device: no weights are materialised")
    lower.add_argument("--train", action="store_true",
                       help="export in training mode (dropout and batch norm as in training)")
    lower.add_argument("--weights-out", metavar="FILE.safetensors",
                       help="also write the program's weights (by state-dict key): with the IR text, a "
                       "model bwskc train can train")

    parse = sub.add_parser("parse", help="validate IR text and print its canonical form")
    parse.add_argument("file")
    parse.add_argument("-o", "--output", help="write here instead of stdout (replaced atomically)")
    check = sub.add_parser("check-evidence", help="re-verify the S/K claims of a --emit json file with "
                           "torch alone (exit 1 if any fails)")
    check.add_argument("file", help="a bwskc lower --passes typing --emit json file (schema bwskc.ir/2)")
    check.add_argument("--weights", metavar="FILE.safetensors",
                       help="the program's weights (bwskc lower --weights-out), for claims on weights "
                       "too large to embed")
    check.add_argument("-v", "--verbose", action="store_true", help="also say why each claim that "
                       "cannot be re-checked cannot")
    grads = sub.add_parser("check-gradients", help="compare a model's reversible gradients with plain "
                           "autograd (float64, dropout on) and print the relative error per chain")
    grads.add_argument("model", help="as for lower: an ExportedProgram file, a Hugging Face directory or "
                       "config.json, or a pickled module with --trust-pickle")
    grads.add_argument("--input", action="append", default=[], metavar="SPEC",
                       help="example input, e.g. int64[2,16] (repeatable; default: made for the model)")
    grads.add_argument("--trust-pickle", action="store_true",
                       help="allow loading a pickled module (unpickling runs code)")
    grads.add_argument("--seed", type=int, default=0, help="dropout seed of the compared step (default 0)")
    from bwskc.train.run import add_arguments
    add_arguments(sub.add_parser("train", help="train a model's program: conventional, analyzed, reversible"))
    return p


def _version() -> str:
    from bwskc import __version__
    return f"bwskc {__version__}"


def write_output(text: str, output: str | None) -> None:
    """Print, or replace OUTPUT atomically (a failure leaves an existing file untouched)."""
    if output is None:
        sys.stdout.write(text)
        return
    target = Path(output)
    if target.is_dir():
        raise BwskError(f"{output}: is a directory")
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise BwskError(f"{output}: directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise BwskError(f"{output}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise BwskError(f"{path}: no such file")
    if p.is_dir():
        raise BwskError(f"{path}: is a directory")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BwskError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def cmd_lower(args) -> None:
    if args.emit not in EMITS:
        raise BwskError(f"unknown --emit {args.emit!r}: choose one of {', '.join(EMITS)}")
    if args.model.endswith(".bwsk"):
        from bwskc.text import parse_program
        program = parse_program(_read_text(args.model), args.model)
    else:
        from bwskc.frontend import load_model
        from bwskc.lowering import lower_exported
        loaded = load_model(args.model, inputs=args.input, trust_pickle=args.trust_pickle,
                            meta=args.meta, train=args.train)
        program = lower_exported(loaded.exported, loaded.name)
    names = [n.strip() for n in args.passes.split(",") if n.strip()]
    if args.emit == "report" and not names:
        names = ["typing", "calm", "fusion"]
    if names or args.print_after:
        from bwskc.passes.manager import run_passes

        def show(name, p):
            sys.stderr.write(f"# IR after {name}\n{p.text()}")
        program = run_passes(program, names, options={"axes": args.axes}, print_after=args.print_after,
                             printer=show)
    elif args.axes:
        raise BwskError("--axes needs the calm pass (--passes calm)")
    if args.weights_out and not program.weights:
        raise BwskError(f"--weights-out: {args.model} has no weights (an IR file, or --meta)")
    text = emit(program, args.emit)
    write_output(text, args.output)
    if args.weights_out:
        from safetensors.torch import save_file
        tmp = Path(args.weights_out).with_name(Path(args.weights_out).name + ".tmp")
        save_file({k: v.detach().contiguous().clone() for k, v in program.weights.items()}, str(tmp))
        tmp.replace(args.weights_out)
    if args.emit == "dot" and args.output:
        from bwskc.emit import render_dot
        sys.stderr.write(render_dot(args.output) + "\n")


def emit(program, kind: str) -> str:
    if kind == "ir":
        return program.text()
    from bwskc import emit as emitters
    if kind == "report":
        from bwskc.report import report
        return report(program)
    return emitters.to_json(program) if kind == "json" else emitters.to_dot(program)


def cmd_parse(args) -> None:
    from bwskc.text import parse_program
    program = parse_program(_read_text(args.file), args.file)
    write_output(program.text(), args.output)


def cmd_check_evidence(args) -> None:
    from bwskc.check_evidence import EvidenceError, run
    try:
        code = run(args.file, args.weights, args.verbose)
    except EvidenceError as exc:  # an unreadable file: bad input
        raise BwskError(str(exc)) from None
    if code:
        failed = BwskError("")  # the summary said it
        failed.exit_code = code
        raise failed


def _quiet():
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch._logging  # torch logs tracebacks of its own before our one-line error
    torch._logging.set_logs(all=logging.CRITICAL)


def main(argv=None) -> int:
    def body():
        args = build_parser().parse_args(argv)
        {"lower": cmd_lower, "parse": cmd_parse, "train": cmd_train,
         "check-evidence": cmd_check_evidence, "check-gradients": cmd_check_gradients}[args.command](args)
    return guarded(body)


def guarded(body) -> int:
    """Run ``body`` as a command: 0 on success, one line on stderr and 2 on bad input (1 where the
    error says so, such as a diverged training run), 1 on an internal error; no traceback."""
    _quiet()
    try:
        body()
        return 0
    except IRSyntaxError as exc:
        print(f"bwskc: {exc}\n{exc.caret_display()}", file=sys.stderr)
        return 2
    except BwskError as exc:
        if str(exc):  # empty: a child process said it already
            print(f"bwskc: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("bwskc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # an internal error: say so plainly
        if os.environ.get("BWSKC_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"bwskc: internal error: {type(exc).__name__}: {first} (BWSKC_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return 1


def cmd_check_gradients(args) -> None:
    """Exit 0 when every chain's gradients match plain autograd within the tolerance, 1 otherwise."""
    import bwskc
    from bwskc.frontend import load_model
    from bwskc.lowering import lower_exported
    from bwskc.passes.fusion import fuse
    from bwskc.passes.reversible import to_reversible
    from bwskc.runtime.check import check_reversible
    loaded = load_model(args.model, inputs=args.input, trust_pickle=args.trust_pickle, train=True)
    program = to_reversible(fuse(lower_exported(loaded.exported, loaded.name), lambda term: "GRAY"))
    inputs = bwskc._entry_inputs(program, tuple(loaded.args), loaded.kwargs)
    try:
        report = check_reversible(program, inputs, seed=args.seed)
        failure = None
    except BwskError as exc:
        report, failure = None, str(exc)
    for r in program.analyses["reversible"].not_lowered:
        print(f"left alone: {r['where']}: {r['reason']}")
    if failure is not None:
        print(f"FAILED: {failure}")
        failed = BwskError("")  # said above
        failed.exit_code = 1
        raise failed
    for c in report["chains"]:
        print(f"chain {c['chain']}: {c['blocks']} blocks, {c['parameters']} parameters, relative error "
              f"{c['max_rel_error']:.2e} (largest difference: {c['worst']})")
    print(f"outside the chains: relative error {report['outside']['max_rel_error']:.2e}")
    print(f"ok: every gradient within {report['tolerance']:.0e} of plain autograd in {report['dtype']}")


def cmd_train(args) -> None:
    from bwskc.train.run import run_training
    run_training(args)


if __name__ == "__main__":
    sys.exit(main())
