"""The GPU check: what a user's GPU node does with this project, in one table (about 3-5 minutes on
one recent GPU; each part has its own time limit, so a slow or failing part leaves a row saying so).

Parts (each in its own process, so that peak memory and failures stay per part):

* ``train``     R50 I3CL (the paper's config, random init: no download) at 800 px, batch 2,
                ``--iters`` iterations with AMP (float16 autocast + gradient scaling): images/s and
                peak GPU memory.
* ``infer``     inference at the ArT test scale (short side 1185, long side <= 1950) on synthetic
                images: I3CL with float16 features (AMP; heads float32, as ``infer.precision: auto``
                runs it on CUDA), with bfloat16 features, in float32; torchvision's
                maskrcnn_resnet50_fpn under float16 autocast in the same process (ratio). Polygons are traced
                as the pipeline does. Random weights on both, one text class.
* ``pipeline``  the tiny ssl-pipeline on demo data (teachers, ensemble with ``infer.devices=auto``,
                fusion, student, evaluation) on a local Prefect server: seconds per stage.

    benchmarks/gpu_check.sh                       # everything, on the first GPU
    .venv/bin/python benchmarks/gpu_check.py --parts train infer --quick --device cpu   # the CPU smoke run

``--quick`` shrinks every part (tiny sizes, few iterations) to check that the script works; its
numbers mean nothing. The table is also written as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMITS = {
    "train": 150,
    "infer": 180,
    "pipeline": 240,
}  # seconds per part (the whole check stays under 8 minutes)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(out: Path, n: int, side: int) -> tuple[dict, list[str]]:
    from i3cl_core.data.synth import generate_dataset

    data = generate_dataset(
        out, n, seed=3, size=(side, side), progress=False, cjk=False, workers=min(8, os.cpu_count() or 1)
    )
    return data, sorted(str(p) for p in Path(data["img_root"]).glob("*.jpg"))


def part_train(args, device, tmp: Path) -> list[dict]:
    import torch

    from i3cl_core.config import load_config
    from i3cl_core.data.coco import CocoTextDataset, collate
    from i3cl_core.data.transforms import build_train_transform
    from i3cl_core.engine.train import build_optimizer
    from i3cl_core.model.detector import build_model

    side = 128 if args.quick else 800
    data, _ = _images(tmp / "train", 4 if args.quick else 12, side)
    config = "configs/demo/tiny_model.yaml" if args.quick else "configs/i3cl_r50/finetune.yaml"
    cfg = load_config(
        REPO / config, [f"data.augment.scales=[[{side}, {side}]]", "model.backbone.weights=null"]
    )
    dataset = CocoTextDataset(
        [(data["ann_file"], data["img_root"])],
        transform=build_train_transform(cfg.data.augment),
        train=True,
        seed=0,
    )
    dataset.set_epoch(0)
    batches = [collate([dataset[(2 * i + j) % len(dataset)] for j in range(2)]) for i in range(len(dataset))]
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    optimizer = build_optimizer(model, cfg.train)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    iters, warmup = (3, 1) if args.quick else (args.iters, 10)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(i: int) -> None:
        images, targets = batches[i % len(batches)]
        images = [im.to(device, non_blocking=True) for im in images]
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or 35.0)
        scaler.step(optimizer)
        scaler.update()

    for i in range(warmup + iters):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        step(i)
    _sync(device)
    seconds = time.perf_counter() - t0
    from i3cl_core.engine.host_syncs import HostSyncCounter

    with HostSyncCounter() as syncs:  # one more step, counted (the counter slows it: not timed)
        step(warmup + iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    setting = f"{Path(config).stem}, {side} px, batch 2, {iters} iterations, {'AMP fp16' if amp else 'fp32'}"
    return [
        {
            "check": "training",
            "setting": setting,
            "images_per_s": round(2 * iters / seconds, 2),
            "peak_gib": None if peak is None else round(peak, 2),
            "host_syncs_per_step": syncs.total,
        }
    ]


def part_infer(args, device, tmp: Path) -> list[dict]:
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from i3cl_core.config import load_config
    from i3cl_core.data.image_io import read_image
    from i3cl_core.model.detector import build_model

    short, long = (128, 160) if args.quick else (1185, 1950)
    _, paths = _images(tmp / "infer", 2 if args.quick else args.images, 160 if args.quick else 1024)
    images = [torch.from_numpy(read_image(p).transpose(2, 0, 1).copy()).float().div_(255.0) for p in paths]
    config = "configs/demo/tiny_model.yaml" if args.quick else "configs/i3cl_r50/finetune.yaml"
    cfg = load_config(
        REPO / config,
        [f"model.test_short_side={short}", f"model.test_long_side={long}", "model.backbone.weights=null"],
    )
    torch.manual_seed(0)
    ours = build_model(cfg).to(device).eval()
    tv = (
        maskrcnn_resnet50_fpn(
            weights=None,
            weights_backbone=None,
            num_classes=2,
            min_size=short,
            max_size=long,
            box_detections_per_img=cfg.model.max_detections,
        )
        .to(device)
        .eval()
    )
    cuda = device.type == "cuda"

    def run(fn, precision: str) -> tuple[float, float]:
        ctx = (
            torch.autocast("cuda", dtype=torch.float16)
            if precision == "fp16"
            else torch.autocast(device.type, enabled=False)
        )
        with torch.inference_mode(), ctx:
            fn(images[0].to(device))  # warm-up (kernel selection)
            _sync(device)
            t0 = time.perf_counter()
            n = 0
            for im in images:
                out = fn(im.to(device))
                n += len(out)
            _sync(device)
        return len(images) / (time.perf_counter() - t0), n / len(images)

    rows = []
    # ours as the ensemble stage runs it (infer.precision): float16 or bfloat16 features, float32 heads
    settings = [("fp16", "AMP fp16 features")] if cuda else []
    settings += [("bf16", "bf16_features"), ("fp32", "float32")]
    for precision, label in settings:
        ours.cfg.bf16_features = precision == "bf16"
        ours.fp16_features = precision == "fp16"
        ips, dets = run(lambda im: ours.predict([im])[0]["polygons"], "fp32")
        rows.append(
            {
                "check": f"inference I3CL ({Path(config).stem})",
                "setting": f"{label}, {short}/{long}, polygons traced",
                "images_per_s": round(ips, 2),
                "detections": round(dets, 1),
            }
        )
    ours.cfg.bf16_features, ours.fp16_features = False, False
    tv_precision = "fp16" if cuda else "fp32"
    ips, dets = run(lambda im: tv([im])[0]["boxes"], tv_precision)
    rows.append(
        {
            "check": "inference torchvision maskrcnn_resnet50_fpn",
            "setting": f"{'AMP fp16' if cuda else 'float32'}, {short}/{long}",
            "images_per_s": round(ips, 2),
            "detections": round(dets, 1),
        }
    )

    def ours_ips(prefix: str) -> float:
        return next(
            r["images_per_s"]
            for r in rows
            if r["check"].startswith("inference I3CL") and r["setting"].startswith(prefix)
        )

    rows.append(
        {
            "check": "ratio I3CL / torchvision time per image",
            "setting": "AMP fp16" if cuda else "float32",
            "ratio": round(ips / ours_ips("AMP fp16" if cuda else "float32"), 2),
        }
    )
    rows.append(
        {
            "check": "bf16_features on vs off (speed-up)",
            "setting": "I3CL, vs float32",
            "ratio": round(ours_ips("bf16_features") / ours_ips("float32"), 2),
        }
    )
    return rows


def part_pipeline(args, device, tmp: Path) -> list[dict]:
    from flows.server import LocalServer, free_port

    with LocalServer(tmp / "prefect", port=free_port(4300), timeout=120) as server:
        os.environ.update(server.env)
        from flows import pipeline
        from i3cl_core.pipeline.params import DataParams, EvalParams, FuseConfig, InferParams, TrainParams

        wd = tmp / "run"
        overrides = [
            "train.epochs=1" if args.quick else "train.epochs=4",
            "train.iters_per_epoch=null",
            "data.num_workers=2",
            "train.log_interval=5",
        ]
        if args.quick:
            overrides += [
                "model.test_short_side=128",
                "model.test_long_side=160",
                "data.augment.scales=[[112, 160]]",
            ]
        data = DataParams(
            demo_dir=str(tmp / "demo"),
            demo_size=128 if args.quick else 320,
            demo_train=6 if args.quick else 25,
            demo_unlabeled=4 if args.quick else 100,
            demo_val=3 if args.quick else 25,
            demo_test=3 if args.quick else 50,
        )
        train = TrainParams(overrides=overrides, control=False)
        infer = InferParams(devices="auto", shard_size=25)
        fuse = FuseConfig()
        rows, t = [], time.time()
        stages = [
            ("train-teachers", lambda: pipeline.train_teachers(str(wd), data, train)),
            ("ensemble-inference", lambda: pipeline.ensemble_inference(str(wd), data, infer)),
            ("fuse-pseudo-labels", lambda: pipeline.fuse_pseudo_labels(str(wd), data, fuse)),
            ("train-student", lambda: pipeline.train_student(str(wd), data, train)),
            ("evaluate", lambda: pipeline.evaluate(str(wd), data, EvalParams())),
        ]
        from i3cl_core.devices import resolve_devices

        for name, run in stages:
            t = time.time()
            result = run()
            extra = ""
            if name == "evaluate":
                extra = ", ".join(f"{k} F {v['hmean']:.3f}" for k, v in result.items())
            elif name == "ensemble-inference":
                extra = f"devices {', '.join(resolve_devices('auto'))}"
            rows.append(
                {
                    "check": f"tiny ssl-pipeline: {name}",
                    "setting": extra,
                    "seconds": round(time.time() - t, 1),
                }
            )
    return rows


PARTS = {"train": part_train, "infer": part_infer, "pipeline": part_pipeline}


def run_part(part: str, args) -> list[dict]:
    import torch

    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{part}-") as tmp:
        return PARTS[part](args, device, Path(tmp))


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    cols = [
        "check",
        "setting",
        "images_per_s",
        "peak_gib",
        "host_syncs_per_step",
        "detections",
        "ratio",
        "seconds",
        "status",
    ]
    cols = [c for c in cols if any(c in r for r in rows)]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-|-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "") if r.get(c) is not None else "-").ljust(widths[c]) for c in cols))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--device", default="auto", help="auto (the first GPU, else the CPU), cuda:N or cpu")
    ap.add_argument("--iters", type=int, default=100, help="timed training iterations")
    ap.add_argument("--images", type=int, default=20, help="timed inference images per setting")
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the script, the numbers mean nothing"
    )
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument(
        "--part", default=None, help=argparse.SUPPRESS
    )  # internal: run one part, print its rows as JSON
    args = ap.parse_args()
    if args.iters < 1 or args.images < 1:
        ap.error("--iters and --images must be >= 1")
    if args.part:
        print("ROWS " + json.dumps(run_part(args.part, args)), flush=True)
        return 0
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    header = f"GPU check: {gpu}; torch {torch.__version__}; {os.cpu_count()} CPU cores" + (
        "; --quick (numbers mean nothing)" if args.quick else ""
    )
    rows, failed = [], False
    for part in args.parts:
        cmd = [
            sys.executable,
            __file__,
            "--part",
            part,
            "--device",
            args.device,
            "--iters",
            str(args.iters),
            "--images",
            str(args.images),
        ] + (["--quick"] if args.quick else [])
        t0 = time.time()
        print(f"[{part}] running (limit {LIMITS[part]} s)", flush=True)
        try:
            res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=LIMITS[part])
            found = [ln for ln in res.stdout.splitlines() if ln.startswith("ROWS ")]
            if res.returncode == 0 and found:
                rows += json.loads(found[-1][5:])
            else:
                failed = True
                tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
                rows.append({"check": part, "status": f"FAILED (exit {res.returncode}): {tail[0][:120]}"})
                sys.stderr.write(res.stderr[-4000:])
        except subprocess.TimeoutExpired:
            failed = True
            rows.append({"check": part, "status": f"TIMEOUT after {LIMITS[part]} s"})
        print(f"[{part}] {time.time() - t0:.0f} s", flush=True)
    print()
    print_table(rows, header)
    if args.out:
        from i3cl_core.utils import atomic_write_json

        atomic_write_json(args.out, {"header": header, "rows": rows}, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
