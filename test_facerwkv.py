"""
FaceRWKV's tests, all of which run on a CPU-only machine (GPU-execution tests skip and say why).

    python -m pytest -q test_facerwkv.py

Sections: the WKV operator (wkv.cu on the CPU through g++, its NVRTC/nvcc builds, the torch RNN,
all against a float64 numpy reference), the model (RWKV-4 equations, RNN mode, variants, the
ResNet50 stem), the data (every format, splits, bad data, synthetic faces), and train.py (the
recipe, checkpoints and resume, evaluation, prediction, plots, torchrun).
"""

from dataclasses import asdict
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facerwkv import Block, FaceRWKV, FaceRWKVConfig
import facerwkv


# ----------------------------------------------------------------------------- the WKV operator
# The numpy RNN below is the reference every implementation is held to; it is itself checked
# against the naive O(T^2) formula. Errors are max|diff| / max|ref| (fp32 result vs float64).


def wkv_reference(w, u, k, v):
    """float64 numpy, RNN mode with the max trick (reference.md); w, u (C,), k, v (B, T, C)."""
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


def grads(fn, inputs, gy, dtype):
    xs = [x.to(dtype).clone().requires_grad_() for x in inputs]
    y = fn(*xs)
    g = torch.autograd.grad(y, xs, gy.to(dtype), allow_unused=True, materialize_grads=True)
    return y.detach(), g


requires_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                  reason="no C++ compiler: the CPU build of wkv.cu cannot be made")


def test_reference_matches_naive_formula():
    (w, u, k, v), _ = make_inputs(2, 40, 6)
    args = [x.double().numpy() for x in (w, u, k, v)]
    assert rel_err(wkv_reference(*args), wkv_naive(*args)) < 1e-12
    (w, u, k, v), _ = make_inputs(2, 40, 6, extreme=True)
    args = [x.double().numpy() for x in (w, u, k, v)]
    assert rel_err(wkv_reference(*args), wkv_naive(*args)) < 1e-10


def test_torch_rnn_float64_matches_reference():
    (w, u, k, v), _ = make_inputs(3, 50, 7, extreme=True)
    y = facerwkv.wkv_torch(*(x.double() for x in (w, u, k, v)))
    assert rel_err(y, wkv_reference(*(x.double().numpy() for x in (w, u, k, v)))) < 1e-12


def test_torch_rnn_gradcheck_float64():
    (w, u, k, v), _ = make_inputs(2, 6, 3)
    xs = [x.double().requires_grad_() for x in (w, u, k, v)]
    assert torch.autograd.gradcheck(facerwkv.wkv_torch, xs)


CASES = [  # (B, T, C, extreme, y tolerance, gradient tolerance)
    (2, 17, 5, False, 1e-5, 1e-4),
    (3, 1, 5, False, 1e-5, 1e-4),     # T = 1: no past at all
    (3, 64, 33, False, 1e-5, 1e-4),   # odd B*C, C not a multiple of 32
    (1, 130, 129, False, 1e-5, 1e-4), # B*C spills into a second block of threads
    (2, 96, 11, True, 1e-4, 1e-3),
]


@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("B,T,C,extreme,ytol,gtol", CASES)
def test_wkv_matches_float64_reference(backend, B, T, C, extreme, ytol, gtol):
    if backend == "kernel" and facerwkv.cpu_kernels() is None:
        pytest.skip("no C++ compiler: the CPU build of wkv.cu is unavailable")
    inputs, gy = make_inputs(B, T, C, extreme=extreme, seed=B * T + C)
    y_ref, g_ref = grads(lambda *a: wkv_naive(*a, lib=torch), inputs, gy, torch.float64)
    assert rel_err(y_ref, wkv_reference(*(x.double().numpy() for x in inputs))) < 1e-10
    y, g = grads(lambda *a: facerwkv.wkv(*a, backend=backend), inputs, gy, torch.float32)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert rel_err(y, y_ref) <= ytol
    for name, a, b in zip("wukv", g, g_ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= gtol, (name, rel_err(a, b))


@requires_cxx
@pytest.mark.parametrize("extreme", [False, True])
def test_cpu_kernel_long_sequence(extreme):
    # T = 4096: no compile-time cap on T; the float64 torch RNN (checked above) is the reference
    inputs, gy = make_inputs(1, 4096, 8, extreme=extreme, seed=7)
    y_ref, g_ref = grads(facerwkv.wkv_torch, inputs, gy, torch.float64)
    y, g = grads(lambda *a: facerwkv.wkv(*a, backend="kernel"), inputs, gy, torch.float32)
    ytol, gtol = (1e-4, 1e-3) if extreme else (1e-5, 1e-4)
    assert rel_err(y, y_ref) <= ytol
    for name, a, b in zip("wukv", g, g_ref):
        assert torch.isfinite(a).all() and rel_err(a, b) <= gtol, (name, rel_err(a, b))


@requires_cxx
def test_emulated_kernel_called_directly():
    # the unmodified wkv.cu, built by g++ behind the CUDA shim, called through ctypes on numpy
    lib = facerwkv.cpu_kernels()
    (w, u, k, v), gy = make_inputs(3, 45, 7, seed=3)
    w, u, k, v, gy = (np.ascontiguousarray(x.numpy()) for x in (w, u, k, v, gy))
    B, T, C = k.shape
    y = np.full_like(k, np.nan)
    ptr = lambda a: a.ctypes.data
    lib.cpu_wkv_forward(B, T, C, ptr(w), ptr(u), ptr(k), ptr(v), ptr(y), 2)
    assert rel_err(y, wkv_reference(*(x.astype(np.float64) for x in (w, u, k, v)))) < 1e-5
    gw, gu = np.full((B, C), np.nan, np.float32), np.full((B, C), np.nan, np.float32)
    gk, gv = np.full_like(k, np.nan), np.full_like(k, np.nan)
    lib.cpu_wkv_backward(B, T, C, ptr(w), ptr(u), ptr(k), ptr(v), ptr(y), ptr(gy),
                         ptr(gw), ptr(gu), ptr(gk), ptr(gv), 2)
    _, g_ref = grads(lambda *a: wkv_naive(*a, lib=torch), [torch.from_numpy(x) for x in (w, u, k, v)],
                     torch.from_numpy(gy), torch.float64)
    for name, a, b in zip("wukv", (gw.sum(0), gu.sum(0), gk, gv), g_ref):
        assert rel_err(a, b.numpy()) < 1e-4, name


def test_wkv_dtypes_and_errors():
    (w, u, k, v), _ = make_inputs(2, 9, 4)
    y32 = facerwkv.wkv(w, u, k, v)
    for dtype in (torch.float64, torch.bfloat16):  # computed in fp32, returned in k's dtype
        y = facerwkv.wkv(w, u, k.to(dtype), v.to(dtype))
        assert y.dtype == dtype
        assert torch.allclose(y.float(), y32, atol=0.05 if dtype == torch.bfloat16 else 1e-6)
    with pytest.raises(ValueError, match="shape"):
        facerwkv.wkv(w, u, k[0], v[0])
    with pytest.raises(ValueError, match="shape"):
        facerwkv.wkv(w[:3], u, k, v)
    with pytest.raises(ValueError, match="backend"):
        facerwkv.wkv(w, u, k, v, backend="cuda-please")


def _nvcc():
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_wkv_cu_compiles_with_nvcc(arch, tmp_path):
    out = subprocess.run([_nvcc(), f"-arch={arch}", "-cubin", "-o", str(tmp_path / "wkv.cubin"),
                          facerwkv.WKV_CU], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "wkv.cubin").stat().st_size > 0


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:  # cupy missing, or no NVRTC library next to it
        return None


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
    assert ".entry wkv_forward" in ptx and ".entry wkv_backward" in ptx


def _gpu_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "cupy is not installed"
    return None


@pytest.mark.skipif(_gpu_reason() is not None, reason=f"GPU path: {_gpu_reason()}")
@pytest.mark.parametrize("B,T,C,extreme,ytol,gtol", CASES + [(2, 4096, 40, True, 1e-4, 1e-3)])
def test_cuda_kernel_matches_reference(B, T, C, extreme, ytol, gtol):
    inputs, gy = make_inputs(B, T, C, extreme=extreme, seed=B * T + C)
    y_ref, g_ref = grads(facerwkv.wkv_torch, inputs, gy, torch.float64)
    cuda = [x.cuda() for x in inputs]
    y, g = grads(facerwkv.wkv, cuda, gy.cuda(), torch.float32)
    assert rel_err(y.cpu(), y_ref) <= ytol
    for name, a, b in zip("wukv", g, g_ref):
        assert torch.isfinite(a).all() and rel_err(a.cpu(), b) <= gtol, name


# ----------------------------------------------------------------------------- the model
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
}
RNN_VARIANTS = VARIANTS
ALL_VARIANTS = dict(VARIANTS, transformer=dict(TINY, mixer="transformer", n_head=4))


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


# ---------------------------------------------------------------------------------------------
# The RWKV-4 block against the equations of the RWKV paper, written out naively in float64

def naive_rwkv4_block(p, x):
    """x: (T, C) one sequence; p: the block's state dict. Every equation spelled out, O(T^2) WKV."""
    def layer_norm(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w + b

    def shift(x):
        return torch.cat([torch.zeros_like(x[:1]), x[:-1]])

    def mix(x, m):
        return x * m.view(-1) + shift(x) * (1 - m.view(-1))

    T = x.shape[0]
    h = layer_norm(x, p["ln1.weight"], p["ln1.bias"])
    k = mix(h, p["att.time_mix_k"]) @ p["att.key.weight"].T
    v = mix(h, p["att.time_mix_v"]) @ p["att.value.weight"].T
    r = mix(h, p["att.time_mix_r"]) @ p["att.receptance.weight"].T
    w, u = torch.exp(p["att.time_decay"]), p["att.time_first"]
    wkv = torch.zeros_like(k)
    for t in range(T):
        num = torch.exp(u + k[t]) * v[t]
        den = torch.exp(u + k[t])
        for i in range(t):
            weight = torch.exp(-(t - 1 - i) * w + k[i])
            num = num + weight * v[i]
            den = den + weight
        wkv[t] = num / den
    x = x + (torch.sigmoid(r) * wkv) @ p["att.output.weight"].T
    h = layer_norm(x, p["ln2.weight"], p["ln2.bias"])
    kk = torch.relu(mix(h, p["ffn.time_mix_k"]) @ p["ffn.key.weight"].T) ** 2
    rr = mix(h, p["ffn.time_mix_r"]) @ p["ffn.receptance.weight"].T
    return x + torch.sigmoid(rr) * (kk @ p["ffn.value.weight"].T)


def test_block_matches_rwkv4_equations():
    torch.manual_seed(0)
    config = FaceRWKVConfig(**dict(TINY, n_embd=16, dim_att=12, dim_ffn=40))
    block = perturb_(Block(config, layer_id=1), scale=0.3).double()
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    p = {k: v.detach() for k, v in block.state_dict().items()}
    expected = torch.stack([naive_rwkv4_block(p, xb) for xb in x])
    with torch.no_grad():
        parallel = block(x)  # the WKV operator computes in float32
        state, rnn = block.init_state(3, x.device, x.dtype), []
        for t in range(x.shape[1]):
            y, state = block.step(x[:, t], state)
            rnn.append(y)
        rnn = torch.stack(rnn, dim=1)
    assert (parallel - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (rnn - expected).abs().max() <= 1e-10 * expected.abs().max()  # float64 all the way


def test_block_parameter_names_and_shapes_are_the_reference():
    config = FaceRWKVConfig(**dict(TINY, n_embd=16, dim_att=12, dim_ffn=40))
    shapes = {k: tuple(v.shape) for k, v in Block(config, 0).state_dict().items()}
    C, A, Fh = 16, 12, 40
    assert shapes == {
        "ln1.weight": (C,), "ln1.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,),
        "att.time_decay": (A,), "att.time_first": (A,),
        "att.time_mix_k": (1, 1, C), "att.time_mix_v": (1, 1, C), "att.time_mix_r": (1, 1, C),
        "att.key.weight": (A, C), "att.value.weight": (A, C), "att.receptance.weight": (A, C),
        "att.output.weight": (C, A),
        "ffn.time_mix_k": (1, 1, C), "ffn.time_mix_r": (1, 1, C),
        "ffn.key.weight": (Fh, C), "ffn.receptance.weight": (C, C), "ffn.value.weight": (C, Fh),
    }
    model = FaceRWKV(FaceRWKVConfig(**TINY))
    assert "blocks.1.att.time_decay" in model.state_dict()


def test_fancy_init():
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


# ---------------------------------------------------------------------------------------------
# RNN mode == parallel mode

@pytest.mark.parametrize("name", list(RNN_VARIANTS))
def test_forward_rnn_equals_forward(name):
    torch.manual_seed(0)
    config = FaceRWKVConfig(**RNN_VARIANTS[name])
    model = perturb_(FaceRWKV(config)).eval()
    x = images(config)
    with torch.no_grad():
        parallel = model(x)
    rnn = model.forward_rnn(x)
    assert parallel.dtype == rnn.dtype == torch.float32
    assert (rnn - parallel).abs().max() <= 1e-5 * parallel.abs().max()


def test_rnn_state_size_does_not_depend_on_tokens():
    sizes = []
    for img_size in ((10, 10), (40, 60), (80, 120)):
        model = FaceRWKV(FaceRWKVConfig(**dict(TINY, img_size=img_size)))
        state = [b.init_state(2, torch.device("cpu"), torch.float32) for b in model.blocks]
        sizes.append(sum(t.numel() for s in state for t in s))
    assert sizes[0] == sizes[1] == sizes[2] == 2 * 2 * 5 * 32  # B * layers * (5 vectors of d)


def test_transformer_has_no_rnn_mode():
    config = FaceRWKVConfig(**ALL_VARIANTS["transformer"])
    with pytest.raises(ValueError, match="no RNN mode"):
        FaceRWKV(config).forward_rnn(images(config))


# ---------------------------------------------------------------------------------------------
# Every variant builds, runs forward and backward, and trains a step

@pytest.mark.parametrize("name", list(ALL_VARIANTS))
def test_variant_forward_backward(name):
    torch.manual_seed(0)
    config = FaceRWKVConfig(**ALL_VARIANTS[name])
    model = FaceRWKV(config).train()
    x = images(config, batch=3)
    logits = model(x)
    assert logits.shape == (3, 7)
    loss = F.cross_entropy(logits, torch.tensor([0, 3, 6]))
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    # each part exists only when asked for
    assert (model.pos_emb is not None) == config.pos_emb
    assert (model.backbone is not None) == (config.backbone == "resnet50")
    if config.mixer == "identity":
        assert sum(p.numel() for p in model.blocks.parameters()) == 0


def test_one_token_model():
    config = FaceRWKVConfig(**dict(TINY, img_size=(10, 10)))
    assert config.n_tokens == 1
    model = perturb_(FaceRWKV(config)).eval()
    x = images(config)
    assert model(x).shape == (2, 7)


def test_patches_in_raster_order():
    config = FaceRWKVConfig(**dict(TINY, img_size=(20, 30)))  # 2x3 patches
    model = FaceRWKV(config)
    x = torch.zeros(1, 3, 20, 30)
    x[0, :, 10:20, 0:10] = 1.0  # row 1, col 0 -> token 3
    changed = (model.embed(x) - model.embed(torch.zeros_like(x))).abs().sum(-1)[0]
    assert changed.nonzero().flatten().tolist() == [3]


def test_wrong_image_shape_is_a_clear_error():
    model = FaceRWKV(FaceRWKVConfig(**TINY))
    with pytest.raises(ValueError, match=r"\(B, 3, 40, 60\)"):
        model(torch.rand(2, 3, 60, 40))
    with pytest.raises(ValueError, match="config.img_size"):
        model(torch.rand(3, 40, 60))


def test_param_summary_and_counts():
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


# ---------------------------------------------------------------------------------------------
# ResNet50 stem: torchvision keys, loading, freezing

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


def test_stem_keys_are_torchvision_keys():
    model = FaceRWKV(FaceRWKVConfig(**HYBRID))
    assert set(model.backbone.state_dict()) == {
        "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"}
    assert model.backbone(torch.rand(1, 3, 40, 60)).shape == (1, 64, 10, 15)


def test_load_backbone_weights(tmp_path):
    sd = fake_torchvision_resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(sd, path)
    model = FaceRWKV(FaceRWKVConfig(**HYBRID))
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


def test_load_backbone_weights_errors(tmp_path):
    model = FaceRWKV(FaceRWKVConfig(**HYBRID))
    with pytest.raises(FileNotFoundError, match="not found"):
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


def test_frozen_stem_gets_no_gradient_and_keeps_bn_stats(tmp_path):
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


# ---------------------------------------------------------------------------------------------
# Config

def test_presets_and_tokens():
    for name, (L, d) in {"small": (2, 128), "medium": (4, 256), "large": (6, 512), "hybrid": (6, 512)}.items():
        c = FaceRWKVConfig.preset(name)
        assert (c.n_layer, c.n_embd, c.dim_att, c.dim_ffn, c.n_tokens) == (L, d, d, 4 * d, 600)
    hybrid = FaceRWKVConfig.preset("hybrid")
    assert (hybrid.backbone, hybrid.patch_size, hybrid.grid) == ("resnet50", 5, (20, 30))
    assert FaceRWKVConfig.preset("small", pool="mean").pool == "mean"


def test_config_json_round_trip():
    config = FaceRWKVConfig.preset("hybrid", freeze_backbone=True, pos_emb=True, img_size=[200, 300])
    again = FaceRWKVConfig(**json.loads(json.dumps(asdict(config))))
    assert again == config and again.img_size == (200, 300)


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
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        FaceRWKVConfig(**dict(TINY, **overrides))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'; use one of"):
        FaceRWKVConfig.preset("huge")
