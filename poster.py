"""
POSTER V2, and POSTER-RWKV: POSTER V2 with RWKV-4 in place of its transformer.

POSTER V2 (Mao et al. 2023, "POSTER V2: A simpler and stronger facial expression recognition
network", arXiv 2301.12149; public code Talented-Q/POSTER_V2) fuses two streams at three scales:

 image ─ resize 112 ─┬─ IR-50, stages 1-3 ──── x1, x2, x3 ── 3x3/2 conv each ── k, v ─┐
                     └─ MobileFaceNet (landmarks) ─ out3, out4, conv_features ── q ───┤
                                                   (last_face_conv on the third)      ▼
                       landmark -> image cross-attention per scale (global, rel.-pos. bias)
                       + feedforward (layer scale, drop path)                         ▼
                       multi-scale embed: each scale to a 7x7 grid of 768-d tokens -> 147 tokens
                                                                                      ▼
                       THE TOKEN MIXER:  "transformer": POSTER V2's 2-block ViT (cls token)
                                         "rwkv":        2 RWKV-4 blocks (the project's Block)
                                         "vrwkv":       2 Vision-RWKV blocks (Q-Shift per scale)
                                                                                      ▼
                       SE block -> Linear -> logits

The project's objective (project-note.md) is the "rwkv" mixer; "transformer" reproduces POSTER V2
on the same code for the comparison. Each piece below names the row of the table in
poster-v2.md it implements. Read top to bottom: config, the image backbone (IR-50), the landmark
backbone (MobileFaceNet), the cross-attention with its feedforward, the multi-scale embed, the
mixers, the head, the model; then weight loading and POSTER V2's way of counting parameters.

Pretrained weights are never fetched: ir50.pth and mobilefacenet_model_best.pth.tar come from
paths the user gives (PosterRWKV.load_ir50_weights / load_landmark_weights).
"""

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from facerwkv import Block, FaceRWKVConfig, VRWKVBlock, param_table, read_state_dict

# -----------------------------------------------------------------------------
# Configuration

POSTER_OPTIONS = {
    "mixer": ("transformer", "rwkv", "vrwkv"),
    "pool": ("cls", "last", "mean"),
}

POSTER_PRESETS = {
    # POSTER V2 itself: 2 ViT blocks, 8 heads, cls token. 43.7 M parameters counted as POSTER V2 counts.
    "poster-v2": dict(mixer="transformer"),
    # The project's objective: the same network with 2 RWKV-4 blocks over the 147 tokens. It pools the
    # last token (pool=None -> "last", as the FaceRWKV paper), by measurement: on the small preset,
    # 44.0 % test against 30.6 % / 29.4 % with the mean (README, the POSTER comparison).
    "poster-rwkv": dict(mixer="rwkv"),
    # The same with Vision-RWKV's blocks (Bi-WKV, Q-Shift): Q-Shift runs on each scale's 7x7 grid
    # on its own, never across scales; Bi-WKV runs over all 147 tokens.
    "poster-vrwkv": dict(mixer="vrwkv"),
    # Small enough to train on a 2-core CPU at 112 x 112: same structure and 147 tokens, fewer units,
    # narrower. Forward+backward of a batch of 32 takes about 1.5 s on this project's 2 cores (2.1 CPU-s
    # on one), mostly the convolutions and the 784-token first cross-attention; the mixer is ~15 %.
    # backbone_size=64 (48 tokens) is ~4x faster, if the token count may change.
    "poster-small": dict(img_size=112, ir_units=(1, 1, 2), dims=(16, 32, 64), cross_heads=(1, 1, 2),
                         landmark_units=(1, 1, 1), landmark_dim=128, embed_dim=128, n_head=4,
                         mixer="rwkv"),
}


@dataclass
class PosterConfig:
    n_classes: int = 7
    img_size: int = 224                # input images are (B, 3, img_size, img_size), ImageNet-normalised
    backbone_size: int = 112           # both backbones see the image resized to this (POSTER V2: 112)
    ir_units: tuple = (3, 4, 14)       # bottleneck_IR units in IR-50's stages 1, 2, 3
    dims: tuple = (64, 128, 256)       # channels of the three scales: IR stages = landmark maps = cross-attn
    cross_heads: tuple = (2, 4, 8)     # heads of the three cross-attentions (head dim 32 in POSTER V2)
    landmark_units: tuple = (4, 6, 2)  # residual Depth_Wise units in MobileFaceNet's conv_3, conv_4, conv_5
    landmark_dim: int = 512            # width of MobileFaceNet's conv_features (conv_6_sep)
    embed_dim: int = 768               # width of the 147 tokens and of the mixer
    depth: int = 2                     # blocks of the token mixer
    n_head: int = 8                    # heads of the transformer mixer
    mlp_ratio: float = 4.0             # MLP hidden width / width (cross-attn feedforward, ViT, RWKV channel-mix)
    layer_scale: float = 1e-5          # initial gamma of the cross-attn feedforward; None: no layer scale
    drop_path: tuple = (0.0, 0.125, 0.25)  # stochastic depth of the three cross-attn feedforwards
    mixer: str = "rwkv"                # "transformer" (POSTER V2) | "rwkv" (RWKV-4) | "vrwkv" (Vision-RWKV)
    pool: str = None                   # "cls" (transformer) | "last" | "mean" (RWKV mixers); None -> cls / last
    freeze_landmarks: bool = False     # set by load_landmark_weights: the landmark branch is frozen
    imagenet_norm = True               # (not a field) both backbones expect ImageNet-normalised images

    def __post_init__(self):
        if self.pool is None:
            self.pool = "cls" if self.mixer == "transformer" else "last"
        for name in ("ir_units", "dims", "cross_heads", "landmark_units", "drop_path"):
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 3):
                raise ValueError(f"{name} needs one value per scale, 3 in all, e.g. {getattr(PosterConfig, name)}; "
                                 f"got {value!r}")
            setattr(self, name, tuple(value))  # a list after a JSON round trip
        ints = ("n_classes", "img_size", "backbone_size", "landmark_dim", "embed_dim", "depth", "n_head")
        for name, value in [(n, getattr(self, n)) for n in ints] + [
                (f"{n}[{i}]", v) for n in ("ir_units", "dims", "cross_heads", "landmark_units")
                for i, v in enumerate(getattr(self, n))]:
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be an integer >= 2; got {self.n_classes!r}")
        for name, allowed in POSTER_OPTIONS.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not an option; use one of {allowed}")
        if self.mixer == "transformer" and self.pool != "cls":
            raise ValueError(f"the transformer mixer pools its cls token, as POSTER V2; set pool='cls' (or None), "
                             f"not {self.pool!r}")
        if self.mixer != "transformer" and self.pool == "cls":
            raise ValueError(f"pool='cls' needs the transformer mixer (the {self.mixer} mixer has no cls token); "
                             "use pool='last' or 'mean'")
        if self.backbone_size % 16:
            raise ValueError(f"backbone_size must be a multiple of 16 (the third scale is backbone_size/16 wide); "
                             f"got {self.backbone_size}, use e.g. {max(16, round(self.backbone_size / 16) * 16)}")
        for s, (dim, heads) in enumerate(zip(self.dims, self.cross_heads)):
            if dim % heads:
                raise ValueError(f"dims[{s}]={dim} is not divisible by cross_heads[{s}]={heads}; use cross_heads[{s}] "
                                 f"in {[h for h in range(1, dim + 1) if dim % h == 0]}")
        if self.mixer == "transformer" and self.embed_dim % self.n_head:
            raise ValueError(f"the transformer mixer needs embed_dim ({self.embed_dim}) divisible by n_head "
                             f"({self.n_head}); use n_head in "
                             f"{[h for h in range(1, self.embed_dim + 1) if self.embed_dim % h == 0]}")
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0
                and int(self.mlp_ratio * min(*self.dims, self.embed_dim)) >= 1):
            raise ValueError(f"mlp_ratio must be a positive number (POSTER V2: 4.0); got {self.mlp_ratio!r}")
        if self.layer_scale is not None and not (isinstance(self.layer_scale, (int, float)) and self.layer_scale > 0):
            raise ValueError(f"layer_scale must be a positive number (POSTER V2: 1e-5) or None for no layer scale; "
                             f"got {self.layer_scale!r}")
        if not all(isinstance(p, (int, float)) and 0 <= p < 1 for p in self.drop_path):
            raise ValueError(f"drop_path values must be probabilities in [0, 1) (POSTER V2: (0.0, 0.125, 0.25)); "
                             f"got {self.drop_path!r}")

    @property
    def grids(self):
        """Side of each scale's square map after the downsample convs: (28, 14, 7) at 112."""
        s = self.backbone_size
        return s // 4, s // 8, s // 16

    @property
    def n_tokens(self):
        """Tokens the mixer sees: each scale embedded onto the third scale's grid, 3 x 7 x 7 = 147."""
        return 3 * self.grids[2] ** 2

    @classmethod
    def preset(cls, name, **overrides):
        """"poster-v2", "poster-rwkv", "poster-vrwkv" or "poster-small", with any field overridden."""
        if name not in POSTER_PRESETS:
            raise ValueError(f"unknown preset {name!r}; use one of {tuple(POSTER_PRESETS)}")
        return cls(**{**POSTER_PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# Image backbone (table row "image backbone"): ArcFace IR-50, its first three stages.
# Attribute names are those of POSTER V2's ir50.py, so its state-dict keys load unchanged:
# input_layer.{0,1,2}.*, body{1,2,3}.{unit}.shortcut_layer.*, body{1,2,3}.{unit}.res_layer.*

class BottleneckIR(nn.Module):
    """bottleneck_IR(in, out, stride): BN, 3x3 conv, PReLU, 3x3 conv (the stride), BN; plus a
    shortcut that is a strided identity (MaxPool2d(1, s)) when in == out, else 1x1 conv + BN."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        if in_channels == out_channels:
            self.shortcut_layer = nn.MaxPool2d(1, stride)  # keeps every stride-th pixel
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                                nn.BatchNorm2d(out_channels))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)  # (B, out, H/stride, W/stride)


class IR50(nn.Module):
    """Input layer (3x3 conv 3->64, BN, PReLU) and three stages of bottleneck_IR units, the first
    unit of each stage striding 2: (3, 4, 14) units of 64, 128, 256 channels in IR-50. Its fourth
    stage and output layer (BN, Linear 25088->512) are not used by POSTER V2 and not built."""

    def __init__(self, config):
        super().__init__()
        d1, d2, d3 = config.dims
        self.input_layer = nn.Sequential(nn.Conv2d(3, d1, 3, 1, 1, bias=False), nn.BatchNorm2d(d1), nn.PReLU(d1))

        def stage(in_channels, out_channels, units):
            return nn.Sequential(BottleneckIR(in_channels, out_channels, 2),
                                 *[BottleneckIR(out_channels, out_channels, 1) for _ in range(units - 1)])
        self.body1 = stage(d1, d1, config.ir_units[0])
        self.body2 = stage(d1, d2, config.ir_units[1])
        self.body3 = stage(d2, d3, config.ir_units[2])

    def forward(self, x):
        x = self.input_layer(x)  # (B, 64, 112, 112)
        x1 = self.body1(x)       # (B, 64, 56, 56)
        x2 = self.body2(x1)      # (B, 128, 28, 28)
        x3 = self.body3(x2)      # (B, 256, 14, 14)
        return x1, x2, x3


# -----------------------------------------------------------------------------
# Landmark backbone (table row "landmark backbone"): MobileFaceNet, a 68-landmark regressor.
# Attribute names are those of POSTER V2's mobilefacenet.py, so the keys of
# mobilefacenet_model_best.pth.tar's ['state_dict'] load unchanged (conv1.conv.weight,
# conv_3.model.0.conv_dw.bn.running_mean, ...). Its GDC head (output_layer: depthwise 7x7,
# Linear 512->136, BN1d) computes the landmarks themselves; POSTER V2 runs it and throws the result
# away, so it is not built here and its keys in a checkpoint are skipped.

class ConvBlock(nn.Module):
    """Conv_block: conv (no bias), BN, PReLU."""

    def __init__(self, in_channels, out_channels, kernel=1, stride=1, padding=0, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.prelu = nn.PReLU(out_channels)

    def forward(self, x):
        return self.prelu(self.bn(self.conv(x)))


class LinearBlock(nn.Module):
    """Linear_block: conv (no bias), BN; no activation (a linear bottleneck)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self.bn(self.conv(x))


class DepthWise(nn.Module):
    """Depth_Wise(in, out, groups g, stride s): an inverted residual. 1x1 expand to g channels,
    depthwise 3x3 (stride s), 1x1 linear projection to out; + the input when residual."""

    def __init__(self, in_channels, out_channels, groups, stride, residual=False):
        super().__init__()
        self.conv = ConvBlock(in_channels, groups)
        self.conv_dw = ConvBlock(groups, groups, kernel=3, stride=stride, padding=1, groups=groups)
        self.project = LinearBlock(groups, out_channels)
        self.residual = residual

    def forward(self, x):
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


class Residual(nn.Module):
    """Residual: n residual Depth_Wise units at constant width c, expanding to g inside."""

    def __init__(self, channels, units, groups):
        super().__init__()
        self.model = nn.Sequential(*[DepthWise(channels, channels, groups, 1, residual=True) for _ in range(units)])

    def forward(self, x):
        return self.model(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet up to conv_features, returning the three maps POSTER V2 uses. Widths follow
    the scales: c1 = dims[0] (64), c2 = dims[1] (128), expanding 2x (4x in conv_45) inside the
    Depth_Wise units; conv_6_sep widens to landmark_dim (512)."""

    def __init__(self, config):
        super().__init__()
        c1, c2 = config.dims[:2]
        n3, n4, n5 = config.landmark_units
        self.conv1 = ConvBlock(3, c1, kernel=3, stride=2, padding=1)
        self.conv2_dw = ConvBlock(c1, c1, kernel=3, stride=1, padding=1, groups=c1)
        self.conv_23 = DepthWise(c1, c1, groups=2 * c1, stride=2)
        self.conv_3 = Residual(c1, n3, groups=2 * c1)
        self.conv_34 = DepthWise(c1, c2, groups=2 * c2, stride=2)
        self.conv_4 = Residual(c2, n4, groups=2 * c2)
        self.conv_45 = DepthWise(c2, c2, groups=4 * c2, stride=2)
        self.conv_5 = Residual(c2, n5, groups=2 * c2)
        self.conv_6_sep = ConvBlock(c2, config.landmark_dim)
        for m in self.modules():  # MobileFaceNet's own init (BatchNorm keeps PyTorch's 1, 0)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.conv2_dw(self.conv1(x))       # (B, 64, 56, 56)
        out3 = self.conv_3(self.conv_23(x))    # (B, 64, 28, 28)
        out4 = self.conv_4(self.conv_34(out3))  # (B, 128, 14, 14)
        x = self.conv_5(self.conv_45(out4))    # (B, 128, 7, 7)
        conv_features = self.conv_6_sep(x)     # (B, 512, 7, 7)
        return out3, out4, conv_features


# -----------------------------------------------------------------------------
# Landmark -> image cross-attention (table rows "cross-attention" and "feedforward")

def relative_position_index(w):
    """Swin's index into a (2w-1)^2 table of biases, for every pair of cells of a w x w window:
    (w*w, w*w), entry [i, j] = which relative offset (dy, dx) leads from cell j to cell i."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)  # (N, N, 2), each in [0, 2w-2]
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]                              # (N, N)


class LandmarkCrossAttention(nn.Module):
    """POSTER V2's window + WindowAttentionGlobal at one scale, with the window as large as the
    map, so every landmark cell attends to every image cell. The image map is LayerNorm-ed into
    tokens, k and v come from one Linear(C, 2C) (POSTER's `qkv`); the query is the landmark map
    itself, unprojected. A learned bias per relative offset and head is added to the scores.
    Returns the attention output and the normalised image tokens (the feedforward's shortcut)."""

    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads, self.window = heads, window
        self.norm = nn.LayerNorm(dim)         # POSTER's window{i}.norm
        self.kv = nn.Linear(dim, 2 * dim)     # POSTER's attn{i}.qkv (it makes only k and v)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # rebuilt from the window size, so not saved (784 x 784 integers at the first scale)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, q):
        # x: image map (B, C, w, w), q: landmark map (B, C, w, w)
        B, C, H, W = x.shape
        N, h = H * W, self.heads
        x = self.norm(x.permute(0, 2, 3, 1).reshape(B, N, C))                  # (B, N, C) image tokens
        k, v = self.kv(x).view(B, N, 2, h, C // h).permute(2, 0, 3, 1, 4)     # 2 x (B, h, N, C/h)
        q = q.permute(0, 2, 3, 1).reshape(B, N, h, C // h).transpose(1, 2)    # (B, h, N, C/h)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, h)
        bias = bias.view(N, N, h).permute(2, 0, 1).to(q.dtype)                # (h, N, N)
        # softmax(q k^T / sqrt(C/h) + bias) v: each landmark cell gathers the image cells it matches
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)           # (B, h, N, C/h)
        return self.proj(y.transpose(1, 2).reshape(B, N, C)), x               # (B, N, C), (B, N, C)


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a sample's residual branch with probability p (and
    scale the kept ones by 1/(1-p)); the identity in eval mode or when p = 0."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    """Linear, GELU, Linear (timm's Mlp; names fc1, fc2 as in POSTER V2 and timm)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CrossFeedForward(nn.Module):
    """POSTER V2's feedforward after a cross-attention: x = shortcut + gamma1 * attn (the shortcut
    is the LayerNorm-ed image tokens, as in POSTER V2, not the raw ones), then
    x = x + gamma2 * MLP(LN(x)); layer-scale gammas start at 1e-5, so both branches start near off."""

    def __init__(self, dim, mlp_ratio, layer_scale, drop_path):
        super().__init__()
        if layer_scale is None:
            self.gamma1 = self.gamma2 = None
        else:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)

    def scale(self, gamma, x):
        return x if gamma is None else gamma * x

    def forward(self, attn, shortcut):
        x = shortcut + self.drop_path(self.scale(self.gamma1, attn))              # (B, N, C)
        return x + self.drop_path(self.scale(self.gamma2, self.mlp(self.norm(x))))  # (B, N, C)


# -----------------------------------------------------------------------------
# One scale of the pyramid (rows "downsample", "cross-attention", "feedforward", "multi-scale embed")

class ScaleFusion(nn.Module):
    """Scale s (0, 1, 2) of POSTER V2's pyramid: downsample the IR map (3x3/2 conv), let the
    landmark map attend to it, feedforward, then embed onto the third scale's grid as embed_dim
    tokens: 2 - s strided 3x3 convs (POSTER's embed_q: two, embed_k: one), or a 1x1 conv for the
    third scale (POSTER's embed_v). No activation between the embedding convs, as POSTER V2."""

    def __init__(self, config, s):
        super().__init__()
        dim, E = config.dims[s], config.embed_dim
        self.downsample = nn.Conv2d(dim, dim, 3, stride=2, padding=1)  # POSTER's conv{s+1}
        self.attn = LandmarkCrossAttention(dim, config.cross_heads[s], config.grids[s])
        self.ffn = CrossFeedForward(dim, config.mlp_ratio, config.layer_scale, config.drop_path[s])
        if s < 2:
            self.embed = nn.Sequential(*[nn.Conv2d(dim if i == 0 else E, E, 3, stride=2, padding=1)
                                         for i in range(2 - s)])
        else:
            self.embed = nn.Sequential(nn.Conv2d(dim, E, 1))

    def forward(self, x_ir, q):
        # x_ir: IR-50 map (B, C, 2w, 2w), q: landmark map (B, C, w, w)
        x = self.downsample(x_ir)                          # (B, C, w, w)
        B, C, w, _ = x.shape
        x = self.ffn(*self.attn(x, q))                     # (B, w*w, C)
        x = x.transpose(1, 2).reshape(B, C, w, w)          # (B, C, w, w)
        return self.embed(x).flatten(2).transpose(1, 2)    # (B, 49, E)


# -----------------------------------------------------------------------------
# The token mixers over the 147 tokens (table row "the transformer", and its RWKV replacement)

def init_vit_(module):
    """POSTER V2's _init_vit_weights, applied to its ViT and head: Linear trunc-normal 0.01, zero
    biases, LayerNorm 1 and 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ViTAttention(nn.Module):
    """Multi-head self-attention, qkv with bias (timm's Attention)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, C/h)
        y = F.scaled_dot_product_attention(q, k, v)       # (B, h, T, C/h)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class ViTBlock(nn.Module):
    """POSTER V2's ViT block: pre-LN (eps 1e-6), self-attention, MLP (GELU); no dropout, no drop path."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))  # (B, T, C)


class PosterViT(nn.Module):
    """POSTER V2's transformer: prepend a cls token, add a learned position embedding over the
    148 tokens, the blocks, a final LayerNorm; the cls token is the output."""

    def __init__(self, config):
        super().__init__()
        E = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.n_tokens + 1, E))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList([ViTBlock(E, config.n_head, config.mlp_ratio) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(E, eps=1e-6)
        init_vit_(self)

    def forward(self, x):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 148, E)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]  # (B, E)


class RWKVMixer(nn.Module):
    """The replacement: the project's RWKV-4 blocks (facerwkv.Block, the class FaceRWKV uses), or
    its Vision-RWKV blocks (facerwkv.VRWKVBlock), over the 147 tokens in their order (scale 1, 2,
    3, each in raster order). No cls token and no position embedding: RWKV-4's decay knows the
    order; Vision-RWKV's Q-Shift runs on each scale's own 7x7 grid (never across scales) and its
    Bi-WKV over the whole sequence. ln0 normalises the conv embeddings once before block 0 (the
    reference RWKV-4 LM's ln0, Vision-RWKV's too), ln_out after the last; then the tokens are
    pooled: "mean" (as Vision-RWKV) or "last" (as the FaceRWKV paper)."""

    def __init__(self, config):
        super().__init__()
        # the widths the blocks read from a FaceRWKV config: n_embd, dim_att, dim_ffn, n_layer (for their init)
        rwkv_config = FaceRWKVConfig(n_layer=config.depth, n_embd=config.embed_dim,
                                     dim_ffn=int(config.mlp_ratio * config.embed_dim))
        self.pool = config.pool
        self.ln0 = nn.LayerNorm(config.embed_dim)
        if config.mixer == "rwkv":
            self.blocks = nn.ModuleList([Block(rwkv_config, i) for i in range(config.depth)])
        else:
            grids = [(config.grids[2], config.grids[2])] * 3  # the three scales' token grids, in order
            self.blocks = nn.ModuleList([VRWKVBlock(rwkv_config, i, grids) for i in range(config.depth)])
        self.ln_out = nn.LayerNorm(config.embed_dim)

    def forward(self, x):
        x = self.ln0(x)  # (B, T, E)
        for block in self.blocks:
            x = block(x)
        x = self.ln_out(x)  # (B, T, E)
        return x[:, -1] if self.pool == "last" else x.mean(dim=1)  # (B, E)

    @torch.no_grad()
    def forward_rnn(self, x):
        """Same output as forward, run as an RNN: one token at a time through all blocks, with a
        fixed-size state per block (RWKV-4 blocks only: Vision-RWKV's see the tokens after them)."""
        B, T, _ = x.shape
        states = [block.init_state(B, x.device, x.dtype) for block in self.blocks]
        pooled = 0
        for t in range(T):
            h = self.ln0(x[:, t])  # (B, E)
            for i, block in enumerate(self.blocks):
                h, states[i] = block.step(h, states[i])
            if self.pool == "mean":
                pooled = pooled + self.ln_out(h)
        return self.ln_out(h) if self.pool == "last" else pooled / T  # (B, E)


# -----------------------------------------------------------------------------
# Head (table row "head")

class SEBlock(nn.Module):
    """Squeeze-and-excitation on a vector: x * sigmoid(Linear(ReLU(Linear(x))))."""

    def __init__(self, dim):
        super().__init__()
        self.linear1 = nn.Linear(dim, dim)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(dim, dim)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.linear2(self.relu(self.linear1(x))))  # (B, E)


# -----------------------------------------------------------------------------
# Weight files: the user's, never fetched

def _load_branch(module, sd, path, what, example):
    """Copy the tensors of sd into module. Every tensor of the module must be in sd with its
    shape (num_batches_tracked may be absent: older files lack it, eval never reads it); keys of
    sd that the module lacks are left out. Returns (tensors loaded, keys of sd left out)."""
    own = module.state_dict()
    needed = [k for k in own if not k.endswith("num_batches_tracked")]
    found = [k for k in needed if k in sd]
    if not found:
        raise ValueError(f"{path} has none of the {what} keys: expected keys like {needed[:3]} "
                         f"({example}), found keys like {list(sd)[:5]}")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"{path} fills only {len(found)} of the {len(needed)} {what} tensors; missing "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all); "
                         f"found keys like {list(sd)[:5]}; is it the right file ({example}) for this config?")
    wrong = [f"{k}: {tuple(sd[k].shape) if isinstance(sd[k], torch.Tensor) else type(sd[k]).__name__} "
             f"(need {tuple(v.shape)})" for k, v in own.items()
             if k in sd and not (isinstance(sd[k], torch.Tensor) and sd[k].shape == v.shape)]
    if wrong:
        raise ValueError(f"{path} has {what} tensors of the wrong shape: {wrong[:5]}"
                         f"{' ...' if len(wrong) > 5 else ''}; the config's widths (dims, units) must be "
                         f"POSTER V2's to load {example}")
    loaded = {k: sd[k] for k in own if k in sd}
    module.load_state_dict(loaded, strict=False)
    return len(loaded), [k for k in sd if k not in own]


def _unused(keys):
    return f" ({len(keys)} keys of the file unused, e.g. {keys[:3]})" if keys else ""


def ir50_keys_from_arcface(sd):
    """Rename the keys of a four-stage ArcFace IR file (body.0 ... body.23) to POSTER V2's
    three-stage names (body1.*, body2.*, body3.*), positionally, as the conversion commented out
    in POSTER V2's ir50.py. A unit whose shortcut is a 1x1 conv starts a stage, so the stage
    boundaries are read off the file: for IR-50 units 0-2 -> body1, 3-6 -> body2, 7-20 -> body3
    (21-23, the fourth stage, are dropped). Other keys (input_layer.*, ...) pass unchanged."""
    units = {k: re.fullmatch(r"body\.(\d+)\.(.+)", k) for k in sd}
    units = {k: (int(m[1]), m[2]) for k, m in units.items() if m}                 # key -> (unit, rest of key)
    starts = [0] + sorted({u for u, rest in units.values() if u > 0 and rest == "shortcut_layer.0.weight"})
    out = {k: v for k, v in sd.items() if k not in units}
    for k, (unit, rest) in units.items():
        stage = sum(unit >= s for s in starts)  # 1, 2, 3, ...
        if stage <= 3:
            out[f"body{stage}.{unit - starts[stage - 1]}.{rest}"] = sd[k]
    return out


# -----------------------------------------------------------------------------
# The full model

class PosterRWKV(nn.Module):
    """images (B, 3, H, W) -> resize to 112 -> IR-50 maps and landmark maps at three scales ->
    cross-attention + feedforward per scale -> 147 tokens -> token mixer (RWKV-4 blocks, or
    POSTER V2's ViT) -> (B, embed_dim) -> SE block -> Linear -> logits (B, n_classes)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        E = config.embed_dim
        self.ir_back = IR50(config)
        self.face_landback = MobileFaceNet(config)
        self.last_face_conv = nn.Conv2d(config.landmark_dim, config.dims[2], 3, padding=1)  # row "last_face_conv"
        self.scales = nn.ModuleList([ScaleFusion(config, s) for s in range(3)])
        self.mixer = PosterViT(config) if config.mixer == "transformer" else RWKVMixer(config)  # (B, 147, E) -> (B, E)
        self.se_block = SEBlock(E)
        self.head = nn.Linear(E, config.n_classes)
        init_vit_(self.se_block)  # POSTER V2 inits its SE block and head as its ViT
        init_vit_(self.head)
        self.landmark_tensors_loaded = 0
        if config.freeze_landmarks:
            self.freeze_landmarks()

    # --- the landmark branch: frozen with its weights, trained without

    def freeze_landmarks(self):
        """No gradients for MobileFaceNet, and its BatchNorm kept in eval mode (running statistics
        used and never updated; POSTER V2 froze the weights but let BatchNorm drift in train mode)."""
        self.config.freeze_landmarks = True  # so a saved config rebuilds a frozen model
        self.face_landback.requires_grad_(False)
        self.face_landback.eval()

    def train(self, mode=True):
        super().train(mode)
        if self.config.freeze_landmarks:
            self.face_landback.eval()
        return self

    @property
    def landmark_status(self):
        """One line for the run's log."""
        if not self.config.freeze_landmarks:
            return "landmark branch: random init, trained"
        if self.landmark_tensors_loaded:
            return f"landmark branch: loaded {self.landmark_tensors_loaded} tensors, frozen"
        return "landmark branch: frozen (weights from a checkpoint)"

    def load_landmark_weights(self, path):
        """Fill MobileFaceNet from POSTER V2's mobilefacenet_model_best.pth.tar (its ['state_dict']),
        skipping the GDC head's output_layer.* keys, then freeze the branch. Returns the count."""
        sd = read_state_dict(path)
        gdc = [k for k in sd if k.startswith("output_layer.")]  # the GDC head, not built
        n, unused = _load_branch(self.face_landback, {k: v for k, v in sd.items() if k not in gdc}, path,
                                 "MobileFaceNet", "mobilefacenet_model_best.pth.tar, a dict whose ['state_dict'] "
                                 "has conv1.conv.weight, ...")
        self.landmark_tensors_loaded = n
        self.freeze_landmarks()
        print(f"landmark weights: loaded {n} tensors from {path}, skipped the GDC head's {len(gdc)}"
              f"{_unused(unused)}; the landmark branch is frozen")
        return n

    def load_ir50_weights(self, path):
        """Fill the IR-50 stages from an ArcFace IR-50 file: POSTER V2's three-stage names
        (body1.*, body2.*, body3.*) or the usual four-stage ones (body.0 ... body.23). The IR
        branch keeps training (POSTER V2 fine-tunes it). Returns the count."""
        sd = read_state_dict(path)
        if any(k.startswith("body.") for k in sd):
            sd = ir50_keys_from_arcface(sd)
        n, unused = _load_branch(self.ir_back, sd, path, "IR-50",
                                 "ir50.pth, ArcFace IR-50 with input_layer.*, body1.* or body.0.* keys")
        print(f"IR-50 weights: loaded {n} tensors from {path}{_unused(unused)}")
        return n

    # --- forward

    def _check_images(self, images):
        S = self.config.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, S, S):
            raise ValueError(f"expected images of shape (B, 3, {S}, {S}) (config.img_size), got "
                             f"{tuple(images.shape)}; resize the images to {S}x{S} or build the model with "
                             f"img_size={images.shape[-1]}")

    def tokens(self, images):
        """(B, 3, H, W) -> the (B, 147, E) tokens the mixer sees."""
        self._check_images(images)
        x = images
        if x.shape[-1] != self.config.backbone_size:  # both backbones run at 112, as F.interpolate in POSTER V2
            x = F.interpolate(x, size=self.config.backbone_size)  # nearest, POSTER V2's default
        if self.config.freeze_landmarks:
            with torch.no_grad():  # nothing to learn there: skip its graph
                out3, out4, conv_features = self.face_landback(x)
        else:
            out3, out4, conv_features = self.face_landback(x)  # (B, 64, 28, 28), (B, 128, 14, 14), (B, 512, 7, 7)
        landmarks = (out3, out4, self.last_face_conv(conv_features))  # third: (B, 256, 7, 7)
        maps = self.ir_back(x)  # (B, 64, 56, 56), (B, 128, 28, 28), (B, 256, 14, 14)
        return torch.cat([fuse(x_ir, q) for fuse, x_ir, q in zip(self.scales, maps, landmarks)], dim=1)  # (B, 147, E)

    def forward(self, images):
        """(B, 3, H, W) -> logits (B, n_classes)."""
        x = self.mixer(self.tokens(images))  # (B, E)
        return self.head(self.se_block(x))   # (B, n_classes)

    @torch.no_grad()
    def forward_rnn(self, images):
        """Same logits as forward with the RWKV mixer run as an RNN over the 147 tokens (the
        convolutional front end runs as in forward). Inference only."""
        if self.config.mixer != "rwkv":
            raise ValueError(f"the {self.config.mixer} mixer has no RNN mode (it sees the tokens after each token); "
                             f"use model(images), or mixer='rwkv' for forward_rnn")
        return self.head(self.se_block(self.mixer.forward_rnn(self.tokens(images))))

    def num_params(self, trainable_only=False):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def print_param_summary(self):
        """Print (and return) trainable / total parameters per part, and POSTER V2's count."""
        c = self.config
        return param_table(self, f"POSTER {c.mixer} depth={c.depth} embed_dim={c.embed_dim} dims={c.dims} "
                                 f"ir_units={c.ir_units} tokens={c.n_tokens} pool={c.pool} img_size={c.img_size} "
                                 f"({self.landmark_status})",
                           extra=[f"  counted as POSTER V2 counts (thop: leaf modules that run, + its GDC head): "
                                  f"{poster_param_count(self):,}"])


def gdc_head_params(config):
    """Parameters of MobileFaceNet's GDC head, which POSTER V2 runs on conv_features and then
    discards: depthwise 7x7 conv + BN (landmark_dim channels), Linear landmark_dim -> 136 (no
    bias), BatchNorm1d(136). 96,016 at POSTER V2's widths. Not built here; see poster_param_count."""
    c, g = config.landmark_dim, config.grids[2]
    return c * g * g + 2 * c + c * 136 + 2 * 136


def poster_param_count(model, images=None, gdc_head=True):
    """Parameters counted as POSTER V2 counts them (thop.profile): the parameters of the leaf
    modules that run in one forward pass. Raw nn.Parameters held by composite modules (cls token,
    position embedding, relative-position tables, layer-scale gammas, RWKV's time_* vectors) are
    not counted, nor are modules that never run. The frozen landmark branch is counted.
    POSTER V2 also runs MobileFaceNet's GDC head (and throws its output away), so thop counts it;
    with gdc_head=True its gdc_head_params are added, which makes poster-v2 count exactly what
    thop counts on the original code: 43,724,311, the published 43.7 M. gdc_head=False counts
    this implementation alone (43,628,295). One forward in eval mode on `images` (default: zeros
    at config.img_size); the model's train/eval mode is restored."""
    ran = set()
    hooks = [m.register_forward_hook(lambda m, args, out: ran.add(m))
             for m in model.modules() if next(m.children(), None) is None]
    was_training = model.training
    try:
        model.eval()
        if images is None:
            S = model.config.img_size
            images = torch.zeros(1, 3, S, S, device=next(model.parameters()).device)
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    n = sum(p.numel() for m in ran for p in m.parameters())
    return n + (gdc_head_params(model.config) if gdc_head else 0)
