"""
FaceRWKV: RWKV-4 for facial expression recognition, in one readable file.

The mixer is the RWKV-4 block of Peng et al. 2023 ("RWKV: Reinventing RNNs for the Transformer
Era"), written to match the reference RWKV-LM v4 model (BlinkDL/RWKV-LM, RWKV-v4neo/src/model.py):
same equations, same parameter names and shapes (`blocks.{i}.att.time_decay`, ...), same "fancy"
init of the time parameters. Around it sits the ViT-style sequencing of the FaceRWKV paper
(Vierling et al., COMP4771): cut the image (or the 64-channel map of a ResNet50 stem, "hybrid")
into P x P patches, project each to d channels, run the sequence through the blocks, pool (last
token or mean) and classify with an MLP or linear head.

Every RWKV model here can also run as an RNN (`FaceRWKV.forward_rnn`): one patch at a time with
a fixed-size state per layer, giving the same logits as the parallel `forward`.

Read top to bottom: the WKV operator (the recurrence in torch, and wkv.cu on GPU or CPU), config,
the RWKV-4 block (time-mix, channel-mix), the comparison mixers (transformer, identity),
sequencing (patches, ResNet50 stem), and the full model last.
"""

import ctypes
import functools
import hashlib
import math
import os
import platform
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
# The WKV operator (RWKV-4), the heart of the time-mix.
#
#   y_t = ( sum_{i<t} e^{-(t-1-i) w + k_i} v_i  +  e^{u + k_t} v_t )
#       / ( sum_{i<t} e^{-(t-1-i) w + k_i}      +  e^{u + k_t}     )      per channel
#
# w > 0 is the decay rate (the module stores time_decay = log w), u = time_first is the bonus
# the current token gets. One algorithm, three runtimes, all computing in float32:
#   * CUDA:  wkv.cu compiled by NVRTC through cupy.RawModule, launched on torch's stream;
#   * CPU:   the same unmodified wkv.cu compiled by g++ behind _CPU_SHIM (a few lines of fake
#            CUDA), called through ctypes -- each "CUDA thread" becomes a loop over CPU_LANES
#            channels that g++ vectorises, and the threads are shared out over host threads;
#   * torch: the RNN written out below, differentiated by autograd; the fallback when no C++
#            compiler is found (slower, same numbers up to float rounding).

WKV_CU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wkv.cu")
WKV_BLOCK = 128  # CUDA threads per block; one thread per (batch, channel) on the GPU
NVRTC_OPTIONS = ("-std=c++17",)  # what the GPU path compiles wkv.cu with


def wkv_step(w, u, k, v, state):
    """One token of the WKV recurrence (the RNN mode of RWKV-4): k, v (B, C) and the state
    (aa, bb, pp) -> (y (B, C), new state). The numerator and denominator sums over past tokens
    are kept as a = aa*e^pp and b = bb*e^pp, where pp is the largest exponent seen so far, so no
    exp() ever overflows (the "max trick"). The empty state is (0, 0, -1e38)."""
    aa, bb, pp = state
    # output: the decayed past plus the current token with its bonus e^u
    ww = u + k
    p = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    # state: every past token decays by e^{-w} (the real decay); the current one joins without bonus
    ww = pp - w
    p = torch.maximum(ww, k)
    e1, e2 = torch.exp(ww - p), torch.exp(k - p)
    return y, (e1 * aa + e2 * v, e1 * bb + e2, p)


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


# Just enough CUDA for g++ to compile wkv.cu as ordinary C++: the kernel qualifiers vanish,
# threadIdx/blockIdx become thread_local globals, and launch() runs every (block, thread) of a
# 1-D grid, sharing the blocks out over a few host threads. Each CPU "thread" handles
# CPU_LANES adjacent channels, the loop that a GPU warp runs in lock-step (see wkv.cu).
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
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
#include "@WKV_CU@"

template <typename Kernel>
static void launch(long long n_threads, int block, int n_workers, Kernel kernel) {
    gridDim.x = (unsigned int)((n_threads + block - 1) / block);
    blockDim.x = block;
    auto work = [&](unsigned int first) {
        for (unsigned int b = first; b < gridDim.x; b += n_workers) {
            blockIdx.x = b;
            for (unsigned int t = 0; t < blockDim.x; t++) { threadIdx.x = t; kernel(); }
        }
    };
    std::vector<std::thread> pool;
    for (int i = 1; i < n_workers; i++) pool.emplace_back(work, i);
    work(0);
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
"""
# Compiler flags, fastest first: native vector instructions with glibc's vector expf (libmvec),
# then a plain portable build. No -ffast-math: the only licence taken is -ffinite-math-only
# (inputs are finite; the "empty state" exponent is -1e38, not -inf), which lets g++ turn
# fmaxf and the lane loops into branch-free vector code.
_CPU_BUILDS = (
    ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-ffinite-math-only", "-DWKV_VECTOR_EXP", "-lmvec"],
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


@functools.lru_cache(maxsize=None)
def cpu_kernels():
    """wkv.cu built for the host as a shared library (cached on disk), or None when no C++
    compiler is available or no build succeeds (then wkv() falls back to wkv_torch)."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        warnings.warn(f"FaceRWKV: no C++ compiler ({cxx}) found; the WKV operator falls back to "
                      "plain torch, which is many times slower. Install g++ or set CXX.")
        return None
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
        return lib
    warnings.warn("FaceRWKV: building wkv.cu for the CPU failed; falling back to plain torch.\n" + "\n".join(errors))
    return None


def _launch_cpu(name, B, T, C, *tensors):
    getattr(cpu_kernels(), "cpu_wkv_" + name)(B, T, C, *(t.data_ptr() for t in tensors), torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def cuda_module():
    try:
        import cupy  # only a GPU needs cupy
    except ImportError as e:
        raise ImportError("the WKV kernel on a GPU needs cupy: pip install cupy-cuda12x "
                          "(or cupy-cuda13x, to match your CUDA driver)") from e
    with open(WKV_CU) as f:
        return cupy.RawModule(code=f.read(), options=NVRTC_OPTIONS)  # compiled per device, cached


def _launch_cuda(name, B, T, C, *tensors):
    import cupy
    device = tensors[0].device
    with cupy.cuda.Device(device.index), cupy.cuda.Stream.from_external(torch.cuda.current_stream(device)):
        kernel = cuda_module().get_function("wkv_" + name)
        args = [np.int32(B), np.int32(T), np.int32(C)] + [cupy.from_dlpack(t) for t in tensors]  # zero-copy
        kernel(((B * C + WKV_BLOCK - 1) // WKV_BLOCK,), (WKV_BLOCK,), tuple(args))  # WKV_LANES = 1


class WKVFunction(torch.autograd.Function):
    """wkv.cu as an autograd op: float32, contiguous inputs, on CUDA (cupy) or CPU (ctypes)."""

    @staticmethod
    def forward(ctx, w, u, k, v):
        B, T, C = k.shape
        launch = _launch_cuda if k.is_cuda else _launch_cpu
        y = torch.empty_like(k)
        launch("forward", B, T, C, w, u, k, v, y)
        ctx.save_for_backward(w, u, k, v, y)
        return y

    @staticmethod
    def backward(ctx, gy):
        w, u, k, v, y = ctx.saved_tensors
        B, T, C = k.shape
        launch = _launch_cuda if k.is_cuda else _launch_cpu
        gw, gu = k.new_empty(B, C), k.new_empty(B, C)
        gk, gv = torch.empty_like(k), torch.empty_like(k)
        launch("backward", B, T, C, w, u, k, v, y, gy.float().contiguous(), gw, gu, gk, gv)
        return gw.sum(0), gu.sum(0), gk, gv


def wkv(w, u, k, v, backend=None):
    """The WKV operator: w, u (C,), k, v (B, T, C) -> y (B, T, C), differentiable in all four.

    Computed in float32 whatever the input dtype (y comes back in k's dtype). backend: None
    picks the kernel ("cuda" for CUDA tensors, "cpu" else, plain torch if no compiler), or force
    "kernel" / "torch"; the environment variable FACERWKV_WKV=torch forces the fallback.
    """
    if k.dim() != 3 or v.shape != k.shape or w.shape != (k.shape[2],) or u.shape != w.shape:
        raise ValueError(f"wkv expects w, u of shape (C,) and k, v of shape (B, T, C); got "
                         f"w {tuple(w.shape)}, u {tuple(u.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    backend = backend or os.environ.get("FACERWKV_WKV", "kernel")
    if backend not in ("kernel", "torch"):
        raise ValueError(f"wkv backend must be 'kernel' or 'torch', got {backend!r}")
    dtype = k.dtype
    w, u, k, v = (x.float().contiguous() for x in (w, u, k, v))
    if backend == "torch" or (not k.is_cuda and cpu_kernels() is None):
        return wkv_torch(w, u, k, v).to(dtype)
    return WKVFunction.apply(w, u, k, v).to(dtype)


# -----------------------------------------------------------------------------
# Configuration

OPTIONS = {
    "backbone": ("none", "resnet50"),
    "pool": ("last", "mean"),
    "head": ("mlp", "linear"),
    "mixer": ("rwkv", "transformer", "identity"),
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
    # Inputs are ImageNet-normalised, (x - mean) / std per colour, by the data pipeline (not here).
    # For patch models this is not cosmetic: a raw [0, 1] patch is dominated by its mean brightness,
    # and the LayerNorm after the projection then sees mostly colour. On the synthetic demo the
    # small model reaches 67.9 % test without it and 93.3 % with it (same data, same 6 epochs).
    imagenet_norm: bool = True
    pos_emb: bool = False         # learned positional embedding added to the patch tokens
    pool: str = "last"            # "last" token (the paper) | "mean" over tokens
    head: str = "mlp"             # "mlp" (Linear d->d, ReLU, Linear d->classes) | "linear"
    mixer: str = "rwkv"           # "rwkv" | "transformer" (comparison) | "identity" ("w/o RWKV")

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
    """x_{t-1} for every t, zero for t = 0: (B, T, C) -> (B, T, C)."""
    return F.pad(x, (0, 0, 1, -1))


def lerp(x, x_prev, mix):
    """x * mix + x_prev * (1 - mix) per channel: mix=1 keeps the current token, mix=0 takes the
    previous one. (One fused op: on the CPU the time-mix is bound by such elementwise passes.)"""
    return torch.lerp(x_prev, x, mix)


def init_linear_(linear, zero=False):
    """The reference init of a Linear: orthogonal, gain sqrt(out/in) when it widens, or zeros."""
    if zero:
        nn.init.zeros_(linear.weight)
    else:
        out_features, in_features = linear.weight.shape
        nn.init.orthogonal_(linear.weight, gain=math.sqrt(max(1.0, out_features / in_features)))


# Which Linear layers start at zero. The reference zero-inits these five: every block starts as
# the identity (att.output = ffn.value = 0), all keys are equal (k = 0, so WKV starts as a plain
# decaying average) and every receptance gate is half open (sigmoid(0)). Zeros do train: the two
# output projections get gradients at once, the rest from the second step on. Is that a good
# start for a vision model trained from scratch? On a small synthetic task (which of 6 cells of
# a noisy 40x60 image holds a blob, 24 patches, d=64, L=2, Adam 1e-3, 400 steps, 3 seeds) this
# reached 0.87 test accuracy and the lowest training loss, vs 0.86 with orthogonal init
# everywhere and 0.84 zeroing only att.output and ffn.value. An edge within the seed noise, but
# no reason to depart from the reference: we keep its choice.
ZERO_INIT = ("att.key", "att.receptance", "att.output", "ffn.value", "ffn.receptance")


class TimeMix(nn.Module):
    """RWKV-4 time-mix: a linear-attention over past tokens with a learned per-channel decay."""

    def __init__(self, config, layer_id):
        super().__init__()
        d, A, L = config.n_embd, config.dim_att, config.n_layer
        ratio_0_to_1 = layer_id / (L - 1) if L > 1 else 0.0  # 0 in the first layer, 1 in the last
        ratio_1_to_almost0 = 1.0 - layer_id / L              # 1 in the first layer, 1/L in the last
        channel = torch.arange(A, dtype=torch.float32)
        # time_decay is the LOG of the decay rate w: the real per-step decay is e^{-w} = e^{-e^time_decay}.
        # Channels range from w = e^-5 (factor 0.993 per step: long memory) to w = e^3 (factor e^-20:
        # forgets at once); deeper layers have more slow channels.
        self.time_decay = nn.Parameter(-5 + 8 * (channel / max(A - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1))
        # time_first (u) is the bonus of the current token, a zigzag around ln(0.3).
        self.time_first = nn.Parameter(math.log(0.3) + 0.5 * ((channel + 1) % 3 - 1))
        # time_mix_*: how much of the current vs the previous token feeds k, v, r (per channel).
        ddd = (torch.arange(d, dtype=torch.float32) / d).view(1, 1, d)
        self.time_mix_k = nn.Parameter(ddd ** ratio_1_to_almost0)
        self.time_mix_v = nn.Parameter(ddd ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1)
        self.time_mix_r = nn.Parameter(ddd ** (0.5 * ratio_1_to_almost0))
        self.key = nn.Linear(d, A, bias=False)
        self.value = nn.Linear(d, A, bias=False)
        self.receptance = nn.Linear(d, A, bias=False)
        self.output = nn.Linear(A, d, bias=False)
        for name in ("key", "value", "receptance", "output"):
            init_linear_(getattr(self, name), zero=f"att.{name}" in ZERO_INIT)

    def forward(self, x):
        xx = token_shift(x)                                # (B, T, d)
        k = self.key(lerp(x, xx, self.time_mix_k))         # (B, T, A)
        v = self.value(lerp(x, xx, self.time_mix_v))       # (B, T, A)
        r = self.receptance(lerp(x, xx, self.time_mix_r))  # (B, T, A)
        # WKV_t: average of v_i over i <= t weighted by e^{k_i} and decayed by e^{-w} per step back;
        # sigmoid(r) decides how much of it each channel lets through.
        y = wkv(torch.exp(self.time_decay), self.time_first, k, v)  # (B, T, A)
        return self.output(torch.sigmoid(r) * y)           # (B, T, d)

    def init_state(self, batch_size, device, dtype):
        """RNN state: previous x, and the WKV sums aa (numerator), bb (denominator), pp (their scale)."""
        acc = torch.promote_types(dtype, torch.float32)  # keep the running sums in >= float32
        x_prev = torch.zeros(batch_size, self.key.in_features, device=device, dtype=dtype)
        aa = torch.zeros(batch_size, self.key.out_features, device=device, dtype=acc)
        bb = torch.zeros_like(aa)
        pp = torch.full_like(aa, -1e38)  # log-scale of aa, bb; "minus infinity" = nothing seen yet
        return x_prev, aa, bb, pp

    def step(self, x, state):
        """One token as an RNN. x: (B, d), state from init_state/step. Returns (out (B, d), new state)."""
        x_prev, aa, bb, pp = state
        k = self.key(lerp(x, x_prev, self.time_mix_k.view(-1))).to(aa.dtype)  # (B, A)
        v = self.value(lerp(x, x_prev, self.time_mix_v.view(-1))).to(aa.dtype)
        r = self.receptance(lerp(x, x_prev, self.time_mix_r.view(-1)))
        w, u = torch.exp(self.time_decay).to(aa.dtype), self.time_first.to(aa.dtype)
        y, (aa, bb, pp) = wkv_step(w, u, k, v, (aa, bb, pp))  # (B, A)
        out = self.output(torch.sigmoid(r) * y.to(r.dtype))  # (B, d)
        return out, (x, aa, bb, pp)


class ChannelMix(nn.Module):
    """RWKV-4 channel-mix: a squared-ReLU MLP on the token-shifted input, gated by sigmoid(r)."""

    def __init__(self, config, layer_id):
        super().__init__()
        d, L = config.n_embd, config.n_layer
        ratio_1_to_almost0 = 1.0 - layer_id / L
        ddd = (torch.arange(d, dtype=torch.float32) / d).view(1, 1, d)
        self.time_mix_k = nn.Parameter(ddd ** ratio_1_to_almost0)
        self.time_mix_r = nn.Parameter(ddd ** ratio_1_to_almost0)
        self.key = nn.Linear(d, config.dim_ffn, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(config.dim_ffn, d, bias=False)
        for name in ("key", "receptance", "value"):
            init_linear_(getattr(self, name), zero=f"ffn.{name}" in ZERO_INIT)

    def mix(self, x, x_prev):
        # x, x_prev: (B, T, d) in parallel mode or (B, d) in RNN mode; mixes flattened to (d,) fit both
        k = torch.relu(self.key(lerp(x, x_prev, self.time_mix_k.view(-1)))).square()  # (..., dim_ffn)
        r = self.receptance(lerp(x, x_prev, self.time_mix_r.view(-1)))           # (..., d)
        return torch.sigmoid(r) * self.value(k)

    def forward(self, x):
        return self.mix(x, token_shift(x))  # (B, T, d)

    def step(self, x, x_prev):
        """One token: x, x_prev (B, d) -> (out (B, d), x as the next token's x_prev)."""
        return self.mix(x, x_prev), x


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
    """The "w/o RWKV" ablation (Table 5): the block passes tokens through untouched. Nothing mixes
    the patches then, so with pool="last" the head sees only the bottom-right patch."""

    def forward(self, x):
        return x

    def init_state(self, batch_size, device, dtype):
        return ()

    def step(self, x, state):
        return x, state


# -----------------------------------------------------------------------------
# Sequencing: image (or stem feature map) -> sequence of patch tokens

class PatchEmbed(nn.Module):
    """Cut a (B, C, H, W) map into P x P patches in raster order (row by row, left to right),
    flatten each as (channel, row, col) -- the layout of a Conv2d(C, d, P, stride=P) weight --
    project to d with a Linear, then LayerNorm. The LayerNorm plays the role of the reference
    LM's `ln0` (applied once before block 0), so the blocks get no extra ln0."""

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
    """The first four children of torchvision's resnet50 (conv1, bn1, relu, maxpool): 3 -> 64
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


# -----------------------------------------------------------------------------
# The full model

class FaceRWKV(nn.Module):
    """images (B, 3, H, W) -> [ResNet50 stem] -> patch tokens (B, T, d) [+ positions] -> blocks
    -> final LayerNorm -> pool (last token or mean) -> head -> logits (B, n_classes)."""

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
        # learned absolute positions (ViT style), only when asked for: RWKV already knows the order
        self.pos_emb = nn.Parameter(0.02 * torch.randn(1, config.n_tokens, d)) if config.pos_emb else None
        if config.mixer == "rwkv":
            self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        elif config.mixer == "transformer":
            self.blocks = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layer)])
        else:
            self.blocks = nn.ModuleList([IdentityBlock() for _ in range(config.n_layer)])
        self.ln_out = nn.LayerNorm(d)  # final LayerNorm before pooling, as the reference LM's ln_out
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
        """Print (and return) trainable / total parameters per part of the model."""
        c = self.config
        lines = [f"FaceRWKV {c.mixer} L={c.n_layer} d={c.n_embd} dim_att={c.dim_att} dim_ffn={c.dim_ffn} "
                 f"backbone={c.backbone} tokens={c.n_tokens} ({c.grid[0]}x{c.grid[1]} patches of {c.patch_size})"]
        for name, module in self.named_children():
            params = list(module.parameters())
            total = sum(p.numel() for p in params)
            trainable = sum(p.numel() for p in params if p.requires_grad)
            lines.append(f"  {name:<12} {trainable:>12,} trainable / {total:>12,}")
        if self.pos_emb is not None:
            lines.append(f"  {'pos_emb':<12} {self.pos_emb.numel():>12,} trainable / {self.pos_emb.numel():>12,}")
        lines.append(f"  {'total':<12} {self.num_params(True):>12,} trainable / {self.num_params():>12,}")
        text = "\n".join(lines)
        print(text)
        return text
