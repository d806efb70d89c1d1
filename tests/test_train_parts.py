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
from train.dataset import BoxTable, EvalSet, build_train_transform, check_images_exist, seed_transform
from train.loop import WarmupCosine, epoch_batches
from whalesub.errors import DataError


def _image(seed=0, h=60, w=90) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_augmentation_is_a_function_of_the_seed_only():
    cfg = make_config({"image_size": 32, "aug_dropout": 1.0, "aug_noise": 0.5, "aug_color": 0.5})
    t = build_train_transform(cfg)  # albumentations warnings are errors (pyproject filterwarnings)
    img = _image()
    outs = []
    for seed in (7, 8, 7):
        seed_transform(t, seed)
        outs.append(t(image=img)["image"])
    assert outs[0].shape == (32, 32, 3) and outs[0].dtype == np.uint8
    assert np.array_equal(outs[0], outs[2]) and not np.array_equal(outs[0], outs[1])


def test_children_get_distinct_seeds_so_coin_flips_are_independent():
    cfg = make_config({"image_size": 16, "aug_hflip": 0.5, "aug_gray": 0.5})
    t = build_train_transform(cfg)
    flips = []
    for seed in range(200):
        seed_transform(t, seed)
        flips.append((t.transforms[2].py_random.random() < 0.5, t.transforms[5].py_random.random() < 0.5))
    agree = np.mean([a == b for a, b in flips])
    assert 0.35 < agree < 0.65  # identical seeds would make them agree 100% of the time


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
    bs = 3
    per_rank = [epoch_batches(n, bs, seed=5, epoch=2, rank=r, world=world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of steps
    g = torch.Generator().manual_seed(5 * 1_000_003 + 2)
    perm = torch.randperm(n, generator=g).tolist()
    perm += perm[: (-n) % world]
    for r, batches in enumerate(per_rank):
        flat = [i for b in batches for i in b]
        assert flat == perm[r::world][: len(flat)] and all(len(b) == bs for b in batches)
    assert epoch_batches(n, bs, 5, 2) == epoch_batches(n, bs, 5, 2)
    assert epoch_batches(n, bs, 5, 2) != epoch_batches(n, bs, 5, 3)
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
    from whalesub.model import EmbeddingNet
    from whalesub.spec import ModelSpec

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


def test_eval_set_is_exactly_the_inference_preprocessing(tmp_path):
    from PIL import Image

    from whalesub.image import load_for_model
    from whalesub.spec import ModelSpec

    Image.fromarray(_image(1, 50, 80)).save(tmp_path / "x.jpg")
    spec = ModelSpec(backbone="test_efficientnet", image_size=24)
    box = (10, 5, 60, 40)
    views, i = EvalSet(["x.jpg"], tmp_path, spec, [box], flip=True)[0]
    ref = load_for_model(tmp_path / "x.jpg", spec, box=box)
    assert i == 0 and views.shape == (2, 3, 24, 24)
    assert np.array_equal(views[0].numpy(), ref) and np.array_equal(views[1].numpy(), ref[:, :, ::-1])


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
