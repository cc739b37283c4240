"""One rank of tests/test_grad_cache.py's multi-rank checks (run by torchrun): the fake two-tower objective, this
rank's shard of a fixed global batch in k micro-batches, one optimizer step through a real engine; rank 0 saves
the parameters. AdamW with eps = lr = 1e6 makes the first step's update the gradient itself (g * 1e6 / (|g| +
1e6)), so comparing parameters after the step compares gradients.

    torchrun --nproc_per_node W tests/grad_cache_worker.py --engine torch|deepspeed --stage S --cases I:K,.. --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.dist import init_distributed  # noqa: E402
from tests.test_grad_cache import OBJECTIVES, batch, objective, split  # noqa: E402

GLOBAL = 12


def engine_cfg(engine: str, stage: int, k: int, micro: int, dtype: str):
    return types.SimpleNamespace(
        optim=types.SimpleNamespace(lr=1e6, weight_decay=0.0, layer_decay=1.0, betas=(0.9, 0.999), eps=1e6),
        engine=types.SimpleNamespace(
            backend=engine, zero_stage=stage, precision=dtype, offload_optimizer=False, offload_params=False
        ),
        train=types.SimpleNamespace(grad_clip=0.0, micro_batch_size=micro, grad_accum_steps=k),
    )


def run_case(ctx, engine_name: str, stage: int, index: int, k: int, out: Path) -> dict:
    cls, ocfg, bias = OBJECTIVES[index]
    module = objective(cls, ocfg, p=0.0, bias=bias)
    per_rank = GLOBAL // ctx.world_size
    full = batch(GLOBAL, seed=11)
    mine = {key: v[ctx.rank * per_rank : (ctx.rank + 1) * per_rank] for key, v in full.items()}
    cfg = engine_cfg(engine_name, stage, k, per_rank // k, "fp32")
    if engine_name == "torch":
        from pretrain.engine.ddp import TorchEngine

        engine = TorchEngine(module, cfg, ctx)
    else:
        from pretrain.engine.deepspeed_engine import DeepSpeedEngine

        engine = DeepSpeedEngine(module, cfg, ctx)
    result = engine.train_step(split(mine, k), lr=1e6)
    if engine_name == "deepspeed":  # the consolidated fp32 master weights
        from pretrain.engine import consolidated_state_dict

        folder = out / f"engine-{index}-{k}"
        engine.save(folder)
        torch.distributed.barrier()
        state = consolidated_state_dict(str(folder), "deepspeed") if ctx.is_main else None
    else:
        state = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return {"params": state, "loss": result.loss}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", default="torch")
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--cases", default="0:1", help="OBJECTIVE_INDEX:K,... (test_grad_cache.OBJECTIVES)")
    p.add_argument("--out", required=True, help="a folder; rank 0 writes results.pt there")
    a = p.parse_args()
    ctx = init_distributed(force_process_group=True)
    out = Path(a.out)
    results = {}
    for case in a.cases.split(","):
        index, k = (int(v) for v in case.split(":"))
        results[case] = run_case(ctx, a.engine, a.stage, index, k, out)
    if ctx.is_main:
        torch.save(results, out / "results.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
