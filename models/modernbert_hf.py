"""Hugging Face twin of the ModernBERT encoder: ModernBertForMaskedLM, the key map and both conversions.

Tessera                         transformers (ModernBertForMaskedLM)
tok_embeddings                  model.embeddings.tok_embeddings (and decoder.weight, tied)
emb_norm                        model.embeddings.norm
layers.i.attn_norm (i >= 1)     model.layers.i.attn_norm            (layer 0's is the identity in both)
layers.i.attn.qkv / proj        model.layers.i.attn.Wqkv / Wo       (Wqkv rows: q | k | v, each head-major)
layers.i.mlp_norm               model.layers.i.mlp_norm
layers.i.mlp.wi / wo            model.layers.i.mlp.Wi / Wo
final_norm                      model.final_norm
head.dense / head.norm          head.dense / head.norm
head.bias                       decoder.bias
Biases (".bias" keys) exist on both sides exactly when the config's norm_bias / attention_bias / mlp_bias /
classifier_bias / decoder_bias ask for them, so the map carries them by name.

The exported config sets reference_compile=False, but ModernBertConfig.to_dict leaves that field out of
config.json: a reloaded model reads None and compiles parts of itself on a GPU with triton (same numbers).
"""

from __future__ import annotations

import torch

from models.hf import HFAdapter, load_strict, register_hf
from models.hf_config import EXACT_GELU, reject
from models.modernbert import ModernBert
from ops.compat import import_transformers

# (Tessera prefix, transformers prefix), first match wins; "layers." covers the per-layer names below
TOP_KEYS = [
    ("tok_embeddings.", "model.embeddings.tok_embeddings."),
    ("emb_norm.", "model.embeddings.norm."),
    ("final_norm.", "model.final_norm."),
    ("head.dense.", "head.dense."),
    ("head.norm.", "head.norm."),
    ("head.bias", "decoder.bias"),
]
LAYER_KEYS = [
    ("attn_norm.", "attn_norm."),
    ("attn.qkv.", "attn.Wqkv."),
    ("attn.proj.", "attn.Wo."),
    ("mlp_norm.", "mlp_norm."),
    ("mlp.wi.", "mlp.Wi."),
    ("mlp.wo.", "mlp.Wo."),
]
TIED = "decoder.weight"  # transformers' tied copy of the token embeddings


def hf_key(key: str) -> str:
    """The transformers name of a Tessera state-dict key."""
    if key.startswith("layers."):
        _, i, rest = key.split(".", 2)
        for ours, theirs in LAYER_KEYS:
            if rest.startswith(ours):
                return f"model.layers.{i}.{theirs}{rest[len(ours) :]}"
    for ours, theirs in TOP_KEYS:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise KeyError(f"ModernBert key {key!r} has no transformers name in models/modernbert_hf.py")


def modernbert_config(model: ModernBert):
    """The ModernBertConfig of `model`: every field that shapes ModernBertForMaskedLM's outputs."""
    h = model.hparams()
    return import_transformers().ModernBertConfig(
        vocab_size=h["vocab_size"],
        hidden_size=h["embed_dim"],
        intermediate_size=h["intermediate_size"],
        num_hidden_layers=h["depth"],
        num_attention_heads=h["num_heads"],
        hidden_activation="gelu",
        max_position_embeddings=h["max_seq_len"],
        initializer_range=h["init_std"],
        initializer_cutoff_factor=h["init_cutoff_factor"],
        norm_eps=h["norm_eps"],
        norm_bias=h["norm_bias"],
        pad_token_id=h["pad_token_id"],
        bos_token_id=h["bos_token_id"],
        eos_token_id=h["eos_token_id"],
        cls_token_id=h["cls_token_id"],
        sep_token_id=h["sep_token_id"],
        global_rope_theta=h["global_rope_theta"],
        local_rope_theta=h["local_rope_theta"],
        global_attn_every_n_layers=h["global_attn_every_n_layers"],
        local_attention=h["local_attention"],
        attention_bias=h["attention_bias"],
        mlp_bias=h["mlp_bias"],
        classifier_bias=h["classifier_bias"],
        classifier_activation="gelu",
        decoder_bias=h["decoder_bias"],
        attention_dropout=0.0,
        embedding_dropout=0.0,
        mlp_dropout=0.0,
        tie_word_embeddings=True,
        reference_compile=False,
        architectures=["ModernBertForMaskedLM"],
    )


def modernbert_to_hf(model: ModernBert, attn_implementation: str = "sdpa"):
    """ModernBertForMaskedLM holding `model`'s weights (loaded strictly); eval()."""
    cfg = modernbert_config(model)
    cfg._attn_implementation = attn_implementation
    hf = import_transformers().ModernBertForMaskedLM(cfg)
    sd = {hf_key(k): v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    sd[TIED] = sd["model.embeddings.tok_embeddings.weight"]
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


def modernbert_kwargs_from_hf(cfg) -> dict:
    """ModernBert arguments of a ModernBertConfig, read as transformers' ModernBERT reads it; ValueError naming
    `ModernBertConfig.<field>=<value>` for what Tessera cannot represent. Dropouts (training only), the
    classifier heads' fields and sparse_prediction (which rows get logits when labels are passed) change no
    output of the imported encoder and are not read."""
    for field in ("hidden_activation", "classifier_activation"):
        if getattr(cfg, field) not in EXACT_GELU:
            reject(cfg, field, "Tessera's ModernBert uses the exact GELU ('gelu')")
    if not getattr(cfg, "tie_word_embeddings", True):
        reject(
            cfg, "tie_word_embeddings", "Tessera's ModernBert ties its MLM decoder to the token embeddings"
        )
    if getattr(cfg, "rope_scaling", None) is not None:
        reject(cfg, "rope_scaling", "Tessera's ModernBert has plain RoPE (no scaling)")
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        reject(cfg, "partial_rotary_factor", "Tessera's ModernBert rotates the whole head")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if cfg.hidden_size % cfg.num_attention_heads or head_dim % 2:
        reject(
            cfg, "num_attention_heads", f"hidden_size {cfg.hidden_size} must split into heads of an even size"
        )
    if getattr(cfg, "head_dim", None) not in (None, head_dim):
        reject(
            cfg,
            "head_dim",
            f"Tessera's ModernBert has head_dim = hidden_size // num_attention_heads = {head_dim}",
        )
    if cfg.global_attn_every_n_layers < 1:
        reject(cfg, "global_attn_every_n_layers", "layer i is global iff i % it == 0: it must be >= 1")
    if cfg.local_attention < 0:
        reject(cfg, "local_attention", "Tessera's ModernBert takes a window of >= 0 tokens")
    local_theta = cfg.local_rope_theta if cfg.local_rope_theta is not None else cfg.global_rope_theta
    kw = dict(
        vocab_size=cfg.vocab_size,
        embed_dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_seq_len=cfg.max_position_embeddings,
        global_attn_every_n_layers=cfg.global_attn_every_n_layers,
        local_attention=cfg.local_attention,
        global_rope_theta=float(cfg.global_rope_theta),
        local_rope_theta=float(local_theta),
        norm_eps=float(cfg.norm_eps),
        norm_bias=bool(cfg.norm_bias),
        attention_bias=bool(cfg.attention_bias),
        mlp_bias=bool(cfg.mlp_bias),
        classifier_bias=bool(cfg.classifier_bias),
        decoder_bias=bool(cfg.decoder_bias),
        init_std=float(cfg.initializer_range),
        init_cutoff_factor=float(cfg.initializer_cutoff_factor or 3.0),  # transformers' fallback for None
    )
    for field in ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id"):
        kw[field] = getattr(cfg, field, None)
    pad = kw["pad_token_id"]
    if pad is not None and not 0 <= pad < cfg.vocab_size:
        reject(cfg, "pad_token_id", f"not a token of vocab_size {cfg.vocab_size}")
    return kw


def modernbert_from_hf(hf: dict[str, torch.Tensor], cfg) -> ModernBert:
    """A ModernBert from a ModernBertForMaskedLM state dict and config; eval()."""
    model = ModernBert(**modernbert_kwargs_from_hf(cfg))
    sd = {}
    for key in model.state_dict():
        theirs = hf_key(key)
        if theirs not in hf:
            raise RuntimeError(f"ModernBertForMaskedLM state dict: {theirs!r} (Tessera {key!r}) is missing")
        sd[key] = hf[theirs]
    emb = hf["model.embeddings.tok_embeddings.weight"]
    if TIED in hf and not torch.equal(hf[TIED], emb):
        raise ValueError(f"{TIED} differs from the token embeddings: Tessera's ModernBert ties them")
    known = {hf_key(k) for k in sd} | {TIED}
    extra = sorted(set(hf) - known)
    if extra:
        raise RuntimeError(
            f"ModernBertForMaskedLM state dict: keys Tessera's ModernBert has no place for: {extra}"
        )
    return load_strict(model, sd, "ModernBertForMaskedLM -> ModernBert")


def modernbert_hf_outputs(hf_model, input_ids: torch.Tensor) -> dict:
    """ModernBertForMaskedLM's logits and last hidden state (after final_norm) on unpadded rows: the attention
    mask is all ones, so transformers neither unpads nor pads."""
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    logits = hf_model(input_ids=input_ids, attention_mask=mask).logits  # (B, N, V)
    features = hf_model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, N, D)
    return {"logits": logits, "features": features}


register_hf(
    "modernbert",
    HFAdapter(
        model_cls=ModernBert,
        archs=("ModernBertForMaskedLM",),
        hf_config=modernbert_config,
        to_hf=modernbert_to_hf,
        from_hf=modernbert_from_hf,
        hf_outputs=modernbert_hf_outputs,
    ),
)
