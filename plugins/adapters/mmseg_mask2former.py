"""mmsegmentation 1.x front end of the Mask2Former adapter: ``EncoderDecoder`` + Swin backbone + ``Mask2FormerHead``.

Units: the FFN hidden neurons of every Swin block of the backbone (DESIGN 3.1; mmcv ``FFN``:
``ffn.layers[0][0]`` Linear -> GELU -> ``ffn.layers[1]`` Linear), masked at the input of the second Linear.
Layers are the Swin blocks in order over all stages. ``logits(batch)`` is the per-pixel class
log-distribution (B, C, H, W): mmseg's ``encode_decode`` scores (softmax over query classes x mask
sigmoids), normalised over classes, logged. Batches hold ``pixel_values`` (B, 3, H, W), already normalised
as the config's data preprocessor would (ImageNet mean/std, RGB), and optionally ``masks`` (B, H, W) with
255 = ignore. The trajectory restarts the backbone exactly at the masked block's FFN from cached inputs.

mmcv/mmseg are imported lazily: this module imports without them, and ``unavailable_reason()`` says how to
install them (mmcv 2.1 has no registry wheel for recent torch; see docs/plugins.md).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import importlib.util
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from optin.contracts import Batch, Trace, UnitSite
from optin.errors import OptinError
from optin.units import CostModel, UnitTensors
from optin.hooking import removing

from .common import HookedAdapter, cut_to_plan, image_collate, kept, slice_mlp, track

DEFAULT_CONFIG = "mask2former_swin-t_8xb2-90k_cityscapes-512x1024"
INSTALL_HINT = ("needs mmcv with its compiled ops + mmsegmentation 1.x: pip install --no-deps <mmcv 2.1.0 wheel "
                "built for your torch> && pip install 'optin[mmseg]' (see docs/plugins.md, 'mmsegmentation')")
IGNORE = 255
EPS = 1e-12


@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    """Why mmcv's compiled ops or mmseg cannot be imported here (None when they can). Cached: the import
    costs seconds and ``optin list`` asks every plugin."""
    try:
        import mmcv.ops  # noqa: F401  (the compiled extension; mmseg's Mask2Former needs it via mmdet)
        import mmseg  # noqa: F401
        import mmdet  # noqa: F401
    except Exception as exc:  # ImportError, or an ABI mismatch raising OSError/RuntimeError
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return None


def _mim_configs() -> Path | None:
    """mmseg's shipped configs folder (``mmseg/.mim/configs``), found without importing mmseg."""
    spec = importlib.util.find_spec("mmseg")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / ".mim" / "configs"
    return root if root.is_dir() else None


def _config_name(source: str) -> str:
    return source[len("mmseg:"):] if source.startswith("mmseg:") else source


def find_config(source: str) -> tuple[Path, Path | None]:
    """The config file and optional checkpoint for ``source``: a config name shipped with mmseg (optionally
    ``mmseg:``-prefixed), a ``.py`` config path (a ``.pth`` with the same stem, or the only ``.pth`` in its
    folder, is its checkpoint), or a folder holding one ``.py`` config."""
    path = Path(_config_name(source)).expanduser()
    if path.is_dir():
        configs = sorted(path.glob("*.py"))
        if len(configs) != 1:
            raise OptinError(f"folder {path} must hold exactly one mmseg .py config (found {len(configs)})")
        path = configs[0]
    if path.suffix == ".py":
        if not path.is_file():
            raise OptinError(f"mmseg config {path} does not exist")
        ckpt = path.with_suffix(".pth")
        if not ckpt.is_file():
            found = sorted(path.parent.glob("*.pth"))
            ckpt = found[0] if len(found) == 1 else None
        return path, ckpt
    root = _mim_configs()
    if root is None:
        raise OptinError(f"cannot resolve mmseg config {source!r}: mmsegmentation is not installed ({INSTALL_HINT})")
    name = path.name
    found = sorted(root.glob(f"*/{name}.py"))
    if not found:
        raise OptinError(f"no config named {name!r} ships with mmsegmentation (looked in {root}); pass a config "
                         f"name such as {DEFAULT_CONFIG!r} or a .py config path")
    return found[0], None


def _is_mask2former_swin(model: nn.Module) -> bool:
    """Class-name check (no mmseg import): mmseg EncoderDecoder with a SwinTransformer and a Mask2FormerHead."""
    def named(obj: Any, cls: str) -> bool:
        return any(c.__name__ == cls for c in type(obj).__mro__)

    backbone, head = getattr(model, "backbone", None), getattr(model, "decode_head", None)
    if not (named(model, "EncoderDecoder") and named(backbone, "SwinTransformer") and named(head, "Mask2FormerHead")):
        return False
    stages = getattr(backbone, "stages", None)
    try:
        ffn = stages[0].blocks[0].ffn
        return isinstance(ffn.layers[0][0], nn.Linear) and isinstance(ffn.layers[1], nn.Linear)
    except (TypeError, IndexError, AttributeError):
        return False


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence mmengine's INFO logging (init_weights prints every parameter) and known torch warnings."""
    import logging

    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*meshgrid.*")
            warnings.filterwarnings("ignore", message=".*indexing argument.*")
            yield
    finally:
        logger.setLevel(level)


def _plain(obj: Any) -> Any:
    """A ConfigDict (or nested containers of them) as plain JSON-able dicts and lists."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


class MMSegMask2FormerAdapter(HookedAdapter):
    """mmsegmentation Mask2Former (Swin backbone): FFN neurons of the Swin blocks; needs mmcv + mmseg."""

    name = "mmseg-mask2former"
    sources = "mmseg:NAME or an mmsegmentation mask2former_swin config"
    unit_kinds = ("neurons",)
    output = "segmentation"
    trajectory_distance = "manifold"

    def __init__(self, model: nn.Module, processor: Any = None, config: dict | None = None,
                 input_size: tuple[int, int] | None = None) -> None:
        super().__init__(model, processor)
        if not _is_mask2former_swin(model):
            raise OptinError(f"{type(model).__name__} is not an mmseg EncoderDecoder with a SwinTransformer backbone "
                             "and a Mask2FormerHead")
        cfg = config if config is not None else getattr(model, "cfg", None)
        if cfg is not None and "model" in cfg:  # a full mmengine Config: keep its model part
            cfg = cfg["model"]
        self.config = _plain(cfg) if cfg is not None else None
        self.backbone = model.backbone
        self.stage_of: list[tuple[int, int]] = []  # (stage, block within stage) per layer
        for s, stage in enumerate(self.backbone.stages):
            self.stage_of += [(s, j) for j in range(len(stage.blocks))]
        self.blocks = [self.backbone.stages[s].blocks[j] for s, j in self.stage_of]
        self.input_size = tuple(input_size) if input_size else self._config_size()
        self._probe: dict[tuple[int, int], tuple[list[int], float]] = {}
        self.kept_index = {k: [list(range(n)) for n in ns] for k, ns in self.unit_counts().items()}

    # --- availability and discovery --------------------------------------------------------------
    @staticmethod
    def unavailable_reason() -> str | None:
        err = _import_error()
        return None if err is None else f"{INSTALL_HINT} [{err}]"

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return _is_mask2former_swin(model)

    @classmethod
    def claims(cls, source: str) -> bool:
        name = _config_name(source)
        if source.startswith("mmseg:") or re.fullmatch(r"mask2former_swin[\w.-]*", name):
            return True
        path = Path(name).expanduser()
        if path.suffix == ".py" and path.is_file():
            try:
                text = path.read_text(errors="ignore")
            except OSError:
                return False
            return "mask2former" in path.name.lower() or "mask2former" in text.lower()
        return False

    @classmethod
    def load(cls, source: str, num_labels: int | None = None) -> "MMSegMask2FormerAdapter":
        return cls.from_config(source, num_labels=num_labels)

    @classmethod
    def from_config(cls, config: Any = DEFAULT_CONFIG, overrides: dict | None = None, checkpoint: str | None = None,
                    num_labels: int | None = None, seed: int | None = None) -> "MMSegMask2FormerAdapter":
        """Build the model from an mmseg config (name, ``.py`` path, folder, mmengine Config or plain dict).

        ``overrides`` are mmengine ``merge_from_dict`` keys (e.g. ``{"model.backbone.embed_dims": 32}``);
        ``checkpoint`` (default: the ``.pth`` next to a ``.py`` config) is loaded over a random init.
        The backbone's ``init_cfg`` (a download of ImageNet Swin weights) is dropped: nothing is fetched.
        """
        reason = cls.unavailable_reason()
        if reason:
            raise OptinError(f"adapter mmseg-mask2former is unavailable: {reason}")
        from mmengine.config import Config
        from mmengine.registry import DefaultScope

        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules

        register_all_modules(init_default_scope=False)
        if isinstance(config, Config):
            cfg = copy.deepcopy(config)
        elif isinstance(config, dict):
            cfg = Config({"model": copy.deepcopy(config)} if "model" not in config else copy.deepcopy(config))
        else:
            path, found = find_config(str(config))
            try:
                cfg = Config.fromfile(str(path))
            except Exception as exc:
                raise OptinError(f"cannot read mmseg config {path}: {exc}") from exc
            checkpoint = checkpoint or (str(found) if found else None)
        if overrides:
            try:
                cfg.merge_from_dict(dict(overrides))
            except Exception as exc:
                raise OptinError(f"bad mmseg config override {overrides}: {exc}") from exc
        model_cfg = cfg.get("model")
        if model_cfg is None or model_cfg.get("decode_head", {}).get("type") != "Mask2FormerHead" \
                or model_cfg.get("backbone", {}).get("type") != "SwinTransformer":
            raise OptinError("the mmseg config must describe an EncoderDecoder with a SwinTransformer backbone and a "
                             f"Mask2FormerHead (e.g. {DEFAULT_CONFIG})")
        model_cfg.backbone.init_cfg = None
        if num_labels:
            _set_classes(model_cfg, int(num_labels))
        if seed is not None:
            torch.manual_seed(seed)
        with _quiet(), DefaultScope.overwrite_default_scope("mmseg"):
            try:
                model = MODELS.build(model_cfg)
            except Exception as exc:
                raise OptinError(f"cannot build the mmseg model from its config: {exc}") from exc
            with contextlib.redirect_stdout(io.StringIO()):  # "No pre-trained weights for SwinTransformer"
                model.init_weights()
        if checkpoint:
            _load_checkpoint(model, checkpoint, skip_mismatched=bool(num_labels))
        pre = cfg.get("data_preprocessor") or model_cfg.get("data_preprocessor") or {}
        processor = None
        if pre.get("mean") and pre.get("std"):
            processor = {"mean": [m / 255 for m in pre["mean"]], "std": [s / 255 for s in pre["std"]]}
        size = cfg.get("crop_size")
        return cls(model.eval(), processor, config=model_cfg.to_dict(), input_size=tuple(size) if size else None)

    def _config_size(self) -> tuple[int, int]:
        pre = (self.config or {}).get("data_preprocessor") or {}
        size = pre.get("size")
        return (int(size[0]), int(size[1])) if size else (512, 1024)

    # --- data ------------------------------------------------------------------------------------
    def collate(self, examples: list[dict]) -> Batch:
        batch = image_collate(examples)
        if "mask" in examples[0] and "masks" not in batch:
            batch["masks"] = torch.stack([torch.as_tensor(e["mask"]).long() for e in examples])
        return batch

    def _pixels(self, batch: Batch) -> torch.Tensor:
        x = batch.get("pixel_values") if isinstance(batch, dict) else None
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise OptinError(f"adapter mmseg-mask2former needs batches with pixel_values (B, 3, H, W) RGB images, "
                             f"got {got}; a greyscale task must repeat its channel")
        return x

    @staticmethod
    def _metas(x: torch.Tensor) -> list[dict]:
        hw = tuple(int(v) for v in x.shape[-2:])
        return [{"img_shape": hw, "pad_shape": hw, "ori_shape": hw}] * x.shape[0]

    @staticmethod
    def _log_probs(scores: torch.Tensor) -> torch.Tensor:
        """mmseg's Mask2Former scores (sum over queries of class prob x mask prob) -> log class distribution."""
        return torch.log(scores.clamp_min(EPS) / scores.clamp_min(EPS).sum(1, keepdim=True))

    def _decode(self, feats: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if getattr(m, "with_neck", False):
            feats = m.neck(feats)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*meshgrid.*")
            scores = m.decode_head.predict(feats, self._metas(x), m.test_cfg)
        return self._log_probs(scores)

    def logits(self, batch: Batch) -> torch.Tensor:
        x = self._pixels(batch)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*meshgrid.*")
            return self._log_probs(self.model.encode_decode(x, self._metas(x)))

    def loss(self, batch: Batch) -> torch.Tensor:
        """Per-pixel NLL against ``masks`` (255 = ignore)."""
        if "masks" not in batch:
            raise OptinError("adapter mmseg-mask2former needs labelled batches (masks) for a loss; use an "
                             "unlabelled scorer (trajectory) or a labelled segmentation task")
        return F.nll_loss(self.logits(batch), batch["masks"].long(), ignore_index=IGNORE)

    def seq_len(self, batches: list[Batch]) -> float:
        """Records the calibration image size for the cost model (tokens per stage follow from it)."""
        if batches:
            self.input_size = tuple(int(v) for v in self._pixels(batches[0]).shape[-2:])
        return 1.0

    # --- units -----------------------------------------------------------------------------------
    def unit_counts(self) -> dict[str, list[int]]:
        return {"neurons": [int(b.ffn.layers[0][0].out_features) for b in self.blocks]}

    def _site(self, kind: str, layer: int) -> UnitSite:
        if not 0 <= layer < len(self.blocks):
            raise OptinError(f"adapter mmseg-mask2former has {len(self.blocks)} Swin blocks, not a block {layer}")
        return UnitSite(self.blocks[layer].ffn.layers[1])

    def embedding_module(self, z: int) -> nn.Module:
        return self.blocks[z].ffn.layers[1]

    def unit_weights(self) -> dict[str, list[torch.Tensor]]:
        return {"neurons": [torch.cat([b.ffn.layers[0][0].weight, b.ffn.layers[1].weight.t()], 1).detach()
                            for b in self.blocks]}

    # --- cost model ------------------------------------------------------------------------------
    @torch.no_grad()
    def _tokens_and_fixed(self) -> tuple[list[int], float]:
        """Tokens entering each block's FFN and the MACs no unit accounts for, at ``input_size``: one
        probe forward under FlopCounterMode (cached per size; pruning FFN neurons does not change them)."""
        size = tuple(self.input_size)
        if size not in self._probe:
            from torch.utils.flop_counter import FlopCounterMode

            tokens: dict[int, int] = {}
            handles = [b.ffn.layers[1].register_forward_pre_hook(
                lambda m, a, i=i: tokens.__setitem__(i, a[0].numel() // a[0].shape[-1])) for i, b in
                enumerate(self.blocks)]
            with removing(handles):
                with FlopCounterMode(display=False) as counter:
                    self.logits({"pixel_values": torch.zeros(1, 3, *size)})
            per = [tokens[i] for i in range(len(self.blocks))]
            units = sum(2 * n * self._dim(i) * c for i, (n, c) in enumerate(zip(per, self.unit_counts()["neurons"])))
            self._probe[size] = (per, counter.get_total_flops() / 2 - units)
        return self._probe[size]

    def _dim(self, layer: int) -> int:
        return int(self.blocks[layer].ffn.layers[1].out_features)

    def cost_model(self, seq_len: float | None = None) -> CostModel:
        """MACs for one image of ``input_size``: 2 x tokens x width per FFN neuron (its row of the first
        Linear, its column of the second); everything else (patch embedding, window attention, pixel
        decoder, transformer decoder, mask products) is ``fixed`` = FlopCounterMode total / 2 - units."""
        tokens, fixed = self._tokens_and_fixed()
        per = [2.0 * n * self._dim(i) for i, n in enumerate(tokens)]
        return CostModel(per_unit={"neurons": per}, counts=self.unit_counts(), fixed=float(fixed),
                         notes={"height": float(self.input_size[0]), "width": float(self.input_size[1])})

    # --- trajectory ------------------------------------------------------------------------------
    @torch.no_grad()
    def trace(self, batch: Batch) -> Trace:
        """Unmasked forward caching, per block, its input, its FFN input and residual, and the second FFN
        Linear's output (the embedding, (B, N, D)); plus the backbone's outputs per stage."""
        starts, ffn_in, emb, handles = {}, {}, {}, []
        outs: list[torch.Tensor] = []
        for i, b in enumerate(self.blocks):
            handles.append(b.register_forward_pre_hook(lambda m, a, i=i: starts.__setitem__(i, (a[0], tuple(a[1])))))
            handles.append(b.ffn.register_forward_pre_hook(
                lambda m, a, k, i=i: ffn_in.__setitem__(i, (a[0], k.get("identity", a[1] if len(a) > 1 else None))),
                with_kwargs=True))
            handles.append(b.ffn.layers[1].register_forward_hook(lambda m, a, o, i=i: emb.__setitem__(i, o)))
        handles.append(self.backbone.register_forward_hook(lambda m, a, o: outs.extend(o)))
        with removing(handles):
            logits = self.logits(batch)
        n = len(self.blocks)
        return Trace(embeddings=[emb[i] for i in range(n)], logits=logits, valid=None,
                     state={"starts": [starts[i] for i in range(n)], "ffn_in": [ffn_in[i] for i in range(n)],
                            "outs": outs})

    def _backbone_from(self, x: torch.Tensor, hw: tuple[int, int], layer: int, first_block_done: bool,
                       earlier: list[torch.Tensor]) -> list[torch.Tensor]:
        """SwinTransformer.forward from block ``layer`` on (that block already run when ``first_block_done``),
        with the cached outputs of the earlier stages."""
        bb = self.backbone
        s0, j0 = self.stage_of[layer]
        outs = list(earlier)
        for s in range(s0, len(bb.stages)):
            stage = bb.stages[s]
            start = (j0 + int(first_block_done)) if s == s0 else 0
            for blk in stage.blocks[start:]:
                x = blk(x, hw)
            out, out_hw = x, hw
            if stage.downsample:
                x, hw = stage.downsample(x, hw)
            if s in bb.out_indices:
                o = getattr(bb, f"norm{s}")(out)
                outs.append(o.view(-1, *out_hw, bb.num_features[s]).permute(0, 3, 1, 2).contiguous())
        return outs

    @torch.no_grad()
    def run_from(self, trace: Trace, kind: str, layer: int, masks: torch.Tensor, batch: Batch,
                 select: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Exact restart: the masked block's FFN from its cached input and residual, then the rest of the
        backbone, then the decode head, for R = len(masks) replicas at once."""
        reps = masks.shape[0]
        s0 = self.stage_of[layer][0]
        n_earlier = sum(1 for s in self.backbone.out_indices if s < s0)
        earlier = [o.repeat(reps, 1, 1, 1) for o in trace.state["outs"][:n_earlier]]
        with self.restart_hooks(kind, layer, masks, len(self.blocks), select) as collected:
            blk = self.blocks[layer]
            ffn_x, identity = trace.state["ffn_in"][layer]
            hw = trace.state["starts"][layer][1]
            x = blk.ffn(ffn_x.repeat(reps, 1, 1), identity=identity.repeat(reps, 1, 1))
            feats = self._backbone_from(x, hw, layer, True, earlier)
            logits = self._decode(feats, self._pixels(batch).repeat(reps, 1, 1, 1))
        return dict(collected), logits

    # --- physical removal and persistence --------------------------------------------------------
    @torch.no_grad()
    def prune(self, masks: UnitTensors) -> None:
        if set(masks) - {"neurons"}:
            raise OptinError(f"adapter mmseg-mask2former prunes only neurons, got {sorted(masks)}")
        if "neurons" not in masks:
            return
        if len(masks["neurons"]) != len(self.blocks):
            raise OptinError(f"neuron masks need one entry per Swin block ({len(self.blocks)}), "
                             f"got {len(masks['neurons'])}")
        for i, b in enumerate(self.blocks):
            keep = kept(masks["neurons"][i])
            fc1, fc2 = slice_mlp(b.ffn.layers[0][0], b.ffn.layers[1], keep)
            b.ffn.layers[0][0], b.ffn.layers[1] = fc1, fc2
            b.ffn.feedforward_channels = len(keep)
            track(self.kept_index, "neurons", i, keep.tolist())

    def plan(self) -> dict:
        if self.config is None:
            raise OptinError("this mmseg model was built without its config: create the adapter with "
                             "MMSegMask2FormerAdapter.from_config(...) (or pass config=) to save it")
        return {"config": self.config, "unit_counts": self.unit_counts(), "kept_index": self.kept_index,
                "input_size": list(self.input_size), "processor": self.processor}

    @classmethod
    def rebuild(cls, plan: dict, directory: str) -> "MMSegMask2FormerAdapter":
        if "config" not in plan:
            raise OptinError(f"the plan in {directory} has no mmseg config")
        adapter = cls.from_config(plan["config"])
        adapter.processor = plan.get("processor")
        adapter.input_size = tuple(plan.get("input_size") or adapter.input_size)
        return cut_to_plan(adapter, plan, {"neurons": plan["unit_counts"]["neurons"]})


def _set_classes(model_cfg: Any, n: int) -> None:
    """A fresh head for ``n`` classes (Mask2Former's class weights: 1 per class, 0.1 for "no object")."""
    head = model_cfg.decode_head
    head.num_classes = n
    loss_cls = head.get("loss_cls")
    if loss_cls is not None and loss_cls.get("class_weight") is not None:
        loss_cls.class_weight = [1.0] * n + [0.1]


def _load_checkpoint(model: nn.Module, checkpoint: str, skip_mismatched: bool) -> None:
    """Load an mmseg ``.pth`` (``state_dict`` inside); with ``skip_mismatched`` drop head tensors of other shapes."""
    from mmengine.runner.checkpoint import _load_checkpoint as read

    try:
        with _quiet():
            ckpt = read(checkpoint, map_location="cpu")
    except Exception as exc:
        raise OptinError(f"cannot read checkpoint {checkpoint}: {exc}") from exc
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    own = model.state_dict()
    if skip_mismatched:
        state = {k: v for k, v in state.items() if k not in own or own[k].shape == v.shape}
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise OptinError(f"checkpoint {checkpoint} does not fit the config ({bad[0]}: "
                         f"{tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}); pass num_labels for a new head")
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith("backbone.")]
    if missing:
        raise OptinError(f"checkpoint {checkpoint} lacks backbone weights (e.g. {missing[0]}): is it a "
                         "Mask2Former Swin checkpoint for this config?")
