"""
FaceRWKV: RWKV-4 for facial expression recognition, in one readable file.

The mixer is the RWKV-4 block of Peng et al. 2023 ("RWKV: Reinventing RNNs for the Transformer
Era", below "RWKV-4 paper"), written to match the reference RWKV-LM v4 model (BlinkDL/RWKV-LM,
RWKV-v4neo/src/model.py): same equations, same parameter names and shapes
(`blocks.{i}.att.time_decay`, ...), same "fancy" init of the time parameters. Around it sits the
ViT-style sequencing of the FaceRWKV paper (Vierling et al., COMP4771, section 4.2): cut the image
(or the 64-channel map of a ResNet50 stem, "hybrid") into P x P patches, project each to d
channels, run the sequence through the blocks, pool (last token or mean) and classify with an MLP
or linear head.

Every RWKV-4 model here can also run as an RNN (`FaceRWKV.forward_rnn`): one patch at a time with
a fixed-size state per layer, giving the same logits as the parallel `forward`. The Vision-RWKV
mixer (Duan et al. 2024: Bi-WKV and Q-Shift, parameter names as its code) is the bidirectional
alternative: every patch sees the whole image, so it has no RNN mode.

The project's stated objective, POSTER V2 with RWKV in place of its transformer (`PosterRWKV`),
follows FaceRWKV in a part of its own, beside POSTER V2 itself on the same code.

Read top to bottom: the WKV operators (RWKV-4's WKV and Vision-RWKV's Bi-WKV, as maths in
torch), the config, the RWKV-4 block (time-mix, channel-mix), the Vision-RWKV block, the
comparison mixers (transformer, identity), sequencing (patches, ResNet50 stem), the full model;
then POSTER V2 / POSTER-RWKV; and last how wkv.cu runs on a GPU (cupy) or a CPU (g++).
"""

import ctypes
import functools
import hashlib
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# The WKV operator: RWKV-4 paper, "WKV Operator" -- the heart of the time-mix.
#
#   y_t = ( sum_{i<t} e^{-(t-1-i) w + k_i} v_i  +  e^{u + k_t} v_t )
#       / ( sum_{i<t} e^{-(t-1-i) w + k_i}      +  e^{u + k_t}     )      per channel
#
# w > 0 is the decay rate (the module stores time_decay = log w), u = time_first is the bonus
# the current token gets. Below in torch, as the paper's RNN form ("RNN-like inference"); the
# same algorithm runs as raw CUDA in wkv.cu, on a GPU or compiled for the CPU (see "Running
# wkv.cu", the last section).


def wkv_state_update(w, k, v, state):
    """The WKV state after one more token: every past token decays by e^{-w} (the real decay),
    the new one (k, v: (B, C)) joins without bonus. The numerator and denominator sums over past
    tokens are kept as a = aa*e^pp and b = bb*e^pp, where pp is the largest exponent seen so far,
    so no exp() ever overflows (the "max trick"). The empty state is (0, 0, -1e38)."""
    aa, bb, pp = state
    ww = pp - w
    p = torch.maximum(ww, k)
    e1, e2 = torch.exp(ww - p), torch.exp(k - p)
    return e1 * aa + e2 * v, e1 * bb + e2, p


def wkv_step(w, u, k, v, state):
    """One token of the WKV recurrence (the RNN mode of RWKV-4): k, v (B, C) and the state
    (aa, bb, pp) -> (y (B, C), new state)."""
    aa, bb, pp = state
    # output: the decayed past plus the current token with its bonus e^u
    ww = u + k
    p = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    return y, wkv_state_update(w, k, v, state)


def wkv_torch(w, u, k, v):
    """The WKV operator in plain torch, wkv_step over t; autograd provides the backward pass.
    w, u: (C,), k, v: (B, T, C)."""
    B, T, C = k.shape
    zeros = torch.zeros(B, C, dtype=k.dtype, device=k.device)
    state = (zeros, zeros, torch.full_like(zeros, -1e38))
    ys = []
    for t in range(T):
        y, state = wkv_step(w, u, k[:, t], v[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1)  # (B, T, C)


def wkv(w, u, k, v, backend=None):
    """The WKV operator: w, u (C,), k, v (B, T, C) -> y (B, T, C), differentiable in all four.

    Computed in float32 whatever the input dtype (y comes back in k's dtype). backend:
      None      wkv.cu (cupy on CUDA tensors, the g++ build on CPU ones); where it cannot run,
                plain torch (wkv_torch) with a warning saying why;
      "kernel"  wkv.cu, or a RuntimeError saying why it cannot run;
      "torch"   wkv_torch.
    The environment variable FACERWKV_WKV=kernel|torch sets the default.
    """
    return _run_operator("wkv", WKVFunction, wkv_torch, w, u, k, v, backend)


# -----------------------------------------------------------------------------
# Bi-WKV: Vision-RWKV's bidirectional WKV (../shared/vision-rwkv.md), the heart of its spatial mix.
#
#   y_t = ( sum_{i != t} e^{-(|t-i|-1) w + k_i} v_i  +  e^{u + k_t} v_t )
#       / ( sum_{i != t} e^{-(|t-i|-1) w + k_i}      +  e^{u + k_t}     )      per channel
#
# Every token sees every other, weighted by distance both ways. The past part (i < t) is WKV's
# sum, the future part (i > t) the same sum on the reversed sequence: two scans. w and u are
# any real numbers, used as given: w < 0 (Vision-RWKV's "flexible decay") makes far tokens
# weigh MORE.


def biwkv_torch(w, u, k, v):
    """Bi-WKV in plain torch: the WKV state scanned from the left (each token's past) and from the
    right (its future), combined with the current token; autograd provides the backward pass.
    w, u: (C,), k, v: (B, T, C). (With w < 0 the state's exponent pp grows like |w| T, and in
    float32 loses digits over long sequences; wkv.cu never forms it as one float.)"""
    B, T, C = k.shape

    def exclusive_scan(order):
        """The state just before each token, visiting the tokens in `order`: (a, b, p), (B, T, C) each."""
        zeros = torch.zeros(B, C, dtype=k.dtype, device=k.device)
        state, states = (zeros, zeros, torch.full_like(zeros, -1e38)), [None] * T
        for t in order:
            states[t] = state
            state = wkv_state_update(w, k[:, t], v[:, t], state)
        return (torch.stack(s, dim=1) for s in zip(*states))

    a, b, p = exclusive_scan(range(T))              # past: the sums over i < t
    c, d, q = exclusive_scan(range(T - 1, -1, -1))  # future: the sums over i > t
    cur = u + k                                     # the current token's exponent
    m = torch.maximum(torch.maximum(p, q), cur)     # rescale all three to the largest
    e_past, e_future, e_cur = torch.exp(p - m), torch.exp(q - m), torch.exp(cur - m)
    return (e_past * a + e_future * c + e_cur * v) / (e_past * b + e_future * d + e_cur)  # (B, T, C)


def biwkv(w, u, k, v, backend=None):
    """Bi-WKV: w, u (C,), k, v (B, T, C) -> y (B, T, C), differentiable in all four; w and u are
    used as given (any real values). Conventions and backends as wkv()'s: wkv.cu's
    biwkv_forward / biwkv_backward, or biwkv_torch."""
    return _run_operator("biwkv", BiWKVFunction, biwkv_torch, w, u, k, v, backend)


# -----------------------------------------------------------------------------
# Configuration

OPTIONS = {
    "backbone": ("none", "resnet50"),
    "pool": ("last", "mean"),
    "head": ("mlp", "linear"),
    "mixer": ("rwkv", "vrwkv", "transformer", "identity"),
}

# Table 1 of the paper (n_layer, n_embd); "hybrid" is large on the ResNet50 stem with 5x5 patches.
PRESETS = {
    "small": dict(n_layer=2, n_embd=128),
    "medium": dict(n_layer=4, n_embd=256),
    "large": dict(n_layer=6, n_embd=512),
    "hybrid": dict(n_layer=6, n_embd=512, backbone="resnet50", patch_size=5),
}


def stem_grid(h, w):
    """Spatial size of the ResNet50 stem's output: conv 7x7/2 pad 3, then maxpool 3x3/2 pad 1."""
    def out(n, kernel, stride, pad):
        return (n + 2 * pad - kernel) // stride + 1
    return out(out(h, 7, 2, 3), 3, 2, 1), out(out(w, 7, 2, 3), 3, 2, 1)


@dataclass
class FaceRWKVConfig:
    n_layer: int = 2
    n_embd: int = 128             # d, the width of the residual stream
    dim_att: int = None           # RWKV time-mix width (key/value/receptance); None -> n_embd
    dim_ffn: int = None           # channel-mix / MLP hidden width; None -> 4 * n_embd
    n_head: int = None            # heads of the transformer mixer only; None -> max(1, n_embd // 64)
    patch_size: int = 20          # P: P x P pixel patches (or P x P cells of the stem map for hybrid)
    img_size: tuple = (400, 600)  # (H, W) the images are resized to
    n_classes: int = 7
    backbone: str = "none"        # "none" | "resnet50" (its stem: conv1, bn1, relu, maxpool)
    freeze_backbone: bool = False
    imagenet_norm: bool = True    # (x - mean) / std per colour, done by the data pipeline; on by default (README)
    pos_emb: bool = False         # learned positional embedding added to the patch tokens
    pool: str = "last"            # "last" token (the paper) | "mean" over tokens; "last" for vrwkv too, by
                                  # measurement (demo scale, 2 seeds: 90.1 % against 88.6 %; see README)
    head: str = "mlp"             # "mlp" (Linear d->d, ReLU, Linear d->classes) | "linear"
    mixer: str = "rwkv"           # "rwkv" | "vrwkv" (Vision-RWKV) | "transformer" | "identity" ("w/o RWKV")

    def __post_init__(self):
        # None defaults are resolved here, so a saved config always spells out its widths.
        if self.dim_att is None:
            self.dim_att = self.n_embd
        if self.dim_ffn is None:
            self.dim_ffn = 4 * self.n_embd
        if self.n_head is None:
            self.n_head = max(1, self.n_embd // 64)
        if not (isinstance(self.img_size, (tuple, list)) and len(self.img_size) == 2
                and all(isinstance(s, int) and s > 0 for s in self.img_size)):
            raise ValueError(f"img_size must be (height, width) in pixels, e.g. (400, 600); got {self.img_size!r}")
        self.img_size = tuple(self.img_size)  # a list after a JSON round trip
        for name in ("n_layer", "n_embd", "dim_att", "dim_ffn", "n_head", "patch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not (isinstance(self.n_classes, int) and self.n_classes >= 2):
            raise ValueError(f"n_classes must be an integer >= 2; got {self.n_classes!r}")
        for name, allowed in OPTIONS.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not an option; use one of {allowed}")
        if self.freeze_backbone and self.backbone == "none":
            raise ValueError("freeze_backbone=True needs a backbone; set backbone='resnet50' or freeze_backbone=False")
        if self.mixer == "transformer" and self.n_embd % self.n_head:
            divisors = [h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0]
            raise ValueError(f"the transformer mixer needs n_embd ({self.n_embd}) divisible by n_head "
                             f"({self.n_head}); use n_head in {divisors}")
        self._check_grid()

    def _check_grid(self):
        H, W, P = *self.img_size, self.patch_size
        if self.backbone == "none":
            if H % P or W % P:
                fits = [p for p in range(1, min(H, W) + 1) if H % p == 0 and W % p == 0]
                raise ValueError(
                    f"img_size {self.img_size} is not divisible into {P}x{P} patches; use an img_size that is "
                    f"a multiple of {P}, e.g. {(max(P, round(H / P) * P), max(P, round(W / P) * P))}, "
                    f"or a patch_size dividing both sides: {fits}")
        else:
            h, w = stem_grid(H, W)
            if h % P or w % P:
                # the stem divides by 4 (rounding up), so multiples of 4P always work
                m = 4 * P
                raise ValueError(
                    f"the ResNet50 stem maps img_size {self.img_size} to a {h}x{w} grid, not divisible into "
                    f"{P}x{P} patches; use an img_size that is a multiple of {m}, e.g. "
                    f"{(max(m, round(H / m) * m), max(m, round(W / m) * m))}, or a patch_size dividing "
                    f"{h} and {w}: {[p for p in range(1, min(h, w) + 1) if h % p == 0 and w % p == 0]}")

    @property
    def grid(self):
        """(rows, cols) of patches; tokens run through it in raster (row-major) order."""
        h, w = self.img_size if self.backbone == "none" else stem_grid(*self.img_size)
        return h // self.patch_size, w // self.patch_size

    @property
    def n_tokens(self):
        rows, cols = self.grid
        return rows * cols

    @classmethod
    def preset(cls, name, **overrides):
        """A Table 1 model ("small", "medium", "large") or "hybrid", with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; use one of {tuple(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# RWKV-4 block: time-mix (the attention-like part) and channel-mix (the MLP-like part)

def token_shift(x):
    """RWKV-4 paper, "Token Shift": x_{t-1} for every t, zero for t = 0: (B, T, C) -> (B, T, C)."""
    return F.pad(x, (0, 0, 1, -1))


def lerp(x, x_prev, mix):
    """mix * x + (1 - mix) * x_prev per channel, the paper's mu x_t + (1 - mu) x_{t-1}: mix=1 keeps
    the current token, mix=0 takes the previous one. (One fused op: on the CPU the time-mix is
    bound by such elementwise passes.)"""
    return torch.lerp(x_prev, x, mix)


def init_linear_(linear, zero=False):
    """The reference init of a Linear: orthogonal, gain sqrt(out/in) when it widens, or zeros."""
    if zero:
        nn.init.zeros_(linear.weight)
    else:
        out_features, in_features = linear.weight.shape
        nn.init.orthogonal_(linear.weight, gain=math.sqrt(max(1.0, out_features / in_features)))


# Which Linear layers start at zero: the reference's five, so every block starts as the identity
# (att.output = ffn.value = 0), with equal keys and half-open gates. Kept: it trained as well as
# the alternatives we tried.
ZERO_INIT = ("att.key", "att.receptance", "att.output", "ffn.value", "ffn.receptance")


def fancy_init(config, layer_id):
    """The reference's "fancy" init of a layer's per-channel parameters (reference.md), as
    tensors: decay and first (dim_att,), and the mixes (1, 1, d) of the time-mix k, v, r and the
    channel-mix k, r. Deeper layers get slower decays and mix in less of the previous token."""
    d, dim_att, L = config.n_embd, config.dim_att, config.n_layer
    ratio_0_to_1 = layer_id / (L - 1) if L > 1 else 0.0  # 0 in the first layer, 1 in the last
    ratio_1_to_almost0 = 1.0 - layer_id / L              # 1 in the first layer, 1/L in the last
    channel = torch.arange(dim_att, dtype=torch.float32)
    channel_frac = (torch.arange(d, dtype=torch.float32) / d).view(1, 1, d)  # i / d, 0 to almost 1
    return dict(
        # channels range from e^-5 (as RWKV-4's log decay rate: factor 0.993 per step, long memory)
        # to e^3 (factor e^-20: forgets at once)
        decay=-5 + 8 * (channel / max(dim_att - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1),
        first=math.log(0.3) + 0.5 * ((channel + 1) % 3 - 1),  # a zigzag around ln(0.3)
        att_mix_k=channel_frac ** ratio_1_to_almost0,
        att_mix_v=channel_frac ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1,
        att_mix_r=channel_frac ** (0.5 * ratio_1_to_almost0),
        ffn_mix_k=channel_frac ** ratio_1_to_almost0,
        ffn_mix_r=channel_frac ** ratio_1_to_almost0,
    )


class TimeMix(nn.Module):
    """RWKV-4 time-mix: a linear attention over past tokens with a learned per-channel decay."""

    def __init__(self, config, layer_id):
        super().__init__()
        d, dim_att = config.n_embd, config.dim_att
        init = fancy_init(config, layer_id)
        # time_decay is the LOG of the decay rate w: the real per-step decay is e^{-w} = e^{-e^time_decay}
        self.time_decay = nn.Parameter(init["decay"])
        self.time_first = nn.Parameter(init["first"])  # u, the current token's bonus
        # time_mix_*: how much of the current vs the previous token feeds k, v, r (per channel)
        self.time_mix_k = nn.Parameter(init["att_mix_k"])
        self.time_mix_v = nn.Parameter(init["att_mix_v"])
        self.time_mix_r = nn.Parameter(init["att_mix_r"])
        self.key = nn.Linear(d, dim_att, bias=False)
        self.value = nn.Linear(d, dim_att, bias=False)
        self.receptance = nn.Linear(d, dim_att, bias=False)
        self.output = nn.Linear(dim_att, d, bias=False)
        for name in ("key", "value", "receptance", "output"):
            init_linear_(getattr(self, name), zero=f"att.{name}" in ZERO_INIT)

    def project(self, x, x_prev, mix_k, mix_v, mix_r):
        """RWKV-4 paper, "Token Shift": k_t, v_t, r_t, each a Linear of x_t lerped towards x_prev."""
        k = self.key(lerp(x, x_prev, mix_k))
        v = self.value(lerp(x, x_prev, mix_v))
        r = self.receptance(lerp(x, x_prev, mix_r))
        return k, v, r

    def forward(self, x):
        x_prev = token_shift(x)                                                               # (B, T, d)
        k, v, r = self.project(x, x_prev, self.time_mix_k, self.time_mix_v, self.time_mix_r)  # (B, T, dim_att)
        # WKV_t: average of v_i over i <= t weighted by e^{k_i} and decayed by e^{-w} per step back
        y = wkv(torch.exp(self.time_decay), self.time_first, k, v)                            # (B, T, dim_att)
        # RWKV-4 paper, "Output Gating": o_t = W_o (sigmoid(r_t) * wkv_t), sigmoid(r) lets each channel through
        return self.output(torch.sigmoid(r) * y)                                              # (B, T, d)

    def init_state(self, batch_size, device, dtype):
        """RNN state: previous x, and the WKV sums aa (numerator), bb (denominator), pp (their scale)."""
        state_dtype = torch.promote_types(dtype, torch.float32)  # keep the running sums in >= float32
        x_prev = torch.zeros(batch_size, self.key.in_features, device=device, dtype=dtype)
        aa = torch.zeros(batch_size, self.key.out_features, device=device, dtype=state_dtype)
        bb = torch.zeros_like(aa)
        pp = torch.full_like(aa, -1e38)  # log-scale of aa, bb; "minus infinity" = nothing seen yet
        return x_prev, aa, bb, pp

    def step(self, x, state):
        """One token as an RNN. x: (B, d), state from init_state/step. Returns (out (B, d), new state)."""
        x_prev, aa, bb, pp = state
        mixes = (m.view(-1) for m in (self.time_mix_k, self.time_mix_v, self.time_mix_r))  # (d,) each
        k, v, r = self.project(x, x_prev, *mixes)  # (B, dim_att)
        k, v = k.to(aa.dtype), v.to(aa.dtype)
        w, u = torch.exp(self.time_decay).to(aa.dtype), self.time_first.to(aa.dtype)
        y, (aa, bb, pp) = wkv_step(w, u, k, v, (aa, bb, pp))  # (B, dim_att)
        out = self.output(torch.sigmoid(r) * y.to(r.dtype))   # (B, d)
        return out, (x, aa, bb, pp)


class ChannelMix(nn.Module):
    """RWKV-4 channel-mix: a squared-ReLU MLP on the token-shifted input, gated by sigmoid(r)."""

    def __init__(self, config, layer_id):
        super().__init__()
        d = config.n_embd
        init = fancy_init(config, layer_id)
        self.time_mix_k = nn.Parameter(init["ffn_mix_k"])
        self.time_mix_r = nn.Parameter(init["ffn_mix_r"])
        self.key = nn.Linear(d, config.dim_ffn, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(config.dim_ffn, d, bias=False)
        for name in ("key", "receptance", "value"):
            init_linear_(getattr(self, name), zero=f"ffn.{name}" in ZERO_INIT)

    def mix(self, x, x_prev, mix_k, mix_r):
        """RWKV-4 paper, "Token Shift" (k'_t, r'_t) and "Output Gating":
        o'_t = sigmoid(r'_t) * W'_v max(k'_t, 0)^2. x, x_prev: (B, T, d) or, in RNN mode, (B, d)."""
        k = torch.relu(self.key(lerp(x, x_prev, mix_k))).square()  # (..., dim_ffn)
        r = self.receptance(lerp(x, x_prev, mix_r))                 # (..., d)
        return torch.sigmoid(r) * self.value(k)

    def forward(self, x):
        return self.mix(x, token_shift(x), self.time_mix_k, self.time_mix_r)  # (B, T, d)

    def step(self, x, x_prev):
        """One token: x, x_prev (B, d) -> (out (B, d), x as the next token's x_prev)."""
        return self.mix(x, x_prev, self.time_mix_k.view(-1), self.time_mix_r.view(-1)), x


class Block(nn.Module):
    """Pre-LN residual RWKV-4 block: x += TimeMix(LN1(x)); x += ChannelMix(LN2(x))."""

    def __init__(self, config, layer_id):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.att = TimeMix(config, layer_id)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.ffn = ChannelMix(config, layer_id)

    def forward(self, x):
        x = x + self.att(self.ln1(x))
        x = x + self.ffn(self.ln2(x))
        return x  # (B, T, d)

    def init_state(self, batch_size, device, dtype):
        """Per-layer RNN state: (att prev x, aa, bb, pp, ffn prev x); its size does not depend on T."""
        ffn_x = torch.zeros(batch_size, self.ln2.normalized_shape[0], device=device, dtype=dtype)
        return (*self.att.init_state(batch_size, device, dtype), ffn_x)

    def step(self, x, state):
        """One token x (B, d) -> (x (B, d), new state)."""
        *att_state, ffn_x = state
        out, att_state = self.att.step(self.ln1(x), att_state)
        x = x + out
        out, ffn_x = self.ffn.step(self.ln2(x), ffn_x)
        x = x + out
        return x, (*att_state, ffn_x)


# -----------------------------------------------------------------------------
# Vision-RWKV block (Duan et al. 2024, ../shared/vision-rwkv.md): RWKV-4's block made
# bidirectional for images -- Bi-WKV instead of WKV, Q-Shift on the patch grid instead of the
# token shift. Parameter names are Vision-RWKV's, so its checkpoints' block weights load.

VRWKV_NO_RNN = ("the vrwkv mixer is bidirectional (Bi-WKV, Q-Shift): every patch sees the patches after it, so "
                "it needs the whole sequence and has no RNN mode; use model(images), or mixer='rwkv' for forward_rnn")


def q_shift(x, grids):
    """Vision-RWKV's Q-Shift, the token shift on the patch grid: channels [0, C/4) come from the
    left neighbour, [C/4, C/2) from the right, [C/2, 3C/4) from above, [3C/4, C) from below, zero
    past the border. x: (B, T, C) in raster order; grids: [(rows, cols), ...], the consecutive
    segments of the sequence, each a grid of its own (rows * cols tokens; they add up to T)."""
    B, T, C = x.shape
    if sum(rows * cols for rows, cols in grids) != T:
        raise ValueError(f"q_shift: the grids {grids} hold {sum(r * c for r, c in grids)} tokens but the sequence "
                         f"has {T}; pass one (rows, cols) per segment of the sequence, in order")
    q1, q2, q3 = C // 4, C // 2, 3 * C // 4
    shifted, start = [], 0
    for rows, cols in grids:
        g = x[:, start:start + rows * cols].reshape(B, rows, cols, C)
        start += rows * cols
        g = torch.cat([
            F.pad(g[:, :, :-1, :q1], (0, 0, 1, 0)),            # from the left:  x[r, c-1]
            F.pad(g[:, :, 1:, q1:q2], (0, 0, 0, 1)),           # from the right: x[r, c+1]
            F.pad(g[:, :-1, :, q2:q3], (0, 0, 0, 0, 1, 0)),    # from above:     x[r-1, c]
            F.pad(g[:, 1:, :, q3:], (0, 0, 0, 0, 0, 1)),       # from below:     x[r+1, c]
        ], dim=-1)                                             # (B, rows, cols, C)
        shifted.append(g.reshape(B, rows * cols, C))
    return torch.cat(shifted, dim=1)  # (B, T, C)


def rename_parameters_(module, **renames):
    """Register module's parameters old=new under their new names (values and init unchanged)."""
    for old, new in renames.items():
        param = getattr(module, old)
        delattr(module, old)
        setattr(module, new, param)


class VRWKVSpatialMix(TimeMix):
    """Vision-RWKV's spatial mix: RWKV-4's time-mix (same init, same k, v, r and output gating)
    with Q-Shift for the token shift and Bi-WKV for WKV. Its decay and bonus go in divided by the
    token count T and not through exp: w = spatial_decay / T may be negative (the weights then
    grow with distance), and the per-step decay shrinks as images grow."""

    def __init__(self, config, layer_id):
        super().__init__(config, layer_id)
        rename_parameters_(self, time_decay="spatial_decay", time_first="spatial_first", time_mix_k="spatial_mix_k",
                           time_mix_v="spatial_mix_v", time_mix_r="spatial_mix_r")

    def forward(self, x, grids):
        T = x.shape[1]
        x_shifted = q_shift(x, grids)                                    # (B, T, d)
        mixes = (self.spatial_mix_k, self.spatial_mix_v, self.spatial_mix_r)
        k, v, r = self.project(x, x_shifted, *mixes)                     # (B, T, dim_att) each
        y = biwkv(self.spatial_decay / T, self.spatial_first / T, k, v)  # (B, T, dim_att)
        return self.output(torch.sigmoid(r) * y)                         # (B, T, d)

    def step(self, x, state):
        raise ValueError(VRWKV_NO_RNN)


class VRWKVChannelMix(ChannelMix):
    """Vision-RWKV's channel mix: RWKV-4's, with Q-Shift for the token shift."""

    def __init__(self, config, layer_id):
        super().__init__(config, layer_id)
        rename_parameters_(self, time_mix_k="spatial_mix_k", time_mix_r="spatial_mix_r")

    def forward(self, x, grids):
        return self.mix(x, q_shift(x, grids), self.spatial_mix_k, self.spatial_mix_r)  # (B, T, d)

    def step(self, x, x_prev):
        raise ValueError(VRWKV_NO_RNN)


class VRWKVBlock(nn.Module):
    """Pre-LN residual Vision-RWKV block (its tiny model's form): x += SpatialMix(LN1(x));
    x += ChannelMix(LN2(x)). grids: the patch grids of the sequence's segments, [(rows, cols),
    ...] in order, Q-Shift staying within each (default: the model's one grid, config.grid)."""

    def __init__(self, config, layer_id, grids=None):
        super().__init__()
        self.grids = [tuple(g) for g in grids] if grids is not None else [config.grid]
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.att = VRWKVSpatialMix(config, layer_id)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.ffn = VRWKVChannelMix(config, layer_id)

    def forward(self, x):
        x = x + self.att(self.ln1(x), self.grids)
        x = x + self.ffn(self.ln2(x), self.grids)
        return x  # (B, T, d)

    def init_state(self, batch_size, device, dtype):
        raise ValueError(VRWKV_NO_RNN)

    def step(self, x, state):
        raise ValueError(VRWKV_NO_RNN)


# -----------------------------------------------------------------------------
# Comparison mixers: a transformer encoder block, and nothing at all

class TransformerBlock(nn.Module):
    """Standard pre-LN encoder block of the same width: non-causal multi-head self-attention
    over all patches, then a GELU MLP with dim_ffn hidden units. No RNN mode."""

    def __init__(self, config):
        super().__init__()
        d = config.n_embd
        self.n_head = config.n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, config.dim_ffn), nn.GELU(), nn.Linear(config.dim_ffn, d))

    def attend(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch
        return self.proj(y.transpose(1, 2).reshape(B, T, d))

    def forward(self, x):
        x = x + self.attend(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class IdentityBlock(nn.Module):
    """The "w/o RWKV" ablation (FaceRWKV paper, Table 5 and section 5.5): the block passes tokens
    through untouched. Nothing mixes the patches then, so with pool="last" the head sees only the
    bottom-right patch."""

    def forward(self, x):
        return x

    def init_state(self, batch_size, device, dtype):
        return ()

    def step(self, x, state):
        return x, state


# -----------------------------------------------------------------------------
# Sequencing: image (or stem feature map) -> sequence of patch tokens

class PatchEmbed(nn.Module):
    """FaceRWKV paper, section 4.2 ("Baseline Architecture"): cut a (B, C, H, W) map into P x P
    patches in raster order (row by row, left to right), flatten each as (channel, row, col) --
    the layout of a Conv2d(C, d, P, stride=P) weight -- project to d with a Linear, then
    LayerNorm. The LayerNorm plays the role of the reference LM's `ln0` (applied once before
    block 0; Vision-RWKV has one too), so the blocks get no extra ln0."""

    def __init__(self, in_channels, patch_size, n_embd):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size * patch_size, n_embd)
        self.ln = nn.LayerNorm(n_embd)

    def forward(self, x):
        B, C, H, W = x.shape
        P = self.patch_size
        x = x.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5)  # (B, H/P, W/P, C, P, P)
        x = x.reshape(B, (H // P) * (W // P), C * P * P)                     # (B, T, C*P*P)
        return self.ln(self.proj(x))                                         # (B, T, d)


class ResNetStem(nn.Module):
    """FaceRWKV paper, section 4.2 ("Hybrid Architecture"): the "first 4 blocks" of ResNet50 are
    the first four children of torchvision's resnet50 (conv1, bn1, relu, maxpool): 3 -> 64
    channels, H, W -> ceil(H/4), ceil(W/4). Attribute names match torchvision, so its state-dict
    keys are exactly torchvision's (conv1.weight, bn1.weight, bn1.running_mean, ...)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision

    def forward(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)


def read_state_dict(path):
    """A torch state-dict file as {key: tensor}: unwraps {'state_dict': ...} / {'model': ...} and a
    DataParallel 'module.' prefix; loads on the CPU without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read {path} as a torch state dict ({type(e).__name__}: {e})") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def param_table(model, title, raw=(), extra=()):
    """Print (and return) a model's trainable / total parameters per part (child module); `raw`
    names parameters held outside the children, `extra` adds lines at the end."""
    rows = [(name, list(m.parameters())) for name, m in model.named_children()]
    rows += [(name, [getattr(model, name)]) for name in raw] + [("total", list(model.parameters()))]
    lines = [title] + [f"  {name:<14} {sum(p.numel() for p in ps if p.requires_grad):>12,} trainable / "
                       f"{sum(p.numel() for p in ps):>12,}" for name, ps in rows]
    text = "\n".join(lines + list(extra))
    print(text)
    return text


# -----------------------------------------------------------------------------
# The full model

class FaceRWKV(nn.Module):
    """images (B, 3, H, W) -> [ResNet50 stem] -> patch tokens (B, T, d) [+ positions] -> blocks
    -> final LayerNorm -> pool (last token or mean) -> head -> logits (B, n_classes): the FaceRWKV
    paper's section 4.2, with any of the mixers."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        d = config.n_embd
        if config.backbone == "resnet50":
            self.backbone = ResNetStem()
            self.patch_embed = PatchEmbed(64, config.patch_size, d)
        else:
            self.backbone = None
            self.patch_embed = PatchEmbed(3, config.patch_size, d)
        # section 4.2's optional positional encoding: learned, absolute (ViT style); RWKV knows the order
        self.pos_emb = nn.Parameter(0.02 * torch.randn(1, config.n_tokens, d)) if config.pos_emb else None
        if config.mixer == "rwkv":
            self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        elif config.mixer == "vrwkv":
            self.blocks = nn.ModuleList([VRWKVBlock(config, i) for i in range(config.n_layer)])
        elif config.mixer == "transformer":
            self.blocks = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layer)])
        else:
            self.blocks = nn.ModuleList([IdentityBlock() for _ in range(config.n_layer)])
        self.ln_out = nn.LayerNorm(d)  # final LayerNorm before pooling, as the reference LM's ln_out
        # section 4.2's MLP head; the linear one is the ablation of section 5.4.2
        if config.head == "mlp":
            self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, config.n_classes))
        else:
            self.head = nn.Linear(d, config.n_classes)
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode=True):
        # a frozen stem keeps its BatchNorm in eval mode: it uses, and never updates, the running stats
        super().train(mode)
        if self.config.freeze_backbone:
            self.backbone.eval()
        return self

    def load_backbone_weights(self, path):
        """Fill the ResNet50 stem from a torchvision resnet50 state-dict file (e.g.
        resnet50-11ad3fa6.pth). Keys of the rest of the ResNet (layer1..4, fc) are ignored."""
        if self.backbone is None:
            raise ValueError("this model has no backbone; build it with backbone='resnet50' to load ResNet50 weights")
        sd = read_state_dict(path)
        own = self.backbone.state_dict()
        # num_batches_tracked is absent from old torchvision files and unused in eval: optional
        missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"{path} lacks the ResNet50 stem keys {missing}; expected a torchvision resnet50 "
                             f"state dict (keys conv1.weight, bn1.*, layer1..4.*, fc.*), found keys like {list(sd)[:5]}")
        wrong = [f"{k}: {tuple(getattr(sd[k], 'shape', ()))} (need {tuple(v.shape)})" for k, v in own.items()
                 if k in sd and not (isinstance(sd[k], torch.Tensor) and sd[k].shape == v.shape)]
        if wrong:
            raise ValueError(f"{path} has stem weights of the wrong shape, is it a resnet50? {wrong}")
        self.backbone.load_state_dict({k: sd[k] for k in own if k in sd}, strict=False)

    def _check_images(self, images):
        H, W = self.config.img_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (H, W):
            raise ValueError(f"expected images of shape (B, 3, {H}, {W}) (config.img_size), got "
                             f"{tuple(images.shape)}; resize the images to {(H, W)} or build the model with "
                             f"img_size={tuple(images.shape[-2:])}")

    def embed(self, images):
        """(B, 3, H, W) images -> (B, T, d) patch tokens in raster order."""
        self._check_images(images)
        x = images if self.backbone is None else self.backbone(images)  # (B, 3 or 64, h, w)
        x = self.patch_embed(x)                                          # (B, T, d)
        if self.pos_emb is not None:
            x = x + self.pos_emb
        return x

    def forward(self, images):
        """(B, 3, H, W) -> logits (B, n_classes), the whole sequence at once."""
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        x = self.ln_out(x)                                             # (B, T, d)
        # section 4.2: the final entry's embedding (the paper's choice) or the mean over the sequence
        x = x[:, -1] if self.config.pool == "last" else x.mean(dim=1)  # (B, d)
        return self.head(x)

    def stream_tokens(self, images):
        """The tokens of embed(), one (B, d) at a time in raster order, each computed from its own
        patch when it is needed, so RNN mode never holds the (B, T, d) sequence. (The ResNet stem
        is a convolution over the whole image: for the hybrid its feature map is made first.)"""
        self._check_images(images)
        x = images if self.backbone is None else self.backbone(images)  # (B, 3 or 64, h, w)
        P = self.config.patch_size
        rows, cols = self.config.grid
        for t in range(rows * cols):
            r, c = divmod(t, cols)
            token = self.patch_embed(x[:, :, r * P:(r + 1) * P, c * P:(c + 1) * P])[:, 0]  # (B, d)
            yield token if self.pos_emb is None else token + self.pos_emb[:, t]

    @torch.no_grad()
    def forward_rnn(self, images):
        """Same logits as forward, computed as an RNN: one patch token at a time through all
        layers, carrying only a fixed-size state per layer (nothing grows with the number of
        tokens). Inference only (no gradients)."""
        if self.config.mixer == "transformer":
            raise ValueError("the transformer mixer attends to all patches at once and has no RNN mode; "
                             "use model(images), or mixer='rwkv' for forward_rnn")
        if self.config.mixer == "vrwkv":
            raise ValueError(VRWKV_NO_RNN)
        B, T = images.shape[0], self.config.n_tokens
        states = [block.init_state(B, images.device, images.dtype) for block in self.blocks]
        pooled = 0
        for h in self.stream_tokens(images):  # h: (B, d)
            for i, block in enumerate(self.blocks):
                h, states[i] = block.step(h, states[i])
            if self.config.pool == "mean":
                pooled = pooled + self.ln_out(h)
        pooled = self.ln_out(h) if self.config.pool == "last" else pooled / T  # (B, d)
        return self.head(pooled)

    def num_params(self, trainable_only=False):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def print_param_summary(self):
        """Print (and return) trainable / total parameters per part of the model (Table 4)."""
        c = self.config
        return param_table(self, f"FaceRWKV {c.mixer} L={c.n_layer} d={c.n_embd} dim_att={c.dim_att} "
                                 f"dim_ffn={c.dim_ffn} backbone={c.backbone} tokens={c.n_tokens} "
                                 f"({c.grid[0]}x{c.grid[1]} patches of {c.patch_size})",
                           raw=["pos_emb"] if self.pos_emb is not None else [])


# -----------------------------------------------------------------------------
# Running wkv.cu
#
# wkv() and biwkv() above are the maths; wkv.cu holds the same algorithms as raw CUDA, forward
# and backward, in float32. Three runtimes:
#   * CUDA:  wkv.cu compiled by NVRTC through cupy.RawModule, launched on torch's stream;
#   * CPU:   the same unmodified wkv.cu compiled by g++ behind _CPU_SHIM (a few lines of fake
#            CUDA), called through ctypes -- each "CUDA thread" becomes a loop over CPU_LANES
#            channels that g++ vectorises, and the threads are shared out over host threads;
#   * torch: wkv_torch / biwkv_torch, differentiated by autograd; the fallback where wkv.cu
#            cannot run (slower, same numbers up to float rounding).

WKV_CU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wkv.cu")
WKV_BLOCK = 128  # CUDA threads per block; one thread per (batch, channel) on the GPU
NVRTC_OPTIONS = ("-std=c++17",)  # what the GPU path compiles wkv.cu with
with open(WKV_CU) as f:  # floats of scratch per (b, t, c) that the biwkv kernels need (see wkv.cu)
    BIWKV_WORK = int(re.search(r"#define BIWKV_WORK (\d+)", f.read()).group(1))
KERNEL_WORK = {"wkv": 0, "biwkv": BIWKV_WORK}


def _run_operator(name, function, fallback, w, u, k, v, backend):
    """wkv() and biwkv(): check the shapes, pick the backend, compute in float32, return k's dtype."""
    if k.dim() != 3 or v.shape != k.shape or w.shape != (k.shape[2],) or u.shape != w.shape:
        raise ValueError(f"{name} expects w, u of shape (C,) and k, v of shape (B, T, C); got "
                         f"w {tuple(w.shape)}, u {tuple(u.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if backend is None:
        backend = os.environ.get("FACERWKV_WKV") or None
    if backend not in (None, "kernel", "torch"):
        raise ValueError(f"{name} backend must be None, 'kernel' or 'torch' (also in FACERWKV_WKV); got {backend!r}")
    dtype = k.dtype
    w, u, k, v = (x.float().contiguous() for x in (w, u, k, v))
    problem = None if backend == "torch" else kernel_problem(k.device)
    if problem and backend == "kernel":
        raise RuntimeError(f"{name}(backend='kernel'): {problem}")
    if problem:
        _warn_fallback(problem)
    if backend == "torch" or problem:
        return fallback(w, u, k, v).to(dtype)
    return function.apply(w, u, k, v).to(dtype)


def kernel_problem(device):
    """None if wkv.cu can run on tensors of this device, else why not (naming the fix)."""
    if device.type == "cpu":
        return _cpu_build()[1]
    if device.type == "cuda":
        try:
            import cupy  # noqa: F401  (only a GPU needs cupy)
        except ImportError:
            return ("wkv.cu on a GPU needs cupy: pip install cupy-cuda12x (or cupy-cuda13x, to match your "
                    "CUDA driver)")
        return None
    return f"wkv.cu runs on CPU and CUDA tensors, not on {device.type}"


@functools.lru_cache(maxsize=None)
def _warn_fallback(problem):  # once per problem
    warnings.warn(f"FaceRWKV: {problem}. The WKV operators fall back to plain torch, which is many times slower.")


# Just enough CUDA for g++ to compile wkv.cu as ordinary C++: the kernel qualifiers vanish,
# threadIdx/blockIdx/blockDim/gridDim become thread_local globals (set in every host thread, so
# two Python threads may launch at once), and launch() runs every (block, thread) of a 1-D grid,
# sharing the blocks out over a few host threads. Each CPU "thread" handles CPU_LANES adjacent
# channels, the loop that a GPU warp runs in lock-step (see wkv.cu).
CPU_LANES = 64
_CPU_SHIM = r"""
#include <math.h>
#include <thread>
#include <vector>
#ifdef WKV_VECTOR_EXP  // let g++ call glibc's vector expf (libmvec) inside vectorised loops
#pragma omp declare simd notinbranch
extern "C" float expf(float) noexcept;
#endif
#define __global__
#define __device__
#define __forceinline__ inline
struct dim3 { unsigned int x = 1, y = 1, z = 1; };
static thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
#include "@WKV_CU@"

template <typename Kernel>
static void launch(long long n_threads, int block, int n_workers, Kernel kernel) {
    const unsigned int n_blocks = (unsigned int)((n_threads + block - 1) / block);
    auto worker = [&](unsigned int first) {
        gridDim.x = n_blocks;
        blockDim.x = block;
        for (unsigned int b = first; b < n_blocks; b += n_workers) {
            blockIdx.x = b;
            for (unsigned int t = 0; t < (unsigned int)block; t++) { threadIdx.x = t; kernel(); }
        }
    };
    std::vector<std::thread> pool;
    for (int i = 1; i < n_workers; i++) pool.emplace_back(worker, i);
    worker(0);
    for (auto& th : pool) th.join();
}

static long long n_threads(int B, int C) { return (long long)B * ((C + WKV_LANES - 1) / WKV_LANES); }

extern "C" void cpu_wkv_forward(int B, int T, int C, const float* w, const float* u,
                                const float* k, const float* v, float* y, int n_workers) {
    launch(n_threads(B, C), 1, n_workers, [&] { wkv_forward(B, T, C, w, u, k, v, y); });
}

extern "C" void cpu_wkv_backward(int B, int T, int C, const float* w, const float* u,
                                 const float* k, const float* v, const float* y,
                                 const float* gy, float* gw, float* gu, float* gk, float* gv,
                                 int n_workers) {
    launch(n_threads(B, C), 1, n_workers,
           [&] { wkv_backward(B, T, C, w, u, k, v, y, gy, gw, gu, gk, gv); });
}

extern "C" void cpu_biwkv_forward(int B, int T, int C, const float* w, const float* u,
                                  const float* k, const float* v, float* y, float* work,
                                  int n_workers) {
    launch(n_threads(B, C), 1, n_workers, [&] { biwkv_forward(B, T, C, w, u, k, v, y, work); });
}

extern "C" void cpu_biwkv_backward(int B, int T, int C, const float* w, const float* u,
                                   const float* k, const float* v, const float* y,
                                   const float* gy, float* gw, float* gu, float* gk, float* gv,
                                   float* work, int n_workers) {
    launch(n_threads(B, C), 1, n_workers,
           [&] { biwkv_backward(B, T, C, w, u, k, v, y, gy, gw, gu, gk, gv, work); });
}
"""
# Compiler flags, fastest first: native vector instructions with glibc's vector expf (libmvec),
# then a plain portable build. No -ffast-math: the only licences taken are -ffinite-math-only
# (inputs are finite; the "empty state" exponent is -1e38, not -inf) and -fno-trapping-math (no
# floating-point exception is ever unmasked), which together let g++ turn the selects of the max
# trick into branch-free vector code; without the latter g++ 12 vectorises none of the lane loops.
_CPU_BUILDS = (
    ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-ffinite-math-only", "-fno-trapping-math",
     "-DWKV_VECTOR_EXP", "-lmvec"],
    ["-O3"],
)


def _cache_dir():
    root = os.environ.get("FACERWKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "facerwkv")
    try:
        os.makedirs(root, exist_ok=True)
        return root
    except OSError:  # read-only home: fall back to the temp dir
        return tempfile.gettempdir()


def _cpu_id():
    """What -march=native depends on, so a cache shared by different machines stays right."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({l for l in f if l.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() + platform.machine()


def cpu_kernels():
    """wkv.cu built for the host as a shared library (cached on disk), or None when no C++
    compiler is available or no build succeeds (kernel_problem says why)."""
    return _cpu_build()[0]


@functools.lru_cache(maxsize=None)
def _cpu_build():
    """(the ctypes library, None), or (None, why it cannot be built)."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return None, f"no C++ compiler ({cxx}) to build wkv.cu for the CPU; install g++ or set CXX"
    shim = _CPU_SHIM.replace("@WKV_CU@", WKV_CU)
    with open(WKV_CU) as f:
        kernel_source = f.read()
    errors = []
    for flags in _CPU_BUILDS:
        cmd = [cxx, "-std=c++17", "-shared", "-fPIC", "-pthread", f"-DWKV_LANES={CPU_LANES}"] + flags
        key = "\n".join([shim, kernel_source, " ".join(cmd), _cpu_id()])
        lib_path = os.path.join(_cache_dir(), f"wkv_cpu_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so")
        if not os.path.exists(lib_path):
            # build beside the target, then rename: concurrent processes never see a partial file
            with tempfile.TemporaryDirectory(dir=os.path.dirname(lib_path)) as tmp:
                src, out = os.path.join(tmp, "wkv_cpu.cpp"), os.path.join(tmp, "wkv_cpu.so")
                with open(src, "w") as f:
                    f.write(shim)
                # the source goes before the libraries (-lmvec) on the command line
                run = subprocess.run([cmd[0], src, "-o", out] + cmd[1:], capture_output=True, text=True)
                if run.returncode != 0:
                    errors.append(run.stderr[-1500:])
                    continue
                os.replace(out, lib_path)
        lib = ctypes.CDLL(lib_path)
        ptr, i32 = ctypes.c_void_p, ctypes.c_int
        lib.cpu_wkv_forward.argtypes = [i32, i32, i32] + [ptr] * 5 + [i32]
        lib.cpu_wkv_backward.argtypes = [i32, i32, i32] + [ptr] * 10 + [i32]
        lib.cpu_biwkv_forward.argtypes = [i32, i32, i32] + [ptr] * 6 + [i32]
        lib.cpu_biwkv_backward.argtypes = [i32, i32, i32] + [ptr] * 11 + [i32]
        return lib, None
    return None, f"{cxx} could not build wkv.cu for the CPU (fix the compiler, or set CXX):\n" + "\n".join(errors)


def _launch_cpu(kernel, B, T, C, *tensors):
    getattr(cpu_kernels(), "cpu_" + kernel)(B, T, C, *(t.data_ptr() for t in tensors), torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def cuda_module():
    import cupy  # kernel_problem() has checked that it is there
    with open(WKV_CU) as f:
        return cupy.RawModule(code=f.read(), options=NVRTC_OPTIONS)  # compiled per device, cached


def cupy_stream(cupy, stream):
    """torch's CUDA stream as a cupy one, so the kernels queue behind torch's work:
    Stream.from_external from CuPy 14 on, ExternalStream (deprecated there) before."""
    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, stream.device_index)


def _launch_cuda(kernel, B, T, C, *tensors):
    import cupy
    device = tensors[0].device
    with cupy.cuda.Device(device.index), cupy_stream(cupy, torch.cuda.current_stream(device)):
        function = cuda_module().get_function(kernel)
        args = [np.int32(B), np.int32(T), np.int32(C)] + [cupy.from_dlpack(t) for t in tensors]  # zero-copy
        function(((B * C + WKV_BLOCK - 1) // WKV_BLOCK,), (WKV_BLOCK,), tuple(args))  # WKV_LANES = 1


def _kernel_forward(ctx, name, w, u, k, v):
    B, T, C = k.shape
    launch = _launch_cuda if k.is_cuda else _launch_cpu
    y = torch.empty_like(k)
    work = [k.new_empty(KERNEL_WORK[name] * k.numel())] if KERNEL_WORK[name] else []  # the kernels' scratch
    launch(f"{name}_forward", B, T, C, w, u, k, v, y, *work)
    ctx.save_for_backward(w, u, k, v, y)
    return y


def _kernel_backward(ctx, name, gy):
    w, u, k, v, y = ctx.saved_tensors
    B, T, C = k.shape
    launch = _launch_cuda if k.is_cuda else _launch_cpu
    gw, gu = k.new_empty(B, C), k.new_empty(B, C)  # partial sums per batch element
    gk, gv = torch.empty_like(k), torch.empty_like(k)
    work = [k.new_empty(KERNEL_WORK[name] * k.numel())] if KERNEL_WORK[name] else []
    launch(f"{name}_backward", B, T, C, w, u, k, v, y, gy.float().contiguous(), gw, gu, gk, gv, *work)
    return gw.sum(0), gu.sum(0), gk, gv


class WKVFunction(torch.autograd.Function):
    """wkv.cu's wkv_forward / wkv_backward as an autograd op: float32, contiguous inputs, on CUDA
    (cupy) or CPU (ctypes)."""

    @staticmethod
    def forward(ctx, w, u, k, v):
        return _kernel_forward(ctx, "wkv", w, u, k, v)

    @staticmethod
    def backward(ctx, gy):
        return _kernel_backward(ctx, "wkv", gy)


class BiWKVFunction(torch.autograd.Function):
    """wkv.cu's biwkv_forward / biwkv_backward as an autograd op, as WKVFunction."""

    @staticmethod
    def forward(ctx, w, u, k, v):
        return _kernel_forward(ctx, "biwkv", w, u, k, v)

    @staticmethod
    def backward(ctx, gy):
        return _kernel_backward(ctx, "biwkv", gy)
