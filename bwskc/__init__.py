"""bwskc: a compiler that lowers PyTorch models to B, W, S, K combinator terms over ATen ops.

Public API (see README.md and docs/ARCHITECTURE.md):

* ``bwskc.lower(model_or_exported_program, example_args=(), example_kwargs=None) -> Program``
* ``bwskc.parse(text) -> Program``; ``program.text()``; ``==`` is structural equality
* ``program(*args, **kwargs)`` evaluates the IR eagerly; ``program.to_fx()`` gives a GraphModule
* ``bwskc.run_passes(program, ["typing", "calm", "fusion"]) -> Program`` (analyses in ``.analyses``)
"""
from __future__ import annotations

import torch

from bwskc.errors import BwskError, IRSyntaxError, VerifyError
from bwskc.ir import Program

__version__ = "0.1.0"
__all__ = ["BwskError", "IRSyntaxError", "Program", "VerifyError", "lower", "parse", "run_passes", "verify"]


def lower(model_or_exported_program, example_args=(), example_kwargs=None, *, name=None,
          train: bool = False) -> Program:
    """Lower an ``nn.Module`` (exported here with the example inputs) or an ExportedProgram."""
    from bwskc.frontend import export_module
    from bwskc.lowering import lower_exported
    if isinstance(model_or_exported_program, torch.export.ExportedProgram):
        return lower_exported(model_or_exported_program, name)
    if not isinstance(model_or_exported_program, torch.nn.Module):
        raise BwskError(f"lower() takes an nn.Module or an ExportedProgram, not "
                        f"{type(model_or_exported_program).__name__}")
    if not isinstance(example_args, tuple):
        example_args = (example_args,)
    loaded = export_module(model_or_exported_program, example_args, example_kwargs, name=name,
                           train=train)
    return lower_exported(loaded.exported, name or loaded.name)


def parse(text: str, filename: str = "<string>") -> Program:
    """Parse IR text (the form ``program.text()`` prints) into a verified Program without weights."""
    from bwskc.text import parse_program
    return parse_program(text, filename)


def run_passes(program: Program, passes, *, axes: str | None = None, print_after=(),
               printer=None) -> Program:
    """Run named passes (``typing``, ``calm``, ``fusion``) in order, verifying the IR between them; the
    result carries each analysis in ``program.analyses[name]``. See ``bwskc.passes.manager``."""
    from bwskc.passes.manager import run_passes as _run
    return _run(program, passes, options={"axes": axes}, print_after=print_after, printer=printer)


def verify(program: Program) -> None:
    """Raise VerifyError unless every name is bound and every term is well typed."""
    from bwskc.verify import verify_program
    verify_program(program)


_verify_function = verify

import bwskc.verify as _verify_module

verify = _verify_function
