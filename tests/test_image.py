"""Image side: grid policies, patch counting, loading, resizing, preprocessing, CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bluelower.cli import cli
from bluelower.errors import BlueLowerError
from bluelower.runtime_stubs import image as im

REPO = Path(__file__).resolve().parents[1]
GRID_3X3 = [(m, n) for m in range(1, 4) for n in range(1, 4)]


# ------------------------------------------------------------------- paper examples


def test_paper_example_394x390_relaxed_vs_anyres():
    assert im.relaxed_aspect_ratio_grid(394, 390, 9) == (1, 1)
    assert im.anyres_grid(394, 390, 9) == (2, 2)
    # Same answers on the ablation's candidate set 1:1..3:3.
    assert im.relaxed_aspect_ratio_grid(394, 390, 9, candidates=GRID_3X3) == (1, 1)
    assert im.anyres_grid(394, 390, 9, candidates=GRID_3X3) == (2, 2)


def test_paper_example_380x76_relaxed_vs_internvl():
    assert im.relaxed_aspect_ratio_grid(380, 76, 6) == (1, 1)
    assert im.internvl_grid(380, 76, 6) == (5, 1)


@pytest.mark.parametrize("size,grid", [((380, 393), (1, 1)), ((500, 102), (2, 1))])
def test_paper_examples_relaxed(size, grid):
    assert im.relaxed_aspect_ratio_grid(*size, 9) == grid
    assert im.relaxed_aspect_ratio_grid(*size, 9, candidates=GRID_3X3) == grid
    assert im.select_grid(*size) == grid


def test_phone_screenshot_is_2x4():
    # The paper: phone screenshots typically use 2:4 (768x1536) = 8 local + 1 global.
    for size in [(768, 1536), (1080, 2400), (1170, 2532)]:
        assert im.select_grid(*size) == (2, 4)
    assert im.patch_count((2, 4)) == im.PatchCount((2, 4), 8, True, 9, 9 * 196)


# ------------------------------------------------------------------- policy details


def _relaxed_reference(width, height, max_patches, alpha=0.1, size=384):
    """Independent float re-statement of the paper's rule, for cross-checking."""
    grids = [(m, n) for m in range(1, max_patches + 1) for n in range(1, max_patches + 1)
             if m * n <= max_patches]
    grids.sort(key=lambda g: (-g[0] * g[1], -g[0]))
    best, re_max, rw_min = None, 0, math.inf
    for m, n in grids:
        if size * m * height <= size * n * width:
            fw, fh = size * m, max(1, (height * size * m) // width)
        else:
            fw, fh = max(1, (width * size * n) // height), size * n
        re = min(fw * fh, width * height)
        rw = size * m * size * n - re
        if re - re_max > alpha * re_max or (re_max - re < alpha * re_max and rw < rw_min):
            best, re_max, rw_min = (m, n), re, rw
    return best


def test_relaxed_matches_reference_on_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = (int(x) for x in rng.integers(16, 5000, size=2))
        mp = int(rng.integers(1, 17))
        assert im.relaxed_aspect_ratio_grid(w, h, mp) == _relaxed_reference(w, h, mp)


def test_relaxed_alpha_zero_keeps_first_full_resolution_grid():
    # alpha = 0 never trades resolution for fewer patches; with the paper's strict
    # inequalities an equal-Re smaller grid cannot replace either, so the largest grid
    # reaching the maximum effective resolution is kept.
    assert im.relaxed_aspect_ratio_grid(394, 390, 9, alpha=0.0) == (3, 3)
    assert im.relaxed_aspect_ratio_grid(394, 390, 9, alpha=0.1) == (1, 1)


def test_candidate_grids_order_and_content():
    grids = im.candidate_grids(4)
    assert grids == [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]
    assert set(GRID_3X3) <= set(im.candidate_grids(9))
    assert all(m * n >= 2 for m, n in im.candidate_grids(6, min_patches=2))


def test_fit_size_exact_integer():
    assert im.fit_size(394, 390, 384, 384) == (384, 380)
    assert im.fit_size(380, 393, 384, 384) == (371, 384)
    assert im.fit_size(768, 1536, 768, 1536) == (768, 1536)
    assert im.fit_size(100000, 1, 384, 384) == (384, 1)  # never 0


def test_internvl_tie_break_uses_area():
    # aspect 1.0 is equally close to 1:1, 2:2 and 3:3 (diff 0): the later (larger) ratio
    # replaces only when the image fills more than half of it.
    assert im.internvl_grid(1000, 1000, 9) == (3, 3)
    assert im.internvl_grid(300, 300, 9) == (1, 1)
    assert im.internvl_grid(600, 600, 9) == (2, 2)


def test_anyres_prefers_less_waste_on_ties():
    # 300x300 fits every grid without loss; the least wasteful is 1:1.
    assert im.anyres_grid(300, 300, 9) == (1, 1)


@pytest.mark.parametrize("policy", im.POLICIES)
def test_grid_never_exceeds_max_patches(policy):
    widths = [1, 7, 64, 200, 383, 384, 385, 500, 768, 1000, 1080, 1536, 2400, 4032, 9000]
    for max_patches in range(1, 17):
        for w in widths:
            for h in widths:
                m, n = im.select_grid(w, h, policy=policy, max_patches=max_patches)
                assert 1 <= m * n <= max_patches, (policy, w, h, max_patches, (m, n))


def test_select_grid_unknown_policy():
    with pytest.raises(BlueLowerError, match="unknown grid policy 'bogus'"):
        im.select_grid(100, 100, policy="bogus")


@pytest.mark.parametrize("args", [(0, 10), (10, -1), (10.5, 10)])
def test_bad_sizes_raise(args):
    with pytest.raises(BlueLowerError):
        im.select_grid(*args)


def test_bad_max_patches_raises():
    with pytest.raises(BlueLowerError, match="max_patches"):
        im.select_grid(100, 100, max_patches=0)


# ------------------------------------------------------------------- patch counting


def test_patch_count_rule():
    one = im.patch_count((1, 1))
    assert (one.local_patches, one.global_thumbnail, one.total_patches, one.image_tokens) == (1, False, 1, 196)
    two = im.patch_count((2, 1), tokens_per_patch=10)
    assert (two.local_patches, two.global_thumbnail, two.total_patches, two.image_tokens) == (2, True, 3, 30)
    assert im.patch_count((3, 3)).image_tokens == 10 * 196


# ------------------------------------------------------------------- resizing


def _reference_resize(img, out_w, out_h):
    """Scalar, loop-by-loop statement of docs/image-preprocessing.md section 4 (slow)."""

    def taps(n_in, n_out):
        scale = n_in / n_out
        support = max(scale, 1.0)
        r = math.ceil(support)
        result = []
        for i in range(n_out):
            center = (i + 0.5) * scale
            js = [math.floor(center) - r + k for k in range(2 * r + 1)]
            ws = [max(0.0, 1.0 - abs((j + 0.5 - center) / support)) for j in js]
            total = 0.0
            for w in ws:
                total = total + w
            result.append([(min(max(j, 0), n_in - 1), np.float32(w / total)) for j, w in zip(js, ws)])
        return result

    in_h, in_w = img.shape[:2]
    ty, tx = taps(in_h, out_h), taps(in_w, out_w)
    vert = np.zeros((out_h, in_w, 3), np.float32)
    for y in range(out_h):
        for x in range(in_w):
            for c in range(3):
                acc = np.float32(0.0)
                for j, w in ty[y]:
                    acc = np.float32(acc + np.float32(w * np.float32(img[j, x, c])))
                vert[y, x, c] = acc
    out = np.zeros((out_h, out_w, 3), np.uint8)
    for y in range(out_h):
        for x in range(out_w):
            for c in range(3):
                acc = np.float32(0.0)
                for j, w in tx[x]:
                    acc = np.float32(acc + np.float32(w * vert[y, j, c]))
                out[y, x, c] = min(max(math.floor(np.float32(acc + np.float32(0.5))), 0), 255)
    return out


@pytest.mark.parametrize("src,dst", [((13, 7), (5, 9)), ((9, 11), (9, 4)), ((6, 5), (17, 12)), ((40, 3), (7, 7))])
def test_resize_matches_scalar_reference_bit_for_bit(src, dst):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(src[1], src[0], 3), dtype=np.uint8)
    np.testing.assert_array_equal(im.resize_image(img, *dst), _reference_resize(img, *dst))


def test_resize_weights_sum_to_one_and_bilinear_when_enlarging():
    for n_in, n_out in [(10, 3), (3, 10), (384, 384), (4032, 384), (7, 8)]:
        idx, w = im.resize_weights(n_in, n_out)
        assert idx.min() >= 0 and idx.max() <= n_in - 1
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
    # 2x enlargement with half-pixel centres: output 1 sits at input 0.75 -> 0.75*x0 + 0.25*x1.
    img = np.zeros((1, 2, 3), np.uint8)
    img[0, 1] = 200
    out = im.resize_image(img, 4, 1)
    assert out[0, :, 0].tolist() == [0, 50, 150, 200]


def test_resize_agrees_with_pillow_bilinear_in_the_interior():
    # Same tent filter as Pillow's BILINEAR (which drops instead of clamps at the edges and
    # uses fixed point): away from the border the two differ by at most one level.
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, size=(300, 500, 3), dtype=np.uint8)
    for w, h in [(97, 61), (384, 384), (1000, 700), (50, 300)]:
        ours = im.resize_image(img, w, h).astype(int)
        pil = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR)).astype(int)
        assert np.abs(ours - pil)[5:-5, 5:-5].max() <= 1


def test_resize_identity_and_constant():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(im.resize_image(img, 30, 20), img)
    flat = np.full((50, 70, 3), 123, np.uint8)
    assert np.all(im.resize_image(flat, 9, 31) == 123)
    assert np.all(im.resize_image(flat, 300, 200) == 123)


# ------------------------------------------------------------------- preprocessing

QUAD_COLORS = {
    "tl": (255, 0, 0),
    "tr": (0, 255, 0),
    "bl": (0, 0, 255),
    "br": (255, 255, 0),
}


def _quadrants(size=768):
    half = size // 2
    img = np.zeros((size, size, 3), np.uint8)
    img[:half, :half] = QUAD_COLORS["tl"]
    img[:half, half:] = QUAD_COLORS["tr"]
    img[half:, :half] = QUAD_COLORS["bl"]
    img[half:, half:] = QUAD_COLORS["br"]
    return img


def _normalized(rgb):
    return (np.asarray(rgb, np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


def test_preprocess_patch_order_row_major_thumbnail_last():
    out = im.preprocess_image(_quadrants(768), grid=(2, 2))
    assert out.shape == (5, 3, 384, 384) and out.dtype == np.float32
    for k, name in enumerate(["tl", "tr", "bl", "br"]):
        expect = _normalized(QUAD_COLORS[name])
        np.testing.assert_array_equal(out[k], np.broadcast_to(expect[:, None, None], (3, 384, 384)))
    thumb = out[4]
    # The thumbnail shows all four quadrants (sampled away from the blurred seams).
    for (y, x), name in {(50, 50): "tl", (50, 330): "tr", (330, 50): "bl", (330, 330): "br"}.items():
        np.testing.assert_array_equal(thumb[:, y, x], _normalized(QUAD_COLORS[name]))


def test_preprocess_wide_grid_order_and_padding():
    # A 2:1 image in a 2:2 grid: resized to 768x384, top row holds it, bottom row is padding.
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :100] = QUAD_COLORS["tl"]
    img[:, 100:] = QUAD_COLORS["tr"]
    out = im.preprocess_image(img, grid=(2, 2))
    assert out.shape == (5, 3, 384, 384)
    np.testing.assert_array_equal(out[0][:, :, :300], np.broadcast_to(_normalized(QUAD_COLORS["tl"])[:, None, None], (3, 384, 300)))
    np.testing.assert_array_equal(out[1][:, :, 84:], np.broadcast_to(_normalized(QUAD_COLORS["tr"])[:, None, None], (3, 384, 300)))
    assert np.all(out[2] == 0.0) and np.all(out[3] == 0.0)  # padding = mean colour = 0.0


def test_preprocess_padding_right_and_bottom():
    img = np.full((100, 50, 3), 255, np.uint8)  # 1:2 portrait in a 1:1 grid -> 192x384
    out = im.preprocess_image(img, grid=(1, 1))
    assert out.shape == (1, 3, 384, 384)  # 1:1 -> no thumbnail
    assert np.all(out[0, :, :, :192] == 1.0)
    assert np.all(out[0, :, :, 192:] == 0.0)


def test_preprocess_no_grid_is_squashed_whole_image():
    img = np.full((30, 90, 3), 0, np.uint8)
    out = im.preprocess_image(img)
    assert out.shape == (1, 3, 384, 384)
    assert np.all(out == -1.0)  # no padding anywhere


def test_normalization_values_and_custom_mean_std():
    img = np.zeros((384, 384, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 0, 255, 51
    out = im.preprocess_image(img, mean=(0.0, 0.5, 0.2), std=(1.0, 0.25, 0.1))
    assert out[0, 0, 0, 0] == 0.0
    assert out[0, 1, 0, 0] == np.float32((np.float32(1.0) - np.float32(0.5)) / np.float32(0.25))
    np.testing.assert_allclose(out[0, 2], 0.0, atol=1e-6)
    with pytest.raises(BlueLowerError, match="std"):
        im.preprocess_image(img, std=(1.0, 0.0, 1.0))


def test_preprocess_rejects_bad_arrays():
    with pytest.raises(BlueLowerError):
        im.preprocess_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(BlueLowerError):
        im.preprocess_image(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(BlueLowerError):
        im.preprocess_image(np.zeros((10, 10, 3), np.uint8), grid=(0, 2))


def test_preprocess_is_fast_for_1536x768():
    img = np.random.default_rng(3).integers(0, 256, size=(768, 1536, 3), dtype=np.uint8)
    grid = im.select_grid(1536, 768)
    start = time.perf_counter()
    out = im.preprocess_image(img, grid)
    elapsed = time.perf_counter() - start
    assert out.shape == (im.patch_count(grid).total_patches, 3, 384, 384)
    assert elapsed < 1.0, elapsed


# ------------------------------------------------------------------- loading


def test_load_png_jpeg_and_npy(tmp_path):
    arr = np.random.default_rng(4).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    np.testing.assert_array_equal(im.load_image(tmp_path / "a.png"), arr)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    jpg = im.load_image(str(tmp_path / "a.jpg"))
    assert jpg.shape == (20, 30, 3) and jpg.dtype == np.uint8
    Image.fromarray(arr).convert("RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(im.load_image(tmp_path / "rgba.png"), arr)
    np.save(tmp_path / "a.npy", arr)
    np.testing.assert_array_equal(im.load_image(tmp_path / "a.npy"), arr)


def test_load_float_npy_rounding(tmp_path):
    vals = np.array([0.0, 1.0, 0.5, 1 / 255, 0.5 / 255, 0.49 / 255], np.float32)
    arr = np.broadcast_to(vals[None, :, None], (2, 6, 3)).astype(np.float32)
    np.save(tmp_path / "f.npy", arr)
    out = im.load_image(tmp_path / "f.npy")
    assert out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 255, 128, 1, 1, 0]


def test_load_exif_orientation_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    pil = Image.fromarray(arr)
    exif = pil.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    pil.save(tmp_path / "rot.jpg", exif=exif)
    assert im.load_image(tmp_path / "rot.jpg").shape == (20, 10, 3)


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(BlueLowerError, match="not found.*nope.png"):
        im.load_image(path)


def test_load_corrupt_files(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(BlueLowerError, match="garbage.png"):
        im.load_image(garbage)
    # A real PNG cut in half.
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(BlueLowerError, match="truncated.png"):
        im.load_image(truncated)
    bad_npy = tmp_path / "bad.npy"
    bad_npy.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(BlueLowerError, match="bad.npy"):
        im.load_image(bad_npy)


def test_load_unsupported_format(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.gif")
    with pytest.raises(BlueLowerError, match="unsupported image format GIF.*x.gif"):
        im.load_image(tmp_path / "x.gif")
    with pytest.raises(BlueLowerError, match="directory"):
        im.load_image(tmp_path)


@pytest.mark.parametrize(
    "arr,match",
    [
        (np.zeros((4, 4), np.uint8), "shape"),
        (np.zeros((4, 4, 4), np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "shape"),
        (np.zeros((4, 4, 3), np.int32), "dtype"),
        (np.zeros((4, 4, 3), np.float64), "dtype"),
        (np.full((4, 4, 3), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((4, 4, 3), np.nan, np.float32), "finite"),
    ],
)
def test_load_bad_npy(tmp_path, arr, match):
    path = tmp_path / "bad_array.npy"
    np.save(path, arr)
    with pytest.raises(BlueLowerError, match=match) as info:
        im.load_image(path)
    assert "bad_array.npy" in str(info.value)


# ------------------------------------------------------------------- CLI


def test_cli_size_text():
    result = CliRunner().invoke(cli, ["inspect", "image", "--size", "1080x2400"])
    assert result.exit_code == 0, result.output
    assert "[2, 4]" in result.output
    assert "local patches:    8" in result.output
    assert "global thumbnail: yes" in result.output
    assert "1764" in result.output


def test_cli_json_with_image(tmp_path):
    Image.fromarray(np.zeros((76, 380, 3), np.uint8)).save(tmp_path / "strip.png")
    result = CliRunner().invoke(
        cli, ["inspect", "image", str(tmp_path / "strip.png"), "--policy", "internvl", "--max-patches", "6", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["grid"] == [5, 1]
    assert data["local_patches"] == 5
    assert data["global_thumbnail"] is True
    assert data["image_tokens"] == 6 * 196
    assert data["policy"] == "internvl" and data["max_patches"] == 6 and data["size"] == [380, 76]


def test_cli_json_relaxed_1x1():
    result = CliRunner().invoke(cli, ["inspect", "image", "--size", "394x390", "--json"])
    data = json.loads(result.output)
    assert data["grid"] == [1, 1] and data["global_thumbnail"] is False and data["image_tokens"] == 196


@pytest.mark.parametrize(
    "args,match",
    [
        (["--size", "12x"], "bad --size"),
        (["--size", "0x10"], "bad --size"),
        ([], "exactly one"),
        (["x.png", "--size", "10x10"], "exactly one"),
        (["/definitely/missing.png"], "not found"),
        (["--size", "10x10", "--policy", "bogus"], "unknown grid policy"),
        (["--size", "10x10", "--max-patches", "0"], "max-patches"),
    ],
)
def test_cli_errors_one_line(args, match):
    result = CliRunner().invoke(cli, ["inspect", "image", *args])
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = result.output.strip()
    assert len(text.splitlines()) == 1, text
    assert text.startswith("error: ") and match in text
    assert "Traceback" not in text


# ------------------------------------------------------------------- generated docs


def test_policy_table_doc_is_up_to_date():
    spec = importlib.util.spec_from_file_location("image_policy_table", REPO / "benchmarks" / "image_policy_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    committed = (REPO / "docs" / "image-policies.md").read_text()
    assert mod.render() == committed, "run: python benchmarks/image_policy_table.py"
