"""CPU inference latency of the paper's R50 I3CL next to torchvision's maskrcnn_resnet50_fpn.

Both run on the same 1024x1024 input in the same process, with random weights and one text class
(torchvision's model is built with num_classes=2 so both heads see the same number of detections),
test scale 1024 and the same RPN sizes. Prints median seconds per image, the ratio, and where I3CL's
time goes (per top-level part, measured with forward hooks).

    .venv/bin/python benchmarks/bench_model_latency.py [--size 1024] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from i3cl_core.config import load_config
    from i3cl_core.model.detector import build_model

    s = args.size
    cfg = load_config(None, [f"model.test_short_side={s}", f"model.test_long_side={s}"])
    ours = build_model(cfg).eval()
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, min_size=s, max_size=s,
                               box_detections_per_img=100, box_nms_thresh=0.35).eval()
    image = torch.rand(3, s, s)

    # where I3CL's time goes
    spent: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    parts = {"backbone": ours.backbone, "neck": ours.neck, "rpn": ours.rpn, "inter_cl": ours.roi_heads.inter_cl,
             "box_head": ours.roi_heads.box_head, "mask_head": ours.roi_heads.mask_head}
    parts.update({f"intra_cl.P{i + 2}": b for i, b in enumerate(ours.intra_cl)})
    for name, mod in parts.items():
        mod.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter()))
        mod.register_forward_hook(lambda m, a, o, n=name: spent.__setitem__(n, spent[n] + time.perf_counter() - starts[n]))

    with torch.no_grad():
        t_tv = timed(lambda: tv([image]), args.repeats)
        ours([image])  # a first (slow) call, left out of the per-part times
        spent.clear()
        t_ours = timed(lambda: ours([image]), args.repeats)
        n_calls = args.repeats + 1  # timed() makes one more warm call than it times
        det = ours.predict([image], polygons=False)[0]
        from i3cl_core.model.detector import detections_to_polygons

        t_poly = timed(lambda: detections_to_polygons(det["boxes"], det["scores"], det["mask_probs"], (s, s), 0.5, 0.005), args.repeats)

    print(f"input {s}x{s}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  torchvision maskrcnn_resnet50_fpn : {t_tv:7.3f} s/image")
    print(f"  I3CL R50 (IntraCL + InterCL)      : {t_ours:7.3f} s/image")
    print(f"  ratio I3CL / torchvision          : {t_ours / t_tv:7.2f}x")
    print(f"  of which mask->polygon tracing    : {t_poly:7.3f} s/image ({len(det['boxes'])} detections)")
    print("  I3CL time per part (s/image):")
    intra = sum(v for k, v in spent.items() if k.startswith("intra_cl")) / n_calls
    for k in ("backbone", "neck", "rpn", "box_head", "mask_head", "inter_cl"):
        print(f"    {k:<10} {spent[k] / n_calls:7.3f}")
    print(f"    {'intra_cl':<10} {intra:7.3f}  (" + ", ".join(f"{k[-2:]} {v / n_calls:.3f}" for k, v in spent.items() if k.startswith("intra_cl")) + ")")


if __name__ == "__main__":
    main()
