"""`wmvla eval`: closed-loop evaluation of a scripted policy or a checkpoint.

    wmvla eval --env metaworld --tasks reach,push --episodes 10 --workers 2 --scripted expert --out runs/eval/expert
    wmvla eval --env libero --suite libero_spatial --episodes 50 --workers 16 --checkpoint CKPT --out runs/eval/e2
    wmvla eval --env libero --suite libero_spatial --episodes 50 --checkpoint CKPT    # -> <run>/eval/<step>__libero_...
    torchrun --nproc_per_node 4 -m vla_core.cli eval ... --checkpoint CKPT                # 4 shards, merged at the end
    wmvla eval --merge DIR                                                              # merge finished shards

Writes DIR/episodes.jsonl (one line per episode, appended as episodes finish; re-running resumes),
DIR/summary.json ({"overall", "per_task", "config"}), DIR/run_config.json (the settings a resumed run must
match) and DIR/videos/*.mp4 (--videos N: episodes with init index < N).

Episodes of task t use init indices first_init .. first_init + episodes - 1 (MetaWorld: configurations of
`--seed`, 1000 by default, disjoint from the training seed 0; LIBERO: the suite's fixed init states), so
every condition evaluated with the same flags faces the same initial conditions and results pair up
episode by episode (vla_core.eval.stats.compare_episode_files).

Sharding (`--num-shards N --shard-index I`, or RANK / WORLD_SIZE under torchrun): each process evaluates
its part of the episodes into DIR/shards/ and the last one to finish merges them into DIR/episodes.jsonl
+ DIR/summary.json (vla_core.eval.shards).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vla_core.envs.registry import (
    METAWORLD_CONFIGS_PER_SEED,
    METAWORLD_EVAL_SEED,
    EnvConfig,
    LiberoSettings,
    MetaWorldSettings,
    describe_env,
    resolve_tasks,
)
from vla_core.eval.engine import EPISODES_FILE, EngineConfig, EpisodeSpec, run_rollouts
from vla_core.eval.stats import success_summary
from vla_core.utils import WmvlaError, atomic_write_json, to_jsonable

SUMMARY_FILE = "summary.json"
NUM_INIT_STATES = {"metaworld": METAWORLD_CONFIGS_PER_SEED, "libero": 50}


@dataclass
class EvalConfig:
    """Closed-loop evaluation: a policy in the loop of N parallel environments."""

    out: Path | None = None
    """output folder (episodes.jsonl, summary.json, videos/); an existing one is resumed. Default with
    --checkpoint: <run>/eval/<step>__<env>_<suite>__mem-<rollout memory> (beside the checkpoint, the folder
    `wmvla matrix` uses); required with --scripted."""
    env: Literal["metaworld", "libero"] = "metaworld"
    suite: str | None = None
    """metaworld: mt50 (default), mt10, core5; libero: libero_spatial (default), _object, _goal, _10, _90."""
    tasks: str | None = None
    """comma-separated task names or indices into the suite; None = every task of the suite."""
    episodes: int = 10
    """episodes per task (init indices first_init .. first_init + episodes - 1)."""
    first_init: int = 0
    workers: int = 2
    """environment worker processes (= policy batch size); 0 = in this process (debugging)."""
    scripted: Literal["expert", "random", "noop"] | None = None
    """built-in policy (expert: MetaWorld only)."""
    checkpoint: Path | None = None
    """checkpoint folder of a trained policy (wmvla train)."""
    rollout_memory: Literal["pred", "zero", "random", "shuffle", "none"] | None = None
    """world memory given to a checkpoint policy at rollout; None = the checkpoint's own (E1 zero, E2/E3 pred);
    ablations: zero/random/shuffle. (oracle is impossible in closed loop: the future is unknown.)"""
    device: str = "auto"
    """device of the checkpoint policy (auto = cuda if available)."""
    condition: str | None = None
    """label stored with every episode; None = derived from the policy (e.g. scripted-expert, ckpt-pred)."""
    replan_steps: int = 5
    """actions executed from each predicted chunk before the policy is called again."""
    max_steps: int | None = None
    """episode limit; None = per-task (metaworld) / per-suite (libero) default, recorded in summary.json."""
    seed: int = METAWORLD_EVAL_SEED
    """MetaWorld evaluation seed (its 50 configurations are the init states); keep it fixed across conditions."""
    policy_seed: int = 0
    """seed of the random policy and of the checkpoint policy's sampling."""
    image_size: int | None = None
    """render resolution; None = 128 (metaworld) / 256 (libero). Must match the training data."""
    wrist_camera: bool | None = None
    """render observation.images.image2; None = off (metaworld) / on (libero)."""
    render_backend: Literal["egl", "osmesa"] = "egl"
    videos: int = 0
    """save mp4s of episodes with init index < videos (per task)."""
    batch_wait_s: float | None = None
    """None = lockstep policy calls over all workers (default); a number = act on the ready slots after
    waiting at most this long for more (faster with cheap policies and many workers)."""
    groups: int = 1
    """lockstep: slots split into this many fixed groups that take turns, so the envs of the other groups
    step while the policy acts for one (deterministic; results do not depend on it)."""
    progress: bool = True
    num_shards: int | None = None
    """split the episodes over N processes (each runs this command with its --shard-index; they share --out);
    None = unsharded, or WORLD_SIZE shards when launched by torchrun / accelerate launch."""
    shard_index: int | None = None
    """this process's shard, 0..N-1 (default under torchrun: RANK). The last shard to finish merges all."""
    merge: Path | None = None
    """merge the shards of this (sharded) evaluation folder into episodes.jsonl + summary.json and exit;
    refuses missing or overlapping shards. Needs no other flag."""
    remote: str = ""
    """URI mirroring --out (s3://bucket/prefix or a folder): episode records are uploaded as they are written
    (throttled) and a re-run downloads them first and continues (docs/storage.md)"""
    metaworld: MetaWorldSettings = field(default_factory=MetaWorldSettings)
    libero: LiberoSettings = field(default_factory=LiberoSettings)

    def env_config(self) -> EnvConfig:
        return EnvConfig(env=self.env, suite=self.suite, image_size=self.image_size, wrist_camera=self.wrist_camera,
                         max_steps=self.max_steps, seed=self.seed, render_backend=self.render_backend,
                         metaworld=self.metaworld, libero=self.libero)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(workers=self.workers, replan_steps=self.replan_steps, videos=self.videos,
                            progress=self.progress, batch_wait_s=self.batch_wait_s, groups=self.groups)


def result_config(env_cfg: EnvConfig, tasks: list[str], init_indices: list[int], engine: EngineConfig,
                  policy: dict, condition: str) -> dict:
    """The `config` block of summary.json: every setting that affects the result, resolved.

    Shared by every command that writes a summary (eval, matrix, demo), so their summaries compare.
    """
    env = describe_env(env_cfg, tasks)
    render = {"backend": env_cfg.render_backend, "image_size": env["image_size"], "camera_keys": env["camera_keys"]}
    if env_cfg.env == "metaworld":
        s = env_cfg.metaworld
        render.update(camera=s.camera, shadow_map_size=s.shadow_map_size, offscreen_samples=s.offscreen_samples,
                      shadows=s.shadows)
    return {
        "env": env_cfg.env,
        "suite": env_cfg.resolved_suite,
        "tasks": list(tasks),
        "episodes_per_task": len(init_indices),
        "init_indices": list(init_indices),
        "max_steps_per_task": env["max_steps_per_task"],
        "replan_steps": engine.replan_steps,
        "seeds": {"env": env_cfg.seed, "policy": policy.get("seed")},
        "render": render,
        "condition": condition,
        "policy": policy,
        "env_config": env,
        "engine": {"workers": engine.workers, "batch_wait_s": engine.batch_wait_s, "groups": engine.groups},
    }


def write_summary(out_dir: str | os.PathLike, records: list[dict], config: dict) -> dict:
    """summary.json = {"overall", "per_task", "config"} from episode records (atomic write)."""
    summary = success_summary(records)
    summary["config"] = config
    atomic_write_json(Path(out_dir) / SUMMARY_FILE, summary)
    return summary


def build_policy(cfg: EvalConfig, env_cfg: EnvConfig) -> tuple[Any, dict, str]:
    """-> (BatchPolicy, description for the summary, default condition label)."""
    if (cfg.scripted is None) == (cfg.checkpoint is None):
        raise WmvlaError("choose exactly one policy: --scripted expert|random|noop or --checkpoint DIR")
    if cfg.scripted is not None:
        from vla_core.eval.scripted import make_scripted_policy

        policy = make_scripted_policy(cfg.scripted, env_cfg, seed=cfg.policy_seed)
        return policy, {"kind": "scripted", "name": cfg.scripted, "seed": cfg.policy_seed}, f"scripted-{cfg.scripted}"
    ckpt = Path(cfg.checkpoint)
    if not ckpt.exists():
        raise WmvlaError(f"--checkpoint {ckpt}: no such folder")
    try:
        from vla_core.eval.checkpoint_policy import load_checkpoint_policy
    except ModuleNotFoundError as e:
        if e.name != "vla_core.eval.checkpoint_policy":
            raise
        raise WmvlaError("checkpoint evaluation is not available in this version (vla_core.eval.checkpoint_policy "
                         "is missing); use --scripted") from e
    device = cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and os.environ.get("LOCAL_RANK") is not None:  # one GPU per launched process
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    policy = load_checkpoint_policy(ckpt, cfg.rollout_memory, device, seed=cfg.policy_seed)
    mode = getattr(policy, "rollout_memory", cfg.rollout_memory)  # resolved by the loader
    from vla_core.train.checkpoint import resolve_checkpoint

    # the checkpoint folder itself (a run folder given on the command line means its latest checkpoint)
    desc = {"kind": "checkpoint", "checkpoint": str(resolve_checkpoint(ckpt).resolve()), "rollout_memory": mode,
            "device": device, "seed": cfg.policy_seed}
    describe = getattr(policy, "describe", None)
    if callable(describe):
        desc["details"] = to_jsonable(describe())
    return policy, desc, f"ckpt-{mode}"


def checkpoint_summary_keys(policy_desc: dict) -> dict:
    """Top-level summary.json config keys of a checkpoint evaluation (as `wmvla matrix` writes them), so the
    report reads experiment/head/seed without guessing from the folder layout."""
    details = policy_desc.get("details") or {}
    keys = {"experiment": details.get("experiment"), "head": details.get("head"), "seed": details.get("seed"),
            "rollout_memory": policy_desc.get("rollout_memory"), "checkpoint": policy_desc.get("checkpoint")}
    return {k: v for k, v in keys.items() if v is not None}


def run_eval(cfg: EvalConfig) -> int:
    from vla_core.eval import shards

    if cfg.merge is not None:
        summary = shards.merge_shards(cfg.merge)
        print_summary(summary, Path(cfg.merge))
        return 0
    env_cfg = cfg.env_config()
    if (cfg.scripted is None) == (cfg.checkpoint is None):
        raise WmvlaError("choose exactly one policy: --scripted expert|random|noop or --checkpoint DIR")
    if cfg.out is None and cfg.checkpoint is None:
        raise WmvlaError("--out DIR is required with --scripted (only a --checkpoint evaluation has a default "
                         "folder: <run>/eval/<step>__<env>_<suite>__mem-<mode>)")
    if cfg.scripted == "expert" and cfg.env != "metaworld":
        raise WmvlaError(f"the scripted expert exists for MetaWorld only, not {cfg.env!r}; "
                         "use --scripted random or noop, or a --checkpoint")
    tasks = resolve_tasks(env_cfg, cfg.tasks)
    if cfg.episodes < 1:
        raise WmvlaError(f"--episodes must be >= 1, got {cfg.episodes}")
    n_init = NUM_INIT_STATES[cfg.env]
    if cfg.first_init < 0 or cfg.first_init + cfg.episodes > n_init:
        raise WmvlaError(
            f"init indices {cfg.first_init}..{cfg.first_init + cfg.episodes - 1} are out of range: {cfg.env} has "
            f"{n_init} init states per task (0..{n_init - 1}"
            + (", per seed; evaluate another block of 50 with a different --seed" if cfg.env == "metaworld" else "")
            + ")")
    shard = shards.resolve_shard(cfg.shard_index, cfg.num_shards)
    policy, policy_desc, default_condition = build_policy(cfg, env_cfg)
    if cfg.out is not None:
        out = Path(cfg.out)
    else:
        from vla_core.eval.checkpoint_policy import eval_dir_for

        out = eval_dir_for(cfg.checkpoint, env_cfg.env, env_cfg.resolved_suite, policy_desc["rollout_memory"])
        print(f"eval: writing to {out} (the checkpoint's evaluation folder; --out overrides)", flush=True)
    if cfg.remote:  # a lost pod: continue from the records in the bucket (vla_core.eval.remote)
        from vla_core.eval.remote import restore_eval

        restore_eval(out, cfg.remote)
    from vla_core.eval.remote import eval_mirror

    mirror = eval_mirror(out, cfg.remote)  # uploads records as they are written; a no-op without --remote
    shards.check_out_dir(out, sharded=shard is not None)
    condition = cfg.condition or default_condition
    engine = cfg.engine_config()
    inits = list(range(cfg.first_init, cfg.first_init + cfg.episodes))
    config = result_config(env_cfg, tasks, inits, engine, policy_desc, condition)
    if policy_desc.get("kind") == "checkpoint":
        config.update(checkpoint_summary_keys(policy_desc))
    episodes = [EpisodeSpec(task, k, condition) for task in tasks for k in inits]
    if shard is None:
        with mirror:
            records = run_rollouts(env_cfg, policy, episodes, out, engine, run_config=config)
        summary = write_summary(out, records, config)
        mirror.flush()
        print_summary(summary, out)
        return 0
    index, n = shard
    paths = shards.shard_paths(out, index, n)
    (out / shards.SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    shards.write_manifest(out, index, n, config, shards.episode_keys(config, episodes))
    mine = [e for e in episodes if shards.shard_of(e.task, e.init_index, n) == index]
    print(f"eval: shard {index} of {n}: {len(mine)} of {len(episodes)} episodes -> {out / paths['episodes']}",
          flush=True)
    if mine:
        with mirror:
            run_rollouts(env_cfg, policy, mine, out, engine, run_config=config, episodes_file=paths["episodes"],
                         run_config_file=paths["run_config"], shard=index)
    summary = shards.merge_shards(out, quiet_if_incomplete=True)
    mirror.flush()
    if summary is not None:
        print(f"eval: all {n} shards finished; merged into {out / EPISODES_FILE}", flush=True)
        print_summary(summary, out)
    return 0


def print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['config']['condition']}  ({summary['config']['env']} / {summary['config']['suite']})")
    for col in ("task", "success", "n", "95% CI", "errors"):
        table.add_column(col, justify="left" if col == "task" else "right")

    def row(name: str, s: dict) -> None:
        lo, hi = s["ci95"]
        table.add_row(name, f"{s['success_rate']:.1%}", str(s["n"]), f"[{lo:.1%}, {hi:.1%}]", str(s["errors"]))

    for task, s in summary["per_task"].items():
        row(task, s)
    row("overall", summary["overall"])
    Console().print(table)
    print(f"episodes: {out / EPISODES_FILE}\nsummary:  {out / SUMMARY_FILE}")
