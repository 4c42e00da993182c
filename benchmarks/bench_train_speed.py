"""Training speed of the tiny teacher with and without the speed switches, side by side in one run.

The same fixed batches (augmented once, held in memory, so data loading is not timed) go through
forward, backward, gradient clipping and the optimizer step of the config for each setting; the baseline is float32 with contiguous (NCHW)
tensors. Prints training images per second per setting and the ratio to the baseline.

    .venv/bin/python benchmarks/bench_train_speed.py [--config configs/demo/teacher_a.yaml]
        [--data data/bench] [--batches 30] [--warmup 5]

``model.bf16_features`` is forced on here (not ``auto``) to show what it costs or gains on this CPU;
without AVX512-BF16/AMX bfloat16 is emulated and slower, which is why the recipes say ``auto``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

SETTINGS = {
    "float32, NCHW (baseline)": ["model.bf16_features=false", "model.channels_last=false"],
    "channels_last": ["model.bf16_features=false", "model.channels_last=true"],
    "bf16_features": ["model.bf16_features=true", "model.channels_last=false"],
    "bf16_features + channels_last": ["model.bf16_features=true", "model.channels_last=true"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo/teacher_a.yaml")
    ap.add_argument("--data", default="data/bench")
    ap.add_argument("--batches", type=int, default=30, help="timed batches per setting (>= 1)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed batches first (oneDNN kernel selection)")
    args = ap.parse_args()
    if args.batches < 1 or args.warmup < 0:
        ap.error("--batches must be >= 1 and --warmup >= 0")

    from i3cl_core.config import load_config
    from i3cl_core.data.coco import CocoTextDataset, collate
    from i3cl_core.data.transforms import build_train_transform
    from i3cl_core.engine.train import build_optimizer
    from i3cl_core.model.detector import build_model, native_bf16

    from bench_teacher import ensure_bench_data  # benchmarks/ is on sys.path when run as a script

    data = Path(args.data)
    ensure_bench_data(data)
    base = [f"data.train=[{{ann_file: {data}/train/annotations.json, img_root: {data}/train/images}}]"]
    cfg = load_config(args.config, base)
    dataset = CocoTextDataset([(s.ann_file, s.img_root) for s in cfg.data.train],
                              transform=build_train_transform(cfg.data.augment), train=True, seed=cfg.train.seed)
    dataset.set_epoch(0)
    bs = cfg.train.batch_size
    n = args.batches + args.warmup
    batches = [collate([dataset[(i * bs + j) % len(dataset)] for j in range(bs)]) for i in range(n)]
    print(f"{args.config}: {n} batches of {bs} images, {torch.get_num_threads()} threads, "
          f"native bfloat16 on this CPU: {native_bf16(torch.device('cpu'))}")

    results = {}
    for name, overrides in SETTINGS.items():
        cfg = load_config(args.config, base + overrides)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        optimizer = build_optimizer(model, cfg.train)
        for i, (images, targets) in enumerate(batches):
            if i == args.warmup:
                t0 = time.perf_counter()
            losses = model(images, targets)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            if cfg.train.grad_clip:  # as the trainer does
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
        results[name] = args.batches * bs / (time.perf_counter() - t0)

    baseline = results["float32, NCHW (baseline)"]
    print(f"{'setting':32s} {'img/s':>7s} {'vs baseline':>12s}")
    for name, ips in results.items():
        print(f"{name:32s} {ips:7.2f} {ips / baseline:11.2f}x")


if __name__ == "__main__":
    main()
