"""Decoding and preprocessing: DCT-domain downscale vs full decode, EXIF, boxes, modes, errors.

The photo tests run on generated textured JPEGs (tests/conftest.py) and again on the real nyala
photos when ../shared/data/nyala exists.
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from whalesub.core.errors import DataError
from whalesub.data.image import draft_scale, load_for_model, load_image, to_model_input
from whalesub.models.spec import ModelSpec

# The inverse of each EXIF orientation's transpose: saving inverse(upright) with the tag must decode upright.
INVERSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def area(img: np.ndarray, w: int, h: int | None = None) -> np.ndarray:
    return cv2.resize(img, (w, h or w), interpolation=cv2.INTER_AREA)


def full_decode(path) -> np.ndarray:
    """Independent reference: full-resolution Pillow decode, EXIF transpose, RGB."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


@pytest.fixture(scope="module", params=["synthetic", "nyala"])
def photos(request, synth_photos):
    """Six photos: generated textured JPEGs, or (when ../shared/data/nyala exists) real ones."""
    if request.param == "synthetic":
        return synth_photos
    return sorted((request.getfixturevalue("nyala") / "train_images").glob("*.jpg"))[:6]


@pytest.fixture(scope="module", params=["synthetic", "nyala"])
def big_jpeg(request, tmp_path_factory, synth_big_jpeg):
    """A 3600x2400 JPEG (the Happywhale frame size): native textured noise, or an upscaled real photo."""
    if request.param == "synthetic":
        return synth_big_jpeg
    src = full_decode(sorted((request.getfixturevalue("nyala") / "train_images").glob("*.jpg"))[0])
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    Image.fromarray(cv2.resize(src, (3600, 2400), interpolation=cv2.INTER_CUBIC)).save(path, quality=90)
    return path


def test_draft_scale_hand_worked():
    assert draft_scale(3600, 2400, (512, 512)) == 4  # 2400 / 512 = 4.7
    assert draft_scale(3600, 2400, (1024, 1024)) == 2  # 2400 / 1024 = 2.3
    assert draft_scale(8000, 6000, (512, 512)) == 8
    assert draft_scale(512, 426, (128, 128)) == 2  # 426 / 128 = 3.3
    assert draft_scale(512, 426, (64, 64)) == 4
    assert draft_scale(100, 300, (128, 128)) == 1
    assert draft_scale(3600, 900, (512, 512)) == 1  # the short side decides


def test_photos_downscaled_decode_matches_full_decode(photos):
    assert photos
    for path in photos:
        full = full_decode(path)
        h, w = full.shape[:2]
        for size in (128, 64):
            img = load_image(path, target=size)
            s = draft_scale(w, h, (size, size))
            assert s >= 2 and img.shape == (math.ceil(h / s), math.ceil(w / s), 3)  # really downscaled
            assert min(img.shape[:2]) >= size
            assert psnr(area(img, size), area(full, size)) >= 30, (path.name, size)


@pytest.mark.parametrize("size,scale", [(512, 4), (1024, 2)])
def test_big_jpeg_is_never_fully_decoded_and_matches(big_jpeg, size, scale):
    img = load_image(big_jpeg, target=size)
    assert img.shape == (2400 // scale, 3600 // scale, 3)
    assert psnr(area(img, size), area(full_decode(big_jpeg), size)) >= 30


def test_box_crop_in_the_downscaled_frame_matches_the_full_decode_crop(big_jpeg):
    full = full_decode(big_jpeg)
    for (x1, y1, x2, y2), size in [((1000, 500, 3100, 2300), 256), ((10.5, 20.2, 1610.7, 1100.3), 128),
                                   ((3000, 1800, 3600, 2400), 128)]:
        crop = load_image(big_jpeg, target=size, box=(x1, y1, x2, y2))
        assert min(crop.shape[:2]) >= size
        ref = full[math.floor(y1):math.ceil(y2), math.floor(x1):math.ceil(x2)]
        assert crop.shape[0] < ref.shape[0]  # decoded at a reduced scale
        assert psnr(area(crop, size), area(ref, size)) >= 30, (x1, y1, x2, y2)


def test_box_crop_stays_at_least_the_target_size(big_jpeg):
    rng = np.random.default_rng(0)
    for _ in range(12):
        size = int(rng.integers(32, 300))
        x1, y1 = rng.uniform(0, 2000), rng.uniform(0, 1200)
        w, h = rng.uniform(size, 3600 - x1), rng.uniform(size, 2400 - y1)
        crop = load_image(big_jpeg, target=size, box=(x1, y1, x1 + w, y1 + h))
        assert min(crop.shape[:2]) >= size


def test_box_margin_and_clipping(big_jpeg):
    full = full_decode(big_jpeg)
    got = load_image(big_jpeg, box=(100, 200, 300, 600), margin=0.25)  # widened by 50 px / 100 px
    np.testing.assert_array_equal(got, full[100:700, 50:350])
    got = load_image(big_jpeg, box=(-50, -10, 200, 100))  # clipped to the image
    np.testing.assert_array_equal(got, full[0:100, 0:200])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_rotated_jpeg_comes_out_upright(photos, tmp_path, orientation):
    upright = Image.fromarray(full_decode(photos[0]))  # landscape, so a missed rotation changes the shape
    raw = upright if orientation == 1 else upright.transpose(INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    raw.save(path, quality=95, exif=exif.tobytes())
    ref = np.asarray(upright)
    got = load_image(path)
    assert got.shape == ref.shape and psnr(got, ref) >= 30
    np.testing.assert_array_equal(got, full_decode(path))  # same pixels as Pillow's exif_transpose


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_are_in_upright_coordinates_under_every_orientation(big_jpeg, tmp_path, orientation):
    upright = Image.open(big_jpeg).convert("RGB").resize((1600, 1000))
    raw = upright if orientation == 1 else upright.transpose(INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.jpg"
    raw.save(path, quality=95, exif=exif.tobytes())
    full = full_decode(path)
    box = (200, 100, 1300, 700)  # 1100 x 600, asymmetric, away from the centre
    ref = full[100:700, 200:1300]
    exact = load_image(path, box=box)
    np.testing.assert_array_equal(exact, ref)
    small = load_image(path, box=box, target=128)  # decoded at 1/4
    assert small.shape[0] < 600 and psnr(area(small, 128), area(ref, 128)) >= 30


def _saved(tmp_path, im: Image.Image, name: str, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_unusual_modes_decode_to_rgb(tmp_path):
    grey = np.array([[0, 77, 255], [128, 200, 10]], dtype=np.uint8)
    got = load_image(_saved(tmp_path, Image.fromarray(grey, "L"), "l.png"))
    np.testing.assert_array_equal(got, np.repeat(grey[:, :, None], 3, axis=2))

    bilevel = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    np.testing.assert_array_equal(load_image(_saved(tmp_path, bilevel, "b.png")), [[[0] * 3, [255] * 3]])

    la = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(np.full_like(grey, 128))])
    got = load_image(_saved(tmp_path, la, "la.png"))
    np.testing.assert_array_equal(got[..., 0], np.rint(grey.astype(float) * 128 / 255).astype(np.uint8))

    rgba = np.array([[[200, 100, 50, 128], [10, 20, 30, 255], [255, 255, 255, 0]]], dtype=np.uint8)
    got = load_image(_saved(tmp_path, Image.fromarray(rgba, "RGBA"), "rgba.png"))
    np.testing.assert_array_equal(got, [[[100, 50, 25], [10, 20, 30], [0, 0, 0]]])  # on black

    pal = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    np.testing.assert_array_equal(load_image(_saved(tmp_path, pal, "p.png")),
                                  [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]])
    path = _saved(tmp_path, pal, "pt.png", transparency=1)
    assert "transparency" in Image.open(path).info
    np.testing.assert_array_equal(load_image(path), [[[255, 0, 0], [0, 0, 0], [0, 0, 255]]])

    deep = np.array([[0, 65535, 128 * 257, 1000]], dtype=np.uint16)
    path = _saved(tmp_path, Image.fromarray(deep), "i16.png")
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_array_equal(load_image(path)[..., 0], [[0, 255, 128, 4]])

    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red ink
    path = _saved(tmp_path, cmyk, "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    got = load_image(path, target=8)
    assert got.dtype == np.uint8 and got.shape[2] == 3
    assert np.abs(got.astype(int) - [255, 0, 0]).max() <= 8


def test_every_result_is_contiguous_uint8_rgb(big_jpeg):
    img = load_image(big_jpeg, target=512, box=(5, 5, 3000, 2000))
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.flags.c_contiguous


def test_missing_corrupt_and_truncated_files_name_the_path(tmp_path, big_jpeg):
    with pytest.raises(DataError, match="nothere.jpg"):
        load_image(tmp_path / "nothere.jpg")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="junk.jpg"):
        load_image(junk)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(big_jpeg.read_bytes()[:20000])
    with pytest.raises(DataError, match="cut.jpg"):
        load_image(cut, target=512)


def test_bad_boxes_name_the_path(big_jpeg):
    for box in [(10, 10, 5, 50), (0, 0, float("nan"), 5), (4000, 10, 4100, 50), (1, 2, 3)]:
        with pytest.raises(DataError, match="big.jpg"):
            load_image(big_jpeg, box=box)


def test_to_model_input_normalises_with_the_spec():
    spec = ModelSpec(backbone="resnet18", image_size=32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    img = np.zeros((50, 70, 3), dtype=np.uint8)
    img[...] = (255, 0, 51)
    x = to_model_input(img, spec)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x[:, 0, 0], [(1 - 0.5) / 0.5, (0 - 0.25) / 0.25, 0.2], rtol=1e-6)
    grey = to_model_input(img, spec.replace(in_chans=1, mean=(0.0,), std=(1.0,)))
    assert grey.shape == (1, 32, 32)
    assert grey[0, 0, 0] == pytest.approx((0.299 * 255 + 0.114 * 51) / 255, abs=1 / 255)


def test_to_model_input_resizes_like_cv2_area_and_load_for_model_composes(photos):
    spec = ModelSpec(backbone="resnet18", image_size=96)
    img = load_image(photos[0], target=96)
    x = to_model_input(img, spec)
    ref = area(img, 96).astype(np.float32) / 255
    ref = (ref - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    np.testing.assert_allclose(x, ref.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(load_for_model(photos[0], spec), x)
    boxed = load_for_model(photos[0], spec.replace(box_margin=0.1), box=(100, 100, 300, 250))
    np.testing.assert_array_equal(boxed, to_model_input(load_image(photos[0], box=(80, 85, 320, 265)), spec))


def test_png_bytes_and_non_jpeg_ignore_the_target(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buf.getvalue())
    np.testing.assert_array_equal(load_image(path, target=64), rgb)  # no DCT scaling for PNG


@pytest.mark.parametrize("kind", ["progressive", "grey", "mpo"])
def test_progressive_grey_and_mpo_jpegs_are_downscaled_too(big_jpeg, tmp_path, kind):
    src = Image.open(big_jpeg).convert("RGB").resize((1200, 800))
    path = tmp_path / f"{kind}.jpg"
    if kind == "progressive":
        src.save(path, quality=90, progressive=True)
    elif kind == "mpo":  # multi-picture JPEG, as some cameras write; Pillow calls the format MPO
        src.save(path, format="MPO", quality=90, save_all=True, append_images=[src.rotate(90)])
        assert Image.open(path).format == "MPO"
    else:
        src = src.convert("L")
        src.save(path, quality=90)
    got = load_image(path, target=100)
    assert got.shape == (100, 150, 3)  # decoded at 1/8
    ref = full_decode(path)
    assert psnr(area(got, 100), area(ref, 100)) >= 30
    if kind == "grey":
        assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
