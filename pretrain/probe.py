"""Linear probe: how linearly separable are a frozen encoder's features? Pretrained vs random init, one run.

    python -m pretrain.probe HF_DIR [--dataset fashion_mnist] [--train-samples N] [--test-samples N]

Features are [cls token ‖ mean patch token] of the final layer, standardized with training statistics; the
classifier is multinomial logistic regression whose C is picked on a held-out fifth of the training set.
Both encoders go through exactly the same code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.vit import VisionTransformer


@torch.no_grad()
def features(encoder: VisionTransformer, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    encoder.eval()
    out = []
    for i in range(0, len(images), batch):
        tokens = encoder.forward_features(images[i : i + batch])  # (B, 1 + L, D)
        out.append(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1))  # (B, 2D)
    return torch.cat(out).numpy()


def logistic_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                      seed: int = 0) -> float:
    from sklearn.linear_model import LogisticRegression

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    order = np.random.default_rng(seed).permutation(len(train_x))
    n_val = len(order) // 5
    val, fit = order[:n_val], order[n_val:]
    best_c, best = 1.0, -1.0
    for c in (0.01, 0.1, 1.0):
        acc = LogisticRegression(C=c, max_iter=1000).fit(train_x[fit], train_y[fit]).score(train_x[val], train_y[val])
        if acc > best:
            best_c, best = c, acc
    clf = LogisticRegression(C=best_c, max_iter=1000).fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def random_like(encoder: VisionTransformer, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(**encoder.hparams()).eval()


def main(argv: list[str] | None = None) -> int:
    from pretrain.data import load_split
    from pretrain.export import from_hf

    p = argparse.ArgumentParser(prog="python -m pretrain.probe", description=__doc__.split("\n")[0])
    p.add_argument("hf_dir", help="folder written by python -m pretrain.export")
    p.add_argument("--dataset", default=None, help="default: the dataset the run trained on")
    p.add_argument("--train-samples", type=int, default=10000)
    p.add_argument("--test-samples", type=int, default=10000)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    hf_dir = Path(args.hf_dir)
    meta = json.loads((hf_dir / "tessera.json").read_text()) if (hf_dir / "tessera.json").is_file() else {}
    dataset = args.dataset or meta.get("data", {}).get("dataset", "fashion_mnist")
    model = from_hf(hf_dir)
    encoder = model.backbone if hasattr(model, "backbone") else model
    size = encoder.patch_embed.img_size
    t0 = time.time()
    train_x, train_y = load_split(dataset, "train", size, max_samples=args.train_samples)
    test_x, test_y = load_split(dataset, "test", size, max_samples=args.test_samples)
    results = {"dataset": dataset, "train_samples": len(train_y), "test_samples": len(test_y)}
    for name, enc in (("pretrained", encoder), ("random_init", random_like(encoder))):
        acc = logistic_accuracy(features(enc, train_x), train_y.numpy(), features(enc, test_x), test_y.numpy())
        results[name] = acc
    print(f"linear probe on {dataset} ({len(train_y)} train / {len(test_y)} test images, "
          f"{time.time() - t0:.0f}s):")
    print(f"  pretrained encoder  ({hf_dir}): accuracy {results['pretrained']:.4f}")
    print(f"  random-init encoder (same shape):  accuracy {results['random_init']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
