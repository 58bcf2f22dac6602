"""Execution of BWSK programs: an eager interpreter (the reference) and codegen to torch.fx.

Importing this package registers both with the IR (``bwskc.ir.register_executor``), which is how
``program(*args)`` and ``program.to_fx()`` run: the IR itself imports nothing from the runtime.
"""
from bwskc.ir import register_executor
from bwskc.runtime.codegen import to_graph_module
from bwskc.runtime.interp import Interpreter

register_executor(interpret=Interpreter, to_fx=to_graph_module)

__all__ = ["Interpreter", "to_graph_module"]
