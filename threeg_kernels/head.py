"""CovPoolHead: the 3G covariance pooling head as an nn.Module for any backbone's feature map or tokens.

    features (B, C, H, W) ["NCHW"] or tokens (B, N, C) ["NLC"]
      -> 1x1 conv to reduce_dim, BN, ReLU              (reduce_dim=None: skipped)
      -> `attention` stacked 3G re-weighting blocks    (attention=0/False: none)
      -> cov_pool, the last block's map as its weight  (B, d (d + 1) / 2), d = reduce_dim or C
      -> dropout, Linear(num_classes)                  (num_classes=None: the pooled vector is the output)

Tokens are pooled as the (B, C, N, 1) view `tokens.transpose(1, 2).unsqueeze(-1)`: a channels-last map,
so the 1x1 convs of the reduction and of the re-weighting blocks read them in place, the head has the same
parameters for both layouts, and without a reduction cov_pool reads the tokens themselves (strided).

The re-weighting block (AtMp) and the fused path (`reweight_and_pool`, the one implementation of
"re-weighting blocks, then cov_pool with the last block's map as its weight") are ResNet-3G's
(models/resnet_3g.py imports them from here) as well as CovPoolHead's.
docs/deploy.md shows the head on timm and torchvision backbones and its export (torch.export, ONNX).
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .api import CovPool

INPUT_FORMATS = ("NCHW", "NLC")

# The re-weighting block's bottleneck (AtMp's `reduction`): its attention branch has d / 4 channels.
ATTENTION_REDUCTION = 4


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class AtMp(nn.Module):
    """The re-weighting block of 3G-Net: forward(a, z) = a * attention(a, z), all convs 1x1 without bias.

    a: the features to re-weight (B, n_features, H, W); z: the output of the 1x1 reduction, the same
    tensor for every block (ResNet-3G's AtMp1..3, CovPoolHead's `attention`). attention(a, z) is the map
    m (B, 1, H, W), values in (0, 1):
        x = bn1(map1(a)) * bn2(map2(a));  x = relu(x + bn21(map21(z)))
        x = relu(bn3(map3(x))) * relu(bn4(map4(x)))
        x = atmap2(relu(bnat1(atmap1(x))))                  # n -> n / reduction -> 1 channels
        m = sigmoid(x + atmap3(x))
    """

    def __init__(self, n_features: int = 256, reduction: int = ATTENTION_REDUCTION):
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


def reweight_and_pool(
    x: torch.Tensor,
    z: torch.Tensor,
    blocks: Sequence[nn.Module],
    pool: Callable[..., torch.Tensor],
    *,
    fused: bool = True,
) -> torch.Tensor:
    """The 3G head after its reduction: x = block(x, z) for each re-weighting block, then pool.

    x: the features (B, C, H, W); z: every block's second input (in 3G-Net the reduction's output, the same
    tensor for all blocks); blocks: AtMp blocks, possibly none; pool(x, weight=None): cov_pool with its options.
    fused=True hands the last block's attention map m (B, 1, H, W) to pool as its weight, so x * m and its
    gradient are never materialised (docs/models.md, "The fused head"); fused=False pools last(x, z) = x * m.
    """
    if len(blocks) == 0:
        return pool(x)
    for block in blocks[:-1]:
        x = block(x, z)
    last = blocks[-1]
    if not fused:
        return pool(last(x, z))
    weight = last.attention(x, z)
    # Under autocast the map and the features can come out in different dtypes.
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return pool(x.to(dtype), weight.to(dtype))


def init_weights(module: nn.Module) -> None:
    """The init of ResNet-3G (docs/models.md): kaiming_normal_(fan_out, relu) for every Conv2d in `module`,
    BatchNorm weight 1 and bias 0; Linear layers keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _count(name: str, value, minimum: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        what = "an int" + (" or None" if optional else "")
        raise TypeError(f"{name} must be {what}; got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


class CovPoolHead(nn.Module):
    """Covariance pooling head (3G-Net / iSQRT-COV) for a backbone's feature map or tokens.

    Args:
        in_channels: C, the channels of the input.
        num_classes: None: forward returns the pooled vector; else forward returns logits of a Linear layer
            (after dropout) on it.
        reduce_dim: d, the channels after a 1x1 conv (no bias), BatchNorm and ReLU; None pools the C input
            channels as they are. The pooled vector has d (d + 1) / 2 entries (`output_dim`): 32896 for d = 256.
        attention: the number of 3G re-weighting blocks (AtMp, ResNet-3G's block) stacked after the
            reduction; False/0: none, True: one (ResNet-3G stacks three). The last block's spatial map is
            cov_pool's weight (the fused path, `reweight_and_pool`). Needs d >= 4.
        iters, eps, order, backend, precision, keep_iterates: cov_pool's options (threeg_kernels.cov_pool).
        dropout: the dropout probability before the Linear layer (with num_classes set).
        input_format: "NCHW" for maps (B, C, H, W), "NLC" for tokens (B, N, C) (class or register tokens
            removed first: `threeg_kernels.models.attach_head` does that for timm ViTs).

    forward(x) -> logits (B, num_classes), or the pooled vector when num_classes is None;
    forward_features(x) -> the pooled vector (B, output_dim), in `order`'s triangle order.
    Parameters are initialised as in ResNet-3G (`init_weights`).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: Optional[int] = None,
        *,
        reduce_dim: Optional[int] = 256,
        attention: Union[bool, int] = False,
        iters: int = 5,
        eps: float = 1e-7,
        order: str = "3g",
        dropout: float = 0.0,
        input_format: str = "NCHW",
        backend: str = "auto",
        precision: str = "ieee",
        keep_iterates: Optional[bool] = None,
    ):
        super().__init__()
        _count("in_channels", in_channels, 1)
        _count("num_classes", num_classes, 1, optional=True)
        _count("reduce_dim", reduce_dim, 1, optional=True)
        if not isinstance(attention, numbers.Integral):
            raise TypeError(
                f"attention must be a bool or the number of re-weighting blocks (int); got {attention!r} "
                f"({type(attention).__name__})"
            )
        if attention < 0:
            raise ValueError(f"attention must be >= 0 blocks; got {attention}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
            raise TypeError(f"dropout must be a float in [0, 1); got {dropout!r} ({type(dropout).__name__})")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}; got {input_format!r}")
        dim = in_channels if reduce_dim is None else reduce_dim
        if attention and dim < ATTENTION_REDUCTION:
            raise ValueError(
                f"attention needs >= {ATTENTION_REDUCTION} channels to pool (its bottleneck has "
                f"1/{ATTENTION_REDUCTION} of them); got reduce_dim={reduce_dim!r}, in_channels={in_channels}"
            )
        # CovPool checks iters, eps, order, backend, precision and keep_iterates, naming the argument.
        pool = CovPool(iters, eps, order, backend, precision, keep_iterates)

        self.in_channels, self.num_classes, self.input_format = in_channels, num_classes, input_format
        self.output_dim = dim * (dim + 1) // 2
        self.reduce = None
        if reduce_dim is not None:
            self.reduce = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, reduce_dim, kernel_size=1, bias=False),
                    bn=nn.BatchNorm2d(reduce_dim),
                    relu=nn.ReLU(inplace=True),
                )
            )
        self.attention = nn.ModuleList(AtMp(dim, ATTENTION_REDUCTION) for _ in range(int(attention)))
        self.pool = pool
        self.drop = nn.Dropout(dropout)
        self.fc = None if num_classes is None else nn.Linear(self.output_dim, num_classes)
        init_weights(self)

    def _as_map(self, x: torch.Tensor) -> torch.Tensor:
        """The input as a (B, C, H, W) map: NLC tokens (B, N, C) as the channels-last view (B, C, N, 1)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        c = self.in_channels
        if self.input_format == "NCHW":
            if x.dim() != 4 or x.shape[1] != c:
                raise ValueError(f"x must have shape (B, {c}, H, W) (input_format='NCHW'); got {tuple(x.shape)}")
            return x
        if x.dim() != 3 or x.shape[2] != c:
            raise ValueError(f"x must have shape (B, N, {c}) (input_format='NLC'); got {tuple(x.shape)}")
        return x.transpose(1, 2).unsqueeze(-1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Map or tokens -> the pooled vector (B, output_dim)."""
        x = self._as_map(x)
        if self.reduce is not None:
            x = self.reduce(x)
        return reweight_and_pool(x, x, self.attention, self.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        if self.fc is None:
            return features
        return self.fc(self.drop(features))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, output_dim={self.output_dim}, input_format={self.input_format!r}"
