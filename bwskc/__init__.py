"""bwskc: a compiler that lowers PyTorch models to B, W, S, K combinator terms over ATen ops.

Public API (see README.md and docs/ARCHITECTURE.md):

* ``bwskc.lower(model_or_exported_program, example_args=(), example_kwargs=None) -> Program``
* ``bwskc.parse(text) -> Program``; ``program.text()``; ``==`` is structural equality
* ``program(*args, **kwargs)`` evaluates the IR eagerly; ``program.to_fx()`` gives a GraphModule
* ``bwskc.run_passes(program, ["typing", "calm", "fusion", "reversible"], options={...}) -> Program``
  (analyses in ``.analyses``; the pass manager, ``bwskc.passes.manager``, which ``compile`` also uses)
* ``bwskc.compile(model, example_args, mode="conventional" | "analyzed" | "reversible")`` -> a trainable
  ``torch.nn.Module`` whose parameters keep the model's state-dict names
* ``bwskc.load_trained(path)`` -> a variant ``bwskc train`` wrote, as the module it was trained as
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from bwskc.errors import BwskError, IRSyntaxError, VerifyError

# torch (and with it bwskc.ir, bwskc.verify, ...) is imported when first needed, not by ``import bwskc``:
# ``bwskc --help`` and the CLI's argument checks start in a fraction of a second

__version__ = "0.1.0"
# How programs run: ``bwskc.ir`` has an executor hook (``bwskc.ir.register_executor``) and imports no
# runtime; this module registers the interpreter and the fx codegen when imported, and the IR imports it
# on the first ``program(*args)`` or ``program.to_fx()`` if nothing has registered by then.
DEFAULT_EXECUTOR = "bwskc.runtime"
__all__ = ["BwskError", "IRSyntaxError", "Program", "VerifyError", "compile", "load_trained", "lower", "parse", "run_passes",
           "verify"]
MODES = ("conventional", "analyzed", "reversible")


def lower(model_or_exported_program, example_args=(), example_kwargs=None, *, name=None,
          train: bool = False) -> Program:
    """Lower an ``nn.Module`` (exported here with the example inputs) or an ExportedProgram."""
    import torch

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
    """Parse IR text (the form ``program.text()`` prints) into a verified Program without weights; a
    sharding plan in the text is checked against the CALM analysis (refused where it differs)."""
    from bwskc.passes.calm.shard_plan import parse_checked
    return parse_checked(text, filename)


def run_passes(program: Program, passes, *, axes: str | None = None, print_after=(),
               printer=None, options: dict | None = None) -> Program:
    """Run named passes (``typing``, ``calm``, ``fusion``, ``reversible``) in order, verifying the IR
    between them; the result carries each analysis in ``program.analyses[name]``. ``options`` per pass
    (``{"fusion": {"s_regions": False}}``); ``axes`` is calm's. See ``bwskc.passes.manager``."""
    from bwskc.passes.manager import run_passes as _run
    return _run(program, passes, options={"axes": axes, **(options or {})}, print_after=print_after,
                printer=printer)


def compile(model_or_program, example_args=(), example_kwargs=None, *, mode: str = "conventional",
            store_activations: bool = False, seed: int = 0, checkpoint_rest: bool = True,
            check: bool = False, shard: dict | None = None, axes: str | None = None, group=None):
    """A trainable ``nn.Module`` running the model's lowered program (parameters keep their state-dict
    names; the weights are copied, so the model itself is left alone).

    ``mode``: ``conventional`` (the program as lowered, in training mode so dropout is kept),
    ``analyzed`` (the same, with the typing and CALM analyses in ``module.analyses``), ``reversible``
    (residual chains rewritten into coupling chains that store only their final streams; see
    ``passes/reversible.py``). ``store_activations=True`` runs the reversible architecture with plain
    autograd: the reference its gradients are tested against. Dropout masks are counter-based, keyed on
    ``seed`` and a step counter (``module.reseed(seed)`` restarts them), as is every other random op. A
    model is captured twice, in training and in evaluation mode: ``module.eval()`` runs the evaluation
    capture (no drop path, running batch-norm statistics), over the same parameters and buffers; a
    ``Program`` given alone has one capture, and ``eval()`` only turns its dropout off.
    A training-mode forward updates the buffers the model's own training forward mutates (batch norm's
    running statistics and ``num_batches_tracked``), in place and once per call, also inside coupled
    branches and checkpointed layers (never again in backward's recomputation); evaluation updates
    nothing. ``module.state_dict()`` carries them under their state-dict names. In reversible mode they
    are the statistics of the coupled architecture's activations, which is what its evaluation reads.
    In reversible mode the layers the rewrite left (post-norm BERT and post-activation ResNet blocks,
    stride-2 stages) are checkpointed unless ``checkpoint_rest=False``: their inputs are stored, their
    interiors recomputed. A ``Program`` (with weights bound) may be given instead of a model.

    ``check=True`` (reversible mode) compares the reversible gradients with the plain-autograd reference
    on the example inputs in float64, dropout on, before returning; ``module.check_report`` has the
    relative error per chain, and a chain above the tolerance raises ``BwskError`` naming it
    (``bwskc.runtime.check``).

    ``shard={"sequence": N}`` (or ``{"batch": N}``, or an axis ``axes`` defines as ``--axes`` does) runs
    the program split along that axis over the N processes of ``group`` (the default process group:
    initialise ``torch.distributed`` first, gloo on CPU, nccl on CUDA), as its CALM schedule says
    (``passes/calm/schedule.py``): coordination-free regions on each shard alone, each barrier with the
    collective the analysis named. Every process calls the module on the same whole inputs and gets
    the outputs whole; gradients equal one process's. ``module.schedule`` is the schedule
    (``module.schedule.comm`` the forward collectives it predicts, ``module.comm.log`` those a call
    ran). Conventional and analyzed modes only.
    """
    from bwskc import ir
    from bwskc.ir import Program
    from bwskc.passes.reversible import reversible_rewrite
    from bwskc.runtime.compiled import compile_program
    if mode not in MODES:
        raise BwskError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    if shard is not None:
        return _compile_sharded(model_or_program, example_args, example_kwargs, mode, shard, axes, group, seed)
    eval_program = None  # a Program alone has one capture: eval() then only switches dropout off
    eval_note = "not used: a Program has one capture, so eval runs it with dropout off"
    if isinstance(model_or_program, Program):
        program = model_or_program
    else:
        program, eval_program, eval_note = _lower_both_modes(model_or_program, example_args, example_kwargs)
    if mode == "analyzed":
        program = run_passes(program, ["typing", "calm"])
    elif mode == "reversible" and not any(
            isinstance(t, ir.Comb) and t.kind in ir.REV_KINDS for t in _all_subterms(program)):
        program = reversible_rewrite(program)
        if eval_program is not None:
            # evaluation runs the same coupling architecture, from the evaluation capture
            eval_program = _matching_eval_rewrite(program, reversible_rewrite(eval_program))
            if eval_program is None:
                eval_note = ("not used: the evaluation capture's residual chains differ from the training "
                             "capture's, so eval runs the training capture with dropout off")
    program = program.with_weights({k: v.detach().clone() for k, v in program.weights.items()})
    reversible = mode == "reversible" and not store_activations
    module = compile_program(program, reversible=reversible, seed=seed,
                             checkpoint=reversible and checkpoint_rest, eval_program=eval_program)
    module.program, module.mode = program, mode
    if check:
        if mode != "reversible" or store_activations:
            raise BwskError("check=True checks the reversible gradients: use it with mode='reversible'")
        from bwskc.runtime.check import check_reversible, entry_inputs
        given = example_args not in ((), None) or bool(example_kwargs)
        inputs = entry_inputs(program, example_args, example_kwargs) if given else None
        module.check_report = check_reversible(program, inputs, seed=seed, checkpoint=checkpoint_rest)
    module.analyses = dict(program.analyses)
    module.eval_capture = eval_note  # what eval() runs, and why
    return module


def _compile_sharded(model_or_program, example_args, example_kwargs, mode, shard, axes, group, seed=0):
    """``compile(..., shard={axis: N})``: the sharded module over the process group."""
    import torch.distributed as dist

    from bwskc.ir import REV_KINDS, Comb, Program, walk_terms
    from bwskc.passes.calm.schedule import schedule
    from bwskc.sharding.module import ShardedModule
    if mode == "reversible":
        raise BwskError("shard= runs conventional or analyzed programs: reversible coupling chains are "
                        "not sharded yet (use mode='conventional', or FSDP2: bwskc train --shard)")
    if not isinstance(shard, dict) or len(shard) != 1:
        raise BwskError(f"shard={shard!r}: give one axis and a process count, e.g. {{'sequence': 2}}")
    (axis, n), = shard.items()
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BwskError(f"shard={shard!r}: the process count must be a positive int")
    if not dist.is_available() or not dist.is_initialized():
        raise BwskError("shard= runs under torch.distributed: initialise the process group first "
                        "(torch.distributed.init_process_group, or torchrun)")
    eval_program = None
    if isinstance(model_or_program, Program):
        program = model_or_program
    else:
        program, eval_program, _ = _lower_both_modes(model_or_program, example_args, example_kwargs)
    if mode == "analyzed":
        program = run_passes(program, ["typing", "calm"])
    sch = schedule(program, axis, n, axes)
    eval_sch = schedule(eval_program, axis, n, axes) if eval_program is not None else None
    if any(isinstance(t, Comb) and t.kind in REV_KINDS for _, t in walk_terms(program, None)):
        raise BwskError("shard= runs programs without coupling chains: this one was rewritten by the "
                        "reversible pass (shard the program as lowered, or use FSDP2: bwskc train --shard)")
    module = ShardedModule(program, sch, group=group, eval_program=eval_program, eval_schedule=eval_sch,
                           seed=seed)
    module.mode = mode
    module.analyses = dict(program.analyses)
    return module


def _matching_eval_rewrite(train: Program, evaluation: Program) -> Program | None:
    """The rewritten evaluation capture if its chains are the training capture's (the same blocks
    coupled: an architecture, not only a program, is what was trained); otherwise None, and
    evaluation runs the training capture with its dropout off."""
    def chains(p):
        return [(c["name"], c["blocks"]) for c in p.analyses["reversible"].chains]
    return evaluation if chains(train) == chains(evaluation) else None


def _lower_both_modes(model, example_args, example_kwargs):
    """The model captured in training mode and in evaluation mode (``module.train()``/``eval()`` switch
    between them, over the same parameters and buffers), and a note on what eval runs. The training
    capture keeps the buffer updates the model's training forward makes (batch norm's running
    statistics, ``num_batches_tracked``), and the compiled module applies them to the buffers the
    evaluation capture reads, so eval runs on the statistics training gathered, as the eager model does.
    The model's own train/eval flags are left as they were."""
    from bwskc.frontend import export_module
    from bwskc.lowering import lower_exported, run_decompositions
    flags = [(m, m.training) for m in model.modules()]
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    try:
        loaded = export_module(model, args, example_kwargs, train=True)
        functional = run_decompositions(loaded.exported)  # where buffer updates become outputs
        train = lower_exported(functional, loaded.name, decompose=False)
        mutated = sorted(functional.graph_signature.buffers_to_mutate.values())
        evaluation = lower(model, args, example_kwargs, train=False)
    finally:
        for m, flag in flags:
            m.training = flag
    note = "the model's evaluation capture"
    if mutated:
        note += (f", reading the {len(mutated)} buffers training updates ({mutated[0]}, ...) as the "
                 "training capture leaves them")
    return train, evaluation, note


def load_trained(path, *, device: str = "cpu", batch_size: int | None = None, seq_len: int | None = None):
    """A variant ``bwskc train`` wrote (``DIR/scratch-bwsk-reversible``...), rebuilt as the module it was
    trained as, in evaluation mode: its Hugging Face class at any batch and length (``.logits``,
    ``.loss``, ``generate()``). See ``bwskc.train.pretrained.load_trained``."""
    from bwskc.train.pretrained import load_trained as _load
    return _load(path, device=device, batch_size=batch_size, seq_len=seq_len)


def _all_subterms(program: Program):
    from bwskc import ir
    for body in [d.body for d in program.defs.values()] + [program.entry.body]:
        yield from ir.subterms(body)


def verify(program: Program) -> None:
    """Raise VerifyError unless every name is bound and every term is well typed."""
    from bwskc.verify import verify_program
    verify_program(program)


class _Package(types.ModuleType):
    """``bwskc.verify`` is the function above, also once the submodule ``bwskc.verify`` is imported
    (the import system would set the attribute to the module); the module is ``sys.modules["bwskc.verify"]``."""

    def __setattr__(self, name, value):
        if name == "verify" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


def __getattr__(name: str):
    """``bwskc.Program`` and the submodules (``bwskc.ir``, ``bwskc.text``, ...), imported on first use."""
    if name == "Program":
        from bwskc.ir import Program
        return Program
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package
