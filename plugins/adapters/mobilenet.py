"""Adapter for torchvision ``MobileNetV2``: the expanded hidden channels of each inverted residual block.

Each InvertedResidual with an expansion layer (1x1 expand conv -> 3x3 depthwise conv -> 1x1 projection) is
one layer; its hidden channels are the units. A channel is masked at the input of the projection (after the
depthwise conv's BatchNorm and ReLU6), which equals removing it: torch-pruning removes the expand conv's
output channel together with its BatchNorms, the depthwise filter and the projection's input. Block outputs
(the residual stream) are not units; a block's output is its trajectory embedding. Rebuilt from
``num_classes``, ``width_mult`` (found from the channel counts) and ``dropout``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from optin.errors import OptinError

from .cnn_common import ConvChannelAdapter, ConvLayer, Op, feature_ops, folder_config, load_weights

# torchvision's default inverted residual setting: expansion t, channels c, repeats n, stride s
SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def _is_mobilenet_v2(model: nn.Module) -> bool:
    from torchvision.models import MobileNetV2
    from torchvision.models.mobilenetv2 import InvertedResidual

    return isinstance(model, MobileNetV2) and any(isinstance(m, InvertedResidual) for m in model.features)


def _channels(width_mult: float, round_nearest: int = 8) -> list[int]:
    """Output channels of features[0], of every block and of the last 1x1 conv, as torchvision builds them."""
    from torchvision.models._utils import _make_divisible

    out = [_make_divisible(32 * width_mult, round_nearest)]
    for _, c, n, _ in SETTING:
        out += [_make_divisible(c * width_mult, round_nearest)] * n
    return out + [_make_divisible(1280 * max(1.0, width_mult), round_nearest)]


def mobilenet_spec(model: nn.Module) -> dict:
    """``num_classes``, ``width_mult`` and ``dropout`` that rebuild this (unpruned) torchvision MobileNetV2
    with the default block setting; raises OptinError when no width multiplier reproduces it."""
    feats = list(model.features)
    got = [feats[0][0].out_channels] + [b.out_channels for b in feats[1:-1]] + [feats[-1][0].out_channels]
    for k in range(5, 401):  # width multipliers 0.05 .. 4.00
        w = k / 100
        if _channels(w) == got:
            dropout = next((m.p for m in model.classifier if isinstance(m, nn.Dropout)), 0.2)
            linear = next(m for m in model.classifier if isinstance(m, nn.Linear))
            return {"num_classes": linear.out_features, "width_mult": w, "dropout": dropout}
    raise OptinError(f"cannot describe this MobileNetV2 (channels {got}) as torchvision's mobilenet_v2 with a "
                     "width multiplier; only that family can be exported")


class MobileNetV2Adapter(ConvChannelAdapter):
    """torchvision MobileNetV2: the expanded hidden channels of each inverted residual block."""

    name = "mobilenetv2"
    sources = "optin CNN folders, config.json architecture mobilenet_v2"

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return _is_mobilenet_v2(model)

    @classmethod
    def claims(cls, source: str) -> bool:
        return folder_config(source).get("architecture") == "mobilenet_v2"

    @classmethod
    def load(cls, source: str, num_labels: int | None = None) -> "MobileNetV2Adapter":
        config = folder_config(source)
        model = load_weights(cls.from_spec(config["args"]), Path(source))
        last = model.classifier[-1]
        if num_labels and last.out_features != num_labels:  # a fresh head for fine-tuning
            model.classifier[-1] = nn.Linear(last.in_features, num_labels)
        return cls(model, {"mean": config.get("mean"), "std": config.get("std")}, config.get("image_size"))

    def _find_layers(self) -> list[ConvLayer]:
        layers = []
        for i, block in enumerate(self.model.features):
            convs = getattr(block, "conv", None)
            if not hasattr(block, "use_res_connect") or not isinstance(convs, nn.Sequential) or len(convs) != 4:
                continue  # the stem, the last 1x1 conv and blocks without expansion
            expand, project = convs[0][0], convs[2]
            layers.append(ConvLayer(conv=expand, mask_at=project, post=False, embed=block, start=i))
        return layers

    def stages(self) -> list[nn.Module]:
        return list(self.model.features)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.model.classifier(torch.flatten(x, 1))

    def _ops(self, hw: tuple[int, int]) -> list[Op]:
        roles: dict[int, tuple[int | None, int | None]] = {}
        for u, layer in enumerate(self.layers):
            convs = layer.embed.conv
            roles[id(convs[0][0])] = (None, u)  # expand: output channels are the units
            roles[id(convs[1][0])] = (u, u)  # depthwise
            roles[id(convs[2])] = (u, None)  # projection: input channels are the units
        ops, _ = feature_ops(self.model.features, hw, roles)
        ops += [Op(1, m.in_features, m.out_features) for m in self.model.classifier if isinstance(m, nn.Linear)]
        return ops

    def unit_weights(self) -> dict[str, list[torch.Tensor]]:
        """Per hidden channel, every weight it owns: its expand filter, depthwise filter and projection column."""
        out = []
        for layer in self.layers:
            convs = layer.embed.conv
            n = convs[0][0].out_channels
            out.append(torch.cat([convs[0][0].weight.reshape(n, -1), convs[1][0].weight.reshape(n, -1),
                                  convs[2].weight.reshape(convs[2].out_channels, n).t()], 1).detach())
        return {"channels": out}

    def spec(self) -> dict:
        try:
            return mobilenet_spec(self.model)
        except OptinError as exc:
            return {"error": str(exc)}

    def plan(self) -> dict:
        if "error" in self.base_spec:
            raise OptinError(self.base_spec["error"])
        return super().plan()

    @classmethod
    def from_spec(cls, spec: dict) -> nn.Module:
        from torchvision.models import mobilenet_v2

        return mobilenet_v2(num_classes=int(spec["num_classes"]), width_mult=float(spec["width_mult"]),
                            dropout=float(spec["dropout"])).eval()
