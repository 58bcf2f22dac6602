"""The ``bwskc`` command line: ``bwskc lower MODEL``, ``bwskc parse FILE`` and ``bwskc train``.

Exit status: 0 on success, 2 on bad input or usage (one line on stderr, no traceback, nothing written),
1 on an internal error. ``BWSKC_DEBUG=1`` shows the traceback of internal errors.

Importing this module (and building the parser) imports neither torch nor transformers nor triton:
each command imports what it needs when it runs, so ``bwskc --help`` starts in a fraction of a second
(``benchmarks/startup.py`` measures it).

The CLI dispatches to the trainer (``bwskc.train.run``), never the reverse: what both need lives in
neutral modules, ``bwskc.files`` (atomic writes with the umask's mode) and ``bwskc.command`` (exit
statuses and one-line errors, ``guarded``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bwskc.command import guarded, quiet_torch
from bwskc.errors import BwskError
from bwskc.files import umask_mode, write_output  # noqa: F401  (also bwskc.cli's, as before)

EMITS = ("ir", "json", "dot", "report")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage and two lines by default)
        raise BwskError(f"{self.prog}: {message} (see {self.prog} --help)")


def pass_names() -> list[str]:
    """The registered passes (``bwskc.passes.manager.REGISTRY``), read from the manager's source: importing
    the manager imports torch, which ``--help`` should not wait for."""
    import ast
    import importlib.util
    spec = importlib.util.find_spec("bwskc.passes.manager")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "REGISTRY":
            return list(ast.literal_eval(node.value))
    raise RuntimeError("bwskc.passes.manager has no REGISTRY")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bwskc", description="Lower PyTorch models to BWSK combinator IR, type and analyse "
                "it, rewrite residual chains into reversible couplings, and train models in the three "
                "modes (conventional, BWSK analyzed, BWSK reversible).")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", parser_class=_Parser, required=True)

    lower = sub.add_parser("lower", help="lower a model to BWSK IR")
    lower.add_argument("model", help="ExportedProgram file (torch.export.save), Hugging Face directory "
                       "or config.json, BWSK IR text (.bwsk), or a pickled nn.Module (--trust-pickle)")
    lower.add_argument("--emit", default="ir", help="ir (text form), json (schema bwskc.ir/2), "
                       "dot (graphviz; rendered to FILE.svg too when -o FILE and graphviz are there) "
                       "or report (S/K, erasure, barriers and phases per layer) (default: %(default)s)")
    lower.add_argument("--passes", default="", metavar="P1,P2",
                       help=f"passes to run in order, comma-separated: {', '.join(pass_names())} "
                       "(prerequisites are added; default: none, or typing,calm,fusion for --emit report)")
    lower.add_argument("--print-after", action="append", default=[], metavar="PASS",
                       help="print the IR to stderr after this pass (repeatable; default: none)")
    lower.add_argument("--axes", metavar="SPEC", help="CALM partition axes, with --passes calm: batch,sequence "
                       "or AXIS=INPUT:DIM,... e.g. batch=input_ids:0,sequence=input_ids:1 (default: "
                       "batch,sequence)")
    lower.add_argument("--shard", action="append", default=[], metavar="AXIS=N",
                       help="derive the plan that runs the program split along AXIS over N processes "
                       "(a CALM axis: batch, sequence, or one --axes defines): printed with the IR as a "
                       "`shard AXIS N {...}` block, and its communication in --emit report "
                       "(repeatable; default: none)")
    lower.add_argument("-o", "--output", help="write here instead of stdout (replaced atomically; "
                       "default: stdout)")
    lower.add_argument("--input", action="append", default=[], metavar="SPEC",
                       help="example input, repeatable: DTYPE[D0,...] or NAME=DTYPE[...], "
                       "e.g. int64[2,128] (default: made for the model, e.g. input_ids int64[2,16])")
    lower.add_argument("--trust-pickle", action="store_true",
                       help="allow unpickling a pickled nn.Module (unpickling runs arbitrary code; default: off)")
    lower.add_argument("--meta", action="store_true",
                       help="lower on the meta device: no weights are materialised (default: off)")
    lower.add_argument("--train", action="store_true",
                       help="export in training mode (dropout and batch norm as in training; default: off, "
                       "evaluation mode)")
    lower.add_argument("--weights-out", metavar="FILE.safetensors",
                       help="also write the program's weights (by state-dict key): with the IR text, a "
                       "model bwskc train can train (default: not written)")

    parse = sub.add_parser("parse", help="validate IR text and print its canonical form")
    parse.add_argument("file", help="BWSK IR text (.bwsk), as bwskc lower prints it")
    parse.add_argument("-o", "--output", help="write here instead of stdout (replaced atomically; "
                       "default: stdout)")
    check = sub.add_parser("check-evidence", help="re-verify the S/K claims of a --emit json file with "
                           "torch alone (exit 1 if any fails)")
    check.add_argument("file", help="a bwskc lower --passes typing --emit json file (schema bwskc.ir/2)")
    check.add_argument("--weights", metavar="FILE.safetensors",
                       help="the program's weights (bwskc lower --weights-out), for claims on weights "
                       "too large to embed (default: only the weights embedded in FILE)")
    check.add_argument("-v", "--verbose", action="store_true", help="also say why each claim that "
                       "cannot be re-checked cannot (default: off)")
    grads = sub.add_parser("check-gradients", help="compare a model's reversible gradients with plain "
                           "autograd (float64, dropout on) and print the relative error per chain")
    grads.add_argument("model", help="as for lower: an ExportedProgram file, a Hugging Face directory or "
                       "config.json, or a pickled module with --trust-pickle")
    grads.add_argument("--input", action="append", default=[], metavar="SPEC",
                       help="example input, e.g. int64[2,16] (repeatable; default: made for the model)")
    grads.add_argument("--trust-pickle", action="store_true",
                       help="allow loading a pickled module (unpickling runs code; default: off)")
    grads.add_argument("--seed", type=int, default=0, help="dropout seed of the compared step (default: %(default)s)")
    from bwskc.train.run import add_arguments
    add_arguments(sub.add_parser("train", help="train a model in the seeds' variants (conventional, BWSK "
                                 "analyzed, BWSK reversible; scratch and finetune) and publish their tables"))
    return p


def _version() -> str:
    from bwskc import __version__
    return f"bwskc {__version__}"


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
    from bwskc.passes.calm.shard_plan import parse_shard_spec
    specs = [parse_shard_spec(s) for s in args.shard]  # a bad spec is refused before the model loads
    if specs and args.emit not in ("ir", "report"):
        raise BwskError(f"--shard prints the plan with --emit ir or report, not --emit {args.emit}")
    if len({a for a, _ in specs}) < len(specs):
        raise BwskError("--shard: one plan per axis (an axis is given twice)")
    if args.model.endswith(".bwsk"):
        from bwskc.passes.calm.shard_plan import parse_checked
        program = parse_checked(_read_text(args.model), args.model)
    else:
        from bwskc.frontend import load_model
        from bwskc.lowering import lower_exported
        loaded = load_model(args.model, inputs=args.input, trust_pickle=args.trust_pickle,
                            meta=args.meta, train=args.train)
        program = lower_exported(loaded.exported, loaded.name)
    names = [n.strip() for n in args.passes.split(",") if n.strip()]
    kept_plans = dict(program.analyses.get("shard") or {})  # parsed with the IR text
    if args.emit == "report" and not names:
        names = ["typing", "calm", "fusion"]
    if names or args.print_after:
        from bwskc.passes.manager import run_passes

        def show(name, p):
            sys.stderr.write(f"# IR after {name}\n{p.text()}")
        program = run_passes(program, names, options={"axes": args.axes}, print_after=args.print_after,
                             printer=show)
    elif args.axes and not args.shard:
        raise BwskError("--axes needs the calm pass (--passes calm) or --shard")
    if args.shard or kept_plans:  # derived on the program as the passes left it (their site ids)
        from bwskc.passes.calm.shard_plan import plans_for
        program.analyses["shard"] = plans_for(program, specs, args.axes, kept_plans)
    if args.weights_out and not program.weights:
        raise BwskError(f"--weights-out: {args.model} has no weights (an IR file, or --meta)")
    text = emit(program, args.emit)
    write_output(text, args.output)
    if args.weights_out:
        from safetensors.torch import save_file
        tmp = Path(args.weights_out).with_name(Path(args.weights_out).name + ".tmp")
        save_file({k: v.detach().contiguous().clone() for k, v in program.weights.items()}, str(tmp))
        os.chmod(tmp, umask_mode())  # safetensors leaves its temporary file's 0600
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
    from bwskc.passes.calm.shard_plan import parse_checked  # the IR, then its plans' claims
    program = parse_checked(_read_text(args.file), args.file)
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


def main(argv=None) -> int:
    def body():
        args = build_parser().parse_args(argv)
        quiet_torch()  # a command runs: torch is imported now, not for --help or a usage error
        {"lower": cmd_lower, "parse": cmd_parse, "train": cmd_train,
         "check-evidence": cmd_check_evidence, "check-gradients": cmd_check_gradients}[args.command](args)
    return guarded(body, torch_logs=False)


def cmd_check_gradients(args) -> None:
    """Exit 0 when every chain's gradients match plain autograd within the tolerance, 1 otherwise."""
    from bwskc.frontend import load_model
    from bwskc.lowering import lower_exported
    from bwskc.passes.reversible import reversible_rewrite
    from bwskc.runtime.check import check_reversible, entry_inputs
    loaded = load_model(args.model, inputs=args.input, trust_pickle=args.trust_pickle, train=True)
    program = reversible_rewrite(lower_exported(loaded.exported, loaded.name))
    inputs = entry_inputs(program, tuple(loaded.args), loaded.kwargs)
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
