"""Helper of benchmarks/libero_gpu_bundle.sh (see there): exercise LIBERO envs, pick the files they open,
dump and compare first observations.

    python benchmarks/libero_bundle_tool.py exercise --suites libero_spatial          # run under strace
    python benchmarks/libero_bundle_tool.py select --trace T --robosuite DIR --assets DIR --out LIST
    python benchmarks/libero_bundle_tool.py observe --suites libero_spatial --out obs.npz
    python benchmarks/libero_bundle_tool.py compare A.npz B.npz
    python benchmarks/libero_bundle_tool.py glinfo                   # which GL renderer a LIBERO env uses
    python benchmarks/libero_bundle_tool.py profile                  # where a physics-only step's time goes

`exercise` creates every task of every suite (soft reset mode), resets it to init state 0, steps it 3 times with
both cameras rendered and renders once more; the first task of each suite is also created in hard reset mode and
reset (LIBERO's default, which rebuilds the model from XML). `observe` records, per task, the observation after
reset(0) and after 5 fixed steps (both cameras, 256 px, state) together with the robosuite and asset folders in
use, so a comparison also shows which install produced each file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

SUITES_DEFAULT = ["libero_spatial"]


def _tasks(suite: str) -> list[str]:
    from vla_core.envs.libero_env import libero_task_names

    return libero_task_names(suite)


def exercise(suites: list[str]) -> None:
    from vla_core.envs.libero_env import LiberoEnv

    rng = np.random.default_rng(0)
    for suite in suites:
        for i, name in enumerate(_tasks(suite)):
            modes = ("soft", "hard") if i == 0 else ("soft",)
            for mode in modes:
                env = LiberoEnv(suite, i, reset_mode=mode)
                env.reset(0)
                for _ in range(3):
                    env.step(rng.uniform(-1, 1, 7))
                env.render()
                if mode == "hard":
                    env.reset(1)
                env.close()
            print(f"[exercise] {suite} {i}: {name}", file=sys.stderr, flush=True)


_OPENAT = re.compile(r'open(?:at)?\((?:AT_FDCWD|\d+), "([^"]+)", ([A-Z_|]+)[^)]*\)\s+=\s+(\d+)')


def select(trace: Path, roots: dict[str, Path]) -> dict[str, list[str]]:
    """Files (not folders) successfully opened under each root, as paths relative to it."""
    found: dict[str, set[str]] = {k: set() for k in roots}
    resolved = {k: Path(os.path.realpath(v)) for k, v in roots.items()}
    with open(trace, errors="replace") as f:
        for line in f:
            m = _OPENAT.search(line)
            if not m or "O_DIRECTORY" in m.group(2):
                continue
            p = Path(os.path.realpath(m.group(1)))
            if not p.is_file():
                continue
            for k, root in resolved.items():
                if root in p.parents:
                    found[k].add(str(p.relative_to(root)))
    return {k: sorted(v) for k, v in found.items()}


FIXED_ACTIONS = np.array([[0.3, -0.2, 0.1, 0.0, 0.05, -0.05, -1.0]] * 3 + [[0.0, 0.0, -0.3, 0.0, 0.0, 0.0, 1.0]] * 2)


def observe(suites: list[str], out: Path) -> None:
    import robosuite

    from vla_core.envs.libero_env import LiberoEnv

    arrays, where = {}, None
    for suite in suites:
        for i, _name in enumerate(_tasks(suite)):
            env = LiberoEnv(suite, i)
            where = {"robosuite": str(Path(robosuite.__file__).parent), "assets": str(env.assets)}
            obs = env.reset(0)
            for key, img in obs["images"].items():
                arrays[f"{suite}/{i}/reset/{key}"] = img
            arrays[f"{suite}/{i}/reset/state"] = obs["state"]
            for a in FIXED_ACTIONS:
                res = env.step(a)
            for key, img in res.observation["images"].items():
                arrays[f"{suite}/{i}/step5/{key}"] = img
            arrays[f"{suite}/{i}/step5/state"] = res.observation["state"]
            env.close()
            print(f"[observe] {suite} {i} done", file=sys.stderr, flush=True)
    np.savez_compressed(out, **arrays)
    out.with_suffix(".where.json").write_text(json.dumps(where))
    print(f"[observe] {len(arrays)} arrays -> {out} (robosuite {where['robosuite']}, assets {where['assets']})")


def compare(a: Path, b: Path) -> int:
    x, y = np.load(a), np.load(b)
    if sorted(x.files) != sorted(y.files):
        print(f"[compare] different keys: {sorted(set(x.files) ^ set(y.files))[:10]}")
        return 1
    worst = 0.0
    bad = []
    for k in x.files:
        d = float(np.max(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64)))) if x[k].size else 0.0
        worst = max(worst, d)
        if d > 0:
            bad.append(f"{k}: max |diff| {d:g}")
    print(f"[compare] {len(x.files)} arrays (images uint8, states float32), max |diff| {worst:g}")
    for line in bad[:20]:
        print(f"[compare]   {line}")
    return 1 if bad else 0


def glinfo(suite: str = "libero_spatial") -> None:
    """GL vendor/renderer of a LIBERO env's context (GPU or llvmpipe?), the packages in use, one observation."""
    import time

    import mujoco
    import robosuite
    from OpenGL import GL

    from vla_core.envs.libero_env import LiberoEnv

    t0 = time.perf_counter()
    env = LiberoEnv(suite, 0)
    create_s = time.perf_counter() - t0
    obs = env.reset(0)
    env._make_gl_current()
    info = {k: GL.glGetString(getattr(GL, f"GL_{k.upper()}")).decode() for k in ("vendor", "renderer", "version")}
    img = obs["images"][env.camera_keys[0]]
    info.update(mujoco=mujoco.__version__, robosuite=robosuite.__version__, robosuite_dir=str(Path(robosuite.__file__).parent),
                assets=str(env.assets), python=sys.version.split()[0], create_s=round(create_s, 2),
                image_shape=list(img.shape), image_mean=round(float(img.mean()), 2), state=obs["state"].round(4).tolist())
    env.close()
    print(json.dumps(info))


def profile(suite: str = "libero_spatial", steps: int = 100) -> None:
    """Split one control step (physics only, no cameras) into MuJoCo's own stepping and the Python around it:
    times `steps` env steps, then as many bare mj_step calls as robosuite makes per control step, and prints
    cProfile's top functions of the env steps."""
    import cProfile
    import io as _io
    import pstats
    import time

    import mujoco

    from vla_core.envs.libero_env import LiberoEnv

    env = LiberoEnv(suite, 0)
    env.reset(0)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (steps, 7)) * 0.3
    raw = env.raw_env.env
    substeps = int(round(raw.control_timestep / raw.model_timestep))
    t0 = time.perf_counter()
    for a in actions:
        env.step(a, render=False)
    env_ms = 1e3 * (time.perf_counter() - t0) / steps
    m, d = raw.sim.model._model, raw.sim.data._data
    t0 = time.perf_counter()
    for _ in range(steps * substeps):
        mujoco.mj_step(m, d)
    mj_ms = 1e3 * (time.perf_counter() - t0) / steps
    env.reset(0)
    prof = cProfile.Profile()
    prof.enable()
    for a in actions:
        env.step(a, render=False)
    prof.disable()
    buf = _io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    env.close()
    t0 = time.perf_counter()
    x = 0
    for i in range(2_000_000):
        x += i
    py_loop_ms = 1e3 * (time.perf_counter() - t0)
    a = np.random.default_rng(0).normal(size=(7, 7))
    t0 = time.perf_counter()
    for _ in range(100_000):
        a @ a
    np_us = 10 * (time.perf_counter() - t0)
    import numba
    import robosuite.macros as macros

    print(json.dumps({"control_step_ms_physics_only": round(env_ms, 2), "substeps_per_control_step": substeps,
                      "bare_mj_step_ms_per_control_step": round(mj_ms, 2),
                      "python_loop_2M_adds_ms": round(py_loop_ms, 1), "numpy_7x7_matmul_us": round(np_us, 2),
                      "numpy": np.__version__, "mujoco": mujoco.__version__, "numba": numba.__version__,
                      "robosuite_numba": macros.ENABLE_NUMBA, "python": sys.version.split()[0]}))
    print("\n".join(buf.getvalue().splitlines()[:40]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("exercise")
    p.add_argument("--suites", nargs="+", default=SUITES_DEFAULT)
    p = sub.add_parser("select")
    p.add_argument("--trace", type=Path, required=True)
    p.add_argument("--robosuite", type=Path, required=True, help="robosuite's models/assets folder")
    p.add_argument("--assets", type=Path, required=True, help="the LIBERO asset tree in use")
    p.add_argument("--out", type=Path, required=True, help="JSON {robosuite: [...], assets: [...]}")
    p = sub.add_parser("observe")
    p.add_argument("--suites", nargs="+", default=SUITES_DEFAULT)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("compare")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p = sub.add_parser("glinfo")
    p.add_argument("--suite", default="libero_spatial")
    p = sub.add_parser("profile")
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--steps", type=int, default=100)
    args = ap.parse_args(argv)
    if args.cmd == "profile":
        profile(args.suite, args.steps)
    elif args.cmd == "glinfo":
        glinfo(args.suite)
    elif args.cmd == "exercise":
        exercise(args.suites)
    elif args.cmd == "select":
        sel = select(args.trace, {"robosuite": args.robosuite, "assets": args.assets})
        args.out.write_text(json.dumps(sel, indent=1))
        print(f"[select] opened: {len(sel['robosuite'])} files of robosuite's models/assets, "
              f"{len(sel['assets'])} of the LIBERO asset tree")
    elif args.cmd == "observe":
        observe(args.suites, args.out)
    elif args.cmd == "compare":
        return compare(args.a, args.b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
