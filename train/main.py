"""python -m train / torchrun -m train: the flat main() of the pipeline (docs/training.md)."""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import math
import os
import random
import shlex
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import threeg_kernels
from threeg_kernels import dispatch
from threeg_kernels.models import load_checkpoint

from . import checkpoint, data, distributed, engine, finetune
from .config import UserError, args_to_yaml, options_of, parse_args
from .distributed import DistInfo, log

RUN_FILES = ("last.pth", "best.pth", "last.safetensors", "best.safetensors", "summary.csv")
SUMMARY_FIELDS = (
    "epoch",
    "lr",
    "train_loss",
    "train_top1",
    "train_top5",
    "val_loss",
    "val_top1",
    "val_top5",
    "train_bad_images",
    "val_bad_images",
    "best_val_top1",
    "train_img_s",
    "epoch_s",
)
# Options that change the numbers of a run: resuming with other values is allowed but reported.
RESUME_KEYS = (
    "arch",
    "fused_head",
    "iters",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "lr_schedule",
    "lr_milestones",
    "lr_gamma",
    "warmup_epochs",
    "clip_grad",
    "seed",
    "image_size",
    "crop_scale",
    "hflip",
    "amp",
    "freeze_bn",
    "dataset",
    "split_seed",
    "digits_val_fraction",
    "train_crop",
    "head_lr_factor",
    "fc_lr_factor",
    "freeze_backbone_epochs",
)


MAX_SEED = 2**32 - 1  # numpy.random.seed and scikit-learn's random_state accept 0 .. 2**32 - 1
MIN_IMAGE_SIZE = 17  # the smallest input whose final feature map is 2x2


def feature_map_side(size: int) -> int:
    """Side of the backbone's final feature map for a size x size input: conv1, maxpool, layer2 and layer3
    each halve it (rounding up); layer4 keeps it (total stride 16)."""
    for _ in range(4):
        size = (size + 1) // 2
    return size


class LRFactor:
    """lr(epoch) / lr: multistep (gamma ** milestones passed) or cosine, after an optional linear warm-up
    from 1/10. A callable object, so LambdaLR's state_dict keeps its settings."""

    def __init__(self, schedule: str, milestones: Sequence[int], gamma: float, epochs: int, warmup: int):
        self.schedule, self.milestones, self.gamma = schedule, sorted(milestones), gamma
        self.epochs, self.warmup = epochs, warmup

    def __call__(self, epoch: int) -> float:
        if self.schedule == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * epoch / max(self.epochs, 1)))
        else:
            factor = self.gamma ** sum(epoch >= m for m in self.milestones)
        if epoch < self.warmup:
            factor *= 0.1 + 0.9 * epoch / self.warmup
        return factor


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.cleanup()


def validate(args, info: DistInfo) -> None:
    """Checks of the options alone, before anything is read or written."""
    finetune.check_arch(args.arch)
    is_timm = finetune.timm_name(args.arch) is not None
    if is_timm and not args.fused_head:
        raise UserError(f"--no-fused-head: applies to ResNet-3G models; --arch {args.arch} always fuses the head")
    if args.pool_backend != "auto":
        if args.pool_backend not in dispatch.BACKENDS:
            raise UserError(f"--pool-backend {args.pool_backend}: unknown; choose auto or one of {dispatch.BACKENDS}")
        if args.pool_backend not in threeg_kernels.available_backends(info.device):
            why = dispatch.unavailable_reason(args.pool_backend, info.device)
            raise UserError(f"--pool-backend {args.pool_backend}: cannot run on {info.device}: {why}")
    for name in ("epochs", "batch_size", "iters", "image_size", "val_resize", "val_crop", "print_freq"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    for name in () if is_timm else ("image_size", "val_crop"):  # timm: finetune.check_input_size
        side = feature_map_side(getattr(args, name))
        if side < 2:
            raise UserError(
                f"--{name.replace('_', '-')} {getattr(args, name)}: the final feature map would be {side}x{side} "
                f"(the backbone's total stride is 16) and covariance pooling needs at least 2 positions; "
                f"use >= {MIN_IMAGE_SIZE}"
            )
    for name in ("lr", "head_lr_factor", "fc_lr_factor"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number > 0; got {value}")
    for name in ("momentum", "weight_decay"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0; got {value}")
    if args.freeze_backbone_epochs < 0:
        raise UserError(f"--freeze-backbone-epochs must be >= 0; got {args.freeze_backbone_epochs}")
    if args.save_format == "safetensors" and importlib.util.find_spec("safetensors") is None:
        raise UserError("--save-format safetensors: needs the safetensors package (pip install safetensors)")
    for name in ("seed", "split_seed"):
        if not 0 <= getattr(args, name) <= MAX_SEED:
            raise UserError(
                f"--{name.replace('_', '-')} must be in [0, 2**32 - 1] (numpy's range); got {getattr(args, name)}"
            )
    if args.ten_crop and args.val_crop > args.val_resize:
        raise UserError(
            f"--ten-crop: --val-crop {args.val_crop} is larger than --val-resize {args.val_resize} "
            "(the shorter side the crops are cut from)"
        )
    if args.workers < 0 or args.time_head_steps < 0 or args.warmup_epochs < 0 or not args.clip_grad >= 0:
        raise UserError("--workers, --time-head-steps, --warmup-epochs and --clip-grad must be >= 0")
    if args.batch_size % info.world_size:
        raise UserError(f"--batch-size {args.batch_size} (global) is not divisible by the {info.world_size} ranks")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise UserError(f"--crop-scale needs 0 < MIN <= MAX <= 1; got {args.crop_scale}")
    if not 0 <= args.max_bad_images < 1:
        raise UserError(f"--max-bad-images must be in [0, 1); got {args.max_bad_images}")
    if not 0 < args.digits_val_fraction < 1:
        raise UserError(f"--digits-val-fraction must be in (0, 1); got {args.digits_val_fraction}")
    if args.amp == "fp16" and info.device.type == "cpu":
        raise UserError("--amp fp16 needs CUDA (GradScaler); use --amp bf16 on CPU")
    if args.sync_bn and info.device.type != "cuda":
        raise UserError("--sync-bn needs CUDA: SyncBatchNorm does not run on CPU (see --freeze-bn)")
    if args.evaluate:
        if not args.checkpoint:
            raise UserError("--evaluate needs --checkpoint PATH")
        if args.resume:
            raise UserError("--evaluate takes --checkpoint, not --resume")
        if args.backbone_weights:
            raise UserError("--backbone-weights is for training; --evaluate reads all weights from --checkpoint")
    elif args.checkpoint:
        raise UserError("--checkpoint is for --evaluate; to continue a run use --resume PATH")
    for opt in ("checkpoint", "resume", "backbone_weights"):
        path = getattr(args, opt)
        if path and not os.path.isfile(path):
            raise UserError(f"--{opt.replace('_', '-')} {path}: no such file")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")


def check_output_dir(args) -> None:
    """Refuses to mix a new run into a directory holding another one (nothing is overwritten)."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output-dir {out}: exists and is not a directory")
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    resuming_here = (
        bool(args.resume)
        and os.path.isdir(out)
        and os.path.samefile(os.path.dirname(os.path.abspath(args.resume)), out)
    )
    if found and not args.overwrite and not resuming_here:
        raise UserError(
            f"--output-dir {out} already holds a run ({', '.join(found)}); pass --resume "
            f"{os.path.join(out, next((f for f in found if f.startswith('last.')), 'last.pth'))} to continue it, "
            "--overwrite to replace it, "
            "or another --output-dir"
        )


def check_classes(source: str, state: dict, classes: list, where: str) -> None:
    n = checkpoint.fc_classes(state)
    if n is not None and n != len(classes):
        raise UserError(f"{source}: its fc layer has {n} classes but {where} has {len(classes)} class folders")
    saved = state.get("classes")
    if saved is not None and list(saved) != list(classes):
        only_ckpt = sorted(set(saved) - set(classes))[:5]
        only_data = sorted(set(classes) - set(saved))[:5]
        raise UserError(
            f"{source}: trained on other classes than {where} has "
            f"(only in the checkpoint: {only_ckpt}; only in the data: {only_data}; or another order)"
        )


def read_checkpoint(path: str, opt: str) -> dict:
    try:
        state = checkpoint.load(path)
    except Exception as e:  # noqa: BLE001 - truncated file, not a torch file, objects weights_only refuses
        raise UserError(f"--{opt} {path}: cannot be read as a checkpoint: {e}") from None
    if not isinstance(state, dict):
        raise UserError(f"--{opt} {path}: expected a dict, found {type(state).__name__}")
    return state


def load_weights(model: nn.Module, state: dict, source: str, arch: str) -> None:
    try:
        load_checkpoint(model, state, strict=True)
    except ValueError as e:
        raise UserError(f"{source} does not fit --arch {arch}: {e}") from None


def prepare_summary(path: str, last_epoch: Optional[int]) -> None:
    """A fresh run starts a new summary.csv; a resumed one keeps the rows up to its checkpoint's epoch
    (a row written after that checkpoint belongs to an epoch that is run again)."""
    if last_epoch is None or not os.path.exists(path):
        if os.path.exists(path):
            os.unlink(path)
        return
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= last_epoch]
    except (KeyError, TypeError, ValueError, csv.Error) as e:  # TypeError: int(None) of a short row
        raise UserError(
            f"--resume: {path} is not a summary.csv of this pipeline ({type(e).__name__}: {e}); "
            "repair it or move it away (it is rewritten from the next epoch on)"
        ) from None
    lines = [",".join(SUMMARY_FIELDS)] + [",".join(r.get(k, "") for k in SUMMARY_FIELDS) for r in rows]
    checkpoint.write_text_atomic("\n".join(lines) + "\n", path)


def append_summary(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def open_tensorboard(args, info: DistInfo):
    if not (args.tensorboard and info.primary):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("tensorboard is not installed: no event files are written (pip install tensorboard to get them)")
        return None
    return SummaryWriter(os.path.join(args.output_dir, "tensorboard"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(args) -> int:
    info = distributed.init(args.device)
    distributed.set_primary(info.primary)
    validate(args, info)
    if args.output_dir is None:
        args.output_dir = os.path.dirname(os.path.abspath(args.resume)) if args.resume else "runs/train"
    if args.data is None:
        if args.dataset != "digits":
            raise UserError("--data is required: the root of an ImageFolder tree with train/ and val/")
        args.data = os.path.join(args.output_dir, "digits-data")
    if not args.evaluate:
        check_output_dir(args)

    # Data (the digits tree is written once, by the primary rank).
    if args.dataset == "digits":
        if info.primary:
            note = data.ensure_digits_tree(args.data, args.digits_val_fraction, args.split_seed)
            if note:
                log(note)
        distributed.barrier(info)
        data.check_digits_tree(args.data, args.digits_val_fraction, args.split_seed)
    elif not os.path.isdir(args.data):
        raise UserError(f"--data {args.data}: no such directory")
    val_set = data.image_folder(args.data, "val", data.eval_transform(args))
    classes = val_set.classes
    train_set = None
    if not args.evaluate:
        train_set = data.image_folder(args.data, "train", data.train_transform(args))
        if train_set.classes != classes:
            raise UserError(
                f"--data {args.data}: train/ and val/ have different class folders "
                f"({len(train_set.classes)} vs {len(classes)})"
            )
        if len(train_set) < args.batch_size:
            raise UserError(
                f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images "
                "(incomplete batches are dropped)"
            )

    # Model, and the state it starts from.
    seed_everything(args.seed)
    model = finetune.build_model(args, len(classes))
    finetune.check_input_size(args, model)
    resume_state = None
    if args.evaluate:
        state = read_checkpoint(args.checkpoint, "checkpoint")
        check_classes(f"--checkpoint {args.checkpoint}", state, classes, f"{args.data}/val")
        load_weights(model, state, f"--checkpoint {args.checkpoint}", args.arch)
    elif args.resume:
        resume_state = read_checkpoint(args.resume, "resume")
        if "model" not in resume_state or "epoch" not in resume_state:
            raise UserError(
                f"--resume {args.resume}: not a checkpoint of this pipeline (no 'model'/'epoch'); "
                "to start from other weights, evaluate them with --evaluate --checkpoint"
            )
        check_classes(f"--resume {args.resume}", resume_state, classes, f"{args.data}/train")
        load_weights(model, resume_state["model"], f"--resume {args.resume}", args.arch)
        changed = {
            k: (resume_state["args"].get(k), getattr(args, k))
            for k in RESUME_KEYS
            if resume_state.get("args", {}).get(k) != getattr(args, k)
        }
        if changed:
            log(
                "note: resuming with options other than the checkpoint's (this run's apply from here on): "
                + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            )
        finetune.check_optimizer_state(resume_state.get("optimizer", {}), f"--resume {args.resume}")
        resumed_format = "safetensors" if args.resume.endswith(".safetensors") else "pth"
        if args.save_format != resumed_format:  # one run, one format: no last.pth beside a last.safetensors
            log(f"note: --resume {args.resume} is a .{resumed_format} checkpoint: the run goes on writing that format")
            args.save_format = resumed_format
        if args.backbone_weights:
            log(f"note: --backbone-weights {args.backbone_weights} is not read: the weights come from --resume")
    elif args.backbone_weights:
        weights = read_checkpoint(args.backbone_weights, "backbone-weights")
        log(finetune.load_backbone(model, weights, args.backbone_weights))

    device = info.device
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.deterministic
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if info.distributed and (args.sync_bn or (args.sync_bn is None and device.type == "cuda")):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    bare = model

    def wrap(frozen: bool) -> nn.Module:
        """The model to train: the bare one, or a DDP wrapper built after requires_grad is set (DDP reduces the
        gradients of the parameters that required one when it was built, so freezing builds a new one)."""
        finetune.set_backbone_frozen(bare, frozen)
        if not info.distributed:
            return bare
        return DistributedDataParallel(bare, device_ids=[device.index] if device.type == "cuda" else None)

    model = wrap(False)
    criterion = nn.CrossEntropyLoss()
    per_rank_batch = args.batch_size // info.world_size
    log(
        f"{args.arch} ({'fused' if args.fused_head else 'unfused'} head, pool backend {args.pool_backend}, "
        f"iters {args.iters}), {len(classes)} classes, {info.world_size} rank(s) on {device.type}, "
        f"batch {args.batch_size} ({per_rank_batch} a rank)"
    )

    if args.evaluate:
        stats = engine.evaluate(model, criterion, data.val_loader(val_set, args, info, per_rank_batch), args, info)
        log(
            f"{args.checkpoint}: val top-1 {stats['top1']:.2f}%  top-5 {stats['top5']:.2f}%  loss {stats['loss']:.4f}"
            f"  ({stats['images']} images, {'10-crop' if args.ten_crop else '1-crop'}"
            + (f", {stats['bad_images']} unreadable ones skipped)" if stats["bad_images"] else ")")
        )
        return 0

    optimizer = finetune.build_optimizer(bare, args)
    lr_factor = functools.partial(
        LRFactor, args.lr_schedule, args.lr_milestones, args.lr_gamma, args.epochs, args.warmup_epochs
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor())
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start_epoch, best_top1, best_epoch = 0, -1.0, -1
    if resume_state is not None:
        # The checkpoint's optimizer state (momentum buffers) and scheduler position, with this run's learning
        # rates, momentum, weight decay and schedule: an option changed on resume (reported above) applies from the
        # resumed epoch on, as if the run had had it from the start (a cosine run extended by --epochs follows the
        # longer curve).
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        # (a new object: LambdaLR.load_state_dict writes the checkpoint's settings into the one it holds)
        factor = lr_factor()
        optimizer.load_state_dict(resume_state["optimizer"])
        for group, h in zip(optimizer.param_groups, hyper):
            group.update(h)
        scheduler.load_state_dict(resume_state["lr_scheduler"])
        scheduler.lr_lambdas = [factor] * len(optimizer.param_groups)
        scheduler.base_lrs = [h["initial_lr"] for h in hyper]
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch = resume_state["epoch"] + 1
        best_top1, best_epoch = resume_state["best_top1"], resume_state["best_epoch"]
        checkpoint.set_rng_state(resume_state["rng"])
        log(f"resumed from {args.resume}: epoch {resume_state['epoch']} done, best val top-1 {best_top1:.2f}%")

    log(finetune.describe_groups(optimizer))
    if args.freeze_backbone_epochs:
        log(
            f"backbone frozen for epochs 0 .. {args.freeze_backbone_epochs - 1}: no gradient, eval mode "
            "(BatchNorm running statistics used and kept)"
        )

    # Everything is checked: from here on files are written.
    summary_path = os.path.join(args.output_dir, "summary.csv")
    last_name, best_name = (f"{stem}.{args.save_format}" for stem in ("last", "best"))
    last_path, best_path = (os.path.join(args.output_dir, f) for f in (last_name, best_name))
    if info.primary:
        os.makedirs(args.output_dir, exist_ok=True)
        if resume_state is None:
            run_files = [os.path.join(args.output_dir, f) for f in RUN_FILES if f != "summary.csv"]
            for f in (*run_files, os.path.join(args.output_dir, "head_timing.json")):
                if os.path.exists(f):
                    os.unlink(f)  # --overwrite: no file of the old run survives
        prepare_summary(summary_path, None if resume_state is None else resume_state["epoch"])
        checkpoint.write_text_atomic(args_to_yaml(args), os.path.join(args.output_dir, "args.yaml"))
    writer = open_tensorboard(args, info)
    if start_epoch >= args.epochs:
        log(f"nothing to do: the checkpoint has finished epoch {start_epoch - 1} of --epochs {args.epochs}")
        return 0

    train_loader = data.train_loader(train_set, args, info, per_rank_batch)
    val_loader = data.val_loader(val_set, args, info, per_rank_batch)
    head_timer = engine.HeadTimer(args.time_head_steps, device) if args.time_head_steps and info.primary else None
    bad_train = engine.BadImages("training", len(train_set), args.max_bad_images)
    bad_val = engine.BadImages("validation", len(val_set), args.max_bad_images)

    def save_last(epoch: int, row: dict) -> None:
        checkpoint.save(
            {
                "format": checkpoint.FORMAT,
                "model": bare.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "epoch": epoch,
                "best_top1": best_top1,
                "best_epoch": best_epoch,
                "metrics": row,
                "args": vars(args),
                "classes": classes,
                "sampler": train_loader.sampler.state_dict(),
                "rng": checkpoint.rng_state(),
            },
            last_path,
        )

    run_start = time.perf_counter()
    frozen_now = False
    for epoch in range(start_epoch, args.epochs):
        frozen = epoch < args.freeze_backbone_epochs
        if frozen != frozen_now:
            model, frozen_now = wrap(frozen), frozen
            if not frozen:
                log(f"epoch {epoch}: the backbone is trained from here on")
        train_loader.sampler.set_epoch(epoch)
        train_stats = engine.train_one_epoch(
            model,
            criterion,
            optimizer,
            train_loader,
            epoch,
            args,
            info,
            scaler,
            head_timer,
            bad_train,
            frozen=finetune.backbone_modules(bare) if frozen else (),
        )
        scheduler.step()
        row = {
            "epoch": epoch,
            "lr": f"{train_stats['lr']:.6g}",
            **{f"train_{k}": f"{train_stats[k]:.6f}" for k in ("loss", "top1", "top5")},
            "train_bad_images": train_stats["bad_images"],
        }
        if info.primary:  # the epoch's training survives a failure of its validation
            save_last(epoch, row)
        val_stats = engine.evaluate(model, criterion, val_loader, args, info, desc=f"Val {epoch}", bad_images=bad_val)
        is_best = val_stats["top1"] > best_top1
        if is_best:
            best_top1, best_epoch = val_stats["top1"], epoch
        row = {
            **row,
            **{f"val_{k}": f"{val_stats[k]:.6f}" for k in ("loss", "top1", "top5")},
            "val_bad_images": val_stats["bad_images"],
            "best_val_top1": f"{best_top1:.6f}",
            "train_img_s": f"{train_stats['img_s']:.2f}",
            "epoch_s": f"{train_stats['seconds'] + val_stats['seconds']:.2f}",
        }
        log(
            f"epoch {epoch}: train loss {train_stats['loss']:.4f} top-1 {train_stats['top1']:.2f}% | val loss "
            f"{val_stats['loss']:.4f} top-1 {val_stats['top1']:.2f}% top-5 {val_stats['top5']:.2f}% | "
            f"{train_stats['img_s']:.1f} img/s | {row['epoch_s']} s"
            + (
                f" | skipped unreadable images: {row['train_bad_images']} train, {row['val_bad_images']} val"
                if row["train_bad_images"] or row["val_bad_images"]
                else ""
            )
        )
        if info.primary:
            append_summary(summary_path, row)
            save_last(epoch, row)
            if is_best:
                checkpoint.copy_atomic(last_path, best_path)
            if writer is not None:
                for k in ("loss", "top1", "top5"):
                    writer.add_scalar(f"train/{k}", train_stats[k], epoch)
                    writer.add_scalar(f"val/{k}", val_stats[k], epoch)
                writer.add_scalar("lr", train_stats["lr"], epoch)
                writer.flush()
    if writer is not None:
        writer.close()
    log(
        f"done in {time.perf_counter() - run_start:.1f} s: final val top-1 {val_stats['top1']:.2f}% "
        f"(best {best_top1:.2f}% at epoch {best_epoch})"
    )
    if head_timer is not None:
        log(head_timer.summary())
        if head_timer.result is not None:
            checkpoint.write_text_atomic(
                json.dumps(head_timer.result, indent=1) + "\n", os.path.join(args.output_dir, "head_timing.json")
            )
    log_run_files(args, info, epoch, best_epoch)
    return 0


def log_run_files(args, info: DistInfo, last_epoch: int, best_epoch: int) -> None:
    """Where the run's files are, and the commands that evaluate and resume it."""
    out = args.output_dir
    last, best = f"last.{args.save_format}", f"best.{args.save_format}"
    log(
        f"run files in {out}: {last} (checkpoint of epoch {last_epoch}), {best} (epoch {best_epoch}, "
        "best val top-1), summary.csv (one row an epoch), args.yaml (every option)"
    )
    options = options_of(
        args,
        skip=("output_dir", "overwrite", "resume", "evaluate", "checkpoint", "data", "backbone_weights"),
    )
    start = launcher(info) + options + ["--data", args.data]
    log("evaluate it: " + shlex.join(start + ["--evaluate", "--checkpoint", os.path.join(out, best)]))
    log(
        "resume it (after an interruption): "
        + shlex.join(start + ["--output-dir", out, "--resume", os.path.join(out, last)])
    )


def launcher(info: DistInfo) -> list[str]:
    """The start of a command line that runs this program as it runs now."""
    if info.distributed:
        return ["torchrun", f"--nproc_per_node={info.world_size}", "-m", "train"]
    python = os.path.relpath(sys.executable)
    if python.startswith(".."):
        python = sys.executable
    elif os.sep not in python:
        python = os.path.join(os.curdir, python)
    return [python, "-m", "train"]
