"""Which dataset columns mean what. Keys are configuration, never guessed.

The earlier attempt at this project trained with `instruction_key="instruction"` on a LeRobot dataset,
which has no such column: every prompt was an empty string and the policy reached 0 % success. Here a key
that the dataset does not have fails at start-up, listing the keys it does have.
"""

from __future__ import annotations

from dataclasses import dataclass

from vla_core.utils import WmvlaError

# Per-frame bookkeeping columns every LeRobot dataset has (LeRobot's DEFAULT_FEATURES).
INDEX_FEATURES = ("timestamp", "frame_index", "episode_index", "index", "task_index")

# LeRobot keeps the language instruction in meta/tasks and attaches it to a frame via `task_index`;
# loaders expose it as `task`. It is therefore not a feature in meta/info.json.
TASK_KEY = "task"


@dataclass(frozen=True)
class DatasetKeys:
    """Dataset column names for each role (defaults: HuggingFaceVLA/libero)."""

    image_key: str = "observation.images.image"
    """agent-view camera (image or video feature)"""
    wrist_image_key: str | None = "observation.images.image2"
    """wrist camera; None = the dataset has no wrist camera / do not use it"""
    state_key: str = "observation.state"
    """proprioceptive state, float [S]"""
    action_key: str = "action"
    """action, float [A]"""
    instruction_key: str = TASK_KEY
    """language instruction; LeRobot stores it as `task` (from meta/tasks via task_index)"""
    episode_key: str = "episode_index"
    """per-frame episode id column"""

    @property
    def camera_keys(self) -> tuple[str, ...]:
        """Image keys in use, agent view first."""
        return (self.image_key,) if self.wrist_image_key is None else (self.image_key, self.wrist_image_key)

    def validate(self, features: dict[str, dict], source: str = "dataset") -> None:
        """Raise WmvlaError if a configured key is missing from `features` or has the wrong kind.

        `features` is meta/info.json's feature dict. All problems are reported at once.
        """
        available = sorted(features)
        problems = []

        def need(role: str, key: str | None, kinds: tuple[str, ...]) -> None:
            if key is None:
                return
            if key not in features:
                problems.append(f"{role}={key!r} is not a feature of the dataset")
                return
            dtype = features[key].get("dtype")
            if "numeric" in kinds:
                if dtype in ("image", "video", "string"):
                    problems.append(f"{role}={key!r} has dtype {dtype!r}, expected a numeric feature")
            elif dtype not in kinds:
                problems.append(f"{role}={key!r} has dtype {dtype!r}, expected one of {list(kinds)}")

        need("image_key", self.image_key, ("image", "video"))
        need("wrist_image_key", self.wrist_image_key, ("image", "video"))
        need("state_key", self.state_key, ("numeric",))
        need("action_key", self.action_key, ("numeric",))
        need("episode_key", self.episode_key, ("numeric",))
        if self.wrist_image_key is not None and self.wrist_image_key == self.image_key:
            problems.append(f"wrist_image_key equals image_key ({self.image_key!r}); use None for no wrist camera")

        hint = ""
        if self.instruction_key == TASK_KEY:
            if "task_index" not in features:
                problems.append("instruction_key='task' needs the per-frame 'task_index' column, which is missing")
        elif self.instruction_key not in features:
            problems.append(f"instruction_key={self.instruction_key!r} is not a feature of the dataset")
            hint = (
                "\nhint: LeRobot datasets store the language instruction under `task` (meta/tasks + the "
                "per-frame task_index), not as a feature; use --keys.instruction-key task "
                "(the default)."
            )
        elif features[self.instruction_key].get("dtype") != "string":
            problems.append(
                f"instruction_key={self.instruction_key!r} has dtype "
                f"{features[self.instruction_key].get('dtype')!r}, expected 'string'"
            )

        if problems:
            raise WmvlaError(
                f"{source}: dataset keys do not match the dataset:\n  - "
                + "\n  - ".join(problems)
                + f"\navailable keys: {available} (plus 'task' via task_index)"
                + hint
                + "\nfix: pass the right names, e.g. --keys.image-key KEY --keys.wrist-image-key None"
            )
