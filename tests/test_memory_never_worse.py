"""``mode="reversible"`` never stores more for backward than ``mode="conventional"``.

Layers the rewrite leaves are checkpointed only where that pays: a checkpoint stores the layer's
inputs, so a layer whose interior saves less than its inputs (a U-Net stage that concatenates its
skip, a cheap elementwise layer) runs as conventional does (``compiled.checkpoint_pays``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import bwskc
from bwskc.frontend import default_inputs
from bwskc.runtime.check import entry_inputs
from bwskc.runtime.memory import saved_bytes
from conftest import ZOO_NAMES, build_zoo_model


def _loss(out):
    out = out if isinstance(out, tuple) else (out,)
    return sum(t.float().sum() for t in out if t.is_floating_point())


def _bytes(program, inputs, mode):
    module = bwskc.compile(program, mode=mode)
    return saved_bytes(module, *inputs, loss=_loss)[0]


class Cheap(nn.Module):
    """Saves nothing for backward (a scale and a shift): checkpointing it would only store its input."""

    def forward(self, x):
        return x * 0.5 + 1.0


class Stage(nn.Module):
    """A U-Net stage: upsample, concatenate the skip, convolve (the input is what a checkpoint keeps)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(2 * c, c, 1)

    def forward(self, x, skip):
        x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return torch.relu(self.conv(torch.cat([x, skip], 1)))


class Net(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.cheap = nn.ModuleList([Cheap() for _ in range(3)])
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.up = nn.ModuleList([Stage(c)])
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        for layer in self.cheap:
            x = layer(x)
        skip = x
        x = self.down(x)
        for stage in self.up:
            x = stage(x, skip)
        return self.head(x)


def test_a_net_with_nothing_to_couple_stores_no_more_than_conventional():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    program = bwskc.lower(Net(), (x,), train=True)
    rev, conv = _bytes(program, [x], "reversible"), _bytes(program, [x], "conventional")
    assert rev <= conv, (rev, conv)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_reversible_stores_no_more_than_conventional_on_the_zoo(name):
    model = build_zoo_model(name)
    args, kwargs = default_inputs(model)
    program = bwskc.lower(model, args, kwargs, train=True)
    inputs = entry_inputs(program, args, kwargs)
    rev, conv = _bytes(program, inputs, "reversible"), _bytes(program, inputs, "conventional")
    assert rev <= conv, (rev, conv)


class DrawingCheap(nn.Module):
    """A cheap layer with a factory draw (BEiT's drop path): counted on meta, draw included."""

    def forward(self, x):
        keep = 0.7 + torch.rand((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device)
        return x * 0.5 + keep.floor() * x / 0.7


class DrawingNet(Net):
    def __init__(self, c=4):
        super().__init__(c)
        self.cheap = nn.ModuleList([DrawingCheap() for _ in range(3)])


def test_layers_with_factory_draws_are_counted_too():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    program = bwskc.lower(DrawingNet(), (x,), train=True)
    rev, conv = _bytes(program, [x], "reversible"), _bytes(program, [x], "conventional")
    assert rev <= conv, (rev, conv)


class PositionLayer(nn.Module):
    """A layer whose interior builds a tensor with a device literal, as T5's relative-position buckets
    do (``arange(n, device=cpu)`` in the export), and saves far more than its input."""

    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device)
        bias = -(pos[None, :] - pos[:, None]).abs().float()
        a = torch.softmax(self.lin(x) @ x.transpose(1, 2) + bias, -1)
        return torch.tanh(a @ self.lin(x))


class PositionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([PositionLayer() for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_layers_that_build_tensors_on_a_device_are_checkpointed():
    """Counted on fake tensors, a layer's own ``arange(.., device=cpu)`` no longer makes the count fail
    (it did on the meta device, and every such layer, Switch's decoder among them, was stored): the
    layers are checkpointed, storing their inputs, a fraction of their interiors."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8)
    program = bwskc.lower(PositionNet(), (x,), train=True)
    rev, conv = _bytes(program, [x], "reversible"), _bytes(program, [x], "conventional")
    assert rev * 4 <= conv, (rev, conv)
    module = bwskc.compile(program, mode="reversible")
    x.requires_grad_(True)
    module(x).sum().backward()
    g = x.grad.clone()
    x.grad = None
    bwskc.compile(program, mode="conventional")(x).sum().backward()
    torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-6)
