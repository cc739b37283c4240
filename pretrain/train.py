"""Tessera's one training entry point.

    python -m pretrain.train CONFIG [--set key=value ...]
    torchrun --nproc_per_node N -m pretrain.train CONFIG ...
    accelerate launch --multi_gpu --num_processes N -m pretrain.train CONFIG ...
    srun python -m pretrain.train CONFIG ...
A run whose run.output_dir already holds a checkpoint resumes from the latest one. SIGUSR1 or SIGTERM: finish
the step, checkpoint, exit 75 so the job requeues (pretrain.preempt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.accelerate import LaunchError, merge_overrides
from pretrain.build import load_config
from pretrain.checkpoint import Checkpointer, check_resumable
from pretrain.config import Config, ConfigError, resolve_batch, to_yaml
from pretrain.dist import DistContext, init_distributed, shutdown
from pretrain.faults import Faults
from pretrain.guard import GuardRecord, LossGuard, TrainingDiverged
from pretrain.logger import MetricsLogger, setup_logging
from pretrain.loop import Progress, Session, train_loop
from pretrain.preempt import EXIT_REQUEUE, StopRequest, write_status
from pretrain.samplelog import SampleLog, next_segment


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__.split("\n")[1])
    p.add_argument("config", help="YAML file in configs/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def run(cfg: Config, ctx: DistContext, notes: list[str], stop: StopRequest) -> Progress:
    from pretrain.build import build_model, count_params
    from pretrain.data import build_train_loader
    from pretrain.engine import build_engine
    from pretrain.mfu import build_throughput
    from pretrain.monitor import Monitor

    log = setup_logging(ctx)
    out = Path(cfg.run.output_dir)
    config_yaml = to_yaml(cfg)
    ckpt = Checkpointer(out / "checkpoints", ctx, cfg.checkpoint.keep_last)
    latest = ctx.broadcast_object(ckpt.latest())  # rank 0 decides: every rank must load the same one
    if latest is not None and not cfg.checkpoint.resume:
        raise ConfigError(
            f"checkpoint.resume: false, but {out} already holds checkpoints ({latest.name}); "
            "use a new run.output_dir (nothing there was changed)"
        )
    if latest is not None:
        check_resumable(latest, config_yaml, ctx.world_size)
    if ctx.is_main:
        (out / "config.yaml").write_text(config_yaml)
    faults = Faults.from_env()

    def open_loader(state: dict | None):
        loader = build_train_loader(
            cfg.data, ctx, cfg.train.micro_batch_size, cfg.seed, cfg.train.grad_accum_steps
        )
        if state is not None:
            try:
                loader.load_state_dict(state)
            except BaseException:
                loader.close()
                raise
        return loader

    loader = open_loader(None)  # data errors first, before the model is built
    try:
        model = build_model(cfg)
        if cfg.model.init_from and latest is None:  # a resumed run has its own weights
            from pretrain.init_from import init_from

            for line in init_from(model, cfg):
                log.info("model.init_from: %s", line)
        engine = build_engine(model, cfg, ctx)
        log.info(
            "world_size=%d launcher=%s device=%s engine=%s",
            ctx.world_size,
            ctx.launcher,
            ctx.device,
            engine.describe(),
        )
        log.info(
            "model %s + objective %s: %.2fM parameters; %d samples per step; output %s",
            cfg.model.name,
            type(engine.module).__name__,
            count_params(engine.module) / 1e6,
            cfg.train.micro_batch_size * cfg.train.grad_accum_steps * ctx.world_size,
            out,
        )
        for note in notes:
            log.info("set by the launcher: %s", note)
        throughput = build_throughput(cfg, ctx, model)
        monitor = Monitor(cfg, ctx, engine.module) if cfg.eval.interval else None  # loads its images once
        progress, guard_state = Progress(), None
        if latest is not None:
            meta, state = ckpt.load(latest, engine)
            loader.load_state_dict(state["loader"])
            progress = Progress(step=meta["step"], samples_seen=meta["samples_seen"], loss=meta.get("loss"))
            guard_state = meta.get("guard")
            log.info(
                "resumed from %s at step %d (%d samples seen)", latest, progress.step, progress.samples_seen
            )
    except BaseException:
        loader.close()
        raise
    guard_file = out / "guard.json"
    guard = LossGuard(cfg.guard, ctx.broadcast_object(GuardRecord.read(guard_file) if ctx.is_main else None))
    guard.record.retries = 0  # a new launch gets guard.max_retries afresh (e.g. after lowering optim.lr)
    if guard.record.skips:
        log.warning(
            "guard.json: skipping the batches condemned by earlier rollbacks at steps %s", guard.record.skips
        )
    guard.load_state(guard_state)
    samples = None
    if cfg.run.sample_log:
        segment = ctx.broadcast_object(next_segment(out / "samples") if ctx.is_main else None)
        samples = SampleLog(out / "samples", ctx.rank, segment, progress.step)
    logger = MetricsLogger(out, ctx, cfg.run.tensorboard, resume_step=progress.step)
    logger.event("start", step=progress.step, world_size=ctx.world_size, resumed_from=latest and latest.name)
    session = Session(
        cfg, ctx, engine, ckpt, logger, config_yaml, open_loader, guard, guard_file, stop, samples, faults
    )
    session.throughput, session.monitor = throughput, monitor
    try:
        progress = train_loop(session, progress, loader)
    finally:
        logger.close()
        if samples is not None:
            samples.close()
    log.info("stopped at step %d of %d; checkpoint %s", progress.step, cfg.train.max_steps, ckpt.latest())
    return progress


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done (or stop_at_step reached), 2 bad config or data, 3 the loss guard gave up,
    75 (EXIT_REQUEUE) stopped by a signal after checkpointing, 1 anything else."""
    args = parse_args(argv)
    try:
        overrides, notes = merge_overrides(args.set)
        cfg = load_config(args.config, overrides)
    except (ConfigError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    stop = StopRequest().install()  # before the slow start: a signal during it still checkpoints cleanly
    ctx = init_distributed(force_process_group=cfg.engine.backend == "deepspeed")
    from pretrain.data import ShardError, SourceError

    status, step, code = "failed", None, 1
    try:
        resolve_batch(cfg, ctx.world_size)
        progress = run(cfg, ctx, notes, stop)
        step = progress.step
        if progress.stopped_by:
            status, code = "preempted", EXIT_REQUEUE
        else:
            status, code = "finished", 0
    except (ConfigError, ShardError, SourceError) as e:  # bad input found once files are read
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        code = 3
    finally:
        if ctx.is_main:
            write_status(status, step, stop.signal.name if stop.signal else None)
        if status != "failed":
            ctx.barrier()  # no rank exits (and gets the step killed by srun) before rank 0 has said why
        stop.uninstall()
        shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
