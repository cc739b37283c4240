"""`model.init_from`: start a fresh run (fine-tuning, continued pretraining) from saved backbone weights.

The source is a Tessera run directory or checkpoint folder (any engine, any ZeRO stage: consolidated by
`pretrain.export.load_checkpoint_model`) or a Hugging Face folder of a supported family (`pretrain.export.from_hf`).
Only its backbone is used. pretrain/train.py calls `init_from(model, cfg)` once, at a fresh start, before the
engine is built (a resumed run has its own weights; under ZeRO-3 the full model is still on every rank).

What is loaded into the run's backbone, and what is not:
  - every tensor of the backbone's state dict, except its classifier `head.*`: heads start fresh, and so do the
    objective's modules outside the backbone (an MAE decoder);
  - `mask_token` when both models have one (otherwise the target keeps its own);
  - a ViT's learned `pos_embed` is interpolated (bicubic over the patch grid, the prefix rows kept: cls, and
    DeiT's distillation token) when the image size changes; a sin-cos table is a buffer the model recomputes
    (nothing to load), except that it seeds a learned table (MAE's fine-tuning recipe);
  - a 3-channel source into a 1-channel model: the input convolution's RGB weights are summed (a gray image is
    R = G = B, so the model computes on it what the source computes on the gray image as RGB; the inverse of
    models.hf.rgb_from_gray's split by PIL's luma weights, as models.hf.gray_from_rgb);
  - anything else that differs (a key missing on either side, a shape, the family, an architecture setting
    such as num_heads that no shape shows) is a ConfigError naming it; the model is then left untouched:
    everything is checked before the first tensor is copied.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.errors import ConfigError

# hparams the run decides itself (the data, the objective, regularization), or that are handled below (pos_embed)
RUN_HPARAMS = {"img_size", "in_chans", "num_classes", "drop_path_rate", "mask_token", "pos_embed"}
# hparams that may differ with the weights still meaning the same thing (a note in the log, not an error)
SOFT_HPARAMS = {
    "norm_eps",
    "head_norm_eps",
    "global_pool",
    "layer_scale_init_value",
    "layer_scale_init",
    "window_size",  # Swin V2's continuous position bias; where a table follows the window, its shape differs
    "pretrained_window_sizes",
    "post_norm_zero_init",
    "max_seq_len",
    "tome_r",  # ToMe / EViT token reduction: fine-tuning an unreduced model with them (ToMe's MAE recipe)
    "evit_keep_rate",
    "evit_locs",
}
SHOWN = 10  # mismatches listed per kind in an error


def init_from(model: nn.Module, cfg) -> list[str]:
    """Load `cfg.model.init_from`'s backbone weights into `model.backbone` (or `model`, a bare backbone); return
    lines for the log: the source, what was loaded, interpolated or folded, and what starts fresh."""
    path = cfg.model.init_from
    if not path:
        raise ConfigError("model.init_from: not set")
    target = getattr(model, "backbone", model)
    source, what = load_source(path)
    lines = [f"source: {what}"]
    lines += load_backbone(target, source, what, f"model.name {cfg.model.name!r} ({type(target).__name__})")
    fresh = [
        n for n, m in model.named_children() if m is not target and next(m.parameters(), None) is not None
    ]
    if fresh:
        lines.append(f"objective modules outside the backbone start fresh: {', '.join(fresh)}")
    return lines


# --- the source ------------------------------------------------------------------------------------------


def source_kind(path: str | Path) -> str:
    """ "checkpoint" (a Tessera checkpoint folder or a run directory with a complete one) or "hf" (a Hugging Face
    folder, or Tessera's safetensors layout); ConfigError naming model.init_from and the path otherwise."""
    from pretrain.checkpoint import find_latest
    from pretrain.export import TESSERA_LAYOUT

    p = Path(path)
    what = "a Tessera run directory, a checkpoint folder or a Hugging Face model folder"
    if not p.exists():
        raise ConfigError(f"model.init_from: {str(p)!r} does not exist (expected {what})")
    if not p.is_dir():
        raise ConfigError(f"model.init_from: {str(p)!r} is a file; give the folder holding it ({what})")
    if (p / "meta.json").is_file():
        return "checkpoint"
    if (p / "config.json").is_file() or (p / TESSERA_LAYOUT).is_file():
        return "hf"
    if any(root.is_dir() and find_latest(root) is not None for root in (p / "checkpoints", p)):
        return "checkpoint"
    if (p / "config.yaml").is_file():
        raise ConfigError(f"model.init_from: {str(p)!r} is a run directory without a complete checkpoint")
    raise ConfigError(
        f"model.init_from: {str(p)!r} is not {what} (no meta.json, config.json or checkpoints/step_*)"
    )


def check_source(cfg) -> None:
    """Config-time check (pretrain.build.check_config): `model.init_from` is a source `init_from` can read. Not
    checked when the run will resume from its own checkpoint (the source is not read then, and may be gone)."""
    from pretrain.checkpoint import find_latest

    ckpts = Path(cfg.run.output_dir) / "checkpoints"
    if cfg.checkpoint.resume and ckpts.is_dir() and find_latest(ckpts) is not None:
        return
    source_kind(cfg.model.init_from)


def load_source(path: str | Path) -> tuple[nn.Module, str]:
    """(the source's backbone, fp32 on the CPU, a description of the source)."""
    from pretrain.export import from_hf, load_checkpoint_model

    kind = source_kind(path)
    with torch.random.fork_rng(devices=[]):  # building the source's model seeds the global RNG: keep ours
        try:
            if kind == "checkpoint":
                model, meta = load_checkpoint_model(path)
                stage = f", ZeRO-{meta['zero_stage']}" if meta.get("zero_stage") else ""
                what = (
                    f"Tessera checkpoint {meta['checkpoint']} (step {meta['step']}, {meta['engine']}{stage})"
                )
            else:
                model = from_hf(path)
                what = f"Hugging Face folder {path}"
        except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
            raise ConfigError(f"model.init_from: cannot read {str(path)!r}: {e}") from e
    return getattr(model, "backbone", model).float(), what


# --- matching and loading --------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _listed(title: str, rows: list[str]) -> list[str]:
    if not rows:
        return []
    more = f" (and {len(rows) - SHOWN} more)" if len(rows) > SHOWN else ""
    return [f"  {title} ({len(rows)}): {'; '.join(rows[:SHOWN])}{more}"]


def _hparams(m: nn.Module) -> dict:
    h = m.hparams() if callable(getattr(m, "hparams", None)) else {}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in h.items()}


def interpolate_pos_embed(table: torch.Tensor, grid: int, prefix: int = 1) -> torch.Tensor:
    """A ViT position table (1, prefix + g*g, D) resized to (1, prefix + grid*grid, D): bicubic over the patch
    grid, the prefix rows (cls; DeiT: cls, distillation) kept as they are."""
    n = table.shape[1] - prefix
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"pos_embed {_shape(table)}: {n} patch rows are not a square grid")
    head, patches = table[:, :prefix], table[:, prefix:].float()
    maps = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    maps = F.interpolate(maps, size=(grid, grid), mode="bicubic", align_corners=False)  # (1, D, grid, grid)
    patches = maps.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)  # (1, grid*grid, D)
    return torch.cat([head, patches.to(table.dtype)], dim=1)


def _special_keys(
    target: nn.Module, source: nn.Module, src: dict, tgt: dict, lines: list, problems: list
) -> None:
    """The keys that may legitimately be on one side only, settled in place: a fixed sin-cos table (a buffer,
    not saved) seeds a learned one; a mask token is loaded only when both models have one."""
    fixed = getattr(source, "pos_embed", None)
    if "pos_embed" in tgt and "pos_embed" not in src and isinstance(fixed, torch.Tensor):
        src["pos_embed"] = fixed
        lines.append("pos_embed: the source's fixed sin-cos table starts the learned one")
    if "pos_embed" in src and "pos_embed" not in tgt and hasattr(target, "pos_embed"):
        problems.append(
            "  pos_embed: the target's is a fixed sin-cos table (model.kwargs.pos_embed=learned takes the source's)"
        )
    if "mask_token" in src and "mask_token" not in tgt:
        del src["mask_token"]
        lines.append("mask_token: the target has none; the source's is left out")
    elif "mask_token" in tgt and "mask_token" not in src:
        del tgt["mask_token"]
        lines.append("mask_token: the source has none; the target's starts fresh")


def _adapt(key: str, value: torch.Tensor, want: torch.Size, target: nn.Module, fold: str | None, lines: list):
    """`value` made to fit the target where a rule allows (the 3 -> 1 channel fold, the ViT table resize)."""
    if key == fold:
        out = value.sum(dim=1, keepdim=True)  # (O, 3, kh, kw) -> (O, 1, kh, kw): a gray image is R = G = B
        lines.append(
            f"{key}: folded {_shape(value)} -> {_shape(out)}, 3-channel source into a 1-channel model "
            "(RGB weights summed: on a gray image it computes what the source computes on it as RGB)"
        )
        return out
    resizable = value.shape != want and value.shape[-1] == want[-1] and hasattr(target, "grid_size")
    if key == "pos_embed" and resizable:
        prefix = getattr(target, "num_prefix_tokens", 1)  # 2 for DeiT: its cls and distillation rows
        out = interpolate_pos_embed(value, target.grid_size, prefix)
        kept = {0: "no prefix row", 1: "cls row kept"}.get(prefix, f"{prefix} prefix rows kept")
        lines.append(f"pos_embed: interpolated {_shape(value)} -> {_shape(out)} (bicubic, {kept})")
        return out
    return value


def _input_fold(source: nn.Module, hs: dict, ht: dict, same_family: bool, problems: list) -> str | None:
    """The key of the input convolution to fold (a 3-channel source, a 1-channel target), or None."""
    if "in_chans" not in hs or "in_chans" not in ht or hs["in_chans"] == ht["in_chans"]:
        return None
    if (hs["in_chans"], ht["in_chans"]) == (3, 1) and same_family:
        from models.hf import input_conv_key

        return input_conv_key(source)
    problems.append(
        f"  in_chans: {hs['in_chans']} (source) vs {ht['in_chans']} (target); only 3 -> 1 folds "
        "(RGB weights into a grayscale model)"
    )
    return None


def _without_head(m: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the classifier: the `head` module's tensors, whatever keys they are saved under
    (MobileNetV2 saves its head as torchvision's `classifier.1.*`); DeiT's `head_dist` too."""
    heads = [getattr(m, n, None) for n in ("head", "head_dist")]
    skip = {id(t) for h in heads if isinstance(h, nn.Module) for t in [*h.parameters(), *h.buffers()]}
    return {
        k: v.detach()
        for k, v in m.state_dict(keep_vars=True).items()
        if id(v) not in skip and not k.startswith(("head.", "head_dist."))
    }


def match(target: nn.Module, source: nn.Module, source_name: str, target_name: str):
    """What `load_backbone` copies: ({key: tensor shaped as the target's}, log lines). A ConfigError listing every
    mismatch otherwise (nothing is touched here)."""
    tgt, src = _without_head(target), _without_head(source)
    lines, problems = [], []
    same_family = type(source) is type(target)
    if not same_family:
        problems.append(
            f"  another family: {type(source).__name__} (source) vs {type(target).__name__} (target)"
        )
    _special_keys(target, source, src, tgt, lines, problems)
    hs, ht = _hparams(source), _hparams(target)
    fold = _input_fold(source, hs, ht, same_family, problems)
    out, shapes = {}, []
    for k in (k for k in tgt if k in src):  # the model's order: stem first
        try:
            v = _adapt(k, src[k], tgt[k].shape, target, fold, lines)
        except ValueError as e:
            problems.append(f"  {e}")
            continue
        if v.shape == tgt[k].shape:
            out[k] = v
        else:
            shapes.append(f"{k} {_shape(src[k])} (source) vs {_shape(tgt[k])} (target)")
    problems += _listed("shape differs", shapes)
    problems += _listed("missing in the source", [f"{k} {_shape(tgt[k])}" for k in tgt if k not in src])
    problems += _listed("not in the target", [f"{k} {_shape(src[k])}" for k in src if k not in tgt])
    if same_family:  # settings no shape shows (num_heads): an error; those the weights survive: a note
        differ = sorted(k for k in set(hs) | set(ht) if k not in RUN_HPARAMS and hs.get(k) != ht.get(k))
        hard = [f"{k} {hs.get(k)} (source) vs {ht.get(k)} (target)" for k in differ if k not in SOFT_HPARAMS]
        problems += _listed("architecture differs", hard)
        soft = [f"{k} {hs.get(k)} -> {ht.get(k)}" for k in differ if k in SOFT_HPARAMS]
        if soft:
            lines.append(f"settings that differ from the source (the weights fit): {'; '.join(soft)}")
    if problems:
        raise ConfigError(
            f"model.init_from: {source_name} ({type(source).__name__}) does not fit {target_name}; "
            "nothing was loaded:\n" + "\n".join(problems)
        )
    return out, lines


def load_backbone(target: nn.Module, source: nn.Module, source_name: str, target_name: str = "") -> list[str]:
    """Copy `source`'s backbone weights into `target` (see the module docstring); return log lines."""
    target_name = target_name or type(target).__name__
    state, notes = match(target, source, source_name, target_name)
    missing, unexpected = target.load_state_dict(state, strict=False)
    if unexpected:  # match() keeps only the target's keys
        raise RuntimeError(f"init_from: keys the target does not have: {unexpected}")
    count = sum(v.numel() for v in state.values())
    lines = [f"loaded {len(state)} backbone tensors ({count:,} values) into {target_name}", *notes]
    head = sorted(k for k in missing if k not in _without_head(target))
    if head:
        lines.append(f"starts fresh: the head ({', '.join(head)})")
    return lines
