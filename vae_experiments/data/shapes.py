"""Images with known factors of variation: dSprites-like sprites rendered on a grid of factor
values, or the real dSprites / 3D Shapes files (:mod:`vae_experiments.data.factor_files`).

The rendered set has every combination of the configured values of five factors, once each, in
C order (the last factor, ``y``, varies fastest), as dSprites does: ``shape`` (square, ellipse,
heart), ``scale``, ``orientation``, ``x`` and ``y``. Each image is 64x64, one channel, 0 or 255:
a pixel is on when its centre lies inside the sprite. Nothing is random, so the same grid gives
the same images on every machine; ``split_seed`` carves the splits.

A split's labels are int64 (N, F): the index of each factor's value (``labels[i, f]`` indexes
``factor_values[f]``); :attr:`Shapes.factor_names` and :attr:`Shapes.factor_sizes` say what the
columns are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vae_experiments.data.cache import ensure_array
from vae_experiments.data.checks import as_path, split_size
from vae_experiments.data.factor_files import DSPRITES_FACTORS, FactorFile, open_factor_file
from vae_experiments.data.source import ImageSource
from vae_experiments.data.splits import carve
from vae_experiments.targets import ConfigError

log = logging.getLogger(__name__)

#: Side of the rendered images in pixels.
IMAGE_SIZE = 64
#: The factors of the rendered images, in label-column order: dSprites' (without its colour).
FACTOR_NAMES = DSPRITES_FACTORS
SHAPE_NAMES = ("square", "ellipse", "heart")
#: Radius of the circle that holds a sprite of scale 1 (and so any turn of it), as a fraction
#: of the image side: 10 pixels at 64x64.
SPRITE_RADIUS = 0.16
#: Where x = 0 and x = 1 put a sprite's centre (fractions of the side): a sprite of scale 1
#: touches the border there but is never cut.
POSITION_RANGE = (SPRITE_RADIUS + 0.5 / IMAGE_SIZE, 1 - SPRITE_RADIUS - 0.5 / IMAGE_SIZE)
#: What a count of scales spans (dSprites': 0.5 to 1).
SCALE_RANGE = (0.5, 1.0)
#: Bumped when the drawing changes, so that caches of the old drawing are not used.
RENDER_VERSION = 1
#: Images drawn per chunk, to bound the float32 memory of the coordinates.
_CHUNK = 2048
#: What ``data.source.cache=false`` does instead of caching.
NO_CACHE = "to render (or read) the images into memory at every start instead"


def grid_values(name: str, spec: int | Sequence[Any]) -> tuple[Any, ...]:
    """The values a rendered factor takes: ``spec`` is a count (evenly spaced values) or the
    values themselves.

    - ``shape``: a count 1..3 takes the first shapes of square, ellipse, heart; or names.
    - ``scale``: a count spans 0.5 to 1 (one: 1); or values in (0, 1], 1 the largest sprite.
    - ``orientation``: a count turns by 360/count degrees from 0; or angles in degrees. As in
      dSprites, a square turned by 90 degrees (an ellipse by 180) looks the same: an odd count
      keeps every image different.
    - ``x``, ``y``: a count spans 0 (left, top) to 1 (one: 0.5, the middle); or values in
      [0, 1].

    Raises:
        ConfigError: about ``factors.<name>``: not a count >= 1 nor a list of distinct
            allowed values.
    """
    key = f"factors.{name}"
    if isinstance(spec, int) and not isinstance(spec, bool):
        values = _counted(name, spec, key)
    elif isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) > 0:
        values = _listed(name, list(spec), key)
    else:
        raise ConfigError(key, spec, f"must be a count >= 1 or a list of values ({_rule(name)})")
    if len(set(values)) != len(values):
        raise ConfigError(key, list(spec), "must not repeat a value (two labels, one image)")
    return values


def _rule(name: str) -> str:
    return {
        "shape": f"names of {', '.join(SHAPE_NAMES)}",
        "scale": "numbers in (0, 1]",
        "orientation": "angles in degrees",
        "x": "numbers in [0, 1]",
        "y": "numbers in [0, 1]",
    }[name]


def _counted(name: str, count: int, key: str) -> tuple[Any, ...]:
    limit = len(SHAPE_NAMES) if name == "shape" else None
    if count < 1 or (limit is not None and count > limit):
        allowed = f"between 1 and {limit}" if limit else ">= 1"
        raise ConfigError(key, count, f"a count must be {allowed} (or give a list: {_rule(name)})")
    if name == "shape":
        return SHAPE_NAMES[:count]
    if name == "orientation":
        return tuple(360.0 * k / count for k in range(count))
    low, high = SCALE_RANGE if name == "scale" else (0.0, 1.0)
    if count == 1:
        return (high if name == "scale" else 0.5,)
    return tuple(float(v) for v in np.linspace(low, high, count))


def _listed(name: str, values: list[Any], key: str) -> tuple[Any, ...]:
    if name == "shape":
        if not all(isinstance(v, str) and v in SHAPE_NAMES for v in values):
            raise ConfigError(key, values, f"must list names of {', '.join(SHAPE_NAMES)}")
        return tuple(values)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ConfigError(key, values, f"must list {_rule(name)}")
    values = [float(v) for v in values]
    if name == "orientation":
        fits = all(math.isfinite(v) for v in values)
    elif name == "scale":
        fits = all(0 < v <= 1 for v in values)
    else:
        fits = all(0 <= v <= 1 for v in values)
    if not fits:
        raise ConfigError(key, values, f"must list {_rule(name)}")
    return tuple(values)


def enumerate_grid(sizes: Sequence[int]) -> Tensor:
    """Every combination of factor indices, int64 (prod(sizes), F), in C order (the last
    factor varies fastest), as dSprites' ``latents_classes``."""
    axes = [torch.arange(size) for size in sizes]
    return torch.cartesian_prod(*axes).reshape(-1, len(sizes))


def _inside(shape: int, u: Tensor, v: Tensor) -> Tensor:
    """Whether points (u, v) in a sprite's own frame (unit circle, v up) are inside shape
    ``shape`` (an index into :data:`SHAPE_NAMES`)."""
    if shape == 0:  # square with its corners on the circle
        return torch.maximum(u.abs(), v.abs()) <= 1 / math.sqrt(2)
    if shape == 1:  # ellipse twice as long as wide
        return u.square() + (2 * v).square() <= 1
    # heart: (x^2 + y^2 - 1)^3 <= x^2 y^3, pointing down; shrunk by 1.4 and moved by 0.3 it
    # fits in the circle (0.93 at most) with its centre of mass at the origin, so that turning
    # it leaves it where it is.
    x, y = 1.4 * u, 1.4 * v + 0.3
    return (x.square() + y.square() - 1).pow(3) <= x.square() * y.pow(3)


def render(shapes: Tensor, scales: Tensor, orientations: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """Draws one sprite per row of the factor values (each (N,)): uint8 images (N, 1, 64, 64),
    255 where a pixel's centre lies inside the sprite, else 0.

    Args:
        shapes: int64 indices into :data:`SHAPE_NAMES`.
        scales: sizes in (0, 1] (1: a sprite that fills a circle of :data:`SPRITE_RADIUS`).
        orientations: anticlockwise turns in degrees.
        xs, ys: positions in [0, 1] (0: left, top), spanning :data:`POSITION_RANGE`.
    """
    n = len(shapes)
    out = torch.zeros(n, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    centres = (torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5) / IMAGE_SIZE  # (W,)
    low, high = POSITION_RANGE
    for start in range(0, n, _CHUNK):
        rows = slice(start, min(n, start + _CHUNK))
        radius = (SPRITE_RADIUS * scales[rows].float())[:, None, None]  # (B, 1, 1)
        cx = (low + (high - low) * xs[rows].float())[:, None, None]
        cy = (low + (high - low) * ys[rows].float())[:, None, None]
        dx = (centres[None, None, :] - cx) / radius  # (B, 1, W)
        dy = (cy - centres[None, :, None]) / radius  # (B, H, 1): v points up
        angle = torch.deg2rad(orientations[rows].double()).float()[:, None, None]
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Into the sprite's frame: turn the offsets back by its orientation. (B, H, W) each.
        u = dx * cos + dy * sin
        v = dy * cos - dx * sin
        inside = torch.zeros(u.shape, dtype=torch.bool)
        for shape in range(len(SHAPE_NAMES)):
            which = shapes[rows] == shape  # (B,)
            if bool(which.any()):
                inside[which] = _inside(shape, u[which], v[which])
        out[rows, 0] = inside.to(torch.uint8) * 255
    return out


def render_grid(values: Sequence[Sequence[Any]], indices: Tensor) -> Tensor:
    """The images (N, 1, 64, 64) of factor indices (N, 5) into ``values`` (one tuple of values
    per factor of :data:`FACTOR_NAMES`)."""
    shape_index = torch.tensor([SHAPE_NAMES.index(s) for s in values[0]])[indices[:, 0]]
    numbers = [
        torch.tensor(values[f], dtype=torch.float64)[indices[:, f]]
        for f in range(1, len(FACTOR_NAMES))
    ]
    return render(shape_index, *numbers)


class Shapes(ImageSource):
    """Images with known factors: rendered dSprites-like sprites on a grid (``path`` null), or
    the real dSprites ``.npz`` / 3D Shapes ``.h5`` at ``path``; test carved first, then val from
    the rest, with ``split_seed``.

    Args:
        factors: The rendered grid: per factor of :data:`FACTOR_NAMES`, a count of evenly
            spaced values or the list of values (see :func:`grid_values`). Unused with a
            ``path``.
        path: A dSprites ``.npz`` or 3D Shapes ``.h5`` file to read instead of rendering.
        keep: A subset of the file's factor values, per factor name: a count (evenly spaced
            among its values) or a list of value indices; factors left out keep every value.
            Only with a ``path``; null (or empty) keeps every image.
        test_size: Test images: an int count, or a float fraction of all images.
        val_size: Validation images: an int count, or a float fraction of the non-test images.
        cache: Keep the images in a memory-mapped array in ``cache_dir``, made once (true), or
            render / read them into memory at every start (false).
        cache_dir: Folder of the cached arrays; safe to delete at any time.
    """

    def __init__(
        self,
        factors: Mapping[str, Any],
        path: str | os.PathLike[str] | None,
        keep: Mapping[str, Any] | None,
        test_size: int | float,
        val_size: int | float,
        cache: bool,
        cache_dir: str | os.PathLike[str],
    ) -> None:
        self.test_size = split_size("test_size", test_size)
        self.val_size = split_size("val_size", val_size)
        self.cache = cache
        self.cache_dir = as_path("cache_dir", cache_dir)
        self.path = None if path is None else as_path("path", path)
        keep = dict(keep or {})
        if self.path is None:
            if keep:
                raise ConfigError(
                    "keep",
                    _plain(keep),
                    "subsets the factors of a file (data.source.path); the rendered grid is "
                    "data.source.factors",
                )
            self.file: FactorFile | None = None
            self.values = self._rendered_values(factors)
        else:
            self.file = open_factor_file(self.path, _plain(keep))
            self.values = None
        self._array: Tensor | None = None  # the images, once made or mapped

    @staticmethod
    def _rendered_values(factors: Mapping[str, Any]) -> tuple[tuple[Any, ...], ...]:
        if not isinstance(factors, Mapping):
            raise ConfigError(
                "factors",
                factors,
                f"must map each of {', '.join(FACTOR_NAMES)} to a count or a list of values",
            )
        given = {str(k): _plain(v) for k, v in factors.items()}
        unknown = sorted(set(given) - set(FACTOR_NAMES))
        missing = [name for name in FACTOR_NAMES if name not in given]
        if unknown or missing:
            problem = f"has no factor {', '.join(unknown)}" if unknown else ""
            if missing:
                problem += ("; " if problem else "") + f"lacks {', '.join(missing)}"
            raise ConfigError(
                "factors",
                allowed=f"{problem}: the rendered factors are {', '.join(FACTOR_NAMES)}",
            )
        return tuple(grid_values(name, given[name]) for name in FACTOR_NAMES)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.file is not None:
            return self.file.image_shape
        return (1, IMAGE_SIZE, IMAGE_SIZE)

    @property
    def factor_names(self) -> tuple[str, ...]:
        if self.file is not None:
            return self.file.factor_names
        return FACTOR_NAMES

    @property
    def factor_sizes(self) -> tuple[int, ...]:
        """Values per factor; a file's are read from its labels (not its images)."""
        if self.file is not None:
            return self.file.factor_sizes
        return tuple(len(v) for v in self.values)

    @property
    def factor_values(self) -> tuple[tuple[Any, ...], ...] | None:
        """The rendered factors' values (shape names, scales, angles in degrees, positions),
        which the labels index; None for a file."""
        return self.values

    def carved_sizes(self) -> dict[str, int | float]:
        return {"test_size": self.test_size, "val_size": self.val_size}

    def prepare(self, split_seed: int, threads: int) -> None:
        if self.cache:
            self._images()

    def load(self, split_seed: int, threads: int) -> dict[str, Dataset]:
        images = self._images()
        labels = self.file.labels() if self.file is not None else enumerate_grid(self.factor_sizes)
        return carve(images, labels, {"test": self.test_size, "val": self.val_size}, split_seed)

    def _images(self) -> Tensor:
        """Every image (N, C, H, W) in label order: from the cache, made first if need be."""
        if self._array is None:
            self._array = self._make_images()
        return self._array

    def _make_images(self) -> Tensor:
        if self.file is not None:
            meta, fill = self.file.cache_meta(), self.file.read_images
            name = f"{self.file.kind}-{self.path.stem}"
        else:
            grid = [list(v) for v in self.values]
            meta = {"renderer": RENDER_VERSION, "image_size": IMAGE_SIZE, "factors": grid}
            name = "shapes"

            def fill(out: np.ndarray) -> None:
                indices = enumerate_grid(self.factor_sizes)
                for start in range(0, len(indices), 16 * _CHUNK):
                    rows = indices[start : start + 16 * _CHUNK]
                    out[start : start + len(rows)] = render_grid(self.values, rows).numpy()

        shape = (self.num_images, *self.image_shape)
        if not self.cache:
            out = np.empty(shape, dtype=np.uint8)
            fill(out)
            return torch.from_numpy(out)
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        npy = Path(self.cache_dir) / f"{name}-{shape[0]}-{key}.npy"
        return ensure_array(npy, meta, shape, fill, NO_CACHE)

    @property
    def num_images(self) -> int:
        """Images of the whole set, before the splits."""
        if self.file is not None:
            return self.file.num_images
        return math.prod(self.factor_sizes)


def _plain(value: Any) -> Any:
    """A config value (OmegaConf containers included) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value
