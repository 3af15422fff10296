"""Policy side of closed-loop evaluation: seconds per `act` round of a checkpoint policy, as the rollout engine
calls it (one batched call per round for all env slots; with world memory, the frames executed inside the last
chunk are first handed to `observe`, then encoded at `act`). Prints JSON.

    python benchmarks/bench_policy_act.py --checkpoint /tmp/ckpt_2b/run --batch 16 --replan-steps 5
    python benchmarks/bench_policy_act.py --checkpoint /tmp/ckpt_2b/run --rollout-memory pred zero

Observations are LIBERO-shaped (two 256 px uint8 cameras with random pixels, 8-d state, a spatial-suite
instruction). Per rollout-memory mode: the median wall time of `rounds` rounds after `warmup` (each round =
`replan_steps - 1` observe calls per slot + one act over all slots; the GPU is synchronised by the numpy
result), and the same for act alone without world memory frames when the mode needs none. Together with the
env cost of `replan_steps` steps (bench_envs.py) this explains the engine's round time in lockstep mode.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--rollout-memory", nargs="+", default=[None], help="modes to time (default: the checkpoint's)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--replan-steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    import torch

    from vla_core.eval.checkpoint_policy import load_checkpoint_policy

    rng = np.random.default_rng(0)
    keys = ("observation.images.image", "observation.images.image2")

    def obs() -> dict:
        return {"images": {k: rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8) for k in keys},
                "state": rng.normal(size=8).astype(np.float32)}

    out: dict = {"checkpoint": args.checkpoint, "batch": args.batch, "replan_steps": args.replan_steps,
                 "rounds": args.rounds, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "modes": {}}
    for mode in args.rollout_memory:
        t0 = time.perf_counter()
        policy = load_checkpoint_policy(args.checkpoint, mode, args.device, print_prompt=False)
        load_s = time.perf_counter() - t0
        slots = list(range(args.batch))
        for s in slots:
            policy.reset(s, "task", INSTRUCTION)
        frames = [[obs() for _ in slots] for _ in range(args.replan_steps)]  # pre-made: time the policy only
        times = []
        for r in range(args.warmup + args.rounds):
            t1 = time.perf_counter()
            if hasattr(policy, "observe"):
                for k in range(args.replan_steps - 1):
                    for s in slots:
                        policy.observe(s, frames[k][s])
            chunks = policy.act(slots, frames[-1], [INSTRUCTION] * len(slots))
            assert len(chunks) == len(slots) and np.all(np.isfinite(np.stack(chunks)))
            if r >= args.warmup:
                times.append(time.perf_counter() - t1)
        name = getattr(policy, "rollout_memory", str(mode))
        out["modes"][name] = {"load_s": round(load_s, 1), "world_encoder": hasattr(policy, "observe"),
                              "round_ms_median": round(1e3 * float(np.median(times)), 1),
                              "round_ms_min": round(1e3 * float(np.min(times)), 1),
                              "chunk_shape": list(np.asarray(chunks[0]).shape)}
        print(f"[policy] {name}: {out['modes'][name]}", flush=True)
        del policy
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
