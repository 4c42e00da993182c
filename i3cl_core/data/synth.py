"""Synthetic curved scene-text images with polygon annotations (COCO format).

Every image is drawn from its own random generators, seeded from ``(seed, image index)``, so a dataset is
the same whatever the number of worker processes and whichever images are generated first. Two streams
are used per image:

* ``geo`` decides everything that ends up in the annotations (words, fonts, sizes, curve shapes,
  rotation, perspective, placement, which instances are unreadable);
* ``pix`` decides appearance only (background, colours, outline, shadow, occluders, noise, blur, JPEG).

The annotations therefore depend on the seed and on the font metrics, never on pixel values.

Text is drawn one character at a time along a baseline curve (straight, circular arc, sine or cubic
Bezier), each glyph rotated to the local tangent; the whole instance is then rotated and warped by a mild
perspective transform. The polygon is built along the same curve: 7 points on the top edge (left to right)
and 7 on the bottom edge (right to left), i.e. clockwise on screen, like CTW1500/ArT; straight text gets 4.

Public API: :func:`generate_dataset`, :func:`generate_demo`, :func:`render_sample`, :func:`find_cjk_font`.
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from i3cl_core.data.polygons import polygon_area

GENERATOR_VERSION = "1.0"
CATEGORY = {"id": 1, "name": "text"}
DONTCARE = "###"

LATIN_FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
SKIMAGE_BACKGROUNDS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "stereo_motorcycle",
    "brick", "grass", "gravel",
)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CJK_ENV = "I3CL_CJK_FONT"  # path of a CJK font file; overrides the fc-list search

# instances per image, share of deliberately unreadable instances
MIN_INSTANCES, MAX_INSTANCES = 2, 8
DONTCARE_RATE = 0.10
MAX_OVERLAP = 0.03  # intersection / smaller polygon area allowed between two instances

_CJK_WARNED = False


# --------------------------------------------------------------------------------------------- fonts & words


def _fc_list(pattern: str) -> list[str]:
    if shutil.which("fc-list") is None:
        return []
    try:
        out = subprocess.run(["fc-list", pattern, "file"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    files = []
    for line in out.splitlines():
        path = line.strip().rstrip(":").strip()
        if path:
            files.append(path)
    return sorted(set(files))


def _font_has_cjk(path: str) -> bool:
    from PIL import ImageFont

    try:
        font = ImageFont.truetype(path, 24)
        return font.getmask("中国").getbbox() is not None
    except Exception:  # unreadable or unsupported font file
        return False


@functools.lru_cache(maxsize=None)
def find_cjk_font() -> str | None:
    """Path of an installed font with Chinese glyphs, or None.

    ``$I3CL_CJK_FONT`` wins when it names a usable file; otherwise ``fc-list :lang=zh`` is asked and
    common families (Noto CJK, Droid Sans Fallback, WenQuanYi) are preferred.
    """
    env = os.environ.get(CJK_ENV)
    if env and Path(env).is_file() and _font_has_cjk(env):
        return env
    candidates = _fc_list(":lang=zh")
    preferred = ("notosanscjk", "notoserifcjk", "droidsansfallback", "wqy", "sourcehan", "ukai", "uming")

    def rank(path: str) -> tuple[int, str]:
        name = Path(path).name.lower().replace("-", "").replace("_", "")
        for i, key in enumerate(preferred):
            if key in name:
                return i, path
        return len(preferred), path

    for path in sorted(candidates, key=rank):
        if _font_has_cjk(path):
            return path
    return None


@functools.lru_cache(maxsize=None)
def find_latin_fonts() -> tuple[str, ...]:
    """Sorted Latin font files (DejaVu when installed). Empty tuple: use Pillow's bundled font."""
    fonts = sorted(
        str(p) for p in LATIN_FONT_DIR.glob("DejaVu*.ttf") if "Math" not in p.name and "ExtraLight" not in p.name
    )
    if not fonts:
        fonts = [p for p in _fc_list(":lang=en") if p.lower().endswith((".ttf", ".otf"))][:24]
    return tuple(fonts)


def _resolve_cjk(cjk: bool | None) -> str | None:
    """Decide the CJK font for a run; warn once per process when Chinese was wanted but no font exists."""
    global _CJK_WARNED
    if cjk is False:
        return None
    path = find_cjk_font()
    if path is None and not _CJK_WARNED:
        _CJK_WARNED = True
        warnings.warn(
            "no CJK font found (fc-list :lang=zh is empty and $I3CL_CJK_FONT is unset): synthetic text is "
            "Latin only. Install e.g. fonts-droid-fallback or fonts-noto-cjk for Chinese.",
            RuntimeWarning,
            stacklevel=3,
        )
    return path


@functools.lru_cache(maxsize=None)
def load_wordlist(name: str) -> tuple[str, ...]:
    """Words from the bundled list ``wordlists/<name>.txt`` (``en`` or ``zh``)."""
    path = Path(__file__).with_name("wordlists") / f"{name}.txt"
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            words.append(line)
    return tuple(words)


@functools.lru_cache(maxsize=512)
def _font(path: str | None, size: int):
    from PIL import ImageFont

    if path is None:
        return ImageFont.load_default(size)
    return ImageFont.truetype(path, size)


_GLYPHS: OrderedDict = OrderedDict()
_GLYPH_CACHE_SIZE = 8192


def _glyph(font_path: str | None, size: int, ch: str) -> tuple[np.ndarray, float, float, float, float, float]:
    """Rendered glyph mask and metrics: (mask, origin_x, origin_y, advance, top, bottom).

    ``origin`` is the pen position on the baseline inside ``mask``; ``top``/``bottom`` are the ink
    extents relative to the baseline (y down, so top is negative).
    """
    key = (font_path, size, ch)
    hit = _GLYPHS.get(key)
    if hit is not None:
        _GLYPHS.move_to_end(key)
        return hit
    from PIL import Image, ImageDraw

    font = _font(font_path, size)
    advance = float(font.getlength(ch))
    left, top, right, bottom = font.getbbox(ch, anchor="ls")
    pad = 2
    w, h = max(1, right - left) + 2 * pad, max(1, bottom - top) + 2 * pad
    img = Image.new("L", (w, h), 0)
    ox, oy = pad - left, pad - top
    if ch.strip():
        ImageDraw.Draw(img).text((ox, oy), ch, fill=255, font=font, anchor="ls")
    mask = np.asarray(img, dtype=np.uint8)
    if not mask.any():
        top = bottom = 0
    hit = (mask, float(ox), float(oy), advance, float(top), float(bottom))
    _GLYPHS[key] = hit
    if len(_GLYPHS) > _GLYPH_CACHE_SIZE:
        _GLYPHS.popitem(last=False)
    return hit


# ------------------------------------------------------------------------------------------------ text


def _latin_token(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.08:  # numbers as they appear on signs
        kind = rng.integers(4)
        if kind == 0:
            return f"{rng.integers(1, 999)}"
        if kind == 1:
            return f"${rng.integers(1, 99)}.{rng.integers(0, 99):02d}"
        if kind == 2:
            return f"{rng.integers(100, 999)}-{rng.integers(1000, 9999)}"
        return f"{rng.integers(1, 24)}:{rng.integers(0, 59):02d}"
    words = load_wordlist("en")
    word = words[rng.integers(len(words))]
    case = rng.random()
    if case < 0.4:
        return word.upper()
    if case < 0.75:
        return word.capitalize()
    return word


def _make_text(rng: np.random.Generator, chinese: bool) -> str:
    nwords = int(rng.choice([1, 1, 1, 2, 2, 3]))
    if chinese:
        words = load_wordlist("zh")
        text = "".join(words[rng.integers(len(words))] for _ in range(nwords))
        return text[:10]
    return " ".join(_latin_token(rng) for _ in range(nwords))


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


# ------------------------------------------------------------------------------------------------ instance


@dataclass
class Instance:
    text: str
    polygon: np.ndarray  # (K, 2) in image coords, clockwise on screen
    ink: np.ndarray  # float32 alpha of the glyph fill, image-sized ROI below
    outline: np.ndarray | None  # float32 alpha of the outline (ring around the fill), or None
    roi: tuple[int, int, int, int]  # x0, y0, x1, y1 in the image
    dontcare: bool
    style: dict = field(default_factory=dict)


def _layout(text: str, font_path: str | None, size: int, tracking: float):
    glyphs = [_glyph(font_path, size, ch) for ch in text]
    advances = np.array([g[3] for g in glyphs]) + tracking
    advances[-1] -= tracking
    inked = [g for g in glyphs if g[0].any()]
    top = min((g[4] for g in inked), default=-size * 0.7)
    bottom = max((g[5] for g in inked), default=0.0)
    return glyphs, advances, top, max(bottom, 0.0)


def _render_local(text, font_path, size, tracking, kind, rng, outline_px):
    """Draw the text along a curve in a local canvas; return mask, polygon and the curve bits."""
    import cv2

    glyphs, advances, top, bottom = _layout(text, font_path, size, tracking)
    total = float(advances.sum())
    height = bottom - top
    end_pad = max(2.0, 0.12 * size)
    curve = _make_curve(kind, rng, total + 2 * end_pad, min_radius=1.8 * (height + 0.3 * size))
    if curve.min_radius() == math.inf:
        kind = "straight"

    starts = end_pad + np.concatenate([[0.0], np.cumsum(advances)[:-1]])
    centers = starts + np.array([g[3] for g in glyphs]) / 2
    cpts, ctan = curve.at(centers)

    border = int(math.ceil(height + size)) + 4
    lo = curve.points.min(0) - border
    hi = curve.points.max(0) + border
    shift = -lo
    w, h = int(math.ceil(hi[0] - lo[0])) + 1, int(math.ceil(hi[1] - lo[1])) + 1
    mask = np.zeros((h, w), np.uint8)
    for (gmask, ox, oy, adv, _, _), p, t in zip(glyphs, cpts, ctan):
        if not gmask.any():
            continue
        c, s = t
        ax, ay = ox + adv / 2, oy  # anchor: middle of the advance, on the baseline
        px, py = p + shift
        # glyph -> canvas: rotate about the anchor so that glyph x follows the tangent
        m = np.array([[c, -s, px - (c * ax - s * ay)], [s, c, py - (s * ax + c * ay)]])
        gh, gw = gmask.shape
        corners = np.array([[0, 0, 1], [gw, 0, 1], [0, gh, 1], [gw, gh, 1]], float) @ m.T
        x0, y0 = np.floor(corners.min(0)).astype(int) - 1
        x1, y1 = np.ceil(corners.max(0)).astype(int) + 2
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        m_roi = m.copy()
        m_roi[:, 2] -= (x0, y0)
        warped = cv2.warpAffine(gmask, m_roi, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderValue=0)
        np.maximum(mask[y0:y1, x0:x1], warped, out=mask[y0:y1, x0:x1])

    outline = None
    ink = mask
    if outline_px > 0:
        k = 2 * outline_px + 1
        outline = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        ink = outline

    # polygon along the curve, grown until it holds (almost) all the ink
    npts = 2 if kind == "straight" else 7
    margin = max(1.0, 0.06 * size) + outline_px
    s0, s1 = end_pad, end_pad + total
    ink_sum = float(ink.sum()) or 1.0
    for _ in range(6):
        ss = np.linspace(s0 - margin, s1 + margin, npts)
        p, t = _extrapolated(curve, ss)
        up = np.stack([t[:, 1], -t[:, 0]], 1)
        top_edge = p + up * (-top + margin)
        bot_edge = p - up * (bottom + margin)
        poly = np.concatenate([top_edge, bot_edge[::-1]]) + shift
        filled = np.zeros_like(mask)
        cv2.fillPoly(filled, [np.round(poly * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        inside = float((ink.astype(np.float32) * filled).sum())
        if inside / ink_sum >= 0.998:
            break
        margin += max(1.0, 0.04 * size)
    return mask, outline, poly, kind


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
    import cv2

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


# ------------------------------------------------------------------------------------------------ backgrounds


_BG_CACHE: dict[str, np.ndarray] = {}
_USER_BG_CACHE: OrderedDict = OrderedDict()
_USER_BG_CACHE_SIZE = 48
_BAD_BG: set[str] = set()


def _skimage_background(name: str) -> np.ndarray:
    img = _BG_CACHE.get(name)
    if img is None:
        from skimage import data

        img = getattr(data, name)()
        if isinstance(img, tuple):
            img = img[0]
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)
        _BG_CACHE[name] = img
    return img


def _user_background(path: str, size: tuple[int, int]) -> np.ndarray | None:
    img = _USER_BG_CACHE.get(path)
    if img is not None:
        _USER_BG_CACHE.move_to_end(path)
        return img
    if path in _BAD_BG:
        return None
    import cv2

    data = np.fromfile(path, dtype=np.uint8) if os.path.isfile(path) else None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if img is None:
        _BAD_BG.add(path)
        warnings.warn(f"background {path}: not a readable image, skipped", RuntimeWarning, stacklevel=2)
        return None
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    limit = 2 * max(size)  # keep memory bounded: no need for more pixels than a 2x crop
    scale = limit / max(img.shape[:2])
    if scale < 1:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    _USER_BG_CACHE[path] = img
    if len(_USER_BG_CACHE) > _USER_BG_CACHE_SIZE:
        _USER_BG_CACHE.popitem(last=False)
    return img


def list_backgrounds(backgrounds_dir: str | os.PathLike | None) -> list[str]:
    """Sorted image files under ``backgrounds_dir`` (recursively); [] when None."""
    if backgrounds_dir is None:
        return []
    root = Path(backgrounds_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"backgrounds folder {root} does not exist")
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        from i3cl_core.data.errors import DatasetError

        raise DatasetError(f"backgrounds folder {root} holds no images ({', '.join(IMAGE_EXTS)})")
    return files


def _background(rng: np.random.Generator, size: tuple[int, int], user_files: Sequence[str]) -> np.ndarray:
    import cv2

    w, h = size
    src = None
    pick_user = bool(user_files) and rng.random() < 0.7
    user_idx = int(rng.integers(len(user_files))) if user_files else 0
    sk_name = SKIMAGE_BACKGROUNDS[int(rng.integers(len(SKIMAGE_BACKGROUNDS)))]
    if pick_user:
        src = _user_background(user_files[user_idx], size)
    if src is None:
        src = _skimage_background(sk_name)
    sh, sw = src.shape[:2]
    # random crop with the output aspect ratio, 35-100% of the largest possible
    aspect = w / h
    cw_max = min(sw, sh * aspect)
    frac = rng.uniform(0.35, 1.0)
    cw = max(8.0, cw_max * frac)
    ch = cw / aspect
    x0 = rng.uniform(0, max(sw - cw, 0))
    y0 = rng.uniform(0, max(sh - ch, 0))
    crop = src[int(y0) : int(y0 + ch), int(x0) : int(x0 + cw)]
    interp = cv2.INTER_AREA if crop.shape[1] > w else cv2.INTER_LINEAR
    img = cv2.resize(crop, (w, h), interpolation=interp).astype(np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if src is _BG_CACHE.get(sk_name) and sk_name in ("brick", "grass", "gravel"):
        img = img * rng.uniform(0.6, 1.15, size=3).astype(np.float32)  # tint the grey textures
    gain = rng.uniform(0.75, 1.2)
    bias = rng.uniform(-20, 20)
    return np.clip(img * gain + bias, 0, 255).astype(np.float32)


# ------------------------------------------------------------------------------------------------ colours


def _luma(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _contrast_colour(rng: np.random.Generator, bg: np.ndarray, min_diff: float = 90.0) -> np.ndarray:
    bl = _luma(bg)
    for _ in range(12):
        c = rng.uniform(0, 255, size=3)
        if abs(_luma(c) - bl) >= min_diff:
            return c
    return np.array([15.0, 15.0, 15.0]) if bl > 128 else np.array([245.0, 245.0, 245.0])


# ------------------------------------------------------------------------------------------------ one image


def render_sample(
    seed: int,
    index: int,
    size: tuple[int, int] = (512, 512),
    cjk_font: str | None = None,
    backgrounds: Sequence[str] = (),
    return_debug: bool = False,
):
    """Draw image number ``index`` (1-based) of the dataset with ``seed``.

    Returns ``(image, annotations)`` where image is an RGB uint8 array (H, W, 3) and annotations a list
    of dicts with ``segmentation``, ``bbox``, ``area``, ``iscrowd`` and ``transcription`` (no ids yet).
    With ``return_debug=True`` a third item is returned: ``{"ink": [mask per annotation], "text_layer":
    union mask}``, boolean (H, W) arrays of the text ink (fill and outline) before compositing.
    """
    import cv2
    from shapely.geometry import Polygon

    w, h = int(size[0]), int(size[1])
    geo = np.random.default_rng([seed, index, 0])
    pix = np.random.default_rng([seed, index, 1])
    latin_fonts = find_latin_fonts() or (None,)
    canvas = _background(pix, (w, h), backgrounds)
    short = min(w, h)

    target = int(geo.integers(MIN_INSTANCES, MAX_INSTANCES + 1))
    placed: list[Instance] = []
    shapes: list[Any] = []
    attempts = 0
    while len(placed) < target and attempts < 4 * target:
        attempts += 1
        dontcare = bool(geo.random() < DONTCARE_RATE)
        dc_kind = str(geo.choice(["tiny", "blur", "faint"])) if dontcare else ""
        chinese = cjk_font is not None and geo.random() < 0.35
        text = _make_text(geo, chinese)
        font_path = cjk_font if chinese else latin_fonts[int(geo.integers(len(latin_fonts)))]
        if dc_kind == "tiny":
            fsize = int(max(5, round(short * geo.uniform(0.009, 0.015))))
        else:
            fsize = int(round(short * geo.uniform(0.045, 0.12)))
            fsize = max(fsize, 10)
        kind = str(geo.choice(["straight", "straight", "arc", "arc", "sine", "bezier", "bezier"]))
        tracking = geo.uniform(0.0, 0.12) * fsize
        outline_px = int(geo.integers(1, 3)) if (not dontcare and geo.random() < 0.2) else 0
        # shrink long texts to fit the image
        _, adv, _, _ = _layout(text, font_path, fsize, tracking)
        max_len = 0.85 * short if kind == "straight" else 1.1 * short
        if adv.sum() > max_len:
            fsize = int(fsize * max_len / adv.sum())
            if fsize < (5 if dc_kind == "tiny" else 10):
                continue
            tracking = min(tracking, 0.12 * fsize)
        mask, outline, poly_local, kind = _render_local(text, font_path, fsize, tracking, kind, geo, outline_px)
        lh, lw = mask.shape
        hmat = _instance_transform(geo, lw, lh)
        poly0 = _apply(hmat, poly_local)
        pmin, pmax = poly0.min(0), poly0.max(0)
        room_x = (1.0 - pmin[0], w - 1.0 - pmax[0])
        room_y = (1.0 - pmin[1], h - 1.0 - pmax[1])
        if room_x[0] > room_x[1] or room_y[0] > room_y[1]:
            continue
        poly = None
        for _ in range(15):
            tx, ty = geo.uniform(*room_x), geo.uniform(*room_y)
            cand = poly0 + (tx, ty)
            shape = Polygon(cand)
            if not shape.is_valid or shape.area < 4:
                break
            if all(
                shape.intersection(o).area <= MAX_OVERLAP * min(shape.area, o.area) for o in shapes
            ):
                poly = cand
                break
        if poly is None:
            continue
        full = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]]) @ hmat
        x0 = max(int(math.floor(pmin[0] + tx)) - 2, 0)
        y0 = max(int(math.floor(pmin[1] + ty)) - 2, 0)
        x1 = min(int(math.ceil(pmax[0] + tx)) + 3, w)
        y1 = min(int(math.ceil(pmax[1] + ty)) + 3, h)
        roi_h = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]]) @ full

        def warp(m: np.ndarray) -> np.ndarray:
            dsize = (x1 - x0, y1 - y0)
            return cv2.warpPerspective(m, roi_h, dsize, flags=cv2.INTER_LINEAR, borderValue=0).astype(np.float32) / 255.0

        ink = warp(mask)
        out = warp(outline) if outline is not None else None
        placed.append(Instance(text, poly, ink, out, (x0, y0, x1, y1), dontcare, {"dc": dc_kind}))
        shapes.append(shape)

    debug_masks = []
    for inst in placed:
        debug_masks.append(_composite(canvas, inst, pix))
    _occlude(canvas, placed, pix)
    img = _finish(canvas, pix)

    anns = [_annotation(inst) for inst in placed]
    if not return_debug:
        return img, anns
    full_masks = []
    for inst, m in zip(placed, debug_masks):
        x0, y0, x1, y1 = inst.roi
        fm = np.zeros((h, w), bool)
        fm[y0:y1, x0:x1] = m
        full_masks.append(fm)
    layer = np.zeros((h, w), bool)
    for fm in full_masks:
        layer |= fm
    return img, anns, {"ink": full_masks, "text_layer": layer}


def _composite(canvas: np.ndarray, inst: Instance, pix: np.random.Generator) -> np.ndarray:
    """Blend one instance into ``canvas`` in place; return its ink mask (ROI-sized, bool)."""
    import cv2

    x0, y0, x1, y1 = inst.roi
    region = canvas[y0:y1, x0:x1]
    fill_a = inst.ink
    ink_mask = (fill_a > 0.5) if inst.outline is None else (np.maximum(fill_a, inst.outline) > 0.5)
    sel = ink_mask if ink_mask.any() else np.ones_like(ink_mask)
    bg = region[sel].mean(0) if region.size else np.array([128.0, 128.0, 128.0])
    dc = inst.style.get("dc", "")
    opacity = pix.uniform(0.85, 1.0)
    if dc == "faint":
        colour = np.clip(bg + pix.uniform(-10, 10, size=3), 0, 255)
    else:
        colour = _contrast_colour(pix, bg)
    blur_sigma = {"blur": pix.uniform(2.0, 3.5), "tiny": 0.7}.get(dc, 0.0)

    def soften(a: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(a, (0, 0), blur_sigma) if blur_sigma > 0 else a

    if not dc and pix.random() < 0.2:  # drop shadow
        dx, dy = pix.integers(1, 4, size=2) * pix.choice([-1, 1], size=2)
        shadow = np.zeros_like(fill_a)
        src = fill_a[max(0, -dy) : fill_a.shape[0] - max(0, dy), max(0, -dx) : fill_a.shape[1] - max(0, dx)]
        shadow[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
        shadow = cv2.GaussianBlur(shadow, (0, 0), 1.0)[:, :, None] * pix.uniform(0.4, 0.7)
        shade = np.zeros(3) if _luma(colour) > 100 else np.full(3, 230.0)
        region[:] = region * (1 - shadow) + shade * shadow
    if inst.outline is not None:
        a = soften(inst.outline)[:, :, None] * opacity
        oc = np.full(3, 255.0) - colour if abs(_luma(colour) - 128) > 40 else np.zeros(3)
        region[:] = region * (1 - a) + oc * a
    a = soften(fill_a)[:, :, None] * opacity
    region[:] = region * (1 - a) + colour * a
    return ink_mask


def _occlude(canvas: np.ndarray, placed: list[Instance], pix: np.random.Generator) -> None:
    """Random filled shapes partly over some instances (poles, leaves, stickers...)."""
    import cv2

    if not placed or pix.random() > 0.35:
        return
    for _ in range(int(pix.integers(1, 3))):
        inst = placed[int(pix.integers(len(placed)))]
        poly = inst.polygon
        height = max(4.0, float(np.linalg.norm(poly[0] - poly[-1])))
        k = int(pix.integers(len(poly)))
        cx, cy = poly[k] + (poly.mean(0) - poly[k]) * pix.uniform(0.0, 0.5)
        r = height * pix.uniform(0.3, 0.7)
        colour = tuple(float(c) for c in pix.uniform(0, 255, size=3))
        layer = np.zeros(canvas.shape[:2], np.uint8)
        shape = pix.integers(3)
        if shape == 0:
            cv2.ellipse(layer, (int(cx), int(cy)), (int(r), int(r * pix.uniform(0.4, 1.0))),
                        float(pix.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
        elif shape == 1:
            ang = np.sort(pix.uniform(0, 2 * math.pi, size=5))
            pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1).astype(np.int32)
            cv2.fillPoly(layer, [pts], 255, cv2.LINE_AA)
        else:
            a = pix.uniform(0, math.pi)
            d = np.array([math.cos(a), math.sin(a)]) * r * 2.5
            p0 = (int(cx - d[0]), int(cy - d[1]))
            p1 = (int(cx + d[0]), int(cy + d[1]))
            cv2.line(layer, p0, p1, 255, max(2, int(r * 0.35)), cv2.LINE_AA)
        alpha = (layer.astype(np.float32) / 255.0)[:, :, None]
        canvas[:] = canvas * (1 - alpha) + np.array(colour, np.float32) * alpha


def _finish(canvas: np.ndarray, pix: np.random.Generator) -> np.ndarray:
    import cv2

    img = canvas
    if pix.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), pix.uniform(0.5, 1.1))
    if pix.random() < 0.5:
        img = img + pix.normal(0, pix.uniform(2, 7), size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _annotation(inst: Instance) -> dict:
    poly = np.round(inst.polygon.astype(np.float64), 2)
    xs, ys = poly[:, 0], poly[:, 1]
    x0, y0 = float(xs.min()), float(ys.min())
    area = polygon_area(poly)
    return {
        "category_id": 1,
        "segmentation": [[float(v) for v in poly.reshape(-1)]],
        "bbox": [x0, y0, round(float(xs.max()) - x0, 2), round(float(ys.max()) - y0, 2)],
        "area": round(area, 2),
        "iscrowd": 1 if inst.dontcare else 0,
        "transcription": DONTCARE if inst.dontcare else inst.text,
    }


# ------------------------------------------------------------------------------------------------ datasets


def _init_worker() -> None:
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:
        pass


def _work(task: tuple) -> tuple[int, str, int, int, list[dict]]:
    """Render one image, write its JPEG, return (index, file_name, width, height, annotations)."""
    import cv2

    index, seed, size, img_dir, cjk_font, backgrounds = task
    img, anns = render_sample(seed, index, size, cjk_font, backgrounds)
    quality = int(np.random.default_rng([seed, index, 2]).integers(60, 96))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"could not encode synthetic image {index}")
    name = f"synth_{index:06d}.jpg"
    tmp = Path(img_dir) / f".{name}.tmp"
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, Path(img_dir) / name)
    return index, name, int(size[0]), int(size[1]), anns


def _check_args(num_images: int, size: Sequence[int], workers: int) -> tuple[int, int]:
    if int(num_images) < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if len(size) != 2 or min(int(size[0]), int(size[1])) < 64 or max(int(size[0]), int(size[1])) > 8192:
        raise ValueError(f"size must be two integers (width height) between 64 and 8192, got {tuple(size)}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return int(size[0]), int(size[1])


def generate_dataset(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int = 0,
    size: tuple[int, int] = (512, 512),
    backgrounds_dir: str | os.PathLike | None = None,
    workers: int = 1,
    progress: bool = True,
    cjk: bool | None = None,
    ann_name: str = "annotations.json",
) -> dict:
    """Write ``out_dir/images/synth_NNNNNN.jpg`` and ``out_dir/<ann_name>`` (COCO polygons).

    ``cjk``: None detects a Chinese font (one warning per process when there is none), False draws
    Latin only, True asks for Chinese (falls back to Latin with the same warning when no font exists).
    The json depends only on ``seed``, ``num_images``, ``size``, the backgrounds and the fonts, not on
    ``workers``. Returns a summary dict.
    """
    from tqdm import tqdm

    from i3cl_core.utils import atomic_write_json

    w, h = _check_args(num_images, size, workers)
    seed = int(seed)
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    backgrounds = list_backgrounds(backgrounds_dir)
    cjk_font = _resolve_cjk(cjk)
    tasks = [(i, seed, (w, h), str(img_dir), cjk_font, backgrounds) for i in range(1, int(num_images) + 1)]

    start = time.perf_counter()
    results = []
    bar = tqdm(total=len(tasks), desc="synth", unit="img", file=sys.stderr, disable=not progress, leave=False)
    try:
        if workers == 1 or len(tasks) == 1:
            for task in tasks:
                results.append(_work(task))
                bar.update(1)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")  # no fork: safe with threads (torch, cv2) in the parent
            with ctx.Pool(min(int(workers), len(tasks)), initializer=_init_worker) as pool:
                for res in pool.imap(_work, tasks, chunksize=max(1, min(8, len(tasks) // (4 * workers)))):
                    results.append(res)
                    bar.update(1)
    finally:
        bar.close()
    seconds = time.perf_counter() - start

    images, annotations = [], []
    for index, name, iw, ih, anns in results:  # imap keeps index order
        images.append({"id": index, "file_name": name, "width": iw, "height": ih})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": index, **ann})
    info = {
        "description": "I3CL synthetic curved scene text",
        "generator": "i3cl_core.data.synth",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": [w, h],
        "cjk": cjk_font is not None,
        "backgrounds": "skimage" + (f"+{len(backgrounds)} user images" if backgrounds else ""),
    }
    coco = {"info": info, "images": images, "annotations": annotations, "categories": [dict(CATEGORY)]}
    ann_file = atomic_write_json(out / ann_name, coco)
    n_dc = sum(a["iscrowd"] for a in annotations)
    return {
        "num_images": len(images),
        "num_instances": len(annotations),
        "num_dontcare": n_dc,
        "cjk": cjk_font is not None,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(images) / max(seconds, 1e-9), 2),
        "ann_file": str(ann_file),
        "img_root": str(img_dir),
    }


def _split_seed(seed: int, split: int) -> int:
    return int(np.random.SeedSequence([int(seed), 7919, split]).generate_state(1)[0])


def generate_demo(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_train: int = 200,
    num_unlabeled: int = 200,
    num_test: int = 100,
    size: tuple[int, int] = (384, 384),
    workers: int = 1,
    num_val: int = 0,
    progress: bool = True,
    cjk: bool | None = None,
    backgrounds_dir: str | os.PathLike | None = None,
) -> dict:
    """The demo dataset: ``train/`` (labeled), ``unlabeled/`` (images.json without annotations plus the
    hidden gt.json), ``test/`` and, with ``num_val`` > 0, a small labeled ``val/`` split (what the
    pipeline chooses fusion thresholds on), each split from its own seed derived from ``seed``."""
    from i3cl_core.utils import atomic_write_json

    out = Path(out_dir)
    common = dict(size=size, workers=workers, progress=progress, cjk=cjk, backgrounds_dir=backgrounds_dir)
    summary = {
        "train": generate_dataset(out / "train", num_train, seed=_split_seed(seed, 0), **common),
        "unlabeled": generate_dataset(
            out / "unlabeled", num_unlabeled, seed=_split_seed(seed, 1), ann_name="gt.json", **common
        ),
        "test": generate_dataset(out / "test", num_test, seed=_split_seed(seed, 2), **common),
    }
    if num_val > 0:
        summary["val"] = generate_dataset(out / "val", num_val, seed=_split_seed(seed, 3), **common)
    import json

    gt_path = Path(summary["unlabeled"]["ann_file"])
    gt = json.loads(gt_path.read_text(encoding="utf-8"))
    images_only = {
        "info": {**gt["info"], "note": "unlabeled split: annotations hidden in gt.json"},
        "images": gt["images"],
        "annotations": [],
        "categories": gt["categories"],
    }
    images_json = atomic_write_json(out / "unlabeled" / "images.json", images_only)
    summary["unlabeled"]["images_file"] = str(images_json)
    summary["unlabeled"]["gt_file"] = str(gt_path)
    return summary
