"""Training augmentations (docs/model.md), applied to the image and its polygons together.

Every transform is a callable ``(sample, rng) -> sample`` where ``rng`` is a
``numpy.random.Generator``; a pipeline is therefore deterministic under a seed. Instances (text and
do-not-care regions alike) live in one :class:`~i3cl_core.structures.Instances` inside :class:`Sample`:
polygons, do-not-care flags, loss weights and annotation ids are dropped together by :meth:`Sample.keep`,
so the original release's bug of loss weights left behind when a rotation removes a box (the weights
of the following instances shift by one) cannot happen. Boxes are never stored: they are
recomputed from the transformed polygons when the sample becomes tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from i3cl_core.data.polygons import clip_instance, instance_area, instance_box
from i3cl_core.structures import Instances


@dataclass
class Sample:
    """One training image and its instances (text and do-not-care regions alike) as numpy data."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    instances: Instances  # polygons, iscrowd (do-not-care), lossweight, ann_id: see i3cl_core.structures
    image_id: int = -1
    file_name: str = ""
    orig_size: tuple[int, int] = (0, 0)
    log: list = field(default_factory=list)  # names of the transforms applied, for debugging
    student_image: np.ndarray | None = (
        None  # sets with augment: online: the student's (strong) view, same pixels
    )

    def __len__(self) -> int:
        return len(self.instances)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    def keep(self, mask: np.ndarray) -> Sample:
        """Keep the instances where ``mask`` is True, every per-instance field in lockstep."""
        mask = np.asarray(mask, dtype=bool)
        assert mask.shape == (len(self),), (mask.shape, len(self))
        return replace(self, instances=self.instances[mask])

    def with_polygons(self, polygons: list, **changes) -> Sample:
        """A copy whose instances have ``polygons`` (same count, same order) instead of their own."""
        inst = Instances(**self.instances.fields())
        inst.polygons = polygons
        return replace(self, instances=inst, **changes)

    def map_points(self, fn: Callable[[np.ndarray], np.ndarray]) -> list:
        return [[fn(p).astype(np.float32) for p in parts] for parts in self.instances.polygons]

    def to_tensors(self):
        """(image [3, H, W] float in [0, 1], target): the target holds ``instances`` (the text instances:
        ``boxes``, ``labels``, ``polygons``, ``lossweight``, ``ann_id`` as tensors and lists), ``dontcare``
        (``boxes``, ``polygons`` of the do-not-care regions) and the image's ``image_id``, ``file_name``,
        ``orig_size``."""
        import torch  # deferred: only this conversion needs torch; the numpy transforms load without it

        h, w = self.size
        image = torch.from_numpy(np.ascontiguousarray(self.image.transpose(2, 0, 1))).float().div_(255.0)
        inst = self.instances
        boxes = np.zeros((len(self), 4), dtype=np.float32)
        for i, parts in enumerate(inst.polygons):
            boxes[i] = instance_box(parts)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        care = ~inst.iscrowd
        text = inst[care]
        dontcare = inst[~care]
        target = {
            "instances": Instances(
                boxes=torch.from_numpy(boxes[care]).reshape(-1, 4),
                labels=torch.ones(len(text), dtype=torch.int64),
                polygons=text.polygons,
                lossweight=torch.from_numpy(text.lossweight.astype(np.float32)),
                ann_id=torch.from_numpy(text.ann_id),
            ),
            "dontcare": Instances(
                boxes=torch.from_numpy(boxes[~care]).reshape(-1, 4), polygons=dontcare.polygons
            ),
            "image_id": self.image_id,
            "file_name": self.file_name,
            "orig_size": self.orig_size,
        }
        if self.student_image is not None:
            target["student_image"] = (
                torch.from_numpy(np.ascontiguousarray(self.student_image.transpose(2, 0, 1)))
                .float()
                .div_(255.0)
            )
        return image, target


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.transforms))})"


class RandomFlip:
    """``original``: every image flipped, horizontally or vertically with p 0.5 each (docs/model.md);
    ``random``: horizontal with ``hprob`` and vertical with ``vprob``, independently; ``none``."""

    def __init__(self, mode: str = "original", hprob: float = 0.5, vprob: float = 0.5):
        assert mode in ("original", "random", "none"), mode
        self.mode, self.hprob, self.vprob = mode, hprob, vprob

    def __call__(self, s: Sample, rng: np.random.Generator) -> Sample:
        if self.mode == "none":
            return s
        if self.mode == "original":
            horizontal = rng.random() < 0.5
            flips = ["h"] if horizontal else ["v"]
        else:
            flips = [d for d, p in (("h", self.hprob), ("v", self.vprob)) if rng.random() < p]
        h, w = s.size
        for d in flips:
            if d == "h":
                s = s.with_polygons(
                    image=s.image[:, ::-1],
                    polygons=s.map_points(lambda p: np.stack([w - p[:, 0], p[:, 1]], 1)[::-1]),
                )
            else:
                s = s.with_polygons(
                    image=s.image[::-1],
                    polygons=s.map_points(lambda p: np.stack([p[:, 0], h - p[:, 1]], 1)[::-1]),
                )
            s = replace(s, log=[*s.log, f"flip_{d}"])
        # reversing the point order keeps clockwise polygons clockwise after a mirror
        return replace(s, image=np.ascontiguousarray(s.image))

    def __repr__(self) -> str:
        return f"RandomFlip({self.mode})"


class ClipAndFilter:
    """Clip instances to the image and drop those that left it (area below ``min_area`` or a box
    narrower than 1 px), all per-instance fields in lockstep."""

    def __init__(self, min_area: float = 4.0):
        self.min_area = min_area

    def __call__(self, s: Sample, rng: np.random.Generator | None = None) -> Sample:
        if len(s) == 0:
            return s
        h, w = s.size
        clipped = [clip_instance(parts, w, h) for parts in s.instances.polygons]
        keep = np.zeros(len(s), dtype=bool)
        for i, parts in enumerate(clipped):
            if parts:
                x1, y1, x2, y2 = instance_box(parts)
                keep[i] = instance_area(parts) >= self.min_area and x2 - x1 >= 1 and y2 - y1 >= 1
        s = s.with_polygons(clipped)
        return s.keep(keep)

    def __repr__(self) -> str:
        return f"ClipAndFilter({self.min_area})"


class Rotate:
    """Rotate by a fixed magnitude (degrees) with a random sign, with probability ``prob``, about the
    image centre, on the same canvas (corners cut), image fill ``fill``; instances that leave the
    image are dropped."""

    def __init__(self, angle: float, prob: float = 0.5, fill: int = 128, min_area: float = 4.0):
        self.angle, self.prob, self.fill = angle, prob, fill
        self.filter = ClipAndFilter(min_area)

    def __call__(self, s: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.prob:
            return s
        angle = self.angle if rng.random() < 0.5 else -self.angle
        h, w = s.size
        m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
        image = cv2.warpAffine(s.image, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=(self.fill,) * 3)

        def move(p: np.ndarray) -> np.ndarray:
            # cv2 works on pixel centres: continuous coordinate x is pixel-centre coordinate x - 0.5
            q = p.astype(np.float64) - 0.5
            return q @ m[:, :2].T + m[:, 2] + 0.5

        s = s.with_polygons(image=image, polygons=s.map_points(move))
        s = replace(s, log=[*s.log, f"rotate_{angle:+g}"])
        return self.filter(s)

    def __repr__(self) -> str:
        return f"Rotate({self.angle}, p={self.prob})"


def _grey(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


class Photometric:
    """PIL-style enhancement with a fixed ``factor`` and probability ``prob``: ``color`` blends with
    the grey image, ``brightness`` with black, ``contrast`` with the mean grey level."""

    def __init__(self, kind: str, factor: float = 1.54, prob: float = 0.5):
        assert kind in ("color", "brightness", "contrast"), kind
        self.kind, self.factor, self.prob = kind, factor, prob

    def __call__(self, s: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.prob:
            return s
        img = s.image.astype(np.float32)
        if self.kind == "color":
            base = _grey(s.image)[..., None]
        elif self.kind == "brightness":
            base = np.zeros_like(img)
        else:
            base = np.full_like(img, float(_grey(s.image).mean()))
        out = base + self.factor * (img - base)
        s = replace(s, image=np.clip(out + 0.5, 0, 255).astype(np.uint8))
        s = replace(s, log=[*s.log, self.kind])
        return s

    def __repr__(self) -> str:
        return f"Photometric({self.kind}, {self.factor}, p={self.prob})"


def keep_ratio_scale(h: int, w: int, short: int, long_cap: int) -> float:
    return min(long_cap / max(h, w), short / min(h, w))


class Resize:
    """Keep-ratio resize to one (short side, long-side cap) pair chosen uniformly."""

    def __init__(self, scales: Sequence[tuple[int, int]], min_area: float = 4.0):
        self.scales = [tuple(s) for s in scales]
        self.filter = ClipAndFilter(min_area)

    def __call__(self, s: Sample, rng: np.random.Generator) -> Sample:
        short, cap = (
            self.scales[int(rng.integers(len(self.scales)))] if len(self.scales) > 1 else self.scales[0]
        )
        h, w = s.size
        scale = keep_ratio_scale(h, w, short, cap)
        nw, nh = max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))
        if (nw, nh) == (w, h):
            return s
        image = cv2.resize(s.image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        f = np.array([nw / w, nh / h], dtype=np.float32)
        s = s.with_polygons(image=image, polygons=s.map_points(lambda p: p * f))
        s = replace(s, log=[*s.log, f"resize_{nw}x{nh}"])
        return self.filter(s)

    def __repr__(self) -> str:
        return f"Resize({self.scales})"


class OneOf:
    """AutoAugment: apply one of the policies, chosen uniformly."""

    def __init__(self, policies: Sequence[Compose]):
        self.policies = list(policies)

    def __call__(self, s: Sample, rng: np.random.Generator) -> Sample:
        return self.policies[int(rng.integers(len(self.policies)))](s, rng)

    def __repr__(self) -> str:
        return f"OneOf({self.policies})"


class RandomAffine:
    """One random affine map about the image centre on the same canvas: zoom in ``scale``, rotation up to
    ``rotate`` degrees, shear up to ``shear`` degrees in x and y, shift up to ``translate`` of each side;
    applied with probability ``prob``. Polygons go through the same matrix (an affine map keeps straight edges
    straight, so they stay exact); instances that leave the canvas are dropped."""

    def __init__(
        self,
        scale=(0.5, 1.5),
        rotate: float = 30.0,
        shear: float = 15.0,
        translate: float = 0.1,
        prob: float = 1.0,
        fill: int = 128,
        min_area: float = 4.0,
    ):
        self.scale, self.rotate, self.shear, self.translate = tuple(scale), rotate, shear, translate
        self.prob, self.fill = prob, fill
        self.filter = ClipAndFilter(min_area)

    def matrix(self, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        """The 2x3 map in pixel-centre coordinates (as cv2.warpAffine takes it)."""
        zoom = float(np.exp(rng.uniform(np.log(self.scale[0]), np.log(self.scale[1]))))
        angle = np.deg2rad(rng.uniform(-self.rotate, self.rotate))
        shx, shy = np.tan(np.deg2rad(rng.uniform(-self.shear, self.shear, size=2)))
        tx, ty = rng.uniform(-self.translate, self.translate, size=2) * (w, h)
        c, s_ = np.cos(angle), np.sin(angle)
        linear = np.array([[c, -s_], [s_, c]]) @ np.array([[1.0, shx], [shy, 1.0]]) * zoom
        centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
        return np.concatenate([linear, (centre + (tx, ty) - linear @ centre)[:, None]], axis=1)

    def __call__(self, s: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.prob:
            return s
        h, w = s.size
        m = self.matrix(h, w, rng)
        image = cv2.warpAffine(s.image, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=(self.fill,) * 3)

        def move(p: np.ndarray) -> np.ndarray:
            q = p.astype(np.float64) - 0.5  # continuous coordinates -> pixel-centre coordinates, and back
            return q @ m[:, :2].T + m[:, 2] + 0.5

        polygons = s.map_points(move)
        if np.linalg.det(m[:, :2]) < 0:  # never with these ranges; kept for a caller's mirror matrix
            polygons = [[p[::-1] for p in parts] for parts in polygons]
        s = s.with_polygons(image=image, polygons=polygons)
        s = replace(s, log=[*s.log, "affine"])
        return self.filter(s)

    def __repr__(self) -> str:
        return f"RandomAffine(scale={self.scale}, rotate={self.rotate}, shear={self.shear}, p={self.prob})"


class ColorJitter:
    """With probability ``prob``: brightness, contrast and saturation factors each drawn from
    [1 - strength, 1 + strength]. Pixels only."""

    def __init__(self, strength: float = 0.4, prob: float = 0.8):
        self.strength, self.prob = strength, prob

    def __call__(self, s: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.prob:
            return s
        b, c, sat = rng.uniform(1 - self.strength, 1 + self.strength, size=3)
        img = s.image.astype(np.float32) * b
        grey = _grey(np.clip(img, 0, 255))[..., None]
        img = grey + sat * (img - grey)
        img = grey.mean() + c * (img - grey.mean())
        return replace(s, image=np.clip(img + 0.5, 0, 255).astype(np.uint8), log=[*s.log, "color_jitter"])

    def __repr__(self) -> str:
        return f"ColorJitter({self.strength}, p={self.prob})"


class BlurOrNoise:
    """With probability ``prob``: a Gaussian blur (sigma 0.3-1.5 px) or additive Gaussian noise (std 3-12 grey
    levels), one of the two at random. Pixels only."""

    def __init__(self, prob: float = 0.3):
        self.prob = prob

    def __call__(self, s: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.prob:
            return s
        if rng.random() < 0.5:
            sigma = float(rng.uniform(0.3, 1.5))
            img = cv2.GaussianBlur(s.image, (0, 0), sigmaX=sigma)
            return replace(s, image=img, log=[*s.log, f"blur_{sigma:.2f}"])
        std = float(rng.uniform(3.0, 12.0))
        noise = rng.normal(0.0, std, size=s.image.shape).astype(np.float32)
        img = np.clip(s.image.astype(np.float32) + noise + 0.5, 0, 255).astype(np.uint8)
        return replace(s, image=img, log=[*s.log, f"noise_{std:.1f}"])

    def __repr__(self) -> str:
        return f"BlurOrNoise(p={self.prob})"


class Cutout:
    """With probability ``prob``: ``patches`` (min, max) grey rectangles, each side up to ``size`` of the
    image's. The instances stay as they are (as in STAC): the student must find text partly hidden."""

    def __init__(self, patches=(1, 5), size: float = 0.2, prob: float = 0.5, fill: int = 128):
        self.patches, self.size, self.prob, self.fill = tuple(patches), size, prob, fill

    def __call__(self, s: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.prob or self.size <= 0:
            return s
        h, w = s.size
        img = s.image.copy()
        n = int(rng.integers(self.patches[0], self.patches[1] + 1))
        for _ in range(n):
            ph, pw = (max(1, int(rng.uniform(0.02, self.size) * side)) for side in (h, w))
            y, x = int(rng.integers(0, max(1, h - ph + 1))), int(rng.integers(0, max(1, w - pw + 1)))
            img[y : y + ph, x : x + pw] = self.fill
        return replace(s, image=img, log=[*s.log, f"cutout_{n}"])

    def __repr__(self) -> str:
        return f"Cutout({self.patches}, {self.size}, p={self.prob})"


def build_strong_transform(aug) -> Compose:
    """The strong policy of sets with ``augment: strong`` from an :class:`i3cl_core.config.AugmentConfig`:
    flip, random affine, the training resize, colour, blur or noise, cutout."""
    st = aug.strong
    return Compose(
        [
            RandomFlip(aug.flip, aug.hflip_prob, aug.vflip_prob),
            RandomAffine(
                st.scale,
                st.rotate,
                st.shear,
                st.translate,
                st.affine_prob,
                aug.rotate_fill,
                aug.min_instance_area,
            ),
            Resize(aug.scales, aug.min_instance_area),
            ColorJitter(st.color_strength, st.color_prob),
            BlurOrNoise(st.blur_noise_prob),
            Cutout(st.cutout_patches, st.cutout_size, st.cutout_prob, aug.rotate_fill),
            ClipAndFilter(aug.min_instance_area),
        ]
    )


class StudentView:
    """The student's view of an ``augment: online`` image: the pixel-only operations of the strong policy
    (colour, blur or noise, cutout) on a copy, kept as ``student_image``; the sample's own image stays the
    weak view the teacher labels. No pixel moves, so the teacher's labels fit both views."""

    def __init__(self, ops: Sequence[Callable]):
        self.ops = Compose(ops)

    def __call__(self, s: Sample, rng: np.random.Generator) -> Sample:
        strong = self.ops(replace(s, log=[]), rng)
        return replace(s, student_image=strong.image, log=[*s.log, *strong.log])

    def __repr__(self) -> str:
        return f"StudentView({self.ops!r})"


def build_online_transform(aug) -> Compose:
    """Sets with ``augment: online``: a weak view (flip, the training resize) and the student's strong view of
    the same pixels (:class:`StudentView`)."""
    st = aug.strong
    return Compose(
        [
            RandomFlip(aug.flip, aug.hflip_prob, aug.vflip_prob),
            Resize(aug.scales, aug.min_instance_area),
            ClipAndFilter(aug.min_instance_area),
            StudentView(
                [
                    ColorJitter(st.color_strength, st.color_prob),
                    BlurOrNoise(st.blur_noise_prob),
                    Cutout(st.cutout_patches, st.cutout_size, st.cutout_prob, aug.rotate_fill),
                ]
            ),
        ]
    )


def build_source_transforms(aug, kinds: Sequence[str]) -> list[Compose]:
    """One transform per training set by its ``augment`` kind: ``"default"`` -> :func:`build_train_transform`,
    ``"strong"`` -> :func:`build_strong_transform`, ``"online"`` -> :func:`build_online_transform` (each built
    once and shared)."""
    builders = {
        "default": build_train_transform,
        "strong": build_strong_transform,
        "online": build_online_transform,
    }
    built = {kind: builders[kind](aug) for kind in set(kinds)}
    return [built[k] for k in kinds]


def build_train_transform(aug) -> Compose:
    """The augmentation pipeline from an :class:`i3cl_core.config.AugmentConfig`."""
    resize = Resize(aug.scales, aug.min_instance_area)

    def photometric():
        return [
            Photometric(k, aug.photometric_factor, aug.photometric_prob)
            for k in ("color", "brightness", "contrast")
        ]

    rot1 = Rotate(aug.rotate_angles[0], aug.rotate_prob, aug.rotate_fill, aug.min_instance_area)
    rot3 = Rotate(aug.rotate_angles[1], aug.rotate_prob, aug.rotate_fill, aug.min_instance_area)
    policies = [
        Compose([rot1, resize]),
        Compose([*photometric(), resize]),
        Compose([*photometric(), rot3, resize]),
    ]
    if aug.policies == "vitae":
        policies = [Compose([resize]), *policies]
    elif aug.policies == "resize_only":
        policies = [Compose([resize])]
    return Compose(
        [
            RandomFlip(aug.flip, aug.hflip_prob, aug.vflip_prob),
            OneOf(policies),
            ClipAndFilter(aug.min_instance_area),
        ]
    )
