"""Baseline curves (straight, arc, sine, cubic Bezier) parametrised by arc length, and the per-instance
rotation and perspective transform."""

from __future__ import annotations

import math

import numpy as np

# ------------------------------------------------------------------------------------------------ curves


class Curve:
    """A baseline sampled densely and parametrised by arc length, in instance-local coords (y down)."""

    def __init__(self, points: np.ndarray):
        pts = np.asarray(points, dtype=np.float64)
        seg = np.hypot(*np.diff(pts, axis=0).T)
        self.points = pts
        self.s = np.concatenate([[0.0], np.cumsum(seg)])
        tang = np.gradient(pts, axis=0)
        tang /= np.maximum(np.linalg.norm(tang, axis=1, keepdims=True), 1e-12)
        self.tangents = tang

    @property
    def length(self) -> float:
        return float(self.s[-1])

    def at(self, s: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Points and unit tangents at arc lengths ``s`` (clamped to the curve)."""
        s = np.atleast_1d(np.asarray(s, dtype=np.float64))
        x = np.interp(s, self.s, self.points[:, 0])
        y = np.interp(s, self.s, self.points[:, 1])
        tx = np.interp(s, self.s, self.tangents[:, 0])
        ty = np.interp(s, self.s, self.tangents[:, 1])
        t = np.stack([tx, ty], 1)
        t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
        return np.stack([x, y], 1), t

    def min_radius(self) -> float:
        """Smallest radius of curvature along the curve (inf for a straight line)."""
        ang = np.unwrap(np.arctan2(self.tangents[:, 1], self.tangents[:, 0]))
        dang = np.abs(np.diff(ang))
        ds = np.diff(self.s)
        with np.errstate(divide="ignore"):
            k = dang[1:-1] / np.maximum(ds[1:-1], 1e-12) if len(ds) > 2 else np.zeros(1)
        kmax = float(k.max()) if k.size else 0.0
        return math.inf if kmax < 1e-9 else 1.0 / kmax


def _unit_curve(kind: str, rng: np.random.Generator, n: int = 241) -> np.ndarray:
    """A baseline shape of roughly unit length running left to right."""
    t = np.linspace(0.0, 1.0, n)
    if kind == "straight":
        return np.stack([t, np.zeros_like(t)], 1)
    if kind == "arc":
        span = rng.uniform(0.5, 2.4)  # total turning angle in radians
        bend = rng.choice([-1.0, 1.0])  # +1: arch (ends lower), -1: smile (ends higher)
        theta = (t - 0.5) * span
        r = 1.0 / span
        return np.stack([r * np.sin(theta), bend * r * (1 - np.cos(theta))], 1)
    if kind == "sine":
        periods = rng.uniform(0.5, 1.3)
        amp = rng.uniform(0.04, 0.12)
        phase = rng.uniform(0, 2 * math.pi)
        return np.stack([t, amp * np.sin(2 * math.pi * periods * t + phase)], 1)
    if kind == "bezier":
        p0, p3 = np.array([0.0, 0.0]), np.array([1.0, rng.uniform(-0.15, 0.15)])
        p1 = np.array([rng.uniform(0.2, 0.45), rng.uniform(-0.35, 0.35)])
        p2 = np.array([rng.uniform(0.55, 0.8), rng.uniform(-0.35, 0.35)])
        tt = t[:, None]
        return (1 - tt) ** 3 * p0 + 3 * (1 - tt) ** 2 * tt * p1 + 3 * (1 - tt) * tt**2 * p2 + tt**3 * p3
    raise ValueError(f"unknown curve kind {kind!r}")


def _make_curve(kind: str, rng: np.random.Generator, length: float, min_radius: float) -> Curve:
    """A curve of arc length ``length`` whose radius of curvature stays above ``min_radius``."""
    for _ in range(6):
        pts = _unit_curve(kind, rng)
        c = Curve(pts)
        pts = pts * (length / c.length)
        c = Curve(pts)
        if c.min_radius() >= min_radius:
            return c
    return Curve(_unit_curve("straight", rng) * length)


# ------------------------------------------------------------------------------------------------ transforms


def _extrapolated(curve: Curve, ss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Curve points at arc lengths ``ss``, continued along the end tangents outside [0, length]."""
    p, t = curve.at(np.clip(ss, 0, curve.length))
    before = ss < 0
    after = ss > curve.length
    p[before] += t[before] * ss[before, None]
    p[after] += t[after] * (ss[after, None] - curve.length)
    return p, t


def _instance_transform(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Rotation and mild perspective about the local canvas centre (3x3, translation added later)."""
    import cv2  # deferred: OpenCV loads only when images are rendered

    r = rng.random()
    if r < 0.65:
        angle = rng.uniform(-12, 12)
    elif r < 0.93:
        angle = rng.uniform(-40, 40)
    else:
        angle = rng.choice([-1, 1]) * rng.uniform(60, 90)
    a = math.radians(angle)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    center = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]], float)
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32) - np.float32([w / 2, h / 2])
    jitter = rng.uniform(-0.07, 0.07, size=(4, 2)) * np.array([w, h])
    dst = (src + jitter).astype(np.float32)
    persp = cv2.getPerspectiveTransform(src, dst)
    return rot @ persp @ center


def _apply(hmat: np.ndarray, pts: np.ndarray) -> np.ndarray:
    q = np.concatenate([pts, np.ones((len(pts), 1))], 1) @ hmat.T
    return q[:, :2] / q[:, 2:3]
