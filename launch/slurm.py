"""Submit a Tessera run to Slurm: the config is checked here, on the login node, before anything is queued.

    python -m launch.slurm CONFIG --nodes N [--procs-per-node G] [--partition P] [--time T]
                           [--job-name NAME] [--set key=value ...] [--dry-run]

Prints the exact sbatch command and slurm/pretrain.sh as the job will run it (its #SBATCH lines and settings
resolved), then submits from the repository root and prints the job id. --dry-run stops before submitting and
writes nothing. A bad config exits 2 with the offending key named. The job runs in the repository root:
relative paths in --set (run.output_dir=runs/x) are relative to it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from pretrain.build import load_config
from pretrain.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "pretrain.sh"
# a setting of slurm/pretrain.sh: NAME="${NAME:-default}", overridable from the environment sbatch passes on
SETTING = re.compile(r'^([A-Z_]+)="\$\{\1:-.*\}"$', re.M)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n")[0])
    p.add_argument("config", help="YAML file in configs/")
    p.add_argument("--nodes", type=positive, required=True, help="nodes (one torchrun launcher each)")
    p.add_argument("--procs-per-node", type=positive, help="training processes per node (default: its GPUs)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--time", help="time limit, e.g. 24:00:00 (the job requeues itself when it runs out)")
    p.add_argument("--job-name", help="job name (default: the config's file name); logs/NAME-JOBID.out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--dry-run", action="store_true", help="check and print, do not submit")
    return p.parse_args(argv)


def config_path(config: str) -> str:
    """The config as the job (running in the repository root) finds it."""
    path = Path(config).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def plan(args: argparse.Namespace, env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(sbatch options from the command line, the script's settings the job will see: NAME -> value).

    sbatch passes the submitting environment on (--export=ALL), so a setting already exported here counts.
    """
    options = {"job-name": args.job_name or Path(args.config).stem, "nodes": str(args.nodes)}
    options |= {k: v for k, v in (("partition", args.partition), ("time", args.time)) if v}
    if env.get("LOG_DIR"):  # the script writes its status files there: keep the job log with them
        options["output"] = f"{env['LOG_DIR']}/%x-%j.out"
    settings = {name: env[name] for name in SETTING.findall(SCRIPT.read_text()) if name in env}
    if args.procs_per_node:
        settings["PROCS_PER_NODE"] = str(args.procs_per_node)
    return options, settings


def sbatch_argv(args: argparse.Namespace, options: dict[str, str]) -> list[str]:
    """The command, run from the repository root."""
    export = "ALL" + (f",PROCS_PER_NODE={args.procs_per_node}" if args.procs_per_node else "")
    argv = ["sbatch", "--parsable", *(f"--{k}={v}" for k, v in options.items()), f"--export={export}"]
    argv += [str(SCRIPT.relative_to(ROOT)), config_path(args.config)]
    for text in args.set:
        argv += ["--set", text]
    return argv


def resolved_script(options: dict[str, str], settings: dict[str, str]) -> str:
    """slurm/pretrain.sh with the command line's options as #SBATCH lines and the settings' values written in."""
    lines = SCRIPT.read_text().splitlines()
    for name, value in options.items():
        hits = [i for i, line in enumerate(lines) if re.match(rf"^##?SBATCH --{name}=", line)]
        if hits:
            lines[hits[0]] = f"#SBATCH --{name}={value}"
        else:  # after the last directive: sbatch reads them only up to the first command
            last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
            lines.insert(last + 1, f"#SBATCH --{name}={value}")
    text = "\n".join(lines) + "\n"
    for name, value in settings.items():
        text = re.sub(rf'^{name}="\$\{{{name}:-.*\}}"$', f"{name}={shlex.quote(value)}", text, flags=re.M)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    options, settings = plan(args, dict(os.environ))
    command = sbatch_argv(args, options)
    print(f"# from {ROOT}:\n{shlex.join(command)}\n")
    print(f"# {SCRIPT.relative_to(ROOT)} as this job runs it:")
    print(resolved_script(options, settings), end="")
    if args.dry_run:
        return 0
    # Slurm opens the job's output file (logs/%x-%j.out) before the script runs: the folder must exist
    log = ROOT / options.get("output", "logs/%x-%j.out")
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    except FileNotFoundError:
        print("error: sbatch not found: submit from a Slurm login node (or use --dry-run)", file=sys.stderr)
        return 1
    if out.returncode != 0:
        print(f"error: sbatch failed ({out.returncode}): {out.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = out.stdout.strip().split(";")[0]
    print(
        f"\nsubmitted job {job_id}; log: {str(log).replace('%x', options['job-name']).replace('%j', job_id)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
