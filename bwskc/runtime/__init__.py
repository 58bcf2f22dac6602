"""Execution of BWSK programs: an eager interpreter (the reference) and codegen to torch.fx."""
from bwskc.runtime.codegen import to_graph_module
from bwskc.runtime.interp import Interpreter

__all__ = ["Interpreter", "to_graph_module"]
