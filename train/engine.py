"""train_one_epoch / evaluate, their progress line, and the pooling head's share of step time."""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from typing import Optional, Sequence

import torch
from torch import nn

from threeg_kernels.models import average_crops

from . import distributed
from .config import UserError
from .distributed import DistInfo

try:
    from tqdm import tqdm
except ImportError:  # a plain line instead
    tqdm = None


class Progress:
    """Primary rank only: a tqdm bar on a terminal, else one plain line every `print_freq` steps.
    Both show the step, ETA, running loss, top-1/top-5, img/s (all ranks) and lr."""

    def __init__(self, total: int, desc: str, print_freq: int, enabled: bool):
        self.total, self.desc, self.print_freq = total, desc, max(1, print_freq)
        self.enabled = enabled
        self.bar = None
        if enabled and tqdm is not None and sys.stdout.isatty():
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)
        self.start = time.perf_counter()

    def due(self, step: int) -> bool:
        """Whether update() at this (1-based) step shows anything; the caller syncs the device only then."""
        return self.enabled and (self.bar is not None or step % self.print_freq == 0 or step == self.total)

    def update(self, step: int, fields: dict) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(" ".join(f"{k} {v}" for k, v in fields.items()), refresh=False)
            self.bar.refresh()
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (self.total - step)
        width = len(str(self.total))
        line = f"{self.desc} [{step:>{width}}/{self.total}] eta {_hms(eta)} " + " ".join(
            f"{k} {v}" for k, v in fields.items()
        )
        distributed.log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def correct_topk(output: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the top-k logits, for each k (k capped at the class count)."""
    maxk = min(max(ks), output.shape[1])
    pred = output.topk(maxk, dim=1).indices
    hit = pred.eq(target[:, None])
    return torch.stack([hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks])


def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits of (B, 3, H, W) images, or crop-averaged logits of (B, ncrops, 3, H, W) crops (TenCrop)."""
    if images.dim() == 5:
        return average_crops(model(images.flatten(0, 1)), images.shape[1])
    return model(images)


def set_train_mode(model: nn.Module, freeze_bn: bool, frozen: Sequence[nn.Module] = ()) -> None:
    """Training mode, except BatchNorm with freeze_bn and the `frozen` modules (a frozen backbone): eval mode,
    so that their BatchNorm layers normalise with, and keep, their running statistics."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    for m in frozen:
        m.eval()


def autocast(args, device: torch.device):
    if args.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if args.amp == "fp16" else torch.bfloat16)


def _to_device(images, target, device, channels_last):
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(device, non_blocking=True)


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2: the profiler's C++ side prints start/stop lines (and, without a GPU,
    a device-count error) there; Python exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class HeadTimer:
    """The pooling head's share of training step time, measured with torch.profiler.

    Every cov_pool backend but 'reference' runs as two registered ops, threeg::cov_pool_<backend>_forward
    and threeg::cov_pool_<backend>_backward (e.g. threeg::cov_pool_torch_forward; the backward op is what
    autograd calls), so the profiler records each call of the head under one name, with the time from its
    start to its end (children included). The 'reference' backend is plain ATen ops under autograd and
    is not attributed.
    `steps` training steps are profiled after `warmup` unprofiled ones; the step time is the wall time
    from moving the batch to the device to the end of optimizer.step() (data loading excluded), and
    the head time is the sum of those ops' durations in the same steps. On CUDA the device is
    synchronised at step ends and the head's time is its kernels' device time.
    """

    OP = re.compile(r"^threeg::cov_pool_(\w+)_(forward|backward)$")

    def __init__(self, steps: int, device: torch.device, warmup: int = 1):
        self.steps, self.device, self.warmup = steps, device, warmup
        self.prof = None
        self.step_times: list[float] = []
        self.result: Optional[dict] = None

    def active(self, step: int) -> bool:
        return self.result is None and self.warmup <= step < self.warmup + self.steps

    def before_step(self, step: int) -> None:
        if step == self.warmup and self.result is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            with _quiet_stderr():
                self.prof.__enter__()

    def after_step(self, step: int, seconds: float, batch: int) -> None:
        self.step_times.append(seconds)
        if step == self.warmup + self.steps - 1:
            self.finish(batch)

    def finish(self, batch: int) -> None:
        if self.prof is None or self.result is not None:
            return
        with _quiet_stderr():
            self.prof.__exit__(None, None, None)
        head_us, ops = 0.0, set()
        for ev in self.prof.events():
            match = self.OP.match(ev.name)
            if not match or self._inside_head(ev):
                continue
            ops.add(ev.name)
            head_us += ev.device_time_total if self.device.type == "cuda" else ev.cpu_time_total
        n = len(self.step_times)
        step_ms = 1e3 * sum(self.step_times) / max(n, 1)
        head_ms = head_us / 1e3 / max(n, 1)
        self.result = {
            "steps": n,
            "batch_per_rank": batch,
            "step_ms": step_ms,
            "head_ms": head_ms,
            "head_share": head_ms / step_ms if step_ms > 0 else float("nan"),
            "ops": sorted(ops),
        }
        self.prof = None

    def _inside_head(self, ev) -> bool:
        parent = ev.cpu_parent
        while parent is not None:
            if self.OP.match(parent.name):
                return True
            parent = parent.cpu_parent
        return False

    def summary(self) -> str:
        r = self.result
        if r is None:
            return "head timing: not measured (fewer training steps than --time-head-steps + 1)"
        if not r["ops"]:
            return (
                "head timing: no threeg::cov_pool_*_forward/_backward op ran (the 'reference' backend, "
                "e.g. --pool-backend reference, is plain ATen ops and is not attributed)"
            )
        return (
            f"head (cov_pool forward + backward, {', '.join(r['ops'])}): {r['head_ms']:.1f} ms of "
            f"{r['step_ms']:.1f} ms per training step = {100 * r['head_share']:.1f}% "
            f"(torch.profiler over {r['steps']} steps of {r['batch_per_rank']} images)"
        )


class BadImages:
    """Unreadable images of one split: each file is reported once (with its reason), the ones skipped in the
    current epoch are counted, and more than `max_fraction` of the split raises UserError."""

    def __init__(self, split: str, size: int, max_fraction: float):
        self.split, self.size, self.max_fraction = split, size, max_fraction
        self.reported: set = set()
        self.count = 0

    def start_epoch(self) -> None:
        self.count = 0

    def add(self, bad: list) -> None:
        for item in bad:
            self.count += 1
            if item.path not in self.reported:
                self.reported.add(item.path)
                # every rank: each sees its own shard's files
                print(f"warning: skipped unreadable {self.split} image {item.path} ({item.reason})", flush=True)
        if bad and self.count > self.max_fraction * self.size:
            raise UserError(
                f"{self.count} of the {self.size} {self.split} images are unreadable (more than "
                f"--max-bad-images {self.max_fraction:g} of the split), e.g. {bad[0].path}; repair the data "
                "or raise --max-bad-images"
            )


class PoolWatch:
    """Whether the pooling head's input (layer_reduce_relu output) and output (fc input) were finite, recorded
    on the device without a sync: the first step where each was not (-1: none yet)."""

    def __init__(self, model: nn.Module, device: torch.device):
        bare = getattr(model, "module", model)
        self.handles = []
        self.first_in = torch.full((), -1, dtype=torch.long, device=device)
        self.first_out = torch.full((), -1, dtype=torch.long, device=device)
        self.step = 0
        head = getattr(bare, "head", None)  # a timm backbone with the head (CovPoolModel): its head's layers
        fc = getattr(head if head is not None else bare, "fc", None)
        before = getattr(head, "reduce", None) if head is not None else getattr(bare, "layer_reduce_relu", None)
        if isinstance(fc, nn.Module) and isinstance(before, nn.Module):
            self.handles.append(before.register_forward_hook(lambda m, i, o: self._mark("first_in", o)))
            self.handles.append(fc.register_forward_pre_hook(lambda m, i: self._mark("first_out", i[0])))

    def _mark(self, name: str, t) -> None:
        if isinstance(t, torch.Tensor):
            first = getattr(self, name)
            bad = ~torch.isfinite(t.detach()).all()
            setattr(self, name, torch.where((first < 0) & bad, torch.full_like(first, self.step), first))

    def cause(self, args, device: torch.device) -> Optional[str]:
        """'non-finite output of cov_pool ...' if the pooling turned finite input into non-finite output."""
        first_in, first_out = int(self.first_in), int(self.first_out)
        if first_out < 0 or 0 <= first_in <= first_out:
            return None
        backend = args.pool_backend if args.pool_backend != "auto" else f"auto on {device.type}"
        return (
            f"non-finite output of cov_pool (backend '{backend}', iters {args.iters}) at step {first_out} "
            "from finite input"
        )

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _nonfinite_loss(loss_value: float, epoch: int, step: Optional[int], watch: PoolWatch, args, device) -> UserError:
    where = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
    cause = watch.cause(args, device)
    if cause is not None:
        return UserError(
            f"the training loss became {loss_value} in {where}: {cause}; try another --pool-backend, more "
            "--iters, or --amp none"
        )
    return UserError(
        f"the training loss became {loss_value} in {where}; lower --lr, or use --amp none / bf16 instead of fp16"
    )


def _all_ranks(count: int, device: torch.device, info: DistInfo) -> int:
    return int(distributed.all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64, device=device), info)[0])


def _max_bad(args) -> float:
    return getattr(args, "max_bad_images", 0.01)


def train_one_epoch(
    model,
    criterion,
    optimizer,
    loader,
    epoch: int,
    args,
    info: DistInfo,
    scaler,
    head_timer: Optional[HeadTimer] = None,
    bad_images: Optional[BadImages] = None,
    frozen: Sequence[nn.Module] = (),
) -> dict:
    set_train_mode(model, args.freeze_bn, frozen)
    device = info.device
    if bad_images is None:
        bad_images = BadImages("training", len(loader.dataset), _max_bad(args))
    bad_images.start_epoch()
    watch = PoolWatch(model, device)
    try:
        return _train_steps(
            model, criterion, optimizer, loader, epoch, args, info, scaler, head_timer, bad_images, watch
        )
    finally:
        watch.close()


def _train_steps(model, criterion, optimizer, loader, epoch, args, info, scaler, head_timer, bad_images, watch):
    device = info.device
    lr = optimizer.param_groups[0]["lr"]
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss * n, top-1 hits, top-5 hits, n
    progress = Progress(len(loader), f"Epoch {epoch}/{args.epochs - 1}", args.print_freq, info.primary)
    epoch_start = time.perf_counter()
    last_time, last_count = epoch_start, 0
    for step, (images, target, bad) in enumerate(loader):
        bad_images.add(bad)
        if images is None:  # every image of this batch was unreadable
            if info.distributed:  # the other ranks would wait for this one's gradients
                raise UserError(f"every image of training batch {step} of this rank is unreadable, e.g. {bad[0].path}")
            continue
        watch.step = step
        profiling = head_timer is not None and head_timer.active(step)
        if profiling:
            head_timer.before_step(step)
        t0 = time.perf_counter()
        images, target = _to_device(images, target, device, args.channels_last)
        with autocast(args, device):
            output = model(images)
            loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if profiling:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            head_timer.after_step(step, time.perf_counter() - t0, images.shape[0])

        n = images.shape[0]
        with torch.no_grad():
            sums += torch.cat(
                [
                    (loss.detach().double() * n).view(1),
                    correct_topk(output.detach(), target).double(),
                    sums.new_tensor([n]),
                ]
            )
        if progress.due(step + 1):
            local = sums.tolist()
            if not math.isfinite(local[0]):
                raise _nonfinite_loss(local[0], epoch, step, watch, args, device)
            now = time.perf_counter()
            img_s = (local[3] - last_count) * info.world_size / max(now - last_time, 1e-9)
            last_time, last_count = now, local[3]
            progress.update(
                step + 1,
                {
                    "loss": f"{loss.item():.4f} ({local[0] / local[3]:.4f})",
                    "top1": f"{100 * local[1] / local[3]:.2f}",
                    "top5": f"{100 * local[2] / local[3]:.2f}",
                    "img/s": f"{img_s:.1f}",
                    "lr": f"{lr:.4g}",
                },
            )
    progress.close()
    if head_timer is not None:
        head_timer.finish(loader.batch_size)
    seconds = time.perf_counter() - epoch_start
    loss_sum, top1, top5, count = distributed.all_reduce_sum(sums, info).tolist()
    if count == 0:
        raise UserError(
            f"no training step ran: {len(loader.dataset)} images and a batch of "
            f"{loader.batch_size} a rank (drop_last); lower --batch-size"
        )
    if not math.isfinite(loss_sum):
        raise _nonfinite_loss(loss_sum, epoch, None, watch, args, device)
    return {
        "loss": loss_sum / count,
        "top1": 100 * top1 / count,
        "top5": 100 * top5 / count,
        "images": int(count),
        "seconds": seconds,
        "img_s": count / seconds,
        "lr": lr,
        "bad_images": _all_ranks(bad_images.count, device, info),
    }


@torch.no_grad()
def evaluate(
    model, criterion, loader, args, info: DistInfo, desc: str = "Val", bad_images: Optional[BadImages] = None
) -> dict:
    model.eval()
    device = info.device
    if bad_images is None:
        bad_images = BadImages("validation", len(loader.dataset), _max_bad(args))
    bad_images.start_epoch()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    progress = Progress(len(loader), desc, args.print_freq, info.primary)
    start = time.perf_counter()
    for step, (images, target, bad) in enumerate(loader):
        bad_images.add(bad)
        if images is None:
            continue
        images, target = _to_device(images, target, device, args.channels_last)
        with autocast(args, device):
            output = predict(model, images)
        loss = criterion(output.float(), target)
        n = images.shape[0]
        sums += torch.cat([(loss.double() * n).view(1), correct_topk(output, target).double(), sums.new_tensor([n])])
        if progress.due(step + 1):
            local = sums.tolist()
            progress.update(
                step + 1,
                {
                    "loss": f"{local[0] / local[3]:.4f}",
                    "top1": f"{100 * local[1] / local[3]:.2f}",
                    "top5": f"{100 * local[2] / local[3]:.2f}",
                    "img/s": f"{local[3] * info.world_size / (time.perf_counter() - start):.1f}",
                },
            )
    progress.close()
    loss_sum, top1, top5, count = distributed.all_reduce_sum(sums, info).tolist()
    count = max(count, 1)
    return {
        "loss": loss_sum / count,
        "top1": 100 * top1 / count,
        "top5": 100 * top5 / count,
        "images": int(count),
        "seconds": time.perf_counter() - start,
        "bad_images": _all_ranks(bad_images.count, device, info),
    }
