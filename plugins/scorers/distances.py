"""Distillation distances used by the trajectory scorer (pure functions on tensors): manifold relation maps, KD, feature MSE."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_rows(valid: torch.Tensor | None, n_rows: int, k: int, seed: int) -> torch.Tensor:
    """Indices of ``k`` rows of the flattened (B*T) token matrix, drawn once from non-padding rows."""
    rows = torch.arange(n_rows) if valid is None else torch.nonzero(valid.reshape(-1).cpu()).flatten()
    if rows.numel() <= k:
        return rows
    g = torch.Generator().manual_seed(seed)
    return rows[torch.randperm(rows.numel(), generator=g)[:k]].sort().values


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half precision is upcast; float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def select_rows(features: torch.Tensor, replicas: int, rows: torch.Tensor) -> torch.Tensor:
    """(R*B, T, D) stacked replicas -> (R, K, D): the sampled token rows of each replica."""
    return features.reshape(replicas, -1, features.shape[-1])[:, rows]


def relation_map(features: torch.Tensor) -> torch.Tensor:
    """Manifold relation map ``f f^T`` of L2-normalised token features: (R, K, D) -> (R, K, K)."""
    f = F.normalize(_f32(features), dim=-1)
    return f @ f.transpose(1, 2)


def manifold_distance(masked: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """L_MD: ``sum((M' - M)^2)`` per replica for relation maps (R, K, K) vs (K, K) -> (R,)."""
    return (masked - reference.unsqueeze(0)).pow(2).sum(dim=(1, 2))


def kd_divergence(masked_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 4.0,
                  divide_by_t: bool = True) -> torch.Tensor:
    """L_KD per replica: ``KL(softmax(z/T) || softmax(z'/T)) * T^2``, summed over the batch.

    ``masked_logits`` (R, B, C), ``logits`` (B, C). Segmentation outputs (B, C, *spatial) are per-pixel
    class distributions: the KL is taken over C at every pixel and averaged over the pixels. With
    ``divide_by_t=False`` the logits are not divided by T (the official OPTIN code's variant) but the
    result is still multiplied by T^2. Computed in float64: masking one unit moves the logits by so little
    that float32 log-softmax differences are rounding noise (even negative KLs).
    """
    t = temperature if divide_by_t else 1.0
    p_log = F.log_softmax(logits.double() / t, dim=1).unsqueeze(0)
    q_log = F.log_softmax(masked_logits.double() / t, dim=2)
    kl = (p_log.exp() * (p_log - q_log)).sum(dim=2)  # (R, B, *spatial)
    if kl.dim() > 2:
        kl = kl.flatten(2).mean(dim=2)
    return kl.sum(dim=-1) * temperature**2


def batch_mean(features: torch.Tensor, replicas: int) -> torch.Tensor:
    """(R*B, ...) stacked replicas -> (R, ...): each replica's feature map averaged over its batch."""
    return _f32(features).reshape(replicas, -1, *features.shape[1:]).mean(dim=1)


def feature_mse(masked: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """CNN trajectory distance (OPTIN A.10): MSE between batch-averaged feature maps, (R, ...) vs (...) -> (R,)."""
    return (masked - reference.unsqueeze(0)).pow(2).flatten(1).mean(dim=1)
