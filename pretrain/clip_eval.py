"""Held-out image<->text retrieval and zero-shot classification of a two-tower run, next to a random-init twin of
the same architecture and chance, from one command:

    python -m pretrain.clip_eval RUN_DIR_OR_CHECKPOINT [--split test] [--samples N] [--json OUT]

Reads the split the way training reads images (its size and normalization, no augmentation) with the run's
tokenizer and caption length (pretrain.data.load_pairs), embeds every image and caption, and scores:
image->text and text->image recall@1/5/10 (pair i = image i with caption i), zero-shot top-1/top-5 over the
dataset's classes (class names x eval.templates, averaged then renormalized). What pretrain.monitor logs during
training, computed offline on the whole split. Writes RUN/clip_eval.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from pretrain import zeroshot


@torch.no_grad()
def embed_pairs(
    tower: nn.Module, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, batch: int = 256
):
    """(image embeddings (N, E), caption embeddings (N, E)), normalized, in eval mode."""
    tower.eval()
    img = torch.cat([tower.encode_image(images[i : i + batch]) for i in range(0, len(images), batch)])
    txt = torch.cat(
        [tower.encode_text(ids[i : i + batch], mask[i : i + batch]) for i in range(0, len(ids), batch)]
    )
    return img.float(), txt.float()


@torch.no_grad()
def score(tower: nn.Module, pairs, prompt_ids, prompt_mask, templates: list[str]) -> dict[str, float]:
    """Retrieval recall@k and (when the split has classes) zero-shot top-k of one two-tower model."""
    img, txt = embed_pairs(tower, pairs.images, pairs.input_ids, pairs.attention_mask)
    out = zeroshot.retrieval_recall(img, txt)
    if pairs.labels is not None and pairs.class_names:
        classes = zeroshot.class_embeddings(
            lambda i, m: tower.encode_text(i, m),
            prompt_ids,
            prompt_mask,
            len(pairs.class_names),
            len(templates),
        )
        topk = (1, 5) if len(pairs.class_names) >= 5 else (1,)
        out.update(
            {
                f"zeroshot_{k}": v
                for k, v in zeroshot.zero_shot_accuracy(img, classes, pairs.labels, topk).items()
            }
        )
    return out


def evaluate(run: str | Path, split: str = "test", samples: int | None = None) -> dict:
    """{"trained": scores, "random_init": scores, "chance": scores, "pairs": N, "classes": C, ...}."""
    from pretrain.build import build_model
    from pretrain.data.image_text import tokenize_captions
    from pretrain.data.split import load_pairs
    from pretrain.data.tokenizer import ensure_tokenizer
    from pretrain.export import load_checkpoint_model

    model, meta, cfg = load_checkpoint_model(run, with_config=True)
    pairs = load_pairs(cfg.data, split, samples)
    templates = list(cfg.eval.templates)
    names = cfg.eval.class_names or pairs.class_names or []
    prompt_ids, prompt_mask, _ = (
        tokenize_captions(zeroshot.prompts(names, templates), ensure_tokenizer(cfg.data), cfg.data.text_len)
        if names
        else (None, None, 0)
    )
    random_init = build_model(cfg).float().eval()  # the same architecture and seed, never trained
    chance = zeroshot.chance_levels(len(pairs.captions), len(names) or None)
    return {
        "run": str(run),
        "step": meta["step"],
        "split": split,
        "pairs": len(pairs.captions),
        "classes": len(names),
        "templates": templates,
        "trained": score(model.backbone, pairs, prompt_ids, prompt_mask, templates),
        "random_init": score(random_init.backbone, pairs, prompt_ids, prompt_mask, templates),
        "chance": {("zeroshot_" + k if k.startswith("top") else k): v for k, v in chance.items()},
    }


def table(r: dict) -> str:
    keys = [
        "i2t_R@1",
        "i2t_R@5",
        "i2t_R@10",
        "t2i_R@1",
        "t2i_R@5",
        "t2i_R@10",
        "zeroshot_top1",
        "zeroshot_top5",
    ]
    rows = [
        f"[clip_eval] {r['run']} (step {r['step']}): {r['pairs']} held-out {r['split']} pairs, "
        f"{r['classes']} zero-shot classes",
        f"[clip_eval]   {'metric':<15} {'trained':>8} {'random init':>12} {'chance':>8}",
    ]
    for k in keys:
        if k in r["trained"]:
            rows.append(
                f"[clip_eval]   {k:<15} {r['trained'][k]:>8.4f} {r['random_init'][k]:>12.4f} "
                f"{r['chance'].get(k, float('nan')):>8.4f}"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.clip_eval", description=__doc__.split("\n")[0])
    p.add_argument("run", help="a two-tower run directory or checkpoint folder")
    p.add_argument("--split", default="test")
    p.add_argument("--samples", type=int, default=None, help="first N pairs of the split (default: all)")
    p.add_argument("--json", default=None, help="where to write the scores (default RUN/clip_eval.json)")
    args = p.parse_args(argv)
    result = evaluate(args.run, args.split, args.samples)
    out = Path(args.json) if args.json else Path(args.run) / "clip_eval.json"
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
