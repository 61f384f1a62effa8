"""The first decode steps of a fresh process on the default model (issue 32): where the compiled step's load and
check land, and the steps after. Run it with the tree's PYTHONPATH and ARBOR_COMPILE set as wanted (0: eager;
sync: the library from the first step; unset: from the 17th).

    python benchmarks/compiled_first_steps.py [STEPS]

Prints one line: the first step, the median of the rest, and whether the library ran.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import arbor_cli
from arbor_core.backend import SamplingParams
from arbor_core.rope import rope_frequencies


def main() -> None:
    steps_wanted = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    model = arbor_cli.load(quiet=True)
    lm = model.lm
    cache = lm.new_cache(1024, rope_frequencies(lm.config))
    ids = model.tokenizer.encode("The history of the city of Paris")
    token = lm.sample(lm.prefill(ids, cache, 512), SamplingParams(), None)
    times = []
    for _ in range(steps_wanted):
        start = time.perf_counter()
        token = lm.sample(lm.decode(token, cache), SamplingParams(), None)
        times.append(time.perf_counter() - start)
    compiled = getattr(lm, "compiled", None)
    print(f"ARBOR_COMPILE={os.environ.get('ARBOR_COMPILE', '(unset)')}: first step {times[0] * 1000:.0f} ms, median of "
          f"the next {len(times) - 1} {statistics.median(times[1:]) * 1000:.0f} ms, library ran: "
          f"{compiled is not None and compiled.run is not None}, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
