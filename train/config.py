"""Options: built-in defaults < a YAML file (--config) < the command line.

YAML keys are the long option names (dashes or underscores), e.g. `batch_size: 256` or
`lr-milestones: [30, 60, 90]`. Values are checked with the same types and choices as on the command line.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional, Sequence

import yaml


class UserError(Exception):
    """A mistake in what the user asked for: printed as one message on stderr, exit status 2, no traceback."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, except where there is none (None: the help says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train or evaluate a ResNet-3G classifier on an ImageFolder tree (train/, val/).",
        formatter_class=_HelpFormatter,
    )
    bool_opt = argparse.BooleanOptionalAction
    g = p.add_argument_group("run")
    g.add_argument("--config", default=None, help="YAML file of option values; the command line overrides it")
    g.add_argument(
        "--output-dir",
        default=None,
        help="checkpoints, args.yaml and summary.csv go here (default: runs/train, or the directory of --resume)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    g.add_argument("--resume", default=None, metavar="PATH", help="a last.pth/best.pth of this pipeline")
    g.add_argument("--evaluate", action="store_true", help="evaluate --checkpoint on val/ and exit")
    g.add_argument(
        "--checkpoint",
        default=None,
        metavar="PATH",
        help="weights for --evaluate: this pipeline's checkpoints or the released 3G-Net files",
    )
    g.add_argument(
        "--save-format",
        default="pth",
        choices=["pth", "safetensors"],
        help="checkpoints as last.pth/best.pth (torch.save) or last.safetensors/best.safetensors (tensors in "
        "safetensors, the rest as JSON metadata); --resume and --checkpoint read both",
    )
    g.add_argument("--seed", type=int, default=0, help="seeds weights, data order and augmentation")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (cuDNN benchmark off)")
    g.add_argument("--print-freq", type=int, default=10, help="progress line every N steps")
    g.add_argument("--tensorboard", action=bool_opt, default=True, help="event files if tensorboard is installed")
    g.add_argument(
        "--time-head-steps",
        type=int,
        default=0,
        help="profile this many training steps of the first epoch (after one warm-up step) and "
        "report the pooling head's share of step time; 0 = off",
    )

    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="root of the ImageFolder tree with train/ and val/")
    g.add_argument(
        "--dataset",
        default="imagefolder",
        choices=["imagefolder", "digits"],
        help="'digits': write scikit-learn's 8x8 digits as an ImageFolder tree at --data first",
    )
    g.add_argument("--digits-val-fraction", type=float, default=0.2, help="digits: share of images in val/")
    g.add_argument("--split-seed", type=int, default=0, help="digits: seed of the stratified train/val split")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes per rank")
    g.add_argument(
        "--max-bad-images",
        type=float,
        default=0.01,
        metavar="FRACTION",
        help="unreadable image files are skipped, each reported once; more than this share of a split in one "
        "epoch stops the run",
    )
    g.add_argument("--image-size", type=int, default=224, help="training crop size")
    g.add_argument(
        "--train-crop",
        default="random-resized",
        choices=["random-resized", "center"],
        help="training crop: RandomResizedCrop(image-size, crop-scale), or Resize(image-size) + "
        "CenterCrop(image-size) (fast-MPN-COV's fine-grained recipe); the flip follows --hflip",
    )
    g.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=[0.08, 1.0],
        metavar=("MIN", "MAX"),
        help="RandomResizedCrop area range",
    )
    g.add_argument("--hflip", action=bool_opt, default=True, help="random horizontal flip in training")
    g.add_argument("--val-resize", type=int, default=256, help="evaluation: Resize (shorter side)")
    g.add_argument("--val-crop", type=int, default=224, help="evaluation: CenterCrop / TenCrop size")
    g.add_argument(
        "--ten-crop",
        action=bool_opt,
        default=False,
        help="evaluate on TenCrop(val-crop), logits averaged over the crops",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--arch",
        default="resnet50_3g",
        help="a name from threeg_kernels.models.list_models(), or timm:NAME: timm's model NAME (random init, see "
        "--backbone-weights) with ResNet-3G's head (1x1 reduction to 256, three re-weighting blocks, cov_pool)",
    )
    g.add_argument(
        "--fused-head",
        action=bool_opt,
        default=True,
        help="hand AtMp3's attention map to cov_pool as its weight (no (B,256,H,W) product)",
    )
    g.add_argument("--pool-backend", default="auto", help="cov_pool backend: auto, reference, torch, triton, ext")
    g.add_argument("--iters", type=int, default=5, help="Newton-Schulz steps of the head")
    g.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"], help="autocast dtype")
    g.add_argument("--channels-last", action="store_true", help="model and images in channels-last memory format")
    g.add_argument(
        "--sync-bn",
        action=bool_opt,
        default=None,
        help="SyncBatchNorm under DDP (default: on for several CUDA ranks; it does not run on CPU)",
    )
    g.add_argument(
        "--freeze-bn",
        action="store_true",
        help="keep BatchNorm in eval mode (running statistics used and kept; affine parameters train)",
    )

    g = p.add_argument_group("fine-tuning")
    g.add_argument(
        "--backbone-weights",
        default=None,
        metavar="PATH",
        help="start the backbone from PATH (.pth/.pt/.safetensors): a torchvision-format ResNet state dict for "
        "ResNet-3G, a timm state dict for timm:NAME, a released 3G-Net file or a checkpoint of this pipeline; "
        "the head and classifier keep their initialisation, the file's other tensors are ignored",
    )
    g.add_argument(
        "--head-lr-factor",
        type=float,
        default=1.0,
        metavar="F",
        help="lr of the head (reduction, re-weighting blocks, pooling) = F x --lr",
    )
    g.add_argument("--fc-lr-factor", type=float, default=1.0, metavar="F", help="lr of the classifier (fc) = F x --lr")
    g.add_argument(
        "--freeze-backbone-epochs",
        type=int,
        default=0,
        metavar="N",
        help="train only the head and classifier for the first N epochs: the backbone's parameters get no "
        "gradient and it runs in eval mode (BatchNorm uses and keeps its running statistics)",
    )

    g = p.add_argument_group("optimisation (SGD)")
    g.add_argument("--epochs", type=int, default=115, help="epochs of the whole run (a resumed one too)")
    g.add_argument("--batch-size", type=int, default=256, help="global batch; each rank gets batch / world size")
    g.add_argument(
        "--lr",
        type=float,
        default=0.1,
        help="SGD learning rate (the backbone's; head and classifier: x --head-lr-factor, --fc-lr-factor)",
    )
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    g.add_argument(
        "--lr-schedule",
        default="multistep",
        choices=["multistep", "cosine"],
        help="multistep: times --lr-gamma at each milestone; cosine: to 0 over --epochs",
    )
    g.add_argument(
        "--lr-milestones",
        type=int,
        nargs="*",
        default=[30, 60, 90],
        help="multistep: epochs (0-based) at which lr is multiplied by --lr-gamma",
    )
    g.add_argument("--lr-gamma", type=float, default=0.1, help="multistep: the factor at each milestone")
    g.add_argument("--warmup-epochs", type=int, default=0, help="linear warm-up from lr/10 over these epochs")
    g.add_argument(
        "--clip-grad",
        type=float,
        default=0.0,
        metavar="NORM",
        help="clip the gradients' global L2 norm to NORM before each step (all parameters together); 0 = off",
    )
    return p


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """A YAML value checked like the same value on the command line."""

    def fail(why: str):
        raise UserError(f"{source}: option '{key}': {why}; got {value!r}")

    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            fail("expected true or false")
        return value
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        if not isinstance(value, (list, tuple)):
            fail("expected a list")
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            fail(f"expected {action.nargs} values")
        items = list(value)
    else:
        if isinstance(value, (list, dict)):
            fail("expected a single value")
        items = [value]
    out = []
    for item in items:
        if isinstance(item, bool) and action.type in (int, float):
            fail(f"expected {action.type.__name__}")
        if action.type is int and isinstance(item, float):
            fail("expected an integer")  # int(2.5) would silently give 2
        try:
            item = action.type(item) if action.type is not None else str(item)
        except (TypeError, ValueError):
            fail(f"expected {getattr(action.type, '__name__', 'a string')}")
        if action.choices is not None and item not in action.choices:
            fail(f"expected one of {list(action.choices)}")
        out.append(item)
    return out if isinstance(value, (list, tuple)) else out[0]


def load_yaml(path: str, parser: argparse.ArgumentParser) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except UnicodeDecodeError as e:
        raise UserError(
            f"--config {path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
        ) from None
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"--config {path}: expected a mapping of option: value, got {type(raw).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {}
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise UserError(f"--config {path}: unknown option '{key}'; known: {', '.join(sorted(actions))}")
        values[dest] = _coerce(actions[dest], str(key), value, f"--config {path}")
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Raises UserError for a bad --config; argparse itself exits with status 2 for a bad command line."""
    parser = build_parser()
    config = _find_config(argv)
    if config is not None:
        parser.set_defaults(**load_yaml(config, parser))
    return parser.parse_args(argv)


def _find_config(argv: Optional[Sequence[str]]) -> Optional[str]:
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config", default=None)
    known, _ = finder.parse_known_args(argv)
    return known.config


def options_of(args: argparse.Namespace, skip: Sequence[str] = ()) -> list[str]:
    """The options that give `args` again: --config (if one was used), then every option whose value
    differs from what that config (or the defaults) gives, except the destinations in `skip`."""
    parser = build_parser()
    base = vars(parse_args(["--config", args.config] if args.config else []))
    out = ["--config", args.config] if args.config else []
    for action in parser._actions:
        dest = action.dest
        if dest in ("help", "config", *skip) or not action.option_strings:
            continue
        value = getattr(args, dest)
        if value == base[dest] or value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            out.append(action.option_strings[0 if value else 1])
        elif isinstance(action, argparse._StoreTrueAction):
            out.append(action.option_strings[0])
        elif isinstance(value, (list, tuple)):
            out += [action.option_strings[0], *map(str, value)]
        else:
            out += [action.option_strings[0], str(value)]
    return out


def args_to_yaml(args: argparse.Namespace) -> str:
    return yaml.safe_dump(dict(sorted(vars(args).items())), sort_keys=False)
