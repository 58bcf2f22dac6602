"""The model zoo (tiny configurations, random weights; see bwskc/testing.py): each model lowers, round-trips
through the text form, names its parameters and definitions after the model, and evaluates equal to eager
(float32, relative error <= 1e-5) through both the interpreter and the fx codegen.

Also: a 1B-parameter configuration lowers on the meta device without materialising weights, and an
ExportedProgram saved with torch.export.save loads and lowers.
"""
from __future__ import annotations

import json
import resource

import pytest
import torch

import bwskc
from bwskc.frontend import load_model
from bwskc.ir import Comb, Prim
from bwskc.lowering import lower_exported
from bwskc.text import term_text
from bwskc.testing import ZOO_NAMES, build_zoo_model, lower_zoo_model

REL_TOL = 1e-5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def check_outputs(got, want, what):
    got = as_tuple(got)
    assert len(got) == len(want), f"{what}: {len(got)} outputs, eager has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert isinstance(g, torch.Tensor), f"{what} output {i}: {type(g).__name__}"
        assert g.shape == w.shape and g.dtype == w.dtype, (what, i, g.shape, g.dtype, w.shape, w.dtype)
        assert w.abs().max() > 0 and torch.isfinite(w).all(), f"degenerate eager output {i}"
        err = rel_err(g, w)
        assert err <= REL_TOL, f"{what} output {i}: relative error {err:.3e} > {REL_TOL}"


# ------------------------------------------------------------------------ 1B config on the meta device
# (first in the module, so the peak-RSS measurement starts from a small baseline)

PYTHIA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=8, num_hidden_layers=16,
                 vocab_size=50304, rotary_pct=0.25)
PYTHIA_1B_PARAMS = 1_011_781_632  # Pythia-1B's published parameter count


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def test_meta_lowering_of_a_1b_config_materialises_no_weights(tmp_path):
    import transformers
    config = transformers.GPTNeoXConfig(**PYTHIA_1B)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))

    before = _peak_rss_bytes()
    loaded = load_model(str(path), meta=True)
    program = lower_exported(loaded.exported, loaded.name)
    growth = _peak_rss_bytes() - before
    # float32 weights would take 4.05 GB; building and lowering on meta takes a few hundred MB
    assert growth < 2e9, f"peak RSS grew by {growth / 1e9:.2f} GB"

    assert program.weights, "no weights bound"
    assert set(program.weights) == set(program.tensors)
    off_meta = [k for k, w in program.weights.items() if w.device.type != "meta"]
    assert not off_meta, f"weights materialised: {off_meta[:5]}"

    # the parameters are the model's, by name and shape
    with torch.device("meta"):
        reference = transformers.GPTNeoXForCausalLM(config)
    want = {n: tuple(p.shape) for n, p in reference.named_parameters()}
    got = {n: d.type.shape for n, d in program.tensors.items() if d.kind == "param"}
    assert got == want
    assert sum(d.type.numel for d in program.tensors.values() if d.kind == "param") == PYTHIA_1B_PARAMS
    layers = {d for d in program.defs if d.startswith("gpt_neox.layers.") and d.count(".") == 2}
    assert layers == {f"gpt_neox.layers.{i}" for i in range(16)}
    assert program.entry.outputs[0].shape == (2, 16, 50304)
    assert bwskc.parse(program.text()) == program


# --------------------------------------------------------------------------------------------- the zoo

@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_round_trips_through_text(zoo, name):
    program = zoo[name].program
    text = program.text()
    assert program.defs and program.tensors
    assert program.text() == text, "printing is not deterministic"
    parsed = bwskc.parse(text)
    assert parsed == program
    assert parsed.text() == text


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_interpreter_matches_eager(zoo, name):
    entry = zoo[name]
    with torch.no_grad():
        got = entry.program(*entry.args, **entry.kwargs)
    check_outputs(got, entry.eager_outputs(), "interpreter")


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_fx_codegen_matches_eager(zoo, name):
    entry = zoo[name]
    gm = entry.program.to_fx()
    assert isinstance(gm, torch.fx.GraphModule)
    with torch.no_grad():
        got = gm(*entry.positional_inputs())
    check_outputs(got, entry.eager_outputs(), "fx codegen")


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_names_come_from_the_model(zoo, name):
    entry = zoo[name]
    model, program = entry.model, entry.program
    state = model.state_dict()
    buffers = dict(model.named_buffers())
    non_persistent = set(buffers) - set(state)

    # parameters and buffers are named by state-dict key (or non-persistent buffer name) ...
    unknown = sorted(set(program.tensors) - set(state) - non_persistent)
    assert not unknown, f"tensors not named after the model: {unknown[:5]}"
    # ... and bound to the model's own values
    for key in program.tensors:
        value = state[key] if key in state else buffers[key]
        assert torch.equal(program.weights[key], value), key

    gm_state = program.to_fx().state_dict()
    assert gm_state
    assert set(gm_state) <= set(program.tensors), sorted(set(gm_state) - set(program.tensors))[:5]

    # definitions are named after modules
    modules = dict(model.named_modules())
    assert program.defs
    strangers = sorted(d.name for d in program.defs.values() if d.module not in modules)
    assert not strangers, f"definitions not named after modules: {strangers[:5]}"


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_zoo_lowering_is_deterministic(zoo, name):
    """A second build of the same model lowers to the same program, byte for byte."""
    again = lower_zoo_model(name).program
    assert again == zoo[name].program
    assert again.text() == zoo[name].program.text()


def _is_residual(term) -> bool:
    return (isinstance(term, Comb) and term.kind == "S" and len(term.args) == 2
            and isinstance(term.args[0], Prim) and term.args[0].op == "aten.add.Tensor")


def test_gpt2_block_is_two_residuals(zoo):
    program = zoo["gpt2"].program
    for i in range(2):
        body = program.defs[f"transformer.h.{i}"].body
        assert isinstance(body, Comb) and body.kind == "B" and len(body.args) == 2, body
        assert all(_is_residual(t) for t in body.args), body
        # x + attn(ln_1(x)) first (innermost, the last B argument), then + mlp(ln_2(.))
        mlp, attn = (t.args[1] for t in body.args)
        assert term_text(attn) == f"B(transformer.h.{i}.attn, transformer.h.{i}.ln_1)"
        assert term_text(mlp) == f"B(transformer.h.{i}.mlp, transformer.h.{i}.ln_2)"


# ---------------------------------------------------------------------------- ExportedProgram files

class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.fc2 = torch.nn.Linear(8, 2)

    def forward(self, x):
        h = self.norm(torch.relu(self.fc1(x)))
        return self.fc2(h) + x[:, :2]


def test_saved_exported_program_loads_and_lowers(tmp_path):
    torch.manual_seed(0)
    model, x = _Small().eval(), torch.randn(3, 4)
    path = tmp_path / "small.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))

    loaded = load_model(str(path))
    assert len(loaded.args) == 1 and torch.equal(loaded.args[0], x)  # the saved example inputs
    program = lower_exported(loaded.exported, loaded.name)
    assert set(program.tensors) == set(model.state_dict())
    assert {"fc1", "norm", "fc2"} <= set(program.defs)
    assert bwskc.parse(program.text()) == program
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(program(x), want, rtol=0, atol=0)
        torch.testing.assert_close(program.to_fx()(x), want, rtol=0, atol=0)
        y = torch.randn(3, 4)
        torch.testing.assert_close(program(y), model(y), rtol=0, atol=0)


def test_saved_exported_zoo_model_lowers_like_the_original(zoo, tmp_path):
    entry = zoo["gpt2"]
    path = tmp_path / "gpt2.pt2"
    torch.export.save(entry.loaded.exported, str(path))
    loaded = load_model(str(path))
    program = lower_exported(loaded.exported, loaded.name)
    assert program == lower_exported(entry.loaded.exported, loaded.name)
    with torch.no_grad():
        check_outputs(program(*entry.args), entry.eager_outputs(), "saved ExportedProgram")


def test_lower_api_matches_frontend_path():
    """``bwskc.lower(model, args, kwargs)`` gives the program the front end path gives."""
    from bwskc.frontend import default_inputs
    model = build_zoo_model("bert")
    args, kwargs = default_inputs(model)
    direct = bwskc.lower(model, args, kwargs)
    assert direct == lower_zoo_model("bert").program
