"""Training and evaluation loops for `main.py`, CPU first, optionally distributed.

Distributed runs are started by ``torchrun`` (env:// rendezvous, gloo backend, so several
CPU-only machines can share a job). Evaluation never pads: each rank takes the disjoint
shard ``indices[rank::world]`` and the integer/float64 totals are summed with all_reduce, so
any number of processes reports the numbers of a single one.
"""
import copy
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vim_rpi.errors import TrainingError, option
from vim_rpi.progress import progress_bar

__all__ = [
    "TrainingError", "init_distributed", "rank_and_world", "is_main_process", "shard",
    "evaluate", "train_one_epoch", "param_groups_weight_decay",
    "warmup_cosine_lr", "build_lr_scheduler", "ModelEma",
]


# ---------------------------------------------------------------- distributed helpers

def init_distributed():
    """Join the torchrun job described by RANK / WORLD_SIZE / MASTER_ADDR, if any.

    Returns (rank, world_size); (0, 1) when not started by torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://")
    return rank_and_world()


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process():
    return rank_and_world()[0] == 0


def shard(indices, rank, world):
    """This rank's disjoint share of `indices`; the shares cover every index exactly once."""
    return list(indices)[rank::world]


def _all_reduce_sum(tensor):
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# ---------------------------------------------------------------- evaluation

def _loader(dataset, indices, batch_size, num_workers, shuffle=False, generator=None):
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=shuffle,
        num_workers=num_workers, generator=generator, drop_last=False)


@torch.no_grad()
def evaluate(model, dataset, indices, *, batch_size=1, num_workers=0, device="cpu",
             show_progress=True, desc="eval"):
    """Top-1 / top-5 accuracy and mean cross-entropy of `model` (a module, or any callable from
    images to logits, e.g. `Classifier.logits`) over dataset[indices].

    Every rank of a distributed job must call this with the same `indices`; it evaluates
    its shard and the totals are summed over ranks.

    Returns a dict: count, correct1, correct5 (ints), loss_sum (float), acc1, acc5 (percent),
    loss (mean). Top-5 becomes top-k with k = num_classes when there are fewer than 5 classes.
    """
    rank, world = rank_and_world()
    local = shard(indices, rank, world)
    if isinstance(model, torch.nn.Module):
        model.eval()
    counts = torch.zeros(3, dtype=torch.int64)  # correct@1, correct@5, samples
    loss_sum = torch.zeros(1, dtype=torch.float64)
    with progress_bar(len(local), f"{desc} (rank 0 of {world})" if world > 1 else desc,
                      enabled=show_progress and rank == 0, unit="img") as progress:
        for images, targets in _loader(dataset, local, batch_size, num_workers):
            logits = model(images.to(device)).float().cpu()  # (b, num_classes)
            topk = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (b, k)
            hits = topk == targets[:, None]
            counts += torch.tensor([hits[:, 0].sum(), hits.any(dim=1).sum(), len(targets)])
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
            progress.set_postfix_str(f"top-1 {100.0 * counts[0] / counts[2]:.2f}%", refresh=False)
            progress.update(len(targets))
    _all_reduce_sum(counts)
    _all_reduce_sum(loss_sum)
    correct1, correct5, count = (int(v) for v in counts)
    total_loss = float(loss_sum)
    return {
        "count": count, "correct1": correct1, "correct5": correct5, "loss_sum": total_loss,
        "acc1": 100.0 * correct1 / count if count else float("nan"),
        "acc5": 100.0 * correct5 / count if count else float("nan"),
        "loss": total_loss / count if count else float("nan"),
    }


# ---------------------------------------------------------------- training

def train_one_epoch(model, criterion, loader, optimizer, lr_scheduler, *, epoch, device="cpu",
                    model_ema=None, clip_grad=None, show_progress=True):
    """One pass over `loader`, stepping the optimizer and the per-iteration schedule.

    `model` may be wrapped in DistributedDataParallel; the EMA follows the unwrapped module.
    Returns {'loss': mean training loss over all ranks' samples, 'lr': the learning rate of
    the epoch's last step}.
    """
    model.train()
    net = getattr(model, "module", model)
    totals = torch.zeros(2, dtype=torch.float64)  # loss * batch, samples
    lr = optimizer.param_groups[0]["lr"]
    with progress_bar(len(loader.sampler), f"epoch {epoch}", enabled=show_progress and is_main_process(),
                      unit="img") as progress:
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            loss = criterion(model(images), targets)
            if not torch.isfinite(loss):
                raise TrainingError(f"the training loss became {loss.item()} in epoch {epoch}; "
                                    f"stopping (try a lower {option('lr')} or {option('clip_grad')})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            lr_scheduler.step()
            if model_ema is not None:
                model_ema.update(net)
            totals += torch.tensor([loss.item() * len(targets), len(targets)], dtype=torch.float64)
            progress.set_postfix_str(f"loss {totals[0] / totals[1]:.4f} lr {lr:.2e}", refresh=False)
            progress.update(len(targets))
    _all_reduce_sum(totals)
    return {"loss": float(totals[0] / totals[1]) if totals[1] else float("nan"), "lr": lr}


def param_groups_weight_decay(model, weight_decay):
    """AdamW parameter groups: no decay for 1-D tensors (norms, biases) and the names the
    model lists in ``no_weight_decay()`` (pos_embed, cls_token), as timm's optimizer factory."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def warmup_cosine_lr(step, *, base_lr, min_lr, warmup_lr, warmup_steps, total_steps):
    """Learning rate at iteration `step`: linear warm-up from warmup_lr to base_lr over
    warmup_steps, then a half cosine from base_lr down to min_lr at total_steps."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer, *, base_lr, min_lr, warmup_lr, warmup_steps, total_steps):
    """Per-iteration warm-up + cosine schedule (call .step() after every optimizer step).

    A LambdaLR, so its state_dict holds only numbers and a checkpoint stays loadable with
    torch.load(weights_only=True). All groups must start at base_lr (> 0).
    """
    def factor(step):
        return warmup_cosine_lr(step, base_lr=base_lr, min_lr=min_lr, warmup_lr=warmup_lr,
                                warmup_steps=warmup_steps, total_steps=total_steps) / base_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ModelEma:
    """Exponential moving average of a model's weights (as timm's ModelEma).

    After each optimizer step: ema = decay * ema + (1 - decay) * weights, for every floating
    point entry of the state dict; integer buffers are copied.
    """

    def __init__(self, model, decay):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        current = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = current[name].detach()
            if ema_value.dtype.is_floating_point:
                ema_value.mul_(self.decay).add_(value, alpha=1.0 - self.decay)
            else:
                ema_value.copy_(value)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state_dict):
        self.module.load_state_dict(state_dict)
