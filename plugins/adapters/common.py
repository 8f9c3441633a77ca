"""Pieces the built-in adapters share: the hook-masking base, image batches, MLP slicing, rebuilding HF
models from a plan."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from optin.contracts import Adapter, Batch, Trace, UnitSite
from optin.errors import OptinError
from optin.export import check_layer_count, rebuild_device
from optin.hooking import removing
from optin.masking import mask_hook, masked_sites
from optin.safety import NO_REMOTE_CODE
from optin.surgery import slice_linear
from optin.units import UnitTensors


class HookedAdapter(Adapter):
    """An adapter that masks units with hooks at their ``unit_site`` and restarts forwards from cached
    inputs. Subclasses implement ``_site(kind, layer)`` for their own kinds (the kind is checked here) and,
    for trajectory scoring, ``embedding_module(z)``: the module whose output is block z's embedding."""

    def _kinds(self) -> tuple[str, ...]:
        return tuple(self.unit_kinds)

    def check_kind(self, kind: str) -> None:
        """An OptinError naming the kinds this adapter has, for any other kind."""
        if kind not in self._kinds():
            raise OptinError(f"adapter {self.name} has no unit kind {kind!r} (kinds: {', '.join(self._kinds())})")

    def _site(self, kind: str, layer: int) -> UnitSite | None:
        raise NotImplementedError

    def unit_site(self, kind: str, layer: int) -> UnitSite | None:  # noqa: D102 (see Adapter.unit_site)
        self.check_kind(kind)
        return self._site(kind, layer)

    def masked(self, masks: UnitTensors):  # noqa: D102 (see Adapter.masked)
        for kind in masks:
            self.check_kind(kind)
        return masked_sites(masks, self._site)

    # --- restarting forwards (trajectory) --------------------------------------------------------
    def embedding_module(self, z: int) -> nn.Module:
        """The module whose output is block ``z``'s trajectory embedding."""
        raise NotImplementedError(f"adapter {self.name!r} does not support trajectory scoring")

    def embedding_of(self, z: int, output: torch.Tensor) -> torch.Tensor:
        """Block ``z``'s embedding from ``embedding_module(z)``'s output (default: as it is)."""
        return output

    def forward_embeddings(self, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``logits(batch)`` with every block's ``embedding_of(embedding_module(z))`` recorded (autograd on)."""
        n_blocks = len(next(iter(self.unit_counts().values())))
        emb: dict[int, torch.Tensor] = {}
        handles = [self.embedding_module(z).register_forward_hook(
            lambda m, a, o, z=z: emb.__setitem__(z, self.embedding_of(z, o))) for z in range(n_blocks)]
        with removing(handles):
            logits = self.logits(batch)
        return [emb[z] for z in range(n_blocks)], logits

    @contextmanager
    def restart_hooks(self, kind: str, layer: int, masks: torch.Tensor, n_blocks: int,
                      select: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[dict[int, torch.Tensor]]:
        """Within the context, ``kind`` units of ``layer`` are masked by ``masks`` (R, n) and every forward
        records ``select(embedding_z)`` for blocks ``layer <= z < n_blocks`` in the yielded dict."""
        site = self.unit_site(kind, layer)
        if site is None:
            raise OptinError(f"layer {layer} of adapter {self.name} has no {kind} to mask")
        collected: dict[int, torch.Tensor] = {}
        handles = [mask_hook(site, masks)]  # first: an embedding read at the same module sees the masked map
        handles += [self.embedding_module(z).register_forward_hook(
            lambda m, a, o, z=z: collected.__setitem__(z, select(self.embedding_of(z, o))))
            for z in range(layer, n_blocks)]
        with removing(handles):
            yield collected


@torch.no_grad()
def trace_blocks(blocks: list[nn.Module], forward: Callable[[], torch.Tensor], mid: Callable[[nn.Module], nn.Module],
                 out: Callable[[nn.Module], nn.Module],
                 embedding: Callable[[torch.Tensor], torch.Tensor] = lambda o: o) -> Trace:
    """One unmasked forward of a pre-norm transformer, capturing per block its input (``starts``), the
    residual stream entering ``mid(block)`` (the norm before the MLP: ``mids``) and ``embedding`` of the
    output of ``out(block)`` (the MLP's second Linear: the trajectory embedding)."""
    starts, mids, emb, handles = {}, {}, {}, []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(
            lambda m, a, k, i=i: starts.__setitem__(i, a[0] if a else k["hidden_states"]), with_kwargs=True))
        handles.append(mid(b).register_forward_pre_hook(lambda m, a, i=i: mids.__setitem__(i, a[0])))
        handles.append(out(b).register_forward_hook(lambda m, a, o, i=i: emb.__setitem__(i, embedding(o))))
    with removing(handles):
        logits = forward()
    n = len(blocks)
    return Trace(embeddings=[emb[i] for i in range(n)], logits=logits, valid=None,
                 state={"starts": [starts[i] for i in range(n)], "mids": [mids[i] for i in range(n)]})


def config_json(source: str) -> dict | None:
    """``source/config.json`` as a dict; None when there is no such file or it holds no JSON object (the
    cheap look ``claims`` takes: no weights are read)."""
    cfg = Path(source) / "config.json"
    try:
        data = json.loads(cfg.read_text()) if cfg.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def image_collate(examples: list[dict]) -> Batch:
    """Stack ``{"image": (C, H, W), "label": int}`` examples into ``pixel_values`` (+ ``labels``);
    segmentation examples' ``mask`` (H, W) go to ``masks`` (B, H, W)."""
    batch = {"pixel_values": torch.stack([e["image"] for e in examples])}
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([int(e["label"]) for e in examples])
    if "mask" in examples[0]:
        batch["masks"] = torch.stack([e["mask"] for e in examples]).long()
    return batch


def kept(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the units a keep-mask keeps."""
    return torch.nonzero(mask > 0).flatten()


def slice_mlp(fc_in: nn.Linear, fc_out: nn.Linear, keep: torch.Tensor) -> tuple[nn.Linear, nn.Linear]:
    """The two Linear layers of an MLP with only the hidden neurons ``keep``."""
    return slice_linear(fc_in, out_idx=keep), slice_linear(fc_out, in_idx=keep)


def track(kept_index: dict[str, list[list[int]]], kind: str, layer: int, keep: list[int]) -> None:
    """Compose a new selection with the original indices kept so far (for the export plan)."""
    kept_index[kind][layer] = [kept_index[kind][layer][k] for k in keep]


def first_k_masks(current: dict[str, list[int]], target: dict[str, list[int]]) -> UnitTensors:
    """Masks keeping the first ``target`` units of each layer (rebuilding a pruned shape; the weights
    loaded afterwards fill them)."""
    return {k: [(torch.arange(full) < keep).float() for full, keep in zip(current[k], target[k])] for k in target}


def cut_to_plan(adapter: Adapter, plan: dict, counts: dict[str, list[int]] | None = None) -> Adapter:
    """A freshly rebuilt, unpruned ``adapter`` cut to the plan's unit counts (or ``counts``) by keeping the
    first units of each layer (the weights loaded afterwards fill them), with the plan's original unit
    indices for a later export. Returns the adapter."""
    adapter.prune(first_k_masks(adapter.unit_counts(), plan["unit_counts"] if counts is None else counts))
    adapter.kept_index = plan.get("kept_index", adapter.kept_index)
    return adapter


def hf_plan(adapter: Adapter) -> dict:
    """The plan of a pruned transformers model: its class, original config, unit counts and kept indices."""
    return {"model_class": type(adapter.model).__name__, "config": adapter.model.config.to_dict(),
            "unit_counts": adapter.unit_counts(), "kept_index": adapter.kept_index}


def plain_hf_model(adapter: Adapter, sizes: dict[str, str | Callable[[Any, int], None]], head_dim: int, hidden: int,
                   head_size_key: str | None) -> nn.Module:
    """The adapter's (pruned) transformers model rebuilt as its own class from a config that states the kept
    sizes, with its weights: what ``Adapter.hf_model`` returns for ``optin export --format hf``.

    ``sizes`` maps a unit kind to the config key holding its count per layer (or a function setting it on the
    config): every layer must keep the same count, which must not be 0. ``head_size_key`` names the config
    key stating the features per head (DeBERTa-v2 ``attention_head_size``, ViT ``head_dim``); None: the class
    derives it as ``hidden / heads``, so the kept heads must keep that ratio (only unpruned heads do)."""
    import copy

    counts = adapter.unit_counts()
    model = adapter.model
    config = copy.deepcopy(model.config)
    what = f"{type(model).__name__} (adapter {adapter.name})"
    for kind, key in sizes.items():
        kept = sorted(set(counts[kind]))
        if len(kept) != 1:
            raise OptinError(f"{what}: its layers keep different numbers of {kind} ({counts[kind]}), and a Hugging "
                             f"Face config states one {key if isinstance(key, str) else kind} for every layer; "
                             "export this model with --format onnx (or use the optin folder)")
        if kept[0] == 0:
            raise OptinError(f"{what}: every {kind[:-1]} was removed, which a Hugging Face model cannot express; "
                             "export with --format onnx")
        if isinstance(key, str):
            setattr(config, key, kept[0])
        else:
            key(config, kept[0])
    if "heads" in sizes:
        n = counts["heads"][0]
        if head_size_key is not None:
            setattr(config, head_size_key, head_dim)
        elif n * head_dim != hidden:
            raise OptinError(f"{what}: its config derives the head size as hidden size / heads = {hidden} / {n} = "
                             f"{hidden / n:g}, but each kept head has {head_dim} features, so pruned heads cannot be "
                             "stated in a Hugging Face config of this model; export with --format onnx (or use the "
                             "optin folder)")
    try:
        plain = type(model)(config)
    except (ValueError, TypeError) as exc:
        raise OptinError(f"{what}: transformers refuses the pruned sizes ({' '.join(str(exc).split())[:200]}); "
                         "export with --format onnx") from None
    try:
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    except RuntimeError as exc:  # a layer its config does not size by the stated counts
        raise OptinError(f"{what}: a model built from the pruned config does not take the pruned weights "
                         f"({' '.join(str(exc).split())[:200]}); export with --format onnx") from None
    tied = set(getattr(plain, "_tied_weights_keys", None) or {})
    if [k for k in missing if k not in tied] or unexpected:
        raise OptinError(f"{what}: a model built from the pruned config does not take the pruned weights (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}); export with --format onnx")
    return plain.to(next(model.parameters()).device).eval()


# Config keys that count layers: a plan may not declare more of them than its weights file has tensors.
LAYER_KEYS = ("num_hidden_layers", "num_layers", "encoder_layers", "decoder_layers", "depths", "depth")


def _layer_counts(config: Any, path: str = "config") -> Iterator[tuple[str, int]]:
    """``(where, count)`` for every layer-count key in a (nested) config mapping."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key in LAYER_KEYS:
                values = value if isinstance(value, list) else [value]
                if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                    yield f"{path}.{key}", sum(values)
            elif isinstance(value, dict):
                yield from _layer_counts(value, f"{path}.{key}")


def hf_model_from_plan(plan: dict) -> nn.Module:
    """A randomly initialised transformers model of the plan's class and original config (on the meta device
    during ``load_pruned``'s checking pass; layer counts bounded by the weights file first)."""
    import transformers
    from transformers import AutoConfig

    name = plan.get("model_class")
    model_cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(model_cls, type) and issubclass(model_cls, transformers.PreTrainedModel)):
        raise OptinError(f"the plan names model class {str(name)[:60]!r}, which is not a transformers model class "
                         "(e.g. BertForSequenceClassification); the plan is damaged: re-export the pruned model")
    cfg = dict(plan.get("config") or {})
    model_type = cfg.pop("model_type", None)
    for where, n in _layer_counts(cfg):
        check_layer_count(n, where)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError, TypeError) as exc:
        raise OptinError(f"the plan's config cannot be used (model_type {model_type!r}): "
                         f"{' '.join(str(exc).split())[:200]}; re-export the pruned model") from None
    with rebuild_device():
        return model_cls(config).eval()


class HFImageClassifier:
    """Loading, batching and logits shared by the adapters of HF ``*ForImageClassification`` models."""

    @classmethod
    def load(cls, source: str, num_labels: int | None = None):
        from transformers import AutoModelForImageClassification

        from .image_io import hf_image_processor

        kw = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
        model = AutoModelForImageClassification.from_pretrained(source, **kw, **NO_REMOTE_CODE).eval()
        return cls(model, hf_image_processor(source))

    def image_transform(self):  # noqa: D102 (see Adapter.image_transform): the folder's image processor
        from .image_io import hf_transform

        if getattr(self, "_image_transform", None) is None:
            cfg = self.model.config
            self._image_transform = hf_transform(self.processor, cfg, int(getattr(cfg, "num_channels", 3)),
                                                 name=f"adapter {self.name}")
        return self._image_transform

    def save_extras(self, directory: str) -> None:
        if hasattr(self.processor, "save_pretrained"):  # the image processor travels with the pruned model
            self.processor.save_pretrained(directory)

    def collate(self, examples: list[dict]) -> Batch:
        return image_collate(examples)

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.model(pixel_values=batch["pixel_values"]).logits
