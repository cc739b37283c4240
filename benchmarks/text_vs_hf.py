"""Decoder training step: Tessera's Llama vs transformers' LlamaForCausalLM holding the same weights (CPU).

(a) `same`: one document per row, the same (batch, seq) random token ids for both, no packing and no doc_ids;
    transformers with attn_implementation "sdpa" (its default, and the same PyTorch flash kernel Tessera's
    unmasked causal attention runs). One step = forward + next-token cross-entropy + backward + AdamW step
    (fused, as Tessera's engines and HF's Trainer on torch >= 2.8 build it). Before timing, the fp32 losses
    must agree to 1e-4. Ratio = HF step time / Tessera step time (> 1: Tessera faster).
(b) `packed`: real WordNet glosses. Tessera reads them as it trains on them: tokenized with its own byte-level
    BPE (pretrain.data.tokenizer.ensure_tokenizer, trained on the wordnet train split, EOS appended like the
    converter does) and packed by pretrain.data.packing.Packer into rows of `--pack-len` tokens (doc_ids,
    positions restarting per document; loss by the clm objective). transformers gets the same documents in the
    same order the way run_clm-style fine-tuning without packing feeds them: `--hf-batch` documents per batch,
    right-padded to the longest in the batch, attention_mask, labels -100 at padding. Both train on every
    document once per round; reported: real (non-pad) tokens/s of each, their ratio, each side's padding
    fraction (pad slots / all slots). Before timing, the mean fp32 loss over all documents must agree to 1e-4
    (so the packed, document-masked rows compute what the padded batches compute).

Timing (both parts): warmup steps, then rounds alternating ABBA (Tessera, HF; HF, Tessera; ...), median over
rounds. MFU = model FLOPs (pretrain.mfu.text_flops: 6N + 12·L·d·s per token, s = the row in (a), Σ sᵢ² / Σ sᵢ
of the real documents in (b): HF's padding is not credited) over the CPU fp32 matmul rate
(pretrain.mfu.measure_matmul_tflops), the mean of probes taken just before and just after the timed rounds: on
a shared machine, the share of the cores the run had. The model is 125M-shaped (dim 768, 12 heads, SwiGLU 2048, untied head:
llama_125m) but `--depth` layers deep, so a CPU step takes seconds.

    .venv/bin/python benchmarks/text_vs_hf.py --json out/text_vs_hf.json
    .venv/bin/python benchmarks/text_vs_hf.py --model llama_test --seqs 64 --docs 60 --pack-len 128   # smoke

Results and analysis: docs/benchmarks.md, "Long-context text (decoder, CPU)".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models import create_model  # noqa: E402
from models.hf import adapter_for_model  # noqa: E402
from ops.compat import import_transformers  # noqa: E402
from pretrain.data.config import DataConfig  # noqa: E402
from pretrain.data.packing import Packer  # noqa: E402
from pretrain.data.sources import get_dataset  # noqa: E402
from pretrain.data.tokenizer import ensure_tokenizer, load_tokenizer  # noqa: E402
from pretrain.mfu import measure_matmul_tflops, text_flops  # noqa: E402
from pretrain.objectives.clm import CLM, CLMConfig  # noqa: E402
from pretrain.optim import param_groups  # noqa: E402

IGNORE = -100


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["same", "packed"], choices=["same", "packed"])
    p.add_argument("--model", default="llama_125m", help="Tessera registry name (its width, heads, MLP)")
    p.add_argument("--depth", type=int, default=2, help="layers (the 125M model has 12)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here (and the tables next to it, .md)")
    a = p.add_argument_group("(a) same batch, one document per row")
    a.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048])
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    b = p.add_argument_group("(b) packed WordNet glosses vs padded batches")
    b.add_argument("--docs", type=int, default=400, help="documents (random train glosses) per round")
    b.add_argument("--pack-len", type=int, default=1024, help="Tessera's packed row length")
    b.add_argument("--rows", type=int, default=4, help="Tessera's rows per micro-batch")
    b.add_argument(
        "--hf-batch",
        nargs="+",
        default=["matched", "16"],
        help="documents per HF batch; 'matched': as many as Tessera's micro-batches hold on average (same "
        "optimizer steps, same real tokens per step)",
    )
    b.add_argument("--vocab", type=int, default=8192, help="the trained BPE's vocabulary (the model's too)")
    b.add_argument(
        "--tokenizer-docs",
        type=int,
        default=None,
        help="train the BPE on the first N train documents (data.max_samples); default: all",
    )
    b.add_argument(
        "--data-dir",
        default=None,
        help="where the wordnet tokenizer is trained/kept; default: the project's (data/shards/wordnet/...)",
    )
    return p.parse_args(argv)


class Runner:
    """A model, its fused AdamW and a loss function of a batch; `step(batch)` is one full training step."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn):
        self.name, self.model, self.loss_fn, self.times = name, model.train(), loss_fn, []
        self.opt = torch.optim.AdamW(
            param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True
        )

    def step(self, batch) -> float:
        loss = self.loss_fn(batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def build_pair(args: argparse.Namespace, **kw) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Tessera's decoder and LlamaForCausalLM (sdpa) with the same weights."""
    torch.manual_seed(args.seed)
    ours = create_model(args.model, depth=args.depth, **kw)
    hf = adapter_for_model(ours).to_hf(ours)
    if hf.config._attn_implementation != "sdpa":
        hf.set_attn_implementation("sdpa")
    return ours.train(), hf.train()


def time_rounds(runners: list[Runner], batches_of: dict[str, list], args: argparse.Namespace, steps=None):
    """Warmup, then ABBA rounds; each round a runner steps through `steps` of its batches (default: all)."""
    for r in runners:
        for i in range(args.warmup):
            r.step(batches_of[r.name][i % len(batches_of[r.name])])
    for rnd in range(args.rounds):
        for r in runners if rnd % 2 == 0 else runners[::-1]:
            batches = batches_of[r.name]
            todo = [batches[(rnd * steps + i) % len(batches)] for i in range(steps)] if steps else batches
            t0 = time.perf_counter()
            for batch in todo:
                r.step(batch)  # ends in loss.item()
            r.times.append(time.perf_counter() - t0)
        print(
            f"  round {rnd + 1}/{args.rounds}: " + "  ".join(f"{r.name} {r.times[-1]:.2f} s" for r in runners)
        )


def ratio_stats(ours: list[float], theirs: list[float]) -> dict:
    per_round = sorted(t / o for o, t in zip(ours, theirs))  # their time / ours, same round
    return {
        "ratio": statistics.median(theirs) / statistics.median(ours),
        "per_round_median": statistics.median(per_round),
        "per_round_range": [per_round[0], per_round[-1]],
    }


# --- (a) same batch -------------------------------------------------------------------------------------


def probe() -> float:
    """The fp32 matmul rate (TFLOP/s) this process gets now: the MFU peak, probed before and after each timing."""
    return measure_matmul_tflops(torch.float32, "cpu", seconds=1.0)


def part_same(args: argparse.Namespace) -> list[dict]:
    return [bench_same(n, args) for n in args.seqs]


def bench_same(n: int, args: argparse.Namespace) -> dict:
    ours, hf = build_pair(args, max_seq_len=max(n, 8))
    g = torch.Generator().manual_seed(args.seed + 1)
    batches = [torch.randint(0, ours.vocab_size, (args.batch, n), generator=g) for _ in range(3)]

    def ours_loss(ids):
        logits = ours(ids)  # (B, N, V); no positions, no doc_ids: one document per row
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())

    def hf_loss(ids):
        return hf(input_ids=ids, labels=ids, use_cache=False).loss

    with torch.no_grad():
        losses = {"tessera": ours_loss(batches[0]).item(), "hf_sdpa": hf_loss(batches[0]).item()}
    diff = abs(losses["tessera"] - losses["hf_sdpa"])
    assert diff < 1e-4, f"seq {n}: fp32 losses differ: {losses}"
    print(f"(a) seq {n}: parity ok, fp32 loss {losses['tessera']:.6f} vs {losses['hf_sdpa']:.6f}", flush=True)
    runners = [Runner("tessera", ours, ours_loss), Runner("hf_sdpa", hf, hf_loss)]
    rates = [probe()]
    time_rounds(runners, {r.name: batches for r in runners}, args, steps=args.steps)
    rates.append(probe())
    peak = statistics.mean(rates)
    tokens = args.batch * n * args.steps
    flops = text_flops(ours, n).per_token(n) * tokens  # per round
    t_ours, t_hf = (statistics.median(r.times) for r in runners)
    row = {
        "seq": n,
        "batch": args.batch,
        "params_m": sum(p.numel() for p in ours.parameters()) / 1e6,
        "loss_diff": diff,
        "tessera_tokens_per_s": tokens / t_ours,
        "hf_tokens_per_s": tokens / t_hf,
        "tessera_mfu": flops / t_ours / (peak * 1e12),
        "hf_mfu": flops / t_hf / (peak * 1e12),
        "matmul_tflops": rates,
        "times": {r.name: r.times for r in runners},
        **ratio_stats(runners[0].times, runners[1].times),
    }
    print(
        f"(a) seq {n}: tessera {row['tessera_tokens_per_s']:.0f} tok/s, hf {row['hf_tokens_per_s']:.0f} tok/s, "
        f"hf time / tessera time {row['ratio']:.3f}",
        flush=True,
    )
    return row


# --- (b) packed vs padded on WordNet ----------------------------------------------------------------------


def wordnet_documents(args: argparse.Namespace):
    """(tokenizer info, documents as 1-D int64 token tensors (EOS appended), in a seeded random order)."""
    local = None if args.data_dir is None else os.path.join(args.data_dir, "wordnet", "train")
    cfg = DataConfig(dataset="wordnet", vocab_size=args.vocab, local=local, max_samples=args.tokenizer_docs)
    info = ensure_tokenizer(cfg)  # Tessera's trained byte-level BPE (trained once, then reused)
    texts = [d["text"] for d in get_dataset("wordnet").samples("train")]
    texts = random.Random(args.seed).sample(texts, min(args.docs, len(texts)))  # a shuffled loader's order
    enc = load_tokenizer(info.path).encode_batch(texts, add_special_tokens=False)
    docs = [torch.tensor(e.ids + [info.eos_id], dtype=torch.int64) for e in enc]
    return info, docs


def packed_batches(docs: list[torch.Tensor], pad_id: int, args: argparse.Namespace) -> list[dict]:
    """Tessera's micro-batches: the documents packed in order into rows of pack_len (the last row padded)."""
    packer = Packer(args.pack_len, pad_id)
    for i, d in enumerate(docs):
        packer.add(i, d)
    rows = []
    while (r := packer.emit(1, final=True)) is not None:
        rows.append(r)
    if packer.splits:  # a cut document loses a target and its later piece its context: not the same work
        raise ValueError(f"--pack-len {args.pack_len} is shorter than {packer.splits} of the documents")
    keys = ("input_ids", "positions", "doc_ids")
    return [
        {k: torch.cat([r[k] for r in rows[i : i + args.rows]]) for k in keys}
        for i in range(0, len(rows), args.rows)
    ]


def padded_batches(docs: list[torch.Tensor], pad_id: int, per_batch: int) -> list[dict]:
    """HF batches: per_batch documents in order, right-padded to the longest, attention_mask, labels -100 at pads."""
    out = []
    for i in range(0, len(docs), per_batch):
        chunk = docs[i : i + per_batch]
        n = max(len(d) for d in chunk)
        ids = torch.full((len(chunk), n), pad_id, dtype=torch.int64)
        mask = torch.zeros(len(chunk), n, dtype=torch.int64)
        for j, d in enumerate(chunk):
            ids[j, : len(d)], mask[j, : len(d)] = d, 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)})
    return out


def hf_mean_loss(hf, batches: list[dict]) -> float:
    """Mean next-token CE over every target of every padded batch (fp32, no grad)."""
    total, count = 0.0, 0
    for b in batches:
        logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        labels = b["labels"][:, 1:]
        total += F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += int((labels != IGNORE).sum())
    return total / count


def ours_mean_loss(clm: CLM, batches: list[dict]) -> float:
    total, count = 0.0, 0
    for b in batches:
        out = clm(b)
        total += out["ce"].item() * out["tokens"].item()
        count += int(out["tokens"].item())
    return total / count


def part_packed(args: argparse.Namespace) -> dict:
    info, docs = wordnet_documents(args)
    real = sum(len(d) for d in docs)
    ours_batches = packed_batches(docs, info.padding_id, args)
    docs_per_step = len(docs) / len(ours_batches)
    sizes = [max(1, round(docs_per_step)) if s == "matched" else int(s) for s in args.hf_batch]
    hf_sets = {f"hf_sdpa_b{s}": padded_batches(docs, info.padding_id, s) for s in dict.fromkeys(sizes)}
    ours, hf = build_pair(args, vocab_size=info.vocab_size, max_seq_len=max(args.pack_len, 8))
    clm = CLM(ours, CLMConfig(), info)
    lengths = [len(d) for d in docs]
    print(
        f"(b) {len(docs)} WordNet train glosses, {real} tokens (mean {real / len(docs):.1f}, longest "
        f"{max(lengths)}), tokenizer {info.path}; tessera: {len(ours_batches)} micro-batches of {args.rows} x "
        f"{args.pack_len}; hf: " + ", ".join(f"{k} ({len(v)} batches)" for k, v in hf_sets.items()),
        flush=True,
    )
    with torch.no_grad():
        losses = {"tessera": ours_mean_loss(clm, ours_batches)}
        losses.update({k: hf_mean_loss(hf, v) for k, v in hf_sets.items()})
    diff = max(abs(v - losses["tessera"]) for v in losses.values())
    assert diff < 1e-4, f"packed vs padded: mean fp32 losses differ: {losses}"
    print(f"(b) parity ok, mean fp32 loss over all documents: {losses}", flush=True)

    def hf_loss(b):
        return hf(**b, use_cache=False).loss

    runners = [Runner("tessera", clm, lambda b: clm(b)["loss"])]
    batches_of = {"tessera": ours_batches}
    for name, batches in hf_sets.items():
        # every HF variant trains the same module (its optimizer state is its own): the weights drift the same
        # way for all and the timing does not depend on their values
        runners.append(Runner(name, hf, hf_loss))
        batches_of[name] = batches
    rates = [probe()]
    time_rounds(runners, batches_of, args)
    rates.append(probe())
    peak = statistics.mean(rates)
    flops = real * text_flops(ours, args.pack_len).per_token(sum(s * s for s in lengths) / real)
    slots = {"tessera": sum(b["input_ids"].numel() for b in ours_batches)}
    slots.update({k: sum(b["input_ids"].numel() for b in v) for k, v in hf_sets.items()})
    res = {
        "docs": len(docs),
        "real_tokens": real,
        "mean_doc_tokens": real / len(docs),
        "longest_doc": max(lengths),
        "tokenizer": info.path,
        "pack_len": args.pack_len,
        "rows": args.rows,
        "losses": losses,
        "loss_diff": diff,
        "matmul_tflops": rates,
        "variants": {},
    }
    t_ours = statistics.median(runners[0].times)
    for r, batch_size in zip(runners, [args.rows, *dict.fromkeys(sizes)]):
        t = statistics.median(r.times)
        res["variants"][r.name] = {
            "batch": batch_size,
            "steps": len(batches_of[r.name]),
            "padding": 1 - real / slots[r.name],
            "real_tokens_per_s": real / t,
            "mfu": flops / t / (peak * 1e12),
            "times": r.times,
            **({} if r.name == "tessera" else ratio_stats(runners[0].times, r.times)),
        }
        print(
            f"(b) {r.name}: {real / t:.0f} real tok/s, padding {100 * (1 - real / slots[r.name]):.1f}%"
            + ("" if r.name == "tessera" else f", tessera / {r.name} {t / t_ours:.2f}"),
            flush=True,
        )
    return res


def tables(res: dict) -> str:
    out = []
    if res.get("same"):
        out += [
            "| seq × batch | params | Tessera tok/s | HF sdpa tok/s | HF time / Tessera time (per-round range) "
            "| MFU Tessera / HF | fp32 loss diff | matmul GFLOP/s before/after |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["same"]:
            lo, hi = r["per_round_range"]
            out.append(
                f"| {r['seq']} × {r['batch']} | {r['params_m']:.1f}M | {r['tessera_tokens_per_s']:.0f} | "
                f"{r['hf_tokens_per_s']:.0f} | **{r['ratio']:.3f}** ({lo:.2f}–{hi:.2f}) | "
                f"{100 * r['tessera_mfu']:.1f}% / {100 * r['hf_mfu']:.1f}% | {r['loss_diff']:.1e} | "
                + "/".join(f"{1e3 * v:.0f}" for v in r["matmul_tflops"])
                + " |"
            )
    if res.get("packed"):
        p = res["packed"]
        out += [
            "",
            "| run | batch | steps | padding | real tok/s | Tessera / this (per-round range) | MFU (real tokens) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, v in p["variants"].items():
            what = (
                f"Tessera packed ({p['rows']} × {p['pack_len']})"
                if name == "tessera"
                else f"HF sdpa, padded ({v['batch']} docs)"
            )
            ratio = (
                "—"
                if name == "tessera"
                else f"**{v['ratio']:.2f}** ({v['per_round_range'][0]:.2f}–{v['per_round_range'][1]:.2f})"
            )
            out.append(
                f"| {what} | {v['batch']} | {v['steps']} | {100 * v['padding']:.1f}% | "
                f"{v['real_tokens_per_s']:.0f} | {ratio} | {100 * v['mfu']:.1f}% |"
            )
        out.append(
            f"\n{p['docs']} glosses, {p['real_tokens']} tokens; fp32 loss diff {p['loss_diff']:.1e}; matmul "
            + "/".join(f"{1e3 * v:.0f}" for v in p["matmul_tflops"])
            + " GFLOP/s before/after"
        )
    return "\n".join(out)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tf = import_transformers()
    print(
        f"torch {torch.__version__}, transformers {tf.__version__}, cpu ({os.cpu_count()} cores), threads "
        f"{torch.get_num_threads()}, fp32, fused AdamW; "
        f"{args.model} shape, {args.depth} layers",
        flush=True,
    )
    t0 = time.perf_counter()
    res: dict = {
        "command": "benchmarks/text_vs_hf.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "args": vars(args),
    }
    if "same" in args.parts:
        res["same"] = part_same(args)
    if "packed" in args.parts:
        res["packed"] = part_packed(args)
    res["wall_s"] = time.perf_counter() - t0
    res["load_average_end"] = os.getloadavg()[0]
    md = tables(res)
    print(
        f"\nwall {res['wall_s']:.0f} s, load average {res['load_average_end']:.2f} (1 min, at the end)\n\n{md}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        Path(args.json).with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
