"""`wmvla vision-cache`: build the frozen vision tower's feature cache for a training run's dataset and policy.

    wmvla vision-cache --preset libero-2b --dataset /data/libero --policy.finetune frozen_vision
    wmvla train        --preset libero-2b --dataset /data/libero --policy.finetune frozen_vision \
        --vision-cache cache/libero/train_vision_features_Qwen3-VL-2B-Instruct_s224_<sha>.bfloat16.npy

It takes the training command's own flags (a `TrainConfig`, presets included), so the cache is built for
exactly the policy config the run will check it against (vla_core/policy/vision_cache.py: what is stored,
what keys it, what is refused); `--vision-cache PATH` chooses the file (default cache/<dataset>/...). Resumable
(rerun the same command), atomic (the spec .json is written last), `--overwrite` replaces another build.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vla_core.train.config import PRESETS as TRAIN_PRESETS
from vla_core.train.config import TrainConfig


@dataclass
class VisionCacheConfig(TrainConfig):
    """Precompute the frozen vision tower's outputs for every frame x camera of a training run's dataset."""

    images_per_batch: int = 32
    """frames per tower call (each camera is a separate call)"""
    overwrite: bool = False
    """replace an existing (complete or partial) cache built with other settings"""
    cache_root: str = "cache"
    """the default output folder's root (cache/<dataset name>/...) when --vision-cache is not given"""

    @classmethod
    def from_train(cls, cfg: TrainConfig) -> "VisionCacheConfig":
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)})


# `wmvla vision-cache --preset NAME`: the training presets, as this command's config
PRESETS = {name: (lambda factory=factory: VisionCacheConfig.from_train(factory()))
           for name, factory in TRAIN_PRESETS.items()}


def run_vision_cache(cfg: VisionCacheConfig) -> int:
    import torch

    from vla_core.data.lerobot import LeRobotDataset
    from vla_core.policy.vision_cache import (
        build_frozen_backbone,
        check_vision_frozen,
        default_cache_path,
        precompute_vision_features,
        spec_for,
    )
    from vla_core.train.config import resolve_for_data
    from vla_core.utils import WmvlaError

    check_vision_frozen(cfg.policy)
    if not cfg.dataset:
        raise WmvlaError("no dataset: pass --dataset PATH_OR_REPO (the training run's dataset)")
    ds = LeRobotDataset.open(cfg.dataset, cfg.keys, revision=cfg.dataset_revision)
    pcfg = resolve_for_data(cfg, ds.features, None)[0].policy  # cameras etc. as the training run resolves them
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = build_frozen_backbone(pcfg, device)
    spec = spec_for(pcfg, backbone)
    out = cfg.vision_cache or str(default_cache_path(cfg.dataset, spec, cfg.cache_root))
    print(f"vision-cache: {ds.num_frames} frames x {len(pcfg.camera_keys)} cameras of {cfg.dataset} -> {out} "
          f"({ds.num_frames * spec.entry_bytes / 1e9:.2f} GB)")
    cache = precompute_vision_features(ds, backbone, pcfg, out, batch_size=cfg.images_per_batch,
                                       overwrite=cfg.overwrite, spec=spec)
    print(f"vision-cache: ok {cache.path}; train with the same flags plus --vision-cache {cache.path}")
    return 0
