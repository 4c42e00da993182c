"""Ensemble-inference throughput on this machine: images/s of ``run_ensemble`` (the code the pipeline's
ensemble stage runs) with 1 and 2 workers, batch 1 and 4, float32 and bfloat16 features, all in one run
on the same images and teachers. Outputs of the 1- and 2-worker runs are compared byte for byte.

    .venv/bin/python benchmarks/bench_ensemble.py [--images 60] [--side 320] [--devices cpu]

Teachers: two demo-sized I3CL models with random weights and a biased classifier (so that each
image has detections to trace); throughput does not depend on what they learned. On a GPU node pass
``--devices cuda:0 cuda:1`` to compare one GPU with two.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--side", type=int, default=320)
    ap.add_argument(
        "--devices",
        nargs="+",
        default=["cpu"],
        help="the device of one worker; two workers use it twice (or give two devices)",
    )
    args = ap.parse_args()

    import torch

    from i3cl_core.config import load_config
    from i3cl_core.data.synth import generate_dataset
    from i3cl_core.model.checkpoint import save_checkpoint
    from i3cl_core.model.detector import build_model
    from i3cl_core.pseudo.ensemble import run_ensemble

    one = args.devices[:1]
    two = args.devices[:2] if len(args.devices) > 1 else one * 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = generate_dataset(
            tmp / "images",
            args.images,
            seed=1,
            size=(args.side, args.side),
            progress=False,
            cjk=False,
            workers=2,
        )
        ckpts = []
        for seed in (0, 1):
            cfg = load_config(REPO / "configs" / "demo" / "teacher_a.yaml", ["model.backbone.weights=null"])
            torch.manual_seed(seed)
            m = build_model(cfg).eval()
            m.roi_heads.box_head.cls_score.bias.data = torch.tensor([0.0, 0.6])
            ckpts.append(str(save_checkpoint(tmp / f"teacher_{seed}.pth", m, cfg)))
        print(f"{args.images} images of {args.side} px, 2 teachers, torch threads {torch.get_num_threads()}")
        print(f"{'workers':>8} {'devices':<18} {'batch':>5} {'precision':>9} {'img/s':>7} {'vs first':>9}")
        first, outs = None, {}
        for devices, batch, precision in (
            (one, 1, "fp32"),
            (two, 1, "fp32"),
            (one, 4, "fp32"),
            (two, 4, "fp32"),
            (one, 4, "bf16"),
            (two, 4, "bf16"),
        ):
            out = tmp / f"ens_{len(devices)}_{batch}_{precision}"
            t0 = time.perf_counter()
            s = run_ensemble(
                ckpts,
                data["img_root"],
                out,
                shard_size=10,
                devices=devices,
                batch_size=batch,
                loader_workers=1,
                precision=precision,
                progress=False,
            )
            ips = 2 * s["images"] / (time.perf_counter() - t0)  # model-images per second
            first = first or ips
            outs[(len(devices), batch, precision)] = out
            print(
                f"{len(devices):>8} {' '.join(devices):<18} {batch:>5} {precision:>9} "
                f"{ips:7.2f} {ips / first:8.2f}x",
                flush=True,
            )
        for batch, precision in ((1, "fp32"), (4, "fp32"), (4, "bf16")):
            a, b = outs[(1, batch, precision)], outs[(2, batch, precision)]
            same = all(
                (a / p.relative_to(a)).read_bytes() == (b / p.relative_to(a)).read_bytes()
                for p in a.rglob("shard_*.json")
            )
            print(
                f"batch {batch} {precision}: 1 and 2 workers wrote "
                f"{'identical' if same else 'DIFFERENT'} shard files"
            )


if __name__ == "__main__":
    main()
