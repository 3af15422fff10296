"""What a local run (`wmvla demo`, `wmvla pipeline run --local`) spends before its first task, before and after
it ran the compiled YAML: building the pipeline from pipelines/matrix.py in the process (the old way) vs
checking pipelines/matrix.yaml by the backend's rules and loading it (the new way). Everything after that is the
same kfp.local orchestrator running the same pipeline spec, so this difference is all a local run changes.

    python benchmarks/bench_pipeline_prep.py --repeats 5

Each measurement is a fresh Python process that first imports what `wmvla demo` has imported by then, then times
one way (its own imports included); prints one JSON line with the median seconds of both ways and the ratio
new / old.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the demo's process has imported before run_local either way (pipelines/demo.py, vla_core.storage)
PRELUDE = "import pipelines.demo, vla_core.storage, vla_core.experiments.report\n"
OLD = ("from pipelines.matrix import matrix\n"
       "matrix.pipeline_spec\n")  # what kfp.local ran: the spec built from the Python graph
NEW = ("from kfp import components\n"
       "from pipelines.cli import COMPILED\n"
       "from pipelines.conformance import require_conformant\n"
       "require_conformant(COMPILED)\n"
       "components.load_component_from_file(str(COMPILED)).pipeline_spec\n")


def timed(code: str) -> float:
    """Seconds of `code` alone in a fresh process that has run PRELUDE first (timed inside the process)."""
    wrapped = (f"{PRELUDE}import time\nt0 = time.perf_counter()\n{code}"
               "print(time.perf_counter() - t0)\n")
    out = subprocess.run([sys.executable, "-c", wrapped], check=True, cwd=ROOT, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    timed(OLD), timed(NEW)  # warm the file cache for both
    old, new = [], []
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        old.append(timed(OLD))
        new.append(timed(NEW))
    result = {"old_build_from_python_s": round(statistics.median(old), 3),
              "new_check_and_load_yaml_s": round(statistics.median(new), 3),
              "ratio_new_old": round(statistics.median(new) / statistics.median(old), 3), "repeats": args.repeats}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
