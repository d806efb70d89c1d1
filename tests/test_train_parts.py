"""Training building blocks: seeded augmentation, box sampling, data order under DDP, LR schedule,
optimizer groups, evaluation inputs = inference preprocessing, checkpoint RNG round trip."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
import torch

from train.config import make_config
from train.dataset import (
    BoxTable,
    EvalSet,
    augment,
    build_train_transform,
    check_images_exist,
    decode_target,
    sample_crop,
    seed_transform,
)
from train.loop import WarmupCosine, epoch_batches
from whalesub.core.errors import DataError


def _image(seed=0, h=60, w=90) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_augmentation_is_a_function_of_the_seed_only():
    cfg = make_config({"image_size": 32, "aug_dropout": 1.0, "aug_noise": 0.5, "aug_color": 0.5})
    t = build_train_transform(cfg)  # albumentations warnings are errors (pyproject filterwarnings)
    img = _image()
    outs = [augment(img, t, np.random.default_rng(seed), seed, cfg) for seed in (7, 8, 7)]
    assert outs[0].shape == (32, 32, 3) and outs[0].dtype == np.uint8
    assert np.array_equal(outs[0], outs[2]) and not np.array_equal(outs[0], outs[1])


def test_children_get_distinct_seeds_so_coin_flips_are_independent():
    cfg = make_config({"image_size": 16, "aug_hflip": 0.5, "aug_gray": 0.5})
    t = build_train_transform(cfg)
    kind = {type(c).__name__: c for c in t.transforms}
    flips = []
    for seed in range(200):
        seed_transform(t, seed)
        flip, gray = kind["HorizontalFlip"].py_random.random(), kind["ToGray"].py_random.random()
        flips.append((flip < 0.5, gray < 0.5))
    agree = np.mean([a == b for a, b in flips])
    assert 0.35 < agree < 0.65  # identical seeds would make them agree 100% of the time


def _textured_jpeg(path, w=1536, h=1024, cells=(24, 16)) -> np.ndarray:
    """A large photo-like JPEG: smooth colour noise with detail a few px wide at 64 px; returns
    the full-resolution RGB decoded by cv2 (an independent decoder, no DCT downscaling)."""
    import cv2

    base = np.random.default_rng(0).integers(0, 256, (cells[1], cells[0], 3)).astype(np.float32)
    full = np.clip(cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
    cv2.imwrite(str(path), full, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _best_psnr_of_direct_crop(full: np.ndarray, sample: np.ndarray, side: int, f: int = 2) -> float:
    """PSNR (dB) of ``sample`` [S, S, 3] against the best direct crop of ``full``: the frame squashed
    to ``side`` x ``side`` (INTER_AREA from full resolution), every S x S window at offsets in
    1/f px steps (f x f box means of the frame at f x ``side``)."""
    import cv2

    s = sample.shape[0]
    big = cv2.resize(full, (side * f, side * f), interpolation=cv2.INTER_AREA).astype(np.float32)
    c = np.pad(big.cumsum(0, dtype=np.float64).cumsum(1), ((1, 0), (1, 0), (0, 0)))
    box = ((c[f:, f:] - c[:-f, f:] - c[f:, :-f] + c[:-f, :-f]) / f**2).astype(np.float32)  # f x f means
    span, best = f * (s - 1) + 1, np.inf
    for oy in range(box.shape[0] - span + 1):
        win = np.lib.stride_tricks.sliding_window_view(box[oy:oy + span:f], span, axis=1)[..., ::f]
        best = min(best, ((win.transpose(1, 0, 3, 2) - sample) ** 2).mean(axis=(1, 2, 3)).min())
    return 10 * np.log10(255.0**2 / best)


def test_training_crop_keeps_the_decoded_resolution(tmp_path):
    """A crop of a quarter of the frame (half each side) must be as sharp as cropping the
    full-resolution photo directly: no resize to the input side before cropping (which upsampled
    every crop 2x here: ~21.5 dB instead of 32-55 dB). Geometric crop only, every other augmentation off."""
    from train.dataset import BoxTable, TrainSet
    from whalesub.models.spec import ModelSpec

    full = _textured_jpeg(tmp_path / "a.jpg")
    s = 32
    off = dict.fromkeys(("aug_affine", "aug_color", "aug_gray", "aug_blur", "aug_noise", "aug_dropout",
                         "aug_hflip"), 0.0)
    cfg = make_config({"image_size": s, "aug_rrc_scale": [0.25, 0.25], "aug_rrc_ratio": [1.0, 1.0], **off})
    spec = ModelSpec(backbone="test_efficientnet", image_size=s)
    ds = TrainSet(pd.DataFrame({"image": ["a.jpg"]}), tmp_path, np.zeros(1, np.int64), np.zeros(1, np.int64),
                  spec, cfg, BoxTable(None, {}, 0.0))
    mean, std = np.array(spec.mean)[:, None, None], np.array(spec.std)[:, None, None]
    for epoch in range(2):
        ds.set_epoch(epoch)
        sample = ((ds[0][0].numpy() * std + mean) * 255.0).transpose(1, 2, 0).astype(np.float32)
        assert _best_psnr_of_direct_crop(full, sample, 2 * s) > 28.0  # resize-then-crop: ~21.5 dB
    # the whole frame (scale 1) is the evaluation input up to the decode scale
    whole = make_config({"image_size": s, "aug_rrc_scale": [1.0, 1.0], "aug_rrc_ratio": [1.0, 1.0], **off})
    ds = TrainSet(pd.DataFrame({"image": ["a.jpg"]}), tmp_path, np.zeros(1, np.int64), np.zeros(1, np.int64),
                  spec, whole, BoxTable(None, {}, 0.0))
    train_x = ds[0][0].numpy()
    eval_x = EvalSet(["a.jpg"], tmp_path, spec, [None], flip=False)[0][0][0].numpy()
    rmse = np.sqrt((((train_x - eval_x) * std * 255.0) ** 2).mean())  # in 0..255 grey levels
    assert rmse < 4.0  # > 36 dB


def test_decode_target_keeps_the_smallest_crop_at_the_input_side():
    cfg = make_config({"image_size": 100, "aug_rrc_scale": [0.25, 1.0], "aug_rrc_ratio": [0.5, 2.0]})
    # widest-narrow crop: area 0.25, ratio 0.5 -> width sqrt(0.125) of the frame; height sqrt(0.25/2)
    assert decode_target(cfg) == (math.ceil(100 / math.sqrt(0.125)), math.ceil(100 / math.sqrt(0.125)))
    assert decode_target(make_config({"image_size": 64, "aug_rrc_scale": [1.0, 1.0],
                                      "aug_rrc_ratio": [1.0, 1.0]})) == (64, 64)


def test_sampled_crops_follow_scale_and_ratio_in_input_square_units():
    rng = np.random.default_rng(0)
    crops = np.array([sample_crop(rng, (0.3, 0.6), (0.5, 2.0)) for _ in range(2000)])
    x0, y0, w, h = crops.T
    assert ((w * h >= 0.3 - 1e-12) & (w * h <= 0.6 + 1e-12)).all()
    assert ((w / h >= 0.5 - 1e-12) & (w / h <= 2.0 + 1e-12)).all()
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-12).all() and (y0 + h <= 1 + 1e-12).all()
    assert np.mean(np.log(w / h)) == pytest.approx(0.0, abs=0.05)  # log-uniform ratio, symmetric range
    # an impossible request (area 1 at ratio 2 does not fit) falls back to the frame clipped to the ratio
    assert sample_crop(rng, (1.0, 1.0), (2.0, 3.0)) == (0.0, 0.25, 1.0, 0.5)


def test_box_table_confidence_cut_mix_and_fallback():
    boxes = pd.DataFrame({"image": ["a", "a", "b", "c"], "x1": [0, 1, 2, 3], "y1": 0, "x2": 10, "y2": 10,
                          "conf": [0.9, 0.9, 0.2, 0.9], "box_type": ["body", "fin", "body", "fin"]})
    table = BoxTable(boxes, {"body": 3.0, "fin": 1.0}, conf=0.5)
    rng = np.random.default_rng(0)
    draws = [table.sample("a", rng)[0] for _ in range(4000)]
    assert np.mean(np.array(draws) == 0) == pytest.approx(0.75, abs=0.03)  # body : fin = 3 : 1
    assert table.sample("b", rng) is None  # below the confidence threshold: whole image
    assert table.sample("zzz", rng) is None
    only_body = BoxTable(boxes, {"body": 1.0}, conf=0.0)
    assert only_body.sample("c", rng) is None and only_body.best("b", "body") == (2, 0, 10, 10)
    assert table.best("a", "fin") == (1, 0, 10, 10)
    with pytest.raises(DataError, match=r"several box types \['body', 'fin'\].*eval_box_type"):
        table.best("a", None)  # the rule of `whalesub embed` without --box-type


def test_evaluation_box_ignores_the_training_mix():
    """`whalesub embed --box-type fin` crops fins whatever the training mix was: validation must too."""
    boxes = pd.DataFrame({"image": ["a", "a"], "x1": [0, 1], "y1": 0, "x2": 10, "y2": 10,
                          "conf": [0.9, 0.9], "box_type": ["body", "fin"]})
    only_body = BoxTable(boxes, {"body": 1.0}, conf=0.0)
    assert only_body.best("a", "fin") == (1, 0, 10, 10)
    assert only_body.sample("a", np.random.default_rng(0)) == (0, 0, 10, 10)  # training still samples body


@pytest.mark.parametrize("n, world", [(23, 2), (40, 3), (7, 1)])
def test_epoch_batches_partition_one_seeded_permutation_across_ranks(n, world):
    """Contract (DistributedSampler's): one permutation of 0..n-1 per (seed, epoch), padded with its
    own head to a multiple of world, rank r takes every world-th item from r, full batches only."""
    bs = 3
    perm = [i for b in epoch_batches(n, 1, seed=5, epoch=2) for i in b]  # one process, batch 1: all rows
    assert sorted(perm) == list(range(n)) and (n < 10 or perm != sorted(perm))
    padded = perm + perm[: (-n) % world]
    per_rank = [epoch_batches(n, bs, seed=5, epoch=2, rank=r, world=world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of steps
    for r, batches in enumerate(per_rank):
        flat = [i for b in batches for i in b]
        assert flat == padded[r::world][: len(flat)] and all(len(b) == bs for b in batches)
        assert len(flat) > len(padded[r::world]) - bs  # only the last partial batch is dropped
    assert epoch_batches(n, bs, 5, 2) == epoch_batches(n, bs, 5, 2)
    assert epoch_batches(40, bs, 5, 2) != epoch_batches(40, bs, 5, 3)
    assert epoch_batches(40, bs, 5, 2) != epoch_batches(40, bs, 6, 2)
    assert len(epoch_batches(n, bs, 5, 2, max_batches=1)) == 1


def test_warmup_cosine_hand_values():
    f = WarmupCosine(total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert f(0) == pytest.approx(1 / 3) and f(1) == pytest.approx(2 / 3)
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)


def test_optimizer_groups_give_the_head_ten_times_the_backbone_lr():
    from train.heads import ArcMarginHead
    from train.loop import TrainModel, build_optimizer
    from whalesub.models.network import EmbeddingNet
    from whalesub.models.spec import ModelSpec

    net = EmbeddingNet(ModelSpec(backbone="test_efficientnet", image_size=32, embed_dim=8, neck="linear_bn"))
    model = TrainModel(net, ArcMarginHead(8, 5, k=2))
    cfg = make_config({"lr": 1e-3, "head_lr_mult": 10.0, "weight_decay": 0.05})
    opt = build_optimizer(model, cfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["backbone"]["lr"] == 1e-3 and by_name["head"]["lr"] == pytest.approx(1e-2)
    assert by_name["head_no_decay"]["weight_decay"] == 0.0 and by_name["backbone"]["weight_decay"] == 0.05
    head_ids = {id(p) for p in by_name["head"]["params"]}
    assert id(model.head.weight) in head_ids and id(net.neck[0].weight) in head_ids
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))


def test_eval_set_is_the_documented_preprocessing(tmp_path):
    """Oracle written from the README's preprocessing contract with cv2 alone: decode, crop the box,
    squash to S x S (INTER_AREA when shrinking), (x / 255 - mean) / std, channels first; view 2 =
    the same flipped left-right."""
    import cv2

    from whalesub.models.spec import ModelSpec

    rgb = _image(1, 50, 80)
    cv2.imwrite(str(tmp_path / "x.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # lossless
    spec = ModelSpec(backbone="test_efficientnet", image_size=24)
    box = (10, 5, 60, 40)
    views, i = EvalSet(["x.png"], tmp_path, spec, [box], flip=True)[0]
    crop = cv2.cvtColor(cv2.imread(str(tmp_path / "x.png")), cv2.COLOR_BGR2RGB)[5:40, 10:60]
    small = cv2.resize(crop, (24, 24), interpolation=cv2.INTER_AREA).astype(np.float64) / 255.0
    want = ((small - np.array(spec.mean)) / np.array(spec.std)).transpose(2, 0, 1)
    assert i == 0 and views.shape == (2, 3, 24, 24)
    np.testing.assert_allclose(views[0].numpy(), want, atol=1e-5)
    np.testing.assert_allclose(views[1].numpy(), want[:, :, ::-1], atol=1e-5)


def test_missing_images_lists_every_name(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(b"x")
    names = ["ok.jpg"] + [f"m{i}.jpg" for i in range(12)]
    with pytest.raises(DataError) as err:
        check_images_exist(names, tmp_path, "train.csv")
    assert len(err.value.problems) == 12 and "m11.jpg" in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        check_images_exist(names, tmp_path / "nope", "train.csv")


def test_rng_capture_restore_round_trip_through_weights_only(tmp_path):
    from train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian / advanced position
    save_checkpoint(tmp_path / "c.pt", {"rng": capture_rng()})
    expected = (random.random(), np.random.randn(), torch.rand(3))
    restore_rng(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (random.random(), np.random.randn(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    with pytest.raises(DataError, match="not a whalesub training checkpoint"):
        torch.save({"x": 1}, tmp_path / "other.pt")
        load_checkpoint(tmp_path / "other.pt")
