"""Tiny models of every built-in adapter with a batch to run them on, shared by the tests.

``tiny(name)`` gives the adapter of that entry-point name around a seeded model of a few layers (eager or
unfused attention, so that ``FlopCounterMode`` sees every matmul), a batch of a few examples, and how to
measure its MACs for ``optin.testing.check_adapter``. The builders are also used one by one by the
per-adapter test files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_batch, make_tiny_bert
from optin.contracts import Adapter, Batch
from optin.testing import flop_macs

ADAPTERS = ["bert", "distilbert", "deberta-v2", "vit", "hf-vit", "swin", "hf-swin", "mask2former", "mmseg-mask2former", "vgg", "mobilenetv2"]


def images(n: int = 4, channels: int = 3, size: int = 32, seed: int = 1, classes: int = 5) -> Batch:
    """``n`` random images with labels."""
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, channels, size, size, generator=g),
            "labels": torch.randint(0, classes, (n,), generator=g)}


# --- BERT ---------------------------------------------------------------------------------------------

def counted_encoder_macs(model: nn.Module, seq_len: int) -> float:
    """FlopCounterMode MACs of a BERT encoder on one sequence of ``seq_len`` tokens (what ``bert``'s cost
    model counts: no embeddings, pooler or classifier)."""
    ids = torch.randint(5, 100, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = model.bert.embeddings(input_ids=ids)
        with FlopCounterMode(display=False) as fc:
            model.bert.encoder(emb)
    return fc.get_total_flops() / 2


# --- other HF encoders: DistilBERT, DeBERTa-v2, ELECTRA, XLM-RoBERTa -----------------------------------

ENCODERS = ["distilbert", "deberta-v2", "electra", "xlm-roberta"]
# DeBERTa-v2 with relative positions in buckets and both position terms (the v3 setup); ``deberta_options``
# change it (share_att_key=False: its own position projections; conv_kernel_size=3: the v2-xlarge convolution).
DEBERTA = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=32,
               share_att_key=True, norm_rel_ebd="layer_norm", type_vocab_size=2)


def make_encoder(family: str, seed: int = 0, num_labels: int = 3, **deberta_options):
    """A seeded 3-layer, 4-head, hidden-32, FFN-64 classifier of an HF encoder family (``ENCODERS``) over the
    tiny tokenizer's 100-token vocabulary, eager attention, weights drawn large enough that every unit matters."""
    import transformers as tf

    common = dict(vocab_size=100, num_labels=num_labels, max_position_embeddings=64)
    size = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    cfg = {"distilbert": lambda: tf.DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=64, **common),
           "deberta-v2": lambda: tf.DebertaV2Config(**size, **{**DEBERTA, **deberta_options}, **common),
           "electra": lambda: tf.ElectraConfig(embedding_size=16, **size, **common),  # projected embeddings
           "xlm-roberta": lambda: tf.XLMRobertaConfig(**size, pad_token_id=0, type_vocab_size=2, **common)}[family]()
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    model.config.architectures = [type(model).__name__]
    return model.eval()


def encoder_adapter(family: str, **kw):
    """``make_encoder(family)`` in its adapter (ELECTRA and XLM-RoBERTa: ``bert``)."""
    from optin_plugins.adapters.bert import BertAdapter
    from optin_plugins.adapters.deberta import DebertaV2Adapter
    from optin_plugins.adapters.distilbert import DistilBertAdapter

    cls = {"distilbert": DistilBertAdapter, "deberta-v2": DebertaV2Adapter}.get(family, BertAdapter)
    return cls(make_encoder(family, **kw))


def counted_macs_of_encoder(ad: Adapter, batch: Batch) -> float:
    """FlopCounterMode MACs of an encoder adapter's layers alone (what its cost model counts) on the first
    example of ``batch``: the encoder's input is captured in a full forward, then the encoder is counted."""
    one = {k: v[:1] for k, v in batch.items() if k != "labels"}
    seen: dict = {}
    h = ad.encoder.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        ad.logits(one)
        h.remove()
        with FlopCounterMode(display=False) as fc:
            ad.encoder(*seen["args"], **seen["kwargs"])
    return fc.get_total_flops() / 2


# --- timm ViT -----------------------------------------------------------------------------------------

VIT_ARGS = dict(img_size=28, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2)


def make_vit(distilled: bool = False, seed: int = 0, fused: bool | None = None):
    """A 4-block timm ViT (or DeiT with a distillation token) on 28 px greyscale images, 5 classes; the plain
    one carries its timm config (``processor``) so that a pruned export rebuilds. ``fused`` sets timm's
    fused attention (None: timm's default)."""
    from timm.models.vision_transformer import VisionTransformer

    from optin_plugins.adapters.vit import VitAdapter

    torch.manual_seed(seed)
    if distilled:
        from timm.models.deit import VisionTransformerDistilled

        model, processor = VisionTransformerDistilled(**VIT_ARGS), None
    else:
        model = VisionTransformer(**VIT_ARGS)
        processor = {"timm_class": "VisionTransformer", "model_args": dict(VIT_ARGS)}
    for b in model.blocks:
        b.attn.fused_attn = b.attn.fused_attn if fused is None else fused
    return VitAdapter(model.eval(), processor)


# --- HF ViT / DeiT ------------------------------------------------------------------------------------

HF_VIT_ARGS = dict(image_size=28, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=3,
                   num_attention_heads=4, intermediate_size=64, num_labels=5)


def make_hf_vit(kind: str = "vit", num_labels: int = 5):
    """A 3-layer HF ViT (``kind="vit"``), DeiT with a teacher head (``"deit"``) or DINOv2 classifier (``"dinov2"``:
    layer scales drawn away from 1, MLP ratio 2), eager attention."""
    import transformers as tf

    from optin_plugins.adapters.hf_vit import HFVitAdapter

    torch.manual_seed(0)
    args = {**HF_VIT_ARGS, "num_labels": num_labels}
    if kind == "dinov2":
        args.pop("intermediate_size")
        cfg, model_cls = tf.Dinov2Config(**args, mlp_ratio=2), tf.Dinov2ForImageClassification
    else:
        config_cls, model_cls = (tf.ViTConfig, tf.ViTForImageClassification) if kind == "vit" else \
            (tf.DeiTConfig, tf.DeiTForImageClassificationWithTeacher)
        cfg = config_cls(**args)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    if kind == "dinov2":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lambda1"):
                    p.uniform_(0.5, 1.5)
    model.config.architectures = [type(model).__name__]
    return HFVitAdapter(model)


# --- Swin (timm and HF) -------------------------------------------------------------------------------

# 32 px: 8x8 then 4x4 maps, windows fit exactly; 48 px: the 6x6 stage is padded to 8x8 for its windows.
SWIN_DEPTHS = (2, 2)


def timm_swin_args(img: int) -> dict:
    return dict(img_size=img, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depths=SWIN_DEPTHS,
                num_heads=(2, 4), window_size=4, mlp_ratio=2.0, drop_path_rate=0.0)


def make_swin(kind: str = "timm", img: int = 32):
    """A 2-stage Swin classifier (4 blocks, 5 classes): ``"timm"`` (unfused attention, with its timm config)
    or ``"hf"`` (eager attention, relative position biases drawn large enough to matter)."""
    torch.manual_seed(0)
    if kind == "timm":
        from timm.models.swin_transformer import SwinTransformer

        from optin_plugins.adapters.swin import SwinAdapter

        args = timm_swin_args(img)
        model = SwinTransformer(**args).eval()
        for m in model.modules():  # unfused attention, so that FlopCounterMode sees the matmuls on CPU
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        return SwinAdapter(model, {"timm_class": "SwinTransformer", "model_args": args})
    from transformers import SwinConfig, SwinForImageClassification

    from optin_plugins.adapters.hf_swin import HFSwinAdapter

    cfg = SwinConfig(image_size=img, patch_size=4, num_channels=3, embed_dim=32, depths=list(SWIN_DEPTHS),
                     num_heads=[2, 4], window_size=4, mlp_ratio=2.0, num_labels=5)
    cfg._attn_implementation = "eager"
    model = SwinForImageClassification(cfg).eval()
    with torch.no_grad():  # HF initialises the relative position bias to 0: make its per-head slicing matter
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 0.5)
    return HFSwinAdapter(model)


# --- HF Mask2Former -----------------------------------------------------------------------------------

M2F_SIZE = 32
M2F_SWIN = dict(image_size=M2F_SIZE, patch_size=4, num_channels=1, embed_dim=16, depths=[2, 1, 2], num_heads=[1, 2, 2],
                window_size=2, mlp_ratio=4.0, out_features=["stage1", "stage2", "stage3"])
M2F = dict(feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32, encoder_layers=1,
           decoder_layers=3, num_attention_heads=2, dim_feedforward=64, num_queries=8, num_labels=5,
           feature_strides=[4, 8, 16], train_num_points=256)


def make_mask2former(decoder_neurons: bool = False, seed: int = 0):
    """An HF Mask2Former with a 5-block Swin backbone on 32 px greyscale images, 5 classes."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    from optin_plugins.adapters.mask2former import Mask2FormerAdapter

    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=SwinConfig(**M2F_SWIN), **M2F))
    return Mask2FormerAdapter(model.eval(), decoder_neurons=decoder_neurons)


def shapes(n: int = 4, seed: int = 1) -> list[dict]:
    """Stand-in segmentation examples: random rectangles of classes 1-4 on background 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.zeros(M2F_SIZE, M2F_SIZE, dtype=torch.long)
        for c in torch.randint(1, 5, (2,), generator=g).tolist():
            t, l = torch.randint(0, M2F_SIZE - 8, (2,), generator=g).tolist()
            mask[t:t + 8 + c, l:l + 10] = c
        image = (mask.float() / 4 + 0.1 * torch.randn(M2F_SIZE, M2F_SIZE, generator=g)).unsqueeze(0)
        out.append({"image": image, "mask": mask})
    return out


def mask2former_macs(ad: Adapter, batch: Batch) -> float:
    """FlopCounterMode MACs of one image with the backbone's attention switched to eager for the count."""
    cfg = ad.backbone.config
    saved = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        return flop_macs(ad, batch)
    finally:
        cfg._attn_implementation = saved


# --- mmseg Mask2Former --------------------------------------------------------------------------------

MMSEG_H, MMSEG_W, MMSEG_CLASSES = 64, 128, 5
# Swin-T's layout (4 stages, window attention, shifted windows) at a fraction of its width, and a small head.
MMSEG_SMALL = {
    "model.backbone.embed_dims": 16, "model.backbone.depths": [2, 2, 2, 2], "model.backbone.num_heads": [1, 2, 2, 4],
    "model.backbone.window_size": 4, "model.backbone.drop_path_rate": 0.0,
    "model.decode_head.in_channels": [16, 32, 64, 128], "model.decode_head.feat_channels": 32,
    "model.decode_head.out_channels": 32, "model.decode_head.num_queries": 8,
    "model.decode_head.num_classes": MMSEG_CLASSES,
    "model.decode_head.loss_cls.class_weight": [1.0] * MMSEG_CLASSES + [0.1],
    "model.decode_head.pixel_decoder.encoder.num_layers": 1,
    "model.decode_head.pixel_decoder.encoder.layer_cfg.self_attn_cfg.embed_dims": 32,
    "model.decode_head.pixel_decoder.encoder.layer_cfg.self_attn_cfg.num_heads": 4,
    "model.decode_head.pixel_decoder.encoder.layer_cfg.ffn_cfg.embed_dims": 32,
    "model.decode_head.pixel_decoder.encoder.layer_cfg.ffn_cfg.feedforward_channels": 64,
    "model.decode_head.pixel_decoder.positional_encoding.num_feats": 16,
    "model.decode_head.pixel_decoder.norm_cfg.num_groups": 8,
    "model.decode_head.positional_encoding.num_feats": 16,
    "model.decode_head.transformer_decoder.num_layers": 2,
    **{f"model.decode_head.transformer_decoder.layer_cfg.{a}.{k}": v
       for a in ("self_attn_cfg", "cross_attn_cfg") for k, v in (("embed_dims", 32), ("num_heads", 4))},
    "model.decode_head.transformer_decoder.layer_cfg.ffn_cfg.embed_dims": 32,
    "model.decode_head.transformer_decoder.layer_cfg.ffn_cfg.feedforward_channels": 64,
}


def mmseg_unavailable() -> str | None:
    """Why the mmseg adapter cannot run here (None when it can)."""
    from optin import registry

    info = [p for p in registry.plugins("adapter") if p.name == "mmseg-mask2former"]
    return info[0].error if info else "the mmseg-mask2former adapter is not installed"


def make_mmseg():
    """mmseg's Mask2Former Swin config reduced by ``MMSEG_SMALL`` (needs mmcv, mmseg and mmdet)."""
    from optin_plugins.adapters.mmseg_mask2former import DEFAULT_CONFIG, MMSegMask2FormerAdapter

    return MMSegMask2FormerAdapter.from_config(DEFAULT_CONFIG, overrides=MMSEG_SMALL, seed=0)


def mmseg_batch() -> Batch:
    """Two random RGB images of 64x128 with label maps (a band of ignored pixels at the top)."""
    g = torch.Generator().manual_seed(1)
    masks = torch.randint(0, MMSEG_CLASSES, (2, MMSEG_H, MMSEG_W), generator=g)
    masks[:, :4] = 255
    return {"pixel_values": torch.randn(2, 3, MMSEG_H, MMSEG_W, generator=g), "masks": masks}


# --- CNNs ---------------------------------------------------------------------------------------------

def randomise_cnn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics and a classifier with visible logits (masking must matter)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.2 * torch.randn(n, generator=g)
            m.running_mean = 0.1 * torch.randn(n, generator=g)
            m.running_var = 0.5 + torch.rand(n, generator=g)
        elif isinstance(m, nn.Linear):
            m.weight.data = torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5
    return model.eval()


CNN_KINDS = ["vgg-cifar", "vgg-fmnist", "vgg-imagenet", "mobilenet"]


def make_cnn(kind: str) -> tuple[Adapter, Batch]:
    """(adapter, batch of 4 labelled images) for a tiny model of each supported CNN layout."""
    import torchvision

    from optin_plugins.adapters.mobilenet import MobileNetV2Adapter
    from optin_plugins.adapters.vgg import VggAdapter, assemble_vgg, cifar_vgg16_bn

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "vgg-cifar":  # 13 convs of 8..64 channels, 32px
        model, x = cifar_vgg16_bn(num_classes=5, in_chans=3, width=0.125), torch.randn(4, 3, 32, 32, generator=g)
    elif kind == "vgg-fmnist":  # 1 channel, 28px padded to 32 inside the model
        model = cifar_vgg16_bn(num_classes=10, in_chans=1, width=0.125, image_size=28)
        x = torch.randn(4, 1, 28, 28, generator=g)
    elif kind == "vgg-imagenet":  # torchvision's layout: 7x7 pooling, 3-layer classifier with dropout
        feats = torchvision.models.vgg.make_layers([8, "M", 16, "M", 16, "M"], batch_norm=True)
        clf = nn.Sequential(nn.Linear(16 * 49, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32), nn.ReLU(True),
                            nn.Dropout(), nn.Linear(32, 4))
        model, x = assemble_vgg(feats, nn.AdaptiveAvgPool2d((7, 7)), clf), torch.randn(4, 3, 40, 40, generator=g)
    else:  # MobileNetV2 0.35, 64px
        model = torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=6)
        x = torch.randn(4, 3, 64, 64, generator=g)
    model = randomise_cnn(model, 2)
    cls = MobileNetV2Adapter if kind == "mobilenet" else VggAdapter
    size = None if kind.startswith("vgg-") and kind != "vgg-imagenet" else x.shape[-1]  # CIFAR-style: its own default
    return cls(model, image_size=size), {"pixel_values": x, "labels": torch.randint(0, 4, (4,), generator=g)}


# --- one of each ------------------------------------------------------------------------------------

@dataclass
class Tiny:
    """A tiny model of one adapter: the adapter, a batch, what ``check_adapter`` needs to count its MACs,
    and a budget its units can reach."""

    adapter: Adapter
    batch: Batch
    count_macs: Callable[[Adapter], float] | None = None
    seq_len: float | None = None
    budget: float = 0.6
    options: dict[str, Any] | None = None  # trajectory options that keep it fast on this model


def tiny(name: str) -> Tiny:
    """The tiny model of the adapter registered as ``name`` (one of ``ADAPTERS``)."""
    fast = {"rows": 16, "neuron_group": 16}
    if name == "bert":
        from optin_plugins.adapters.bert import BertAdapter

        return Tiny(BertAdapter(make_tiny_bert()), make_batch(), lambda ad: counted_encoder_macs(ad.model, 10), 10.0,
                    options=fast)
    if name in ENCODERS:
        batch = make_batch()
        return Tiny(encoder_adapter(name), batch, lambda ad: counted_macs_of_encoder(ad, batch), 10.0, options=fast)
    if name == "vit":
        batch = images(channels=1, size=28)
        return Tiny(make_vit(fused=False), batch, lambda ad: flop_macs(ad, batch), options=fast)
    if name == "hf-vit":
        batch = images(channels=1, size=28)
        return Tiny(make_hf_vit("vit"), batch, lambda ad: flop_macs(ad, batch), options=fast)
    if name in ("swin", "hf-swin"):
        batch = images()
        return Tiny(make_swin("timm" if name == "swin" else "hf"), batch, lambda ad: flop_macs(ad, batch),
                    options=fast)
    if name == "mask2former":
        ad = make_mask2former(decoder_neurons=True)
        batch = ad.collate(shapes())
        return Tiny(ad, batch, lambda a: mask2former_macs(a, batch), budget=0.9, options=fast)
    if name == "mmseg-mask2former":
        batch = mmseg_batch()
        return Tiny(make_mmseg(), batch, lambda ad: flop_macs(ad, batch), budget=0.9,
                    options={"rows": 16, "neuron_group": 64})
    if name in ("vgg", "mobilenetv2"):
        ad, batch = make_cnn("vgg-cifar" if name == "vgg" else "mobilenet")
        return Tiny(ad, batch, lambda a: flop_macs(a, batch), options={"neuron_group": 8})
    raise ValueError(f"no tiny model for adapter {name!r}; known: {', '.join(ADAPTERS)}")
