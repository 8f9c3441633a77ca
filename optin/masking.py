"""Multiplying groups of features by unit masks, for single or batched (replicated) masks, at a ``UnitSite``."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.utils.hooks import RemovableHandle

from .contracts import UnitSite
from .errors import OptinError
from .hooking import removing


def apply_unit_mask(x: torch.Tensor, mask: torch.Tensor, unit_size: int = 1) -> torch.Tensor:
    """Scale the last dim of ``x`` (n units x ``unit_size`` features) by ``mask``.

    ``mask`` is (n,) for one mask, or (R, n) when ``x``'s first dim is R stacked replicas of a batch:
    replica r is multiplied by ``mask[r]``. Gradients flow to the mask (Fisher scoring).
    """
    n = mask.shape[-1]
    if x.shape[-1] != n * unit_size:
        raise ValueError(f"mask for {n} units of size {unit_size} does not fit a feature dim of {x.shape[-1]}")
    m = mask.to(device=x.device, dtype=x.dtype).repeat_interleave(unit_size, dim=-1)
    if mask.dim() == 1:
        return x * m
    reps = mask.shape[0]
    lead = x.shape[0] // reps
    shaped = x.reshape(reps, lead, *x.shape[1:])
    m = m.reshape(reps, *([1] * (x.dim() - 1)), -1)
    return (shaped * m).reshape(x.shape)


def mask_at(site: UnitSite, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` (the tensor passing through ``site``) with its units scaled by ``mask`` ((n,) or (R, n))."""
    return site.restore(apply_unit_mask(site.canonical(x), mask, site.unit_size), x)


def hook_site(site: UnitSite, fn: Callable[[torch.Tensor], torch.Tensor]) -> RemovableHandle:
    """A hook replacing the tensor passing through ``site`` by ``fn(tensor)``."""
    if site.output:
        return site.module.register_forward_hook(lambda m, a, o: fn(o))
    return site.module.register_forward_pre_hook(lambda m, a: (fn(a[0]), *a[1:]))


def mask_hook(site: UnitSite, mask: torch.Tensor) -> RemovableHandle:
    """A hook multiplying the units passing through ``site`` by ``mask`` until removed."""
    return hook_site(site, lambda x: mask_at(site, x, mask))


@contextmanager
def masked_sites(masks: dict[str, list[torch.Tensor | None]],
                 site_of: Callable[[str, int], UnitSite | None]) -> Iterator[None]:
    """Within the context, scale the units at ``site_of(kind, layer)`` by that layer's mask (a ``None`` mask,
    or a layer without a site, is left alone unless its mask has units). The hooks are always removed."""
    handles: list[RemovableHandle] = []
    with removing(handles):
        for kind, per_layer in masks.items():
            for layer, mask in enumerate(per_layer):
                if mask is None:
                    continue
                site = site_of(kind, layer)
                if site is None:
                    if mask.shape[-1]:
                        raise OptinError(f"{kind} mask for layer {layer} has {mask.shape[-1]} units but that "
                                         "layer has none")
                    continue
                handles.append(mask_hook(site, mask))
        yield


def masked_delta(x: torch.Tensor, weight: torch.Tensor, masks: torch.Tensor, unit_size: int = 1) -> torch.Tensor:
    """What masking takes away from a Linear layer's output, per replica: ``(x * (1 - m_r)) @ W^T``.

    ``x`` (N, n * unit_size) is the layer's input, ``weight`` (D_out, n * unit_size), ``masks`` (R, n).
    Only the units whose mask differs from 1 in some replica are gathered, so a replica that masks k units
    costs N x k x unit_size x D_out instead of a full product: masking one FFN neuron changes the output by
    one rank-1 term, masking one head by its own slice of the output projection. Returns (R, N, D_out).
    """
    n = masks.shape[-1]
    comp = (1 - masks).to(device=x.device, dtype=x.dtype)  # (R, n)
    k = int((comp != 0).sum(1).max()) if comp.numel() else 0
    reps = masks.shape[0]
    if k == 0:
        return x.new_zeros(reps, x.shape[0], weight.shape[0])
    _, idx = comp.abs().topk(k, dim=1)  # (R, k): the masked units (padded with zero weights)
    weights_sel = torch.gather(comp, 1, idx)
    xu = x.reshape(x.shape[0], n, unit_size)[:, idx]  # (N, R, k, u)
    xu = (xu * weights_sel[None, :, :, None]).permute(1, 0, 2, 3).reshape(reps, x.shape[0], k * unit_size)
    wu = weight.reshape(weight.shape[0], n, unit_size).permute(1, 2, 0)[idx]  # (R, k, u, D_out)
    return torch.bmm(xu, wu.reshape(reps, k * unit_size, weight.shape[0]))
