"""Hugging Face twin of CvT (CvtModel / CvtForImageClassification): the key map and both conversions.

Tessera                              transformers CvtModel (CvtForImageClassification prefixes "cvt.")
patch_embed.{proj,norm}              encoder.stages.0.embedding.convolution_embeddings.{projection,normalization}
stages.i.downsample.{proj,norm}      encoder.stages.i.embedding.convolution_embeddings.{...}          (i > 0)
stages.i.cls_token                   encoder.stages.i.cls_token                                  (last stage)
stages.i.blocks.j.norm1 / norm2      encoder.stages.i.layers.j.layernorm_before / layernorm_after
stages.i.blocks.j.attn.conv_q.conv   encoder.stages.i.layers.j.attention.attention.convolution_projection_query
                                         .convolution_projection.convolution          (conv_k / conv_v: _key / _value)
stages.i.blocks.j.attn.conv_q.bn     ... .convolution_projection.normalization    (weight, bias and running stats)
stages.i.blocks.j.attn.q / k / v     encoder.stages.i.layers.j.attention.attention.projection_{query,key,value}
stages.i.blocks.j.attn.proj          encoder.stages.i.layers.j.attention.output.dense
stages.i.blocks.j.mlp.fc1 / fc2      encoder.stages.i.layers.j.intermediate.dense / output.dense
norm                                 layernorm             (CvtForImageClassification only, no prefix)
head                                 classifier            (num_classes > 0)
mask_token                           (none: a pretraining parameter, not exported)
`KEY_MAP` below is this table as data; both directions walk it over the Tessera model's own state dict.

HF keeps the final LayerNorm (what the classifier reads) in CvtForImageClassification, not in CvtModel, so
`to_hf` always writes CvtForImageClassification (num_labels=0, an Identity classifier, for a headless backbone;
as models/poolformer_hf.py): the folder keeps every trained weight, and CvtModel.from_pretrained(folder) still
loads the base model from it. Importing a bare CvtModel folder gives the final norm its init (weight 1, bias 0).

Outputs: Tessera's features (B, 1 + h * w, C) = [cls_token_value ‖ last_hidden_state flattened row-major]
(CvtModel's last_hidden_state alone is forward_intermediates()[-1]); hidden_states[i] = forward_intermediates()[i];
the classifier reads layernorm(cls_token_value) (without a CLS token: the mean of the LayerNormed map tokens).
transformers' quirks: CvtStage builds only with depth[i] > i (it indexes each stage's drop-path rates by the
stage), so `cvt_config` refuses other depths; CvtForImageClassification without a CLS token runs only with
output_hidden_states=True (it reads outputs[1]); the attention scale is dim^-0.5, as Tessera's (models/cvt.py).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.cvt import CvT
from models.hf import HFAdapter, load_strict, register_hf
from models.hf_config import reject, square_entries
from ops.compat import import_transformers

_E = "encoder.stages.{i}.embedding.convolution_embeddings"
_A = "encoder.stages.{i}.layers.{j}.attention.attention"
_L = "encoder.stages.{i}.layers.{j}"
KEY_MAP = [  # (Tessera module, HF module); {i} stage, {j} block
    ("patch_embed.proj", "encoder.stages.0.embedding.convolution_embeddings.projection"),
    ("patch_embed.norm", "encoder.stages.0.embedding.convolution_embeddings.normalization"),
    ("stages.{i}.downsample.proj", f"{_E}.projection"),
    ("stages.{i}.downsample.norm", f"{_E}.normalization"),
    ("stages.{i}.blocks.{j}.norm1", f"{_L}.layernorm_before"),
    *(
        (
            f"stages.{{i}}.blocks.{{j}}.attn.conv_{t}.{a}",
            f"{_A}.convolution_projection_{h}.convolution_projection.{b}",
        )
        for t, h in (("q", "query"), ("k", "key"), ("v", "value"))
        for a, b in (("conv", "convolution"), ("bn", "normalization"))
    ),
    *(
        (f"stages.{{i}}.blocks.{{j}}.attn.{t}", f"{_A}.projection_{h}")
        for t, h in (("q", "query"), ("k", "key"), ("v", "value"))
    ),
    ("stages.{i}.blocks.{j}.attn.proj", f"{_L}.attention.output.dense"),
    ("stages.{i}.blocks.{j}.norm2", f"{_L}.layernorm_after"),
    ("stages.{i}.blocks.{j}.mlp.fc1", f"{_L}.intermediate.dense"),
    ("stages.{i}.blocks.{j}.mlp.fc2", f"{_L}.output.dense"),
]
_TOP = {"norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}  # CvtForImageClassification's
_TOP.update({"head.weight": "classifier.weight", "head.bias": "classifier.bias"})


def _pattern(tessera: str) -> re.Pattern:
    """'stages.{i}.blocks.{j}.norm1' -> a regex for 'stages.<i>.blocks.<j>.norm1.<param>' capturing i, j, param."""
    rx = re.escape(tessera).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(rx + r"\.(\w+)")


_COMPILED = [(_pattern(t), h) for t, h in KEY_MAP]
_CLS = re.compile(r"stages\.(\d+)\.cls_token")


def hf_name(key: str) -> str:
    """The CvtModel key holding Tessera backbone key `key` (not the final norm, head or mask token)."""
    m = _CLS.fullmatch(key)
    if m:
        return f"encoder.stages.{m.group(1)}.cls_token"
    for rx, h in _COMPILED:
        m = rx.fullmatch(key)
        if m:
            groups = {k: v for k, v in m.groupdict().items() if v is not None}
            return f"{h.format(**groups)}.{m.groups()[-1]}"
    raise KeyError(f"cvt: no HF name for {key!r}")


def cvt_config(model: CvT):
    """The CvtConfig of the same architecture (num_labels = num_classes, 0 without a head)."""
    n, k = len(model.depths), model.kernel_qkv
    if any(d <= i for i, d in enumerate(model.depths)):
        # CvtStage picks every block's drop-path rate as linspace(0, rate, depth[i])[i]: an IndexError otherwise
        raise ValueError(
            f"depths {list(model.depths)}: transformers' CvT needs depth[i] > i in every stage i"
        )
    return import_transformers().CvtConfig(
        num_channels=model.in_chans,
        patch_sizes=list(model.patch_sizes),
        patch_stride=list(model.strides),
        patch_padding=list(model.paddings),
        embed_dim=list(model.embed_dims),
        num_heads=list(model.num_heads),
        depth=list(model.depths),
        mlp_ratio=list(model.mlp_ratios),
        attention_drop_rate=[0.0] * n,
        drop_rate=[0.0] * n,
        drop_path_rate=[0.0] * (n - 1) + [model.drop_path_rate],  # the last stage's (see models/cvt.py)
        qkv_bias=[model.qkv_bias] * n,
        cls_token=[False] * (n - 1) + [bool(model.num_prefix_tokens)],
        qkv_projection_method=["dw_bn"] * n,
        kernel_qkv=[k] * n,
        padding_kv=[k // 2] * n,
        stride_kv=[model.stride_kv] * n,
        padding_q=[k // 2] * n,
        stride_q=[model.stride_q] * n,
        num_labels=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        image_size=model.img_size,  # not a CvtConfig field; kept in config.json for the way back
    )


def cvt_to_hf(model: CvT) -> nn.Module:
    """CvtForImageClassification holding every weight (Identity classifier without a head); eval()."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "mask_token" or (k.startswith("head.") and not isinstance(model.head, nn.Linear)):
            continue
        sd[_TOP[k] if k in _TOP else "cvt." + hf_name(k)] = v.detach().cpu().contiguous()
    hf = import_transformers().CvtForImageClassification(cvt_config(model))
    return load_strict(hf, sd, "cvt to_hf")


def _uniform(cfg, field: str, n: int, values: list) -> object:
    if len(set(values)) != 1:
        reject(cfg, field, f"Tessera's CvT takes one value for all num_stages={n} stages")
    return values[0]


def cvt_kwargs_from_config(cfg, classifier: bool = False) -> dict:
    """Constructor arguments for a CvtConfig, reading what transformers' CvT reads; ValueError naming the field
    Tessera cannot represent.

    transformers builds len(depth) stages from the first len(depth) entries of each per-stage list (longer
    lists are fine); CvtForImageClassification (`classifier`) reads cls_token[-1] and sizes its norm by
    embed_dim[-1], and a stage's CLS token has embed_dim[-1] channels. layer_norm_eps is never read (every norm
    uses PyTorch's 1e-5, as Tessera's). Dropouts and stochastic depth are training only: Tessera keeps the last
    stage's drop_path_rate (transformers' own schedule gives every block of a stage one rate)."""
    n = len(cfg.depth)
    if n < 1:
        reject(cfg, "depth", "needs at least one stage")
    per_stage = ("patch_sizes", "patch_stride", "patch_padding", "embed_dim", "num_heads", "mlp_ratio")
    per_stage += ("drop_path_rate", "qkv_bias", "cls_token", "qkv_projection_method", "kernel_qkv")
    for field in (*per_stage, "padding_kv", "stride_kv", "padding_q", "stride_q"):
        if len(getattr(cfg, field)) < n:
            reject(cfg, field, f"needs an entry for each of the len(depth)={n} stages")
    if any(m != "dw_bn" for m in cfg.qkv_projection_method[:n]):  # transformers cannot run "avg" either
        reject(
            cfg, "qkv_projection_method", "Tessera's CvT projects q / k / v by 'dw_bn' (depthwise conv + BN)"
        )
    cls = [bool(c) for c in cfg.cls_token[:n]]
    if any(cls[:-1]):
        reject(cfg, "cls_token", "Tessera's CvT has a CLS token in the last stage only")
    if (cls[-1] or classifier) and cfg.embed_dim[-1] != cfg.embed_dim[n - 1]:
        reject(
            cfg,
            "embed_dim",
            f"the CLS token and final norm take embed_dim[-1], the last stage embed_dim[{n - 1}]",
        )
    if classifier and bool(cfg.cls_token[-1]) != cls[-1]:
        reject(cfg, "cls_token", f"the classifier reads cls_token[-1], the last stage has cls_token[{n - 1}]")
    k = _uniform(cfg, "kernel_qkv", n, square_entries(cfg, "kernel_qkv", n, "CvT"))
    for field in ("padding_q", "padding_kv"):
        if square_entries(cfg, field, n, "CvT") != [k // 2] * n or k % 2 == 0:
            reject(cfg, field, f"Tessera's CvT pads its odd q / k / v kernels by kernel_qkv // 2 ({k // 2})")
    drop_path_rate = float(cfg.drop_path_rate[n - 1])
    if not 0.0 <= drop_path_rate < 1.0:
        reject(cfg, "drop_path_rate", "Tessera's stochastic depth takes a rate in [0, 1)")
    return dict(
        img_size=int(getattr(cfg, "image_size", 224)),
        in_chans=cfg.num_channels,
        embed_dims=tuple(int(d) for d in cfg.embed_dim[:n]),
        depths=tuple(int(d) for d in cfg.depth[:n]),
        num_heads=tuple(int(h) for h in cfg.num_heads[:n]),
        mlp_ratios=tuple(float(r) for r in cfg.mlp_ratio[:n]),
        patch_sizes=tuple(square_entries(cfg, "patch_sizes", n, "CvT")),
        strides=tuple(square_entries(cfg, "patch_stride", n, "CvT")),
        paddings=tuple(square_entries(cfg, "patch_padding", n, "CvT")),
        kernel_qkv=k,
        stride_q=_uniform(cfg, "stride_q", n, square_entries(cfg, "stride_q", n, "CvT")),
        stride_kv=_uniform(cfg, "stride_kv", n, square_entries(cfg, "stride_kv", n, "CvT")),
        qkv_bias=_uniform(cfg, "qkv_bias", n, [bool(b) for b in cfg.qkv_bias[:n]]),
        cls_token=cls[-1],
        drop_path_rate=drop_path_rate,
    )


def cvt_from_hf(hf: dict[str, torch.Tensor], cfg) -> CvT:
    """A CvT from a CvtModel or CvtForImageClassification state dict and config."""
    prefix = "cvt." if any(k.startswith("cvt.") for k in hf) else ""
    kw = cvt_kwargs_from_config(cfg, classifier=bool(prefix))  # the classification model's keys are prefixed
    head = "classifier.weight" in hf
    model = CvT(**kw, num_classes=hf["classifier.weight"].shape[0] if head else 0)
    sd, used = {}, set()
    for k, v in model.state_dict().items():
        name = _TOP[k] if k in _TOP else prefix + hf_name(k)
        if k.startswith("norm.") and not prefix:  # a bare CvtModel has no final norm: keep its init
            sd[k] = v
            continue
        if name not in hf:
            raise RuntimeError(f"cvt from_hf: the state dict lacks {name!r} (for {k!r})")
        sd[k] = hf[name]
        used.add(name)
    extra = sorted(set(hf) - used)
    if extra:
        raise RuntimeError(f"cvt from_hf: unexpected keys {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    return load_strict(model, sd, "cvt from_hf")


def cvt_hf_outputs(hf: nn.Module, x: torch.Tensor) -> dict:
    """A CvtModel / CvtForImageClassification's outputs in Tessera's layouts (see models/hf.py)."""
    base = getattr(hf, "cvt", hf)
    out = base(pixel_values=x, output_hidden_states=True)
    tokens = out.last_hidden_state.flatten(2).transpose(1, 2)  # (B, h * w, C)
    cls = out.cls_token_value  # (B, 1, C) or None
    feats = tokens if cls is None else torch.cat([cls, tokens], dim=1)  # (B, P + h * w, C)
    pooled_in = tokens if cls is None else cls
    if base is hf:  # a bare CvtModel has no final norm: the imported default (unit affine)
        pooled = F.layer_norm(pooled_in, pooled_in.shape[-1:]).mean(dim=1)
    else:  # exactly what the classifier reads
        pooled = hf.layernorm(pooled_in).mean(dim=1)
    res = {"features": feats, "stages": list(out.hidden_states), "pooled": pooled}
    if base is not hf and hf.config.num_labels > 0:
        # output_hidden_states: without a CLS token CvtForImageClassification reads outputs[1] (unused), which
        # only exists then (transformers 4.57 raises IndexError otherwise)
        res["logits"] = hf(pixel_values=x, output_hidden_states=True).logits
    return res


register_hf(
    "cvt",
    HFAdapter(
        model_cls=CvT,
        archs=("CvtModel", "CvtForImageClassification"),
        hf_config=cvt_config,
        to_hf=cvt_to_hf,
        from_hf=cvt_from_hf,
        hf_outputs=cvt_hf_outputs,
    ),
)
