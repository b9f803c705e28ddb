"""
train.py: train, evaluate and use FaceRWKV; every experiment of the paper from one script.

    python train.py                       # the demo: small model, built-in synthetic faces
    python train.py --data CAER-S --experiment table2-small   # a paper experiment (list: --help)
    torchrun --nproc_per_node 4 train.py --data CAER-S --experiment table3-hybrid-unfrozen
    python train.py --eval-only runs/NAME/best.pt             # test metrics of a checkpoint
    python train.py --predict face.jpg --ckpt runs/NAME/best.pt
    python train.py --plot runs/A runs/B --plot-out val_acc.png

The recipe is the paper's (section 5.1, RECIPE below); --recipe poster switches to POSTER V2's.
Each epoch ends with validation; the best-validation checkpoint is evaluated on test at the end
(accuracy, mean per-class accuracy, confusion matrix). Without --data the defaults switch to the
demo (DEMO below: synthetic faces at 36x48, patch 12); its wall time and accuracy are in the
README's results, with the machine they were measured on.

A run directory (--out/--name) holds config.json (model config + every setting), metrics.jsonl
(one row per epoch), last.pt (everything needed to resume, written atomically at the end of
every epoch and every --save-every-steps steps), best.pt, test_metrics.json and confusion.csv.
A run killed at any moment and resumed with --resume ends with the same parameters as an
uninterrupted one (seeded, CPU): the data order is a function of (seed, epoch) and the
checkpoint holds the optimizer, scheduler, step and every process's RNG state.

Under torchrun each process takes batch_size / world_size images per step, so the global batch,
and with it the recipe, stays that of --batch-size whatever the number of processes.
"""

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import data
from facerwkv import PRESETS, Block, FaceRWKV, FaceRWKVConfig, TransformerBlock, VRWKVBlock
from poster import POSTER_PRESETS, PosterConfig, PosterRWKV, poster_param_count

# -----------------------------------------------------------------------------
# Settings: the recipes, the demo's defaults, and one preset per paper experiment

# The paper's recipe (section 5.1); the argparse defaults below come from it.
RECIPE = dict(
    optimizer="adam",     # Adam, betas (0.9, 0.999)
    lr=1e-3,              # peak learning rate
    schedule="cosine",    # linear warm-up per step from 0.1 x lr, then cosine annealing to 0, per step
    warmup_epochs=1.0,    # the warm-up spans the first epoch
    lr_gamma=0.98,        # (exp schedule only)
    epochs=25,            # Table 2 (Tables 3 and 5 train 15)
    batch_size=64,
    clip=1.0,             # max gradient norm, clipped after backward
    weight_decay=0.0,
    hflip=False,          # no augmentation
    random_erasing=0.0,
    erasing_scale=(0.02, 0.33),
    balanced_sampler=False,
)

# POSTER V2's recipe (its main.py), to compare the two on the same code: SAM around Adam, an
# exponential decay per epoch, flips and random erasing. Its learning rate and erasing depend on
# the dataset; batches are class-balanced on AffectNet. Its --wd flag is parsed and never used: 0.
POSTER_RECIPE = dict(
    optimizer="sam", sam_rho=0.05, schedule="exp", lr_gamma=0.98, warmup_epochs=0.0, epochs=200,
    batch_size=144, clip=0.0, weight_decay=0.0, hflip=True,
    random_erasing=1.0, erasing_scale=(0.05, 0.05),         # CAER-S, AffectNet
)
POSTER_PER_DATASET = {
    "rafdb": dict(lr=3.5e-5, random_erasing=0.5, erasing_scale=(0.02, 0.1)),
    "caer": dict(lr=4e-5),
    "affectnet": dict(lr=1e-6),
}
POSTER_OTHER_LR = 3.5e-5  # datasets POSTER V2 never trained on (FER2013, folders, synthetic): RAF-DB's

# Without --data: the built-in synthetic faces at a reduced resolution, sized for about two minutes
# on a 2-core CPU (workers=0: the faces are drawn up front and kept in this process). The patch
# size comes from DEMO_PATCH: 12x12 pixel patches, or 3x3 cells of the ResNet50 stem's 1/4-size
# map, the same 3x4 token grid either way. Explicit flags and --experiment presets override.
DEMO = dict(dataset="synthetic", img_size=data.SYNTHETIC_IMG_SIZE, epochs=5, workers=0)
DEMO_PATCH = {"none": data.SYNTHETIC_PATCH_SIZE, "resnet50": data.SYNTHETIC_PATCH_SIZE // 4}

# Section 5 of the paper, one entry per run. Every run prints its Table 4 row (parameters).
# The hybrids want ImageNet weights for the stem: add --backbone-weights resnet50-11ad3fa6.pth.
EXPERIMENTS = {
    "sanity": dict(size="small", sanity=2, epochs=8, batch_size=2),               # 5.1: 14 images
    "table2-small": dict(size="small", epochs=25),                                # Table 2, Fig. 4
    "table2-medium": dict(size="medium", epochs=25),
    "table2-large": dict(size="large", epochs=25),
    "table3-baseline": dict(size="large", epochs=15),                             # Table 3, Fig. 5
    "table3-hybrid-frozen": dict(size="hybrid", freeze_backbone=True, epochs=15),
    "table3-hybrid-unfrozen": dict(size="hybrid", epochs=15),
    "table5-small": dict(size="small", epochs=15),                                # Table 5, Fig. 6-7
    "table5-pos-emb": dict(size="small", pos_emb=True, epochs=15),
    "table5-linear-head": dict(size="small", head="linear", epochs=15),
    "table5-no-rwkv": dict(size="small", backbone="resnet50", patch_size=5, mixer="identity", epochs=15),
    # The project's objective (project-note.md): POSTER V2 with RWKV in place of its transformer,
    # beside POSTER V2 itself. Add --ir50-weights ir50.pth --landmark-weights mobilefacenet_model_best.pth.tar.
    "poster-v2": dict(size="poster-v2", img_size=(224, 224)),
    "poster-rwkv": dict(size="poster-rwkv", img_size=(224, 224)),
    "poster-vrwkv": dict(size="poster-vrwkv", img_size=(224, 224)),
    "poster-small": dict(size="poster-small", img_size=(112, 112)),             # trains on a CPU
}
# POSTER's backbones see every image at 112x112: on the demo's synthetic faces, draw them at that size
DEMO_POSTER_IMG_SIZE = (112, 112)

MODEL_FLAGS = ("n_layer", "n_embd", "dim_att", "dim_ffn", "n_head", "patch_size", "backbone",
               "freeze_backbone", "imagenet_norm", "pos_emb", "pool", "head", "mixer")
# the FaceRWKV flags that mean something for POSTER, and its name for them
POSTER_FLAGS = {"n_layer": "depth", "n_embd": "embed_dim", "n_head": "n_head", "pool": "pool", "mixer": "mixer"}
# settings a checkpoint does not carry over to --resume / --eval-only (they describe this process)
PER_PROCESS = ("resume", "eval_only", "predict", "ckpt", "plot", "plot_out", "stop_after_steps", "device")


class UsageError(Exception):
    """A bad setting or file given by the user: printed as one line, exit status 2."""


def build_parser():
    p = argparse.ArgumentParser(
        description="Train / evaluate FaceRWKV (RWKV-4 for facial expression recognition).\n"
                    "Defaults are the paper's; with no --data they switch to the demo: built-in synthetic\n"
                    f"faces at {DEMO['img_size'][0]}x{DEMO['img_size'][1]}, patch {DEMO_PATCH['none']}, "
                    f"{DEMO['epochs']} epochs, no data workers.",
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=34),
        epilog="experiments (section 5 of the paper; each sets defaults that explicit flags override):\n"
               + "\n".join(f"  {name:<24} {' '.join(f'{k}={v}' for k, v in s.items())}"
                           for name, s in EXPERIMENTS.items()))

    g = p.add_argument_group("model (section 4.2, Table 1)", "unset options come from the --size preset")
    g.add_argument("--size", default="small", choices=tuple(PRESETS) + tuple(POSTER_PRESETS),
                   help="Table 1 preset: small 2x128, medium 4x256, large 6x512, hybrid = large on the "
                        "ResNet50 stem with 5x5 patches (default: small); or a POSTER preset: "
                        + ", ".join(POSTER_PRESETS))
    g.add_argument("--n-layer", type=int, help="number of RWKV blocks")
    g.add_argument("--n-embd", type=int, help="embedding width d")
    g.add_argument("--dim-att", type=int, help="time-mix width (default d; the paper's code used n_head)")
    g.add_argument("--dim-ffn", type=int, help="channel-mix hidden width (default 4d)")
    g.add_argument("--n-head", type=int, help="heads of the transformer mixer (default d/64)")
    g.add_argument("--patch-size", type=int, help="P x P patches (default 20; 5 for hybrid)")
    g.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), default=data.DEFAULT_IMG_SIZE,
                   help="images are resized to H x W (default: 400 600)")
    g.add_argument("--backbone", choices=("none", "resnet50"), help="'resnet50': patches of the ResNet50 stem's map")
    g.add_argument("--backbone-weights", metavar="PATH",
                   help="torchvision resnet50 state dict for the stem (needs the default ImageNet normalisation)")
    g.add_argument("--freeze-backbone", action=argparse.BooleanOptionalAction, help="do not train the stem")
    g.add_argument("--imagenet-norm", action=argparse.BooleanOptionalAction,
                   help="normalise inputs with the ImageNet mean/std (default on)")
    g.add_argument("--pos-emb", action=argparse.BooleanOptionalAction, help="learned positional embedding")
    g.add_argument("--pool", choices=("last", "mean", "cls"),
                   help="classify the last token (paper) or the mean (cls: POSTER V2's transformer only)")
    g.add_argument("--head", choices=("mlp", "linear"), help="classifier head (default mlp)")
    g.add_argument("--mixer", choices=("rwkv", "vrwkv", "transformer", "identity"),
                   help="token mixer: rwkv, vrwkv (Vision-RWKV: Bi-WKV + Q-Shift), a transformer block for "
                        "comparison, identity = 'w/o RWKV'")
    g.add_argument("--ir50-weights", metavar="PATH", help="POSTER: ArcFace IR-50 state dict (ir50.pth) for the "
                   "image backbone")
    g.add_argument("--landmark-weights", metavar="PATH", help="POSTER: MobileFaceNet checkpoint "
                   "(mobilefacenet_model_best.pth.tar); the landmark branch is then frozen")

    g = p.add_argument_group("data (section 3)")
    g.add_argument("--data", metavar="PATH", help="dataset root or file; unset: built-in synthetic faces (demo)")
    g.add_argument("--dataset", default="auto",
                   choices=("auto", "caer-s", "folder", "rafdb", "fer2013", "affectnet", "synthetic"),
                   help="dataset format (default: auto-detect)")
    g.add_argument("--affectnet-classes", type=int, choices=(7, 8), default=7,
                   help="AffectNet-7 (the basic seven) or AffectNet-8 (+ Contempt); labels 8-10 are dropped")
    g.add_argument("--crop-face", action=argparse.BooleanOptionalAction, default=False,
                   help="AffectNet csv: crop each image to its face box (default: the image as stored)")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of train moved to validation when there is no val split (default 0.1)")
    g.add_argument("--sanity", type=int, metavar="N", help="use only N images per class (the sanity check)")
    g.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images instead of stopping")
    g.add_argument("--synthetic-size", type=int, nargs=2, metavar=("TRAIN", "TEST"),
                   default=data.SYNTHETIC_SIZE, help="synthetic faces per class in train and test "
                   f"(default {data.SYNTHETIC_SIZE[0]} {data.SYNTHETIC_SIZE[1]})")
    g.add_argument("--workers", type=int, default=4, help="data loading processes per training process "
                   "(default 4; the demo uses 0)")

    g = p.add_argument_group("recipe (section 5.1; --recipe poster: POSTER V2's)")
    g.add_argument("--recipe", default="paper", choices=("paper", "poster"),
                   help="defaults of every setting in this group (default: the paper's)")
    g.add_argument("--epochs", type=int, default=RECIPE["epochs"], help="default 25 (Table 2)")
    g.add_argument("--batch-size", type=int, default=RECIPE["batch_size"],
                   help="global batch, split over processes (default 64)")
    g.add_argument("--optimizer", choices=("adam", "sam"), default=RECIPE["optimizer"],
                   help="adam, or sam: sharpness-aware minimisation around Adam (default adam)")
    g.add_argument("--sam-rho", type=float, default=0.05, help="radius of SAM's ascent step (default 0.05)")
    g.add_argument("--lr", type=float, default=RECIPE["lr"], help="peak learning rate of Adam(0.9, 0.999)")
    g.add_argument("--schedule", choices=("cosine", "exp"), default=RECIPE["schedule"],
                   help="cosine: per-step cosine to 0 after the warm-up; exp: lr x lr_gamma each epoch")
    g.add_argument("--warmup-epochs", type=float, default=RECIPE["warmup_epochs"],
                   help="linear warm-up from 0.1 x lr to lr, per step (default 1)")
    g.add_argument("--lr-gamma", type=float, default=RECIPE["lr_gamma"], help="decay per epoch of --schedule exp")
    g.add_argument("--clip", type=float, default=RECIPE["clip"], help="max gradient norm, 0 = off (default 1)")
    g.add_argument("--weight-decay", type=float, default=RECIPE["weight_decay"], help="Adam weight decay (default 0)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=RECIPE["hflip"],
                   help="random horizontal flips of training images (the paper trains without augmentation)")
    g.add_argument("--random-erasing", type=float, default=RECIPE["random_erasing"], metavar="P",
                   help="erase a random rectangle of a training image with probability P (default 0)")
    g.add_argument("--erasing-scale", type=float, nargs=2, default=RECIPE["erasing_scale"], metavar=("LO", "HI"),
                   help="area of the erased rectangle, as a fraction of the image (default 0.02 0.33)")
    g.add_argument("--balanced-sampler", action=argparse.BooleanOptionalAction, default=RECIPE["balanced_sampler"],
                   help="draw training images with every class equally likely (default off)")

    g = p.add_argument_group("run")
    g.add_argument("--experiment", choices=tuple(EXPERIMENTS), metavar="NAME",
                   help="preset of a paper experiment (list below)")
    g.add_argument("--seed", type=int, default=0, help="seeds init, data split and data order")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if available")
    g.add_argument("--amp", default="none", choices=("none", "bf16"),
                   help="bf16 autocast of the linear layers (CUDA only; WKV stays fp32)")
    g.add_argument("--out", default="runs", help="parent directory of run directories (default runs)")
    g.add_argument("--name", help="run directory name (default: experiment or size + time)")
    g.add_argument("--resume", metavar="RUN_DIR_OR_CKPT", help="continue a run from its last.pt; its settings "
                   "are the defaults")
    g.add_argument("--eval-only", metavar="CKPT", help="only evaluate CKPT (or RUN_DIR/best.pt) on the test split")
    g.add_argument("--log-every", type=int, default=10, help="steps between progress lines (default 10)")
    g.add_argument("--save-every-steps", type=int, default=0, help="also write last.pt every N steps (0 = per epoch)")
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="testing aid: stop dead after N optimizer steps, as if killed (nothing is saved)")

    p.add_argument_group(
        "distributed (torchrun)",
        "torchrun --nproc_per_node N train.py ...   (several machines: add --nnodes, --node-rank,\n"
        "--rdzv-endpoint). NCCL on GPUs, gloo on CPUs. Each of the N processes takes batch_size / N\n"
        "images per step (batch_size must be divisible by N), so the recipe does not change;\n"
        "validation/test counts are summed over processes; only rank 0 writes files.")

    g = p.add_argument_group("tools")
    g.add_argument("--plot", nargs="+", metavar="RUN_DIR", help="draw validation accuracy per epoch of these runs")
    g.add_argument("--plot-out", default="val_acc.png", help="PNG written by --plot (default val_acc.png)")
    g.add_argument("--predict", nargs="+", metavar="IMG", help="print class probabilities of these images")
    g.add_argument("--ckpt", metavar="CKPT", help="checkpoint (or run directory: its best.pt) for --predict")
    g.add_argument("--benchmark", action="store_true",
                   help="time and peak memory of RWKV vs transformer (block, model, RNN mode) as tokens grow; "
                        "writes --bench-out")
    g.add_argument("--bench-tokens", type=int, nargs="+", default=[600, 1200, 2400, 4800, 9600], metavar="T",
                   help="token counts of --benchmark (600 = 400x600 with 20x20 patches)")
    g.add_argument("--bench-methods", nargs="*", metavar="M",
                   default=["rwkv-block", "vrwkv-block", "transformer-block", "rwkv-model", "transformer-model",
                            "rwkv-rnn"],
                   help="rwkv-block vrwkv-block transformer-block rwkv-model transformer-model rwkv-rnn")
    g.add_argument("--bench-poster", nargs="*", default=["poster-v2", "poster-rwkv", "poster-vrwkv"], metavar="PRESET",
                   help="POSTER presets timed at their image size: forward+backward and the token mixer's share")
    g.add_argument("--bench-poster-batch", type=int, default=4, help="images per POSTER call (default 4)")
    g.add_argument("--bench-width", type=int, default=128, help="model width d of --benchmark (default 128 = small)")
    g.add_argument("--bench-batch", type=int, default=1, help="images (or sequences) per call (default 1)")
    g.add_argument("--bench-repeats", type=int, default=3, help="timed calls per point, median reported")
    g.add_argument("--bench-share-batch", type=int, default=8,
                   help="batch of the small-model training step whose WKV share is profiled (CPU; 0 = skip)")
    g.add_argument("--bench-out", default="benchmark.csv", help="CSV written by --benchmark")
    g.add_argument("--linear-probe", action="store_true",
                   help="instead of FaceRWKV, train a linear classifier on the raw pixels of the same data (a baseline)")
    g.add_argument("--count-params", action="store_true",
                   help="print the parameter count of every --size preset beside the paper's (Tables 1, 4)")
    return p


def recipe_defaults(args):
    """--recipe poster: POSTER V2's settings, with its per-dataset learning rate and erasing."""
    if args.recipe != "poster":
        return {}
    fmt = {"caer-s": "caer"}.get(args.dataset, args.dataset)
    if fmt == "auto":
        fmt = "synthetic" if args.data is None else data.detect_format(args.data)
    balanced = fmt == "affectnet" and args.affectnet_classes == 7  # AffectNet-7 only, as POSTER V2
    return {**POSTER_RECIPE, "lr": POSTER_OTHER_LR, **POSTER_PER_DATASET.get(fmt, {}), "balanced_sampler": balanced}


def is_demo(args):
    """No --data: the built-in synthetic faces at the demo's resolution (not for --count-params,
    which counts at the paper's)."""
    return args.data is None and not args.count_params


def parse_args(argv):
    """-> (args, checkpoint or None). Defaults are layered: paper < demo (no --data) < --recipe <
    --experiment < the checkpoint's settings (--resume/--eval-only) < explicit flags, so the final
    namespace spells out everything. The checkpoint is read here, once, and handed on."""
    parser = build_parser()
    first = parser.parse_args(argv)
    ckpt = None
    if first.resume or first.eval_only:
        ckpt = load_checkpoint(first.resume or first.eval_only, "last.pt" if first.resume else "best.pt")
        parser.set_defaults(**{k: v for k, v in ckpt["args"].items() if k not in PER_PROCESS})
    else:
        experiment = dict(EXPERIMENTS.get(first.experiment, {}))
        if is_demo(first):
            experiment.pop("patch_size", None)  # the demo's patch grid instead (DEMO_PATCH)
            if "img_size" in experiment:
                experiment["img_size"] = DEMO_POSTER_IMG_SIZE
            parser.set_defaults(**DEMO)
        parser.set_defaults(**recipe_defaults(first), **experiment)
    args = parser.parse_args(argv)
    if is_demo(args) and args.patch_size is None and not ckpt and args.size in PRESETS:
        backbone = args.backbone or PRESETS[args.size].get("backbone", "none")
        args.patch_size = DEMO_PATCH[backbone]
    args.img_size, args.synthetic_size = tuple(args.img_size), tuple(args.synthetic_size)
    args.erasing_scale = tuple(args.erasing_scale)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.warmup_epochs < 0 or args.clip < 0:
        raise UsageError("--epochs and --batch-size must be >= 1, --lr > 0, --warmup-epochs and --clip >= 0")
    if not (0 <= args.random_erasing <= 1 and 0 < args.erasing_scale[0] <= args.erasing_scale[1] < 1):
        raise UsageError("--random-erasing P needs 0 <= P <= 1 and --erasing-scale LO HI 0 < LO <= HI < 1")
    if not (0 < args.lr_gamma <= 1) or args.sam_rho <= 0:
        raise UsageError("--lr-gamma must be in (0, 1] and --sam-rho > 0")
    if args.predict and not args.ckpt:
        raise UsageError("--predict needs --ckpt CKPT (e.g. runs/NAME/best.pt)")
    return args, ckpt


# -----------------------------------------------------------------------------
# The models train.py knows: FaceRWKV, and the linear probe baseline

@dataclasses.dataclass
class LinearProbeConfig:
    img_size: tuple = data.DEFAULT_IMG_SIZE
    n_classes: int = 7
    imagenet_norm: bool = True


class LinearProbe(nn.Module):
    """--linear-probe: a linear classifier on the pixels the model would see (normalised). The
    baseline the synthetic faces are built to defeat: their cues sit at no fixed pixel."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        H, W = config.img_size
        self.linear = nn.Linear(3 * H * W, config.n_classes)

    def forward(self, images):
        return self.linear(images.flatten(1))  # (B, n_classes)

    def num_params(self, trainable_only=False):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def print_param_summary(self):
        text = f"linear classifier on {self.linear.in_features:,} pixel values: {self.num_params():,} parameters"
        print(text)
        return text


ARCHS = {"FaceRWKV": (FaceRWKVConfig, FaceRWKV), "PosterRWKV": (PosterConfig, PosterRWKV),
         "LinearProbe": (LinearProbeConfig, LinearProbe)}


def model_config(args, n_classes):
    """The model's config from the flags: the linear probe's, or FaceRWKV's --size preset with
    whatever model flags are set."""
    if args.linear_probe:
        return LinearProbeConfig(img_size=args.img_size, n_classes=n_classes,
                                 imagenet_norm=args.imagenet_norm is not False)
    if args.size in POSTER_PRESETS:
        return poster_config(args, n_classes)
    if args.ir50_weights or args.landmark_weights:
        raise UsageError("--ir50-weights and --landmark-weights are for the POSTER models (--experiment poster-...)")
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    if args.backbone_weights and args.imagenet_norm is False:
        raise UsageError("--backbone-weights: the pretrained ResNet50 stem expects ImageNet-normalised inputs; "
                         "drop --no-imagenet-norm")
    try:
        return FaceRWKVConfig.preset(args.size, img_size=args.img_size, n_classes=n_classes, **overrides)
    except ValueError as e:
        raise UsageError(f"model settings: {e}") from None


def poster_config(args, n_classes):
    """PosterConfig from the POSTER --size preset and the model flags that apply to it."""
    H, W = args.img_size
    if H != W:
        raise UsageError(f"POSTER takes square images; --img-size {H} {W}: use e.g. --img-size 224 224")
    wrong = [f"--{k.replace('_', '-')}" for k in MODEL_FLAGS if getattr(args, k) is not None and k not in POSTER_FLAGS
             and k != "imagenet_norm"]
    if wrong or args.imagenet_norm is False:
        raise UsageError(f"{' '.join(wrong) or '--no-imagenet-norm'}: not a POSTER setting (it takes "
                         + ", ".join(f"--{k.replace('_', '-')}" for k in POSTER_FLAGS) + ")")
    overrides = {POSTER_FLAGS[k]: getattr(args, k) for k in POSTER_FLAGS if getattr(args, k) is not None}
    try:
        return PosterConfig.preset(args.size, img_size=H, n_classes=n_classes, **overrides)
    except ValueError as e:
        raise UsageError(f"model settings: {e}") from None


def build_model(config, args, log, fresh=True):
    """The model of this config; a fresh one gets the pretrained weights the flags name."""
    model = next(cls for cfg, cls in ARCHS.values() if isinstance(config, cfg))(config)
    loads = {"load_backbone_weights": args.backbone_weights, "load_ir50_weights": getattr(args, "ir50_weights", None),
             "load_landmark_weights": getattr(args, "landmark_weights", None)}
    for method, path in loads.items():
        if fresh and path:
            try:
                getattr(model, method)(path)
            except (OSError, ValueError) as e:
                raise UsageError(str(e)) from None
    if isinstance(model, PosterRWKV):
        log(model.landmark_status + ("" if model.config.freeze_landmarks else
                                     " (pass --landmark-weights PATH to use POSTER V2's frozen landmark detector)"))
    if getattr(config, "freeze_backbone", False) and not args.backbone_weights:
        log("warning: the frozen ResNet50 stem has random weights; pass --backbone-weights PATH")
    return model


def synthetic_processes():
    """Processes that draw the synthetic faces up front: this machine's cores, shared by the ranks
    (at least 2: drawing ahead is also what fills the disk cache of drawn faces)."""
    return max(2, min(os.cpu_count() or 1, 8) // int(os.environ.get("WORLD_SIZE", "1")))


def input_size(config):
    """(H, W) of the model's input images (POSTER's configs hold one side: its images are square)."""
    return (config.img_size,) * 2 if isinstance(config.img_size, int) else tuple(config.img_size)


def load_splits(args, config, draw_ahead=True):
    """train/val/test as the model expects them (its img_size; ImageNet-normalised unless it says not)."""
    return data.load_datasets(root=args.data, fmt={"caer-s": "caer"}.get(args.dataset, args.dataset),
                              img_size=input_size(config), val_fraction=args.val_fraction, seed=args.seed,
                              sanity_per_class=args.sanity, hflip=args.hflip, normalize=config.imagenet_norm,
                              skip_bad_images=args.skip_bad_images, synthetic_size=args.synthetic_size,
                              synthetic_processes=synthetic_processes() if draw_ahead else 1,
                              random_erasing=args.random_erasing, erasing_scale=args.erasing_scale,
                              affectnet_classes=args.affectnet_classes, crop_face=args.crop_face)


# -----------------------------------------------------------------------------
# Processes and devices

def setup_distributed(device_flag):
    """(rank, world_size, device). Under torchrun the process group comes from the environment."""
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch sees no GPU; use --device cpu")
    if "LOCAL_RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def autocast(args, device):
    """--amp bf16: linear layers run in bfloat16 on CUDA; wkv() computes in float32 whatever it gets."""
    if args.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# The optimizer and the learning-rate schedules, both stepped once per batch

def lr_factor(step, warmup_steps, total_steps):
    """Cosine schedule (the paper's): multiplier of the peak lr at optimizer step `step` (0-based),
    0.1 -> 1 linearly over the warm-up steps, then half a cosine down to 0 at the end of training."""
    if step < warmup_steps:
        return 0.1 + 0.9 * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def exp_lr_factor(step, warmup_steps, steps_per_epoch, gamma):
    """Exponential schedule (POSTER V2's ExponentialLR): lr x gamma^epoch, constant within an epoch
    (after the optional warm-up). Written per step, so a run resumed mid-epoch continues it exactly."""
    if step < warmup_steps:
        return 0.1 + 0.9 * step / warmup_steps
    return gamma ** (step // steps_per_epoch)


def make_scheduler(optimizer, warmup_steps, total_steps, steps_per_epoch=None, schedule="cosine", gamma=0.98):
    """A LambdaLR stepped once per batch (not per epoch)."""
    if schedule == "exp":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: exp_lr_factor(step, warmup_steps, steps_per_epoch, gamma))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))


def make_optimizer(params, args, n_train):
    """The recipe's Adam and per-step schedule for n_train images per epoch ->
    (optimizer, scheduler, steps_per_epoch); the step count is the same for every world size.
    (SAM is not an optimizer of its own here: train_step takes its two gradients, Adam steps.)"""
    params = list(params)
    # fused: Adam's update as one kernel over all tensors instead of a dozen ops per tensor; the same
    # maths, 5 ms less per step of the small model on a 2-core CPU (10 % of the demo's step)
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay, fused=fused)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    scheduler = make_scheduler(optimizer, warmup_steps, args.epochs * steps_per_epoch, steps_per_epoch,
                               args.schedule, args.lr_gamma)
    return optimizer, scheduler, steps_per_epoch


def train_step(model, images, labels, optimizer, scheduler, clip, amp_context, sam_rho=0.0):
    """One optimizer step: forward, backward, clip the gradient norm (after backward, when there
    are gradients), Adam step, then advance the per-step schedule. Returns (loss, correct).

    With sam_rho > 0 the step is SAM's (Foret et al. 2021, non-adaptive, as POSTER V2): from the
    weights w, climb to the nearby worst case w + rho g/|g| along this batch's gradient g, take
    the gradient there, return to w and let Adam step with that second gradient. Under DDP both
    backward passes all-reduce, so every process climbs and steps alike."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def loss_and_grad():
        with amp_context:
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, logits

    loss, logits = loss_and_grad()
    if sam_rho > 0:
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            scale = sam_rho / (torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) + 1e-12)
            climb = [g * scale for g in grads]
            torch._foreach_add_(params, climb)       # w -> w + rho g/|g|
        loss_and_grad()                              # the gradient at the worst case nearby
        with torch.no_grad():
            torch._foreach_sub_(params, climb)       # back to w
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    scheduler.step()
    return loss.detach(), (logits.argmax(1) == labels).sum()


# -----------------------------------------------------------------------------
# Checkpoints: atomic, CPU-loadable, weights_only; they remember the settings they were made with

def rng_states():
    """Every RNG state as tensors and plain types, so torch.load(weights_only=True) can read it."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, obj):
    """Write to a temp file, then rename: a kill mid-write never leaves a broken checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, in_run_dir="last.pt"):
    """A checkpoint file, or the given one of a run directory (last.pt to resume, best.pt to use)."""
    path = Path(path) / in_run_dir if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path} (give a .pt file or a run directory holding {in_run_dir})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not (isinstance(ckpt, dict) and {"model", "config", "args"} <= ckpt.keys()):
        raise UsageError(f"{path} is not a train.py checkpoint (needs model, config and args)")
    ckpt["model"] = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    ckpt["path"] = str(path)
    return ckpt


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def load_weights(model, ckpt):
    """Load ckpt's weights into model; a different architecture is named field by field."""
    ours, theirs = dataclasses.asdict(model.config), ckpt["config"]
    diff = [f"{k}={_plain(theirs.get(k))} (checkpoint) vs {_plain(v)} (now)"
            for k, v in ours.items() if _plain(theirs.get(k)) != _plain(v)]
    if diff:
        raise UsageError(f"checkpoint {ckpt['path']} was made for a different model: {'; '.join(diff)}. "
                         "Drop the model flags that differ (or use a matching checkpoint).")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UsageError(f"checkpoint {ckpt['path']} does not fit the model: {e}") from None


def model_from_checkpoint(ckpt, device):
    config_cls, model_cls = ARCHS[ckpt.get("arch", "FaceRWKV")]  # checkpoints before "arch" were FaceRWKV
    model = model_cls(config_cls(**ckpt["config"]))
    load_weights(model, ckpt)
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# Data order and evaluation

def epoch_batches(dataset, epoch, skip_batches, args, rank, world, per_rank_batch, device):
    """This process's batches of one epoch. The order is a function of (seed, epoch) only, and
    the union of the ranks' k-th batches is the same global batch for every world size;
    skip_batches replays a resumed epoch from where its checkpoint was written."""
    if args.balanced_sampler:
        # every draw picks a class uniformly, then an image of it; rank r takes every world-th draw
        order = data.balanced_indices(dataset.labels, len(dataset), args.seed, epoch)
        indices = list(order)[rank::world]
    else:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        sampler.set_epoch(epoch)
        indices = list(sampler)
    indices = indices[skip_batches * per_rank_batch:]
    # the loader's own generator seeds its workers: random augmentation does not depend on the global RNG
    generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    return DataLoader(dataset, batch_size=per_rank_batch, sampler=indices, num_workers=args.workers,
                      pin_memory=device.type == "cuda", generator=generator)


@torch.no_grad()
def evaluate(model, dataset, n_classes, args, rank, world, per_rank_batch, device):
    """Loss, accuracy, mean per-class accuracy and confusion matrix (rows: true class, columns:
    predicted) over the whole dataset. Each process takes every world-th sample (no padding, so
    every sample counts once) and the counts are summed over processes."""
    model.eval()
    loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=list(range(rank, len(dataset), world)),
                        num_workers=args.workers, pin_memory=device.type == "cuda", generator=torch.Generator())
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(args, device):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        confusion.index_put_((labels, logits.argmax(1)), torch.ones_like(labels, dtype=torch.float64), accumulate=True)
    if world > 1:
        dist.all_reduce(confusion)
        dist.all_reduce(loss_sum)
    confusion = confusion.long().cpu()
    total = int(confusion.sum())
    per_class = (confusion.diag() / confusion.sum(1)).tolist()
    present = [a for a in per_class if not math.isnan(a)]  # classes with images in this split
    return {"loss": loss_sum.item() / max(total, 1), "acc": confusion.diag().sum().item() / max(total, 1),
            "mean_class_acc": sum(present) / max(len(present), 1), "n": total,
            "per_class_acc": [None if math.isnan(a) else a for a in per_class], "confusion": confusion.tolist()}


def confusion_table(metrics, classes):
    """The confusion matrix as aligned text: rows are true classes, columns predictions."""
    corner = "true \\ pred"
    first = max(len(corner), *(len(c) for c in classes))
    width = max(5, *(len(c) for c in classes), *(len(str(n)) for row in metrics["confusion"] for n in row))
    lines = [f"{corner:<{first}} " + " ".join(f"{c:>{width}}" for c in classes) + f" {'acc':>7}"]
    for name, row, acc in zip(classes, metrics["confusion"], metrics["per_class_acc"]):
        acc = "-" if acc is None else f"{100 * acc:.1f}%"
        lines.append(f"{name:<{first}} " + " ".join(f"{n:>{width}}" for n in row) + f" {acc:>7}")
    lines.append(f"test accuracy {100 * metrics['acc']:.2f}% (mean per-class {100 * metrics['mean_class_acc']:.2f}%) "
                 f"on {metrics['n']} images")
    return "\n".join(lines)


def save_test_metrics(run_dir, metrics, classes, ckpt_path):
    (run_dir / "test_metrics.json").write_text(json.dumps({"checkpoint": str(ckpt_path), "classes": list(classes),
                                                          **metrics}, indent=1) + "\n")
    with open(run_dir / "confusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ pred", *classes])
        w.writerows([name, *row] for name, row in zip(classes, metrics["confusion"]))


# -----------------------------------------------------------------------------
# Progress: one line updated in place on a terminal, a line every --log-every steps elsewhere

class Progress:
    def __init__(self, log_every, enabled):
        self.log_every, self.enabled = log_every, enabled
        self.live = enabled and sys.stdout.isatty()
        self.t_last, self.images = time.time(), 0

    def update(self, step, total_steps, epoch, epochs, loss, lr, images, eta_s, epoch_end):
        self.images += images
        if not self.enabled or not (self.live or step % self.log_every == 0 or epoch_end):
            return
        now = time.time()
        line = (f"epoch {epoch}/{epochs} step {step}/{total_steps} loss {loss:.4f} lr {lr:.2e} "
                f"{self.images / max(now - self.t_last, 1e-9):.1f} img/s eta {format_seconds(eta_s)}")
        if self.live:
            print("\r" + line + "\033[K", end="", flush=True)  # overwrite the line in place
        else:
            print(line, flush=True)
        self.t_last, self.images = now, 0

    def end_line(self):
        if self.live:
            print(flush=True)


def format_seconds(s):
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -----------------------------------------------------------------------------
# Training: start_run, then train_epoch and end_epoch per epoch, then test_best

@dataclasses.dataclass
class Run:
    """Everything one training process carries from step to step."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    log: callable
    splits: data.Splits
    config: object
    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    steps_per_epoch: int
    run_dir: Path
    step: int = 0
    best_val: float = -1.0
    best_epoch: int = 0
    train_sums: list = dataclasses.field(default_factory=lambda: [0.0, 0, 0])  # this process: loss, correct, seen
    t_start: float = dataclasses.field(default_factory=time.time)

    @property
    def total_steps(self):
        return self.args.epochs * self.steps_per_epoch

    @property
    def classes(self):
        return self.splits.classes


def choose_run_dir(args, resume, rank, world):
    """The run directory: the resumed one, or a new one named by rank 0 (its clock) for everyone."""
    if resume:
        return Path(resume["path"]).parent
    stem = args.experiment or ("demo" if args.data is None else args.size)
    run_dir = Path(args.out) / (args.name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    already_used = (run_dir / "last.pt").exists()
    if world > 1:
        shared = [run_dir, already_used]
        dist.broadcast_object_list(shared, src=0)
        run_dir, already_used = shared
    if already_used:
        raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --name")
    return run_dir


def start_run(args, resume=None):
    """Processes, data, model, optimizer and run directory; the state of `resume` if given."""
    t_start = time.time()  # the run's wall time includes reading (or drawing) the data
    rank, world, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.amp == "bf16" and device.type != "cuda":
        raise UsageError("--amp bf16 needs a CUDA device (on CPU train in fp32: --amp none)")
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world})")
    config = model_config(args, len(data.CLASSES))  # checked before a possibly long data scan
    splits = load_splits(args, config)
    config = dataclasses.replace(config, n_classes=len(splits.classes))

    seed_everything(args.seed)
    model = build_model(config, args, log, fresh=resume is None)
    if resume:
        load_weights(model, resume)
    model.to(device)
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    optimizer, scheduler, steps_per_epoch = make_optimizer([p for p in model.parameters() if p.requires_grad],
                                                           args, len(splits.train))
    run_dir = choose_run_dir(args, resume, rank, world)
    args.name = run_dir.name
    run = Run(args, rank, world, device, log, splits, config, model, ddp_model, optimizer, scheduler,
              steps_per_epoch, run_dir, t_start=t_start)
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        run.step, run.best_val, run.best_epoch = resume["step"], resume["best_val_acc"], resume["best_epoch"]
        # the checkpoint holds the sums over all processes: one process carries them on
        run.train_sums = list(resume.get("train_sums", resume.get("epoch_sums"))) if rank == 0 else [0.0, 0, 0]
        rngs = resume["rng"] if isinstance(resume["rng"], list) else [resume["rng"]]
        set_rng_states(rngs[rank] if len(rngs) == world else rngs[0])
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({"model": dataclasses.asdict(config), "args": vars(args),
                                                         "data": splits.info, "world_size": world}, indent=1,
                                                        default=str) + "\n")
        keep_epochs(run_dir / "metrics.jsonl", run.step // steps_per_epoch)
    log_settings(run)
    return run


def log_settings(run):
    args, log = run.args, run.log
    demo = " (demo defaults: no --data, built-in synthetic faces at reduced resolution)" if args.data is None else ""
    log(f"settings{demo}:")
    log("  model    " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(run.config).items()))
    groups = {"data": ("data", "dataset", "affectnet_classes", "crop_face", "val_fraction", "sanity", "skip_bad_images",
                       "synthetic_size", "workers"),
              "recipe": ("recipe", "epochs", "batch_size", "optimizer", "sam_rho", "lr", "schedule", "warmup_epochs",
                         "lr_gamma", "clip", "weight_decay", "hflip", "random_erasing", "erasing_scale",
                         "balanced_sampler"),
              "run": ("experiment", "seed", "device", "amp", "out", "name", "resume", "save_every_steps",
                      "stop_after_steps")}
    for title, keys in groups.items():
        log(f"  {title:<8} " + " ".join(f"{k}={getattr(args, k)}" for k in keys))
    log(f"  processes {run.world} on {run.device}, {args.batch_size // run.world} images per process per step")
    log(run.splits.summary())
    if run.rank == 0:
        run.model.print_param_summary()  # Table 4: the parameters, per part of the model
    log(f"{run.steps_per_epoch} steps per epoch, {run.total_steps} in all"
        + (f"; resuming at step {run.step}" if run.step else ""))
    log(f"run directory: {run.run_dir}")


RESUME_ONLY = ("optimizer", "scheduler", "train_sums", "rng")  # in last.pt, not in best.pt


def checkpoint_state(run):
    """What last.pt holds (best.pt: the same less RESUME_ONLY). A collective under torchrun (every
    process calls it): the training sums are summed over processes and every process's RNG state
    is kept, so each process resumes with its own."""
    sums, rngs = list(run.train_sums), [rng_states()]
    if run.world > 1:
        t = torch.tensor(sums, dtype=torch.float64, device=run.device)
        dist.all_reduce(t)
        sums = [t[0].item(), int(t[1].item()), int(t[2].item())]
        rngs = [None] * run.world
        dist.all_gather_object(rngs, rng_states())
    return {"model": run.model.state_dict(), "arch": type(run.model).__name__, "config": dataclasses.asdict(run.config),
            "args": vars(run.args), "classes": list(run.classes), "epoch": run.step // run.steps_per_epoch,
            "step": run.step, "best_val_acc": run.best_val, "best_epoch": run.best_epoch,
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "train_sums": sums,
            "rng": rngs}


def train_epoch(run, epoch, progress):
    """The optimizer steps of one epoch (from where a resumed run left off). Returns False when
    --stop-after-steps stopped the run."""
    args, sam_rho = run.args, (run.args.sam_rho if run.args.optimizer == "sam" else 0.0)
    run.ddp_model.train()
    t_train, steps_here = time.time(), 0
    batches = epoch_batches(run.splits.train, epoch, run.step % run.steps_per_epoch, args, run.rank, run.world,
                            args.batch_size // run.world, run.device)
    for images, labels in batches:
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        lr = run.optimizer.param_groups[0]["lr"]
        loss, correct = train_step(run.ddp_model, images, labels, run.optimizer, run.scheduler, args.clip,
                                   autocast(args, run.device), sam_rho)
        run.step, steps_here = run.step + 1, steps_here + 1
        loss = loss.item()
        run.train_sums = [run.train_sums[0] + loss * len(labels), run.train_sums[1] + int(correct),
                          run.train_sums[2] + len(labels)]
        if args.stop_after_steps and run.step >= args.stop_after_steps:
            progress.end_line()
            run.log(f"stopping after step {run.step} (--stop-after-steps: as if killed, nothing saved)")
            return False
        eta = (time.time() - t_train) / steps_here * (run.total_steps - run.step)
        progress.update(run.step, run.total_steps, epoch + 1, args.epochs, loss, lr, len(labels) * run.world, eta,
                        epoch_end=run.step % run.steps_per_epoch == 0)
        if args.save_every_steps and run.step % args.save_every_steps == 0 and run.step % run.steps_per_epoch:
            state = checkpoint_state(run)
            if run.rank == 0:
                save_checkpoint(run.run_dir / "last.pt", state)
    progress.end_line()
    return True


def end_epoch(run, epoch, t_epoch):
    """Training stats over all processes, validation, the metrics row, best.pt and last.pt."""
    sums = torch.tensor(run.train_sums, dtype=torch.float64, device=run.device)
    if run.world > 1:
        dist.all_reduce(sums)
    args = run.args
    val = evaluate(run.model, run.splits.val, len(run.classes), args, run.rank, run.world,
                   args.batch_size // run.world, run.device) if len(run.splits.val) else None
    improved = val is None or val["acc"] > run.best_val
    if improved:
        run.best_val, run.best_epoch = (val["acc"] if val else run.best_val), epoch + 1
    row = {"epoch": epoch + 1, "step": run.step, "train_loss": sums[0].item() / sums[2].item(),
           "train_acc": sums[1].item() / sums[2].item(), "val_loss": val and val["loss"],
           "val_acc": val and val["acc"], "val_mean_class_acc": val and val["mean_class_acc"],
           "lr": run.optimizer.param_groups[0]["lr"], "epoch_time_s": round(time.time() - t_epoch, 2)}
    run.train_sums = [0.0, 0, 0]
    val_text = (f"val loss {row['val_loss']:.4f} val acc {100 * row['val_acc']:.2f}% "
                f"(mean per-class {100 * row['val_mean_class_acc']:.2f}%)") if val else "no val split"
    run.log(f"epoch {epoch + 1}/{args.epochs} done: train loss {row['train_loss']:.4f} train acc "
            f"{100 * row['train_acc']:.2f}% {val_text}{' (best)' if improved and val else ''} "
            f"[{row['epoch_time_s']:.1f}s]")
    state = checkpoint_state(run)
    if run.rank == 0:
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if improved:
            save_checkpoint(run.run_dir / "best.pt", {k: v for k, v in state.items() if k not in RESUME_ONLY})
        save_checkpoint(run.run_dir / "last.pt", state)


def test_best(run, t_train):
    """The best-validation model on test (rank 0 reads best.pt and hands the weights to the
    others), the confusion matrix, and the run's summary."""
    if run.rank == 0:
        load_weights(run.model, load_checkpoint(run.run_dir / "best.pt"))
    if run.world > 1:
        for tensor in run.model.state_dict().values():
            dist.broadcast(tensor, src=0)
    test = evaluate(run.model, run.splits.test, len(run.classes), run.args, run.rank, run.world,
                    run.args.batch_size // run.world, run.device)
    wall = time.time() - run.t_start
    summary = {"run_dir": str(run.run_dir), "params": run.model.num_params(),
               "trainable_params": run.model.num_params(trainable_only=True),
               "best_val_acc": run.best_val if run.best_val >= 0 else None, "best_epoch": run.best_epoch,
               "test_acc": test["acc"], "test_mean_class_acc": test["mean_class_acc"],
               "test_per_class_acc": test["per_class_acc"], "test_confusion": test["confusion"],
               "epochs": run.args.epochs, "steps": run.step, "world_size": run.world, "wall_time_s": round(wall, 2),
               "train_time_s": round(time.time() - t_train, 2)}
    if run.rank == 0:
        run.log(f"\ntest set, best-validation checkpoint (epoch {run.best_epoch}):")
        run.log(confusion_table(test, run.classes))
        save_test_metrics(run.run_dir, test, run.classes, run.run_dir / "best.pt")
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        best = "-" if summary["best_val_acc"] is None else f"{100 * run.best_val:.2f}%"
        run.log(f"\nsummary: {summary['params']:,} parameters | best val acc {best} (epoch {run.best_epoch}) | "
                f"test acc {100 * test['acc']:.2f}% (mean per-class {100 * test['mean_class_acc']:.2f}%) | "
                f"wall time {format_seconds(wall)} | {run.run_dir}")
    return summary


def train(args, resume=None):
    """Train from scratch (or on from `resume`), validating every epoch; test the best epoch."""
    run = start_run(args, resume)
    progress = Progress(args.log_every, enabled=run.rank == 0)
    t_train = time.time()
    for epoch in range(run.step // run.steps_per_epoch, args.epochs):
        t_epoch = time.time()
        if not train_epoch(run, epoch, progress):
            return {"stopped_at_step": run.step, "run_dir": str(run.run_dir)}
        end_epoch(run, epoch, t_epoch)
    return test_best(run, t_train)


def keep_epochs(metrics_path, n_epochs):
    """On resume, drop metrics rows of epochs the checkpoint does not include (a kill can come
    between writing the row and writing last.pt)."""
    if metrics_path.exists():
        rows = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["epoch"] <= n_epochs]
        metrics_path.write_text("".join(row + "\n" for row in rows))


# -----------------------------------------------------------------------------
# Evaluation of a checkpoint, prediction, parameter counts, plots

def eval_only(args, ckpt):
    rank, world, device = setup_distributed(args.device)
    model = model_from_checkpoint(ckpt, device)
    splits = load_splits(args, model.config, draw_ahead=False)  # only test is read: draw on demand
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world})")
    test = evaluate(model, splits.test, len(splits.classes), args, rank, world, args.batch_size // world, device)
    if rank == 0:
        print(splits.summary())
        print(f"test set, {ckpt['path']}:")
        print(confusion_table(test, splits.classes))
        save_test_metrics(Path(ckpt["path"]).parent, test, splits.classes, ckpt["path"])
    return {"checkpoint": ckpt["path"], "test_acc": test["acc"], "test_mean_class_acc": test["mean_class_acc"],
            "test_per_class_acc": test["per_class_acc"], "test_confusion": test["confusion"], "n": test["n"]}


@torch.no_grad()
def predict(paths, ckpt_path, device_flag):
    """Class probabilities of each image, preprocessed like the checkpoint's training data."""
    device = torch.device("cuda" if device_flag != "cpu" and torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(ckpt_path, "best.pt")
    model = model_from_checkpoint(ckpt, device)
    classes = ckpt["classes"]
    results = {}
    for path in paths:
        image = data.load_image(path, input_size(model.config), normalize=model.config.imagenet_norm)
        probs = F.softmax(model(image[None].to(device)).float(), dim=1)[0].cpu()
        results[path] = dict(zip(classes, probs.tolist()))
        top = int(probs.argmax())
        print(f"{path}: {classes[top]} ({100 * probs[top]:.1f}%)  "
              + "  ".join(f"{c} {p:.3f}" for c, p in zip(classes, probs.tolist())))
    return results


PAPER_PARAMS = {"small": 0.5e6, "medium": 2.8e6, "large": 14.8e6, "hybrid": 15.0e6}  # Tables 1 and 4


def count_params(args):
    """Parameters of each preset at the current settings (the model flags given apply to all)."""
    print(f"parameters at img_size {args.img_size[0]}x{args.img_size[1]}, 7 classes:")
    print(f"{'model':<8} {'ours':>12} {'trainable':>12} {'paper':>8}   config")
    counts = {}
    for size, paper in PAPER_PARAMS.items():
        config = model_config(argparse.Namespace(**{**vars(args), "size": size}), len(data.CLASSES))
        model = FaceRWKV(config)
        counts[size] = model.num_params()
        print(f"{size:<8} {counts[size]:>12,} {model.num_params(trainable_only=True):>12,} {paper / 1e6:>7.1f}M   "
              f"L={config.n_layer} d={config.n_embd} dim_att={config.dim_att} dim_ffn={config.dim_ffn} "
              f"patch={config.patch_size} backbone={config.backbone}")
    print("\nPOSTER models at 224x224, 7 classes (Table 4 quotes POSTER++ at 43.7 M). 'as POSTER V2' counts the way its "
          "paper does (thop: leaf modules that run, raw parameters excluded, its discarded GDC head included):")
    print(f"{'model':<13} {'all':>12} {'as POSTER V2':>13}   config")
    for name in POSTER_PRESETS:
        config = PosterConfig.preset(name, img_size=224 if name != "poster-small" else 112)
        model = PosterRWKV(config)
        counts[name] = (model.num_params(), poster_param_count(model))
        print(f"{name:<13} {counts[name][0]:>12,} {counts[name][1]:>13,}   mixer={config.mixer} depth={config.depth} "
              f"embed={config.embed_dim} dims={config.dims} ir_units={config.ir_units} img={config.img_size}")
    return counts


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def nice_step(span, max_ticks):
    """A tick spacing of 1, 2 or 5 x 10^k giving at most max_ticks intervals."""
    for magnitude in (10 ** k for k in range(-2, 6)):
        for m in (1, 2, 5):
            if span / (m * magnitude) <= max_ticks:
                return m * magnitude
    return span


def default_font(size):
    """Pillow's built-in font at this size; Pillow < 10.1 has only a small bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def plot_runs(run_dirs, out_path):
    """Validation accuracy per epoch of several runs in one PNG (the paper's Figures 4-7),
    drawn with Pillow: axes with ticks and labels, one coloured line per run, a legend."""
    runs = []
    for run_dir in run_dirs:
        metrics = Path(run_dir) / "metrics.jsonl"
        if not metrics.is_file():
            raise UsageError(f"{run_dir} has no metrics.jsonl; give run directories written by train.py")
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        points = [(r["epoch"], 100 * r["val_acc"]) for r in rows if r.get("val_acc") is not None]
        if not points:
            raise UsageError(f"{metrics} has no validation accuracy yet")
        runs.append((Path(run_dir).resolve().name, points))

    font, small = default_font(18), default_font(15)
    legend_w = 40 + max(int(small.getlength(name)) for name, _ in runs)
    W, H = 860 + legend_w, 540
    left, right, top, bottom = 90, legend_w + 40, 55, 75     # plot area margins
    x_max = max(2, max(e for _, pts in runs for e, _ in pts))
    accs = [a for _, pts in runs for _, a in pts]
    y_step = nice_step(max(max(accs) - min(accs), 10), 10)
    y_lo = max(0, math.floor(min(accs) / y_step) * y_step)
    y_hi = min(100, math.ceil(max(accs) / y_step) * y_step)
    if y_hi <= y_lo:
        y_lo, y_hi = max(0, y_hi - y_step), max(y_hi, y_step)

    def xy(epoch, acc):
        return (left + (epoch - 1) / (x_max - 1) * (W - left - right),
                H - bottom - (acc - y_lo) / (y_hi - y_lo) * (H - top - bottom))

    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    x_step = nice_step(x_max - 1, 12)
    for epoch in [1] + list(range(x_step, x_max + 1, x_step)) if x_step > 1 else range(1, x_max + 1):
        x, _ = xy(epoch, y_lo)
        draw.line([(x, top), (x, H - bottom)], fill=(230, 230, 230))
        draw.line([(x, H - bottom), (x, H - bottom + 6)], fill="black", width=2)
        draw.text((x, H - bottom + 10), str(epoch), fill="black", font=small, anchor="mt")
    n_y = round((y_hi - y_lo) / y_step)
    for i in range(n_y + 1):
        acc = y_lo + i * y_step
        _, y = xy(1, acc)
        draw.line([(left, y), (W - right, y)], fill=(230, 230, 230))
        draw.line([(left - 6, y), (left, y)], fill="black", width=2)
        draw.text((left - 10, y), f"{acc:g}", fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, W - right, H - bottom], outline="black", width=2)
    for i, (name, points) in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        pts = [xy(e, a) for e, a in points]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=3, joint="curve")
        for x, y in pts:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        ly = top + 10 + 26 * i                                    # legend entry, right of the plot
        draw.line([(W - right + 15, ly + 8), (W - right + 40, ly + 8)], fill=color, width=4)
        draw.text((W - right + 48, ly + 8), name, fill="black", font=small, anchor="lm")
    draw.text(((left + W - right) / 2, 18), "Validation accuracy per epoch", fill="black", font=font, anchor="mt")
    draw.text(((left + W - right) / 2, H - 25), "epoch", fill="black", font=font, anchor="mt")
    label = Image.new("RGB", (int(font.getlength("validation accuracy (%)")) + 4, 24), "white")
    ImageDraw.Draw(label).text((2, 2), "validation accuracy (%)", fill="black", font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (12, int((top + H - bottom - label.height) / 2)))
    img.save(out_path)
    print(f"wrote {out_path} ({len(runs)} run{'s' * (len(runs) > 1)})")
    return str(out_path)


# -----------------------------------------------------------------------------
# Benchmark: the paper's unmeasured claim that RWKV saves time and memory over a transformer.
# One block of each, and the whole small model in parallel and RNN mode, as the token count
# grows from the paper's 600 (400x600 image, 20x20 patches) to 9,600. Every (method, tokens,
# mode) point runs in a fresh process so its peak memory is its own: on the CPU, peak resident
# memory (VmHWM, reset through /proc/self/clear_refs) minus the resident memory just before the
# first call; on a GPU, torch.cuda.max_memory_allocated minus the allocation before.

def bench_grid(tokens):
    """(rows, cols) of 20x20 patches with rows * cols = tokens, as close to the paper's 2:3 as can be."""
    pairs = [(r, tokens // r) for r in range(1, tokens + 1) if tokens % r == 0 and r <= tokens // r]
    return min(pairs, key=lambda rc: abs(rc[1] / rc[0] - 1.5))


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set size, to the current one


def bench_point(method, tokens, mode, width, batch, device, repeats, threads):
    """Median milliseconds and peak extra memory (MB) of one call; run in its own process."""
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    if method.endswith("block"):
        cfg = FaceRWKVConfig(n_layer=1, n_embd=width, img_size=(20, 20), mixer=method.split("-")[0])
        blocks = {"rwkv": lambda: Block(cfg, 0), "transformer": lambda: TransformerBlock(cfg),
                  "vrwkv": lambda: VRWKVBlock(cfg, 0, grids=[bench_grid(tokens)])}
        module = blocks[cfg.mixer]().to(device)
        x = torch.randn(batch, tokens, width, device=device)
        call = module
    else:
        rows, cols = bench_grid(tokens)
        mixer = "transformer" if method.startswith("transformer") else "rwkv"
        cfg = FaceRWKVConfig.preset("small", n_embd=width, img_size=(20 * rows, 20 * cols), mixer=mixer)
        module = FaceRWKV(cfg).to(device)
        x = torch.rand(batch, 3, 20 * rows, 20 * cols, device=device)
        call = module.forward_rnn if method == "rwkv-rnn" else module

    def run():
        if mode == "forward":
            with torch.no_grad():
                call(x)
        else:
            call(x).float().square().mean().backward()
            module.zero_grad(set_to_none=True)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _rss_bytes("VmRSS")
    run()  # the first call allocates everything the op needs: its peak is the memory cost
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM")) - before
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - t0))
    return dict(method=method, tokens=tokens, mode=mode, ms=sorted(times)[len(times) // 2], peak_mb=peak / 2**20)


def poster_point(preset, batch, device, repeats, threads):
    """Median forward+backward milliseconds of a POSTER preset at its image size, and of its token
    mixer alone on the same 147 tokens: the mixer's share of the model's cost."""
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    model = PosterRWKV(PosterConfig.preset(preset)).to(device).train()
    S = model.config.img_size
    images = torch.randn(batch, 3, S, S, device=device)
    with torch.no_grad():
        tokens = model.tokens(images)  # (B, 147, E)

    def median_ms(fn):
        fn()
        times = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
        model.zero_grad(set_to_none=True)
        return sorted(times)[len(times) // 2]

    full = median_ms(lambda: model(images).square().mean().backward())
    mixer = median_ms(lambda: model.mixer(tokens.clone().requires_grad_()).square().mean().backward())
    return dict(preset=preset, img_size=S, batch=batch, ms=full, mixer_ms=mixer, mixer_share=mixer / full)


def wkv_share(batch, threads):
    """Fraction of a small-model training step (paper resolution, 600 tokens) spent in the WKV op,
    from torch.profiler: the WKVFunction forward and backward against the whole step."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = FaceRWKV(FaceRWKVConfig.preset("small"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = torch.rand(batch, 3, 400, 600), torch.randint(0, 7, (batch,))

    def step():
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    n = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        step_ms = 1e3 * (time.perf_counter() - t0) / n
    wkv_ms = sum(e.cpu_time_total for e in prof.key_averages()
                 if e.key in ("WKVFunction", "WKVFunctionBackward")) / 1e3 / n
    return step_ms, wkv_ms


def run_benchmark(args):
    """--benchmark: the table of every method x tokens, printed and written as CSV; the POSTER
    presets' forward+backward and their token mixer's share."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per point
    rows = []
    print(f"benchmark on {device} ({torch.get_num_threads()} threads), width {args.bench_width}, "
          f"batch {args.bench_batch}; every point in a fresh process")
    for tokens in args.bench_tokens:
        for method in args.bench_methods:
            for mode in ("forward", "train"):
                if method == "rwkv-rnn" and mode == "train":
                    continue  # RNN mode is for inference
                with ctx.Pool(1) as pool:
                    r = pool.apply(bench_point, (method, tokens, mode, args.bench_width, args.bench_batch,
                                                 device, args.bench_repeats, torch.get_num_threads()))
                rows.append(r)
                print(f"  {method:<18} {tokens:>6} tokens {mode:<8} {r['ms']:>10.1f} ms {r['peak_mb']:>9.1f} MB", flush=True)
    # ratio: how many times faster / smaller than the transformer at the same tokens and mode
    base = {(r["method"].split("-")[1], r["tokens"], r["mode"]): r for r in rows if r["method"].startswith("transformer")}
    for r in rows:
        kind = "model" if r["method"] == "rwkv-rnn" else r["method"].split("-")[1]
        t = base.get((kind, r["tokens"], r["mode"]))
        r["time_ratio"] = t["ms"] / r["ms"] if t else float("nan")
        r["memory_ratio"] = t["peak_mb"] / r["peak_mb"] if t and r["peak_mb"] > 0 else float("nan")
    if rows:  # (no --bench-methods: only the POSTER rows)
        out = args.bench_out
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print()
        print("| tokens | method | mode | ms | peak MB | transformer / this (time) | (memory) |")
        print("|---:|---|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['tokens']} | {r['method']} | {r['mode']} | {r['ms']:.1f} | {r['peak_mb']:.1f} | "
                  f"{r['time_ratio']:.2f} | {r['memory_ratio']:.2f} |")
        print(f"\nwrote {out}")
    poster_rows = []
    if args.bench_poster:
        print(f"\nPOSTER, forward + backward of {args.bench_poster_batch} images (median of {args.bench_repeats}):")
        print("| model | image | ms | token mixer ms | mixer share |\n|---|---:|---:|---:|---:|")
        for preset in args.bench_poster:
            with ctx.Pool(1) as pool:
                r = pool.apply(poster_point, (preset, args.bench_poster_batch, device, args.bench_repeats,
                                              torch.get_num_threads()))
            poster_rows.append(r)
            print(f"| {preset} | {r['img_size']} | {r['ms']:.0f} | {r['mixer_ms']:.1f} | {100 * r['mixer_share']:.1f} % |",
                  flush=True)
    if device == "cpu" and args.bench_share_batch > 0:
        with ctx.Pool(1) as pool:
            step_ms, wkv_ms = pool.apply(wkv_share, (args.bench_share_batch, torch.get_num_threads()))
        print(f"small model, 600 tokens, batch {args.bench_share_batch}: train step {step_ms:.0f} ms, "
              f"of which WKV {wkv_ms:.1f} ms = {100 * wkv_ms / step_ms:.1f} %")
    return {"benchmark": rows, "poster": poster_rows}


# -----------------------------------------------------------------------------

def main(argv=None):
    """Entry point; returns a summary dict. User errors print one line and exit with status 2."""
    try:
        args, ckpt = parse_args(argv)
        if args.count_params:
            return count_params(args)
        if args.benchmark:
            return run_benchmark(args)
        if args.plot:
            return {"plot": plot_runs(args.plot, args.plot_out)}
        if args.predict:
            return {"predictions": predict(args.predict, args.ckpt, args.device)}
        result = eval_only(args, ckpt) if args.eval_only else train(args, resume=ckpt)
        if dist.is_initialized():
            # every rank finishes its work before any tears the group down: a rank leaving early
            # made another abort in gloo's teardown ("terminate called", about 1 run in 10 here)
            dist.barrier()
        return result
    except (UsageError, data.DataError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
