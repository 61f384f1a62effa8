"""Cold start: wall time of `arbor generate "Hi" --max-tokens 1` beside a bare `python -c "import torch"`.

    python benchmarks/cold_start.py [--reps 5] [--via script|module] [--model NAME_OR_PATH] [--importtime] [--json [PATH]]

The issue's target: arbor's one-token answer costs at most 1.0 s more than importing torch, the
floor any torch program pays. Each repetition runs both commands once, in turn, as fresh
subprocesses (so load from other processes hits both alike); one untimed run of each comes first,
so both read their files from the OS page cache. --via script runs the `arbor` console script of
this interpreter ([project.scripts], the file next to sys.executable, not a pyenv shim); --via module
runs `python -m arbor_cli`. The shell's ARBOR_* settings are dropped: the default configuration is
measured. --importtime adds one `python -X importtime` run of the arbor command and lists the
slowest imports (cumulative per top-level package, and by self time).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
import report_json  # benchmarks/report_json.py, beside this script

TARGET_S = 1.0


def arbor_command(via: str, model: str | None) -> list[str]:
    if via == "module":
        cmd = [sys.executable, "-m", "arbor_cli"]
    else:
        script = Path(sys.executable).parent / "arbor"
        if not script.is_file():
            sys.exit(f"cold_start: no console script at {script} (pip install -e .), or use --via module")
        cmd = [str(script)]
    return cmd + ["generate", "Hi", "--max-tokens", "1"] + (["--model", model] if model else [])


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ARBOR_")}


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"cold_start: {' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-2000:]}")
    return dt, p.stdout


def import_times(cmd: list[str], env: dict[str, str], top: int) -> dict:
    """`python -X importtime` of the arbor command: (cumulative s per top-level package, slowest by self time)."""
    argv = [sys.executable, "-X", "importtime"] + (cmd[1:] if cmd[0] == sys.executable else cmd)
    p = subprocess.run(argv, env=env, capture_output=True, text=True)
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum_us, name = line.removeprefix("import time:").split("|", 2)
        rows.append((name.rstrip(), int(self_us), int(cum_us)))
    # the top-level imports are the least indented names: one space after the bar
    outer = [r for r in rows if not r[0].startswith("  ")]
    packages: dict[str, int] = {}
    for name, _, cum in outer:
        root = name.strip().split(".")[0]
        packages[root] = packages.get(root, 0) + cum
    by_package = sorted(packages.items(), key=lambda kv: -kv[1])[:top]
    by_self = sorted(rows, key=lambda r: -r[1])[:top]
    return {"total_s": sum(cum for _, _, cum in outer) / 1e6,
            "by_package_s": [(k, v / 1e6) for k, v in by_package],
            "by_self_s": [(name.strip(), s / 1e6) for name, s, _ in by_self]}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--via", choices=("script", "module"), default="script",
                    help="the `arbor` console script or `python -m arbor_cli`")
    ap.add_argument("--model", help="model for arbor generate (default: arbor's default model)")
    ap.add_argument("--importtime", action="store_true", help="add a python -X importtime breakdown")
    ap.add_argument("--top", type=int, default=12, help="imports listed by --importtime")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="raw runs as JSON: to PATH (the table still prints), or alone to stdout instead")
    args = ap.parse_args()
    env = clean_env()
    commands = {"arbor": arbor_command(args.via, args.model), "torch": [sys.executable, "-c", "import torch"]}
    load_before = load_average()
    first = {name: timed(cmd, env) for name, cmd in commands.items()}  # untimed: fills the page cache
    runs: dict[str, list[float]] = {name: [] for name in commands}
    for rep in range(args.reps):
        for name, cmd in commands.items():
            runs[name].append(timed(cmd, env)[0])
        print(f"rep {rep + 1}/{args.reps}: arbor {runs['arbor'][-1]:.2f} s, import torch {runs['torch'][-1]:.2f} s",
              file=sys.stderr, flush=True)
    med = {name: statistics.median(xs) for name, xs in runs.items()}
    import torch

    report = {"commands": {k: " ".join(v) for k, v in commands.items()}, "via": args.via,
              "arbor_output": first["arbor"][1], "dropped_env": sorted(k for k in os.environ if k.startswith("ARBOR_")),
              "runs_s": runs, "median_s": med, "difference_s": med["arbor"] - med["torch"], "target_s": TARGET_S,
              "first_run_s": {k: v[0] for k, v in first.items()}, "reps": args.reps,
              "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
              "load_average_before": load_before, "load_average_after": load_average(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.importtime:
        report["importtime"] = import_times(commands["arbor"], env, args.top)
    if report_json.emit(report, args.json):
        return
    print(f"{report['cores']} cores · Python {report['python']} · torch {report['torch']} · {report['reps']} reps · "
          f"{report['date']} · load avg {load_before} -> {report['load_average_after']}")
    print(f"arbor ({args.via}): {report['commands']['arbor']}  -> {report['arbor_output'].strip()!r}")
    print("\n| command | median | min..max | first (untimed) run |\n|---|---:|---:|---:|")
    for name in commands:
        xs = runs[name]
        print(f"| {report['commands'][name]} | {med[name]:.2f} s | {min(xs):.2f}..{max(xs):.2f} s "
              f"| {report['first_run_s'][name]:.2f} s |")
    diff = report["difference_s"]
    print(f"\ndifference of medians: {diff:+.2f} s (target <= {TARGET_S:.1f} s: {'met' if diff <= TARGET_S else 'not met'})")
    if args.importtime:
        it = report["importtime"]
        print(f"\npython -X importtime, arbor command: {it['total_s']:.2f} s of imports")
        print("  cumulative, top-level: " + ", ".join(f"{k} {v:.2f} s" for k, v in it["by_package_s"]))
        print("  self time: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in it["by_self_s"]))


if __name__ == "__main__":
    main()
