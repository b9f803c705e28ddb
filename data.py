"""
Data for FaceRWKV: the facial-expression datasets users hold, plus a built-in synthetic one.

Everything goes through one call, `load_datasets(...) -> Splits`, whose .train/.val/.test are torch
Datasets yielding (image float tensor (3, H, W), int label). Supported formats:
  - "synthetic": procedurally drawn faces (the default when root is None); needs no files.
  - "caer":      CAER-S, ROOT/{train,test}/{Anger,Disgust,Fear,Happy,Neutral,Sad,Surprise}/*.png
                 (the paper's data; `Angry` and other common spellings are accepted).
  - "folder":    any ImageFolder-style tree: ROOT/<class>/* or ROOT/{train,[val],test}/<class>/*;
                 classes are the sorted folder names, one index map shared by every split.
  - "rafdb":     RAF-DB basic, EmoLabel/list_patition_label.txt + Image/aligned/*_aligned.jpg.
  - "fer2013":   fer2013.csv (emotion, pixels, Usage), 48x48 grey images.
For the 7 basic emotions the class order is always CLASSES (CAER-S order), whatever order the
source format uses, so a label means the same emotion for every dataset.

Validation is 10 % of train, stratified per class, seeded, moved out of train (not copied),
unless the format brings its own validation split (FER2013 PublicTest, a folder tree's val/).
Bad data never crashes with a traceback and is never mislabelled silently: each problem raises
DataError with a message naming the file/line and the fix, or, with skip_bad_images=True, bad
images and rows are skipped and counted in the summary.
"""

import csv
import hashlib
import math
import multiprocessing
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile, UnidentifiedImageError

# -----------------------------------------------------------------------------
# constants

CLASSES = ("Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")  # CAER-S order

# spellings of the basic emotions found in the wild (folder names, label tables), lower case
CLASS_ALIASES = {
    "anger": "Anger", "angry": "Anger",
    "disgust": "Disgust", "disgusted": "Disgust",
    "fear": "Fear", "fearful": "Fear", "afraid": "Fear",
    "happy": "Happy", "happiness": "Happy", "joy": "Happy",
    "neutral": "Neutral", "calm": "Neutral",
    "sad": "Sad", "sadness": "Sad",
    "surprise": "Surprise", "surprised": "Surprise",
}
RAFDB_LABELS = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")  # 1..7
FER2013_LABELS = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")  # 0..6
FER2013_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}

FORMATS = ("synthetic", "caer", "folder", "rafdb", "fer2013")
DEFAULT_IMG_SIZE = (400, 600)  # (H, W), the paper's
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TEST_FRACTION = 0.2  # a flat folder tree (no train/ test/) keeps this stratified share for test

# the synthetic demo: image size (H, W), patch size and images per class (train, test), sized for
# about two CPU minutes of training. Measured at these settings (6 epochs, 2-core CPU): the small
# FaceRWKV reaches 93.3 % test accuracy, a linear classifier on the pixels 51.0 %.
SYNTHETIC_IMG_SIZE = (48, 72)
SYNTHETIC_PATCH_SIZE = 12  # -> 4 x 6 = 24 tokens
SYNTHETIC_SIZE = (3000, 100)
SYNTHETIC_CACHE_MB = 512  # per split and process: drawn faces are kept in memory up to this size


class DataError(Exception):
    """A user-facing data problem (layout, file, label); the message says what and how to fix it."""


# -----------------------------------------------------------------------------
# image transforms: any PIL mode -> RGB, resize, [0,1] float tensor, optional flip / normalisation

def _grey_from_array(a, mode):
    """Scale a high-bit-depth or float grey array to 8 bit. I;16 is 16-bit data (0..65535);
    I holds 8-bit data when its max <= 255, else 16-bit; F in [0,1] or [0,255]; anything else is
    min-max stretched so the picture stays visible."""
    a = np.nan_to_num(a.astype(np.float64))
    lo, hi = float(a.min()), float(a.max())
    if mode.startswith("I;16"):
        a = a / 257.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
        a = a / 257.0
    else:
        a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def to_rgb(img):
    """Any PIL image -> 8-bit RGB. Transparent pixels are composited onto white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_grey_from_array(np.asarray(img), mode)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise DataError(f"cannot convert image mode {mode!r} to RGB ({e})") from e


def _check_img_size(img_size):
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    if (not isinstance(img_size, (tuple, list)) or len(img_size) != 2
            or not all(isinstance(s, (int, np.integer)) and s > 0 for s in img_size)):
        raise DataError(f"img_size must be (H, W) with two positive ints, got {img_size!r}")
    return int(img_size[0]), int(img_size[1])


class ImageTransform:
    """PIL image -> float tensor (3, H, W): RGB, resized to img_size, in [0,1] (or ImageNet-
    normalised), randomly flipped left-right when hflip (torch RNG: seeded per DataLoader worker)."""

    def __init__(self, img_size=DEFAULT_IMG_SIZE, hflip=False, normalize=False):
        self.img_size = _check_img_size(img_size)
        self.hflip = hflip
        self.normalize = normalize

    def __call__(self, img):
        img = to_rgb(img)
        H, W = self.img_size
        if img.size != (W, H):
            img = img.resize((W, H), Image.BILINEAR)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W) uint8
        x = x.float().div_(255.0)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.normalize:
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
            x = (x - mean) / std
        return x


def _open_image(path):
    """Fully decode an image file; any failure becomes a DataError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except FileNotFoundError as e:
        raise DataError(f"image file vanished: {path} (was it moved or deleted while training?)") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e} (corrupt, truncated or not an image; "
                        f"delete it or pass --skip-bad-images)") from e


def load_image(path, img_size=DEFAULT_IMG_SIZE, normalize=False):
    """One image file -> tensor (3, H, W), with the evaluation transform (for predict)."""
    return ImageTransform(img_size, hflip=False, normalize=normalize)(_open_image(path))


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently grey

# -----------------------------------------------------------------------------
# sources: index -> (PIL image, label); datasets: source + indices + transform -> (tensor, label)

class FileSource:
    """Image files on disk: items is a list of (path, label)."""

    def __init__(self, items):
        self.paths = [p for p, _ in items]
        self.labels = [int(y) for _, y in items]

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        return _open_image(self.paths[i])

    def name(self, i):
        return self.paths[i]


class ArraySource:
    """In-memory grey images (N, h, w) uint8, e.g. FER2013's 48x48 pixels."""

    def __init__(self, images, labels, names):
        self.images, self.labels, self.names = images, [int(y) for y in labels], names

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        return Image.fromarray(self.images[i])

    def name(self, i):
        return self.names[i]


class FaceDataset(torch.utils.data.Dataset):
    """(tensor (3, H, W), label) for the given indices of a source. With skip_bad_images an
    unreadable item (e.g. a file deleted mid-epoch) is replaced by the next readable one, warned
    about and counted in .runtime_skipped; otherwise it raises DataError naming the file."""

    def __init__(self, source, indices, transform, skip_bad_images=False):
        self.source = source
        self.indices = [int(i) for i in indices]
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.runtime_skipped = []  # names of items skipped while iterating (per process)

    @property
    def labels(self):
        return [self.source.labels[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        if not -len(self.indices) <= k < len(self.indices):
            raise IndexError(f"index {k} out of range for a split of {len(self.indices)} images")
        k %= len(self.indices)
        for attempt in range(len(self.indices)):
            i = self.indices[(k + attempt) % len(self.indices)]
            try:
                return self.transform(self.source.load(i)), self.source.labels[i]
            except DataError as e:
                if not self.skip_bad_images:
                    raise
                name = self.source.name(i)
                if name not in self.runtime_skipped:
                    self.runtime_skipped.append(name)
                    warnings.warn(f"skipping unreadable image: {e}")
        raise DataError("every image of this split is unreadable")


# -----------------------------------------------------------------------------
# synthetic faces: drawn with Pillow, deterministic in (seed, split, index)

# per-class prototype of the expression parameters (the cues); samples jitter around them and
# some blend toward another class, so the classes overlap a little
_CUES = ("brow_raise", "brow_tilt", "eye_open", "mouth_curve", "mouth_open", "mouth_width",
         "nose_wrinkle", "frown_lines", "lip_asym", "teeth")
_PROTOTYPES = np.array([
    # raise  tilt   eye  curve  open  width wrinkle frown asym teeth
    [-1.26, -1.40, 0.58, -0.63, 0.00, 0.79, 0.00, 1.40, 0.00, 0.00],    # Anger: brows down and in, lips pressed
    [-0.70, -0.42, 0.44, -0.70, 0.21, 0.93, 1.40, 0.28, 1.40, 0.00],    # Disgust: nose wrinkle, raised lip side
    [1.12, 1.26, 1.63, -0.28, 0.70, 1.42, 0.00, 0.42, 0.00, 0.42],      # Fear: brows up and in, wide eyes, stretched mouth
    [0.00, 0.00, 0.65, 1.40, 0.49, 1.28, 0.00, 0.00, 0.00, 1.40],       # Happy: smile, teeth, slight squint
    [0.00, 0.00, 1.00, 0.00, 0.00, 1.00, 0.00, 0.00, 0.00, 0.00],       # Neutral
    [0.14, 1.40, 0.72, -1.26, 0.00, 0.86, 0.00, 0.00, 0.00, 0.00],      # Sad: inner brows up, mouth corners down
    [1.68, 0.28, 1.77, 0.00, 1.40, 0.58, 0.00, 0.00, 0.00, 0.00],       # Surprise: brows high, round open mouth
])
_CUE_JITTER = np.array([0.20, 0.20, 0.12, 0.20, 0.096, 0.096, 0.20, 0.20, 0.20, 0.20])
_SKIN_TONES = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 135], [198, 134, 96],
                        [161, 102, 69], [120, 75, 50], [88, 56, 40]], dtype=np.float64)
_DRAW_MIN_H = 96  # small images are drawn at this height, then downscaled (anti-aliasing)


def _item_rng(seed, split, index):
    """A numpy Generator for one synthetic item; a stable hash, identical on every machine."""
    digest = hashlib.sha256(f"facerwkv-synthetic:{seed}:{split}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _rand_color(rng, lo=0, hi=256):
    return tuple(int(c) for c in rng.integers(lo, hi, size=3))


def _shade(color, f):
    return tuple(int(max(0, min(255, c * f))) for c in color)


def _draw_background(draw, rng, w, h):
    """Cluttered context: wall/floor split, furniture-like boxes, blobs and lines."""
    wall, floor = _rand_color(rng, 40, 230), _rand_color(rng, 30, 200)
    horizon = int(h * rng.uniform(0.55, 0.9))
    draw.rectangle([0, 0, w, horizon], fill=wall)
    draw.rectangle([0, horizon, w, h], fill=floor)
    for _ in range(int(rng.integers(4, 12))):
        kind = rng.integers(0, 3)
        x0, y0 = rng.uniform(-0.1, 1.0) * w, rng.uniform(-0.1, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.05, 0.4) * w, y0 + rng.uniform(0.05, 0.4) * h
        color = _rand_color(rng)
        if kind == 0:
            draw.rectangle([x0, y0, x1, y1], fill=color)
        elif kind == 1:
            draw.ellipse([x0, y0, x1, y1], fill=color)
        else:
            draw.line([x0, y0, x1, y1], fill=color, width=max(1, int(rng.uniform(0.005, 0.03) * h)))


def _face_params(rng, label):
    """Expression cues of one sample: the class prototype, sometimes blended toward another
    class (overlap), plus per-sample jitter; and the identity/pose nuisances."""
    cues = _PROTOTYPES[label].copy()
    if rng.random() < 0.2:
        other = (label + int(rng.integers(1, len(CLASSES)))) % len(CLASSES)
        alpha = rng.uniform(0.0, 0.35)
        cues = (1 - alpha) * cues + alpha * _PROTOTYPES[other]
    cues = cues + rng.normal(0.0, 1.0, size=cues.shape) * _CUE_JITTER
    return dict(zip(_CUES, cues))


def _draw_face(draw, rng, cx, cy, u, p, skin, hair):
    """A frontal face centred at (cx, cy) with half-height u (pixels) and expression cues p."""
    rx = u * rng.uniform(0.70, 0.84)
    line = max(1, int(round(0.07 * u)))
    dark = _shade(skin, 0.5)
    ink = _shade(hair, 0.45)
    # hair behind the head and ears
    if rng.random() < 0.85:
        draw.ellipse([cx - rx * 1.1, cy - u * 1.12, cx + rx * 1.1, cy + u * rng.uniform(0.0, 0.6)], fill=hair)
    for s in (-1, 1):
        draw.ellipse([cx + s * rx * 0.92 - 0.12 * u, cy - 0.15 * u, cx + s * rx * 0.92 + 0.12 * u, cy + 0.15 * u],
                     fill=_shade(skin, 0.9))
    draw.ellipse([cx - rx, cy - u, cx + rx, cy + u], fill=skin, outline=_shade(skin, 0.8), width=line)
    # fringe
    if rng.random() < 0.6:
        fy = cy - u * rng.uniform(0.55, 0.75)
        draw.chord([cx - rx, cy - u, cx + rx, fy + (fy - (cy - u))], 180, 360, fill=hair)

    # eyes: white, iris, upper lid; eye_open scales the height
    eye_y = cy - 0.12 * u
    ew = 0.22 * rx * rng.uniform(0.9, 1.1)
    eh = max(0.015 * u, 0.11 * u * max(p["eye_open"], 0.15))
    gaze = rng.uniform(-0.3, 0.3) * ew
    for s in (-1, 1):
        ex = cx + s * 0.38 * rx
        draw.ellipse([ex - ew, eye_y - eh, ex + ew, eye_y + eh], fill=(245, 245, 240), outline=ink, width=line)
        ir = min(0.5 * ew, 0.9 * eh + 0.02 * u)
        draw.ellipse([ex + gaze - ir, eye_y - min(ir, eh), ex + gaze + ir, eye_y + min(ir, eh)], fill=(40, 30, 25))
        draw.arc([ex - ew, eye_y - eh, ex + ew, eye_y + eh], 200, 340, fill=ink, width=line + 1)

    # brows: height from brow_raise, inner end up for positive brow_tilt (sad, fear), down for anger
    brow_y = eye_y - 0.22 * u - 0.12 * u * p["brow_raise"]
    bw = max(1, int(round(0.12 * u)))
    for s in (-1, 1):
        inner = (cx + s * 0.10 * rx, brow_y - 0.11 * u * p["brow_tilt"])
        mid = (cx + s * 0.33 * rx, brow_y - 0.03 * u)
        outer = (cx + s * 0.60 * rx, brow_y + 0.04 * u * p["brow_tilt"])
        draw.line([inner, mid, outer], fill=ink, width=bw, joint="curve")
    if p["frown_lines"] > 0.5:  # vertical creases between lowered brows
        for s in (-1, 1):
            x = cx + s * 0.05 * rx
            draw.line([(x, brow_y - 0.02 * u), (x, brow_y + 0.09 * u)], fill=dark, width=line)

    # nose, with a wrinkled bridge and flared nostrils for disgust
    nose_y = cy + 0.2 * u
    draw.line([(cx, eye_y), (cx - 0.07 * rx, nose_y), (cx + 0.05 * rx, nose_y + 0.02 * u)], fill=dark, width=line)
    flare = 1.0 + 0.6 * max(p["nose_wrinkle"], 0.0)
    for s in (-1, 1):
        nx = cx + s * 0.09 * rx * flare
        draw.ellipse([nx - 0.035 * u, nose_y - 0.015 * u, nx + 0.035 * u, nose_y + 0.025 * u], fill=dark)
    if p["nose_wrinkle"] > 0.5:
        for j in range(3):
            y = eye_y + (0.05 + 0.045 * j) * u
            draw.line([(cx - 0.14 * rx, y), (cx, y - 0.02 * u), (cx + 0.14 * rx, y)], fill=dark, width=line)

    # mouth: corners up for a smile, down for sadness; opening; one side raised for disgust
    my = cy + 0.5 * u
    mw = 0.40 * rx * float(np.clip(p["mouth_width"], 0.4, 1.6))
    corner = -0.16 * u * p["mouth_curve"]  # y offset of the corners (negative = up)
    asym = -0.14 * u * max(p["lip_asym"], 0.0) * (1 if rng.random() < 0.5 else -1)
    h = 0.26 * u * max(p["mouth_open"], 0.0)
    xs = np.linspace(-1.0, 1.0, 13)
    centre = my + corner * xs ** 2 + asym * np.clip(xs, 0, None) ** 2
    bulge = np.sqrt(1.0 - xs ** 2)
    lip = (170, 60, 60)
    if h < 0.025 * u:
        draw.line(list(zip(cx + mw * xs, centre)), fill=lip, width=max(2, int(round(0.12 * u))), joint="curve")
    else:
        upper = list(zip(cx + mw * xs, centre - 0.35 * h * bulge))
        lower = list(zip(cx + mw * xs[::-1], (centre + 0.65 * h * bulge)[::-1]))
        draw.polygon(upper + lower, fill=(70, 15, 20), outline=lip, width=max(1, int(round(0.03 * u))))
        if p["teeth"] > 0.5:
            teeth = list(zip(cx + 0.85 * mw * xs, centre - 0.3 * h * bulge))
            teeth_low = list(zip(cx + 0.85 * mw * xs[::-1], (centre + 0.05 * h * bulge)[::-1]))
            draw.polygon(teeth + teeth_low, fill=(240, 240, 230))


def _draw_occluder(draw, rng, cx, cy, u):
    """Partial occlusion: a hand, a cup or a scarf over part of the face (never all of it)."""
    kind = rng.integers(0, 3)
    if kind == 0:  # hand-like blob at one side
        s = 1 if rng.random() < 0.5 else -1
        x, y = cx + s * u * rng.uniform(0.45, 0.8), cy + u * rng.uniform(-0.3, 0.6)
        r = u * rng.uniform(0.18, 0.3)
        draw.ellipse([x - r, y - r * 1.3, x + r, y + r * 1.3], fill=_rand_color(rng, 90, 250))
    elif kind == 1:  # cup / object in the lower corner
        x, y = cx + u * rng.uniform(-0.8, 0.8), cy + u * rng.uniform(0.7, 1.0)
        draw.rectangle([x - 0.2 * u, y - 0.3 * u, x + 0.2 * u, y + 0.3 * u], fill=_rand_color(rng))
    else:  # a bar over the forehead or chin
        y = cy + u * (rng.uniform(-1.0, -0.75) if rng.random() < 0.5 else rng.uniform(0.78, 1.0))
        draw.rectangle([cx - u, y - 0.12 * u, cx + u, y + 0.12 * u], fill=_rand_color(rng))


def synthetic_face(seed, split, index, img_size=SYNTHETIC_IMG_SIZE):
    """Draw synthetic face `index` of `split` -> (PIL RGB image of img_size (H, W), label).
    Labels cycle through CLASSES (index % 7), so every prefix of a split is balanced."""
    H, W = _check_img_size(img_size)
    label = index % len(CLASSES)
    rng = _item_rng(seed, split, index)
    scale = max(1.0, _DRAW_MIN_H / H)
    dh, dw = int(round(H * scale)), int(round(W * scale))
    canvas = Image.new("RGB", (dw, dh))
    _draw_background(ImageDraw.Draw(canvas), rng, dw, dh)

    # the person: shoulders (context) and a face on its own layer, rotated (head tilt) and pasted.
    # Framed like a face detector's loose crop (FER2013, RAF-DB): the face fills the height, but no
    # cue sits at a fixed pixel, so a linear classifier on pixels cannot simply read one off.
    u = dh * 0.55 * rng.uniform(0.9, 1.1)  # face half-height
    cx = dw * 0.5 + rng.uniform(-0.12, 0.12) * dw
    cy = dh * 0.5 + rng.uniform(-0.08, 0.08) * dh
    skin = tuple(int(c) for c in _SKIN_TONES[rng.integers(0, len(_SKIN_TONES))] * rng.uniform(0.9, 1.08))
    skin = tuple(min(255, c) for c in skin)
    hair = _rand_color(rng, 10, 140)
    draw = ImageDraw.Draw(canvas)
    draw.ellipse([cx - 1.6 * u, cy + 0.85 * u, cx + 1.6 * u, cy + 2.8 * u], fill=_rand_color(rng))
    draw.rectangle([cx - 0.3 * u, cy + 0.6 * u, cx + 0.3 * u, cy + 1.0 * u], fill=_shade(skin, 0.85))
    side = int(2.5 * u)
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    _draw_face(ImageDraw.Draw(layer), rng, side / 2, side / 2, u, _face_params(rng, label), skin, hair)
    layer = layer.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR)
    canvas.paste(layer, (int(cx - side / 2), int(cy - side / 2)), layer)
    if rng.random() < 0.2:
        _draw_occluder(draw, rng, cx, cy, u)
    if scale > 1.0:
        canvas = canvas.resize((W, H), Image.BILINEAR)

    # lighting (a directional gain), contrast, sensor noise; integer-exact after the gain
    a = np.asarray(canvas, dtype=np.float32)                          # (H, W, 3)
    theta = rng.uniform(0, 2 * math.pi)
    xs = (np.arange(W, dtype=np.float32) / W - 0.5) * np.float32(np.cos(theta))
    ys = (np.arange(H, dtype=np.float32) / H - 0.5) * np.float32(np.sin(theta))
    ramp = ys[:, None] + xs[None, :]                                  # (H, W) light direction
    gain = np.float32(rng.uniform(0.75, 1.2)) * (1.0 + np.float32(rng.uniform(0.0, 0.6)) * ramp)
    a = (a - 128.0) * np.float32(rng.uniform(0.75, 1.1)) + 128.0
    noise = rng.standard_normal(a.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 8.0))
    a = a * gain[..., None] + noise
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)), label


class SyntheticSource:
    """n_per_class * 7 synthetic faces of one split, drawn on the fly at img_size. Drawn images
    are kept (uint8, per process) up to SYNTHETIC_CACHE_MB, so later epochs cost nothing."""

    def __init__(self, split, n_per_class, img_size, seed=0):
        self.split, self.seed, self.img_size = split, seed, _check_img_size(img_size)
        self.labels = [i % len(CLASSES) for i in range(n_per_class * len(CLASSES))]
        H, W = self.img_size
        self.cache_limit = int(SYNTHETIC_CACHE_MB * 2 ** 20) // (H * W * 3)  # images that fit
        self.cache = {}

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        if i in self.cache:
            return Image.fromarray(self.cache[i])
        img = synthetic_face(self.seed, self.split, i, self.img_size)[0]
        if len(self.cache) < self.cache_limit:
            self.cache[i] = np.asarray(img)
        return img

    def name(self, i):
        return f"synthetic:{self.seed}:{self.split}:{i}"

    def draw(self, indices, processes=1):
        """Draw these items now, in `processes` worker processes, and keep them (as far as the cache
        allows): the same pixels as drawing them one by one on demand. Returns how many were drawn."""
        todo = sorted(set(int(i) for i in indices) - self.cache.keys())
        todo = todo[:max(0, self.cache_limit - len(self.cache))]
        jobs = [(self.seed, self.split, i, self.img_size) for i in todo]
        if processes > 1 and len(jobs) > 1:
            with multiprocessing.Pool(processes) as pool:
                arrays = pool.map(_draw_array, jobs, chunksize=max(1, min(256, len(jobs) // (4 * processes))))
        else:
            arrays = map(_draw_array, jobs)
        self.cache.update(zip(todo, arrays))
        return len(todo)


def _draw_array(job):
    seed, split, index, img_size = job
    return np.asarray(synthetic_face(seed, split, index, img_size)[0])


def export_synthetic(out_root, train_per_class=SYNTHETIC_SIZE[0], test_per_class=SYNTHETIC_SIZE[1],
                     img_size=SYNTHETIC_IMG_SIZE, seed=0):
    """Write the synthetic set as a CAER-S style tree OUT/{train,test}/<Class>/NNNNN.png (lossless,
    so load_datasets(OUT) gives back the same pixels). Returns out_root."""
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in CLASSES:
            os.makedirs(os.path.join(out_root, split, c), exist_ok=True)
        for i in range(n * len(CLASSES)):
            img, label = synthetic_face(seed, split, i, img_size)
            img.save(os.path.join(out_root, split, CLASSES[label], f"{i:05d}.png"))
    return out_root


# -----------------------------------------------------------------------------
# indexing files on disk

def _is_image_name(name):
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _visible_dirs(path):
    return sorted(d for d in os.listdir(path)
                  if not d.startswith((".", "__")) and os.path.isdir(os.path.join(path, d)))


def _header_ok(path):
    """Cheap check at index time: PIL can identify the file (reads only the header)."""
    try:
        with Image.open(path) as im:
            im.size
        return None
    except FileNotFoundError:
        return "file not found"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"not a readable image ({e})"


class _Report:
    """What indexing found besides good images: skipped bad files, ignored stray files."""

    def __init__(self, skip_bad_images):
        self.skip_bad_images = skip_bad_images
        self.skipped = []  # (name, reason)
        self.ignored = 0  # stray non-image files

    def bad(self, name, reason, hint):
        if not self.skip_bad_images:
            raise DataError(f"{name}: {reason}. {hint}")
        self.skipped.append((name, reason))


def _scan_class_dir(path, report):
    """Readable image files under one class folder (recursively, sorted, hidden entries ignored)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for f in sorted(filenames):
            if f.startswith("."):  # hidden: .DS_Store, macOS ._ resource forks
                continue
            if not _is_image_name(f):
                report.ignored += 1
                continue
            p = os.path.join(dirpath, f)
            problem = _header_ok(p)
            if problem:
                report.bad(p, problem, "Delete the file or pass --skip-bad-images to skip it")
            else:
                files.append(p)
    return files


def _canonical_class(name):
    return CLASS_ALIASES.get(name.lower())


def _looks_like_caer(split_dir):
    """A split folder whose class folders are mostly the basic-emotion names."""
    names = _visible_dirs(split_dir)
    return sum(_canonical_class(n) is not None for n in names) >= 4


def _split_dirs(root):
    """{split: path} for a tree with train/ (val/) test/ subfolders (any case), else {}."""
    found = {}
    for d in _visible_dirs(root):
        key = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "test": "test", "testing": "test"}.get(d.lower())
        if key:
            found[key] = os.path.join(root, d)
    return found if "train" in found else {}


def _index_caer(root, report):
    """CAER-S: ROOT/train and ROOT/test, each with the 7 emotion folders -> items per split."""
    dirs = _split_dirs(root)
    expected = ", ".join(CLASSES)
    for split in ("train", "test"):
        if split not in dirs:
            raise DataError(f"CAER-S layout needs {os.path.join(root, split)}/ with the class folders "
                            f"{expected} (found: {_visible_dirs(root) or 'nothing'})")
    items = {}
    for split, sdir in dirs.items():
        per_class = {}
        for d in _visible_dirs(sdir):
            c = _canonical_class(d)
            if c is None:
                raise DataError(f"unknown class folder {os.path.join(sdir, d)}: CAER-S expects {expected} "
                                f"('Angry' is accepted for 'Anger'); rename or remove it, or use "
                                f"--dataset folder to take the folder names as classes")
            if c in per_class:
                raise DataError(f"two folders in {sdir} mean the same class {c}; merge them")
            per_class[c] = _scan_class_dir(os.path.join(sdir, d), report)
        missing = [c for c in CLASSES if c not in per_class]
        if missing:
            raise DataError(f"{sdir} lacks class folders {', '.join(missing)} (CAER-S has {expected})")
        for c, files in per_class.items():
            if not files:
                raise DataError(f"class folder {os.path.join(sdir, c)} has no readable images")
        items[split] = [(p, CLASSES.index(c)) for c in CLASSES for p in per_class[c]]
    return CLASSES, items


def _index_folder(root, report):
    """ImageFolder tree: classes = sorted folder names of train (or of ROOT), same map everywhere."""
    dirs = _split_dirs(root) or {"all": root}
    base = dirs.get("train", root)
    classes = tuple(_visible_dirs(base))
    if not classes:
        raise DataError(f"no class folders in {base}: expected {base}/<class name>/<images>, "
                        f"optionally under train/ and test/ (and val/)")
    items = {}
    for split, sdir in dirs.items():
        names = _visible_dirs(sdir)
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise DataError(f"class folders {unknown} in {sdir} are not in {base} (classes: {list(classes)}); "
                            f"every split must use the same class folders")
        items[split] = []
        for y, c in enumerate(classes):
            if c not in names:
                continue
            files = _scan_class_dir(os.path.join(sdir, c), report)
            if not files and split in ("train", "all"):
                raise DataError(f"class folder {os.path.join(sdir, c)} has no readable images")
            items[split] += [(p, y) for p in files]
    return classes, items


def _index_rafdb(root, report):
    """RAF-DB basic: label file lines `train_00001.jpg 5` (1..7) -> aligned image paths."""
    label_file = os.path.join(root, "EmoLabel", "list_patition_label.txt")
    if not os.path.isfile(label_file):
        raise DataError(f"RAF-DB label file not found: {label_file} (expected ROOT/EmoLabel/"
                        f"list_patition_label.txt and ROOT/Image/aligned/)")
    img_dir = os.path.join(root, "Image", "aligned")
    if not os.path.isdir(img_dir):
        raise DataError(f"RAF-DB image folder not found: {img_dir}")
    to_ours = [CLASSES.index(_canonical_class(n)) for n in RAFDB_LABELS]
    items = {"train": [], "test": []}
    with open(label_file, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            where = f"{label_file} line {lineno}"
            split = parts[0].split("_")[0]
            if len(parts) != 2 or not parts[1].isdigit() or split not in items:
                report.bad(where, f"malformed line {line.strip()!r}",
                           "Each line must be `train_00001.jpg 5` or `test_0001.jpg 5`")
                continue
            label = int(parts[1])
            if not 1 <= label <= 7:
                report.bad(where, f"label {label} out of range 1..7", "Fix the label")
                continue
            stem = os.path.splitext(parts[0])[0]
            path = os.path.join(img_dir, f"{stem}_aligned.jpg")
            problem = _header_ok(path)
            if problem:
                report.bad(path, problem, "Restore the file, or pass --skip-bad-images")
                continue
            items[split].append((path, to_ours[label - 1]))
    for split in items:
        if not items[split]:
            raise DataError(f"{label_file} lists no usable {split} images")
    return CLASSES, items


def _index_fer2013(csv_path, report):
    """FER2013: rows (emotion 0..6, 2304 grey values, Usage) -> uint8 arrays per split."""
    to_ours = [CLASSES.index(_canonical_class(n)) for n in FER2013_LABELS]
    rows = {"train": [], "val": [], "test": []}
    with open(csv_path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if not {"emotion", "pixels", "Usage"} <= set(header):
            raise DataError(f"{csv_path}: header must contain emotion,pixels,Usage (found {header})")
        ie, ip, iu = header.index("emotion"), header.index("pixels"), header.index("Usage")
        for row in reader:
            lineno = reader.line_num
            if not row:
                continue
            where = f"{csv_path} line {lineno}"
            try:
                emotion = int(row[ie])
                pixels = np.array(row[ip].split(), dtype=np.int64)
                usage = row[iu].strip()
            except (IndexError, ValueError) as e:
                report.bad(where, f"malformed row ({e})", "Fix or delete the row")
                continue
            if not 0 <= emotion <= 6:
                report.bad(where, f"emotion {emotion} out of range 0..6", "Fix the label")
            elif pixels.size != 48 * 48 or pixels.min() < 0 or pixels.max() > 255:
                report.bad(where, f"pixels must be 2304 values in 0..255 (got {pixels.size})", "Fix the row")
            elif usage not in FER2013_USAGE:
                report.bad(where, f"unknown Usage {usage!r} (expected {list(FER2013_USAGE)})", "Fix the row")
            else:
                rows[FER2013_USAGE[usage]].append((pixels.astype(np.uint8).reshape(48, 48), to_ours[emotion], lineno))
    sources = {}
    for split, r in rows.items():
        if not r and split != "val":
            raise DataError(f"{csv_path} has no usable rows for {split} "
                            f"(Usage {[k for k, v in FER2013_USAGE.items() if v == split][0]})")
        if r:
            images = np.stack([x for x, _, _ in r])
            sources[split] = ArraySource(images, [y for _, y, _ in r], [f"{csv_path} line {n}" for _, _, n in r])
    return CLASSES, sources


def detect_format(root):
    """Guess the format of a dataset path (an explicit fmt always wins)."""
    if root is None:
        return "synthetic"
    if not os.path.exists(root):
        raise DataError(f"dataset path not found: {root}")
    if os.path.isfile(root):
        if root.lower().endswith(".csv"):
            return "fer2013"
        raise DataError(f"{root} is a file; give a dataset folder or a fer2013.csv")
    if os.path.isfile(os.path.join(root, "fer2013.csv")):
        return "fer2013"
    if os.path.isfile(os.path.join(root, "EmoLabel", "list_patition_label.txt")):
        return "rafdb"
    dirs = _split_dirs(root)
    if dirs and _looks_like_caer(dirs["train"]):
        return "caer"
    return "folder"


# -----------------------------------------------------------------------------
# splits

def stratified_split(labels, fraction, seed):
    """Move a seeded `fraction` of every class out: -> (kept indices, held-out indices), disjoint.
    Classes with at least 2 items give at least 1 (and keep at least 1)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        held += idx[:n].tolist()
        keep += idx[n:].tolist()
    keep, held = sorted(keep), sorted(held)
    assert not set(keep) & set(held) and len(keep) + len(held) == len(labels), "split must be a partition"
    return keep, held


def sanity_subset(labels, n_per_class, seed):
    """A deterministic pick of n images of each class (the paper's 14-image check is n = 2)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked += sorted(idx[rng.permutation(len(idx))[:n_per_class]].tolist())
    return sorted(picked)


@dataclass
class Splits:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    classes: tuple
    info: dict = field(default_factory=dict)

    def counts(self):
        """{split: [count per class]}"""
        out = {}
        for split in ("train", "val", "test"):
            out[split] = np.bincount(getattr(self, split).labels, minlength=len(self.classes)).tolist()
        return out

    def summary(self):
        info, counts = self.info, self.counts()
        H, W = info["img_size"]
        lines = [f"dataset: {info['format']}  root: {info['root']}",
                 f"image size: {H}x{W} (HxW)  normalize: {info['normalize']}  hflip: {info['hflip']}",
                 f"validation: {info['val_source']}"]
        if info.get("sanity_per_class"):
            lines.append(f"sanity subset: {info['sanity_per_class']} per class (train = val = test)")
        width = max(8, max(len(c) for c in self.classes) + 2)
        lines.append(f"{'class':<{width}}{'train':>8}{'val':>8}{'test':>8}")
        for y, c in enumerate(self.classes):
            lines.append(f"{c:<{width}}" + "".join(f"{counts[s][y]:>8}" for s in ("train", "val", "test")))
        lines.append(f"{'total':<{width}}" + "".join(f"{sum(counts[s]):>8}" for s in ("train", "val", "test")))
        skipped = info.get("skipped", [])
        runtime = sorted({n for s in ("train", "val", "test") for n in getattr(getattr(self, s), "runtime_skipped", [])})
        if skipped or runtime:
            first = (skipped[0][0] + ": " + skipped[0][1]) if skipped else runtime[0]
            lines.append(f"skipped bad items: {len(skipped)} while indexing, {len(runtime)} while reading "
                         f"(first: {first})")
        if info.get("ignored"):
            lines.append(f"ignored non-image files: {info['ignored']}")
        drawn = info.get("drawn")
        if drawn and drawn["images"]:
            lines.append(f"synthetic faces drawn: {drawn['images']} in {drawn['seconds']:.1f} s "
                         f"({drawn['images'] / max(drawn['seconds'], 1e-9):.0f} images/s, {drawn['processes']} processes)")
        return "\n".join(lines)


def load_datasets(root=None, fmt="auto", img_size=DEFAULT_IMG_SIZE, val_fraction=0.1, seed=0,
                  sanity_per_class=None, hflip=False, normalize=False, skip_bad_images=False,
                  synthetic_size=SYNTHETIC_SIZE, synthetic_processes=1):
    """Load a dataset -> Splits(train, val, test, classes, info). root None = synthetic faces.
    Synthetic faces are drawn on demand; with synthetic_processes > 1 every image the splits use is
    drawn up front by that many processes instead (the same pixels, sooner)."""
    img_size = _check_img_size(img_size)
    if fmt not in ("auto",) + FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(root)
    elif fmt != "synthetic" and (root is None or not os.path.exists(root)):
        raise DataError(f"dataset path not found: {root} (format {fmt} needs a path)")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    report = _Report(skip_bad_images)

    # sources per split: train, test, and val when the format has its own
    if fmt == "synthetic":
        n_train, n_test = synthetic_size
        classes = CLASSES
        sources = {"train": SyntheticSource("train", n_train, img_size, seed),
                   "test": SyntheticSource("test", n_test, img_size, seed)}
    elif fmt == "fer2013":
        csv_path = os.path.join(root, "fer2013.csv") if os.path.isdir(root) else root
        if not os.path.isfile(csv_path):
            raise DataError(f"FER2013 csv not found: {csv_path}")
        classes, sources = _index_fer2013(csv_path, report)
    else:
        if not os.path.isdir(root):
            raise DataError(f"{root} is not a folder (format {fmt})")
        index = {"caer": _index_caer, "folder": _index_folder, "rafdb": _index_rafdb}[fmt]
        classes, items = index(root, report)
        if "all" in items:  # a flat folder tree: carve out a stratified test split
            labels = [y for _, y in items["all"]]
            keep, held = stratified_split(labels, TEST_FRACTION, seed)
            items = {"train": [items["all"][i] for i in keep], "test": [items["all"][i] for i in held]}
        sources = {s: FileSource(it) for s, it in items.items()}

    train_tf = ImageTransform(img_size, hflip=hflip, normalize=normalize)
    eval_tf = ImageTransform(img_size, hflip=False, normalize=normalize)
    train_src = sources["train"]
    all_train = list(range(len(train_src)))
    if sanity_per_class:
        # overfitting check: the same few training images for train, val and test
        pick = sanity_subset(train_src.labels, sanity_per_class, seed)
        train = FaceDataset(train_src, pick, train_tf, skip_bad_images)
        val = FaceDataset(train_src, pick, eval_tf, skip_bad_images)
        test = FaceDataset(train_src, pick, eval_tf, skip_bad_images)
        val_source = "the sanity subset itself"
    else:
        if "val" in sources:
            train = FaceDataset(train_src, all_train, train_tf, skip_bad_images)
            val = FaceDataset(sources["val"], range(len(sources["val"])), eval_tf, skip_bad_images)
            val_source = "the dataset's own validation split"
        else:
            keep, held = stratified_split(train_src.labels, val_fraction, seed)
            train = FaceDataset(train_src, keep, train_tf, skip_bad_images)
            val = FaceDataset(train_src, held, eval_tf, skip_bad_images)
            val_source = f"{val_fraction:.0%} of train, stratified per class, seed {seed}"
        test = FaceDataset(sources["test"], range(len(sources["test"])), eval_tf, skip_bad_images)

    drawn = None
    if fmt == "synthetic" and synthetic_processes > 1:
        t0 = time.time()
        n = sum(ds.source.draw(ds.indices, synthetic_processes) for ds in (train, val, test))
        drawn = dict(images=n, seconds=round(time.time() - t0, 2), processes=synthetic_processes)

    splits = Splits(train, val, test, tuple(classes))
    splits.info = dict(format=fmt, root=root, img_size=img_size, classes=list(classes),
                       counts=splits.counts(), val_source=val_source, sanity_per_class=sanity_per_class,
                       normalize=normalize, hflip=hflip, skipped=report.skipped, ignored=report.ignored,
                       drawn=drawn)
    return splits
