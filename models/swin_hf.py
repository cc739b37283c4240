"""Hugging Face twin of the Swin Transformer (SwinModel / SwinForImageClassification): key map and conversion.

Tessera                                    transformers (SwinModel keys; the classifier prefixes them with "swin.")
patch_embed.proj.{w,b}                     embeddings.patch_embeddings.projection.{w,b}
patch_embed.norm                           embeddings.norm
mask_token (1, 1, 1, C)                    embeddings.mask_token (1, 1, C)   (SwinModel(..., use_mask_token=True))
stages.i.blocks.j.norm1                    encoder.layers.i.blocks.j.layernorm_before
stages.i.blocks.j.attn.qkv (fused)         encoder.layers.i.blocks.j.attention.self.{query,key,value} (split dim 0)
stages.i.blocks.j.attn.relative_position_bias_table
                                           encoder.layers.i.blocks.j.attention.self.relative_position_bias_table
(derived buffer, not saved)                encoder.layers.i.blocks.j.attention.self.relative_position_index
stages.i.blocks.j.attn.proj                encoder.layers.i.blocks.j.attention.output.dense
stages.i.blocks.j.norm2                    encoder.layers.i.blocks.j.layernorm_after
stages.i.blocks.j.mlp.fc1 / fc2            encoder.layers.i.blocks.j.intermediate.dense / output.dense
stages.{i+1}.downsample.{norm,reduction}   encoder.layers.i.downsample.{norm,reduction}  (HF merges at a stage's end)
norm                                       layernorm
head                                       classifier (SwinForImageClassification)
SimMIM decoder 0.{weight,bias}             decoder.0.{weight,bias} (SwinForMaskedImageModeling; encoder under "swin.")

Outputs: last_hidden_state = forward_features; pooler_output = forward_head(pre_logits=True); stage i of
forward_intermediates = encoder(..., output_hidden_states=True, output_hidden_states_before_downsampling=True)
.reshaped_hidden_states[i + 1] (index 0 is the patch embedding; SwinModel.forward never sets that flag, and its
own hidden_states[i + 1] are taken after layers.i.downsample, i.e. the input of stage i + 1, not stage i's output).

transformers quirks (4.x): SwinLayer.set_shift_and_window_size overwrites the layer's window/shift the first time
a map is <= the window and never restores them, so one SwinModel called at two sizes can differ from a fresh one;
`swin_hf_outputs` restores them before each call. A map smaller than the window (min(H, W) < M at some stage,
e.g. 64 px with window 4, or below 224 px with window 7) makes SwinModel fail (the bias is built for M x M
windows); Tessera runs it (models/swin.py). HF applies stochastic depth to the attention branch only; Tessera, as
the paper, to both (training only: outputs in eval are the same). Classification export drops `mask_token`
(SwinForImageClassification has none).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.hf import HFAdapter, backbone_state, load_strict, register_hf, swin_stages
from models.hf_config import check_drop_path, check_gelu, nominal_size, reject, square
from models.simmim import decoder_to_hf, split_mim_state
from models.swin import SwinTransformer
from ops.compat import import_transformers

# (tessera suffix inside a block, hf suffix inside a block); "attn.qkv" is split into three
BLOCK_KEYS = [
    ("norm1", "layernorm_before"),
    ("attn.proj", "attention.output.dense"),
    ("norm2", "layernorm_after"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
]
QKV_HF = ("attention.self.query", "attention.self.key", "attention.self.value")
TABLE = "attn.relative_position_bias_table", "attention.self.relative_position_bias_table"
STEM_KEYS = [
    ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
    ("patch_embed.norm.weight", "embeddings.norm.weight"),
    ("patch_embed.norm.bias", "embeddings.norm.bias"),
    ("norm.weight", "layernorm.weight"),
    ("norm.bias", "layernorm.bias"),
]
MERGE_KEYS = ("norm.weight", "norm.bias", "reduction.weight")


def _pairs(depths: list[int]) -> list[tuple[str, str]]:
    """(tessera key, hf key) for every 1:1 weight (everything but qkv and the mask token)."""
    pairs = list(STEM_KEYS)
    for i, depth in enumerate(depths):
        for j in range(depth):
            a, b = f"stages.{i}.blocks.{j}.", f"encoder.layers.{i}.blocks.{j}."
            pairs += [(a + TABLE[0], b + TABLE[1])]
            pairs += [(f"{a}{t}.{w}", f"{b}{h}.{w}") for t, h in BLOCK_KEYS for w in ("weight", "bias")]
        if i > 0:
            pairs += [
                (f"stages.{i}.downsample.{k}", f"encoder.layers.{i - 1}.downsample.{k}") for k in MERGE_KEYS
            ]
    return pairs


def swin_config(model: SwinTransformer):
    n_cls = model.head.out_features if isinstance(model.head, nn.Linear) else 0
    cfg = import_transformers().SwinConfig(
        image_size=model.img_size,
        patch_size=model.patch_size,
        num_channels=model.in_chans,
        embed_dim=model.embed_dim,
        depths=list(model.depths),
        num_heads=list(model.num_heads),
        window_size=model.window_size,
        mlp_ratio=model.mlp_ratio,
        qkv_bias=model.qkv_bias,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=model.drop_path_rate,
        use_absolute_embeddings=False,
        layer_norm_eps=model.norm_eps,
    )
    if n_cls:
        cfg.num_labels = n_cls
    return cfg


def encoder_to_hf(
    model: SwinTransformer, prefix: str = "", mask_token: bool = True
) -> dict[str, torch.Tensor]:
    """SwinModel-layout state dict (keys prefixed with `prefix`, e.g. 'swin.')."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {h: sd[t] for t, h in _pairs(model.depths)}
    for i, depth in enumerate(model.depths):
        for j in range(depth):
            a, b = f"stages.{i}.blocks.{j}.attn.", f"encoder.layers.{i}.blocks.{j}."
            for w in ("weight", "bias") if model.qkv_bias else ("weight",):
                for h, part in zip(QKV_HF, sd[f"{a}qkv.{w}"].chunk(3, dim=0)):
                    out[f"{b}{h}.{w}"] = part
            index = model.stages[i].blocks[j].attn.relative_position_index
            out[f"{b}attention.self.relative_position_index"] = index.cpu().clone()
    if mask_token and model.mask_token is not None:
        out["embeddings.mask_token"] = sd["mask_token"].view(1, 1, -1)
    return {prefix + k: v.contiguous() for k, v in out.items()}


def swin_to_hf(model: SwinTransformer):
    """SwinModel (with its mask token when the model has one), or SwinForImageClassification with a head;
    Tessera's weights loaded strictly."""
    tf = import_transformers()
    cfg = swin_config(model)
    if isinstance(model.head, nn.Linear):
        hf = tf.SwinForImageClassification(cfg)
        sd = encoder_to_hf(model, "swin.", mask_token=False)
        sd["classifier.weight"], sd["classifier.bias"] = model.head.weight.detach(), model.head.bias.detach()
    else:
        hf = tf.SwinModel(cfg, use_mask_token=model.mask_token is not None)
        sd = encoder_to_hf(model)
    return load_strict(hf, sd, "swin_to_hf")


def swin_mim_to_hf(model: SwinTransformer, decoder: nn.Module, encoder_stride: int):
    """SwinForMaskedImageModeling holding a SimMIM run's backbone and decoder (models/simmim.py), eval().
    image_size = the model's img_size (the training size: transformers' loss reshapes the mask by it);
    a backbone trained without a mask token (zeros at masked positions) exports a zero one, which is the same."""
    tf = import_transformers()
    cfg = swin_config(model)
    cfg.encoder_stride = encoder_stride
    sd = encoder_to_hf(model, "swin.")
    if model.mask_token is None:
        sd["swin.embeddings.mask_token"] = torch.zeros(1, 1, model.embed_dim)
    sd.update(decoder_to_hf(decoder))
    return load_strict(tf.SwinForMaskedImageModeling(cfg), sd, "swin_mim_to_hf")


def swin_mim_from_hf(sd: dict[str, torch.Tensor], cfg) -> tuple[SwinTransformer, dict[str, torch.Tensor]]:
    """A SwinForMaskedImageModeling state dict -> (SwinTransformer with its mask token, the decoder's state
    dict `0.weight`, `0.bias`)."""
    enc, dec = split_mim_state(sd, "swin.", "swin_mim_from_hf")
    return swin_from_hf(enc, cfg), dec


def swin_kwargs_from_hf(cfg) -> dict:
    """SwinTransformer arguments of a SwinConfig, reading what SwinModel reads; ValueError naming the field
    Tessera's Swin cannot represent. transformers reads num_heads[i] for the len(depths) stages only (a longer
    list is fine); image_size only sizes the absolute position embedding, so any (height, width) is accepted
    and Tessera keeps the height as its nominal img_size (every input size runs either way). Dropouts
    (training only), encoder_stride (masked image modelling) and out_features / out_indices (SwinBackbone)
    change no output of the imported model."""
    check_gelu(cfg, "Swin")
    if cfg.use_absolute_embeddings:
        reject(
            cfg,
            "use_absolute_embeddings",
            "Tessera's Swin has no absolute position embedding (the paper's models use only the relative bias)",
        )
    n = len(cfg.depths)
    if not n:
        reject(cfg, "depths", "needs at least one stage")
    if len(cfg.num_heads) < n:
        reject(cfg, "num_heads", f"needs an entry for each of the {n} stages of depths {list(cfg.depths)}")
    size = nominal_size(cfg)
    drop_path_rate = check_drop_path(cfg)
    return dict(
        img_size=int(size),
        patch_size=square(cfg, "patch_size", "Swin"),
        in_chans=cfg.num_channels,
        embed_dim=cfg.embed_dim,
        depths=[int(d) for d in cfg.depths],
        num_heads=[int(h) for h in cfg.num_heads[:n]],
        window_size=square(cfg, "window_size", "Swin"),
        mlp_ratio=float(cfg.mlp_ratio),
        qkv_bias=bool(cfg.qkv_bias),
        drop_path_rate=drop_path_rate,
        norm_eps=float(cfg.layer_norm_eps),
    )


def swin_from_hf(sd: dict[str, torch.Tensor], cfg) -> SwinTransformer:
    """A SwinModel / SwinForImageClassification state dict (base keys optionally under 'swin.') -> Tessera."""
    kw = swin_kwargs_from_hf(cfg)
    hf = backbone_state(sd, "swin.")
    head = (sd["classifier.weight"], sd["classifier.bias"]) if "classifier.weight" in sd else None
    model = SwinTransformer(
        **kw, num_classes=0 if head is None else head[0].shape[0], mask_token="embeddings.mask_token" in hf
    )
    out = {t: hf[h] for t, h in _pairs(model.depths)}
    for i, depth in enumerate(model.depths):
        for j in range(depth):
            a, b = f"stages.{i}.blocks.{j}.attn.", f"encoder.layers.{i}.blocks.{j}."
            for w in ("weight", "bias") if model.qkv_bias else ("weight",):
                out[f"{a}qkv.{w}"] = torch.cat([hf[f"{b}{h}.{w}"] for h in QKV_HF], dim=0)
    if model.mask_token is not None:
        out["mask_token"] = hf["embeddings.mask_token"].view(1, 1, 1, -1)
    if head is not None:
        out["head.weight"], out["head.bias"] = head
    return load_strict(model, out, "swin_from_hf")


def _stage_sizes(cfg, H: int, W: int) -> list[tuple[int, int]]:
    p = square(cfg, "patch_size", "Swin")
    h, w = -(-H // p), -(-W // p)
    sizes = []
    for _ in cfg.depths:
        sizes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return sizes


def swin_hf_outputs(hf, x: torch.Tensor) -> dict:
    """A SwinModel / SwinForImageClassification's outputs in Tessera's layouts (see models/hf.py)."""
    base = getattr(hf, "swin", hf)
    ws = square(base.config, "window_size", "Swin")
    small = [s for s in _stage_sizes(base.config, *x.shape[-2:]) if min(s) < ws]
    if small:
        raise ValueError(
            f"transformers' SwinModel cannot run {tuple(x.shape[-2:])} px: stage maps {small} are "
            f"smaller than the window {ws}"
        )
    # undo what set_shift_and_window_size left from earlier calls at other sizes (see the module docstring)
    for layer in base.encoder.layers:
        for j, blk in enumerate(layer.blocks):
            blk.window_size, blk.shift_size = ws, 0 if j % 2 == 0 else ws // 2
    out = base(pixel_values=x)
    pooled = out.last_hidden_state.mean(dim=1) if out.pooler_output is None else out.pooler_output
    res = {"features": out.last_hidden_state, "pooled": pooled}
    if base is not hf:
        res["logits"] = hf(pixel_values=x).logits
    res["stages"] = swin_stages(base, x)
    return res


register_hf(
    "swin",
    HFAdapter(
        model_cls=SwinTransformer,
        archs=("SwinModel", "SwinForImageClassification"),
        hf_config=swin_config,
        to_hf=swin_to_hf,
        from_hf=swin_from_hf,
        hf_outputs=swin_hf_outputs,
    ),
)
