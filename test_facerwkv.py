"""
FaceRWKV's tests. All of them run on a CPU-only machine; those that need a GPU, nvcc or NVRTC
skip and say why.

    python -m pytest -q test_facerwkv.py test_train.py    # everything
    python -m pytest -q test_facerwkv.py -k test_wkv      # one section

Each section's tests are named test_<keyword>_..., so `-k test_<keyword>` selects exactly that
section (a bare `-k wkv` would also match this file's own name, and so select every test). Every
file a test writes goes under pytest's temporary folder (FACERWKV_CACHE included: conftest.py).

  WKV and Bi-WKV compute what their formulas say                       -k test_wkv  (Bi-WKV: -k biwkv)
      the references: each formula summed term by term, a float64 numpy RNN, the torch RNN;
      wkv.cu on the CPU (g++ behind a CUDA shim) and the torch fallback: output and gradients,
      T = 1 to 4096; the kernels called directly; the rules and the ABI of wkv.cu; the nvcc and
      NVRTC builds and a CUDA device; the runtimes (cupy streams, backends, two Python threads,
      torch's OpenMP threads)
  The model                                                            -k test_model
      the RWKV-4 and Vision-RWKV blocks against their papers' equations, with RWKV-LM's and
      Vision-RWKV's parameter names; RNN mode equals parallel mode; every variant (Vision-RWKV's
      too) trains a step off the reference init; the ResNet50 stem; the config; weight files
      (a pickle that would run code runs nothing; every refusal one line, from a table), the
      digest-checked private cache (the real library damaged or planted; damage kinds on a small
      entry), the shared transformer block against attention written out, run_rnn
  The Vision-RWKV mixer                  -k test_vrwkv  (every Vision-RWKV case, the model's too: -k vrwkv)
      Q-Shift against a loop; RWKV-4's init; sees the whole image; several grids; no RNN mode (nor
      the transformer's); Vision-RWKV's checkpoints against its forward written out
  The mixers' weights (what train.py --explain draws)                  -k test_explain
      eq. 14's and Bi-WKV's terms over their sum, each mixer's (attention's too) and the pooled
      token's, layer by layer, FaceRWKV's and POSTER's: applied to v, each layer's output
  POSTER V2 and POSTER-RWKV                                            -k test_poster
      every stage's shape at 224 (one POSTER V2, built once: conftest.py) and the published 43.7 M
      (counted on the meta device); the token mixers; weight files of
      both IR-50 namings and MobileFaceNet's, the frozen landmark branch; the config; the
      cross-attention and the whole forward at order-one weights against POSTER V2 written out;
      POSTER V2's released checkpoint format (7 and 8 classes, class orders, errors name keys)

The data and train.py have their own file, test_train.py.
"""

import errno
import functools
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import types
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import facerwkv
from facerwkv import Block, FaceRWKV, FaceRWKVConfig, TransformerBlock, VRWKVBlock
from poster import (LandmarkCrossAttention, PosterConfig, PosterRWKV, gdc_head_params,
                    ir50_keys_from_arcface, poster_param_count, posterv2_class_map, posterv2_state_dict)


# ---- WKV and Bi-WKV compute what their formulas say (-k test_wkv) ------------------------------
# wkv_naive is the paper's formula summed term by term, O(T^2); wkv_reference, a float64 numpy RNN,
# is checked against it, and the float64 torch RNN against wkv_reference and by gradcheck. Every
# implementation's output is held to these, and its gradients to float64 autograd of the formula
# (of the torch RNN at T = 4096 and on the GPU). Errors are max|diff| / max|ref| (fp32 vs float64).


def wkv_reference(w, u, k, v):
    """float64 numpy, RNN mode with the max trick, as in wkv.cu; w, u (C,), k, v (B, T, C)."""
    B, T, C = k.shape
    y = np.zeros((B, T, C))
    aa, bb, pp = np.zeros((B, C)), np.zeros((B, C)), np.full((B, C), -1e38)
    for t in range(T):
        kk, vv = k[:, t], v[:, t]
        ww = u + kk
        p = np.maximum(pp, ww)
        e1, e2 = np.exp(pp - p), np.exp(ww - p)
        y[:, t] = (e1 * aa + e2 * vv) / (e1 * bb + e2)
        ww = pp - w
        p = np.maximum(ww, kk)
        e1, e2 = np.exp(ww - p), np.exp(kk - p)
        aa, bb, pp = e1 * aa + e2 * vv, e1 * bb + e2, p
    return y


def wkv_naive(w, u, k, v, lib=np):
    """The paper's formula summed term by term, O(T^2); works for numpy and torch float64."""
    T = k.shape[1]
    t = lib.arange(T)
    dist = (t[:, None] - 1 - t[None, :]) * 1.0                 # (T, T): t-1-i
    past = t[None, :] < t[:, None]                             # i < t
    expo = -dist[None, :, :, None] * w + k[:, None, :, :]      # (B, T, T, C)
    expo = lib.where(past[None, :, :, None], expo, -lib.inf * lib.ones_like(expo))
    cur = u + k                                                # (B, T, C)
    m = lib.maximum(expo.max(2) if lib is np else expo.amax(2), cur)  # shift by the max: no overflow
    num = (lib.exp(expo - m[:, :, None]) * v[:, None]).sum(2) + lib.exp(cur - m) * v
    den = lib.exp(expo - m[:, :, None]).sum(2) + lib.exp(cur - m)
    return num / den


def rel_err(x, ref):
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30)


def make_inputs(B, T, C, extreme=False, seed=0):
    """float32 inputs (so float64 references see exactly the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    if extreme:  # k spans +-60 (plain exp overflows fp32 at 88), decay rates 1e-4..20, bonus +-10
        w = torch.exp(torch.empty(C).uniform_(np.log(1e-4), np.log(20.0), generator=g))
        u = torch.empty(C).uniform_(-10, 10, generator=g)
        k = torch.empty(B, T, C).uniform_(-60, 60, generator=g)
    else:
        w = torch.exp(torch.randn(C, generator=g) - 1)
        u = torch.randn(C, generator=g)
        k = torch.randn(B, T, C, generator=g)
    v = torch.randn(B, T, C, generator=g)
    gy = torch.randn(B, T, C, generator=g)
    return [x.float() for x in (w, u, k, v)], gy.float()


def as_f64(xs):
    return [x.double().numpy() for x in xs]


def grads(fn, inputs, gy, dtype):
    xs = [x.to(dtype).clone().requires_grad_() for x in inputs]
    y = fn(*xs)
    g = torch.autograd.grad(y, xs, gy.to(dtype), allow_unused=True, materialize_grads=True)
    return y.detach(), g


def assert_close(y, g, y_ref, g_ref, ytol, gtol):
    """The output and the gradients of w, u, k and v are finite and within tolerance of the float64 reference's."""
    assert torch.isfinite(y).all() and rel_err(y.cpu(), y_ref) <= ytol, rel_err(y.cpu(), y_ref)
    for name, a, b in zip("wukv", g, g_ref):
        assert torch.isfinite(a).all() and rel_err(a.cpu(), b) <= gtol, (name, rel_err(a.cpu(), b))


# ---- Bi-WKV (Vision-RWKV's bidirectional WKV): the same references, both directions ------------

def biwkv_reference(w, u, k, v):
    """float64 numpy: the RWKV-4 state (max trick) scanned from the left and from the right,
    exclusive, combined with the current token at the common max. w, u (C,), k, v (B, T, C)."""
    B, T, C = k.shape

    def exclusive_scan(order):
        a, b, p = np.zeros((B, C)), np.zeros((B, C)), np.full((B, C), -1e38)
        out = np.zeros((3, B, T, C))
        for t in order:
            out[:, :, t] = a, b, p
            ww = p - w
            q = np.maximum(ww, k[:, t])
            e1, e2 = np.exp(ww - q), np.exp(k[:, t] - q)
            a, b, p = e1 * a + e2 * v[:, t], e1 * b + e2, q
        return out

    a, b, p = exclusive_scan(range(T))
    c, d, q = exclusive_scan(range(T - 1, -1, -1))
    cur = u + k
    m = np.maximum(np.maximum(p, q), cur)
    e_a, e_c, e_u = np.exp(p - m), np.exp(q - m), np.exp(cur - m)
    return (e_a * a + e_c * c + e_u * v) / (e_a * b + e_c * d + e_u)


def biwkv_naive(w, u, k, v, lib=np):
    """Vision-RWKV's Bi-WKV term by term, O(T^2): y_t is the average of v_i weighted by
    e^{-(|t-i|-1) w + k_i} (i != t) and e^{u + k_t} (i = t). numpy or torch, float64."""
    T = k.shape[1]
    t = lib.arange(T)
    dist = lib.abs(t[:, None] - t[None, :]) * 1.0 - 1.0        # (T, T): |t-i| - 1
    expo = -dist[None, :, :, None] * w + k[:, None, :, :]      # (B, T, T, C): [b, t, i, c]
    eye = (t[:, None] == t[None, :])[None, :, :, None]
    cur = (u + k)[:, :, None, :]                               # (B, T, 1, C)
    expo = lib.where(eye, cur + 0 * expo, expo)
    m = expo.max(2, keepdims=True) if lib is np else expo.amax(2, keepdim=True)
    weight = lib.exp(expo - m)
    return (weight * v[:, None]).sum(2) / weight.sum(2)


def make_bi_inputs(B, T, C, extreme=False, seed=0):
    """As make_inputs, with w of either sign: extreme w in [-1, 20] (k in +-60, u in +-10), else w in [-1, 2]."""
    (_, u, k, v), gy = make_inputs(B, T, C, extreme=extreme, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.empty(C).uniform_(-1.0, 20.0 if extreme else 2.0, generator=g)
    return [w, u, k, v], gy


# op name -> (the operator, its torch fallback, the O(T^2) formula, the numpy RNN, the inputs)
OPS = {"wkv": (facerwkv.wkv, facerwkv.wkv_torch, wkv_naive, wkv_reference, make_inputs),
       "biwkv": (facerwkv.biwkv, facerwkv.biwkv_torch, biwkv_naive, biwkv_reference, make_bi_inputs)}
CASES = [  # (B, T, C, extreme, y tolerance, gradient tolerance)
    (2, 17, 5, False, 1e-5, 1e-4),
    (3, 1, 5, False, 1e-5, 1e-4),     # T = 1: no past (nor future) at all
    (2, 2, 3, False, 1e-5, 1e-4),     # T = 2: Bi-WKV has no decay step at all (|t-i| - 1 = 0)
    (3, 64, 33, False, 1e-5, 1e-4),   # odd B*C, C not a multiple of 32
    (1, 130, 129, False, 1e-5, 1e-4), # B*C spills into a second block of threads (and a third lane group)
    (2, 96, 11, True, 1e-4, 1e-3),
]
LONG = (2, 4096, 40, True, 1e-4, 1e-3)  # on a GPU
requires_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                  reason="no C++ compiler: the CPU build of wkv.cu cannot be made")


# ---- WKV and Bi-WKV: the references --------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_wkv_reference_matches_naive_formula(op):
    _, _, naive, reference, make = OPS[op]
    for extreme, tol in ((False, 1e-12), (True, 1e-10)):
        xs, _ = make(2, 40, 6, extreme=extreme)
        assert rel_err(reference(*as_f64(xs)), naive(*as_f64(xs))) < tol


def test_wkv_biwkv_halves_are_rwkv4s_wkv():
    # the last token has no future, the first none past (WKV reversed); a middle one sees both ways
    w, u, k, v = as_f64(make_bi_inputs(2, 9, 3)[0])
    y = biwkv_naive(w, u, k, v)
    assert rel_err(y[:, -1], wkv_naive(w, u, k, v)[:, -1]) < 1e-14
    assert rel_err(y[:, 0], wkv_naive(w, u, k[:, ::-1], v[:, ::-1])[:, -1]) < 1e-14
    assert rel_err(y[:, 4], wkv_naive(w, u, k, v)[:, 4]) > 1e-3


@pytest.mark.parametrize("op", OPS)
def test_wkv_torch_float64_matches_reference_and_gradcheck(op):
    _, torch_op, _, reference, make = OPS[op]
    xs, _ = make(3, 50, 7, extreme=True)
    assert rel_err(torch_op(*(x.double() for x in xs)), reference(*as_f64(xs))) < 1e-12
    xs, _ = make(2, 6, 3)
    assert torch.autograd.gradcheck(torch_op, [x.double().requires_grad_() for x in xs])


# ---- WKV and Bi-WKV: wkv.cu on the CPU (g++ behind a CUDA shim) and the torch fallback ----------

@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("B,T,C,extreme,ytol,gtol", CASES)
@pytest.mark.parametrize("op", OPS)
def test_wkv_matches_float64_formula(op, backend, B, T, C, extreme, ytol, gtol):
    if backend == "kernel" and facerwkv.cpu_kernels() is None:
        pytest.skip("no C++ compiler: the CPU build of wkv.cu is unavailable")
    fn, _, naive, reference, make = OPS[op]
    inputs, gy = make(B, T, C, extreme=extreme, seed=B * T + C)
    y_ref, g_ref = grads(lambda *a: naive(*a, lib=torch), inputs, gy, torch.float64)
    assert rel_err(y_ref, reference(*as_f64(inputs))) < 1e-10
    y, g = grads(lambda *a: fn(*a, backend=backend), inputs, gy, torch.float32)
    assert y.dtype == torch.float32
    assert_close(y, g, y_ref, g_ref, ytol, gtol)


@requires_cxx
@pytest.mark.parametrize("op", OPS)
def test_wkv_cpu_kernel_long_sequence(op):
    # T = 4096: no compile-time cap on T; the float64 torch RNN (checked above) is the reference.
    # Bi-WKV: a growing channel (w = -1: the sums' exponents reach 4096) and a decaying one
    fn, torch_op, _, _, make = OPS[op]
    inputs, gy = make(1, 4096, 8, extreme=True, seed=7)
    if op == "biwkv":
        inputs[0][:2] = torch.tensor([-1.0, 20.0])
    y_ref, g_ref = grads(torch_op, inputs, gy, torch.float64)
    y, g = grads(lambda *a: fn(*a, backend="kernel"), inputs, gy, torch.float32)
    assert_close(y, g, y_ref, g_ref, 1e-4, 1e-3)


@requires_cxx
@pytest.mark.parametrize("op", OPS)
def test_wkv_kernels_called_directly(op):
    # the unmodified wkv.cu behind the CUDA shim, through ctypes on numpy; Bi-WKV's `work` is
    # exactly B*T*C*BIWKV_WORK floats, followed by a guard the kernels must not touch
    lib, (_, _, naive, reference, make) = facerwkv.cpu_kernels(), OPS[op]
    (w, u, k, v), gy = make(3, 45, 7, seed=3)
    w, u, k, v, gy = (np.ascontiguousarray(x.numpy()) for x in (w, u, k, v, gy))
    B, T, C = k.shape
    size = B * T * C * facerwkv.BIWKV_WORK
    work = np.full(size + 64, np.nan, np.float32)
    extra = [work.ctypes.data] if op == "biwkv" else []
    y = np.full_like(k, np.nan)
    ptr = lambda a: a.ctypes.data  # noqa: E731
    getattr(lib, f"cpu_{op}_forward")(B, T, C, ptr(w), ptr(u), ptr(k), ptr(v), ptr(y), *extra, 2)
    assert rel_err(y, reference(*(x.astype(np.float64) for x in (w, u, k, v)))) < 1e-5
    gw, gu = np.full((B, C), np.nan, np.float32), np.full((B, C), np.nan, np.float32)
    gk, gv = np.full_like(k, np.nan), np.full_like(k, np.nan)
    work[:size] = np.nan  # scratch: nothing may be read before it is written
    getattr(lib, f"cpu_{op}_backward")(B, T, C, ptr(w), ptr(u), ptr(k), ptr(v), ptr(y), ptr(gy),
                                       ptr(gw), ptr(gu), ptr(gk), ptr(gv), *extra, 2)
    assert np.isnan(work[size:]).all()
    _, g_ref = grads(lambda *a: naive(*a, lib=torch), [torch.from_numpy(x) for x in (w, u, k, v)],
                     torch.from_numpy(gy), torch.float64)
    for name, a, b in zip("wukv", (gw.sum(0), gu.sum(0), gk, gv), g_ref):
        assert rel_err(a, b.numpy()) < 1e-4, name


@pytest.mark.parametrize("op", OPS)
def test_wkv_dtypes_and_errors(op):
    fn = OPS[op][0]
    (w, u, k, v), _ = OPS[op][4](2, 9, 4)
    y32 = fn(w, u, k, v)
    for dtype in (torch.float64, torch.bfloat16):  # computed in fp32, returned in k's dtype
        y = fn(w, u, k.to(dtype), v.to(dtype))
        assert y.dtype == dtype
        assert torch.allclose(y.float(), y32, atol=0.05 if dtype == torch.bfloat16 else 1e-6)
    with pytest.raises(ValueError, match=rf"{op} expects .*\(B, T, C\)" if op == "biwkv" else "shape"):
        fn(w, u, k[0], v[0])
    with pytest.raises(ValueError, match="shape"):
        fn(w[:3], u, k, v)
    with pytest.raises(ValueError, match="None, 'kernel' or 'torch'" if op == "biwkv" else "backend"):
        fn(w, u, k, v, backend="cuda-please")


def test_wkv_kernel_source_follows_the_rules_and_the_abi():
    # every (batch, channel) independent: what lets the same file run as CUDA and as C++
    with open(facerwkv.WKV_CU) as f:
        text = f.read()
    source = re.sub(r"//.*", "", text)  # code only, not the comments that name the rules
    for banned in (r"__shared__", r"__syncthreads", r"atomic", r"__shfl", r"__ballot", r"_sync\(", r"\bmalloc\b",
                   r"\bnew\b"):
        assert not re.search(banned, source), banned
    for kernel in KERNELS:
        assert f'extern "C" __global__ void {kernel}(' in source
    assert int(re.search(r"#define BIWKV_WORK (\d+)", source).group(1)) == facerwkv.BIWKV_WORK
    # the exact signatures other tools call
    strip = lambda s: re.sub(r"\s*__restrict__\s*", " ", s).replace("( ", "(").replace(" )", ")")  # noqa: E731
    source = strip(" ".join(text.split()))
    assert strip('extern "C" __global__ void biwkv_forward(int B, int T, int C, const float* w, const float* u, '
                 'const float* k, const float* v, float* y, float* work)') in source
    assert strip('extern "C" __global__ void biwkv_backward(int B, int T, int C, const float* w, const float* u, '
                 'const float* k, const float* v, const float* y, const float* gy, float* gw, float* gu, '
                 'float* gk, float* gv, float* work)') in source


# ---- WKV and Bi-WKV: wkv.cu for the GPU (nvcc and NVRTC builds, a CUDA device) ------------------
KERNELS = ("wkv_forward", "wkv_backward", "biwkv_forward", "biwkv_backward")


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:  # cupy missing, or no NVRTC library next to it
        return None


def _gpu_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "cupy is not installed"
    return None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_wkv_cu_compiles_with_nvcc(arch, tmp_path):
    cubin = tmp_path / "wkv.cubin"
    out = subprocess.run([shutil.which("nvcc"), f"-arch={arch}", "-cubin", "-o", str(cubin), facerwkv.WKV_CU],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    symbols = cubin.read_bytes()  # an ELF file: the kernels' names are in its string table
    for kernel in KERNELS:
        assert b".text." + kernel.encode() + b"\x00" in symbols, kernel


@pytest.mark.skipif(_nvrtc() is None, reason="cupy with an NVRTC library is not installed")
@pytest.mark.parametrize("arch", ["compute_80", "sm_90"])
def test_wkv_cu_compiles_with_nvrtc(arch):
    # the options the GPU path hands to cupy.RawModule, plus the architecture cupy would add
    nvrtc = _nvrtc()
    with open(facerwkv.WKV_CU) as f:
        prog = nvrtc.createProgram(f.read(), "wkv.cu", (), ())
    try:
        nvrtc.compileProgram(prog, facerwkv.NVRTC_OPTIONS + (f"--gpu-architecture={arch}",))
    except Exception as e:
        pytest.fail(f"NVRTC failed: {e}\n{nvrtc.getProgramLog(prog)}")
    ptx = nvrtc.getPTX(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    for kernel in KERNELS:
        assert f".entry {kernel}(" in ptx, kernel


@pytest.mark.skipif(_gpu_reason() is not None, reason=f"GPU path: {_gpu_reason()}")
@pytest.mark.parametrize("B,T,C,extreme,ytol,gtol", CASES + [LONG])
@pytest.mark.parametrize("op", OPS)
def test_wkv_cuda_kernel_matches_reference(op, B, T, C, extreme, ytol, gtol):
    fn, torch_op, _, _, make = OPS[op]
    inputs, gy = make(B, T, C, extreme=extreme, seed=B * T + C)
    if op == "biwkv":
        inputs[0][0] = -1.0  # a growing channel
    y_ref, g_ref = grads(torch_op, inputs, gy, torch.float64)
    y, g = grads(lambda *a: fn(*a, backend="kernel"), [x.cuda() for x in inputs], gy.cuda(), torch.float32)
    assert_close(y, g, y_ref, g_ref, ytol, gtol)


# ---- WKV and Bi-WKV: the runtimes (cupy streams, explicit backends, two Python threads) ----------
def test_wkv_cupy_stream_picks_from_external_or_external_stream():
    torch_stream = types.SimpleNamespace(cuda_stream=0xABC, device_index=3)
    calls = []
    new = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Stream=types.SimpleNamespace(from_external=lambda s: calls.append(("from_external", s)) or "new"),
        ExternalStream=lambda *a: calls.append(("ExternalStream",) + a) or "old"))
    assert facerwkv.cupy_stream(new, torch_stream) == "new"
    assert calls == [("from_external", torch_stream)]
    calls.clear()
    old = types.SimpleNamespace(cuda=types.SimpleNamespace(  # CuPy < 14: no Stream.from_external
        Stream=types.SimpleNamespace(), ExternalStream=lambda *a: calls.append(("ExternalStream",) + a) or "old"))
    assert facerwkv.cupy_stream(old, torch_stream) == "old"
    assert calls == [("ExternalStream", 0xABC, 3)]


@pytest.fixture
def no_compiler(monkeypatch):
    """The CPU build fails (no compiler named CXX) for the duration of a test."""
    monkeypatch.setenv("CXX", "no-such-compiler-facerwkv")
    monkeypatch.delenv("FACERWKV_WKV", raising=False)
    facerwkv._cpu_build.cache_clear()
    facerwkv._warn_fallback.cache_clear()
    yield
    monkeypatch.undo()
    facerwkv._cpu_build.cache_clear()
    facerwkv._warn_fallback.cache_clear()


@pytest.mark.parametrize("op, fallback", [(facerwkv.wkv, facerwkv.wkv_torch), (facerwkv.biwkv, facerwkv.biwkv_torch)])
def test_wkv_explicit_kernel_backend_never_falls_back(no_compiler, monkeypatch, op, fallback):
    xs, _ = make_bi_inputs(2, 7, 3)
    if op is facerwkv.wkv:
        xs[0] = xs[0].abs()
    assert facerwkv.cpu_kernels() is None
    with pytest.raises(RuntimeError, match=r"backend='kernel'.*no C\+\+ compiler \(no-such-compiler-.*set CXX"):
        op(*xs, backend="kernel")
    monkeypatch.setenv("FACERWKV_WKV", "kernel")
    with pytest.raises(RuntimeError, match="no C"):
        op(*xs)
    monkeypatch.delenv("FACERWKV_WKV")
    with pytest.warns(UserWarning, match="fall back to plain torch"):
        y = op(*xs)  # backend=None: the fallback, saying why
    assert torch.equal(y, fallback(*xs))
    assert torch.equal(op(*xs, backend="torch"), y)


def test_wkv_backends_in_the_docstrings_are_the_accepted_ones():
    xs, _ = make_bi_inputs(1, 3, 2)
    xs[0] = xs[0].abs()
    named = set(re.findall(r'"(\w+)"', facerwkv.wkv.__doc__))  # biwkv's docstring refers to wkv's
    assert named == {"kernel", "torch"}
    for op in (facerwkv.wkv, facerwkv.biwkv):
        for backend in [None, *named]:
            op(*xs, backend=backend)
        with pytest.raises(ValueError, match="backend"):
            op(*xs, backend="cpu")


@requires_cxx
def test_wkv_two_python_threads_calling_the_kernels_at_once():
    # ctypes releases the GIL: both launches run at the same time in the CPU shim, whose
    # gridDim/blockDim must be per host thread. Different shapes give different grids.
    jobs = []
    for i, (B, T, C) in enumerate([(1, 300, 8), (16, 40, 300), (3, 100, 65), (9, 20, 129)]):
        xs, _ = make_bi_inputs(B, T, C, seed=i)
        op = facerwkv.wkv if i % 2 == 0 else facerwkv.biwkv
        if op is facerwkv.wkv:
            xs[0] = xs[0].abs()
        jobs.append((op, xs, op(*xs, backend="kernel")))  # one caller at a time
    errors = []

    def hammer(job_ids):
        for _ in range(30):
            for j in job_ids:
                op, xs, expected = jobs[j]
                if not torch.equal(op(*xs, backend="kernel"), expected):
                    errors.append(j)

    threads = [threading.Thread(target=hammer, args=(ids,)) for ids in ([0, 1], [2, 3], [1, 0], [3, 2])]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, f"concurrent calls differ from serial ones: jobs {sorted(set(errors))}"


@requires_cxx
def test_wkv_cpu_kernels_on_torch_threads_equal_one_thread():
    """The g++ build shares a launch's (batch, channel-group) blocks out over torch's OpenMP threads:
    outputs and all four gradients are bit-identical on 1 and 2 threads (blocks are independent, the
    block index is per thread), and the process holds a single OpenMP runtime, torch's."""
    threads = torch.get_num_threads()
    try:
        for op in (facerwkv.wkv, facerwkv.biwkv):
            xs, gy = make_bi_inputs(5, 37, 300, seed=3)  # 5 x 5 blocks of up to 64 channels
            xs[0] = xs[0].abs() if op is facerwkv.wkv else xs[0]  # WKV's decay rate is positive
            results = []
            for n in (1, 2):
                torch.set_num_threads(n)
                leaves = [x.clone().requires_grad_() for x in xs]
                op(*leaves, backend="kernel").backward(gy)
                results.append([op(*xs, backend="kernel")] + [x.grad for x in leaves])
            assert all(torch.equal(a, b) for a, b in zip(*results)), op.__name__
    finally:
        torch.set_num_threads(threads)
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as f:
            runtimes = {line.split()[-1] for line in f if "libgomp" in line or "libomp" in line}
        assert len(runtimes) <= 1, runtimes


# ---- The model (-k test_model) -------------------------------------------------------------------
# 40x60 images with 10x10 patches: a 4x6 grid, T = 24. Hybrid: stem map 10x15, 5x5 patches, T = 6.
TINY = dict(n_layer=2, n_embd=32, patch_size=10, img_size=(40, 60), n_classes=7)
HYBRID = dict(TINY, backbone="resnet50", patch_size=5)
VARIANTS = {
    "rwkv": TINY,
    "pos_emb": dict(TINY, pos_emb=True),
    "mean_pool": dict(TINY, pool="mean"),
    "linear_head": dict(TINY, head="linear"),
    "identity": dict(TINY, mixer="identity"),
    "hybrid": HYBRID,
    "hybrid_frozen": dict(HYBRID, freeze_backbone=True),
    "dim_att_ffn": dict(TINY, dim_att=4, dim_ffn=80, n_layer=3),
    "one_token": dict(TINY, img_size=(10, 10)),
    "one_layer": dict(TINY, n_layer=1),
}  # each of these has an RNN mode; the transformer has none
ALL_VARIANTS = dict(VARIANTS, transformer=dict(TINY, mixer="transformer", n_head=4))
VR = dict(TINY, mixer="vrwkv")
VR_VARIANTS = {name: dict(cfg, mixer="vrwkv") for name, cfg in VARIANTS.items() if cfg.get("mixer") != "identity"}


def perturb_(model, scale=0.2, seed=0):
    """Move every parameter off its init (the reference init has zero matrices, which would make
    the comparisons below trivially pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
    return model


def images(config, batch=2, seed=0):
    return torch.rand(batch, 3, *config.img_size, generator=torch.Generator().manual_seed(seed))


# ---- model: the RWKV-4 and Vision-RWKV blocks against their papers' equations, naively in float64 

def q_shift_loop(x, grids):
    """Q-Shift written out token by token: (B, T, C) -> (B, T, C)."""
    B, T, C = x.shape
    out = torch.zeros_like(x)
    start = 0
    for rows, cols in grids:
        for r in range(rows):
            for c in range(cols):
                for ch in range(C):
                    quarter = [q for q in range(4) if (q * C) // 4 <= ch < ((q + 1) * C) // 4][0]
                    dr, dc = [(0, -1), (0, 1), (-1, 0), (1, 0)][quarter]  # left, right, above, below
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < rows and 0 <= cc < cols:
                        out[:, start + r * cols + c, ch] = x[:, start + rr * cols + cc, ch]
        start += rows * cols
    return out


def naive_block(p, x, grids=None):
    """x: (T, C) one sequence; p: a block's state dict; every equation spelled out, in float64.
    grids None: RWKV-4's block (token shift; WKV by wkv_naive, w = exp(time_decay)); else
    Vision-RWKV's (Q-Shift by loop over grids; Bi-WKV by biwkv_naive, decay and bonus divided by T)."""
    def layer_norm(x, w, b):
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5) * w + b

    def mix(x, m):
        shifted = torch.cat([torch.zeros_like(x[:1]), x[:-1]]) if grids is None else q_shift_loop(x[None], grids)[0]
        return x * m.view(-1) + shifted * (1 - m.view(-1))

    s, T = "time" if grids is None else "spatial", x.shape[0]
    h = layer_norm(x, p["ln1.weight"], p["ln1.bias"])
    k = mix(h, p[f"att.{s}_mix_k"]) @ p["att.key.weight"].T
    v = mix(h, p[f"att.{s}_mix_v"]) @ p["att.value.weight"].T
    r = mix(h, p[f"att.{s}_mix_r"]) @ p["att.receptance.weight"].T
    if grids is None:
        y = wkv_naive(torch.exp(p["att.time_decay"]), p["att.time_first"], k[None], v[None], lib=torch)[0]
    else:
        y = biwkv_naive(p["att.spatial_decay"] / T, p["att.spatial_first"] / T, k[None], v[None], lib=torch)[0]
    x = x + (torch.sigmoid(r) * y) @ p["att.output.weight"].T
    h = layer_norm(x, p["ln2.weight"], p["ln2.bias"])
    kk = torch.relu(mix(h, p[f"ffn.{s}_mix_k"]) @ p["ffn.key.weight"].T) ** 2
    rr = mix(h, p[f"ffn.{s}_mix_r"]) @ p["ffn.receptance.weight"].T
    return x + torch.sigmoid(rr) * (kk @ p["ffn.value.weight"].T)


@pytest.mark.parametrize("grids", [None, [(3, 4)], [(2, 3), (1, 4), (2, 1)]], ids=["rwkv4", "vrwkv", "vrwkv-grids"])
def test_model_block_matches_the_papers_equations(grids):
    torch.manual_seed(0)
    config = FaceRWKVConfig(**dict(TINY, n_embd=16, dim_att=12, dim_ffn=40, mixer="vrwkv" if grids else "rwkv"))
    block = perturb_(VRWKVBlock(config, 1, grids=grids) if grids else Block(config, 1), scale=0.3).double()
    if grids:
        with torch.no_grad():  # decays of both signs, large enough to matter over 12 tokens
            block.att.spatial_decay.copy_(torch.linspace(-8.0, 30.0, 12, dtype=torch.float64))
    x = torch.randn(3, sum(r * c for r, c in grids) if grids else 9, 16, dtype=torch.float64)
    p = {k: v.detach() for k, v in block.state_dict().items()}
    expected = torch.stack([naive_block(p, xb, grids) for xb in x])
    with torch.no_grad():
        out = block(x)  # WKV and Bi-WKV compute in float32
        if grids is None:  # RNN mode: float64 all the way
            state, rnn = block.init_state(3, x.device, x.dtype), []
            for t in range(x.shape[1]):
                y, state = block.step(x[:, t], state)
                rnn.append(y)
            assert (torch.stack(rnn, dim=1) - expected).abs().max() <= 1e-10 * expected.abs().max()
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("s", ["time", "spatial"], ids=["rwkv4", "vrwkv"])
def test_model_block_parameter_names_and_shapes_are_the_references(s):
    # RWKV-LM's RWKV-4 names (time_*) and Vision-RWKV's (spatial_*), and none of the other's
    cls, base, C, A, Fh = (Block, TINY, 16, 12, 40) if s == "time" else (VRWKVBlock, VR, 16, 12, 40)
    config = FaceRWKVConfig(**dict(base, n_embd=C, dim_att=A, dim_ffn=Fh))
    assert {k: tuple(v.shape) for k, v in cls(config, 0).state_dict().items()} == {
        "ln1.weight": (C,), "ln1.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,),
        f"att.{s}_decay": (A,), f"att.{s}_first": (A,),
        f"att.{s}_mix_k": (1, 1, C), f"att.{s}_mix_v": (1, 1, C), f"att.{s}_mix_r": (1, 1, C),
        "att.key.weight": (A, C), "att.value.weight": (A, C), "att.receptance.weight": (A, C),
        "att.output.weight": (C, A),
        f"ffn.{s}_mix_k": (1, 1, C), f"ffn.{s}_mix_r": (1, 1, C),
        "ffn.key.weight": (Fh, C), "ffn.receptance.weight": (C, C), "ffn.value.weight": (C, Fh),
    }
    state = FaceRWKV(FaceRWKVConfig(**base)).state_dict()
    assert f"blocks.1.att.{s}_decay" in state and not any(("spatial_" if s == "time" else "time_") in k for k in state)


def test_model_fancy_init():
    config = FaceRWKVConfig(**dict(TINY, n_layer=3, n_embd=8))
    d, L = 8, 3
    for layer in range(L):
        att, ffn = Block(config, layer).att, Block(config, layer).ffn
        r01, r10 = layer / (L - 1), 1 - layer / L
        for i in (0, 3, 7):
            assert att.time_decay[i].item() == pytest.approx(-5 + 8 * (i / (d - 1)) ** (0.7 + 1.3 * r01), abs=1e-6)
            assert att.time_first[i].item() == pytest.approx(math.log(0.3) + 0.5 * (((i + 1) % 3) - 1), abs=1e-6)
            ddd = i / d
            assert att.time_mix_k[0, 0, i].item() == pytest.approx(ddd ** r10, abs=1e-6)
            assert att.time_mix_v[0, 0, i].item() == pytest.approx(ddd ** r10 + 0.3 * r01, abs=1e-6)
            assert att.time_mix_r[0, 0, i].item() == pytest.approx(ddd ** (0.5 * r10), abs=1e-6)
            assert ffn.time_mix_k[0, 0, i].item() == pytest.approx(ddd ** r10, abs=1e-6)
            assert ffn.time_mix_r[0, 0, i].item() == pytest.approx(ddd ** r10, abs=1e-6)
    one = Block(FaceRWKVConfig(**dict(TINY, n_layer=1, dim_att=1)), 0)  # L = 1, A = 1: no division by 0
    assert torch.isfinite(one.att.time_decay).all()
    # the reference zero-inits key, receptance and both output projections: a fresh block is the identity
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.equal(Block(config, 1)(x), x)


# ---- model: RNN mode equals parallel mode --------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_forward_rnn_equals_forward(name):
    torch.manual_seed(0)
    config = FaceRWKVConfig(**VARIANTS[name])
    model = perturb_(FaceRWKV(config)).eval()
    x = images(config)
    with torch.no_grad():
        parallel = model(x)
    rnn = model.forward_rnn(x)
    assert parallel.dtype == rnn.dtype == torch.float32
    assert (rnn - parallel).abs().max() <= 1e-5 * parallel.abs().max()


def test_model_rnn_state_size_does_not_depend_on_tokens():
    sizes = []
    for img_size in ((10, 10), (40, 60), (80, 120)):
        model = FaceRWKV(FaceRWKVConfig(**dict(TINY, img_size=img_size)))
        state = [b.init_state(2, torch.device("cpu"), torch.float32) for b in model.blocks]
        sizes.append(sum(t.numel() for s in state for t in s))
    assert sizes[0] == sizes[1] == sizes[2] == 2 * 2 * 5 * 32  # B * layers * (5 vectors of d)


# ---- model: every variant builds, runs forward and backward, and trains a step -------------------

@pytest.mark.parametrize("name", list(ALL_VARIANTS) + [f"vrwkv-{n}" for n in VR_VARIANTS])
def test_model_variant_forward_backward(name):
    # off the reference init (its zero matrices would hide every path but the residual one), each
    # trainable parameter gets a finite, nonzero gradient (with one token, y = v: w, u, k do nothing)
    torch.manual_seed(0)
    config = FaceRWKVConfig(**(VR_VARIANTS[name[6:]] if name.startswith("vrwkv-") else ALL_VARIANTS[name]))
    model = perturb_(FaceRWKV(config)).train()
    x = images(config, batch=3)
    logits = model(x)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all() and (config.n_tokens == 1) == ("one_token" in name)
    F.cross_entropy(logits, torch.tensor([0, 3, 6])).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n
            assert p.grad.abs().max() > 0 or (config.n_tokens < 3 and n.startswith("blocks.")), n
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    # each part exists only when asked for
    assert (model.pos_emb is not None) == config.pos_emb
    assert (model.backbone is not None) == (config.backbone == "resnet50")
    if config.mixer == "identity":
        assert sum(p.numel() for p in model.blocks.parameters()) == 0


def test_model_patches_in_raster_order():
    config = FaceRWKVConfig(**dict(TINY, img_size=(20, 30)))  # 2x3 patches
    model = FaceRWKV(config)
    x = torch.zeros(1, 3, 20, 30)
    x[0, :, 10:20, 0:10] = 1.0  # row 1, col 0 -> token 3
    changed = (model.embed(x) - model.embed(torch.zeros_like(x))).abs().sum(-1)[0]
    assert changed.nonzero().flatten().tolist() == [3]


def test_model_wrong_image_shape_is_a_clear_error():
    model = FaceRWKV(FaceRWKVConfig(**TINY))
    with pytest.raises(ValueError, match=r"\(B, 3, 40, 60\)"):
        model(torch.rand(2, 3, 60, 40))
    with pytest.raises(ValueError, match="config.img_size"):
        model(torch.rand(3, 40, 60))


def test_model_param_summary_and_counts():
    model = FaceRWKV(FaceRWKVConfig(**dict(HYBRID, freeze_backbone=True)))
    stem = 64 * 3 * 7 * 7 + 2 * 64
    assert model.num_params() - model.num_params(trainable_only=True) == stem
    text = model.print_param_summary()
    assert "trainable" in text and f"{model.num_params():,}" in text
    # small at 400x600: formula of the RWKV-4 block, patch embedding, ln_out and MLP head
    d, L, Fh = 128, 2, 512
    block = 4 * d + (4 * d * d + 2 * d + 3 * d) + (2 * d * Fh + d * d + 2 * d)
    expected = L * block + (1200 * d + d + 2 * d) + 2 * d + (d * d + d + 7 * d + 7)
    assert FaceRWKV(FaceRWKVConfig.preset("small")).num_params() == expected


# ---- model: the ResNet50 stem (torchvision keys, loading, freezing) ------------------------------

def fake_torchvision_resnet50(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": torch.randn(64, 3, 7, 7, generator=g),
        "bn1.weight": torch.rand(64, generator=g) + 0.5,
        "bn1.bias": torch.randn(64, generator=g),
        "bn1.running_mean": torch.randn(64, generator=g),
        "bn1.running_var": torch.rand(64, generator=g) + 0.5,
        "bn1.num_batches_tracked": torch.tensor(12345),
        "layer1.0.conv1.weight": torch.randn(64, 64, 1, 1, generator=g),  # not part of the stem
        "fc.weight": torch.randn(1000, 2048, generator=g),
        "fc.bias": torch.randn(1000, generator=g),
    }


def test_model_stem_keys_are_torchvision_keys_and_load_backbone_weights(tmp_path):
    sd = fake_torchvision_resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(sd, path)
    model = FaceRWKV(FaceRWKVConfig(**HYBRID))  # the stem's keys are torchvision's
    assert set(model.backbone.state_dict()) == {
        "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"}
    assert model.backbone(torch.rand(1, 3, 40, 60)).shape == (1, 64, 10, 15)
    model.load_backbone_weights(path)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # a checkpoint wrapper and a DataParallel prefix are unwrapped; an old file without
    # num_batches_tracked still loads
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items() if "num_batches" not in k}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    other = FaceRWKV(FaceRWKVConfig(**HYBRID))
    other.load_backbone_weights(tmp_path / "wrapped.pth")
    assert torch.equal(other.backbone.conv1.weight, sd["conv1.weight"])


def test_model_load_backbone_weights_errors(tmp_path):
    model = FaceRWKV(FaceRWKVConfig(**HYBRID))
    with pytest.raises(ValueError, match="not found"):
        model.load_backbone_weights(tmp_path / "nope.pth")
    sd = fake_torchvision_resnet50()
    del sd["bn1.running_var"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="bn1.running_var"):
        model.load_backbone_weights(tmp_path / "missing.pth")
    sd = fake_torchvision_resnet50()
    sd["conv1.weight"] = torch.randn(64, 3, 3, 3)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="wrong shape"):
        model.load_backbone_weights(tmp_path / "shape.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        model.load_backbone_weights(tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="backbone='resnet50'"):
        FaceRWKV(FaceRWKVConfig(**TINY)).load_backbone_weights(tmp_path / "shape.pth")


def test_model_frozen_stem_gets_no_gradient_and_keeps_bn_stats(tmp_path):
    torch.save(fake_torchvision_resnet50(), tmp_path / "r50.pth")
    frozen = FaceRWKV(FaceRWKVConfig(**dict(HYBRID, freeze_backbone=True)))
    frozen.load_backbone_weights(tmp_path / "r50.pth")
    before = {k: v.clone() for k, v in frozen.backbone.state_dict().items()}
    frozen.train()
    assert frozen.training and not frozen.backbone.training and not frozen.backbone.bn1.training
    opt = torch.optim.AdamW([p for p in frozen.parameters() if p.requires_grad], lr=1e-2)
    F.cross_entropy(frozen(images(frozen.config, batch=4)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert all(p.grad is None and not p.requires_grad for p in frozen.backbone.parameters())
    assert frozen.patch_embed.proj.weight.grad is not None
    for k, v in frozen.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    # unfrozen: the stem trains and BatchNorm updates its running statistics
    model = FaceRWKV(FaceRWKVConfig(**HYBRID)).train()
    mean_before = model.backbone.bn1.running_mean.clone()
    F.cross_entropy(model(images(model.config, batch=4)), torch.tensor([0, 1, 2, 3])).backward()
    assert model.backbone.conv1.weight.grad is not None
    assert not torch.equal(model.backbone.bn1.running_mean, mean_before)


# ---- model: the config ---------------------------------------------------------------------------

def test_model_presets_and_tokens():
    for name, (L, d) in {"small": (2, 128), "medium": (4, 256), "large": (6, 512), "hybrid": (6, 512)}.items():
        c = FaceRWKVConfig.preset(name)
        assert (c.n_layer, c.n_embd, c.dim_att, c.dim_ffn, c.n_tokens) == (L, d, d, 4 * d, 600)
    hybrid = FaceRWKVConfig.preset("hybrid")
    assert (hybrid.backbone, hybrid.patch_size, hybrid.grid) == ("resnet50", 5, (20, 30))
    assert FaceRWKVConfig.preset("small", pool="mean").pool == "mean"
    with pytest.raises(ValueError, match="unknown preset 'huge'; use one of"):
        FaceRWKVConfig.preset("huge")


def test_model_config_json_round_trip():
    for config in (FaceRWKVConfig.preset("hybrid", freeze_backbone=True, pos_emb=True, img_size=[200, 300]),
                   FaceRWKVConfig.preset("hybrid", mixer="vrwkv", pool="mean", img_size=[200, 300])):
        again = FaceRWKVConfig(**json.loads(json.dumps(asdict(config))))
        assert again == config and again.img_size == (200, 300)
    assert again.mixer == "vrwkv" and "vrwkv" in facerwkv.OPTIONS["mixer"]
    assert "FaceRWKV vrwkv" in FaceRWKV(FaceRWKVConfig(**VR)).print_param_summary()


@pytest.mark.parametrize("overrides, message", [
    (dict(img_size=(45, 60)), r"multiple of 10.*\[1, 3, 5, 15\]"),
    (dict(img_size=(40,)), "height, width"),
    (dict(patch_size=0), "patch_size"),
    (dict(mixer="mamba"), r"mixer='mamba'.*'rwkv'"),
    (dict(pool="max"), "pool"),
    (dict(head="conv"), "head"),
    (dict(backbone="resnet18"), "backbone"),
    (dict(mixer="transformer", n_head=5), r"n_embd \(32\) divisible by n_head \(5\)"),
    (dict(backbone="resnet50", patch_size=4), r"10x15 grid.*multiple of 16"),
    (dict(freeze_backbone=True), "backbone='resnet50'"),
    (dict(n_classes=1), "n_classes"),
])
def test_model_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        FaceRWKVConfig(**dict(TINY, **overrides))


# ---- facerwkv's shared mechanisms: weight files, the cache, the shared blocks (-k test_model) ----


class _Payload:
    """A pickle payload whose __reduce__ calls `function(*args)` when unpickled."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("call", ["system", "rmtree"])  # torch's unpickler refuses module os; rmtree meets a stand-in
def test_model_weights_malicious_pickle_runs_nothing(tmp_path, call):
    victim = tmp_path / "victim"
    victim.mkdir()
    payload = _Payload(os.system, f"touch {victim / 'pwned'}") if call == "system" else _Payload(shutil.rmtree, str(victim))
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": payload}, path)
    with pytest.raises(ValueError) as e:
        facerwkv.read_checkpoint(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and call in message
    assert "never unpickles code" in message
    assert victim.is_dir() and not (victim / "pwned").exists()
    with pytest.raises(ValueError, match="never unpickles code"):
        facerwkv.read_state_dict(path)
    assert victim.is_dir() and not (victim / "pwned").exists()


def test_model_weights_object_of_a_vanished_module_loads_as_placeholder(tmp_path):
    module = types.ModuleType("throwaway_recorder")
    exec("class RecorderMeter:\n    def __init__(self, n):\n        self.n = n\n        self.history = [1.5, 2.5]\n",
         module.__dict__)
    sys.modules["throwaway_recorder"] = module
    try:
        recorder = module.RecorderMeter(7)
        sd = {"module.fc.weight": torch.randn(3, 4), "module.fc.bias": torch.randn(3)}
        path = tmp_path / "posterv2.pth"
        torch.save({"epoch": 3, "state_dict": sd, "recorder": recorder, "best_acc": torch.tensor(92.2)}, path)
    finally:
        del sys.modules["throwaway_recorder"]
    ckpt = facerwkv.read_checkpoint(path)
    assert isinstance(ckpt["recorder"], facerwkv.Placeholder)
    assert type(ckpt["recorder"]).__module__ == "throwaway_recorder"
    assert ckpt["recorder"].n == 7 and ckpt["recorder"].history == [1.5, 2.5]
    assert ckpt["epoch"] == 3
    got = facerwkv.read_state_dict(path)
    assert set(got) == {"fc.weight", "fc.bias"}
    assert all(torch.equal(got[k], sd["module." + k]) for k in got)
    model = torch.nn.Module()
    model.fc = torch.nn.Linear(4, 3)
    assert facerwkv.load_weights(model, got, path) == 0
    assert torch.equal(model.fc.weight, sd["module.fc.weight"])


def test_model_weights_numpy_values_ordered_dicts_integers_and_plain_floats_load(tmp_path):
    import collections
    path = tmp_path / "np.pth"
    torch.save({"a": np.arange(6, dtype=np.int16).reshape(2, 3), "b": np.float64(2.5), "d": torch.float16,
                "c": collections.OrderedDict(x=torch.zeros(2, dtype=torch.bfloat16)), "steps": torch.tensor([2**62]),
                "loss": float("nan")}, path)
    got = facerwkv.read_checkpoint(path)
    assert got["a"].dtype == np.int16 and got["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert got["b"] == 2.5 and got["d"] is torch.float16 and got["c"]["x"].dtype == torch.bfloat16
    assert got["steps"].item() == 2**62 and math.isnan(got["loss"])  # only tensors must be finite


def cut_file(path):
    torch.save({"x": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


WEIGHT_FILE_ERRORS = [  # (case, how the file is written, the reader, the message); any nesting of the checkpoint
    ("torchscript", lambda p: torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), p), "checkpoint", "torchscript"),
    ("nan-nested", lambda p: torch.save({"epoch": 3, "model": {"b.w": torch.ones(2), "head.weight": torch.tensor(
        [[1.0, float("nan")]])}}, p), "checkpoint", re.escape("tensor model.head.weight holds NaN or infinite values")),
    ("inf-in-a-list", lambda p: torch.save({"optimizer": {"state": [{"exp_avg": torch.tensor([1.0, -math.inf])}]},
                                            "step": torch.tensor(7)}, p), "checkpoint", "tensor optimizer.state.0.exp_avg holds"),
    ("int-key", lambda p: torch.save({1: torch.zeros(2)}, p), "state_dict", "key 1 is not a string"),
    ("nan", lambda p: torch.save({"blocks.0.w": torch.tensor([1.0, math.nan])}, p), "state_dict", "tensor blocks.0.w holds NaN"),
    ("cut", cut_file, "checkpoint", "could not read it as a torch weights file"),
    ("empty", lambda p: p.write_bytes(b""), "checkpoint", "could not read"),
    ("missing", lambda p: None, "checkpoint", "not found"),
    ("str-value", lambda p: torch.save({"x": "text"}, p), "state_dict", "x is a str, not a tensor"),
]


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("write, reader, match", [c[1:] for c in WEIGHT_FILE_ERRORS], ids=[c[0] for c in WEIGHT_FILE_ERRORS])
def test_model_weights_errors_are_one_line_and_named(tmp_path, write, reader, match):
    path = tmp_path / "w.pth"
    write(path)
    with pytest.raises(ValueError, match=match) as e:
        getattr(facerwkv, f"read_{reader}")(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_model_load_weights_ignores_counts_and_names_keys():
    lin = torch.nn.Linear(4, 3)
    sd = {"weight": torch.ones(3, 4), "bias": torch.ones(3), "head.a": torch.ones(1), "head.b": torch.ones(1)}
    assert facerwkv.load_weights(lin, sd, "src.pth", ignore=("head.",)) == 2
    assert torch.equal(lin.weight, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"src.pth has unexpected keys \['head.a', 'head.b'\]"):
        facerwkv.load_weights(lin, sd, "src.pth")
    with pytest.raises(ValueError, match=r"src.pth lacks the keys \['bias'\]"):
        facerwkv.load_weights(lin, {"weight": torch.ones(3, 4)}, "src.pth")
    with pytest.raises(ValueError, match=r"wrong shape.*weight \(4, 3\) \(need \(3, 4\)\)"):
        facerwkv.load_weights(lin, {"weight": torch.ones(4, 3), "bias": torch.ones(3)}, "src.pth")


# ---- model: the cache (digest-checked entries, a private directory) -------------------------------

@pytest.fixture
def fresh_cpu_build():
    facerwkv._cpu_build.cache_clear()
    facerwkv._private_cache.cache_clear()
    yield
    facerwkv._cpu_build.cache_clear()
    facerwkv._private_cache.cache_clear()


KERNEL_CHECK = """
import torch, facerwkv
g = torch.Generator().manual_seed(0)
w, u = torch.rand(5, generator=g), torch.randn(5, generator=g)
k, v = torch.randn(2, 7, 5, generator=g), torch.randn(2, 7, 5, generator=g)
y = facerwkv.wkv(w, u, k, v, backend="kernel")
assert torch.allclose(y, facerwkv.wkv_torch(w, u, k, v), atol=1e-5)
print("kernel ok")
"""


def run_kernel(cache):
    """wkv.cu on the CPU in a fresh process (a library already loaded here would be reused by
    dlopen) with the cache at `cache`, started now; calling the result waits for (ok, stderr)."""
    env = dict(os.environ, FACERWKV_CACHE=str(cache), TMPDIR=str(cache.parent))  # the fallback beside it
    proc = subprocess.Popen([sys.executable, "-c", KERNEL_CHECK], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=os.path.dirname(os.path.abspath(facerwkv.__file__)))

    def finish():
        out, err = proc.communicate(timeout=300)
        return proc.returncode == 0 and "kernel ok" in out, err
    return finish


def evil_library(tmp_path, marker):
    """A shared library whose constructor creates `marker` the moment it is loaded."""
    src, lib = tmp_path / "evil.c", tmp_path / "evil.so"
    src.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void evil(void) '
                   f'{{ FILE* f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    subprocess.run([os.environ.get("CXX", "g++"), "-shared", "-fPIC", "-x", "c", str(src), "-o", str(lib)], check=True)
    return lib


@requires_cxx
def test_model_cache_damaged_or_planted_library_is_rebuilt_never_loaded(tmp_path):
    """The real wkv.cu library (built by this process into this test run's cache, with a digest), in fresh
    processes: replaced by an attacker's library under its own name, it is reported in one line and
    rebuilt, never loaded; planted in a folder others may write to (and in the fallback, the temp
    folder's facerwkv-<uid>), even with a matching digest, never used: a fresh folder is, removed at exit."""
    cache, marker = tmp_path / "cache", tmp_path / "pwned"
    assert facerwkv.cpu_kernels() is not None
    cache.mkdir(mode=0o700)
    for built in Path(os.environ["FACERWKV_CACHE"]).glob("wkv_cpu_*.so*"):
        shutil.copy(built, cache)
    libraries = sorted(cache.glob("wkv_cpu_*.so"))
    assert libraries and all((cache / (p.name + ".sha256")).exists() for p in libraries)
    good, evil = libraries[0].read_bytes(), evil_library(tmp_path, marker)
    for lib in libraries:
        shutil.copy(evil, lib)
    shared, fallback = tmp_path / "shared", tmp_path / f"facerwkv-{os.getuid()}"  # run_kernel: TMPDIR=tmp_path
    for folder in (shared, fallback):
        folder.mkdir()
        os.chmod(folder, 0o777)
        for lib in libraries:
            shutil.copy(evil, folder / lib.name)
            (folder / (lib.name + ".sha256")).write_text(facerwkv._sha256(evil))
    damaged, planted = run_kernel(cache), run_kernel(shared)  # two processes side by side, each its own build
    ok, err = damaged()  # loading it would run its constructor
    assert ok and err.count("\n") == len(libraries) and "corrupt" in err
    assert libraries[0].name in err and libraries[0].read_bytes() == good
    ok, err = planted()
    assert ok and err.count("not yours alone") == 2
    assert not marker.exists()  # neither process loaded the attacker's library
    assert [p.name for p in tmp_path.glob("facerwkv-*")] == [fallback.name]


@pytest.mark.parametrize("damage", [lambda b: b[:-1] + b"x", lambda b: b[: len(b) // 3], lambda b: bytes(len(b)), lambda b: b""],
                         ids=["one-byte", "truncated", "zeroed", "emptied"])
def test_model_cache_entry_digest_checked_on_every_use(tmp_path, monkeypatch, capfd, fresh_cpu_build, damage):
    """An entry is built once into a cache made 0700 and reused while its digest matches; damaged, it is
    reported in one line naming it, and rebuilt."""
    monkeypatch.setenv("FACERWKV_CACHE", str(tmp_path / "c"))
    builds = []

    def build(path):
        builds.append(path)
        with open(path, "wb") as f:
            f.write(b"entry of twelve bytes")

    path = facerwkv.cached("thing.bin", build)
    assert path.read_bytes() == b"entry of twelve bytes" and len(builds) == 1
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o700 and (tmp_path / "c" / "thing.bin.sha256").is_file()
    assert facerwkv.cached("thing.bin", build) == path and len(builds) == 1
    path.write_bytes(damage(path.read_bytes()))  # same size with one byte changed, cut, zeroed, empty
    capfd.readouterr()
    assert facerwkv.cached("thing.bin", build).read_bytes() == b"entry of twelve bytes" and len(builds) == 2
    err = capfd.readouterr().err
    assert "corrupt" in err and err.count("\n") == 1 and "thing.bin" in err
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def temp_folder(tmp_path, monkeypatch):
    """tempfile.gettempdir() is tmp_path/tmp: where the cache's fallback goes."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    return tmp_path / "tmp"


def test_model_cache_read_only_or_shared_dir_is_bypassed(tmp_path, monkeypatch, capfd, fresh_cpu_build, temp_folder):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    monkeypatch.setenv("FACERWKV_CACHE", str(ro))
    capfd.readouterr()
    private = facerwkv.cache_dir()
    err = capfd.readouterr().err
    assert private == temp_folder / f"facerwkv-{os.getuid()}" and "read-only" in err and err.count("\n") == 1
    assert private.stat().st_uid == os.getuid() and private.stat().st_mode & 0o777 == 0o700
    assert facerwkv.cached("x", lambda p: open(p, "wb").close()).parent == private
    facerwkv._private_cache.cache_clear()  # the next run reuses the folder and what it built
    assert facerwkv.cache_dir() == private and os.listdir(temp_folder) == [private.name]
    assert facerwkv.cached("x", lambda p: pytest.fail("rebuilt")).parent == private
    group = tmp_path / "group"
    group.mkdir()
    os.chmod(group, 0o770)
    monkeypatch.setenv("FACERWKV_CACHE", str(group))
    assert facerwkv.cache_dir() != group
    assert "not yours alone" in capfd.readouterr().err
    os.chmod(group, 0o700)
    assert facerwkv.cache_dir() == group


@pytest.mark.parametrize("home", ["", "relative"])
def test_model_cache_empty_home_is_an_unusable_location(monkeypatch, capfd, fresh_cpu_build, temp_folder, home):
    """HOME= (as service managers set it) would put the cache at /.cache/facerwkv."""
    monkeypatch.delenv("FACERWKV_CACHE")
    monkeypatch.setenv("HOME", home)
    capfd.readouterr()
    assert facerwkv.cache_dir() == temp_folder / f"facerwkv-{os.getuid()}"
    assert f"HOME is {home!r}" in capfd.readouterr().err


def test_model_atomic_write_bytes_and_callable(tmp_path):
    target = tmp_path / "a.json"
    facerwkv.atomic_write(target, b"one")
    facerwkv.atomic_write(target, lambda p: open(p, "w").write("two"))
    assert target.read_text() == "two"

    def fails(p):
        open(p, "w").write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        facerwkv.atomic_write(target, fails)
    assert target.read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                                   OSError(errno.ENOSPC, "No space left on device")])
def test_model_atomic_write_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, error):
    """A full disk: what torch.save raises there (its C++ writer's RuntimeError), or an OSError."""
    target = tmp_path / "last.pt"
    torch.save({"step": 1}, target)

    def full_disk(p):
        open(p, "wb").write(b"PK\x03\x04 half a checkpoint")
        raise error

    with pytest.raises(OSError) as e:
        facerwkv.atomic_write(target, full_disk)
    assert str(target) in str(e.value) and "previous file is untouched" in str(e.value)
    assert e.value.errno == getattr(error, "errno", None)
    assert torch.load(target, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["last.pt"]


# ---- model: the shared transformer block and the RNN runner ---------------------------------------

def test_model_transformer_block_matches_attention_written_out_and_is_the_transformer_mixer():
    torch.manual_seed(0)
    dim, heads, ffn, eps = 12, 3, 20, 1e-6
    block = TransformerBlock(dim, heads, ffn, ln_eps=eps).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert set(block.state_dict()) == {f"{m}.{w}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                                              "mlp.fc2") for w in ("weight", "bias")}
    p = {k: v.detach() for k, v in block.state_dict().items()}
    x = torch.randn(2, 5, dim, dtype=torch.float64)

    def ln(x, w, b):
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps) * w + b

    h = ln(x, p["norm1.weight"], p["norm1.bias"])
    qkv = h @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]
    q, k, v = qkv[..., :dim], qkv[..., dim:2 * dim], qkv[..., 2 * dim:]
    hs = dim // heads
    out = torch.zeros_like(x)
    for b in range(2):
        for hd in range(heads):
            s = slice(hd * hs, (hd + 1) * hs)
            att = torch.softmax(q[b, :, s] @ k[b, :, s].T / math.sqrt(hs), dim=-1)
            out[b, :, s] = att @ v[b, :, s]
    x1 = x + out @ p["attn.proj.weight"].T + p["attn.proj.bias"]
    h = ln(x1, p["norm2.weight"], p["norm2.bias"])
    hidden = h @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
    gelu = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    expected = x1 + gelu @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-12)
    model = FaceRWKV(FaceRWKVConfig(n_layer=2, n_embd=32, n_head=4, dim_ffn=48, patch_size=10, img_size=(20, 30),
                                    mixer="transformer"))  # FaceRWKV's transformer mixer is this block
    assert all(type(b) is TransformerBlock for b in model.blocks) and "blocks.1.attn.qkv.weight" in model.state_dict()
    assert model.blocks[0].mlp.fc1.out_features == 48 and model.blocks[0].attn.n_head == 4


@pytest.mark.parametrize("mixer", ["rwkv", "identity"])
def test_model_run_rnn_equals_the_parallel_blocks(mixer):
    torch.manual_seed(0)
    config = FaceRWKVConfig(n_layer=3, n_embd=16, dim_att=12, dim_ffn=24, patch_size=10, img_size=(20, 30),
                            mixer=mixer)
    model = FaceRWKV(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        parallel = x
        for block in model.blocks:
            parallel = block(parallel)
        rnn = facerwkv.run_rnn(model.blocks, x)
    assert rnn.shape == (2, 9, 16)
    assert (rnn - parallel).abs().max() <= 1e-5 * parallel.abs().max()


def test_model_load_weights_tolerates_missing_num_batches_tracked_only():
    bn = torch.nn.BatchNorm2d(3)
    sd = {k: torch.full_like(v, 2) for k, v in bn.state_dict().items() if "num_batches" not in k}
    assert facerwkv.load_weights(bn, sd, "old.pth") == 0  # an older IR-50 / MobileFaceNet file
    assert torch.equal(bn.running_var, torch.full((3,), 2.0)) and int(bn.num_batches_tracked) == 0
    with pytest.raises(ValueError, match=r"old.pth lacks the keys \['running_var'\]"):
        facerwkv.load_weights(bn, {k: v for k, v in sd.items() if k != "running_var"}, "old.pth")
    model = FaceRWKV(FaceRWKVConfig(backbone="resnet50", img_size=(40, 40), patch_size=5, n_layer=1, n_embd=16))
    stem = {k: torch.ones_like(v) for k, v in model.backbone.state_dict().items() if "num_batches" not in k}
    model.backbone.load_state_dict({**model.backbone.state_dict(), "bn1.num_batches_tracked": torch.tensor(7)})
    facerwkv.load_weights(model.backbone, stem, "resnet50.pth")
    assert torch.equal(model.backbone.bn1.running_mean, torch.ones(64))
    assert int(model.backbone.bn1.num_batches_tracked) == 7  # absent from the file: left as it was
    facerwkv.check(True, "fine")  # the one error of bad input: a ValueError that is the fix
    with pytest.raises(ValueError, match="^the fix$"):
        facerwkv.check(False, "the fix")


# ---- The Vision-RWKV mixer: Q-Shift and the block (-k test_vrwkv) --------------------------------
@pytest.mark.parametrize("grids, C", [([(3, 5)], 8), ([(4, 6)], 10), ([(1, 1)], 4), ([(2, 3), (1, 4), (3, 1)], 6),
                                      ([(2, 2)], 3)])
def test_vrwkv_q_shift_matches_loop(grids, C):
    T = sum(r * c for r, c in grids)
    x = torch.randn(2, T, C, generator=torch.Generator().manual_seed(0))
    assert torch.equal(facerwkv.q_shift(x, grids), q_shift_loop(x, grids))


def test_vrwkv_fancy_init_is_rwkv4s():
    config = FaceRWKVConfig(**dict(VR, n_layer=3, n_embd=8))
    for layer in range(3):
        vr, rw = VRWKVBlock(config, layer).state_dict(), facerwkv.Block(config, layer).state_dict()
        for name in ("att.spatial_decay", "att.spatial_first", "att.spatial_mix_k", "att.spatial_mix_v",
                     "att.spatial_mix_r", "ffn.spatial_mix_k", "ffn.spatial_mix_r"):
            assert torch.equal(vr[name], rw[name.replace("spatial", "time")]), name
        for name in ("att.key", "att.receptance", "att.output", "ffn.value", "ffn.receptance"):
            assert not vr[name + ".weight"].any(), name  # zero, as the reference
    x = torch.randn(2, 24, 8)
    with torch.no_grad():
        assert torch.equal(VRWKVBlock(config, 1)(x), x)  # a fresh block is the identity


def test_vrwkv_sees_the_whole_image():
    # the first patch's output depends on the last patch with vrwkv (bidirectional), not with rwkv
    for mixer, sees_future in (("vrwkv", True), ("rwkv", False)):
        torch.manual_seed(0)
        config = FaceRWKVConfig(**dict(TINY, mixer=mixer))
        model = perturb_(FaceRWKV(config)).eval()
        x = images(config, batch=1)
        x2 = x.clone()
        x2[:, :, -10:, -10:] += 1.0  # the bottom-right patch, the last token
        with torch.no_grad():
            h, h2 = model.embed(x), model.embed(x2)
            for block in model.blocks:
                h, h2 = block(h), block(h2)
        assert bool((h[:, 0] - h2[:, 0]).abs().max() > 1e-4) == sees_future, mixer


@pytest.mark.parametrize("config", [VR, ALL_VARIANTS["transformer"]], ids=["vrwkv", "transformer"])
def test_vrwkv_and_the_transformer_have_no_rnn_mode(config):
    config = FaceRWKVConfig(**config)
    model = FaceRWKV(config)
    with pytest.raises(ValueError, match="needs the whole sequence and has no RNN mode" if config.mixer == "vrwkv" else
                       "no RNN mode"):
        model.forward_rnn(images(config))
    if config.mixer == "vrwkv":
        with pytest.raises(ValueError, match="no RNN mode"):
            model.blocks[0].init_state(2, torch.device("cpu"), torch.float32)


def test_vrwkv_block_segments():
    # a sequence made of several grids (as POSTER's scales): Q-Shift within each, Bi-WKV over all
    config = FaceRWKVConfig(**dict(VR, n_embd=8))
    block = perturb_(VRWKVBlock(config, 0, grids=[(2, 2), (1, 3)]))
    assert block(torch.randn(2, 7, 8)).shape == (2, 7, 8)
    with pytest.raises(ValueError, match="grids"):
        block(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match=r"hold 6 tokens but the sequence has 7"):
        facerwkv.q_shift(torch.zeros(1, 7, 4), [(2, 3)])


# ---- Vision-RWKV's ImageNet checkpoints (-k test_vrwkv_checkpoint) -------------------------------
# Files in the exact key layout of OpenGVLab/Vision-RWKV's checkpoints (mmcv's {'meta', 'state_dict'};
# VRWKV-T's pre-norm, VRWKV-S's post-norm with layer scale) at width 32 and 2 blocks, every weight
# at order one; loaded, their pooled features against Vision-RWKV's forward written out below.
VRWKV_PUBLISHED = {"vrwkv-t": (192, False, 6_155_176), "vrwkv-s": (384, True, 23_820_136),
                   "vrwkv-b": (768, True, 93_645_544)}  # width, post-norm, parameters (1000-class head)


def vrwkv_file_shapes(E, post, depth=12, grid=14, patch=16, classes=1000):
    """Every key and shape of a Vision-RWKV checkpoint: its VRWKV backbone and LinearClsHead."""
    shapes = {"backbone.patch_embed.projection.weight": (E, 3, patch, patch), "backbone.patch_embed.projection.bias": (E,),
              "backbone.pos_embed": (1, grid * grid, E), "backbone.layers.0.ln0.weight": (E,),
              "backbone.layers.0.ln0.bias": (E,)}
    for i in range(depth):
        b = f"backbone.layers.{i}."
        shapes.update({b + n: (E,) for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.spatial_decay",
                                             "att.spatial_first", *("gamma1", "gamma2")[:2 * post])})
        shapes.update({b + n: (1, 1, E) for n in ("att.spatial_mix_k", "att.spatial_mix_v", "att.spatial_mix_r",
                                                  "ffn.spatial_mix_k", "ffn.spatial_mix_r")})
        shapes.update({b + f"att.{n}.weight": (E, E) for n in ("key", "value", "receptance", "output")})
        shapes.update({b + "ffn.key.weight": (4 * E, E), b + "ffn.receptance.weight": (E, E),
                       b + "ffn.value.weight": (E, 4 * E)})
    shapes.update({"backbone.ln1.weight": (E,), "backbone.ln1.bias": (E,), "head.fc.weight": (classes, E),
                   "head.fc.bias": (classes,)})
    return shapes


def vrwkv_file(path, E=32, post=False, depth=2, seed=0, **extra):
    """A Vision-RWKV checkpoint at weights where nothing is hidden: matrices and the conv at fan-in
    scale, LayerNorms and gammas off one, decays of both signs and large enough to matter over 196
    tokens (the file's decay is divided by T), a rough position table. -> its state dict."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in {**vrwkv_file_shapes(E, post, depth), **extra}.items():
        x = torch.randn(shape, generator=g)  # spatial_first and pos_embed as drawn
        if key.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "gamma1", "gamma2")):
            x = 1 + 0.3 * x
        elif key.endswith("bias"):
            x = 0.3 * x
        elif "spatial_mix" in key:
            x = torch.rand(shape, generator=g)
        elif key.endswith("spatial_decay"):
            x = torch.empty(shape).uniform_(-10.0, 60.0, generator=g)
        elif key.endswith("weight"):  # the Linear layers and the conv
            x = x / math.sqrt(math.prod(shape[1:]))
        sd[key] = x
    from collections import OrderedDict  # as mmcv saves it
    meta = {"config": "model = dict(type='ImageClassifier', backbone=dict(type='VRWKV', ...))", "seed": 0}
    torch.save({"meta": meta, "state_dict": OrderedDict(sd)}, path)
    return sd


def original_vrwkv_features(p, images):
    """Vision-RWKV's VRWKV backbone and GlobalAveragePooling as its vrwkv.py computes them, from a
    checkpoint's state dict, in float64: conv 16/16 with bias; + pos_embed, resized bicubically to
    the grid (mmcls's resize_pos_embed); ln0; each block pre-norm, or post-norm with gamma where the
    file has gammas; the final ln1; the mean over tokens. Q-Shift as its slices, Bi-WKV term by term."""
    p = {k: v.double() for k, v in p.items()}
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], p[name + ".weight"], p[name + ".bias"])  # noqa: E731
    x = F.conv2d(images.double(), p["backbone.patch_embed.projection.weight"],
                 p["backbone.patch_embed.projection.bias"], stride=16)  # (B, E, h, w)
    B, E, h, w = x.shape
    T, s, q = h * w, math.isqrt(p["backbone.pos_embed"].shape[1]), E // 4
    pos = p["backbone.pos_embed"].reshape(1, s, s, E).permute(0, 3, 1, 2)
    if (h, w) != (s, s):
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
    x = ln((x + pos).flatten(2).transpose(1, 2), "backbone.layers.0.ln0")  # (B, T, E)

    def mix(x, m):  # x * m + q_shift(x) * (1 - m): quarters from the left, right, above, below
        g, sh = x.transpose(1, 2).reshape(B, E, h, w), torch.zeros(B, E, h, w, dtype=x.dtype)
        sh[:, :q, :, 1:], sh[:, q:2 * q, :, :-1] = g[:, :q, :, :-1], g[:, q:2 * q, :, 1:]
        sh[:, 2 * q:3 * q, 1:], sh[:, 3 * q:4 * q, :-1] = g[:, 2 * q:3 * q, :-1], g[:, 3 * q:4 * q, 1:]
        return x * m + sh.flatten(2).transpose(1, 2) * (1 - m)

    for b in sorted({k[:k.index(".", 16) + 1] for k in p if k.startswith("backbone.layers.")}):
        def att(x):
            k, v, r = (mix(x, p[b + f"att.spatial_mix_{n}"]) @ p[b + f"att.{name}.weight"].T
                       for n, name in (("k", "key"), ("v", "value"), ("r", "receptance")))
            y = biwkv_naive(p[b + "att.spatial_decay"] / T, p[b + "att.spatial_first"] / T, k, v, lib=torch)
            return (torch.sigmoid(r) * y) @ p[b + "att.output.weight"].T

        def ffn(x):
            k = torch.relu(mix(x, p[b + "ffn.spatial_mix_k"]) @ p[b + "ffn.key.weight"].T) ** 2
            return torch.sigmoid(mix(x, p[b + "ffn.spatial_mix_r"]) @ p[b + "ffn.receptance.weight"].T) \
                * (k @ p[b + "ffn.value.weight"].T)
        if b + "gamma1" in p:  # post-norm, layer scale (VRWKV-S, B)
            x = x + p[b + "gamma1"] * ln(att(x), b + "ln1")
            x = x + p[b + "gamma2"] * ln(ffn(x), b + "ln2")
        else:                  # pre-norm (VRWKV-T)
            x = x + att(ln(x, b + "ln1"))
            x = x + ffn(ln(x, b + "ln2"))
    return ln(x, "backbone.ln1").mean(1)  # (B, E)


def test_vrwkv_checkpoint_presets_are_the_published_models():
    """The presets hold exactly a Vision-RWKV checkpoint's tensors, renamed: VRWKV-T / S / B count
    the published 6,155,176 / 23,820,136 / 93,645,544 parameters with a 1000-class head (built on
    the meta device), and every file key maps to a model tensor of the same size."""
    for name, (E, post, published) in VRWKV_PUBLISHED.items():
        shapes = vrwkv_file_shapes(E, post)
        with torch.device("meta"):
            model = FaceRWKV(FaceRWKVConfig.preset(name, n_classes=1000))
        own = {k: v.numel() for k, v in model.state_dict().items()}
        assert sum(math.prod(s) for s in shapes.values()) == model.num_params() == published, name
        assert sorted(own.values()) == sorted(math.prod(s) for s in shapes.values()), name
        assert model.config.grid == (14, 14) and (model.config.norm == "post") == post


@pytest.mark.parametrize("post, size", [(False, 224), (True, 224), (False, 112), (True, 112)],
                         ids=["t-224", "s-224", "t-112", "s-112"])
def test_vrwkv_checkpoint_loads_and_equals_the_original_forward(tmp_path, post, size):
    """A file in Vision-RWKV's layout loads into FaceRWKV (only the head starts fresh) and gives
    the pooled features of Vision-RWKV's forward written out, at 224 px (T = 196) and at 112 px
    (the position table resized to 7x7, T = 49), pre-norm (T) and post-norm with layer scale (S)."""
    sd = vrwkv_file(tmp_path / "vrwkv.pth", post=post, seed=int(post))
    config, weights = facerwkv.vrwkv_state_dict(tmp_path / "vrwkv.pth", (size, size))
    assert (config.norm, config.n_layer, config.n_embd, config.grid) == (
        "post" if post else "pre", 2, 32, (size // 16,) * 2)
    model = FaceRWKV(config).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
    model.head = torch.nn.Identity()  # the pooled features, the head's input
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(x).double(), original_vrwkv_features(sd, x)
    assert ref.std() > 0.5 and (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_vrwkv_checkpoint_refuses_other_files_in_one_line(tmp_path):
    """VRWKV6 and key-norm (VRWKV-L) files are named for what they are; a missing tensor, a wrong
    shape and a foreign key are ValueErrors naming the keys."""
    cases = [({"backbone.layers.0.att.time_maa_x": (1, 1, 32)}, None, "a VRWKV6 checkpoint"),
             ({"backbone.layers.0.att.key_norm.weight": (32,)}, None, r"a VRWKV-L checkpoint \(key norm\)"),
             ({}, "backbone.layers.1.ffn.key.weight", "lacks the keys.*blocks.1.ffn.key.weight"),
             ({"backbone.layers.0.ln1.weight": (33,)}, None, r"wrong shape: \['blocks.0.ln1.weight \(33,\)"),
             ({"backbone.cls_token": (1, 1, 32)}, None, r"not a Vision-RWKV checkpoint.*backbone.cls_token")]
    for i, (extra, drop, message) in enumerate(cases):
        path = tmp_path / f"{i}.pth"
        sd = vrwkv_file(path, **extra)
        if drop:
            torch.save({"meta": {}, "state_dict": {k: v for k, v in sd.items() if k != drop}}, path)
        with pytest.raises(ValueError, match=message) as e:
            facerwkv.vrwkv_state_dict(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_vrwkv_checkpoint_drop_path_is_stochastic_depth_linear_over_depth():
    """The blocks' rates are Vision-RWKV's torch.linspace(0, drop_path_rate, depth); in training a
    branch is kept whole (scaled by 1 / (1 - p)) or dropped whole per sample, about 1 - p kept; in
    eval it is untouched."""
    config = FaceRWKVConfig.preset("vrwkv-b", n_layer=5, n_embd=8, img_size=(32, 32))
    assert [b.drop for b in FaceRWKV(config).blocks] == pytest.approx(torch.linspace(0, 0.5, 5).tolist())
    torch.manual_seed(0)
    x = torch.rand(4000, 3, 2) + 1
    y = facerwkv.drop_path(x, 0.3, training=True)
    kept = (y != 0).all(dim=(1, 2))
    assert torch.equal(y[kept], x[kept] / 0.7) and not y[~kept].any() and abs(kept.float().mean() - 0.7) < 0.03
    assert facerwkv.drop_path(x, 0.3, training=False) is x
# ---- The mixers' weights (-k test_explain) -------------------------------------------------------
# What --explain draws: y_t = sum_i a_{t,i} v_i per channel, for RWKV-4's WKV (eq. 14), Vision-RWKV's
# Bi-WKV and attention. The weights against their definitions term by term; applied to v, against
# each operator and each layer in float64; through pooled_weights' hooks, layer by layer, in the row
# the head classifies (last, mean, POSTER's cls). Decays and bonuses random, projections non-zero.

def weights_written_out(w, u, k, bidirectional=False):
    """a[b, t, i, c] from the definition one term at a time, numpy float64: e^{-(|t-i|-1) w + k_i}
    (i < t, or any i != t bidirectionally), e^{u + k_t} (i = t), over their sum."""
    B, T, C = k.shape
    expo = np.full((B, T, T, C), -np.inf)
    for t in range(T):
        for i in range(T):
            if i == t:
                expo[:, t, i] = u + k[:, t]
            elif i < t or bidirectional:
                expo[:, t, i] = -(abs(t - i) - 1) * w + k[:, i]
    e = np.exp(expo - expo.max(2, keepdims=True))
    return e / e.sum(2, keepdims=True)


def mixer_written_out(block, x):
    """A block's mixer at its input x (B, T, d), from its parameters by hand: (weights (B, T, T, C)
    written out, v, and the mixer's output from them: output(sigmoid(r) * y) or proj(y))."""
    p = {n: t.detach() for n, t in block.named_parameters()}
    if isinstance(block, TransformerBlock):
        B, T, C = x.shape
        hs = C // block.attn.n_head
        q, k, v = (x @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]).split(C, dim=-1)
        a = np.zeros((B, T, T, C))
        for s in range(0, C, hs):
            a[..., s:s + hs] = torch.softmax(q[..., s:s + hs] @ k[..., s:s + hs].transpose(1, 2) / math.sqrt(hs),
                                             dim=-1)[..., None].numpy()
        y = torch.from_numpy((a * v[:, None].numpy()).sum(2))
        return a, v, y @ p["attn.proj.weight"].T + p["attn.proj.bias"]
    bi, T = isinstance(block, VRWKVBlock), x.shape[1]
    s, shifted = ("spatial", q_shift_loop(x, block.grids)) if bi else ("time", F.pad(x, (0, 0, 1, -1)))
    k, v, r = (torch.lerp(shifted, x, p[f"att.{s}_mix_{m}"]) @ p[f"att.{name}.weight"].T
               for m, name in (("k", "key"), ("v", "value"), ("r", "receptance")))
    w, u = (p["att.spatial_decay"] / T, p["att.spatial_first"] / T) if bi else (p["att.time_decay"].exp(),
                                                                               p["att.time_first"])
    y = (facerwkv.biwkv_torch if bi else facerwkv.wkv_torch)(w, u, k, v)  # float64 all the way
    return weights_written_out(w.numpy(), u.numpy(), k.numpy(), bi), v, (torch.sigmoid(r) * y) @ p["att.output.weight"].T


def randomised_(model):
    """perturb_, then decays and bonuses drawn wide (Vision-RWKV's of both signs): nothing near uniform."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        perturb_(model, scale=0.5)
        for name, p in model.named_parameters():
            if name.endswith(("time_decay", "spatial_decay")):
                p.copy_(torch.empty(p.shape).uniform_(-2, 1, generator=g) if "time" in name else
                        torch.empty(p.shape).uniform_(-8, 30, generator=g))
            elif name.endswith(("time_first", "spatial_first")):
                p.copy_(torch.randn(p.shape, generator=g) * (1 if "time" in name else 10))
    return model.double().eval()


def mixer_inputs(blocks, h):
    """What each block's mixer sees: its first LayerNorm of the residual stream as the blocks run."""
    inputs = []
    for block in blocks:
        inputs.append((block.norm1 if isinstance(block, TransformerBlock) else block.ln1)(h))
        h = block(h)
    return inputs


@pytest.mark.parametrize("extreme", [False, True], ids=["order-one", "extreme"])
@pytest.mark.parametrize("op", OPS)
def test_explain_weights_are_the_terms_of_eq14_and_give_the_operator(op, extreme):
    """wkv_weights is each term of eq. 14 (Bi-WKV's) over their sum, 1 in all per channel, and applied
    to v is wkv_torch's (biwkv_torch's) y in float64 to 1e-10, k up to +-60 and w of both signs too."""
    _, fallback, _, _, make = OPS[op]
    w, u, k, v = (x.double() for x in make(2, 9, 5, extreme=extreme)[0])
    a = facerwkv.wkv_weights(w, u, k, bidirectional=op == "biwkv")
    assert a.dtype == torch.float64 and a.shape == (2, 9, 9, 5)
    assert np.abs(a.numpy() - weights_written_out(w.numpy(), u.numpy(), k.numpy(), op == "biwkv")).max() < 1e-12
    assert (a.sum(2) - 1).abs().max() < 1e-12
    assert ((a * v[:, None]).sum(2) - fallback(w, u, k, v)).abs().max() < 1e-10
    assert torch.equal(facerwkv.wkv_weights(w, u, k, rows=[8, 3], bidirectional=op == "biwkv"), a[:, [8, 3]])


@pytest.mark.parametrize("mixer", ["rwkv", "vrwkv", "transformer"])
def test_explain_each_mixers_weights_reproduce_its_output(mixer):
    """mixer_weights of a layer (RWKV-4's time-mix, Vision-RWKV's spatial mix, attention) are the
    weights written out from its parameters; applied to v and through the layer's gate and output
    projection they give the layer's output: float64 to 1e-10 (WKV inside the layer: float32)."""
    config = FaceRWKVConfig(**dict(TINY, mixer=mixer, n_head=4))
    block = randomised_(FaceRWKV(config)).blocks[1]
    mix = block.attn if mixer == "transformer" else block.att
    x = torch.randn(2, config.n_tokens, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = facerwkv.mixer_weights(mix, x, *([block.grids] if mixer == "vrwkv" else []))
        a_ref, v, out = mixer_written_out(block, x)
    assert np.abs(a.numpy() - a_ref).max() < 1e-12 and (a.sum(2) - 1).abs().max() < 1e-12
    assert a.max() > 0.5 and a[a > 0].min() < 1e-3  # far from uniform (1/24): the decays and keys matter
    y = (a * v[:, None]).sum(2)
    with torch.no_grad():
        layer = mix(x, *([block.grids] if mixer == "vrwkv" else []))
        if mixer == "transformer":
            assert (mix.proj(y) - layer).abs().max() < 1e-10 and (out - layer).abs().max() < 1e-10
        else:  # y is float64 WKV written out: the output by hand to 1e-10, the layer's to its float32
            gate = torch.sigmoid(torch.lerp(q_shift_loop(x, block.grids) if mixer == "vrwkv" else F.pad(x, (0, 0, 1, -1)),
                                            x, getattr(mix, f"{'spatial' if mixer == 'vrwkv' else 'time'}_mix_r"))
                                 @ mix.receptance.weight.T)
            assert (mix.output(gate * y) - out).abs().max() < 1e-10
            assert (out - layer).abs().max() < 1e-5 * layer.abs().max()


@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("mixer", ["rwkv", "vrwkv", "transformer"])
def test_explain_pooled_weights_are_the_classified_rows_of_every_layer(mixer, pool):
    """pooled_weights gives, layer by layer, the row of the token the head classifies (the last),
    or the mean of all rows (pool=mean: the head classifies the mean token), averaged over channels:
    against the weights written out from each layer's input, to 1e-12; and the model's logits."""
    config = FaceRWKVConfig(**dict(TINY, mixer=mixer, pool=pool, n_head=4))
    model = randomised_(FaceRWKV(config))
    x = images(config).double()
    logits, layers = facerwkv.pooled_weights(model, x, chunk=5)  # 24 rows in chunks of 5 for the mean
    with torch.no_grad():
        assert torch.equal(logits, model(x))
        inputs = mixer_inputs(model.blocks, model.embed(x))
    assert [name for name, _ in layers] == [f"blocks.{i}.{'attn' if mixer == 'transformer' else 'att'}"
                                            for i in range(2)]
    for block, h, (_, a) in zip(model.blocks, inputs, layers):
        ref = mixer_written_out(block, h)[0]
        ref = (ref[:, -1] if pool == "last" else ref.mean(1)).mean(-1)  # (B, T)
        assert a.shape == (2, 24) and np.abs(a.numpy() - ref).max() < 1e-12 and (a.sum(1) - 1).abs().max() < 1e-12


@pytest.mark.parametrize("mixer, pool", [("transformer", "cls"), ("rwkv", "last"), ("vrwkv", "mean")])
def test_explain_poster_mixers_weights_over_its_three_scales(mixer, pool):
    """POSTER's mixer over its three scales' tokens (3 x 3x3 at backbone_size 48; 3 x 7x7 at 112):
    the ViT's cls row (over the cls token too), the RWKV-4 mixer's last row, the Vision-RWKV
    mixer's mean row (Q-Shift per scale), against the weights written out from each block's input."""
    model = small(mixer=mixer, pool=pool, img_size=48, backbone_size=48, embed_dim=32, depth=2)
    randomised_(model.mixer)
    model.double().eval()
    x = torch.rand(1, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logits, layers = facerwkv.pooled_weights(model, x)
    with torch.no_grad():
        tokens, m = model.tokens(x), model.mixer
        h = torch.cat([m.cls_token, tokens], dim=1) + m.pos_embed if mixer == "transformer" else m.ln0(tokens)
        inputs = mixer_inputs(m.blocks, h)
        assert torch.equal(logits, model(x))
    assert len(layers) == 2 and model.config.n_tokens == 27
    for block, h, (_, a) in zip(m.blocks, inputs, layers):
        ref = mixer_written_out(block, h)[0]
        ref = {"cls": ref[:, 0], "last": ref[:, -1], "mean": ref.mean(1)}[pool].mean(-1)
        assert a.shape == (1, 27 + (pool == "cls")) and np.abs(a.numpy() - ref).max() < 1e-12


# ---- POSTER V2 and POSTER-RWKV (-k test_poster) --------------------------------------------------
# Every stage's shape at 224 (POSTER V2's), the published 43.7 M, weight files of both
# IR-50 namings and MobileFaceNet's, each loading error, the frozen landmark branch, the RWKV
# mixer (the project's Block; RNN mode equals parallel mode). All but the 224 tests use the small preset.

def small(**overrides):
    torch.manual_seed(0)
    return PosterRWKV(PosterConfig.preset("poster-small", **overrides))


# ---- poster: shapes and parameter counts at POSTER V2's size -------------------------------------

def test_poster_v2_counts_the_published_43_7_m():
    # thop on the original code (models/PosterV2_7cls.py, leaf modules that run) gives 43,724,311:
    # this implementation's 43,628,295 plus the GDC head the original runs and discards (on the meta device)
    poster_v2 = poster_v2_meta()
    n = poster_param_count(poster_v2)
    assert n == 43_724_311 and round(n / 1e6, 1) == 43.7
    assert poster_param_count(poster_v2, gdc_head=False) == 43_628_295
    assert gdc_head_params(poster_v2.config) == 96_016
    # the raw parameters thop leaves out: cls token, position embedding, rel.-pos. tables, gammas
    assert poster_v2.num_params() - 43_628_295 == 768 + 148 * 768 + 2 * (64 + 128 + 256) + \
        (55 ** 2 * 2 + 27 ** 2 * 4 + 13 ** 2 * 8)
    assert not poster_v2.training  # restored


def test_poster_count_keeps_train_mode_and_counts_small():
    model = small().train()
    n = poster_param_count(model, gdc_head=False)
    assert model.training and model.face_landback.training  # not frozen: it trains
    # every parameter but the raw ones (rel.-pos. tables, gammas, RWKV's time_* vectors) runs in a leaf
    raw = sum(p.numel() for name, p in model.named_parameters()
              if name.split(".")[-1].startswith(("relative_position", "gamma", "time_")))
    assert n == model.num_params() - raw
    text = model.print_param_summary()
    assert " ".join(text.split()).count(f"total {model.num_params():,} trainable / {model.num_params():,}") == 1
    assert f"POSTER V2 counts (thop: leaf modules that run, + its GDC head): {n + gdc_head_params(model.config):,}" in text


# ---- poster: the token mixers --------------------------------------------------------------------

def test_poster_rwkv_mixer_is_the_project_block_and_the_transformer_poster_v2s():
    model = small()
    assert len(model.mixer.blocks) == 2
    assert all(type(b) is facerwkv.Block for b in model.mixer.blocks)
    assert model.config.pool == "last"  # the default, by measurement (README)
    assert small(depth=3).mixer.blocks[2].att.key.in_features == 128
    model = small(mixer="transformer")  # POSTER V2's: cls token, position embedding, eps 1e-6, qkv bias
    assert model.config.pool == "cls"
    assert model.mixer.pos_embed.shape == (1, 148, 128) and model.mixer.cls_token.shape == (1, 1, 128)
    assert model.mixer.norm.eps == 1e-6 and model.mixer.blocks[0].norm1.eps == 1e-6
    assert model.mixer.blocks[0].attn.qkv.bias is not None


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_poster_rnn_mode_equals_parallel_mode(pool):
    model = small(pool=pool).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        y = model(x)
    y_rnn = model.forward_rnn(x)
    assert torch.allclose(y_rnn, y, atol=1e-5, rtol=1e-4), (y_rnn - y).abs().max()
    with pytest.raises(ValueError, match="no RNN mode"):
        small(mixer="transformer").forward_rnn(x)


def test_poster_vrwkv_mixer_shifts_within_each_scale():
    assert PosterConfig.preset("poster-small", mixer="vrwkv").pool == "last"  # the default, as poster-rwkv's
    model = small(mixer="vrwkv", pool="mean")  # mean: the first step's gradient reaches every scale (see below)
    assert all(type(b) is facerwkv.VRWKVBlock and b.grids == [(7, 7)] * 3 for b in model.mixer.blocks)
    # Q-Shift never crosses scales: the top row of scale 2 (tokens 49..55) takes nothing "from
    # above" (channels [C/2, 3C/4)), the bottom row of scale 1 (42..48) nothing "from below" ([3C/4, C))
    x = torch.randn(2, 147, 128)
    shifted = facerwkv.q_shift(x, model.mixer.blocks[0].grids)
    assert shifted[:, 49:56, 64:96].abs().sum() == 0 and shifted[:, 42:49, 96:].abs().sum() == 0
    assert torch.equal(shifted[:, 56, 64:96], x[:, 49, 64:96])  # within scale 2 it does shift
    images, labels = torch.randn(2, 3, 112, 112), torch.tensor([0, 1])
    F.cross_entropy(model(images), labels).backward()
    assert model.scales[0].downsample.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no RNN mode"):
        model.forward_rnn(images)


def test_poster_trains_a_step_and_every_part_gets_gradients():
    # mean pooling: with the last token and RWKV's zero init (each block starts as the identity),
    # the first step's gradient reaches only the last token's path, not every part
    model = small(pool="mean").train()
    x, y = torch.randn(4, 3, 112, 112), torch.randint(0, 7, (4,))
    F.cross_entropy(model(x), y).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # RWKV's reference init zeroes att.output and ffn.value, so at the first step only those two
    # (and ln0, ln_out) get gradients inside the blocks, as in FaceRWKV; everything else does
    assert all(n.startswith("mixer.blocks.") for n in no_grad), no_grad
    assert model.mixer.blocks[0].att.output.weight.grad.abs().sum() > 0
    assert model.mixer.blocks[1].ffn.value.weight.grad.abs().sum() > 0
    assert model.scales[0].attn.relative_position_bias_table.grad.abs().sum() > 0
    assert model.scales[2].ffn.gamma2.grad.abs().sum() > 0
    assert model.landmark_status == "landmark branch: random init, trained"


# ---- poster: weight files ------------------------------------------------------------------------

def random_like(module):
    """A fake weight file for module: random tensors of its shapes (positive BatchNorm variances)."""
    return {k: (torch.rand(v.shape) + 0.5 if k.endswith("running_var") else torch.randn(v.shape))
            if v.is_floating_point() else v.clone() for k, v in module.state_dict().items()}


def test_poster_ir50_arcface_keys_map_positionally():
    # IR-50's 24 units: 1x1-conv shortcuts start stages 2, 3, 4 at units 3, 7, 21
    sd = {"input_layer.0.weight": 0, "output_layer.3.weight": 0}
    for i in range(24):
        sd[f"body.{i}.res_layer.1.weight"] = i
        if i in (3, 7, 21):
            sd[f"body.{i}.shortcut_layer.0.weight"] = i
    out = ir50_keys_from_arcface(sd)
    assert out["body1.2.res_layer.1.weight"] == 2
    assert out["body2.0.res_layer.1.weight"] == 3 and out["body2.0.shortcut_layer.0.weight"] == 3
    assert out["body2.3.res_layer.1.weight"] == 6
    assert out["body3.0.shortcut_layer.0.weight"] == 7 and out["body3.13.res_layer.1.weight"] == 20
    assert "input_layer.0.weight" in out and not any(k.startswith(("body.", "body4")) for k in out)
    assert sum(k.startswith("body") for k in out) == 21 + 2


def test_poster_load_ir50_three_stage_names(tmp_path, capsys):
    model = small()
    sd = random_like(model.ir_back)
    torch.save({**sd, "output_layer.3.weight": torch.randn(512, 25088)}, tmp_path / "ir50.pth")
    n = model.load_ir50_weights(tmp_path / "ir50.pth")
    out = capsys.readouterr().out
    assert n == len(sd) and f"loaded {n} tensors" in out and "1 keys of the file unused" in out
    assert all(torch.equal(v, sd[k]) for k, v in model.ir_back.state_dict().items())
    assert all(p.requires_grad for p in model.ir_back.parameters())  # IR-50 is fine-tuned


def test_poster_load_ir50_arcface_four_stage_names(tmp_path, capsys):
    model = small()  # ir_units (1, 1, 2): takes the first units of each of the file's stages
    bigger = PosterRWKV(PosterConfig.preset("poster-small", ir_units=(2, 2, 3))).ir_back
    big = random_like(bigger)
    file, starts = {k: v for k, v in big.items() if k.startswith("input_layer.")}, (0, 2, 4)
    for k, v in big.items():
        if k.startswith("body"):
            stage, unit, rest = k[4], int(k.split(".")[1]), k.split(".", 2)[2]
            file[f"body.{starts[int(stage) - 1] + unit}.{rest}"] = v
    file["body.7.shortcut_layer.0.weight"] = torch.randn(128, 64, 1, 1)  # stage 4: ignored
    file["body.7.res_layer.1.weight"] = torch.randn(128, 64, 3, 3)
    torch.save(file, tmp_path / "arcface_ir50.pth")
    n = model.load_ir50_weights(tmp_path / "arcface_ir50.pth")
    assert n == len(model.ir_back.state_dict()) and f"loaded {n} tensors" in capsys.readouterr().out
    own = model.ir_back.state_dict()
    assert torch.equal(own["body1.0.res_layer.1.weight"], big["body1.0.res_layer.1.weight"])
    assert torch.equal(own["body2.0.shortcut_layer.0.weight"], big["body2.0.shortcut_layer.0.weight"])
    assert torch.equal(own["body3.1.res_layer.3.weight"], big["body3.1.res_layer.3.weight"])
    assert torch.equal(own["input_layer.1.running_var"], big["input_layer.1.running_var"])


def test_poster_load_landmark_weights_freezes_the_branch(tmp_path, capsys):
    model = small()
    sd = random_like(model.face_landback)
    gdc = {"output_layer.conv_6_dw.conv.weight": torch.randn(128, 1, 7, 7),
           "output_layer.conv_6_dw.bn.weight": torch.randn(128),
           "output_layer.linear.weight": torch.randn(136, 128), "output_layer.bn.running_mean": torch.randn(136)}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in {**sd, **gdc}.items()}},
               tmp_path / "mobilefacenet_model_best.pth.tar")
    n = model.load_landmark_weights(tmp_path / "mobilefacenet_model_best.pth.tar")
    out = capsys.readouterr().out
    assert n == len(sd) and f"loaded {n} tensors" in out and "skipped the GDC head's 4" in out
    assert all(torch.equal(v, sd[k]) for k, v in model.face_landback.state_dict().items())
    assert not any(p.requires_grad for p in model.face_landback.parameters())
    assert model.landmark_status == f"landmark branch: loaded {n} tensors, frozen"
    # the config now says frozen, so a model rebuilt from it (a resumed checkpoint) is frozen too
    again = PosterRWKV(PosterConfig(**json.loads(json.dumps(asdict(model.config)))))
    assert not any(p.requires_grad for p in again.face_landback.parameters())
    assert again.landmark_status == "landmark branch: frozen (weights from a checkpoint)"


def test_poster_frozen_branch_has_no_gradients_and_keeps_its_statistics(tmp_path):
    model = small()
    torch.save({"state_dict": random_like(model.face_landback)}, tmp_path / "mfn.pth.tar")
    model.load_landmark_weights(tmp_path / "mfn.pth.tar")
    before = {k: v.clone() for k, v in model.face_landback.state_dict().items()}
    ir_before = model.ir_back.input_layer[1].running_mean.clone()
    model.train()
    assert model.training and not model.face_landback.training
    assert all(not m.training for m in model.face_landback.modules())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(4, 3, 112, 112), torch.randint(0, 7, (4,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(p.grad is None for p in model.face_landback.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.face_landback.state_dict().items())
    assert model.last_face_conv.weight.grad is not None  # the conv after the branch still learns
    assert not torch.equal(model.ir_back.input_layer[1].running_mean, ir_before)  # the IR's BN does update
    model.eval().train()
    assert not model.face_landback.training


@pytest.mark.parametrize("which", ["ir50", "landmark"])
def test_poster_weight_file_errors(tmp_path, which):
    model = small()
    branch = model.ir_back if which == "ir50" else model.face_landback
    load = model.load_ir50_weights if which == "ir50" else model.load_landmark_weights
    sd = random_like(branch)

    def check(contents, match):
        path = tmp_path / "w.pth"
        torch.save(contents, path)
        with pytest.raises(ValueError, match=match):
            load(path)

    check({"fc.weight": torch.randn(3, 3)}, r"lacks the keys .*found keys like \['fc.weight'\]")
    partial = dict(list(sd.items())[: len(sd) // 2])
    check(partial, r"lacks the keys .*\(\d+ in all\)")
    wrong = dict(sd)
    key = next(k for k, v in sd.items() if v.ndim == 4)
    wrong[key] = torch.randn(1, 1, 1, 1)
    check(wrong, r"wrong shape: \['" + key.replace(".", r"\.") + r" \(1, 1, 1, 1\) \(need")
    check([1, 2, 3], "not a state dict")
    with pytest.raises(ValueError, match="weights file not found"):
        load(tmp_path / "missing.pth")
    assert all(p.requires_grad for p in branch.parameters())  # a failed load freezes nothing


def test_poster_full_size_weights_load_into_poster_v2_widths(tmp_path, poster_v2):
    # the real files' layout at POSTER V2's widths: four-stage ArcFace IR-50 and MobileFaceNet with GDC head
    ir = {k: v.clone() for k, v in poster_v2.ir_back.state_dict().items()}
    arcface, unit = {k: v for k, v in ir.items() if k.startswith("input_layer.")}, 0
    for stage, units in ((1, 3), (2, 4), (3, 14)):
        for i in range(units):
            for k, v in ir.items():
                if k.startswith(f"body{stage}.{i}."):
                    arcface[f"body.{unit}.{k.split('.', 2)[2]}"] = v
            unit += 1
    arcface["body.21.shortcut_layer.0.weight"] = torch.zeros(512, 256, 1, 1)
    torch.save(arcface, tmp_path / "ir50.pth")
    model = PosterRWKV(PosterConfig.preset("poster-v2"))
    assert model.load_ir50_weights(tmp_path / "ir50.pth") == len(ir)
    assert all(torch.equal(v, ir[k]) for k, v in model.ir_back.state_dict().items())


# ---- poster: the config --------------------------------------------------------------------------

def test_poster_config_presets_and_round_trip():
    for name in ("poster-v2", "poster-rwkv", "poster-vrwkv", "poster-small"):
        c = PosterConfig.preset(name)
        assert PosterConfig(**json.loads(json.dumps(asdict(c)))) == c
    assert PosterConfig.preset("poster-v2").pool == "cls" and PosterConfig.preset("poster-rwkv").pool == "last"
    assert PosterConfig.preset("poster-vrwkv").mixer == "vrwkv"
    c = PosterConfig.preset("poster-small", mixer="transformer")
    assert c.pool == "cls" and c.grids == (28, 14, 7) and c.n_tokens == 147
    assert PosterConfig(backbone_size=64).n_tokens == 3 * 4 * 4


@pytest.mark.parametrize("overrides,match", [
    (dict(pool="cls"), "pool='cls' needs the transformer mixer"),
    (dict(mixer="vrwkv", pool="cls"), "the vrwkv mixer has no cls token"),
    (dict(mixer="transformer", pool="mean"), "set pool='cls'"),
    (dict(mixer="mamba"), r"mixer='mamba' is not an option; use one of"),
    (dict(pool="max"), "is not an option"),
    (dict(dims=(64, 128)), "one value per scale"),
    (dict(dims=(64, 130, 256)), r"dims\[1\]=130 is not divisible by cross_heads\[1\]=4; use cross_heads\[1\] in"),
    (dict(mixer="transformer", embed_dim=100), r"embed_dim \(100\) divisible by n_head \(8\)"),
    (dict(backbone_size=100), "backbone_size must be a multiple of 16.*use e.g. 96"),
    (dict(ir_units=(3, 0, 14)), r"ir_units\[1\] must be a positive integer"),
    (dict(depth=0), "depth must be a positive integer"),
    (dict(n_classes=1), "n_classes must be an integer >= 2"),
    (dict(drop_path=(0, 0.1, 1.5)), "drop_path values must be probabilities"),
    (dict(layer_scale=-1), "layer_scale must be a positive number"),
    (dict(mlp_ratio=0), "mlp_ratio must be a positive number"),
])
def test_poster_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        PosterConfig(**overrides)


def test_poster_config_unknown_preset_and_bad_images():
    with pytest.raises(ValueError, match=r"unknown preset 'poster'; use one of \('poster-v2'"):
        PosterConfig.preset("poster")
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 112, 112\).*img_size=96"):
        small()(torch.randn(1, 3, 96, 96))
    model = small(img_size=96, layer_scale=None)  # any input size: both backbones run at 112
    assert model(torch.randn(2, 3, 96, 96)).shape == (2, 7)


# ---- poster: the cross-attention and the whole forward at order-one weights, against references ----
# At the default init the layer scales (1e-5) hide the cross-attention's output, so these set every
# tensor to order-one values and compare with the computation written out (float64).


def order_one_(module, seed=0):
    """Every tensor of module to order-one values: matrices N(0, 1/fan_in) (order-one outputs), the
    rest (biases, norms, PReLU slopes, gammas, rel.-pos. tables, cls/pos tokens) N(0, 1) or, for
    BatchNorm variances and scales, U(0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith(("running_var", "bn.weight")) or ".prelu." in name:
                t.copy_(0.5 + torch.rand(t.shape, generator=g, dtype=t.dtype))
            elif t.ndim >= 2 and "relative_position" not in name and not name.endswith(("cls_token", "pos_embed")):
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) / math.sqrt(t[0].numel()))
            else:
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
    return module


def attention_written_out(attn, x, q):
    """softmax(q k^T / sqrt(d) + bias[relative_position_index]) v, then the projection; the index
    built here from the cell coordinates: (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
    B, C, w, _ = x.shape
    h, d, N = attn.heads, C // attn.heads, w * w
    t = F.layer_norm(x.flatten(2).transpose(1, 2), (C,), attn.norm.weight, attn.norm.bias)  # (B, N, C)
    kv = t @ attn.kv.weight.T + attn.kv.bias
    k, v = kv[..., :C], kv[..., C:]
    heads = lambda z: z.reshape(B, N, h, d).transpose(1, 2)  # noqa: E731
    qh = heads(q.flatten(2).transpose(1, 2))
    cells = [(i // w, i % w) for i in range(N)]
    index = torch.tensor([[(yi - yj + w - 1) * (2 * w - 1) + (xi - xj + w - 1) for (yj, xj) in cells]
                          for (yi, xi) in cells])
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1)  # (h, N, N)
    scores = qh @ heads(k).transpose(-1, -2) / math.sqrt(d) + bias
    y = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(B, N, C)
    return y @ attn.proj.weight.T + attn.proj.bias, t


def test_poster_cross_attention_equals_attention_written_out():
    torch.manual_seed(0)
    attn = order_one_(LandmarkCrossAttention(dim=12, heads=3, window=5)).double()
    x, q = torch.randn(2, 12, 5, 5, dtype=torch.float64), torch.randn(2, 12, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y, shortcut = attn(x, q)
        y_ref, t_ref = attention_written_out(attn, x, q)
    assert y.abs().mean() > 0.1  # order one: nothing hides a wrong scale
    assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-10), (y - y_ref).abs().max()
    assert torch.allclose(shortcut, t_ref, rtol=1e-10, atol=1e-10)


def poster_v2_written_out(model, images):
    """POSTER V2's pyramid_trans_expr2.forward (models/PosterV2_7cls.py, vit_model.py) written out
    with torch.nn.functional from model's tensors; the two backbones, plain convolution stacks,
    run as the model's modules."""
    c, sd = model.config, dict(model.named_parameters())
    x = F.interpolate(images, size=c.backbone_size)
    f1, f2, f3 = model.face_landback(x)
    f3 = F.conv2d(f3, sd["last_face_conv.weight"], sd["last_face_conv.bias"], padding=1)
    tokens = []
    for s, (x_ir, q) in enumerate(zip(model.ir_back(x), (f1, f2, f3))):
        p = f"scales.{s}."
        x_ir = F.conv2d(x_ir, sd[p + "downsample.weight"], sd[p + "downsample.bias"], stride=2, padding=1)
        o, shortcut = attention_written_out(model.scales[s].attn, x_ir, q)
        o = shortcut + sd[p + "ffn.gamma1"] * o
        hidden = F.gelu(F.layer_norm(o, o.shape[-1:], sd[p + "ffn.norm.weight"], sd[p + "ffn.norm.bias"])
                        @ sd[p + "ffn.mlp.fc1.weight"].T + sd[p + "ffn.mlp.fc1.bias"])
        o = o + sd[p + "ffn.gamma2"] * (hidden @ sd[p + "ffn.mlp.fc2.weight"].T + sd[p + "ffn.mlp.fc2.bias"])
        w = c.grids[s]
        o = o.transpose(1, 2).reshape(-1, c.dims[s], w, w)
        for i in range(2 - s if s < 2 else 1):
            o = F.conv2d(o, sd[f"{p}embed.{i}.weight"], sd[f"{p}embed.{i}.bias"], stride=2 if s < 2 else 1,
                         padding=1 if s < 2 else 0)
        tokens.append(o.flatten(2).transpose(1, 2))
    x = torch.cat([sd["mixer.cls_token"].expand(len(images), -1, -1), *tokens], 1) + sd["mixer.pos_embed"]
    E, h = c.embed_dim, c.n_head
    ln = lambda z, n: F.layer_norm(z, (E,), sd[n + ".weight"], sd[n + ".bias"], eps=1e-6)  # noqa: E731
    for i in range(c.depth):
        p = f"mixer.blocks.{i}."
        B, T, _ = x.shape
        qkv = (ln(x, p + "norm1") @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(B, T, 3, h, E // h)
        qh, kh, vh = qkv.permute(2, 0, 3, 1, 4)
        a = ((qh @ kh.transpose(-1, -2)) * (E // h) ** -0.5).softmax(-1) @ vh
        x = x + a.transpose(1, 2).reshape(B, T, E) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        m = F.gelu(ln(x, p + "norm2") @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + m @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    x = ln(x, "mixer.norm")[:, 0]
    se = torch.relu(x @ sd["se_block.linear1.weight"].T + sd["se_block.linear1.bias"])
    x = x * torch.sigmoid(se @ sd["se_block.linear2.weight"].T + sd["se_block.linear2.bias"])
    return x @ sd["head.weight"].T + sd["head.bias"]


def test_poster_forward_at_order_one_weights_equals_poster_v2_written_out():
    torch.manual_seed(0)
    model = order_one_(PosterRWKV(PosterConfig.preset("poster-small", mixer="transformer"))).double().eval()
    images = torch.randn(2, 3, 112, 112, dtype=torch.float64)
    with torch.no_grad():
        logits, ref = model(images), poster_v2_written_out(model, images)
    assert logits.std() > 0.1
    assert torch.allclose(logits, ref, rtol=1e-9, atol=1e-9), (logits - ref).abs().max()


# ---- poster: POSTER V2's released checkpoints (read without running them) -------------------------

def posterv2_names(sd, depth=2):
    """The project's poster-v2 state dict in POSTER V2's names (its pyramid_trans_expr2), written
    out independently of poster.py's table."""
    out = {}
    for k, v in sd.items():
        for ours, theirs in [("mixer.blocks.", "VIT.blocks."), ("mixer.norm.", "VIT.norm."),
                             ("mixer.cls_token", "VIT.cls_token"), ("mixer.pos_embed", "VIT.pos_embed"),
                             ("se_block.", "VIT.se_block."), ("head.", "VIT.head.linear."),
                             ("scales.0.embed.", "embed_q."), ("scales.1.embed.", "embed_k."),
                             ("scales.2.embed.0.", "embed_v.proj.")] + [
                (f"scales.{s}.{a}", f"{b}{s + 1}.{c}") for s in range(3) for a, b, c in [
                    ("downsample.", "conv", ""), ("attn.norm.", "window", "norm."), ("attn.kv.", "attn", "qkv."),
                    ("attn.proj.", "attn", "proj."), ("attn.relative", "attn", "relative"), ("ffn.", "ffn", "")]]:
            if k.startswith(ours):
                k = theirs + k[len(ours):]
                break
        out[k] = v
    return out


def posterv2_extras(n_classes, depth=2):
    """What POSTER V2 saves besides what runs (zeros, stored as one number each): IR-50's and MobileFaceNet's
    output layers, the ViT's unused patch_embed, eca_block, CON1, IRLinear1/2, each block's Conv1d, the
    rel.-pos. indices."""
    z = lambda *shape, dtype=torch.float32: torch.zeros((), dtype=dtype).expand(shape)  # noqa: E731
    bn = lambda p, n: {f"{p}.{w}": z(n) for w in ("weight", "bias", "running_mean", "running_var")} | {  # noqa: E731
        f"{p}.num_batches_tracked": torch.tensor(0)}
    extra = {**bn("ir_back.output_layer.0", 512), "ir_back.output_layer.3.weight": z(512, 25088),
             "ir_back.output_layer.3.bias": z(512), **bn("ir_back.output_layer.4", 512),
             "face_landback.output_layer.conv_6_dw.conv.weight": z(512, 1, 7, 7),
             **bn("face_landback.output_layer.conv_6_dw.bn", 512),
             "face_landback.output_layer.linear.weight": z(136, 512), **bn("face_landback.output_layer.bn", 136),
             "VIT.patch_embed.proj.weight": z(768, 256, 1, 1), "VIT.patch_embed.proj.bias": z(768),
             "VIT.eca_block.conv.weight": z(1, 1, 5), "VIT.CON1.weight": z(768, 256, 1, 1),
             "VIT.IRLinear1.weight": z(768, 1024), "VIT.IRLinear1.bias": z(768),
             "VIT.IRLinear2.weight": z(512, 768), "VIT.IRLinear2.bias": z(512)}
    for i in range(depth):
        extra.update({f"VIT.blocks.{i}.conv.weight": z(148, 148, 1), f"VIT.blocks.{i}.conv.bias": z(148)})
    for s, w in enumerate((28, 14, 7)):
        extra[f"attn{s + 1}.relative_position_index"] = z(w * w, w * w, dtype=torch.long)
    return extra


RECORDER = '''
class RecorderMeter:
    def __init__(self, total_epoch):
        self.total_epoch, self.current_epoch = total_epoch, 0
'''


def write_posterv2_checkpoint(path, tmp_path, state, monkeypatch, edit=None):
    """torch.save of a poster-v2 state dict as POSTER V2's main.py saves it: its names, DataParallel keys,
    epoch, best_acc, optimizer and recorder objects of a class from a throw-away module, which is gone
    (file and sys.modules) at load time. -> how many of the file's tensors only POSTER V2 has."""
    sd = {**posterv2_names(state), **posterv2_extras(state["head.weight"].shape[0])}
    if edit:
        edit(sd)
    (tmp_path / "throwaway_main.py").write_text(RECORDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    recorder = importlib.import_module("throwaway_main").RecorderMeter(200)
    torch.save({"epoch": 120, "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "best_acc": torch.tensor(92.21), "optimizer": {"state": {}, "param_groups": [{"lr": 3.5e-5}]},
                "recorder": recorder, "recorder1": recorder}, path)
    del sys.modules["throwaway_main"]
    (tmp_path / "throwaway_main.py").unlink()
    return len(posterv2_extras(state["head.weight"].shape[0]))


def test_poster_v2_stage_shapes_at_224_and_its_checkpoint_read_with_identical_logits(posterv2_7):
    """Every stage's shape at 224; a checkpoint as POSTER V2's main.py saves it (which torch.load with
    weights_only refuses) read into a fresh poster-v2 gives the source's logits exactly."""
    (poster_v2, path), seen = posterv2_7, {}
    n_extra = len(posterv2_extras(7))  # what write_posterv2_checkpoint added besides the state dict
    with pytest.raises(Exception):  # what POSTER V2's own torch.load (weights_only) says of it
        torch.load(path, weights_only=True)
    n_classes, sd, skipped = posterv2_state_dict(path)
    assert n_classes == 7 and skipped == n_extra == 39
    model = PosterRWKV(PosterConfig.preset("poster-v2")).eval()
    model.load_state_dict(sd)
    keep = lambda name: lambda module, args, out: seen.__setitem__(name, out)  # noqa: E731
    m = poster_v2
    hooks = [m.ir_back.register_forward_hook(keep("ir")), m.face_landback.register_forward_hook(keep("landmarks")),
             m.last_face_conv.register_forward_hook(keep("last_face_conv")), m.mixer.register_forward_hook(keep("mixed")),
             m.mixer.register_forward_pre_hook(lambda module, args: seen.__setitem__("tokens", args[0]))]
    hooks += [getattr(scale, part).register_forward_hook(keep(f"{part}{s}")) for s, scale in enumerate(m.scales)
              for part in ("downsample", "attn", "ffn")] + [sc.register_forward_hook(keep(f"embed{s}"))
                                                            for s, sc in enumerate(m.scales)]
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = poster_v2(images)
        assert torch.equal(model(images), logits)
    for h in hooks:
        h.remove()
    shape = lambda t: tuple(t.shape)  # noqa: E731
    assert [shape(t) for t in seen["ir"]] == [(2, 64, 56, 56), (2, 128, 28, 28), (2, 256, 14, 14)]
    assert [shape(seen[f"downsample{s}"]) for s in range(3)] == [(2, 64, 28, 28), (2, 128, 14, 14), (2, 256, 7, 7)]
    assert [shape(t) for t in seen["landmarks"]] == [(2, 64, 28, 28), (2, 128, 14, 14), (2, 512, 7, 7)]
    assert shape(seen["last_face_conv"]) == (2, 256, 7, 7)
    for s, (n, c) in enumerate([(784, 64), (196, 128), (49, 256)]):
        attn, shortcut = seen[f"attn{s}"]
        assert shape(attn) == shape(shortcut) == shape(seen[f"ffn{s}"]) == (2, n, c)
        assert shape(seen[f"embed{s}"]) == (2, 49, 768)
    assert (shape(seen["tokens"]), shape(seen["mixed"]), shape(logits)) == ((2, 147, 768), (2, 768), (2, 7))


@functools.cache
def poster_v2_meta(n_classes=7):
    with torch.device("meta"):  # shapes without the init
        return PosterRWKV(PosterConfig.preset("poster-v2", n_classes=n_classes)).eval()


def posterv2_shapes_only(n_classes=7):
    """A poster-v2 state dict of the right keys and shapes whose tensors are one number per key, expanded
    (stride 0: a file of a few kB), and a real classifier."""
    sd = {k: torch.full((), i % 100, dtype=v.dtype).expand(v.shape)
          for i, (k, v) in enumerate(poster_v2_meta(n_classes).state_dict().items())}
    return {**sd, "head.weight": torch.randn(n_classes, 768), "head.bias": torch.randn(n_classes)}


@pytest.mark.parametrize("n_classes, edit, match", [
    (8, None, None),
    (7, lambda sd: sd.update({"VIT.extra_layer.weight": torch.zeros(3)}), r"not POSTER V2's: \['VIT.extra_layer.weight'\]"),
    (7, lambda sd: sd.pop("attn2.qkv.weight"), r"lacks the keys \['scales.1.attn.kv.weight'\]"),
    (7, lambda sd: sd.update({"conv3.weight": torch.zeros(256, 256, 1, 1)}),
     r"wrong shape: \['scales.2.downsample.weight \(256, 256, 1, 1\) \(need \(256, 256, 3, 3\)\)'\]"),
    (7, lambda sd: sd.pop("VIT.head.linear.weight"), r"no classifier \(VIT.head.linear.weight\)"),
], ids=["8-classes", "foreign-key", "missing-key", "wrong-shape", "no-classifier"])
def test_poster_posterv2_checkpoint_8_classes_and_errors_name_the_keys(tmp_path, monkeypatch, n_classes, edit, match):
    """An AffectNet-8 checkpoint reads as 8 classes, its classifier as saved; a foreign key, a missing
    one, a wrong shape and no classifier are ValueErrors naming the keys (POSTER V2's and ours)."""
    sd = posterv2_shapes_only(n_classes)
    write_posterv2_checkpoint(tmp_path / "c.pth", tmp_path, sd, monkeypatch, edit)
    if match:
        with pytest.raises(ValueError, match=match):
            posterv2_state_dict(tmp_path / "c.pth")
        return
    got_classes, got, _ = posterv2_state_dict(tmp_path / "c.pth")
    assert got_classes == 8 and got["head.weight"].shape == (8, 768) and torch.equal(got["head.bias"], sd["head.bias"])
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_poster_posterv2_class_orders():
    classes = ("Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")  # data.CLASSES
    # RAF-DB folders 1..7: Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral
    assert posterv2_class_map("rafdb", classes) == [6, 2, 1, 3, 5, 0, 4]
    # AffectNet folders 0..7: Neutral, Happy, Sad, Surprise, Fear, Disgust, Anger, Contempt
    assert posterv2_class_map("affectnet", classes) == [4, 3, 5, 6, 2, 1, 0]
    assert posterv2_class_map("affectnet", classes, 8) == [4, 3, 5, 6, 2, 1, 0, 7]
    assert posterv2_class_map("caer", classes) == list(range(7))  # folders by name, sorted: this order
    assert posterv2_class_map("caer", classes[::-1]) == list(range(6, -1, -1))  # the caller's order decides
    with pytest.raises(ValueError, match="8 only for AffectNet-8"):
        posterv2_class_map("rafdb", classes, 8)
    with pytest.raises(ValueError, match="released checkpoints for"):
        posterv2_class_map("fer2013", classes)
    with pytest.raises(ValueError, match=r"lack POSTER V2's \['Happy'\]"):
        posterv2_class_map("rafdb", ("Anger", "Disgust", "Fear", "Happiness", "Neutral", "Sad", "Surprise"))


def test_poster_is_a_model_file_without_data_import():
    import ast
    import poster
    tree = ast.parse(open(poster.__file__).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "data" not in imported and "train" not in imported
