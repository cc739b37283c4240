"""Hugging Face twin of the ViT encoder and MAE decoder: the key map and both directions of conversion.

Tessera                         transformers (ViTModel keys; ViTMAEForPreTraining prefixes them with "vit.")
cls_token                       embeddings.cls_token
pos_embed (buffer if sincos)    embeddings.position_embeddings
patch_embed.proj.{w,b}          embeddings.patch_embeddings.projection.{w,b}
blocks.i.norm1                  encoder.layer.i.layernorm_before
blocks.i.attn.qkv (fused)       encoder.layer.i.attention.attention.{query,key,value} (split on dim 0)
blocks.i.attn.proj              encoder.layer.i.attention.output.dense
blocks.i.norm2                  encoder.layer.i.layernorm_after
blocks.i.mlp.fc1 / fc2          encoder.layer.i.intermediate.dense / output.dense
mask_token (1, 1, D)            embeddings.mask_token (ViTForMaskedImageModeling, ViTModel(use_mask_token=True))
norm                            layernorm
head                            classifier (ViTForImageClassification)
SimMIM decoder 0.{weight,bias}  decoder.0.{weight,bias} (ViTForMaskedImageModeling; encoder under "vit.",
                                encoder_stride = patch_size, no pooler)
MAE decoder: decoder_embed, mask_token, pos_embed, blocks.i.*, norm, pred ->
             decoder.decoder_embed, decoder.mask_token, decoder.decoder_pos_embed,
             decoder.decoder_layers.i.* (as above), decoder.decoder_norm, decoder.decoder_pred

DeiT (distill_token=True) exports as DeiTModel, or DeiTForImageClassificationWithTeacher (encoder under
"deit.") with a head: the keys above, the position table of 2 + L rows, and
dist_token (1, 1, D)            embeddings.distillation_token
head / head_dist                cls_classifier / distillation_classifier (logits = their mean, as Tessera's)
DeiTModel's pooler reads the cls token alone: exported as the identity (pooler_act "linear", as ViTModel's),
its pooler_output is the final-norm cls token, not Tessera's pooled features (the mean of the cls and
distillation tokens, which no DeiT class outputs). No SimMIM export: DeiTForMaskedImageModeling decodes tokens
[1:-1] (the distillation token and all patches but the last), not Tessera's SimMIM (pretrain/export.py exports
the encoder alone).
"""

from __future__ import annotations

import warnings

import torch

from models.hf import HFAdapter, register_hf
from models.hf_config import check_gelu, reject, square
from models.mae import MAEDecoder
from models.simmim import decoder_to_hf, split_mim_state
from models.vit import VisionTransformer, fixed_pos_embed
from ops.compat import import_transformers

# (tessera suffix inside a block, hf suffix inside a layer); "qkv" is split into three
BLOCK_KEYS = [
    ("norm1", "layernorm_before"),
    ("attn.proj", "attention.output.dense"),
    ("norm2", "layernorm_after"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
]
QKV_HF = ("attention.attention.query", "attention.attention.key", "attention.attention.value")


def _blocks_to_hf(sd: dict, src: str, dst: str, depth: int) -> dict:
    out = {}
    for i in range(depth):
        a, b = f"{src}{i}.", f"{dst}{i}."
        for t, h in BLOCK_KEYS:
            for w in ("weight", "bias"):
                out[f"{b}{h}.{w}"] = sd[f"{a}{t}.{w}"]
        for w in ("weight", "bias") if f"{a}attn.qkv.bias" in sd else ("weight",):  # qkv_bias=False: none
            for h, part in zip(QKV_HF, sd[f"{a}attn.qkv.{w}"].chunk(3, dim=0)):
                out[f"{b}{h}.{w}"] = part
    return out


def _blocks_from_hf(hf: dict, src: str, dst: str, depth: int) -> dict:
    out = {}
    for i in range(depth):
        a, b = f"{src}{i}.", f"{dst}{i}."
        for t, h in BLOCK_KEYS:
            for w in ("weight", "bias"):
                out[f"{b}{t}.{w}"] = hf[f"{a}{h}.{w}"]
        # query/key/value have biases only with config.qkv_bias (the strict load then checks the model agrees)
        for w in ("weight", "bias") if f"{a}{QKV_HF[0]}.bias" in hf else ("weight",):
            out[f"{b}attn.qkv.{w}"] = torch.cat([hf[f"{a}{h}.{w}"] for h in QKV_HF], dim=0)
    return out


def check_all_tokens(vit: VisionTransformer, target: str) -> None:
    """ValueError naming the token-merging / pruning switch (models/token_reduce.py) if `vit` has one on: no
    transformers ViT (ViT, DeiT, CLIP's or SigLIP's vision tower) drops tokens inside its encoder."""
    h = vit.hparams()
    for switch, off in (("tome_r", 0), ("evit_keep_rate", 1.0)):
        if h[switch] != off:
            raise ValueError(
                f"VisionTransformer {switch}={h[switch]!r} has no {target} equivalent: transformers' ViT runs "
                f"every patch token through every block. The weights are a plain ViT's: rebuild the model with "
                f"{switch}={off!r} (model.kwargs) to export it"
            )


def check_vit_exportable(vit: VisionTransformer, target: str = "ViTModel") -> None:
    """ValueError naming the VisionTransformer option transformers' ViT (or, `target` "DeiTModel", DeiT)
    classes cannot express (the CLIP / SigLIP tower options: their exports are CLIPModel / SiglipModel,
    through the two-tower model)."""
    deit = target.startswith("DeiT")
    what = {
        "pre_norm": "transformers' ViT and DeiT have no LayerNorm before the encoder (CLIPModel's "
        "pre_layrnorm has)",
        "class_token": "transformers' ViT always has a cls token (SiglipModel's vision tower has none)",
        "global_pool": "transformers' ViT and DeiT pool the cls token (DeiT's classifier also the "
        "distillation token); 'map' is SiglipModel's attention-pooling head",
        "act": "transformers' ViT and DeiT exports write hidden_act 'gelu' (the exact GELU)",
        "distill_token": "transformers' ViT has no distillation token (a DeiT: DeiTModel, "
        "DeiTForImageClassificationWithTeacher)"
        if not deit
        else "transformers' DeiT always has a distillation token (a plain ViT: ViTModel)",
    }
    check_all_tokens(vit, target)
    h = vit.hparams()
    wanted = dict(pre_norm=False, class_token=True, act="gelu", distill_token=deit)
    for key, default in wanted.items():
        if h[key] != default:
            raise ValueError(f"VisionTransformer {key}={h[key]!r} has no {target} equivalent: {what[key]}")
    if h["global_pool"] == "map" or (deit and h["global_pool"] != "token"):
        pool = h["global_pool"]
        raise ValueError(
            f"VisionTransformer global_pool={pool!r} has no {target} equivalent: {what['global_pool']}"
        )


def encoder_to_hf(
    vit: VisionTransformer, prefix: str = "", target: str = "ViTModel"
) -> dict[str, torch.Tensor]:
    """ViTModel-layout (`target` "DeiTModel": DeiTModel-layout) state dict of the encoder (keys prefixed with
    `prefix`, e.g. 'vit.'). A patch projection without a bias (patch_bias=False) exports a zero one, which is
    the same."""
    check_vit_exportable(vit, target)
    sd = {k: v.detach().float().cpu() for k, v in vit.state_dict().items()}
    sd.setdefault("patch_embed.proj.bias", torch.zeros(vit.embed_dim))
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": vit.pos_embed.detach().float().cpu().clone(),
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
        **_blocks_to_hf(sd, "blocks.", "encoder.layer.", len(vit.blocks)),
    }
    if vit.dist_token is not None:  # (check_vit_exportable: only for a DeiT target)
        out["embeddings.distillation_token"] = sd["dist_token"]
    return {prefix + k: v.contiguous() for k, v in out.items()}


def encoder_kwargs_from_hf(cfg) -> dict:
    """VisionTransformer arguments of a ViTConfig / ViTMAEConfig / DeiTConfig, reading what transformers' ViT
    reads; ValueError naming the field Tessera's ViT cannot represent. Dropouts (training only) and the fields
    of other heads (encoder_stride: masked image modelling; a pooler) change no output of the imported model
    and are not read."""
    check_gelu(cfg, "ViT")
    img, patch = square(cfg, "image_size", "ViT"), square(cfg, "patch_size", "ViT")
    if img % patch:
        # transformers then drops the last image_size % patch_size rows and columns (and still wants inputs of
        # exactly image_size); Tessera's ViT takes only a whole number of patches
        reject(cfg, "image_size", f"Tessera's ViT needs it divisible by patch_size {patch}")
    return dict(
        img_size=img,
        patch_size=patch,
        in_chans=cfg.num_channels,
        embed_dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        # any intermediate_size, a multiple of hidden_size or not: Block's round(dim * mlp_ratio) gives it back
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        qkv_bias=bool(cfg.qkv_bias),
        norm_eps=float(cfg.layer_norm_eps),
    )


def encoder_from_hf(
    hf: dict,
    cfg,
    prefix: str = "",
    head: tuple | None = None,
    mask_token: bool = False,
    head_dist: tuple | None = None,
) -> VisionTransformer:
    """Build a VisionTransformer from a ViTModel/ViTMAE/DeiTModel config and state dict (keys under `prefix`;
    a DeiT's embeddings.distillation_token gives distill_token=True), with an optional classifier `head`
    (weight, bias), DeiT's `head_dist` and, with `mask_token`, the folder's embeddings.mask_token."""
    kw = encoder_kwargs_from_hf(cfg)
    hf = {k[len(prefix) :]: v for k, v in hf.items() if k.startswith(prefix)}
    distill = "embeddings.distillation_token" in hf
    pos = hf["embeddings.position_embeddings"]
    grid = kw["img_size"] // kw["patch_size"]
    dim = kw["embed_dim"]
    fixed = torch.equal(pos[0], fixed_pos_embed(dim, grid, 1 + distill)) if dim % 4 == 0 else False
    vit = VisionTransformer(
        **kw,
        pos_embed="sincos" if fixed else "learned",
        num_classes=0 if head is None else head[0].shape[0],
        mask_token=mask_token,
        distill_token=distill,
    )
    sd = {
        "cls_token": hf["embeddings.cls_token"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
        **_blocks_from_hf(hf, "encoder.layer.", "blocks.", kw["depth"]),
    }
    if not fixed:
        sd["pos_embed"] = pos
    if mask_token:
        sd["mask_token"] = hf["embeddings.mask_token"]
    if distill:
        sd["dist_token"] = hf["embeddings.distillation_token"]
    if head is not None:
        sd["head.weight"], sd["head.bias"] = head
    if head_dist is not None:
        sd["head_dist.weight"], sd["head_dist.bias"] = head_dist
    vit.load_state_dict(sd, strict=True)
    return vit


def _common(vit: VisionTransformer, target: str = "ViTModel") -> dict:
    check_vit_exportable(vit, target)
    return dict(
        hidden_size=vit.embed_dim,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=vit.num_heads,
        intermediate_size=vit.blocks[0].mlp.fc1.out_features,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=vit.norm_eps,
        image_size=vit.patch_embed.img_size,
        patch_size=vit.patch_size,
        num_channels=vit.in_chans,
        qkv_bias=vit.qkv_bias,
    )


def vit_config(vit: VisionTransformer):
    """ViTConfig; a DeiT's (distill_token=True) DeiTConfig."""
    if vit.dist_token is not None:
        return deit_config(vit)
    cfg = import_transformers().ViTConfig(**_common(vit))
    n_cls = vit.head.out_features if isinstance(vit.head, torch.nn.Linear) else 0
    if n_cls:
        cfg.num_labels = n_cls
    return cfg


def vit_to_hf(vit: VisionTransformer):
    """(HF model with Tessera's weights loaded strictly): ViTModel, or ViTForImageClassification with a head;
    a DeiT (distill_token=True) as DeiTModel, or DeiTForImageClassificationWithTeacher (deit_to_hf)."""
    if vit.dist_token is not None:
        return deit_to_hf(vit)
    tf = import_transformers()
    ViTForImageClassification, ViTModel = tf.ViTForImageClassification, tf.ViTModel

    n_cls = vit.head.out_features if isinstance(vit.head, torch.nn.Linear) else 0
    cfg = vit_config(vit)
    if n_cls:
        if vit.global_pool != "token":
            raise ValueError(
                "ViTForImageClassification classifies the cls token; this model uses global_pool='avg'"
            )
        model = ViTForImageClassification(cfg)
        sd = encoder_to_hf(vit, "vit.")
        sd["classifier.weight"], sd["classifier.bias"] = vit.head.weight.detach(), vit.head.bias.detach()
    else:
        # ViTModel always builds a pooler (dense + activation on the cls token), so a folder without its weights
        # loads with `pooler.dense.*` newly initialized. An identity dense with a linear activation makes
        # pooler_output the final-norm cls token: Tessera's pooled features (global_pool="token").
        cfg.pooler_act = "linear"
        model = ViTModel(cfg, add_pooling_layer=True)
        sd = encoder_to_hf(vit)
        sd["pooler.dense.weight"] = torch.eye(vit.embed_dim)
        sd["pooler.dense.bias"] = torch.zeros(vit.embed_dim)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def mae_to_hf(vit: VisionTransformer, decoder: MAEDecoder, mask_ratio: float, norm_pix_loss: bool):
    """ViTMAEForPreTraining holding the encoder and decoder weights."""
    tf = import_transformers()
    ViTMAEConfig, ViTMAEForPreTraining = tf.ViTMAEConfig, tf.ViTMAEForPreTraining

    cfg = ViTMAEConfig(
        **_common(vit),
        decoder_hidden_size=decoder.dim,
        decoder_num_hidden_layers=decoder.depth,
        decoder_num_attention_heads=decoder.num_heads,
        decoder_intermediate_size=decoder.blocks[0].mlp.fc1.out_features,
        mask_ratio=mask_ratio,
        norm_pix_loss=norm_pix_loss,
    )
    dsd = {k: v.detach().float().cpu() for k, v in decoder.state_dict().items()}
    sd = encoder_to_hf(vit, "vit.")
    sd.update(
        {
            "decoder.decoder_embed.weight": dsd["decoder_embed.weight"],
            "decoder.decoder_embed.bias": dsd["decoder_embed.bias"],
            "decoder.mask_token": dsd["mask_token"],
            "decoder.decoder_pos_embed": decoder.pos_embed.detach().float().cpu().clone(),
            "decoder.decoder_norm.weight": dsd["norm.weight"],
            "decoder.decoder_norm.bias": dsd["norm.bias"],
            "decoder.decoder_pred.weight": dsd["pred.weight"],
            "decoder.decoder_pred.bias": dsd["pred.bias"],
            **_blocks_to_hf(dsd, "blocks.", "decoder.decoder_layers.", decoder.depth),
        }
    )
    model = ViTMAEForPreTraining(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def vit_mim_to_hf(vit: VisionTransformer, decoder: torch.nn.Module, encoder_stride: int):
    """ViTForMaskedImageModeling holding a SimMIM run's encoder and decoder (models/simmim.py), eval().
    encoder_stride must be patch_size (transformers refuses a mask otherwise); image_size = the training size; a
    ViT trained without a mask token (zeros at masked patches) exports a zero one, which is the same."""
    if encoder_stride != vit.patch_size:
        raise ValueError(
            f"ViTForMaskedImageModeling needs encoder_stride {encoder_stride} = patch_size {vit.patch_size}"
        )
    tf = import_transformers()
    cfg = tf.ViTConfig(**_common(vit), encoder_stride=encoder_stride)
    sd = encoder_to_hf(vit, "vit.")
    token = vit.mask_token if vit.mask_token is not None else torch.zeros(1, 1, vit.embed_dim)
    sd["vit.embeddings.mask_token"] = token.detach().float().cpu().clone()
    sd.update(decoder_to_hf(decoder))
    model = tf.ViTForMaskedImageModeling(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def vit_mim_from_hf(hf: dict, cfg) -> tuple[VisionTransformer, dict[str, torch.Tensor]]:
    """A ViTForMaskedImageModeling state dict -> (VisionTransformer with its mask token, the decoder's state dict
    `0.weight`, `0.bias`)."""
    enc, dec = split_mim_state(hf, "vit.", "vit_mim_from_hf")
    return encoder_from_hf(enc, cfg, prefix="vit.", mask_token=True), dec


def decoder_kwargs_from_hf(cfg) -> dict:
    """MAEDecoder size arguments of a ViTMAE config."""
    return dict(
        dim=cfg.decoder_hidden_size,
        depth=cfg.decoder_num_hidden_layers,
        num_heads=cfg.decoder_num_attention_heads,
        mlp_ratio=cfg.decoder_intermediate_size / cfg.decoder_hidden_size,
    )


def decoder_from_hf(decoder: MAEDecoder, hf: dict) -> MAEDecoder:
    """Load a ViTMAEForPreTraining state dict's decoder weights into `decoder` (built to the same size)."""
    sd = {
        "decoder_embed.weight": hf["decoder.decoder_embed.weight"],
        "decoder_embed.bias": hf["decoder.decoder_embed.bias"],
        "mask_token": hf["decoder.mask_token"],
        "norm.weight": hf["decoder.decoder_norm.weight"],
        "norm.bias": hf["decoder.decoder_norm.bias"],
        "pred.weight": hf["decoder.decoder_pred.weight"],
        "pred.bias": hf["decoder.decoder_pred.bias"],
        **_blocks_from_hf(hf, "decoder.decoder_layers.", "blocks.", decoder.depth),
    }
    decoder.load_state_dict(sd, strict=True)
    if not torch.equal(hf["decoder.decoder_pos_embed"], decoder.pos_embed):
        # transformers' own fresh init zeroes it; keep whatever the folder holds, still frozen
        decoder.register_buffer("pos_embed", hf["decoder.decoder_pos_embed"].clone(), persistent=True)
    return decoder


def deit_config(vit: VisionTransformer):
    """DeiTConfig of a ViT with distill_token=True: num_labels = its classes, the identity pooler (see the
    module docstring)."""
    cfg = import_transformers().DeiTConfig(**_common(vit, "DeiTModel"), pooler_act="linear")
    n_cls = vit.head.out_features if isinstance(vit.head, torch.nn.Linear) else 0
    if n_cls:
        cfg.num_labels = n_cls
    return cfg


def deit_to_hf(vit: VisionTransformer):
    """DeiTForImageClassificationWithTeacher (a ViT with distill_token=True and a head: logits = the mean of
    cls_logits and distillation_logits, = Tessera's model(x)), or DeiTModel without one; weights loaded
    strictly."""
    tf = import_transformers()
    cfg = deit_config(vit)
    if isinstance(vit.head, torch.nn.Linear):
        model = tf.DeiTForImageClassificationWithTeacher(cfg)
        sd = encoder_to_hf(vit, "deit.", target="DeiTModel")
        for dst, src in (("cls_classifier", vit.head), ("distillation_classifier", vit.head_dist)):
            sd[f"{dst}.weight"], sd[f"{dst}.bias"] = src.weight.detach(), src.bias.detach()
    else:
        # DeiTModel builds a pooler by default (AutoModel too): the identity, as ViTModel's (see vit_to_hf)
        model = tf.DeiTModel(cfg, add_pooling_layer=True)
        sd = encoder_to_hf(vit, target="DeiTModel")
        sd["pooler.dense.weight"] = torch.eye(vit.embed_dim)
        sd["pooler.dense.bias"] = torch.zeros(vit.embed_dim)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _check_pooler(hf: dict, cfg) -> None:
    """A ViTModel's (DeiTModel's) pooler (dense + pooler_act on the cls token) is a head Tessera's ViT does
    not have: its pooled features are the final-norm cls token itself. The pooler Tessera exports (identity
    dense, pooler_act 'linear') is exactly that; any other is left out of the import, with a warning (the
    encoder, what an import is for, is whole). (A mask token, use_mask_token=True, is left out too, as
    ViTModel.from_pretrained does by default: it acts only on bool_masked_pos.)"""
    if "pooler.dense.weight" not in hf:
        return
    w, b = hf["pooler.dense.weight"], hf["pooler.dense.bias"]
    identity = w.shape[0] == w.shape[1] and torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype))
    if not (identity and not b.any() and getattr(cfg, "pooler_act", None) == "linear"):
        warnings.warn(
            f"{type(cfg).__name__}.pooler_act={getattr(cfg, 'pooler_act', None)!r}: this model's pooler "
            "(pooler.dense, then the activation) is not imported; Tessera's pooled output is the final-norm cls "
            "token, without it",
            stacklevel=3,
        )


def vit_from_hf(hf: dict, cfg) -> VisionTransformer:
    """The encoder of a ViTModel / ViTForImageClassification / ViTMAEForPreTraining state dict, or of a
    DeiTModel / DeiTForImageClassificationWithTeacher one (a ViT with distill_token=True; its two heads: head,
    head_dist)."""
    prefix = next((p for p in ("vit.", "deit.") if any(k.startswith(p) for k in hf)), "")
    if not prefix:
        _check_pooler(hf, cfg)

    def linear(name: str) -> tuple | None:
        return (hf[f"{name}.weight"], hf[f"{name}.bias"]) if f"{name}.weight" in hf else None

    if cfg.model_type == "deit":
        head, head_dist = linear("cls_classifier"), linear("distillation_classifier")
    else:
        head, head_dist = linear("classifier"), None
    return encoder_from_hf(hf, cfg, prefix=prefix, head=head, head_dist=head_dist)


def vit_hf_outputs(hf, x: torch.Tensor) -> dict:
    """A ViTModel / ViTForImageClassification's (DeiTModel / DeiTForImageClassificationWithTeacher's) outputs
    in Tessera's layouts (see models/hf.py). DeiT: pooled = the mean of the final cls and distillation tokens
    (no DeiT class outputs it: its pooler reads the cls token alone); the classifier's cls_logits and
    distillation_logits too (= Tessera's forward_head_distilled)."""
    base = hf.base_model  # the ViTModel / DeiTModel itself, or the one a classifier holds
    deit = hf.config.model_type == "deit"
    out = base(pixel_values=x, output_hidden_states=True)
    grid = square(hf.config, "image_size", "ViT") // square(
        hf.config, "patch_size", "ViT"
    )  # an int or a square pair
    p = 2 if deit else 1  # prefix tokens: cls (and distillation)
    stages = [h[:, p:].transpose(1, 2).reshape(x.shape[0], -1, grid, grid) for h in out.hidden_states[1:]]
    last = out.last_hidden_state
    if deit:
        pooled = (last[:, 0] + last[:, 1]) / 2
    else:
        pooled = out.pooler_output if out.pooler_output is not None else last[:, 0]
    res = {"features": last, "stages": stages, "pooled": pooled}
    if base is not hf and deit:
        full = hf(pixel_values=x)
        res.update(
            logits=full.logits, cls_logits=full.cls_logits, distillation_logits=full.distillation_logits
        )
    elif base is not hf:
        res["logits"] = hf.classifier(last[:, 0])
    return res


register_hf(
    "vit",
    HFAdapter(
        model_cls=VisionTransformer,
        archs=("ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassificationWithTeacher"),
        hf_config=vit_config,
        to_hf=vit_to_hf,
        from_hf=vit_from_hf,
        hf_outputs=vit_hf_outputs,
    ),
)
