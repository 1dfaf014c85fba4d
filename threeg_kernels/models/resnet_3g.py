"""ResNet-3G (3G-Net, Wang et al., CVPR 2019), written from shared/SPEC.md section 4.

    image -> torchvision-style ResNet (layer4 at stride 1) -> 1x1 conv to 256 channels, BN, ReLU (= y)
          -> AtMp1(y, y) -> AtMp2(., y) -> AtMp3(., y) -> 3G pooling (K = 5) -> fc(32896 -> classes)

Parameter names are those of the released checkpoints (shared/reference/state_dict_keys.json), so their
state_dicts load without renaming (after stripping DataParallel's 'module.', see checkpoint.py).

The fused head: AtMp3 ends with `a * m` for an attention map m (B, 1, H, W), and the pooling head's
first step multiplies its input by its spatial weights anyway. With fused_head=True the map is handed to
`cov_pool` as `weight`, so the (B, 256, H, W) product and its gradient are never materialised.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence, Type, Union

import torch
from torch import nn

from .. import dispatch
from .._validate import check_options
from ..api import cov_pool

REDUCED_CHANNELS = 256
POOLED_FEATURES = REDUCED_CHANNELS * (REDUCED_CHANNELS + 1) // 2  # 32896


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


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


class AtMp(nn.Module):
    """The re-weighting block of 3G-Net: forward(a, z) = a * attention(a, z), all convs 1x1 without bias.

    a: the features to re-weight (B, n_features, H, W); z: the output of the 1x1 reduction, the same
    tensor for all three blocks. attention(a, z) is the map m (B, 1, H, W), values in (0, 1):
        x = bn1(map1(a)) * bn2(map2(a));  x = relu(x + bn21(map21(z)))
        x = relu(bn3(map3(x))) * relu(bn4(map4(x)))
        x = atmap2(relu(bnat1(atmap1(x))))                  # n -> n / reduction -> 1 channels
        m = sigmoid(x + atmap3(x))
    """

    def __init__(self, n_features: int = REDUCED_CHANNELS, reduction: int = 4):
        super().__init__()
        hidden = n_features // reduction
        # Registration order = the released checkpoints' key order.
        self.map1 = conv1x1(n_features, n_features)
        self.bn1 = nn.BatchNorm2d(n_features)
        self.map2 = conv1x1(n_features, n_features)
        self.bn2 = nn.BatchNorm2d(n_features)
        self.map21 = conv1x1(n_features, n_features)
        self.bn21 = nn.BatchNorm2d(n_features)
        self.map3 = conv1x1(n_features, n_features)
        self.bn3 = nn.BatchNorm2d(n_features)
        self.map4 = conv1x1(n_features, n_features)
        self.bn4 = nn.BatchNorm2d(n_features)
        self.atmap1 = conv1x1(n_features, hidden)
        self.bnat1 = nn.BatchNorm2d(hidden)
        self.atmap2 = conv1x1(hidden, 1)
        self.atmap3 = conv1x1(1, 1)

    def attention(self, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.map1(a)) * self.bn2(self.map2(a))
        x = torch.relu(x + self.bn21(self.map21(z)))
        x = torch.relu(self.bn3(self.map3(x))) * torch.relu(self.bn4(self.map4(x)))
        x = self.atmap2(torch.relu(self.bnat1(self.atmap1(x))))
        return torch.sigmoid(x + self.atmap3(x))

    def forward(self, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return a * self.attention(a, z)


def _check_options(num_classes, fused_head, pool_backend, iters) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1; got {num_classes!r}")
    if not isinstance(fused_head, bool):
        raise TypeError(f"fused_head must be a bool; got {fused_head!r} ({type(fused_head).__name__})")
    dispatch.check_backend(pool_backend, "pool_backend")
    check_options(iters, 1e-7, "3g")


class ResNet3G(nn.Module):
    """A ResNet backbone with layer4 at stride 1 and the 3G head (SPEC section 4).

    forward(x) -> logits (B, num_classes); forward_features(x) -> the pooled vector (B, 32896);
    forward_crops(x) for x (B, ncrops, 3, H, W) -> crop-averaged logits (B, num_classes).

    fused_head=True passes AtMp3's attention map to cov_pool as `weight` (backend `pool_backend`).
    fused_head=False multiplies first and pools without weight, on the 'reference' backend when
    pool_backend='auto' (the plain path of the paper, as a yardstick), else on the named backend.
    Both give the same outputs and gradients to float rounding (tests/test_models.py).
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

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # fc keeps nn.Linear's default init (it is the only layer with a bias).

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the 3G-pooled vector (B, 32896), '3g' triangle order."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        y = self.layer_reduce_relu(self.layer_reduce_bn(self.layer_reduce(x)))
        x = self.AtMp2(self.AtMp1(y, y), y)
        if self.fused_head:
            weight = self.AtMp3.attention(x, y)
            # Under autocast the map and the features can come out in different dtypes.
            dtype = torch.promote_types(x.dtype, weight.dtype)
            return cov_pool(x.to(dtype), weight.to(dtype), iters=self.iters, backend=self.pool_backend)
        backend = "reference" if self.pool_backend == "auto" else self.pool_backend
        return cov_pool(self.AtMp3(x, y), iters=self.iters, backend=backend)

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


def _constructor(name: str, block: Block, layers: Sequence[int], default_classes: int, what: str) -> Callable:
    def constructor(
        *, num_classes: int = default_classes, fused_head: bool = True, pool_backend: str = "auto", iters: int = 5
    ) -> ResNet3G:
        return ResNet3G(
            block, layers, num_classes=num_classes, fused_head=fused_head, pool_backend=pool_backend, iters=iters
        )

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = (
        f"{what}: {block.__name__} {list(layers)}, {default_classes} classes by default.\n\n"
        "Keyword-only: num_classes, fused_head=True, pool_backend='auto', iters=5 (see ResNet3G)."
    )
    return constructor


_IMAGENET, _PLACES = "ImageNet", "Places365"
resnet18_3g = _constructor("resnet18_3g", BasicBlock, (2, 2, 2, 2), 1000, f"ResNet-18-3G, {_IMAGENET}")
resnet34_3g = _constructor("resnet34_3g", BasicBlock, (3, 4, 6, 3), 1000, f"ResNet-34-3G, {_IMAGENET}")
resnet23_3g = _constructor("resnet23_3g", Bottleneck, (1, 2, 2, 2), 1000, f"ResNet-23-3G, {_IMAGENET}")
resnet50_3g = _constructor("resnet50_3g", Bottleneck, (3, 4, 6, 3), 1000, f"ResNet-50-3G, {_IMAGENET}")
resnet101_3g = _constructor("resnet101_3g", Bottleneck, (3, 4, 23, 3), 1000, f"ResNet-101-3G, {_IMAGENET}")
resnet152_3g = _constructor("resnet152_3g", Bottleneck, (3, 8, 36, 3), 1000, f"ResNet-152-3G, {_IMAGENET}")
resnet18_3g_365 = _constructor("resnet18_3g_365", BasicBlock, (2, 2, 2, 2), 365, f"ResNet-18-3G, {_PLACES}")
resnet34_3g_365 = _constructor("resnet34_3g_365", BasicBlock, (3, 4, 6, 3), 365, f"ResNet-34-3G, {_PLACES}")
resnet23_3g_365 = _constructor("resnet23_3g_365", Bottleneck, (1, 2, 2, 2), 365, f"ResNet-23-3G, {_PLACES}")
resnet50_3g_365 = _constructor("resnet50_3g_365", Bottleneck, (3, 4, 6, 3), 365, f"ResNet-50-3G, {_PLACES}")
resnet101_3g_365 = _constructor("resnet101_3g_365", Bottleneck, (3, 4, 23, 3), 365, f"ResNet-101-3G, {_PLACES}")
resnet152_3g_365 = _constructor("resnet152_3g_365", Bottleneck, (3, 8, 36, 3), 365, f"ResNet-152-3G, {_PLACES}")

_REGISTRY = {
    f.__name__: f
    for f in (
        resnet18_3g, resnet34_3g, resnet23_3g, resnet50_3g, resnet101_3g, resnet152_3g,
        resnet18_3g_365, resnet34_3g_365, resnet23_3g_365, resnet50_3g_365, resnet101_3g_365, resnet152_3g_365,
    )
}


def list_models() -> list[str]:
    """The names create_model accepts, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> ResNet3G:
    """create_model('resnet50_3g', num_classes=..., fused_head=..., pool_backend=..., iters=...).

    Raises ValueError (listing the names) for an unknown name, TypeError for an unknown keyword.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)
