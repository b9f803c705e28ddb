"""
FaceRWKV: RWKV-4 for facial expression recognition, in one readable file.

The mixer is the RWKV-4 block of Peng et al. 2023 ("RWKV: Reinventing RNNs for the Transformer
Era", below "RWKV-4 paper") as in BlinkDL/RWKV-LM (RWKV-v4neo/src/model.py): same equations,
parameter names and shapes (`blocks.{i}.att.time_decay`, ...) and "fancy" init. Around it sits the
ViT-style sequencing of the FaceRWKV paper (Vierling et al., COMP4771, section 4.2): cut the image
(or the 64-channel map of a ResNet50 stem, "hybrid") into P x P patches, project each to d channels,
run the blocks, pool (last token or mean), classify. Every RWKV-4 model also runs as an RNN
(`forward_rnn`): one patch at a time, a fixed-size state per layer, the same logits. The
Vision-RWKV mixer (Duan et al. 2024, OpenGVLab/Vision-RWKV: Bi-WKV and Q-Shift) is the
bidirectional alternative, without RNN mode.

Read top to bottom: the WKV and Bi-WKV operators, the RWKV-4 block, the Vision-RWKV block, the
comparison mixers, sequencing, the config and the model; then weight files and the cache; last,
how wkv.cu runs (cupy on a GPU, g++ on a CPU).
"""

import atexit
import collections
import ctypes
import functools
import hashlib
import math
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def check(ok, message):
    """Raise ValueError(message) unless ok: input validation that survives python -O."""
    if not ok:
        raise ValueError(message)


# -----------------------------------------------------------------------------
# WKV: RWKV-4 paper, section 4.1 ("WKV Operator", eq. 14), per channel:
#
#   y_t = ( sum_{i<t} e^{-(t-1-i) w + k_i} v_i  +  e^{u + k_t} v_t )
#       / ( sum_{i<t} e^{-(t-1-i) w + k_i}      +  e^{u + k_t}     )
#
# w > 0 is the decay rate (the module stores time_decay = log w), u = time_first the bonus of the current
# token. Below as the paper's RNN form (section 4.5, eqs. 21-25); wkv.cu runs it as raw CUDA (last section).

def wkv_state_update(w, k, v, state):
    """The state after one more token: the past decays by e^{-w}, the new token (k, v: (B, C))
    joins without bonus. The sums a (numerator) and b (denominator) are kept as a = aa e^pp,
    b = bb e^pp with pp the largest exponent so far (the max trick): no exp() overflows."""
    aa, bb, pp = state
    ww = pp - w                    # the past's exponent after one more step of decay
    p = torch.maximum(ww, k)       # the new scale
    e1, e2 = torch.exp(ww - p), torch.exp(k - p)
    return e1 * aa + e2 * v, e1 * bb + e2, p


def wkv_step(w, u, k, v, state):
    """One token of the recurrence: k, v (B, C), state (aa, bb, pp) -> (y (B, C), new state)."""
    aa, bb, pp = state
    ww = u + k                     # the current token's exponent, with its bonus
    p = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
    return (e1 * aa + e2 * v) / (e1 * bb + e2), wkv_state_update(w, k, v, state)


def empty_wkv_state(B, C, like):
    zeros = torch.zeros(B, C, dtype=like.dtype, device=like.device)
    return zeros, zeros, torch.full_like(zeros, -1e38)  # -1e38: "minus infinity", nothing seen


def wkv_torch(w, u, k, v):
    """WKV in plain torch (wkv_step over t; autograd gives the backward). w, u (C,), k, v (B, T, C)."""
    B, T, C = k.shape
    state, ys = empty_wkv_state(B, C, k), []
    for t in range(T):
        y, state = wkv_step(w, u, k[:, t], v[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1)  # (B, T, C)


def wkv(w, u, k, v, backend=None):
    """The WKV operator: w, u (C,), k, v (B, T, C) -> y (B, T, C), differentiable in all four, in float32
    (y in k's dtype). backend (default $FACERWKV_WKV): None = wkv.cu (cupy on CUDA tensors, g++ on CPU
    ones), else wkv_torch, warning why; "kernel" = wkv.cu or a RuntimeError saying why; "torch" = wkv_torch."""
    return _run_operator("wkv", WKVFunction, wkv_torch, w, u, k, v, backend)


# Bi-WKV: Vision-RWKV (Duan et al. 2024), section 3.2 ("Bidirectional WKV"), per channel:
#
#   y_t = ( sum_{i != t} e^{-(|t-i|-1) w + k_i} v_i  +  e^{u + k_t} v_t )
#       / ( sum_{i != t} e^{-(|t-i|-1) w + k_i}      +  e^{u + k_t}     )
#
# Every token sees every other, weighted by distance both ways: the past (i < t) is WKV's sum, the future
# (i > t) the same sum reversed. w and u are any reals: w < 0 (Vision-RWKV's flexible decay) favours far tokens.

def biwkv_torch(w, u, k, v):
    """Bi-WKV in plain torch: the WKV state scanned from the left (each token's past) and from the
    right (its future), combined with the current token. w, u (C,), k, v (B, T, C). (With w < 0
    the exponent pp grows like |w| T and loses float32 digits; wkv.cu never forms it as one float.)"""
    B, T, C = k.shape

    def exclusive_scan(order):
        """The state just before each token, visiting tokens in `order`: (a, b, p), (B, T, C) each."""
        state, states = empty_wkv_state(B, C, k), [None] * T
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
    """Bi-WKV: w, u (C,), k, v (B, T, C) -> y (B, T, C), w and u used as given; otherwise as wkv()."""
    return _run_operator("biwkv", BiWKVFunction, biwkv_torch, w, u, k, v, backend)


# The same sums as weights: y_t = sum_i a_{t,i} v_i per channel, a_{t,i} the term of v_i over the
# denominator (eq. 14, or Bi-WKV's); then a mixer's and the pooled token's: what train.py --explain draws.

def wkv_weights(w, u, k, rows=None, bidirectional=False):
    """a[b, j, i, c]: the weight of v_i in y_t, t = rows[j] (default: every token), per channel;
    WKV's e^{-(t-1-i) w + k_i} (i < t), e^{u + k_t} (i = t), 0 (i > t) over their sum, or Bi-WKV's
    e^{-(|t-i|-1) w + k_i} (i != t). float64; w, u (C,), k (B, T, C) -> (B, len(rows), T, C),
    summing to 1 over i, and (a * v[:, None]).sum(2) is wkv_torch's (biwkv_torch's) y[:, rows]."""
    w, u, k = (x.double() for x in (w, u, k))
    i = torch.arange(k.shape[1], device=k.device)                             # the token weighed
    t = i[:, None] if rows is None else torch.as_tensor(rows, device=k.device).view(-1, 1)  # the output's
    gap = (t - i).abs() - 1 if bidirectional else t - 1 - i                  # (R, T): decay steps
    expo = -gap[None, :, :, None] * w + k[:, None]                           # (B, R, T, C)
    expo = torch.where((t == i)[None, :, :, None], (u + k[:, t[:, 0]])[:, :, None], expo)  # i = t: the bonus
    if not bidirectional:
        expo = expo.masked_fill((i > t)[None, :, :, None], -math.inf)        # WKV never sees the future
    return torch.softmax(expo, dim=2)  # e^expo / sum_i e^expo, by the largest exponent: no overflow


def mixer_weights(mixer, x, grids=None, rows=None):
    """The weights of a token mixer (TimeMix, VRWKVSpatialMix or Attention, below) at its input x (B, T, d)
    (grids: Q-Shift's), per value channel: (B, R, T, C) float64, (a * v[:, None]).sum(2) its y[:, rows]
    before the output projection. Attention's: each head's softmax row, for each of its C / n_head channels."""
    if isinstance(mixer, Attention):
        (B, T, C), h = x.shape, mixer.n_head
        q, k, _ = mixer.qkv(x).double().view(B, T, 3, h, C // h).permute(2, 0, 3, 1, 4)  # (B, h, T, C/h)
        q = q if rows is None else q[:, :, rows]
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // h), dim=-1)            # (B, h, R, T)
        return a.permute(0, 2, 3, 1).repeat_interleave(C // h, dim=3)                     # (B, R, T, C)
    if isinstance(mixer, VRWKVSpatialMix):
        m, T = mixer, x.shape[1]
        k = m.project(x, q_shift(x, grids), m.spatial_mix_k, m.spatial_mix_v, m.spatial_mix_r)[0]
        return wkv_weights(m.spatial_decay / T, m.spatial_first / T, k, rows, bidirectional=True)
    k = mixer.project(x, token_shift(x), mixer.time_mix_k, mixer.time_mix_v, mixer.time_mix_r)[0]
    return wkv_weights(torch.exp(mixer.time_decay), mixer.time_first, k, rows)


@torch.no_grad()
def pooled_weights(model, images, chunk=64):
    """What the pooled token draws from each token: each mixer's weights (input caught by a hook) in
    the row of the last token (config.pool "last"), the cls token ("cls") or all rows' mean ("mean"),
    over channels. FaceRWKV or POSTER -> (logits, [(mixer's name, (B, T) float64, rows summing to 1)])."""
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args))
             for m in model.modules() if isinstance(m, (TimeMix, Attention))]
    try:
        logits = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    out = []
    for name, m in model.named_modules():
        if m not in inputs:
            continue
        T = inputs[m][0].shape[1]
        rows = {"last": [T - 1], "cls": [0]}.get(model.config.pool, range(T))  # "mean": every row
        # the mean of the rows' weights (B, T, C), `chunk` rows at a time (T x T x C need not fit at once)
        a = sum(mixer_weights(m, *inputs[m], rows=list(rows[s:s + chunk])).sum(1)
                for s in range(0, len(rows), chunk)) / len(rows)
        out.append((name, a.mean(2)))  # (B, T): averaged over channels
    return logits, out


# -----------------------------------------------------------------------------
# RWKV-4 block (RWKV-4 paper, section 4 and Fig. 2): time-mix and channel-mix, pre-LN residual

def token_shift(x):
    """RWKV-4 paper, section 4.1 ("Token Shift"): x_{t-1} for every t, zero for t = 0. (B, T, C)."""
    return F.pad(x, (0, 0, 1, -1))


def lerp(x, x_prev, mix):
    """The paper's mu x_t + (1 - mu) x_{t-1} per channel (eqs. 11-13, 15-16), one fused op."""
    return torch.lerp(x_prev, x, mix)


def init_linears_(module, zero):
    """RWKV-LM's init of the Linear layers: those in `zero` (time-mix key, receptance, output;
    channel-mix value, receptance) start at zero, so every block starts as the identity with equal
    keys and half-open gates; the rest orthogonal, gain sqrt(out/in) where it widens."""
    for name, linear in module.named_children():
        if name in zero:
            nn.init.zeros_(linear.weight)
        else:
            nn.init.orthogonal_(linear.weight, gain=math.sqrt(max(1.0, linear.out_features / linear.in_features)))


def fancy_init(config, layer_id):
    """RWKV-LM's "fancy" init of a layer's per-channel parameters: decay and first (dim_att,), the
    mixes (1, 1, d). Deeper layers get slower decays and mix in less of the previous token."""
    d, dim_att, L = config.n_embd, config.dim_att, config.n_layer
    ratio_0_to_1 = layer_id / (L - 1) if L > 1 else 0.0  # 0 in the first layer, 1 in the last
    ratio_1_to_almost0 = 1.0 - layer_id / L              # 1 in the first layer, 1/L in the last
    channel = torch.arange(dim_att, dtype=torch.float32)
    frac = (torch.arange(d, dtype=torch.float32) / d).view(1, 1, d)  # i / d, 0 to almost 1
    return dict(
        # log decay rates from -5 (factor 0.993 per step: long memory) to 3 (e^-20: forgets at once)
        decay=-5 + 8 * (channel / max(dim_att - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1),
        first=math.log(0.3) + 0.5 * ((channel + 1) % 3 - 1),  # a zigzag around ln(0.3)
        att_mix_k=frac ** ratio_1_to_almost0,
        att_mix_v=frac ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1,
        att_mix_r=frac ** (0.5 * ratio_1_to_almost0),
        ffn_mix_k=frac ** ratio_1_to_almost0,
        ffn_mix_r=frac ** ratio_1_to_almost0,
    )


class TimeMix(nn.Module):
    """RWKV-4 time-mix (section 4.1): a linear attention over past tokens with a per-channel decay."""

    def __init__(self, config, layer_id):
        super().__init__()
        d, dim_att = config.n_embd, config.dim_att
        init = fancy_init(config, layer_id)
        self.time_decay = nn.Parameter(init["decay"])  # log w: the per-step decay is e^{-e^time_decay}
        self.time_first = nn.Parameter(init["first"])  # u, the current token's bonus
        self.time_mix_k = nn.Parameter(init["att_mix_k"])  # how much of x_t vs x_{t-1} feeds k, v, r
        self.time_mix_v = nn.Parameter(init["att_mix_v"])
        self.time_mix_r = nn.Parameter(init["att_mix_r"])
        self.key = nn.Linear(d, dim_att, bias=False)
        self.value = nn.Linear(d, dim_att, bias=False)
        self.receptance = nn.Linear(d, dim_att, bias=False)
        self.output = nn.Linear(dim_att, d, bias=False)
        init_linears_(self, zero=("key", "receptance", "output"))

    def project(self, x, x_prev, mix_k, mix_v, mix_r):
        """Eqs. 11-13: k_t, v_t, r_t, each a Linear of x_t lerped towards x_prev."""
        return (self.key(lerp(x, x_prev, mix_k)), self.value(lerp(x, x_prev, mix_v)),
                self.receptance(lerp(x, x_prev, mix_r)))

    def forward(self, x):
        k, v, r = self.project(x, token_shift(x), self.time_mix_k, self.time_mix_v, self.time_mix_r)  # (B, T, A)
        y = wkv(torch.exp(self.time_decay), self.time_first, k, v)  # eq. 14               (B, T, A)
        return self.output(torch.sigmoid(r) * y)  # eq. 15, output gating: sigmoid(r) lets a channel through

    def init_state(self, batch_size, device, dtype):
        """RNN state: previous x, and the WKV sums aa, bb with their log-scale pp (>= float32)."""
        x_prev = torch.zeros(batch_size, self.key.in_features, device=device, dtype=dtype)
        like = torch.empty(0, device=device, dtype=torch.promote_types(dtype, torch.float32))
        return (x_prev, *empty_wkv_state(batch_size, self.key.out_features, like))

    def step(self, x, state):
        """One token as an RNN (section 4.5): x (B, d) -> (out (B, d), new state)."""
        x_prev, *wkv_state = state
        k, v, r = self.project(x, x_prev, *(m.view(-1) for m in (self.time_mix_k, self.time_mix_v, self.time_mix_r)))
        w, u, k, v = (a.to(wkv_state[0].dtype) for a in (torch.exp(self.time_decay), self.time_first, k, v))
        y, wkv_state = wkv_step(w, u, k, v, wkv_state)  # in the state's dtype, float32 or wider
        return self.output(torch.sigmoid(r) * y.to(r.dtype)), (x, *wkv_state)


class ChannelMix(nn.Module):
    """RWKV-4 channel-mix (section 4.1, eqs. 16-18): a squared-ReLU MLP on the token-shifted input, gated."""

    def __init__(self, config, layer_id):
        super().__init__()
        d = config.n_embd
        init = fancy_init(config, layer_id)
        self.time_mix_k = nn.Parameter(init["ffn_mix_k"])
        self.time_mix_r = nn.Parameter(init["ffn_mix_r"])
        self.key = nn.Linear(d, config.dim_ffn, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(config.dim_ffn, d, bias=False)
        init_linears_(self, zero=("receptance", "value"))

    def mix(self, x, x_prev, mix_k, mix_r):
        """o'_t = sigmoid(r'_t) * W'_v max(k'_t, 0)^2; x, x_prev (B, T, d) or, as an RNN, (B, d)."""
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
        self.ln1, self.att = nn.LayerNorm(config.n_embd), TimeMix(config, layer_id)
        self.ln2, self.ffn = nn.LayerNorm(config.n_embd), ChannelMix(config, layer_id)

    def forward(self, x):
        x = x + self.att(self.ln1(x))
        return x + self.ffn(self.ln2(x))  # (B, T, d)

    def init_state(self, batch_size, device, dtype):
        """(att prev x, aa, bb, pp, ffn prev x): its size does not depend on T."""
        ffn_x = torch.zeros(batch_size, self.ln2.normalized_shape[0], device=device, dtype=dtype)
        return (*self.att.init_state(batch_size, device, dtype), ffn_x)

    def step(self, x, state):
        """One token x (B, d) -> (x (B, d), new state)."""
        *att_state, ffn_x = state
        out, att_state = self.att.step(self.ln1(x), att_state)
        x = x + out
        out, ffn_x = self.ffn.step(self.ln2(x), ffn_x)
        return x + out, (*att_state, ffn_x)


def run_rnn(blocks, x):
    """RNN mode (RWKV-4 paper, section 4.5): tokens x (B, T, C) one at a time through the blocks
    (init_state(batch, device, dtype), step(x, state)), a fixed-size state each -> last block's (B, T, C)."""
    states = [block.init_state(x.shape[0], x.device, x.dtype) for block in blocks]
    outputs = []
    for t in range(x.shape[1]):
        h = x[:, t]  # (B, C)
        for i, block in enumerate(blocks):
            h, states[i] = block.step(h, states[i])
        outputs.append(h)
    return torch.stack(outputs, dim=1)  # (B, T, C)


# -----------------------------------------------------------------------------
# Vision-RWKV block (Duan et al. 2024, section 3.2): RWKV-4's block made bidirectional for images,
# Bi-WKV for WKV, Q-Shift on the patch grid for the token shift; in Vision-RWKV's names (spatial_*).

def no_rnn(*args):
    raise ValueError("the vrwkv mixer is bidirectional (Bi-WKV, Q-Shift): every patch sees the patches after it, "
                     "so it needs the whole sequence and has no RNN mode; use model(images), or mixer='rwkv' for "
                     "forward_rnn")


def q_shift(x, grids):
    """Vision-RWKV's Q-Shift: channels [0, C/4) come from the left neighbour, [C/4, C/2) from the
    right, [C/2, 3C/4) from above, [3C/4, C) from below, zero past the border. x (B, T, C) in
    raster order; grids [(rows, cols), ...]: consecutive segments of the sequence, each a grid."""
    B, T, C = x.shape
    n = sum(rows * cols for rows, cols in grids)
    check(n == T, f"q_shift: the grids {grids} hold {n} tokens but the sequence has {T}; "
                  f"pass one (rows, cols) per segment of the sequence, in order")
    q1, q2, q3 = C // 4, C // 2, 3 * C // 4
    shifted = []
    for (rows, cols), segment in zip(grids, x.split([rows * cols for rows, cols in grids], dim=1)):
        g = segment.reshape(B, rows, cols, C)
        g = torch.cat([
            F.pad(g[:, :, :-1, :q1], (0, 0, 1, 0)),          # from the left:  x[r, c-1]
            F.pad(g[:, :, 1:, q1:q2], (0, 0, 0, 1)),         # from the right: x[r, c+1]
            F.pad(g[:, :-1, :, q2:q3], (0, 0, 0, 0, 1, 0)),  # from above:     x[r-1, c]
            F.pad(g[:, 1:, :, q3:], (0, 0, 0, 0, 0, 1)),     # from below:     x[r+1, c]
        ], dim=-1)                                           # (B, rows, cols, C)
        shifted.append(g.reshape(B, rows * cols, C))
    return torch.cat(shifted, dim=1)  # (B, T, C)


def rename_parameters_(module, **renames):
    """Register module's parameters old=new under their new names (values unchanged)."""
    for old, new in renames.items():
        param = getattr(module, old)
        delattr(module, old)
        setattr(module, new, param)


class VRWKVSpatialMix(TimeMix):
    """Vision-RWKV's spatial mix: RWKV-4's time-mix (same init, k, v, r, gating) with Q-Shift and Bi-WKV. Decay
    and bonus go in divided by the token count T, not through exp: w may be negative; the decay shrinks as T grows."""
    init_state = step = no_rnn

    def __init__(self, config, layer_id):
        super().__init__(config, layer_id)
        rename_parameters_(self, time_decay="spatial_decay", time_first="spatial_first", time_mix_k="spatial_mix_k",
                           time_mix_v="spatial_mix_v", time_mix_r="spatial_mix_r")

    def forward(self, x, grids):
        T = x.shape[1]
        k, v, r = self.project(x, q_shift(x, grids), self.spatial_mix_k, self.spatial_mix_v, self.spatial_mix_r)
        y = biwkv(self.spatial_decay / T, self.spatial_first / T, k, v)  # (B, T, dim_att)
        return self.output(torch.sigmoid(r) * y)                         # (B, T, d)


class VRWKVChannelMix(ChannelMix):
    """Vision-RWKV's channel mix: RWKV-4's, with Q-Shift for the token shift."""
    step = no_rnn

    def __init__(self, config, layer_id):
        super().__init__(config, layer_id)
        rename_parameters_(self, time_mix_k="spatial_mix_k", time_mix_r="spatial_mix_r")

    def forward(self, x, grids):
        return self.mix(x, q_shift(x, grids), self.spatial_mix_k, self.spatial_mix_r)  # (B, T, d)


def drop_path(x, p, training):
    """Stochastic depth (Huang et al. 2016; timm's DropPath): while training, drop a residual branch
    x (B, ...) for each sample with probability p, and scale the kept ones by 1 / (1 - p)."""
    keep = torch.rand(x.shape[0], *(1,) * (x.ndim - 1), device=x.device) >= p  # (B, 1, ...)
    return x * keep / (1 - p) if training and p > 0 else x


class VRWKVBlock(nn.Module):
    """Vision-RWKV's residual block, its LayerNorms in one of two places (config.norm):
      "pre"  (VRWKV-T):    x += SpatialMix(LN1(x));          x += ChannelMix(LN2(x))
      "post" (VRWKV-S, B): x += gamma1 * LN1(SpatialMix(x)); x += gamma2 * LN2(ChannelMix(x))
    gamma: learned per-channel scale (config.layer_scale; else 1); each branch drop-pathed in
    training. grids: the sequence's patch grids, Q-Shift within each (default [config.grid])."""
    init_state = step = no_rnn

    def __init__(self, config, layer_id, grids=None):
        super().__init__()
        self.grids = [tuple(g) for g in grids] if grids is not None else [config.grid]
        self.ln1, self.att = nn.LayerNorm(config.n_embd), VRWKVSpatialMix(config, layer_id)
        self.ln2, self.ffn = nn.LayerNorm(config.n_embd), VRWKVChannelMix(config, layer_id)
        self.post_norm = config.norm == "post"
        self.drop = config.drop_path * layer_id / max(config.n_layer - 1, 1)  # linspace(0, drop_path, n_layer)
        scale = lambda: nn.Parameter(torch.full((config.n_embd,), float(config.layer_scale)))  # noqa: E731
        self.gamma1, self.gamma2 = (scale(), scale()) if config.layer_scale is not None else (1.0, 1.0)

    def branch(self, mix, ln, gamma, x):
        y = ln(mix(x, self.grids)) if self.post_norm else mix(ln(x), self.grids)  # (B, T, d)
        return drop_path(gamma * y, self.drop, self.training)

    def forward(self, x):
        x = x + self.branch(self.att, self.ln1, self.gamma1, x)
        return x + self.branch(self.ffn, self.ln2, self.gamma2, x)  # (B, T, d)


# -----------------------------------------------------------------------------
# Comparison mixers (FaceRWKV paper, section 5.5): a transformer encoder block, and nothing

class Attention(nn.Module):
    """Multi-head self-attention over all tokens, qkv with bias (ViT; timm's Attention)."""

    def __init__(self, dim, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, h, T, C/h)
        y = F.scaled_dot_product_attention(q, k, v)           # softmax(q k^T / sqrt(C/h)) v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


def mlp(dim, hidden):
    """Linear, GELU, Linear (timm's Mlp: fc1, fc2), as ViT and POSTER V2 use it."""
    return nn.Sequential(collections.OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))


class TransformerBlock(nn.Module):
    """The pre-LN transformer encoder block (ViT; POSTER V2's and timm's names): x += Attn(LN1(x));
    x += MLP(LN2(x)). FaceRWKV's transformer mixer and POSTER V2's ViT. No RNN mode."""

    def __init__(self, dim, n_head, dim_ffn, ln_eps=1e-5):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=ln_eps), Attention(dim, n_head)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=ln_eps), mlp(dim, dim_ffn)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))  # (B, T, C)


class IdentityBlock(nn.Identity):
    """The "w/o RWKV" ablation (FaceRWKV paper, Table 5): tokens pass untouched (pool="last": the last patch alone)."""

    def init_state(self, batch_size, device, dtype):
        return ()

    def step(self, x, state):
        return x, state


# -----------------------------------------------------------------------------
# Sequencing (FaceRWKV paper, section 4.2): image or stem map -> patch tokens

class PatchEmbed(nn.Module):
    """Cut a (B, C, H, W) map into P x P patches in raster order, flatten each as (channel, row,
    col) -- a Conv2d(C, d, P, stride=P) weight's layout -- project to d, [add the positions `pos`
    (Vision-RWKV's order),] then LayerNorm (RWKV-LM's and Vision-RWKV's ln0, once before block 0)."""

    def __init__(self, in_channels, patch_size, n_embd):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size * patch_size, n_embd)
        self.ln = nn.LayerNorm(n_embd)

    def forward(self, x, pos=None):
        (B, C, H, W), P = x.shape, self.patch_size
        x = x.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5)  # (B, H/P, W/P, C, P, P)
        x = self.proj(x.reshape(B, (H // P) * (W // P), C * P * P))          # (B, T, d)
        return self.ln(x if pos is None else x + pos)


def resnet_stem():
    """Section 4.2 ("Hybrid Architecture"): ResNet50's first four children with torchvision's names
    and init: (B, 3, H, W) -> (B, 64, ceil(H/4), ceil(W/4))."""
    stem = nn.Sequential(collections.OrderedDict(
        conv1=nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False), bn1=nn.BatchNorm2d(64),
        relu=nn.ReLU(inplace=True), maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1)))
    nn.init.kaiming_normal_(stem.conv1.weight, mode="fan_out", nonlinearity="relu")
    return stem


def stem_grid(h, w):
    """The stem map's size: conv 7x7/2 pad 3, then maxpool 3x3/2 pad 1, each n -> (n - 1) // 2 + 1."""
    return (h + 3) // 4, (w + 3) // 4


# -----------------------------------------------------------------------------
# The config and the full model

OPTIONS = {"backbone": ("none", "resnet50"), "pool": ("last", "mean"), "head": ("mlp", "linear"),
           "mixer": ("rwkv", "vrwkv", "transformer", "identity"), "norm": ("pre", "post")}

# FaceRWKV paper, Table 1 (n_layer, n_embd); "hybrid" is large on the ResNet50 stem, 5x5 patches.
PRESETS = {
    "small": dict(n_layer=2, n_embd=128),
    "medium": dict(n_layer=4, n_embd=256),
    "large": dict(n_layer=6, n_embd=512),
    "hybrid": dict(n_layer=6, n_embd=512, backbone="resnet50", patch_size=5),
}
# Vision-RWKV's VRWKV-T / S / B (Duan et al. 2024, Table 1): 224 px, 16x16 patches, 12 blocks; the
# stem ln0(patches + positions), mean pooling, a linear head. Their ImageNet-1k files load: vrwkv_state_dict.
VRWKV_PRESET = dict(mixer="vrwkv", n_layer=12, patch_size=16, img_size=(224, 224), pos_emb=True, pos_in_ln0=True,
                    pool="mean", head="linear")
PRESETS.update({"vrwkv-t": dict(VRWKV_PRESET, n_embd=192),
                "vrwkv-s": dict(VRWKV_PRESET, n_embd=384, norm="post", layer_scale=1.0, drop_path=0.3),
                "vrwkv-b": dict(VRWKV_PRESET, n_embd=768, norm="post", layer_scale=1e-5, drop_path=0.5)})


def divisors(*ns):
    """The numbers dividing all of ns: the valid choices an error message offers."""
    return [p for p in range(1, min(ns) + 1) if all(n % p == 0 for n in ns)]


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
    imagenet_norm: bool = True    # (x - mean) / std per colour, done by the data pipeline
    pos_emb: bool = False         # learned positional embedding added to the patch tokens
    pool: str = "last"            # "last" token (the paper) | "mean" over tokens
    head: str = "mlp"             # "mlp" (Linear d->d, ReLU, Linear d->classes) | "linear"
    mixer: str = "rwkv"           # "rwkv" | "vrwkv" (Vision-RWKV) | "transformer" | "identity" ("w/o RWKV")
    pos_in_ln0: bool = False      # add the positions before the patch LayerNorm (Vision-RWKV's ln0), not after
    norm: str = "pre"             # vrwkv: "pre" | "post" (LN on each branch's output, Vision-RWKV's S and B)
    layer_scale: float = None     # vrwkv: init of the learned per-channel scale of each branch; None: no scale
    drop_path: float = 0.0        # vrwkv: stochastic depth in the last block, linear from 0 over depth

    def __post_init__(self):
        # None defaults are resolved here, so a saved config always spells out its widths
        self.dim_att = self.n_embd if self.dim_att is None else self.dim_att
        self.dim_ffn = 4 * self.n_embd if self.dim_ffn is None else self.dim_ffn
        self.n_head = max(1, self.n_embd // 64) if self.n_head is None and isinstance(self.n_embd, int) else self.n_head
        size = self.img_size
        check(isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size),
              f"img_size must be (height, width) in pixels, e.g. (400, 600); got {size!r}")
        self.img_size = tuple(size)  # a list after a JSON round trip
        for name in ("n_layer", "n_embd", "dim_att", "dim_ffn", "n_head", "patch_size"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{name} must be a positive integer; got {value!r}")
        check(isinstance(self.n_classes, int) and self.n_classes >= 2,
              f"n_classes must be an integer >= 2; got {self.n_classes!r}")
        for name, allowed in OPTIONS.items():
            check(getattr(self, name) in allowed, f"{name}={getattr(self, name)!r} is not an option; use one of {allowed}")
        check(self.mixer == "vrwkv" or (self.norm, self.layer_scale, self.drop_path) == ("pre", None, 0),
              "norm, layer_scale and drop_path are options of the Vision-RWKV block; use mixer='vrwkv'")
        check(0 <= self.drop_path < 1, f"drop_path must be a rate in [0, 1); got {self.drop_path!r}")
        check(self.pos_emb or not self.pos_in_ln0, "pos_in_ln0=True adds the positions: set pos_emb=True too")
        check(not self.freeze_backbone or self.backbone != "none",
              "freeze_backbone=True needs a backbone; set backbone='resnet50' or freeze_backbone=False")
        check(self.mixer != "transformer" or self.n_embd % self.n_head == 0,
              f"the transformer mixer needs n_embd ({self.n_embd}) divisible by n_head ({self.n_head}); "
              f"use n_head in {divisors(self.n_embd)}")
        (H, W), P, stem = self.img_size, self.patch_size, self.backbone != "none"
        h, w = stem_grid(H, W) if stem else (H, W)
        m = 4 * P if stem else P  # the stem divides by 4 (rounding up), so multiples of 4P always work
        check(h % P == 0 and w % P == 0,
              (f"the ResNet50 stem maps img_size {self.img_size} to a {h}x{w} grid, not" if stem else
               f"img_size {self.img_size} is not") + f" divisible into {P}x{P} patches; use an img_size that is a "
              f"multiple of {m}, e.g. {(max(m, round(H / m) * m), max(m, round(W / m) * m))}, or a patch_size "
              f"dividing {f'{h} and {w}' if stem else 'both sides'}: {divisors(h, w)}")

    @property
    def grid(self):
        """(rows, cols) of patches; tokens run through it in raster (row-major) order."""
        h, w = self.img_size if self.backbone == "none" else stem_grid(*self.img_size)
        return h // self.patch_size, w // self.patch_size

    @property
    def n_tokens(self):
        return self.grid[0] * self.grid[1]

    @classmethod
    def preset(cls, name, **overrides):
        """A Table 1 model ("small", "medium", "large"), "hybrid" or "vrwkv-t/s/b", any field overridden."""
        check(name in PRESETS, f"unknown preset {name!r}; use one of {tuple(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def param_table(model, title, raw=(), extra=()):
    """Print (and return) trainable / total parameters per child (Table 4) and `raw` parameter, `extra` lines last."""
    rows = [(name, list(m.parameters())) for name, m in model.named_children()]
    rows += [(name, [getattr(model, name)]) for name in raw] + [("total", list(model.parameters()))]
    lines = [title] + [f"  {name:<14} {sum(p.numel() for p in ps if p.requires_grad):>12,} trainable / "
                       f"{sum(p.numel() for p in ps):>12,}" for name, ps in rows]
    text = "\n".join(lines + list(extra))
    print(text)
    return text


class FaceRWKV(nn.Module):
    """FaceRWKV paper, section 4.2: images (B, 3, H, W) -> [ResNet50 stem] -> patch tokens
    (B, T, d) [+ positions] -> blocks -> LayerNorm -> pool (last token or mean) -> head -> logits."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        d = c.n_embd
        self.backbone = resnet_stem() if c.backbone == "resnet50" else None
        self.patch_embed = PatchEmbed(3 if self.backbone is None else 64, c.patch_size, d)
        # section 4.2's optional positional encoding: learned, absolute (ViT style); RWKV knows the order
        self.pos_emb = nn.Parameter(0.02 * torch.randn(1, c.n_tokens, d)) if c.pos_emb else None
        make = {"rwkv": lambda i: Block(c, i), "vrwkv": lambda i: VRWKVBlock(c, i),
                "transformer": lambda i: TransformerBlock(d, c.n_head, c.dim_ffn), "identity": lambda i: IdentityBlock()}
        self.blocks = nn.ModuleList([make[c.mixer](i) for i in range(c.n_layer)])
        self.ln_out = nn.LayerNorm(d)  # RWKV-LM's ln_out
        # section 4.2's MLP head; the linear one is section 5.4.2's ablation
        self.head = (nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, c.n_classes)) if c.head == "mlp"
                     else nn.Linear(d, c.n_classes))
        if c.freeze_backbone:
            self.backbone.requires_grad_(False).eval()

    def train(self, mode=True):
        # a frozen stem keeps BatchNorm in eval mode: it uses, and never updates, the running stats
        super().train(mode)
        if self.config.freeze_backbone:
            self.backbone.eval()
        return self

    def load_backbone_weights(self, path):
        """Fill the ResNet50 stem from torchvision's resnet50 weights (resnet50-11ad3fa6.pth); layer1..4, fc skipped."""
        check(self.backbone is not None,
              "this model has no backbone; build it with backbone='resnet50' to load ResNet50 weights")
        load_weights(self.backbone, read_state_dict(path), path, ignore=("layer", "fc."))

    def embed(self, images):
        """(B, 3, H, W) images -> (B, T, d) patch tokens in raster order."""
        H, W = self.config.img_size
        check(images.ndim == 4 and images.shape[1] == 3 and tuple(images.shape[2:]) == (H, W),
              f"expected images of shape (B, 3, {H}, {W}) (config.img_size), got {tuple(images.shape)}; "
              f"resize the images to {(H, W)} or build the model with img_size={tuple(images.shape[-2:])}")
        pos, inside = self.pos_emb, self.config.pos_in_ln0  # the positions go in before ln0, or after
        x = self.patch_embed(images if self.backbone is None else self.backbone(images), pos if inside else None)
        return x if pos is None or inside else x + pos  # (B, T, d)

    def classify(self, x):
        """Tokens after the blocks (B, T, d) -> logits: section 4.2's last token (or the mean), head."""
        x = self.ln_out(x)
        return self.head(x[:, -1] if self.config.pool == "last" else x.mean(dim=1))

    def forward(self, images):
        """(B, 3, H, W) -> logits (B, n_classes), the whole sequence at once."""
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.classify(x)

    @torch.no_grad()
    def forward_rnn(self, images):
        """The same logits as forward, as an RNN: one patch token at a time through all layers, a
        fixed-size state per layer (Vision-RWKV's blocks refuse: no_rnn). Inference only."""
        check(self.config.mixer != "transformer", "the transformer mixer attends to all patches at once and has "
                                                  "no RNN mode; use model(images), or mixer='rwkv' for forward_rnn")
        return self.classify(run_rnn(self.blocks, self.embed(images)))

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
# Weight files: read by torch.load(weights_only=True), torch's own unpickler, which rebuilds tensors
# and plain data only (numpy's arrays and scalars too). Any other class the file names (e.g. POSTER
# V2's main.RecorderMeter) becomes an inert stand-in; calling it (a malicious __reduce__) refuses it.

_MULTIARRAY = (getattr(np, "_core", None) or np.core).multiarray  # numpy 2 renamed numpy.core
PLAIN_DATA = [np.ndarray, np.dtype, *{type(np.dtype(c)) for c in np.typecodes["All"]},  # numpy.dtypes.Int16DType, ...
              frozenset, range, slice, int, float, bool, str, bytes, list, dict, tuple] + [
    (getattr(_MULTIARRAY, n), f"numpy.{core}.multiarray.{n}") for core in ("core", "_core")
    for n in ("_reconstruct", "scalar")]


class Placeholder:
    """Stands in for an instance of a class the file names: made without running any of its code
    (NEWOBJ), its pickled state kept as attributes (BUILD)."""

    def __init__(self, *args, **kwargs):  # only a call runs __init__: a REDUCE, what a malicious __reduce__ does
        raise pickle.UnpicklingError(f"calls {type(self).__module__}.{type(self).__qualname__}")

    def __setstate__(self, state):
        state, slots = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
        for part in (state, slots):
            if isinstance(part, dict):
                self.__dict__.update(part)
            elif part is not None:
                self.__dict__["state"] = part


def stand_in(name):
    """("module.Name" as an inert subclass of Placeholder, name), for torch.serialization.safe_globals."""
    module, _, qualname = name.rpartition(".")
    return type(qualname, (Placeholder,), {"__module__": module, "__qualname__": qualname}), name


def first_nonfinite(obj):
    """The key path ('model.head.weight') of a floating tensor in obj (dicts, lists, tuples) with NaN/inf, or None."""
    todo, seen = [("", obj)], set()
    while todo:
        key, obj = todo.pop()
        if isinstance(obj, torch.Tensor) and obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return key or "(the file's one tensor)"
        if isinstance(obj, (dict, list, tuple)) and id(obj) not in seen:
            seen.add(id(obj))
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            todo += [(f"{key}.{k}" if key else str(k), v) for k, v in items]
    return None


def _first_line(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def read_checkpoint(path):
    """A torch weights file's object (usually a dict), on the CPU, read without running any code; tensors finite."""
    path = Path(path)
    check(path.is_file(), f"{path}: weights file not found")
    try:
        with torch.serialization.safe_globals(PLAIN_DATA):
            foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path) if zipfile.is_zipfile(path) else []
            with torch.serialization.safe_globals([stand_in(name) for name in foreign]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch.load wraps its unpickler's one-line refusal in a page of advice
        raise ValueError(f"{path}: could not read it as a plain weights file ({_first_line(e.__context__ or e)}); "
                         f"FaceRWKV never unpickles code") from None
    except Exception as e:  # truncated, not a torch file, a TorchScript archive, ...
        raise ValueError(f"{path}: could not read it as a torch weights file ({_first_line(e)})") from None
    bad = first_nonfinite(ckpt)
    check(bad is None, f"{path}: tensor {bad} holds NaN or infinite values")
    return ckpt


def read_state_dict(path):
    """A weights file as {str: Tensor}: unwraps {'state_dict': ...} / {'model': ...}, drops DataParallel's 'module.'."""
    sd = read_checkpoint(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    check(isinstance(sd, dict), f"{path} holds a {type(sd).__name__}, not a state dict of tensors")
    out = {}
    for key, value in sd.items():
        check(isinstance(key, str), f"{path}: key {key!r} is not a string; not a state dict")
        check(isinstance(value, torch.Tensor), f"{path}: {key} is a {type(value).__name__}, not a tensor")
        out[key.removeprefix("module.")] = value
    return out


def _some(keys, n=5):
    keys = list(keys)
    return f"{keys[:n]}{f' and {len(keys) - n} more' if len(keys) > n else ''} ({len(keys)} in all)"


def load_weights(module, state_dict, source, ignore=()):
    """Copy state_dict into module, strictly; keys starting with a prefix in `ignore` are
    recognised and skipped. Returns the number skipped; anything else amiss is a ValueError.
    BatchNorm's num_batches_tracked may be absent (older files; unused in eval), as torch allows."""
    own = module.state_dict()
    skipped = [k for k in state_dict if k not in own and k.startswith(tuple(ignore))]
    unexpected = [k for k in state_dict if k not in own and k not in skipped]
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {tuple(state_dict[k].shape)} (need {tuple(v.shape)})" for k, v in own.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    check(not missing, f"{source} lacks the keys {_some(missing)}; found keys like {list(state_dict)[:5]}")
    check(not wrong, f"{source} has weights of the wrong shape: {_some(wrong)}")
    check(not unexpected, f"{source} has unexpected keys {_some(unexpected)}")
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return len(skipped)


# Vision-RWKV's ImageNet-1k checkpoints (mmcv's {'meta', 'state_dict'}): its names -> FaceRWKV's (None: skipped)
VRWKV_NAMES = {"backbone.patch_embed.projection.": "patch_embed.proj.", "backbone.pos_embed": "pos_emb",
               "backbone.layers.0.ln0.": "patch_embed.ln.", "backbone.layers.": "blocks.", "backbone.ln1.": "ln_out.",
               "head.fc.": None}  # the 1000-class ImageNet head
VRWKV_OTHERS = {".time_maa": "a VRWKV6 checkpoint (RWKV-6's mixer)", "key_norm": "a VRWKV-L checkpoint (key norm)"}


def vrwkv_state_dict(path, img_size=(224, 224)):
    """A checkpoint of Vision-RWKV's VRWKV-T, S or B (OpenGVLab/Vision-RWKV), read without running any
    of it -> (its backbone's config at img_size, its state dict in FaceRWKV's names): the patch conv as
    PatchEmbed's Linear, pos_embed resized bicubically to img_size's grid (as Vision-RWKV does), post-norm
    where the file has layer scale (S, B), no ImageNet head. Anything else amiss: a ValueError naming keys."""
    sd = read_state_dict(path)
    other = next((f"{what}: {k}" for mark, what in VRWKV_OTHERS.items() for k in sd if mark in k), None)
    check(other is None, f"{path}: {other}, not the Vision-RWKV block FaceRWKV has; use VRWKV-T, S or B")
    out, unknown = {}, []
    for k, v in sd.items():
        prefix = max((p for p in VRWKV_NAMES if k.startswith(p)), key=len, default=None)
        if prefix is None:
            unknown.append(k)
        elif VRWKV_NAMES[prefix]:
            out[VRWKV_NAMES[prefix] + k[len(prefix):]] = v
    check(not unknown and {"pos_emb", "patch_embed.proj.weight"} <= out.keys(),
          f"{path}: not a Vision-RWKV checkpoint (keys like backbone.pos_embed); other keys: {_some(unknown)}")
    (E, _, P, _), (_, N, _) = out["patch_embed.proj.weight"].shape, out["pos_emb"].shape
    post, s = "blocks.0.gamma1" in out, math.isqrt(N)
    check(s * s == N, f"{path}: backbone.pos_embed holds {N} positions, not a square grid")
    config = FaceRWKVConfig(**{**VRWKV_PRESET, "n_embd": E, "patch_size": P, "img_size": tuple(img_size),
                               "n_layer": 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks.")),
                               "norm": "post" if post else "pre", "layer_scale": 1.0 if post else None})
    out["patch_embed.proj.weight"] = out["patch_embed.proj.weight"].reshape(E, -1)  # (E, 3 P P), (channel, row, col)
    pe = out["pos_emb"].reshape(1, s, s, E).permute(0, 3, 1, 2)                    # (1, E, s, s)
    if (s, s) != config.grid:
        pe = F.interpolate(pe, size=config.grid, mode="bicubic", align_corners=False)
    out["pos_emb"] = pe.flatten(2).transpose(1, 2)                                  # (1, T, E)
    with torch.device("meta"), warnings.catch_warnings():  # keys and shapes only: load_weights' checks
        warnings.simplefilter("ignore")
        need = FaceRWKV(config)
        load_weights(need, {**out, "head.weight": need.head.weight, "head.bias": need.head.bias}, f"{path} (renamed)")
    return config, out


# -----------------------------------------------------------------------------
# Files and the cache: one directory, one way to write, one digest check

def _unusable(root):
    """Why root (made mode 0700 if missing) cannot be a cache, or None: ours, writable, by us alone."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = root.stat()
    except OSError as e:
        return f"cannot create the cache directory {root} ({e.strerror})"
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        return (f"the cache directory {root} is not yours alone (owner uid {st.st_uid}, mode "
                f"{st.st_mode & 0o777:o}); fix with chmod 700 or set FACERWKV_CACHE")
    if not (st.st_mode & 0o200 and os.access(root, os.W_OK)):
        return f"the cache directory {root} is read-only"
    return None


@functools.lru_cache(maxsize=None)
def _private_cache(problem):
    """The fallback: one folder per user in the temp folder, facerwkv-<uid>, checked as the main
    cache is and reused by every run; where even that is unusable, a fresh folder removed at exit."""
    path = Path(tempfile.gettempdir()) / f"facerwkv-{os.getuid()}"
    if also := _unusable(path):
        path, problem = Path(tempfile.mkdtemp(prefix="facerwkv-")), f"{problem}, and {also}"
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    print(f"facerwkv: warning: {problem}; using the private cache {path}", file=sys.stderr)
    return path


def cache_dir():
    """$FACERWKV_CACHE or ~/.cache/facerwkv (mode 0700) where _unusable finds no fault; else _private_cache."""
    home = os.environ.get("HOME", os.path.expanduser("~"))  # where HOME is unset, the password database's
    root = os.environ.get("FACERWKV_CACHE") or os.path.isabs(home) and Path(home) / ".cache" / "facerwkv"
    problem = _unusable(Path(root)) if root else f"HOME is {home!r}, not an absolute path, so there is no ~/.cache"
    return _private_cache(problem) if problem else Path(root)


# torch.save's C++ writer reports a failed write (a full disk, ...) as a RuntimeError, its errno lost
TORCH_WRITE_FAILED = re.compile(r"unexpected pos|file write failed|PytorchStreamWriter failed")


def atomic_write(path, data):
    """Write bytes (or call data(tmp_path) to write the file) beside path, fsync, rename onto path:
    readers see the old file or the whole new one, never half of it. A write that fails (an OSError
    such as a full disk, or torch.save's RuntimeError) is an OSError naming path, its errno kept."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if not callable(data):
                f.write(data)
        if callable(data):
            data(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if not (isinstance(e, OSError) or isinstance(e, RuntimeError) and TORCH_WRITE_FAILED.search(str(e))):
            raise
        why = f"could not write {path} ({getattr(e, 'strerror', None) or _first_line(e)}); the previous file is untouched"
        raise (OSError(e.errno, why) if getattr(e, "errno", None) else OSError(why)) from e


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cached(name, build):
    """The cache entry `name`, built by build(tmp_path) when missing. Its sha256 is recorded beside
    it (name.sha256) and checked on every use: a corrupt entry is reported, deleted and rebuilt."""
    root = cache_dir()
    path, digest_path = root / name, root / f"{name}.sha256"
    if path.exists():
        recorded = digest_path.read_text().strip() if digest_path.exists() else None
        if recorded is not None and recorded == _sha256(path):
            return path
        if recorded is not None:
            print(f"facerwkv: cache entry {path} does not match its digest (corrupt); rebuilding", file=sys.stderr)
        path.unlink(missing_ok=True)
    atomic_write(path, build)
    atomic_write(digest_path, _sha256(path).encode())
    return path


# -----------------------------------------------------------------------------
# Running wkv.cu: the algorithms above as raw CUDA, forward and backward, in float32. On CUDA tensors NVRTC
# compiles it (cupy.RawModule) to run on torch's stream; on CPU tensors g++ compiles the same file behind
# _CPU_SHIM (a few lines of fake CUDA), called through ctypes. Else wkv_torch / biwkv_torch (equal up to rounding).

WKV_CU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wkv.cu")
WKV_BLOCK = 128  # CUDA threads per block; one thread per (batch, channel) on the GPU
NVRTC_OPTIONS = ("-std=c++17",)
# floats of scratch per (b, t, c) that the biwkv kernels need
BIWKV_WORK = int(re.search(r"#define BIWKV_WORK (\d+)", Path(WKV_CU).read_text()).group(1))


def _run_operator(name, function, fallback, w, u, k, v, backend):
    """wkv() and biwkv(): check the shapes, pick the backend, compute in float32, return k's dtype."""
    check(k.dim() == 3 and v.shape == k.shape and w.shape == (k.shape[2],) and u.shape == w.shape,
          f"{name} expects w, u of shape (C,) and k, v of shape (B, T, C); got "
          f"w {tuple(w.shape)}, u {tuple(u.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    backend = backend or os.environ.get("FACERWKV_WKV") or None
    check(backend in (None, "kernel", "torch"),
          f"{name} backend must be None, 'kernel' or 'torch' (also in FACERWKV_WKV); got {backend!r}")
    problem = None if backend == "torch" else kernel_problem(k.device)
    if problem and backend == "kernel":
        raise RuntimeError(f"{name}(backend='kernel'): {problem}")
    if problem:
        _warn_fallback(problem)
    run = fallback if backend == "torch" or problem else function.apply
    return run(*(x.float().contiguous() for x in (w, u, k, v))).to(k.dtype)


def kernel_problem(device):
    """None if wkv.cu can run on tensors of this device, else why not (naming the fix)."""
    if device.type == "cpu":
        return _cpu_build()[1]
    if device.type != "cuda":
        return f"wkv.cu runs on CPU and CUDA tensors, not on {device.type}"
    try:
        import cupy  # noqa: F401  (only a GPU needs cupy)
    except ImportError:
        return "wkv.cu on a GPU needs cupy: pip install cupy-cuda12x (or cupy-cuda13x, to match your CUDA driver)"


@functools.lru_cache(maxsize=None)
def _warn_fallback(problem):  # once per problem
    warnings.warn(f"FaceRWKV: {problem}. The WKV operators fall back to plain torch, which is many times slower.")


# Just enough CUDA for g++: the qualifiers vanish, threadIdx etc. become thread_local globals, and launch()
# runs a 1-D grid of one-thread blocks on torch.get_num_threads() OpenMP threads (torch's own pool where
# torch runs on libgomp, its Linux builds), each doing CPU_LANES adjacent channels, as a GPU warp does.
CPU_LANES = 64
_CPU_SHIM = r"""
#include <math.h>
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
static void launch(int B, int C, int n, Kernel kernel) {
    const int blocks = B * ((C + WKV_LANES - 1) / WKV_LANES);
    #pragma omp parallel for num_threads(n) schedule(static)  // a serial loop where built without -fopenmp
    for (int b = 0; b < blocks; b++) {
        gridDim.x = blocks, blockDim.x = 1, threadIdx.x = 0, blockIdx.x = b;
        kernel();
    }
}

#define F const float*
extern "C" void cpu_wkv_forward(int B, int T, int C, F w, F u, F k, F v, float* y, int n) {
    launch(B, C, n, [&] { wkv_forward(B, T, C, w, u, k, v, y); });
}
extern "C" void cpu_wkv_backward(int B, int T, int C, F w, F u, F k, F v, F y, F gy,
                                 float* gw, float* gu, float* gk, float* gv, int n) {
    launch(B, C, n, [&] { wkv_backward(B, T, C, w, u, k, v, y, gy, gw, gu, gk, gv); });
}
extern "C" void cpu_biwkv_forward(int B, int T, int C, F w, F u, F k, F v, float* y, float* work, int n) {
    launch(B, C, n, [&] { biwkv_forward(B, T, C, w, u, k, v, y, work); });
}
extern "C" void cpu_biwkv_backward(int B, int T, int C, F w, F u, F k, F v, F y, F gy,
                                   float* gw, float* gu, float* gk, float* gv, float* work, int n) {
    launch(B, C, n, [&] { biwkv_backward(B, T, C, w, u, k, v, y, gy, gw, gu, gk, gv, work); });
}
"""
# Compiler flags, fastest first: OpenMP threads and native vector code with glibc's vector expf; the same on
# one thread (no OpenMP); portable. No -ffast-math: -ffinite-math-only (the empty state is -1e38, not -inf)
# and -fno-trapping-math (no FP exception is unmasked) make the max trick's selects branch-free vector code.
_NATIVE = ["-O3", "-march=native", "-fno-math-errno", "-ffinite-math-only", "-fno-trapping-math",
           "-DWKV_VECTOR_EXP", "-lmvec"]
_CPU_BUILDS = (["-fopenmp"] + _NATIVE, ["-fopenmp-simd"] + _NATIVE, ["-O3"])


def cpu_kernels():
    """wkv.cu built for the host as a ctypes library (cached), or None (kernel_problem says why)."""
    return _cpu_build()[0]


@functools.lru_cache(maxsize=None)
def _cpu_build():
    """(the ctypes library, None) or (None, why not); built through cached(): only our own cache, digest checked."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return None, f"no C++ compiler ({cxx}) to build wkv.cu for the CPU; install g++ or set CXX"
    shim = _CPU_SHIM.replace("@WKV_CU@", WKV_CU)
    try:  # what -march=native depends on, so a cache shared by different machines stays right
        with open("/proc/cpuinfo") as f:
            cpu = "".join(sorted({line for line in f if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        cpu = platform.processor() + platform.machine()
    errors = []
    for flags in _CPU_BUILDS:
        cmd = ["-std=c++17", "-shared", "-fPIC", f"-DWKV_LANES={CPU_LANES}"] + flags
        key = hashlib.sha256("\n".join([shim, Path(WKV_CU).read_text(), cxx, *cmd, cpu]).encode()).hexdigest()[:16]

        def build(out):  # the shim as C++ on stdin ("-x c++ -"), then cmd: -l after the source
            run = subprocess.run([cxx, "-x", "c++", "-", "-o", out] + cmd, input=shim, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(run.stderr[-1500:])
        try:
            lib = ctypes.CDLL(str(cached(f"wkv_cpu_{key}.so", build)))
        except (RuntimeError, OSError) as e:
            errors.append(str(e))
            continue
        for name, n_ptr in (("wkv_forward", 5), ("wkv_backward", 10), ("biwkv_forward", 6), ("biwkv_backward", 11)):
            getattr(lib, "cpu_" + name).argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * n_ptr + [ctypes.c_int]
        return lib, None
    return None, f"{cxx} could not build wkv.cu for the CPU (fix the compiler, or set CXX):\n" + "\n".join(errors)


@functools.lru_cache(maxsize=None)
def cuda_module():
    import cupy  # kernel_problem() has checked that it is there
    return cupy.RawModule(code=Path(WKV_CU).read_text(), options=NVRTC_OPTIONS)  # compiled per device, cached


def cupy_stream(cupy, stream):
    """torch's CUDA stream as cupy's, so the kernels queue behind torch's work (from_external: CuPy 14+)."""
    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, stream.device_index)


def _launch(kernel, k, *tensors):
    """wkv.cu's `kernel` on float32 contiguous tensors (B, T, C = k.shape; + biwkv's scratch), by cupy or g++."""
    B, T, C = k.shape
    tensors += (k.new_empty(BIWKV_WORK * k.numel()),) if kernel.startswith("biwkv") else ()
    if not k.is_cuda:
        return getattr(cpu_kernels(), "cpu_" + kernel)(B, T, C, *(t.data_ptr() for t in tensors),
                                                       torch.get_num_threads())
    import cupy
    with cupy.cuda.Device(k.device.index), cupy_stream(cupy, torch.cuda.current_stream(k.device)):
        args = [np.int32(B), np.int32(T), np.int32(C)] + [cupy.from_dlpack(t) for t in tensors]  # zero-copy
        cuda_module().get_function(kernel)(((B * C + WKV_BLOCK - 1) // WKV_BLOCK,), (WKV_BLOCK,), tuple(args))


class WKVFunction(torch.autograd.Function):
    """wkv.cu's wkv_forward / wkv_backward as an autograd op: float32, contiguous, CUDA or CPU."""
    name = "wkv"

    @classmethod
    def forward(cls, ctx, w, u, k, v):
        y = torch.empty_like(k)
        _launch(f"{cls.name}_forward", k, w, u, k, v, y)
        ctx.save_for_backward(w, u, k, v, y)
        return y

    @classmethod
    def backward(cls, ctx, gy):
        w, u, k, v, y = ctx.saved_tensors
        gw, gu = k.new_empty(k.shape[0], k.shape[2]), k.new_empty(k.shape[0], k.shape[2])  # partial sums per batch
        gk, gv = torch.empty_like(k), torch.empty_like(k)
        _launch(f"{cls.name}_backward", k, w, u, k, v, y, gy.float().contiguous(), gw, gu, gk, gv)
        return gw.sum(0), gu.sum(0), gk, gv


class BiWKVFunction(WKVFunction):
    """wkv.cu's biwkv_forward / biwkv_backward as an autograd op, as WKVFunction."""
    name = "biwkv"
