"""Held-out quality of a text run next to a baseline measured on the same tokens, in one command.

    python -m pretrain.text_eval RUN_DIR_OR_CHECKPOINT [--split test] [--max-rows N] [--json FILE]

clm: perplexity of the next-token targets of the held-out split (packed rows of data.seq_len, documents masked
from each other, exactly the targets training counts) vs a unigram model of the training split's tokens
(add-one smoothed) on the same targets. mlm: masked-token accuracy and perplexity on the held-out split, masked
with the run's recipe from a fixed seed, vs always predicting the training split's most frequent regular token
(accuracy) and the unigram model (perplexity) on the same masked positions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from pretrain.objectives.clm import CLM, IGNORE, next_token_targets
from pretrain.objectives.mlm import MLM, mask_tokens


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, rows: dict, unigram_logp: torch.Tensor, batch: int = 8, seed: int = 0
) -> dict:
    """Sums over the split's counted targets: model NLL, unigram NLL, correct predictions (and baseline's)."""
    model.eval()
    backbone = model.backbone
    gen = torch.Generator().manual_seed(seed)  # mlm: the same masks for every model evaluated
    most_frequent = None
    if isinstance(model, MLM):
        regular_logp = unigram_logp[model.regular_ids]
        most_frequent = int(model.regular_ids[regular_logp.argmax()])
    nll = base_nll = correct = base_correct = count = 0.0
    for i in range(0, len(rows["input_ids"]), batch):
        ids, doc = rows["input_ids"][i : i + batch], rows["doc_ids"][i : i + batch]  # (b, N)
        pos = rows["positions"][i : i + batch]
        if isinstance(model, CLM):
            inputs, targets = ids, next_token_targets(ids, doc, model.bos_id)
        else:
            eligible = (doc >= 0) & ~torch.isin(ids, model.special_ids)
            inputs, targets = mask_tokens(ids, eligible, model.cfg, model.mask_id, model.regular_ids, gen)
        logits = backbone(inputs, pos, doc).float()  # (b, N, V)
        valid = targets != IGNORE
        t = targets[valid]
        logp = logits[valid].log_softmax(-1)  # (T, V)
        nll += -logp.gather(1, t[:, None]).sum().item()
        base_nll += -unigram_logp[t].sum().item()
        correct += (logp.argmax(-1) == t).sum().item()
        if most_frequent is not None:
            base_correct += (t == most_frequent).sum().item()
        count += len(t)
    out = {
        "targets": int(count),
        "perplexity": math.exp(nll / count),
        "unigram_perplexity": math.exp(base_nll / count),
        "accuracy": correct / count,
    }
    if most_frequent is not None:
        out["most_frequent_accuracy"] = base_correct / count
        out["most_frequent_token"] = most_frequent
    return out


def unigram_log_probs(counts: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(V,) log-probabilities of an add-one smoothed unigram model over the model's vocabulary."""
    full = torch.zeros(vocab_size, dtype=torch.float64)
    full[: len(counts)] = counts.double()
    return ((full + 1) / (full.sum() + vocab_size)).log().float()


def main(argv: list[str] | None = None) -> int:
    from pretrain.data.tokens import load_token_split, token_counts
    from pretrain.export import load_checkpoint_model

    p = argparse.ArgumentParser(prog="python -m pretrain.text_eval", description=__doc__.split("\n")[0])
    p.add_argument("run", help="run directory (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--split", default="test", help="held-out split (default: test)")
    p.add_argument("--max-rows", type=int, default=None, help="evaluate only the first N packed rows")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    t0 = time.time()
    model, meta, cfg = load_checkpoint_model(args.run, with_config=True)
    if not isinstance(model, CLM | MLM):
        print(f"error: {args.run} is not a clm or mlm run ({type(model).__name__})", file=sys.stderr)
        return 2
    data = cfg.data
    # the held-out split in full (the run's max_samples limits its training split only)
    rows = load_token_split(data, args.split, data.seq_len, args.max_rows, max_samples=None)
    train_counts = token_counts(data, data.split, max_samples=data.max_samples)
    unigram = unigram_log_probs(train_counts, model.backbone.vocab_size)
    results = {
        "run": str(meta["checkpoint"]),
        "step": meta["step"],
        "objective": "clm" if isinstance(model, CLM) else "mlm",
        "split": args.split,
        "rows": len(rows["input_ids"]),
        **evaluate(model, rows, unigram),
    }
    r = results
    print(
        f"held-out {args.split} split of {data.dataset}: {r['rows']} rows of {data.seq_len} tokens, {r['targets']:,} targets ({time.time() - t0:.0f}s)"
    )
    if r["objective"] == "clm":
        lower = 1 - r["perplexity"] / r["unigram_perplexity"]
        results["perplexity_reduction"] = lower
        print(f"  model perplexity     {r['perplexity']:10.2f}  (next-token accuracy {r['accuracy']:.4f})")
        print(f"  unigram perplexity   {r['unigram_perplexity']:10.2f}  (train-split token frequencies)")
        print(f"  model is {lower:.1%} lower than unigram")
    else:
        print(f"  masked-token accuracy   {r['accuracy']:.4f}   perplexity {r['perplexity']:.2f}")
        print(
            f"  most frequent token     {r['most_frequent_accuracy']:.4f}   unigram perplexity {r['unigram_perplexity']:.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
