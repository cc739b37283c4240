"""CLIP training step: Tessera's `clip_vit_b16` vs transformers' CLIPModel holding the same weights (CPU, fp32).

Tessera: the two-tower `clip_vit_b16` (a pre-norm ViT-B/16 at `--image-size` px + a 12-layer 512-wide causal text
transformer pooled at the first EOS, bias-free projections to 512) under the `clip` objective
(pretrain/objectives/contrastive.py: ClipLoss, local loss, one rank). transformers: CLIPModel built by the export
(models/two_tower_hf.two_tower_to_hf: same weights, loaded strictly; every weight is first moved off its init by
N(0, 0.02²) noise, so the parity check cannot pass by init luck), attention "sdpa" (its default), called with
return_loss=True. Both get the same batch: `--batch` random images (N(0, 1), as if normalized) and random
captions [BOS] ids [EOS] right-padded with 0 to 77 tokens. Both text towers run causal attention only and pool at
the first EOS, so the padding cannot reach the embedding; HF gets no attention_mask unless --hf-attention-mask
(its sdpa then takes an explicit padding mask: the same embeddings).

One step = forward (both towers, the symmetric InfoNCE over the batch) + backward + AdamW step (fused, weight
decay 0.1 off biases / norms / embeddings / logit_scale, as pretrain.optim.param_groups builds it for either model;
no gradient clipping on either side). Before timing, the fp32 image and text embeddings, logits and loss of the
two must agree to 1e-4 (max abs difference).

Timing: `--warmup` steps each, then `--steps` rounds alternating A B A B ... (Tessera, then HF, each one step);
reported: best and median seconds per side, and HF time / Tessera time for both (> 1: Tessera faster), and the
same ratio of the least CPU time (time.process_time, all threads) of a step, which other processes barely change
(with `--threads 1`: the work itself). On a shared machine the best is the least disturbed; the load average is
printed before and after. `--depth` sets
both towers' depth (12 = the real shape), for a cheap smoke run.

    .venv/bin/python benchmarks/clip_vs_hf.py --json out/clip_vs_hf.json
    .venv/bin/python benchmarks/clip_vs_hf.py --threads 1 --steps 4 --json out/clip_vs_hf_t1.json  # loaded
    .venv/bin/python benchmarks/clip_vs_hf.py --batch 2 --depth 1 --image-size 32 --steps 2   # smoke

Results and analysis: docs/benchmarks.md (issue 11: CLIP vs transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models import create_model  # noqa: E402
from ops.compat import ensure_torchvision_importable  # noqa: E402
from pretrain.objectives.contrastive import Clip, ClipConfig  # noqa: E402
from pretrain.optim import param_groups  # noqa: E402

TOLERANCE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="clip_vit_b16", help="a two-tower whose export target is CLIPModel")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--depth", type=int, default=None, help="both towers' depth (default: the model's, 12)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side, alternated A B A B")
    p.add_argument("--hf-attention-mask", action="store_true", help="pass attention_mask to CLIPModel too")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here (and the table next to it, .md)")
    return p.parse_args(argv)


def build_pair(args: argparse.Namespace) -> tuple[Clip, torch.nn.Module]:
    """Tessera's clip objective around the two-tower, and CLIPModel holding the same weights (both train())."""
    ensure_torchvision_importable()  # before transformers imports its CLIP classes
    from models.two_tower_hf import two_tower_to_hf

    overrides: dict = {"img_size": args.image_size}
    if args.depth is not None:
        with torch.device("meta"):  # the towers' full kwargs without allocating the model
            hp = create_model(args.model).hparams()
        overrides["image_kwargs"] = {**hp["image_kwargs"], "depth": args.depth}
        overrides["text_kwargs"] = {**hp["text_kwargs"], "depth": args.depth}
    torch.manual_seed(args.seed)
    backbone = create_model(args.model, **overrides)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # off the init (unit norm weights, zero biases), so parity cannot pass by init luck
        for p in backbone.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    hf = two_tower_to_hf(backbone)
    if hf.config._attn_implementation != "sdpa":
        hf.set_attn_implementation("sdpa")
    return Clip(backbone, ClipConfig()).train(), hf.train()


def make_batch(backbone, batch: int, seed: int) -> dict:
    """`batch` random images and captions [BOS] ids [EOS] padded with 0 to the context length."""
    g = torch.Generator().manual_seed(seed)
    vocab, length, eos = backbone.vocab_size, backbone.context_length, backbone.eos_token_id
    bos = eos - 1  # CLIP's <|startoftext|> is the id before <|endoftext|>
    ids = torch.randint(1, bos, (batch, length), generator=g)  # (B, L), never BOS / EOS / pad
    lengths = torch.randint(3, length + 1, (batch,), generator=g)  # (B,) BOS and EOS included
    pos = torch.arange(length)[None]  # (1, L)
    ids[:, 0] = bos
    ids = torch.where(pos == (lengths - 1)[:, None], eos, ids)
    mask = (pos < lengths[:, None]).long()  # (B, L)
    assert vocab > eos
    size = backbone.img_size
    return {
        "image": torch.randn(batch, backbone.in_chans, size, size, generator=g),  # (B, C, S, S)
        "input_ids": ids.masked_fill(mask == 0, 0),
        "attention_mask": mask,
    }


def hf_inputs(batch: dict, with_mask: bool) -> dict:
    out = {"pixel_values": batch["image"], "input_ids": batch["input_ids"], "return_loss": True}
    if with_mask:
        out["attention_mask"] = batch["attention_mask"]
    return out


def check_parity(ours: Clip, hf, batch: dict, args: argparse.Namespace) -> dict:
    """Max abs differences of the fp32 embeddings, logits and loss; AssertionError above TOLERANCE."""
    from models.two_tower_hf import hf_embeddings, tessera_embeddings

    mask = batch["attention_mask"] if args.hf_attention_mask else None
    with torch.no_grad():
        a = tessera_embeddings(ours.backbone, batch["image"], batch["input_ids"])
        b = hf_embeddings(hf, batch["image"], batch["input_ids"], mask)
        diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
        loss_ours = ours(batch)["loss"].item()
        loss_hf = hf(**hf_inputs(batch, args.hf_attention_mask)).loss.item()
    diffs["loss"] = abs(loss_ours - loss_hf)
    bad = {k: v for k, v in diffs.items() if not v < TOLERANCE}
    assert not bad, f"Tessera and CLIPModel differ beyond {TOLERANCE}: {bad} (loss {loss_ours} vs {loss_hf})"
    return {"diffs": diffs, "loss": loss_ours, "loss_hf": loss_hf}


class Runner:
    """A model, its fused AdamW and a loss of the batch; `step()` is one full training step, timed."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn):
        self.name, self.model, self.loss_fn, self.times, self.cpu = name, model, loss_fn, [], []
        self.opt = torch.optim.AdamW(
            param_groups(model, 0.1), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, fused=True
        )

    def step(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one step."""
        t0, c0 = time.perf_counter(), time.process_time()
        loss = self.loss_fn()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - t0, time.process_time() - c0


def stats(r: Runner) -> dict:
    return {
        "best_s": min(r.times),
        "median_s": statistics.median(r.times),
        "times": r.times,
        "cpu_best_s": min(r.cpu),
        "cpu_times": r.cpu,
    }


def table(res: dict) -> str:
    t, h = res["tessera"], res["hf_sdpa"]
    head = [
        "| model | batch | image px | depth | Tessera s/step best (median) | CLIPModel s/step best (median) "
        "| HF / Tessera best (median) | HF / Tessera CPU time (best) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    line = (
        f"| {res['model']} ({res['params_m']:.1f} M) | {res['batch']} | {res['image_size']} | {res['depth']} | "
        f"{t['best_s']:.3f} ({t['median_s']:.3f}) | {h['best_s']:.3f} ({h['median_s']:.3f}) | "
        f"{res['ratio_best']:.3f} ({res['ratio_median']:.3f}) | {res['ratio_cpu']:.3f} |"
    )
    return "\n".join(head + [line])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    ours, hf = build_pair(args)
    batch = make_batch(ours.backbone, args.batch, args.seed + 1)
    parity = check_parity(ours, hf, batch, args)
    depth = len(ours.backbone.visual.blocks)
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(
        f"torch {torch.__version__}, cpu ({os.cpu_count()} cores), threads {torch.get_num_threads()}; "
        f"{args.model}: {params:.1f} M parameters, depth {depth}, {args.image_size} px, batch {args.batch}; "
        f"parity ok: "
        + ", ".join(f"{k} {v:.1e}" for k, v in parity["diffs"].items())
        + f"; load {load0:.2f}",
        flush=True,
    )
    hf_in = hf_inputs(batch, args.hf_attention_mask)
    runners = [
        Runner("tessera", ours, lambda: ours(batch)["loss"]),
        Runner("hf_sdpa", hf, lambda: hf(**hf_in).loss),
    ]
    for r in runners:
        for _ in range(args.warmup):
            r.step()
    for i in range(args.steps):
        for r in runners:  # A B A B: each side sees the same stretch of machine load
            wall, cpu = r.step()
            r.times.append(wall)
            r.cpu.append(cpu)
        print(f"  step {i + 1}/{args.steps}: " + "  ".join(f"{r.name} {r.times[-1]:.3f} s" for r in runners))
    load1 = os.getloadavg()[0]
    t, h = (stats(r) for r in runners)
    res = {
        "command": "benchmarks/clip_vs_hf.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "params_m": params,
        "depth": depth,
        "batch": args.batch,
        "image_size": args.image_size,
        "hf_attention_mask": args.hf_attention_mask,
        "parity": parity,
        "tessera": t,
        "hf_sdpa": h,
        "ratio_best": h["best_s"] / t["best_s"],
        "ratio_median": h["median_s"] / t["median_s"],
        "ratio_cpu": h["cpu_best_s"] / t["cpu_best_s"],
        "load_average": [load0, load1],
    }
    md = table(res)
    print(f"\nload average {load0:.2f} before, {load1:.2f} after (1 min)\n\n{md}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        Path(args.json).with_suffix(".md").write_text(md + "\n")
    return res


if __name__ == "__main__":
    main()
