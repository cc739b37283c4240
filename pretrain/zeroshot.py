"""Zero-shot classification and image<->text retrieval scores of a two-tower model: pure functions over tensors.

What pretrain.monitor logs during training (it embeds on every rank and gathers; these functions only score):
  - `template_mean` / `class_embeddings`: one embedding per class, the mean over prompt templates ("a photo of
    a {}.") of the normalized prompt embeddings, renormalized (CLIP's recipe, open_clip zero_shot_classifier);
  - `zero_shot_accuracy`: top-k accuracy of each image's most similar class embeddings;
  - `retrieval_recall`: image->text and text->image recall@k over held-out pairs (pair i = image i, caption i);
  - `chance_levels`: what a model that knows nothing scores (k/N, k/C), to read the numbers against;
  - `similarity_picture`: a heat map of a small batch's image-text similarity matrix (a bright diagonal = learned).

Ties are counted pessimistically everywhere: a wrong item scoring exactly as much as the right one ranks ahead
of it. A collapsed model (every embedding equal) then scores 0, not whatever index order would give.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from pretrain.errors import ConfigError


def check_class_names(names: Sequence[str] | None, key: str) -> None:
    """ConfigError naming `key` for a class list that is empty or holds duplicates (listed)."""
    if names is None:
        return
    if len(names) == 0:
        raise ConfigError(f"{key}: the zero-shot class list is empty")
    seen, dup = set(), []
    for name in names:
        if name in seen and name not in dup:
            dup.append(name)
        seen.add(name)
    if dup:
        raise ConfigError(f"{key}: duplicated class names {dup}: each class needs a distinct name")


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Class-major prompts: class 0 under every template, then class 1, ... (C * T strings)."""
    return [t.format(name) for name in class_names for t in templates]


def template_mean(prompt_emb: torch.Tensor, n_classes: int, n_templates: int) -> torch.Tensor:
    """(C * T, E) prompt embeddings in class-major order -> (C, E) class embeddings: each prompt normalized, the
    mean over a class's templates, renormalized (the mean of unit vectors is shorter than 1)."""
    if prompt_emb.shape[0] != n_classes * n_templates:
        raise ValueError(
            f"{prompt_emb.shape[0]} prompt embeddings for {n_classes} classes x {n_templates} templates"
        )
    per = F.normalize(prompt_emb.float(), dim=-1).view(n_classes, n_templates, -1)  # (C, T, E)
    return F.normalize(per.mean(1), dim=-1)  # (C, E)


def class_embeddings(
    encode_text: Callable[..., torch.Tensor],
    prompts_ids: torch.Tensor,
    prompts_mask: torch.Tensor,
    n_classes: int,
    n_templates: int,
    batch: int = 256,
) -> torch.Tensor:
    """(C, E) class embeddings from tokenized class-major prompts (C * T, L): `encode_text(ids, mask)` in
    chunks of `batch` (the caller's mode and grad), then `template_mean`. Single process."""
    emb = torch.cat(
        [
            encode_text(prompts_ids[i : i + batch], prompts_mask[i : i + batch]).float()
            for i in range(0, len(prompts_ids), batch)
        ]
    )  # (C * T, E)
    return template_mean(emb, n_classes, n_templates)


def _hits(scores: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> dict[int, int]:
    """How many rows of `scores` (m, K) rank column target[i] within the top k, ties pessimistic: its rank is the
    number of other columns scoring >= its score."""
    right = scores.gather(1, target[:, None])  # (m, 1)
    ahead = (scores >= right).sum(1) - 1  # (m,): itself excluded
    return {k: int((ahead < k).sum()) for k in ks}


def zero_shot_accuracy(
    image_emb: torch.Tensor,
    class_emb: torch.Tensor,
    labels: torch.Tensor,
    topk: Sequence[int] = (1, 5),
    chunk: int = 4096,
) -> dict[str, float]:
    """{"top1": .., "top5": ..}: the share of images (N, E) whose label is among the k classes (C, E) of highest
    cosine similarity. A k above the number of classes is a ValueError (it would be 1.0 by definition)."""
    n_classes = class_emb.shape[0]
    if any(k > n_classes for k in topk):
        raise ValueError(f"top-k {list(topk)} with only {n_classes} classes")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels in [{int(labels.min())}, {int(labels.max())}] for {n_classes} classes")
    img = F.normalize(image_emb.float(), dim=-1)  # (N, E)
    cls = F.normalize(class_emb.float(), dim=-1)  # (C, E)
    hits = dict.fromkeys(topk, 0)
    for i in range(0, len(img), chunk):
        part = _hits(img[i : i + chunk] @ cls.T, labels[i : i + chunk].long(), topk)  # scores (m, C)
        hits = {k: hits[k] + part[k] for k in topk}
    return {f"top{k}": hits[k] / len(img) for k in topk}


def retrieval_recall(
    image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10), chunk: int = 4096
) -> dict[str, float]:
    """{"i2t_R@1": .., "t2i_R@1": .., ...}: pair i is image i with caption i; image->text R@k is the share of
    images whose own caption is among the k captions of highest cosine similarity (text->image likewise).
    Memory: `chunk` x N similarities at a time."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image embeddings {tuple(image_emb.shape)} vs text {tuple(text_emb.shape)}")
    img = F.normalize(image_emb.float(), dim=-1)  # (N, E)
    txt = F.normalize(text_emb.float(), dim=-1)  # (N, E)
    n = len(img)
    out = {}
    for name, queries, keys in (("i2t", img, txt), ("t2i", txt, img)):
        hits = dict.fromkeys(ks, 0)
        for i in range(0, n, chunk):
            rows = torch.arange(i, min(i + chunk, n))
            part = _hits(queries[rows] @ keys.T, rows, ks)  # scores (m, N)
            hits = {k: hits[k] + part[k] for k in ks}
        out.update({f"{name}_R@{k}": hits[k] / n for k in ks})
    return out


def chance_levels(
    n_pairs: int | None = None,
    n_classes: int | None = None,
    ks: Sequence[int] = (1, 5, 10),
    topk: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """What random embeddings score on average, under the keys of `retrieval_recall` (R@k: k / N) and
    `zero_shot_accuracy` (top-k: k / C); a key is left out when its count is not given."""
    out = {}
    if n_pairs:
        for k in ks:
            out[f"i2t_R@{k}"] = out[f"t2i_R@{k}"] = min(k, n_pairs) / n_pairs
    if n_classes:
        out.update({f"top{k}": min(k, n_classes) / n_classes for k in topk})
    return out


# dark blue -> teal -> yellow: low similarities dark, the diagonal bright
_RAMP = torch.tensor([[0.05, 0.03, 0.30], [0.10, 0.45, 0.55], [0.35, 0.75, 0.40], [0.99, 0.91, 0.15]])


def similarity_picture(image_emb: torch.Tensor, text_emb: torch.Tensor, size: int = 256) -> torch.Tensor:
    """(H, W, 3) uint8 heat map of the cosine similarities of images (n, E) (rows) with captions (m, E)
    (columns), min-max scaled to [0, 255] over the picture (the pattern matters, not the level) and upsampled
    by an integer factor so the longer side is about `size` pixels (a 16 x 16 matrix -> 256 x 256)."""
    sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T  # (n, m)
    lo, hi = sim.min(), sim.max()
    level = (sim - lo) / (hi - lo) if hi > lo else torch.zeros_like(sim)  # (n, m) in [0, 1]
    pos = level * (len(_RAMP) - 1)
    i = pos.floor().clamp(max=len(_RAMP) - 2).long()
    frac = (pos - i)[..., None]  # (n, m, 1)
    rgb = _RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac  # (n, m, 3)
    scale = max(1, size // max(sim.shape))
    rgb = rgb.repeat_interleave(scale, 0).repeat_interleave(scale, 1)  # (n * scale, m * scale, 3)
    return (rgb * 255).round().to(torch.uint8)
