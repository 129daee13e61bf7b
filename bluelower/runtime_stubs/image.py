"""The image side of BlueLM-V: grid selection (dynamic resolution) and preprocessing.

Pure Python + numpy; no TVM. Everything here is specified precisely enough for the
native (C++) runtime to repeat it bit for bit, see ``docs/image-preprocessing.md``.

Conventions used throughout:

* sizes are ``(width, height)``; a grid ``(m, n)`` is *m patches wide, n patches high*
  (the paper's ``m:n``), so a 2:4 grid covers 768x1536 pixels at 384 per patch;
* images are ``numpy.uint8`` arrays ``[H, W, 3]`` in RGB order;
* preprocessed patches are ``numpy.float32`` ``[k, 3, S, S]``: the ``m*n`` local patches
  in row-major order (top row first, left to right), then the global thumbnail last
  (only when ``m*n > 1``).

Grid policies (all choose among the same candidate set, :func:`candidate_grids`):

* ``relaxed``  -- BlueLM-V-3B's relaxed aspect-ratio matching (:func:`relaxed_aspect_ratio_grid`);
* ``anyres``   -- LLaVA-NeXT AnyRes ``select_best_resolution`` (:func:`anyres_grid`);
* ``internvl`` -- InternVL-1.5 ``dynamic_preprocess`` / ``find_closest_aspect_ratio``
  (:func:`internvl_grid`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..errors import BlueLowerError

IMAGE_SIZE = 384
"""Side of one SigLIP patch in pixels (the paper's base resolution)."""

TOKENS_PER_PATCH = 196
"""Image tokens per 384x384 patch after the 2x2 token downsampler (729 -> 196)."""

DEFAULT_MAX_PATCHES = 9
DEFAULT_ALPHA = 0.1
POLICIES = ("relaxed", "anyres", "internvl")
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)

# ---------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise BlueLowerError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_size(width, height) -> tuple[int, int]:
    return _check_positive_int("image width", width), _check_positive_int("image height", height)


def _check_grid(grid) -> tuple[int, int]:
    try:
        m, n = grid
    except (TypeError, ValueError):
        raise BlueLowerError(f"grid must be a pair (m, n), got {grid!r}") from None
    return _check_positive_int("grid width m", m), _check_positive_int("grid height n", n)


# ---------------------------------------------------------------------------------------
# candidate grids and aspect-preserving fit
# ---------------------------------------------------------------------------------------


def candidate_grids(max_patches: int, min_patches: int = 1) -> list[tuple[int, int]]:
    """All grids ``(m, n)`` with ``min_patches <= m*n <= max_patches``.

    Returned in ascending order of ``m*n``, then ascending ``m`` (so ``1:1, 1:2, 2:1,
    1:3, 3:1, 1:4, 2:2, 4:1, ...``). Every policy chooses from this set; with
    ``max_patches=9`` it contains the paper's ablation grids 1:1..3:3 plus the long
    strips (4:1 ... 9:1, 4:2, ...).
    """
    max_patches = _check_positive_int("max_patches", max_patches)
    min_patches = _check_positive_int("min_patches", min_patches)
    grids = [
        (m, n)
        for m in range(1, max_patches + 1)
        for n in range(1, max_patches + 1)
        if min_patches <= m * n <= max_patches
    ]
    grids.sort(key=lambda g: (g[0] * g[1], g[0]))
    if not grids:
        raise BlueLowerError(f"no grid has between {min_patches} and {max_patches} patches")
    return grids


def fit_size(width: int, height: int, box_width: int, box_height: int) -> tuple[int, int]:
    """Size of a ``width x height`` image scaled (up or down) to fit ``box_width x box_height``.

    Aspect ratio is kept; exact integer arithmetic (no floating point), so a C++ runtime
    gets the same numbers:

    * if ``box_width * height <= box_height * width`` the width limits:
      ``(box_width, max(1, height * box_width // width))``;
    * otherwise the height limits: ``(max(1, width * box_height // height), box_height)``.
    """
    width, height = _check_size(width, height)
    box_width = _check_positive_int("box width", box_width)
    box_height = _check_positive_int("box height", box_height)
    if box_width * height <= box_height * width:
        return box_width, max(1, height * box_width // width)
    return max(1, width * box_height // height), box_height


# ---------------------------------------------------------------------------------------
# grid policies
# ---------------------------------------------------------------------------------------


def _candidates(max_patches, candidates) -> list[tuple[int, int]]:
    if candidates is None:
        return candidate_grids(max_patches)
    grids = [_check_grid(g) for g in candidates]
    if not grids:
        raise BlueLowerError("the candidate grid list is empty")
    return grids


def relaxed_aspect_ratio_grid(
    width: int,
    height: int,
    max_patches: int = DEFAULT_MAX_PATCHES,
    image_size: int = IMAGE_SIZE,
    alpha: float = DEFAULT_ALPHA,
    *,
    candidates: Iterable[tuple[int, int]] | None = None,
) -> tuple[int, int]:
    """BlueLM-V-3B's relaxed aspect-ratio matching; returns the grid ``(m, n)``.

    For each candidate grid, with ``(w', h') = fit_size(width, height, S*m, S*n)``
    (``S = image_size``):

    * effective resolution ``Re = min(w' * h', width * height)`` (capped at the original
      area, so enlarging an image earns nothing);
    * wasted resolution ``Rw = S*m * S*n - Re``.

    Candidates are visited from the largest grid down to 1:1: descending ``m*n``, and for
    equal ``m*n`` descending ``m`` (the reverse of :func:`candidate_grids`). Starting from
    ``Re_max = 0, Rw_min = inf``, a candidate replaces the current best when

    * ``Re - Re_max > alpha * Re_max``, or
    * ``(Re_max - Re) < alpha * Re_max and Rw < Rw_min``;

    on replacement ``Re_max := Re, Rw_min := Rw``. Because smaller grids come later, a
    smaller grid whose effective resolution is within ``alpha`` of the best (and wastes
    less) wins. Among grids with the same ``m*n``, only exact ties in ``Re`` depend on
    the order (the earlier one is kept); any strictly larger ``Re`` replaces regardless.

    ``candidates`` overrides the candidate set (default: all grids with
    ``m*n <= max_patches``); they are visited in the order above whatever order is given.
    """
    width, height = _check_size(width, height)
    image_size = _check_positive_int("image_size", image_size)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise BlueLowerError(f"alpha must be a finite number >= 0, got {alpha!r}")
    grids = sorted(_candidates(max_patches, candidates), key=lambda g: (g[0] * g[1], g[0]), reverse=True)
    original_area = width * height
    best = None
    re_max = 0
    rw_min = math.inf
    for m, n in grids:
        box_w, box_h = image_size * m, image_size * n
        fit_w, fit_h = fit_size(width, height, box_w, box_h)
        re = min(fit_w * fit_h, original_area)
        rw = box_w * box_h - re
        if re - re_max > alpha * re_max or ((re_max - re) < alpha * re_max and rw < rw_min):
            best, re_max, rw_min = (m, n), re, rw
    return best


def anyres_grid(
    width: int,
    height: int,
    max_patches: int = DEFAULT_MAX_PATCHES,
    image_size: int = IMAGE_SIZE,
    *,
    candidates: Iterable[tuple[int, int]] | None = None,
) -> tuple[int, int]:
    """LLaVA-NeXT AnyRes (``select_best_resolution``); returns the grid ``(m, n)``.

    A faithful port of LLaVA-NeXT's ``llava/mm_utils.py::select_best_resolution`` with
    possible resolutions ``(S*m, S*n)`` for the candidate grids, visited in
    :func:`candidate_grids` order (ascending ``m*n``, then ``m``)::

        scale = min(W_c / W, H_c / H)                       # Python floats
        w', h' = int(W * scale), int(H * scale)             # truncation, as upstream
        Re = min(w' * h', W * H); Rw = W_c * H_c - Re
        take it if Re > Re_max or (Re == Re_max and Rw < Rw_min)

    i.e. maximise effective resolution, then minimise waste; the earlier candidate wins
    exact ties. Upstream LLaVA-NeXT passes a fixed pinpoint list
    (``[[336,672],[672,336],[672,672],[1008,336],[336,1008]]`` for llava-v1.6); here the
    list is the paper's comparison set, every grid with ``m*n <= max_patches``
    (which contains the ablation grids 1:1..3:3).
    """
    width, height = _check_size(width, height)
    image_size = _check_positive_int("image_size", image_size)
    grids = _candidates(max_patches, candidates)
    best = None
    max_effective = 0
    min_wasted = float("inf")
    for m, n in grids:
        cand_w, cand_h = image_size * m, image_size * n
        scale = min(cand_w / width, cand_h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = cand_w * cand_h - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best = effective, wasted, (m, n)
    return best


def internvl_grid(
    width: int,
    height: int,
    max_patches: int = DEFAULT_MAX_PATCHES,
    image_size: int = IMAGE_SIZE,
    min_patches: int = 1,
    *,
    candidates: Iterable[tuple[int, int]] | None = None,
) -> tuple[int, int]:
    """InternVL-1.5 ``dynamic_preprocess`` grid choice; returns ``(m, n)``.

    A faithful port of ``find_closest_aspect_ratio``: with ``aspect = W / H``, visit the
    target ratios (all ``(i, j)`` with ``min_patches <= i*j <= max_patches``, built and
    sorted exactly as upstream: ``sorted(set(...), key=i*j)``), and keep the ratio with
    the smallest ``|aspect - i/j|``; on an exact tie the later ratio replaces the kept one
    iff ``W*H > 0.5 * S*S * i*j`` (the image is big enough to fill more than half of it).
    Note the rule only looks at aspect ratio, not at resolution: a tiny 380x76 image
    gets 5:1.
    """
    width, height = _check_size(width, height)
    image_size = _check_positive_int("image_size", image_size)
    if candidates is None:
        max_patches = _check_positive_int("max_patches", max_patches)
        min_patches = _check_positive_int("min_patches", min_patches)
        # Exactly upstream's construction (including CPython's set order for equal i*j).
        target_ratios = set(
            (i, j)
            for k in range(min_patches, max_patches + 1)
            for i in range(1, k + 1)
            for j in range(1, k + 1)
            if min_patches <= i * j <= max_patches
        )
        target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
        if not target_ratios:
            raise BlueLowerError(f"no grid has between {min_patches} and {max_patches} patches")
    else:
        target_ratios = _candidates(max_patches, candidates)
    aspect_ratio = width / height
    area = width * height
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return tuple(best_ratio)


_POLICY_FUNCS = {
    "relaxed": relaxed_aspect_ratio_grid,
    "anyres": anyres_grid,
    "internvl": internvl_grid,
}


def select_grid(
    width: int,
    height: int,
    policy: str = "relaxed",
    max_patches: int = DEFAULT_MAX_PATCHES,
    image_size: int = IMAGE_SIZE,
) -> tuple[int, int]:
    """Grid ``(m, n)`` for a ``width x height`` image under ``policy``.

    ``policy`` is one of :data:`POLICIES` (``relaxed`` is what BlueLM-V-3B uses);
    anything else raises :class:`BlueLowerError`.
    """
    func = _POLICY_FUNCS.get(policy) if isinstance(policy, str) else None
    if func is None:
        raise BlueLowerError(f"unknown grid policy {policy!r} (choose one of: {', '.join(POLICIES)})")
    return func(width, height, max_patches, image_size)


# ---------------------------------------------------------------------------------------
# patch / token counting
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchCount:
    """How many patches and image tokens a grid produces."""

    grid: tuple[int, int]
    local_patches: int
    global_thumbnail: bool
    total_patches: int
    image_tokens: int


def patch_count(grid, tokens_per_patch: int = TOKENS_PER_PATCH) -> PatchCount:
    """Patches and image tokens for ``grid = (m, n)``.

    ``local_patches = m*n``; a global thumbnail (the whole image squashed to SxS) is
    added iff ``m*n > 1`` -- a 1:1 grid's single local patch already shows the whole
    image, so a thumbnail would only repeat it (the same rule as InternVL's
    ``use_thumbnail``). ``image_tokens = (local_patches + thumbnail) * tokens_per_patch``.
    """
    m, n = _check_grid(grid)
    tokens_per_patch = _check_positive_int("tokens_per_patch", tokens_per_patch)
    local = m * n
    thumb = local > 1
    total = local + int(thumb)
    return PatchCount((m, n), local, thumb, total, total * tokens_per_patch)


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------

_PIL_FORMATS = {"PNG", "JPEG"}
_PIL_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}


# the largest image either runtime reads (native/loaders.cc: "image too large")
MAX_IMAGE_SIDE = 1 << 20
MAX_IMAGE_PIXELS = 1 << 28


def _check_pixels(width: int, height: int, what: str) -> None:
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise BlueLowerError(f"{what}: image too large ({width}x{height}; at most 2^20 pixels a side and 2^28 "
                             "pixels in all)")


def _check_image_array(arr, what: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise BlueLowerError(f"{what}: expected a numpy array, got {type(arr).__name__}")
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BlueLowerError(f"{what}: expected an array of shape [H, W, 3], got {list(arr.shape)}")
    _check_pixels(arr.shape[1], arr.shape[0], what)
    return arr


def _png_bit_depth(path: str) -> int:
    """The bit depth in a PNG's IHDR chunk (byte 24 of the file; 8 if it cannot be read)."""
    with open(path, "rb") as fh:
        head = fh.read(25)
    return head[24] if len(head) == 25 and head[12:16] == b"IHDR" else 8


def float_to_uint8(arr: np.ndarray) -> np.ndarray:
    """float32 ``[0, 1]`` -> uint8: ``floor(x * 255 + 0.5)`` evaluated in float32."""
    return np.floor(arr.astype(np.float32) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)


def load_image(path) -> np.ndarray:
    """Read an image file into a ``uint8 [H, W, 3]`` RGB array.

    * ``.npy`` (by file suffix): a uint8 ``[H, W, 3]`` array, returned as is; or a
      float32 ``[H, W, 3]`` array with every value in ``[0, 1]``, converted with
      :func:`float_to_uint8` (``floor(x * 255 + 0.5)`` in float32). No pickles.
    * anything else is decoded with Pillow and must be PNG or JPEG; the EXIF orientation
      tag is applied, then the image is converted to RGB (alpha is dropped, not
      composited; palette / grey / CMYK expanded by Pillow). 16-bit and float modes
      are refused.

    Any problem (missing file, unreadable or corrupt image, wrong shape or dtype) raises
    :class:`BlueLowerError` with one message naming the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise BlueLowerError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise BlueLowerError(f"image path is a directory, not a file: {path}")
    if path.lower().endswith(".npy"):
        return _load_npy(path)
    return _load_pil(path)


def _load_npy(path: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # ValueError, OSError, EOFError, UnpicklingError, ...
        raise BlueLowerError(f"cannot read .npy image {path}: {_one_line(exc)}") from None
    if not isinstance(arr, np.ndarray):
        raise BlueLowerError(f"cannot read .npy image {path}: not a single array")
    _check_image_array(arr, f"bad .npy image {path}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.float32:
        if not np.all(np.isfinite(arr)):
            raise BlueLowerError(f"bad .npy image {path}: float32 values must be finite")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise BlueLowerError(
                f"bad .npy image {path}: float32 values must lie in [0, 1], got [{lo:g}, {hi:g}]"
            )
        return float_to_uint8(arr)
    raise BlueLowerError(f"bad .npy image {path}: dtype must be uint8 or float32, got {arr.dtype}")


def _load_pil(path: str) -> np.ndarray:
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS // 2  # Pillow refuses above twice this: our limit, not its own
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # within our limit
            with Image.open(path) as im:
                fmt = im.format
                if fmt not in _PIL_FORMATS:
                    raise BlueLowerError(
                        f"unsupported image format {fmt} in {path} (supported: PNG, JPEG, .npy)"
                    )
                _check_pixels(*im.size, f"bad image {path}")
                if im.mode not in _PIL_MODES or (fmt == "PNG" and _png_bit_depth(path) > 8):
                    mode = im.mode if im.mode not in _PIL_MODES else f"{_png_bit_depth(path)}-bit {im.mode}"
                    raise BlueLowerError(
                        f"unsupported pixel mode {mode} in {path} (8-bit images only)"
                    )
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = im.convert("RGB")
                arr = np.asarray(rgb, dtype=np.uint8)
    except BlueLowerError:
        raise
    except UnidentifiedImageError:
        raise BlueLowerError(f"cannot read image {path}: not a PNG or JPEG file") from None
    except Image.DecompressionBombError:
        raise BlueLowerError(f"bad image {path}: image too large (more than 2^28 pixels)") from None
    except Exception as exc:  # OSError (truncated), SyntaxError, ...
        raise BlueLowerError(f"cannot read image {path}: {_one_line(exc)}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    return np.ascontiguousarray(_check_image_array(arr, f"bad image {path}"))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ---------------------------------------------------------------------------------------
# resizing (the exact procedure of docs/image-preprocessing.md)
# ---------------------------------------------------------------------------------------


def resize_weights(in_len: int, out_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps for resizing one axis from ``in_len`` to ``out_len`` samples.

    Returns ``(index int64 [out_len, K], weight float32 [out_len, K])``: output sample
    ``i`` is ``sum_k weight[i, k] * input[index[i, k]]``.

    Triangle (tent) filter, half-pixel centres, widened when shrinking (antialiasing);
    for enlarging it is exactly bilinear interpolation. In float64:

    * ``scale = in_len / out_len``; ``support = max(scale, 1.0)``; ``r = ceil(support)``;
      ``K = 2r + 1``;
    * ``center_i = (i + 0.5) * scale``; taps ``j = floor(center_i) - r + k``, ``k = 0..K-1``;
    * ``w = max(0, 1 - |(j + 0.5 - center_i) / support|)``;
    * ``w_k /= s`` with ``s = ((w_0 + w_1) + w_2) + ...`` summed left to right;
    * weights rounded to float32; indices clamped to ``[0, in_len - 1]`` (edge clamping).

    Tap columns whose weight is zero for every output are dropped (they are no-ops), so
    the returned ``K`` may be smaller than ``2r + 1``.
    """
    in_len = _check_positive_int("input length", in_len)
    out_len = _check_positive_int("output length", out_len)
    scale = in_len / out_len
    support = max(scale, 1.0)
    r = math.ceil(support)
    k = 2 * r + 1
    center = (np.arange(out_len, dtype=np.float64) + 0.5) * scale
    j = np.floor(center).astype(np.int64)[:, None] + np.arange(-r, r + 1, dtype=np.int64)[None, :]
    t = (j.astype(np.float64) + 0.5 - center[:, None]) / support
    w = np.maximum(0.0, 1.0 - np.abs(t))
    total = w[:, 0].copy()
    for col in range(1, k):  # explicit left-to-right sum (numpy's sum is pairwise)
        total = total + w[:, col]
    w = (w / total[:, None]).astype(np.float32)
    j = np.clip(j, 0, in_len - 1)
    # Zero-weight taps are no-ops (v + 0.0f * x == v for the finite, non-negative sums
    # here), so leading/trailing columns that are zero for every output are dropped.
    nonzero = np.flatnonzero(np.any(w != 0, axis=0))
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    return np.ascontiguousarray(j[:, lo:hi]), np.ascontiguousarray(w[:, lo:hi])


def resize_image(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a ``uint8 [H, W, 3]`` image to ``uint8 [height, width, 3]``.

    Separable, see :func:`resize_weights`; all pixel arithmetic in float32:

    1. vertical pass: ``v[y, x] = 0; for k: v[y, x] = v[y, x] + wy[y, k] * float(img[iy[y, k], x])``;
    2. horizontal pass on ``v`` likewise with ``wx, ix`` (``v`` is not rounded in between);
    3. ``out = clamp(floor(h + 0.5), 0, 255)`` as uint8.

    Each ``+`` and ``*`` is a separately rounded float32 operation (no fused
    multiply-add), so the result is reproducible bit for bit. Resizing to the same size
    returns a copy of the input (which the procedure yields exactly anyway).
    """
    img = _check_image_array(img, "resize_image")
    if img.dtype != np.uint8:
        raise BlueLowerError(f"resize_image: expected a uint8 image, got {img.dtype}")
    width = _check_positive_int("width", width)
    height = _check_positive_int("height", height)
    in_h, in_w = img.shape[:2]
    if (in_h, in_w) == (height, width):
        return img.copy()
    if in_h == height:
        vert = img.astype(np.float32)  # identity vertical pass (weights exactly 1.0)
    else:
        iy, wy = resize_weights(in_h, height)
        vert = np.zeros((height, in_w, 3), dtype=np.float32)
        buf = np.empty_like(vert)
        for k in range(wy.shape[1]):
            # uint8 * float32 -> float32; the uint8 -> float conversion is exact.
            np.multiply(wy[:, k, None, None], img[iy[:, k]], out=buf)
            vert += buf
    if in_w == width:
        out = vert
    else:
        ix, wx = resize_weights(in_w, width)
        out = np.zeros((height, width, 3), dtype=np.float32)
        buf = np.empty_like(out)
        for k in range(wx.shape[1]):
            np.multiply(wx[None, :, k, None], vert[:, ix[:, k]], out=buf)
            out += buf
    out = np.floor(out + np.float32(0.5))
    return np.clip(out, 0.0, 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------


def _norm_params(values, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise BlueLowerError(f"{name} must be 3 numbers, got {values!r}") from None
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise BlueLowerError(f"{name} must be 3 finite numbers, got {values!r}")
    return arr.astype(np.float32)


def normalize(img: np.ndarray, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> np.ndarray:
    """uint8 ``[..., 3]`` -> float32: ``(float32(x) / 255 - mean_c) / std_c`` in float32.

    ``mean`` and ``std`` are rounded to float32 first; three separately rounded float32
    operations in that order (divide, subtract, divide).
    """
    mean32 = _norm_params(mean, "mean")
    std32 = _norm_params(std, "std")
    if np.any(std32 == 0):
        raise BlueLowerError(f"std must not contain 0, got {std!r}")
    return (img.astype(np.float32) / np.float32(255.0) - mean32) / std32


def preprocess_image(
    img_uint8: np.ndarray,
    grid: tuple[int, int] | None = None,
    image_size: int = IMAGE_SIZE,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> np.ndarray:
    """Turn an RGB uint8 ``[H, W, 3]`` image into patches ``float32 [k, 3, S, S]``.

    * ``grid=None``: ``k = 1``, the whole image resized (squashed) to ``S x S``.
    * ``grid=(m, n)``: the image is resized keeping its aspect ratio to
      ``fit_size(W, H, S*m, S*n)``, placed at the top-left corner of an ``S*m x S*n``
      canvas whose remaining right/bottom area is padding with normalized value 0.0
      (i.e. exactly the mean colour), and cut into ``m*n`` local patches in row-major
      order (top row first, left to right: patch ``r*m + c`` is row ``r``, column
      ``c``). If ``m*n > 1`` a global thumbnail (the whole image squashed to ``S x S``)
      follows as the last patch, so ``k = m*n + 1``; a 1:1 grid gives ``k = 1``.

    Resizing is :func:`resize_image` (rounded to uint8), normalization :func:`normalize`.
    """
    img = _check_image_array(img_uint8, "preprocess_image")
    if img.dtype != np.uint8:
        raise BlueLowerError(f"preprocess_image: expected a uint8 image, got {img.dtype}")
    size = _check_positive_int("image_size", image_size)
    mean32 = _norm_params(mean, "mean")
    std32 = _norm_params(std, "std")
    if np.any(std32 == 0):
        raise BlueLowerError(f"std must not contain 0, got {std!r}")
    height, width = img.shape[:2]

    def _thumbnail() -> np.ndarray:
        return normalize(resize_image(img, size, size), mean32, std32)

    if grid is None:
        patches = _thumbnail()[None]  # [1, S, S, 3]
    else:
        m, n = _check_grid(grid)
        fit_w, fit_h = fit_size(width, height, size * m, size * n)
        canvas = np.zeros((size * n, size * m, 3), dtype=np.float32)
        canvas[:fit_h, :fit_w] = normalize(resize_image(img, fit_w, fit_h), mean32, std32)
        # [n*S, m*S, 3] -> [n, S, m, S, 3] -> [n, m, S, S, 3] -> [n*m, S, S, 3] (row-major)
        patches = canvas.reshape(n, size, m, size, 3).transpose(0, 2, 1, 3, 4).reshape(n * m, size, size, 3)
        if m * n > 1:
            patches = np.concatenate([patches, _thumbnail()[None]], axis=0)
    return np.ascontiguousarray(patches.transpose(0, 3, 1, 2), dtype=np.float32)


# ---------------------------------------------------------------------------------------
# CLI helpers
# ---------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"WxH"`` (e.g. ``1080x2400``) into ``(width, height)``; both >= 1."""
    match = _SIZE_RE.match(text or "")
    if not match:
        raise BlueLowerError(f"bad --size {text!r}: expected WxH with positive integers, e.g. 1080x2400")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1:
        raise BlueLowerError(f"bad --size {text!r}: width and height must be at least 1")
    return width, height


def inspect_image(
    path=None,
    size: str | tuple[int, int] | None = None,
    policy: str = "relaxed",
    max_patches: int = DEFAULT_MAX_PATCHES,
    tokens_per_patch: int = TOKENS_PER_PATCH,
) -> dict:
    """Grid and token accounting for an image file or a ``WxH`` size (exactly one).

    Returns a JSON-ready dict with keys ``size`` ([W, H]), ``policy``, ``max_patches``,
    ``grid`` ([m, n]), ``local_patches``, ``global_thumbnail``, ``total_patches``,
    ``image_tokens`` (and ``image`` when a file was given).
    """
    if (path is None) == (size is None):
        raise BlueLowerError("give exactly one of an image file or --size WxH")
    info: dict = {}
    if path is not None:
        height, width = load_image(path).shape[:2]
        info["image"] = os.fspath(path)
    elif isinstance(size, str):
        width, height = parse_size(size)
    else:
        width, height = _check_size(*size)
    max_patches = _check_positive_int("--max-patches", max_patches)
    grid = select_grid(width, height, policy=policy, max_patches=max_patches)
    count = patch_count(grid, tokens_per_patch)
    info.update(
        size=[width, height],
        policy=policy,
        max_patches=max_patches,
        grid=list(grid),
        local_patches=count.local_patches,
        global_thumbnail=count.global_thumbnail,
        total_patches=count.total_patches,
        image_tokens=count.image_tokens,
    )
    return info
