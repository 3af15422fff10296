"""What the pipeline's pre-flight step costs the demo: `wmvla demo` run once, the pre-flight task's span read from
kfp.local's own log lines (task started / finished, with timestamps), as a share of the demo's wall time.

    python benchmarks/bench_preflight.py --out /tmp/bench-preflight        # the whole demo (~8 min idle, 2 cores)

Prints one JSON line: the demo's wall time, the pre-flight task's span, and their ratio (goal <= 0.05: the step
must not slow the demo by more than 5 %). The pre-flight runs first and alone, so its span is what it adds.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

# kfp.local: "09:12:03.670 - INFO - Executing task 'preflight'" ... "Task 'preflight' finished with status SUCCESS"
LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - \w+ - (?:Executing task '(\S+)'|Task '(\S+)' finished with status (\w+))")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def task_spans(log: str) -> dict[str, float]:
    """Seconds from each task's start to its end (first occurrence of each name)."""
    started, spans = {}, {}
    for raw in log.splitlines():
        m = LINE.match(ANSI.sub("", raw).strip())
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%H:%M:%S.%f")
        if m.group(2):
            started.setdefault(m.group(2), t)
        elif m.group(3) in started and m.group(3) not in spans:
            spans[m.group(3)] = (t - started[m.group(3)]).total_seconds() % 86400
    return spans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("demo_args", nargs="*", help="extra `wmvla demo` arguments")
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    wmvla = Path(sys.executable).parent / "wmvla"
    t0 = time.perf_counter()
    r = subprocess.run([str(wmvla), "demo", "--out", str(args.out), *args.demo_args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = r.stdout + r.stderr
    (args.out.parent / f"{args.out.name}.log").write_text(log)
    if r.returncode != 0:
        raise SystemExit(f"wmvla demo failed ({r.returncode}); log: {args.out.parent / (args.out.name + '.log')}")
    spans = task_spans(log)
    if "preflight" not in spans:
        raise SystemExit("no pre-flight task in the demo's log: is this a version with the pre-flight step?")
    print(json.dumps({"demo_wall_s": round(wall, 1), "preflight_s": round(spans["preflight"], 2),
                      "plan_s": round(spans.get("plan-matrix", float("nan")), 2),
                      "ratio_preflight_demo": round(spans["preflight"] / wall, 4), "goal": 0.05}))


if __name__ == "__main__":
    main()
