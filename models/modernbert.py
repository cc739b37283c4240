"""ModernBERT encoder with its masked-LM head (Warner et al. 2024), as transformers 4.57.6 computes it.

The text backbone contract is in models/text_layers.py. The structure is ModernBertForMaskedLM's:
  tok_embeddings -> emb_norm (LayerNorm, no position embedding)
  layers: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x)); layer 0's attn_norm is the identity
      attention: fused qkv, rotate-half RoPE on the explicit positions; layer i is global iff
      i % global_attn_every_n_layers == 0 (global_rope_theta), else a symmetric window |i - j| <= w // 2 of
      w = local_attention tokens (local_rope_theta)
      mlp: GeGLU, the activation on the first half
  final_norm -> forward_features; head: dense -> gelu -> norm -> tied decoder (token embeddings) + bias
LayerNorms have a bias only with norm_bias (default False), linears only with attention_bias / mlp_bias /
classifier_bias; the decoder bias is on by default (decoder_bias).

Packed rows: `doc_ids` (B, N) number the documents of a row (-1 = padding) and `positions` restart at 0 in each,
so every document is computed as if it were alone in its row (ops.attention's doc_ids / window masks).

Init is ModernBERT's own: truncated normal (cut at +-init_cutoff_factor std), std init_std for the embeddings
and the input projections (qkv, mlp.wi), init_std / sqrt(2 * depth) for the output projections (attn.proj,
mlp.wo, head.dense); biases zero, norms one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import register_sizes
from models.text_layers import GeGLU, apply_rope, check_text_inputs, rope_cos_sin, rope_inv_freq, run_layer
from ops.attention import attention


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with RoPE, optionally limited to a symmetric window."""

    def __init__(self, dim: int, num_heads: int, bias: bool, window: int | None, backend: str):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.window = None if window is None else (window // 2, window // 2)  # (left, right)
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids) -> torch.Tensor:
        B, N, D = x.shape
        # the fused projection's rows are (q|k|v, head, head_dim), transformers' Wqkv layout
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, backend=self.backend, doc_ids=doc_ids, window=self.window)  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class EncoderLayer(nn.Module):
    def __init__(self, layer_id: int, dim: int, num_heads: int, hidden: int, window: int | None, cfg: dict):
        super().__init__()
        self.is_global = window is None
        self.attn_norm = nn.Identity() if layer_id == 0 else _norm(dim, cfg)  # the embedding norm precedes it
        self.attn = SelfAttention(dim, num_heads, cfg["attention_bias"], window, cfg["attn_backend"])
        self.mlp_norm = _norm(dim, cfg)
        self.mlp = GeGLU(dim, hidden, bias=cfg["mlp_bias"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, doc_ids)
        return x + self.mlp(self.mlp_norm(x))  # (B, N, D)


class MLMHead(nn.Module):
    """dense -> gelu -> norm, then the decoder: the token embeddings (tied, passed in) plus `bias`."""

    def __init__(self, dim: int, vocab_size: int, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(dim, dim, bias=cfg["classifier_bias"])
        self.norm = _norm(dim, cfg)
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if cfg["decoder_bias"] else None

    def forward(self, x: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(x))), embed_weight, self.bias)  # (B, N, V)


@torch.no_grad()
def _trunc_normal(w: torch.Tensor, std: float, bound: float) -> None:
    """N(0, std^2) conditioned on |x| <= bound, by redrawing the values outside (the same distribution as
    nn.init.trunc_normal_, several times faster on CPU at the 2-std cut ModernBERT uses)."""
    w.normal_(0.0, std)
    if w.is_meta:  # built on the meta device: shapes only
        return
    flat = w.view(-1)
    redo = (flat.abs() > bound).nonzero().squeeze(1)  # (R,) about 5% of the entries at a 2-std cut
    while redo.numel():
        draw = torch.randn(redo.numel(), dtype=w.dtype, device=w.device) * std
        flat[redo] = draw
        redo = redo[draw.abs() > bound]


def _norm(dim: int, cfg: dict) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=cfg["norm_eps"], bias=cfg["norm_bias"])


class ModernBert(nn.Module):
    modality = "text"
    causal = False  # bidirectional: every token sees its whole document (or its window)

    def __init__(
        self,
        vocab_size: int = 50368,
        embed_dim: int = 768,
        depth: int = 22,
        num_heads: int = 12,
        intermediate_size: int = 1152,
        max_seq_len: int = 8192,
        global_attn_every_n_layers: int = 3,
        local_attention: int = 128,
        global_rope_theta: float = 160000.0,
        local_rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        norm_bias: bool = False,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        classifier_bias: bool = False,
        decoder_bias: bool = True,
        pad_token_id: int | None = None,  # the special ids are passed through to the exported config
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        cls_token_id: int | None = None,
        sep_token_id: int | None = None,
        init_std: float = 0.02,
        init_cutoff_factor: float = 2.0,
        attn_backend: str = "auto",
    ):
        hp = dict(locals())  # the constructor arguments, taken before any other local exists
        hp.pop("self"), hp.pop("__class__", None)
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("embed_dim", embed_dim), ("depth", depth)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if num_heads < 1 or embed_dim % num_heads or (embed_dim // num_heads) % 2:
            raise ValueError(
                f"num_heads={num_heads}: embed_dim {embed_dim} must split into heads of an even size (RoPE pairs)"
            )
        if global_attn_every_n_layers < 1:
            raise ValueError(f"global_attn_every_n_layers must be >= 1, got {global_attn_every_n_layers}")
        if local_attention < 0:
            raise ValueError(f"local_attention must be >= 0 tokens, got {local_attention}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        if pad_token_id is not None and not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id={pad_token_id} is not a token of vocab_size {vocab_size}")
        self._hparams = cfg = hp
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.embed_dim = self.num_features = embed_dim
        self.head_dim = embed_dim // num_heads
        self.global_rope_theta, self.local_rope_theta = global_rope_theta, local_rope_theta
        # padding_idx as transformers sets it: the pad token's row gets no gradient
        self.tok_embeddings = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_token_id)
        self.emb_norm = _norm(embed_dim, cfg)
        self.layers = nn.ModuleList(
            EncoderLayer(
                i,
                embed_dim,
                num_heads,
                intermediate_size,
                None if i % global_attn_every_n_layers == 0 else local_attention,
                cfg,
            )
            for i in range(depth)
        )
        self.final_norm = _norm(embed_dim, cfg)
        self.head = MLMHead(embed_dim, vocab_size, cfg)
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """ModernBERT's init (module docstring); deterministic given torch.manual_seed."""
        std, cut = self._hparams["init_std"], self._hparams["init_cutoff_factor"]
        out_std = std / math.sqrt(2.0 * len(self.layers))

        def trunc(w: torch.Tensor, s: float) -> None:
            _trunc_normal(w.data, s, cut * s)

        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        trunc(self.tok_embeddings.weight, std)
        for layer in self.layers:
            trunc(layer.attn.qkv.weight, std)
            trunc(layer.mlp.wi.weight, std)
            trunc(layer.attn.proj.weight, out_std)
            trunc(layer.mlp.wo.weight, out_std)
        trunc(self.head.dense.weight, out_std)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)

    # --- contract -------------------------------------------------------------------------------

    def attention_layout(self) -> list[dict]:
        """Per layer, for FLOP accounting (models/text_layers.py): global layers see the document, local ones at
        most `local_attention` + 1 keys."""
        h = self._hparams
        return [
            {
                "kind": "softmax",
                "heads": h["num_heads"],
                "head_dim": self.head_dim,
                "window": None if i % h["global_attn_every_n_layers"] == 0 else h["local_attention"] + 1,
            }
            for i in range(h["depth"])
        ]

    def no_weight_decay(self) -> set[str]:
        """None by name: biases and norm weights (1-D) are already undecayed by pretrain/optim.py, and ModernBERT
        decays its (tied) embeddings."""
        return set()

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Regexes grouping parameters by depth (layer-wise LR decay): embeddings, one group per layer, head."""
        return {
            "stem": r"^tok_embeddings|^emb_norm",
            "blocks": r"^layers\.(\d+)\.",
            "head": r"^final_norm|^head",
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this architecture (for checkpoints and export)."""
        return dict(self._hparams)

    def forward_features(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, N) -> hidden states (B, N, D) after final_norm (transformers' last_hidden_state)."""
        positions = check_text_inputs(input_ids, positions, doc_ids, self.max_seq_len)
        x = self.emb_norm(self.tok_embeddings(input_ids))  # (B, N, D)
        rope = {  # (cos, sin), each (B, 1, N, hd), computed once per theta in fp32
            is_global: rope_cos_sin(positions, rope_inv_freq(self.head_dim, theta).to(x.device))
            for is_global, theta in ((True, self.global_rope_theta), (False, self.local_rope_theta))
        }
        for layer in self.layers:
            x = run_layer(layer, self.grad_checkpointing, x, *rope[layer.is_global], doc_ids)
        return self.final_norm(x)

    def forward_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, N, D) -> MLM logits (B, N, vocab_size)."""
        return self.head(hidden, self.tok_embeddings.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward_head(self.forward_features(input_ids, positions, doc_ids))


# name: (embed_dim, depth, heads, intermediate, local_attention, vocab). `test` is CI-sized (both layer kinds
# occur: layers 0 and 3 are global); base and large are the paper's.
_SIZES = {
    "modernbert_test": (64, 4, 4, 96, 16, 512),
    "modernbert_base": (768, 22, 12, 1152, 128, 50368),
    "modernbert_large": (1024, 28, 16, 2624, 128, 50368),
}
register_sizes(
    ModernBert,
    {
        name: dict(
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            intermediate_size=inter,
            local_attention=window,
            vocab_size=vocab,
            global_attn_every_n_layers=3,
            max_seq_len=8192,
        )
        for name, (dim, depth, heads, inter, window, vocab) in _SIZES.items()
    },
    smoke=dict(depth=2, vocab_size=1000),  # a global and a local layer; CPU-test size (models/__init__.py)
)
