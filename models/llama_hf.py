"""Hugging Face twin of the Llama decoder: LlamaForCausalLM. Both use rotate-half RoPE, so conversion is a pure
rename (no q/k row permutation, unlike torchtitan's interleaved-pair RoPE).

Tessera (models/llama.py)          transformers (LlamaForCausalLM; a LlamaModel has no "model." prefix)
embed                              model.embed_tokens
blocks.i.norm1                     model.layers.i.input_layernorm
blocks.i.attn.{q,k,v,o}_proj       model.layers.i.self_attn.{q,k,v,o}_proj
blocks.i.norm2                     model.layers.i.post_attention_layernorm
blocks.i.mlp.w1 / w3 / w2          model.layers.i.mlp.gate_proj / up_proj / down_proj
norm                               model.norm
lm_head (untied only)              lm_head (tied: transformers ties it to embed_tokens and saves it once)

Import of a LlamaModel (the decoder without its head): with tie_word_embeddings the head *is* the embedding, so
the folder is the whole causal LM and imports; untied, the head's weights are not in it, and the import refuses
rather than invent a random head (import the LlamaForCausalLM instead). Sliding-window and linear-attention
models have no LlamaForCausalLM form; their export is refused.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.hf import HFAdapter, load_strict, register_hf
from models.hf_config import reject
from models.llama import LlamaDecoder
from ops.compat import import_transformers

# (tessera suffix inside a block, hf suffix inside a layer)
BLOCK_KEYS = [
    ("norm1", "input_layernorm"),
    ("attn.q_proj", "self_attn.q_proj"),
    ("attn.k_proj", "self_attn.k_proj"),
    ("attn.v_proj", "self_attn.v_proj"),
    ("attn.o_proj", "self_attn.o_proj"),
    ("norm2", "post_attention_layernorm"),
    ("mlp.w1", "mlp.gate_proj"),
    ("mlp.w3", "mlp.up_proj"),
    ("mlp.w2", "mlp.down_proj"),
]
TOP_KEYS = [("embed", "embed_tokens"), ("norm", "norm")]


def _exportable(model: LlamaDecoder) -> None:
    if model.linear_attn is not None:
        raise ValueError(
            f"LlamaDecoder(linear_attn={model.linear_attn!r}) has linear-attention layers, which "
            "LlamaForCausalLM (softmax attention only) cannot hold: no Hugging Face export"
        )
    if model.sliding_window is not None:
        raise ValueError(
            f"LlamaDecoder(sliding_window={model.sliding_window}) attends within a window; LlamaForCausalLM "
            "attends to the whole prefix: no Hugging Face export"
        )


def llama_config(
    model: LlamaDecoder,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
):
    """The LlamaConfig of a (softmax-attention, full-context) Tessera decoder; token ids only when passed."""
    _exportable(model)
    return import_transformers().LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.dim,
        intermediate_size=model.ffn_hidden,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        max_position_embeddings=model.max_seq_len,
        rms_norm_eps=model.norm_eps,
        rope_theta=model.rope_theta,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        tie_word_embeddings=model.tie_embeddings,
        hidden_act="silu",
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        architectures=["LlamaForCausalLM"],
    )


def state_to_hf(model: LlamaDecoder) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM-layout state dict (with lm_head.weight = the embedding when tied, as HF's own holds)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {f"model.{h}.weight": sd[f"{t}.weight"] for t, h in TOP_KEYS}
    for i in range(len(model.blocks)):
        for t, h in BLOCK_KEYS:
            out[f"model.layers.{i}.{h}.weight"] = sd[f"blocks.{i}.{t}.weight"]
    out["lm_head.weight"] = sd["embed.weight"] if model.tie_embeddings else sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def llama_to_hf(model: LlamaDecoder, **token_ids) -> nn.Module:
    """LlamaForCausalLM holding the model's weights (loaded strictly), eval(); `token_ids` go to the config."""
    cfg = llama_config(model, **token_ids)
    hf = import_transformers().LlamaForCausalLM(cfg)
    hf.load_state_dict(state_to_hf(model), strict=True)
    return hf.eval()


def kwargs_from_hf(cfg) -> dict:
    """LlamaDecoder arguments of a LlamaConfig; ValueError naming the field Tessera's decoder cannot represent.
    attention_dropout (training only) changes no output of the imported model and is not read."""
    if cfg.hidden_act != "silu":
        reject(cfg, "hidden_act", "Tessera's Llama MLP is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if getattr(cfg, field, False):
            reject(cfg, field, "Tessera's Llama has no biases")
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
        reject(cfg, "rope_scaling", "Tessera's RoPE has no frequency scaling (plain rope_theta only)")
    if getattr(cfg, "pretraining_tp", 1) != 1:
        reject(cfg, "pretraining_tp", "Tessera computes each projection as one matmul (pretraining_tp=1)")
    if cfg.hidden_size % cfg.num_attention_heads:
        reject(cfg, "num_attention_heads", f"Tessera needs it to divide hidden_size {cfg.hidden_size}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        reject(cfg, "head_dim", "Tessera's head_dim is hidden_size // num_attention_heads")
    return dict(
        vocab_size=cfg.vocab_size,
        dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        ffn_hidden=cfg.intermediate_size,
        max_seq_len=cfg.max_position_embeddings,
        rope_theta=float(cfg.rope_theta),
        norm_eps=float(cfg.rms_norm_eps),
        tie_embeddings=bool(cfg.tie_word_embeddings),
    )


def llama_from_hf(hf: dict[str, torch.Tensor], cfg) -> LlamaDecoder:
    """A LlamaDecoder from a LlamaForCausalLM (or tied LlamaModel) state dict and its config, eval()."""
    kw = kwargs_from_hf(cfg)
    prefix = "model." if any(k.startswith("model.") for k in hf) else ""
    base = {k[len(prefix) :]: v for k, v in hf.items() if k.startswith(prefix) and k != "lm_head.weight"}
    sd = {f"{t}.weight": base.pop(f"{h}.weight", None) for t, h in TOP_KEYS}
    for i in range(kw["depth"]):
        for t, h in BLOCK_KEYS:
            sd[f"blocks.{i}.{t}.weight"] = base.pop(f"layers.{i}.{h}.weight", None)
    if not kw["tie_embeddings"]:
        if "lm_head.weight" not in hf:
            reject(
                cfg,
                "tie_word_embeddings",
                "the state dict has no lm_head.weight (a LlamaModel, the decoder without its head) and the head "
                "is not the embedding: import the LlamaForCausalLM",
            )
        sd["lm_head.weight"] = hf["lm_head.weight"]
    # tied: transformers uses embed_tokens as the head and ignores a saved lm_head.weight; so does Tessera
    missing = sorted(k for k, v in sd.items() if v is None)
    unexpected = sorted(k for k in base if not k.endswith("rotary_emb.inv_freq"))  # old folders saved it
    if missing or unexpected:
        raise RuntimeError(f"Llama import: key map mismatch (missing {missing}, unexpected {unexpected})")
    model = LlamaDecoder(**kw)
    return load_strict(model, sd, "Llama import")


def llama_hf_outputs(hf, input_ids: torch.Tensor) -> dict:
    """A LlamaForCausalLM's logits (no cache, no attention mask: a plain causal run over each row)."""
    return {"logits": hf(input_ids=input_ids, use_cache=False).logits}


register_hf(
    "llama",
    HFAdapter(
        model_cls=LlamaDecoder,
        archs=("LlamaForCausalLM", "LlamaModel"),
        hf_config=llama_config,
        to_hf=llama_to_hf,
        from_hf=llama_from_hf,
        hf_outputs=llama_hf_outputs,
    ),
)
