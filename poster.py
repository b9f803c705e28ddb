"""
POSTER V2, and POSTER-RWKV: POSTER V2 with RWKV-4 in place of its transformer.

POSTER V2 (Mao et al. 2023, "POSTER V2: A simpler and stronger facial expression recognition
network", arXiv 2301.12149; public code github.com/Talented-Q/POSTER_V2, models/PosterV2_7cls.py)
fuses two streams at three scales:

 image ─ resize 112 ─┬─ IR-50, stages 1-3 ──── x1, x2, x3 ── 3x3/2 conv each ── k, v ─┐
                     └─ MobileFaceNet (landmarks) ─ out3, out4, conv_features ── q ───┤
                                                   (last_face_conv on the third)      ▼
                       landmark -> image cross-attention per scale (global, rel.-pos. bias)
                       + feedforward (layer scale, drop path)                         ▼
                       multi-scale embed: each scale to a 7x7 grid of 768-d tokens -> 147 tokens
                                                                                      ▼
                       THE TOKEN MIXER:  "transformer": POSTER V2's 2-block ViT (cls token)
                                         "rwkv":        2 RWKV-4 blocks (facerwkv.Block)
                                         "vrwkv":       2 Vision-RWKV blocks (Q-Shift per scale)
                                                                                      ▼
                       SE block -> Linear -> logits

"transformer" is POSTER V2 itself (its logits, its 43.7 M parameters, its checkpoints through a
fixed renaming); "rwkv" puts RWKV-4 in its place. Each piece names the part of POSTER V2's code it
implements. Read top to bottom: config, the two backbones, cross-attention, multi-scale embed,
mixers, head, model; then weight files (paths the user gives) and POSTER V2's parameter count.
"""

import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from facerwkv import (Block, FaceRWKVConfig, TransformerBlock, VRWKVBlock, check, divisors, load_weights, mlp,
                      param_table, read_state_dict, run_rnn)

# -----------------------------------------------------------------------------
# Configuration

POSTER_OPTIONS = {
    "mixer": ("transformer", "rwkv", "vrwkv"),
    "pool": ("cls", "last", "mean"),
}

POSTER_PRESETS = {
    # POSTER V2 itself: 2 ViT blocks, 8 heads, cls token; 43.7 M parameters counted as POSTER V2 counts.
    "poster-v2": dict(mixer="transformer"),
    # the same network with 2 RWKV-4 blocks over the 147 tokens, pooling the last token (as the
    # FaceRWKV paper; the README's POSTER comparison gives the measurement behind this default)
    "poster-rwkv": dict(mixer="rwkv"),
    # the same with Vision-RWKV's blocks: Q-Shift on each scale's 7x7 grid on its own, never across
    # scales; Bi-WKV over all 147 tokens
    "poster-vrwkv": dict(mixer="vrwkv"),
    # small enough to train on a CPU at 112 x 112: the same structure and 147 tokens, narrower
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
            check(isinstance(value, (tuple, list)) and len(value) == 3,
                  f"{name} needs one value per scale, 3 in all, e.g. {getattr(PosterConfig, name)}; got {value!r}")
            setattr(self, name, tuple(value))  # a list after a JSON round trip
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        ints = [(n, getattr(self, n)) for n in ("n_classes", "img_size", "backbone_size", "landmark_dim", "embed_dim",
                                                 "depth", "n_head")]
        for name, value in ints + [(f"{n}[{i}]", v) for n in ("ir_units", "dims", "cross_heads", "landmark_units")
                                   for i, v in enumerate(getattr(self, n))]:
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  f"{name} must be a positive integer; got {value!r}")
        check(self.n_classes >= 2, f"n_classes must be an integer >= 2; got {self.n_classes!r}")
        for name, allowed in POSTER_OPTIONS.items():
            check(getattr(self, name) in allowed, f"{name}={getattr(self, name)!r} is not an option; use one of {allowed}")
        check(self.mixer != "transformer" or self.pool == "cls", "the transformer mixer pools its cls token, as "
              f"POSTER V2; set pool='cls' (or None), not {self.pool!r}")
        check(self.mixer == "transformer" or self.pool != "cls", f"pool='cls' needs the transformer mixer (the "
              f"{self.mixer} mixer has no cls token); use pool='last' or 'mean'")
        check(self.backbone_size % 16 == 0, "backbone_size must be a multiple of 16 (the third scale is backbone_size"
              f"/16 wide); got {self.backbone_size}, use e.g. {max(16, round(self.backbone_size / 16) * 16)}")
        for s, (dim, heads) in enumerate(zip(self.dims, self.cross_heads)):
            check(dim % heads == 0, f"dims[{s}]={dim} is not divisible by cross_heads[{s}]={heads}; "
                  f"use cross_heads[{s}] in {divisors(dim)}")
        check(self.mixer != "transformer" or self.embed_dim % self.n_head == 0, "the transformer mixer needs embed_dim "
              f"({self.embed_dim}) divisible by n_head ({self.n_head}); use n_head in {divisors(self.embed_dim)}")
        check(number(self.mlp_ratio) and self.mlp_ratio > 0 and int(self.mlp_ratio * min(*self.dims, self.embed_dim)),
              f"mlp_ratio must be a positive number (POSTER V2: 4.0); got {self.mlp_ratio!r}")
        check(self.layer_scale is None or (number(self.layer_scale) and self.layer_scale > 0), "layer_scale must be a "
              f"positive number (POSTER V2: 1e-5) or None for no layer scale; got {self.layer_scale!r}")
        check(all(number(p) and 0 <= p < 1 for p in self.drop_path), "drop_path values must be probabilities in "
              f"[0, 1) (POSTER V2: (0.0, 0.125, 0.25)); got {self.drop_path!r}")

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
        check(name in POSTER_PRESETS, f"unknown preset {name!r}; use one of {tuple(POSTER_PRESETS)}")
        return cls(**{**POSTER_PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# Image backbone (POSTER V2's models/ir50.py, Backbone(50, 0.0, 'ir')): ArcFace IR-50, its first
# three stages. Attribute names are ir50.py's, so its keys load unchanged:
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
        self.res_layer = nn.Sequential(nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
                                       nn.PReLU(out_channels), nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
                                       nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)  # (B, out, H/stride, W/stride)


class IR50(nn.Module):
    """Input layer (3x3 conv 3->64, BN, PReLU) and three stages of bottleneck_IR units, the first
    unit of each stage striding 2: (3, 4, 14) units of 64, 128, 256 channels in IR-50. Its output
    layer (BN, Linear 25088->512, BN1d), which POSTER V2 builds but never runs, is not built."""

    def __init__(self, config):
        super().__init__()
        d1, d2, d3 = config.dims
        self.input_layer = nn.Sequential(nn.Conv2d(3, d1, 3, 1, 1, bias=False), nn.BatchNorm2d(d1), nn.PReLU(d1))
        stage = lambda c_in, c_out, units: nn.Sequential(BottleneckIR(c_in, c_out, 2),  # noqa: E731
                                                         *[BottleneckIR(c_out, c_out, 1) for _ in range(units - 1)])
        n1, n2, n3 = config.ir_units
        self.body1, self.body2, self.body3 = stage(d1, d1, n1), stage(d1, d2, n2), stage(d2, d3, n3)

    def forward(self, x):
        x1 = self.body1(self.input_layer(x))  # (B, 64, 56, 56), from (B, 64, 112, 112)
        x2 = self.body2(x1)                   # (B, 128, 28, 28)
        x3 = self.body3(x2)                   # (B, 256, 14, 14)
        return x1, x2, x3


# -----------------------------------------------------------------------------
# Landmark backbone (POSTER V2's models/mobilefacenet.py): MobileFaceNet, a 68-landmark regressor,
# with mobilefacenet.py's names, so mobilefacenet_model_best.pth.tar loads unchanged. Its GDC head
# (output_layer) computes the landmarks, which POSTER V2 discards: not built, its keys skipped.

def conv_block(in_channels, out_channels, kernel=1, stride=1, padding=0, groups=1, prelu=True):
    """Conv_block: conv (no bias), BN, PReLU; Linear_block (prelu=False): no activation."""
    layers = OrderedDict(conv=nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False),
                         bn=nn.BatchNorm2d(out_channels))
    return nn.Sequential(OrderedDict(layers, **({"prelu": nn.PReLU(out_channels)} if prelu else {})))


class DepthWise(nn.Module):
    """Depth_Wise(in, out, groups g, stride s): an inverted residual. 1x1 expand to g channels,
    depthwise 3x3 (stride s), 1x1 linear projection to out; + the input when residual."""

    def __init__(self, in_channels, out_channels, groups, stride, residual=False):
        super().__init__()
        self.conv = conv_block(in_channels, groups)
        self.conv_dw = conv_block(groups, groups, kernel=3, stride=stride, padding=1, groups=groups)
        self.project = conv_block(groups, out_channels, prelu=False)
        self.residual = residual

    def forward(self, x):
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


def residual(channels, units, groups):
    """Residual: `units` residual Depth_Wise units at constant width, expanding to `groups` inside."""
    return nn.Sequential(OrderedDict(model=nn.Sequential(
        *[DepthWise(channels, channels, groups, 1, residual=True) for _ in range(units)])))


class MobileFaceNet(nn.Module):
    """MobileFaceNet up to conv_features, returning the three maps POSTER V2 uses. Widths follow
    the scales: c1 = dims[0] (64), c2 = dims[1] (128), expanding 2x (4x in conv_45) inside the
    Depth_Wise units; conv_6_sep widens to landmark_dim (512)."""

    def __init__(self, config):
        super().__init__()
        c1, c2 = config.dims[:2]
        n3, n4, n5 = config.landmark_units
        self.conv1 = conv_block(3, c1, kernel=3, stride=2, padding=1)
        self.conv2_dw = conv_block(c1, c1, kernel=3, stride=1, padding=1, groups=c1)
        self.conv_23 = DepthWise(c1, c1, groups=2 * c1, stride=2)
        self.conv_3 = residual(c1, n3, groups=2 * c1)
        self.conv_34 = DepthWise(c1, c2, groups=2 * c2, stride=2)
        self.conv_4 = residual(c2, n4, groups=2 * c2)
        self.conv_45 = DepthWise(c2, c2, groups=4 * c2, stride=2)
        self.conv_5 = residual(c2, n5, groups=2 * c2)
        self.conv_6_sep = conv_block(c2, config.landmark_dim)
        for m in self.modules():  # MobileFaceNet's own init (BatchNorm keeps PyTorch's 1, 0)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.conv2_dw(self.conv1(x))        # (B, 64, 56, 56)
        out3 = self.conv_3(self.conv_23(x))     # (B, 64, 28, 28)
        out4 = self.conv_4(self.conv_34(out3))  # (B, 128, 14, 14)
        x = self.conv_5(self.conv_45(out4))     # (B, 128, 7, 7)
        conv_features = self.conv_6_sep(x)      # (B, 512, 7, 7)
        return out3, out4, conv_features


# -----------------------------------------------------------------------------
# Landmark -> image cross-attention (POSTER V2's `window` + `WindowAttentionGlobal`) and the
# feedforward after it (POSTER V2's `feedforward`)

def relative_position_index(w):
    """Swin's index into a (2w-1)^2 table of biases, for every pair of cells of a w x w window:
    (w*w, w*w), entry [i, j] = which relative offset (dy, dx) leads from cell j to cell i."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)  # (N, N, 2), each in [0, 2w-2]
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]                              # (N, N)


class LandmarkCrossAttention(nn.Module):
    """window + WindowAttentionGlobal at one scale, with the window as large as the map, so every
    landmark cell attends to every image cell. The image map is LayerNorm-ed into tokens, k and v
    come from one Linear(C, 2C) (POSTER V2's `qkv`); the query is the landmark map itself,
    unprojected. A learned bias per relative offset and head is added to the scores. Returns the
    attention output and the normalised image tokens (the feedforward's shortcut)."""

    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.norm = nn.LayerNorm(dim)         # POSTER V2's window{i}.norm
        self.kv = nn.Linear(dim, 2 * dim)     # POSTER V2's attn{i}.qkv (it makes only k and v)
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
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # (B, h, N, C/h)
        return self.proj(y.transpose(1, 2).reshape(B, N, C)), x               # (B, N, C), (B, N, C)


class CrossFeedForward(nn.Module):
    """feedforward: x = shortcut + gamma1 * attn (the shortcut is the LayerNorm-ed image tokens,
    as in POSTER V2, not the raw ones), then x = x + gamma2 * MLP(LN(x)); the layer-scale gammas
    start at 1e-5, so both branches start nearly off. Both branches pass through drop path."""

    def __init__(self, dim, mlp_ratio, layer_scale, drop_path):
        super().__init__()
        self.gamma1, self.gamma2 = [None if layer_scale is None else nn.Parameter(layer_scale * torch.ones(dim))
                                    for _ in range(2)]
        self.mlp = mlp(dim, int(dim * mlp_ratio))
        self.norm = nn.LayerNorm(dim)
        self.p = drop_path

    def branch(self, gamma, x):
        """Layer scale, then stochastic depth: in training, drop a sample's branch with probability
        p and scale the rest by 1/(1-p)."""
        x = x if gamma is None else gamma * x
        if self.p == 0 or not self.training:
            return x
        return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p) / (1 - self.p)

    def forward(self, attn, shortcut):
        x = shortcut + self.branch(self.gamma1, attn)                # (B, N, C)
        return x + self.branch(self.gamma2, self.mlp(self.norm(x)))  # (B, N, C)


# -----------------------------------------------------------------------------
# One scale of the pyramid: POSTER V2's conv{i}, window{i} + attn{i}, ffn{i}, and the multi-scale
# embed (embed_q, embed_k, embed_v)

class ScaleFusion(nn.Module):
    """Scale s (0, 1, 2): downsample the IR map (3x3/2 conv), let the landmark map attend to it,
    feedforward, then embed onto the third scale's grid as embed_dim tokens: 2 - s strided 3x3
    convs (embed_q: two, embed_k: one), or a 1x1 conv for the third scale (embed_v). No
    activation between the embedding convs, as POSTER V2."""

    def __init__(self, config, s):
        super().__init__()
        dim, E = config.dims[s], config.embed_dim
        self.downsample = nn.Conv2d(dim, dim, 3, stride=2, padding=1)
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
# The token mixers over the 147 tokens: POSTER V2's VisionTransformer (models/vit_model.py), and
# its RWKV replacement

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


class PosterViT(nn.Module):
    """VisionTransformer.forward_features: prepend a cls token, add a learned position embedding
    over the 148 tokens, pre-LN blocks (LayerNorm eps 1e-6, qkv with bias, GELU MLP; no dropout),
    a final LayerNorm; the cls token is the output."""

    def __init__(self, config):
        super().__init__()
        E = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.n_tokens + 1, E))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList([TransformerBlock(E, config.n_head, int(E * config.mlp_ratio), ln_eps=1e-6)
                                     for _ in range(config.depth)])
        self.norm = nn.LayerNorm(E, eps=1e-6)
        init_vit_(self)

    def forward(self, x):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 148, E)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]  # (B, E)


class RWKVMixer(nn.Module):
    """The replacement: RWKV-4 blocks (facerwkv.Block) or Vision-RWKV blocks (facerwkv.VRWKVBlock,
    Q-Shift on each scale's own grid) over the 147 tokens (scale 1, 2, 3, each in raster order), no
    cls token, no position embedding; ln0 before block 0 and ln_out after the last (as RWKV-LM),
    then pooled: "mean" (as Vision-RWKV) or "last" (as the FaceRWKV paper)."""

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

    def forward(self, x, rnn=False):
        """(B, T, E) -> (B, E); rnn=True: the same, run as an RNN (facerwkv.run_rnn: one token at a
        time through all blocks, a fixed-size state per block; RWKV-4 blocks only)."""
        x = self.ln0(x)  # (B, T, E)
        if rnn:
            x = run_rnn(self.blocks, x)
        else:
            for block in self.blocks:
                x = block(x)
        x = self.ln_out(x)
        return x[:, -1] if self.pool == "last" else x.mean(dim=1)  # (B, E)


# -----------------------------------------------------------------------------
# Head: POSTER V2's SE_block and ClassificationHead (in its VisionTransformer)

class SEBlock(nn.Module):
    """Squeeze-and-excitation on a vector: x * sigmoid(Linear(ReLU(Linear(x))))."""

    def __init__(self, dim):
        super().__init__()
        self.linear1, self.relu = nn.Linear(dim, dim), nn.ReLU()
        self.linear2, self.sigmoid = nn.Linear(dim, dim), nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.linear2(self.relu(self.linear1(x))))  # (B, E)


# -----------------------------------------------------------------------------
# The full model: POSTER V2's pyramid_trans_expr2

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
        self.last_face_conv = nn.Conv2d(config.landmark_dim, config.dims[2], 3, padding=1)
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
        n, skipped = load_branch(self.face_landback, path, "MobileFaceNet", ignore=("output_layer.",))
        self.landmark_tensors_loaded = n
        self.freeze_landmarks()
        print(f"landmark weights: loaded {n} tensors from {path}, skipped the GDC head's {skipped}; "
              f"the landmark branch is frozen")
        return n

    def load_ir50_weights(self, path):
        """Fill the IR-50 stages from an ArcFace IR-50 file: POSTER V2's three-stage names
        (body1.*, body2.*, body3.*) or the usual four-stage ones (body.0 ... body.23); units of a
        stage beyond config.ir_units, and the output layer, are skipped. The IR branch keeps
        training (POSTER V2 fine-tunes it). Returns the count."""
        built = {".".join(k.split(".")[:2]) + "." for k in self.ir_back.state_dict()}  # "body2.3.", ...

        def unused(sd):  # the output layer, and units of a stage beyond config.ir_units
            units = {".".join(k.split(".")[:2]) + "." for k in sd}
            return ("output_layer.",) + tuple(u for u in units if re.fullmatch(r"body[123]\.\d+\.", u) and u not in built)
        n, skipped = load_branch(self.ir_back, path, "IR-50", ignore=unused, rename=ir50_keys_from_arcface)
        print(f"IR-50 weights: loaded {n} tensors from {path}"
              + (f" ({skipped} keys of the file unused: the output layer, deeper units)" if skipped else ""))
        return n

    # --- forward

    def tokens(self, images):
        """(B, 3, H, W) -> the (B, 147, E) tokens the mixer sees."""
        x, S = images, self.config.img_size
        check(x.ndim == 4 and tuple(x.shape[1:]) == (3, S, S), f"expected images of shape (B, 3, {S}, {S}) "
              f"(config.img_size), got {tuple(x.shape)}; resize the images to {S}x{S} or build the model with "
              f"img_size={x.shape[-1]}")
        if x.shape[-1] != self.config.backbone_size:  # both backbones run at 112, as F.interpolate in POSTER V2
            x = F.interpolate(x, size=self.config.backbone_size)  # nearest, POSTER V2's default
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_landmarks):
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
        check(self.config.mixer == "rwkv", f"the {self.config.mixer} mixer has no RNN mode (it sees the tokens "
              f"after each token); use model(images), or mixer='rwkv' for forward_rnn")
        return self.head(self.se_block(self.mixer(self.tokens(images), rnn=True)))

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


# -----------------------------------------------------------------------------
# Weight files: IR-50 and MobileFaceNet for a new run, and POSTER V2's released checkpoints

def load_branch(module, path, what, ignore=(), rename=None):
    """THE loader of a pretrained branch: read `path` (facerwkv.read_state_dict: no code runs),
    optionally rename its keys, and copy it strictly into `module` (facerwkv.load_weights), the
    key prefixes in `ignore` (a tuple, or a function of the state dict giving one) recognised and
    skipped. Returns (tensors loaded, keys skipped)."""
    sd = read_state_dict(path)
    sd = rename(sd) if rename else sd
    skipped = load_weights(module, sd, f"{path} ({what})", ignore=ignore(sd) if callable(ignore) else tuple(ignore))
    return len(sd) - skipped, skipped


def ir50_keys_from_arcface(sd):
    """Rename the keys of a four-stage ArcFace IR file (body.0 ... body.23) to POSTER V2's
    three-stage names (body1.*, body2.*, body3.*), positionally, as the conversion commented out
    in POSTER V2's ir50.py. A unit whose shortcut is a 1x1 conv starts a stage, so the stage
    boundaries are read off the file: for IR-50 units 0-2 -> body1, 3-6 -> body2, 7-20 -> body3
    (21-23, the fourth stage, are dropped). Other keys (input_layer.*, ...) pass unchanged; a file
    already in three-stage names passes unchanged."""
    units = {k: re.fullmatch(r"body\.(\d+)\.(.+)", k) for k in sd}
    units = {k: (int(m[1]), m[2]) for k, m in units.items() if m}                 # key -> (unit, rest of key)
    starts = [0] + sorted({u for u, rest in units.values() if u > 0 and rest == "shortcut_layer.0.weight"})
    out = {k: v for k, v in sd.items() if k not in units}
    for k, (unit, rest) in units.items():
        stage = sum(unit >= s for s in starts)  # 1, 2, 3, ...
        if stage <= 3:
            out[f"body{stage}.{unit - starts[stage - 1]}.{rest}"] = sd[k]
    return out


# POSTER V2's state-dict names (pyramid_trans_expr2, models/PosterV2_7cls.py and _8cls.py) -> this
# model's. Longest prefix first; the key's rest is kept.
POSTERV2_NAMES = {"VIT.cls_token": "mixer.cls_token", "VIT.pos_embed": "mixer.pos_embed",
                  "VIT.blocks.": "mixer.blocks.", "VIT.norm.": "mixer.norm.", "VIT.se_block.": "se_block.",
                  "VIT.head.linear.": "head.", "ir_back.": "ir_back.", "face_landback.": "face_landback.",
                  "last_face_conv.": "last_face_conv.", "embed_q.": "scales.0.embed.", "embed_k.": "scales.1.embed.",
                  "embed_v.proj.": "scales.2.embed.0.",
                  **{k: v for s in range(3) for k, v in {
                      f"conv{s + 1}.": f"scales.{s}.downsample.", f"window{s + 1}.norm.": f"scales.{s}.attn.norm.",
                      f"attn{s + 1}.qkv.": f"scales.{s}.attn.kv.", f"attn{s + 1}.proj.": f"scales.{s}.attn.proj.",
                      f"attn{s + 1}.relative_position_bias_table": f"scales.{s}.attn.relative_position_bias_table",
                      f"ffn{s + 1}.": f"scales.{s}.ffn."}.items()}}
# what POSTER V2 saves but never runs: IR-50's and MobileFaceNet's output layers (MobileFaceNet's
# GDC head runs, its landmarks are discarded), the VisionTransformer's unused patch_embed, eca_block,
# CON1, IRLinear1/2 and the Conv1d in each block, and the relative-position index (rebuilt here)
POSTERV2_UNUSED = re.compile(r"(ir_back|face_landback)\.output_layer\.|VIT\.(patch_embed|eca_block|CON1|IRLinear[12])\."
                             r"|VIT\.blocks\.\d+\.conv\.|attn[123]\.relative_position_index$")


def posterv2_state_dict(path):
    """A checkpoint released by POSTER V2 (its DataParallel 'state_dict', with 'epoch', 'best_acc',
    'optimizer', 'recorder', ...) read without running any of it -> (n_classes, state dict in the
    names of the poster-v2 preset, number of saved tensors skipped as unused). A key neither mapped
    nor known-unused, a missing key or a shape that does not fit is a ValueError naming the keys."""
    sd = read_state_dict(path)
    unknown, out, skipped = [], {}, 0
    for k, v in sd.items():
        prefix = max((p for p in POSTERV2_NAMES if k.startswith(p)), key=len, default=None)
        if POSTERV2_UNUSED.match(k):
            skipped += 1
        elif prefix is None:
            unknown.append(k)
        else:
            out[POSTERV2_NAMES[prefix] + k[len(prefix):]] = v
    check(not unknown, f"{path}: keys that are not POSTER V2's: {unknown[:5]} ({len(unknown)} in all); is it a POSTER V2 checkpoint "
          "(models/PosterV2_7cls.py or _8cls.py)?")
    check("head.weight" in out, f"{path}: no classifier (VIT.head.linear.weight); is it a POSTER V2 checkpoint?")
    n_classes = out["head.weight"].shape[0]
    with torch.device("meta"):  # poster-v2's keys and shapes, without allocating its 43 M parameters
        need = PosterRWKV(PosterConfig.preset("poster-v2", n_classes=n_classes))
    with warnings.catch_warnings():  # copying into meta tensors does nothing: only load_weights' checks run
        warnings.simplefilter("ignore")
        load_weights(need, out, f"{path} (POSTER V2 checkpoint, renamed)")
    out.update({k: torch.zeros((), dtype=torch.long) for k in need.state_dict()  # absent from older files
                if k.endswith("num_batches_tracked") and k not in out})
    return n_classes, out, skipped


# The class of each output of POSTER V2's classifier, per dataset: main.py and main_8.py read every
# dataset with torchvision's ImageFolder, which numbers the class folders in sorted order.
POSTERV2_CLASS_ORDER = {
    # the RAF-DB copy POSTER V2 trained on has folders 1..7: RAF-DB's own labels 1..7
    "rafdb": ("Surprise", "Fear", "Disgust", "Happy", "Sad", "Anger", "Neutral"),
    # AffectNet's ImageFolder copies have folders 0..6 (0..7 with Contempt): AffectNet's expression numbers
    "affectnet": ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt"),
    # CAER-S's folders are named by emotion; sorted, they are alphabetical
    "caer": ("Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"),
}


def posterv2_class_map(dataset, classes, n_classes=7):
    """For a POSTER V2 checkpoint trained on `dataset` ("rafdb", "affectnet", "caer"), the list
    whose entry i is the index in `classes` (the caller's class names, in its order; "Contempt"
    appended when it lacks one) of the checkpoint's output i."""
    check(dataset in POSTERV2_CLASS_ORDER, f"POSTER V2 released checkpoints for {tuple(POSTERV2_CLASS_ORDER)}; "
          f"got {dataset!r}")
    check(n_classes == 7 or (n_classes == 8 and dataset == "affectnet"), f"a POSTER V2 {dataset} checkpoint has 7 "
          f"classes (8 only for AffectNet-8); got {n_classes}")
    names = POSTERV2_CLASS_ORDER[dataset][:n_classes]
    classes = tuple(classes) + (() if "Contempt" in classes else ("Contempt",))
    check(set(names) <= set(classes), f"the classes {tuple(classes)} lack POSTER V2's "
          f"{sorted(set(names) - set(classes))}; name the classes as {names}")
    return [classes.index(name) for name in names]


# -----------------------------------------------------------------------------
# POSTER V2's way of counting parameters (thop.profile, its compute_param_flop)

def gdc_head_params(config):
    """Parameters of MobileFaceNet's GDC head, which POSTER V2 runs on conv_features and then
    discards: depthwise 7x7 conv + BN (landmark_dim channels), Linear landmark_dim -> 136 (no
    bias), BatchNorm1d(136). 96,016 at POSTER V2's widths. Not built here; see poster_param_count."""
    c, g = config.landmark_dim, config.grids[2]
    return c * g * g + 2 * c + c * 136 + 2 * 136


def poster_param_count(model, images=None, gdc_head=True):
    """Parameters counted as POSTER V2 counts them (thop.profile): those of the leaf modules that run
    in one forward pass (eval mode, restored after), so not the raw nn.Parameters of composite
    modules (cls token, position embedding, rel.-pos. tables, gammas, RWKV's time_* vectors).
    gdc_head=True adds the GDC head POSTER V2 runs and discards: poster-v2 then counts 43,724,311,
    thop's count on the original code, the published 43.7 M (43,628,295 without)."""
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
