"""
Data for FaceRWKV: the facial-expression datasets users hold, plus a built-in synthetic one.

Everything goes through one call, `load_datasets(...) -> Splits`, whose .train/.val/.test are torch
Datasets yielding (image float tensor (3, H, W), int label). Supported formats:
  - "caer":      CAER-S, ROOT/{train,test}/{Anger,Disgust,Fear,Happy,Neutral,Sad,Surprise}/*.png
                 (the paper's data; `Angry` and other common spellings are accepted).
  - "folder":    any ImageFolder-style tree: ROOT/<class>/* or ROOT/{train,[val],test}/<class>/*;
                 classes are the sorted folder names, one index map shared by every split.
  - "rafdb":     RAF-DB basic, EmoLabel/list_patition_label.txt + Image/aligned/*_aligned.jpg, or
                 POSTER V2's tree ROOT/{train,valid}/{1..7}/* in RAF-DB's numbering.
  - "fer2013":   fer2013.csv (emotion, pixels, Usage), 48x48 grey images.
  - "affectnet": AffectNet, training.csv + validation.csv (subDirectory_filePath, face box, landmarks,
                 expression, valence, arousal) with the images under Manually_Annotated_Images/ (or
                 ROOT/); or the numbered trees ROOT/[{train,[val],test}/]{0..7}/* in AffectNet's
                 numbering. 7 classes (CLASSES) or 8 (+ Contempt); None/Uncertain/No-Face dropped.
  - "synthetic": procedurally drawn faces (the default when root is None); needs no files.
For the basic emotions the class order is always CLASSES (CAER-S order), whatever order the source
uses, so a label means the same emotion for every dataset. Numbered class folders are a dataset's
own labels: read as RAF-DB's or AffectNet's when that format is given, refused when detected.

Every folder tree is read by one walk (`walk`) and every image by one reader (`read_image`). Validation
is 10 % of train, stratified per class, seeded, moved out of train, unless the format brings its own
(FER2013 PublicTest, a tree's val/ beside test/); a tree's val/ without test/ is its test split
(POSTER V2's RAF-DB), as AffectNet's official validation set is its test set. Bad data is never
mislabelled silently: it raises DataError naming the file/line and the fix, or, with
skip_bad_images=True, is skipped and counted in the summary. Images are resized one by one, then
augmented a batch at a time (ImageTransform: training split only, off by default).
"""

import collections
import csv
import glob
import hashlib
import itertools
import math
import multiprocessing
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile, ImageOps, UnidentifiedImageError

import facerwkv

# -----------------------------------------------------------------------------
# Classes, label tables and formats

CLASSES = ("Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")  # CAER-S order

# spellings of the basic emotions found in the wild (folder names, label tables), lower case
CLASS_ALIASES = {"anger": "Anger", "angry": "Anger", "disgust": "Disgust", "disgusted": "Disgust",
                 "fear": "Fear", "fearful": "Fear", "afraid": "Fear", "happy": "Happy", "happiness": "Happy",
                 "joy": "Happy", "neutral": "Neutral", "calm": "Neutral", "sad": "Sad", "sadness": "Sad",
                 "surprise": "Surprise", "surprised": "Surprise"}
RAFDB_LABELS = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")  # 1..7
RAFDB_LABEL_FILE = os.path.join("EmoLabel", "list_patition_label.txt")
FER2013_LABELS = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")  # 0..6
FER2013_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
# AffectNet's expression column, 0..10; AffectNet-7 keeps 0-6, AffectNet-8 keeps 0-7
AFFECTNET_LABELS = ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt",
                    "None", "Uncertain", "No-Face")
AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                     "facial_landmarks", "expression", "valence", "arousal")  # a headerless csv's order
AFFECTNET_CSVS = {"train": "training.csv", "test": "validation.csv"}  # the official validation set is the test set

FORMATS = ("synthetic", "caer", "folder", "rafdb", "fer2013", "affectnet")
DEFAULT_IMG_SIZE = (400, 600)  # (H, W), the paper's
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")
TEST_FRACTION = 0.2  # a flat folder tree (no train/ test/) keeps this stratified share for test


class DataError(Exception):
    """A user-facing data problem (layout, file, label); the message says what and how to fix it,
    its file names printable whatever their encoding (shown)."""

    def __init__(self, message):
        super().__init__(shown(message))


def shown(text):
    """Text naming files, printable on a strict UTF-8 terminal: the bytes of a file name that are not
    UTF-8 (a Latin-1 name from an old archive, which Python holds as surrogates) escaped, as \\udce9."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def affectnet_class_names(n):
    """The class names of AffectNet-n: the project's seven (CLASSES order), plus Contempt for 8."""
    if n not in (7, 8):
        raise DataError(f"affectnet_classes must be 7 or 8, got {n!r}")
    return CLASSES + (("Contempt",) if n == 8 else ())


# -----------------------------------------------------------------------------
# Images: any PIL mode -> RGB, resized uint8 pixels; a batch -> normalised, flipped, erased floats

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
    return img.convert("RGB")  # a failure is named by the reader (read_image)


def _two_positive_ints(pair, name="img_size (H, W)"):
    """An image size (H, W), or a synthetic split size (train, test): one int n is (n, n)."""
    pair = (pair, pair) if isinstance(pair, int) else pair
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(n, (int, np.integer)) and n > 0 for n in pair)):
        raise DataError(f"{name} must be two positive ints, got {pair!r}")
    return int(pair[0]), int(pair[1])


def check_erasing(random_erasing, erasing_scale):
    """The one check of the random-erasing settings (the library's arguments and train.py's flags)."""
    if not 0.0 <= random_erasing <= 1.0:
        raise DataError(f"random_erasing (--random-erasing) is a probability in [0, 1], got {random_erasing}")
    if not (len(erasing_scale) == 2 and 0.0 < erasing_scale[0] <= erasing_scale[1] < 1.0):
        raise DataError(f"erasing_scale (--erasing-scale LO HI) must have 0 < LO <= HI < 1, got {tuple(erasing_scale)}")
    return float(random_erasing), tuple(float(v) for v in erasing_scale)


def erasing_box(H, W, p, scale=(0.02, 0.33), ratio=(0.3, 3.3)):
    """Random erasing (Zhong et al. 2020) with torchvision's RandomErasing semantics, drawing from
    torch's RNG in the same order: with probability p, a rectangle of H x W -> (top, left, h, w),
    else None. Its area is a uniform fraction `scale` of H*W, its aspect h/w log-uniform in
    `ratio`; up to 10 tries for a rectangle that fits, else None. p = 0 draws nothing."""
    if p <= 0 or not torch.rand(1) < p:
        return None
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        area = H * W * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if h < H and w < W:
            top = torch.randint(0, H - h + 1, size=(1,)).item()
            left = torch.randint(0, W - w + 1, size=(1,)).item()
            return top, left, h, w
    return None


def random_erase(x, p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0.0):
    """x (C, H, W) with one erasing_box set to `value` (a copy), or x itself."""
    box = erasing_box(*x.shape[-2:], p, scale, ratio)
    if box is None:
        return x
    top, left, h, w = box
    x = x.clone()
    x[..., top:top + h, left:left + w] = value
    return x


class ImageTransform:
    """PIL image -> uint8 pixels (3, H, W): RGB, resized to img_size (pixels, per image); then a
    batch of them -> float (B, 3, H, W) in [0,1] (or ImageNet-normalised), for training randomly
    flipped left-right when hflip and randomly erased with probability random_erasing (a rectangle
    of erasing_scale times the image's area, on the normalised image, value 0, as POSTER V2 does).
    The batch draws torch's RNG image by image in the order one image at a time would (flip, then
    erasing), so batches do not depend on how they are cut; the DataLoader seeds it per worker and
    epoch, so a resumed run replays it. Calling it on one image is the batch of one."""

    def __init__(self, img_size=DEFAULT_IMG_SIZE, hflip=False, normalize=False, random_erasing=0.0,
                 erasing_scale=(0.02, 0.33)):
        self.img_size = _two_positive_ints(img_size)
        self.hflip = hflip
        self.random_erasing, self.erasing_scale = check_erasing(random_erasing, erasing_scale)
        # pixel p in 0..255 -> p * scale - shift: p / 255 in [0, 1], or (p / 255 - mean) / std
        std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.scale = 1 / (255 * std) if normalize else torch.full((3, 1, 1), 1 / 255)
        self.shift = mean / std if normalize else torch.zeros(3, 1, 1)

    def pixels(self, img):
        """PIL image (or uint8 RGB array already at img_size) -> uint8 array (H, W, 3)."""
        H, W = self.img_size
        if isinstance(img, np.ndarray) and img.shape == (H, W, 3) and img.dtype == np.uint8:
            return img
        img = to_rgb(img)
        return np.asarray(img if img.size == (W, H) else img.resize((W, H), Image.BILINEAR))

    def batch(self, pixels):
        """uint8 (B, H, W, 3) -> float (B, 3, H, W)."""
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        x = x.mul_(self.scale).sub_(self.shift)
        H, W = self.img_size
        flips, boxes = [], []
        for k in range(len(x)):
            if self.hflip and torch.rand(()) < 0.5:
                flips.append(k)
            box = erasing_box(H, W, self.random_erasing, self.erasing_scale)
            if box is not None:
                boxes.append((k,) + box)
        if flips:
            x[flips] = x[flips].flip(-1)
        for k, top, left, h, w in boxes:
            x[k, :, top:top + h, left:left + w] = 0.0
        return x

    def __call__(self, img):
        return self.batch(np.stack([self.pixels(img)]))[0]  # (3, H, W)


def read_image(path, missing=None, fix="delete it or pass --skip-bad-images"):
    """The one image reader (training, evaluation, prediction): a file -> 8-bit RGB PIL image as a
    person sees it: fully decoded, turned upright by its EXIF orientation (a phone photo stored on
    its side, orientation 6), any mode converted by to_rgb. Any failure is a DataError naming the
    file; `missing` is the message for a file that is not there (default: it vanished after indexing)."""
    try:
        with Image.open(path) as im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            return to_rgb(im)
    except FileNotFoundError as e:
        raise DataError(missing or f"image file vanished: {path} (was it moved or deleted while training?)") from e
    except Image.DecompressionBombError as e:
        raise DataError(f"image too large: {path} ({e}); shrink it, or {fix}") from e
    except Exception as e:  # a broken file makes Pillow raise OSError, ValueError, SyntaxError, struct.error, ...
        raise DataError(f"cannot read image {path}: {e} (corrupt, truncated or not an image; {fix})") from e


def load_image(path, img_size=DEFAULT_IMG_SIZE, normalize=False):
    """One image file -> tensor (3, H, W), with the evaluation transform (for predict)."""
    img = read_image(path, missing=f"no such image file: {path}", fix="give another image")
    return ImageTransform(img_size, hflip=False, normalize=normalize)(img)


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently grey

# -----------------------------------------------------------------------------
# Sources: index -> (PIL image, label); datasets: source + indices + transform -> (tensor, label)

class ImageSource:
    """The images of one split, index -> (PIL image, label): files on disk (paths), or in-memory
    grey images (N, h, w) uint8 (FER2013's 48x48 pixels) with a name for each. boxes, if given,
    holds per file the face box (left, top, right, bottom) to crop it to (AffectNet's csv)."""

    def __init__(self, labels, paths=None, images=None, names=None, boxes=None):
        self.labels, self.paths, self.images, self.boxes = [int(y) for y in labels], paths, images, boxes
        self.names = names or paths

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        if self.images is not None:
            return Image.fromarray(self.images[i])
        img = read_image(self.paths[i])
        return img.crop(self.boxes[i]) if self.boxes is not None else img

    def name(self, i):
        return self.names[i]


class FaceDataset(torch.utils.data.Dataset):
    """(tensor (3, H, W), label) for the given indices of a source. With skip_bad_images an
    unreadable item (e.g. a file deleted mid-epoch) is replaced by the next readable one, warned
    about and counted in .runtime_skipped; otherwise it raises DataError naming the file.
    A DataLoader fetches a batch through __getitems__: one transform of the whole batch."""

    def __init__(self, source, indices, transform, skip_bad_images=False):
        self.source = source
        self.indices = [int(i) for i in indices]
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.runtime_skipped = []  # names of items skipped while iterating (per process)

    @property
    def labels(self):
        """The label of every item, in order (what a class-balanced sampler draws from)."""
        return [self.source.labels[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def _pixels(self, k):
        """Item k -> (uint8 pixels (H, W, 3), label)."""
        if not -len(self.indices) <= k < len(self.indices):
            raise IndexError(f"index {k} out of range for a split of {len(self.indices)} images")
        k %= len(self.indices)
        for attempt in range(len(self.indices)):
            i = self.indices[(k + attempt) % len(self.indices)]
            try:
                return self.transform.pixels(self.source.load(i)), self.source.labels[i]
            except DataError as e:
                if not self.skip_bad_images:
                    raise
                name = self.source.name(i)
                if name not in self.runtime_skipped:
                    self.runtime_skipped.append(name)
                    warnings.warn(f"skipping unreadable image: {e}")
        raise DataError("every image of this split is unreadable")

    def __getitems__(self, ks):
        """Items ks -> [(image, label)]: pixels per image, then one batch transform."""
        pixels, labels = zip(*(self._pixels(k) for k in ks))
        return list(zip(self.transform.batch(np.stack(pixels)), labels))

    def __getitem__(self, k):
        return self.__getitems__([k])[0]


# -----------------------------------------------------------------------------
# Indexing datasets on disk: each format -> (classes, {split: items or source})

_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test", "testing": "test"}  # split folder names (any case) -> split
HIDDEN = (".", "__")  # .DS_Store, macOS's ._ forks, .git/, __MACOSX/
TREE_LAYOUT = "ROOT/<class>/<images> or ROOT/{train,[val],test}/<class>/<images>"


def _canonical_class(name):
    return CLASS_ALIASES.get(name.lower())


def _numbering(labels, first, classes):
    """A dataset's own label numbers (labels[0] is number `first`) -> {number as text: its index in
    classes, or its label's name when that is not among the classes (an item to drop)}."""
    named = {str(k): _canonical_class(n) or n for k, n in enumerate(labels, first)}
    return {k: classes.index(c) if c in classes else c for k, c in named.items()}


class IndexingLog:
    """What indexing found besides usable items: every file, folder or row not taken, with why
    (skipped); the real paths of the folders walked (seen: each is read once); items dropped on
    purpose (AffectNet's labels outside the chosen classes)."""

    def __init__(self, skip_bad_images):
        self.skip_bad_images = skip_bad_images
        self.skipped = []  # (name, reason, detail): hidden, not an image, unreadable, bad row, ...
        self.seen = set()
        self.dropped = collections.Counter()  # label name -> items dropped

    def skip(self, name, reason, detail=""):
        self.skipped.append((name, reason, detail))

    def bad(self, name, problem, hint, reason="bad row"):
        """A bad file or row: raised, or with skip_bad_images recorded as skipped."""
        if not self.skip_bad_images:
            raise DataError(f"{name}: {problem}. {hint}")
        self.skip(name, reason, problem)

    def image(self, path, hint="Restore the file, or pass --skip-bad-images", where=None):
        """Cheap check at index time that PIL can identify an image file (it reads only the header)
        -> its (width, height), else None, the problem recorded (or raised), named `where` if given."""
        try:
            with Image.open(path) as im:
                return im.size
        except FileNotFoundError:
            problem = "file not found"
        except Image.DecompressionBombError as e:
            problem = f"image too large ({e})"
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            problem = f"not a readable image ({e})"
        self.bad(where or path, f"{problem}: {path}" if where else problem, hint, "unreadable")
        return None


def skipped_line(skipped):
    """[(name, reason[, detail])] -> "skipped 3 files: not an image 2, hidden 1" (and the first detail)."""
    counts, n = collections.Counter(s[1] for s in skipped), len(skipped)
    kinds = {"row" if reason == "bad row" else "file" for reason in counts}
    first = next((f" (first: {s[0]}: {s[2]})" for s in skipped if len(s) > 2 and s[2]), "")
    noun = kinds.pop() if len(kinds) == 1 else "item"
    return f"skipped {n} {noun}{'s' * (n != 1)}: " + ", ".join(f"{r} {k}" for r, k in counts.items()) + first


def _listing(folder, report=None, images=True):
    """One folder's entries, sorted -> (subfolder names, image file names); the rest is recorded in
    report with why: hidden, not an image, or (images False: a layout level) outside the class folders."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:  # without a report: raised
        (report or IndexingLog(False)).bad(folder, f"cannot list it ({e.strerror})", "Fix its permissions", "unreadable")
        return [], []
    folders, files = [], []
    for e in entries:
        image = images and e.name.lower().endswith(IMG_EXTENSIONS)
        why = ("hidden" if e.name.startswith(HIDDEN) else None if e.is_dir() or image  # is_dir: a linked folder too
               else "not an image" if images else "outside the class folders")
        if why is None:
            (folders if e.is_dir() else files).append(e.name)
        elif report is not None:
            report.skip(e.path, why)
    return folders, files


def walk(folder, report, check=True):
    """The one folder walk: the image files under `folder`, recursively, sorted, through linked
    folders; each real folder is read once (a link loop, or a second link to a folder already read,
    is skipped and recorded). check: PIL must identify each file (report.image)."""
    if os.path.realpath(folder) in report.seen:
        report.skip(folder, "linked folder read already")
        return []
    report.seen.add(os.path.realpath(folder))
    folders, names = _listing(folder, report)
    files = [p for p in (os.path.join(folder, n) for n in names)
             if not check or report.image(p, "Delete the file or pass --skip-bad-images to skip it")]
    for d in folders:
        files += walk(os.path.join(folder, d), report, check)
    return files


def image_files(paths):
    """Bulk prediction's inputs -> (image files, [(name, reason)] skipped). Each path is a file, a
    folder (every image file under it, by the datasets' walk) or a glob pattern the shell did not
    expand (`photos/*.jpg`, `**` recursive); a path that matches nothing is skipped, never raised."""
    report, files = IndexingLog(skip_bad_images=True), []
    for p in paths:
        matches = sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) and not os.path.lexists(p) else [p]
        for m in matches or [p]:
            if os.path.isdir(m):
                files += walk(m, report, check=False)
            elif not os.path.lexists(m):
                report.skip(m, "matches nothing" if glob.has_magic(m) else "no such file or folder")
            elif m.lower().endswith(IMG_EXTENSIONS):
                files.append(m)
            else:
                report.skip(m, "not an image")
    return list(dict.fromkeys(files)), [(n, f"{r} ({d})" if d else r) for n, r, d in report.skipped]


def _split_dirs(root, folders=None):
    """{split: folder} of the split folders among root's subfolders (train, val or valid, test; any case)."""
    return {_SPLIT_NAMES[d.lower()]: os.path.join(root, d) for d in (folders or _listing(root, images=False)[0])
            if d.lower() in _SPLIT_NAMES}


def _tree_dirs(root, report):
    """A folder tree -> ({split: folder}, {split: its subfolder names}, what the test split is):
    ROOT/{train,[val],test}/, or {"all": ROOT} for a flat tree. train/ with val/ (or valid/) and no
    test/ is POSTER V2's RAF-DB layout: valid/ is the test split (the accuracy POSTER V2 reports)."""
    folders = _listing(root, report, images=False)[0]
    dirs = _split_dirs(root, folders)
    deeper = [d for d in folders if not dirs and _split_dirs(os.path.join(root, d))]
    for d in deeper[:1]:
        raise DataError(f"{root} holds {d}/ with the split folders inside: the dataset is one level down; "
                        f"give {os.path.join(root, d)} as its path (expected {TREE_LAYOUT})")
    if not dirs:
        return {"all": root}, {"all": folders}, None
    for d in (d for d in folders if d.lower() not in _SPLIT_NAMES):
        report.skip(os.path.join(root, d), "not a split folder")
    if "train" not in dirs or not {"test", "val"} & set(dirs):
        raise DataError(f"{root} has {', '.join(os.path.basename(p) + '/' for p in dirs.values())} but needs "
                        f"train/ and test/ (or valid/): expected {TREE_LAYOUT}")
    test_source = dirs["test"] if "test" in dirs else (
        f"{dirs['val']} (no test/: as in POSTER V2, {os.path.basename(dirs['val'])}/ is the test split)")
    dirs["test"] = dirs.get("test") or dirs.pop("val")
    return dirs, {split: _listing(sdir, report, images=False)[0] for split, sdir in dirs.items()}, test_source


def _tree_classes(fmt, found, base, affectnet_classes, detected):
    """How a folder-tree format reads class folder names (found: those of train/ or ROOT) ->
    (classes, {folder name or its lower case: class index, or the label of a dropped class}, the
    format's name, what its class folders are). Every class needs a folder in train/ (or ROOT)."""
    if fmt == "folder":
        if detected and all(d.isdigit() for d in found):
            raise DataError(f"the class folders of {base} are numbers ({', '.join(found)}), a dataset's own labels: "
                            f"say whose with --dataset rafdb (RAF-DB's 1-7), --dataset affectnet (AffectNet's 0-7), "
                            f"or --dataset folder to take the numbers as class names")
        if len(found) < 2:
            raise DataError(f"{base} has {len(found)} class folder(s) {found}; a classifier needs two or more: "
                            f"expected {TREE_LAYOUT}")
        return tuple(found), {d: y for y, d in enumerate(found)}, "", (
            f"the classes are the folders of {base} ({', '.join(found)}); every split uses the same class folders")
    if fmt == "caer":
        return CLASSES, {a: CLASSES.index(c) for a, c in CLASS_ALIASES.items()}, "CAER-S", (
            f"CAER-S's class folders are {', '.join(CLASSES)} ('Angry' and other spellings accepted)")
    classes = CLASSES if fmt == "rafdb" else affectnet_class_names(affectnet_classes)
    first, labels = (1, RAFDB_LABELS) if fmt == "rafdb" else (0, AFFECTNET_LABELS)
    name = "RAF-DB" if fmt == "rafdb" else f"AffectNet-{affectnet_classes}"
    table = _numbering(labels, first, classes)
    numbers = ", ".join(f"{k} {n}" for k, n in enumerate(labels, first))
    also = f", POSTER V2's layout (or give RAF-DB's {RAFDB_LABEL_FILE} and Image/aligned/)" * (fmt == "rafdb")
    return classes, table, name, f"{name}'s class folders are numbered ({numbers}){also}"


def _index_tree(root, report, fmt, affectnet_classes=7, detected=False):
    """Every folder-tree format (CAER-S, ImageFolder, RAF-DB's and AffectNet's numbered folders) ->
    (classes, {split: [(path, label)]}, test_source): one class map, one walk per class folder.
    The folders of a dropped class (AffectNet's None, Uncertain, ...) are counted, not checked."""
    dirs, listed, test_source = _tree_dirs(root, report)
    classes, table, name, expected = _tree_classes(fmt, listed.get("train", listed.get("all")),
                                                           dirs.get("train", root), affectnet_classes, detected)
    items = {}
    for split, sdir in dirs.items():
        folders = {}  # class index (or a dropped label) -> its folder
        for d in listed[split]:
            y = table.get(d, table.get(d.lower(), -1))
            if y == -1:
                raise DataError(f"unexpected folder {os.path.join(sdir, d)}: {expected}; rename or remove it"
                                + ", or use --dataset folder to take the folder names as classes" * (fmt != "folder"))
            if y in folders:
                raise DataError(f"{os.path.basename(folders[y])}/ and {d}/ in {sdir} are the same class; merge them")
            folders[y] = os.path.join(sdir, d)
        number = {y: k for k, y in table.items() if k.isdigit()}  # a numbered format's folder of each class
        missing = [f"{number[y]} ({c})" if y in number else c for y, c in enumerate(classes) if y not in folders]
        if missing and split in ("train", "all"):
            raise DataError(f"{sdir} lacks the {name} class folders {', '.join(missing)}; add them" + (
                " (a copy without Contempt is AffectNet-7: --affectnet-classes 7)" * (name == "AffectNet-8")))
        items[split] = []
        for y in sorted(folders, key=lambda y: (isinstance(y, str), 0 if isinstance(y, str) else y)):  # dropped last
            files = walk(folders[y], report, check=isinstance(y, int))
            if isinstance(y, str):
                report.dropped[y] += len(files)
            elif not files and split in ("train", "all"):
                raise DataError(f"class folder {folders[y]} has no readable images")
            items[split] += [(p, y) for p in files if isinstance(y, int)]
    return classes, items, test_source


def _index_rafdb(root, report):
    """RAF-DB basic: label file lines `train_00001.jpg 5` (1..7) -> aligned image paths."""
    label_file = os.path.join(root, RAFDB_LABEL_FILE)
    img_dir = os.path.join(root, "Image", "aligned")
    if not os.path.isdir(img_dir):
        raise DataError(f"RAF-DB image folder not found: {img_dir}")
    to_ours = [CLASSES.index(_canonical_class(n)) for n in RAFDB_LABELS]
    items = {"train": [], "test": []}
    with open(label_file, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts, where = line.split(), f"{label_file} line {lineno}"
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].isdigit() or parts[0].split("_")[0] not in items:
                report.bad(where, f"malformed line {line.strip()!r}",
                           "Each line must be `train_00001.jpg 5` or `test_0001.jpg 5`")
            elif not 1 <= int(parts[1]) <= 7:
                report.bad(where, f"label {int(parts[1])} out of range 1..7", "Fix the label")
            else:
                path = os.path.join(img_dir, f"{os.path.splitext(parts[0])[0]}_aligned.jpg")
                if report.image(path):
                    items[parts[0].split("_")[0]].append((path, to_ours[int(parts[1]) - 1]))
    for split in items:
        if not items[split]:
            raise DataError(f"{label_file} lists no usable {split} images")
    return CLASSES, items


def _csv_rows(path):
    """A csv file's rows as (line number, [cells]), blank lines left out; Excel's byte-order mark
    and CRLF line ends are accepted."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        yield from ((reader.line_num, row) for row in reader if row)


def _index_fer2013(csv_path, report):
    """FER2013: rows (emotion 0..6, 2304 grey values, Usage) -> in-memory images per split."""
    to_ours = [CLASSES.index(_canonical_class(n)) for n in FER2013_LABELS]
    rows = {"train": [], "val": [], "test": []}
    lines = _csv_rows(csv_path)
    header = [h.strip() for h in next(lines, (1, []))[1]]
    if not {"emotion", "pixels", "Usage"} <= set(header):
        raise DataError(f"{csv_path}: header must contain emotion,pixels,Usage (found {header})")
    ie, ip, iu = header.index("emotion"), header.index("pixels"), header.index("Usage")
    for lineno, row in lines:
        where = f"{csv_path} line {lineno}"
        try:
            emotion, pixels, usage = int(row[ie]), np.array(row[ip].split(), dtype=np.int64), row[iu].strip()
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
            rows[FER2013_USAGE[usage]].append((pixels.astype(np.uint8).reshape(48, 48), to_ours[emotion], where))
    for split, usage in zip(rows, FER2013_USAGE):
        if not rows[split] and split != "val":
            raise DataError(f"{csv_path} has no usable rows for {split} (Usage {usage})")
    return CLASSES, {split: ImageSource([y for _, y, _ in r], images=np.stack([x for x, _, _ in r]),
                                        names=[n for _, _, n in r]) for split, r in rows.items() if r}


def _affectnet_csv_dir(root):
    """Where training.csv and validation.csv are (either of them marks the folder): ROOT, or the
    official Manually_Annotated_file_lists/."""
    for d in (root, os.path.join(root, "Manually_Annotated_file_lists")):
        if any(os.path.isfile(os.path.join(d, name)) for name in AFFECTNET_CSVS.values()):
            return d
    return None


def _index_affectnet(root, report, n_classes, crop_face):
    """AffectNet's csvs: rows (subDirectory_filePath, face box, ..., expression 0..10) -> items and,
    with crop_face, face boxes per split. training.csv is train, validation.csv is test."""
    csv_dir, img_root = _affectnet_csv_dir(root), os.path.join(root, "Manually_Annotated_Images")
    img_root = img_root if os.path.isdir(img_root) else root  # a copy with the images right under ROOT
    to_ours = _numbering(AFFECTNET_LABELS, 0, affectnet_class_names(n_classes))
    box_cols = ["face_x", "face_y", "face_width", "face_height"] if crop_face else []
    items, boxes = {}, {}
    for split, name in AFFECTNET_CSVS.items():
        path = os.path.join(csv_dir, name)
        items[split], boxes[split] = [], []
        if not os.path.isfile(path):
            raise DataError(f"{path} not found: AffectNet needs training.csv (train) and validation.csv (test) "
                            f"side by side; add the missing file")
        rows = _csv_rows(path)
        first = next(rows, (1, []))
        header = [c.strip().lower() for c in first[1]]
        if "subdirectory_filepath" not in header:
            if not (len(header) >= 7 and header[6].lstrip("-").isdigit()):
                raise DataError(f"{path} line 1: expected the header {','.join(AFFECTNET_COLUMNS)} "
                                f"(found {[c.strip() for c in first[1]]}); fix the file's first line")
            header, rows = [c.lower() for c in AFFECTNET_COLUMNS], itertools.chain([first], rows)  # no header
        absent = [c for c in ["subDirectory_filePath", "expression"] + box_cols if c.lower() not in header]
        if absent:
            raise DataError(f"{path} line 1: the header lacks {', '.join(absent)}; add the column(s)")
        i_path, i_expr = header.index("subdirectory_filepath"), header.index("expression")
        i_box = [header.index(c) for c in box_cols]
        for lineno, row in rows:
            where = f"{path} line {lineno}"
            try:
                rel, expression = row[i_path].strip(), int(row[i_expr])
                x, y, w, h = (int(float(row[i])) for i in i_box) if crop_face else (0, 0, 0, 0)
                if not rel:
                    raise ValueError("empty subDirectory_filePath")
            except (IndexError, ValueError, OverflowError) as e:
                report.bad(where, f"malformed row ({e})", "Fix or delete the row")
                continue
            if not 0 <= expression <= 10:
                report.bad(where, f"expression {expression} out of range 0..10", "Fix the label")
                continue
            if isinstance(to_ours[str(expression)], str):  # Contempt for AffectNet-7; None, Uncertain, No-Face
                report.dropped[to_ours[str(expression)]] += 1
                continue
            img_path = os.path.join(img_root, rel)
            size = report.image(img_path, where=where)
            if size is None:
                continue
            if crop_face:  # the face box, clipped to the image
                box = (max(x, 0), max(y, 0), min(x + w, size[0]), min(y + h, size[1]))
                if box[2] <= box[0] or box[3] <= box[1]:
                    report.bad(where, f"face box x={x} y={y} w={w} h={h} lies outside the "
                               f"{size[0]}x{size[1]} image {img_path}", "Fix the row, or drop --crop-face")
                    continue
                boxes[split].append(box)
            items[split].append((img_path, to_ours[str(expression)]))
        if not items[split]:
            raise DataError(f"{path} lists no usable images of the {n_classes} classes")
    return affectnet_class_names(n_classes), items, (boxes if crop_face else None)


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
    if os.path.isfile(os.path.join(root, RAFDB_LABEL_FILE)):
        return "rafdb"
    if _affectnet_csv_dir(root):
        return "affectnet"
    dirs = _split_dirs(root)  # CAER-S: a train/ whose class folders are mostly the basic emotions
    if "train" in dirs and sum(_canonical_class(n) is not None for n in _listing(dirs["train"])[0]) >= 4:
        return "caer"
    return "folder"


# -----------------------------------------------------------------------------
# Splits and sampling

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


def balanced_indices(labels, n, seed, epoch=0):
    """n positions into `labels`, drawn with replacement so that every class is equally likely
    per draw: a class uniformly among those present, then one of its items uniformly (the
    class-balanced sampling of AffectNet training). A function of (labels, n, seed, epoch) only,
    so every DDP rank computes the same list and takes its share of it."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) == 0:
        raise DataError("balanced sampling needs at least one labelled item")
    digest = hashlib.sha256(f"facerwkv-balanced:{seed}:{epoch}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    which = rng.integers(0, len(classes), size=n)  # the class of each draw
    within = rng.random(n)  # the position of each draw within its class, as a fraction
    out = np.empty(n, dtype=np.int64)
    for k, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        draws = which == k
        out[draws] = members[(within[draws] * len(members)).astype(np.int64)]
    return out.tolist()


@dataclass
class Splits:
    """The three splits (FaceDatasets: .train.labels gives a split's labels), the class names
    (label y is classes[y]) and what was loaded (info: format, sizes, counts, skips, ...)."""
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    classes: tuple
    info: dict = field(default_factory=dict)

    def counts(self):
        """{split: [count per class]}"""
        return {s: np.bincount(getattr(self, s).labels, minlength=len(self.classes)).tolist() for s in SPLITS}

    def summary(self):
        info, counts, (H, W) = self.info, self.counts(), self.info["img_size"]
        erasing = info.get("random_erasing", 0.0)
        lines = [f"dataset: {info['format']}  root: {info['root']}",
                 f"image size: {H}x{W} (HxW)  normalize: {info['normalize']}  hflip: {info['hflip']}  "
                 f"random erasing: {erasing}" + (" (area {:g}-{:g})".format(*info["erasing_scale"]) if erasing else ""),
                 f"validation: {info['val_source']}"]
        lines += [f"test: {info['test_source']}"] * bool(info.get("test_source"))
        if info.get("sanity_per_class"):
            lines.append(f"sanity subset: {info['sanity_per_class']} per class (train = val = test)")
        width = max(8, max(len(c) for c in self.classes) + 2)
        rows = [("class", SPLITS)] + [(c, [counts[s][y] for s in SPLITS]) for y, c in enumerate(self.classes)]
        rows.append(("total", [sum(counts[s]) for s in SPLITS]))
        lines += [f"{name:<{width}}" + "".join(f"{v:>8}" for v in values) for name, values in rows]
        dropped, skipped = info.get("dropped"), info.get("skipped", [])
        if dropped:
            lines.append(f"dropped (not among the {len(self.classes)} classes): {sum(dropped.values())} "
                         f"({', '.join(f'{k} {v}' for k, v in dropped.items())})")
        runtime = sorted({n for s in SPLITS for n in getattr(getattr(self, s), "runtime_skipped", [])})
        lines += [skipped_line(skipped)] * bool(skipped)
        if runtime:
            lines.append(f"skipped {len(runtime)} while reading (unreadable; first: {runtime[0]})")
        drawn = info.get("drawn")
        if drawn and drawn["images"]:
            if drawn.get("from_cache") == drawn["images"]:
                how = f"read back from the cache in {drawn['cache_dir']}"
            else:
                how = (f"{drawn['images'] / max(drawn['seconds'], 1e-9):.0f} images/s, {drawn['processes']} processes"
                       + (f"; cache: {drawn['cache_dir']}" if drawn.get("cache_dir") else ""))
            lines.append(f"synthetic faces drawn: {drawn['images']} in {drawn['seconds']:.1f} s ({how})")
        return shown("\n".join(lines))


def _file_sources(root, fmt, report, seed, affectnet_classes, crop_face, detected):
    """Index a dataset on disk -> (classes, {split: ImageSource} for train, test, and val when the
    format has its own, what the test split is). RAF-DB and AffectNet are read from their label files
    when ROOT has them, else as folder trees; FER2013 from its csv (ROOT or ROOT/fer2013.csv)."""
    if fmt == "fer2013":
        csv_path = os.path.join(root, "fer2013.csv") if os.path.isdir(root) else root
        if not os.path.isfile(csv_path):
            raise DataError(f"FER2013 csv not found: {csv_path}")
        return _index_fer2013(csv_path, report) + (None,)
    if not os.path.isdir(root):
        raise DataError(f"{root} is not a folder (format {fmt})")
    boxes, test_source = None, None
    if fmt == "affectnet" and _affectnet_csv_dir(root):
        classes, items, boxes = _index_affectnet(root, report, affectnet_classes, crop_face)
        test_source = "AffectNet's official validation set (validation.csv)"
    elif fmt == "rafdb" and os.path.isfile(os.path.join(root, RAFDB_LABEL_FILE)):
        classes, items = _index_rafdb(root, report)
    elif crop_face:
        raise DataError(f"crop_face needs AffectNet's training.csv and validation.csv, not found in {root}")
    else:
        classes, items, test_source = _index_tree(root, report, fmt, affectnet_classes, detected)
    if "all" in items:  # a flat folder tree: carve out a stratified test split
        keep, held = stratified_split([y for _, y in items["all"]], TEST_FRACTION, seed)
        items = {"train": [items["all"][i] for i in keep], "test": [items["all"][i] for i in held]}
    sources = {s: ImageSource([y for _, y in it], paths=[p for p, _ in it], boxes=boxes[s] if boxes else None)
               for s, it in items.items()}
    return classes, sources, test_source


def load_datasets(root=None, fmt="auto", img_size=DEFAULT_IMG_SIZE, val_fraction=0.1, seed=0,
                  sanity_per_class=None, hflip=False, normalize=False, skip_bad_images=False,
                  synthetic_size=None, synthetic_processes=1, random_erasing=0.0, erasing_scale=(0.02, 0.33),
                  affectnet_classes=7, crop_face=False, synthetic_cache=True):
    """Load a dataset -> Splits(train, val, test, classes, info). root None = synthetic faces.

    hflip and random_erasing (a probability; erased area erasing_scale of the image) augment the
    training split only. AffectNet: affectnet_classes 7 or 8 (8 adds Contempt), crop_face crops
    to the csv's face box. Synthetic faces (synthetic_size = per class (train, test), default
    SYNTHETIC_SIZE): with synthetic_processes > 1, train and test are drawn up front by that many
    processes and, with synthetic_cache, kept in facerwkv's cache directory for the next run;
    else each split is drawn on its first use, in memory only."""
    img_size = _two_positive_ints(img_size)
    random_erasing, erasing_scale = check_erasing(random_erasing, erasing_scale)
    if fmt not in ("auto",) + FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    detected = fmt == "auto"
    if detected:
        fmt = detect_format(root)
    elif fmt != "synthetic" and (root is None or not os.path.exists(root)):
        raise DataError(f"dataset path not found: {root} (format {fmt} needs a path)")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if crop_face and fmt != "affectnet":
        raise DataError(f"crop_face needs the face boxes of AffectNet's csv; the {fmt} format has none")
    affectnet_class_names(affectnet_classes)  # 7 or 8, checked before a long scan
    report = IndexingLog(skip_bad_images)

    if fmt == "synthetic":
        sizes = _two_positive_ints(synthetic_size or SYNTHETIC_SIZE, "synthetic_size (--synthetic-size TRAIN TEST)")
        classes, test_source = CLASSES, None
        sources = {split: SyntheticSource(split, n, img_size, seed) for split, n in zip(("train", "test"), sizes)}
    else:
        classes, sources, test_source = _file_sources(root, fmt, report, seed, affectnet_classes, crop_face, detected)

    train_tf = ImageTransform(img_size, hflip=hflip, normalize=normalize, random_erasing=random_erasing,
                              erasing_scale=erasing_scale)
    eval_tf = ImageTransform(img_size, hflip=False, normalize=normalize)
    train_src = sources["train"]
    if sanity_per_class:  # overfitting check: the same few training images for train, val and test
        pick = sanity_subset(train_src.labels, sanity_per_class, seed)
        parts = [(train_src, pick, train_tf), (train_src, pick, eval_tf), (train_src, pick, eval_tf)]
        val_source, test_source = "the sanity subset itself", None
    else:
        if "val" in sources:
            keep, val = range(len(train_src)), (sources["val"], range(len(sources["val"])), eval_tf)
            val_source = "the dataset's own validation split"
        else:
            keep, held = stratified_split(train_src.labels, val_fraction, seed)
            val = (train_src, held, eval_tf)
            val_source = f"{val_fraction:.0%} of train, stratified per class, seed {seed}"
        parts = [(train_src, keep, train_tf), val, (sources["test"], range(len(sources["test"])), eval_tf)]

    drawn = None
    if fmt == "synthetic" and synthetic_processes > 1:
        t0 = time.time()
        ready = [sources[split].draw(synthetic_processes, synthetic_cache) for split in ("train", "test")]
        drawn = dict(images=sum(n for n, _ in ready), from_cache=sum(k for _, k in ready),
                     seconds=round(time.time() - t0, 2), processes=synthetic_processes,
                     cache_dir=str(facerwkv.cache_dir()) if synthetic_cache else None)

    splits = Splits(*(FaceDataset(*part, skip_bad_images) for part in parts), tuple(classes))
    splits.info = dict(format=fmt, root=root, img_size=img_size, classes=list(classes),
                       counts=splits.counts(), val_source=val_source, test_source=test_source,
                       sanity_per_class=sanity_per_class, normalize=normalize, hflip=hflip,
                       random_erasing=random_erasing, erasing_scale=erasing_scale, skipped=report.skipped,
                       dropped=dict(report.dropped), drawn=drawn)
    return splits


# -----------------------------------------------------------------------------
# Synthetic faces: drawn with Pillow, deterministic in (seed, split, index)

# the demo: image size (H, W), patch size and images per class (train, test), sized so that the
# demo (5 epochs) runs in under two minutes, cold, on a 2-core CPU; the README's results say where
SYNTHETIC_IMG_SIZE = (36, 48)
SYNTHETIC_PATCH_SIZE = 12  # -> 3 x 4 = 12 tokens
SYNTHETIC_SIZE = (2700, 100)
SYNTHETIC_MEMORY_MB = 1024  # a split up to this size is drawn whole and kept (in memory and on disk)
SYNTHETIC_VERSION = 1  # part of the disk cache's names: raise it whenever the drawing below changes

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
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little")))  # = default_rng


def _uniform(rng, lo, hi):
    """rng.uniform(lo, hi), bit for bit (numpy computes lo + (hi - lo) * U), at a quarter of its cost."""
    return lo + (hi - lo) * rng.random()


def _rand_color(rng, lo=0, hi=256):
    return tuple(rng.integers(lo, hi, size=3).tolist())


def _shade(color, f):
    return tuple(int(max(0, min(255, c * f))) for c in color)


def _draw_background(draw, rng, w, h):
    """Cluttered context: wall/floor split, furniture-like boxes, blobs and lines."""
    wall, floor = _rand_color(rng, 40, 230), _rand_color(rng, 30, 200)
    horizon = int(h * _uniform(rng, 0.55, 0.9))
    draw.rectangle([0, 0, w, horizon], fill=wall)
    draw.rectangle([0, horizon, w, h], fill=floor)
    for _ in range(int(rng.integers(4, 12))):
        kind = rng.integers(0, 3)
        x0, y0 = _uniform(rng, -0.1, 1.0) * w, _uniform(rng, -0.1, 1.0) * h
        x1, y1 = x0 + _uniform(rng, 0.05, 0.4) * w, y0 + _uniform(rng, 0.05, 0.4) * h
        color = _rand_color(rng)
        if kind == 0:
            draw.rectangle([x0, y0, x1, y1], fill=color)
        elif kind == 1:
            draw.ellipse([x0, y0, x1, y1], fill=color)
        else:
            draw.line([x0, y0, x1, y1], fill=color, width=max(1, int(_uniform(rng, 0.005, 0.03) * h)))


def _face_params(rng, label):
    """Expression cues of one sample: the class prototype, sometimes blended toward another
    class (overlap), plus per-sample jitter."""
    cues = _PROTOTYPES[label].copy()
    if rng.random() < 0.2:
        other = (label + int(rng.integers(1, len(CLASSES)))) % len(CLASSES)
        alpha = _uniform(rng, 0.0, 0.35)
        cues = (1 - alpha) * cues + alpha * _PROTOTYPES[other]
    cues = cues + rng.normal(0.0, 1.0, size=cues.shape) * _CUE_JITTER
    return dict(zip(_CUES, cues))


_MOUTH_XS = np.linspace(-1.0, 1.0, 13)  # 13 points across the mouth, corner to corner
_MOUTH_BULGE = np.sqrt(1.0 - _MOUTH_XS ** 2)  # the lips' opening profile


def _draw_face(draw, rng, cx, cy, half_h, p, skin, hair):
    """A frontal face centred at (cx, cy), with expression cues p. Every length is in units of
    half_h (centre to chin, pixels) or rx (the half-width); `line` is the outline width."""
    rx = half_h * _uniform(rng, 0.70, 0.84)
    line = max(1, int(round(0.07 * half_h)))
    dark, ink = _shade(skin, 0.5), _shade(hair, 0.45)  # creases and nostrils; brows and eyelids
    # head: hair behind it, ears, the face oval, sometimes a fringe
    if rng.random() < 0.85:
        draw.ellipse([cx - rx * 1.1, cy - half_h * 1.12, cx + rx * 1.1, cy + half_h * _uniform(rng, 0.0, 0.6)],
                     fill=hair)
    for s in (-1, 1):
        ex = cx + s * rx * 0.92
        draw.ellipse([ex - 0.12 * half_h, cy - 0.15 * half_h, ex + 0.12 * half_h, cy + 0.15 * half_h],
                     fill=_shade(skin, 0.9))
    draw.ellipse([cx - rx, cy - half_h, cx + rx, cy + half_h], fill=skin, outline=_shade(skin, 0.8), width=line)
    if rng.random() < 0.6:
        fy = cy - half_h * _uniform(rng, 0.55, 0.75)
        draw.chord([cx - rx, cy - half_h, cx + rx, fy + (fy - (cy - half_h))], 180, 360, fill=hair)

    # eyes: white, iris and upper lid; eye_open scales their height
    eye_y = cy - 0.12 * half_h
    ew = 0.22 * rx * _uniform(rng, 0.9, 1.1)
    eh = max(0.015 * half_h, 0.11 * half_h * max(p["eye_open"], 0.15))
    gaze = _uniform(rng, -0.3, 0.3) * ew
    ir = min(0.5 * ew, 0.9 * eh + 0.02 * half_h)
    for s in (-1, 1):
        ex = cx + s * 0.38 * rx
        draw.ellipse([ex - ew, eye_y - eh, ex + ew, eye_y + eh], fill=(245, 245, 240), outline=ink, width=line)
        draw.ellipse([ex + gaze - ir, eye_y - min(ir, eh), ex + gaze + ir, eye_y + min(ir, eh)], fill=(40, 30, 25))
        draw.arc([ex - ew, eye_y - eh, ex + ew, eye_y + eh], 200, 340, fill=ink, width=line + 1)

    # brows: height from brow_raise, the inner end up for a positive brow_tilt (sad, fear), down
    # for anger; vertical creases between lowered brows (frown_lines)
    brow_y = eye_y - 0.22 * half_h - 0.12 * half_h * p["brow_raise"]
    bw = max(1, int(round(0.12 * half_h)))
    for s in (-1, 1):
        inner = (cx + s * 0.10 * rx, brow_y - 0.11 * half_h * p["brow_tilt"])
        mid = (cx + s * 0.33 * rx, brow_y - 0.03 * half_h)
        outer = (cx + s * 0.60 * rx, brow_y + 0.04 * half_h * p["brow_tilt"])
        draw.line([inner, mid, outer], fill=ink, width=bw, joint="curve")
    if p["frown_lines"] > 0.5:
        for s in (-1, 1):
            x = cx + s * 0.05 * rx
            draw.line([(x, brow_y - 0.02 * half_h), (x, brow_y + 0.09 * half_h)], fill=dark, width=line)

    # nose, with a wrinkled bridge and flared nostrils for disgust (nose_wrinkle)
    nose_y, wrinkle = cy + 0.2 * half_h, p["nose_wrinkle"]
    draw.line([(cx, eye_y), (cx - 0.07 * rx, nose_y), (cx + 0.05 * rx, nose_y + 0.02 * half_h)], fill=dark, width=line)
    flare = 1.0 + 0.6 * max(wrinkle, 0.0)
    for s in (-1, 1):
        nx = cx + s * 0.09 * rx * flare
        draw.ellipse([nx - 0.035 * half_h, nose_y - 0.015 * half_h, nx + 0.035 * half_h, nose_y + 0.025 * half_h],
                     fill=dark)
    if wrinkle > 0.5:
        for j in range(3):
            y = eye_y + (0.05 + 0.045 * j) * half_h
            draw.line([(cx - 0.14 * rx, y), (cx, y - 0.02 * half_h), (cx + 0.14 * rx, y)], fill=dark, width=line)

    # mouth: corners up for a smile, down for sadness (mouth_curve); opening (mouth_open), width,
    # one side raised for disgust (lip_asym), teeth
    my = cy + 0.5 * half_h
    mw = 0.40 * rx * min(max(p["mouth_width"], 0.4), 1.6)
    corner = -0.16 * half_h * p["mouth_curve"]  # y offset of the corners (negative = up)
    asym = -0.14 * half_h * max(p["lip_asym"], 0.0) * (1 if rng.random() < 0.5 else -1)
    h = 0.26 * half_h * max(p["mouth_open"], 0.0)  # opening height
    xs, bulge = _MOUTH_XS, _MOUTH_BULGE
    centre = my + corner * xs ** 2 + asym * np.clip(xs, 0, None) ** 2
    lip = (170, 60, 60)
    if h < 0.025 * half_h:
        draw.line(list(zip(cx + mw * xs, centre)), fill=lip, width=max(2, int(round(0.12 * half_h))), joint="curve")
        return
    upper = list(zip(cx + mw * xs, centre - 0.35 * h * bulge))
    lower = list(zip(cx + mw * xs[::-1], (centre + 0.65 * h * bulge)[::-1]))
    draw.polygon(upper + lower, fill=(70, 15, 20), outline=lip, width=max(1, int(round(0.03 * half_h))))
    if p["teeth"] > 0.5:
        teeth = list(zip(cx + 0.85 * mw * xs, centre - 0.3 * h * bulge))
        teeth_low = list(zip(cx + 0.85 * mw * xs[::-1], (centre + 0.05 * h * bulge)[::-1]))
        draw.polygon(teeth + teeth_low, fill=(240, 240, 230))


def _draw_occluder(draw, rng, cx, cy, half_h):
    """Partial occlusion: a hand, a cup or a scarf over part of the face (never all of it)."""
    kind = rng.integers(0, 3)
    if kind == 0:  # hand-like blob at one side
        s = 1 if rng.random() < 0.5 else -1
        x, y = cx + s * half_h * _uniform(rng, 0.45, 0.8), cy + half_h * _uniform(rng, -0.3, 0.6)
        r = half_h * _uniform(rng, 0.18, 0.3)
        draw.ellipse([x - r, y - r * 1.3, x + r, y + r * 1.3], fill=_rand_color(rng, 90, 250))
    elif kind == 1:  # cup / object in the lower corner
        x, y = cx + half_h * _uniform(rng, -0.8, 0.8), cy + half_h * _uniform(rng, 0.7, 1.0)
        draw.rectangle([x - 0.2 * half_h, y - 0.3 * half_h, x + 0.2 * half_h, y + 0.3 * half_h], fill=_rand_color(rng))
    else:  # a bar over the forehead or chin
        y = cy + half_h * (_uniform(rng, -1.0, -0.75) if rng.random() < 0.5 else _uniform(rng, 0.78, 1.0))
        draw.rectangle([cx - half_h, y - 0.12 * half_h, cx + half_h, y + 0.12 * half_h], fill=_rand_color(rng))


def _turned_box(box, angle, centre, size):
    """The bounding box of `box` (left, top, right, bottom) turned by `angle` radians about
    (centre, centre), 2 pixels wider on every side (a bilinear filter's reach), within 0..size."""
    c, s = math.cos(angle), math.sin(angle)
    corners = [(x - centre, y - centre) for x in (box[0], box[2]) for y in (box[1], box[3])]
    xs, ys = [centre + c * x - s * y for x, y in corners], [centre + s * x + c * y for x, y in corners]
    return (max(0, math.floor(min(xs)) - 2), max(0, math.floor(min(ys)) - 2),
            min(size, math.ceil(max(xs)) + 2), min(size, math.ceil(max(ys)) + 2))


def _paste_rotated(canvas, layer, angle, left, top):
    """canvas.paste(turned, (left, top), turned) with turned = layer.rotate(angle, BILINEAR), for a
    square RGBA (or premultiplied RGBa) layer holding an opaque drawing on transparent. Only the
    part of the layer that the drawing turns into and that lands on the canvas is resampled."""
    side, centre, turn = layer.size[0], layer.size[0] / 2, -math.radians(angle)  # Pillow's sign
    drawn = layer.getbbox()
    if drawn is None:
        return
    landed = _turned_box(drawn, turn, centre, side)
    landed = (max(landed[0], -left), max(landed[1], -top),
              min(landed[2], canvas.size[0] - left), min(landed[3], canvas.size[1] - top))
    if landed[0] >= landed[2] or landed[1] >= landed[3]:
        return
    read = _turned_box(landed, -turn, centre, side)  # the layer pixels that part is read from
    box = (min(landed[0], read[0]), min(landed[1], read[1]), max(landed[2], read[2]), max(landed[3], read[3]))
    # Pillow resamples RGBA premultiplied (RGBa): a layer drawn as RGBa skips that conversion
    part = layer.crop(box).rotate(angle, resample=Image.BILINEAR, center=(centre - box[0], centre - box[1]))
    part = part.convert("RGBA")
    canvas.paste(part, (left + box[0], top + box[1]), part)


def _draw_canvas(seed, split, index, img_size):
    """Face `index` of `split` before lighting -> (uint8 array (H, W, 3), its rng, to draw on)."""
    H, W = img_size
    label = index % len(CLASSES)
    rng = _item_rng(seed, split, index)
    scale = max(1.0, _DRAW_MIN_H / H)
    dh, dw = int(round(H * scale)), int(round(W * scale))
    canvas = Image.new("RGB", (dw, dh))
    draw = ImageDraw.Draw(canvas)
    _draw_background(draw, rng, dw, dh)

    # the person: shoulders (context) and a face on its own layer, rotated (head tilt) and pasted.
    # Framed like a face detector's loose crop (FER2013, RAF-DB): the face fills the height, but no
    # cue sits at a fixed pixel, so a linear classifier on pixels cannot simply read one off.
    half_h = dh * 0.55 * _uniform(rng, 0.9, 1.1)  # face half-height: centre to chin
    cx = dw * 0.5 + _uniform(rng, -0.12, 0.12) * dw
    cy = dh * 0.5 + _uniform(rng, -0.08, 0.08) * dh
    skin = tuple(min(255, int(c)) for c in _SKIN_TONES[rng.integers(0, len(_SKIN_TONES))] * _uniform(rng, 0.9, 1.08))
    hair = _rand_color(rng, 10, 140)
    draw.ellipse([cx - 1.6 * half_h, cy + 0.85 * half_h, cx + 1.6 * half_h, cy + 2.8 * half_h],
                 fill=_rand_color(rng))  # shoulders
    draw.rectangle([cx - 0.3 * half_h, cy + 0.6 * half_h, cx + 0.3 * half_h, cy + 1.0 * half_h],
                   fill=_shade(skin, 0.85))  # neck
    side = int(2.5 * half_h)
    layer = Image.new("RGBa", (side, side), (0, 0, 0, 0))  # opaque on transparent: RGBa = RGBA
    cues = _face_params(rng, label)
    _draw_face(ImageDraw.Draw(layer), rng, side / 2, side / 2, half_h, cues, skin, hair)
    _paste_rotated(canvas, layer, _uniform(rng, -10, 10), int(cx - side / 2), int(cy - side / 2))
    if rng.random() < 0.2:
        _draw_occluder(draw, rng, cx, cy, half_h)
    if scale > 1.0:
        canvas = canvas.resize((W, H), Image.BILINEAR)
    return np.asarray(canvas), rng


def _draw_faces(job):
    """(seed, split, indices, img_size) -> those faces, uint8 (N, H, W, 3): each drawn, then lit
    as one batch: a directional gain, contrast and sensor noise, each face's settings and noise
    drawn from its own rng (float32, integer-exact after the gain, whatever the batch)."""
    seed, split, indices, (H, W) = job
    canvases, rngs = zip(*(_draw_canvas(seed, split, i, (H, W)) for i in indices))
    N = len(indices)
    cos, sin, level, slope, contrast, sigma = np.empty((6, N, 1, 1), dtype=np.float32)
    noise = np.empty((N, H, W, 3), dtype=np.float32)
    for k, rng in enumerate(rngs):
        theta = _uniform(rng, 0, 2 * math.pi)  # the light's direction
        cos[k], sin[k] = np.cos(theta), np.sin(theta)
        level[k], slope[k], contrast[k] = _uniform(rng, 0.75, 1.2), _uniform(rng, 0.0, 0.6), _uniform(rng, 0.75, 1.1)
        rng.standard_normal((H, W, 3), dtype=np.float32, out=noise[k])
        sigma[k] = _uniform(rng, 2.0, 8.0)
    xs = (np.arange(W, dtype=np.float32) / W - 0.5) * cos                  # (N, 1, W)
    ys = (np.arange(H, dtype=np.float32)[:, None] / H - 0.5) * sin         # (N, H, 1)
    gain = level * (1.0 + slope * (ys + xs))                               # (N, H, W)
    a = np.stack(canvases).astype(np.float32)                              # (N, H, W, 3)
    a -= 128.0                                                             # contrast about mid-grey
    a *= contrast[..., None]
    a += 128.0
    noise *= sigma[..., None]
    a *= gain[..., None]
    a += noise
    return np.clip(np.rint(a, out=a), 0, 255, out=a).astype(np.uint8)


def synthetic_face(seed, split, index, img_size=SYNTHETIC_IMG_SIZE):
    """Draw synthetic face `index` of `split` -> (PIL RGB image of img_size (H, W), label).
    Labels cycle through CLASSES (index % 7), so every prefix of a split is balanced."""
    pixels = _draw_faces((seed, split, [index], _two_positive_ints(img_size)))[0]
    return Image.fromarray(pixels), index % len(CLASSES)


def _draw_all(seed, split, n, img_size, processes):
    """Faces 0..n-1 of a split -> uint8 (n, H, W, 3), in chunks, by `processes` processes."""
    size = max(1, min(256, n // (4 * processes)))
    jobs = [(seed, split, range(i, min(i + size, n)), img_size) for i in range(0, n, size)]
    if processes < 2 or len(jobs) < 2:
        return np.concatenate([_draw_faces(job) for job in jobs])
    with multiprocessing.Pool(processes) as pool:
        return np.concatenate(pool.map(_draw_faces, jobs))


class SyntheticSource:
    """n_per_class * 7 synthetic faces of one split at img_size. A split of up to
    SYNTHETIC_MEMORY_MB is drawn whole, once (by draw(), or on its first use) and kept as uint8
    pixels (N, H, W, 3); a larger one is drawn image by image as it is read."""

    def __init__(self, split, n_per_class, img_size, seed=0):
        self.split, self.seed, self.img_size = split, seed, _two_positive_ints(img_size)
        self.labels = [i % len(CLASSES) for i in range(n_per_class * len(CLASSES))]
        self.pixels = None

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        """Face i as uint8 pixels (H, W, 3) (what ImageTransform.pixels takes as they are)."""
        if self.pixels is None:
            self.draw()
        return self.pixels[i] if self.pixels is not None else _draw_faces((self.seed, self.split, [i], self.img_size))[0]

    def name(self, i):
        return f"synthetic:{self.seed}:{self.split}:{i}"

    def draw(self, processes=1, disk_cache=False):
        """Draw the whole split now, by `processes` worker processes, if it fits in memory; with
        disk_cache, through facerwkv.cached() (read back when a run has drawn it before, its digest
        checked). -> (images drawn or read now, how many of them came from the disk cache)."""
        H, W = self.img_size
        if self.pixels is not None or len(self) * H * W * 3 > SYNTHETIC_MEMORY_MB * 2 ** 20:
            return 0, 0
        built = []

        def build(tmp_path):
            with open(tmp_path, "wb") as f:
                np.save(f, _draw_all(self.seed, self.split, len(self), self.img_size, processes))
            built.append(True)

        if disk_cache:
            name = (f"synthetic-v{SYNTHETIC_VERSION}-{self.split}-seed{self.seed}-{len(self)}x{H}x{W}"
                    f"-numpy{np.__version__}-pillow{Image.__version__}.npy")
            self.pixels = np.load(facerwkv.cached(name, build))
        else:
            self.pixels = _draw_all(self.seed, self.split, len(self), self.img_size, processes)
            built.append(True)
        return len(self), (0 if built else len(self))


def export_synthetic(out_root, train_per_class=SYNTHETIC_SIZE[0], test_per_class=SYNTHETIC_SIZE[1],
                     img_size=SYNTHETIC_IMG_SIZE, seed=0):
    """Write the synthetic set as a CAER-S style tree OUT/{train,test}/<Class>/NNNNN.png (lossless,
    so load_datasets(OUT) gives back the same pixels). Returns out_root."""
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in CLASSES:
            os.makedirs(os.path.join(out_root, split, c), exist_ok=True)
        pixels = _draw_all(seed, split, n * len(CLASSES), _two_positive_ints(img_size), 1)
        for i, face in enumerate(pixels):
            Image.fromarray(face).save(os.path.join(out_root, split, CLASSES[i % len(CLASSES)], f"{i:05d}.png"))
    return out_root
