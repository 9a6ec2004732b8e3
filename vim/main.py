"""Evaluate or fine-tune a Vision Mamba (Vim) classifier on the CPU, on one machine or several.

    python vim/main.py --eval --resume CKPT --data-path DIR
    python -m torch.distributed.run --nproc_per_node 2 vim/main.py --eval --resume CKPT --data-path DIR
    python vim/main.py --finetune CKPT --data-path DIR --epochs 10 --output-dir OUT
    python vim/main.py --resume OUT/checkpoint.pth --data-path DIR --epochs 10 --output-dir OUT

The CPU counterpart of upstream's DeiT-derived main.py, with its flag names where they exist.
Differences: the device is the CPU unless --device cuda is asked for; timm and torchvision are
optional (timm supplies upstream's training augmentation when it imports); no mixup,
distillation or AMP; --lr is the peak learning rate as given (upstream multiplies it by
batch size x processes / 512); evaluation shards the images without padding, so several
processes or machines (torchrun, gloo) report exactly the numbers of one process. Training
under torchrun runs DistributedDataParallel over gloo; checkpoints are written by rank 0.

Data: ImageFolder layout. Evaluation reads DIR/val/<class>/<images> (or DIR/<class>/...),
training DIR/train/<class>/... (or DIR/<class>/...) and evaluates on DIR/val after every epoch
when it exists. Class indices are the sorted folder names, as torchvision's ImageFolder.
Images go through the same loader and transform as infer_rpi.py (exact decode).
"""

import argparse
import dataclasses
import json
import logging
import os
import random
import sys
from pathlib import Path

try:
    import numpy as np
    import torch
    import torch.distributed as dist

    from vim_rpi import checkpoint_io, cli, engine, factory, folder_dataset, hub, image_preprocess, runtime
    from vim_rpi.classifier import Classifier, ClassifierConfig
    from vim_rpi.errors import CheckpointError, ConfigError, DatasetError, DownloadError, TrainingError
except ModuleNotFoundError as missing:  # run from a checkout that was never installed
    sys.exit(f"error: {missing}; install the project first: pip install -e causal-conv1d -e mamba-1p1p1 -e . "
             f"(or bash scripts/setup_rpi.sh)")

_log = logging.getLogger("main")

EPILOG = f"""\
output:
  stdout: the results (top-1 / top-5 accuracy and mean cross-entropy); with --json exactly one
  JSON object: {{"mode", "model", "checkpoint", "data", "world_size", "eval": {{"count",
  "correct1", "correct5", "acc1", "acc5", "loss", "loss_sum"}}}}, plus for training "epochs":
  [{{"epoch", "train_loss", "lr", "eval"}}] and "output_dir". Progress and logs go to stderr
  (rank 0 only); training also appends one JSON line per epoch to OUTPUT_DIR/log.txt.

{cli.EXIT_CODES_HELP}
{cli.ENVIRONMENT_HELP}
distributed:
  torchrun sets RANK / WORLD_SIZE / MASTER_ADDR; processes join with the gloo backend, so
  CPU-only machines work: on each of N Pis run
  torchrun --nnodes N --node_rank I --nproc_per_node 1 --master_addr HOST --master_port 29500 \\
      vim/main.py --eval ...
  torchrun sets OMP_NUM_THREADS=1 when it starts several processes per machine; pass --threads.
"""


OUTPUT_FILES = ("checkpoint.pth", "best_checkpoint.pth", "log.txt")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py", description="Evaluate or fine-tune Vision Mamba (Vim) on the CPU.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    task = parser.add_argument_group("what to run")
    task.add_argument("--eval", action="store_true",
                      help="evaluate the --resume checkpoint on the validation images and exit")
    task.add_argument("--resume", default="", metavar="CKPT",
                      help="with --eval: the checkpoint to evaluate (path or URL); otherwise a "
                           "training checkpoint to continue from the epoch after its last one")
    task.add_argument("--finetune", default="", metavar="CKPT",
                      help="start training from these weights (path or URL); the head is "
                           "replaced when its class count differs from the dataset's")
    task.add_argument("--model", metavar="NAME",
                      help="registered model name or alias, e.g. vim_tiny [default: the "
                           "architecture stored in the checkpoint]")
    cli.add_checkpoint_arguments(task)

    data = parser.add_argument_group("data")
    data.add_argument("--data-path", metavar="DIR", required=True,
                      help="ImageFolder root: DIR/train and DIR/val, or DIR/<class>/<images>")
    data.add_argument("--input-size", type=int, metavar="PX",
                      help="side of the square model input [default: the checkpoint's]")
    cli.add_image_budget_argument(data)
    data.add_argument("--batch-size", type=int, default=1, metavar="N",
                      help="images per forward pass (per process) [%(default)s]")
    data.add_argument("--num-workers", "--num_workers", type=int, default=0, metavar="N",
                      help="background processes decoding images; 0 decodes in the main "
                           "process [%(default)s]")
    data.add_argument("--limit", type=int, metavar="N",
                      help="evaluate only N images, evenly spread over the sorted list "
                           "(a quick estimate covering all classes)")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=30, metavar="N",
                       help="total epochs, counting those of a --resume checkpoint [%(default)s]")
    train.add_argument("--lr", type=float, default=5e-4, metavar="LR",
                       help="peak learning rate, used as given (no batch-size scaling) [%(default)s]")
    train.add_argument("--min-lr", type=float, default=1e-5, metavar="LR",
                       help="learning rate at the end of the cosine [%(default)s]")
    train.add_argument("--warmup-lr", type=float, default=1e-6, metavar="LR",
                       help="learning rate at the start of the warm-up [%(default)s]")
    train.add_argument("--warmup-epochs", type=float, default=5, metavar="N",
                       help="linear warm-up length, in epochs (may be fractional) [%(default)s]")
    train.add_argument("--weight-decay", type=float, default=0.05, metavar="WD",
                       help="AdamW weight decay; none on biases, norms, pos_embed, cls_token "
                            "[%(default)s]")
    train.add_argument("--smoothing", type=float, default=0.1, metavar="EPS",
                       help="label smoothing of the training loss [%(default)s]")
    train.add_argument("--drop", type=float, default=0.0, metavar="P", help="dropout [%(default)s]")
    train.add_argument("--drop-path", type=float, default=0.1, metavar="P",
                       help="stochastic depth rate [%(default)s]")
    train.add_argument("--clip-grad", type=float, metavar="NORM",
                       help="clip the gradient norm to NORM [default: no clipping]")
    train.add_argument("--model-ema", action="store_true",
                       help="keep an exponential moving average of the weights (saved as "
                            "model_ema); off by default on the CPU (upstream: on)")
    train.add_argument("--model-ema-decay", type=float, default=0.99996, metavar="D",
                       help="EMA weight of the previous average at each step [%(default)s]")
    train.add_argument("--output-dir", "--output_dir", default="", metavar="DIR",
                       help="where checkpoint.pth, best_checkpoint.pth and log.txt are written "
                            "[default: nothing is saved]")
    train.add_argument("--seed", type=int, default=0,
                       help="seeds the new head, shuffling, augmentation, drop-path [%(default)s]")

    run = parser.add_argument_group("runtime")
    cli.add_runtime_arguments(run)
    run.add_argument("-t", "--threads", type=int, metavar="N",
                     help="CPU threads per process [default: torch's choice]")
    run.add_argument("--json", action="store_true", help="print one JSON object as the result")
    run.add_argument("-q", "--quiet", action="store_true",
                     help="no progress bar or information on stderr (errors still shown)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ClassifierConfig:
    """Reject usage errors (exit 2) before any slow work; the model's config."""
    if args.eval and not args.resume:
        parser.error("--eval needs the checkpoint to evaluate: --resume CKPT")
    if args.eval and args.finetune:
        parser.error("--eval evaluates --resume CKPT; drop --finetune")
    if not args.eval and not (args.resume or args.finetune or args.model):
        parser.error("nothing to start from: pass --finetune CKPT (or --resume CKPT to continue, "
                     "or --model NAME to train from scratch)")
    if args.ema and not args.eval:
        parser.error("--ema selects the weights to evaluate; use it with --eval")
    if args.backend == "numba" and not args.eval:
        parser.error("--backend numba runs inference only; train with --backend auto or torch")
    positive = {"--batch-size": args.batch_size, "--epochs": args.epochs, "--limit": args.limit}
    for flag, value in positive.items():
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.min_lr < 0 or args.warmup_lr < 0 or args.warmup_epochs < 0 or args.weight_decay < 0:
        parser.error("--min-lr, --warmup-lr, --warmup-epochs and --weight-decay must be >= 0")
    for flag, value in {"--smoothing": args.smoothing, "--drop": args.drop,
                        "--drop-path": args.drop_path, "--model-ema-decay": args.model_ema_decay}.items():
        if not 0 <= value < 1:
            parser.error(f"{flag} must be in [0, 1), got {value}")
    if args.output_dir and not args.eval:
        out = Path(args.output_dir)
        if out.exists() and not out.is_dir():
            parser.error(f"--output-dir: {out} is not a directory")
        for path in (out / name for name in OUTPUT_FILES):
            if path.is_dir():
                parser.error(f"--output-dir: {path} is a directory")
    # --eval reads the checkpoint at its official pixels (exact decode), as the published accuracies were measured
    return cli.classifier_config(parser, args, spell=spell, checkpoint=args.resume or args.finetune,
                                 exact_preprocess=True)


def spell(name):
    """This command line's spelling of option `name` (the checkpoint is --resume or --finetune)."""
    return "--resume/--finetune" if name == "checkpoint" else cli.flag(name)


# ---------------------------------------------------------------- shared steps

def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random (augmentation and drop-path draw from torch)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def fetch_checkpoint(spec: str, quiet: bool) -> None:
    """Make sure checkpoint `spec` (path, URL or Hub reference) is fetched before it is loaded.
    In a distributed job one process per machine downloads while the others wait, then
    they find the file in the cache (or fail the same way); a single process fetches while
    loading, where a damaged cached download is fetched again."""
    rank, world = engine.rank_and_world()
    if world == 1:
        return
    error = None
    if int(os.environ.get("LOCAL_RANK", rank)) == 0:
        try:
            hub.fetch_checkpoint(spec, progress=not quiet)
        except DownloadError as exc:
            error = exc  # raised after the barrier, so the waiting processes are released
    dist.barrier()
    if error is not None:
        raise error


def subset_indices(size: int, limit) -> list:
    """All of range(size), or `limit` indices spread evenly over it (in order)."""
    if limit is None or limit >= size:
        return list(range(size))
    return [i * size // limit for i in range(limit)]


def check_class_count(dataset, num_classes: int) -> None:
    """Folder classes map to output indices 0..K-1 in sorted order; refuse impossible ones."""
    found = len(dataset.classes)
    if found > num_classes:
        raise DatasetError(
            f"{dataset.root} has {found} class folders but the model predicts {num_classes} "
            f"classes; use a checkpoint for this dataset (or fine-tune one with --finetune)")
    if found < num_classes:
        _log.warning("%s has %d class folders, the model %d classes: folder i (in sorted order) "
                     "is scored as output class i", dataset.root, found, num_classes)


def eval_dataset(data_path, preprocess):
    return folder_dataset.FolderDataset(folder_dataset.split_dir(data_path, "val"), preprocess)


def run_evaluation(model, dataset, indices, args, device, desc="eval") -> dict:
    return engine.evaluate(model, dataset, indices, batch_size=args.batch_size,
                           num_workers=args.num_workers, device=device,
                           show_progress=not args.quiet, desc=desc)


def format_eval(stats: dict) -> str:
    return (f"{stats['count']} images: top-1 {stats['acc1']:.3f}% ({stats['correct1']}), "
            f"top-5 {stats['acc5']:.3f}% ({stats['correct5']}), loss {stats['loss']:.6f}")


# ---------------------------------------------------------------- --eval

def evaluate_checkpoint(args, config) -> dict:
    """--eval: the report dict (see EPILOG)."""
    _, world = engine.rank_and_world()
    fetch_checkpoint(config.checkpoint, args.quiet)
    clf = Classifier(config=config, tune_process=True, progress=not args.quiet, warmup=False)
    path = clf.checkpoint
    dataset = eval_dataset(args.data_path, clf.preprocessor)
    check_class_count(dataset, clf.num_classes)
    indices = subset_indices(len(dataset), args.limit)
    _log.info("evaluating %s (%s) on %d of %d images in %s, %d classes, input %d px, "
              "%d process(es)", clf.model_name, path, len(indices), len(dataset),
              dataset.root, len(dataset.classes), clf.input_size, world)
    stats = run_evaluation(clf.logits, dataset, indices, args, clf.device)
    return {"mode": "eval", "model": clf.model_name, "checkpoint": str(path),
            "data": dataset.root, "world_size": world, "eval": stats}


# ---------------------------------------------------------------- training

def training_datasets(data_path, model, input_size: int, max_image_mb: float):
    """(train dataset, val dataset or None, description of the augmentation); validation uses the
    evaluation transform of the model's pretrained cfg, as --eval does; both decode within the
    per-image memory budget `max_image_mb`."""
    root = Path(data_path)
    # os.path.isdir: False for a name too long or no permission (Path.is_dir raises on 3.11),
    # which split_dir then reports in one line
    if os.path.isdir(root / "val") and not os.path.isdir(root / "train"):
        raise DatasetError(
            f"{root} has val/ but no train/: put the training images in {root}/train/<class>/")
    transform, augmentation = folder_dataset.build_train_transform(input_size)
    train_set = folder_dataset.FolderDataset(folder_dataset.split_dir(root, "train"),
                                             folder_dataset.augmented(transform, max_image_mb))
    val_preprocess = image_preprocess.preprocessor(model.pretrained_cfg, input_size, exact=True,
                                                   max_image_mb=max_image_mb)
    val_set = eval_dataset(root, val_preprocess) if os.path.isdir(root / "val") else None
    if val_set is not None and val_set.classes != train_set.classes:
        raise DatasetError(
            f"{train_set.root} and {val_set.root} have different class folders")
    return train_set, val_set, augmentation


def starting_model(args, config):
    """(model, info, checkpoint dict to resume from or None), before the head is adapted."""
    model_kwargs = {"drop_rate": args.drop, "drop_path_rate": args.drop_path}
    if not config.checkpoint:
        _log.warning("no --finetune checkpoint: training %s from random weights", config.model)
        size = {} if config.input_size is None else {"img_size": config.input_size}
        model = factory.create_model(config.model, **size, **model_kwargs)
        return model, {"model": model.model_name, "checkpoint": None,
                       "num_classes": model.num_classes,
                       "input_size": model.patch_embed.img_size[0]}, None
    fetch_checkpoint(config.checkpoint, args.quiet)
    model, info = factory.load_model(config.checkpoint, config.model,
                                     trust_pickle=config.trust_checkpoint, input_size=config.input_size,
                                     progress=not args.quiet, **model_kwargs)
    state = None
    if args.resume:
        state = checkpoint_io.read_checkpoint(info["checkpoint"], trust_pickle=config.trust_checkpoint)
    return model, info, state


def adapt_head(model, info, num_classes: int, resuming: bool) -> None:
    """A new, randomly initialized head when the class count changes (not when resuming)."""
    if info["num_classes"] == num_classes:
        return
    if resuming:
        raise ConfigError(f"--resume {info['checkpoint']} has {info['num_classes']} classes but "
                          f"the dataset {num_classes}; to start a new run from it use --finetune")
    if info["checkpoint"] is not None:
        _log.warning("%s has %d classes, the dataset %d: training a new head (the checkpoint's "
                     "head.* weights are not used)", info["checkpoint"], info["num_classes"],
                     num_classes)
    model.reset_classifier(num_classes)


def restore_training_state(state, optimizer, lr_scheduler, model_ema) -> int:
    """Load optimizer / schedule / EMA from a checkpoint dict; returns the epoch to start at."""
    missing = [key for key in ("optimizer", "lr_scheduler", "epoch") if state.get(key) is None]
    if missing:
        raise CheckpointError(
            f"--resume: the checkpoint has no {', '.join(missing)} (not a training checkpoint); "
            f"use --finetune to start a new run from its weights")
    if "last_epoch" not in state["lr_scheduler"]:
        raise CheckpointError(
            "--resume: the checkpoint's lr_scheduler was written by another trainer (e.g. "
            "upstream's timm scheduler) and cannot be continued; use --finetune instead")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if model_ema is not None:
        if state.get("model_ema") is not None:
            model_ema.load_state_dict(state["model_ema"])
        else:
            _log.warning("--resume: the checkpoint has no model_ema; the average restarts from "
                         "the current weights")
    return int(state["epoch"]) + 1


def train_loader(dataset, args, rank: int, world: int):
    """Shuffled, reshuffled per epoch by sampler.set_epoch; ranks get disjoint shares."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=args.seed)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                       num_workers=args.num_workers, drop_last=False)


@dataclasses.dataclass
class TrainingRun:
    """Everything the epoch loop needs; `model` may be the DDP wrapper of `net`."""
    info: dict
    net: torch.nn.Module
    model: torch.nn.Module
    model_ema: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loader: torch.utils.data.DataLoader
    val_set: object
    start_epoch: int


def prepare_training(args, config) -> TrainingRun:
    rank, world = engine.rank_and_world()
    seed_everything(args.seed)  # the same new head on every rank
    device = torch.device(config.device)
    model, info, state = starting_model(args, config)
    train_set, val_set, augmentation = training_datasets(args.data_path, model, info["input_size"],
                                                         config.max_image_mb)
    adapt_head(model, info, len(train_set.classes), resuming=state is not None)
    model.to(device)
    model.set_backend(config.backend)  # checked when the config was made, before anything was loaded
    model_ema = engine.ModelEma(model, args.model_ema_decay) if args.model_ema else None
    optimizer = torch.optim.AdamW(engine.param_groups_weight_decay(model, args.weight_decay),
                                  lr=args.lr)
    loader = train_loader(train_set, args, rank, world)
    steps = len(loader)
    lr_scheduler = engine.build_lr_scheduler(
        optimizer, base_lr=args.lr, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
        warmup_steps=round(args.warmup_epochs * steps), total_steps=args.epochs * steps)
    start_epoch = 0
    if state is not None:
        start_epoch = restore_training_state(state, optimizer, lr_scheduler, model_ema)
    _log.info("training %s on %d images in %d classes (%s), input %d px, %d process(es), "
              "epochs %d..%d, %d steps per epoch; augmentation: %s", info["model"],
              len(train_set), len(train_set.classes), train_set.root, info["input_size"], world,
              start_epoch, args.epochs - 1, steps, augmentation)
    if start_epoch >= args.epochs:
        _log.warning("--resume: the checkpoint already finished epoch %d; raise --epochs to "
                     "train more", start_epoch - 1)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    return TrainingRun(info, model, wrapped, model_ema, optimizer, lr_scheduler, loader, val_set,
                       start_epoch)


def save_epoch(output_dir, run: TrainingRun, epoch: int, record: dict, is_best: bool, args) -> None:
    """checkpoint.pth (and best_checkpoint.pth) in the released layout, one line in log.txt."""
    names = ["checkpoint.pth"] + (["best_checkpoint.pth"] if is_best else [])
    for name in names:
        checkpoint_io.save_checkpoint(output_dir / name, run.net, optimizer=run.optimizer,
                                      lr_scheduler=run.lr_scheduler, epoch=epoch,
                                      model_ema=run.model_ema, scaler=None, args=args)
    with open(output_dir / "log.txt", "a") as log_file:
        log_file.write(json.dumps(record) + "\n")


def _previous_best_acc1(output_dir, start_epoch: int) -> float:
    """Best validation top-1 of the epochs before start_epoch in OUTPUT_DIR/log.txt (-1 if none),
    so a resumed run does not replace best_checkpoint.pth with a worse model."""
    log = output_dir / "log.txt" if output_dir is not None else None
    if start_epoch == 0 or log is None or not log.exists():
        return -1.0
    accs = []
    for number, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            if record.get("eval") and record["epoch"] < start_epoch:
                accs.append(float(record["eval"]["acc1"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            _log.warning("%s line %d is not an epoch record; ignored", log, number)
    return max(accs, default=-1.0)


def _make_output_dir(output_dir) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --output-dir {output_dir}: {exc.strerror or exc}") from None


def train(args, config) -> dict:
    """Fine-tune (or resume, or train from scratch); returns the report dict (see EPILOG)."""
    rank, world = engine.rank_and_world()
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and rank == 0:
        _make_output_dir(output_dir)  # before loading anything: a bad path fails at once
    run = prepare_training(args, config)
    device = torch.device(config.device)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    history, best_acc1 = [], _previous_best_acc1(output_dir, run.start_epoch)
    for epoch in range(run.start_epoch, args.epochs):
        # Seeding per epoch makes a resumed run draw what an uninterrupted one would.
        seed_everything(args.seed + rank + epoch * world)
        run.loader.sampler.set_epoch(epoch)
        stats = engine.train_one_epoch(run.model, criterion, run.loader, run.optimizer,
                                       run.lr_scheduler, epoch=epoch, device=device,
                                       model_ema=run.model_ema, clip_grad=args.clip_grad,
                                       show_progress=not args.quiet)
        record = {"epoch": epoch, "train_loss": stats["loss"], "lr": stats["lr"], "eval": None}
        if run.val_set is not None:
            record["eval"] = run_evaluation(run.net, run.val_set, range(len(run.val_set)), args,
                                            device, desc=f"eval epoch {epoch}")
        history.append(record)
        _log.info("epoch %d: train loss %.4f, lr %.3g%s", epoch, stats["loss"], stats["lr"],
                  f"; val {format_eval(record['eval'])}" if record["eval"] else "")
        is_best = record["eval"] is not None and record["eval"]["acc1"] > best_acc1
        best_acc1 = record["eval"]["acc1"] if is_best else best_acc1
        if output_dir is not None and rank == 0:
            try:
                save_epoch(output_dir, run, epoch, record, is_best, args)
            except OSError as exc:
                raise TrainingError(f"cannot write to --output-dir {output_dir} after epoch {epoch}: "
                                           f"{exc.strerror or exc}") from None
    return {"mode": "train", "model": run.info["model"], "checkpoint": run.info["checkpoint"],
            "data": str(args.data_path), "world_size": world,
            "output_dir": str(output_dir) if output_dir else None, "epochs": history,
            "eval": history[-1]["eval"] if history else None}


# ---------------------------------------------------------------- entry point

def format_report(report: dict) -> str:
    lines = []
    for record in report.get("epochs", []):
        line = f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}"
        lines.append(line + (f", val {format_eval(record['eval'])}" if record["eval"] else ""))
    if report["mode"] == "eval":
        lines.append(f"{report['model']} on {report['data']}: {format_eval(report['eval'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    config = check_args(parser, args)
    rank = 0

    def work():
        nonlocal rank
        rank, world = engine.init_distributed()
        cli.setup(args.quiet, rank)  # other ranks would repeat rank 0's log lines: errors only
        if args.eval:
            report = evaluate_checkpoint(args, config)
        else:
            runtime.tune_process(config.threads)
            report = train(args, config)
        if rank == 0:
            print(json.dumps(report, indent=2) if args.json else format_report(report))
        return cli.EXIT_OK

    try:
        return cli.run(parser, work, spell=spell,
                       prefix=lambda: f"error (rank {rank})" if engine.rank_and_world()[1] > 1 else "error")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
