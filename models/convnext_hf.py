"""Hugging Face twins of ConvNeXt and ConvNeXt V2: the key map and both directions of conversion.

Tessera                          transformers (ConvNextModel / ConvNextV2Model keys; the classification models
                                 prefix them with "convnext." / "convnextv2.")
stem.0 (4x4 conv)                embeddings.patch_embeddings
stem.1 (LayerNorm2d)             embeddings.layernorm
stages.i.downsample.0 (i > 0)    encoder.stages.i.downsampling_layer.0        (LayerNorm, channels first)
stages.i.downsample.1 (i > 0)    encoder.stages.i.downsampling_layer.1        (2x2 stride-2 conv)
stages.i.blocks.j.dwconv         encoder.stages.i.layers.j.dwconv
stages.i.blocks.j.norm           encoder.stages.i.layers.j.layernorm
stages.i.blocks.j.pwconv1 / 2    encoder.stages.i.layers.j.pwconv1 / pwconv2
stages.i.blocks.j.gamma (V1)     encoder.stages.i.layers.j.layer_scale_parameter
stages.i.blocks.j.grn.gamma (C)  encoder.stages.i.layers.j.grn.weight (1, 1, 1, C)   (V2)
stages.i.blocks.j.grn.beta (C)   encoder.stages.i.layers.j.grn.bias (1, 1, 1, C)     (V2)
norm (pooled LayerNorm)          layernorm            (eps: head_norm_eps <-> config.layer_norm_eps)
head                             classifier           (XForImageClassification)
mask_token (masked pretraining)  not exported: transformers has no such parameter
Every other LayerNorm uses eps 1e-6 on both sides (hard-coded in transformers). HF's hidden_states[0] is the stem
output and hidden_states[i + 1] stage i's output (its downsampling layer runs first), = forward_intermediates[i].
"""

from __future__ import annotations

import re
from functools import partial

import torch

from models.convnext import ConvNeXt, ConvNeXtV2
from models.hf import HFAdapter, backbone_state, load_strict, register_hf
from models.hf_config import check_drop_path, check_gelu, nominal_size, reject, square
from ops.compat import import_transformers

# (Tessera, HF) name pieces, replaced in this order on whole key prefixes
_RENAMES = [
    (r"^stem\.0\.", "embeddings.patch_embeddings."),
    (r"^stem\.1\.", "embeddings.layernorm."),
    (r"^stages\.(\d+)\.downsample\.", r"encoder.stages.\1.downsampling_layer."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"encoder.stages.\1.layers.\2.layernorm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$", r"encoder.stages.\1.layers.\2.layer_scale_parameter"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.grn\.gamma$", r"encoder.stages.\1.layers.\2.grn.weight"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.grn\.beta$", r"encoder.stages.\1.layers.\2.grn.bias"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"encoder.stages.\1.layers.\2."),
    (r"^norm\.", "layernorm."),
]
_RENAMES_BACK = [
    (r"^embeddings\.patch_embeddings\.", "stem.0."),
    (r"^embeddings\.layernorm\.", "stem.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.blocks.\2.norm."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.blocks.\2.gamma"),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.weight$", r"stages.\1.blocks.\2.grn.gamma"),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.bias$", r"stages.\1.blocks.\2.grn.beta"),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^layernorm\.", "norm."),
]


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise KeyError(f"no key-map entry for {key!r}")


def _is_grn(key: str) -> bool:
    return ".grn." in key


def backbone_to_hf(model: ConvNeXt, prefix: str = "") -> dict[str, torch.Tensor]:
    """ConvNextModel/ConvNextV2Model-layout state dict of the backbone, keys prefixed with `prefix`."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("head.") or k == "mask_token":  # the classifier is mapped by the caller; no HF token
            continue
        v = v.detach().float().cpu()
        out[prefix + _rename(k, _RENAMES)] = v.view(1, 1, 1, -1) if _is_grn(k) else v.contiguous()
    return out


def _config_kwargs(model: ConvNeXt) -> dict:
    n_cls = model.head.out_features if isinstance(model.head, torch.nn.Linear) else 0
    kw = dict(
        num_channels=model.in_chans,
        patch_size=model.patch_size,
        num_stages=len(model.depths),
        hidden_sizes=list(model.dims),
        depths=list(model.depths),
        hidden_act="gelu",
        layer_norm_eps=model.head_norm_eps,
        drop_path_rate=model.drop_path_rate,
        image_size=model.img_size,
    )
    if n_cls:
        kw["num_labels"] = n_cls
    return kw


def convnext_config(model: ConvNeXt):
    if model.use_grn:
        return import_transformers().ConvNextV2Config(**_config_kwargs(model))
    return import_transformers().ConvNextConfig(
        **_config_kwargs(model), layer_scale_init_value=model.layer_scale_init_value
    )


def convnext_to_hf(model: ConvNeXt):
    """XModel, or XForImageClassification with a head (X = ConvNext or ConvNextV2), holding `model`'s weights."""
    tf = import_transformers()
    v2 = model.use_grn
    name, attr = ("ConvNextV2", "convnextv2") if v2 else ("ConvNext", "convnext")
    cfg = convnext_config(model)
    if isinstance(model.head, torch.nn.Linear):
        hf = getattr(tf, f"{name}ForImageClassification")(cfg)
        sd = backbone_to_hf(model, f"{attr}.")
        sd["classifier.weight"], sd["classifier.bias"] = model.head.weight.detach(), model.head.bias.detach()
    else:
        hf = getattr(tf, f"{name}Model")(cfg)
        sd = backbone_to_hf(model)
    return load_strict(hf, sd, f"convnext_to_hf ({type(model).__name__} -> {type(hf).__name__})")


def convnext_kwargs_from_hf(cfg, v2: bool) -> dict:
    """ConvNeXt (V2) arguments of a ConvNextConfig / ConvNextV2Config, reading what transformers' model reads;
    ValueError naming the field Tessera's ConvNeXt cannot represent.

    transformers builds num_stages stages from the first num_stages entries of depths and hidden_sizes (longer
    lists are fine) and sizes its final LayerNorm and classifier by hidden_sizes[-1]. It never reads image_size,
    so any (height, width) is accepted (Tessera keeps the height as its nominal img_size; every input size runs
    either way); a layer_scale_init_value <= 0 means no layer scale (V1; V2 has none). drop_path_rate is
    training only, out_features / out_indices (ConvNextBackbone) change no output."""
    check_gelu(cfg, "ConvNeXt")
    n = cfg.num_stages
    if not 1 <= n <= min(len(cfg.depths), len(cfg.hidden_sizes)):
        reject(
            cfg,
            "num_stages",
            f"needs 1 to len(depths) {len(cfg.depths)} / len(hidden_sizes) {len(cfg.hidden_sizes)} stages",
        )
    if cfg.hidden_sizes[-1] != cfg.hidden_sizes[n - 1]:  # transformers cannot run it either
        reject(
            cfg,
            "hidden_sizes",
            f"the final LayerNorm takes hidden_sizes[-1] channels, the last of num_stages={n} stages gives "
            f"hidden_sizes[{n - 1}]",
        )
    patch = square(cfg, "patch_size", "ConvNeXt")
    size = nominal_size(cfg)
    drop_path_rate = check_drop_path(cfg)
    kw = dict(
        img_size=int(size),
        patch_size=int(patch),
        in_chans=cfg.num_channels,
        depths=tuple(int(d) for d in cfg.depths[:n]),
        dims=tuple(int(d) for d in cfg.hidden_sizes[:n]),
        drop_path_rate=drop_path_rate,
        head_norm_eps=float(cfg.layer_norm_eps),
    )
    if not v2:
        kw["layer_scale_init_value"] = float(cfg.layer_scale_init_value)
    return kw


def convnext_from_hf(hf: dict[str, torch.Tensor], cfg, v2: bool) -> ConvNeXt:
    """A ConvNeXt (V2) from a ConvNextModel / ConvNextForImageClassification (V2) state dict and config."""
    what = "ConvNextV2Config" if v2 else "ConvNextConfig"
    kw = convnext_kwargs_from_hf(cfg, v2)
    base = backbone_state(hf, "convnextv2." if v2 else "convnext.")
    num_classes = hf["classifier.weight"].shape[0] if "classifier.weight" in hf else 0
    model = (ConvNeXtV2 if v2 else ConvNeXt)(**kw, num_classes=num_classes)
    sd = {_rename(k, _RENAMES_BACK): v for k, v in base.items()}
    sd = {k: v.reshape(-1) if _is_grn(k) else v for k, v in sd.items()}
    if "classifier.weight" in hf:
        sd["head.weight"], sd["head.bias"] = hf["classifier.weight"], hf["classifier.bias"]
    return load_strict(model, sd, f"convnext_from_hf ({what} -> {type(model).__name__})")


def convnext_hf_outputs(hf, x: torch.Tensor) -> dict:
    """A ConvNext(V2)Model / ConvNext(V2)ForImageClassification's outputs in Tessera's layouts."""
    base = hf.convnextv2 if hasattr(hf, "convnextv2") else getattr(hf, "convnext", hf)
    out = base(pixel_values=x, output_hidden_states=True)
    res = {
        "features": out.last_hidden_state,  # (B, C3, H/32, W/32)
        "stages": list(out.hidden_states[1:]),  # [0] is the stem output
        "pooled": out.pooler_output,
    }
    if base is not hf:
        res["logits"] = hf.classifier(out.pooler_output)
    return res


register_hf(
    "convnext",
    HFAdapter(
        model_cls=ConvNeXt,
        archs=("ConvNextModel", "ConvNextForImageClassification"),
        hf_config=convnext_config,
        to_hf=convnext_to_hf,
        from_hf=partial(convnext_from_hf, v2=False),
        hf_outputs=convnext_hf_outputs,
    ),
)
register_hf(
    "convnextv2",
    HFAdapter(
        model_cls=ConvNeXtV2,
        archs=("ConvNextV2Model", "ConvNextV2ForImageClassification"),
        hf_config=convnext_config,
        to_hf=convnext_to_hf,
        from_hf=partial(convnext_from_hf, v2=True),
        hf_outputs=convnext_hf_outputs,
    ),
)
