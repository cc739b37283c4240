"""What `accelerate launch` was told, as Tessera config overrides — honoured, or refused with a reason.

accelerate passes its flags to the training process as ACCELERATE_* variables. Tessera does not use an
`Accelerator` object (the engine seam owns precision and sharding), so each flag is either mapped onto the
typed config or rejected here; none is silently ignored.
"""

from __future__ import annotations

import os


class LaunchError(RuntimeError):
    pass


def _true(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def _parent_argv() -> list[str] | None:
    """The launching process's argv (accelerate's own flags), or None where /proc cannot tell."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    # [python, accelerate, launch, FLAGS..., -m module | script.py, ARGS...] or [python, -m,
    # accelerate.commands.launch, FLAGS..., ...]: keep FLAGS, stop at the training script's own arguments
    for i in range(3, len(argv)):
        if argv[i] == "-m" or argv[i].endswith(".py"):
            return argv[:i]
    return argv


def _flag(argv: list[str], name: str) -> str | None:
    """Value of `--name V` / `--name=V` in argv ('' for a bare switch), None when absent."""
    for i, arg in enumerate(argv):
        if arg == name:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            return "" if nxt.startswith("-") else nxt
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


# accelerate features Tessera has no counterpart for: asked for, they are refused, never dropped
UNSUPPORTED = {
    "ACCELERATE_USE_FSDP": "--use_fsdp (use --use_deepspeed or engine.backend=torch)",
    "ACCELERATE_USE_MEGATRON_LM": "--use_megatron_lm",
    "ACCELERATE_USE_PARALLELISM_CONFIG": "a parallelism config",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": "--zero3_init_flag (Tessera builds the model, then shards it)",
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "--zero3_save_16bit_model (use python -m pretrain.export)",
    "ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES": "--deepspeed_moe_layer_cls_names",
}


def accelerate_overrides(
    env: dict[str, str] | None = None, parent_argv: list[str] | None = None
) -> list[tuple[str, object, str]]:
    """[(config key, value, the accelerate flag that asked for it)]; raises LaunchError for what can't be done."""
    env = dict(os.environ if env is None else env)
    if not any(k.startswith("ACCELERATE_") for k in env):
        return []
    out: list[tuple[str, object, str]] = []
    argv = _parent_argv() if parent_argv is None else parent_argv
    if _true(env.get("ACCELERATE_USE_CPU")) and "WORLD_SIZE" not in env:
        # accelerate's --cpu path starts one process, whatever --num_processes says, and passes no DeepSpeed or
        # FSDP settings at all: read what it was asked from its command line
        asked = _flag(argv, "--num_processes") if argv is not None else None
        several = (asked or "1").isdigit() and int(asked or "1") > 1
        if several or (argv is None and "MASTER_ADDR" in env):  # it sets MASTER_ADDR only for N > 1
            raise LaunchError(
                f"`accelerate launch --cpu --num_processes {asked or 'N'}` started a single process here. For N "
                "ranks on CPU use `accelerate launch --multi_gpu --num_processes N ...` (Tessera runs it over "
                "gloo when there is no GPU) or `torchrun --nproc_per_node N -m pretrain.train ...`."
            )
        for flag in ("--use_deepspeed", "--use_fsdp", "--deepspeed_config_file", "--zero_stage"):
            if argv is not None and _flag(argv, flag) is not None:
                raise LaunchError(
                    f"`accelerate launch --cpu {flag}` does not pass {flag} to the script; drop "
                    "--cpu (Tessera uses the CPU when there is no GPU) or set engine.* with --set"
                )
    for var, what in UNSUPPORTED.items():
        if _true(env.get(var)) or (var.endswith("CLS_NAMES") and env.get(var)):
            raise LaunchError(f"accelerate {what} is not supported by Tessera; drop it")
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mp == "bf16":
        out.append(("engine.precision", "bf16", "--mixed_precision bf16"))
    elif mp not in ("no", ""):
        raise LaunchError(
            f"accelerate --mixed_precision {mp} is not supported; Tessera trains in fp32 or bf16"
        )
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper()
    if dynamo not in ("NO", ""):
        raise LaunchError(
            f"accelerate --dynamo_backend {dynamo.lower()} is not supported by Tessera; drop it"
        )
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            raise LaunchError(
                "accelerate --deepspeed_config_file is not used: Tessera builds DeepSpeed's config from its own "
                "typed config. Set engine.zero_stage / engine.precision / engine.offload_* instead, e.g. "
                "--set engine.zero_stage=3"
            )
        out.append(("engine.backend", "deepspeed", "--use_deepspeed"))
        if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in env:
            stage = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
            out.append(("engine.zero_stage", stage, f"--zero_stage {stage}"))
        if "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" in env:
            n = int(env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"])
            out.append(("train.grad_accum_steps", n, f"--gradient_accumulation_steps {n}"))
        if env.get("ACCELERATE_GRADIENT_CLIPPING", "none") not in ("none", ""):
            clip = float(env["ACCELERATE_GRADIENT_CLIPPING"])
            out.append(("train.grad_clip", clip, f"--gradient_clipping {clip}"))
        for var, key in (
            ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "engine.offload_optimizer"),
            ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "engine.offload_params"),
        ):
            device = env.get(var, "none").lower()
            if device == "cpu":
                out.append((key, True, f"--{var.split('DEEPSPEED_')[1].lower()} cpu"))
            elif device not in ("none", ""):
                raise LaunchError(f"{var}={device}: only cpu offload is supported")
    return out


def merge_overrides(user: list[str], env: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """User `--set` strings plus accelerate's; a conflict between the two is an error, not a silent pick.

    Returns (overrides, notes) where notes say which settings came from accelerate.
    """
    from pretrain.config import parse_override

    user_keys = dict(parse_override(text) for text in user)
    merged, notes = [], []
    for key, value, flag in accelerate_overrides(env):
        if key in user_keys and user_keys[key] != value:
            raise LaunchError(
                f"accelerate launch {flag} conflicts with --set {key}={user_keys[key]}; pick one"
            )
        merged.append(f"{key}={value}")
        notes.append(f"{key}={value} (from accelerate launch {flag})")
    return merged + list(user), notes
