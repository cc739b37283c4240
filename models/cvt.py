"""CvT: Introducing Convolutions to Vision Transformers (Wu et al. 2021).

Three stages at strides 4, 8, 16 (default). Each stage is
  a convolutional token embedding: an overlapping strided conv (k=7 s=4 p=2 for the stem, k=3 s=2 p=1 after)
      whose tokens are LayerNormed; there is no position embedding anywhere (the convolutions place the tokens);
  blocks of pre-norm attention with a convolutional projection: the tokens as a map go through a depthwise
      k x k conv + BatchNorm per q / k / v (stride `stride_q` = 1 for queries, `stride_kv` = 2 for keys and
      values, which shrinks the keys 4x), then a linear layer each; the attention logits are scaled by
      dim^-0.5 (the whole width, not the head width: the paper's release and transformers do so); then an MLP;
  the last stage only prepends a learned CLS token, which skips the convolutions (it joins q, k and v after
      them) and is what the classifier reads.

The backbone contract is in models/__init__.py. Here:
  forward_features(images, mask=None) -> (B, P + h_3 * w_3, C_3) tokens of the last stage, un-normed: the CLS
      token first (P = `num_prefix_tokens` = 1; 0 with cls_token=False), then the map row-major.
      transformers' CvtModel returns the same two pieces apart: cls_token_value (B, 1, C_3) and last_hidden_state,
      the map (B, C_3, h_3, w_3). The token layout keeps both, so forward(x) = forward_head(forward_features(x))
      (the classifier reads the CLS token, which a map alone would lose).
  forward_head(x, pre_logits=True) -> (B, C_3): LayerNorm(CLS token) (without a CLS token: the mean of the
      LayerNormed tokens), what CvtForImageClassification feeds its classifier.
  forward_intermediates(images) -> stage i's map (B, C_i, h_i, w_i) = CvtModel hidden_states[i] (no CLS token;
      the last stage's grid is kept from `run_stage` for `stage_map`, as tokens alone do not say it).
  mask: (B, h_1, w_1) bool at the stem grid (stem_stride = 4): True replaces the stem's normed tokens.
Every LayerNorm and BatchNorm uses PyTorch's eps (1e-5), as the paper's code and transformers (which ignores
config.layer_norm_eps). Stochastic depth: drop_path_rate is the last stage's rate, linear over its blocks from
0 (the earlier stages have none), as the released CvT configs (DROP_PATH_RATE [0.0, 0.0, 0.1]).
Activation checkpointing recomputes each block but its BatchNormed projections, so training-mode BatchNorm
statistics update once per step either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hierarchical import HierarchicalBackbone, replace_masked, run_block
from models.layers import drop_path, drop_path_rates
from models.registry import register_sizes
from ops.attention import attention


def _tokens_to_map(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)  # (B, N, C) -> (B, C, H, W)


class ConvEmbed(nn.Module):
    """Convolutional token embedding: overlapping strided conv, then LayerNorm over each token's channels."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride, padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, D, h, w)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw  # (B, h * w, D)


class ConvProjection(nn.Module):
    """Depthwise k x k conv (no bias) + BatchNorm on the token map, flattened back to tokens."""

    def __init__(self, dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride, kernel_size // 2, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, h * w, C)
        return self.bn(self.conv(x)).flatten(2).transpose(1, 2)


class ConvAttention(nn.Module):
    """Multi-head attention whose q / k / v come from convolutional projections of the token map; a CLS token
    (`cls` prefix tokens) bypasses the convolutions and joins each of q / k / v before the linear layers."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        stride_q: int,
        stride_kv: int,
        qkv_bias: bool,
        backend,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.backend, self.scale = (
            num_heads,
            backend,
            dim**-0.5,
        )  # dim, not head dim (see top)
        self.conv_q = ConvProjection(dim, kernel_size, stride_q)
        self.conv_k = ConvProjection(dim, kernel_size, stride_kv)
        self.conv_v = ConvProjection(dim, kernel_size, stride_kv)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def project(self, x: torch.Tensor, hw: tuple[int, int], cls: int) -> list[torch.Tensor]:
        """The convolutional half: (B, cls + N, C) -> q (B, cls + N_q, C), k, v (B, cls + N_kv, C)."""
        prefix, m = x[:, :cls], _tokens_to_map(x[:, cls:], hw)  # (B, cls, C), (B, C, H, W)
        return [torch.cat([prefix, conv(m)], dim=1) for conv in (self.conv_q, self.conv_k, self.conv_v)]

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, nh, L, hd)
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The linear half: projected q (B, L, C), k / v (B, M, C) -> (B, L, C)."""
        B, L, C = q.shape
        q, k, v = (
            self._heads(lin(t)) for lin, t in ((self.q, q), (self.k, k), (self.v, v))
        )  # (B, nh, *, hd)
        out = attention(q, k, v, scale=self.scale, backend=self.backend)  # (B, nh, L, hd)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))  # (B, L, C)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)), each with stochastic depth. Split in two so activation
    checkpointing can recompute `attend` without running the BatchNorms of `project` twice."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, **attn):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, num_heads, **attn)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # int(), as the reference and HF
        self.drop_path = drop_path

    def project(self, x: torch.Tensor, hw: tuple[int, int], cls: int) -> list[torch.Tensor]:
        return self.attn.project(self.norm1(x), hw, cls)  # q, k, v tokens

    def attend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn.attend(q, k, v), self.drop_path, self.training)  # (B, cls + N, C)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], cls: int = 0) -> torch.Tensor:
        return self.attend(x, *self.project(x, hw, cls))


class CvTStage(nn.Module):
    """[convolutional token embedding] -> [CLS token prepended] -> blocks. Stage 0's embedding is the stem."""

    def __init__(self, in_dim: int, dim: int, depth: int, embed: tuple, cls_token: bool, dpr: list, **blk):
        super().__init__()
        self.downsample = ConvEmbed(in_dim, dim, *embed) if in_dim else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.blocks = nn.ModuleList(Block(dim, drop_path=p, **blk) for p in dpr)
        self.grad_checkpointing = False

    def forward(
        self, x: torch.Tensor, hw: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The previous stage's map (B, C_prev, H, W), or stage 0's stem tokens (B, N, C) on grid `hw`
        -> (tokens (B, P + h * w, C), (h, w)), P = 1 with a CLS token."""
        if self.downsample is not None:
            x, hw = self.downsample(x)  # (B, h * w, C)
        cls = 0
        if self.cls_token is not None:
            x, cls = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1), 1
        for blk in self.blocks:  # the BatchNormed projections outside the checkpoint (see Block)
            x = run_block(self, blk.attend, x, *blk.project(x, hw, cls))
        return x, hw


def _init_weights(m: nn.Module) -> None:
    """The paper's release: truncated-normal(0.02) linears, unit LayerNorm / BatchNorm; convs keep PyTorch's."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class CvT(HierarchicalBackbone):
    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dims: Sequence[int] = (64, 192, 384),
        depths: Sequence[int] = (1, 2, 10),
        num_heads: Sequence[int] = (1, 3, 6),
        mlp_ratios: Sequence[float] = (4.0, 4.0, 4.0),
        patch_sizes: Sequence[int] = (7, 3, 3),
        strides: Sequence[int] = (4, 2, 2),
        paddings: Sequence[int] = (2, 1, 1),
        kernel_qkv: int = 3,
        stride_q: int = 1,
        stride_kv: int = 2,
        qkv_bias: bool = True,
        cls_token: bool = True,
        drop_path_rate: float = 0.0,
        mask_token: bool = False,
        attn_backend: str = "auto",
    ):
        super().__init__()
        per_stage = dict(
            depths=depths, num_heads=num_heads, mlp_ratios=mlp_ratios, patch_sizes=patch_sizes,
            strides=strides, paddings=paddings,
        )  # fmt: skip
        for name, v in per_stage.items():
            if len(v) != len(embed_dims):
                raise ValueError(f"{name} has {len(v)} entries for {len(embed_dims)} stages (embed_dims)")
        if kernel_qkv % 2 == 0:
            raise ValueError(
                f"kernel_qkv must be odd (padding kernel_qkv // 2 keeps the grid), got {kernel_qkv}"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.img_size, self.in_chans, self.qkv_bias, self.drop_path_rate = (
            img_size,
            in_chans,
            qkv_bias,
            drop_path_rate,
        )
        self.embed_dims, self.depths, self.num_heads = tuple(embed_dims), tuple(depths), tuple(num_heads)
        self.mlp_ratios, self.patch_sizes = tuple(mlp_ratios), tuple(patch_sizes)
        self.strides, self.paddings = tuple(strides), tuple(paddings)
        self.kernel_qkv, self.stride_q, self.stride_kv = kernel_qkv, stride_q, stride_kv
        self.num_features = self.embed_dims[-1]
        self.num_prefix_tokens = int(cls_token)
        self.stem_stride = self.strides[0]
        self._grid: tuple[int, int] | None = None  # the last stage's grid of the latest forward (stage_map)

        dims, n = self.embed_dims, len(self.embed_dims)
        self.patch_embed = ConvEmbed(in_chans, dims[0], patch_sizes[0], strides[0], paddings[0])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dims[0])) if mask_token else None
        self.stages = nn.ModuleList()
        self.feature_info, reduction = [], 1
        for i, dim in enumerate(dims):
            last = i == n - 1
            self.stages.append(
                CvTStage(
                    in_dim=dims[i - 1] if i else 0,
                    dim=dim,
                    depth=self.depths[i],
                    embed=(self.patch_sizes[i], self.strides[i], self.paddings[i]),
                    cls_token=cls_token and last,
                    dpr=drop_path_rates(drop_path_rate if last else 0.0, self.depths[i]),
                    num_heads=self.num_heads[i],
                    mlp_ratio=self.mlp_ratios[i],
                    kernel_size=kernel_qkv,
                    stride_q=stride_q,
                    stride_kv=stride_kv,
                    qkv_bias=qkv_bias,
                    backend=attn_backend,
                )
            )
            reduction *= self.strides[i]
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
        self.norm = nn.LayerNorm(self.num_features)  # the classifier's (CvtForImageClassification.layernorm)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        for p in (self.stages[-1].cls_token, self.mask_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    # --- contract -------------------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        names = {f"stages.{len(self.stages) - 1}.cls_token"} if self.num_prefix_tokens else set()
        return names | ({"mask_token"} if self.mask_token is not None else set())

    def group_matcher(self, coarse: bool = False) -> dict:
        """Stem, then (coarse) one group per stage or (fine) one per block, a stage's embedding and CLS token
        joining its first block; the final norm with the head."""
        blocks = (
            r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.(?:downsample|cls_token)", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            ]
        )
        return {"stem": r"^patch_embed|^mask_token", "blocks": blocks, "head": r"^norm\.|^head\."}

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None):
        """Stem tokens (B, h * w, C_1) and their grid (h, w); masked positions hold the mask token (or 0)."""
        x, hw = self.patch_embed(images)  # (B, N, C_1)
        if mask is not None:  # on the (B, h, w, C_1) grid of the tokens
            x = replace_masked(x.unflatten(1, hw), mask, self.mask_token, "channels_last").flatten(1, 2)
        return x, hw

    def run_stage(self, i: int, x) -> torch.Tensor:
        """Stage 0 takes `embed`'s (tokens, hw), the others the previous map -> the map (B, C_i, h_i, w_i), or
        for the last stage the features (B, P + h * w, C) (its grid kept for `stage_map`)."""
        x, hw = self.stages[0](*x) if i == 0 else self.stages[i](x)
        if i == len(self.stages) - 1:
            self._grid = hw
            return x
        return _tokens_to_map(x, hw)

    def stage_map(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i < len(self.stages) - 1:
            return x
        return _tokens_to_map(x[:, self.num_prefix_tokens :], self._grid)  # the CLS token left out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x[:, 0]) if self.num_prefix_tokens else self.norm(x).mean(dim=1)  # (B, C_3)
        return x if pre_logits else self.head(x)

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this architecture (for checkpoints and export)."""
        return dict(
            img_size=self.img_size,
            in_chans=self.in_chans,
            num_classes=self.head.out_features if isinstance(self.head, nn.Linear) else 0,
            embed_dims=list(self.embed_dims),
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            mlp_ratios=list(self.mlp_ratios),
            patch_sizes=list(self.patch_sizes),
            strides=list(self.strides),
            paddings=list(self.paddings),
            kernel_qkv=self.kernel_qkv,
            stride_q=self.stride_q,
            stride_kv=self.stride_kv,
            qkv_bias=self.qkv_bias,
            cls_token=bool(self.num_prefix_tokens),
            drop_path_rate=self.drop_path_rate,
            mask_token=self.mask_token is not None,
        )


# name: (embed_dims, depths, num_heads); `test` is CI-sized; 13 / 21 / W24 are the paper's Table 2 (the
# microsoft/cvt-13, cvt-21, cvt-w24 checkpoints).
_SIZES = {
    "cvt_test": dict(embed_dims=(16, 32, 48), depths=(1, 2, 3), num_heads=(1, 2, 3), img_size=64),
    "cvt_13": dict(embed_dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6)),
    "cvt_21": dict(embed_dims=(64, 192, 384), depths=(1, 4, 16), num_heads=(1, 3, 6)),
    "cvt_w24": dict(embed_dims=(192, 768, 1024), depths=(2, 2, 20), num_heads=(3, 12, 16)),
}
register_sizes(
    CvT,
    {name: {"img_size": 224, **kw} for name, kw in _SIZES.items()},
    smoke=dict(img_size=64, depths=(1, 1, 1)),  # CPU-test size (see models/__init__.py)
)
