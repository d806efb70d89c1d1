"""The bad-input corpus (README "Bad input"): every bad file is made here and given to the real command.

Each case ends one of two ways, as the README table says: a refusal (exit status 2, one message that
names the file and what to do, no traceback, no output file) or a documented fallback whose result
is checked against an independent oracle (the pixels or rows the test wrote itself).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import make_checkpoint
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.core.errors import DataError
from whalesub.data.image import load_image
from whalesub.ranking.store import load_embeddings, save_embeddings

runner = CliRunner()
RNG_IMAGE = np.random.default_rng(7).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(res, *needles: str, out: Path | None = None) -> None:
    """Exit 2 through a WhalesubError (no other exception, no traceback), every needle in the message,
    and no output file (nor a temporary one beside it)."""
    text = res.output
    assert res.exit_code == 2, text
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in text and "error:" in text, text
    for needle in needles:
        assert needle.lower() in text.lower(), (needle, text)
    if out is not None:
        assert not out.exists(), out
        assert not list(out.parent.glob(f".{out.name}.*")), "a temporary file was left behind"


def jpeg_bytes(img: np.ndarray = RNG_IMAGE, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# --- images: refusals ----------------------------------------------------------------------------
def _bomb_jpeg() -> bytes:
    """A valid small JPEG whose frame header (SOF0) claims 65000 x 65000 pixels."""
    data = bytearray(jpeg_bytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def _bomb_png() -> bytes:
    """A PNG with a well-formed header (valid CRC) declaring 60000 x 60000 RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


BAD_IMAGES = {
    "zero.jpg": lambda: b"",
    "truncated.jpg": lambda: jpeg_bytes()[: len(jpeg_bytes()) // 2],
    "text.jpg": lambda: b"<html><body>404 Not Found</body></html>\n",
    "bomb.jpg": _bomb_jpeg,
    "bomb.png": _bomb_png,
    "cut.png": lambda: _png_of(RNG_IMAGE)[:200],
    "garbage.webp": lambda: b"RIFF\x10\x00\x00\x00WEBPVP8 junkjunkjunk",
}


def _png_of(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "run" / "best.pt", "test_efficientnet", 32)


def _embed(ckpt: Path, out: Path, *extra) -> object:
    return cli("embed", "--model", ckpt, "--backend", "torch", "--device", "cpu", "--workers", 0,
               "--batch-size", 16, "--out", out, *extra)


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_each_bad_image_is_a_data_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD_IMAGES[name]())
    with pytest.raises(DataError, match=name.replace(".", r"\.")) as info:
        load_image(path, target=32)
    assert "drop it from the list" in str(info.value) or "re-export" in str(info.value)


def test_bomb_header_says_what_it_is(tmp_path):
    for name in ("bomb.jpg", "bomb.png"):
        (tmp_path / name).write_bytes(BAD_IMAGES[name]())
        with pytest.raises(DataError, match="MAX_IMAGE_PIXELS"):
            load_image(tmp_path / name)


@pytest.mark.parametrize("exc", [RuntimeError("decoder crashed"), struct.error("unpack"), MemoryError(),
                                 IndexError("tile"), AttributeError("NoneType")])
def test_any_decoder_exception_becomes_a_data_error_naming_the_file(tmp_path, monkeypatch, exc):
    """The rule is general: whatever Pillow or a plugin raises while reading is a bad file."""
    path = tmp_path / "odd.jpg"
    path.write_bytes(jpeg_bytes())

    def broken(*a, **k):
        raise exc

    monkeypatch.setattr(Image.Image, "load", broken)
    with pytest.raises(DataError, match=r"odd\.jpg"):
        load_image(path)


def test_embed_refuses_every_bad_image_at_once_and_writes_nothing(tiny_ckpt, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(jpeg_bytes())
    for name, make in BAD_IMAGES.items():
        (folder / name).write_bytes(make())
    (folder / "folder.jpg").mkdir()  # a folder named like an image: not listed from the folder...
    out = tmp_path / "emb.npz"
    res = _embed(tiny_ckpt, out, "--images", folder)
    assert_refused(res, f"cannot decode {len(BAD_IMAGES)} image(s)", "fix or remove them", *BAD_IMAGES,
                   out=out)
    listing = tmp_path / "list.csv"  # ...but named in a listing it is refused like a bad file
    listing.write_text("image\ngood.jpg\nfolder.jpg\n")
    out = tmp_path / "emb2.npz"
    assert_refused(_embed(tiny_ckpt, out, "--list", listing, "--images", folder), "folder.jpg", out=out)


class _Decoding(torch.utils.data.Dataset):
    """What a training or embedding loader worker does: decode one file per item."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(load_image(self.paths[i], target=32).copy())


def test_a_bad_image_met_in_a_loader_worker_keeps_its_own_message(tmp_path):
    """torch re-raises a worker's error with the worker's traceback in its text; the user sees only ours."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(BAD_IMAGES["truncated.jpg"]())
    loader = torch.utils.data.DataLoader(_Decoding([bad]), num_workers=1)
    with pytest.raises(DataError) as info:
        list(loader)
    text = str(info.value)
    assert text.startswith(f"cannot decode image {bad}")
    assert "Traceback" not in text and "DataLoader" not in text


# --- images: fallbacks ---------------------------------------------------------------------------
def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _animated(path: Path, fmt: str) -> None:
    red, blue = Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 255))
    extra = {"lossless": True} if fmt == "WEBP" else {}
    red.save(path, format=fmt, save_all=True, append_images=[blue], duration=100, loop=0, **extra)


def test_embed_fallbacks_decode_every_image_and_skip_hidden_files(tiny_ckpt, tmp_path, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    img = RNG_IMAGE
    Image.fromarray(img).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(img[..., 0].astype(np.uint16) * 257).save(folder / "deep16.png")
    Image.fromarray(img).convert("P").save(folder / "palette.png")
    rgba = np.dstack([img, np.full(img.shape[:2], 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    (folder / "rotated.jpg").write_bytes(jpeg_bytes(exif=_exif(6)))
    _animated(folder / "animated.gif", "GIF")
    _animated(folder / "animated.webp", "WEBP")
    (folder / "UPPER.JPG").write_bytes(jpeg_bytes())
    (folder / "long.jpeg").write_bytes(jpeg_bytes())
    Image.fromarray(img).save(folder / "scan.tif")
    Image.fromarray(img).save(folder / "plain.bmp")
    (folder / "png_named.jpg").write_bytes(_png_of(img))
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._UPPER.JPG").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    out = tmp_path / "emb.npz"
    res = _embed(tiny_ckpt, out, "--images", folder)
    assert res.exit_code == 0, res.output
    expected = ["UPPER.JPG", "alpha.png", "animated.gif", "animated.webp", "cmyk.jpg", "deep16.png",
                "long.jpeg",
                "palette.png", "plain.bmp", "png_named.jpg", "rotated.jpg", "scan.tif"]
    emb = load_embeddings(out)
    assert emb.ids.tolist() == expected
    assert np.isfinite(emb.vectors).all()
    assert "notes.txt" in caplog.text  # the skipped non-image is named, not dropped unseen


@pytest.mark.parametrize("fmt,name", [("GIF", "a.gif"), ("WEBP", "a.webp")])
def test_animated_images_give_their_first_frame(tmp_path, fmt, name):
    _animated(tmp_path / name, fmt)
    got = load_image(tmp_path / name)
    assert got.shape == (30, 40, 3)
    assert (got == np.array([255, 0, 0], np.uint8)).all()  # the red first frame, not the blue second


@pytest.mark.parametrize("name,fmt", [("x.png", "PNG"), ("x.tif", "TIFF"), ("x.TIFF", "TIFF"),
                                      ("x.bmp", "BMP"), ("x.webp", "WEBP"), ("png_named.jpg", "PNG"),
                                      ("jpeg_named.png", "JPEG")])
def test_format_comes_from_the_content_not_the_extension(tmp_path, name, fmt):
    path = tmp_path / name
    Image.fromarray(RNG_IMAGE).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    got = load_image(path)
    if fmt == "JPEG":  # lossy: compare with an independent full decode of the same bytes
        assert np.abs(got.astype(int) - np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"),
                                                    dtype=int)).max() == 0
    else:
        np.testing.assert_array_equal(got, RNG_IMAGE)


# --- tables ----------------------------------------------------------------------------------------
TRAIN = [("a.jpg", "whale", "007"), ("b.jpg", "whale", "007"), ("c.jpg", "whale", "012"),
         ("d.jpg", "dolphin", "300")]


def _csv(rows, sep=",", newline="\n", header=("image", "species", "individual_id")) -> str:
    return newline.join(sep.join(r) for r in [header, *rows]) + newline


@pytest.fixture(scope="module")
def ranking_inputs(tmp_path_factory) -> dict:
    """Gallery (one unit vector per train image) and two queries: q1 near 'a.jpg' (007), q2 near 'c.jpg'."""
    root = tmp_path_factory.mktemp("rank")
    e = np.eye(8, dtype=np.float32)
    g = e[:4]
    q = np.stack([e[0] * 0.9 + e[4] * 0.1, e[2] * 0.9 + e[5] * 0.1])
    save_embeddings(root / "g.npz", [r[0] for r in TRAIN], g, {"fingerprint": "t"})
    save_embeddings(root / "q.npz", ["q1.jpg", "q2.jpg"], q / np.linalg.norm(q, axis=1, keepdims=True),
                    {"fingerprint": "t"})
    (root / "sample.csv").write_text("image,predictions\nq1.jpg,x\nq2.jpg,x\n")
    return {"root": root, "g": root / "g.npz", "q": root / "q.npz", "sample": root / "sample.csv"}


def _submit(ri, train: Path, out: Path, gallery: Path | None = None, sample: Path | None = None):
    args = ["submit", "--gallery", gallery or ri["g"], "--queries", ri["q"], "--train-csv", train,
            "--threshold", 0.5, "--out", out]
    return cli(*args, *(["--sample", sample] if sample else []))


def _predictions(path: Path) -> dict[str, list[str]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "image,predictions"
    return {ln.split(",")[0]: ln.split(",")[1].split() for ln in lines[1:]}


BAD_TABLES = {
    "semicolons": (_csv(TRAIN, sep=";"), ["separated by semicolons", "comma-separated"]),
    "tabs": (_csv(TRAIN, sep="\t"), ["separated by tabs", "comma-separated"]),
    "pipes": (_csv(TRAIN, sep="|"), ["separated by pipes", "comma-separated"]),
    "duplicate_row": (_csv(TRAIN + [TRAIN[0]]), ["duplicate", "'a.jpg' on lines 2, 6", "once"]),
    "duplicate_image": (_csv(TRAIN + [("a.jpg", "whale", "999")]), ["duplicate", "lines 2, 6"]),
    "empty_file": ("", ["is empty", "header line"]),
    "header_only": (_csv([]), ["no rows"]),
    "blank_lines_only": ("\n\n\n", ["is empty"]),
    "misspelt_column": (_csv(TRAIN, header=("image", "species", "individual")),
                        ["missing column 'individual_id'", "did you mean 'individual'"]),
    "unclosed_quote": ('image,species,individual_id\n"a.jpg,whale,007\nb.jpg,whale,007\n',
                       ["not a well-formed CSV", "quote"]),
    "empty_id": (_csv(TRAIN + [("e.jpg", "whale", "")]), ["empty or NaN individual_id", "line 6"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_train_csv_is_refused_by_submit(ranking_inputs, tmp_path, case):
    text, needles = BAD_TABLES[case]
    train = tmp_path / f"{case}.csv"
    train.write_text(text, newline="")
    out = tmp_path / "sub.csv"
    assert_refused(_submit(ranking_inputs, train, out), train.name, *needles, out=out)


def test_binary_file_named_csv_is_refused(ranking_inputs, tmp_path):
    train = tmp_path / "train.csv"
    train.write_bytes(b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00" + bytes(range(256)))  # an .xlsx
    out = tmp_path / "sub.csv"
    assert_refused(_submit(ranking_inputs, train, out), "train.csv", "not a text CSV", "export it", out=out)


@pytest.mark.parametrize("encode", [
    pytest.param(lambda t: b"\xef\xbb\xbf" + t.encode(), id="utf8_bom"),
    pytest.param(lambda t: t.replace("\n", "\r\n").encode(), id="crlf"),
    pytest.param(lambda t: t.replace(",", " , ").replace("\n", "  \n").encode(), id="whitespace"),
    pytest.param(lambda t: t.encode("utf-16"), id="utf16_bom"),
    pytest.param(lambda t: t.replace("whale", "w\xe4le").encode("latin-1"), id="latin1"),
    pytest.param(lambda t: t.replace("\n", "\n\n").encode(), id="blank_lines"),
])
def test_table_fallbacks_give_the_same_submission_as_a_clean_file(ranking_inputs, tmp_path, encode):
    clean, odd = tmp_path / "clean.csv", tmp_path / "odd.csv"
    clean.write_text(_csv(TRAIN), newline="")
    odd.write_bytes(encode(_csv(TRAIN)))
    res_clean = _submit(ranking_inputs, clean, tmp_path / "clean_sub.csv")
    res_odd = _submit(ranking_inputs, odd, tmp_path / "odd_sub.csv")
    assert res_clean.exit_code == 0 and res_odd.exit_code == 0, res_odd.output
    got = _predictions(tmp_path / "odd_sub.csv")
    assert got == _predictions(tmp_path / "clean_sub.csv")
    # oracle: q1 is closest to a.jpg, whose id keeps its leading zeros; q2 to c.jpg (012)
    assert got["q1.jpg"][0] == "007" and got["q2.jpg"][0] == "012"


def test_ids_with_leading_zeros_stay_distinct_strings(ranking_inputs, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text(_csv([("a.jpg", "whale", "007"), ("b.jpg", "whale", "7"), ("c.jpg", "whale", "0012"),
                           ("d.jpg", "whale", "12.0")]))
    res = _submit(ranking_inputs, train, tmp_path / "sub.csv")
    assert res.exit_code == 0, res.output
    got = _predictions(tmp_path / "sub.csv")
    assert got["q1.jpg"][0] == "007" and got["q2.jpg"][0] == "0012"
    assert {"7", "12.0"} <= set(got["q1.jpg"]) | set(got["q2.jpg"])  # never merged with 007 / 0012


@pytest.mark.parametrize("command", ["validate", "score", "embed_list", "embed_boxes"])
def test_every_table_reader_names_a_wrong_delimiter(ranking_inputs, tiny_ckpt, tmp_path, command):
    bad = tmp_path / "bad.csv"
    if command == "validate":
        bad.write_text("image;predictions\nq1.jpg;007\n")
        res = cli("validate", tmp_path / "sub.csv", "--sample", bad)
    elif command == "score":
        sub = tmp_path / "sub.csv"
        sub.write_text("image,predictions\nq1.jpg,007\n")
        bad.write_text("image\tindividual_id\nq1.jpg\t007\n")
        res = cli("score", sub, "--truth", bad)
    else:
        folder = tmp_path / "images"
        folder.mkdir()
        (folder / "a.jpg").write_bytes(jpeg_bytes())
        out = tmp_path / "e.npz"
        if command == "embed_list":
            bad.write_text("image;species\na.jpg;whale\n")
            res = _embed(tiny_ckpt, out, "--list", bad, "--images", folder)
        else:
            bad.write_text("image;x1;y1;x2;y2\na.jpg;1;1;20;20\n")
            res = _embed(tiny_ckpt, out, "--images", folder, "--boxes", bad)
        assert not out.exists()
    assert_refused(res, "bad.csv", "separated by", "comma-separated")


def test_header_only_listing_and_truth_are_refused(ranking_inputs, tmp_path):
    sample = tmp_path / "sample.csv"
    sample.write_text("image,predictions\n")
    out = tmp_path / "sub.csv"
    train = tmp_path / "train.csv"
    train.write_text(_csv(TRAIN))
    assert_refused(_submit(ranking_inputs, train, out, sample=sample), "sample.csv", "no rows", out=out)
    truth = tmp_path / "truth.csv"
    truth.write_text("image,individual_id\n")
    sub = tmp_path / "given.csv"
    sub.write_text("image,predictions\nq1.jpg,007\n")
    assert_refused(cli("score", sub, "--truth", truth), "truth.csv", "no rows")


# --- embedding files -------------------------------------------------------------------------------
def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


IDS = np.array([r[0] for r in TRAIN])
VEC = np.eye(4, 8, dtype=np.float32)


def _nan_vectors():
    v = VEC.copy()
    v[2, 3] = np.nan
    return v


BAD_NPZ = {
    "no_embeddings": (lambda p: _npz(p, ids=IDS), ["lacks the array", "'embeddings'", "numpy.savez"]),
    "no_ids": (lambda p: _npz(p, embeddings=VEC), ["lacks the array", "'ids'"]),
    "float64": (lambda p: _npz(p, ids=IDS, embeddings=VEC.astype(np.float64)),
                ["float32 or float16", "float64"]),
    "int_vectors": (lambda p: _npz(p, ids=IDS, embeddings=VEC.astype(np.int8)), ["got dtype int8"]),
    "nan": (lambda p: _npz(p, ids=IDS, embeddings=_nan_vectors()), ["NaN or inf", "row 2 (c.jpg)"]),
    "lengths": (lambda p: _npz(p, ids=IDS[:3], embeddings=VEC), ["3 entries", "4 rows"]),
    "one_d": (lambda p: _npz(p, ids=IDS, embeddings=VEC[:, 0]), ["2-D"]),
    "no_rows": (lambda p: _npz(p, ids=IDS[:0], embeddings=VEC[:0]), ["no vectors"]),
    "int_ids": (lambda p: _npz(p, ids=np.arange(4), embeddings=VEC), ["unicode string array"]),
    "zero_vector": (lambda p: _npz(p, ids=IDS, embeddings=VEC * np.array([[1], [0], [1], [1]], np.float32)),
                    ["all-zero", "re-embed"]),
    "pickled_ids": (lambda p: _npz(p, ids=IDS.astype(object), embeddings=VEC), ["pickle", "unicode array"]),
    "pickled_meta": (lambda p: _npz(p, ids=IDS, embeddings=VEC, meta=np.array({"a": 1}, dtype=object)),
                     ["pickle", "JSON string"]),
    "meta_not_json": (lambda p: _npz(p, ids=IDS, embeddings=VEC, meta=np.array("{oops")), ["'meta'", "json"]),
    "not_a_zip": (lambda p: p.write_text("ids,embeddings\n"), ["not a .npz (zip) file"]),
    "zero_bytes": (lambda p: p.write_bytes(b""), ["not a .npz (zip) file"]),
    "truncated": (lambda p: p.write_bytes(_npz(p, ids=IDS, embeddings=VEC).read_bytes()[:300]),
                  ["not a .npz (zip) file"]),
    "npy_not_npz": (lambda p: np.save(open(p, "wb"), VEC), ["not a .npz (zip) file"]),
    "members_not_npy": (lambda p: _zip_members(p, {"ids.npy": b"junk", "embeddings.npy": b"junk"}),
                        ["not numpy arrays"]),
    "bad_crc": (lambda p: _flip_a_byte(_npz(p, ids=IDS, embeddings=VEC)),
                ["not a readable .npz", "re-create"]),
}


def _zip_members(path: Path, members: dict[str, bytes]) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _flip_a_byte(path: Path) -> None:
    """Damage the stored (uncompressed) vector data so the member's CRC no longer matches."""
    data = bytearray(path.read_bytes())
    at = data.find(np.float32(1.0).tobytes())
    data[at + 1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_bad_embedding_file_is_refused_by_submit(ranking_inputs, tmp_path, case):
    make, needles = BAD_NPZ[case]
    gallery = tmp_path / f"{case}.npz"
    make(gallery)
    train = tmp_path / "train.csv"
    train.write_text(_csv(TRAIN))
    out = tmp_path / "sub.csv"
    assert_refused(_submit(ranking_inputs, train, out, gallery=gallery), gallery.name, *needles, out=out)


def test_byte_string_ids_are_read_as_text(ranking_inputs, tmp_path):
    """Fallback: ids saved as bytes (dtype S, e.g. from h5py) are decoded as UTF-8."""
    gallery = _npz(tmp_path / "g.npz", ids=IDS.astype("S"), embeddings=VEC)
    emb = load_embeddings(gallery)
    assert emb.ids.dtype.kind == "U" and emb.ids.tolist() == IDS.tolist()


# --- training configs -----------------------------------------------------------------------------
BAD_CONFIGS = {
    "unknown_key": (b"epocs: 3\n", ["unknown key 'epocs'", "did you mean 'epochs'"]),
    "wrong_type": (b"epochs: three\nlr: fast\n", ["key 'epochs'", "expected an integer", "key 'lr'"]),
    "bool_for_int": (b"epochs: true\n", ["key 'epochs'", "expected an integer"]),
    "bad_yaml": (b"epochs: 3\n  lr: [1,\n", ["not valid YAML", "line 2"]),
    "tab_indent": (b"epochs:\t3\n\tlr: 1\n", ["not valid YAML"]),
    "duplicate_key": (b"epochs: 2\nlr: 0.1\nepochs: 3\n", ["'epochs' appears twice", "line 1"]),
    "not_a_mapping": (b"- epochs\n- 3\n", ["must be a mapping"]),
    "not_utf8": ("run_name: caf\xe9\n".encode("latin-1"), ["not UTF-8", "re-save"]),
    "out_of_range": (b"batch_size: 0\nstages: 3\n", ["'batch_size'", ">= 1", "'stages'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_training_config_exits_2_before_anything_is_written(tmp_path, capsys, case):
    from train.fit import main

    raw, needles = BAD_CONFIGS[case]
    config = tmp_path / f"{case}.yaml"
    config.write_bytes(raw)
    runs = tmp_path / "runs"
    assert main(["--config", str(config), "--out_dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{case}.yaml" in err
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)
    assert not runs.exists()


def test_bad_command_line_override_names_the_key(tmp_path, capsys):
    from train.fit import main

    assert main(["--epocs=3", "--lr", "fast", "--out_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'epocs'" in err and "key 'lr' in command line" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


# --- checkpoints ----------------------------------------------------------------------------------
class Opaque:
    """A pickled object: weights_only loading must refuse it."""


def _other_model(good: Path, path: Path) -> None:
    other = make_checkpoint(path.parent / "other" / "best.pt", "test_resnet", 32)
    raw = torch.load(good, weights_only=True)
    raw["model"] = torch.load(other, weights_only=True)["model"]  # weights of another network
    torch.save(raw, path)


def _other_spec(good: Path, path: Path) -> None:
    raw = torch.load(good, weights_only=True)
    raw["spec"]["embed_dim"] = 64  # the weights have D = 32
    torch.save(raw, path)


BAD_CHECKPOINTS = {
    "empty": (lambda good, p: p.write_bytes(b""), ["cannot read checkpoint", "empty, truncated"]),
    "truncated": (lambda good, p: p.write_bytes(good.read_bytes()[:4000]), ["cannot read checkpoint"]),
    "text": (lambda good, p: p.write_text("not a checkpoint"), ["cannot read checkpoint"]),
    "pickled_object": (lambda good, p: torch.save({"model": Opaque()}, p), ["cannot read checkpoint"]),
    "a_list": (lambda good, p: torch.save([1, 2], p), ["holds a list"]),
    "no_model_key": (lambda good, p: torch.save({"state_dict": {"w": torch.zeros(1)}}, p),
                     ["no 'model' state dict", "state_dict"]),
    "other_model": (_other_model, ["does not match the network", "missing key"]),
    "other_spec": (_other_spec, ["does not match the network", "checkpoint (32,) vs model (64,)"]),
}


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("good") / "run" / "best.pt", "test_efficientnet", 32)


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_by_export(good_ckpt, tmp_path, case):
    make, needles = BAD_CHECKPOINTS[case]
    ckpt = tmp_path / "run" / f"{case}.pt"
    ckpt.parent.mkdir()
    make(good_ckpt, ckpt)
    out = tmp_path / "export"
    assert_refused(cli("export", ckpt, "--out", out), f"{case}.pt", *needles)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("data", [b"", b"junk" * 8], ids=["empty", "junk"])
def test_bad_safetensors_is_refused_by_embed(tmp_path, data):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(data)
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg_bytes())
    out = tmp_path / "e.npz"
    assert_refused(_embed(weights, out, "--images", folder), "w.safetensors", "not a safetensors file",
                   out=out)


@pytest.mark.parametrize("case", ["empty", "truncated", "text", "pickled_object", "a_list"])
def test_bad_training_checkpoint_is_a_data_error_on_resume(good_ckpt, tmp_path, case):
    from train.checkpoint import load_checkpoint

    make, _ = BAD_CHECKPOINTS[case]
    ckpt = tmp_path / "last.pt"
    make(good_ckpt, ckpt)
    with pytest.raises(DataError, match=r"last\.pt") as info:
        load_checkpoint(ckpt)
    assert "delete it" in str(info.value) or "not a whalesub training checkpoint" in str(info.value)


@pytest.mark.parametrize("manifest", [b"{oops", b"[1, 2]", b"\xff\xfe\x00junk"],
                         ids=["bad_json", "a_list", "binary"])
def test_bad_export_manifest_is_refused_by_embed(tmp_path, manifest):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "export.json").write_bytes(manifest)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes())
    out = tmp_path / "e.npz"
    res = cli("embed", "--model", folder, "--device", "cpu", "--workers", 0, "--images", images, "--out", out)
    assert_refused(res, "export.json", "re-run `whalesub export`", out=out)
