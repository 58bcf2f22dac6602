"""The code's layering, checked on its import graph (issue 18): read from the sources with ``ast``, so
function-level imports count as much as module-level ones.

* no module imports another module's underscore-prefixed name;
* no cycle between the layers: the IR (ir, text, printer, placement, verify), the runtime, the passes, the trainer and
  the CLI; the IR and the verifier import nothing of the runtime;
* no source file in ``bwskc/``, ``passes/`` or ``kernels/`` over 650 lines (the redesign's "about 600").
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"bwskc": "bwskc", "passes": "bwskc.passes", "kernels": "bwskc.kernels"}
MAX_LINES = 650


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _imports(path: Path):
    """(imported module, names imported from it) for every import statement in the file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _graph() -> nx.DiGraph:
    """Module -> module it imports. The package root ``bwskc`` (the public facade, which imports the
    stages lazily) is left out: every submodule's import runs it anyway, as Python imports a package
    before its modules, so an edge to it says nothing about layering."""
    g = nx.DiGraph()
    for name, path in MODULES.items():
        for module, names in _imports(path):
            for target in [module] + [f"{module}.{n}" for n in names]:
                if target in MODULES and target not in (name, "bwskc"):
                    g.add_edge(name, target)
    return g


def layer(module: str) -> str | None:
    if module in ("bwskc.ir", "bwskc.text", "bwskc.printer", "bwskc.placement", "bwskc.verify"):
        return "ir"
    for prefix, name in (("bwskc.runtime", "runtime"), ("bwskc.passes", "passes"),
                         ("bwskc.train", "train"), ("bwskc.cli", "cli")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return None


def test_no_module_imports_another_modules_private_names():
    found = []
    for name, path in MODULES.items():
        for module, names in _imports(path):
            if module.startswith(("bwskc", "passes", "kernels")) and module != name:
                found += [f"{path.relative_to(ROOT)}: {module}.{n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
    assert not found, found


def test_the_layers_import_each_other_without_cycles():
    g = _graph()
    layers = nx.DiGraph()
    for a, b in g.edges:
        la, lb = layer(a), layer(b)
        if la and lb and la != lb:
            layers.add_edge(la, lb)
            layers.edges[la, lb].setdefault("why", []).append(f"{a} -> {b}")
    cycles = list(nx.simple_cycles(layers))
    assert not cycles, [(c, [layers.edges[c[i], c[(i + 1) % len(c)]]["why"] for i in range(len(c))])
                        for c in cycles]
    for module in ("bwskc.ir", "bwskc.verify", "bwskc.text", "bwskc.printer", "bwskc.placement"):
        reached = nx.descendants(g, module) if module in g else set()
        assert not [m for m in reached if layer(m) == "runtime"], module
    assert not [b for a, b in g.edges if layer(a) == "train" and layer(b) == "cli"]


def test_the_graph_sees_function_level_imports():
    # the check above would be empty if the walk missed imports inside functions: the CLI imports the
    # trainer inside its command (startup stays fast), and that edge must be found
    assert any(layer(a) == "cli" and layer(b) == "train" for a, b in _graph().edges)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_source_files_stay_readable_in_one_sitting(name):
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)}: {lines} lines"
