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

from i3cl_core.data.synth.dataset import CATEGORY, GENERATOR_VERSION, generate_dataset, generate_demo
from i3cl_core.data.synth.fonts import find_cjk_font, find_latin_fonts, load_wordlist
from i3cl_core.data.synth.render import (
    DONTCARE,
    MAX_INSTANCES,
    MIN_INSTANCES,
    list_backgrounds,
    render_sample,
)

__all__ = [
    "CATEGORY",
    "DONTCARE",
    "GENERATOR_VERSION",
    "MAX_INSTANCES",
    "MIN_INSTANCES",
    "find_cjk_font",
    "find_latin_fonts",
    "generate_dataset",
    "generate_demo",
    "list_backgrounds",
    "load_wordlist",
    "render_sample",
]
