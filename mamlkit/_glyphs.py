r"""An Omniglot-shaped few-shot benchmark rendered offline from the fonts matplotlib ships.

Omniglot (Lake et al. 2015) has 1 623 handwritten characters from 50 alphabets, 20 drawers
each; MAML's classification experiments split it by alphabet. Every MAML library downloads it at
run time. This family needs no download: its characters are the letters (and Braille patterns)
of 16 scripts in the DejaVu, STIX and Computer Modern fonts inside matplotlib — scripts play the
alphabets, characters the classes, and the font faces that draw a character (regular, bold,
oblique, serif, mono …) together with a random affine distortion per image play the drawers
(prior art: OmniPrint, Sun et al. 2021; Synbols, Lacoste et al. 2020).

Construction (deterministic; nothing random until sampling):

1. candidates: every code point of DejaVu Sans that is an uppercase, lowercase or other letter
   (or a Braille pattern) with no Unicode decomposition (so no accented or presentation-form
   variant of another letter), named in one of :data:`SCRIPTS`;
2. each candidate is rendered in every face that has a glyph for it (a glyph index of 0 is the
   missing-glyph box), cropped to its ink, scaled to fit 24 × 24 and centred on 28 × 28;
   faces whose rendering is blank, or equal to that face's missing-glyph box, are dropped;
3. a character is removed when its regular rendering is blank or nearly identical (mean absolute
   difference < 0.04) to a character kept before it — scripts are processed in the order
   meta-train, meta-val, meta-test, so a look-alike across scripts (Latin A, Greek Α, Cyrillic
   А) stays only in the earliest split and cannot leak into a later one;
4. splits by script (:data:`SPLITS`), disjoint in characters.

A task (N-way, K-shot, Q queries) draws N characters of a split, labels them 0 … N−1 in random
order, and for each draws K + Q images: a random face of that character and a random rotation
(±10°), scale (0.85–1.1), shear (±0.15) and shift (±2 px), applied to the whole meta-batch at
once by ``affine_grid``/``grid_sample``. Images are 1 × 28 × 28, ink 1 on background 0.

Rendering takes a few seconds; the result is kept in memory and in
``$MAMLKIT_CACHE_DIR/glyphs-<hash>.pt`` (see :func:`mamlkit._files.cache_dir`); delete the
file (or call :func:`glyph_bank` with ``rebuild=True``) to render again.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_positive_int
from ._files import cache_dir, save_torch

SIZE = 28
SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("LATIN", "CANADIAN", "CYRILLIC", "BRAILLE", "ARABIC"),
    "val": ("GREEK", "HEBREW", "OLD", "COPTIC"),
    "test": ("GEORGIAN", "ARMENIAN", "TIFINAGH", "LISU", "LAO", "NKO", "OGHAM"),
}
"""Scripts (the first word of a character's Unicode name) of each split."""
SCRIPTS = tuple(s for names in SPLITS.values() for s in names)
FACES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmb10.ttf",
    "cmti10.ttf",
)
"""The font faces (the "drawers"); the first is the regular rendering used for de-duplication."""
DUPLICATE = 0.04
RENDER_VERSION = 1


class GlyphBank(NamedTuple):
    """Every rendering, grouped by character.

    Attributes:
        images: (R, 28, 28) uint8 renderings (ink 255).
        char_start: (C + 1,) offsets: character c's renderings are images[start[c]:start[c+1]].
        codepoints: (C,) the characters' code points.
        scripts: the script of each character.
        faces: (R,) the face index (into :data:`FACES`) of each rendering.
    """

    images: Tensor
    char_start: Tensor
    codepoints: Tensor
    scripts: tuple[str, ...]
    faces: Tensor

    def split(self, name: str) -> Tensor:
        """The character indices of a split (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {name!r}")
        wanted = set(SPLITS[name])
        return torch.tensor(
            [i for i, s in enumerate(self.scripts) if s in wanted], dtype=torch.long
        )


def _fonts_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _script(cp: int) -> str | None:
    ch = chr(cp)
    category = unicodedata.category(ch)
    braille = 0x2801 <= cp <= 0x28FF
    if not (category in ("Lu", "Ll", "Lo") or braille) or unicodedata.decomposition(ch):
        return None
    try:
        script = unicodedata.name(ch).split()[0]
    except ValueError:
        return None
    return script if script in SCRIPTS else None


def _fit(ink: Tensor) -> Tensor | None:
    """Crop a rendering to its ink, scale it to fit 24 × 24 (aspect kept), centre on 28 × 28."""
    rows, cols = torch.nonzero(ink > 0.02, as_tuple=True)
    if rows.numel() < 4:
        return None
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = crop.shape
    scale = 24 / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    small = F.interpolate(
        crop[None, None],
        size=(new_h, new_w),
        mode="area" if scale < 1 else "bilinear",
        align_corners=None if scale < 1 else False,
    )[0, 0]
    canvas = torch.zeros(SIZE, SIZE)
    top, left = (SIZE - new_h) // 2, (SIZE - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = small
    return canvas.clamp(0, 1)


def _render(font: object, cp: int) -> Tensor | None:
    from matplotlib.ft2font import LoadFlags

    font.set_size(48, 72)
    font.set_text(chr(cp), 0.0, flags=LoadFlags.NO_HINTING)
    font.draw_glyphs_to_bitmap(antialiased=True)
    image = torch.from_numpy(font.get_image().copy()).float() / 255
    return _fit(image) if image.numel() else None


def _build() -> GlyphBank:
    with warnings.catch_warnings():  # FreeType's "glyph missing" notes for the probe code points
        warnings.simplefilter("ignore")
        return _render_all()


def _render_all() -> GlyphBank:
    from matplotlib.ft2font import FT2Font

    folder = _fonts_dir()
    fonts = [FT2Font(str(folder / name)) for name in FACES]
    charmaps = [set(f.get_charmap()) for f in fonts]
    notdef = []
    for f in fonts:  # each face's missing-glyph box (rendered for a code point it lacks)
        missing = next(cp for cp in range(0xE000, 0xF8FF) if f.get_char_index(cp) == 0)
        notdef.append(_render(f, missing))
    candidates = sorted((SCRIPTS.index(s), cp, s) for cp in charmaps[0] if (s := _script(cp)))
    kept_regular: list[Tensor] = []
    images, starts, codepoints, scripts, faces = [], [0], [], [], []
    for _, cp, script in candidates:
        regular = _render(fonts[0], cp)
        if regular is None:
            continue
        if kept_regular:
            distance = (torch.stack(kept_regular) - regular).abs().mean((1, 2))
            if distance.min() < DUPLICATE:
                continue
        renders = []
        for index, (font, charmap) in enumerate(zip(fonts, charmaps)):
            if cp not in charmap or font.get_char_index(cp) == 0:
                continue
            image = regular if index == 0 else _render(font, cp)
            if image is None or (
                notdef[index] is not None and (image - notdef[index]).abs().mean() < 0.01
            ):
                continue
            renders.append((index, image))
        kept_regular.append(regular)
        for index, image in renders:
            images.append((image * 255).round().to(torch.uint8))
            faces.append(index)
        starts.append(len(images))
        codepoints.append(cp)
        scripts.append(script)
    return GlyphBank(
        torch.stack(images),
        torch.tensor(starts),
        torch.tensor(codepoints),
        tuple(scripts),
        torch.tensor(faces),
    )


def _cache_path() -> Path:
    import matplotlib

    key = hashlib.sha256(
        f"{RENDER_VERSION}|{matplotlib.__version__}|{FACES}|{SPLITS}|{DUPLICATE}"
        f"|{unicodedata.unidata_version}".encode()
    ).hexdigest()[:16]
    return cache_dir() / f"glyphs-{key}.pt"


@lru_cache(maxsize=1)
def _bank_in_memory() -> GlyphBank:
    path = _cache_path()
    if path.is_file():
        try:
            record = torch.load(path, weights_only=True)
            return GlyphBank(
                record["images"],
                record["char_start"],
                record["codepoints"],
                tuple(record["scripts"]),
                record["faces"],
            )
        except Exception:  # a damaged cache is rebuilt, never trusted
            path.unlink(missing_ok=True)
    bank = _build()
    save_torch(
        path,
        {
            "images": bank.images,
            "char_start": bank.char_start,
            "codepoints": bank.codepoints,
            "scripts": list(bank.scripts),
            "faces": bank.faces,
        },
    )
    return bank


def glyph_bank(*, rebuild: bool = False) -> GlyphBank:
    """The rendered characters (from memory, the disk cache, or rendered now); ``rebuild=True``
    renders them again and replaces the cached file."""
    if rebuild:
        _cache_path().unlink(missing_ok=True)
        _bank_in_memory.cache_clear()
    return _bank_in_memory()


class GlyphTasks(NamedTuple):
    """A meta-batch of N-way classification tasks.

    Attributes:
        support: ``(x, y)``: x (T, N·K, 1, 28, 28) float, y (T, N·K) int64 labels 0 … N−1.
        query: ``(x, y)``: x (T, N·Q, 1, 28, 28), y (T, N·Q).
        classes: (T, N) the character index behind each label.
    """

    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]
    classes: Tensor


def _distort(images: Tensor, generator: torch.Generator) -> Tensor:
    """A random affine map per image (rotation, scale, shear, shift), all at once."""
    n = images.shape[0]

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

    angle = uniform(-10, 10) * math.pi / 180
    scale, shear = uniform(0.85, 1.1), uniform(-0.15, 0.15)
    shift_x, shift_y = uniform(-1, 1) * 2 / 14, uniform(-1, 1) * 2 / 14  # ±2 px of 28
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # output → input coordinates
    theta = torch.stack(
        [
            torch.stack([cos, -sin + shear * cos, shift_x], -1),
            torch.stack([sin, cos + shear * sin, shift_y], -1),
        ],
        1,
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class GlyphFamily:
    """N-way K-shot tasks on one split of the glyph bank, as ``sample_tasks(num_tasks, *, generator,
    dtype)`` for :func:`mamlkit.train.meta_train`.

    Example:
        >>> family = GlyphFamily(ways=5, shots=1, queries=2, split="test")
        >>> t = family(3, generator=torch.Generator().manual_seed(0))
        >>> tuple(t.support[0].shape), tuple(t.query[1].shape), t.support[1].dtype
        ((3, 5, 1, 28, 28), (3, 10), torch.int64)
    """

    ways: int = 5
    shots: int = 1
    queries: int = 5
    split: str = "train"

    def __post_init__(self) -> None:
        for name in ("ways", "shots", "queries"):
            check_positive_int(getattr(self, name), name)
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {self.split!r}")

    def __call__(
        self, num_tasks: int, *, generator: torch.Generator, dtype: torch.dtype | None = None
    ) -> GlyphTasks:
        num_tasks = check_positive_int(num_tasks, "num_tasks")
        dtype = dtype or torch.get_default_dtype()
        bank = glyph_bank()
        chars = bank.split(self.split)
        if self.ways > chars.numel():
            raise ValueError(
                f"ways={self.ways} exceeds the {chars.numel()} characters of split {self.split!r}"
            )
        # draw order (fixed): classes (T, N), labels' order (T, N), renderings (T, N, K+Q),
        # distortions
        classes = torch.argsort(torch.rand(num_tasks, chars.numel(), generator=generator), 1)[
            :, : self.ways
        ]
        classes = chars[classes]
        per = self.shots + self.queries
        start, count = (
            bank.char_start[classes],
            bank.char_start[classes + 1] - bank.char_start[classes],
        )
        pick = (
            torch.rand(num_tasks, self.ways, per, generator=generator) * count.unsqueeze(-1)
        ).long()
        index = start.unsqueeze(-1) + pick  # (T, N, K+Q) renderings
        images = bank.images[index.reshape(-1)].to(dtype).div_(255).unsqueeze(1)
        images = _distort(images, generator).reshape(num_tasks, self.ways, per, 1, SIZE, SIZE)
        labels = (
            torch.arange(self.ways).expand(num_tasks, self.ways).unsqueeze(-1).expand(-1, -1, per)
        )

        def part(sl: slice) -> tuple[Tensor, Tensor]:
            x = images[:, :, sl].reshape(num_tasks, -1, 1, SIZE, SIZE).contiguous()
            return x, labels[:, :, sl].reshape(num_tasks, -1).contiguous()

        return GlyphTasks(part(slice(0, self.shots)), part(slice(self.shots, per)), classes)


def conv_net(ways: int = 5, channels: int = 32, seed: int = 0) -> torch.nn.Module:
    """The MAML paper's Omniglot network: 4 × [3×3 convolution with stride 2, BatchNorm, ReLU],
    then a linear layer on the flattened 2 × 2 maps (28 → 14 → 7 → 4 → 2). The paper uses 64
    channels; ``channels`` narrows it for a CPU. Initialised from ``seed`` (the global RNG is
    restored afterwards).

    Example:
        >>> net = conv_net(ways=5, channels=8)
        >>> net(torch.zeros(3, 1, 28, 28)).shape
        torch.Size([3, 5])
    """
    check_positive_int(ways, "ways")
    check_positive_int(channels, "channels")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[torch.nn.Module] = []
        inputs = 1
        for _ in range(4):
            layers += [
                torch.nn.Conv2d(inputs, channels, 3, stride=2, padding=1),
                torch.nn.BatchNorm2d(channels),
                torch.nn.ReLU(),
            ]
            inputs = channels
        net = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(4 * channels, ways))
    finally:
        torch.random.set_rng_state(state)
    return net


__all__ = ["FACES", "SPLITS", "GlyphBank", "GlyphFamily", "GlyphTasks", "conv_net", "glyph_bank"]
