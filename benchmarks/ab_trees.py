"""Two checkouts of arbor side by side: the README's commands give the same stdout and exit codes, the
chunker makes the same parts, and (--speed) the CPU default decodes and prefills as fast.

    python benchmarks/ab_trees.py BEFORE AFTER [--only RE] [--skip RE] [--timeout S] [--json OUT]
        [--no-commands] [--no-chunks] [--speed [--rounds 5] [--tokens 256] [--tolerance 0.03]]

Commands: every `$ ` line of BEFORE's README.md console blocks, in order (ask reads the bees.txt made
before it), with bash from each tree's root, stdin empty, PYTHONPATH=TREE:TREE/core:TREE/weights:
TREE/backends so the installed `arbor` and `python` run that tree. Stdout must match byte for byte
once VOLATILE and the tree's own path are masked; stderr (its one-line error) when a command fails. A
command ending in `&` is a server: waited for until its port (a free one, not 8080) answers, stopped
with SIGINT after the last command. Files written at the tree's top level (bees.txt, smol-hf/) are
compared, then removed (unless --keep-outputs). Each tree has its own ARBOR_HOME under --work, its models/ a link to the
shared home's ($ARBOR_HOME or the user cache): the same models, but the compiled decode step
(ARBOR_COMPILE_DIR) and the document KV cache (emptied first) are each tree's own. Default --skip:
`vllm serve` (another project's server; the README does not run it).

Chunks: the parts (character span, tokens, overlap) `arbor summarize --words 60` reads of
tests/long_document.py's text at --context 4096 and of docs/examples/eddystone.txt at 384 and 512,
and the chunker's own at fixed budgets: CHUNK_LISTS, run in each tree's interpreter.

--speed: ab_speed_probe.py in fresh processes, BEFORE, AFTER, BEFORE, ... for --rounds after one untimed
round: the CPU default's (int4, compiled decode step) best 512-token prefill and decode of each process,
their medians and AFTER/BEFORE ratios; slower than 1 - --tolerance fails (run it on a quiet machine). Exit 1 on any difference.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CONSOLE_BLOCK = re.compile(r"^```console\n(.*?)^```", re.S | re.M)
DEFAULT_SKIP = r"^vllm serve"
README_PORT = re.compile(r"(?<=--port )8080\b|(?<=localhost:)8080\b")
VOLATILE = [  # output that differs between two runs of the same code
    (re.compile(rb"[\d.]+ GiB free of [\d.]+ GiB"), b"... GiB free of ... GiB"),
    (re.compile(rb'"id":"chatcmpl-[^"]*"'), b'"id":"chatcmpl-..."'),
    (re.compile(rb'"created":\d+'), b'"created":...'),
]
PREFILL_TOKENS = 512
CHUNK_LISTS = r'''
import json, sys, types
import arbor_cli
from arbor_cli.chunking import document_token_offsets, split_into_chunks
from arbor_cli.summarize import SummaryOptions, SummaryRun, count_tokens_of

quiet = types.SimpleNamespace(begin=lambda phase, total: None, advance=lambda: None)  # a SummaryProgress
model, out = arbor_cli.load(quiet=True), {}
for spec in sys.argv[1:]:
    path, kind, size = spec.rsplit(":", 2)
    text = open(path, encoding="utf-8").read()
    offsets = document_token_offsets(model.tokenizer.encode_with_offsets, text, quiet)
    if kind == "context":  # what `arbor summarize --context SIZE --words 60` reads
        chunks = SummaryRun(model, int(size), SummaryOptions.build(words=60), quiet).split(text, offsets)
    else:  # the chunker alone at a budget of SIZE tokens
        chunks = split_into_chunks(text, offsets, lambda s: count_tokens_of(model, s), int(size))
    out[f"{path.rsplit('/', 1)[-1]} {kind} {size}"] = [[c.start, c.end, c.tokens, c.overlap] for c in chunks]
print(json.dumps(out))
'''


@dataclass
class Tree:
    side: str  # BEFORE or AFTER
    root: Path
    env: dict[str, str]
    servers: list = field(default_factory=list)  # (result, process, stdout file, stderr file) of `&` commands


def make_tree(side: str, root: str, work: Path, shared_home: Path) -> Tree:
    """The tree's environment: its packages first on PYTHONPATH, its own home linking the shared models."""
    tree_root = Path(root).resolve()
    home = work / f"home-{side.lower()}-{hashlib.sha256(str(tree_root).encode()).hexdigest()[:8]}"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").is_symlink():  # models/ only: locks/ goes when its last lock does (a dangling link)
        (shared_home / "models").mkdir(parents=True, exist_ok=True)
        (home / "models").symlink_to(shared_home / "models")
    shutil.rmtree(home / "doc-cache", ignore_errors=True)  # a first question prefills, in both trees
    # ARBOR_COMPILE=sync: each tree's first decode compiles its step in the command (as before background builds),
    # so no detached build runs beside the commands and timings that follow it (a tree that predates it reads "on")
    compile_mode = "0" if os.environ.get("ARBOR_COMPILE") == "0" else "sync"
    env = dict(os.environ, ARBOR_HOME=str(home), ARBOR_COMPILE_DIR=str(home / "compiled"), ARBOR_COMPILE=compile_mode,
               PYTHONPATH=":".join(str(tree_root / d) for d in ("", "core", "weights", "backends")))
    tree = Tree(side, tree_root, env)
    where = python_in(tree, "import arbor_cli, arbor_weights; print(arbor_cli.__file__, arbor_weights.__file__)")
    if not all(Path(p).is_relative_to(tree_root) for p in where.split()):
        sys.exit(f"ab_trees: {side} imports arbor from {where}, not from {tree_root}")
    return tree


def python_in(tree: Tree, code: str, *args: str, timeout: float = 600) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=tree.root, env=tree.env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode:
        sys.exit(f"ab_trees: python in {tree.side} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def readme_commands(readme: Path) -> list[str]:
    blocks = CONSOLE_BLOCK.findall(readme.read_text(encoding="utf-8"))
    return [line[2:].strip() for block in blocks for line in block.splitlines() if line.startswith("$ ")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(tree: Tree, command: str, timeout: float) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", command], cwd=tree.root, env=tree.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # exit code -9, and a line saying why
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\nab_trees: killed after --timeout {timeout:g} s\n".encode()
    root = str(tree.root).encode()  # `arbor export` prints the directory it wrote, under its own tree
    return {"rc": proc.returncode, "stdout": out.replace(root, b"<TREE>"), "stderr": err.replace(root, b"<TREE>"),
            "seconds": time.perf_counter() - t0}


def start_server(tree: Tree, command: str, port: int, timeout: float) -> dict:
    """A `... &` command: running in the background once its port answers (or ended, its result final)."""
    t0, out, err = time.perf_counter(), tempfile.TemporaryFile(), tempfile.TemporaryFile()  # files: a pipe fills
    proc = subprocess.Popen(["bash", "-c", command.rstrip("& ")], cwd=tree.root, env=tree.env,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
    while proc.poll() is None and time.perf_counter() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    result = {"rc": None, "stdout": b"", "stderr": b"", "seconds": time.perf_counter() - t0}
    tree.servers.append((result, proc, out, err))
    return result


def stop_servers(tree: Tree) -> None:
    for result, proc, out, err in tree.servers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0), err.seek(0)
        result.update(rc=proc.returncode, stdout=out.read(), stderr=err.read())
    tree.servers.clear()


def written_files(root: Path, entries_before: set[str], since: float) -> dict[str, str]:
    """sha256 of each file the commands wrote at the top level of `root` (new entries, or files changed)."""
    out = {}
    for top in sorted(root.iterdir()):
        if top.name in entries_before and (top.is_dir() or top.stat().st_mtime < since):
            continue
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_tree(tree: Tree, commands: list[str], port: int, args) -> tuple[list[dict], dict[str, str]]:
    entries_before, since = {p.name for p in tree.root.iterdir()}, time.time() - 1
    results = []
    # the compiled decode step built before the clock runs: the first command's seconds compare too
    run_command(tree, "arbor generate Hello --max-tokens 4", args.timeout)
    try:
        for command in commands:
            command = README_PORT.sub(str(port), command)
            print(f"[{tree.side}] $ {command}", file=sys.stderr, flush=True)
            if command.endswith("&"):
                results.append(start_server(tree, command, port, args.timeout))
            else:
                results.append(run_command(tree, command, args.timeout))
    finally:
        stop_servers(tree)
        files = written_files(tree.root, entries_before, since)
        if not args.keep_outputs:
            for path in tree.root.iterdir():
                if path.name not in entries_before:
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return results, files


def masked(output: bytes) -> bytes:
    for pattern, replacement in VOLATILE:
        output = pattern.sub(replacement, output)
    return output


def difference(label: str, a: bytes, b: bytes) -> str:
    return "".join(difflib.unified_diff(a.decode(errors="replace").splitlines(keepends=True),
                                        b.decode(errors="replace").splitlines(keepends=True),
                                        f"BEFORE {label}", f"AFTER {label}"))


def compare_command(command: str, before: dict, after: dict) -> dict:
    diffs = [difference("stdout", masked(before["stdout"]), masked(after["stdout"]))]
    if before["rc"] != after["rc"]:
        diffs.append(f"exit code: BEFORE {before['rc']}, AFTER {after['rc']}\n")
    if before["rc"] or after["rc"]:  # an error is its one line on stderr: that must match too
        diffs.append(difference("stderr", before["stderr"], after["stderr"]))
    diff = "".join(diffs)
    return {"command": command, "same": not diff, "diff": diff, "rc": [before["rc"], after["rc"]],
            "seconds": [round(before["seconds"], 1), round(after["seconds"], 1)],
            "stdout": [before["stdout"].decode(errors="replace"), after["stdout"].decode(errors="replace")]}


def compare_commands(trees: list[Tree], args) -> list[dict]:
    readmes = [readme_commands(t.root / "README.md") for t in trees]
    if readmes[0] != readmes[1]:
        print("ab_trees: warning: AFTER's README lists other commands; running BEFORE's", file=sys.stderr)
    skip = re.compile(args.skip) if args.skip else None
    commands = [c for c in readmes[0] if re.search(args.only, c) and not (skip and skip.search(c))]
    port = free_port()
    runs = [run_tree(t, commands, port, args) for t in trees]
    rows = [compare_command(c, b, a) for c, b, a in zip(commands, runs[0][0], runs[1][0])]
    files = [written for _, written in runs]
    if any(files):  # their sha256s, compared as one more command's output
        tops = ", ".join(sorted({name.split("/")[0] for name in {**files[0], **files[1]}}))
        listed = [{"rc": 0, "stdout": json.dumps(f, indent=1).encode(), "seconds": 0} for f in files]
        rows.append(compare_command(f"(files written: {tops})", *listed))
    print("\n| command | result | exit codes | BEFORE s | AFTER s |\n|---|---|---|---:|---:|")
    for r in rows:
        shown = r["command"] if len(r["command"]) <= 70 else r["command"][:67] + "..."
        print(f"| `{shown}` | {'same' if r['same'] else 'DIFFERENT'} | {r['rc'][0]} / {r['rc'][1]} "
              f"| {r['seconds'][0]} | {r['seconds'][1]} |")
    for r in rows:
        if not r["same"]:
            print(f"\n--- {r['command']}\n{r['diff']}")
    return rows


def compare_chunks(trees: list[Tree], work: Path) -> dict:
    long_text = work / "long_document.txt"
    long_text.write_text(python_in(trees[0], "import runpy; runpy.run_path('tests/long_document.py', run_name="
                                   "'__main__')"), encoding="utf-8")
    eddystone = "docs/examples/eddystone.txt"
    specs = [f"{long_text}:context:4096", f"{long_text}:budget:1024", f"{eddystone}:context:384",
             f"{eddystone}:context:512", f"{eddystone}:budget:64"]
    lists = [json.loads(python_in(t, CHUNK_LISTS, *specs)) for t in trees]
    print("\n| document and size | parts BEFORE | parts AFTER | spans |\n|---|---:|---:|---|")
    for key in lists[0]:
        a, b = lists[0][key], lists[1].get(key, [])
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                     None if len(a) == len(b) else min(len(a), len(b)))
        print(f"| {key} | {len(a)} | {len(b)} | {'same' if first is None else f'DIFFERENT from part {first + 1}'} |")
    return {"same": lists[0] == lists[1], "before": lists[0], "after": lists[1]}


def bench_once(tree: Tree, tokens: int, timeout: float) -> dict:
    probe = Path(__file__).resolve().parent / "ab_speed_probe.py"  # run with the tree's PYTHONPATH
    done = subprocess.run([sys.executable, str(probe), str(tokens)], cwd=tree.root, env=tree.env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        sys.exit(f"ab_trees: the speed probe failed in {tree.side}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_speed(trees: list[Tree], args) -> dict:
    runs: dict[str, list[dict]] = {t.side: [] for t in trees}
    for rnd in range(args.rounds + 1):  # round 0 is untimed: the compiled step built, files in the page cache
        for tree in trees:
            run = bench_once(tree, args.tokens, args.timeout)
            print(f"[{tree.side}] round {rnd}: decode {run['decode_tok_s']:.1f} tok/s, prefill "
                  f"{run['prefill_tok_s']:.0f} tok/s ({run['weights']})", file=sys.stderr, flush=True)
            if rnd:
                runs[tree.side].append(run)
    compiled = {t.side: any(Path(t.env["ARBOR_COMPILE_DIR"]).glob("decode-*.pt2")) for t in trees}
    report = {"runs": runs, "compiled_step": compiled, "tolerance": args.tolerance, "ok": True}
    print("\n| measure | BEFORE median | AFTER median | AFTER/BEFORE |\n|---|---:|---:|---:|")
    for key, name in (("decode_tok_s", "decode tok/s"), ("prefill_tok_s", f"{PREFILL_TOKENS}-token prefill tok/s")):
        before, after = (statistics.median(r[key] for r in runs[t.side]) for t in trees)
        report[key] = {"before": before, "after": after, "ratio": after / before}
        report["ok"] &= after / before >= 1 - args.tolerance
        print(f"| {name} | {before:,.1f} | {after:,.1f} | {after / before:.3f} |")
    weights = {r["weights"] for side in runs.values() for r in side}
    report["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(f"weights: {', '.join(sorted(weights))}; compiled decode step cached: {compiled}; {args.rounds} rounds, "
          f"alternating; load average {report['load_average']}; within {args.tolerance:.0%}: "
          f"{'yes' if report['ok'] else 'NO'}")
    return report


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", help="the checkout before the change")
    ap.add_argument("after", help="the checkout after it")
    ap.add_argument("--only", default="", metavar="REGEX", help="run only the commands this matches")
    ap.add_argument("--skip", default=DEFAULT_SKIP, metavar="REGEX", help=f"skip these (default {DEFAULT_SKIP!r})")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per command (default 900)")
    ap.add_argument("--json", metavar="OUT", help="write every result here")
    ap.add_argument("--no-commands", action="store_true", help="skip the README's commands")
    ap.add_argument("--no-chunks", action="store_true", help="skip the chunk lists")
    ap.add_argument("--keep-outputs", action="store_true", help="leave the files the commands wrote in the trees")
    ap.add_argument("--speed", action="store_true", help="also A/B the CPU default's decode and prefill")
    ap.add_argument("--rounds", type=int, default=5, help="--speed: timed rounds (default 5)")
    ap.add_argument("--tokens", type=int, default=256, help="--speed: decode steps per run (default 256)")
    ap.add_argument("--tolerance", type=float, default=0.03, help="--speed: slowest ratio allowed is 1 - this")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "arbor-ab",
                    help="the trees' homes and the long document (default $TMPDIR/arbor-ab)")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    import platformdirs  # arbor's own dependency: where the models live when $ARBOR_HOME is not set

    shared_home = Path(os.environ.get("ARBOR_HOME") or platformdirs.user_cache_dir("arbor")).expanduser()
    args.work.mkdir(parents=True, exist_ok=True)
    trees = [make_tree("BEFORE", args.before, args.work, shared_home),
             make_tree("AFTER", args.after, args.work, shared_home)]
    report: dict = {"before": str(trees[0].root), "after": str(trees[1].root)}
    same = True
    if not args.no_commands:
        report["commands"] = compare_commands(trees, args)
        same &= all(r["same"] for r in report["commands"])
    if not args.no_chunks:
        report["chunks"] = compare_chunks(trees, args.work)
        same &= report["chunks"]["same"]
    if args.speed:
        report["speed"] = compare_speed(trees, args)
        same &= report["speed"]["ok"]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"\nab_trees: {'no difference' if same else 'DIFFERENCES (above)'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
