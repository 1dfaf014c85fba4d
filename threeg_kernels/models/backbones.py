"""The covariance pooling head on other backbones, ImageNet backbone weights for ResNet-3G, and timm.

- attach_head(backbone, num_classes, **head_kwargs): a timm model, a torchvision(-style) ResNet or any module
  returning a map or tokens, with a CovPoolHead on its features (CovPoolModel).
- load_backbone_weights(model, path): a torchvision-format ImageNet state dict into a ResNet-3G's backbone;
  the head keeps its initialisation (create_model(name, backbone_weights=path) calls it).
- register_timm_models(): makes the ResNet-3G constructors known to timm.create_model (importing
  threeg_kernels.models calls it when timm is installed).

docs/deploy.md shows each with the commands that tests/test_head.py and tests/test_export.py run.
"""

from __future__ import annotations

import importlib.util
import logging
import numbers
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch
from torch import nn

from ..head import CovPoolHead
from .checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    _short_list,
    _state_dict_of,
    _strip_prefixes,
    read_checkpoint_file,
)
from .resnet_3g import _MODELS, create_model, list_models

logger = logging.getLogger(__name__)

# The feature trunk of a torchvision ResNet, in call order: the same names in ResNet-3G, whose checkpoints'
# keys under these modules are torchvision's.
TORCHVISION_RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_OPTIONAL_SUFFIX = ".num_batches_tracked"


def _is_timm_style(backbone: nn.Module) -> bool:
    return callable(getattr(backbone, "forward_features", None)) and isinstance(
        getattr(backbone, "num_features", None), numbers.Integral
    )


def _is_resnet_style(backbone: nn.Module) -> bool:
    return all(isinstance(getattr(backbone, n, None), nn.Module) for n in TORCHVISION_RESNET_TRUNK)


class CovPoolModel(nn.Module):
    """A backbone and a CovPoolHead on its features (built by `attach_head`).

    forward(images) -> logits (B, num_classes), or the pooled vector when num_classes is None;
    forward_features(images) -> the pooled vector (B, num_features); forward_backbone(images) -> what the
    head reads: a map (B, C, H, W) or tokens (B, N, C) without the backbone's prefix tokens.

    `kind` says how the backbone gives its features: 'timm' (backbone.forward_features), 'resnet' (the
    torchvision trunk conv1 .. layer4) or 'module' (backbone(images)); `nhwc`: the backbone returns
    (B, H, W, C), read as tokens (B, H * W, C).
    """

    def __init__(
        self, backbone: nn.Module, head: CovPoolHead, *, kind: str, num_prefix_tokens: int = 0, nhwc: bool = False
    ):
        super().__init__()
        if kind not in ("timm", "resnet", "module"):
            raise ValueError(f"kind must be 'timm', 'resnet' or 'module'; got {kind!r}")
        self.backbone, self.head = backbone, head
        self.kind, self.num_prefix_tokens, self.nhwc = kind, num_prefix_tokens, nhwc
        self.num_classes, self.num_features = head.num_classes, head.output_dim
        if getattr(backbone, "pretrained_cfg", None) is not None:
            # timm.data.resolve_model_data_config(model) reads the input size and normalisation from here.
            self.pretrained_cfg = backbone.pretrained_cfg

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "timm":
            x = self.backbone.forward_features(x)
        elif self.kind == "resnet":
            for name in TORCHVISION_RESNET_TRUNK:
                x = getattr(self.backbone, name)(x)
        else:
            x = self.backbone(x)
        if self.nhwc:
            x = x.flatten(1, 2)
        if self.num_prefix_tokens:
            x = x[:, self.num_prefix_tokens :]
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.forward_features(self.forward_backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_backbone(x))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_prefix_tokens={self.num_prefix_tokens}, nhwc={self.nhwc}"


def attach_head(
    backbone: nn.Module,
    num_classes: Optional[int],
    *,
    num_prefix_tokens: Optional[int] = None,
    **head_kwargs,
) -> CovPoolModel:
    """Puts a CovPoolHead(num_classes=num_classes, **head_kwargs) on `backbone`'s features.

    backbone:
      - a timm model (anything with forward_features and num_features): the head reads forward_features.
        CNNs give maps (B, C, H, W); ViTs give tokens (B, N, C) whose first `num_prefix_tokens` (class and
        register tokens, the model's attribute) are dropped; models with output_fmt 'NHWC' (Swin) give
        (B, H, W, C), read as tokens. The classifier is removed: backbone.reset_classifier(0).
      - a torchvision ResNet (or any module with conv1, bn1, relu, maxpool, layer1 .. layer4): the head reads
        layer4's map; backbone.fc is replaced by nn.Identity.
      - any other module returning a map or tokens: pass in_channels (and input_format="NLC" for tokens).
    The backbone's classifier is removed so that the model holds no parameter it does not use (DDP).
    in_channels and input_format are found from the backbone unless given; num_prefix_tokens (tokens to drop
    before the head) defaults to the backbone's attribute of that name, else 0.
    """
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module; got {type(backbone).__name__}")
    nhwc = False
    if _is_timm_style(backbone):
        kind, channels = "timm", int(backbone.num_features)
        prefix = getattr(backbone, "num_prefix_tokens", None)
        nhwc = prefix is None and getattr(backbone, "output_fmt", None) == "NHWC"  # a str or timm's str Enum
        layout = "NLC" if prefix is not None or nhwc else "NCHW"
        if num_prefix_tokens is None:
            num_prefix_tokens = int(prefix or 0)
        if callable(getattr(backbone, "reset_classifier", None)):
            backbone.reset_classifier(0)
    elif _is_resnet_style(backbone):
        kind, layout = "resnet", "NCHW"
        norms = [m for m in backbone.layer4.modules() if isinstance(m, nn.BatchNorm2d)]
        channels = norms[-1].num_features if norms else None
        if isinstance(getattr(backbone, "fc", None), nn.Module):
            backbone.fc = nn.Identity()
    else:
        kind, layout, channels = "module", "NCHW", None
    if num_prefix_tokens is None:
        num_prefix_tokens = 0
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral):
        raise TypeError(f"num_prefix_tokens must be an int >= 0 or None; got {num_prefix_tokens!r}")
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0; got {num_prefix_tokens}")
    head_kwargs.setdefault("input_format", layout)
    if "in_channels" not in head_kwargs:
        if channels is None:
            raise TypeError(
                f"attach_head needs in_channels=... for a {type(backbone).__name__}: it is neither a timm model "
                "(forward_features, num_features) nor a torchvision-style ResNet (conv1 .. layer4)"
            )
        head_kwargs["in_channels"] = channels
    if num_prefix_tokens and head_kwargs["input_format"] != "NLC":
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} needs tokens (input_format='NLC')")
    head = CovPoolHead(num_classes=num_classes, **head_kwargs)
    return CovPoolModel(backbone, head, kind=kind, num_prefix_tokens=int(num_prefix_tokens), nhwc=nhwc)


# --- ImageNet backbone weights for ResNet-3G ----------------------------------------------------------------


@dataclass
class BackboneLoadReport:
    """What load_backbone_weights did: `loaded` backbone keys copied from the file, `new` the model's other keys
    (the 3G head, left as initialised), `ignored` the file's keys outside the backbone (e.g. torchvision's fc),
    `defaulted` BatchNorm counters an old file lacks (left as they were)."""

    source: str
    loaded: list = field(default_factory=list)
    new: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    defaulted: list = field(default_factory=list)

    def __str__(self) -> str:
        heads = sorted({k.split(".")[0] for k in self.new})
        lines = [
            f"loaded {len(self.loaded)} backbone tensors ({self.source})",
            f"  {len(self.new)} head tensors keep their initialisation: {', '.join(heads)}",
        ]
        if self.ignored:
            lines.append(
                f"  ignored {len(self.ignored)} tensors of the file outside the backbone: {_short_list(self.ignored)}"
            )
        if self.defaulted:
            lines.append(f"  {len(self.defaulted)} BatchNorm counters absent (old file), left as they were")
        return "\n".join(lines)


def _is_trunk_key(key: str) -> bool:
    return key.split(".", 1)[0] in TORCHVISION_RESNET_TRUNK


def _read_weights(path: Union[str, os.PathLike], weights_only: bool):
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import load_file  # an optional dependency, needed only for this format

        return load_file(os.fspath(path), device="cpu")
    return read_checkpoint_file(path, weights_only)


def load_backbone_weights(
    model: nn.Module, weights: Union[str, os.PathLike, Mapping], *, weights_only: bool = True
) -> BackboneLoadReport:
    """Copies a torchvision-format ImageNet ResNet state dict (a .pth/.pt file, a .safetensors file, or a
    dict) into `model`'s backbone, key for key: conv1, bn1, layer1 .. layer4 (torchvision's names, which
    ResNet-3G keeps). The rest of the model (the 3G head) keeps its initialisation and the file's other keys
    (torchvision's fc) are ignored; the report says which is which.

    Every backbone key must be in the file with its shape (else CheckpointMismatchError, and nothing is
    copied): a file of another depth fails rather than loading half a network. Files saved from
    DataParallel ('module.' keys) and files without BatchNorm counters (PyTorch < 0.4.1) are accepted.
    """
    if isinstance(weights, (str, os.PathLike)):
        source = os.fspath(weights)
        weights = _read_weights(weights, weights_only)
    else:
        source = "dict"
    state_dict, layout = _state_dict_of(weights)
    state_dict, stripped = _strip_prefixes(state_dict)
    own = model.state_dict()
    report = BackboneLoadReport(source=f"{source}, {layout}")
    failed = LoadReport(source=f"{source}, {layout}, backbone keys", stripped_prefixes=stripped)
    old_format = not any(k.endswith(_OPTIONAL_SUFFIX) for k in state_dict)
    for key, value in own.items():
        if not _is_trunk_key(key):
            report.new.append(key)
        elif key not in state_dict:
            (report.defaulted if old_format and key.endswith(_OPTIONAL_SUFFIX) else failed.missing).append(key)
        elif tuple(state_dict[key].shape) != tuple(value.shape):
            failed.mismatched.append((key, tuple(state_dict[key].shape), tuple(value.shape)))
        else:
            report.loaded.append(key)
    for key in state_dict:
        if key not in own or not _is_trunk_key(key):
            (failed.unexpected if _is_trunk_key(key) else report.ignored).append(key)
    if not failed.ok:
        raise CheckpointMismatchError(failed)
    model.load_state_dict({k: state_dict[k] for k in report.loaded}, strict=False)
    logger.info("%s", report)
    return report


# --- timm ---------------------------------------------------------------------------------------------------


def _timm_entrypoint(name: str):
    """A timm entrypoint for ResNet-3G `name`: timm.create_model passes pretrained and its config keywords."""

    def entrypoint(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        if pretrained:
            raise ValueError(
                f"pretrained=True: timm has no weights for {name}; create it with pretrained=False and load the "
                "released checkpoint with threeg_kernels.models.load_checkpoint, or pass backbone_weights=PATH "
                "(a torchvision-format ImageNet state dict) for the backbone alone"
            )
        return create_model(name, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    # timm records the entrypoint's module and adds the name to that module's __all__, which already lists it.
    entrypoint.__module__ = "threeg_kernels.models"
    entrypoint.__doc__ = _MODELS[name].__doc__
    return entrypoint


def register_timm_models() -> list[str]:
    """Registers every ResNet-3G constructor with timm (timm.models.register_model), so that
    timm.create_model('resnet50_3g', num_classes=...) builds it. Returns the names added: none without timm;
    a name timm already knows (an earlier call, or a timm model of that name) is left as it is."""
    if importlib.util.find_spec("timm") is None:
        return []
    from timm.models import is_model
    from timm.models import register_model as timm_register_model

    added = []
    for name in list_models():
        if not is_model(name):
            timm_register_model(_timm_entrypoint(name))
            added.append(name)
    return added
