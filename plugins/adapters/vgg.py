"""Adapter for torchvision ``VGG`` models (ImageNet-style ``vgg16_bn`` & co, and the CIFAR-style VGG-16-BN
built by ``cifar_vgg16_bn``): the output channels of every conv layer are units (DESIGN.md 3.1).

A channel is masked after its conv's BatchNorm and ReLU (the ReLU's output: the same as masking the
BatchNorm output for masks >= 0, and exactly what removing the channel does); that map is also the layer's
trajectory embedding. The last conv's consumer is the classifier's first Linear (after pooling and
flatten), which torch-pruning slices along. A pruned model is rebuilt from a layer-by-layer description of
the unpruned ``features``/``avgpool``/``classifier`` (so any VGG-like torchvision ``VGG`` round-trips).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from optin.contracts import UnitSite
from optin.errors import OptinError

from .cnn_common import ConvChannelAdapter, ConvLayer, Op, as_hw, conv_out, feature_ops, folder_config, load_weights

# torchvision's configuration "D" (VGG-16): 13 convs, 5 max-pools
VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _init(model: nn.Module) -> nn.Module:
    """torchvision's VGG initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def assemble_vgg(features: nn.Sequential, avgpool: nn.Module, classifier: nn.Module) -> nn.Module:
    """A torchvision ``VGG`` from its three parts (skips VGG.__init__, which allocates a 4096-wide classifier)."""
    from torchvision.models import VGG

    model = VGG.__new__(VGG)
    nn.Module.__init__(model)
    model.features, model.avgpool, model.classifier = features, avgpool, classifier
    return model


def cifar_vgg16_bn(num_classes: int = 10, in_chans: int = 3, width: float = 1.0, image_size: int = 32) -> nn.Module:
    """CIFAR-style VGG-16-BN: 13 conv3x3+BN+ReLU with 5 max-pools, global pooling, ``Linear(512*width, classes)``.

    Inputs whose side is not a multiple of 32 (Fashion-MNIST's 28) are zero-padded to the next multiple
    inside the model, so that the five pools leave a whole map.
    """
    layers: list[nn.Module] = []
    pad = (-int(image_size)) % 32
    if pad:
        layers.append(nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)))
    c = in_chans
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            out = max(1, int(round(int(v) * width)))
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
    return _init(assemble_vgg(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Linear(c, num_classes)))


# --- describing and rebuilding a VGG layer by layer ---------------------------------------------------
def _describe(m: nn.Module) -> dict:
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or tuple(m.dilation) != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(f"unsupported conv {m}")
        return {"conv": [m.in_channels, m.out_channels], "k": list(m.kernel_size), "s": list(m.stride),
                "p": list(m.padding), "bias": m.bias is not None}
    if isinstance(m, nn.BatchNorm2d):
        return {"bn": m.num_features, "eps": m.eps}
    if isinstance(m, nn.ReLU):
        return {"relu": True}
    if isinstance(m, nn.MaxPool2d):
        if m.dilation not in (1, (1, 1)):
            raise ValueError(f"unsupported pooling {m}")
        return {"maxpool": [m.kernel_size, m.stride, m.padding], "ceil": bool(m.ceil_mode)}
    if isinstance(m, nn.ZeroPad2d):
        return {"pad": list(m.padding)}
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return {"adaptive": list(as_hw(m.output_size))}
    if isinstance(m, nn.Identity):
        return {"identity": True}
    if isinstance(m, nn.Linear):
        return {"linear": [m.in_features, m.out_features], "bias": m.bias is not None}
    if isinstance(m, nn.Dropout):
        return {"dropout": m.p}
    raise ValueError(f"unsupported module {type(m).__name__}")


def _module(d: dict) -> nn.Module:
    if "conv" in d:
        return nn.Conv2d(*d["conv"], tuple(d["k"]), tuple(d["s"]), tuple(d["p"]), bias=d["bias"])
    if "bn" in d:
        return nn.BatchNorm2d(d["bn"], eps=d["eps"])
    if "relu" in d:
        return nn.ReLU(inplace=True)
    if "maxpool" in d:
        k, s, p = d["maxpool"]
        return nn.MaxPool2d(k, s, p, ceil_mode=d["ceil"])
    if "pad" in d:
        return nn.ZeroPad2d(tuple(d["pad"]))
    if "adaptive" in d:
        return nn.AdaptiveAvgPool2d(tuple(d["adaptive"]))
    if "identity" in d:
        return nn.Identity()
    if "linear" in d:
        return nn.Linear(*d["linear"], bias=d["bias"])
    if "dropout" in d:
        return nn.Dropout(d["dropout"])
    raise ValueError(f"unknown layer description {d}")


def vgg_spec(model: nn.Module) -> dict:
    """Layer-by-layer description of a torchvision ``VGG`` (raises ValueError for other layouts)."""
    from torchvision.models import VGG

    if not isinstance(model, VGG) or not isinstance(getattr(model, "features", None), nn.Sequential):
        raise ValueError(f"{type(model).__name__} is not a torchvision VGG")
    features = [_describe(m) for m in model.features]
    if not any("conv" in f for f in features):
        raise ValueError("VGG without convolutions")
    clf = model.classifier
    sequential = isinstance(clf, nn.Sequential)
    classifier = [_describe(m) for m in (clf if sequential else [clf])]
    if not classifier or "linear" not in classifier[0]:
        raise ValueError("the classifier must start with a Linear")
    return {"features": features, "avgpool": _describe(model.avgpool), "classifier": classifier,
            "sequential_classifier": sequential}


class VggAdapter(ConvChannelAdapter):
    """torchvision VGG (ImageNet- or CIFAR-style): output channels of every conv layer."""

    name = "vgg"
    sources = "optin CNN folders, config.json architecture vgg or cifar_vgg16_bn"

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        try:
            vgg_spec(model)
        except ValueError:
            return False
        return True

    @classmethod
    def claims(cls, source: str) -> bool:
        return folder_config(source).get("architecture") in ("vgg", "cifar_vgg16_bn")

    @classmethod
    def load(cls, source: str, num_labels: int | None = None) -> "VggAdapter":
        config = folder_config(source)
        if config.get("architecture") == "cifar_vgg16_bn":
            model = cifar_vgg16_bn(**config["args"])
        else:
            model = cls.from_spec(config["spec"])
        model = load_weights(model, Path(source))
        last = model.classifier[-1] if isinstance(model.classifier, nn.Sequential) else model.classifier
        if num_labels and isinstance(last, nn.Linear) and last.out_features != num_labels:
            new = nn.Linear(last.in_features, num_labels)  # a fresh head for fine-tuning
            if isinstance(model.classifier, nn.Sequential):
                model.classifier[-1] = new
            else:
                model.classifier = new
        return cls(model, {"mean": config.get("mean"), "std": config.get("std")}, config.get("image_size"))

    def _find_layers(self) -> list[ConvLayer]:
        feats = list(self.model.features)
        layers = []
        for i, m in enumerate(feats):
            if not isinstance(m, nn.Conv2d):
                continue
            last = i  # the map carrying the channels: after the conv's BatchNorm and ReLU, if any
            while last + 1 < len(feats) and isinstance(feats[last + 1], (nn.BatchNorm2d, nn.ReLU)):
                last += 1
            layers.append(ConvLayer(conv=m, mask_at=feats[last], post=True, embed=feats[last], start=i))
        return layers

    def _default_hw(self) -> tuple[int, int]:
        """CIFAR-style (one Linear on the last conv's channels): 32px less any padding inside the model;
        else ImageNet's 224."""
        clf = self.model.classifier
        if isinstance(clf, nn.Linear) and clf.in_features == self.layers[-1].conv.out_channels:
            pads = [m.padding for m in self.model.features if isinstance(m, nn.ZeroPad2d)]
            return 32 - sum(p[2] + p[3] for p in pads), 32 - sum(p[0] + p[1] for p in pads)
        return tuple(self.default_image_size)

    def stages(self) -> list[nn.Module]:
        return list(self.model.features)

    def unit_reader(self, kind: str, layer: int) -> UnitSite | None:
        """The next convolution reads a layer's channels; after the last one, the classifier's first Linear
        (each channel owns its pooled positions: ``in_features / channels`` consecutive inputs)."""
        self.check_kind(kind)
        if layer + 1 < len(self.layers):
            return UnitSite(self.layers[layer + 1].conv, 1, dim=1)
        first = next(m for m in self.model.classifier.modules() if isinstance(m, nn.Linear)) \
            if isinstance(self.model.classifier, nn.Module) else None
        channels = self.layers[layer].conv.out_channels
        if first is None or first.in_features % channels:
            return None
        return UnitSite(first, first.in_features // channels)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.classifier(torch.flatten(self.model.avgpool(x), 1))

    def _ops(self, hw: tuple[int, int]) -> list[Op]:
        roles = {id(l.conv): (i - 1 if i else None, i) for i, l in enumerate(self.layers)}
        ops, (h, w) = feature_ops(self.model.features, hw, roles)
        h, w = conv_hw = conv_out((h, w), self.model.avgpool)
        linears = [m for m in self.model.classifier.modules() if isinstance(m, nn.Linear)]
        last = len(self.layers) - 1
        channels = self.layers[last].conv.out_channels
        first = linears[0]
        if first.in_features != channels * h * w:
            raise OptinError(f"the classifier expects {first.in_features} features but the last conv gives "
                             f"{channels} x {conv_hw} at input size {hw}: give the adapter the right image_size")
        ops.append(Op(h * w, channels, first.out_features, in_unit=last))
        ops += [Op(1, m.in_features, m.out_features) for m in linears[1:]]
        return ops

    def spec(self) -> dict:
        return vgg_spec(self.model)

    @classmethod
    def from_spec(cls, spec: dict) -> nn.Module:
        clf = [_module(d) for d in spec["classifier"]]
        return assemble_vgg(nn.Sequential(*[_module(d) for d in spec["features"]]), _module(spec["avgpool"]),
                         nn.Sequential(*clf) if spec["sequential_classifier"] else clf[0]).eval()


