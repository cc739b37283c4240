"""Start-up time of an unrelated `python -c pass` in the venv, with and without the torchvision import hook.

    .venv/bin/python benchmarks/startup_time.py [--rounds 20] [--per-round 10]

The hook (ops/torchvision_hook.py, installed by scripts/setup.sh) adds a .pth line to site-packages, which every
interpreter in the venv runs at start. This toggles it off and on in alternating rounds (ABAB, so drift in the
machine's load hits both alike), times `python -c pass` each time, and leaves the hook installed as it found it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ops import torchvision_hook as hook  # noqa: E402


def time_runs(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, cwd="/")
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--per-round", type=int, default=10)
    args = p.parse_args()
    site = hook._site_packages()
    was_installed = os.path.exists(os.path.join(site, hook.PTH_NAME))
    times = {"without hook": [], "with hook": []}
    try:
        time_runs(3)  # warm the page cache
        for _ in range(args.rounds):
            for label in times:
                (hook.install_into_venv if label == "with hook" else hook.uninstall_from_venv)(site)
                times[label] += time_runs(args.per_round)
        check = subprocess.run(
            [sys.executable, "-c", "import sys; print('torch' in sys.modules, 'torchvision' in sys.modules)"],
            capture_output=True,
            text=True,
            check=True,
            cwd="/",
        ).stdout.split()
    finally:
        (hook.install_into_venv if was_installed else hook.uninstall_from_venv)(site)
    print(f"`{sys.executable} -c pass`, {args.rounds} alternating rounds x {args.per_round} runs each:")
    print("| | median ms | mean ms | stdev ms |")
    print("|---|---|---|---|")
    for label, t in times.items():
        ms = [x * 1e3 for x in t]
        print(
            f"| {label} | {statistics.median(ms):.2f} | {statistics.mean(ms):.2f} | {statistics.stdev(ms):.2f} |"
        )
    print(f"with the hook, torch imported at start: {check[0]}, torchvision imported at start: {check[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
