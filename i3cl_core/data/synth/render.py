"""One synthetic image: text instances drawn along their curves onto a background, their polygons,
colours with enough contrast, occluders, noise and blur (:func:`render_sample`)."""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from i3cl_core.data.errors import DatasetError
from i3cl_core.data.image_io import IMAGE_EXTENSIONS
from i3cl_core.data.polygons import polygon_area
from i3cl_core.data.synth.fonts import _glyph, _make_text, find_latin_fonts
from i3cl_core.data.synth.geometry import _apply, _extrapolated, _instance_transform, _make_curve

DONTCARE = "###"
SKIMAGE_BACKGROUNDS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "retina",
    "stereo_motorcycle",
    "brick",
    "grass",
    "gravel",
)
# instances per image, share of deliberately unreadable instances
MIN_INSTANCES, MAX_INSTANCES = 2, 8
DONTCARE_RATE = 0.10
MAX_OVERLAP = 0.03  # intersection / smaller polygon area allowed between two instances


# ------------------------------------------------------------------------------------------------ instance


@dataclass
class RenderedText:
    """One word as the generator drew it: its text, polygon and the alpha masks it was composited with."""

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
    import cv2  # deferred: OpenCV loads only when images are rendered

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


# ------------------------------------------------------------------------------------------------ backgrounds


_BG_CACHE: dict[str, np.ndarray] = {}
_USER_BG_CACHE: OrderedDict = OrderedDict()
_USER_BG_CACHE_SIZE = 48
_BAD_BG: set[str] = set()


def _skimage_background(name: str) -> np.ndarray:
    img = _BG_CACHE.get(name)
    if img is None:
        from skimage import data  # deferred: scikit-image loads only for its sample backgrounds

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
    import cv2  # deferred: OpenCV loads only when images are rendered

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
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DatasetError(f"backgrounds folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _background(rng: np.random.Generator, size: tuple[int, int], user_files: Sequence[str]) -> np.ndarray:
    import cv2  # deferred: OpenCV loads only when images are rendered

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


def _warp_to_roi(m: np.ndarray, roi_h: np.ndarray, dsize: tuple[int, int]) -> np.ndarray:
    """A uint8 text mask through the homography ``roi_h`` into a ``dsize`` region, as float32 in [0, 1]."""
    import cv2  # deferred: OpenCV loads only when images are rendered

    return (
        cv2.warpPerspective(m, roi_h, dsize, flags=cv2.INTER_LINEAR, borderValue=0).astype(np.float32) / 255.0
    )


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
    from shapely.geometry import Polygon  # deferred: shapely loads only when images are rendered

    w, h = int(size[0]), int(size[1])
    geo = np.random.default_rng([seed, index, 0])
    pix = np.random.default_rng([seed, index, 1])
    latin_fonts = find_latin_fonts() or (None,)
    canvas = _background(pix, (w, h), backgrounds)
    short = min(w, h)

    target = int(geo.integers(MIN_INSTANCES, MAX_INSTANCES + 1))
    placed: list[RenderedText] = []
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
        mask, outline, poly_local, kind = _render_local(
            text, font_path, fsize, tracking, kind, geo, outline_px
        )
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
            if all(shape.intersection(o).area <= MAX_OVERLAP * min(shape.area, o.area) for o in shapes):
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
        dsize = (x1 - x0, y1 - y0)
        ink = _warp_to_roi(mask, roi_h, dsize)
        out = _warp_to_roi(outline, roi_h, dsize) if outline is not None else None
        placed.append(RenderedText(text, poly, ink, out, (x0, y0, x1, y1), dontcare, {"dc": dc_kind}))
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


def _composite(canvas: np.ndarray, inst: RenderedText, pix: np.random.Generator) -> np.ndarray:
    """Blend one instance into ``canvas`` in place; return its ink mask (ROI-sized, bool)."""
    import cv2  # deferred: OpenCV loads only when images are rendered

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


def _occlude(canvas: np.ndarray, placed: list[RenderedText], pix: np.random.Generator) -> None:
    """Random filled shapes partly over some instances (poles, leaves, stickers...)."""
    import cv2  # deferred: OpenCV loads only when images are rendered

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
            cv2.ellipse(
                layer,
                (int(cx), int(cy)),
                (int(r), int(r * pix.uniform(0.4, 1.0))),
                float(pix.uniform(0, 180)),
                0,
                360,
                255,
                -1,
                cv2.LINE_AA,
            )
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
    import cv2  # deferred: OpenCV loads only when images are rendered

    img = canvas
    if pix.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), pix.uniform(0.5, 1.1))
    if pix.random() < 0.5:
        img = img + pix.normal(0, pix.uniform(2, 7), size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _annotation(inst: RenderedText) -> dict:
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
