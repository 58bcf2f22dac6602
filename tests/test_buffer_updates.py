"""Buffer updates in compiled training: batch norm's running statistics and ``num_batches_tracked``.

A training-mode forward of ``bwskc.compile``'s module updates every buffer the model's own training
forward mutates, to the eager model's values; evaluation updates nothing and runs the evaluation
capture on the statistics training gathered; ``state_dict`` carries them. In reversible mode they are
the statistics of the coupled architecture (the ``store_activations=True`` reference), which equal the
eager model's wherever the coupling leaves a branch's input as it was (chains of two blocks, layers
outside chains); backward's recomputation of a branch or a checkpointed layer never applies them again,
and gradients are those of plain autograd.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import bwskc
from bwskc.errors import BwskError
from bwskc.runtime.compiled import updated_buffers
from bwskc.runtime.denote import update_target

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=UserWarning)

MODES = [("conventional", False), ("analyzed", False), ("reversible", False), ("reversible", True)]
MODE_IDS = ["conventional", "analyzed", "reversible", "store_activations"]


def _sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    return model, torch.randn(8, 5)


def _resnet(depths=(1, 1)):
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                       depths=list(depths), layer_type="basic", num_labels=4)
    torch.manual_seed(0)
    return transformers.ResNetForImageClassification(config), torch.randn(2, 3, 32, 32)


def _mobilenet_v2():
    config = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=4,
                                            classifier_dropout_prob=0.0)  # eager dropout: global RNG
    torch.manual_seed(0)
    return transformers.MobileNetV2ForImageClassification(config), torch.randn(2, 3, 32, 32)


MODELS = {"sequential": _sequential, "resnet": _resnet, "mobilenet_v2": _mobilenet_v2}


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def _assert_buffers_equal(got: dict, want: dict, names, tol=1e-6):
    """Equal within ``tol`` relative to the buffer's largest value, floored at 0.01: a running mean of
    a batch-normalised activation is ~1e-9, rounding where relative error means nothing."""
    for name in names:
        assert got[name].dtype == want[name].dtype, name
        a, b = got[name].double(), want[name].double()
        err = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-2) if b.numel() else 0.0
        assert err <= tol, (name, err)


def _step(module, x, cotangent_seed=0):
    """One training forward and backward with a fixed cotangent; the parameters' gradients."""
    module.train()
    module.zero_grad(set_to_none=True)
    out = _logits(module(x))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(cotangent_seed))
    (out * g).sum().backward()
    return {k: p.grad.detach().clone() for k, p in module.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def compiled():
    """(model name, mode id) -> (the eager model, its input, the compiled module), built once."""
    cache = {}

    def get(name, mode_id):
        if (name, mode_id) not in cache:
            model, x = MODELS[name]()
            mode, store = MODES[MODE_IDS.index(mode_id)]
            cache[name, mode_id] = (model, x, bwskc.compile(model, (x,), mode=mode, store_activations=store))
        return cache[name, mode_id]
    return get


def _grad_err(got: dict, want: dict) -> float:
    """The largest gradient difference relative to its parameter's largest gradient, against a floor
    of 1e-3 of the largest gradient of all (a bias that a following batch norm makes gradient-free has
    rounding-sized gradients, whose own relative error means nothing)."""
    assert set(got) == set(want)
    scale = max(float(v.abs().max()) for v in want.values())
    return max(float((got[k].double() - want[k].double()).abs().max())
               / max(float(want[k].abs().max()), 1e-3 * scale) for k in want)


_CASES = [pytest.param(name, mode_id, marks=[pytest.mark.slow] if (name, mode_id) == ("mobilenet_v2", "analyzed")
                       else [])  # the typing and CALM analyses of MobileNetV2 take minutes on a CPU; the
          for name in MODELS for mode_id in MODE_IDS]  # module it runs is conventional's


@pytest.mark.parametrize("name,mode_id", _CASES)
def test_a_training_forward_updates_the_buffers_the_eager_forward_updates(compiled, name, mode_id):
    model, x, module = compiled(name, mode_id)
    module.load_state_dict(model.state_dict())  # start from the model's own buffers (fixture reuse)
    eager = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    grads = _step(module, x)
    after_backward = {k: v.clone() for k, v in module.state_dict().items()}
    eager.zero_grad(set_to_none=True)
    out = _logits(eager(x))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * g).sum().backward()
    want = dict(eager.named_buffers())
    mutated = [k for k in want if not torch.equal(want[k], before[k])]
    assert mutated and set(mutated) <= set(updated_buffers(module.program))
    assert any(k.endswith("num_batches_tracked") for k in mutated)
    assert set(want) == {k for k in module.state_dict() if k in want}
    if mode_id in ("reversible", "store_activations"):
        # the coupled architecture's statistics (the reference's); the eager model's too when every
        # chain has at most two blocks, whose coupling computes the residual chain's own values (a
        # later branch of a longer chain reads a coupled stream, and the chain's output differs, so
        # every layer after it normalises other activations: MobileNetV2's third stage)
        ref = compiled(name, "store_activations")[2]
        if ref is not module:
            ref.load_state_dict(model.state_dict())
            ref_grads = _step(ref, x)
            _assert_buffers_equal(module.state_dict(), ref.state_dict(), ref.state_dict())
            # float32: the reversible step reconstructs its inputs, and MobileNetV2's 17 batch-normed
            # blocks amplify that rounding (1.2e-5 seen at two workers); the exact check of the
            # same gradients is check-gradients' float64 one (1e-8)
            assert _grad_err(grads, ref_grads) <= (3e-5 if name == "mobilenet_v2" else 1e-5)
        if all(len(spec.branches) <= 2 for spec in compiled(name, "reversible")[2].chains):
            # (1e-5: a chain's merge a + b - x rounds differently from the sequential x + f1 + f2,
            # and the layers after it see that rounding; against the reference it is 1e-6)
            _assert_buffers_equal(module.state_dict(), want, want, tol=1e-5)
        else:
            assert name == "mobilenet_v2"
    else:
        _assert_buffers_equal(module.state_dict(), want, want)
        eager_grads = {k: p.grad for k, p in eager.named_parameters() if p.grad is not None}
        assert _grad_err(grads, eager_grads) <= 1e-5
    # backward's recomputation (coupled branches, checkpointed layers) applied nothing again
    forward_only = copy.deepcopy(module)
    forward_only.load_state_dict(before)
    forward_only.train()
    with torch.no_grad():
        forward_only(x)
    _assert_buffers_equal(after_backward, forward_only.state_dict(), after_backward, tol=0.0)


@pytest.mark.parametrize("name", list(MODELS))
def test_evaluation_updates_nothing(compiled, name):
    model, x, module = compiled(name, "conventional")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.eval()
    with torch.no_grad():
        module(x)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a Program given alone has one capture: eval() runs it with dropout off and updates nothing
    program = bwskc.lower(model, (x,), train=True)
    alone = bwskc.compile(program, mode="conventional").eval()
    before = {k: v.clone() for k, v in alone.state_dict().items()}
    with torch.no_grad():
        alone(x)
    assert all(torch.equal(before[k], v) for k, v in alone.state_dict().items())
    alone.train()
    alone(x)
    assert not torch.equal(before[next(k for k in before if k.endswith("num_batches_tracked"))],
                           alone.state_dict()[next(k for k in before if k.endswith("num_batches_tracked"))])


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_after_training_is_the_eager_models_eval(name):
    """A few SGD steps in both, then eval: the compiled module runs its evaluation capture, on the running
    statistics its training gathered, and gives the eager model's eval output."""
    model, x = MODELS[name]()
    module = bwskc.compile(model, (x,), mode="conventional")
    assert module.eval_capture.startswith("the model's evaluation capture, reading the")
    eager = copy.deepcopy(model).train()
    opt_m = torch.optim.SGD(module.parameters(), lr=0.05)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        batch = torch.randn(x.shape, generator=gen)
        for net, opt in ((module, opt_m), (eager, opt_e)):
            net.train()
            opt.zero_grad()
            _logits(net(batch)).square().mean().backward()
            opt.step()
    _assert_buffers_equal(module.state_dict(), dict(eager.named_buffers()), dict(eager.named_buffers()),
                          tol=1e-5)
    # the buffers the evaluation graph reads are the tensors the training graph updated
    eval_graph = module.__dict__["_graphs"][False]
    reads = {n.target for n in eval_graph.nodes if n.op == "get_attr"}
    buffers = dict(module.named_buffers())
    assert set(updated_buffers(module.program)) & reads
    for target in set(updated_buffers(module.program)) & reads:
        assert module.get_buffer(target) is buffers[target]
    module.eval()
    eager.eval()
    with torch.no_grad():
        got, want = _logits(module(x)), _logits(eager(x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    eager.train()  # and training-mode output (batch statistics) is unchanged by all this
    module.train()
    with torch.no_grad():
        torch.testing.assert_close(_logits(module(x)), _logits(eager(x)), rtol=1e-5, atol=1e-5)


def test_state_dict_carries_the_updated_buffers_and_load_state_dict_restores_them():
    model, x = _resnet()
    module = bwskc.compile(model, (x,), mode="conventional")
    for _ in range(2):
        _step(module, x)
    state = module.state_dict()
    assert int(state["resnet.embedder.embedder.normalization.num_batches_tracked"]) == 2
    assert not torch.equal(state["resnet.embedder.embedder.normalization.running_mean"],
                           model.state_dict()["resnet.embedder.embedder.normalization.running_mean"])
    saved = {k: v.clone() for k, v in state.items()}
    fresh = bwskc.compile(model, (x,), mode="conventional")
    fresh.load_state_dict(saved)
    assert all(torch.equal(fresh.state_dict()[k], saved[k]) for k in saved)
    # loading copies in place: the evaluation capture reads what was loaded
    fresh.eval()
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), module(x), rtol=0, atol=0)
    # and the model itself takes them (the trainer saves the module's state dict as the model's)
    eager = copy.deepcopy(model)
    eager.load_state_dict(saved)
    with torch.no_grad():
        torch.testing.assert_close(_logits(eager.eval()(x)), fresh(x), rtol=1e-5, atol=1e-5)


def test_the_text_form_round_trips_update_outputs():
    model, x = _sequential()
    program = bwskc.lower(model, (x,), train=True)
    names = program.entry.output_names
    assert names == ("out", "update:1.num_batches_tracked")
    assert [update_target(n) for n in names] == [None, "1.num_batches_tracked"]
    text = program.text()
    assert "`update:1.num_batches_tracked`: i64[]" in text
    parsed = bwskc.parse(text)
    assert parsed == program and parsed.text() == text
    # the running statistics are implied by the functional batch-norm leaf, not outputs
    assert updated_buffers(program) == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    # the program's value is the model's output; the updates are the compiled module's business
    assert isinstance(program(x), torch.Tensor)
    evaluation = bwskc.lower(model, (x,), train=False)
    assert evaluation.entry.output_names == ("out",) and updated_buffers(evaluation) == []


class _Net(nn.Module):
    def __init__(self, features, layers, momentum, affine, track, conv):
        super().__init__()
        mods = []
        for _ in range(layers):
            if conv:
                mods += [nn.Conv2d(features, features, 3, padding=1),
                         nn.BatchNorm2d(features, momentum=momentum, affine=affine, track_running_stats=track)]
            else:
                mods += [nn.Linear(features, features),
                         nn.BatchNorm1d(features, momentum=momentum, affine=affine, track_running_stats=track)]
            mods.append(nn.Tanh())
        self.body = nn.Sequential(*mods)

    def forward(self, x):
        return self.body(x)


@settings(max_examples=8, deadline=None)
@given(features=st.integers(2, 4), layers=st.integers(1, 3),
       momentum=st.sampled_from([None, 0.0, 0.1, 0.5, 1.0]), affine=st.booleans(), track=st.booleans(),
       conv=st.booleans(), steps=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_buffers_after_k_training_forwards_equal_eager(features, layers, momentum, affine, track, conv,
                                                      steps, seed):
    torch.manual_seed(seed)
    model = _Net(features, layers, momentum, affine, track, conv)
    shape = (4, features, 3, 3) if conv else (5, features)
    x = torch.randn(shape)
    if momentum is None and track:
        # the cumulative average's factor 1 / float(num_batches_tracked) is a value torch.export
        # cannot trace (data-dependent): the model is refused with one clear error
        with pytest.raises(BwskError, match="torch.export failed"):
            bwskc.compile(model, (x,), mode="conventional")
        return
    module = bwskc.compile(model, (x,), mode="conventional")
    eager = copy.deepcopy(model).train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randn(shape, generator=gen)
        module.train()
        module.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        module(batch).square().sum().backward()
        eager(batch).square().sum().backward()
        got = {k: p.grad for k, p in module.named_parameters()}
        want = {k: p.grad for k, p in eager.named_parameters()}  # plain autograd's gradients
        assert _grad_err(got, want) <= 1e-5
    want = dict(eager.named_buffers())
    assert set(want) == set(module.state_dict()) - set(dict(module.named_parameters()))
    _assert_buffers_equal(module.state_dict(), want, want)
    module.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), eager(x), rtol=1e-5, atol=1e-5)


def test_coupled_branches_update_once_with_exact_gradients():
    """ResNet chains whose branches hold batch norms: the gradient check passes (float64, against
    plain autograd through the same architecture), buffers equal the store-activations reference, the
    check itself leaves the module's buffers alone, and backward's replay of the branches adds nothing."""
    model, x = _resnet((4, 4))
    module = bwskc.compile(model, (x,), mode="reversible", check=True)
    assert module.chains and all(c["max_rel_error"] <= 1e-8 for c in module.check_report["chains"])
    assert module.analyses["reversible"].chains
    assert all(int(v) == 0 for k, v in module.state_dict().items() if k.endswith("num_batches_tracked"))
    ref = bwskc.compile(model, (x,), mode="reversible", store_activations=True)
    grads, ref_grads = _step(module, x), _step(ref, x)
    assert _grad_err(grads, ref_grads) <= 1e-5
    _assert_buffers_equal(module.state_dict(), ref.state_dict(), ref.state_dict())
    assert all(int(v) == 1 for k, v in module.state_dict().items() if k.endswith("num_batches_tracked"))
    in_chains = {t for spec in module.chains for t in spec.tensor_names}
    assert any(t.endswith("running_mean") for t in in_chains)
