"""Ensemble-inference throughput on this machine: images/s of ``run_ensemble`` (the code the pipeline's
ensemble stage runs) with 1 and 2 workers, batch 1 and 4, float32 and bfloat16 features, all in one run
on the same images and teachers. Outputs of the 1- and 2-worker runs are compared byte for byte. The last
rows run the same teachers with torchvision's RoIAlign kernel (``model.roi_align: torchvision``, the path
before the sparse one became the CPU's default) and compare its shards with the default's.

    .venv/bin/python benchmarks/bench_ensemble.py [--images 60] [--side 320] [--rounds 3] [--devices cpu]

Teachers: two demo-sized I3CL models with random weights and a biased classifier (so that each
image has detections to trace); throughput does not depend on what they learned. On a GPU node pass
``--devices cuda:0 cuda:1`` to compare one GPU with two.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--side", type=int, default=320)
    ap.add_argument("--rounds", type=int, default=3, help="passes over every row, interleaved")
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

    one = tuple(args.devices[:1])  # tuples: the rows are dict keys
    two = tuple(args.devices[:2]) if len(args.devices) > 1 else one * 2
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
        ckpts = {"auto": [], "torchvision": []}
        for impl, paths in ckpts.items():
            for seed in (0, 1):
                overrides = ["model.backbone.weights=null", f"model.roi_align={impl}"]
                cfg = load_config(REPO / "configs" / "demo" / "teacher_a.yaml", overrides)
                torch.manual_seed(seed)
                m = build_model(cfg).eval()
                m.roi_heads.box_head.cls_score.bias.data = torch.tensor([0.0, 0.6])
                paths.append(str(save_checkpoint(tmp / impl / f"teacher_{seed}.pth", m, cfg)))
        print(
            f"{args.images} images of {args.side} px, 2 teachers, torch threads {torch.get_num_threads()}, "
            f"{args.rounds} interleaved rounds (img/s: the median, then min..max; a shared machine drifts)"
        )
        rows = [
            (one, 1, "fp32", "auto"),
            (two, 1, "fp32", "auto"),
            (one, 4, "fp32", "auto"),
            (two, 4, "fp32", "auto"),
            (one, 4, "bf16", "auto"),
            (two, 4, "bf16", "auto"),
            (one, 4, "fp32", "torchvision"),
            (one, 4, "bf16", "torchvision"),
        ]
        speeds = {row: [] for row in rows}
        outs = {}  # row -> its last round's output folder (the shards compared below)
        for r in range(args.rounds):
            for row in rows:
                devices, batch, precision, impl = row
                out = tmp / f"r{r}_ens_{len(devices)}_{batch}_{precision}_{impl}"  # fresh: no shard reused
                t0 = time.perf_counter()
                s = run_ensemble(
                    ckpts[impl],
                    data["img_root"],
                    out,
                    shard_size=10,
                    devices=list(devices),
                    batch_size=batch,
                    loader_workers=1,
                    precision=precision,
                    progress=False,
                )
                speeds[row].append(2 * s["images"] / (time.perf_counter() - t0))  # model-images per second
                if row in outs:
                    shutil.rmtree(outs[row])
                outs[row] = out
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        med = {row: statistics.median(v) for row, v in speeds.items()}
        print(
            f"{'workers':>8} {'devices':<18} {'batch':>5} {'precision':>9} {'roi_align':>11} {'img/s':>7} "
            f"{'min..max':>12} {'vs first':>9}"
        )
        for row in rows:
            devices, batch, precision, impl = row
            span = f"{min(speeds[row]):.2f}..{max(speeds[row]):.2f}"
            print(
                f"{len(devices):>8} {' '.join(devices):<18} {batch:>5} {precision:>9} {impl:>11} "
                f"{med[row]:7.2f} {span:>12} {med[row] / med[rows[0]]:8.2f}x"
            )
        for batch, precision in ((1, "fp32"), (4, "fp32"), (4, "bf16")):
            a, b = outs[(one, batch, precision, "auto")], outs[(two, batch, precision, "auto")]
            print(f"batch {batch} {precision}: 1 and 2 workers wrote {_same_shards(a, b)} shard files")
        for precision in ("fp32", "bf16"):
            new, old = (one, 4, precision, "auto"), (one, 4, precision, "torchvision")
            per_round = " ".join(f"{x / y:.2f}" for x, y in zip(speeds[new], speeds[old]))
            print(
                f"batch 4 {precision}, one worker: default RoIAlign {med[new] / med[old]:.2f}x torchvision's "
                f"kernel (per round {per_round}); {_same_shards(outs[new], outs[old])} shard files"
            )


def _same_shards(a: Path, b: Path) -> str:
    """'identical', or how the detections of two ensemble outputs differ (count, largest score and
    polygon-vertex differences of the detections matched in order)."""
    files = sorted(p.relative_to(a) for p in a.rglob("shard_*.json"))
    if all((a / f).read_bytes() == (b / f).read_bytes() for f in files):
        return "identical"
    n_a = n_b = 0
    d_score = d_xy = 0.0
    for f in files:
        ra, rb = json.loads((a / f).read_text()), json.loads((b / f).read_text())  # COCO results
        n_a, n_b = n_a + len(ra), n_b + len(rb)
        for x, y in zip(ra, rb):
            d_score = max(d_score, abs(x["score"] - y["score"]))
            pa, pb = np.asarray(x["segmentation"][0]), np.asarray(y["segmentation"][0])
            if pa.shape == pb.shape:
                d_xy = max(d_xy, float(np.abs(pa - pb).max(initial=0.0)))
    return (
        f"DIFFERENT ({n_a} vs {n_b} detections; in order, largest score difference {d_score:.2g}, "
        f"largest vertex difference {d_xy:.2g} px where the vertex counts agree)"
    )


if __name__ == "__main__":
    main()
