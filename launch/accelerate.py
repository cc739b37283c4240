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


def _parent_cmdline() -> str:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def accelerate_overrides(env: dict[str, str] | None = None) -> list[tuple[str, object, str]]:
    """[(config key, value, the accelerate flag that asked for it)]; raises LaunchError for what can't be done."""
    env = dict(os.environ if env is None else env)
    if not any(k.startswith("ACCELERATE_") for k in env):
        return []
    out: list[tuple[str, object, str]] = []
    if _true(env.get("ACCELERATE_USE_CPU")) and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        # accelerate's --cpu path starts one process even when asked for several (it sets MASTER_ADDR only then)
        raise LaunchError(
            "`accelerate launch --cpu --num_processes N` started a single process here "
            f"(parent: {_parent_cmdline() or 'accelerate'}). For N ranks on CPU use "
            "`accelerate launch --multi_gpu --num_processes N ...` (Tessera runs it over gloo when there is no "
            "GPU) or `torchrun --nproc_per_node N -m pretrain.train ...`."
        )
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mp == "bf16":
        out.append(("engine.precision", "bf16", "--mixed_precision bf16"))
    elif mp not in ("no", ""):
        raise LaunchError(f"accelerate --mixed_precision {mp} is not supported; Tessera trains in fp32 or bf16")
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper()
    if dynamo not in ("NO", ""):
        raise LaunchError(f"accelerate --dynamo_backend {dynamo.lower()} is not supported by Tessera; drop it")
    if _true(env.get("ACCELERATE_USE_FSDP")):
        raise LaunchError("accelerate --use_fsdp is not supported; use --use_deepspeed or engine.backend=torch")
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
        for var, key in (("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "engine.offload_optimizer"),
                         ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "engine.offload_params")):
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
    import yaml

    user_keys = {}
    for text in user:
        key, _, raw = text.partition("=")
        user_keys[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    merged, notes = [], []
    for key, value, flag in accelerate_overrides(env):
        if key in user_keys and user_keys[key] != value:
            raise LaunchError(f"accelerate launch {flag} conflicts with --set {key}={user_keys[key]}; pick one")
        merged.append(f"{key}={value}")
        notes.append(f"{key}={value} (from accelerate launch {flag})")
    return merged + list(user), notes
