"""
FaceRWKV's shell: the data and train.py. Every test runs on a CPU-only machine and writes only
under pytest's temporary folders.

    python -m pytest -q test_train.py -k test_data      # one section

  The data                                                             -k test_data
      every format (AffectNet's csv and numbered folders too); where each split comes from and
      the sanity subset; bad data; transforms and random erasing; balanced sampling; synthetic
      faces and their cache (a corrupt entry is rebuilt); the whole-batch transform equals the
      image-by-image one, RNG draws included
  train.py                                                             -k test_train
      the schedule and clipping; runs end to end; the best checkpoint; resume after a kill;
      evaluation, prediction, plots, the linear probe; every usage error one line that leaves
      nothing behind (one table); two processes (one test, two torchrun calls); the
      benchmark; the recipes (SAM by hand, the exp schedule, --recipe poster); POSTER runs;
      one run per directory (a lock, refused reuse), checkpoints that supply only a model,
      every numeric flag's range, a NaN loss stops the run; stopped by a signal and resumed
      exactly; a run never checkpointed starts again; resume checks its data; one-line errors;
      POSTER V2 checkpoints for --eval-only and --predict, --init-from, --train-only
"""

import argparse
import contextlib
import copy
import csv
import errno
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data
import train
from data import CLASSES, DataError, load_datasets
from poster import (POSTERV2_CLASS_ORDER, PosterConfig, PosterRWKV)
from test_facerwkv import order_one_, write_posterv2_checkpoint


# ---- The data (-k test_data) ---------------------------------------------------------------------
# each class gets a distinct solid colour, so a loaded image tells which label it must carry
COLORS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (200, 0, 200), (0, 200, 200), (90, 90, 90)]
SIZE = (8, 12)  # (H, W) of loaded tensors in these tests


def write_img(path, color, size=(12, 8), fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)


def color_of(x):
    """Mean colour of a (3, H, W) tensor in [0,1], snapped to the nearest of COLORS (JPEG drifts)."""
    mean = (x.mean(dim=(1, 2)) * 255).numpy()
    return COLORS[int(np.argmin([np.abs(mean - np.array(c)).sum() for c in COLORS]))]


def make_caer(root, n_train=10, n_test=3, angry=False):
    for split, n in (("train", n_train), ("test", n_test)):
        for y, c in enumerate(CLASSES):
            folder = "Angry" if (angry and c == "Anger") else c
            for i in range(n):
                write_img(os.path.join(root, split, folder, f"{i:04d}.png"), COLORS[y])
    return str(root)


def make_rafdb(root, n_train=6, n_test=2):
    raf = ["Surprise", "Fear", "Disgust", "Happy", "Sad", "Anger", "Neutral"]  # RAF labels 1..7
    lines = []
    for split, n in (("train", n_train), ("test", n_test)):
        for lab in range(1, 8):
            for i in range(n):
                name = f"{split}_{lab}{i:04d}"
                lines.append(f"{name}.jpg {lab}")
                write_img(os.path.join(root, "Image", "aligned", f"{name}_aligned.jpg"),
                          COLORS[CLASSES.index(raf[lab - 1])], size=(10, 10))
    os.makedirs(os.path.join(root, "EmoLabel"))
    with open(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(root)


FER_NAMES = ["Anger", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]  # FER labels 0..6


def fer_row(label, usage, value=None):
    value = 30 * label + 10 if value is None else value  # grey level encodes the label
    return f"{label},{' '.join([str(value)] * 2304)},{usage}"


def make_fer(root, n=(5, 2, 2), extra_rows=()):
    rows = ["emotion,pixels,Usage"]
    for usage, k in zip(("Training", "PublicTest", "PrivateTest"), n):
        rows += [fer_row(lab, usage) for lab in range(7) for _ in range(k)]
    rows += list(extra_rows)
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "fer2013.csv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return str(root)


def check_labels_by_color(ds, classes=CLASSES):
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3,) + SIZE and x.dtype == torch.float32
        assert color_of(x) == COLORS[y], f"item {i} labelled {classes[y]} has the wrong colour"


# ---- data: formats -------------------------------------------------------------------------------

def test_data_caer_loads_with_class_order_splits_and_summary(tmp_path):
    root = make_caer(tmp_path / "caer", n_train=10, n_test=3)
    s = load_datasets(root, img_size=SIZE)
    assert s.info["format"] == "caer" and s.classes == CLASSES
    assert s.counts() == {"train": [9] * 7, "val": [1] * 7, "test": [3] * 7}
    for ds in (s.train, s.val, s.test):
        check_labels_by_color(ds)
    text = s.summary()
    assert "caer" in text and root in text and "8x12" in text
    for c in CLASSES:
        assert c in text


def test_data_caer_accepts_angry_and_ignores_stray_files(tmp_path):
    root = make_caer(tmp_path / "caer", n_train=4, n_test=2, angry=True)
    for junk in (".DS_Store", "Thumbs.db", "desktop.ini", "notes.txt", "._0000.png"):
        (tmp_path / "caer" / "train" / "Angry" / junk).write_bytes(b"junk")
    os.makedirs(tmp_path / "caer" / "train" / ".hidden")
    s = load_datasets(root, img_size=SIZE)
    assert s.info["format"] == "caer"
    assert sum(s.counts()["train"]) + sum(s.counts()["val"]) == 28
    check_labels_by_color(s.train)
    # every stray entry is counted by why: .hidden/, .DS_Store, ._0000.png; Thumbs.db, desktop.ini, notes.txt
    assert sorted(r for _, r, _ in s.info["skipped"]) == ["hidden"] * 3 + ["not an image"] * 3
    assert "skipped 6 files: hidden 3, not an image 3" in s.summary().splitlines()


def test_data_folder_tree_sorted_classes_one_map_every_split(tmp_path):
    names = ["zebra", "apple", "mango"]
    for split, n in (("train", 5), ("val", 2), ("test", 2)):
        for c in names:
            if split == "test" and c == "mango":
                continue  # a split may lack a class; indices must not shift
            for i in range(n):
                write_img(str(tmp_path / split / c / f"{i}.jpg"), COLORS[sorted(names).index(c)])
    s = load_datasets(str(tmp_path), img_size=SIZE)
    assert s.info["format"] == "folder" and s.classes == ("apple", "mango", "zebra")
    assert s.counts() == {"train": [5, 5, 5], "val": [2, 2, 2], "test": [2, 0, 2]}
    for ds in (s.train, s.val, s.test):
        check_labels_by_color(ds, s.classes)


def test_data_flat_folder_tree_gets_stratified_val_and_test(tmp_path):
    for y, c in enumerate(["b", "a"]):
        for i in range(10):
            write_img(str(tmp_path / c / f"{i}.png"), COLORS[1 - y])
    s = load_datasets(str(tmp_path), img_size=SIZE)
    assert s.classes == ("a", "b")
    counts = s.counts()
    assert counts["test"] == [2, 2] and counts["val"] == [1, 1] and counts["train"] == [7, 7]


def test_data_rafdb_labels_mapped_to_class_order(tmp_path):
    root = make_rafdb(tmp_path / "raf")
    s = load_datasets(root, img_size=SIZE)
    assert s.info["format"] == "rafdb" and s.classes == CLASSES
    assert s.counts()["test"] == [2] * 7
    for ds in (s.train, s.val, s.test):
        check_labels_by_color(ds)


def test_data_fer2013_usage_splits_grey_to_rgb_and_label_map(tmp_path):
    root = make_fer(tmp_path)
    for path in (root, os.path.join(root, "fer2013.csv")):
        s = load_datasets(path, img_size=(48, 48))
        assert s.info["format"] == "fer2013"
        assert s.counts() == {"train": [5] * 7, "val": [2] * 7, "test": [2] * 7}
        assert "own validation" in s.summary()
        for ds in (s.train, s.val, s.test):
            for i in range(len(ds)):
                x, y = ds[i]
                assert x.shape == (3, 48, 48)
                assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
                fer_label = FER_NAMES.index(CLASSES[y])
                assert round(x[0, 0, 0].item() * 255) == 30 * fer_label + 10


def test_data_explicit_format_wins(tmp_path):
    root = make_caer(tmp_path / "caer", n_train=3, n_test=1)
    s = load_datasets(root, fmt="folder", img_size=SIZE)
    assert s.info["format"] == "folder" and s.classes == tuple(sorted(CLASSES))
    with pytest.raises(DataError, match="unknown dataset format"):
        load_datasets(root, fmt="imagenet")


# ---- data: splits and the sanity subset ----------------------------------------------------------

def test_data_stratified_split_properties():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    keep, held = data.stratified_split(labels, 0.1, seed=3)
    assert set(keep).isdisjoint(held) and sorted(keep + held) == list(range(100))
    assert np.bincount(np.array(labels)[held]).tolist() == [5, 3, 2]
    assert data.stratified_split(labels, 0.1, seed=3) == (keep, held)
    assert data.stratified_split(labels, 0.1, seed=4)[1] != held


def test_data_val_is_moved_out_of_train_and_seeded(tmp_path):
    root = make_caer(tmp_path / "caer", n_train=20, n_test=1)
    a, b, c = (load_datasets(root, img_size=SIZE, seed=s) for s in (0, 0, 1))
    assert set(a.train.indices).isdisjoint(a.val.indices)
    assert len(a.train) + len(a.val) == 140 and a.counts()["val"] == [2] * 7
    assert a.val.indices == b.val.indices and a.val.indices != c.val.indices


def split_of(fmt, tmp_path):
    """The split an item's name says it was stored in: its folder, file name, csv line or stream."""
    return {"caer": lambda n: Path(n).relative_to(tmp_path).parts[0],
            "rafdb": lambda n: os.path.basename(n).split("_")[0],
            "fer2013": lambda n: "train" if int(n.split()[-1]) <= 36 else "val" if int(n.split()[-1]) <= 50 else "test",
            "affectnet": lambda n: "train" if os.path.basename(n).startswith("train") else "test",
            "synthetic": lambda n: n.split(":")[2], "flat": lambda n: None}[fmt]


@pytest.mark.parametrize("fmt", ["caer", "rafdb", "fer2013", "affectnet", "synthetic", "flat"])
def test_data_val_comes_from_train_and_no_test_image_is_in_train_or_val(tmp_path, fmt):
    # test splits as large as train, so that a leak of test indices into val would fit
    if fmt == "flat":
        for i in range(70):
            write_img(str(tmp_path / CLASSES[i % 7] / f"{i}.png"), COLORS[i % 7])
    root = {"caer": lambda: make_caer(tmp_path, n_train=10, n_test=10), "rafdb": lambda: make_rafdb(tmp_path, 6, 6),
            "fer2013": lambda: make_fer(tmp_path, n=(5, 2, 5)), "affectnet": lambda: make_affectnet(tmp_path, n=(4, 4)),
            "synthetic": lambda: None, "flat": lambda: str(tmp_path)}[fmt]()
    s = load_datasets(root, img_size=SIZE, synthetic_size=(6, 6))
    names = {split: [ds.source.name(i) for i in ds.indices] for split, ds in (("train", s.train), ("val", s.val),
                                                                               ("test", s.test))}
    assert min(map(len, names.values())) > 0 and len(set(sum(names.values(), []))) == sum(map(len, names.values()))
    assert not set(names["test"]) & (set(names["train"]) | set(names["val"]))
    origin, own_val = split_of(fmt, tmp_path), "val" if fmt == "fer2013" else "train"
    if fmt != "flat":
        assert {origin(n) for n in names["train"]} == {"train"} and {origin(n) for n in names["val"]} == {own_val}
        assert {origin(n) for n in names["test"]} == {"test"}


def test_data_sanity_subset(tmp_path):
    root = make_caer(tmp_path / "caer", n_train=6, n_test=2)
    s = load_datasets(root, img_size=SIZE, sanity_per_class=2)
    assert s.counts() == {"train": [2] * 7, "val": [2] * 7, "test": [2] * 7}
    assert s.train.indices == s.test.indices == load_datasets(root, img_size=SIZE, sanity_per_class=2).train.indices
    check_labels_by_color(s.train)


# ---- data: bad data ------------------------------------------------------------------------------

def empty(folder):
    for f in folder.iterdir():
        f.unlink()


@pytest.mark.parametrize("damage, fmt, match", [  # done to a CAER-S tree with Angry/ for Anger/
    (lambda r: empty(r / "train" / "Fear"), "auto", "Fear.*no readable images"),
    (lambda r: empty(r / "train" / "Angry"), "auto", "class folder {root}/train/Angry has no readable images"),
    (lambda r: os.rename(r / "train" / "Sad", r / "train" / "Sadd"), "auto",  # detected as CAER-S: 6 of 7 match
     "(?s)(?=.*Sadd)" + "".join(f"(?=.*{c})" for c in CLASSES)),  # the name found, and every expected one
    (lambda r: shutil.rmtree(r / "test"), "caer", "test"),
], ids=["empty-class", "empty-named-as-on-disk", "unknown-class", "no-test-split"])
def test_data_bad_tree_is_a_clear_error(tmp_path, damage, fmt, match):
    root = Path(make_caer(tmp_path / "caer", n_train=2, n_test=1, angry=True))
    damage(root)
    with pytest.raises(DataError, match=match.format(root=re.escape(str(root)))) as e:
        load_datasets(str(root), fmt=fmt, img_size=SIZE)
    assert str(root / "train" / "Anger") not in str(e.value)


def test_data_bad_arguments_are_clear_errors_and_load_image_reads_a_gif(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_datasets(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="img_size"):
        load_datasets(None, img_size=(0, 10))
    with pytest.raises(DataError, match="val_fraction"):
        load_datasets(None, val_fraction=1.5)
    with pytest.raises(DataError) as e:
        data.load_image(str(tmp_path / "face.jpg"), SIZE)
    assert str(e.value) == f"no such image file: {tmp_path / 'face.jpg'}"
    Image.new("P", (30, 20), 3).save(tmp_path / "face.gif")  # what --predict reads: any mode, any size
    assert data.load_image(str(tmp_path / "face.gif"), (8, 12)).shape == (3, 8, 12)


def test_data_non_image_file_named_or_skipped(tmp_path):
    root = make_caer(tmp_path / "caer", n_train=3, n_test=1)
    bad = tmp_path / "caer" / "train" / "Happy" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_datasets(root, img_size=SIZE)
    s = load_datasets(root, img_size=SIZE, skip_bad_images=True)
    assert len(s.info["skipped"]) == 1 and "broken.png" in s.summary()
    assert sum(s.counts()["train"]) + sum(s.counts()["val"]) == 21


def test_data_truncated_file_named_at_read_or_skipped(tmp_path):
    root = make_caer(tmp_path / "caer", n_train=3, n_test=1)
    path = tmp_path / "caer" / "test" / "Sad" / "0000.png"
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[:2000])  # header intact, pixel data cut
    s = load_datasets(root, img_size=SIZE)
    k = [s.test.source.paths[i] for i in s.test.indices].index(str(path))
    with pytest.raises(DataError, match="0000.png"):
        s.test[k]
    s = load_datasets(root, img_size=SIZE, skip_bad_images=True)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        x, y = s.test[k]  # replaced by the next readable image, with its own label
    assert color_of(x) == COLORS[y] and s.test.runtime_skipped == [str(path)]
    assert "1 while reading" in s.summary()


def test_data_file_vanishing_mid_epoch(tmp_path):
    root = make_caer(tmp_path / "caer", n_train=3, n_test=1)
    s = load_datasets(root, img_size=SIZE)
    s_skip = load_datasets(root, img_size=SIZE, skip_bad_images=True)
    victim = s.train.source.paths[s.train.indices[0]]
    os.remove(victim)
    with pytest.raises(DataError, match=os.path.basename(victim) + ".*vanished|vanished.*" + victim):
        s.train[0]
    batches = iter(torch.utils.data.DataLoader(s.train, batch_size=4, num_workers=1))
    with pytest.raises(DataError, match="vanished"):  # the worker's error reaches the main process as DataError
        next(batches)
    assert len(list(batches)) == math.ceil(len(s.train) / 4) - 1  # and the loader goes on, to its end
    s = s_skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len([x for x, _ in s.train]) == len(s.train)
    assert s.train.runtime_skipped == [victim] and any(victim in str(w.message) for w in caught)


def test_data_rafdb_malformed_line_and_label_out_of_range(tmp_path):
    root = make_rafdb(tmp_path / "raf", n_train=3, n_test=1)
    label_file = os.path.join(root, "EmoLabel", "list_patition_label.txt")
    good = open(label_file).read()
    with open(label_file, "w") as f:
        f.write(good + "train_09999.jpg\n")
    with pytest.raises(DataError, match="line 29"):
        load_datasets(root, img_size=SIZE)
    with open(label_file, "w") as f:
        f.write(good + "train_09999.jpg 9\n")
    with pytest.raises(DataError, match="line 29.*out of range"):
        load_datasets(root, img_size=SIZE)
    s = load_datasets(root, img_size=SIZE, skip_bad_images=True)
    assert len(s.info["skipped"]) == 1


def test_data_fer2013_bad_rows_named_by_line(tmp_path):
    cases = [(fer_row(9, "Training"), "out of range"), ("3,1 2 3,Training", "2304"),
             ("x," + " ".join(["1"] * 2304) + ",Training", "malformed"), (fer_row(1, "Other"), "Usage"),
             (fer_row(1, "Training", value=300), "0..255")]
    for row, msg in cases:
        root = make_fer(tmp_path / msg, n=(1, 1, 1), extra_rows=[row])
        with pytest.raises(DataError, match=f"line 23.*{msg}"):
            load_datasets(root, img_size=(48, 48))
        s = load_datasets(root, img_size=(48, 48), skip_bad_images=True)
        assert len(s.info["skipped"]) == 1 and sum(s.counts()["train"]) == 7


# ---- data: transforms and mode conversion --------------------------------------------------------

def test_data_mode_conversions_to_rgb():
    rgb = data.to_rgb
    assert rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert rgb(Image.new("RGBA", (2, 2), (10, 20, 30, 255))).getpixel((0, 0)) == (10, 20, 30)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([5, 6, 7] * 256)
    assert rgb(pal).getpixel((0, 0)) == (5, 6, 7)
    pal.info["transparency"] = 0
    assert rgb(pal).getpixel((0, 0)) == (255, 255, 255)
    assert rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    i16 = Image.fromarray(np.array([[0, 128 * 257], [65535, 257]], dtype=np.uint16))
    assert np.asarray(rgb(i16))[..., 0].tolist() == [[0, 128], [255, 1]]
    i32 = Image.fromarray(np.array([[0, 200]], dtype=np.int32))
    assert np.asarray(rgb(i32))[..., 0].tolist() == [[0, 200]]
    f01 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(rgb(f01))[..., 0].tolist() == [[0, 128, 255]]
    assert (i16.mode, i32.mode, f01.mode) == ("I;16", "I", "F")
    for im in (i16, i32, f01, pal):
        assert rgb(im).mode == "RGB"


def test_data_transform_resize_range_normalize_and_flip():
    img = Image.fromarray(np.linspace(0, 255, 6 * 9 * 3).reshape(6, 9, 3).astype(np.uint8))
    x = data.ImageTransform((8, 12))(img)
    assert x.shape == (3, 8, 12) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    xn = data.ImageTransform((8, 12), normalize=True)(img)
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(xn, (x - mean) / std, atol=1e-6)  # one multiply-subtract: equal up to rounding
    torch.manual_seed(0)
    flips = [data.ImageTransform((8, 12), hflip=True)(img) for _ in range(20)]
    assert all(torch.equal(f, x) or torch.equal(f, x.flip(-1)) for f in flips)
    assert any(torch.equal(f, x.flip(-1)) for f in flips) and any(torch.equal(f, x) for f in flips)


# ---- data: synthetic faces, and loaders with workers ---------------------------------------------

def test_data_synthetic_deterministic_and_varied():
    s1 = load_datasets(None, img_size=(24, 36), synthetic_size=(3, 2), seed=5)
    s2 = load_datasets(None, img_size=(24, 36), synthetic_size=(3, 2), seed=5)
    s3 = load_datasets(None, img_size=(24, 36), synthetic_size=(3, 2), seed=6)
    assert s1.info["format"] == "synthetic" and s1.classes == CLASSES
    x1, y1 = s1.test[4]
    assert x1.shape == (3, 24, 36) and 0 <= x1.min() and x1.max() <= 1
    assert torch.equal(x1, s2.test[4][0]) and y1 == s2.test[4][1]
    assert torch.equal(x1, s1.test[4][0])  # drawn once and kept: the kept copy is identical
    assert np.array_equal(s1.test.source.pixels[4], np.asarray(data.synthetic_face(5, "test", 4, (24, 36))[0]))
    assert not torch.equal(x1, s1.test[5][0]) and not torch.equal(x1, s3.test[4][0])
    assert s1.counts()["test"] == [2] * 7 and sum(s1.counts()["train"]) + sum(s1.counts()["val"]) == 21
    img_a, _ = data.synthetic_face(5, "train", 0, (24, 36))
    img_b, _ = data.synthetic_face(5, "test", 0, (24, 36))
    assert np.asarray(img_a).tobytes() != np.asarray(img_b).tobytes()  # splits are different streams
    for size in ((17, 23), (64, 40), (200, 300)):  # any resolution
        img, label = data.synthetic_face(0, "train", 3, size)
        assert img.size == (size[1], size[0]) and img.mode == "RGB" and label == 3


def test_data_synthetic_drawn_ahead_by_processes_equals_drawn_on_demand(tmp_path, monkeypatch):
    monkeypatch.setenv("FACERWKV_CACHE", str(tmp_path))
    lazy = load_datasets(None, img_size=(24, 36), synthetic_size=(3, 2), seed=4)
    ahead = load_datasets(None, img_size=(24, 36), synthetic_size=(3, 2), seed=4, synthetic_processes=2)
    assert lazy.info["drawn"] is None and lazy.train.source.pixels is None
    assert ahead.info["drawn"]["images"] == 7 * (3 + 2) and ahead.info["drawn"]["processes"] == 2
    assert len(ahead.train.source.pixels) == 21 and len(ahead.test.source.pixels) == 14
    for split in ("train", "val", "test"):
        a, b = getattr(lazy, split), getattr(ahead, split)
        assert a.indices == b.indices
        for k in range(len(a)):
            assert torch.equal(a[k][0], b[k][0]) and a[k][1] == b[k][1]
    assert "synthetic faces drawn: 35 in" in ahead.summary()
    # the sanity subset draws its splits whole too (it reads only a few of them)
    sanity = load_datasets(None, img_size=(24, 36), synthetic_size=(3, 2), sanity_per_class=1, synthetic_processes=2)
    assert sanity.info["drawn"]["images"] == 35 and len(sanity.train.source.pixels) == 21


def test_data_export_synthetic_roundtrip(tmp_path):
    out = data.export_synthetic(str(tmp_path / "synth"), train_per_class=3, test_per_class=1, img_size=(24, 36), seed=2)
    s = load_datasets(out, img_size=(24, 36), val_fraction=0.0)
    assert s.info["format"] == "caer" and s.counts()["train"] == [3] * 7 and s.counts()["test"] == [1] * 7
    for k in range(len(s.test)):
        x, y = s.test[k]
        index = int(os.path.basename(s.test.source.paths[s.test.indices[k]])[:-4])
        img, label = data.synthetic_face(2, "test", index, (24, 36))
        assert y == label
        assert torch.equal(x, data.ImageTransform((24, 36))(img))


def test_data_loader_with_workers(tmp_path):
    root = make_caer(tmp_path / "caer", n_train=4, n_test=2)
    for s in (load_datasets(root, img_size=SIZE), load_datasets(None, img_size=(16, 24), synthetic_size=(2, 2))):
        loader = torch.utils.data.DataLoader(s.test, batch_size=4, num_workers=2)
        xs, ys = zip(*loader)
        assert torch.cat(xs).shape == (14, 3) + tuple(s.info["img_size"])
        assert torch.cat(ys).tolist() == s.test.labels


# ---- data: rough edges ---------------------------------------------------------------------------

def test_data_huge_image_is_named_or_skipped(tmp_path, monkeypatch):
    root = make_caer(tmp_path / "caer", n_train=3, n_test=1)
    big = str(tmp_path / "caer" / "train" / "Happy" / "big.png")
    write_img(big, COLORS[3], size=(40, 40))  # 1,600 pixels
    indexed = load_datasets(root, img_size=SIZE)  # indexed under Pillow's own limit
    # Pillow refuses images over twice MAX_IMAGE_PIXELS (a 240-megapixel photo by default)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(DataError, match="big.png.*too large"):
        load_datasets(root, img_size=SIZE)
    s = load_datasets(root, img_size=SIZE, skip_bad_images=True)
    assert len(s.info["skipped"]) == 1 and "too large" in s.summary()
    assert sum(s.counts()["train"]) + sum(s.counts()["val"]) == 21
    with pytest.raises(DataError, match="image too large: .*big.png"):
        data.load_image(big, SIZE)
    ds = indexed.train if big in [indexed.train.source.paths[i] for i in indexed.train.indices] else indexed.val
    k = [ds.source.paths[i] for i in ds.indices].index(big)
    with pytest.raises(DataError, match="image too large: .*big.png"):  # grown past the limit after indexing
        ds[k]
    ds.skip_bad_images = True
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        x, y = ds[k]
    assert color_of(x) == COLORS[y] and ds.runtime_skipped == [big]


def test_data_folder_tree_with_train_and_valid_reads_valid_as_test(tmp_path):
    """POSTER V2's layout: train/ and valid/, no test/. valid/ is the test split (POSTER V2 reports its
    accuracy there), validation is carved from train/, and the summary says so."""
    for split, n in (("train", 10), ("valid", 3)):
        for y, c in enumerate(("a", "b")):
            for i in range(n):
                write_img(str(tmp_path / split / c / f"{i}.png"), COLORS[y])
    s = load_datasets(str(tmp_path), img_size=SIZE)
    assert s.counts() == {"train": [9, 9], "val": [1, 1], "test": [3, 3]}
    assert {Path(s.test.source.name(i)).parts[-3] for i in s.test.indices} == {"valid"}
    assert {Path(s.val.source.name(i)).parts[-3] for i in s.val.indices} == {"train"}
    assert f"test: {tmp_path / 'valid'} (no test/" in s.summary()
    for ds in (s.train, s.val, s.test):
        check_labels_by_color(ds, s.classes)
    shutil.rmtree(tmp_path / "valid")
    with pytest.raises(DataError, match="needs train/ and test/ \\(or valid/\\)"):
        load_datasets(str(tmp_path), img_size=SIZE)


# ---- data: random erasing ------------------------------------------------------------------------

def erased_box(x):
    """(top, left, h, w) of the one rectangle of x that is 0 in every channel, or None."""
    zero = (x == 0).all(0)
    if not zero.any():
        return None
    rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
    top, left, h, w = rows[0].item(), cols[0].item(), len(rows), len(cols)
    assert zero[top:top + h, left:left + w].all() and zero.sum() == h * w, "not one rectangle"
    return top, left, h, w


def test_data_random_erase_one_rectangle_of_torchvision_size():
    x = torch.rand(3, 40, 60) + 0.1
    state = torch.get_rng_state()
    assert data.random_erase(x, 0.0) is x and torch.equal(torch.get_rng_state(), state)  # off: no draws
    torch.manual_seed(0)
    boxes = [erased_box(data.random_erase(x, 1.0)) for _ in range(300)]
    assert (x > 0).all()  # the input is left as it was
    boxes = [b for b in boxes if b]
    assert len(boxes) >= 270  # a rectangle fits in nearly every try
    areas = np.array([h * w / (40 * 60) for _, _, h, w in boxes])
    aspects = np.array([h / w for _, _, h, w in boxes])
    assert 0.015 < areas.min() and areas.max() < 0.36 and 0.14 < areas.mean() < 0.21  # uniform in 0.02..0.33
    assert 0.25 < aspects.min() < 0.5 and 2.0 < aspects.max() < 4.0  # log-uniform in 0.3..3.3
    assert 0.4 < np.mean(np.log(aspects) > 0) < 0.6
    torch.manual_seed(1)
    half = [erased_box(data.random_erase(x, 0.5)) is not None for _ in range(400)]
    assert 0.4 < np.mean(half) < 0.6
    fixed = [erased_box(data.random_erase(x, 1.0, scale=(0.05, 0.05))) for _ in range(50)]  # POSTER V2's CAER-S
    assert all(abs(h * w - 0.05 * 40 * 60) < 0.2 * 0.05 * 40 * 60 for _, _, h, w in fixed)


def test_data_random_erasing_on_train_only_and_replayed_by_seeded_workers(tmp_path):
    root = make_caer(tmp_path / "caer", n_train=6, n_test=2)
    s = load_datasets(root, img_size=(16, 24), normalize=True, random_erasing=1.0)
    assert "random erasing: 1.0 (area 0.02-0.33)" in s.summary()
    torch.manual_seed(0)
    assert all(erased_box(s.train[k][0]) for k in range(len(s.train)))  # value 0 on the normalised image
    assert not any(erased_box(ds[k][0]) for ds in (s.val, s.test) for k in range(len(ds)))

    def epoch(seed):
        loader = torch.utils.data.DataLoader(s.train, batch_size=5, num_workers=2,
                                             generator=torch.Generator().manual_seed(seed))
        return torch.cat([x for x, _ in loader])

    assert torch.equal(epoch(3), epoch(3)) and not torch.equal(epoch(3), epoch(4))
    with pytest.raises(DataError, match="random_erasing"):
        load_datasets(root, img_size=(16, 24), random_erasing=1.5)
    small = load_datasets(root, img_size=(16, 24), random_erasing=1.0, erasing_scale=(0.05, 0.05))
    areas = [np.prod(erased_box(small.train[k][0])[2:]) for k in range(len(small.train))]
    assert 12 <= min(areas) and max(areas) <= 28  # 5 % of 16 x 24 = 19.2 pixels, up to rounding h and w
    with pytest.raises(DataError, match="erasing_scale"):
        load_datasets(root, img_size=(16, 24), random_erasing=1.0, erasing_scale=(0.5, 0.1))


# ---- data: class-balanced sampling ---------------------------------------------------------------

def test_data_balanced_indices_draw_each_class_equally_seeded_by_epoch():
    labels = [0] * 900 + [5] * 90 + [2] * 10  # heavily imbalanced, class ids with gaps
    idx = data.balanced_indices(labels, 30_000, seed=1, epoch=0)
    assert len(idx) == 30_000 and all(isinstance(i, int) and 0 <= i < 1000 for i in idx[:100])
    drawn = np.array(labels)[idx]
    for c in (0, 5, 2):
        assert abs(np.mean(drawn == c) - 1 / 3) < 0.02
    rare = np.bincount(np.array(idx)[drawn == 2] - 990, minlength=10)  # uniform within a class
    assert rare.min() > 700 and rare.max() < 1300
    assert idx == data.balanced_indices(labels, 30_000, seed=1, epoch=0)
    assert idx != data.balanced_indices(labels, 30_000, seed=1, epoch=1)
    assert idx != data.balanced_indices(labels, 30_000, seed=2, epoch=0)
    with pytest.raises(DataError, match="at least one"):
        data.balanced_indices([], 5, seed=0, epoch=0)


# ---- data: AffectNet -----------------------------------------------------------------------------
# AffectNet's expression numbers, written out here independently of data.py
AFFECTNET_NAMES = ["Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt",
                   "None", "Uncertain", "No-Face"]
AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
                    "expression,valence,arousal")
LABEL_COLORS = COLORS + [(255, 128, 0)]  # by our class index; Contempt is class 7 of AffectNet-8
FACE_COLOR = (10, 20, 30)
AN_SIZE = (16, 24)  # (H, W) of the fixture images, so that they load unresized
FACE_BOX = (12, 4, 12, 12)  # x, y, width, height of the face in every fixture image


def our_class(expression):
    return CLASSES.index(AFFECTNET_NAMES[expression]) if expression < 7 else expression


def write_affectnet_img(path, expression):
    """A 24x16 image in its label's colour, with the face box filled with FACE_COLOR."""
    img = Image.new("RGB", (AN_SIZE[1], AN_SIZE[0]), LABEL_COLORS[our_class(expression)] if expression < 8 else 0)
    x, y, w, h = FACE_BOX
    img.paste(FACE_COLOR, (x, y, x + w, y + h))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


def affectnet_row(rel, expression, box=FACE_BOX):
    return f'{rel},{box[0]},{box[1]},{box[2]},{box[3]},"1.5;2.5;3.5;4.5",{expression},0.25,-0.5'


def make_affectnet(root, n=(4, 2), images="Manually_Annotated_Images", headers=(True, True), extra_train=()):
    """training.csv with n[0] rows and validation.csv with n[1] rows per expression 0..10, in order
    of expression (so training.csv's row of expression e, image i is on line 2 + e * n[0] + i)."""
    for (name, k), header in zip((("training.csv", n[0]), ("validation.csv", n[1])), headers):
        rows = [AFFECTNET_HEADER] if header else []
        for e in range(11):
            for i in range(k):
                rel = f"{100 + e}/{name[:5]}_{e}_{i}.png"
                write_affectnet_img(os.path.join(root, images, rel), e)
                rows.append(affectnet_row(rel, e))
        if name == "training.csv":
            rows += list(extra_train)
        with open(os.path.join(root, name), "w") as f:
            f.write("\n".join(rows) + "\n")
    return str(root)


def check_affectnet_labels(s):
    for split in ("train", "val", "test"):
        ds = getattr(s, split)
        for k in range(len(ds)):
            x, y = ds[k]
            assert x.shape == (3,) + AN_SIZE
            assert [round(v * 255) for v in x[:, 0, 0].tolist()] == list(LABEL_COLORS[y]), f"{split} {k}: {s.classes[y]}"


def test_data_affectnet_7_or_8_classes_mapped_the_rest_dropped_and_counted(tmp_path):
    root = make_affectnet(tmp_path / "an", n=(10, 2))
    assert data.detect_format(root) == "affectnet"
    s = load_datasets(root, img_size=AN_SIZE)
    assert s.info["format"] == "affectnet" and s.classes == CLASSES
    assert s.counts() == {"train": [9] * 7, "val": [1] * 7, "test": [2] * 7}  # val out of train, test = validation.csv
    assert s.info["dropped"] == {"Contempt": 12, "None": 12, "Uncertain": 12, "No-Face": 12}
    text = s.summary()
    assert "validation.csv" in text and "dropped" in text and "Contempt 12" in text and "No-Face 12" in text
    check_affectnet_labels(s)
    s = load_datasets(root, img_size=AN_SIZE, affectnet_classes=8)  # AffectNet-8: Contempt is the last class
    assert s.classes == CLASSES + ("Contempt",)
    assert s.counts() == {"train": [9] * 8, "val": [1] * 8, "test": [2] * 8}
    assert s.info["dropped"] == {"None": 12, "Uncertain": 12, "No-Face": 12}
    check_affectnet_labels(s)
    with pytest.raises(DataError, match="affectnet_classes must be 7 or 8"):
        load_datasets(root, img_size=AN_SIZE, affectnet_classes=10)


def test_data_affectnet_images_under_root_headerless_csv_and_file_lists_folder(tmp_path):
    root = make_affectnet(tmp_path / "an", n=(3, 1), images="", headers=(True, False))
    lists = tmp_path / "an" / "Manually_Annotated_file_lists"  # where the official archive keeps them
    os.makedirs(lists)
    for name in ("training.csv", "validation.csv"):
        os.rename(tmp_path / "an" / name, lists / name)
    assert data.detect_format(root) == "affectnet"
    s = load_datasets(root, img_size=AN_SIZE, val_fraction=0.0)
    assert s.counts()["train"] == [3] * 7 and s.counts()["test"] == [1] * 7
    check_affectnet_labels(s)


def test_data_affectnet_missing_image_named_by_line_or_skipped(tmp_path):
    root = make_affectnet(tmp_path / "an", n=(3, 1))
    victim = os.path.join(root, "Manually_Annotated_Images", "101", "train_1_0.png")  # expression 1, line 5
    os.remove(victim)
    with pytest.raises(DataError) as e:
        load_datasets(root, img_size=AN_SIZE)
    assert "training.csv line 5" in str(e.value) and victim in str(e.value) and "not found" in str(e.value)
    s = load_datasets(root, img_size=AN_SIZE, skip_bad_images=True, val_fraction=0.0)
    assert len(s.info["skipped"]) == 1 and "skipped 1 file: unreadable 1 (first: " in s.summary()
    assert s.counts()["train"][CLASSES.index("Happy")] == 2


@pytest.mark.parametrize("row, message", [
    ("100/x.png,1,2,3,4,,notanumber,0,0", "malformed"),
    (affectnet_row("100/train_0_0.png", 11), "expression 11 out of range 0..10"),
    (affectnet_row("", 3), "malformed"),
    ("100/train_0_0.png", "malformed"),
])
def test_data_affectnet_bad_rows_named_by_line_or_skipped(tmp_path, row, message):
    root = make_affectnet(tmp_path / "an", n=(2, 1), extra_train=[row])
    with pytest.raises(DataError, match=f"training.csv line {2 + 11 * 2}: .*{message}"):
        load_datasets(root, img_size=AN_SIZE)
    s = load_datasets(root, img_size=AN_SIZE, skip_bad_images=True, val_fraction=0.0)
    assert len(s.info["skipped"]) == 1 and s.counts()["train"] == [2] * 7


def test_data_affectnet_bad_header_is_named(tmp_path):
    root = make_affectnet(tmp_path / "an", n=(1, 1))
    text = open(os.path.join(root, "training.csv")).read().replace("expression", "emotion", 1)
    with open(os.path.join(root, "training.csv"), "w") as f:
        f.write(text)
    with pytest.raises(DataError, match="training.csv line 1: the header lacks expression"):
        load_datasets(root, img_size=AN_SIZE)


def test_data_affectnet_crop_face_crops_the_csv_box(tmp_path):
    root = make_affectnet(tmp_path / "an", n=(2, 1), extra_train=[affectnet_row("100/train_0_0.png", 0, (30, 0, 5, 5))])
    with pytest.raises(DataError, match=f"training.csv line {2 + 11 * 2}: face box .*outside"):
        load_datasets(root, img_size=AN_SIZE, crop_face=True)
    s = load_datasets(root, img_size=AN_SIZE, crop_face=True, skip_bad_images=True)
    face = torch.tensor(FACE_COLOR, dtype=torch.float32).view(3, 1, 1) / 255
    for ds in (s.train, s.val, s.test):
        for k in range(len(ds)):
            assert torch.allclose(ds[k][0], face.expand(3, *AN_SIZE), atol=1e-6)  # nothing but the face
    plain = load_datasets(root, img_size=AN_SIZE, skip_bad_images=True)  # default: the image as stored
    assert not torch.allclose(plain.test[0][0][:, 0, 0], face.flatten())
    with pytest.raises(DataError, match="crop_face"):
        load_datasets(make_caer(tmp_path / "caer", n_train=2, n_test=1), img_size=SIZE, crop_face=True)


def make_numbered(root, splits=("train", "val"), n=3, folders=range(9)):
    for split in splits:
        for e in folders:
            for i in range(n):
                write_affectnet_img(os.path.join(root, split, str(e), f"{i}.png"), e)
    return str(root)


def test_data_affectnet_numbered_folders_mapped_by_affectnet_numbering(tmp_path):
    root = make_numbered(tmp_path / "an")  # train/ and val/ (the official validation set), folders 0..8
    assert data.detect_format(root) == "folder"  # numbers are only AffectNet's when asked for
    with pytest.raises(DataError, match="are numbers.*--dataset rafdb.*--dataset affectnet.*--dataset folder"):
        load_datasets(root, img_size=AN_SIZE)
    s = load_datasets(root, fmt="affectnet", img_size=AN_SIZE)
    assert s.classes == CLASSES and s.counts()["test"] == [3] * 7  # val/ is the test split
    assert s.counts()["val"] == [1] * 7 and s.info["dropped"] == {"Contempt": 6, "None": 6}
    check_affectnet_labels(s)
    s8 = load_datasets(root, fmt="affectnet", img_size=AN_SIZE, affectnet_classes=8)
    assert s8.classes == CLASSES + ("Contempt",) and s8.counts()["test"] == [3] * 8
    check_affectnet_labels(s8)
    flat = load_datasets(make_numbered(tmp_path / "flat", splits=("",), n=5, folders=range(7)),
                         fmt="affectnet", img_size=AN_SIZE)
    assert flat.counts()["test"] == [1] * 7 and flat.counts()["val"] == [1] * 7
    check_affectnet_labels(flat)


def test_data_affectnet_numbered_folders_errors(tmp_path):
    root = make_numbered(tmp_path / "an", folders=range(7))
    with pytest.raises(DataError, match="lacks the AffectNet-8 class folders 7 \\(Contempt\\)"):
        load_datasets(root, fmt="affectnet", img_size=AN_SIZE, affectnet_classes=8)
    os.makedirs(tmp_path / "an" / "train" / "happy")
    with pytest.raises(DataError, match="unexpected folder .*happy.*0 Neutral, 1 Happy"):
        load_datasets(root, fmt="affectnet", img_size=AN_SIZE)


# ---- data: the synthetic faces' disk cache and drawing -------------------------------------------

def npy_entries(folder):
    return sorted(p for p in Path(folder).iterdir() if p.name.startswith("synthetic-") and p.suffix == ".npy")


def test_data_synthetic_cache_second_run_reads_the_same_pixels(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FACERWKV_CACHE", str(cache))
    kw = dict(img_size=(24, 36), synthetic_size=(3, 1), seed=3, synthetic_processes=2)
    first = load_datasets(None, **kw)
    assert len(npy_entries(cache)) == 2 and first.info["drawn"]["from_cache"] == 0  # train and test
    fresh = {split: [np.asarray(data.synthetic_face(3, split, i, (24, 36))[0]) for i in range(n * 7)]
             for split, n in (("train", 3), ("test", 1))}

    def no_drawing(*args):
        raise AssertionError("drew a face that is in the cache")

    monkeypatch.setattr(data, "_draw_all", no_drawing)
    second = load_datasets(None, **kw)
    assert second.info["drawn"]["images"] == second.info["drawn"]["from_cache"] == 28
    assert "read back from the cache" in second.summary()
    for split in ("train", "test"):
        source = getattr(second, split).source
        assert all(np.array_equal(source.pixels[i], fresh[split][i]) for i in range(len(source)))
    for split in ("train", "val", "test"):
        a, b = getattr(first, split), getattr(second, split)
        assert a.indices == b.indices and all(torch.equal(a[k][0], b[k][0]) for k in range(len(a)))


@pytest.mark.parametrize("change, hits", [(dict(seed=4), 0), (dict(img_size=(24, 37)), 0), (dict(generator="edited"), 0),
                                          (dict(synthetic_size=(2, 1)), 7)])  # the test split is unchanged
def test_data_synthetic_cache_key_changes_miss(tmp_path, monkeypatch, change, hits):
    monkeypatch.setenv("FACERWKV_CACHE", str(tmp_path))
    kw = dict(img_size=(24, 36), synthetic_size=(3, 1), seed=3, synthetic_processes=2)
    load_datasets(None, **kw)
    assert len(npy_entries(tmp_path)) == 2
    if change.pop("generator", None):  # the drawing code was edited
        monkeypatch.setattr(data, "SYNTHETIC_VERSION", data.SYNTHETIC_VERSION + 1)
    s = load_datasets(None, **{**kw, **change})
    assert s.info["drawn"]["from_cache"] == hits and len(npy_entries(tmp_path)) == 4 - hits // 7


# ---- data: the drawn-face cache, AffectNet csv files, the whole-batch transform -----------------


@pytest.mark.parametrize("damage", ["zeroed", "emptied", "not an array"])
def test_data_synthetic_cache_corrupt_entry_reported_deleted_and_redrawn(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("FACERWKV_CACHE", str(tmp_path))
    kw = dict(img_size=(20, 30), synthetic_size=(2, 1), seed=1, synthetic_processes=2)
    first = load_datasets(None, **kw)
    assert first.info["drawn"]["from_cache"] == 0 and len(npy_entries(tmp_path)) == 2
    fresh = {split: np.stack([np.asarray(data.synthetic_face(1, split, i, (20, 30))[0]) for i in range(n * 7)])
             for split, n in (("train", 2), ("test", 1))}
    for entry in npy_entries(tmp_path):  # same size, pixels zeroed (the header too); an empty file; a disk that filled up
        entry.write_bytes({"zeroed": bytes(entry.stat().st_size), "emptied": b"", "not an array": b"not an array"}[damage])
    capsys.readouterr()
    again = load_datasets(None, **kw)
    err = capsys.readouterr().err
    assert again.info["drawn"]["from_cache"] == 0 and "read back" not in again.summary()
    assert err.count("does not match its digest") == 2 and all(len(line) < 300 for line in err.splitlines())
    for split in ("train", "test"):
        assert np.array_equal(getattr(again, split).source.pixels, fresh[split])  # never the zeros
    third = load_datasets(None, **kw)
    assert third.info["drawn"]["from_cache"] == 21 and "read back from the cache" in third.summary()
    assert np.array_equal(third.train.source.pixels, fresh["train"])


def test_data_synthetic_cache_off_draws_the_same_pixels_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FACERWKV_CACHE", str(tmp_path))
    kw = dict(img_size=(20, 30), synthetic_size=(2, 1), seed=2)
    off = load_datasets(None, **kw, synthetic_processes=2, synthetic_cache=False)
    lazy = load_datasets(None, **kw)  # drawn on first use, in memory
    assert npy_entries(tmp_path) == [] and lazy.test.source.pixels is None
    assert all(torch.equal(off.test[k][0], lazy.test[k][0]) for k in range(len(off.test)))
    assert np.array_equal(off.test.source.pixels, lazy.test.source.pixels)


def write_excel_csv(path):
    """Rewrite a csv as Excel's "CSV UTF-8" saves it: a byte-order mark and CRLF line ends."""
    text = path.read_text()
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())


def test_data_affectnet_excel_csv_utf8_with_bom_and_crlf_accepted(tmp_path):
    root = make_affectnet(tmp_path / "an", n=(3, 1))
    for name in ("training.csv", "validation.csv"):
        write_excel_csv(tmp_path / "an" / name)
    assert (tmp_path / "an" / "training.csv").read_bytes().startswith(b"\xef\xbb\xbfsubDirectory_filePath")
    s = load_datasets(root, img_size=AN_SIZE, crop_face=True)
    assert s.counts()["test"] == [1] * 7 and sum(s.counts()["train"]) + sum(s.counts()["val"]) == 21
    check_affectnet_labels(load_datasets(root, img_size=AN_SIZE))


@pytest.mark.parametrize("missing", ["validation.csv", "training.csv"])
def test_data_affectnet_missing_csv_is_named(tmp_path, missing):
    root = make_affectnet(tmp_path / "an", n=(2, 1))
    os.remove(tmp_path / "an" / missing)
    assert data.detect_format(root) == "affectnet"
    for fmt in ("auto", "affectnet"):
        with pytest.raises(DataError, match=f"{missing} not found") as e:
            load_datasets(root, fmt=fmt, img_size=AN_SIZE)
        assert "folder" not in str(e.value) and "\n" not in str(e.value)


# ---- the whole-batch transform equals the same transform applied image by image ------------------

def reference_random_erase(x, p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0.0):
    """Random erasing of one image, torchvision's RandomErasing written out: the reference the
    whole-batch path is held to, RNG draws included."""
    if p <= 0 or not torch.rand(1) < p:
        return x
    H, W = x.shape[-2:]
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        area = H * W * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if h < H and w < W:
            top = torch.randint(0, H - h + 1, size=(1,)).item()
            left = torch.randint(0, W - w + 1, size=(1,)).item()
            x = x.clone()
            x[..., top:top + h, left:left + w] = value
            return x
    return x


class ReferenceTransform:
    """The image-by-image transform the batch path replaced: convert, resize, normalise, flip, erase."""

    def __init__(self, img_size, hflip, normalize, random_erasing, erasing_scale):
        self.img_size, self.hflip = img_size, hflip
        self.random_erasing, self.erasing_scale = random_erasing, erasing_scale
        std, mean = torch.tensor(data.IMAGENET_STD).view(3, 1, 1), torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
        self.scale = 1 / (255 * std) if normalize else torch.full((3, 1, 1), 1 / 255)
        self.shift = mean / std if normalize else torch.zeros(3, 1, 1)

    def __call__(self, img):
        img = data.to_rgb(img)
        H, W = self.img_size
        if img.size != (W, H):
            img = img.resize((W, H), Image.BILINEAR)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()
        x = x.mul_(self.scale).sub_(self.shift)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return reference_random_erase(x, self.random_erasing, self.erasing_scale)


class ReferenceDataset(torch.utils.data.Dataset):
    def __init__(self, ds, transform):
        self.ds, self.transform = ds, transform

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, k):
        i = self.ds.indices[k]
        return self.transform(self.ds.source.load(i)), self.ds.source.labels[i]


@pytest.mark.parametrize("normalize, hflip, erasing, scale", [(True, True, 0.5, (0.02, 0.33)), (False, True, 1.0, (0.05, 0.05)),
                                                              (True, False, 0.0, (0.02, 0.33))])
def test_data_batch_transform_bit_identical_to_image_by_image_with_the_same_rng_draws(tmp_path, normalize, hflip,
                                                                                     erasing, scale):
    root = make_caer(tmp_path / "caer", n_train=6, n_test=2)
    size = (10, 14)  # the files are 12 x 8: resized
    s = load_datasets(root, img_size=size, normalize=normalize, hflip=hflip, random_erasing=erasing,
                      erasing_scale=scale, val_fraction=0.0)
    for image in range(len(s.train)):  # paint each image so that flips and erasing show
        s.train.source.paths[image] = str(tmp_path / f"ramp{image}.png")
        ramp = np.linspace(0, 255, 8 * 12 * 3).reshape(8, 12, 3) + 7 * image
        Image.fromarray(ramp.clip(0, 255).astype(np.uint8)).save(s.train.source.paths[image])
    reference = ReferenceDataset(s.train, ReferenceTransform(size, hflip, normalize, erasing, scale))
    order = list(torch.randperm(len(s.train), generator=torch.Generator().manual_seed(0)))
    for workers in (0, 2):
        torch.manual_seed(7)
        loader = torch.utils.data.DataLoader(s.train, batch_size=5, sampler=order, num_workers=workers,
                                             generator=torch.Generator().manual_seed(3))
        batches = list(loader)
        state = torch.get_rng_state()
        torch.manual_seed(7)
        loader = torch.utils.data.DataLoader(reference, batch_size=5, sampler=order, num_workers=workers,
                                             generator=torch.Generator().manual_seed(3))
        expected = list(loader)
        assert torch.equal(torch.get_rng_state(), state)  # the same draws from the global RNG
        assert len(batches) == len(expected) == 9
        for (x, y), (x_ref, y_ref) in zip(batches, expected):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    torch.manual_seed(5)
    one = [s.train[k][0] for k in range(len(s.train))]  # one at a time equals in a batch
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(one, (x for x, _ in s.train.__getitems__(range(len(s.train))))))
    if erasing or hflip:
        assert not all(torch.equal(a, s.val.transform(s.train.source.load(i)))
                       for a, i in zip(one, s.train.indices))  # augmentation did something


def test_data_erasing_settings_checked_in_one_place():
    assert data.check_erasing(0.5, [0.02, 0.1]) == (0.5, (0.02, 0.1))
    for p, scale in ((1.5, (0.02, 0.33)), (-0.1, (0.02, 0.33)), (float("nan"), (0.02, 0.33)), (0.5, (0.5, 0.1)),
                     (0.5, (0.0, 0.1)), (0.5, (0.1, 1.0)), (0.5, (0.1,))):
        with pytest.raises(DataError, match="erasing"):
            data.check_erasing(p, scale)
        with pytest.raises(DataError, match="erasing"):
            load_datasets(None, random_erasing=p, erasing_scale=scale)


# ---- synthetic faces: drawn face by face, lit as a batch ----------------------------------------

def reference_lighting(canvas, rng):
    """One face's lighting, contrast and noise, face by face (the per-image code the batch replaced)."""
    H, W = canvas.shape[:2]
    a = canvas.astype(np.float32)
    theta = data._uniform(rng, 0, 2 * math.pi)
    xs = (np.arange(W, dtype=np.float32) / W - 0.5) * np.float32(np.cos(theta))
    ys = (np.arange(H, dtype=np.float32) / H - 0.5) * np.float32(np.sin(theta))
    level, slope = np.float32(data._uniform(rng, 0.75, 1.2)), np.float32(data._uniform(rng, 0.0, 0.6))
    gain = level * (1.0 + slope * (ys[:, None] + xs))
    a -= 128.0
    a *= np.float32(data._uniform(rng, 0.75, 1.1))
    a += 128.0
    noise = rng.standard_normal(a.shape, dtype=np.float32)
    noise *= np.float32(data._uniform(rng, 2.0, 8.0))
    a *= gain[..., None]
    a += noise
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(36, 48), (112, 112), (20, 30)])
def test_data_synthetic_batch_lighting_equals_face_by_face(size):
    indices = list(range(40))
    batch = data._draw_faces((3, "train", indices, size))
    assert batch.shape == (40,) + size + (3,) and batch.dtype == np.uint8
    for i in indices:
        canvas, rng = data._draw_canvas(3, "train", i, size)
        assert np.array_equal(batch[i], reference_lighting(canvas, rng)), i
        assert not np.array_equal(batch[i], canvas)  # lighting and noise did something
    assert np.array_equal(batch[7:9], data._draw_faces((3, "train", [7, 8], size)))  # whatever the batch
    assert np.array_equal(batch[5], np.asarray(data.synthetic_face(3, "train", 5, size)[0]))


def test_data_synthetic_drawn_in_chunks_and_processes_equal_one_by_one():
    one = np.stack([np.asarray(data.synthetic_face(1, "test", i, (20, 30))[0]) for i in range(23)])
    for processes in (1, 2):  # chunks of 5 and of 2 faces
        assert np.array_equal(data._draw_all(1, "test", 23, (20, 30), processes), one)
    assert len({one[i].tobytes() for i in range(23)}) == 23


def test_data_synthetic_paste_rotated_equals_rotate_then_paste_and_rgba_equals_rgbA():
    """_paste_rotated equals Pillow's rotate then paste; the face layer is drawn as RGBa (opaque shapes on
    transparent, edges touching: the same bytes as RGBA), so resampling skips the RGBA -> RGBa conversion."""
    rng = np.random.default_rng(1)
    for trial in range(30):
        side = int(rng.integers(20, 90))
        layers = [Image.new(mode, (side, side), (0, 0, 0, 0)) for mode in ("RGBA", "RGBa")]
        shapes = [(rng.integers(-10, side, 2), rng.integers(1, side, 2), tuple(int(c) for c in rng.integers(1, 256, 3)))
                  for _ in range(3)]
        for layer in layers:
            draw = ImageDraw.Draw(layer)
            for (x0, y0), (w, h), color in shapes:
                draw.ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=color, outline=color[::-1], width=2)
        assert np.array_equal(np.asarray(layers[0]), np.asarray(layers[1]))
        canvas = Image.fromarray(rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8))
        angle, left, top = rng.uniform(-30, 30), int(rng.integers(-30, 60)), int(rng.integers(-30, 40))
        expected = canvas.copy()
        turned = layers[0].rotate(angle, resample=Image.BILINEAR)
        expected.paste(turned, (left, top), turned)
        for layer in layers:  # an RGBA layer, and the RGBa one the faces are drawn on
            pasted = canvas.copy()
            data._paste_rotated(pasted, layer, angle, left, top)
            assert np.array_equal(np.asarray(pasted), np.asarray(expected)), (trial, layer.mode)


# ---- data: the user's own photos and folders ----------------------------------------------------

def test_data_exif_orientation_6_is_read_upright_by_every_route(tmp_path):
    """A phone JPEG stored on its side with EXIF orientation 6 ("turn 90 degrees clockwise to view")
    is read as a person sees it: the stored pixels turned clockwise (numpy's rot90), for prediction
    (load_image) and for training and evaluation (a dataset's items)."""
    stored = Image.fromarray(np.linspace(0, 255, 12 * 8 * 3).reshape(12, 8, 3).astype(np.uint8))  # 8 wide, 12 high
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "tree" / "test" / "b" / "phone.jpg"
    os.makedirs(path.parent)
    stored.save(path, exif=exif, quality=95)
    with Image.open(path) as im:  # the decoded pixels as stored, turned by numpy
        upright = torch.from_numpy(np.rot90(np.asarray(im.convert("RGB")), k=-1).copy()).permute(2, 0, 1) / 255
    assert upright.shape == (3,) + SIZE
    assert torch.allclose(data.load_image(str(path), SIZE), upright, atol=1e-6)
    for split, n in (("train", 2), ("test", 1)):
        for c in ("a", "b"):
            for i in range(n):
                write_img(str(tmp_path / "tree" / split / c / f"{i}.png"), COLORS[0])
    s = load_datasets(str(tmp_path / "tree"), img_size=SIZE)
    k = [s.test.source.name(i) for i in s.test.indices].index(str(path))
    assert torch.allclose(s.test[k][0], upright, atol=1e-6)


def make_linked_tree(root):
    """A folder tree of two classes whose a/ holds a linked folder (3 images), a link back to a/
    itself (a loop) and stray files; b/ holds a broken image with a Latin-1 (not UTF-8) name."""
    for split, n in (("train", 4), ("test", 2)):
        for y, c in enumerate(("a", "b")):
            for i in range(n):
                write_img(str(root / split / c / f"{i}.png"), COLORS[y])
    for i in range(3):
        write_img(str(root.parent / "elsewhere" / f"{i}.png"), COLORS[0])
    os.symlink(root.parent / "elsewhere", root / "train" / "a" / "linked")
    os.symlink(root / "train" / "a", root / "train" / "a" / "loop")
    for junk in (".DS_Store", "notes.txt"):
        (root / "train" / "a" / junk).write_bytes(b"junk")
    latin1 = os.path.join(os.fsencode(root / "train" / "b"), b"caf\xe9.png")
    with open(latin1, "wb") as f:
        f.write(b"not a png")
    return str(root)


def test_data_walk_follows_linked_folders_and_counts_every_skip_by_reason(tmp_path):
    """The folder walk reads a linked sub-folder's images, reads each real folder once (a link loop
    ends), and the summary counts each file not taken by reason; a name that is not UTF-8 prints on a
    strict UTF-8 terminal, as an escape."""
    root = make_linked_tree(tmp_path / "tree")
    with pytest.raises(DataError) as e:
        load_datasets(root, img_size=SIZE)
    assert "caf\\udce9.png: not a readable image" in str(e.value)
    s = load_datasets(root, img_size=SIZE, skip_bad_images=True, val_fraction=0.0)
    assert s.counts()["train"] == [4 + 3, 4]
    assert sorted(os.path.relpath(s.train.source.name(i), root) for i, y in zip(s.train.indices, s.train.labels)
                  if y == 0) == [f"train/a/{i}.png" for i in range(4)] + [f"train/a/linked/{i}.png" for i in range(3)]
    check_labels_by_color(s.train, s.classes)
    line = next(line for line in s.summary().splitlines() if line.startswith("skipped"))
    assert line.startswith("skipped 4 files: hidden 1, not an image 1, linked folder read already 1, unreadable 1 "
                           f"(first: {tmp_path / 'tree' / 'train' / 'b'}/caf\\udce9.png: not a readable image")
    terminal = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    print(s.summary(), file=terminal)
    terminal.flush()


def test_data_layout_one_level_too_deep_or_of_one_class_is_one_line(tmp_path):
    """CAER-S unzipped one level too deep (ROOT/CAER-S/{train,test}/...) is refused by a line that
    names the folder to give instead, whatever the format; so is a tree of one class folder."""
    make_caer(tmp_path / "root" / "CAER-S", n_train=2, n_test=1)
    for fmt in ("auto", "caer", "folder"):
        with pytest.raises(DataError, match=f"one level down; give {re.escape(str(tmp_path / 'root' / 'CAER-S'))} "):
            load_datasets(str(tmp_path / "root"), fmt=fmt, img_size=SIZE)
    write_img(str(tmp_path / "one" / "happy" / "0.png"), COLORS[0])
    with pytest.raises(DataError, match="has 1 class folder.*two or more"):
        load_datasets(str(tmp_path / "one"), img_size=SIZE)


def test_data_image_files_takes_files_folders_and_globs_and_skips_what_it_cannot_read(tmp_path):
    """Bulk prediction's inputs: a file, a folder (its image files, through linked folders), a glob
    the shell did not expand; a missing path and non-images are skipped with a reason, never raised."""
    root = make_linked_tree(tmp_path / "tree")
    files, skipped = data.image_files([f"{root}/test/*/1.png", f"{root}/train/a", str(tmp_path / "nope.jpg"),
                                       f"{root}/train/a/notes.txt", f"{root}/*/zzz*.png", f"{root}/test/a/1.png"])
    a = [f"{root}/train/a/{i}.png" for i in range(4)] + [f"{root}/train/a/linked/{i}.png" for i in range(3)]
    assert files == [f"{root}/test/a/1.png", f"{root}/test/b/1.png"] + a  # each file once
    assert skipped == [(f"{root}/train/a/.DS_Store", "hidden"), (f"{root}/train/a/notes.txt", "not an image"),
                       (f"{root}/train/a/loop", "linked folder read already"),
                       (str(tmp_path / "nope.jpg"), "no such file or folder"),
                       (f"{root}/train/a/notes.txt", "not an image"), (f"{root}/*/zzz*.png", "matches nothing")]


def make_posterv2_rafdb(raf_root, root):
    """POSTER V2's RAF-DB tree from an EmoLabel-layout copy: ROOT/{train,valid}/{1..7}/, a folder per
    RAF-DB label number, the test images in valid/."""
    for line in open(os.path.join(raf_root, "EmoLabel", "list_patition_label.txt")):
        name, label = line.split()
        split = "train" if name.startswith("train") else "valid"
        os.makedirs(os.path.join(root, split, label), exist_ok=True)
        shutil.copy(os.path.join(raf_root, "Image", "aligned", name[:-4] + "_aligned.jpg"),
                    os.path.join(root, split, label, name))
    return str(root)


def test_data_rafdb_posterv2_folders_labelled_as_the_emolabel_layout(tmp_path):
    """With --dataset rafdb, POSTER V2's tree (folders 1..7 under train/ and valid/) gives the same
    images with the same labels, by name, as RAF-DB's own EmoLabel layout; auto-detected, numbered
    folders are refused with the advice; --dataset folder takes the numbers as class names."""
    raf = make_rafdb(tmp_path / "raf", n_train=4, n_test=2)
    tree = make_posterv2_rafdb(raf, tmp_path / "posterv2")

    def labelled(s, splits):
        return sorted((os.path.basename(ds.source.name(i)).split(".")[0].removesuffix("_aligned"), s.classes[y])
                      for ds in (getattr(s, split) for split in splits) for i, y in zip(ds.indices, ds.labels))
    own, folders = (load_datasets(r, fmt="rafdb", img_size=SIZE) for r in (raf, tree))
    assert folders.classes == own.classes == CLASSES and folders.counts()["test"] == own.counts()["test"]
    assert labelled(folders, ["test"]) == labelled(own, ["test"])
    assert labelled(folders, ["train", "val"]) == labelled(own, ["train", "val"])
    for ds in (folders.train, folders.val, folders.test):
        check_labels_by_color(ds)
    with pytest.raises(DataError, match="are numbers .*--dataset rafdb .*1-7.*--dataset affectnet .*0-7.*--dataset folder"):
        load_datasets(tree, img_size=SIZE)
    assert load_datasets(tree, fmt="folder", img_size=SIZE).classes == tuple("1234567")


# ---- train.py (-k test_train) --------------------------------------------------------------------
HERE = Path(__file__).resolve().parent
# 7 classes x 4 train / 2 test faces of 32x48, 24 tokens, d=16: a step takes milliseconds
TINY_ARGS = ["--img-size", "32", "48", "--patch-size", "8", "--n-layer", "1", "--n-embd", "16",
             "--synthetic-size", "4", "2", "--batch-size", "8", "--workers", "0", "--log-every", "1"]


def run(tmp, name, *extra):
    return train.main([*TINY_ARGS, "--out", str(tmp), "--name", name, *extra])


def expect_exit_2(capsys, argv, *words):
    """train.py exits with status 2 and a message naming words, not a traceback."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    return err


def torchrun(*argv, nproc=2):
    """Starts train.py under torchrun and returns at once; calling the result waits for the run's stdout
    (two runs started one after the other share the wait: most of a launch is importing torch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / "train.py"), *TINY_ARGS, *argv]
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
        return out
    return finish


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return run(out, "tiny", "--epochs", "2")


def test_train_tiny_run_end_to_end(tiny_run):
    run_dir = Path(tiny_run["run_dir"])
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "test_metrics.json", "confusion.csv",
                 "summary.json"):
        assert (run_dir / name).is_file(), name
    assert 0.0 <= tiny_run["test_acc"] <= 1.0 and tiny_run["params"] > 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["val_acc"] <= 1 for r in rows)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["n_embd"] == 16 and config["args"]["lr"] == 1e-3
    assert config["model"]["imagenet_norm"] is True and config["data"]["normalize"] is True  # by default
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert sum(map(sum, metrics["confusion"])) == 7 * 2 == metrics["n"]
    assert (run_dir / "confusion.csv").read_text().splitlines()[0].split(",")[1:] == list(data.CLASSES)


def test_train_schedule_warmup_then_cosine_per_step():
    w, total = 10, 50
    f = [train.lr_factor(s, w, total) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[w] == pytest.approx(1.0)
    assert all(b - a == pytest.approx(0.09) for a, b in zip(f[:w], f[1:w + 1]))   # linear, per step
    assert all(b < a for a, b in zip(f[w:], f[w + 1:]))                          # then only down
    assert f[w + (total - w) // 2] == pytest.approx(0.5) and f[-1] < 0.01          # cosine to ~0
    # the LambdaLR stepped once per batch follows it
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = train.make_scheduler(opt, w, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3 * x for x in f])


def test_train_clipping_happens_after_backward():
    model = torch.nn.Linear(4, 7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = train.make_scheduler(opt, 1, 10)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()))
    images, labels = 100 * torch.randn(16, 4), torch.randint(0, 7, (16,))
    train.train_step(model, images, labels, opt, sched, 0.0, contextlib.nullcontext())
    assert seen[-1] > 1.0                       # unclipped, this batch's gradient is large
    train.train_step(model, images, labels, opt, sched, 1.0, contextlib.nullcontext())
    assert seen[-1] == pytest.approx(1.0, rel=1e-4)  # the optimizer sees the clipped gradient


def kill_and_resume(tmp_path, *common):
    """A run of 3 epochs, and the same run killed after step 7 and resumed: 28 train images - 7 val
    = 21 -> 3 steps per epoch, 9 in all; last.pt every 2 steps (so step 6, mid-epoch 3) and per
    epoch. Both end with the same weights. -> (the full run's result and last.pt, the resumed run's)."""
    common = ["--epochs", "3", "--save-every-steps", "2", *common]
    full = run(tmp_path, "full", *common)
    assert run(tmp_path, "killed", *common, "--stop-after-steps", "7")["stopped_at_step"] == 7
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["step"] == 6
    resumed = train.main(["--resume", str(tmp_path / "killed")])
    a, b = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("full", "killed"))
    assert a["step"] == b["step"] == full["steps"] == 9
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    return full, a, resumed


def test_train_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    full, _, resumed = kill_and_resume(tmp_path, "--hflip")
    assert resumed["test_acc"] == full["test_acc"]
    rows = lambda name: (tmp_path / name / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    strip = lambda r: {k: v for k, v in json.loads(r).items() if k != "epoch_time_s"}  # noqa: E731
    assert list(map(strip, rows("full"))) == list(map(strip, rows("killed")))


def test_train_best_checkpoint_is_the_epoch_of_highest_validation_accuracy(tmp_path, monkeypatch):
    """Validation stubbed to 0.2, 0.6, 0.4: best.pt holds epoch 2's weights, and the test metrics
    are those of epoch 2's weights (each epoch's measured on test here, apart from best.pt)."""
    real, scripted, val_set, weights, on_test = train.evaluate, iter([0.2, 0.6, 0.4]), [], [], []

    def evaluate(model, dataset, *a, **k):
        if val_set in ([], [dataset]):  # validation, at the end of each epoch
            val_set[:] = [dataset]
            weights.append({n: t.clone() for n, t in model.state_dict().items()})
            return {**real(model, dataset, *a, **k), "acc": next(scripted)}
        for w in weights:  # the test split: every epoch's weights, then what train.py chose
            twin = copy.deepcopy(model)
            twin.load_state_dict(w)
            on_test.append(real(twin, dataset, *a, **k))
        return real(model, dataset, *a, **k)

    monkeypatch.setattr(train, "evaluate", evaluate)
    result = run(tmp_path, "best", "--epochs", "3")
    assert len(weights) == 3 and result["best_epoch"] == 2 and result["best_val_acc"] == 0.6
    rows = [json.loads(r) for r in (tmp_path / "best" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_acc"] for r in rows] == [0.2, 0.6, 0.4]
    best = torch.load(tmp_path / "best" / "best.pt", weights_only=True)
    assert best["best_epoch"] == 2 and best["epoch"] == 2
    assert all(torch.equal(best["model"][n], t) for n, t in weights[1].items())
    for other in (weights[0], weights[2]):
        assert any(not torch.equal(best["model"][n], t) for n, t in other.items())
    saved = json.loads((tmp_path / "best" / "test_metrics.json").read_text())
    assert result["test_confusion"] == saved["confusion"] == on_test[1]["confusion"]
    assert saved["loss"] == pytest.approx(on_test[1]["loss"], rel=1e-12)
    assert all(saved["loss"] != pytest.approx(on_test[e]["loss"], rel=1e-9) for e in (0, 2))


def test_train_eval_only_and_predict(tiny_run, tmp_path, capsys):
    ckpt = Path(tiny_run["run_dir"]) / "best.pt"
    result = train.main(["--eval-only", str(ckpt)])
    assert result["test_acc"] == tiny_run["test_acc"] and result["n"] == 14
    out = capsys.readouterr().out
    assert "true \\ pred" in out and all(c in out for c in data.CLASSES)
    # a checkpoint saved from a DistributedDataParallel model ('module.' prefix) loads the same
    state = torch.load(ckpt, weights_only=True)
    state["model"] = {"module." + k: v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "prefixed.pt")
    assert train.main(["--eval-only", str(tmp_path / "prefixed.pt")])["test_acc"] == tiny_run["test_acc"]

    paths = []
    for i in range(2):
        image, _ = data.synthetic_face(1, "test", i, (40, 60))
        paths.append(str(tmp_path / f"face{i}.png"))
        image.save(paths[-1])
    probs = train.main(["--predict", *paths, "--ckpt", str(ckpt)])["predictions"]
    assert list(probs) == paths
    for p in probs.values():
        assert list(p) == list(data.CLASSES) and sum(p.values()) == pytest.approx(1.0, abs=1e-5)
    assert paths[0] in capsys.readouterr().out


def test_train_linear_probe_on_pixels(tmp_path, capsys):
    # one solid colour per class: a linear classifier on pixels must get every test image right
    root = make_caer(tmp_path / "caer", n_train=10, n_test=3)
    result = train.main([*TINY_ARGS, "--data", root, "--linear-probe", "--epochs", "3", "--no-imagenet-norm",
                         "--out", str(tmp_path)])
    assert result["test_acc"] == 1.0 and 1 <= result["best_epoch"] <= 3
    out = capsys.readouterr().out
    assert "normalize: False" in out and "linear classifier on 4,608 pixel values: 32,263 parameters" in out
    assert "test acc 100.00%" in out


def test_train_plot_draws_a_png_with_a_pillow_before_10_1(tiny_run, tmp_path, monkeypatch):
    """Pillow before 10.1: ImageFont.load_default takes no size (today's Pillow: the test below)."""
    real = ImageFont.load_default

    def old_load_default(**kwargs):
        if kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return real()
    monkeypatch.setattr(ImageFont, "load_default", old_load_default)
    out = tmp_path / "val.png"
    train.main(["--plot", tiny_run["run_dir"], tiny_run["run_dir"], "--plot-out", str(out)])
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 400


def test_train_two_processes_count_every_test_image_once_and_checkpoint_every_rank(tmp_path):
    """Two processes: each test image is counted once (the one-process evaluation of the same best.pt
    agrees) and best.pt has no 'module.' prefix; a mid-epoch last.pt holds the global batch's sums and
    both ranks' RNG states, and resumes in one process to the end of the run."""
    whole = torchrun("--epochs", "1", "--out", str(tmp_path), "--name", "ddp")
    mid = torchrun("--epochs", "2", "--save-every-steps", "1", "--stop-after-steps", "2", "--out", str(tmp_path), "--name", "mid")
    out = whole()
    assert re.search(r"processes 2 on cpu \(\d+ threads\), 4 images per process per step", out), out
    run_dir = tmp_path / "ddp"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and sum(map(sum, summary["test_confusion"])) == 14
    assert not any(k.startswith("module.") for k in torch.load(run_dir / "best.pt", weights_only=True)["model"])
    single = train.main(["--eval-only", str(run_dir / "best.pt")])
    assert single["test_acc"] == summary["test_acc"] and single["test_confusion"] == summary["test_confusion"]
    mid()
    ckpt = torch.load(tmp_path / "mid" / "last.pt", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["train_sums"][2] == 8  # the global batch, not rank 0's 4 images
    assert isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 2
    resumed = train.main(["--resume", str(tmp_path / "mid")])
    assert resumed["world_size"] == 1 and resumed["steps"] == 6
    assert len((tmp_path / "mid" / "metrics.jsonl").read_text().splitlines()) == 2


def test_train_benchmark_writes_a_table(tmp_path, monkeypatch):
    # tiny sizes: this checks the machinery (a process per point, ratios, the CSV), not speed; each
    # point's process forks from a server that imported train.py once (torch's import is most of a spawn)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["train"])
    monkeypatch.setattr(train.multiprocessing, "get_context", lambda method=None: context)
    out = tmp_path / "bench.csv"
    result = train.main(["--benchmark", str(out), "--bench-tokens", "6", "--bench-methods", "rwkv-block",
                         "transformer-block", "rwkv-rnn", "vrwkv-block", "poster-small",
                         "--bench-width", "16", "--bench-repeats", "1", "--bench-batch", "1", "--device", "cpu"])
    rows, (poster,) = result["benchmark"], result["poster"]
    assert poster["preset"] == "poster-small" and 0 < poster["mixer_ms"] < poster["ms"]
    assert poster["mixer_share"] == pytest.approx(poster["mixer_ms"] / poster["ms"])
    assert [(r["method"], r["tokens"], r["mode"]) for r in rows][:6] == [
        ("rwkv-block", 6, "forward"), ("rwkv-block", 6, "train"), ("vrwkv-block", 6, "forward"),
        ("vrwkv-block", 6, "train"), ("transformer-block", 6, "forward"), ("transformer-block", 6, "train")]
    assert len(rows) == 7 and {r["tokens"] for r in rows} == {6}  # rwkv-rnn has no training mode
    for r in rows:
        assert r["ms"] > 0 and r["peak_mb"] >= 0
        if r["method"].startswith("transformer"):
            assert r["time_ratio"] == 1.0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("method,tokens,mode,ms,peak_mb") and len(lines) == 1 + len(rows)
    assert train.bench_grid(600) == (20, 30) and train.bench_grid(9600) == (80, 120)


# ---- train.py: reading checkpoints once, the demo's stem, old Pillow, the progress line, the recipes -
def test_train_resume_and_eval_only_read_the_checkpoint_once(tmp_path, monkeypatch):
    run(tmp_path, "r", "--epochs", "2", "--stop-after-steps", "4")  # last.pt and best.pt of epoch 1
    reads = []
    real = train.load_checkpoint
    monkeypatch.setattr(train, "load_checkpoint", lambda *a, **k: reads.append(a) or real(*a, **k))
    train.main(["--eval-only", str(tmp_path / "r")])
    assert len(reads) == 1
    reads.clear()
    train.main(["--resume", str(tmp_path / "r")])
    assert [Path(a[0]).name for a in reads] == ["r", "best.pt"]  # last.pt once; best.pt for the test at the end


def test_train_demo_hybrid_without_data_uses_the_stem_patch():
    """The demo's 36x48 faces map to a 9x12 stem grid: 3x3 stem cells keep the demo's 3x4 tokens."""
    for argv in (["--size", "hybrid"], ["--backbone", "resnet50"], ["--experiment", "table5-no-rwkv"]):
        args, _ = train.parse_args(argv)
        config = train.model_config(args, 7)
        assert config.patch_size == 3 and config.grid == (3, 4), argv
    args, _ = train.parse_args([])
    assert train.model_config(args, 7).grid == (3, 4)
    args, _ = train.parse_args(["--size", "hybrid", "--data", "x"])  # real data: the preset's patch
    assert train.model_config(args, 7).patch_size == 5


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_train_progress_one_line_in_place_on_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", FakeTerminal())
    run(tmp_path, "tty", "--epochs", "1")
    out = sys.stdout.getvalue()
    assert "patch_embed" in out and "trainable /" in out  # every run prints its parameters (Table 4)
    progress = [line for line in out.split("\n") if "img/s" in line]
    assert len(progress) == 1 and progress[0].count("\r") == 3  # 3 steps, one line rewritten in place
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    run(tmp_path, "pipe", "--epochs", "1")
    assert sum("img/s" in line and "\r" not in line for line in sys.stdout.getvalue().split("\n")) == 3


def test_train_mean_per_class_accuracy():
    class Fixed(torch.nn.Module):  # predicts class 0 for everything
        def forward(self, x):
            return F.one_hot(torch.zeros(len(x), dtype=torch.long), 3).float()
    ds = torch.utils.data.TensorDataset(torch.zeros(4, 1), torch.tensor([0, 0, 0, 1]))
    args, _ = train.parse_args(["--workers", "0"])
    m = train.evaluate(Fixed(), ds, 3, args, 0, 1, 4, torch.device("cpu"))
    assert m["acc"] == 0.75 and m["mean_class_acc"] == 0.5  # (1 + 0) / 2: class 2 has no images


def test_train_sam_step_equals_the_two_step_computation_by_hand():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    w0 = [p.detach().clone() for p in model.parameters()]
    rho, lr = 0.05, 1e-2
    # by hand: g at w; w' = w + rho g / |g|; g' at w'; Adam's first step from w with g'
    g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    shifted = [(w + rho * t / norm).requires_grad_() for w, t in zip(w0, g)]
    out = torch.func.functional_call(model, {n: w for (n, _), w in zip(model.named_parameters(), shifted)}, (x,))
    g2 = torch.autograd.grad(F.cross_entropy(out, y), shifted)
    expected = [w - lr * t / (t.abs() + 1e-8) for w, t in zip(w0, g2)]  # Adam's first step: lr * sign-ish
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = train.make_scheduler(opt, 0, 10)
    train.train_step(model, x, y, opt, sched, 0.0, torch.autocast("cpu", enabled=False), sam_rho=rho)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    # and it differs from a plain Adam step (the second gradient matters)
    plain = [w - lr * t / (t.abs() + 1e-8) for w, t in zip(w0, g)]
    assert any(not torch.allclose(p, q) for p, q in zip(model.parameters(), plain))


def test_train_exp_schedule_per_epoch_written_per_step():
    f = [train.lr_factor(s, 0, 12, 4, "exp", 0.5) for s in range(12)]
    assert f == [1.0] * 4 + [0.5] * 4 + [0.25] * 4
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = train.make_scheduler(opt, 0, 12, 4, "exp", 0.5)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(f)


def test_train_recipe_poster_defaults_per_dataset_and_overridable(tmp_path):
    args, _ = train.parse_args(["--recipe", "poster"])
    assert (args.optimizer, args.schedule, args.lr_gamma, args.batch_size, args.epochs) == ("sam", "exp", 0.98, 144, 200)
    assert args.hflip and args.random_erasing == 1.0 and args.lr == train.POSTER_OTHER_LR
    assert train.parse_args(["--recipe", "poster", "--dataset", "rafdb", "--data", "x"])[0].lr == 3.5e-5
    assert train.parse_args(["--recipe", "poster", "--dataset", "caer-s", "--data", "x"])[0].lr == 4e-5
    args, _ = train.parse_args(["--recipe", "poster", "--lr", "1e-4", "--epochs", "3", "--no-hflip"])
    assert (args.lr, args.epochs, args.hflip) == (1e-4, 3, False)
    args, _ = train.parse_args([])
    assert (args.optimizer, args.schedule, args.lr, args.batch_size) == ("adam", "cosine", 1e-3, 64)
    result = run(tmp_path, "poster", "--recipe", "poster", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3")
    config = json.loads((Path(result["run_dir"]) / "config.json").read_text())
    assert config["args"]["optimizer"] == "sam" and config["args"]["schedule"] == "exp"


def test_train_killed_and_resumed_with_the_poster_recipe_options_matches_uninterrupted(tmp_path):
    """Exact resume holds with SAM, the exp schedule, random erasing and balanced batches too: their
    state (the optimizer's, the schedule's step, the RNG that erases) is all in last.pt."""
    _, a, _ = kill_and_resume(tmp_path, "--optimizer", "sam", "--schedule", "exp", "--lr-gamma", "0.5",
                              "--random-erasing", "0.5", "--balanced-sampler", "--hflip")
    assert a["scheduler"]["_last_lr"] == pytest.approx([1e-3 * 0.5 ** 3])  # three epochs of x0.5
    # and the options did something: the same run without them ends elsewhere
    plain = run(tmp_path, "plain", "--epochs", "3")
    c = torch.load(Path(plain["run_dir"]) / "last.pt", weights_only=True)
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_train_balanced_sampler_ranks_share_one_global_batch(tmp_path):
    """Two ranks' k-th batches together are the one-process run's k-th batch, and the classes of
    an imbalanced train set come out about equally often."""
    labels = [0] * 90 + [1] * 9 + [2] * 1
    ds = torch.utils.data.TensorDataset(torch.arange(100), torch.tensor(labels))
    ds.labels = labels
    args, _ = train.parse_args(["--balanced-sampler", "--workers", "0", "--seed", "3"])
    cpu = torch.device("cpu")
    one = [x.tolist() for x, _ in train.epoch_batches(ds, 2, 0, args, 0, 1, 10, cpu)]
    two = [[x.tolist() for x, _ in train.epoch_batches(ds, 2, 0, args, r, 2, 5, cpu)] for r in range(2)]
    for k, batch in enumerate(one):
        assert sorted(batch) == sorted(two[0][k] + two[1][k])
    drawn = np.bincount([labels[i] for b in one for i in b], minlength=3)
    assert drawn.sum() == 100 and drawn.min() >= 20  # ~33 each, though class 2 has a single image


def test_train_affectnet_end_to_end_with_8_classes(tmp_path):
    root = str(tmp_path / "affectnet")
    make_affectnet(root, n=(6, 2))
    result = train.main([*TINY_ARGS, "--data", root, "--affectnet-classes", "8", "--epochs", "1",
                         "--out", str(tmp_path), "--name", "an8", "--recipe", "poster", "--epochs", "1",
                         "--batch-size", "8", "--lr", "1e-3"])
    config = json.loads((tmp_path / "an8" / "config.json").read_text())
    assert config["model"]["n_classes"] == 8 and config["args"]["balanced_sampler"] is False  # AffectNet-7 only
    assert sum(map(sum, result["test_confusion"])) == 8 * 2 and 0 <= result["test_mean_class_acc"] <= 1
    args, _ = train.parse_args(["--data", root, "--recipe", "poster"])
    assert args.balanced_sampler and args.lr == 1e-6 and args.dataset == "auto"


# ---- train.py: POSTER V2 / POSTER-RWKV and the Vision-RWKV mixer through the same code paths ------
POSTER_ARGS = ["--experiment", "poster-small", "--img-size", "32", "32", "--n-layer", "1", "--n-embd", "16",
               "--synthetic-size", "2", "1", "--batch-size", "8", "--workers", "0", "--log-every", "1"]


def test_train_poster_end_to_end_with_weight_files_eval_only_and_predict(tmp_path, capsys):
    """The small POSTER preset trains through train.main with user-supplied IR-50 (ArcFace
    four-stage names) and MobileFaceNet files; the landmark branch is frozen, and eval-only and
    predict rebuild the same model from the checkpoint."""
    args, _ = train.parse_args(POSTER_ARGS)
    donor = PosterRWKV(train.model_config(args, 7))
    arcface = {f"body.{i}.{k.split('.', 2)[2]}": v for name, i0 in (("body1", 0), ("body2", 3), ("body3", 7))
               for k, v in donor.ir_back.state_dict().items() if k.startswith(name + ".")
               for i in [i0 + int(k.split(".")[1])]}
    arcface.update({k: v for k, v in donor.ir_back.state_dict().items() if k.startswith("input_layer.")})
    torch.save(arcface, tmp_path / "ir50.pth")
    torch.save({"state_dict": donor.face_landback.state_dict()}, tmp_path / "mfn.pth.tar")
    result = train.main([*POSTER_ARGS, "--epochs", "1", "--out", str(tmp_path), "--name", "p",
                         "--ir50-weights", str(tmp_path / "ir50.pth"), "--landmark-weights", str(tmp_path / "mfn.pth.tar")])
    out = capsys.readouterr().out
    assert f"IR-50 weights: loaded {len(arcface)} tensors" in out and "landmark branch: loaded" in out
    ckpt = torch.load(tmp_path / "p" / "best.pt", weights_only=True)
    assert ckpt["arch"] == "PosterRWKV" and ckpt["config"]["freeze_landmarks"] is True
    for k, v in donor.face_landback.state_dict().items():  # frozen: still the file's weights
        assert torch.equal(ckpt["model"]["face_landback." + k], v), k
    assert result["trainable_params"] < result["params"]
    again = train.main(["--eval-only", str(tmp_path / "p")])
    assert again["test_acc"] == result["test_acc"] and again["n"] == 7
    image, _ = data.synthetic_face(1, "test", 0, (32, 32))
    image.save(tmp_path / "face.png")
    probs = train.main(["--predict", str(tmp_path / "face.png"), "--ckpt", str(tmp_path / "p")])["predictions"]
    assert sum(probs[str(tmp_path / "face.png")].values()) == pytest.approx(1.0, abs=1e-5)


def test_train_poster_mixers(tmp_path, capsys):
    for mixer in ("transformer", "vrwkv"):
        result = train.main([*POSTER_ARGS, "--mixer", mixer, "--epochs", "1", "--out", str(tmp_path), "--name", mixer])
        assert json.loads((tmp_path / mixer / "config.json").read_text())["model"]["mixer"] == mixer
        assert result["steps"] == 1
    assert "landmark branch: random init, trained" in capsys.readouterr().out


def test_train_vrwkv_mixer_and_count_params_with_poster_rows(tmp_path, capsys, monkeypatch):
    result = run(tmp_path, "vrwkv", "--mixer", "vrwkv", "--pool", "mean", "--epochs", "1")
    assert json.loads((Path(result["run_dir"]) / "config.json").read_text())["model"]["mixer"] == "vrwkv"
    monkeypatch.setattr(torch.nn.init, "orthogonal_", lambda t, gain=1: t)  # counts need no QR of big matrices
    counts = train.main(["--count-params"])
    assert counts["poster-v2"][1] == 43_724_311  # POSTER V2's own count: the published 43.7 M
    assert counts["poster-rwkv"][0] > counts["poster-v2"][0] and counts["small"] == 600_455
    assert "poster-small" in capsys.readouterr().out


# ---- train.py: one run per directory, checkpoints supply only a model, bad values by flag --------
# train.py: a run directory belongs to one run; a checkpoint supplies a model, never actions or
# paths; every numeric flag refuses bad values by name; a
# non-finite loss stops the run. (-k test_train)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_train_second_run_into_a_busy_directory_is_refused_and_the_first_is_intact(tmp_path, capsys, monkeypatch):
    """A second run started into the directory of a run still going (here: from inside its first
    step) meets the lock; the first run's files are all its own afterwards."""
    real, refused = train.train_step, []

    def step_and_start_another(*a, **k):
        if not refused:
            with pytest.raises(SystemExit) as e:
                train.main([*TINY_ARGS, "--out", str(tmp_path), "--name", "r", "--epochs", "1", "--seed", "5"])
            refused.append((e.value.code, capsys.readouterr().err))
        return real(*a, **k)
    monkeypatch.setattr(train, "train_step", step_and_start_another)
    first = run(tmp_path, "r", "--epochs", "2")
    code, err = refused[0]
    assert code == 2 and "in use by another train.py process" in err and "--name" in err, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["args"]["seed"] == 0 and config["args"]["epochs"] == 2
    rows = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and first["steps"] == 6
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["step"] == 6


def copy_of(tiny_run, tmp_path, name="r"):
    """A copy of the tiny run's folder (a finished run) under tmp_path/name."""
    return shutil.copytree(tiny_run["run_dir"], tmp_path / name)


def test_train_new_run_where_another_run_is_refused(tiny_run, tmp_path, capsys):
    copy_of(tiny_run, tmp_path)
    (tmp_path / "r" / "last.pt").unlink()
    before = {p.name: digest(p) for p in (tmp_path / "r").iterdir() if p.is_file()}
    expect_exit_2(capsys, [*TINY_ARGS, "--out", str(tmp_path), "--name", "r"], "--resume", "--name", "best.pt")
    assert {p.name: digest(p) for p in (tmp_path / "r").iterdir() if p.is_file()} == before


def test_train_run_that_fails_before_writing_leaves_no_folder(tmp_path, capsys):
    (tmp_path / "mine").mkdir()  # a folder that was there before stays
    for out in (tmp_path / "new" / "runs", tmp_path / "mine"):
        expect_exit_2(capsys, [*TINY_ARGS, "--out", str(out), "--name", "r", "--train-only", "mixr"], "mixr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and not any((tmp_path / "mine").iterdir())


def test_train_checkpoint_cannot_choose_the_run_mode_or_a_write_path(tiny_run, tmp_path, capsys, monkeypatch):
    copy_of(tiny_run, tmp_path)
    ckpt = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    victim = tmp_path / "victim.csv"
    victim.write_text("keep me\n")
    ckpt["args"].update(benchmark=str(victim), bench_out=str(victim), bench_tokens=[6], bench_methods=["rwkv-block"],
                        bench_poster=[], bench_share_batch=0, bench_width=8, plot=[str(tmp_path / "r")],
                        plot_out=str(victim), count_params=False, out=str(tmp_path / "elsewhere"), name="x")
    torch.save(ckpt, tmp_path / "crafted.pt")
    result = train.main(["--eval-only", str(tmp_path / "crafted.pt")])
    assert result["n"] == 14 and "test_acc" in result  # it evaluated, nothing else
    assert victim.read_text() == "keep me\n" and not (tmp_path / "elsewhere").exists()
    # the training run's own record is not overwritten: the result is named after what was evaluated on what
    own = digest(tmp_path / "r" / "test_metrics.json")
    train.main(["--eval-only", str(tmp_path / "r" / "best.pt")])
    assert digest(tmp_path / "r" / "test_metrics.json") == own
    assert (tmp_path / "r" / "test_metrics-r-best-on-synthetic.json").is_file()
    # a saved value is validated like the flag; an unknown config field is one line
    ckpt["args"]["lr"] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    expect_exit_2(capsys, ["--eval-only", str(tmp_path / "nan.pt")], "--lr", "nan.pt")
    ckpt["args"]["lr"] = 1e-3
    ckpt["config"]["bogus"] = 1
    torch.save(ckpt, tmp_path / "bogus.pt")
    expect_exit_2(capsys, ["--eval-only", str(tmp_path / "bogus.pt")], "bogus")

    def read_only(path, data):  # a folder it cannot write: --eval-only still evaluates, and says --out
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(train, "atomic_write", read_only)
    assert train.main(["--eval-only", str(tmp_path / "r")])["n"] == 14
    assert "--out" in capsys.readouterr().out


BAD_VALUES = [("--weight-decay", "-1"), ("--log-every", "0"), ("--seed", "-1"), ("--workers", "-1"),
              ("--synthetic-size", "0", "0"), ("--sanity", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"),
              ("--warmup-epochs", "nan"), ("--sam-rho", "nan"), ("--clip", "nan"), ("--epochs", "0"),
              ("--batch-size", "-8"), ("--n-embd", "0"), ("--lr-gamma", "1.5"), ("--random-erasing", "2"),
              ("--val-fraction", "1"), ("--img-size", "0", "48"), ("--save-every-steps", "-1"),
              ("--erasing-scale", "0", "0.5"), ("--patch-size", "x"), ("--bench-tokens", "0"), ("--seed", "1.5")]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=" ".join)
def test_train_every_numeric_flag_refuses_bad_values_by_name(bad, capsys):
    expect_exit_2(capsys, [*TINY_ARGS, *bad], f"argument {bad[0]}", "must be")


def test_train_non_finite_loss_stops_the_run_with_the_last_checkpoint_intact(tmp_path, capsys, monkeypatch):
    real, calls, saved = train.train_step, [], []

    def nan_at_step_5(*a, **k):
        calls.append(1)
        loss, correct = real(*a, **k)
        if len(calls) == 5:
            saved.append(digest(tmp_path / "r" / "last.pt"))
            return torch.tensor(float("nan")), correct
        return loss, correct
    monkeypatch.setattr(train, "train_step", nan_at_step_5)
    expect_exit_2(capsys, [*TINY_ARGS, "--out", str(tmp_path), "--name", "r", "--epochs", "3"], "step 5", "last.pt")
    assert digest(tmp_path / "r" / "last.pt") == saved[0]
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(train, "train_step", real)  # and a learning rate that blows up for real
    expect_exit_2(capsys, [*TINY_ARGS, "--out", str(tmp_path), "--name", "huge", "--lr", "1e30"], "the loss is")


# ---- train.py: one run lifecycle (stop and continue, run folders, resume checks, one error boundary) ----

def signal_at_step(monkeypatch, at, signum=signal.SIGINT, twice=False):
    """train_step sends this process `signum` during step `at` (twice: a second one at once after it)."""
    real, calls = train.train_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signum)
            if twice:
                os.kill(os.getpid(), signum)
        return real(*a, **k)
    monkeypatch.setattr(train, "train_step", step)


@pytest.mark.parametrize("signum, code, at", [(signal.SIGINT, 130, 5), (signal.SIGTERM, 143, 3)])
def test_train_stopped_by_a_signal_saves_says_how_to_continue_and_resumes_exactly(tmp_path, capsys, monkeypatch,
                                                                                   signum, code, at):
    """Ctrl-C or SIGTERM mid-run (3 steps per epoch: step 5 is mid-epoch, step 3 an epoch's end): the
    step finishes, last.pt is written, one line names the command that continues it, exit 128 + N;
    resumed, the run ends with the weights and metrics of a run never stopped."""
    full = run(tmp_path, "full", "--epochs", "3")
    signal_at_step(monkeypatch, at, signum)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "s", "--epochs", "3")
    err = capsys.readouterr().err
    assert e.value.code == code and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"python train.py --resume {tmp_path / 's'}" in err and signal.Signals(signum).name in err
    assert torch.load(tmp_path / "s" / "last.pt", weights_only=True)["step"] == at
    monkeypatch.undo()
    resumed = train.main(["--resume", str(tmp_path / "s")])
    assert resumed["steps"] == full["steps"] and resumed["test_acc"] == full["test_acc"]
    a, b = (torch.load(tmp_path / n / "last.pt", weights_only=True)["model"] for n in ("full", "s"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda n: [{k: v for k, v in json.loads(r).items() if k != "epoch_time_s"}  # noqa: E731
                       for r in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
    assert strip("full") == strip("s")


def test_train_second_ctrl_c_stops_at_once_and_a_run_never_checkpointed_starts_again(tmp_path, capsys, monkeypatch):
    """Two Ctrl-C in the first step: it stops at once, before any checkpoint. The folder holds the run's
    settings but no checkpoint, so it is no run: --resume starts it from its settings, and so does
    the same command."""
    signal_at_step(monkeypatch, 1, twice=True)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "r", "--epochs", "1", "--seed", "3")
    err = capsys.readouterr().err
    assert e.value.code == 130 and "before the first checkpoint" in err and "--resume" in err, err
    assert not (tmp_path / "r" / "last.pt").exists() and (tmp_path / "r" / "config.json").is_file()
    monkeypatch.undo()
    result = train.main(["--resume", str(tmp_path / "r"), "--lr", "2e-3"])  # nothing trained yet: flags may change
    config = json.loads((tmp_path / "r" / "config.json").read_text())["args"]
    assert result["steps"] == 3 and config["seed"] == 3 and config["lr"] == 2e-3
    run(tmp_path, "x", "--epochs", "1", "--stop-after-steps", "1")  # stopped before its first checkpoint
    assert run(tmp_path, "x", "--epochs", "1")["steps"] == 3      # the same command starts it again


def test_train_resume_refuses_other_data_and_a_changed_schedule(tmp_path, capsys):
    """--resume checks the data by content (images added: the split and the order would change) and
    refuses a flag that would change the run's schedule, each in one line that says what differs."""
    root = tmp_path / "faces"
    for c, color in zip("abc", COLORS):
        for i in range(6):
            write_img(str(root / c / f"{i}.png"), color)
    run(tmp_path, "r", "--data", str(root), "--epochs", "2", "--stop-after-steps", "2", "--save-every-steps", "1")
    write_img(str(root / "a" / "new.png"), COLORS[0])
    expect_exit_2(capsys, ["--resume", str(tmp_path / "r")], "not what this run trained on", "train:", "--init-from")
    expect_exit_2(capsys, ["--resume", str(tmp_path / "r"), "--epochs", "40"], "epochs=2 (checkpoint) vs 40",
                  "--init-from")


def test_train_workers_follow_the_free_cores(monkeypatch):
    """Without --workers: no data workers on a 2-core machine (torch's warning never fires), a few on a
    big one; --workers N overrides."""
    seen = []
    monkeypatch.setattr(train, "count_params", lambda args: seen.append(args.workers))
    for cores, argv, want in ((2, [], 0), (3, [], 1), (16, [], 4), (2, ["--workers", "3"], 3)):
        monkeypatch.setattr(train, "free_cores", lambda: cores)
        train.main(["--count-params", *argv])
        assert seen.pop() == want


def test_train_eta_is_the_runs_own_rate_over_every_step(tmp_path, monkeypatch, capsys):
    """A clock that advances 1 s per step and 1 s per validation (3 steps per epoch): from the first
    step of the second epoch on, every eta printed is within 25 % of the time actually left."""
    clock = [1000.0]
    monkeypatch.setattr(train.time, "time", lambda: clock[0])
    real_step, real_eval = train.train_step, train.evaluate

    def step(*a, **k):
        clock[0] += 1.0
        return real_step(*a, **k)

    def evaluate(*a, **k):
        clock[0] += 1.0
        return real_eval(*a, **k)
    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train, "evaluate", evaluate)
    run(tmp_path, "r", "--epochs", "4")
    end = clock[0] - 1.0  # the test evaluation is not training time
    lines = [line for line in capsys.readouterr().out.splitlines() if " eta " in line]
    etas = [(int(re.search(r"step (\d+)/", ln)[1]), int(re.search(r"eta (\d+)m(\d+)s", ln)[1]) * 60
             + int(re.search(r"eta (\d+)m(\d+)s", ln)[2])) for ln in lines]
    for step_, eta in etas:
        if step_ > 3:  # after the first epoch; step s ended at 1000 + s + (epochs validated)
            left = end - (1000 + step_ + (step_ - 1) // 3)
            assert abs(eta - left) <= 0.25 * left + 1, (step_, eta, left)


T, P = TINY_ARGS, POSTER_ARGS
ONE_LINE_ERRORS = [  # (what goes wrong, argv: {tmp} this test's folder, {run} tiny_run's; the words the one line holds)
    ("no data there", [*T, "--data", "{tmp}/nowhere", "--out", "{tmp}"], ["nowhere"]),
    ("a flag changes the resumed model", ["--resume", "{run}", "--n-embd", "32"], ["n_embd=16 (checkpoint) vs 32"]),
    ("resume as another experiment", ["--resume", "{run}", "--experiment", "poster-small"],
     ["experiment=None (checkpoint) vs poster-small"]),
    ("resume from best.pt", ["--resume", "{run}/best.pt"], ["no optimizer state"]),
    ("no checkpoint", ["--eval-only", "{tmp}/missing.pt"], ["no checkpoint"]),
    ("not a checkpoint", ["--eval-only", "{tmp}/junk.pt"], ["junk.pt"]),
    ("an optimizer's state alone (POSTER V2's model_best.pth)", ["--eval-only", "{tmp}/model_best.pth"],
     ["only an optimizer's state", "state_dict"]),
    ("a new run where a run is", [*T, "--out", "{run}/..", "--name", "tiny"], ["--resume"]),
    ("--out is a file", [*T, "--out", "{tmp}/file"], ["--out", "is a file"]),
    ("a name with a slash", [*T, "--out", "{tmp}", "--name", "../x"], ["--name", "one folder under --out"]),
    ("an absolute name", [*T, "--out", "{tmp}", "--name", "/tmp/x"], ["--name", "one folder under --out"]),
    ("a name too long for a folder", [*T, "--out", "{tmp}", "--name", "x" * 300], ["--name", "255 bytes"]),
    ("a patch that does not tile", [*T, "--patch-size", "7"], ["patch"]),
    ("bf16 on the CPU", [*T, "--amp", "bf16", "--device", "cpu"], ["CUDA"]),
    ("no epochs", ["--epochs", "0"], ["--epochs"]),
    ("pretrained stem on raw pixels", [*T, "--size", "hybrid", "--backbone-weights", "w.pt", "--no-imagenet-norm"],
     ["ImageNet-normalised"]),
    ("--patch-size for POSTER", [*P, "--patch-size", "4"], ["--patch-size", "not a POSTER setting"]),
    ("POSTER on non-square images", [*P, "--img-size", "32", "48"], ["square"]),
    ("no landmark weights file", [*P, "--landmark-weights", "{tmp}/none.pth"], ["none.pth"]),
    ("IR-50 weights without POSTER", [*T, "--ir50-weights", "x.pth"], ["POSTER"]),
    ("--train-only names nothing", [*T, "--train-only", "mixr"], ["mixr names no parameter", "blocks"]),
    ("--plot-out in no folder", ["--plot", "{tmp}/not-a-run", "--plot-out", "{tmp}/nowhere/p.png"], ["--plot-out", "no folder"]),
    ("--plot-out not a picture", ["--plot", "{tmp}/not-a-run", "--plot-out", "{tmp}/p.txt"], ["--plot-out", ".png"]),
    ("--plot-out without a suffix", ["--plot", "{tmp}/not-a-run", "--plot-out", "{tmp}/p"], ["--plot-out", ".png"]),
    ("--plot of no run", ["--plot", "{tmp}/not-a-run", "--plot-out", "{tmp}/p.png"], ["not-a-run"]),
    ("--explain without --ckpt", ["--explain", "{tmp}/file"], ["--explain needs --ckpt"]),
]


@pytest.mark.parametrize("what, argv, words", ONE_LINE_ERRORS, ids=[c[0] for c in ONE_LINE_ERRORS])
def test_train_user_errors_are_one_line_and_leave_nothing_behind(tiny_run, tmp_path, capsys, what, argv, words):
    """Exit status 2 and one line naming the flag or file and the fix; --plot-out is checked before any run
    is read; nothing is written (no run folder, the tiny run untouched)."""
    (tmp_path / "file").write_text("")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save(torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))]).state_dict(), tmp_path / "model_best.pth")
    run_dir = Path(tiny_run["run_dir"])
    before = {p: digest(p) for p in run_dir.iterdir() if p.is_file()}
    expect_exit_2(capsys, [a.format(tmp=tmp_path, run=run_dir) for a in argv], *words)
    assert sorted(os.listdir(tmp_path)) == ["file", "junk.pt", "model_best.pth"] and not (tmp_path.parent / "x").exists()
    assert {p: digest(p) for p in run_dir.iterdir() if p.is_file()} == before


def test_train_a_full_disk_is_one_line_and_the_checkpoint_before_it_intact(tmp_path, capsys, monkeypatch):
    """The disk fills up while last.pt is written at the end of epoch 2: one line that names the file
    and says what to do, exit 2; epoch 1's last.pt is intact."""
    real, writes = train.atomic_write, []

    def write(path, data):
        writes.append(Path(path).name)
        if writes.count("last.pt") == 2 and Path(path).name == "last.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)
    monkeypatch.setattr(train, "atomic_write", write)
    expect_exit_2(capsys, [*TINY_ARGS, "--out", str(tmp_path), "--name", "r", "--epochs", "3"],
                  "last.pt", "No space left", "free some space")
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["step"] == 3


def test_train_bad_image_in_a_data_worker_is_one_line(tmp_path, capsys):
    """An image that passes indexing but cannot be decoded, read by a DataLoader worker: one line
    naming the file, not the worker's wrapped traceback."""
    root = tmp_path / "faces"
    for c, color in zip("abc", COLORS):
        for i in range(6):
            write_img(str(root / c / f"{i}.png"), color)
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise, "PNG")
    (root / "a" / "0.png").write_bytes(noise.getvalue()[: len(noise.getvalue()) * 3 // 4])  # the header reads, the pixels do not
    expect_exit_2(capsys, [*TINY_ARGS, "--data", str(root), "--workers", "1", "--out", str(tmp_path), "--name", "r"],
                  str(root / "a" / "0.png"))


# ---- train.py: classes are names wherever a checkpoint meets data --------------------------------

def four_class_tree(root, names="abcd", n=6):
    for name, color in zip(names, COLORS):
        for split, k in (("train", n), ("test", 2)):
            for i in range(k):
                write_img(str(root / split / name / f"{i}.png"), color)
    return root


def test_train_eval_only_matches_classes_by_name_or_refuses_naming_both_lists(tmp_path, capsys):
    """A model trained on folders a b c d, evaluated on copies of its test folder: with c's folder
    removed the rows of a, b, d are those of the full evaluation (classes matched by name); with the
    folders renamed, or with a class it never saw, it is refused in one line naming both lists."""
    trained = four_class_tree(tmp_path / "data")
    run(tmp_path, "r", "--data", str(trained), "--epochs", "2")
    best, full = tmp_path / "r" / "best.pt", None
    full = train.main(["--eval-only", str(best), "--out", str(tmp_path / "e")])["test_confusion"]
    less = tmp_path / "less"
    shutil.copytree(trained, less)
    for split in ("train", "test"):
        shutil.rmtree(less / split / "c")
    got = train.main(["--eval-only", str(best), "--data", str(less), "--out", str(tmp_path / "e")])
    assert "a -> 0, b -> 1, d -> 3" in capsys.readouterr().out
    assert got["test_confusion"] == [full[0], full[1], [0, 0, 0, 0], full[3]] and got["n"] == 6
    for names in ("wxyz", "abce"):
        other = four_class_tree(tmp_path / names, names)
        expect_exit_2(capsys, ["--eval-only", str(best), "--data", str(other)], "['a', 'b', 'c', 'd']",
                      f"{list(names)}")


def test_train_posterv2_checkpoint_on_its_own_numbered_folders_equals_the_rafdb_layout(tmp_path, capsys, posterv2_7):
    """A POSTER V2 checkpoint on POSTER V2's own RAF-DB tree (folders 1..7 under train/ and valid/)
    with --dataset rafdb scores what it scores on the same images in RAF-DB's EmoLabel layout, confusion
    matrix and all; without --dataset the numbered folders are refused, never guessed."""
    source, path = posterv2_7
    raf = make_rafdb(tmp_path / "raf", n_train=1, n_test=1)
    tree = make_posterv2_rafdb(raf, tmp_path / "tree")
    common = ["--eval-only", str(path), "--batch-size", "7", "--out", str(tmp_path / "e")]
    own = train.main([*common, "--data", raf])
    folders = train.main([*common, "--data", str(tree), "--dataset", "rafdb"])
    assert folders["n"] == own["n"] == 7 and folders["test_confusion"] == own["test_confusion"]
    assert folders["test_acc"] == own["test_acc"]
    expect_exit_2(capsys, [*common, "--data", str(tree)], "--dataset rafdb")
    args, _ = train.parse_args([*common, "--data", raf])  # and by hand: POSTER V2's outputs in RAF-DB's order
    images, labels = map(torch.stack, zip(*[(x, torch.tensor(y)) for x, y in
                                             train.load_splits(args, source.config, draw_ahead=False).test]))
    with torch.no_grad():
        ours = [data.CLASSES.index(POSTERV2_CLASS_ORDER["rafdb"][i]) for i in source(images).argmax(1).tolist()]
    confusion = np.zeros((7, 7), dtype=int)
    np.add.at(confusion, (labels.numpy(), ours), 1)
    assert own["test_confusion"] == confusion.tolist()


def test_train_predict_in_bulk_skips_what_it_cannot_read_and_writes_a_csv(tiny_run, tmp_path, capsys):
    """--predict takes files, folders (recursively) and globs; an unreadable file is one line and
    skipped, the rest predicted; --predict-out writes a row per image. A flag that would change the
    checkpoint's model is refused as --eval-only refuses it."""
    ckpt = Path(tiny_run["run_dir"]) / "best.pt"
    for i, where in enumerate(("a/one.png", "a/deep/two.png", "b/three.png")):
        (tmp_path / "p" / where).parent.mkdir(parents=True, exist_ok=True)
        data.synthetic_face(1, "test", i, (40, 60))[0].save(tmp_path / "p" / where)
    (tmp_path / "p" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "p" / "a" / "notes.txt").write_text("not an image")
    out = tmp_path / "pred.csv"
    probs = train.main(["--predict", str(tmp_path / "p" / "a"), str(tmp_path / "p" / "b" / "*.png"), "--ckpt",
                        str(ckpt), "--predict-out", str(out)])["predictions"]
    assert sorted(Path(p).name for p in probs) == ["one.png", "three.png", "two.png"]
    printed = capsys.readouterr().out
    assert "broken.png" in printed and "predicted 3 images; skipped 2 files" in printed
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["file", "top_class", *data.CLASSES] and len(rows) == 4
    for row in rows[1:]:
        p = [float(x) for x in row[2:]]
        assert sum(p) == pytest.approx(1, abs=1e-5) and row[1] == data.CLASSES[int(np.argmax(p))]
    expect_exit_2(capsys, ["--predict", str(tmp_path / "p"), "--ckpt", str(ckpt), "--img-size", "96", "96"],
                  "img_size=[32, 48] (checkpoint) vs [96, 96]")


def test_train_help_shows_every_default_whole_sentences_and_examples(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    parser = train.build_parser()
    for action in parser._actions:
        if action.help not in (None, argparse.SUPPRESS) and action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default:{action.default}".replace(" ", "") in "".join(text.split()), action.dest
    assert "examples:" in text and "--predict-out" in text and "--resume runs/" in text


# ---- POSTER V2's checkpoints as they are; --init-from; --train-only --------------------------------


def face_png(tmp_path):
    path = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 50, 3), dtype=np.uint8)).save(path)
    return path


def test_train_predict_and_eval_only_read_a_posterv2_checkpoint(tmp_path, capsys, posterv2_7):
    source, path = posterv2_7
    img, order = face_png(tmp_path), POSTERV2_CLASS_ORDER["rafdb"]
    probs = train.main(["--predict", str(img), "--ckpt", str(path), "--dataset", "rafdb"])["predictions"][str(img)]
    with torch.no_grad():  # POSTER V2's preprocessing: 224 x 224, ImageNet normalisation
        ref = source(data.load_image(img, (224, 224), normalize=True)[None]).softmax(1)[0]
    assert list(probs) == list(data.CLASSES) and ref.max() < 0.999
    assert all(abs(probs[c] - ref[order.index(c)].item()) < 1e-5 for c in data.CLASSES)
    assert "0 Surprise -> 6" in capsys.readouterr().out  # RAF-DB's label 1 is the project's 7th class
    expect_exit_2(capsys, ["--eval-only", str(path), "--synthetic-size", "1", "1"], "--dataset rafdb")


def test_train_predict_with_an_8_class_posterv2_checkpoint(tmp_path, monkeypatch, capsys, poster_v2):
    g = torch.Generator().manual_seed(2)  # poster_v2 with an AffectNet-8 classifier
    head = {"head.weight": torch.randn(8, 768, generator=g) / math.sqrt(768), "head.bias": torch.randn(8, generator=g)}
    path = tmp_path / "posterv2-8.pth"
    write_posterv2_checkpoint(path, tmp_path, {**poster_v2.state_dict(), **head}, monkeypatch)
    img, order, features = face_png(tmp_path), POSTERV2_CLASS_ORDER["affectnet"], []
    probs = train.main(["--predict", str(img), "--ckpt", str(path)])["predictions"][str(img)]
    hook = poster_v2.head.register_forward_pre_hook(lambda module, args: features.append(args[0]))
    with torch.no_grad():
        poster_v2(data.load_image(img, (224, 224), normalize=True)[None])
    hook.remove()
    ref = F.linear(features[0], head["head.weight"], head["head.bias"]).softmax(1)[0]
    assert list(probs) == [*data.CLASSES, "Contempt"]
    assert all(abs(probs[c] - ref[order.index(c)].item()) < 1e-5 for c in probs)
    result = train.main(["--eval-only", str(path), "--synthetic-size", "1", "1", "--out", str(tmp_path)])
    assert result["n"] == 7 and len(result["test_confusion"]) == 8 and sum(result["test_confusion"][7]) == 0


def test_train_init_from_posterv2_into_poster_rwkv_loads_all_but_the_mixer(capsys, posterv2_7):
    source, path = posterv2_7
    model = PosterRWKV(PosterConfig.preset("poster-rwkv"))
    loaded = train.init_from(model, path, argparse.Namespace(dataset="caer-s", data=None), data.CLASSES, print)
    own = model.state_dict()
    assert loaded == {k for k in own if not k.startswith("mixer.")} and len(own) - len(loaded) == 40  # 2 RWKV blocks
    out = capsys.readouterr().out
    assert f"{len(own) - 40} of the model's {len(own)} tensors loaded (28 of the file's unused)" in out  # ViT's 28
    assert "mixer            fresh: 0 tensors loaded, 40 fresh" in out and "not --resume" in out
    assert torch.equal(own["ir_back.body3.13.res_layer.4.weight"], source.state_dict()["ir_back.body3.13.res_layer.4.weight"])
    assert torch.equal(own["head.bias"], source.head.bias)  # CAER-S's folders sorted: the project's order


def test_train_only_leaves_every_frozen_tensor_bit_identical(tmp_path, monkeypatch, capsys):
    """--init-from a run's best.pt, then --train-only head on a ResNet50 stem (BatchNorm): after a
    step, every tensor but the head's is bit-identical, running statistics included."""
    stem = ["--backbone", "resnet50", "--patch-size", "4"]
    run(tmp_path, "a", *stem, "--epochs", "1")
    real, seen = train.train_step, []

    def step_and_compare(model, *a, **k):
        before = {n: t.clone() for n, t in model.state_dict().items()}
        out = real(model, *a, **k)
        seen.append({n for n, t in model.state_dict().items() if not torch.equal(t, before[n])})
        seen.append(before)
        return out
    monkeypatch.setattr(train, "train_step", step_and_compare)
    run(tmp_path, "b", *stem, "--init-from", str(tmp_path / "a"), "--train-only", "head", "--stop-after-steps", "1")
    changed, before = seen
    best = torch.load(tmp_path / "a" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(before[n], best[n]) for n in best)  # every tensor came from --init-from
    assert any("running_mean" in n for n in before) and changed and all(n.startswith("head.") for n in changed)
    out = capsys.readouterr().out
    assert "parameters trainable" in out and "not --resume" in out


def test_train_vrwkv_init_from_a_vision_rwkv_checkpoint(tmp_path, monkeypatch, capsys):
    """--experiment vrwkv-t --init-from a file in Vision-RWKV's layout (VRWKV-T's, scaled to width
    32 and 2 blocks by flags): at the demo's 112 px every tensor but the head starts from the file
    (positions resized to 7x7), the report says so part by part, and --train-only head (a linear
    probe) trains on the synthetic faces, moving only the head. Alone, the file is no classifier."""
    import facerwkv
    from test_facerwkv import vrwkv_file
    path = tmp_path / "vrwkv_t_in1k_224.pth"
    vrwkv_file(path)
    real, seen = train.train_step, []

    def step_and_compare(model, *a, **k):
        before = {n: t.clone() for n, t in model.state_dict().items()}
        out = real(model, *a, **k)
        seen.append((before, {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}))
        return out
    monkeypatch.setattr(train, "train_step", step_and_compare)
    summary = train.main(["--experiment", "vrwkv-t", "--patch-size", "16", "--n-embd", "32", "--n-layer", "2",
                          "--synthetic-size", "4", "2", "--batch-size", "8", "--epochs", "1", "--workers", "0",
                          "--out", str(tmp_path), "--name", "probe", "--init-from", str(path), "--train-only", "head"])
    _, expected = facerwkv.vrwkv_state_dict(path, (112, 112))
    before, changed = seen[0]
    assert expected["pos_emb"].shape == (1, 49, 32) and all(torch.equal(before[k], v) for k, v in expected.items())
    assert all(changed == {"head.weight", "head.bias"} for _, changed in seen) and len(seen) == summary["steps"] >= 3
    out = capsys.readouterr().out
    assert f"{len(expected)} of the model's {len(expected) + 2} tensors loaded (0 of the file's unused)" in out
    assert "head             fresh: 0 tensors loaded, 2 fresh" in out and "blocks           loaded" in out
    assert "pos_emb          loaded" in out and "patch_embed      loaded" in out and summary["test_acc"] is not None
    expect_exit_2(capsys, ["--eval-only", str(path)], "no expression classifier", "--init-from")
# ---- train.py: the pictures (-k plot, -k confusion, -k explain) ----------------------------------

def pixels_of(path, box=None):
    """The (R, G, B) pixel counts of a picture, or of a box of it."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        return dict((c, n) for n, c in (im.crop(box) if box else im).getcolors(1 << 24))


def test_train_plot_one_and_many_runs_one_and_many_epochs_with_and_without_test_metrics(tiny_run, tmp_path):
    """--plot draws two panels (loss, accuracy) with every run's colour in both; a one-epoch run
    lands mid-panel, not on the frame; a 60-epoch run without config.json or test metrics, and a run
    without test_metrics.json, plot too, their legends saying so."""
    one = Path(run(tmp_path, "one", "--epochs", "1")["run_dir"])
    (one / "test_metrics.json").unlink()
    many = tmp_path / "many"
    many.mkdir()
    (many / "metrics.jsonl").write_text("".join(json.dumps(
        {"epoch": e, "train_loss": 2 / e, "train_acc": 1 - 0.8 / e, "val_loss": 1 + (e - 30) ** 2 / 900,
         "val_acc": 0.4 + 0.1 * math.sin(e / 9)}) + "\n" for e in range(1, 61)))
    panels = [(110, 50, 671, 451), (800, 50, 1361, 451)]
    train.main(["--plot", str(one), "--plot-out", str(tmp_path / "one.png")])
    with Image.open(tmp_path / "one.png") as im:
        assert im.format == "PNG" and im.size == (1400, 616)
    for left, top, right, bottom in panels:  # the lone epoch: x = the middle of the panel, not the frame
        middle = (left + right) // 2
        assert pixels_of(tmp_path / "one.png", (middle - 12, top + 5, middle + 12, bottom - 5)).get(train.PALETTE[0], 0) > 20
    for out in ("all.png", "all.jpg"):
        train.main(["--plot", tiny_run["run_dir"], str(one), str(many), "--plot-out", str(tmp_path / out)])
    with Image.open(tmp_path / "all.jpg") as im:
        assert im.format == "JPEG" and im.size == (1400, 668)
    for box in panels:
        assert all(pixels_of(tmp_path / "all.png", box).get(colour, 0) > 30 for colour in train.PALETTE[:3])
    assert "best validation accuracy 50.0% at epoch 14; no test metrics" in train.read_run(many)[1]
    assert "data not recorded" in train.read_run(many)[1] and "no test metrics" in train.read_run(one)[1]
    assert "synthetic faces 32x48, 21/7/14 train/val/test images" in train.read_run(tiny_run["run_dir"])[1]


def test_train_confusion_picture_beside_the_csv_after_training_and_eval_only(tiny_run, tmp_path):
    """confusion.png is written with confusion.csv at the end of training and by --eval-only; each
    row's cells are coloured by its shares (viridis), so every share's colour is in the picture."""
    run_dir = Path(tiny_run["run_dir"])
    train.main(["--eval-only", str(run_dir / "best.pt"), "--out", str(tmp_path)])
    for path in (run_dir / "confusion.png", tmp_path / "confusion-tiny-best-on-synthetic.png"):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 600 and im.height > 600
        colours = pixels_of(path)
        for row in tiny_run["test_confusion"]:
            assert all(train.heat(k / sum(row)) in colours for k in row), row


def test_train_explain_draws_every_layer_over_the_face(tiny_run, tmp_path, capsys):
    """--explain writes explain-NAME.png: the face and a heat map per layer (viridis blended with
    the face: many colours); without --ckpt, or with a model that mixes nothing, one line."""
    for folder in "ab":  # two images of one name
        (tmp_path / folder).mkdir()
        data.synthetic_face(1, "test", 3, (32, 48))[0].save(tmp_path / folder / "face.png")
    face = tmp_path / "a" / "face.png"
    written = train.main(["--explain", str(face), str(tmp_path / "b"), "--ckpt", tiny_run["run_dir"], "--out",
                          str(tmp_path / "x")])["explain"]
    assert written == [str(tmp_path / "x" / "explain-face.png"), str(tmp_path / "x" / "explain-face-1.png")]
    with Image.open(written[0]) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 250
    assert len(pixels_of(written[0], (276, 74, 516, 234))) > 100  # the layer's panel: face under heat
    assert "explain-face.png" in capsys.readouterr().out
    probe = Path(run(tmp_path, "probe", "--epochs", "1", "--mixer", "identity")["run_dir"])
    expect_exit_2(capsys, ["--explain", str(face), "--ckpt", str(probe)], "no token mixer")
