"""Pictures of arbor's measurements, drawn from their JSON (`--json` stays the source of truth).

- passkey: the needle-in-a-haystack heatmap, context length (log scale) against depth, colour the
  share of trials that found the key; one panel per RoPE method (or per `--via`, per model when
  several results are drawn together).
- ppl: perplexity against context length, one line per RoPE method.
- bench: prefill tok/s, decode tok/s and peak memory against context, one line per engine.

matplotlib is the `plot` extra and is imported only here, only when a picture is asked for. The
palette is Okabe & Ito's (distinguishable with the common colour-vision deficiencies) and the heatmap
uses cividis, a colour map made for the same.
"""

from __future__ import annotations

import json
import math
from datetime import date
from pathlib import Path
from typing import Any

from arbor_core.errors import InputError, UsageError

# Okabe & Ito, "Color Universal Design" (2008): eight colours told apart with protanopia, deuteranopia, tritanopia
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
KINDS = ("passkey", "ppl", "bench")
FORMATS = (".png", ".svg")
WIDTH_IN, DPI = 7.5, 120  # ~900 px wide: legible at README width


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'arbor-cli[plot]'") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def check_output(path: str | Path) -> Path:
    """The picture's path, refused early (before a long run) unless it ends in .png or .svg."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"--plot writes .png or .svg, not {path.name!r}")
    return path


def load_result(path: str | Path, kind: str) -> dict[str, Any]:
    """A saved `arbor eval passkey|ppl --json` or `arbor bench --json` result, checked to be that kind."""
    path = Path(path)
    if kind not in KINDS:
        raise UsageError(f"arbor plot draws {', '.join(KINDS)}, not {kind!r}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not a whole JSON result ({e.msg} at line {e.lineno}); was it cut off?") from None
    if kind == "bench" and isinstance(data, list):  # an older `arbor bench --json`: the rows alone
        data = {"rows": data, "model": next((r.get("model") for r in data if isinstance(r, dict)), None)}
    if not _is_kind(data, kind):
        raise InputError(f"{path} is not an `arbor {'bench' if kind == 'bench' else 'eval ' + kind} --json` result")
    _check_values(data, kind, path)
    return data


# what each drawn field must hold: (field, what it is, the test); a row with an error is not drawn, so not checked
_POSITIVE = ("a positive number", lambda v: _number(v) and v > 0)
_NOT_NEGATIVE = ("a number of at least 0", lambda v: _number(v) and v >= 0)
_OPTIONAL = {"perplexity", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes"}  # None: not measured
FIELDS = {
    "passkey": (("length", *_POSITIVE), ("depth", "a number from 0 to 1", lambda v: _number(v) and 0 <= v <= 1),
                ("found", "true or false", lambda v: isinstance(v, bool))),
    "ppl": (("length", *_POSITIVE), ("perplexity", *_POSITIVE)),
    "bench": (("context", *_POSITIVE), ("prefill_tokens_per_s", *_POSITIVE), ("decode_tokens_per_s", *_POSITIVE),
              ("peak_memory_bytes", *_NOT_NEGATIVE)),
}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_values(data: dict, kind: str, path: Path) -> None:
    """An InputError naming the first drawn value that cannot be drawn (text, NaN, a negative length, …)."""
    for i, record in enumerate(data["results" if kind == "passkey" else "rows"]):
        if record.get("error"):
            continue
        for field, what, ok in FIELDS[kind]:
            value = record.get(field)
            if not (value is None and field in _OPTIONAL) and not ok(value):
                raise InputError(f"{path}: record {i + 1} has {field} {json.dumps(value)[:40]}, not {what}; "
                                 "the result is damaged")
    trained = data.get("trained_context")
    if kind == "ppl" and trained is not None and not _POSITIVE[1](trained):
        raise InputError(f"{path}: trained_context {json.dumps(trained)[:40]} is not {_POSITIVE[0]}; "
                         "the result is damaged")


def machine_name(device: str) -> str:
    """What the figures were measured on, for a plot's title: the GPU's name, or the CPU's model and cores."""
    import os
    import platform

    if device.startswith("cuda"):
        try:
            import torch

            return torch.cuda.get_device_name(torch.device(device))
        except Exception:  # noqa: BLE001 - a title is not worth an error
            return device
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def stamp(device: str) -> dict[str, str]:
    """The fields a --json result carries so that its picture can say where and when: machine and date."""
    return {"machine": machine_name(device), "date": date.today().isoformat()}


def _is_kind(data: Any, kind: str) -> bool:
    if not isinstance(data, dict):
        return False
    records = data.get({"passkey": "results", "ppl": "rows", "bench": "rows"}[kind])
    needed = {"passkey": {"length", "depth", "found", "rope"}, "ppl": {"length", "rope", "perplexity"},
              "bench": {"engine", "context", "decode_tokens_per_s"}}[kind]
    return (isinstance(records, list) and bool(records)
            and all(isinstance(r, dict) and needed <= set(r) for r in records))


def _title(data: dict, what: str) -> str:
    where = " · ".join(str(data[k]) for k in ("model", "backend", "device", "machine", "date") if data.get(k))
    return f"{what}\n{where}"  # an older result without machine or date says nothing of them, rather than guess


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


def _log_y(ax) -> None:
    """A log y axis labelled at 1, 2 and 5 of each decade in plain numbers (12K, not 1.2x10^4)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}K" if v >= 1000 else f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def passkey_panels(data: dict) -> dict[str, dict[tuple[int, float], list[bool]]]:
    """panel name -> (length, depth) -> found per trial. Panels are RoPE methods as they ran, or `ask`."""
    panels: dict[str, dict[tuple[int, float], list[bool]]] = {}
    for r in data["results"]:
        if r.get("error"):
            continue
        name = "arbor ask" if data.get("via") == "ask" else str(r.get("requested", r["rope"]))
        panels.setdefault(name, {}).setdefault((int(r["length"]), round(float(r["depth"]), 4)), []).append(
            bool(r["found"]))
    return panels


def plot_passkey(results: list[dict], out: str | Path) -> dict[str, int]:
    """The heatmap of one or more passkey results (each its panels); returns {"panels": n}."""
    plt = _pyplot()
    out = check_output(out)
    panels = []
    for data in results:
        label = f"{data.get('model')}: " if len(results) > 1 else ""
        panels += [(label + name, cells) for name, cells in passkey_panels(data).items()]
    if not panels:
        raise UsageError("the result holds no trial without an error: nothing to draw")
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH_IN, 2.6 * rows + 0.9), squeeze=False, sharey=True,
                             constrained_layout=True)
    image = None
    for ax, (name, cells) in zip(axes.flat, panels):
        lengths = sorted({length for length, _ in cells})
        depths = sorted({depth for _, depth in cells})
        grid = [[_share(cells.get((length, depth))) for length in lengths] for depth in depths]
        # columns at log2(length), so equal steps of doubling are equal widths
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="cividis", vmin=0, vmax=1,
                          extent=(-0.5, len(lengths) - 0.5, -0.5, len(depths) - 0.5), interpolation="nearest")
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
        step = max(1, len(depths) // 4)
        ax.set_yticks(range(0, len(depths), step), [f"{depths[i]:.0%}" for i in range(0, len(depths), step)])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("context (tokens, log scale)", fontsize=9)
        ax.tick_params(labelsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("depth of the key", fontsize=9)
    bar = fig.colorbar(image, ax=axes, shrink=0.8, pad=0.02)
    bar.set_label("share of trials that found the key", fontsize=9)
    first = results[0]
    fig.suptitle(_title({**first, "model": first.get("model") if len(results) == 1 else None},
                        f"pass-key retrieval, filler: {Path(str(first.get('filler', 'repeat'))).name}"), fontsize=10)
    _save(fig, out)
    return {"panels": len(panels)}


def _share(found: list[bool] | None) -> float:
    return float("nan") if not found else sum(found) / len(found)


def plot_ppl(results: list[dict], out: str | Path) -> dict[str, int]:
    """Perplexity against context, one line per RoPE method (per model and method when several results)."""
    plt = _pyplot()
    out = check_output(out)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.2), constrained_layout=True)
    series = 0
    lengths_seen: set[int] = set()
    for data in results:
        by_method: dict[str, list[tuple[int, float]]] = {}
        for r in data["rows"]:
            if r.get("error") or r.get("perplexity") is None:
                continue
            by_method.setdefault(str(r.get("requested", r["rope"])), []).append((int(r["length"]), float(r["perplexity"])))
        for method, points in by_method.items():
            points.sort()
            lengths_seen.update(n for n, _ in points)
            label = f"{data.get('model')}: {method}" if len(results) > 1 else method
            ax.plot([n for n, _ in points], [p for _, p in points], marker="o", ms=4, lw=1.8,
                    color=PALETTE[series % len(PALETTE)], label=label)
            series += 1
    if not series:
        raise UsageError("the result holds no perplexity without an error: nothing to draw")
    first = results[0]
    if first.get("trained_context"):
        ax.axvline(first["trained_context"], color="0.6", lw=1, ls="--")
        ax.annotate("trained", (first["trained_context"], 1), xycoords=("data", "axes fraction"), fontsize=8,
                    color="0.4", ha="right", va="top", rotation=90)
    ax.set_xscale("log", base=2)
    _log_y(ax)
    ax.set_xticks(sorted(lengths_seen), [_length_label(n) for n in sorted(lengths_seen)])
    ax.minorticks_off()
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"perplexity of the last {first.get('window', '')} tokens".replace("  ", " "))
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(_title({**first, "model": first.get("model") if len(results) == 1 else None},
                        f"perplexity against context, {Path(str(first.get('file', ''))).name}"), fontsize=10)
    _save(fig, out)
    return {"series": series}


BENCH_PANELS = (("prefill_tokens_per_s", "prefill, tokens/s"), ("decode_tokens_per_s", "decode, tokens/s"),
                ("peak_memory_bytes", "peak memory, GiB"))


def plot_bench(results: list[dict], out: str | Path) -> dict[str, int]:
    """Three panels against context: prefill and decode speed, peak memory; one line per engine."""
    plt = _pyplot()
    out = check_output(out)
    fig, axes = plt.subplots(1, 3, figsize=(WIDTH_IN * 1.25, 3.4), constrained_layout=True)
    engines: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for data in results:
        for r in data["rows"]:
            if r.get("error"):
                continue
            engine = str(r["engine"]) + (f" ({data.get('model')})" if len(results) > 1 else "")
            for key, _ in BENCH_PANELS:
                if r.get(key) is not None:
                    value = r[key] / 2**30 if key == "peak_memory_bytes" else r[key]
                    engines.setdefault(engine, {}).setdefault(key, []).append((int(r["context"]), float(value)))
    if not engines:
        raise UsageError("the result holds no measurement without an error: nothing to draw")
    contexts = sorted({n for series in engines.values() for points in series.values() for n, _ in points})
    for ax, (key, label) in zip(axes, BENCH_PANELS):
        for i, (engine, series) in enumerate(engines.items()):
            points = sorted(series.get(key, []))
            if points:
                ax.plot([n for n, _ in points], [v for _, v in points], marker="o", ms=4, lw=1.8,
                        color=PALETTE[i % len(PALETTE)], label=engine)
        ax.set_xscale("log", base=2)
        if key != "peak_memory_bytes":
            _log_y(ax)
        ax.set_xticks(contexts, [_length_label(n) for n in contexts])
        ax.minorticks_off()
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("context (tokens)", fontsize=9)
        ax.tick_params(labelsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[0].legend(frameon=False, fontsize=8)
    first = results[0]
    fig.suptitle(_title({**first, "model": first.get("model") if len(results) == 1 else None},
                        "speed and memory against context"), fontsize=10)
    _save(fig, out)
    return {"panels": len(BENCH_PANELS), "series": len(engines)}


DRAW = {"passkey": plot_passkey, "ppl": plot_ppl, "bench": plot_bench}


def draw(kind: str, results: list[dict], out: str | Path) -> dict[str, int]:
    return DRAW[kind](results, out)
