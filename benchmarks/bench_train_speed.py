"""Training speed of the tiny teacher with and without the speed switches, side by side in one run.

The same fixed batches (augmented once, held in memory, so data loading is not timed) go through
forward, backward, gradient clipping and the optimizer step of the config for each setting; the baseline is
float32 with contiguous (NCHW) tensors, torchvision's RoIAlign and the per-parameter optimizer loop. Prints
training images per second per setting and the ratio to the baseline, then the recipe now (the sparse
RoIAlign on CPU, the fused optimizer) against the recipe before those two changes.

Then torchvision's Mask R-CNN built to the tiny teacher's sizes (ResNet-18, 64-channel FPN, a 256-wide
box head, two 64-channel mask convolutions, the same RPN and RoI sampling numbers; no IntraCL, no
InterCL) trains on the same batches with the same (fused) optimizer, in float32 NCHW: the time per
training image of ours (the recipe now) over its time per image is the ratio the project aims to keep
<= 1.1x. Do-not-care regions are left out of its targets (it has none) and its full-image masks are
rasterised before timing, as a data loader would.

    .venv/bin/python benchmarks/bench_train_speed.py [--config configs/demo/teacher_a.yaml]
        [--data data/bench] [--batches 20] [--warmup 5] [--rounds 3] [--profile]

The machines we measure on are shared and their speed drifts by 10-20 % within minutes, so the settings run
in ``--rounds`` interleaved rounds (each round runs every setting once, in turn): each setting's images/s
is the median over the rounds (min..max printed), and the recipe's now/before ratio is taken within each
round, then the median.

``--profile`` first prints where one training step of the recipe spends its time (milliseconds per step
and share): data (decode, augmentation and collation of a batch, which the loader's workers take off the
critical path when ``data.num_workers`` > 0), backbone, FPN, IntraCL, RPN (head, proposals, anchor
sampling and its losses), the RoI heads' parts (box pooling and head; mask pooling; InterCL; mask head; the
rest: RoI sampling, mask targets and losses), backward, and gradient clipping with the optimizer step.

``model.bf16_features`` is forced on here (not ``auto``) to show what it costs or gains on this CPU;
without AVX512-BF16/AMX bfloat16 is emulated and slower, which is why the recipes say ``auto``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

# name -> (config overrides, fused optimizer). The first four isolate the speed switches with torchvision's
# RoIAlign and the per-parameter optimizer loop; the last three are the recipe's own config (its
# bf16_features and channels_last as it sets them) before and after the two changes of issue [5/5].
BEFORE = "recipe before: torchvision RoIAlign, AdamW loop"
NOW = "recipe now: + fused AdamW"
OLD_PATH = ["model.roi_align=torchvision"]
SETTINGS = {
    "float32, NCHW (baseline)": (
        ["model.bf16_features=false", "model.channels_last=false", *OLD_PATH],
        False,
    ),
    "channels_last": (["model.bf16_features=false", "model.channels_last=true", *OLD_PATH], False),
    "bf16_features": (["model.bf16_features=true", "model.channels_last=false", *OLD_PATH], False),
    "bf16_features + channels_last": (
        ["model.bf16_features=true", "model.channels_last=true", *OLD_PATH],
        False,
    ),
    BEFORE: (OLD_PATH, False),
    "recipe + sparse RoIAlign (CPU)": (["model.roi_align=auto"], False),
    NOW: (["model.roi_align=auto"], True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo/teacher_a.yaml")
    ap.add_argument("--data", default="data/bench")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per setting (>= 1)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the settings (>= 1)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed batches first (oneDNN kernel selection)")
    ap.add_argument(
        "--profile", action="store_true", help="first, the time per part of one step of the recipe"
    )
    args = ap.parse_args()
    if args.batches < 1 or args.warmup < 0 or args.rounds < 1:
        ap.error("--batches and --rounds must be >= 1 and --warmup >= 0")

    from bench_teacher import ensure_bench_data  # benchmarks/ is on sys.path when run as a script

    from i3cl_core.config import load_config
    from i3cl_core.data.coco import CocoTextDataset, collate
    from i3cl_core.data.transforms import build_train_transform
    from i3cl_core.model.detector import native_bf16

    data = Path(args.data)
    ensure_bench_data(data)
    base = [f"data.train=[{{ann_file: {data}/train/annotations.json, img_root: {data}/train/images}}]"]
    cfg = load_config(args.config, base)
    dataset = CocoTextDataset(
        [(s.ann_file, s.img_root) for s in cfg.data.train],
        transform=build_train_transform(cfg.data.augment),
        train=True,
        seed=cfg.train.seed,
    )
    dataset.set_epoch(0)
    bs = cfg.train.batch_size
    n = args.batches + args.warmup
    batches = [collate([dataset[(i * bs + j) % len(dataset)] for j in range(bs)]) for i in range(n)]
    print(
        f"{args.config}: {n} batches of {bs} images, {torch.get_num_threads()} threads, "
        f"native bfloat16 on this CPU: {native_bf16(torch.device('cpu'))}"
    )

    if args.profile:
        print_profile(profile_step(load_config(args.config, base), dataset, batches, args.warmup))

    results: dict[str, list[float]] = {name: [] for name in SETTINGS}
    tv: list[float] = []
    recipe = load_config(args.config, base)
    for r in range(args.rounds):
        for name, (overrides, fused) in SETTINGS.items():
            results[name].append(
                images_per_s(load_config(args.config, base + overrides), fused, batches, args)
            )
        tv.append(torchvision_images_per_s(recipe, batches, args.warmup))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    baseline = med(results["float32, NCHW (baseline)"])
    print(f"{'setting (median over rounds, min..max)':48s} {'img/s':>7s} {'':>13s} {'vs baseline':>11s}")
    for name, ips in [*results.items(), ("torchvision Mask R-CNN (same sizes)", tv)]:
        print(f"{name:48s} {med(ips):7.2f} ({min(ips):.2f}..{max(ips):.2f}) {med(ips) / baseline:10.2f}x")
    use_bf16 = recipe.model.bf16_features is True or (
        recipe.model.bf16_features == "auto" and native_bf16(torch.device("cpu"))
    )
    ratios = [now / before for now, before in zip(results[NOW], results[BEFORE])]
    print(
        f"the recipe (bf16 {use_bf16}, channels_last {recipe.model.channels_last}) now / before, per round: "
        + " ".join(f"{x:.2f}x" for x in ratios)
        + f"; median {med(ratios):.2f}x training images/s (goal >= 1.5x)"
    )
    print(
        f"time per training image, the recipe now / torchvision: {med(tv) / med(results[NOW]):.2f}x "
        f"(goal <= 1.1x); both float32 NCHW with torchvision's RoIAlign: {med(tv) / baseline:.2f}x"
    )


def images_per_s(cfg, fused: bool, batches, args) -> float:
    """Training images/s of ``cfg`` on ``batches`` after ``args.warmup`` untimed ones."""
    from i3cl_core.engine.train import build_optimizer
    from i3cl_core.model.detector import build_model

    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(model, cfg.train, fused=fused)
    for i, (images, targets) in enumerate(batches):
        if i == args.warmup:
            t0 = time.perf_counter()
        losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        if cfg.train.grad_clip:  # as the trainer does
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
    return args.batches * len(batches[0][0]) / (time.perf_counter() - t0)


PARTS = {
    "backbone": "backbone",
    "FPN": "neck",
    "IntraCL": "intra_cl",
    "RPN (head, proposals, sampling, losses)": "rpn",
    "box pooling": "roi_heads.box_pooler",
    "box head": "roi_heads.box_head",
    "mask pooling": "roi_heads.mask_pooler",
    "InterCL": "roi_heads.inter_cl",
    "mask head": "roi_heads.mask_head",
    "RoI heads": "roi_heads",
}


def profile_step(cfg, dataset, batches, warmup: int) -> dict[str, float]:
    """Seconds per training step of each part (wall clock, module forward hooks; on the CPU every part
    runs in order, so the parts add up to the step)."""
    from i3cl_core.data.coco import collate
    from i3cl_core.engine.train import build_optimizer
    from i3cl_core.model.detector import build_model

    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(model, cfg.train)
    spent = dict.fromkeys([*PARTS, "backward", "clip + optimizer", "data", "step"], 0.0)
    started: dict[str, float] = {}
    timing = [False]
    for part, name in PARTS.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:  # a part this config leaves out (IntraCL, InterCL)
            continue

        def pre(_m, _a, part=part):
            started[part] = time.perf_counter()

        def post(_m, _a, _o, part=part):
            if timing[0]:
                spent[part] += time.perf_counter() - started[part]

        for m in (
            module if isinstance(module, torch.nn.ModuleList) else [module]
        ):  # IntraCL: one block per level
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)
    bs = len(batches[0][0])
    for i, (images, targets) in enumerate(batches):
        timing[0] = i >= warmup
        t0 = time.perf_counter()
        losses = model(images, targets)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        t2 = time.perf_counter()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        t3 = time.perf_counter()
        if timing[0]:
            spent["backward"] += t2 - t1
            spent["clip + optimizer"] += t3 - t2
            spent["step"] += t3 - t0
            t4 = time.perf_counter()
            collate([dataset[(i * bs + j) % len(dataset)] for j in range(bs)])
            spent["data"] += time.perf_counter() - t4
    n = len(batches) - warmup
    return {k: v / n for k, v in spent.items()}


def print_profile(spent: dict[str, float]) -> None:
    step = spent["step"]
    inner = ("box pooling", "box head", "mask pooling", "InterCL", "mask head")
    rows = [
        (k, spent[k])
        for k in ("backbone", "FPN", "IntraCL", "RPN (head, proposals, sampling, losses)", *inner)
    ]
    rows.append(("RoI sampling, mask targets, losses", spent["RoI heads"] - sum(spent[k] for k in inner)))
    forward = sum(
        spent[k]
        for k in ("backbone", "FPN", "IntraCL", "RPN (head, proposals, sampling, losses)", "RoI heads")
    )
    rows += [
        ("forward, rest (preprocessing)", step - spent["backward"] - spent["clip + optimizer"] - forward),
        ("backward", spent["backward"]),
        ("clip + optimizer", spent["clip + optimizer"]),
    ]
    print(f"one training step of the recipe: {step * 1000:.0f} ms ({len(rows)} parts; data loading apart)")
    print(f"{'part':40s} {'ms/step':>8s} {'share':>6s}")
    for name, sec in rows:
        print(f"{name:40s} {sec * 1000:8.1f} {sec / step:6.1%}")
    print(
        f"{'data (decode, augment, collate; apart)':40s} {spent['data'] * 1000:8.1f} "
        f"{spent['data'] / step:6.1%}"
    )


def torchvision_model(cfg):
    """torchvision's Mask R-CNN with the tiny teacher's backbone, FPN width, heads and sampling numbers."""
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    m = cfg.model
    c = m.fpn_channels
    backbone = BackboneWithFPN(
        resnet18(), {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, [64, 128, 256, 512], c
    )
    scales = [s for s, _ in cfg.data.augment.scales]
    return MaskRCNN(
        backbone,
        num_classes=None,
        min_size=tuple(scales),
        max_size=max(x for _, x in cfg.data.augment.scales),
        rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
        box_batch_size_per_image=m.box_batch_size_per_image,
        box_head=TwoMLPHead(c * 7 * 7, m.representation_size),
        box_predictor=FastRCNNPredictor(m.representation_size, m.num_classes + 1),
        mask_head=MaskRCNNHeads(c, [c] * m.mask_head_convs, 1),
        mask_predictor=MaskRCNNPredictor(c, c, m.num_classes + 1),
    )


def torchvision_targets(images, targets) -> list[dict]:
    """Our targets as torchvision's: boxes, labels and full-image masks of the text instances."""
    import cv2
    import numpy as np

    out = []
    for image, t in zip(images, targets):
        inst = t["instances"]
        h, w = image.shape[-2:]
        masks = np.zeros((len(inst), h, w), np.uint8)
        for k, parts in enumerate(inst.polygons):  # pixel-area coordinates: pixel centres at +0.5
            cv2.fillPoly(
                masks[k], [np.round(np.asarray(p, np.float64) - 0.5).astype(np.int32) for p in parts], 1
            )
        out.append(
            {
                "boxes": inst.boxes.float(),
                "labels": torch.ones(len(inst), dtype=torch.int64),
                "masks": torch.from_numpy(masks),
            }
        )
    return out


def torchvision_images_per_s(cfg, batches, warmup: int) -> float:
    from i3cl_core.engine.train import build_optimizer

    torch.manual_seed(0)
    model = torchvision_model(cfg).train()
    optimizer = build_optimizer(model, cfg.train)
    tv_batches = [(images, torchvision_targets(images, targets)) for images, targets in batches]
    t0 = time.perf_counter()
    for i, (images, targets) in enumerate(tv_batches):
        if i == warmup:
            t0 = time.perf_counter()
        losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
    return (len(batches) - warmup) * len(batches[0][0]) / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
