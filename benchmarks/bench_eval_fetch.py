"""What an evaluation shard downloads at its start, and the time until its policy is loaded (issue 24): the whole
newest checkpoint (before) vs only what evaluation reads (after), against a real SeaweedFS, in the same run.

A real checkpoint with the 2B file set (model fp32, EMA fp32, Adam state, tokenizer, config, stats) is trained
with the widened tiny policy of bench_checkpoint.py (16 bytes per trained value, as at 2B: ~1/150 of
libero-2b's ~35 GB; the script prints the scale) and uploaded as training does. Then, rounds alternating:

  before   the former `cells.checkpoint_objects`: every object of the newest checkpoint (train_state.pt and
           model.safetensors included) + the run's top-level files; the policy loaded from model + EMA
           (the format before buffers.safetensors: that file is not fetched)
  after    `cells.fetch_checkpoint_for_eval`: the EMA + buffers files and the small files, verified against
           the checkpoint's manifest; the policy loaded from EMA + buffers

Each round starts from an empty local folder (a new pod). Reported per mode: bytes downloaded, fetch seconds,
load seconds (vla_core.train.checkpoint.load_policy, CPU) and their sum: task start to policy loaded.

    python benchmarks/bench_eval_fetch.py --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_checkpoint import CKPT_2B_GB, _q, widened_tiny_config  # noqa: E402


def whole_checkpoint_objects(store):
    """Before issue 24 (cells.checkpoint_objects): the newest checkpoint's folder whole + the top-level files."""
    name = store.get_bytes("checkpoints/latest").decode().strip()
    return [o for o in store.list() if ("/" not in o.key or o.key == "checkpoints/latest"
                                        or o.key.startswith(f"checkpoints/{name}/"))
            and not o.key.endswith("/buffers.safetensors")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")

    import torch

    torch.set_num_threads(1)
    from vla_core.experiments.cells import fetch_checkpoint_for_eval
    from vla_core.storage import open_store, sync_down
    from vla_core.storage.seaweed import SeaweedFS
    from vla_core.train.checkpoint import load_policy
    from vla_core.train.loop import train

    with tempfile.TemporaryDirectory(prefix="bench-evalfetch-") as tmp_s, SeaweedFS(Path(tmp_s) / "s3") as server:
        tmp = Path(tmp_s)
        os.environ.update(server.env())
        uri = f"{server.create_bucket('evalfetch')}/run"
        cfg = widened_tiny_config(tmp, args.hidden, args.layers, args.intermediate, steps=2, ckpt_every=2)
        import dataclasses

        summary = train(dataclasses.replace(cfg, out_root=str(tmp / "train"), remote=uri))
        ckpt = Path(summary["run_dir"]) / "checkpoints" / "step_0000002"
        sizes = {p.name: p.stat().st_size for p in ckpt.iterdir() if p.is_file()}
        total = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        shutil.rmtree(tmp / "train")

        def before(local: Path) -> int:
            return sync_down(uri, local, objects=whole_checkpoint_objects(open_store(uri))).bytes

        def after(local: Path) -> int:
            return fetch_checkpoint_for_eval(uri, local, log=lambda *a: None)["bytes"]

        rows = {"before": [], "after": []}
        for r in range(args.rounds):
            for mode in (("before", "after") if r % 2 == 0 else ("after", "before")):
                local = tmp / f"pod-{r}-{mode}"
                t = time.perf_counter()
                nbytes = (before if mode == "before" else after)(local)
                t_fetch = time.perf_counter() - t
                load_policy(local, device="cpu")
                t_all = time.perf_counter() - t
                rows[mode].append({"bytes": nbytes, "fetch_s": t_fetch, "load_s": t_all - t_fetch, "total_s": t_all})
                print(json.dumps({"round": r, "mode": mode, **{k: round(v, 3) for k, v in rows[mode][-1].items()}}),
                      flush=True)
                shutil.rmtree(local)

    def stat(mode, key):
        return _q([x[key] for x in rows[mode]])

    result = {
        "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(), "rounds": args.rounds,
        "checkpoint_mb": round(total / 1e6, 1), "scale_vs_2b": f"1/{round(CKPT_2B_GB * 1e9 / total)}",
        "checkpoint_files_mb": {k: round(v / 1e6, 2) for k, v in sorted(sizes.items())},
        "bytes_per_shard_start_mb": {m: round(statistics.median(x["bytes"] for x in rows[m]) / 1e6, 1)
                                     for m in rows},
        **{f"{key}_q1_median_q3": {m: stat(m, key) for m in rows} for key in ("fetch_s", "load_s", "total_s")},
    }
    result["total_s_ratio_after_over_before"] = round(result["total_s_q1_median_q3"]["after"][1]
                                                      / result["total_s_q1_median_q3"]["before"][1], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
