"""A self-supervised recipe end to end, with its baselines, in one command: does the pretraining help?

    python -m pretrain.recipe CONFIG [--finetune configs/finetune_fmnist.yaml] [--ranks 2] [--export OUT]
                                     [--set key=value ...]

1. pretrains CONFIG (`accelerate launch` on `--ranks` CPU processes, as scripts/demo.sh; 1 = a plain process; a
   run directory that already holds the finished run resumes at its end, so the rest reuses it);
2. optionally exports it (`--export OUT`, python -m pretrain.export);
3. probes the frozen encoder (python -m pretrain.probe): linear probe and kNN of the pretrained encoder, of a
   random-init encoder of the same shape, and of raw pixels;
4. fine-tunes the same architecture with `classify` twice at the same budget (the `--finetune` config): from the
   pretrained weights (`model.init_from`) and from scratch, and scores both classifiers on the whole test split.
Prints one table and writes RUN/recipe.json. `--set` overrides go to the pretraining run only.
A distill config replaces steps 3-4 by the probe of the distilled student, a random-init one, raw pixels and the
teacher itself (its pooled features on the same images).
An image-text (two-tower) config replaces steps 3-4 by python -m pretrain.clip_eval: held-out image<->text
retrieval and zero-shot accuracy of the trained model, a random-init one and chance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from pretrain.build import load_config, model_modality

FINETUNE = "configs/finetune_fmnist.yaml"


def _run(cmd: list[str]) -> None:
    """Run a stage, its output streaming to ours; stop the recipe when it fails."""
    print("[recipe] $ " + " ".join(cmd), flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise SystemExit(f"[recipe] stage failed (exit {code}): {' '.join(cmd)}")


def train_cmd(config: str, ranks: int, overrides: list[str]) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    if ranks == 1:
        return [sys.executable, "-m", "pretrain.train", config, *sets]
    launcher = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={ranks}"),
        *("--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"),
    ]
    return [*launcher, "-m", "pretrain.train", config, *sets]


@torch.no_grad()
def classifier_accuracy(run: str | Path, split: str = "test", batch: int = 500) -> tuple[float, int]:
    """(top-1 accuracy, images) of a classify run's last checkpoint on a whole split of its dataset, read the
    way its training read images (its size and normalization), without augmentation."""
    from pretrain.data import load_split
    from pretrain.export import load_checkpoint_model

    model, meta, cfg = load_checkpoint_model(run, with_config=True)
    d = cfg.data
    images, labels = load_split(d.dataset, split, d.image_size, source=d.source, mean=d.mean, std=d.std)
    correct = 0
    for i in range(0, len(labels), batch):
        logits = model.backbone(images[i : i + batch])  # (b, num_classes)
        correct += int((logits.argmax(-1) == labels[i : i + batch]).sum())
    return correct / len(labels), len(labels)


def finetune_overrides(pre_cfg, out: Path, init_from: Path | None) -> list[str]:
    """The fine-tune run: the pretrained architecture (model.name, model.kwargs) and its data (dataset, image size,
    flips), the fine-tune config's everything else; init_from the pretraining run, or nothing (from scratch)."""
    sets = [
        f"model.name={pre_cfg.model.name}",
        "model.kwargs=" + json.dumps(pre_cfg.model.kwargs),
        f"data.dataset={pre_cfg.data.dataset}",
        f"data.image_size={pre_cfg.data.image_size}",
        f"data.hflip={str(pre_cfg.data.hflip).lower()}",
        f"run.output_dir={out}",
    ]
    return sets + ([f"model.init_from={init_from}"] if init_from is not None else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.recipe", description=__doc__.split("\n")[0])
    p.add_argument("config", help="the pretraining config (configs/*.yaml)")
    p.add_argument(
        "--finetune", default=FINETUNE, help=f"the classify config of both fine-tunes ({FINETUNE})"
    )
    p.add_argument(
        "--ranks", type=int, default=2, help="CPU processes per run (accelerate launch); 1 = plain"
    )
    p.add_argument(
        "--finetune-ranks", type=int, default=1, help="processes of each fine-tune (1: faster on a small CPU)"
    )
    p.add_argument("--export", default=None, metavar="OUT", help="also export the pretrained run to OUT")
    p.add_argument("--probe-samples", type=int, default=10000, help="train and test images of the probe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pretraining override")
    args = p.parse_args(argv)

    pre_cfg = load_config(args.config, args.set)  # a bad config fails here, before any work
    image_text = model_modality(pre_cfg.model.name) == "image_text"
    if not image_text:
        load_config(args.finetune)
    run = Path(pre_cfg.run.output_dir)
    t0 = time.time()
    _run(train_cmd(args.config, args.ranks, args.set))
    t_pre = time.time() - t0
    probed = run
    if args.export:
        _run([sys.executable, "-m", "pretrain.export", str(run), args.export, "--overwrite"])
        probed = Path(args.export)
    if image_text:  # a two-tower run: held-out retrieval and zero-shot vs random init and chance
        _run([sys.executable, "-m", "pretrain.clip_eval", str(run)])
        scores = json.loads((run / "clip_eval.json").read_text())
        results = {"config": args.config, "pretrain_seconds": round(t_pre, 1), "clip_eval": scores}
        (run / "recipe.json").write_text(json.dumps(results, indent=1))
        print(
            f"[recipe] {args.config}: training {t_pre:.0f} s (scores above: python -m pretrain.clip_eval {run})"
        )
        return 0
    n = str(args.probe_samples)
    if type(pre_cfg.objective).__name__ == "DistillConfig":  # the student next to its teacher; no fine-tune
        return _distill_report(args, pre_cfg, run, probed, t_pre)
    probe_json = run / "probe.json"
    _run(
        [sys.executable, "-m", "pretrain.probe", str(probed), "--json", str(probe_json)]
        + ["--train-samples", n, "--test-samples", n]
    )
    results = {
        "config": args.config,
        "pretrain_seconds": round(t_pre, 1),
        "probe": json.loads(probe_json.read_text()),
    }
    finetuned = {}
    for name, init in (("from_pretrained", run), ("from_scratch", None)):
        out = run / f"finetune_{name}"
        t1 = time.time()
        _run(train_cmd(args.finetune, args.finetune_ranks, finetune_overrides(pre_cfg, out, init)))
        acc, count = classifier_accuracy(out)
        finetuned[name] = {"test_accuracy": acc, "test_images": count, "seconds": round(time.time() - t1, 1)}
    results["finetune"] = finetuned
    ft = yaml.safe_load((run / "finetune_from_scratch" / "config.yaml").read_text())
    results["finetune_budget"] = {
        k: ft["train"][k] for k in ("max_steps", "micro_batch_size", "grad_accum_steps")
    }
    results["finetune_budget"]["ranks"] = args.finetune_ranks
    (run / "recipe.json").write_text(json.dumps(results, indent=1))
    print(summary(results))
    return 0


def teacher_probe(cfg, train_samples: int, test_samples: int) -> dict:
    """Linear probe and kNN of the run's teacher's pooled features on the probe's images (the student's eval
    preprocessing, converted to the teacher's as in training)."""
    import dataclasses

    from pretrain.objectives.distill import load_configured_teacher, student_input
    from pretrain.probe import load_eval_images, score

    if not cfg.objective.teacher:
        return {}
    teacher = load_configured_teacher(cfg.objective, cfg.data)
    data = dataclasses.asdict(cfg.data)
    tr_x, tr_y, te_x, te_y = load_eval_images(data, None, cfg.data.image_size, train_samples, test_samples)
    pre = student_input(cfg.data)

    def feats(x):
        return torch.cat([teacher(x[i : i + 256], pre)["features"] for i in range(0, len(x), 256)])

    out = score(feats(tr_x), tr_y, feats(te_x), te_y)
    return {
        "teacher": out["linear_probe"],
        "teacher_knn": out["knn"],
        "teacher_parameters": sum(p.numel() for p in teacher.net.parameters()),
    }


def _distill_report(args, cfg, run: Path, probed: Path, t_pre: float) -> int:
    from pretrain.export import load_checkpoint_model

    n = str(args.probe_samples)
    probe_json = run / "probe.json"
    _run(
        [sys.executable, "-m", "pretrain.probe", str(probed), "--json", str(probe_json)]
        + ["--train-samples", n, "--test-samples", n]
    )
    probe = json.loads(probe_json.read_text())
    t1 = time.time()
    probe.update(teacher_probe(cfg, args.probe_samples, args.probe_samples))
    model, _ = load_checkpoint_model(run)
    probe["student_parameters"] = sum(p.numel() for p in model.backbone.parameters())
    results = {
        "config": args.config,
        "pretrain_seconds": round(t_pre, 1),
        "probe": probe,
        "teacher_probe_seconds": round(time.time() - t1, 1),
    }
    (run / "recipe.json").write_text(json.dumps(results, indent=1))
    print(distill_summary(results))
    return 0


def distill_summary(r: dict) -> str:
    pr = r["probe"]
    rows = [
        f"[recipe] {r['config']}: distillation {r['pretrain_seconds']:.0f} s; student "
        f"{pr['student_parameters'] / 1e6:.2f}M parameters (head included), teacher "
        f"{pr.get('teacher_parameters', 0) / 1e6:.2f}M",
        "[recipe] frozen features           linear probe   kNN",
    ]
    for key, label in (
        ("teacher", "teacher"),
        ("pretrained", "distilled student"),
        ("random_init", "random-init student"),
        ("raw_pixels", "raw pixels"),
    ):
        rows.append(f"[recipe]   {label:<24} {_fmt(pr.get(key)):>10}   {_fmt(pr.get(f'{key}_knn')):>6}")
    if pr.get("teacher"):
        rows.append(
            f"[recipe] student / teacher linear probe: {pr['pretrained'] / pr['teacher']:.1%}; "
            f"student - random init: {100 * (pr['pretrained'] - pr['random_init']):+.1f} points"
        )
    return "\n".join(rows)


def summary(r: dict) -> str:
    pr, ft, b = r["probe"], r["finetune"], r["finetune_budget"]
    rows = [
        f"[recipe] {r['config']}: pretraining {r['pretrain_seconds']:.0f} s",
        "[recipe] frozen features           linear probe   kNN",
    ]
    for key, label in (
        ("pretrained", "pretrained encoder"),
        ("random_init", "random-init encoder"),
        ("raw_pixels", "raw pixels"),
    ):
        probe, knn = pr.get(key), pr.get(f"{key}_knn")
        rows.append(f"[recipe]   {label:<24} {_fmt(probe):>10}   {_fmt(knn):>6}")
    rows.append(
        f"[recipe] fine-tune (classify, {b['max_steps']} steps of {b['micro_batch_size']} x {b['grad_accum_steps']}"
        f" x {b['ranks']} rank(s)), test accuracy:"
    )
    for key, label in (("from_pretrained", "from the pretrained run"), ("from_scratch", "from scratch")):
        f = ft[key]
        rows.append(
            f"[recipe]   {label:<24} {f['test_accuracy']:.4f}  ({f['test_images']} images, {f['seconds']:.0f} s)"
        )
    return "\n".join(rows)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    sys.exit(main())
