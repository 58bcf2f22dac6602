"""Activation memory, counted exactly: the bytes autograd saves for backward.

Every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` during a forward pass is counted
once per storage (views of one storage count once), parameters excluded (they exist whatever the
training method). A custom Function's ``save_for_backward`` goes through the same hooks, so a coupling
chain is counted like everything else.
"""
from __future__ import annotations

import torch
from torch.autograd.graph import saved_tensors_hooks


def saved_bytes(module: torch.nn.Module, *args, loss=None, **kwargs) -> tuple[int, object]:
    """``(bytes saved for backward, output)`` of one forward call of ``module`` (gradients enabled).

    ``loss`` (output -> scalar) is applied inside the count when given, as a training step would."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.nbytes():
            storages[st.data_ptr()] = st.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = module(*args, **kwargs)
        if loss is not None:
            out = loss(out)
    return sum(storages.values()), out
