"""ResNet-3G models (3G-Net, CVPR 2019) on the fused 3G pooling head, and loading their checkpoints.

    >>> from threeg_kernels import models
    >>> model = models.create_model("resnet50_3g")            # or models.resnet50_3g(num_classes=...)
    >>> models.load_checkpoint(model, "resnet50_3g.pth.tar")  # released files, plain or training checkpoints
    >>> logits = model(images)                                 # (B, 1000); model.forward_features -> (B, 32896)

docs/models.md describes the architecture, the fused head and the checkpoint formats. Constructors are
registered with the @register_model decorator (resnet_3g.py); create_model builds any of them by name.
attach_head puts the covariance pooling head on a timm or torchvision backbone (docs/deploy.md); where timm
is installed, importing this package registers the ResNet-3G models with timm.create_model.
"""

from .backbones import (
    BackboneLoadReport,
    CovPoolModel,
    attach_head,
    load_backbone_weights,
    register_timm_models,
)
from .checkpoint import (
    CheckpointFormatError,
    CheckpointMismatchError,
    LoadReport,
    load_checkpoint,
    read_checkpoint_file,
)
from .resnet_3g import (
    POOLED_FEATURES,
    AtMp,
    BasicBlock,
    Bottleneck,
    ResNet3G,
    average_crops,
    create_model,
    list_models,
    register_model,
    resnet18_3g,
    resnet18_3g_365,
    resnet23_3g,
    resnet23_3g_365,
    resnet34_3g,
    resnet34_3g_365,
    resnet50_3g,
    resnet50_3g_365,
    resnet101_3g,
    resnet101_3g_365,
    resnet152_3g,
    resnet152_3g_365,
)

__all__ = [
    "ResNet3G",
    "AtMp",
    "BasicBlock",
    "Bottleneck",
    "POOLED_FEATURES",
    "create_model",
    "list_models",
    "register_model",
    "average_crops",
    "load_checkpoint",
    "read_checkpoint_file",
    "LoadReport",
    "CheckpointMismatchError",
    "CheckpointFormatError",
    "attach_head",
    "CovPoolModel",
    "load_backbone_weights",
    "BackboneLoadReport",
    "register_timm_models",
    "resnet18_3g",
    "resnet34_3g",
    "resnet23_3g",
    "resnet50_3g",
    "resnet101_3g",
    "resnet152_3g",
    "resnet18_3g_365",
    "resnet34_3g_365",
    "resnet23_3g_365",
    "resnet50_3g_365",
    "resnet101_3g_365",
    "resnet152_3g_365",
]

# A no-op without timm. After __all__: timm's register_model adds each name to this module's __all__.
register_timm_models()
