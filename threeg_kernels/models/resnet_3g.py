"""ResNet-3G (3G-Net, Wang et al., CVPR 2019): the architecture is described in docs/models.md.

    image -> torchvision-style ResNet (layer4 at stride 1) -> 1x1 conv to 256 channels, BN, ReLU (= y)
          -> AtMp1(y, y) -> AtMp2(., y) -> AtMp3(., y) -> 3G pooling (K = 5) -> fc(32896 -> classes)

The pooling (cov_pool) is defined in docs/math.md.

Parameter names are those of the released checkpoints (tests/data/state_dict_keys.json), so their
state_dicts load without renaming (after stripping DataParallel's 'module.', see checkpoint.py).

The fused head: AtMp3 ends with `a * m` for an attention map m (B, 1, H, W), and the pooling head's
first step multiplies its input by its spatial weights anyway. With fused_head=True the map is handed to
`cov_pool` as `weight`, so the (B, 256, H, W) product and its gradient are never materialised. AtMp and
that fused path (reweight_and_pool) live in threeg_kernels/head.py, shared with CovPoolHead.

Every constructor is registered with @register_model under its function name; create_model(name)
builds one by name and list_models() lists them.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable, Optional, Sequence, Type, Union

import torch
from torch import nn

from .. import dispatch
from .._validate import check_options
from ..api import cov_pool
from ..head import AtMp, conv1x1, init_weights, reweight_and_pool

REDUCED_CHANNELS = 256
POOLED_FEATURES = REDUCED_CHANNELS * (REDUCED_CHANNELS + 1) // 2  # 32896


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride, as torchvision does) -> 1x1 x4, with a residual (ResNet-23/50/101/152)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


def _check_options(num_classes, fused_head, pool_backend, iters) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1; got {num_classes!r}")
    if not isinstance(fused_head, bool):
        raise TypeError(f"fused_head must be a bool; got {fused_head!r} ({type(fused_head).__name__})")
    dispatch.check_backend(pool_backend, "pool_backend")
    check_options(iters, 1e-7, "3g")


class ResNet3G(nn.Module):
    """A ResNet backbone with layer4 at stride 1 and the 3G head (docs/models.md, "Architecture").

    forward(x) -> logits (B, num_classes); forward_features(x) -> the pooled vector (B, 32896);
    forward_crops(x) for x (B, ncrops, 3, H, W) -> crop-averaged logits (B, num_classes).

    fused_head=True passes AtMp3's attention map to cov_pool as `weight`; fused_head=False forms
    a * map first and pools it without weight (the plain path of the paper). Both pool on the backend
    `pool_backend` names ('auto' resolved by cov_pool for the input's device), and give the same outputs
    and gradients to float rounding (tests/test_models.py).
    The pooled vector is in the '3g' triangle order, the order the released fc layers were trained on.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        fused_head: bool = True,
        pool_backend: str = "auto",
        iters: int = 5,
    ):
        super().__init__()
        _check_options(num_classes, fused_head, pool_backend, iters)
        self.fused_head, self.pool_backend, self.iters = fused_head, pool_backend, iters

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        e = block.expansion
        self.layer1 = _make_layer(block, 64, 64, layers[0], stride=1)
        self.layer2 = _make_layer(block, 64 * e, 128, layers[1], stride=2)
        self.layer3 = _make_layer(block, 128 * e, 256, layers[2], stride=2)
        # Stride 1: a 14 x 14 map at 224 px, N = 196 samples for the covariance.
        self.layer4 = _make_layer(block, 256 * e, 512, layers[3], stride=1)

        self.layer_reduce = conv1x1(512 * e, REDUCED_CHANNELS)
        self.layer_reduce_bn = nn.BatchNorm2d(REDUCED_CHANNELS)
        self.layer_reduce_relu = nn.ReLU(inplace=True)
        self.AtMp1 = AtMp(REDUCED_CHANNELS)
        self.AtMp2 = AtMp(REDUCED_CHANNELS)
        self.AtMp3 = AtMp(REDUCED_CHANNELS)
        self.fc = nn.Linear(POOLED_FEATURES, num_classes)

        init_weights(self)  # fc keeps nn.Linear's default init (it is the only layer with a bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the 3G-pooled vector (B, 32896), '3g' triangle order."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        y = self.layer_reduce_relu(self.layer_reduce_bn(self.layer_reduce(x)))
        pool = functools.partial(cov_pool, iters=self.iters, backend=self.pool_backend)
        # The fused path of CovPoolHead too (threeg_kernels/head.py).
        return reweight_and_pool(y, y, (self.AtMp1, self.AtMp2, self.AtMp3), pool, fused=self.fused_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

    def forward_crops(self, x: torch.Tensor) -> torch.Tensor:
        """Crops (B, ncrops, 3, H, W), e.g. from TenCrop + stack -> logits averaged over crops (B, classes)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            got = f"{x.dim()}-d shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, ncrops, 3, H, W); got {got}")
        return average_crops(self(x.flatten(0, 1)), x.shape[1])

    def extra_repr(self) -> str:
        return f"fused_head={self.fused_head}, pool_backend={self.pool_backend!r}, iters={self.iters}"


def _make_layer(block: Block, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            conv1x1(inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def average_crops(logits: torch.Tensor, ncrops: int) -> torch.Tensor:
    """(B * ncrops, K) logits of crops stored sample by sample (x.view(-1, 3, H, W) of a
    (B, ncrops, 3, H, W) batch) -> (B, K), the mean over each sample's crops (10-crop evaluation)."""
    if isinstance(ncrops, bool) or not isinstance(ncrops, numbers.Integral) or ncrops < 1:
        raise ValueError(f"ncrops must be an int >= 1; got {ncrops!r}")
    if logits.dim() != 2 or logits.shape[0] % ncrops:
        raise ValueError(
            f"logits must have shape (B * ncrops, K) with ncrops={ncrops}; got shape {tuple(logits.shape)}"
        )
    return logits.view(-1, ncrops, logits.shape[1]).mean(dim=1)


_MODELS: dict[str, Callable[..., ResNet3G]] = {}
_OPTIONS = ("fused_head", "pool_backend", "iters")


def register_model(fn: Callable[..., ResNet3G]) -> Callable[..., ResNet3G]:
    """Decorator: makes the model constructor `fn` known to create_model and list_models by its name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"a model named {name!r} is already registered ({_MODELS[name].__module__})")
    _MODELS[name] = fn
    return fn


def _build(name: str, block: Block, layers: Sequence[int], num_classes: int, options: dict) -> ResNet3G:
    unknown = [k for k in options if k not in _OPTIONS]
    if unknown:
        raise TypeError(
            f"{name}() got an unexpected keyword argument {unknown[0]!r}; it takes num_classes, {', '.join(_OPTIONS)}"
        )
    return ResNet3G(block, layers, num_classes=num_classes, **options)


# Each constructor takes keyword-only num_classes, fused_head=True, pool_backend='auto', iters=5 (see ResNet3G).


@register_model
def resnet18_3g(*, num_classes: int = 1000, **options) -> ResNet3G:
    """ResNet-18-3G, ImageNet (1000 classes by default): BasicBlock [2, 2, 2, 2]."""
    return _build("resnet18_3g", BasicBlock, (2, 2, 2, 2), num_classes, options)


@register_model
def resnet34_3g(*, num_classes: int = 1000, **options) -> ResNet3G:
    """ResNet-34-3G, ImageNet (1000 classes by default): BasicBlock [3, 4, 6, 3]."""
    return _build("resnet34_3g", BasicBlock, (3, 4, 6, 3), num_classes, options)


@register_model
def resnet23_3g(*, num_classes: int = 1000, **options) -> ResNet3G:
    """ResNet-23-3G, ImageNet (1000 classes by default): Bottleneck [1, 2, 2, 2]."""
    return _build("resnet23_3g", Bottleneck, (1, 2, 2, 2), num_classes, options)


@register_model
def resnet50_3g(*, num_classes: int = 1000, **options) -> ResNet3G:
    """ResNet-50-3G, ImageNet (1000 classes by default): Bottleneck [3, 4, 6, 3]."""
    return _build("resnet50_3g", Bottleneck, (3, 4, 6, 3), num_classes, options)


@register_model
def resnet101_3g(*, num_classes: int = 1000, **options) -> ResNet3G:
    """ResNet-101-3G, ImageNet (1000 classes by default): Bottleneck [3, 4, 23, 3]."""
    return _build("resnet101_3g", Bottleneck, (3, 4, 23, 3), num_classes, options)


@register_model
def resnet152_3g(*, num_classes: int = 1000, **options) -> ResNet3G:
    """ResNet-152-3G, ImageNet (1000 classes by default): Bottleneck [3, 8, 36, 3]."""
    return _build("resnet152_3g", Bottleneck, (3, 8, 36, 3), num_classes, options)


@register_model
def resnet18_3g_365(*, num_classes: int = 365, **options) -> ResNet3G:
    """ResNet-18-3G, Places365 (365 classes by default): BasicBlock [2, 2, 2, 2]."""
    return _build("resnet18_3g_365", BasicBlock, (2, 2, 2, 2), num_classes, options)


@register_model
def resnet34_3g_365(*, num_classes: int = 365, **options) -> ResNet3G:
    """ResNet-34-3G, Places365 (365 classes by default): BasicBlock [3, 4, 6, 3]."""
    return _build("resnet34_3g_365", BasicBlock, (3, 4, 6, 3), num_classes, options)


@register_model
def resnet23_3g_365(*, num_classes: int = 365, **options) -> ResNet3G:
    """ResNet-23-3G, Places365 (365 classes by default): Bottleneck [1, 2, 2, 2]."""
    return _build("resnet23_3g_365", Bottleneck, (1, 2, 2, 2), num_classes, options)


@register_model
def resnet50_3g_365(*, num_classes: int = 365, **options) -> ResNet3G:
    """ResNet-50-3G, Places365 (365 classes by default): Bottleneck [3, 4, 6, 3]."""
    return _build("resnet50_3g_365", Bottleneck, (3, 4, 6, 3), num_classes, options)


@register_model
def resnet101_3g_365(*, num_classes: int = 365, **options) -> ResNet3G:
    """ResNet-101-3G, Places365 (365 classes by default): Bottleneck [3, 4, 23, 3]."""
    return _build("resnet101_3g_365", Bottleneck, (3, 4, 23, 3), num_classes, options)


@register_model
def resnet152_3g_365(*, num_classes: int = 365, **options) -> ResNet3G:
    """ResNet-152-3G, Places365 (365 classes by default): Bottleneck [3, 8, 36, 3]."""
    return _build("resnet152_3g_365", Bottleneck, (3, 8, 36, 3), num_classes, options)


def list_models() -> list[str]:
    """The names create_model accepts (every @register_model constructor), sorted."""
    return sorted(_MODELS)


def create_model(name: str, *, backbone_weights=None, **kwargs) -> ResNet3G:
    """create_model('resnet50_3g', num_classes=..., fused_head=..., pool_backend=..., iters=..., backbone_weights=...).

    backbone_weights: a torchvision-format ImageNet ResNet state dict (path or dict) for the backbone
    (conv1 .. layer4); the head keeps its initialisation (models.load_backbone_weights, which logs the report).
    Raises ValueError (listing the names) for an unknown name, TypeError for an unknown keyword.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    model = _MODELS[name](**kwargs)
    if backbone_weights is not None:
        from .backbones import load_backbone_weights  # backbones.py imports this module

        load_backbone_weights(model, backbone_weights)
    return model
