"""``glyphs``: a real many-class image task, characters rendered from fonts.

The fonts are the DejaVu faces that matplotlib ships (``mpl-data/fonts/ttf``),
so they are present wherever tallytrain is installed and nothing is
downloaded. A class is a Unicode code point that every face maps (read from
each face's cmap with fontTools), printable (no control, format, private-use
or separator characters), visible (its plain render is not blank in any face)
and not a homoglyph: a code point whose plain renders equal, pixel for pixel
in every face, those of a lower one (Latin A, Greek Alpha and Cyrillic A are
one glyph in DejaVu) is dropped, since no model could tell them apart. Of
2,383 code points the 12 DejaVu text faces share, 2,364 are printable, one
renders blank (U+FFFC) and 105 are homoglyphs: 2,258 classes (matplotlib
3.11, Pillow 13.0, FreeType 2.14). ``num_classes`` takes the first C by code
point.

A sample is a 20x20 grayscale render in [0, 1] of one class in one face,
drawn at 4x resolution, shrunk only if its ink does not fit, centred
horizontally on its ink and set on a fixed baseline (so '-', '_' and the
macron differ by height), then moved by a small random affine map (rotation,
scale, shift) and box-filtered down to 20x20. Every sample draws its jitter
from its own seed (seed, code point, face, render), so a class's samples do
not depend on C. The faces include bold and oblique variants: stroke weight
and slant vary by face, and each sample's face is exposed for partitions by
face (feature skew).

Renders are cached (data/cache.py) under a key of the font files' contents,
the parameters, C, and the Pillow, FreeType and Unicode database versions.
"""

from __future__ import annotations

import hashlib
import math
import os
import unicodedata
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import cache
from .datasets import DATASETS, Dataset

IMAGE_SIZE = 20
# Drawn at this multiple of IMAGE_SIZE, then box-filtered down: anti-aliasing
# that does not depend on FreeType's hinting at 20 px.
SUPERSAMPLE = 4
# The em size relative to the canvas, and where the baseline sits: a capital
# fills about 45% of the height, leaving room for accents above and
# descenders below.
FONT_SIZE = 0.6
BASELINE = 0.72
MARGIN = 2  # supersampled pixels of border the placed ink keeps clear
DEFAULT_RENDERS_PER_FACE = 3
DEFAULT_NUM_CLASSES = 1000
# Jitter: rotation in degrees, scale factor, shift in output pixels.
MAX_ROTATION = 10.0
SCALE_RANGE = (0.9, 1.1)
MAX_SHIFT = 1.5
# A plain render whose brightest pixel is below this (of 255) counts as blank.
VISIBLE_LEVEL = 64
# The 12 DejaVu text faces. DejaVuSansDisplay / DejaVuSerifDisplay, also in
# matplotlib, map only 47 and 20 code points (math display glyphs), which
# would cut the shared set to almost nothing.
DEFAULT_FACES = tuple(
    f"DejaVu{family}{style}.ttf"
    for family, styles in (
        ("Sans", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("SansMono", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("Serif", ("", "-Bold", "-Italic", "-BoldItalic")),
    )
    for style in styles
)
_FORMAT = 1  # bump when the cached arrays' layout or meaning changes


@dataclass(frozen=True)
class Glyphs:
    """x float32 [N, 1, 20, 20] in [0, 1]; y int64 [N] class ids (index into
    ``code_points``); faces int64 [N] face ids (index into ``face_names``).
    Samples are ordered by class, then face, then render."""

    x: torch.Tensor
    y: torch.Tensor
    faces: torch.Tensor
    code_points: Tuple[int, ...]
    face_names: Tuple[str, ...]
    renders_per_face: int
    seed: int

    @property
    def num_classes(self) -> int:
        return len(self.code_points)

    def dataset(self) -> Dataset:
        """The engine's view; the face of each sample is its group."""
        info = {
            "code_points": list(self.code_points),
            "faces": list(self.face_names),
            "renders_per_face": self.renders_per_face,
            "seed": self.seed,
        }
        return Dataset(
            f"glyphs{self.num_classes}",
            self.x,
            self.y,
            self.num_classes,
            groups=self.faces,
            group_names=self.face_names,
            info=info,
        )


# --------------------------------------------------------------------------- #
# fonts and classes
# --------------------------------------------------------------------------- #
def font_folder() -> str:
    """matplotlib's bundled TrueType fonts."""
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def default_fonts() -> List[str]:
    return [os.path.join(font_folder(), name) for name in DEFAULT_FACES]


def _check_fonts(fonts: Sequence[str]) -> List[str]:
    if len(fonts) < 1:
        raise ValueError("--fonts must name at least one font file")
    for path in fonts:
        if not os.path.isfile(path):
            raise ValueError(f"glyphs: font file {path!r} (--fonts) does not exist")
    if len(set(map(os.path.abspath, fonts))) != len(fonts):
        raise ValueError(f"--fonts names a font file twice: {', '.join(fonts)}")
    return [os.path.abspath(p) for p in fonts]


def _printable(code_point: int) -> bool:
    # C*: control, format, surrogate, private use, unassigned; Z*: separators.
    return unicodedata.category(chr(code_point))[0] not in "CZ"


def shared_code_points(fonts: Sequence[str]) -> List[int]:
    """Printable code points that every font's cmap maps, ascending."""
    from fontTools.ttLib import TTFont

    shared = None
    for path in fonts:
        with TTFont(path, lazy=True) as font:
            cmap = set(font.getBestCmap() or {})
        shared = cmap if shared is None else shared & cmap
    return sorted(c for c in (shared or ()) if _printable(c))


def _load_fonts(fonts: Sequence[str]):
    from PIL import ImageFont

    size = int(round(FONT_SIZE * IMAGE_SIZE * SUPERSAMPLE))
    return [ImageFont.truetype(path, size) for path in fonts]


# --------------------------------------------------------------------------- #
# rendering
# --------------------------------------------------------------------------- #
def _place(font, char: str):
    """The glyph drawn on the supersampled canvas, unjittered (see the module
    docstring), or None where it leaves no ink."""
    from PIL import Image, ImageDraw

    side = IMAGE_SIZE * SUPERSAMPLE
    scratch = Image.new("L", (3 * side, 3 * side), 0)
    ImageDraw.Draw(scratch).text((side, 1.5 * side), char, font=font, fill=255, anchor="ls")
    box = scratch.getbbox()
    if box is None:
        return None
    ink = scratch.crop(box)
    top = box[1] - 1.5 * side  # ink top relative to the baseline
    room = side - 2 * MARGIN
    shrink = min(1.0, room / ink.width, room / ink.height)
    if shrink < 1.0:
        ink = ink.resize(
            (max(1, round(ink.width * shrink)), max(1, round(ink.height * shrink))),
            Image.Resampling.LANCZOS,
        )
        top *= shrink
    left = (side - ink.width) // 2
    y = int(round(BASELINE * side + top))
    y = min(max(y, MARGIN), side - MARGIN - ink.height)
    canvas = Image.new("L", (side, side), 0)
    canvas.paste(ink, (left, y))
    return canvas


def _downsample(image) -> np.ndarray:
    from PIL import Image

    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.uint8)


def _jitter(image, rng: np.random.Generator):
    """``image`` rotated, scaled and shifted about its centre by a draw of ``rng``."""
    from PIL import Image

    angle = math.radians(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    scale = rng.uniform(*SCALE_RANGE)
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=2) * SUPERSAMPLE
    centre = image.width / 2.0
    # PIL maps each output pixel p' to the input pixel M p' + b, so pass the
    # inverse of p' = centre + s R (p - centre) + shift.
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    inv = np.array([[cos, sin], [-sin, cos]])
    offset = centre - inv @ (np.array([centre, centre]) + shift)
    data = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    return image.transform(
        image.size, Image.Transform.AFFINE, data, resample=Image.Resampling.BICUBIC, fillcolor=0
    )


def select_classes(fonts: Sequence[str], num_classes: Optional[int]) -> List[int]:
    """The first ``num_classes`` code points (all when None) that are shared,
    printable, visible in every face and not homoglyphs of a lower one."""
    fonts = _check_fonts(fonts)
    loaded = _load_fonts(fonts)
    kept: List[int] = []
    seen = set()
    for code in shared_code_points(fonts):
        if num_classes is not None and len(kept) == num_classes:
            break
        plain = []
        for font in loaded:
            placed = _place(font, chr(code))
            if placed is None:
                break
            small = _downsample(placed)
            if small.max() < VISIBLE_LEVEL:
                break
            plain.append(small)
        if len(plain) < len(loaded):
            continue
        fingerprint = hashlib.sha256(np.stack(plain).tobytes()).digest()
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        kept.append(code)
    if num_classes is not None and len(kept) < num_classes:
        raise ValueError(
            f"--num-classes {num_classes} exceeds the {len(kept)} glyph classes these "
            f"{len(fonts)} fonts share"
        )
    return kept


def render(
    fonts: Sequence[str], code_points: Sequence[int], renders_per_face: int, seed: int
) -> np.ndarray:
    """uint8 [C * faces * renders, 20, 20]: ordered by class, face, render."""
    loaded = _load_fonts(fonts)
    out = np.empty(
        (len(code_points) * len(loaded) * renders_per_face, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8
    )
    i = 0
    for code in code_points:
        for face, font in enumerate(loaded):
            placed = _place(font, chr(code))
            for k in range(renders_per_face):
                rng = np.random.default_rng([int(seed), code, face, k])
                out[i] = _downsample(_jitter(placed, rng))
                i += 1
    return out


# --------------------------------------------------------------------------- #
# the dataset
# --------------------------------------------------------------------------- #
def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def glyphs_key(fonts: Sequence[str], num_classes: int, renders_per_face: int, seed: int) -> str:
    """The cache key: font contents, every rendering parameter and the
    versions of what draws the glyphs and classifies the code points."""
    import PIL
    from PIL import features

    return cache.key_of(
        {
            "kind": "glyphs",
            "format": _FORMAT,
            "fonts": [_file_sha256(p) for p in fonts],
            "num_classes": num_classes,
            "renders_per_face": renders_per_face,
            "seed": seed,
            "image": [IMAGE_SIZE, SUPERSAMPLE, FONT_SIZE, BASELINE, MARGIN],
            "jitter": [MAX_ROTATION, list(SCALE_RANGE), MAX_SHIFT],
            "visible": VISIBLE_LEVEL,
            "pillow": PIL.__version__,
            "freetype": features.version("freetype2"),
            "unicode": unicodedata.unidata_version,
        }
    )


def load_glyphs(
    num_classes: int = DEFAULT_NUM_CLASSES,
    renders_per_face: int = DEFAULT_RENDERS_PER_FACE,
    seed: int = 0,
    fonts: Optional[Sequence[str]] = None,
    cache_dir: Optional[str] = None,
) -> Glyphs:
    """The glyphs task with the first ``num_classes`` classes,
    ``renders_per_face`` jittered renders of each class in each face.

    seed: the jitter draw; the task depends only on it (as synthetic_seed).
    fonts: font files (default: matplotlib's 12 DejaVu text faces).
    cache_dir: see data/cache.py.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"--num-classes must be an integer >= 2, got {num_classes!r}")
    if not isinstance(renders_per_face, int) or renders_per_face < 1:
        raise ValueError(f"renders_per_face must be an integer >= 1, got {renders_per_face!r}")
    fonts = _check_fonts(default_fonts() if fonts is None else list(fonts))
    path = os.path.join(
        cache.cache_dir(cache_dir),
        "glyphs",
        f"glyphs-{glyphs_key(fonts, num_classes, renders_per_face, seed)}.npz",
    )
    if os.path.isfile(path):
        arrays = cache.load_arrays(path)
    else:
        chosen = select_classes(fonts, num_classes)
        arrays = {
            "images": render(fonts, chosen, renders_per_face, seed),
            "code_points": np.asarray(chosen, dtype=np.int64),
        }
        cache.save_arrays(path, **arrays)
    codes = tuple(int(c) for c in arrays["code_points"])
    per_class = len(fonts) * renders_per_face
    y = torch.arange(len(codes)).repeat_interleave(per_class)
    faces = torch.arange(len(fonts)).repeat_interleave(renders_per_face).repeat(len(codes))
    x = torch.from_numpy(arrays["images"].astype(np.float32) / 255.0).unsqueeze(1)
    names = tuple(os.path.splitext(os.path.basename(p))[0] for p in fonts)
    return Glyphs(x, y, faces, codes, names, renders_per_face, seed)


def _from_config(cfg) -> Dataset:
    fonts = getattr(cfg, "fonts", None)
    return load_glyphs(
        cfg.num_classes,
        getattr(cfg, "renders_per_face", DEFAULT_RENDERS_PER_FACE),
        fonts=list(fonts) if fonts else None,
        cache_dir=getattr(cfg, "cache_dir", None),
    ).dataset()


# Characters rendered from matplotlib's DejaVu fonts. Registered here rather
# than in datasets.py, which this module imports: no import cycle.
DATASETS["glyphs"] = _from_config
