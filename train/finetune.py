"""Fine-tuning: the model (ResNet-3G or a timm backbone with the 3G head), backbone weights, per-group learning
rates and the frozen backbone (docs/training.md, "Fine-tuning").

Parameter groups, in this order (a checkpoint's optimizer holds them with their names):
    backbone    ResNet-3G's conv1 .. layer4 (torchvision's trunk), or a timm model's parameters   lr x 1
    head        the 1x1 reduction, the re-weighting blocks (AtMp) and the pooling                  lr x --head-lr-factor
    classifier  the fc layer on the pooled vector                                                   lr x --fc-lr-factor
The lr schedule multiplies every group's lr by the same factor of the epoch.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import nn

from threeg_kernels.models import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CovPoolModel,
    attach_head,
    create_model,
    list_models,
    load_backbone_weights,
    load_checkpoint,
)
from threeg_kernels.models.backbones import TORCHVISION_RESNET_TRUNK
from threeg_kernels.models.checkpoint import _state_dict_of, _strip_prefixes

from .config import UserError

TIMM_PREFIX = "timm:"
GROUPS = ("backbone", "head", "classifier")
# The head put on a timm backbone is ResNet-3G's: a 1x1 reduction to 256 channels, three re-weighting blocks.
TIMM_HEAD = {"reduce_dim": 256, "attention": 3}


def timm_name(arch: str) -> Optional[str]:
    return arch[len(TIMM_PREFIX) :] if arch.startswith(TIMM_PREFIX) else None


def check_arch(arch: str) -> None:
    name = timm_name(arch)
    if name is None:
        if arch not in list_models():
            raise UserError(
                f"--arch {arch}: unknown; available: {', '.join(list_models())}, or timm:NAME for a timm backbone"
            )
        return
    if importlib.util.find_spec("timm") is None:
        raise UserError(f"--arch {arch}: needs timm (pip install timm, or the package's [timm] extra)")
    import timm

    if not name or not timm.is_model(name):
        raise UserError(f"--arch {arch}: timm has no model {name!r} (timm.list_models() lists them)")


def build_model(args, num_classes: int) -> nn.Module:
    """ResNet-3G by name, or `timm:NAME`: timm.create_model(NAME, pretrained=False) with ResNet-3G's head on its
    features (attach_head). Weights are loaded afterwards (load_backbone, or a checkpoint)."""
    name = timm_name(args.arch)
    try:
        if name is None:
            return create_model(
                args.arch,
                num_classes=num_classes,
                fused_head=args.fused_head,
                pool_backend=args.pool_backend,
                iters=args.iters,
            )
        import timm

        backbone = timm.create_model(name, pretrained=False)
        return attach_head(backbone, num_classes, iters=args.iters, backend=args.pool_backend, **TIMM_HEAD)
    except (TypeError, ValueError) as e:
        raise UserError(f"--arch {args.arch}: {e}") from None


def feature_stride(model: nn.Module) -> Optional[int]:
    """The total stride of a timm backbone's last feature map (timm's feature_info), None if it says none."""
    info = getattr(getattr(model, "backbone", None), "feature_info", None)
    try:
        return int(info[-1]["reduction"])
    except (TypeError, KeyError, IndexError, ValueError):
        return None


def check_input_size(args, model: nn.Module) -> None:
    """Covariance pooling needs >= 2 positions: the timm counterpart of main.validate's check for ResNet-3G."""
    stride = feature_stride(model) if isinstance(model, CovPoolModel) else None
    if stride is None:
        return
    for opt in ("image_size", "val_crop"):
        size = getattr(args, opt)
        side = -(-size // stride)
        if side * side < 2:
            raise UserError(
                f"--{opt.replace('_', '-')} {size}: {args.arch}'s features have stride {stride}, so the map would "
                f"be {side}x{side} and covariance pooling needs at least 2 positions; use >= {stride + 1}"
            )


def backbone_prefixes(model: nn.Module) -> tuple[str, ...]:
    if isinstance(model, CovPoolModel):
        return ("backbone.",)
    return tuple(f"{name}." for name in TORCHVISION_RESNET_TRUNK)


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    return ("head.fc.",) if isinstance(model, CovPoolModel) else ("fc.",)


def group_of(model: nn.Module, name: str) -> str:
    if name.startswith(backbone_prefixes(model)):
        return "backbone"
    if name.startswith(classifier_prefixes(model)):
        return "classifier"
    return "head"


def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{'backbone': [(name, parameter), ...], 'head': [...], 'classifier': [...]} of the bare model."""
    groups = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        groups[group_of(model, name)].append((name, p))
    return groups


def lr_factors(args) -> dict[str, float]:
    return {"backbone": 1.0, "head": args.head_lr_factor, "classifier": args.fc_lr_factor}


def build_optimizer(model: nn.Module, args) -> torch.optim.SGD:
    """SGD over the three groups, each at lr x its factor; every group carries its name and factor (saved with
    the optimizer's state, checked on resume). Empty groups are kept so that the layout never changes."""
    factors = lr_factors(args)
    groups = [
        {
            "params": [p for _, p in params],
            "lr": args.lr * factors[name],
            "name": name,
            "lr_factor": factors[name],
        }
        for name, params in split_parameters(model).items()
    ]
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def check_optimizer_state(state: dict, source: str) -> None:
    """A checkpoint's optimizer must have this pipeline's three named groups (else load_state_dict would pair
    momentum buffers with the wrong parameters or fail with a bare ValueError)."""
    names = [g.get("name") for g in state.get("param_groups", [])]
    if names != list(GROUPS):
        raise UserError(
            f"{source}: its optimizer has the parameter groups {names}, this pipeline has {list(GROUPS)} "
            "(a checkpoint written before per-group learning rates); start a new run from its weights with "
            "--backbone-weights, or evaluate it with --evaluate --checkpoint"
        )


def describe_groups(optimizer: torch.optim.Optimizer) -> str:
    parts = []
    for g in optimizer.param_groups:
        count = sum(p.numel() for p in g["params"])
        parts.append(f"{g['name']} {count / 1e6:.2f}M parameters at lr {g['lr']:.4g} (x{g['lr_factor']:g})")
    return "parameter groups: " + ", ".join(parts)


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, CovPoolModel):
        return [model.backbone]
    return [getattr(model, name) for name in TORCHVISION_RESNET_TRUNK]


def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """requires_grad off (frozen) or on for the backbone's parameters. Frozen parameters get no gradient, so SGD
    leaves them, their momentum and their weight decay alone, and autograd stops at the head. The engine also
    keeps the frozen backbone in eval mode (BatchNorm uses and keeps its running statistics)."""
    for module in backbone_modules(model):
        for p in module.parameters():
            p.requires_grad_(not frozen)


def load_backbone(model: nn.Module, weights: dict, source: str) -> str:
    """Copies the backbone's weights from `weights` (a state dict, a released {'state_dict': ...} file or a
    checkpoint of this pipeline) into `model` and returns the report to print; the head keeps its init.
    Every backbone tensor must be in `weights` with its shape, else nothing is copied."""
    try:
        if not isinstance(model, CovPoolModel):
            report = load_backbone_weights(model, weights)
            report.source = f"{source}, {report.source.split(', ', 1)[-1]}"  # the file, not 'dict'
            return str(report)
        state, layout = _state_dict_of(weights)
        state, _ = _strip_prefixes(state)
        own = model.backbone.state_dict()
        if not any(k in state for k in own):  # a checkpoint of a whole CovPoolModel: its 'backbone.' keys
            state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        # The file's keys under the backbone's own top-level modules must all fit (a deeper network's extra
        # blocks fail); the others (its classifier, removed by attach_head) are ignored.
        modules = {k.split(".", 1)[0] for k in own}
        kept = {k: v for k, v in state.items() if k.split(".", 1)[0] in modules}
        report = load_checkpoint(model.backbone, kept, strict=True)
    except (CheckpointFormatError, CheckpointMismatchError) as e:
        raise UserError(f"--backbone-weights {source}: does not fit --arch's backbone: {e}") from None
    ignored = len(state) - len(kept)
    heads = sorted({k.split(".")[1] for k in model.state_dict() if k.startswith("head.")})
    lines = [
        f"loaded {len(report.loaded)} backbone tensors ({source}, {layout})",
        f"  {sum(1 for k in model.state_dict() if not k.startswith('backbone.'))} head tensors keep their "
        f"initialisation: {', '.join(heads)}",
    ]
    if ignored:
        lines.append(f"  ignored {ignored} tensors of the file outside the backbone (e.g. its classifier)")
    return "\n".join(lines)
