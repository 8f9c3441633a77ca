"""Multiplying groups of features by unit masks, for single or batched (replicated) masks."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .hooking import removing


def apply_unit_mask(x: torch.Tensor, mask: torch.Tensor, unit_size: int = 1) -> torch.Tensor:
    """Scale the last dim of ``x`` (n units x ``unit_size`` features) by ``mask``.

    ``mask`` is (n,) for one mask, or (R, n) when ``x``'s first dim is R stacked replicas of a batch:
    replica r is multiplied by ``mask[r]``. Gradients flow to the mask (Fisher scoring).
    """
    n = mask.shape[-1]
    if x.shape[-1] != n * unit_size:
        raise ValueError(f"mask for {n} units of size {unit_size} does not fit a feature dim of {x.shape[-1]}")
    m = mask.to(x.dtype).repeat_interleave(unit_size, dim=-1)
    if mask.dim() == 1:
        return x * m
    reps = mask.shape[0]
    lead = x.shape[0] // reps
    shaped = x.reshape(reps, lead, *x.shape[1:])
    m = m.reshape(reps, *([1] * (x.dim() - 1)), -1)
    return (shaped * m).reshape(x.shape)


@contextmanager
def masked_inputs(masks: dict[str, list[torch.Tensor | None]],
                  target: Callable[[str, int], tuple[nn.Module, int]]) -> Iterator[None]:
    """Within the context, scale the input of ``target(kind, layer) = (module, unit_size)`` by that
    layer's mask (forward pre-hooks; a ``None`` mask leaves the layer alone). The hooks are always removed."""
    handles = []
    with removing(handles):
        for kind, per_layer in masks.items():
            for layer, mask in enumerate(per_layer):
                if mask is None:
                    continue
                module, size = target(kind, layer)
                handles.append(module.register_forward_pre_hook(
                    lambda mod, args, m=mask, s=size: (apply_unit_mask(args[0], m, s), *args[1:])))
        yield
