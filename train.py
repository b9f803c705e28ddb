"""
train.py: train, evaluate and use FaceRWKV; every experiment of the paper from one script.

    python train.py                       # the demo: small model, built-in synthetic faces
    python train.py --data CAER-S --experiment table2-small   # a paper experiment (list: --help)
    torchrun --nproc_per_node 4 train.py --data CAER-S --experiment table3-hybrid-unfrozen
    python train.py --eval-only runs/NAME/best.pt             # test metrics of a checkpoint
    python train.py --predict photos/ --ckpt runs/NAME/best.pt --predict-out predictions.csv
    python train.py --plot runs/A runs/B --plot-out val_acc.png
    python train.py --eval-only rafdb-posterv2.pth --data RAF-DB    # a POSTER V2 checkpoint as it is
    python train.py --data RAF-DB --experiment poster-rwkv --init-from rafdb-posterv2.pth --train-only mixer,head

The recipe is the paper's (section 5.1, RECIPE below); --recipe poster switches to POSTER V2's.
Each epoch ends with validation; the best-validation checkpoint is evaluated on test at the end
(accuracy, mean per-class accuracy, confusion matrix). Without --data the defaults switch to the
demo (DEMO below: synthetic faces at 36x48, patch 12).

A run directory (--out/--name) belongs to one run, which holds train.lock while it runs. It holds
config.json (model config + every setting), metrics.jsonl (one row per epoch), last.pt (everything
needed to resume, at the end of every epoch, every --save-every-steps steps and at Ctrl-C), best.pt,
test_metrics.json, confusion.csv and summary.json, each written whole. A run stopped or killed at
any moment and resumed with --resume ends with the same parameters as an uninterrupted one (seeded,
CPU): the data order is a function of (seed, epoch) and the checkpoint holds the optimizer,
scheduler, step, every process's RNG state and a fingerprint of the data. A checkpoint supplies a
model, its classes, its data and its recipe (CARRIED) -- never what to do or where to write. Under
torchrun the global batch, and with it the recipe, stays that of --batch-size whatever the number of
processes. A user's error is one line (main); a bug keeps its traceback.
"""

import argparse
import contextlib
import csv
import dataclasses
import errno
import fcntl
import functools
import gc
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import threading
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
from facerwkv import (PRESETS, Block, FaceRWKV, FaceRWKVConfig, TransformerBlock, VRWKVBlock, atomic_write,
                      pooled_weights, read_checkpoint, vrwkv_state_dict)
from poster import (POSTER_PRESETS, POSTERV2_CLASS_ORDER, PosterConfig, PosterRWKV, poster_param_count,
                    posterv2_state_dict)

# -----------------------------------------------------------------------------
# Settings: the recipes, the demo's defaults, and one preset per paper experiment

# The paper's recipe (section 5.1): Adam(0.9, 0.999), warm-up from 0.1 x lr, cosine to 0, both per step
RECIPE = dict(optimizer="adam", lr=1e-3, schedule="cosine", warmup_epochs=1.0, lr_gamma=0.98, epochs=25,
              batch_size=64, clip=1.0, weight_decay=0.0, hflip=False, random_erasing=0.0,
              erasing_scale=(0.02, 0.33), balanced_sampler=False)
# POSTER V2's recipe (its main.py): SAM around Adam, lr x 0.98 per epoch, flips, erasing; lr per dataset
POSTER_RECIPE = dict(optimizer="sam", sam_rho=0.05, schedule="exp", lr_gamma=0.98, warmup_epochs=0.0, epochs=200,
                     batch_size=144, clip=0.0, weight_decay=0.0, hflip=True, random_erasing=1.0,
                     erasing_scale=(0.05, 0.05))
POSTER_PER_DATASET = {"rafdb": dict(lr=3.5e-5, random_erasing=0.5, erasing_scale=(0.02, 0.1)),
                      "caer": dict(lr=4e-5), "affectnet": dict(lr=1e-6)}
POSTER_OTHER_LR = 3.5e-5  # datasets POSTER V2 never trained on: RAF-DB's

# Without --data: synthetic faces at reduced size (about two minutes on 2 CPU cores), the same 3x4
# token grid from pixel patches or from the ResNet50 stem's 1/4-size map
DEMO = dict(dataset="synthetic", img_size=data.SYNTHETIC_IMG_SIZE, epochs=5, workers=0)
DEMO_PATCH = {"none": data.SYNTHETIC_PATCH_SIZE, "resnet50": data.SYNTHETIC_PATCH_SIZE // 4}
DEMO_POSTER_IMG_SIZE = (112, 112)  # POSTER's backbones see every image at 112x112

# Section 5 of the paper, one preset per run (hybrids: add --backbone-weights resnet50-11ad3fa6.pth)
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
    # POSTER V2 (Mao et al. 2023) and with RWKV as its mixer: add --ir50-weights, --landmark-weights
    "poster-v2": dict(size="poster-v2", img_size=(224, 224)),
    "poster-rwkv": dict(size="poster-rwkv", img_size=(224, 224)),
    "poster-vrwkv": dict(size="poster-vrwkv", img_size=(224, 224)),
    "poster-small": dict(size="poster-small", img_size=(112, 112)),             # trains on a CPU
    # Vision-RWKV's VRWKV-T / S / B (Duan et al. 2024): add --init-from vrwkv_t_in1k_224.pth (_s_, _b_)
    "vrwkv-t": dict(size="vrwkv-t", img_size=(224, 224)),
    "vrwkv-s": dict(size="vrwkv-s", img_size=(224, 224)),
    "vrwkv-b": dict(size="vrwkv-b", img_size=(224, 224)),
}

MODEL_FLAGS = ("n_layer", "n_embd", "dim_att", "dim_ffn", "n_head", "patch_size", "backbone",
               "freeze_backbone", "imagenet_norm", "pos_emb", "pool", "head", "mixer")
# the FaceRWKV flags that mean something for POSTER, and its name for them
POSTER_FLAGS = {"n_layer": "depth", "n_embd": "embed_dim", "n_head": "n_head", "pool": "pool", "mixer": "mixer"}
# the settings that make the model: --resume and --eval-only refuse flags that change them
MODEL_KEYS = ("size", "experiment", "img_size", "linear_probe", *MODEL_FLAGS)
# what a checkpoint supplies to --resume / --eval-only: its model, data and recipe. Never a run mode
# or a place to write (those describe this process), nor weight files (the weights are in it).
CARRIED = (*MODEL_KEYS, "data", "dataset", "affectnet_classes", "crop_face", "val_fraction", "sanity",
           "skip_bad_images", "synthetic_size", "recipe", "epochs", "batch_size", "optimizer",
           "sam_rho", "lr", "schedule", "warmup_epochs", "lr_gamma", "clip", "weight_decay", "hflip",
           "random_erasing", "erasing_scale", "balanced_sampler", "seed", "amp", "log_every", "save_every_steps",
           "train_only")
RESUME_MAY_CHANGE = ("data", "log_every", "save_every_steps")  # a resumed run checks its data by content
BENCH_METHODS = ("rwkv-block", "vrwkv-block", "transformer-block", "rwkv-model", "transformer-model", "rwkv-rnn")


class UsageError(Exception):
    """A bad setting or file given by the user: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


def number(kind, lo, hi=None, lo_open=False, hi_open=False):
    """The type of every numeric flag: a finite int or float in a range, else refused naming the range."""
    what = "an integer" if kind is int else "a finite number"
    if hi is None:
        what += f" {'>' if lo_open else '>='} {lo}"
    else:
        what += f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and (x > lo if lo_open else x >= lo)
                and (hi is None or (x < hi if hi_open else x <= hi))):
            raise argparse.ArgumentTypeError(f"must be {what} (got {text!r})")
        return x
    parse.__name__ = what
    return parse


POSITIVE_INT, COUNT, POSITIVE = number(int, 1), number(int, 0), number(float, 0, lo_open=True)
NON_NEGATIVE, PROBABILITY = number(float, 0), number(float, 0, 1)
SEED = number(int, 0, 2 ** 32 - 1)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every default (help texts name a preset's where the preset sets one) and the
    examples as written."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30, width=110)

    def _get_help_string(self, action):
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0
        return (action.help or "") + " (default: %(default)s)" * shown


EXAMPLES = """
examples:
  python train.py                                             the demo: built-in synthetic faces, about a minute
  python train.py --data CAER-S --experiment table2-small     a paper experiment (list above)
  python train.py --data ~/faces --name mine                  your own folder tree: ~/faces/<class>/*.jpg
  python train.py --resume runs/mine                          continue a stopped run (Ctrl-C saves it)
  python train.py --eval-only runs/mine/best.pt --data ~/other   test metrics, classes matched by name
  python train.py --predict photos/ --ckpt runs/mine/best.pt --predict-out predictions.csv
  python train.py --plot runs/mine runs/demo-20261206-101500
"""


def build_parser():
    p = Parser(description="Train / evaluate FaceRWKV (RWKV-4 for facial expression recognition). Defaults are the "
               f"paper's; with no --data: the demo (synthetic faces at {DEMO['img_size'][0]}x{DEMO['img_size'][1]}, "
               f"patch {DEMO_PATCH['none']}, {DEMO['epochs']} epochs).", formatter_class=HelpFormatter,
               epilog="experiments (section 5; each sets defaults that explicit flags override):\n" + "\n".join(
                   f"  {name:<24} {' '.join(f'{k}={v}' for k, v in s.items())}" for name, s in EXPERIMENTS.items())
               + "\n" + EXAMPLES)
    model_flags(p.add_argument_group("model (section 4.2, Table 1)", "unset options come from the --size "
                                     "preset").add_argument)
    data_and_recipe_flags(p.add_argument_group("data (section 3)").add_argument,
                          p.add_argument_group("recipe (section 5.1; --recipe poster: POSTER V2's)").add_argument)
    run_flags(p.add_argument_group("run").add_argument)
    p.add_argument_group("distributed (torchrun)", "torchrun --nproc_per_node N train.py ... (NCCL on GPUs, gloo on "
                         "CPUs): each\nprocess takes batch_size / N images per step; only rank 0 writes files.")
    tool_flags(p.add_argument_group("tools").add_argument)
    return p


def model_flags(add):
    B = argparse.BooleanOptionalAction
    add("--size", default="small", choices=(*PRESETS, *POSTER_PRESETS),
        help="small 2x128, medium 4x256, large 6x512, hybrid (large on the ResNet50 stem), Vision-RWKV's "
        "vrwkv-t/s/b, or a POSTER preset")
    add("--n-layer", type=POSITIVE_INT, help="number of RWKV blocks")
    add("--n-embd", type=POSITIVE_INT, help="embedding width d")
    add("--dim-att", type=POSITIVE_INT, help="time-mix width (preset: d)")
    add("--dim-ffn", type=POSITIVE_INT, help="channel-mix hidden width (preset: 4d)")
    add("--n-head", type=POSITIVE_INT, help="heads of the transformer mixer (preset: d/64)")
    add("--patch-size", type=POSITIVE_INT, help="P x P patches (preset: 20; 5 for hybrid; demo 12)")
    add("--img-size", type=POSITIVE_INT, nargs=2, metavar=("H", "W"), default=data.DEFAULT_IMG_SIZE,
        help="images are resized to H x W")
    add("--backbone", choices=("none", "resnet50"), help="resnet50: patches of the ResNet50 stem's map")
    add("--backbone-weights", metavar="PATH", help="torchvision resnet50 state dict for the stem")
    add("--freeze-backbone", action=B, help="do not train the stem")
    add("--imagenet-norm", action=B, help="normalise inputs with the ImageNet mean/std (preset: on)")
    add("--pos-emb", action=B, help="learned positional embedding")
    add("--pool", choices=("last", "mean", "cls"), help="classify the last token (paper), the mean, or cls (POSTER)")
    add("--head", choices=("mlp", "linear"), help="classifier head (preset: mlp)")
    add("--mixer", choices=("rwkv", "vrwkv", "transformer", "identity"),
        help="token mixer: rwkv, vrwkv (Vision-RWKV), transformer (comparison), identity ('w/o RWKV')")
    add("--ir50-weights", metavar="PATH", help="POSTER: ArcFace IR-50 state dict (ir50.pth)")
    add("--landmark-weights", metavar="PATH", help="POSTER: MobileFaceNet checkpoint; the branch is then frozen")
    add("--linear-probe", action="store_true", help="a linear classifier on the raw pixels instead (a baseline)")
    add("--init-from", metavar="CKPT", help="start from the tensors of CKPT (POSTER V2's or a best.pt/last.pt) that "
        "fit, the classifier's rows matched by class name; not --resume")
    add("--train-only", metavar="PATTERN[,PATTERN]", help="train only the parameters these name (e.g. mixer,head)")


def data_and_recipe_flags(add, add_recipe):
    B = argparse.BooleanOptionalAction
    add("--data", metavar="PATH", help="dataset root or file; unset: built-in synthetic faces (demo)")
    add("--dataset", default="auto", choices=("auto", "caer-s", "folder", "rafdb", "fer2013", "affectnet", "synthetic"),
        help="dataset format; also names the dataset a POSTER V2 checkpoint was trained on (its class order), and "
        "reads numbered class folders as that dataset's labels (rafdb 1-7, affectnet 0-7)")
    add("--affectnet-classes", type=int, choices=(7, 8), default=7, help="AffectNet-7 or AffectNet-8 (+ Contempt)")
    add("--crop-face", action=B, default=False, help="AffectNet csv: crop each image to its face box")
    add("--val-fraction", type=number(float, 0, 1, hi_open=True), default=0.1,
        help="share of train held out for validation when there is no val split")
    add("--sanity", type=POSITIVE_INT, metavar="N", help="use only N images per class (the sanity check)")
    add("--skip-bad-images", action="store_true", help="skip unreadable images instead of stopping")
    add("--synthetic-size", type=POSITIVE_INT, nargs=2, metavar=("TRAIN", "TEST"), default=data.SYNTHETIC_SIZE,
        help="synthetic faces per class")
    add("--workers", type=COUNT, metavar="N", help="data loading processes per training process (default: by the free cores, "
        "0 on a 2-core machine)")
    add = add_recipe
    add("--recipe", default="paper", choices=("paper", "poster"), help="defaults of this group")
    add("--epochs", type=POSITIVE_INT, default=RECIPE["epochs"], help="epochs (Table 2: 25)")
    add("--batch-size", type=POSITIVE_INT, default=RECIPE["batch_size"], help="global batch")
    add("--optimizer", choices=("adam", "sam"), default=RECIPE["optimizer"], help="adam, or SAM around Adam")
    add("--sam-rho", type=POSITIVE, default=0.05, help="radius of SAM's ascent step")
    add("--lr", type=POSITIVE, default=RECIPE["lr"], help="peak learning rate of Adam(0.9, 0.999)")
    add("--schedule", choices=("cosine", "exp"), default=RECIPE["schedule"],
        help="cosine to 0 per step after the warm-up, or exp: lr x lr_gamma per epoch")
    add("--warmup-epochs", type=NON_NEGATIVE, default=RECIPE["warmup_epochs"], help="linear warm-up from 0.1 x lr")
    add("--lr-gamma", type=number(float, 0, 1, lo_open=True), default=RECIPE["lr_gamma"], help="decay of exp")
    add("--clip", type=NON_NEGATIVE, default=RECIPE["clip"], help="max gradient norm, 0 = off")
    add("--weight-decay", type=NON_NEGATIVE, default=RECIPE["weight_decay"], help="Adam weight decay")
    add("--hflip", action=B, default=RECIPE["hflip"], help="random horizontal flips (the paper: none)")
    add("--random-erasing", type=PROBABILITY, default=RECIPE["random_erasing"], metavar="P",
        help="erase a random rectangle with probability P")
    add("--erasing-scale", type=number(float, 0, 1, lo_open=True, hi_open=True), nargs=2,
        default=RECIPE["erasing_scale"], metavar=("LO", "HI"), help="erased share of the image")
    add("--balanced-sampler", action=B, default=RECIPE["balanced_sampler"], help="every class equally likely")


def run_flags(add):
    add("--experiment", choices=tuple(EXPERIMENTS), metavar="NAME", help="preset of a paper experiment (list below)")
    add("--seed", type=SEED, default=0, help="seeds init, data split and data order")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if available")
    add("--threads", type=COUNT, default=0, help="torch's CPU threads; 0: the cores free right now")
    add("--amp", default="none", choices=("none", "bf16"), help="bf16 autocast of the linear layers (CUDA)")
    add("--out", metavar="DIR", help="parent of run directories (default: runs); --eval-only: where results go "
        "(default: beside the checkpoint)")
    add("--name", help="run directory name, one folder under --out (default: experiment or size + time)")
    add("--resume", metavar="RUN_DIR_OR_CKPT", help="continue a run from its last.pt (Ctrl-C writes one)")
    add("--eval-only", metavar="CKPT", help="evaluate CKPT (RUN_DIR/best.pt or POSTER V2's) on the test split")
    add("--log-every", type=POSITIVE_INT, default=10, help="steps between progress lines when not on a terminal")
    add("--save-every-steps", type=COUNT, default=0, help="also write last.pt every N steps (0 = per epoch)")
    add("--stop-after-steps", type=COUNT, default=0, help=argparse.SUPPRESS)  # tests: as if killed


def tool_flags(add):
    add("--plot", nargs="+", metavar="RUN_DIR", help="draw loss and accuracy per epoch (training, validation) of "
        "these runs")
    add("--plot-out", default="curves.png", help="picture written by --plot: .png, .jpg or .pdf")
    add("--explain", nargs="+", metavar="IMG", help="draw what the classified token draws from each patch, per mixer "
        "layer, over these images (explain-NAME.png in --out, default beside --ckpt)")
    add("--predict", nargs="+", metavar="IMG", help="class probabilities of these images, folders (recursively) "
        "or glob patterns")
    add("--predict-out", metavar="CSV", help="--predict also writes one row per image: file, top class, every "
        "class's probability")
    add("--ckpt", metavar="CKPT", help="checkpoint for --predict and --explain (a run directory's best.pt, or "
        "POSTER V2's)")
    add("--count-params", action="store_true", help="parameters of every preset beside the paper's (Tables 1, 4)")
    add("--benchmark", nargs="?", const="benchmark.csv", metavar="CSV", help="RWKV vs transformer time and memory")
    add("--bench-methods", nargs="*", metavar="M", choices=(*BENCH_METHODS, *POSTER_PRESETS, "wkv-share"),
        default=[*BENCH_METHODS, "poster-v2", "poster-rwkv", "poster-vrwkv", "wkv-share"],
        help="any of " + " ".join((*BENCH_METHODS, *POSTER_PRESETS, "wkv-share")))
    add("--bench-tokens", type=POSITIVE_INT, nargs="+", default=[600, 1200, 2400, 4800, 9600], metavar="T",
        help="token counts")
    add("--bench-width", type=POSITIVE_INT, default=128, help="model width d")
    add("--bench-batch", type=POSITIVE_INT, metavar="N", help="images per call (1; POSTER 4; wkv-share 8)")
    add("--bench-repeats", type=POSITIVE_INT, default=3, help="timed calls per point, median reported")


def recipe_defaults(args):
    """--recipe poster: POSTER V2's settings, with its per-dataset learning rate and erasing."""
    if args.recipe != "poster":
        return {}
    fmt = data_format(args)
    balanced = fmt == "affectnet" and args.affectnet_classes == 7  # AffectNet-7 only, as POSTER V2
    return {**POSTER_RECIPE, "lr": POSTER_OTHER_LR, **POSTER_PER_DATASET.get(fmt, {}), "balanced_sampler": balanced}


def data_format(args):
    fmt = {"caer-s": "caer"}.get(args.dataset, args.dataset)
    return ("synthetic" if args.data is None else data.detect_format(args.data)) if fmt == "auto" else fmt


def is_demo(args):
    """No --data: the synthetic faces at the demo's resolution (--count-params counts at the paper's)."""
    return args.data is None and not args.count_params


def flag(dest):
    return "--" + dest.replace("_", "-")


def plain(value):
    return list(value) if isinstance(value, tuple) else value


def differences(theirs, ours, what):
    """'key=theirs (checkpoint) vs ours' for every key of `ours` whose value differs."""
    return [f"{k}={plain(theirs.get(k))} (checkpoint) vs {plain(v)}{what}"
            for k, v in ours.items() if plain(theirs.get(k)) != plain(v)]


def check_values(parser, args, ckpt):
    """Every setting, from a flag, a preset or a checkpoint, passes its flag's type and choices."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or value is None or action.dest == "help":
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        try:
            if isinstance(action.nargs, int) and action.nargs and len(values) != action.nargs:
                raise argparse.ArgumentTypeError(f"takes {action.nargs} values")
            for v in values:
                if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
                    if not isinstance(v, bool):
                        raise argparse.ArgumentTypeError(f"must be true or false (got {v!r})")
                elif action.type is not None:
                    if isinstance(v, bool):
                        raise argparse.ArgumentTypeError(f"must be a number (got {v!r})")
                    action.type(str(v))
                elif not isinstance(v, str):
                    raise argparse.ArgumentTypeError(f"must be text (got {v!r})")
                if action.choices is not None and v not in action.choices:
                    raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, action.choices))}")
        except argparse.ArgumentTypeError as e:
            saved = ckpt and str(ckpt["args"].get(action.dest)) == str(plain(value))
            where = f" (saved in {ckpt['path']})" if saved else ""
            raise UsageError(f"argument {action.option_strings[0]}: {e}{where}") from None


def parse_args(argv):
    """-> (args, checkpoint or None): the one place settings are resolved. Defaults layer: paper <
    demo < --recipe < --experiment < the checkpoint's CARRIED settings < explicit flags."""
    parser = build_parser()
    first = parser.parse_args(argv)
    if (first.predict or first.explain) and not first.ckpt:
        raise UsageError(f"--{'predict' if first.predict else 'explain'} needs --ckpt CKPT (e.g. runs/NAME/best.pt)")
    if first.init_from and (first.resume or first.eval_only):
        raise UsageError("--init-from starts a new run from weights; it does not go with --resume or --eval-only")
    ckpt = None
    if first.resume or first.eval_only or first.predict or first.explain:
        ckpt = load_checkpoint(first.resume or first.eval_only or first.ckpt, first, resume=bool(first.resume))
        parser.set_defaults(**{k: ckpt["args"][k] for k in CARRIED if k in ckpt["args"]})
    else:
        experiment = dict(EXPERIMENTS.get(first.experiment, {}))
        if is_demo(first):
            experiment.pop("patch_size", None)  # the demo's patch grid instead (DEMO_PATCH)
            if "img_size" in experiment:
                experiment["img_size"] = DEMO_POSTER_IMG_SIZE
            parser.set_defaults(**DEMO)
        parser.set_defaults(**recipe_defaults(first), **experiment)
    args = parser.parse_args(argv)
    check_values(parser, args, ckpt)
    if ckpt and not ckpt.get("restart"):  # the checkpoint's defaults: a difference would change its model or run
        keys = [*MODEL_KEYS, *(k for k in CARRIED if k in ckpt["args"] and k not in (*MODEL_KEYS, *RESUME_MAY_CHANGE)
                               and args.resume)]
        changed = differences(ckpt["args"], {k: getattr(args, k) for k in keys}, "")
        if changed:
            fix = ("a run resumes with its own settings; to change them, start a new run from it with --init-from "
                   f"{Path(ckpt['path']).with_name('last.pt')}" if args.resume else "drop the flags: the checkpoint's "
                   "model is its own")
            raise UsageError(f"{ckpt['path']}: {'; '.join(changed)}: {fix}")
    if ckpt and ckpt.get("restart"):  # a run folder that never wrote a checkpoint: its settings, a fresh start
        args.out, args.name, args.resume, ckpt = str(Path(ckpt["path"]).parent.parent), Path(ckpt["path"]).parent.name, \
            None, None
    if is_demo(args) and args.patch_size is None and not ckpt and args.size in PRESETS \
            and PRESETS[args.size].get("mixer") != "vrwkv":
        args.patch_size = DEMO_PATCH[args.backbone or PRESETS[args.size].get("backbone", "none")]
    args.img_size, args.synthetic_size = tuple(args.img_size), tuple(args.synthetic_size)
    args.random_erasing, args.erasing_scale = data.check_erasing(args.random_erasing, args.erasing_scale)
    if args.name is not None and (args.name in ("", ".", "..") or "/" in args.name or os.sep in args.name
                                  or "\0" in args.name or len(os.fsencode(args.name)) > 255):
        name = repr(args.name) if len(args.name) < 60 else f"{args.name[:40]!r}... ({len(args.name)} characters)"
        raise UsageError(f"--name {name}: a run's name is one folder under --out (no '/', '..' or absolute path, "
                         "at most 255 bytes); choose the parent folder with --out")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory")
    return args, ckpt


# -----------------------------------------------------------------------------
# The models train.py knows: FaceRWKV, POSTER, and the linear probe baseline

@dataclasses.dataclass
class LinearProbeConfig:
    img_size: tuple = data.DEFAULT_IMG_SIZE
    n_classes: int = 7
    imagenet_norm: bool = True


class LinearProbe(nn.Module):
    """--linear-probe: a linear classifier on the (normalised) pixels, the baseline the synthetic
    faces are built to defeat: their cues sit at no fixed pixel."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(3 * math.prod(config.img_size), config.n_classes)

    def forward(self, images):
        return self.linear(images.flatten(1))  # (B, n_classes)

    def num_params(self, trainable_only=False):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def print_param_summary(self):
        print(f"linear classifier on {self.linear.in_features:,} pixel values: {self.num_params():,} parameters")


ARCHS = {"FaceRWKV": (FaceRWKVConfig, FaceRWKV), "PosterRWKV": (PosterConfig, PosterRWKV),
         "LinearProbe": (LinearProbeConfig, LinearProbe)}


def model_config(args, n_classes):
    """The model's config from the flags: the linear probe's, a POSTER preset's, or FaceRWKV's."""
    if args.linear_probe:
        return LinearProbeConfig(img_size=args.img_size, n_classes=n_classes,
                                 imagenet_norm=args.imagenet_norm is not False)
    try:
        if args.size in POSTER_PRESETS:
            H, W = args.img_size
            if H != W:
                raise UsageError(f"POSTER takes square images; --img-size {H} {W}: use e.g. --img-size 224 224")
            wrong = [flag(k) for k in MODEL_FLAGS if getattr(args, k) is not None and k not in POSTER_FLAGS
                     and k != "imagenet_norm"]
            if wrong or args.imagenet_norm is False:
                raise UsageError(f"{' '.join(wrong) or '--no-imagenet-norm'}: not a POSTER setting (it takes "
                                 + ", ".join(map(flag, POSTER_FLAGS)) + ")")
            overrides = {POSTER_FLAGS[k]: getattr(args, k) for k in POSTER_FLAGS if getattr(args, k) is not None}
            return PosterConfig.preset(args.size, img_size=H, n_classes=n_classes, **overrides)
        if args.ir50_weights or args.landmark_weights:
            raise UsageError("--ir50-weights and --landmark-weights are for the POSTER models "
                             "(--experiment poster-...)")
        if args.backbone_weights and args.imagenet_norm is False:
            raise UsageError("--backbone-weights: the pretrained ResNet50 stem expects ImageNet-normalised inputs; "
                             "drop --no-imagenet-norm")
        overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
        return FaceRWKVConfig.preset(args.size, img_size=args.img_size, n_classes=n_classes, **overrides)
    except ValueError as e:
        raise UsageError(f"model settings: {e}") from None


def build_model(config, args, log, fresh=True):
    """The model of this config; a fresh one gets the pretrained weights the flags name."""
    model = next(cls for cfg, cls in ARCHS.values() if isinstance(config, cfg))(config)
    loads = {"load_backbone_weights": args.backbone_weights, "load_ir50_weights": args.ir50_weights,
             "load_landmark_weights": args.landmark_weights}
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


def input_size(config):
    """(H, W) of the model's input images (POSTER's configs hold one side: its images are square)."""
    return (config.img_size,) * 2 if isinstance(config.img_size, int) else tuple(config.img_size)


def load_splits(args, config, draw_ahead=True):
    """train/val/test at the model's img_size and normalisation; synthetic faces drawn up front."""
    processes = max(2, min(os.cpu_count() or 1, 8) // int(os.environ.get("WORLD_SIZE", "1")))
    return data.load_datasets(root=args.data, fmt={"caer-s": "caer"}.get(args.dataset, args.dataset),
                              img_size=input_size(config), val_fraction=args.val_fraction, seed=args.seed,
                              sanity_per_class=args.sanity, hflip=args.hflip, normalize=config.imagenet_norm,
                              skip_bad_images=args.skip_bad_images, synthetic_size=args.synthetic_size,
                              synthetic_processes=processes if draw_ahead else 1,
                              random_erasing=args.random_erasing, erasing_scale=args.erasing_scale,
                              affectnet_classes=args.affectnet_classes, crop_face=args.crop_face)


# -----------------------------------------------------------------------------
# Files: the run directory, checkpoints and metrics. Each written whole (atomic_write) or not at all.

CHECKPOINTS = ("last.pt", "best.pt")  # a folder holding one of these holds a run
RESUME_ONLY = ("optimizer", "scheduler", "train_sums", "rng")  # in last.pt, not in best.pt


@contextlib.contextmanager
def claim_run_dir(run_dir, resuming, rank, world):
    """Rank 0 holds an fcntl lock on RUN/train.lock for the run (dropped when the process ends); a
    new run is refused where another run's checkpoints are. A folder that never got a checkpoint is
    no run: it is started again. Every rank raises the same error; a folder this call made is
    removed again if the run leaves nothing in it but the lock."""
    lock, problem = None, [None]  # a list: broadcast from rank 0 to every rank
    new = None  # the outermost folder this call creates
    if rank == 0 and not run_dir.exists():
        new = run_dir
        while not new.parent.exists():
            new = new.parent
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = open(run_dir / "train.lock", "a")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            found = [f for f in CHECKPOINTS if (run_dir / f).exists()]
            if found and not resuming:
                problem[0] = (f"{run_dir} already holds a run ({', '.join(found)}); continue it with "
                              f"--resume {run_dir} or pick another --name")
        except BlockingIOError:
            problem[0] = f"{run_dir} is in use by another train.py process; wait for it or pick another --name"
    if world > 1:
        dist.broadcast_object_list(problem, src=0)
    try:
        if problem[0]:
            raise UsageError(problem[0])
        yield
    finally:
        if lock:
            lock.close()
        if new and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {"train.lock"}:
            (run_dir / "train.lock").unlink(missing_ok=True)
            for folder in [run_dir, *run_dir.parents][:len(run_dir.parts) - len(new.parts) + 1]:
                if any(folder.iterdir()):
                    break
                folder.rmdir()


def write_json(path, obj):
    atomic_write(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def write_csv(path, rows):
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    atomic_write(path, text.getvalue().encode())


def read_metrics(path):
    """The rows of a metrics.jsonl (rewritten whole every epoch, so never torn)."""
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise UsageError(f"{path} is not a metrics file written by train.py ({e})") from None


def read_train_checkpoint(path, args=None):
    """A train.py or POSTER V2 checkpoint (no code is unpickled), DDP's 'module.' dropped."""
    try:
        ckpt = read_checkpoint(path)
        state = ckpt.get("state_dict") if isinstance(ckpt, dict) and "arch" not in ckpt else None
        if args is not None and isinstance(state, dict) and any(str(k).startswith("backbone.layers.") for k in state):
            return vrwkv_checkpoint(path, args)  # mmcv's {'meta', 'state_dict'} of Vision-RWKV's backbone
        if args is not None and isinstance(ckpt, dict) and "arch" not in ckpt \
                and isinstance(ckpt.get("state_dict"), dict):
            return posterv2_checkpoint(path, args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if isinstance(ckpt, dict) and {"state", "param_groups"} <= ckpt.keys():
        raise UsageError(f"{path} holds only an optimizer's state, no weights (POSTER V2's main.py writes "
                         "model_best.pth so); give the checkpoint it writes per epoch, whose weights are under "
                         "state_dict")
    if not (isinstance(ckpt, dict) and {"model", "config", "args", "arch"} <= ckpt.keys()
            and isinstance(ckpt["args"], dict) and isinstance(ckpt["config"], dict)):
        raise UsageError(f"{path} is not a train.py checkpoint (needs model, arch, config and args)")
    if ckpt["arch"] not in ARCHS:
        raise UsageError(f"{path}: unknown architecture {ckpt['arch']!r} (train.py knows {', '.join(ARCHS)})")
    ckpt["model"] = {str(k).removeprefix("module."): v for k, v in ckpt["model"].items()}
    ckpt["path"] = str(path)
    return ckpt


def posterv2_checkpoint(path, args):
    """A POSTER V2 checkpoint as a train.py one of poster-v2, its classifier's rows put from the class
    order of the dataset it was trained on (8 classes: AffectNet; else --dataset or --data's format)
    into the project's. The file does not name that dataset: with none of the three it is refused."""
    n, sd, skipped = posterv2_state_dict(path)
    fmt = "affectnet" if n == 8 else data_format(args)
    if fmt not in POSTERV2_CLASS_ORDER:
        raise UsageError(f"{path} is a POSTER V2 checkpoint, whose outputs are in the class order of the dataset it "
                         "was trained on, which the file does not name: pass --dataset rafdb, affectnet or caer-s")
    order, classes = POSTERV2_CLASS_ORDER[fmt][:n], data.CLASSES + ("Contempt",) * (n == 8)
    rows = [order.index(c) for c in classes]
    sd["head.weight"], sd["head.bias"] = sd["head.weight"][rows], sd["head.bias"][rows]
    print(f"{path}: POSTER V2 checkpoint, {n} classes in {fmt}'s order ({skipped} unused tensors skipped); its "
          "outputs -> the project's: " + ", ".join(f"{i} {c} -> {classes.index(c)}" for i, c in enumerate(order)))
    config = dataclasses.asdict(PosterConfig.preset("poster-v2", n_classes=n))
    return {"model": sd, "arch": "PosterRWKV", "config": config, "classes": list(classes), "path": str(path),
            "args": {"size": "poster-v2", "experiment": None, "img_size": [224, 224], "linear_probe": False,
                     "affectnet_classes": n}}


def vrwkv_checkpoint(path, args):
    """A Vision-RWKV ImageNet-1k checkpoint (VRWKV-T, S or B) as a train.py one of its backbone: the
    position table resized to --img-size's grid, no classifier (classes None), so it only starts runs."""
    if not getattr(args, "init_from", None):
        raise UsageError(f"{path}: a Vision-RWKV ImageNet backbone, with no expression classifier; start a run "
                         f"from it: --experiment vrwkv-t (-s, -b) --init-from {path}")
    config, sd = vrwkv_state_dict(path, tuple(args.img_size))
    name = next((n for n in ("vrwkv-t", "vrwkv-s", "vrwkv-b") if PRESETS[n]["n_embd"] == config.n_embd), None)
    print(f"{path}: Vision-RWKV checkpoint ({name or f'width {config.n_embd}'}, {config.n_layer} blocks, "
          f"{config.norm}-norm); position table at {config.grid[0]}x{config.grid[1]}, ImageNet head skipped")
    return {"model": sd, "arch": "FaceRWKV", "config": dataclasses.asdict(config), "classes": None, "path": str(path),
            "args": {"size": name, "experiment": name, "img_size": list(config.img_size), "linear_probe": False}}


def load_checkpoint(path, args=None, resume=False):
    """A checkpoint file, or a run directory's last.pt (resume) or best.pt. A run folder that stopped
    before its first checkpoint gives its saved settings instead (config.json), to start it again."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        if resume and not (path / "last.pt").exists() and config.is_file():
            print(f"{path} has no checkpoint yet (it stopped before its first): starting it again from its settings")
            try:
                return {"args": json.loads(config.read_text())["args"], "path": str(config), "restart": True}
            except (ValueError, KeyError, TypeError) as e:
                raise UsageError(f"{config} is not a config.json written by train.py ({e})") from None
        path = path / ("last.pt" if resume else "best.pt")
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path} (give a .pt file or a run directory holding "
                         f"{'last.pt' if resume else 'best.pt'})")
    ckpt = read_train_checkpoint(path, args)
    if resume and not set(RESUME_ONLY) <= ckpt.keys():
        raise UsageError(f"{path} holds no optimizer state (a best.pt holds only the model): "
                         f"--resume the run directory or its last.pt")
    return ckpt


def model_from_checkpoint(ckpt, device):
    """The checkpoint's model; an unknown config field or a different set of weights is one line."""
    config_cls, model_cls = ARCHS[ckpt["arch"]]
    try:
        model = model_cls(config_cls(**ckpt["config"]))
    except (TypeError, ValueError) as e:
        raise UsageError(f"{ckpt['path']}: its model config does not fit {ckpt['arch']}: {e}") from None
    load_weights(model, ckpt)
    return model.to(device).eval()


def load_weights(model, ckpt):
    """Load ckpt's weights into model; a different architecture is named field by field."""
    saved = dataclasses.asdict(type(model.config)(**ckpt["config"]))  # fields added since: their defaults
    diff = differences(saved, dataclasses.asdict(model.config), " (now)")
    if diff:
        raise UsageError(f"checkpoint {ckpt['path']} was made for a different model: {'; '.join(diff)}. "
                         "Drop the model flags that differ (or use a matching checkpoint).")
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"checkpoint {ckpt['path']} does not fit the model: {str(e).splitlines()[0]}") from None


def class_map(theirs, ours, what):
    """The index in `theirs` (a checkpoint's classes) of each of `ours` (the data's), matched by name,
    never by position; printed once when it is not the identity. A class of ours that theirs lacks
    is one line naming both lists."""
    theirs, ours = list(theirs), list(ours)
    missing = [c for c in ours if c not in theirs]
    if missing:
        raise UsageError(f"{what}: the data's classes {ours} are not all the checkpoint's {theirs} (missing: "
                         f"{', '.join(missing)}); name the class folders as the checkpoint does, or for numbered "
                         "folders pass the dataset they number (--dataset rafdb or affectnet)")
    index = [theirs.index(c) for c in ours]
    if index != list(range(len(theirs))):
        print(f"{what}: classes matched by name, data -> checkpoint: "
              + ", ".join(f"{c} -> {i}" for c, i in zip(ours, index)))
    return index


def rng_states():
    """Every RNG state as tensors and plain types, so a weights-only reader can rebuild it."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# Processes, the optimizer and the learning-rate schedules (both stepped once per batch)

def setup_distributed(args):
    """(rank, world_size, device). Under torchrun the process group comes from the environment."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch sees no GPU; use --device cpu")
    if "LOCAL_RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    world = dist.get_world_size()
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world})")
    return dist.get_rank(), world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def autocast(args, device):
    """--amp bf16: linear layers run in bfloat16 on CUDA; wkv() computes in float32 whatever it gets."""
    if args.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(step, warmup_steps, total_steps, steps_per_epoch=None, schedule="cosine", gamma=0.98):
    """Multiplier of the peak lr at optimizer step `step` (0-based): 0.1 -> 1 linearly over the
    warm-up, then cosine (the paper's: half a cosine down to 0 at the end of training) or exp (POSTER
    V2's ExponentialLR: gamma^epoch, written per step so a run resumed mid-epoch continues exactly)."""
    if step < warmup_steps:
        return 0.1 + 0.9 * step / warmup_steps
    if schedule == "exp":
        return gamma ** (step // steps_per_epoch)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer, warmup_steps, total_steps, steps_per_epoch=None, schedule="cosine", gamma=0.98):
    """A LambdaLR stepped once per batch (not per epoch)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        schedule=schedule, gamma=gamma))


def make_optimizer(params, args, n_train):
    """The recipe's Adam and per-step schedule -> (optimizer, scheduler, steps_per_epoch)."""
    params = list(params)
    # fused: Adam's update as one kernel over all tensors instead of a dozen ops per tensor, same maths
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay, fused=fused)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    scheduler = make_scheduler(optimizer, warmup_steps, args.epochs * steps_per_epoch, steps_per_epoch,
                               args.schedule, args.lr_gamma)
    return optimizer, scheduler, steps_per_epoch


def train_step(model, images, labels, optimizer, scheduler, clip, amp_context, sam_rho=0.0):
    """One step: forward, backward, clip, Adam step, schedule step -> (loss, correct). With sam_rho > 0 it is
    SAM's (Foret et al. 2021, as POSTER V2): climb to w + rho g/|g|, take the gradient there, step from w."""
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
# Data order, evaluation, progress lines, and the pieces a run is set up with

def epoch_batches(dataset, epoch, skip_batches, args, rank, world, per_rank_batch, device):
    """This process's batches of one epoch: the order depends on (seed, epoch) only, the union of the
    ranks' k-th batches is the same global batch for any world size; skip_batches resumes mid-epoch."""
    if args.balanced_sampler:
        # every draw picks a class uniformly, then an image of it; rank r takes every world-th draw
        indices = list(data.balanced_indices(dataset.labels, len(dataset), args.seed, epoch))[rank::world]
    else:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        sampler.set_epoch(epoch)
        indices = list(sampler)
    indices = indices[skip_batches * per_rank_batch:]
    # the loader's own generator seeds its workers: random augmentation does not depend on the global RNG
    generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    return loader(dataset, indices, per_rank_batch, args, device, generator)


def loader(dataset, indices, batch, args, device, generator):
    """A DataLoader over these indices; its workers ignore Ctrl-C (the training process handles it)."""
    return DataLoader(dataset, batch_size=batch, sampler=indices, num_workers=args.workers, generator=generator,
                      pin_memory=device.type == "cuda", worker_init_fn=ignore_sigint)


@torch.no_grad()
def evaluate(model, dataset, n_classes, args, rank, world, per_rank_batch, device, label_map=None):
    """Loss, accuracy, mean per-class accuracy and confusion matrix (rows: true class) over the dataset;
    each process takes every world-th sample and the counts are summed. label_map[y]: the model's
    output for the data's label y (class_map), when the two orders differ."""
    model.eval()
    items = loader(dataset, list(range(rank, len(dataset), world)), per_rank_batch, args, device, torch.Generator())
    label_map = None if label_map is None else torch.tensor(label_map, device=device)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in items:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        labels = labels if label_map is None else label_map[labels]
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


def test_results(m):
    return {"test_acc": m["acc"], "test_mean_class_acc": m["mean_class_acc"], "test_per_class_acc": m["per_class_acc"],
            "test_confusion": m["confusion"]}


def report_test(title, metrics, classes, out_dir, suffix, ckpt_path):
    """Print the confusion table; write test_metrics{suffix}.json and confusion{suffix}.csv."""
    print(title)
    print(confusion_table(metrics, classes))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"test_metrics{suffix}.json", {"checkpoint": str(ckpt_path), "classes": list(classes),
                                                        **metrics})
    write_csv(out_dir / f"confusion{suffix}.csv",
              [["true \\ pred", *classes], *([n, *r] for n, r in zip(classes, metrics["confusion"]))])
    draw_confusion(metrics, classes, out_dir / f"confusion{suffix}.png", ckpt_path)


class Stopped(Exception):
    """Ctrl-C or SIGTERM ended the process: one line on stderr, exit status 128 + the signal's number."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM while a run trains: the first lets the current step finish, then
    the run writes last.pt and stops (Stopped); a second one stops it at once."""

    def __init__(self, run_dir):
        self.run_dir, self.signum, self.saved, self.previous = run_dir, None, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only there can Python handle signals
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum  # the training loop stops after this step
            return
        raise Stopped(signum, self.message(signum, "at once"))

    def message(self, signum, when):
        """Where the run stopped, and the command that continues it."""
        name, again = signal.Signals(signum).name, f"python train.py --resume {self.run_dir}"
        if self.saved:
            return f"stopped by {name} {when}: {self.saved} holds the run; continue with: {again}"
        return f"stopped by {name} before the first checkpoint; start it again with: {again}"


def ignore_sigint(worker_id):
    """A DataLoader worker leaves Ctrl-C to the training process, and dies at SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Progress:
    """One line updated in place on a terminal; a line every --log-every steps elsewhere. The time
    left is measured in this run: its time per step so far times the steps left, plus its time per
    epoch end so far (validation, checkpoints) times the epoch ends left."""
    open_line = False  # a line in place is on the terminal: an error message starts below it

    def __init__(self, log_every, enabled, first_step, total_steps):
        self.log_every, self.enabled, self.live = log_every, enabled, enabled and sys.stdout.isatty()
        self.first_step, self.total_steps, self.t_first = first_step, total_steps, time.time()
        self.t_last, self.images, self.ends, self.end_seconds = self.t_first, 0, 0, 0.0

    def epoch_ended(self, seconds):
        self.ends, self.end_seconds = self.ends + 1, self.end_seconds + seconds

    def update(self, step, epoch, epochs, loss, lr, images, epoch_end):
        self.images += images
        if not self.enabled or not (self.live or step % self.log_every == 0 or epoch_end):
            return
        now = time.time()
        per_step = (now - self.t_first - self.end_seconds) / (step - self.first_step)
        per_end = self.end_seconds / self.ends if self.ends else 0.0
        eta = per_step * (self.total_steps - step) + per_end * (epochs - epoch + 1)
        line = (f"epoch {epoch}/{epochs} step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} "
                f"{self.images / max(now - self.t_last, 1e-9):.1f} img/s eta {format_seconds(eta)}")
        print("\r" + line + "\033[K" if self.live else line, end="" if self.live else "\n", flush=True)
        self.t_last, self.images, Progress.open_line = now, 0, self.live

    @staticmethod
    def end_line():
        if Progress.open_line:
            print(flush=True)
        Progress.open_line = False


def format_seconds(s):
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def init_from(model, path, args, classes, log):
    """--init-from: every tensor of a checkpoint whose name and shape fit; the classifier's output rows
    are matched to this data's classes by name (or start fresh). Returns the names loaded."""
    source = load_checkpoint(path, args)
    own, theirs = model.state_dict(), dict(source["model"])
    out = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]  # the classifier's output layer
    rows = [n for n in (f"{out}.weight", f"{out}.bias") if n in theirs]
    if source.get("classes") is not None and list(source["classes"]) != list(classes) and rows:
        if set(classes) <= set(source["classes"]):
            index = class_map(source["classes"], classes, f"--init-from {path}")
            theirs.update({n: theirs[n][index] for n in rows})
        else:
            log(f"--init-from {path}: its classes {list(source['classes'])} are not this data's {list(classes)}: "
                f"the output layer {out} starts fresh")
            theirs = {n: v for n, v in theirs.items() if n not in rows}
    fits = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fits, strict=False)
    log(f"--init-from {path}: {len(fits)} of the model's {len(own)} tensors loaded ({len(theirs) - len(fits)} of the "
        "file's unused); weights only, not --resume: no optimizer, step or RNG state")
    groups = {}
    for k in own:
        groups.setdefault(k.split(".")[0], [0, 0])[k not in fits] += 1
    for name, (loaded, fresh) in groups.items():
        log(f"  {name:<16} {'fresh' if not loaded else 'loaded' if not fresh else 'partly loaded'}: "
            f"{loaded} tensors loaded, {fresh} fresh")
    return set(fits)


def train_only(model, patterns, log):
    """--train-only: freeze every parameter no pattern names ('mixer', 'head', 'blocks.1'); modules
    left with nothing to train stay in eval mode, so BatchNorm statistics are frozen too."""
    names, pats = dict(model.named_parameters()), [p for p in patterns.split(",") if p]
    named = lambda n, p: f".{p}." in f".{n}."  # noqa: E731
    unknown = [p for p in pats if not any(named(n, p) for n in names)]
    if unknown or not pats:
        raise UsageError(f"--train-only {patterns}: {', '.join(unknown) or 'nothing'} names no parameter; the "
                         f"model's parts are {', '.join(dict.fromkeys(n.split('.')[0] for n in names))}")
    for n, p in names.items():
        p.requires_grad_(p.requires_grad and any(named(n, q) for q in pats))
    frozen = [m for m in model.modules() if (list(m.parameters()) or list(m.buffers()))
              and not any(p.requires_grad for p in m.parameters())]
    base_train = model.train

    def train_keeping_frozen_in_eval(mode=True):
        base_train(mode)
        for m in frozen:
            m.eval()
        return model
    model.train = train_keeping_frozen_in_eval
    log(f"--train-only {patterns}: {model.num_params(trainable_only=True):,} of {model.num_params():,} parameters "
        "trainable; the rest frozen, BatchNorm statistics included")


@functools.lru_cache(maxsize=None)
def free_cores():
    """The default of --threads: the cores this process may use, less those busy right now (processes
    running or ready to run, sampled over 0.1 s, this one and torchrun's others excluded), shared by
    torchrun's processes on this machine. An instantaneous count, unlike the load average, which
    still reports a job a minute after it ended."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        runnable = []
        for _ in range(5):
            with open("/proc/loadavg") as f:  # "0.52 0.61 0.70 RUNNABLE/TOTAL LASTPID"
                runnable.append(int(f.read().split()[3].split("/")[0]))
            time.sleep(0.02)
        busy = max(0, min(runnable) - procs)
    except (OSError, ValueError, IndexError):  # no /proc (macOS): the 1-minute load average
        busy = round(os.getloadavg()[0])
    return max(1, (cores - busy) // procs)


def log_settings(args, config, model, splits, world, device):
    """Every setting, by the --help groups; the data; the parameters per part of the model (Table 4)."""
    demo = " (demo defaults: no --data, built-in synthetic faces at reduced resolution)" if args.data is None else ""
    print(f"settings{demo}:")
    print("  model    " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items()))
    for group in build_parser()._action_groups:
        if (name := group.title.split()[0]) in ("data", "recipe", "run"):
            print(f"  {name:<8} " + " ".join(f"{a.dest}={getattr(args, a.dest)}" for a in group._group_actions
                                            if a.dest not in ("eval_only", "stop_after_steps")))
    print(f"  processes {world} on {device} ({args.threads} threads), {args.batch_size // world} images per process "
          "per step")
    print(splits.summary())
    model.print_param_summary()


# -----------------------------------------------------------------------------
# Evaluation of a checkpoint, prediction, parameter counts

def eval_only(args, ckpt):
    """The checkpoint on the test split of --data (default: its own), the data's classes matched to the
    checkpoint's by name; results go beside it or to --out."""
    rank, world, device = setup_distributed(args)
    model = model_from_checkpoint(ckpt, device)
    splits = load_splits(args, model.config, draw_ahead=False)  # only test is read: draw on demand
    classes = list(ckpt.get("classes") or splits.classes)
    index = class_map(classes, splits.classes, ckpt["path"])
    test = evaluate(model, splits.test, len(classes), args, rank, world, args.batch_size // world, device, index)
    if rank == 0:
        path = Path(ckpt["path"])
        on = "synthetic" if args.data is None else Path(args.data).resolve().name
        suffix, out = f"-{path.parent.resolve().name}-{path.stem}-on-{on}", Path(args.out or path.parent)
        print(splits.summary())
        try:
            report_test(f"test set, {path}:", test, classes, out, suffix, path)
            print(f"wrote {out / f'test_metrics{suffix}.json'} and confusion{suffix}.csv")
        except OSError as e:
            print(f"notice: results not saved ({out}: {e.strerror}); pass --out DIR to keep them")
    return {"checkpoint": ckpt["path"], **test_results(test), "n": test["n"]}


@torch.no_grad()
def predict(args, ckpt):
    """Class probabilities of each image (files, folders, globs), preprocessed like the checkpoint's
    training data. An unreadable file is one line and skipped; --predict-out writes a CSV row each."""
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model, classes = model_from_checkpoint(ckpt, device), list(ckpt["classes"])
    files, skipped = data.image_files(args.predict)
    results = {}
    for path in files:
        try:
            image = data.load_image(path, input_size(model.config), normalize=model.config.imagenet_norm)
        except data.DataError as e:
            skipped.append((path, "unreadable", str(e)))
            print(f"skipped: {e}")
            continue
        probs = F.softmax(model(image[None].to(device)).float(), dim=1)[0].cpu().tolist()
        results[path] = dict(zip(classes, probs))
        top = max(range(len(classes)), key=probs.__getitem__)
        print(f"{data.shown(path)}: {classes[top]} ({100 * probs[top]:.1f}%)  "
              + "  ".join(f"{c} {p:.3f}" for c, p in zip(classes, probs)))
    if args.predict_out:
        write_csv(args.predict_out, [["file", "top_class", *classes],
                                     *([p, max(r, key=r.get), *(f"{v:.6f}" for v in r.values())]
                                       for p, r in results.items())])
        print(f"wrote {args.predict_out} ({len(results)} images)")
    print(f"predicted {len(results)} image{'s' * (len(results) != 1)}" + (f"; {data.skipped_line(skipped)}"
                                                                          if skipped else ""))
    if not results:
        raise UsageError(f"--predict: no image could be read among {' '.join(args.predict)}")
    return results


PAPER_PARAMS = {"small": 0.5e6, "medium": 2.8e6, "large": 14.8e6, "hybrid": 15.0e6}  # Tables 1 and 4


def count_params(args):
    """Parameters of each preset at these settings, and of the POSTER presets as POSTER V2 counts them."""
    counts = {}
    print(f"parameters at {args.img_size[0]}x{args.img_size[1]}, 7 classes: model, ours, trainable, paper, config")
    for size, paper in PAPER_PARAMS.items():
        config = model_config(argparse.Namespace(**{**vars(args), "size": size}), len(data.CLASSES))
        model = FaceRWKV(config)
        counts[size] = model.num_params()
        print(f"{size:<8} {counts[size]:>12,} {model.num_params(trainable_only=True):>12,} {paper / 1e6:>5.1f}M  L="
              f"{config.n_layer} d={config.n_embd} patch={config.patch_size} backbone={config.backbone}")
    print("POSTER presets, 7 classes (Table 4 quotes POSTER++ at 43.7 M): model, all, as POSTER V2 counts, config")
    for name in POSTER_PRESETS:
        config = PosterConfig.preset(name, img_size=224 if name != "poster-small" else 112)
        model = PosterRWKV(config)
        counts[name] = (model.num_params(), poster_param_count(model))
        print(f"{name:<13} {counts[name][0]:>12,} {counts[name][1]:>12,}  mixer={config.mixer} depth={config.depth} "
              f"embed={config.embed_dim} img={config.img_size}")
    return counts


# -----------------------------------------------------------------------------
# Pictures, drawn with Pillow: training curves (the paper's Figures 4-7), the confusion matrix, and
# what the classified token draws from each patch, layer by layer (--explain). Colours tell apart
# for colour-blind readers: Okabe and Ito's palette for lines, viridis (its colours as a table) for heat.

PALETTE = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
           (0, 0, 0), (240, 228, 66)]  # Okabe-Ito: blue, vermillion, green, purple, orange, sky blue, black, yellow
VIRIDIS = [(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142), (31, 158, 137),
           (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)]  # viridis at 0, 1/9, ..., 1


def heat(x):
    """viridis at x in [0, 1], linear between the table's colours."""
    x = min(max(float(x), 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    return tuple(round(a + (x - i) * (b - a)) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))


def default_font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        return ImageFont.load_default()


def text(img, xy, s, size=16, anchor="la", turned=False):
    """s at xy, anchored as Pillow's two letters say; turned: a quarter anticlockwise, centred on xy
    (a y axis' label)."""
    font = default_font(size)
    if not turned:
        return ImageDraw.Draw(img).text(xy, s, fill="black", font=font, anchor=anchor)
    label = Image.new("L", (int(font.getlength(s)) + 4, size + 8))
    ImageDraw.Draw(label).text((label.width / 2, label.height / 2), s, fill=255, font=font, anchor="mm")
    label = label.rotate(90, expand=True)
    img.paste((0, 0, 0), (round(xy[0] - label.width / 2), round(xy[1] - label.height / 2)), label)


def wrapped(s, width, size=16):
    """s broken into lines no wider than `width` pixels."""
    font, lines = default_font(size), [""]
    for word in s.split():
        if lines[-1] and font.getlength(f"{lines[-1]} {word}") > width:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}".strip()
    return lines


def nice_ticks(lo, hi, n=6):
    """At most about n round values (steps of 1, 2, 2.5 or 5 x 10^k) from below lo to above hi."""
    span = max(hi - lo, 1e-6)
    base = 10 ** math.floor(math.log10(span / n))
    step = next(base * m for m in (1, 2, 2.5, 5, 10) if span / (base * m) <= n)
    return [round(step * i, 10) for i in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1)]


def colour_bar(img, box, vmax, label):
    """viridis from 0 (bottom of box) to vmax (top), its values beside it and a label."""
    draw, (left, top, right, bottom) = ImageDraw.Draw(img), box
    for y in range(top, bottom + 1):
        draw.line([(left, y), (right, y)], fill=heat((bottom - y) / (bottom - top)))
    draw.rectangle(box, outline="black")
    for v in (v for v in nice_ticks(0, vmax, 5) if v <= vmax * 1.001):
        y = bottom - v / vmax * (bottom - top)
        draw.line([(right, y), (right + 4, y)], fill="black")
        text(img, (right + 8, y), f"{v:g}", 14, "lm")
    text(img, (right + 58, (top + bottom) / 2), label, 14, turned=True)


def heat_cells(img, box, values, vmax, labels, under=None):
    """A grid of cells filling box, each coloured heat(value / vmax) (None: grey), blended half and
    half with the image `under` if given, and labelled where its label fits: white on dark cells
    and on a face (there outlined in black), black on light ones."""
    left, top, right, bottom = box
    w, h = (right - left) / len(values[0]), (bottom - top) / len(values)
    size = 16 if w >= 60 else 13
    layer, font = Image.new("RGB", (right - left, bottom - top)), default_font(size)
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            ImageDraw.Draw(layer).rectangle((c * w, r * h, (c + 1) * w, (r + 1) * h), outline=(255, 255, 255),
                                            fill=(230, 230, 230) if v is None else heat(v / vmax))
    img.paste(layer if under is None else Image.blend(under, layer, 0.5), (left, top))
    for r, row in enumerate(values):
        for c, (v, label) in enumerate(zip(row, labels[r])):
            lines, over = label.split("\n"), under is not None
            if w >= 38 and max(map(font.getlength, lines)) < w - 4 and len(lines) * (size + 3) < h:
                ImageDraw.Draw(img).multiline_text(
                    (left + (c + 0.5) * w, top + (r + 0.5) * h), label, font=font, anchor="mm", align="center",
                    spacing=2, fill="white" if over or (v is not None and v / vmax < 0.6) else "black",
                    stroke_width=2 * over, stroke_fill="black")


def picture_path(path, flag):
    """Where a picture goes: an existing folder and a type named by its extension, or a UsageError."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".pdf"):
        raise UsageError(f"{flag} {path}: write a .png (or .jpg, .pdf), not {path.suffix or 'a name without one'}")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: there is no folder {path.parent}; create it or write elsewhere")
    return path


def save_picture(img, path, flag=None):
    """Written whole or not at all, PNGs quickly compressed (a confusion matrix ends every run); with
    a flag, a folder that refuses it is a UsageError naming the flag."""
    try:
        atomic_write(path, lambda tmp: img.save(tmp, compress_level=1))
    except OSError as e:
        if flag is None:
            raise
        raise UsageError(f"{flag} {path}: {e.strerror or e}") from None


def read_run(run_dir):
    """A run directory -> (its epochs' metrics rows, its legend: name, the data it used, the best
    validation epoch, the test accuracy if test_metrics.json exists; the best row, None without
    validation)."""
    run_dir, metrics = Path(run_dir), Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        raise UsageError(f"{run_dir} has no metrics.jsonl; give run directories written by train.py")
    rows = [r for r in read_metrics(metrics) if isinstance(r.get("epoch"), int) and r.get("train_loss") is not None]
    if not rows:
        raise UsageError(f"{metrics} has no finished epoch yet")
    try:
        info = json.loads((run_dir / "config.json").read_text())["data"]
        where = "synthetic faces" if info["root"] is None else f"{Path(info['root']).name} ({info['format']})"
        counts = "/".join(str(sum(info["counts"][s])) for s in ("train", "val", "test"))
        used = f"{where} {info['img_size'][0]}x{info['img_size'][1]}, {counts} train/val/test images"
    except (OSError, ValueError, KeyError, TypeError):
        used = "data not recorded (no config.json)"
    try:
        test = f"test accuracy {100 * json.loads((run_dir / 'test_metrics.json').read_text())['acc']:.1f}%"
    except (OSError, ValueError, KeyError):
        test = "no test metrics"
    best = max((r for r in rows if r.get("val_acc") is not None), key=lambda r: r["val_acc"], default=None)
    val = f"{100 * best['val_acc']:.1f}% at epoch {best['epoch']}" if best else "- (no validation split)"
    return rows, f"{run_dir.resolve().name}: {used}; best validation accuracy {val}; {test}", best


def dashed(draw, points, fill, width, dash=9, gap=6):
    """A polyline in dashes: the training curves."""
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        length = math.hypot(xb - xa, yb - ya)
        for s in range(0, int(length), dash + gap):
            f, g = s / length, min(s + dash, length) / length
            draw.line([(xa + f * (xb - xa), ya + f * (yb - ya)), (xa + g * (xb - xa), ya + g * (yb - ya))], fill, width)


def plot_panel(img, box, runs, epochs, curve):
    """One panel of --plot in box = (left, top, right, bottom), curve = (training key, validation key,
    scale, title, y axis): grid, ticks and the axes' labels, then each run's training (dashed) and
    validation (solid) curve and its best epoch ringed."""
    draw, (left, top, right, bottom), (train_key, val_key, scale, title, unit) = ImageDraw.Draw(img), box, curve
    values = [scale * r[k] for rows, _, _ in runs for r in rows for k in (train_key, val_key) if r.get(k) is not None]
    margin = max(0.05 * (max(values) - min(values)), 0.01 * scale)
    hi = max(values) + margin
    yticks = nice_ticks(max(min(values) - margin, 0), min(hi, 100) if scale == 100 else hi)
    pad = max(0.5, epochs / 40)  # a one-epoch run sits mid-panel, not on the frame
    (x0, x1), (y0, y1) = (1 - pad, epochs + pad), (yticks[0], yticks[-1])

    def xy(x, y):
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)
    for x in (x for x in nice_ticks(0, epochs, 10) if x >= 1 and x == int(x)):
        draw.line([xy(x, y0), xy(x, y1)], fill=(225, 225, 225))
        text(img, (xy(x, y0)[0], bottom + 8), f"{x:g}", anchor="mt")
    for y in yticks:
        draw.line([xy(x0, y), xy(x1, y)], fill=(225, 225, 225))
        text(img, (left - 8, xy(x0, y)[1]), f"{y:g}", anchor="rm")
    draw.rectangle(box, outline="black", width=2)
    text(img, ((left + right) / 2, top - 22), f"{title}: training (dashed), validation (solid)", 18, "mm")
    text(img, ((left + right) / 2, bottom + 32), "epoch", anchor="mt")
    text(img, (left - 60, (top + bottom) / 2), unit, turned=True)
    for i, (rows, _, best) in enumerate(runs):
        colour = PALETTE[i % len(PALETTE)]
        for key, solid in ((train_key, False), (val_key, True)):
            pts = [xy(r["epoch"], scale * r[key]) for r in rows if r.get(key) is not None]
            if len(pts) > 1:
                draw.line(pts, colour, 3, joint="curve") if solid else dashed(draw, pts, colour, 2)
            for x, y in pts if len(pts) <= 40 else ():  # markers, unless they would crowd
                draw.ellipse((x - 4, y - 4, x + 4, y + 4), colour if solid else "white", colour, 2)
        if best and best.get(val_key) is not None:
            x, y = xy(best["epoch"], scale * best[val_key])
            draw.ellipse((x - 10, y - 10, x + 10, y + 10), outline=colour, width=2)


def plot_runs(run_dirs, out_path):
    """Loss and accuracy per epoch of several runs in one picture, training dashed and validation
    solid, a colour per run, its best-validation epoch ringed; the legend says which data each run
    used and its test accuracy."""
    out_path = picture_path(out_path, "--plot-out")
    runs = [read_run(d) for d in run_dirs]
    width = max(1400, 80 + max(int(default_font(16).getlength(legend)) for _, legend, _ in runs))
    img = Image.new("RGB", (width, 590 + 26 * len(runs)), "white")
    epochs = max(r["epoch"] for rows, _, _ in runs for r in rows)
    for p, curve in enumerate([("train_loss", "val_loss", 1, "loss", "cross-entropy loss (nats)"),
                               ("train_acc", "val_acc", 100, "accuracy", "accuracy (%)")]):
        plot_panel(img, (110 + 690 * p, 50, 670 + 690 * p, 450), runs, epochs, curve)
    draw = ImageDraw.Draw(img)
    draw.ellipse((25, 510, 45, 530), outline="black", width=2)
    text(img, (60, 520), "best validation epoch", anchor="lm")
    for i, (_, legend, _) in enumerate(runs):
        draw.line([(20, 550 + 26 * i), (50, 550 + 26 * i)], PALETTE[i % len(PALETTE)], 5)
        text(img, (60, 550 + 26 * i), legend, anchor="lm")
    save_picture(img, out_path, "--plot-out")
    print(f"wrote {out_path} ({len(runs)} run{'s' * (len(runs) > 1)})")
    return str(out_path)


def draw_confusion(metrics, classes, path, ckpt_path):
    """The confusion matrix as a picture beside its csv: rows the true class, each normalised to
    100 %, every cell's count and percentage; accuracy and mean per-class accuracy in the title."""
    n, counts, ckpt = len(classes), metrics["confusion"], Path(ckpt_path)
    cell = max(56, min(90, 640 // n))
    size = 16 if max(map(default_font(16).getlength, classes)) < cell - 4 else 12
    left, top = 60 + max(int(default_font(size).getlength(c)) for c in classes), 110
    right, bottom = left + n * cell, top + n * cell
    img = Image.new("RGB", (right + 110, bottom + 20), "white")
    shares = [[k / sum(row) if sum(row) else None for k in row] for row in counts]
    heat_cells(img, (left, top, right, bottom), shares, 1.0,
               [[f"{k}\n{100 * s:.1f}%" if s is not None else "-" for k, s in zip(*rs)] for rs in zip(counts, shares)])
    for i, name in enumerate(classes):
        text(img, (left - 8, top + (i + 0.5) * cell), name, size, "rm")
        text(img, (left + (i + 0.5) * cell, top - 6), name, size, "md")
    text(img, ((left + right) / 2, top - 30), "predicted class", anchor="md")
    text(img, (18, (top + bottom) / 2), "true class", turned=True)
    text(img, (img.width / 2, 10), f"{ckpt.parent.name}/{ckpt.name} on {metrics['n']} test images", 18, "mt")
    text(img, (img.width / 2, 36), f"accuracy {100 * metrics['acc']:.1f}%, mean per-class accuracy "
         f"{100 * metrics['mean_class_acc']:.1f}%", 18, "mt")
    colour_bar(img, (right + 16, top, right + 32, bottom), 100, "share of the true class (%)")
    save_picture(img, path)


# what --explain draws, in words: the mixer's weights and the row that is classified
WEIGHTS_IN_WORDS = {
    "rwkv": "RWKV-4's WKV (eq. 14): e^(-(t-1-i)w + k_i) for the patches i before t, e^(u + k_t) for t itself and "
            "0 after t, over their sum",
    "vrwkv": "Vision-RWKV's Bi-WKV: e^(-(|t-i|-1)w/T + k_i) for every patch i but t, e^(u/T + k_t) for t itself, "
             "over their sum",
    "transformer": "attention: the softmax over i of q_t . k_i / sqrt(d/h) in each head",
}
POOLED_IN_WORDS = {"last": "t is the last token, the one the head classifies (pool=last)",
                   "mean": "averaged over every token t, as the head classifies their mean (pool=mean)",
                   "cls": "t is the cls token, the one the head classifies (pool=cls; its share of itself is "
                          "not drawn)"}


def explain_panels(model, layers):
    """pooled_weights' layers (one image) -> rows of panels (label, rows x cols weights) and the
    caption saying what they show: FaceRWKV's layers side by side on its patch grid; POSTER's, a row
    per layer of its three scales, each a g x g grid (the cls token's share of itself left out)."""
    c, maps = model.config, [a[0].cpu().numpy() for _, a in layers]
    T = len(maps[0])
    caption = (f"Each panel: a mixer layer of {type(model).__name__} (mixer {c.mixer}), the weight (%) of patch i's "
               f"token in the mixer's output at token t, {WEIGHTS_IN_WORDS[c.mixer]}; {POOLED_IN_WORDS[c.pool]}; per "
               f"channel, averaged over the channels. A layer's {T} weights sum to 100% (uniform: {100 / T:.1f}% "
               "each). After the first layer a token holds its patch mixed with others: a place, not only its pixels.")
    if not isinstance(model, PosterRWKV):
        return [[(f"layer {i + 1}", a.reshape(c.grid)) for i, a in enumerate(maps)]], caption
    g, skip = c.grids[2], int(c.pool == "cls")
    caption += (f" POSTER's {T - skip} tokens: three scales, from its {', '.join(f'{s}x{s}' for s in c.grids)} "
                f"maps, each on a {g}x{g} grid over the face" + (
                    "; the cls token keeps " + ", ".join(f"{100 * a[0]:.1f}%" for a in maps) + " of itself (layer 1, "
                    "2, ...)." if skip else "."))
    return [[(f"layer {i + 1}, scale {s + 1}", a[skip + s * g * g:skip + (s + 1) * g * g].reshape(g, g))
             for s in range(3)] for i, a in enumerate(maps)], caption


def draw_explain(face, panels, caption, title):
    """Heat maps over the face: rows of panels (label, rows x cols weights), the face as the model
    sees it first, one colour scale for all, the caption under them."""
    pw = 240 if len(panels) + len(panels[0]) <= 5 else 180
    ph = round(pw * face.height / face.width)
    right, bottom = 20 + (1 + max(map(len, panels))) * (pw + 16), 40 + len(panels) * (ph + 34)  # the colour bar's
    lines = wrapped(caption, right + 60, 15)
    img = Image.new("RGB", (right + 100, bottom + 30 + 20 * len(lines)), "white")
    face = face.resize((pw, ph), Image.BICUBIC)
    grey, vmax = face.convert("L").convert("RGB"), max(100 * float(a.max()) for row in panels for _, a in row)
    img.paste(face, (20, 74))
    text(img, (20, 14), title, 18)
    text(img, (20, 54), "input, as the model sees it", 15)
    for r, row in enumerate(panels):
        for c, (label, a) in enumerate(row):
            x, y = 20 + (c + 1) * (pw + 16), 74 + r * (ph + 34)
            text(img, (x, y - 20), label, 15)
            heat_cells(img, (x, y, x + pw, y + ph), 100 * a, vmax, [[f"{100 * v:.1f}" for v in rr] for rr in a], grey)
    colour_bar(img, (right, 74, right + 16, bottom), vmax, "weight (%)")
    for i, line in enumerate(lines):
        text(img, (20, bottom + 20 + 20 * i), line, 15)
    return img


def explain(args, ckpt):
    """--explain: for each image, the weight every patch carries in the token that is classified,
    per mixer layer (facerwkv.pooled_weights, exact), drawn over the face: explain-NAME.png in
    --out (default: beside the checkpoint)."""
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model, classes, where = model_from_checkpoint(ckpt, device), ckpt["classes"], Path(ckpt["path"])
    c = model.config
    if getattr(c, "mixer", "identity") == "identity":
        raise UsageError(f"--explain: {where} has no token mixer (a linear probe or mixer=identity): no patch is "
                         "mixed into another")
    out = Path(args.out or where.parent)
    out.mkdir(parents=True, exist_ok=True)
    files, skipped = data.image_files(args.explain)
    if skipped:
        print(data.skipped_line(skipped))
    written = []
    for path in files:
        image = data.load_image(path, input_size(c), normalize=c.imagenet_norm)[None].to(device)
        logits, layers = pooled_weights(model, image)
        p = logits.float().softmax(1)[0]
        top = int(p.argmax())
        target = out / f"explain-{Path(path).stem}.png"
        if str(target) in written:  # two images of one name
            target = target.with_stem(f"{target.stem}-{len(written)}")
        face = Image.fromarray((data.load_image(path, input_size(c)) * 255).round().byte().permute(1, 2, 0).numpy())
        title = f"{Path(path).name}: {classes[top]} ({100 * p[top]:.0f}%) by {where.parent.name}/{where.name}"
        save_picture(draw_explain(face, *explain_panels(model, layers), title), target, "--out")
        print(f"{path}: {classes[top]} ({100 * p[top]:.1f}%); wrote {target}")
        written.append(str(target))
    return written


# -----------------------------------------------------------------------------
# Benchmark: RWKV against a transformer as the token count grows from the paper's 600 (400x600,
# 20x20 patches): one block of each, and the small model in parallel and RNN mode. Each point runs
# in a fresh process, so its peak memory is its own: on the CPU the peak resident set (VmHWM,
# reset through /proc/self/clear_refs) less the resident set before; on a GPU the peak allocation.

def bench_grid(tokens):
    """(rows, cols) with rows * cols = tokens, as close to the paper's 2:3 as can be."""
    pairs = [(r, tokens // r) for r in range(1, tokens + 1) if tokens % r == 0 and r <= tokens // r]
    return min(pairs, key=lambda rc: abs(rc[1] / rc[0] - 1.5))


def fresh_process(fn, threads, *a):
    """fn(*a) in this fresh process: seeded, on `threads` threads."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    return fn(*a)


def measure(fn, device, repeats):
    """(median milliseconds of fn() over `repeats` calls, a GPU's queued work included; the peak
    memory in MB that its first call adds, as that call allocates everything)."""
    cuda, times = device.type == "cuda", []
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def rss(field):  # bytes, from /proc/self/status
        return next(int(s.split()[1]) * 1024 for s in Path("/proc/self/status").read_text().splitlines()
                    if s.startswith(field + ":"))
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = torch.cuda.memory_allocated() if cuda else rss("VmRSS")
    fn()
    peak = (torch.cuda.max_memory_allocated() if cuda else rss("VmHWM")) - before
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2], peak / 2**20


def bench_point(method, tokens, mode, width, batch, device, repeats):
    """Median milliseconds and peak extra memory (MB) of one call; run in its own process."""
    device, (rows, cols), mixer = torch.device(device), bench_grid(tokens), method.split("-")[0]
    if method.endswith("block"):
        cfg = FaceRWKVConfig(n_layer=1, n_embd=width, img_size=(20, 20), mixer=mixer)
        module = call = {"rwkv": lambda: Block(cfg, 0), "vrwkv": lambda: VRWKVBlock(cfg, 0, grids=[(rows, cols)]),
                         "transformer": lambda: TransformerBlock(width, cfg.n_head, cfg.dim_ffn)}[mixer]().to(device)
        x = torch.randn(batch, tokens, width, device=device)
    else:
        cfg = FaceRWKVConfig.preset("small", n_embd=width, img_size=(20 * rows, 20 * cols),
                                    mixer="transformer" if mixer == "transformer" else "rwkv")
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
    ms, peak_mb = measure(run, device, repeats)
    return dict(method=method, tokens=tokens, mode=mode, ms=ms, peak_mb=peak_mb)


def poster_point(preset, batch, device, repeats):
    """Forward+backward milliseconds of a POSTER preset, and of its token mixer alone on the same tokens."""
    device = torch.device(device)
    model = PosterRWKV(PosterConfig.preset(preset)).to(device).train()
    images = torch.randn(batch, 3, model.config.img_size, model.config.img_size, device=device)
    with torch.no_grad():
        tokens = model.tokens(images)  # (B, 147, E)
    ms = []
    for fn in (lambda: model(images).square().mean().backward(),
               lambda: model.mixer(tokens.clone().requires_grad_()).square().mean().backward()):
        ms.append(measure(fn, device, repeats)[0])  # its first call is the warm-up
        model.zero_grad(set_to_none=True)
    return dict(preset=preset, img_size=model.config.img_size, batch=batch, ms=ms[0], mixer_ms=ms[1],
                mixer_share=ms[1] / ms[0])


def wkv_share(batch):
    """(step ms, WKV ms) of a small-model training step at 600 tokens, from torch.profiler."""
    model = FaceRWKV(FaceRWKVConfig.preset("small"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels, sched = torch.rand(batch, 3, 400, 600), torch.randint(0, 7, (batch,)), make_scheduler(opt, 0, 100)
    step = lambda: train_step(model, images, labels, opt, sched, 1.0, contextlib.nullcontext())  # noqa: E731
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        step_ms = 1e3 * (time.perf_counter() - t0) / 5
    return step_ms, sum(e.cpu_time_total for e in prof.key_averages()
                        if e.key in ("WKVFunction", "WKVFunctionBackward")) / 1e3 / 5


def run_benchmark(args):
    """--benchmark: every method x tokens as CSV; POSTER's mixer share; the WKV op's share of a step."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    threads, repeats, methods, batch = args.threads, args.bench_repeats, args.bench_methods, args.bench_batch

    def fresh(fn, *a):  # a fresh interpreter per point
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(fresh_process, (fn, threads, *a))
    print(f"benchmark on {device} ({threads} threads), width {args.bench_width}, batch {batch or 1}")
    rows = []
    for tokens in args.bench_tokens:
        for method in [m for m in BENCH_METHODS if m in methods]:
            for mode in ("forward",) if method == "rwkv-rnn" else ("forward", "train"):  # RNN mode: inference
                rows.append(fresh(bench_point, method, tokens, mode, args.bench_width, batch or 1, device, repeats))
                print(f"  {method:<18} {tokens:>6} tokens {mode:<8} {rows[-1]['ms']:>10.1f} ms "
                      f"{rows[-1]['peak_mb']:>9.1f} MB", flush=True)
    for r in rows:  # how many times faster / smaller than the transformer at the same tokens and mode
        same = ("transformer-block" if r["method"].endswith("block") else "transformer-model", r["tokens"], r["mode"])
        t = next((t for t in rows if (t["method"], t["tokens"], t["mode"]) == same), None)
        r["time_ratio"] = t["ms"] / r["ms"] if t else float("nan")
        r["memory_ratio"] = t["peak_mb"] / r["peak_mb"] if t and r["peak_mb"] > 0 else float("nan")
    if rows:
        write_csv(args.benchmark, [list(rows[0]), *(r.values() for r in rows)])
        print(f"wrote {args.benchmark}")
    poster_rows = [fresh(poster_point, p, batch or 4, device, repeats) for p in POSTER_PRESETS if p in methods]
    for r in poster_rows:
        print(f"{r['preset']} at {r['img_size']}, forward + backward of {r['batch']}: {r['ms']:.0f} ms, token mixer "
              f"{r['mixer_ms']:.1f} ms ({100 * r['mixer_share']:.1f} %)")
    if device == "cpu" and "wkv-share" in methods:
        step_ms, wkv_ms = fresh(wkv_share, batch or 8)
        print(f"small model, 600 tokens, batch {batch or 8}: train step {step_ms:.0f} ms, of which WKV "
              f"{wkv_ms:.1f} ms = {100 * wkv_ms / step_ms:.1f} %")
    return {"benchmark": rows, "poster": poster_rows}


# -----------------------------------------------------------------------------
# Training, from the top: one run's lifecycle. start_run: run directory, data, model, optimizer (or
# the state a checkpoint resumes). Then the epochs: steps (train_epoch), validation, the metrics row
# and checkpoints (end_epoch). Then the best epoch on test (finish). Ctrl-C and SIGTERM stop it at a
# step's end with last.pt written (StopSignals); a run resumed from there ends as an unstopped one.

@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    splits: data.Splits
    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    steps_per_epoch: int
    log: object
    fingerprint: dict
    step: int = 0
    best_val: float = -1.0
    best_epoch: int = 0
    sums: list = dataclasses.field(default_factory=lambda: [0.0, 0, 0])  # this process's loss, correct, seen
    rows: list = dataclasses.field(default_factory=list)  # metrics.jsonl, one row per epoch

    def summed(self, values):
        """values summed over all processes."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return [t[0].item(), int(t[1].item()), int(t[2].item())]

    def checkpoint(self):
        """What last.pt holds (best.pt: less RESUME_ONLY), with every process's RNG state: a collective."""
        rngs = [rng_states()] if self.world == 1 else [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rngs, rng_states())
        return {"model": self.model.state_dict(), "arch": type(self.model).__name__,
                "config": dataclasses.asdict(self.model.config), "args": vars(self.args),
                "classes": list(self.splits.classes), "data_fingerprint": self.fingerprint,
                "epoch": self.step // self.steps_per_epoch, "step": self.step, "best_val_acc": self.best_val,
                "best_epoch": self.best_epoch, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "train_sums": self.summed(self.sums), "rng": rngs}

    def save(self, best=False):
        """last.pt (and best.pt) written whole, and the metrics rows so far."""
        state = self.checkpoint()
        if self.rank == 0:
            atomic_write(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows).encode())
            if best:
                state_best = {k: v for k, v in state.items() if k not in RESUME_ONLY}
                atomic_write(self.run_dir / "best.pt", lambda tmp: torch.save(state_best, tmp))
            atomic_write(self.run_dir / "last.pt", lambda tmp: torch.save(state, tmp))


def data_fingerprint(splits, root):
    """What --resume checks the data against: the class names, and per split the number of items and
    a digest of their (name below the data root, label) pairs."""
    out = {"classes": list(splits.classes)}
    for s in data.SPLITS:
        ds = getattr(splits, s)
        items = "\n".join(f"{ds.source.name(i).removeprefix(str(root or ''))}\t{ds.source.labels[i]}"
                          for i in ds.indices)
        out[s] = [len(ds), hashlib.sha256(items.encode(errors="surrogateescape")).hexdigest()[:16]]
    return out


def check_same_data(saved, now, run_dir):
    changes = [f"classes {now['classes']} (the run's: {saved['classes']})"] if saved["classes"] != now["classes"] else []
    changes += [f"{s}: {now[s][0]} images (the run's: {saved[s][0]})" if now[s][0] != saved[s][0] else
                f"{s}: other images than the run's" for s in data.SPLITS if now[s] != saved[s]]
    if changes:
        raise UsageError(f"--resume {run_dir}: the data is not what this run trained on ({'; '.join(changes)}); "
                         f"resume it on that data, or start a new run from it with --init-from {run_dir}/last.pt")


def start_run(args, resume, rank, world, device, run_dir, log):
    """The data, the model and its optimizer, or the state the checkpoint `resume` continues."""
    config = model_config(args, len(data.CLASSES))
    splits = load_splits(args, config)
    fingerprint = data_fingerprint(splits, args.data)
    if resume and resume.get("data_fingerprint"):
        check_same_data(resume["data_fingerprint"], fingerprint, run_dir)
    config = dataclasses.replace(config, n_classes=len(splits.classes))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = build_model(config, args, log, fresh=resume is None)
    if resume:
        load_weights(model, resume)
    elif args.init_from:
        init_from(model, args.init_from, args, splits.classes, log)
    if args.train_only:
        train_only(model, args.train_only, log)
    model.to(device)
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    optimizer, scheduler, steps_per_epoch = make_optimizer([p for p in model.parameters() if p.requires_grad],
                                                           args, len(splits.train))
    run = Run(args, rank, world, device, run_dir, splits, model, ddp_model, optimizer, scheduler, steps_per_epoch,
              log, fingerprint)
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        run.step, run.best_val, run.best_epoch = resume["step"], resume["best_val_acc"], resume["best_epoch"]
        run.sums = list(resume["train_sums"]) if rank == 0 else run.sums  # the sums over all processes: one holds them
        set_rng_states(resume["rng"][rank] if len(resume["rng"]) == world else resume["rng"][0])
        metrics = run_dir / "metrics.jsonl"  # the rows of the epochs the checkpoint completed
        run.rows = read_metrics(metrics)[:run.step // steps_per_epoch] if metrics.exists() else []
    if rank == 0:
        write_json(run_dir / "config.json", {"model": dataclasses.asdict(config), "args": vars(args),
                                             "data": splits.info, "world_size": world})
        log_settings(args, config, model, splits, world, device)
    total = args.epochs * steps_per_epoch
    log(f"{steps_per_epoch} steps per epoch, {total} in all" + (f"; resuming at step {run.step}" if run.step else ""))
    log(f"run directory: {run_dir}")
    return run


def train_epoch(run, epoch, progress, stop):
    """One epoch's steps (from where a resumed run left off). A non-finite loss stops the run; a
    stop signal stops it after the step, last.pt written (Stopped)."""
    args, spe = run.args, run.steps_per_epoch
    run.ddp_model.train()
    sam_rho = args.sam_rho if args.optimizer == "sam" else 0.0
    for images, labels in epoch_batches(run.splits.train, epoch, run.step % spe, args, run.rank, run.world,
                                        args.batch_size // run.world, run.device):
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        lr = run.optimizer.param_groups[0]["lr"]
        loss, correct = train_step(run.ddp_model, images, labels, run.optimizer, run.scheduler, args.clip,
                                   autocast(args, run.device), sam_rho)
        run.step += 1
        flags = torch.stack([loss.detach().float().cpu(), torch.tensor(float(stop.signum or 0))])
        if run.world > 1:  # every process sees the mean loss and any stop signal: all stop together
            flags = flags.to(run.device)
            dist.all_reduce(flags[:1], op=dist.ReduceOp.AVG)
            dist.all_reduce(flags[1:], op=dist.ReduceOp.MAX)
        loss, signum = flags[0].item(), int(flags[1].item())
        if not math.isfinite(loss):
            raise UsageError(f"the loss is {loss} at step {run.step} (epoch {epoch + 1}): stopped; "
                             f"{run.run_dir / 'last.pt'} is untouched. Lower --lr or check the data")
        run.sums = [run.sums[0] + loss * len(labels), run.sums[1] + int(correct), run.sums[2] + len(labels)]
        if args.stop_after_steps and run.step >= args.stop_after_steps:
            return False  # tests: as if killed here, nothing saved
        progress.update(run.step, epoch + 1, args.epochs, loss, lr, len(labels) * run.world, run.step % spe == 0)
        if run.step % spe and ((args.save_every_steps and run.step % args.save_every_steps == 0) or signum):
            run.save()
            stop.saved = run.run_dir / "last.pt"
        if signum and run.step % spe:
            raise Stopped(signum, stop.message(signum, f"at step {run.step} (epoch {epoch + 1})"))
    Progress.end_line()
    return True


def end_epoch(run, epoch, t_epoch, stop):
    """Validation, the metrics row, last.pt and (when validation improved) best.pt."""
    args, classes = run.args, run.splits.classes
    train_loss, train_correct, seen = run.summed(run.sums)
    val = evaluate(run.model, run.splits.val, len(classes), args, run.rank, run.world, args.batch_size // run.world,
                   run.device) if len(run.splits.val) else None
    improved = val is None or val["acc"] > run.best_val
    if improved:
        run.best_val, run.best_epoch = (val["acc"] if val else run.best_val), epoch + 1
    row = {"epoch": epoch + 1, "step": run.step, "train_loss": train_loss / seen, "train_acc": train_correct / seen,
           "val_loss": val and val["loss"], "val_acc": val and val["acc"],
           "val_mean_class_acc": val and val["mean_class_acc"], "lr": run.optimizer.param_groups[0]["lr"],
           "epoch_time_s": round(time.time() - t_epoch, 2)}
    run.sums = [0.0, 0, 0]
    val_text = (f"val loss {row['val_loss']:.4f} val acc {100 * row['val_acc']:.2f}% "
                f"(mean per-class {100 * row['val_mean_class_acc']:.2f}%)") if val else "no val split"
    run.log(f"epoch {epoch + 1}/{args.epochs} done: train loss {row['train_loss']:.4f} train acc "
            f"{100 * row['train_acc']:.2f}% {val_text}{' (best)' if improved and val else ''} "
            f"[{row['epoch_time_s']:.1f}s]")
    run.rows.append(row)
    run.save(best=improved)
    stop.saved = run.run_dir / "last.pt"
    if stop.signum and epoch + 1 < args.epochs:
        raise Stopped(stop.signum, stop.message(stop.signum, f"after epoch {epoch + 1}"))


def finish(run, t_start, t_train):
    """The best-validation model on test: rank 0 reads best.pt and hands the weights to the others."""
    args, classes, model = run.args, run.splits.classes, run.model
    if run.rank == 0:
        load_weights(model, load_checkpoint(run.run_dir / "best.pt"))
    if run.world > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    test = evaluate(model, run.splits.test, len(classes), args, run.rank, run.world, args.batch_size // run.world,
                    run.device)
    wall = time.time() - t_start
    summary = {"run_dir": str(run.run_dir), "params": model.num_params(),
               "trainable_params": model.num_params(trainable_only=True),
               "best_val_acc": run.best_val if run.best_val >= 0 else None, "best_epoch": run.best_epoch,
               **test_results(test), "epochs": args.epochs, "steps": run.step, "world_size": run.world,
               "wall_time_s": round(wall, 2), "train_time_s": round(time.time() - t_train, 2)}
    if run.rank == 0:
        report_test(f"\ntest set, best-validation checkpoint (epoch {run.best_epoch}):", test, classes, run.run_dir,
                    "", run.run_dir / "best.pt")
        write_json(run.run_dir / "summary.json", summary)
        best = "-" if summary["best_val_acc"] is None else f"{100 * run.best_val:.2f}%"
        run.log(f"\nsummary: {summary['params']:,} parameters | best val acc {best} (epoch {run.best_epoch}) | "
                f"test acc {100 * test['acc']:.2f}% (mean per-class {100 * test['mean_class_acc']:.2f}%) | "
                f"wall time {format_seconds(wall)} | {run.run_dir}")
    return summary


def train(args, resume=None):
    """Train from scratch (or on from the checkpoint `resume`), validating every epoch; test the
    best epoch. Returns the run's summary."""
    t_start = time.time()  # the run's wall time includes reading (or drawing) the data
    rank, world, device = setup_distributed(args)
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.amp == "bf16" and device.type != "cuda":
        raise UsageError("--amp bf16 needs a CUDA device (on CPU train in fp32: --amp none)")
    model_config(args, len(data.CLASSES))  # the model's settings checked before a possibly long data scan
    stem = args.experiment or ("demo" if args.data is None else args.size)
    box = [Path(resume["path"]).parent if resume else  # a new run is named by rank 0's clock, for all
           Path(args.out or "runs") / (args.name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    run_dir = box[0]
    args.out, args.name = str(run_dir.parent), run_dir.name
    with claim_run_dir(run_dir, resume is not None, rank, world):
        run, t_train = start_run(args, resume, rank, world, device, run_dir, log), time.time()
        progress = Progress(args.log_every, rank == 0, run.step, args.epochs * run.steps_per_epoch)
        with StopSignals(run_dir) as stop:
            for epoch in range(run.step // run.steps_per_epoch, args.epochs):
                t_epoch = time.time()
                if not train_epoch(run, epoch, progress, stop):
                    Progress.end_line()
                    log(f"stopping after step {run.step} (--stop-after-steps: as if killed, nothing saved)")
                    return {"stopped_at_step": run.step, "run_dir": str(run_dir)}
                t_end = time.time()
                end_epoch(run, epoch, t_epoch, stop)
                progress.epoch_ended(time.time() - t_end)
        return finish(run, t_start, t_train)


# -----------------------------------------------------------------------------
# The entry point and its one error boundary: a user's error is one line and exit status 2; a bug
# keeps its traceback.

USER_ERRNOS = {errno.ENOSPC: "free some space (files are written whole: the previous ones are intact)",
               errno.EDQUOT: "free some space (files are written whole: the previous ones are intact)",
               errno.EACCES: "check its permissions, or write elsewhere (--out)", errno.EPERM: "check its permissions",
               errno.EROFS: "a read-only file system: write elsewhere (--out)",
               errno.ENAMETOOLONG: "shorten the path (--out, --name)", errno.ENOENT: "check the path",
               errno.ENOTDIR: "check the path", errno.EISDIR: "give a file, not a folder"}


def one_line(e):
    """A known error as one line: a DataLoader worker's report unwrapped to the error it caught; an
    OSError with its path and what to do."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:  # raised in a DataLoader worker
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename and str(e.filename) not in str(e.strerror) else ""
        text = f"{where}{e.strerror or text}; {USER_ERRNOS[e.errno]}"
    return data.shown(text)


def run_command(args, ckpt):
    args.threads = args.threads or free_cores()
    args.workers = min(4, max(0, free_cores() - 2)) if args.workers is None else args.workers
    torch.set_num_threads(args.threads)
    if args.count_params:
        return count_params(args)
    if args.benchmark:
        return run_benchmark(args)
    if args.plot:
        return {"plot": plot_runs(args.plot, args.plot_out)}
    if args.explain:
        return {"explain": explain(args, ckpt)}
    if args.predict:
        return {"predictions": predict(args, ckpt)}
    result = eval_only(args, ckpt) if args.eval_only else train(args, resume=ckpt)
    if dist.is_initialized():
        dist.barrier()  # every rank finishes its work before any tears the group down
    return result


def main(argv=None):
    """Entry point; returns a summary dict. A user's error prints one line and exits with status 2;
    Ctrl-C or SIGTERM, one line saying how to continue, and 130 / 143."""
    try:
        return run_command(*parse_args(argv))
    except Stopped as e:
        Progress.end_line()
        print(f"train.py: {e}", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:
        Progress.end_line()
        print("train.py: stopped by Ctrl-C", file=sys.stderr)
        raise SystemExit(130) from None
    except (UsageError, data.DataError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in USER_ERRNOS:
            raise
        Progress.end_line()
        print(f"train.py: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            # DDP's reducer holds the process group in reference cycles: collect it now, or gloo's threads
            # are torn down at exit while still joinable ("terminate called without an active exception")
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
