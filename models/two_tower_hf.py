"""Hugging Face twins of the two-tower model (models/two_tower.py): CLIPModel, SiglipModel and
VisionTextDualEncoderModel, chosen from the model's structure (never approximated), with both directions.

CLIPModel        image: ViT with pre_norm, a cls token, global_pool "token" (a patch-conv bias folds into the
                 position table's patch rows: CLIP's conv has none); text: causal TextTransformer pooled at its
                 first EOS (eos id != 2); bias-free text_proj; image_proj linear (or none: the identity)
SiglipModel      image: ViT without cls token, global_pool "map", no pre-norm; its MAP output is the embedding
                 (image_proj "none"); text: bidirectional TextTransformer pooled at the last position; text_proj
                 (its bias, or zero) is the text `head`; logit_bias (0 for a model without one: the same logits)
VisionTextDual-  image: ViTModel (cls token, token pool, no pre-norm, erf GELU; identity pooler), SwinModel,
EncoderModel     Swinv2Model, ConvNextModel, ConvNextV2Model (their pooler_output is Tessera's pooled feature);
                 text: the causal TextTransformer as CLIPTextModel; bias-free projections
Anything else (PVT v2, PoolFormer, MaxViT, an avg-pooled ViT, a llama / modernbert text tower, a logit bias
outside SigLIP, ...) raises ValueError naming the part and listing these combinations.

Key map (Tessera -> HF; V = vision_model., T = text_model. (text_model.text_model. in the dual encoder)):
cls_token (1, 1, D)                 V embeddings.class_embedding (D,)                          CLIP
patch_embed.proj.weight / .bias     V embeddings.patch_embedding.weight / .bias (SigLIP; CLIP folds it)
pos_embed (1, P + L, D)             V embeddings.position_embedding.weight (P + L, D)
norm_pre                            V pre_layrnorm (sic)                                       CLIP
blocks.i.norm1 / norm2              V/T encoder.layers.i.layer_norm1 / layer_norm2
blocks.i.attn.qkv (fused)           V/T encoder.layers.i.self_attn.{q,k,v}_proj (split on dim 0; none -> 0)
blocks.i.attn.proj                  V/T encoder.layers.i.self_attn.out_proj
blocks.i.mlp.fc1 / fc2              V/T encoder.layers.i.mlp.fc1 / fc2
norm                                V post_layernorm (CLIP: on the cls token only, the same pooled output)
attn_pool.*                         V head.* (SigLIP's MAP head, the same names)
text.token_embed / pos_embed / norm T embeddings.token_embedding / position_embedding, final_layer_norm
image_proj / text_proj              visual_projection / text_projection (SigLIP: T head)
logit_scale () / logit_bias ()      logit_scale (() or SigLIP's (1,)), clamped to [0, ln 100] as Tessera uses it
                                    (transformers takes exp of the raw value) / logit_bias (1,)

transformers 4.57's VisionTextDualEncoderModel.forward and get_text_features pass token_type_ids to the text
tower, which CLIPTextModel rejects (TypeError); transformers 5 accepts it. `hf_embeddings` (and the model card)
call the towers and projections directly, which is what the forward computes.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn

from models.clip_text import TextTransformer
from models.convnext import ConvNeXt, ConvNeXtV2
from models.hf import adapter_for_arch, adapter_for_model, load_strict
from models.hf_config import reject, square
from models.registry import MODELS
from models.swin import SwinTransformer
from models.swin_v2 import SwinTransformerV2
from models.two_tower import LOGIT_SCALE_MAX, TwoTower
from models.vit import VisionTransformer
from models.vit_hf import check_all_tokens
from ops.compat import import_transformers

TARGETS = ("CLIPModel", "SiglipModel", "VisionTextDualEncoderModel")
MODEL_TYPES = ("clip", "siglip", "vision-text-dual-encoder")  # their configs' model_type, in that order
EXPORTABLE = (
    "CLIPModel: a ViT with pre_norm=True, a cls token and global_pool='token' + a causal TextTransformer pooled at "
    "its EOS, bias-free projections, no logit_bias; SiglipModel: a ViT with class_token=False, global_pool='map' "
    "and image_proj='none' + a bidirectional TextTransformer pooled at the last position; "
    "VisionTextDualEncoderModel: a plain ViT (cls token, global_pool='token', no pre_norm, act 'gelu'), Swin, "
    "Swin V2, ConvNeXt or ConvNeXt V2 + a causal TextTransformer pooled at its EOS, bias-free projections, no "
    "logit_bias"
)
# the image towers of the dual encoder: Tessera class -> the transformers class its adapter exports
DUAL_IMAGE_TOWERS = {
    VisionTransformer: "ViTModel",
    SwinTransformer: "SwinModel",
    SwinTransformerV2: "Swinv2Model",
    ConvNeXt: "ConvNextModel",
    ConvNeXtV2: "ConvNextV2Model",
}
# a dual encoder's vision_config.model_type -> the architecture whose adapter imports it
DUAL_IMPORT_ARCHS = {"vit": "ViTModel", "swin": "SwinModel", "swinv2": "Swinv2Model"}
DUAL_IMPORT_ARCHS.update({"convnext": "ConvNextModel", "convnextv2": "ConvNextV2Model"})
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
ACT_FROM_HF = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}
LEGACY_EOS = 2  # CLIPTextTransformer pools at argmax(input_ids) when eos_token_id == 2 (pre-#24773 configs)

BLOCK_KEYS = [  # (Tessera suffix inside a block, HF suffix inside a layer); "attn.qkv" is split into three
    ("norm1", "layer_norm1"),
    ("attn.proj", "self_attn.out_proj"),
    ("norm2", "layer_norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
]
QKV_HF = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
TEXT_KEYS = [  # (Tessera key inside the TextTransformer, HF key inside CLIPTextTransformer / SiglipTextTransformer)
    ("token_embed.weight", "embeddings.token_embedding.weight"),
    ("pos_embed", "embeddings.position_embedding.weight"),
    ("norm.weight", "final_layer_norm.weight"),
    ("norm.bias", "final_layer_norm.bias"),
]
MAP_KEYS = [  # SigLIP's MAP head: Tessera's attn_pool.<k> is HF's head.<k>
    "probe",
    *(f"attention.{k}" for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")),
    *(f"{m}.{w}" for m in ("layernorm", "mlp.fc1", "mlp.fc2") for w in ("weight", "bias")),
]


TEXT_KINDS = {
    "clip": "a causal text tower pooled at its EOS (CLIPTextModel)",
    "siglip": "a bidirectional text tower pooled at the last position (SiglipTextModel)",
}


def _refuse(part: str) -> ValueError:
    return ValueError(f"no Hugging Face export for this two-tower model: {part}. Exportable: {EXPORTABLE}")


# --- which target ----------------------------------------------------------------------------------------


def _text_kind(model: TwoTower) -> str:
    """'clip' (causal, EOS-pooled: CLIPTextModel) or 'siglip' (bidirectional, last-pooled: SiglipTextModel)."""
    text = model.text
    if not isinstance(text, TextTransformer):
        raise _refuse(
            f"text tower {model.text_tower!r} ({type(text).__name__}) has no CLIPTextModel / SiglipTextModel twin "
            "(only models/clip_text.py's TextTransformer has)"
        )
    if text.causal and model.text_pool == "eos":
        if model.eos_token_id == LEGACY_EOS:
            raise _refuse(
                f"eos_token_id={LEGACY_EOS}: transformers' CLIPTextModel then pools at argmax(input_ids), not at the "
                "end-of-text token (a tokenizer whose EOS is id 2, such as data.tokenizer 'bpe', cannot be exported "
                "to CLIPModel / CLIPTextModel)"
            )
        return "clip"
    if not text.causal and model.text_pool == "last":
        return "siglip"
    kind = "causal" if text.causal else "bidirectional"
    raise _refuse(f"text_pool={model.text_pool!r} on a {kind} text tower {model.text_tower!r}")


def hf_target(model: TwoTower) -> str:
    """The transformers class that holds `model` exactly (one of TARGETS); ValueError naming the tower or option
    that none holds, and listing the exportable combinations."""
    text = _text_kind(model)
    vis = model.visual
    if isinstance(vis, VisionTransformer):
        h = vis.hparams()
        if h.get("distill_token"):
            raise _refuse(
                f"image tower {model.image_tower!r} has distill_token=True (it pools the cls and distillation "
                "tokens; transformers' towers pool the cls token)"
            )
        if h["global_pool"] == "avg":
            raise _refuse(
                f"image tower {model.image_tower!r} has global_pool='avg' (transformers' ViTs pool a token)"
            )
        if h["pre_norm"] and h["class_token"] and h["global_pool"] == "token":
            target = "CLIPModel"
        elif not h["class_token"] and h["global_pool"] == "map" and not h["pre_norm"]:
            target = "SiglipModel"
        elif h["class_token"] and h["global_pool"] == "token" and not h["pre_norm"] and h["act"] == "gelu":
            target = "VisionTextDualEncoderModel"
        else:
            opts = ", ".join(f"{k}={h[k]!r}" for k in ("pre_norm", "class_token", "global_pool", "act"))
            raise _refuse(f"image tower {model.image_tower!r} is a ViT with {opts}")
    elif type(vis) in DUAL_IMAGE_TOWERS:
        target = "VisionTextDualEncoderModel"
    else:
        raise _refuse(
            f"image tower {model.image_tower!r} ({type(vis).__name__}) has no transformers twin here"
        )
    want = "siglip" if target == "SiglipModel" else "clip"
    if text != want:
        raise _refuse(
            f"{target} (the target of image tower {model.image_tower!r}) needs {TEXT_KINDS[want]}; text tower "
            f"{model.text_tower!r} is {TEXT_KINDS[text]}"
        )
    if target == "SiglipModel":
        if model.image_proj_kind != "none":
            raise _refuse(
                "image_proj='linear' with a MAP-pooled ViT (SiglipModel's embedding is the MAP output)"
            )
        return target
    if model.logit_bias is not None:
        raise _refuse(f"logit_bias: only SiglipModel holds one, and {target} is the target of these towers")
    if model.text_proj.bias is not None:
        raise _refuse(f"text_proj_bias=True: {target}'s text_projection has no bias")
    return target


# --- configs --------------------------------------------------------------------------------------------


def _act_from_hf(cfg) -> str:
    if cfg.hidden_act not in ACT_FROM_HF:
        reject(cfg, "hidden_act", f"Tessera's towers take {sorted(ACT_FROM_HF)}")
    return ACT_FROM_HF[cfg.hidden_act]


def _vision_common(vit: VisionTransformer) -> dict:
    return dict(
        hidden_size=vit.embed_dim,
        intermediate_size=vit.blocks[0].mlp.fc1.out_features,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=vit.num_heads,
        num_channels=vit.in_chans,
        image_size=vit.patch_embed.img_size,
        patch_size=vit.patch_size,
        hidden_act=ACT_TO_HF[vit.act],
        layer_norm_eps=vit.norm_eps,
        attention_dropout=0.0,
    )


def _text_common(text: TextTransformer, ids: dict) -> dict:
    return dict(
        vocab_size=text.vocab_size,
        hidden_size=text.embed_dim,
        intermediate_size=text.blocks[0].mlp.fc1.out_features,
        num_hidden_layers=len(text.blocks),
        num_attention_heads=text.num_heads,
        max_position_embeddings=text.max_seq_len,
        hidden_act=ACT_TO_HF[text.act],
        layer_norm_eps=text.norm_eps,
        attention_dropout=0.0,
        **ids,
    )


def _token_ids(model: TwoTower, tokenizer_ids: dict | None) -> dict:
    """The text config's special ids: the model's EOS (where CLIP pools) and padding id, and otherwise those of
    the run's tokenizer (`tokenizer_ids`: bos/eos/pad_token_id; informative where the model does not pool at EOS)."""
    ids = {k: v for k, v in (tokenizer_ids or {}).items() if v is not None}
    if model.eos_token_id is not None:
        ids["eos_token_id"] = model.eos_token_id
    if model.pad_token_id is not None:
        ids["pad_token_id"] = model.pad_token_id
    ids.setdefault("pad_token_id", ids.get("eos_token_id"))
    return {k: ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def exported_logit_scale(model: TwoTower) -> float:
    """The raw logit_scale as Tessera uses it (clamped to [0, ln 100]): transformers takes exp() of it unclamped."""
    return float(model.logit_scale.detach().float().clamp(0.0, LOGIT_SCALE_MAX))


def two_tower_config(model: TwoTower, tokenizer_ids: dict | None = None):
    """The transformers config of `hf_target(model)` (`tokenizer_ids`: see _token_ids)."""
    tf = import_transformers()
    target = hf_target(model)
    e, ids = model.embed_dim, _token_ids(model, tokenizer_ids)
    if target == "CLIPModel":
        return tf.CLIPConfig(
            text_config={**_text_common(model.text, ids), "projection_dim": e},
            vision_config={**_vision_common(model.visual), "projection_dim": e},
            projection_dim=e,
            logit_scale_init_value=exported_logit_scale(model),
            architectures=[target],
        )
    if target == "SiglipModel":
        return tf.SiglipConfig(
            text_config={**_text_common(model.text, ids), "projection_size": e},
            vision_config={**_vision_common(model.visual), "vision_use_head": True},
            architectures=[target],
        )
    tower = plain_tower(model.visual)
    vision = adapter_for_model(tower).hf_config(tower)
    if isinstance(tower, VisionTransformer):
        vision.pooler_act = "linear"  # the identity pooler (models/vit_hf.py vit_to_hf)
    if not hasattr(vision, "hidden_size"):  # ConvNextConfig has only hidden_sizes; the dual encoder reads it
        vision.hidden_size = tower.num_features  # (an extra config.json field, kept on load)
    text = tf.CLIPTextConfig(**_text_common(model.text, ids), projection_dim=e)
    cfg = tf.VisionTextDualEncoderConfig.from_vision_text_configs(
        vision, text, projection_dim=e, logit_scale_init_value=exported_logit_scale(model)
    )
    cfg.architectures = [target]
    return cfg


# --- Tessera -> HF ---------------------------------------------------------------------------------------


def _blocks_to_hf(sd: dict, depth: int, dim: int, dst: str) -> dict:
    out = {}
    for i in range(depth):
        a, b = f"blocks.{i}.", f"{dst}encoder.layers.{i}."
        for t, h in BLOCK_KEYS:
            for w in ("weight", "bias"):
                out[f"{b}{h}.{w}"] = sd[f"{a}{t}.{w}"]
        for h, part in zip(QKV_HF, sd[f"{a}attn.qkv.weight"].chunk(3, dim=0)):
            out[f"{b}{h}.weight"] = part
        bias = sd.get(f"{a}attn.qkv.bias", torch.zeros(3 * dim))  # qkv_bias=False: zero biases, the same
        for h, part in zip(QKV_HF, bias.chunk(3, dim=0)):
            out[f"{b}{h}.bias"] = part
    return out


def _state(module: nn.Module) -> dict:
    return {k: v.detach().float().cpu() for k, v in module.state_dict().items()}


def vision_to_hf(vit: VisionTransformer, target: str, dst: str = "vision_model.") -> dict:
    """A CLIP / SigLIP ViT tower in CLIPVisionTransformer / SiglipVisionTransformer keys under `dst`."""
    check_all_tokens(vit, target)
    sd = _state(vit)
    pos = vit.pos_embed.detach().float().cpu()[0].clone()  # (P + L, D); a sincos buffer is exported by value
    bias = sd.get("patch_embed.proj.bias")
    out = {f"{dst}embeddings.patch_embedding.weight": sd["patch_embed.proj.weight"]}
    if target == "CLIPModel":
        if bias is not None:  # added to every patch token: exactly a shift of the patch rows of the table
            pos[1:] += bias
        out[f"{dst}embeddings.class_embedding"] = sd["cls_token"].reshape(-1)
        out.update({f"{dst}pre_layrnorm.{w}": sd[f"norm_pre.{w}"] for w in ("weight", "bias")})
    else:
        out[f"{dst}embeddings.patch_embedding.bias"] = (
            bias if bias is not None else torch.zeros(vit.embed_dim)
        )
        out.update({f"{dst}head.{k}": sd[f"attn_pool.{k}"] for k in MAP_KEYS})
    out[f"{dst}embeddings.position_embedding.weight"] = pos
    out.update({f"{dst}post_layernorm.{w}": sd[f"norm.{w}"] for w in ("weight", "bias")})
    out.update(_blocks_to_hf(sd, len(vit.blocks), vit.embed_dim, dst))
    return out


def text_to_hf(text: TextTransformer, dst: str) -> dict:
    """A TextTransformer in CLIPTextTransformer / SiglipTextTransformer keys under `dst`."""
    sd = _state(text)
    out = {f"{dst}{h}": sd[t] for t, h in TEXT_KEYS}
    out.update(_blocks_to_hf(sd, len(text.blocks), text.embed_dim, dst))
    return out


def plain_tower(tower: nn.Module) -> nn.Module:
    """The image tower as its HF *Model holds it: without a classifier head or a mask token (neither reaches the
    pooled features), other weights shared by value. Unchanged when it has neither."""
    h = tower.hparams()
    drop = {k: v for k, v in (("num_classes", 0), ("mask_token", False)) if h.get(k)}
    if not drop:
        return tower
    plain = type(tower)(**{**h, **drop})
    keep = plain.state_dict()
    sd = {k: v for k, v in tower.state_dict().items() if k in keep}
    return load_strict(plain, sd, f"{type(tower).__name__} without head / mask token")


def _projection(model: TwoTower) -> torch.Tensor:
    """image_proj's weight (E, D); the identity for image_proj='none'."""
    if isinstance(model.image_proj, nn.Linear):
        return model.image_proj.weight.detach().float().cpu()
    return torch.eye(model.embed_dim)


def state_to_hf(model: TwoTower, target: str) -> tuple[dict, Any]:
    """(HF state dict, the dual encoder's vision *Model or None) of `model` for `target`."""
    scale = torch.tensor(exported_logit_scale(model))
    if target == "SiglipModel":
        out = vision_to_hf(model.visual, target)
        out.update(text_to_hf(model.text, "text_model."))
        head = _state(model.text_proj)
        out["text_model.head.weight"] = head["weight"]
        out["text_model.head.bias"] = head.get("bias", torch.zeros(model.embed_dim))
        bias = model.logit_bias.detach().float().cpu() if model.logit_bias is not None else torch.tensor(0.0)
        out["logit_scale"], out["logit_bias"] = scale.reshape(1), bias.reshape(1)
        return out, None
    if target == "CLIPModel":
        out, vision = vision_to_hf(model.visual, target), None
        out.update(text_to_hf(model.text, "text_model."))
    else:
        tower = plain_tower(model.visual)
        vision = adapter_for_model(tower).to_hf(tower)
        out = {f"vision_model.{k}": v.detach().float().cpu() for k, v in vision.state_dict().items()}
        out.update(text_to_hf(model.text, "text_model.text_model."))
    out["visual_projection.weight"] = _projection(model)
    out["text_projection.weight"] = _state(model.text_proj)["weight"]
    out["logit_scale"] = scale
    return out, vision


def two_tower_to_hf(model: TwoTower, tokenizer_ids: dict | None = None) -> nn.Module:
    """The transformers model (CLIPModel, SiglipModel or VisionTextDualEncoderModel: `hf_target`) holding the
    two-tower model's weights, loaded strictly; eval(). `tokenizer_ids` (the run's tokenizer's bos/eos/
    pad_token_id) go to the text config where the model has none."""
    tf = import_transformers()
    target = hf_target(model)
    cfg = two_tower_config(model, tokenizer_ids)
    sd, vision = state_to_hf(model, target)
    if target == "VisionTextDualEncoderModel":  # the adapter's vision model: what AutoModel builds on load
        hf = tf.VisionTextDualEncoderModel(cfg, vision_model=vision)
    else:
        hf = getattr(tf, target)(cfg)
    sd = {k: v.contiguous() for k, v in sd.items()}
    return load_strict(hf, sd, f"two_tower_to_hf ({target})")


# --- HF -> Tessera ---------------------------------------------------------------------------------------


def _blocks_from_hf(hf: dict, depth: int, src: str) -> dict:
    out = {}
    for i in range(depth):
        a, b = f"{src}encoder.layers.{i}.", f"blocks.{i}."
        for t, h in BLOCK_KEYS:
            for w in ("weight", "bias"):
                out[f"{b}{t}.{w}"] = hf[f"{a}{h}.{w}"]
        for w in ("weight", "bias"):
            out[f"{b}attn.qkv.{w}"] = torch.cat([hf[f"{a}{h}.{w}"] for h in QKV_HF], dim=0)
    return out


def _size_name(cls: type, prefer: str = "") -> str:
    """A registered size of `cls` to name a tower by (its kwargs set the whole architecture: the name only labels
    it): the first `*_test*` size starting with `prefer`, else the first size starting with it, else the first."""
    names = [n for n in MODELS.names() if MODELS.get(n).builds is cls]
    if not names:
        raise ValueError(f"no registered model builds {cls.__name__}")
    ranked = sorted(names, key=lambda n: (not n.startswith(prefer), "_test" not in n, n))
    return ranked[0]


def _vision_kwargs(cfg, target: str) -> dict:
    """VisionTransformer arguments (without img_size / in_chans) of a CLIPVisionConfig / SiglipVisionConfig."""
    img, patch = square(cfg, "image_size", "ViT"), square(cfg, "patch_size", "ViT")
    if img % patch:
        reject(cfg, "image_size", f"Tessera's ViT needs it divisible by patch_size {patch}")
    kw = dict(
        patch_size=patch,
        embed_dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        qkv_bias=True,
        norm_eps=float(cfg.layer_norm_eps),
        act=_act_from_hf(cfg),
    )
    if target == "CLIPModel":
        return {**kw, "pre_norm": True, "class_token": True, "global_pool": "token", "patch_bias": False}
    if not getattr(cfg, "vision_use_head", True):
        reject(cfg, "vision_use_head", "without its MAP head SiglipModel has no image embedding")
    return {**kw, "pre_norm": False, "class_token": False, "global_pool": "map", "patch_bias": True}


def _text_kwargs(cfg, causal: bool) -> dict:
    return dict(
        embed_dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        causal=causal,
        act=_act_from_hf(cfg),
        norm_eps=float(cfg.layer_norm_eps),
    )


def _vision_from_hf(hf: dict, target: str) -> dict:
    """The ViT tower's state dict from CLIP / SigLIP vision keys (under vision_model.)."""
    src = "vision_model."
    sd = {"patch_embed.proj.weight": hf[f"{src}embeddings.patch_embedding.weight"]}
    pos = hf[f"{src}embeddings.position_embedding.weight"]
    sd["pos_embed"] = pos.unsqueeze(0)  # (1, P + L, D)
    if target == "CLIPModel":
        sd["cls_token"] = hf[f"{src}embeddings.class_embedding"].reshape(1, 1, -1)
        sd.update({f"norm_pre.{w}": hf[f"{src}pre_layrnorm.{w}"] for w in ("weight", "bias")})
    else:
        sd["patch_embed.proj.bias"] = hf[f"{src}embeddings.patch_embedding.bias"]
        sd.update({f"attn_pool.{k}": hf[f"{src}head.{k}"] for k in MAP_KEYS})
    sd.update({f"norm.{w}": hf[f"{src}post_layernorm.{w}"] for w in ("weight", "bias")})
    depth = len({k.split(".")[3] for k in hf if k.startswith(f"{src}encoder.layers.")})
    sd.update(_blocks_from_hf(hf, depth, src))
    return sd


def _text_from_hf(hf: dict, src: str, depth: int) -> dict:
    sd = {t: hf[f"{src}{h}"] for t, h in TEXT_KEYS}
    sd.update(_blocks_from_hf(hf, depth, src))
    return sd


def _check_clip_text(cfg) -> None:
    if cfg.model_type != "clip_text_model":
        reject(cfg, "model_type", "Tessera imports a dual encoder's text tower from a CLIPTextModel only")
    if cfg.eos_token_id is None or cfg.eos_token_id == LEGACY_EOS:
        why = "then pools at argmax(input_ids)" if cfg.eos_token_id == LEGACY_EOS else "pools at the EOS id"
        reject(cfg, "eos_token_id", f"CLIPTextModel {why}; Tessera pools at the first EOS of a given id")


def _logit_scale(hf: dict) -> torch.Tensor:
    v = hf["logit_scale"].reshape(1)  # Tessera keeps (1,): DeepSpeed cannot partition 0-d parameters
    if not 0.0 <= float(v) <= LOGIT_SCALE_MAX:
        warnings.warn(
            f"logit_scale {float(v):.4f} is outside [0, ln 100]: Tessera clamps it there (transformers does not), "
            "so the imported model's logits differ by that scale",
            stacklevel=3,
        )
    return v.clone()


def _pad_id(cfg, vocab_size: int) -> int | None:
    pad = getattr(cfg, "pad_token_id", None)
    return pad if pad is not None and 0 <= pad < vocab_size else None


def two_tower_from_hf(hf: dict[str, torch.Tensor], config) -> TwoTower:
    """A TwoTower from a CLIPModel / SiglipModel / VisionTextDualEncoderModel state dict and config (written by
    `two_tower_to_hf` or by transformers itself); eval()."""
    kind = config.model_type
    if kind not in MODEL_TYPES:
        raise ValueError(f"{type(config).__name__}: model_type {kind!r} is none of {TARGETS}")
    target = TARGETS[MODEL_TYPES.index(kind)]
    tcfg, vcfg, siglip = config.text_config, config.vision_config, kind == "siglip"
    if not siglip:
        _check_clip_text(tcfg)
    e = tcfg.projection_size if siglip else config.projection_dim
    kw = dict(  # the text tower, the embedding, the logit scale
        text_tower=_size_name(TextTransformer, "siglip_text" if siglip else "clip_text"),
        text_kwargs=_text_kwargs(tcfg, causal=not siglip),
        embed_dim=e,
        vocab_size=tcfg.vocab_size,
        context_length=tcfg.max_position_embeddings,
        eos_token_id=None if siglip else tcfg.eos_token_id,
        pad_token_id=_pad_id(tcfg, tcfg.vocab_size),
    )
    text_src = "text_model.text_model." if target == "VisionTextDualEncoderModel" else "text_model."
    sd = {f"text.{k}": v for k, v in _text_from_hf(hf, text_src, tcfg.num_hidden_layers).items()}
    sd["logit_scale"] = _logit_scale(hf)
    if target == "VisionTextDualEncoderModel":
        tower = _dual_vision_from_hf(hf, vcfg)
        h = tower.hparams()
        kw.update(img_size=h.pop("img_size"), in_chans=h.pop("in_chans"), image_kwargs=h)
        kw["image_tower"] = _size_name(type(tower))
        visual = tower.state_dict()
    else:
        kw.update(img_size=square(vcfg, "image_size", "ViT"), in_chans=vcfg.num_channels)
        kw.update(
            image_tower=_size_name(VisionTransformer, "vit_"), image_kwargs=_vision_kwargs(vcfg, target)
        )
        visual = _vision_from_hf(hf, target)
    sd.update({f"visual.{k}": v for k, v in visual.items()})
    if (
        siglip
    ):  # the MAP output is the image embedding; the text head (with its bias) projects; the logit bias
        if e != vcfg.hidden_size:
            reject(
                tcfg, "projection_size", f"SiglipModel compares it with the image width {vcfg.hidden_size}"
            )
        bias = hf["logit_bias"].reshape(1).clone()
        kw.update(image_proj="none", text_proj_bias=True, init_logit_bias=float(bias))
        sd.update({f"text_proj.{w}": hf[f"text_model.head.{w}"] for w in ("weight", "bias")}, logit_bias=bias)
    else:
        sd["image_proj.weight"] = hf["visual_projection.weight"]
        sd["text_proj.weight"] = hf["text_projection.weight"]
    return load_strict(TwoTower(**kw), sd, f"two_tower_from_hf ({type(config).__name__})")


def _dual_vision_from_hf(hf: dict, vcfg) -> nn.Module:
    """The dual encoder's image tower through its family's adapter; its pooler_output must be Tessera's pooled
    features (a ViT's pooler the identity with pooler_act 'linear')."""
    arch = DUAL_IMPORT_ARCHS.get(vcfg.model_type)
    if arch is None:
        reject(
            vcfg, "model_type", f"Tessera imports a dual encoder's image tower of {sorted(DUAL_IMPORT_ARCHS)}"
        )
    sub = {k[len("vision_model.") :]: v for k, v in hf.items() if k.startswith("vision_model.")}
    if arch == "ViTModel":
        w, b = sub.get("pooler.dense.weight"), sub.get("pooler.dense.bias")
        identity = (
            w is not None and w.shape[0] == w.shape[1] and torch.equal(w, torch.eye(len(w), dtype=w.dtype))
        )
        if not (identity and not b.any() and getattr(vcfg, "pooler_act", None) == "linear"):
            reject(
                vcfg,
                "pooler_act",
                "the dual encoder embeds ViTModel's pooler_output; Tessera's ViT pools the final-norm cls token "
                "itself (an identity pooler with pooler_act 'linear'), and this pooler is another function",
            )
        sub = {k: v for k, v in sub.items() if not k.startswith("pooler.")}
    return adapter_for_arch(arch).from_hf(sub, vcfg)


# --- outputs ---------------------------------------------------------------------------------------------


@torch.no_grad()
def hf_embeddings(
    hf: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask=None
) -> dict:
    """An exported model's L2-normalized image_embeds (B, E), text_embeds (B', E) and logits_per_image (B, B'),
    computed from its towers and projections exactly as its forward does (which 4.57's dual encoder cannot run
    with a CLIPTextModel: see the module docstring)."""
    vision = hf.vision_model(pixel_values=pixel_values).pooler_output  # (B, D)
    text = hf.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output  # (B', D' or E)
    if hasattr(hf, "visual_projection"):
        vision, text = hf.visual_projection(vision), hf.text_projection(text)
    image_embeds = vision / vision.norm(dim=-1, keepdim=True)
    text_embeds = text / text.norm(dim=-1, keepdim=True)
    logits = image_embeds @ text_embeds.t() * hf.logit_scale.exp()  # (B, B')
    if getattr(hf, "logit_bias", None) is not None:
        logits = logits + hf.logit_bias
    return {"image_embeds": image_embeds, "text_embeds": text_embeds, "logits_per_image": logits}


@torch.no_grad()
def tessera_embeddings(
    model: TwoTower, images: torch.Tensor, input_ids: torch.Tensor, attention_mask=None
) -> dict:
    """Tessera's twin of `hf_embeddings`: the normalized embeddings and scale * similarity (+ bias)."""
    image_embeds = model.encode_image(images)
    text_embeds = model.encode_text(input_ids, attention_mask)
    scale, bias = model.scale_and_bias()
    logits = scale * image_embeds @ text_embeds.t()
    if bias is not None:
        logits = logits + bias
    return {"image_embeds": image_embeds, "text_embeds": text_embeds, "logits_per_image": logits}


def is_two_tower_config(config) -> bool:
    """Whether a transformers config is one `two_tower_from_hf` imports (by model_type: any architecture name)."""
    return getattr(config, "model_type", None) in MODEL_TYPES
