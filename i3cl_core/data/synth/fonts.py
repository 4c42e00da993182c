"""Fonts (DejaVu for Latin, a CJK font found with fc-list or ``$I3CL_CJK_FONT``), word lists, glyph
rendering with a cache, and the random words and Chinese strings the generator draws."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

LATIN_FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
CJK_ENV = "I3CL_CJK_FONT"  # path of a CJK font file; overrides the fc-list search

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
    from PIL import ImageFont  # deferred: Pillow loads only when text is drawn

    try:
        font = ImageFont.truetype(path, 24)
        return font.getmask("中国").getbbox() is not None
    except Exception:  # unreadable or unsupported font file
        return False


@functools.cache
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


@functools.cache
def find_latin_fonts() -> tuple[str, ...]:
    """Sorted Latin font files (DejaVu when installed). Empty tuple: use Pillow's bundled font."""
    fonts = sorted(
        str(p)
        for p in LATIN_FONT_DIR.glob("DejaVu*.ttf")
        if "Math" not in p.name and "ExtraLight" not in p.name
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


@functools.cache
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
    from PIL import ImageFont  # deferred: Pillow loads only when text is drawn

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
    from PIL import Image, ImageDraw  # deferred: Pillow loads only when text is drawn

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
