"""CPU inference latency of the paper's R50 I3CL next to torchvision's maskrcnn_resnet50_fpn.

Both run on the same 1024x1024 input in the same process, with random weights and one text class
(torchvision's model is built with num_classes=2 so both heads see the same number of detections),
test scale 1024 and the same RPN sizes, under ``torch.inference_mode``. torchvision runs as a user
runs it (float32, NCHW); I3CL runs in each of its precision / memory-format settings, and the row
marked ``default`` is what ``i3cl infer`` and the ensemble use on this machine (``--precision auto``:
bfloat16 features where the CPU computes them natively, AVX512-BF16 or AMX, else float32; NHWC
convolutions, ``i3cl_core/infer/precision.py``). Prints median seconds per image, the ratios, and where each
model's time goes (per top-level part, measured with forward hooks; the first call is left out).

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


class PartTimer:
    """Seconds spent in each named module (forward pre/post hooks), summed over calls."""

    def __init__(self, parts: dict):
        self.spent: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        for name, mod in parts.items():
            mod.register_forward_pre_hook(
                lambda m, a, n=name: self._start.__setitem__(n, time.perf_counter())
            )
            mod.register_forward_hook(
                lambda m, a, o, n=name: self.spent.__setitem__(
                    n, self.spent[n] + time.perf_counter() - self._start[n]
                )
            )

    def per_call(self, calls: int) -> dict[str, float]:
        return {k: v / calls for k, v in self.spent.items()}


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
    from i3cl_core.infer.precision import resolve_precision
    from i3cl_core.model.detector import build_model, detections_to_polygons

    s = args.size
    cfg = load_config(None, [f"model.test_short_side={s}", f"model.test_long_side={s}"])
    default_prec = resolve_precision("auto", "cpu")
    settings = {  # name -> (bf16 features, channels_last)
        "float32, NCHW": (False, False),
        "float32, channels_last": (False, True),
        "bf16 features, NCHW": (True, False),
        "bf16 features, channels_last": (True, True),
    }
    default = next(
        k for k, (bf, cl) in settings.items() if bf == (default_prec == "bf16") and cl
    )  # load_inference_model's
    tv = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=2,
        min_size=s,
        max_size=s,
        box_detections_per_img=100,
        box_nms_thresh=0.35,
    ).eval()
    tv_parts = PartTimer(
        {
            "backbone": tv.backbone.body,
            "neck": tv.backbone.fpn,
            "rpn": tv.rpn,
            "box_head": tv.roi_heads.box_head,
            "mask_head": tv.roi_heads.mask_head,
        }
    )
    image = torch.rand(3, s, s)
    n_calls = args.repeats + 1  # timed() makes one more warm call than it times

    with torch.inference_mode():
        tv([image])  # a first (slow) call, left out of the per-part times
        tv_parts.spent.clear()
        t_tv = timed(lambda: tv([image]), args.repeats)
        results, parts = {}, {}
        for name, (bf16, cl) in settings.items():
            torch.manual_seed(0)
            c = cfg.model_copy(
                update={"model": cfg.model.model_copy(update={"bf16_features": bf16, "channels_last": cl})}
            )
            ours = build_model(c).eval()
            timer = PartTimer(
                {
                    "backbone": ours.backbone,
                    "neck": ours.neck,
                    "rpn": ours.rpn,
                    "inter_cl": ours.roi_heads.inter_cl,
                    "box_head": ours.roi_heads.box_head,
                    "mask_head": ours.roi_heads.mask_head,
                    **{f"intra_cl.P{i + 2}": b for i, b in enumerate(ours.intra_cl)},
                }
            )
            ours([image])
            timer.spent.clear()
            results[name] = timed(lambda m=ours: m([image]), args.repeats)
            parts[name] = timer.per_call(n_calls)
        det = ours.predict([image], polygons=False)[0]
        t_poly = timed(
            lambda: detections_to_polygons(
                det["boxes"], det["scores"], det["mask_probs"], (s, s), 0.5, 0.005
            ),
            args.repeats,
        )

    print(
        f"input {s}x{s}, {torch.get_num_threads()} threads, median of {args.repeats}, torch.inference_mode; "
        f"this CPU computes bfloat16 natively: {default_prec == 'bf16'}"
    )
    print(f"  {'torchvision maskrcnn_resnet50_fpn (float32, NCHW)':<52} {t_tv:7.3f} s/image")
    for name, t in results.items():
        mark = "  <- default here" if name == default else ""
        print(f"  {'I3CL R50, ' + name:<52} {t:7.3f} s/image  {t / t_tv:5.2f}x torchvision{mark}")
    print(
        f"  ratio I3CL (default: {default}) / torchvision: {results[default] / t_tv:.2f}x (goal <= 1.0x); "
        f"both float32 NCHW: {results['float32, NCHW'] / t_tv:.2f}x"
    )
    print(f"  of which mask->polygon tracing (I3CL): {t_poly:.3f} s/image ({len(det['boxes'])} detections)")
    rows = ("backbone", "neck", "rpn", "box_head", "mask_head", "inter_cl", "intra_cl")
    tvp = tv_parts.per_call(n_calls)
    print(f"  time per part (s/image): {'torchvision':>12} " + " ".join(f"{n[:22]:>24}" for n in settings))
    for k in rows:
        vals = [sum(v for n, v in p.items() if n.startswith(k)) for p in parts.values()]
        print(f"    {k:<22} {tvp.get(k, 0.0):>12.3f} " + " ".join(f"{v:>24.3f}" for v in vals))
    p = parts[default]
    print(
        "    IntraCL per level (default): "
        + ", ".join(f"{k[-2:]} {v:.3f}" for k, v in p.items() if k.startswith("intra_cl"))
    )


if __name__ == "__main__":
    main()
