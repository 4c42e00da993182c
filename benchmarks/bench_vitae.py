"""CPU forward time of the ViTAEv2-S backbone + FPN next to ResNet-50 + FPN, in the same process.

Random weights, one 800x800 image (a size divisible by 32, as the detector pads to), inference mode.
Prints the median seconds of ``--repeats`` runs after one warm-up for each, the ratio, and the
ViTAEv2-S time per stage.

    .venv/bin/python benchmarks/bench_vitae.py [--size 800] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from bench_model_latency import timed  # median of repeats after a warm-up (same folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from i3cl_core.model.backbone import FPN, ResNetBackbone
    from i3cl_core.model.vitae import ViTAEv2Backbone

    x = torch.randn(1, 3, args.size, args.size)
    nets = {}
    for name, backbone in (("resnet50", ResNetBackbone("resnet50")), ("vitaev2_s", ViTAEv2Backbone())):
        nets[name] = torch.nn.Sequential(backbone, FPN(backbone.out_channels, 256)).eval()

    stage_time: dict[int, float] = defaultdict(float)
    starts: dict[int, float] = {}
    for i, stage in enumerate(nets["vitaev2_s"][0].layers):
        stage.RC.register_forward_pre_hook(lambda m, a, i=i: starts.__setitem__(i, time.perf_counter()))
        stage.NC[-1].register_forward_hook(
            lambda m, a, o, i=i: stage_time.__setitem__(i, stage_time[i] + time.perf_counter() - starts[i])
        )

    results = {}
    with torch.inference_mode():
        for name, net in nets.items():
            stage_time.clear()
            results[name] = timed(lambda net=net: net(x), args.repeats)
    params = {n: sum(p.numel() for p in net[0].parameters()) / 1e6 for n, net in nets.items()}
    print(
        f"backbone + FPN forward, {args.size}x{args.size}, batch 1, {args.threads} threads, "
        f"median of {args.repeats} "
        f"after a warm-up (torch {torch.__version__})"
    )
    for name, t in results.items():
        print(f"  {name:<10} {t:7.3f} s   (backbone {params[name]:.2f} M parameters)")
    print(f"  ratio vitaev2_s / resnet50: {results['vitaev2_s'] / results['resnet50']:.2f}x")
    total = sum(stage_time.values())
    if total:
        shares = ", ".join(f"stage {i + 1} {100 * t / total:.0f}%" for i, t in sorted(stage_time.items()))
        print(f"  vitaev2_s time by stage (backbone only): {shares}")


if __name__ == "__main__":
    main()
