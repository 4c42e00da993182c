"""Does the semi-supervised loop help? A controlled benchmark where labels are scarce.

Synthetic data (seed 0, ``--size`` px, 320 by default): 10 labeled train images (``--labeled``), 400 unlabeled
images (their ground truth hidden: read only to measure), a labeled validation split of 100 images (every
threshold is chosen there, as a user would) and 300 test images. Per seed (each seed has its own
teachers and data order):

1. teachers: the demo teachers of ``--teachers`` (by default teacher_a, I3CL, alone: a second teacher,
   teacher_b, its IntraCL-only variant, gave the same gain at twice the cost) trained from scratch on the
   labeled images; 1,000 iterations each;
2. ensemble: every teacher (with the test-time augmentation of ``--tta-flips``, h by default, and
   ``--tta-scales``) over the unlabeled images and the validation split;
3. fusion: Weighted Polygon Fusion; ``keep_thr`` is the best-F (``--set-fuse keep_thr_beta=0.5``: F0.5)
   threshold of the fused validation predictions (``i3cl_core.pseudo.thresholds``);
4. arms (default: control, ssl_long, control_long: the recipe that beat its control by +7.6 F on three seeds,
   and the control trained as long), by default (``--protocol scratch``,
   the STAC protocol) each trained from scratch with the first teacher's config, seed and 1,000-iteration
   schedule, only the added images changed; the control is that teacher itself (the same training), so it
   costs no training. ``--protocol continue`` starts every arm from the first teacher's checkpoint instead,
   with the same iterations, learning rate and seed of the data order (the teacher's own final learning rate,
   no warm-up, no decay, so no arm gains from a learning-rate restart; the control is that teacher's schedule
   continued, and ``control - teacher`` < 1 F shows the start converged); control_r2 needs it:
     control        labeled images only
     ssl            labeled + pseudo labels, each weighted by its lossweight
     ssl_uniform    labeled + the same pseudo labels, every weight 1 (isolates the weighting)
     ssl_strong     as ssl, the pseudo-labelled images under strong augmentation (data.augment.strong)
     ssl_strong_bg  as ssl_strong, and their negatives weighted 0.5 (soft background)
     oracle         labeled + the unlabeled images with their true labels (the headroom)
     ssl_nodc       as ssl, but the fusion's uncertain clusters are left out instead of becoming
                    do-not-care regions (the student learns them as background)
     ssl_r2         round 2 of self-training: the round-1 student (ssl_strong_bg, else ssl; with
                    --r2-members all, the teachers too) labels the unlabeled images again, and round 1's arm
                    is trained again with only those labels changed: from scratch (scratch protocol), or as
                    long again from the round-1 student (continue protocol)
     control_r2     round 2 of the control: as long again on the labeled images, from the control
     ssl_online     as ssl_strong_bg, but a mean teacher (train.mean_teacher: an exponential moving average of
                    the student) relabels the pseudo-labelled images online, the student learning its labels
                    on a pixel-only strong view (augment: online); the fused labels seed it
                    (--set-online KEY=VALUE)
     control_ema    its control: labeled images only, saved and scored as the same average of its weights
     control_long   (--protocol scratch) the control trained twice as long, each epoch twice its iterations:
                    how much more training alone would give, next to what the added images give
     ssl_long       (--protocol scratch) ssl_strong_bg trained twice as long, as control_long: compared with
                    control_long (the same schedule) and with the control
                    (the labeled images' better schedule)
   The labeled images keep the default augmentation in every arm: the one thing an arm changes
   is what it adds.
5. every model on the validation split, where its best-F score threshold is chosen, and on the test
   split (ArT protocol), both at that threshold and at its own best test threshold (both printed).

Prints the protocol, then one table: mean and spread (min..max) over seeds of F per arm, the paired
differences per seed with the verdict (a gain holds only if its mean reaches the goal and every seed is
positive), the headroom (oracle - control), the gate (pseudo labels' F on the unlabeled split next to the
control's on the same images, and next to the best teacher's), and the share of unlabeled images each
arm drew at least once.

    .venv/bin/python benchmarks/bench_ssl.py [--seeds 1 2 3] [--work-dir work_dirs/bench_ssl_l10]
        [--arms control ssl_strong_bg ...] [--set-arms key=value ...] [--set-fuse key=value ...]
        [--variant NAME] [--devices auto]

On 2 idle CPU cores about 57 minutes per seed with the default arms (teacher 12 minutes at 2.8 training
images/s, ensemble 2, ssl_long and control_long 20-21 each at 3.2-3.3 images/s, evaluations 2; the
1,000-iteration arms such as ssl_strong_bg and oracle about 12 each); finished trainings, ensemble shards and
evaluations are reused when the benchmark runs again on the same work dir with the same settings (give the
paths the same way: a relative and an absolute path are different inputs). ``--variant NAME`` keeps a lever's
run (its pseudo labels, arms and results) beside the others.
``benchmarks/gpu_ssl.sh`` runs it on a GPU at a larger scale.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

from i3cl_core.utils import atomic_write_json

ARMS = (
    "control",
    "ssl",
    "ssl_uniform",
    "ssl_strong",
    "ssl_strong_bg",
    "oracle",
    "ssl_nodc",
    "ssl_r2",
    "control_r2",
    "ssl_online",
    "control_ema",
    "control_long",
    "ssl_long",
)
DEFAULT_ARMS = ["control", "ssl_long", "control_long"]


def ensure_data(data: Path, args) -> dict:
    from i3cl_core.pipeline.stages import ensure_demo_data

    return ensure_demo_data(
        data,
        seed=0,
        num_train=args.labeled,
        num_unlabeled=args.unlabeled,
        num_test=args.test,
        size=args.size,
        num_val=args.val,
        workers=args.data_workers,
    )


def train(
    config: str, out: Path, sets: list[dict], overrides: list[str], load_from: str | None = None
) -> str:
    """One training as the pipeline runs it (:func:`i3cl_core.pipeline.runner.run_training`, one process),
    by the pipeline's rule for its folder (:func:`i3cl_core.pipeline.training.training_start`): a finished
    run of the same resolved config and input files is reused, an interrupted one resumed, anything else
    cleared first."""
    from i3cl_core.pipeline.runner import run_training
    from i3cl_core.pipeline.stages import trained_checkpoint, training_fingerprint, write_train_config
    from i3cl_core.pipeline.training import training_start

    cfg_path = write_train_config(config, out, sets, overrides, load_from)
    start = training_start(out, training_fingerprint(cfg_path, sets, load_from))
    if start.how == "done":
        return str(trained_checkpoint(out))
    t0 = time.time()
    try:
        ckpt = run_training(out.name, cfg_path, out, start)
    except RuntimeError as e:
        sys.exit(f"{e} (a rerun resumes it)")
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    print(
        f"  trained {out.relative_to(out.parents[1])}: {summary.get('iterations')} iterations, "
        f"{summary.get('images_per_s', 0):.2f} img/s, {time.time() - t0:.0f} s",
        flush=True,
    )
    return str(ckpt)


def drawn_share(train_log: Path) -> list[int] | None:
    """``[drawn, size]`` of the unlabeled set (data.train[1]) from the training's log (its last run: the
    log is appended to), None when it has none."""
    if not train_log.exists():
        return None
    found = re.findall(
        r"data\.train\[1\]: the run draws (\d+) of its (\d+) images", train_log.read_text(errors="replace")
    )
    return [int(found[-1][0]), int(found[-1][1])] if found else None


def uniform_weights(src: Path, dst: Path) -> Path:
    from i3cl_core.utils import atomic_write_json

    data = json.loads(src.read_text())
    for a in data["annotations"]:
        if not a["iscrowd"]:
            a["lossweight"] = 1.0
    return atomic_write_json(dst, data)


def run_seed(seed: int, d: dict, args, wd: Path) -> dict:
    from i3cl_core.config import load_config
    from i3cl_core.pipeline.stages import evaluate_checkpoint, fuse_stage
    from i3cl_core.pseudo.ensemble import run_ensemble
    from i3cl_core.utils import fingerprint

    sd = wd / f"seed{seed}"
    t0 = time.time()
    print(f"seed {seed}: teachers", flush=True)
    teacher_sets = d["labeled"]
    teachers = {}
    for name in args.teachers:
        teachers[name] = train(
            f"configs/demo/{name}.yaml",
            sd / "teachers" / name,
            teacher_sets,
            [f"train.seed={seed * 10 + len(teachers)}", *args.set_teachers],
        )
    t_teachers = time.time() - t0

    print(f"seed {seed}: ensemble over {args.unlabeled} unlabeled + {args.val} validation images", flush=True)
    t1 = time.time()
    ens_kw = dict(
        shard_size=50,
        min_score=0.05,
        devices=args.devices,
        batch_size=args.infer_batch,
        precision="fp32" if args.devices == ["cpu"] else "auto",
        flips=args.tta_flips,
        scales=args.tta_scales,
        progress=False,
    )

    def ensemble(members: list[str], folder: str, suffix: str, kw: dict) -> tuple[dict, dict]:
        """``members`` over the unlabeled images and the validation split (``<folder>_unlabeled<suffix>``,
        ...)."""
        u = run_ensemble(
            members,
            d["unlabeled_images"],
            sd / f"{folder}_unlabeled{suffix}",
            img_root=d["unlabeled_root"],
            **kw,
        )
        v = run_ensemble(
            members, d["val"]["ann_file"], sd / f"{folder}_val{suffix}", img_root=d["val"]["img_root"], **kw
        )
        return u, v

    def fuse(ens: tuple[dict, dict], out: Path, cfg) -> dict:
        """The fuse stage on an ensemble's unlabeled predictions, keep_thr chosen on its validation ones."""
        u, v = ens
        return fuse_stage(
            u["members"], u["images_json"], str(out), cfg, d["unlabeled_gt"], d["unlabeled_root"],
            v["members"], d["val"]["ann_file"],
        )  # fmt: skip

    ens = ensemble(list(teachers.values()), "ensemble", "", ens_kw)
    t_ensemble = time.time() - t1

    fuse_cfg = load_config(
        None, [f"fuse.{o}" if not o.startswith("fuse.") else o for o in args.set_fuse]
    ).fuse
    vs = f"_{args.variant}" if args.variant else ""  # a lever's run keeps the other runs' labels and arms
    pseudo = sd / f"pseudo{vs}" / "train_lossweight.json"
    summary = fuse(ens, pseudo, fuse_cfg)
    report = json.loads(Path(summary["report"]).read_text())
    quality, chosen = report["quality"], report["keep_thr_selection"]
    uniform = uniform_weights(pseudo, sd / f"pseudo{vs}" / "train_uniform.json")
    nodc = None
    if "ssl_nodc" in args.arms:
        nodc = sd / f"pseudo_nodc{vs}" / "train_lossweight.json"
        fuse(ens, nodc, fuse_cfg.model_copy(update={"uncertain_band": None}))
    teacher_unl = {
        n: {"hmean": m["hmean"], "thr": m["best_threshold"]} for n, m in zip(teachers, quality["models"])
    }

    u_root = d["unlabeled_root"]
    mix = args.pseudo_fraction
    arm_sets = {
        "control": [],
        "ssl": [{"ann_file": str(pseudo), "img_root": u_root, "fraction": mix}],
        "ssl_uniform": [{"ann_file": str(uniform), "img_root": u_root, "fraction": mix}],
        "oracle": [{"ann_file": d["unlabeled_gt"], "img_root": u_root, "fraction": mix}],
        "ssl_nodc": [{"ann_file": str(nodc), "img_root": u_root, "fraction": mix}],
        "ssl_strong": [{"ann_file": str(pseudo), "img_root": u_root, "fraction": mix, "augment": "strong"}],
        "ssl_strong_bg": [
            {
                "ann_file": str(pseudo),
                "img_root": u_root,
                "fraction": mix,
                "augment": "strong",
                "background_weight": args.background_weight,
            }
        ],
        "control_ema": [],
        "control_long": [],
        "ssl_online": [
            {
                "ann_file": str(pseudo),
                "img_root": u_root,
                "fraction": mix,
                "augment": "online",
                "background_weight": args.background_weight,
            }
        ],
    }
    arm_sets["ssl_long"] = arm_sets["ssl_strong_bg"]  # the same images and labels, twice the iterations
    # the online arm: a mean teacher relabels the pseudo-labelled images as the student learns (from scratch
    # it trains on the fused labels first, for train.mean_teacher.burn_in_iters; from a teacher it starts
    # at once)
    online_overrides = [
        "train.mean_teacher.enabled=true",
        *([] if args.protocol == "scratch" else ["train.mean_teacher.burn_in_iters=0"]),
        *args.set_online,
    ]
    start = teachers[args.teachers[0]]
    arm_ckpts, t_arms = {}, {}
    arm_dir = sd / (("arms" if args.protocol == "continue" else f"arms_{args.protocol}") + vs)
    if (
        args.protocol == "scratch"
    ):  # every arm is the first teacher's training with only the added data changed
        arm_config, load_from = f"configs/demo/{args.teachers[0]}.yaml", None
        arm_overrides = [*args.set_teachers, f"train.seed={seed * 10}", *args.set_arms]
    else:
        arm_config, load_from = "configs/demo/student.yaml", start
        arm_overrides = [f"train.seed={seed}", *args.arm_schedule, *args.set_arms]
    iters_per_epoch = load_config(arm_config, arm_overrides).train.iters_per_epoch
    long_arms = {"control_long", "ssl_long"} & set(args.arms)
    if long_arms and iters_per_epoch is None:
        sys.exit(
            f"--arms {' '.join(sorted(long_arms))}: the arms' config needs train.iters_per_epoch "
            "(it doubles it)"
        )
    # the long arms' schedule: each epoch twice its iterations (learning-rate steps at the same fractions)
    long_schedule = [f"train.iters_per_epoch={2 * iters_per_epoch}"] if long_arms else []
    round2 = None
    for arm in args.arms:
        print(f"seed {seed}: arm {arm}", flush=True)
        if arm == "control" and args.protocol == "scratch":
            arm_ckpts[arm] = (
                start  # the same config, seed, schedule and labeled images: the first teacher itself
            )
            continue
        if (
            arm == "ssl_r2"
        ):  # round 2: the round-1 student (and, with --r2-members all, the teachers) label again
            r1 = "ssl_strong_bg" if "ssl_strong_bg" in arm_ckpts else "ssl"
            if r1 not in arm_ckpts:
                sys.exit(
                    "--arms: ssl_r2 needs an ssl or ssl_strong_bg arm before it (its student labels round 2)"
                )
            t2 = time.time()
            members = [arm_ckpts[r1], *(teachers.values() if args.r2_members == "all" else [])]
            r2 = "r2" if args.protocol == "continue" else f"r2_{args.protocol}"
            pseudo2 = sd / f"{r2}_pseudo{vs}" / "train_lossweight.json"
            s2 = fuse(
                ensemble(members, f"{r2}_ensemble", vs, {**ens_kw, "flips": args.r2_tta_flips}),
                pseudo2,
                fuse_cfg,
            )
            round2 = {
                "labeler": r1,
                "members": args.r2_members,
                "flips": args.r2_tta_flips,
                "pseudo": json.loads(Path(s2["report"]).read_text())["quality"]["fused"],
                "keep_thr": s2["keep_thr"],
                "pseudo_labels": s2["pseudo_labels"],
            }
            # the round-1 arm's training with only its labels changed: from scratch under the scratch
            # protocol, from the round-1 student (as long again) under the continue protocol
            r2_sets = [{**arm_sets[r1][0], "ann_file": str(pseudo2)}]
            if args.protocol == "scratch":
                arm_ckpts[arm] = train(arm_config, arm_dir / arm, d["labeled"] + r2_sets, arm_overrides)
            else:
                arm_ckpts[arm] = train(
                    "configs/demo/student.yaml",
                    arm_dir / arm,
                    d["labeled"] + r2_sets,
                    [f"train.seed={seed}", *args.arm_schedule, *args.set_arms],
                    load_from=arm_ckpts[r1],
                )
            t_arms[arm] = time.time() - t2
            continue
        if arm == "control_r2":  # the twin of ssl_r2: as long again on the labeled images, from the control
            if "control" not in arm_ckpts:
                sys.exit("--arms: control_r2 needs the control arm (it starts from its model)")
            t2 = time.time()
            arm_ckpts[arm] = train(
                "configs/demo/student.yaml",
                arm_dir / arm,
                d["labeled"],
                [f"train.seed={seed}", *args.arm_schedule, *args.set_arms],
                load_from=arm_ckpts["control"],
            )
            t_arms[arm] = time.time() - t2
            continue
        t2 = time.time()
        extra = {
            "ssl_online": online_overrides,
            "control_ema": ["train.mean_teacher.enabled=true"],
            **dict.fromkeys(long_arms, long_schedule),
        }
        arm_ckpts[arm] = train(
            arm_config,
            arm_dir / arm,
            d["labeled"] + arm_sets[arm],
            arm_overrides + extra.get(arm, []),
            load_from=load_from,
        )
        t_arms[arm] = time.time() - t2

    print(f"seed {seed}: evaluation on the validation and test splits", flush=True)

    def evaluated(ckpt: str, split: dict, out: Path) -> dict:
        r = json.loads(out.read_text()) if out.exists() else None
        if r is None or r.get("checkpoint_fingerprint") != fingerprint(ckpt) or "sweep" not in r:
            r = evaluate_checkpoint(ckpt, split["ann_file"], split["img_root"], str(out))
            r["checkpoint_fingerprint"] = fingerprint(ckpt)
            atomic_write_json(out, r, indent=2)
        return r

    scores = {}
    for name, ckpt in {**{f"teacher:{n}": c for n, c in teachers.items()}, **arm_ckpts}.items():
        stem = (
            name.replace(":", "_")
            if name.startswith("teacher:") or args.protocol == "continue"
            else f"{args.protocol}_{name}"
        )
        if not name.startswith("teacher:") and not (name == "control" and args.protocol == "scratch"):
            stem += vs
        val_thr = evaluated(ckpt, d["val"], sd / "eval" / f"{stem}.val.json")["best_thr"]
        r = evaluated(ckpt, d["test"], sd / "eval" / f"{stem}.json")
        at_val = next(row for row in r["sweep"] if abs(row["score_thr"] - val_thr) < 1e-6)
        scores[name] = {
            **{k: r[k] for k in ("precision", "recall", "hmean", "best_hmean", "best_thr", "score_thr")},
            "val_thr": val_thr,
            "hmean_at_val_thr": at_val["hmean"],
            "precision_at_val_thr": at_val["precision"],
            "recall_at_val_thr": at_val["recall"],
        }
    gate = None
    if (
        "control" in arm_ckpts
    ):  # the control on the unlabeled images themselves (their hidden GT: measuring only)
        stem = "control" if args.protocol == "continue" else f"{args.protocol}_control"
        r = evaluated(
            arm_ckpts["control"],
            {"ann_file": d["unlabeled_gt"], "img_root": u_root},
            sd / "eval" / f"{stem}.unlabeled.json",
        )
        gate = {"control_hmean": r["best_hmean"], "control_thr": r["best_thr"]}
    coverage = {arm: drawn_share(arm_dir / arm / "train.log") for arm in arm_ckpts}
    result = {
        "seed": seed,
        "scores": scores,
        "pseudo": quality["fused"],
        "pseudo_labels": summary["pseudo_labels"],
        "gate": gate,
        "coverage": coverage,
        "protocol": args.protocol,
        "dontcare": summary["dontcare"],
        "keep_thr": chosen["keep_thr"],
        "val_fused": chosen["val"],
        "teachers_on_unlabeled": teacher_unl,
        "round2": round2,
        "seconds": {
            "teachers": round(t_teachers),
            "ensemble": round(t_ensemble),
            **{f"arm_{a}": round(t) for a, t in t_arms.items()},
            "total": round(time.time() - t0),
        },
    }
    atomic_write_json(
        sd / (f"result_{args.protocol}{vs}.json" if args.protocol != "continue" else f"result{vs}.json"),
        result,
        indent=2,
    )
    return result


# every arm: same start, same number of iterations (12 epochs x 25 iterations of 2 images), same learning rate
# and seed. "continue": the teacher's final learning rate (5e-4 x 0.1 after its decay), constant, no warm-up:
# the arms continue the teacher's schedule without a restart. "restart": the student config's own schedule
# (2.5e-4 with warm-up and a decay), as the pipeline trains its student.
ARM_SCHEDULES = {
    "continue": [
        "train.epochs=12",
        "train.iters_per_epoch=25",
        "train.lr=0.00005",
        "train.lr_steps=[]",
        "train.warmup_iters=0",
    ],
    "restart": [
        "train.epochs=12",
        "train.iters_per_epoch=25",
        "train.lr_steps=[10]",
        "train.warmup_iters=20",
    ],
}


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values)
    return f"{m:.3f} ({min(values):.3f}..{max(values):.3f})" if len(values) > 1 else f"{m:.3f}"


PROTOCOL_TEXT = {
    "continue": (
        "arms start from the first teacher at its final learning rate (constant 5e-5, no warm-up, fresh "
        "AdamW moments), the same iterations each; the control is the teacher's schedule continued "
        "(convergence: control - teacher < 1 F)"
    ),
    "scratch": (
        "every arm trains from scratch with the first teacher's config, seed and schedule (1,000 "
        "iterations), only the added images changed; the control is that teacher itself (the STAC protocol)"
    ),
    "restart": (
        "arms start from the first teacher with the student config's schedule (lr 2.5e-4, warm-up, decay): "
        "every arm, the control included, also gains from the learning-rate restart"
    ),
}


def print_table(results: list[dict], args) -> None:
    w = 104
    print("\n" + "=" * w)
    print(
        f"SSL benchmark: {args.labeled} labeled / {args.unlabeled} unlabeled / {args.val} val / "
        f"{args.test} test images at {args.size} px, seeds {[r['seed'] for r in results]}"
    )
    print(
        f"protocol: {PROTOCOL_TEXT[args.protocol]}; the labeled images keep the default augmentation in "
        f"every arm; every threshold chosen on the validation split, never on the unlabeled ground truth"
    )
    print(
        f"{'row':<28} {'F at val thr (min..max)':>24} {'P':>6} {'R':>6}  per seed            "
        "| best test F (min..max)"
    )
    print("-" * w)
    rows = [f"teacher:{n}" for n in args.teachers] + list(args.arms)
    for row in rows:
        vals = [r["scores"][row] for r in results if row in r["scores"]]
        if not vals:
            continue
        fv = [v["hmean_at_val_thr"] for v in vals]
        fb = [v["best_hmean"] for v in vals]
        print(
            f"{row:<28} {spread(fv):>24} {statistics.fmean(v['precision_at_val_thr'] for v in vals):>6.3f} "
            f"{statistics.fmean(v['recall_at_val_thr'] for v in vals):>6.3f}  "
            f"{' '.join(f'{x:.3f}' for x in fv):<19} | "
            f"{spread(fb)}"
        )
    print("-" * w)

    def diff(a, b, goal: float | None = None, what: str = "") -> None:
        pairs = [(r["scores"][a], r["scores"][b]) for r in results if a in r["scores"] and b in r["scores"]]
        if not pairs:
            return
        d = [x["hmean_at_val_thr"] - y["hmean_at_val_thr"] for x, y in pairs]
        verdict = ""
        if goal is not None:
            holds = statistics.fmean(d) >= goal and all(x > 0 for x in d) and len(d) >= 3
            verdict = (
                f"goal >= {goal:+.3f}, every seed > 0, >= 3 seeds: {'HOLDS' if holds else 'not reached'}"
            )
        print(
            f"{a + ' - ' + b:<28} {spread(d):>24}  per seed "
            f"{' '.join(f'{x:+.3f}' for x in d)}  {verdict}{what}"
        )

    first = f"teacher:{args.teachers[0]}"
    diff("control", first, what="  (convergence of the start: < +0.010 wanted)")
    diff("control_long", "control", what="  (twice the iterations on the labeled images alone)")
    diff("oracle", "control", what="  (headroom: >= +0.080 wanted for the regime to have room)")
    diff("ssl_long", "control_long", goal=0.03, what="  (both twice as long: the same schedule)")
    diff("ssl_long", "control", goal=0.03, what="  (against the control at its own, shorter schedule)")
    diff("ssl_long", "ssl_strong_bg", what="  (twice the iterations with the pseudo labels)")
    for arm in ("ssl", "ssl_strong", "ssl_strong_bg", "ssl_nodc", "ssl_online"):
        if arm in args.arms:
            diff(arm, "control", goal=0.03)
    diff("ssl", "ssl_uniform", goal=0.005, what="  (the loss weights)")
    diff("ssl_strong", "ssl", what="  (strong augmentation on the pseudo-labelled images)")
    diff("ssl_strong_bg", "ssl_strong", what="  (soft background)")
    diff("ssl_online", "control_ema", goal=0.03, what="  (both saved as the average of their weights)")
    diff("control_ema", "control", what="  (the weight average alone)")
    diff("ssl_online", "ssl_strong_bg", what="  (a mean teacher relabelling online)")
    if "ssl_r2" in args.arms:
        r1 = "ssl_strong_bg" if "ssl_strong_bg" in args.arms else "ssl"
        diff("ssl_r2", r1, what="  (round 2 over round 1)")
        if args.protocol == "scratch":
            diff(
                "ssl_r2",
                "control",
                goal=0.03,
                what="  (three trainings in its lineage: teacher, round 1, round 2)",
            )
            diff("ssl_r2", "control_long", what="  (the control given twice the iterations)")
        else:
            diff("ssl_r2", "control_r2", goal=0.03, what="  (both rounds of each)")
    print("-" * w)
    pf = [r["pseudo"]["hmean"] for r in results]
    print(
        f"{'pseudo labels vs hidden GT':<28} {spread(pf):>24} "
        f"{statistics.fmean(r['pseudo']['precision'] for r in results):>6.3f} "
        f"{statistics.fmean(r['pseudo']['recall'] for r in results):>6.3f}  "
        f"keep_thr {[r['keep_thr'] for r in results]}"
    )
    best_t = [max(v["hmean"] for v in r["teachers_on_unlabeled"].values()) for r in results]
    for n in args.teachers:
        tf = [r["teachers_on_unlabeled"][n]["hmean"] for r in results]
        print(
            f"{'teacher ' + n + ' on unlabeled':<28} {spread(tf):>24}  "
            "(its best threshold there: an upper bound)"
        )
    gates = [r["gate"]["control_hmean"] for r in results if r.get("gate")]
    if gates:
        print(f"{'control on unlabeled':<28} {spread(gates):>24}  (its best threshold there: an upper bound)")
        print(
            f"{'gate: pseudo - control':<28} {spread([p - g for p, g in zip(pf, gates)]):>24}  "
            "(>= 0 wanted: labels worse than what the student already predicts cannot teach it)"
        )
    print(
        f"{'pseudo - best teacher':<28} {spread([p - b for p, b in zip(pf, best_t)]):>24}  (goal >= +0.020)"
    )
    if all(r.get("round2") for r in results):
        p2 = [r["round2"]["pseudo"]["hmean"] for r in results]
        print(
            f"{'round-2 pseudo labels':<28} {spread(p2):>24} "
            f"{statistics.fmean(r['round2']['pseudo']['precision'] for r in results):>6.3f} "
            f"{statistics.fmean(r['round2']['pseudo']['recall'] for r in results):>6.3f}  labelled by "
            f"{results[0]['round2'].get('labeler', 'ssl')} ({results[0]['round2'].get('members', 'all')}, "
            f"flips {results[0]['round2'].get('flips', 'as round 1')}), "
            f"keep_thr {[r['round2']['keep_thr'] for r in results]}"
        )
        print(
            f"{'round-2 pseudo - best teacher':<28} {spread([p - b for p, b in zip(p2, best_t)]):>24}  "
            "(goal >= +0.020; per seed " + " ".join(f"{p - b:+.3f}" for p, b in zip(p2, best_t)) + ")"
        )
        if gates:
            print(
                f"{'round-2 pseudo - control':<28} {spread([p - g for p, g in zip(p2, gates)]):>24}  "
                "(the gate)"
            )
    print("-" * w)
    for arm in args.arms:
        cov = [r["coverage"].get(arm) for r in results if r.get("coverage")]
        cov = [c for c in cov if c]
        if cov:
            print(
                f"coverage {arm:<19} unlabeled images drawn at least once: "
                + ", ".join(f"{c[0]}/{c[1]}" for c in cov)
            )
    secs = [r["seconds"] for r in results]
    keys = list(dict.fromkeys(k for s in secs for k in s))  # teachers, ensemble, arm_..., total
    per_step = [f"{k.removeprefix('arm_')} " + " / ".join(f"{s.get(k, 0):.0f}" for s in secs) for k in keys]
    print("time per seed (s, this run; a step reused from the cache takes ~0): " + ", ".join(per_step))
    print("=" * w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/bench_ssl_l10")
    ap.add_argument("--work-dir", default="work_dirs/bench_ssl_l10")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=ARMS)
    ap.add_argument("--teachers", nargs="+", default=["teacher_a"])
    ap.add_argument("--labeled", type=int, default=10)
    ap.add_argument("--unlabeled", type=int, default=400)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--size", type=int, default=320, help="side of the synthetic images (px)")
    ap.add_argument("--data-workers", type=int, default=2, help="processes generating the synthetic data")
    ap.add_argument(
        "--protocol",
        choices=sorted(PROTOCOL_TEXT),
        default="scratch",
        help="continue: arms at the teacher's final learning rate (no restart); restart: the student "
        "config's schedule; scratch: every arm trained from scratch like the first teacher",
    )
    ap.add_argument(
        "--background-weight",
        type=float,
        default=0.5,
        help="negatives' weight in ssl_strong_bg and ssl_online",
    )
    ap.add_argument(
        "--set-online",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="settings of the ssl_online arm only, e.g. train.mean_teacher.score_thr=0.8",
    )
    ap.add_argument(
        "--devices", nargs="+", default=["cpu"], help="ensemble devices (cpu, cuda:0, ... or auto)"
    )
    ap.add_argument("--infer-batch", type=int, default=1, help="images per forward pass in the ensemble")
    ap.add_argument("--tta-flips", nargs="*", default=["h"], choices=["h", "v"])
    ap.add_argument("--tta-scales", nargs="*", type=int, default=[])
    ap.add_argument(
        "--pseudo-fraction",
        type=float,
        default=0.5,
        help="share of every batch from the unlabeled images (as the pipeline's train.pseudo_fraction)",
    )
    ap.add_argument(
        "--r2-members",
        choices=["student", "all"],
        default="student",
        help="who labels round 2 (ssl_r2): the round-1 student alone (with --tta-flips/--tta-scales), or the "
        "student and the teachers fused",
    )
    ap.add_argument(
        "--r2-tta-flips",
        nargs="*",
        default=[],
        choices=["h", "v"],
        help="test-time flips of the round-2 labelers (none by default: on the validation split, flip TTA "
        "lowered the round-1 student's best F, 0.664 -> 0.629 on seed 1, while it raised the teachers')",
    )
    ap.add_argument(
        "--variant",
        default="",
        help="name of a lever's run: its pseudo labels, arms, evaluations and results go to folders and "
        "files with this suffix, so the runs of other settings are kept (the teachers and the ensemble "
        "are shared)",
    )
    ap.add_argument("--set-teachers", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--set-arms", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--set-fuse", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    if args.variant and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.variant):
        ap.error(f"--variant {args.variant!r}: letters, digits, '_', '.' and '-' only (it names folders)")
    args.set_teachers = TEACHER_SCHEDULE + args.set_teachers
    args.arm_schedule = ARM_SCHEDULES.get(args.protocol, [])
    for arm in ("control_long", "ssl_long"):
        if arm in args.arms and args.protocol != "scratch":
            ap.error(
                f"--arms: {arm} is a scratch-protocol arm (twice the teacher's schedule); "
                "use --protocol scratch"
            )
    if args.protocol == "scratch" and "control_r2" in args.arms:
        ap.error(
            "--arms: control_r2 continues from the control; use --protocol continue (or compare ssl_r2 "
            "with control_long under the scratch protocol)"
        )
    if args.devices == ["auto"]:
        args.devices = "auto"
    if "ssl_r2" in args.arms and not {"ssl", "ssl_strong_bg"} & set(args.arms[: args.arms.index("ssl_r2")]):
        ap.error("--arms: ssl_r2 needs an ssl or ssl_strong_bg arm before it (its student labels round 2)")
    if "control_r2" in args.arms and "control" not in args.arms:
        ap.error("--arms: control_r2 needs the control arm")
    print(f"protocol {args.protocol}: {PROTOCOL_TEXT[args.protocol]}", flush=True)

    vs = f"_{args.variant}" if args.variant else ""
    d = ensure_data(Path(args.data), args)
    wd = Path(args.work_dir)
    results = [run_seed(s, d, args, wd) for s in args.seeds]
    atomic_write_json(
        wd / (f"results{vs}.json" if args.protocol == "continue" else f"results_{args.protocol}{vs}.json"),
        results,
        indent=2,
    )
    print_table(results, args)


# the teachers: 40 epochs of 25 iterations (1,000 iterations of 2 images), lr x0.1 after epoch 34: close to
# convergence on the 25 labeled images, so that the control's further training adds little (with 400
# iterations, the control gained 6 F points over its teacher and every arm measured mostly that)
TEACHER_SCHEDULE = [
    "train.epochs=40",
    "train.iters_per_epoch=25",
    "train.lr_steps=[34]",
    "train.warmup_iters=50",
]

if __name__ == "__main__":
    main()
