"""DeepSpeed ZeRO engine — the only module in Tessera that imports deepspeed.

Its JSON config is built here from the typed config (one source of truth). The optimizer is torch's AdamW
(DeepSpeed's FusedAdam would JIT-compile for minutes on CPU), or DeepSpeedCPUAdam when the optimizer
state is offloaded, which DeepSpeed requires.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from pretrain.config import Config
from pretrain.dist import DistContext
from pretrain.engine.base import Engine, StepResult, param_bounds, to_device
from pretrain.engine.cached import CachedStep, uses_cache
from pretrain.optim import param_groups

TAG = "engine"  # DeepSpeed's files live in <checkpoint>/engine/
# <checkpoint>/engine_universal/: DeepSpeed's universal form of engine/, made at the first elastic resume
UNIVERSAL = "engine_universal"
log = logging.getLogger("tessera")


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
        batches = [to_device(b, self.ctx.device, self.float_dtype) for b in micro_batches]
        plan, chunks = None, ((i, b, None) for i, b in enumerate(batches))
        if uses_cache(self.module):  # GradCache: pretrain/engine/cached.py
            plan = CachedStep(self.module, batches, self.ctx.device, contextlib.nullcontext)
            whole = plan.prepare(self.ds)
            chunks = plan.chunks() if len(batches) > 1 else [(0, None, "single")]
        for i, batch, cached in chunks:
            if cached == "single":  # one micro-batch: its features kept their graph
                out = {"loss": plan.surrogate_single()}
                self.ds.backward(out["loss"], scale_wrt_gas=False)
            elif cached is None:
                out = self.ds(batch)
                self.ds.backward(out["loss"])  # DeepSpeed divides by the accumulation steps itself
            else:  # the cached gradients are already the whole batch's: no 1/k
                out = self.ds(batch, cached=cached)
                self.ds.backward(out["loss"], scale_wrt_gas=False)
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
        self._clamp_bounded()
        if plan is not None:
            return StepResult(loss=float(whole["loss"]), outputs=[whole], grad_norm=norm)
        return StepResult(loss=float(total) / len(micro_batches), outputs=outputs, grad_norm=norm)

    def _clamp_bounded(self) -> None:
        """Keep the objective's bounded parameters (param_bounds) in bounds after the step: in the fp32 master
        copy the optimizer holds (sharded under ZeRO), through DeepSpeed's safe accessors."""
        bounded = param_bounds(self.module)
        if not bounded:
            return
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_local_fp32_param,
            safe_set_full_fp32_param,
            safe_set_local_fp32_param,
        )

        for p, (low, high) in bounded:
            if (
                self.ds.zero_optimization_stage() == 3
            ):  # each rank clamps its own shard (clamping is elementwise)
                local = safe_get_local_fp32_param(p)
                if local is not None and local.numel():
                    safe_set_local_fp32_param(p, local.clamp(low, high))
                continue
            master = safe_get_full_fp32_param(p)
            if master is None:  # no ZeRO: the parameter is its own master copy
                with torch.no_grad():
                    p.clamp_(low, high)
                continue
            safe_set_full_fp32_param(p, master.clamp(low, high))

    def save(self, folder: Path) -> None:
        # every rank writes its own shard of parameters and optimizer state
        self.ds.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(folder.parent), tag=folder.name, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}")

    def load_resharded(self, folder: Path) -> None:
        """Elastic resume: re-partition model and optimizer state written by another number of ranks.

        ZeRO 1-3 shards hold flat slices of the fp32 master weights and Adam moments, cut for the old world
        size; DeepSpeed refuses to load them on another one. Rank 0 converts engine/ once into DeepSpeed's
        universal form (full per-parameter tensors, by name), which every rank then slices for this world
        size.
        """
        if self.ds.zero_optimization_stage() == 0:
            self.load(folder)  # nothing is partitioned: the files hold the whole model and optimizer
            return
        universal = folder.parent / UNIVERSAL
        failure: BaseException | None = None
        if self.ctx.is_main:
            try:
                to_universal(folder, universal)
            except Exception as e:  # every rank must raise, not wait for a conversion that will not come
                failure = e
        message = self.ctx.broadcast_object(
            None if failure is None else f"{type(failure).__name__}: {failure}"
        )
        if failure is not None:
            raise failure
        if message is not None:
            raise RuntimeError(f"rank 0 could not convert {folder} to a universal checkpoint: {message}")
        config = self.ds._config  # DeepSpeed reads this switch only inside load_checkpoint
        config.load_universal_checkpoint = True
        try:
            path, _ = self.ds.load_checkpoint(
                str(universal.parent), tag=universal.name, load_lr_scheduler_states=False
            )
        finally:
            config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no universal checkpoint in {universal}")
        self._restore_what_universal_load_skips(universal)

    def _restore_what_universal_load_skips(self, universal: Path) -> None:
        """Mend what DeepSpeed 0.19's universal load gets wrong or leaves out, so that training continues as
        after a same-size load: the module's buffers (e.g. BatchNorm statistics) are not loaded; under ZeRO-3
        every optimizer group gets group 0's settings (weight_decay, lr_scale) and one shared `step` tensor,
        which torch's AdamW then advances once per group and step (a wrong bias correction from then on)."""
        files = sorted(universal.glob("*model_states.pt"))
        state = torch.load(files[0], map_location="cpu", weights_only=False)
        buffers = dict(self.module.named_buffers())
        with torch.no_grad():
            for name in state.get("buffer_names", []):
                buffers[name].copy_(state["module"][name])
        saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
        groups = saved["param_groups"]
        if len(groups) != len(self.optimizer.param_groups):
            raise RuntimeError(
                f"{universal} has {len(groups)} optimizer groups, this model has "
                f"{len(self.optimizer.param_groups)}"
            )
        for group, old in zip(self.optimizer.param_groups, groups):
            group.update({k: v for k, v in old.items() if k != "params"})
        for param_state in self.optimizer.optimizer.state.values():  # torch's AdamW inside the ZeRO wrapper
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()


def to_universal(engine_dir: Path, out: Path) -> Path:
    """Convert a ZeRO checkpoint folder into DeepSpeed's universal form at `out`, once (on one rank only).

    `out`/zero/<parameter name>/{fp32,exp_avg,exp_avg_sq,step}.pt hold each parameter's whole fp32 master
    weight and Adam state; zero/optimizer_state.pt the optimizer's settings. Written into `out`.tmp/ and
    renamed into place, so a crash mid-conversion leaves the checkpoint as it was (the .tmp is redone next
    time).
    """
    if out.is_dir():
        return out
    _import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(engine_dir),
        output_folder=str(tmp / out.name),  # ds_to_universal also writes `latest_universal` next to it
        num_extract_workers=1,  # in-process: no pool forked from a training rank
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our model is no Megatron model: it carries no universal-checkpoint info
    )
    chatter = io.StringIO()  # its prints and progress bars
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except BaseException:
        log.error(
            "converting %s to a universal checkpoint failed; its output:\n%s", engine_dir, chatter.getvalue()
        )
        raise
    _fsync_tree(tmp)
    os.replace(tmp / out.name, out)
    shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(out.parent)
    log.info("converted %s to a universal checkpoint in %s", engine_dir, out)
    return out


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file, then every folder, under `folder`: the rename that follows publishes whole files."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(d)
    _fsync_dir(folder)


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
