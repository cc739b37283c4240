"""DeepSpeed ZeRO engine — the only module in Tessera that imports deepspeed.

Its JSON config is built here from the typed config (one source of truth). The optimizer is torch's AdamW
(DeepSpeed's FusedAdam would JIT-compile for minutes on CPU), or DeepSpeedCPUAdam when the optimizer
state is offloaded, which DeepSpeed requires.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from pretrain.config import Config
from pretrain.dist import DistContext
from pretrain.engine.base import Engine, StepResult, to_device
from pretrain.optim import param_groups

TAG = "engine"  # DeepSpeed's files live in <checkpoint>/engine/


def _import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        # The CPU accelerator's shared-memory allreduce is JIT-compiled on first use (~2 minutes); gloo does the
        # same job. Pre-seeding the probe cache keeps DeepSpeed from building it.
        ops = vars(deepspeed.ops)
        if "__compatible_ops__" not in ops:
            ops["__compatible_ops__"] = {"deepspeed_shm_comm": False}
        else:
            ops["__compatible_ops__"]["deepspeed_shm_comm"] = False
    return deepspeed


def ds_config(cfg: Config) -> dict:
    """DeepSpeed's config dict, derived from Tessera's typed config."""
    e, t = cfg.engine, cfg.train
    zero: dict = {"stage": e.zero_stage}
    pin = torch.cuda.is_available()
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": e.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg: Config, ctx: DistContext):
        ds = _import_deepspeed()
        self.cfg, self.ctx = cfg, ctx
        for key, value in (
            ("RANK", ctx.rank),
            ("LOCAL_RANK", ctx.local_rank),
            ("WORLD_SIZE", ctx.world_size),
        ):
            os.environ.setdefault(
                key, str(value)
            )  # DeepSpeed reads them even for a single `python -m` process
        ds.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")
        o = cfg.optim
        groups = param_groups(model, o.weight_decay, o.layer_decay)
        if cfg.engine.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)
        self.config = ds_config(cfg)
        self.ds, self.optimizer, _, _ = ds.initialize(model=model, optimizer=optimizer, config=self.config)
        self.module = self.ds.module
        self.float_dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else None
        if self.ds.gradient_accumulation_steps() != cfg.train.grad_accum_steps:
            raise RuntimeError(
                "DeepSpeed did not take train.grad_accum_steps"
            )  # would silently change the batch

    def describe(self) -> str:
        e = self.cfg.engine
        offload = " offload-optimizer" * e.offload_optimizer + " offload-params" * e.offload_params
        return f"deepspeed (ZeRO-{self.ds.zero_optimization_stage()}, {e.precision}{offload})"

    def train_step(self, micro_batches: list[dict], lr: float) -> StepResult:
        if len(micro_batches) != self.cfg.train.grad_accum_steps:
            raise ValueError(
                "DeepSpeed steps exactly train.grad_accum_steps micro-batches per optimizer step"
            )
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise LR decay
        outputs, total = [], 0.0  # summed on device: one host sync per step, not per micro-batch
        norm = None
        for i, batch in enumerate(micro_batches):
            out = self.ds(to_device(batch, self.ctx.device, self.float_dtype))
            self.ds.backward(out["loss"])  # DeepSpeed divides by the accumulation steps itself
            if i == len(micro_batches) - 1 and self.ds.zero_optimization_stage() == 0:
                # without ZeRO, DeepSpeed does not record the norm; gradients are all-reduced by now
                grads = [p.grad for p in self.module.parameters() if p.grad is not None]
                norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
                )
            self.ds.step()  # applies the update only at the accumulation boundary
            total = total + out["loss"].detach().float()
            outputs.append(out)
        if norm is None:
            norm = self.ds.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("DeepSpeed reported no gradient norm for this step")
        norm = float(norm.item() if isinstance(norm, torch.Tensor) else norm)
        return StepResult(loss=float(total) / len(micro_batches), outputs=outputs, grad_norm=norm)

    def save(self, folder: Path) -> None:
        # every rank writes its own shard of parameters and optimizer state
        self.ds.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(folder.parent), tag=folder.name, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}")


def consolidate(folder: str) -> dict:
    """fp32 state dict from a DeepSpeed checkpoint folder (ZeRO 1-3 via zero_to_fp32; stage 0 directly)."""
    folder = Path(folder)
    _import_deepspeed()
    if any(folder.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        return {k: v.float() for k, v in sd.items()}
    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed model states (mp_rank_*_model_states.pt)")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in state["module"].items()}
