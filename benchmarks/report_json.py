"""The benchmarks' --json option, once: "-" prints the raw report instead of the table, a path also
writes it there (the table still prints). Imported by scripts run as `python benchmarks/NAME.py`."""

from __future__ import annotations

import json


def emit(report: dict, target: str | None) -> bool:
    """Write `report` as --json asks; True when it went to stdout (and the table must not follow)."""
    if target == "-":
        print(json.dumps(report, indent=1))
        return True
    if target:
        with open(target, "w") as f:
            json.dump(report, f, indent=1)
    return False
