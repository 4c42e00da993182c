"""Training: one process, or one process per GPU/CPU slot under ``torchrun`` (DDP).

``train(cfg, work_dir, resume=False)`` is the whole stage. Layout of ``work_dir``::

    config.yaml                resolved config of this run
    checkpoints/epoch_N.pth    every epoch (keep the last ``train.keep_last``), iter_N.pth optionally
    checkpoints/latest.pth     the most recent checkpoint (hard link)
    checkpoints/best.pth       best validation H-mean (when ``data.val`` is set)
    metrics.jsonl              one JSON object per logged step and per evaluation (a run first drops the rows
                               its starting checkpoint does not cover, so --resume never logs a step twice)
    metrics.json               summary of the finished run

Distributed: launched by ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK set), NCCL on CUDA and gloo on CPU;
each process takes ``train.batch_size`` images of a disjoint shard of every epoch's permutation, so
N processes with batch b see the same global batches as one process with batch N*b. The learning rate
is used as configured (no scaling rule, as the release).

Reproducibility: augmentations and the model's anchor/RoI sampling are seeded per image from
(seed, epoch, index); checkpoints hold the optimiser, scaler, counters and the torch RNG state, so
``--resume`` after a kill ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from i3cl_core.config import ConfigError, save_config
from i3cl_core.data.check import check_sources, raise_on_problems
from i3cl_core.data.coco import CocoTextDataset, collate
from i3cl_core.data.polygons import instance_box
from i3cl_core.devices import resolve_device
from i3cl_core.infer.evaluate import evaluate_model
from i3cl_core.model.checkpoint import load_checkpoint, load_state_strict, save_checkpoint, upgrade_state
from i3cl_core.model.errors import CheckpointError
from i3cl_core.model.weights import read_state_dict, strip_prefixes
from i3cl_core.structures import Instances
from i3cl_core.utils import (
    append_text,
    atomic_write_json,
    atomic_write_text,
    get_logger,
    worker_init,
    write_error,
)

log = get_logger("train")


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, ...); the message says where and what is kept."""


# ------------------------------------------------------------------------------------ distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        device = resolve_device(device_name, "train.device", local_rank if world > 1 else None)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device)


def _all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    if not info.distributed:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: v / info.world_size for k, v in zip(values, t.tolist())}


# ------------------------------------------------------------------------------------ data order
class EpochSampler(torch.utils.data.Sampler):
    """The dataset permuted by (seed, epoch), padded to a multiple of the number of processes and
    dealt round-robin: process r takes positions r, r + N, r + 2N, ... ``skip`` drops the first
    samples of this process's share (resuming inside an epoch). With ``per_process`` an epoch is
    exactly that many samples per process, cut from one stream of whole permutations that runs on
    across epochs (epoch e takes the stream's next ``per_process * N`` draws), so a run draws every
    image once before it draws any twice: over epochs whose draws add up to the set's size, every
    image is seen. (A fresh permutation per epoch cut to its first draws would leave some images
    out for the whole run when an epoch is shorter than the set.)

    ``mix`` = ``[(indices of group k, fraction of group k)]`` (fractions adding up to 1) draws each
    group's share of the epoch from its own permutations instead, deals it round-robin, and spreads
    every group evenly over each process's order (with two halves and batches of 2: one of each per
    batch)."""

    def __init__(
        self,
        size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        per_process: int | None = None,
        mix: list[tuple[list[int], float]] | None = None,
    ):
        self.size, self.num_replicas, self.rank, self.seed, self.shuffle = (
            size,
            num_replicas,
            rank,
            seed,
            shuffle,
        )
        self.per_process, self.mix = per_process, mix
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _permutation(self, n: int, n_pass: int, group: int = 0, epoch: int | None = None) -> list[int]:
        """A permutation of ``range(n)`` seeded by (seed, ``epoch``, pass, group); ``epoch`` None: the
        sampler's epoch."""
        if not self.shuffle:
            return list(range(n))
        epoch = self.epoch if epoch is None else epoch
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 7_919 * n_pass + 104_729 * group)
        return torch.randperm(n, generator=g).tolist()

    def _stream(self, n: int, length: int, group: int = 0) -> list[int]:
        """This epoch's ``length`` draws: positions ``[epoch * length, (epoch + 1) * length)`` of one stream
        of permutations of ``range(n)`` (pass k seeded by (seed, k, group), not by the epoch)."""
        start = self.epoch * length
        first, last = start // n, (start + length - 1) // n
        order = [i for k in range(first, last + 1) for i in self._permutation(n, k, group, epoch=0)]
        return order[start - first * n : start - first * n + length]

    def drawn(self, epochs: int, per_epoch: int | None = None) -> set[int]:
        """The distinct indices that ``epochs`` epochs from epoch 0 draw over all processes, each process
        using the first ``per_epoch`` of its epoch's share (None: all of it)."""
        seen, saved = set(), (self.epoch, self.rank)
        try:
            for e in range(epochs):
                for r in range(self.num_replicas):
                    self.epoch, self.rank = e, r
                    seen.update(self.indices()[:per_epoch])
        finally:
            self.epoch, self.rank = saved
        return seen

    def _share(self) -> int:
        return math.ceil(self.size / self.num_replicas) if self.per_process is None else self.per_process

    def indices(self) -> list[int]:
        if self.mix is not None:
            return self._mixed()
        if self.per_process is None:
            order = self._permutation(self.size, 0)
            total = math.ceil(self.size / self.num_replicas) * self.num_replicas
            order += order[: total - self.size]
        else:
            order = self._stream(self.size, self.per_process * self.num_replicas)
        return order[self.rank :: self.num_replicas]

    def _mixed(self) -> list[int]:
        """Each group's share of the epoch's ``share x N`` draws (largest remainders), every group spread
        evenly over the epoch's order, which is then cut into N consecutive parts of exactly ``share`` draws,
        one per process: every process takes the same number of steps (a process with one step more would wait
        in an all-reduce the others never join) and every draw is used."""
        share = self._share()
        total = share * self.num_replicas
        exact = [f * total for _, f in self.mix]
        counts = [int(math.floor(x)) for x in exact]
        for k in sorted(range(len(exact)), key=lambda k: counts[k] - exact[k])[: total - sum(counts)]:
            counts[k] += 1  # largest remainders first
        keyed = []
        for k, ((members, _), count) in enumerate(zip(self.mix, counts)):
            drawn = [members[i] for i in self._stream(len(members), count, group=k + 1)]
            keyed += [((j + 0.5) / len(drawn), k, idx) for j, idx in enumerate(drawn)]
        order = [idx for _, _, idx in sorted(keyed)]
        return order[self.rank * share : (self.rank + 1) * share]

    def __iter__(self):
        return iter(self.indices()[self.skip :])

    def __len__(self) -> int:
        return self._share() - self.skip


def dataset_mix(dataset, sources) -> list[tuple[list[int], float]] | None:
    """``EpochSampler.mix`` from the training sets' ``fraction``s (None when no set has one): sets
    without a fraction share the rest in proportion to their sizes."""
    if all(s.fraction is None for s in sources):
        return None
    groups = [[] for _ in sources]
    for i, record in enumerate(dataset.records):
        groups[record.source].append(i)
    free = [k for k, s in enumerate(sources) if s.fraction is None]
    rest = 1.0 - sum(s.fraction for s in sources if s.fraction is not None)
    free_size = sum(len(groups[k]) for k in free)
    mix = []
    for k, s in enumerate(sources):
        share = (
            s.fraction
            if s.fraction is not None
            else (rest * len(groups[k]) / free_size if free_size else 0.0)
        )
        if share > 0 and not groups[k]:
            log.warning(
                "data.train[%d] (%s): no usable images, so its fraction %.2f of the epoch goes to the other "
                "sets",
                k,
                s.ann_file,
                share,
            )
            continue
        if share > 0:
            mix.append((groups[k], share))
    norm = sum(f for _, f in mix)
    return [(g, f / norm) for g, f in mix]


# ------------------------------------------------------------------------------------ optimisation
def build_optimizer(model: torch.nn.Module, tcfg, fused: bool = True) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters, ``no_decay_keys`` without weight decay. ``fused`` updates
    every parameter in one kernel per step (on the CPU and on a GPU; on 2 CPU cores the tiny recipe's AdamW
    step takes 10 ms against 40 ms for the per-parameter loop) and, on a GPU, lets the AMP grad scaler skip a
    non-finite step without asking the host. ``fused=False``: the per-parameter loop (same update up to
    float rounding)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in tcfg.no_decay_keys) else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum, fused=fused or None)
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), fused=fused or None)


def lr_at(tcfg, epoch: int, global_iter: int) -> float:
    """Step decay by ``gamma`` after each epoch listed in ``lr_steps`` (1-based epoch counts, as
    mmdetection's ``step=[8, 11]``) times a linear warm-up from ``warmup_ratio`` over the first
    ``warmup_iters`` iterations."""
    lr = tcfg.lr * tcfg.gamma ** sum(epoch >= s for s in tcfg.lr_steps)
    if global_iter < tcfg.warmup_iters:
        lr *= tcfg.warmup_ratio + (1.0 - tcfg.warmup_ratio) * global_iter / tcfg.warmup_iters
    return lr


# ------------------------------------------------------------------------------------ checkpoints
def checkpoint_dir(work_dir: Path) -> Path:
    return Path(work_dir) / "checkpoints"


def default_work_dir(config: str) -> Path:
    """work_dirs/<folder>_<name> for configs/<folder>/<name>.yaml (the stage recipes' load_from layout),
    work_dirs/<name> for a config outside such a folder (``i3cl train`` without ``--work-dir``)."""
    path = Path(config).resolve()
    folder = path.parent.name
    return Path("work_dirs") / (
        f"{folder}_{path.stem}"
        if folder and folder != "configs" and path.parent.parent.name == "configs"
        else path.stem
    )


def _link_atomic(src: Path, dst: Path) -> None:
    """Point ``dst`` at ``src`` (a hard link, else a copy) atomically; a failure (a full disk while copying)
    leaves ``dst`` as it was, no temporary file, and raises a WriteError naming ``dst``."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        try:
            size = src.stat().st_size
        except OSError:
            size = None
        raise write_error(dst, size, e) from e


def find_latest(work_dir: Path) -> Path | None:
    latest = checkpoint_dir(work_dir) / "latest.pth"
    return latest if latest.is_file() else None


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the last ``keep_last`` epoch/iteration checkpoints. ``best.pth`` and ``latest.pth`` are hard
    links (or copies), so removing the epoch file they were made from leaves them intact."""

    def number(p: Path) -> int:
        return int(p.stem.split("_")[1])

    for pattern in ("epoch_*.pth", "iter_*.pth"):
        files = sorted(ckpt_dir.glob(pattern), key=number)
        for p in files[:-keep_last]:
            p.unlink(missing_ok=True)


def load_from(model: torch.nn.Module, path: str) -> tuple[list[str], list[str]]:
    """Non-strict initialisation from a checkpoint of an earlier stage; logs the keys that are new
    here (e.g. IntraCL/InterCL switched on) and those the checkpoint has that we don't."""
    state = upgrade_state(
        strip_prefixes(read_state_dict(path, "load_from checkpoint"), prefixes=("module.",))
    )
    own = model.state_dict()
    shape_mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    result = model.load_state_dict({k: v for k, v in state.items() if k not in shape_mismatch}, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys) + shape_mismatch
    loaded = len(own) - len(missing)
    if loaded == 0:
        raise CheckpointError(f"{path}: load_from matched none of the model's parameters")
    log.info(
        "load_from %s: %d tensors loaded; %d keys new in this model%s; %d keys of the checkpoint unused%s",
        path,
        loaded,
        len(missing),
        f" ({_group_keys(missing)})" if missing else "",
        len(unexpected),
        f" ({_group_keys(unexpected)})" if unexpected else "",
    )
    return missing, unexpected


def _group_keys(keys: list[str]) -> str:
    """'roi_heads.inter_cl.* (38), intra_cl.* (60)': keys grouped by their first two name parts."""
    groups = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{g}.* ({n})" for g, n in groups.most_common())


# ------------------------------------------------------------------------------------ the loop
@dataclass
class UncheckedStep:
    """A step whose loss has not been read back from the device yet (see :meth:`Trainer.check_finite`)."""

    iteration: int
    epoch: int
    it: int
    image_ids: list
    losses: dict
    finite: torch.Tensor


def teacher_targets(pred: dict, score_thr: float, ignore_thr: float | None) -> dict:
    """A training target (``instances`` and ``dontcare``) from a teacher's detections on one image: those
    scored >= ``score_thr`` with a polygon are text (weight 1), those in [``ignore_thr``, ``score_thr``)
    do-not-care regions."""
    scores = pred["scores"].float().cpu().tolist()
    text, unsure = [], []
    for poly, score in zip(pred["polygons"], scores):
        if poly is None:
            continue
        if score >= score_thr:
            text.append([np.asarray(poly, np.float32)])
        elif ignore_thr is not None and score >= ignore_thr:
            unsure.append([np.asarray(poly, np.float32)])

    def boxes(instances):
        return torch.tensor(np.array([instance_box(p) for p in instances], np.float32)).reshape(-1, 4)

    return {
        "instances": Instances(
            boxes=boxes(text),
            labels=torch.ones(len(text), dtype=torch.int64),
            polygons=text,
            lossweight=torch.ones(len(text)),
            ann_id=torch.full((len(text),), -1, dtype=torch.int64),
        ),
        "dontcare": Instances(boxes=boxes(unsure), polygons=unsure),
    }


def _batch_ids(targets) -> list:
    return [t.get("image_id") for t in targets]


def train(cfg, work_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` (an :class:`~i3cl_core.config.I3CLConfig`) into ``work_dir``; returns a summary."""
    return Trainer(cfg, work_dir, resume=resume, progress=progress).run()


class Trainer:
    """One training run, step by step: :meth:`build` (data, model, optimizer, loader), :meth:`resume`,
    :meth:`step` (one iteration), :meth:`train_epoch`, :meth:`evaluate`, :meth:`checkpoint`, and
    :meth:`run` (all epochs, then ``metrics.json``). The order of the random draws is fixed (seed, then
    the model's initialisation, then the data order), which is what makes a resumed run end with the same
    weights as an uninterrupted one."""

    def __init__(self, cfg, work_dir: str | os.PathLike, resume: bool = False, progress: bool = True):
        if not cfg.data.train:
            raise ConfigError("data.train: no training datasets configured")
        self.cfg, self.tcfg = cfg, cfg.train
        self.progress = progress
        self.info = init_distributed(self.tcfg.device)
        self.work_dir = Path(work_dir)
        self.ckpt_dir = checkpoint_dir(self.work_dir)
        if self.info.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.work_dir / "config.yaml")
        torch.manual_seed(self.tcfg.seed)
        self.start_epoch, self.start_iter, self.global_iter = 0, 0, 0
        self.best = {"hmean": -1.0, "epoch": None}
        self.history: list[dict] = []
        self.unchecked: list[UncheckedStep] = []
        self.teacher_labels, self.teacher_images = 0, 0  # the mean teacher's labels since the last log line
        self.build(load_weights=not resume)
        if resume:
            self.resume()
        self.trim_metrics()
        self.ddp_model = self.model
        if self.info.distributed:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.info.device.index] if self.info.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        self.build_loader()
        self.tb = self._tensorboard()

    # ------------------------------------------------------------------ build
    def check_images(self) -> None:
        """Every image of every set now, not hours in when training reaches it."""
        cfg = self.cfg
        sources = [(s.ann_file, s.img_root) for s in cfg.data.train]
        if cfg.data.val is not None and self.tcfg.eval_interval > 0:
            sources.append((cfg.data.val.ann_file, cfg.data.val.img_root))
        checked = check_sources(sources, workers=8)
        log.info(checked.summary())
        raise_on_problems(checked)

    def build(self, load_weights: bool = True) -> None:
        """Datasets, model (plus ``train.load_from`` unless resuming), optimizer and gradient scaler."""
        # deferred: OpenCV and torchvision; the flows import this module for checkpoint_dir only
        from i3cl_core.data.transforms import build_source_transforms
        from i3cl_core.model.detector import build_model

        cfg, tcfg, info = self.cfg, self.tcfg, self.info
        if cfg.data.check_images and info.main:
            self.check_images()
        self.dataset = CocoTextDataset(
            [(s.ann_file, s.img_root) for s in cfg.data.train],
            transform=build_source_transforms(cfg.data.augment, [s.augment for s in cfg.data.train]),
            train=True,
            min_image_size=cfg.data.min_image_size,
            dontcare=cfg.data.dontcare,
            seed=tcfg.seed,
            background_weights=[s.background_weight for s in cfg.data.train],
        )
        self.val_dataset = None
        if cfg.data.val is not None and tcfg.eval_interval > 0 and info.main:
            self.val_dataset = CocoTextDataset(
                [(cfg.data.val.ann_file, cfg.data.val.img_root)],
                train=False,
                min_image_size=cfg.data.min_image_size,
                dontcare=cfg.data.dontcare,
            )
        model = build_model(cfg).to(info.device)
        if tcfg.load_from and load_weights:
            load_from(model, tcfg.load_from)
        if tcfg.sync_bn and info.distributed:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.teacher = None  # train.mean_teacher: the exponential moving average of the student's weights
        if tcfg.mean_teacher.enabled:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.optimizer = build_optimizer(model, tcfg)
        self.use_amp = tcfg.amp and info.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def build_loader(self) -> None:
        """The epoch sampler (mixing the sets by their ``fraction``) and the DataLoader."""
        tcfg, info = self.tcfg, self.info
        whole = math.ceil(math.ceil(len(self.dataset) / info.world_size) / tcfg.batch_size)
        iters = tcfg.iters_per_epoch if tcfg.iters_per_epoch is not None else whole
        if tcfg.max_iters_per_epoch:
            iters = min(iters, tcfg.max_iters_per_epoch)
        # an epoch of a fixed length (or cut short) takes exactly its draws from the stream of permutations,
        # so the next epoch goes on where it stopped
        per_process = None if iters == whole and tcfg.iters_per_epoch is None else iters * tcfg.batch_size
        self.sampler = EpochSampler(
            len(self.dataset),
            info.world_size,
            info.rank,
            seed=tcfg.seed,
            per_process=per_process,
            mix=dataset_mix(self.dataset, self.cfg.data.train),
        )
        self.loader = DataLoader(
            self.dataset,
            batch_size=tcfg.batch_size,
            sampler=self.sampler,
            num_workers=self.cfg.data.num_workers,
            collate_fn=collate,
            pin_memory=info.device.type == "cuda",
            persistent_workers=False,
            worker_init_fn=worker_init,
        )
        self.iters_per_epoch = iters
        if len(self.cfg.data.train) > 1 and info.main:
            self.log_coverage()

    def log_coverage(self) -> None:
        """Log, per training set, how many of its images the whole run draws at least once."""
        drawn = self.sampler.drawn(self.tcfg.epochs, self.iters_per_epoch * self.tcfg.batch_size)
        counts = [0] * len(self.cfg.data.train)
        sizes = [0] * len(self.cfg.data.train)
        for i, record in enumerate(self.dataset.records):
            sizes[record.source] += 1
            counts[record.source] += i in drawn
        for k, (n, size) in enumerate(zip(counts, sizes)):
            log.info(
                "data.train[%d]: the run draws %d of its %d images at least once (%.0f%%)",
                k,
                n,
                size,
                100.0 * n / max(size, 1),
            )

    def _tensorboard(self):
        if not (self.tcfg.tensorboard and self.info.main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter  # deferred: optional [tensorboard] extra

            return SummaryWriter(str(self.work_dir / "tb"))
        except ImportError:
            log.warning(
                "train.tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                "skipping, metrics.jsonl has the same numbers"
            )
            return None

    # ------------------------------------------------------------------ resume and checkpoints
    def resume(self) -> None:
        """Model, optimizer, scaler, position, best score, history and RNG state from ``latest.pth``."""
        latest = find_latest(self.work_dir)
        if latest is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.ckpt_dir)
            return
        ckpt = load_checkpoint(latest)
        if self.teacher is not None:
            if "student_model" not in ckpt:
                raise CheckpointError(
                    f"{latest}: cannot resume with train.mean_teacher, it holds no student weights"
                )
            load_state_strict(self.teacher, ckpt["model"], str(latest))
            load_state_strict(self.model, ckpt["student_model"], str(latest))
        else:
            load_state_strict(self.model, ckpt["model"], str(latest))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(
                f"{latest}: cannot resume, its training state does not fit this config ({e})"
            ) from None
        self.start_epoch, self.start_iter, self.global_iter = (
            ckpt["epoch"],
            ckpt["iter_in_epoch"],
            ckpt["global_iter"],
        )
        self.best, self.history = ckpt.get("best", self.best), ckpt.get("history", [])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.info.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        log.info(
            "resumed from %s: epoch %d, iteration %d of the epoch, %d iterations done",
            latest,
            self.start_epoch,
            self.start_iter,
            self.global_iter,
        )

    def checkpoint(self, name: str, epoch_done: int, iter_in_epoch: int) -> Path:
        """Save everything a resume needs as ``checkpoints/<name>`` and point ``latest.pth`` at it."""
        path = self.ckpt_dir / name
        cuda = self.info.device.type == "cuda"
        extra = {}
        if self.teacher is not None:  # "model" is what evaluation, inference and load_from use: the teacher
            extra["student_model"] = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        save_checkpoint(
            path,
            self.teacher if self.teacher is not None else self.model,
            self.cfg,
            extra={
                **extra,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": epoch_done,
                "iter_in_epoch": iter_in_epoch,
                "global_iter": self.global_iter,
                "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None},
                "best": self.best,
                "history": self.history,
            },
        )
        _link_atomic(path, self.ckpt_dir / "latest.pth")
        return path

    def trim_metrics(self) -> None:
        """Drop the rows of ``metrics.jsonl`` that the checkpoint this run starts from does not cover: steps
        past its iteration (``global_iter``) and evaluations not in its history, i.e. rows logged after the
        last checkpoint that was written (then came a kill, or a full disk failed the next one), which this
        run is about to log again. So no step or evaluation ever has two rows. A fresh run (no ``--resume``,
        or no checkpoint to resume from) starts at 0 with no history, hence with an empty file. Unparsable
        lines (a partial last line written by an older version) go too."""
        path = self.work_dir / "metrics.jsonl"
        if not self.info.main or not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        evaluated = {(h.get("epoch"), h.get("iter")) for h in self.history if isinstance(h, dict)}
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict):
                continue
            if row.get("eval") and (row.get("epoch"), row.get("iter")) not in evaluated:
                continue  # an evaluation after the checkpoint (e.g. at the iteration of an iter_N.pth)
            it = row.get("iter")
            if isinstance(it, (int, float)) and it > self.global_iter:
                continue
            kept.append(line)
        if len(kept) != len(lines):
            log.info(
                "%s: dropping %d rows past iteration %d (logged after the last checkpoint; this run logs "
                "them again)",
                path,
                len(lines) - len(kept),
                self.global_iter,
            )
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write_metrics(self, record: dict) -> None:
        """One line of ``metrics.jsonl`` (and TensorBoard scalars when enabled), on the main process."""
        if not self.info.main:
            return
        append_text(
            self.work_dir / "metrics.jsonl", json.dumps(record) + "\n"
        )  # a failure leaves no partial line
        if self.tb is not None:  # train/<term> per logged iteration, val/<measure> per evaluation
            prefix = "val/" if record.get("eval") else "train/"
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "iter"):
                    self.tb.add_scalar(prefix + k, v, record.get("iter", self.global_iter))
            self.tb.flush()

    # ------------------------------------------------------------------ training
    def step(self, images: list, targets: list, epoch: int, it: int) -> tuple[dict, float]:
        """One optimisation step; returns the loss terms (tensors on the device) and the learning rate used.
        Nothing here waits for the device: whether the loss was finite is read later, by
        :meth:`check_finite`, at the next logging interval, checkpoint or evaluation."""
        tcfg, info = self.tcfg, self.info
        lr = lr_at(tcfg, epoch, self.global_iter)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = [im.to(info.device, non_blocking=True) for im in images]
        images, targets = self.student_views(images, targets)
        with torch.autocast(info.device.type, enabled=self.use_amp):
            losses = self.ddp_model(images, targets)
        loss = sum(losses.values())
        self.unchecked.append(
            UncheckedStep(
                self.global_iter + 1,
                epoch,
                it,
                _batch_ids(targets),
                {k: v.detach() for k, v in losses.items()},
                torch.isfinite(loss),
            )
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if tcfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], tcfg.grad_clip
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.teacher is not None:
            self.update_teacher()
        self.global_iter += 1
        self.images_seen += len(images) * info.world_size
        return losses, lr

    def student_views(self, images: list, targets: list) -> tuple[list, list]:
        """What the student trains on: images of ``augment: online`` sets are replaced by their strong view,
        and once ``train.mean_teacher`` is past its burn-in their labels by the teacher's detections on the
        weak view (kept at ``score_thr``; those in [``ignore_thr``, ``score_thr``) become do-not-care
        regions)."""
        online = [i for i, t in enumerate(targets) if "student_image" in t]
        if not online:
            return images, targets
        images, targets = list(images), [dict(t) for t in targets]
        mt = self.tcfg.mean_teacher
        if self.teacher is not None and self.global_iter >= mt.burn_in_iters:
            with torch.autocast(self.info.device.type, enabled=self.use_amp):
                predictions = self.teacher.predict([images[i] for i in online], resize=False)
            for i, pred in zip(online, predictions):
                targets[i].update(teacher_targets(pred, mt.score_thr, mt.ignore_thr))
                self.teacher_labels += len(targets[i]["instances"])
            self.teacher_images += len(online)
        for i in online:
            images[i] = targets[i].pop("student_image").to(self.info.device, non_blocking=True)
        return images, targets

    @torch.no_grad()
    def update_teacher(self) -> None:
        """teacher <- decay x teacher + (1 - decay) x student, parameters and float buffers alike (integer
        buffers, such as BatchNorm's step count, are copied)."""
        decay = self.tcfg.mean_teacher.ema_decay
        student = self.model.state_dict()
        for name, value in self.teacher.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(student[name].to(value.dtype), 1.0 - decay)
            else:
                value.copy_(student[name])

    def check_finite(self, collective: bool = True) -> None:
        """Read, in one host synchronisation, whether the steps since the last check had finite losses (on
        every process when ``collective``); a non-finite one stops the run with its iteration, the batch's
        image ids, its loss terms and the last good checkpoint (nothing is saved after a failed step: every
        checkpoint and evaluation is preceded by this check)."""
        steps, self.unchecked = self.unchecked, []
        if not steps:
            return
        finite = torch.stack([s.finite for s in steps]).to(torch.float32)
        if collective and self.info.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        bad = next((s for s, ok in zip(steps, finite.tolist()) if ok < 1), None)
        if bad is None:
            return
        latest = find_latest(self.work_dir)
        terms = {k: v.item() for k, v in bad.losses.items()}
        raise TrainingError(
            f"loss became non-finite at iteration {bad.iteration} "
            f"(epoch {bad.epoch + 1}, step {bad.it + 1}); "
            f"image ids of the batch: {bad.image_ids}; loss terms: {terms}; "
            f"last good checkpoint: {latest if latest else 'none yet'} (nothing saved after it)"
        )

    def train_epoch(self, epoch: int) -> None:
        """The iterations of one epoch (from ``start_iter`` after a resume), with logging and the optional
        iteration checkpoints."""
        tcfg, info = self.tcfg, self.info
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, skip=self.start_iter * tcfg.batch_size)
        self.ddp_model.train()
        bar = tqdm(
            total=self.iters_per_epoch,
            initial=self.start_iter,
            desc=f"epoch {epoch + 1}/{tcfg.epochs}",
            disable=not (self.progress and info.main),
            dynamic_ncols=True,
            leave=False,
        )
        running: dict[str, torch.Tensor] = {}
        n_running = 0
        it = self.start_iter
        for images, targets in self.loader:
            if it >= self.iters_per_epoch:
                break
            try:
                losses, lr = self.step(images, targets, epoch, it)
            except Exception:  # a failure after a non-finite loss: report the loss (this process's own steps)
                self.check_finite(collective=False)
                raise
            it += 1
            for k, v in losses.items():  # summed on the device: read once per logging interval
                running[k] = running[k] + v.detach() if k in running else v.detach().clone()
            n_running += 1
            if it % tcfg.log_interval == 0 or it == self.iters_per_epoch:
                self.check_finite()
                sums = torch.stack(list(running.values())).tolist() if running else []
                means = _all_reduce_mean({k: v / n_running for k, v in zip(running, sums)}, info)
                running, n_running = {}, 0
                elapsed = time.time() - self.t_start
                record = {
                    "epoch": epoch + 1,
                    "iter": self.global_iter,
                    "lr": lr,
                    "loss": sum(means.values()),
                    **means,
                    "images_per_s": self.images_seen / max(elapsed, 1e-9),
                    "time": elapsed,
                }
                if self.teacher_images:  # the mean teacher's pseudo labels per image it labelled
                    record["teacher_labels_per_image"] = self.teacher_labels / self.teacher_images
                    self.teacher_labels, self.teacher_images = 0, 0
                self.write_metrics(record)
                if not self.progress and info.main:  # plain progress lines (parsed by the Prefect flows)
                    log.info(
                        "epoch %d/%d iter %d/%d loss %.4f lr %.3g %.2f img/s",
                        epoch + 1,
                        tcfg.epochs,
                        it,
                        self.iters_per_epoch,
                        record["loss"],
                        lr,
                        record["images_per_s"],
                    )
                bar.set_postfix(
                    {
                        "loss": f"{record['loss']:.3f}",
                        **{k.replace("loss_", ""): f"{v:.3f}" for k, v in means.items()},
                        "lr": f"{lr:.2e}",
                    }
                )
            if tcfg.checkpoint_interval_iters and self.global_iter % tcfg.checkpoint_interval_iters == 0:
                self.check_finite()
                if info.main:
                    self.checkpoint(f"iter_{self.global_iter}.pth", epoch, it)
            bar.update(1)
        bar.close()
        self.check_finite()
        self.start_iter = 0

    def evaluate(self, epoch: int) -> dict:
        """F of the model on the validation set (``train.eval_protocol``), recorded in the history."""
        cfg = self.cfg
        evaluation = evaluate_model(
            self.teacher if self.teacher is not None else self.model,
            self.val_dataset,
            self.info.device,
            self.tcfg.eval_protocol,
            cfg.infer.score_thr,
            batch_size=cfg.infer.batch_size,
            progress=self.progress,
        )
        evaluation.update(epoch=epoch + 1, iter=self.global_iter, time=time.time() - self.t_start)
        self.history.append(evaluation)
        self.write_metrics({"eval": True, **evaluation})
        log.info(
            "epoch %d: %s P %.4f R %.4f F %.4f (best threshold %.2f: F %.4f)",
            epoch + 1,
            self.tcfg.eval_protocol,
            evaluation["precision"],
            evaluation["recall"],
            evaluation["hmean"],
            evaluation["best_thr"],
            evaluation["best_hmean"],
        )
        if evaluation["hmean"] > self.best["hmean"]:
            self.best = {"hmean": evaluation["hmean"], "epoch": epoch + 1}
        return evaluation

    def run(self) -> dict:
        """Every remaining epoch (evaluate, checkpoint, keep ``best.pth``), then ``metrics.json``; the
        summary."""
        tcfg, info = self.tcfg, self.info
        self.t_start = time.time()
        self.images_seen = 0
        if info.main:
            log.info(
                "training %d images (%d per process x %d processes), %d iterations per epoch, epochs %d-%d, "
                "device %s",
                len(self.dataset),
                tcfg.batch_size,
                info.world_size,
                self.iters_per_epoch,
                self.start_epoch + 1,
                tcfg.epochs,
                info.device,
            )
        for epoch in range(self.start_epoch, tcfg.epochs):
            self.train_epoch(epoch)
            evaluation = None
            if self.val_dataset is not None and (
                (epoch + 1) % tcfg.eval_interval == 0 or epoch + 1 == tcfg.epochs
            ):
                evaluation = self.evaluate(epoch)
            if info.main:
                path = self.checkpoint(f"epoch_{epoch + 1}.pth", epoch + 1, 0)
                if evaluation is not None and self.best["epoch"] == epoch + 1:
                    _link_atomic(path, self.ckpt_dir / "best.pth")
                _prune(self.ckpt_dir, tcfg.keep_last)
            if info.distributed:
                dist.barrier()
        return self.finish()

    def finish(self) -> dict:
        elapsed = time.time() - self.t_start
        ckpt_dir = self.ckpt_dir
        summary = {
            "work_dir": str(self.work_dir),
            "epochs": self.tcfg.epochs,
            "iterations": self.global_iter,
            "checkpoint": str(ckpt_dir / "latest.pth"),
            "best_checkpoint": str(ckpt_dir / "best.pth") if (ckpt_dir / "best.pth").exists() else None,
            "best": self.best,
            "last_eval": self.history[-1] if self.history else None,
            "seconds": elapsed,
            "images_per_s": self.images_seen / max(elapsed, 1e-9),
            "world_size": self.info.world_size,
        }
        if self.info.main:
            atomic_write_json(
                self.work_dir / "metrics.json", {"summary": summary, "evaluations": self.history}, indent=2
            )
            if self.tb is not None:
                self.tb.close()
        if self.info.distributed:
            dist.barrier()
            dist.destroy_process_group()
        return summary
