"""PolicyProcessor: the one preprocessing function for training and evaluation.

raw samples (camera images uint8 HxWx3, state float [S], task str, optionally the action chunk and world
latents) -> model inputs:
  - the prompt: the backbone's own chat template with one image item per camera (agent view, then wrist
    view: separate images, never pasted together), the instruction text, and the H <ACT_i> tokens after the
    assistant turn start; each image placeholder is expanded to the number of merged patch tokens, exactly
    as the Qwen-VL processors do. Token ids are cached per instruction (a dataset has few distinct tasks).
  - images resized to `image_size` x `image_size` by `resize_images` (bicubic, antialiased, rounded back to
    uint8 like a PIL resize). They stay uint8 until the model: `pixel_values_from_images` (normalise +
    Qwen patch layout) runs on the model's device inside forward, so only uint8 crosses the host-device link.
  - state and actions normalised with vla_core.data.normalize (the single normalise/unnormalise pair).

Why our own image patchify instead of transformers' image processor: transformers' Qwen2-VL image processor
classes changed names and backends between the versions we support (5.17 on the GPU machine, 5.24 here:
`Qwen2VLImageProcessor` became the torchvision backend and the PIL one `Qwen2VLImageProcessorPil`), and the
torchvision backend cannot be installed on this CPU machine. The layout (rescale 1/255, normalise with the
checkpoint's image_mean/std, patches ordered by 2x2 merge groups, each patch repeated over the temporal
patch of 2) is a few tensor ops; a test checks it equals transformers' processor output bit for bit.
Unlike the transformers processor we do not apply the checkpoint's min/max pixel limits: the resolution is
the config's `image_size` (e.g. 224), the same in training and rollout.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vla_core.policy.backbone import IMAGE_PAD
from vla_core.policy.config import PolicyConfig
from vla_core.utils import WmvlaError


def _as_tensor(x, dtype=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


# What `resize_images` does, recorded in the vision-feature cache's spec (a change of it must refuse old caches).
RESIZE_METHOD = "bicubic, antialias, align_corners=False, rounded and clamped to uint8 (processing.resize_images)"


def resize_images(images: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """uint8 [..., h, w, 3] -> uint8 [..., 3, size, size] (bicubic with antialiasing, rounded like a PIL resize).

    The only image resize of the policy: training batches and rollout observations both go through it.
    """
    x = _as_tensor(images)
    if x.dtype != torch.uint8:
        raise WmvlaError(f"images must be uint8 [..., H, W, 3], got dtype {x.dtype}")
    if x.ndim < 3 or x.shape[-1] != 3:
        raise WmvlaError(f"images must be [..., H, W, 3] (channels last, RGB), got shape {tuple(x.shape)}")
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2)  # [N, 3, h, w]
    if x.shape[-2:] != (size, size):
        y = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    return x.reshape(*lead, 3, size, size).contiguous()


def pixel_values_from_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], patch_size: int,
                             merge_size: int, temporal_patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3, S, S] -> (pixel_values [N * gh * gw, 3 * tp * p * p] float32, image_grid_thw [N, 3] on the CPU).

    Same values and layout as the Qwen2-VL image processor (shared by Qwen2.5-VL and Qwen3-VL) for an image
    that is already at its target size: x/255, (x - mean)/std, patches grouped by merge_size x merge_size
    blocks in row-major order, each patch repeated temporal_patch_size times (a still image).
    """
    n, c, hgt, wid = images.shape
    p, m = patch_size, merge_size
    gh, gw = hgt // p, wid // p
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, c, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, c, 1, 1)
    x = (images.float() / 255.0 - mean_t) / std_t
    x = x.reshape(n, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [n, gh/m, gw/m, m_h, m_w, c, p_h, p_w]
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal_patch_size, p, p)  # [..., c, tp, p, p]
    pixel_values = x.reshape(n * gh * gw, c * temporal_patch_size * p * p)
    return pixel_values, image_grid_thw(n, gh, gw)


def image_grid_thw(n: int, gh: int, gw: int) -> torch.Tensor:
    """[n, 3] rows (1, gh, gw) in patches: n still images of one size. On the CPU whatever the images' device:
    shape metadata, read by Python (`VLBackbone.grid_for_model` moves it to the device only where transformers
    needs it there)."""
    return torch.tensor([1, gh, gw], dtype=torch.long).expand(n, 3).contiguous()


def _normalize_fns():
    # Imported lazily: vla_core.data.normalize is the one normalise/unnormalise pair (never re-implemented here).
    from vla_core.data.normalize import normalize, unnormalize

    return normalize, unnormalize


class PolicyProcessor:
    """Raw samples -> model input tensors; action normalise/unnormalise. Picklable (DataLoader workers)."""

    def __init__(self, cfg: PolicyConfig, tokenizer, stats: Mapping, *, image_token_id: int, act_token_ids: Sequence[int],
                 tokens_per_image: int, max_cache: int = 4096):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.stats = stats
        self.image_token_id = int(image_token_id)
        self.act_token_ids = [int(i) for i in act_token_ids]
        self.tokens_per_image = int(tokens_per_image)
        self.pad_token_id = int(tokenizer.pad_token_id)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._max_cache = max_cache
        for key in (cfg.action_key,) + ((cfg.state_key,) if cfg.use_state else ()):
            if key not in stats:
                raise WmvlaError(f"normalisation stats have no entry for {key!r} (found {sorted(stats)}). "
                                 "Compute them with vla_core.data.normalize.compute_stats for the policy's keys.")

    @classmethod
    def from_backbone(cls, cfg: PolicyConfig, backbone, stats: Mapping) -> "PolicyProcessor":
        return cls(cfg, backbone.tokenizer, stats, image_token_id=backbone.image_token_id,
                   act_token_ids=backbone.act_token_ids, tokens_per_image=backbone.tokens_per_image)

    # ------------------------------------------------------------------------------------------ prompt

    def prompt_text(self, task: str) -> str:
        """The chat-templated prompt (one image placeholder per camera) followed by the ACT tokens."""
        if not isinstance(task, str) or not task.strip():
            raise WmvlaError(f"empty or missing task instruction ({task!r}). The policy needs the language "
                             "instruction (LeRobot datasets keep it as `task`); an empty prompt trains a "
                             "task-agnostic policy.")
        content = [{"type": "image"} for _ in self.cfg.camera_keys]
        content.append({"type": "text", "text": self.cfg.prompt_template.format(task=task.strip())})
        messages = [{"role": "user", "content": content}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        act = "".join(self.tokenizer.convert_ids_to_tokens(self.act_token_ids))
        return text + act

    def encode_prompt(self, task: str) -> torch.Tensor:
        """Token ids [L] of the full prompt with image placeholders expanded (cached per task string)."""
        ids = self._cache.get(task)
        if ids is not None:
            self._cache.move_to_end(task)
            return ids
        text = self.prompt_text(task)
        n_cams = len(self.cfg.camera_keys)
        if text.count(IMAGE_PAD) != n_cams:
            raise WmvlaError(f"chat template produced {text.count(IMAGE_PAD)} image placeholders for {n_cams} cameras "
                             f"(task {task!r}); the task text must not contain {IMAGE_PAD}")
        text = text.replace(IMAGE_PAD, IMAGE_PAD * self.tokens_per_image)
        ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        h = len(self.act_token_ids)
        if ids[-h:].tolist() != self.act_token_ids or int((ids == self.image_token_id).sum()) != n_cams * self.tokens_per_image:
            raise WmvlaError(f"prompt for task {task!r} did not tokenize as expected (ACT tokens last, "
                             f"{n_cams}x{self.tokens_per_image} image tokens)")
        self._cache[task] = ids
        if len(self._cache) > self._max_cache:
            self._cache.popitem(last=False)
        return ids

    def tokenize(self, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        """Right-padded batch: input_ids, attention_mask, mm_token_type_ids [B, L], act_index [B, H]."""
        seqs = [self.encode_prompt(t) for t in tasks]
        lengths = torch.tensor([len(s) for s in seqs])
        input_ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=self.pad_token_id)
        positions = torch.arange(input_ids.shape[1])
        attention_mask = (positions[None] < lengths[:, None]).long()
        h = len(self.act_token_ids)
        # ACT tokens close every prompt: positions len-H .. len-1, gathered by index (any padding side works)
        act_index = lengths[:, None] - h + torch.arange(h)[None]
        mm_token_type_ids = (input_ids == self.image_token_id).int() * attention_mask.int()
        return dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                    act_index=act_index)

    # ---------------------------------------------------------------------------------- normalisation

    def normalize_state(self, state) -> torch.Tensor:
        normalize, _ = _normalize_fns()
        x = _as_tensor(state, torch.float32)
        if x.shape[-1] != self.cfg.state_dim:
            raise WmvlaError(f"state has {x.shape[-1]} dims, the policy expects state_dim={self.cfg.state_dim}")
        return _as_tensor(normalize(x.numpy(), self.stats[self.cfg.state_key]), torch.float32)

    def normalize_actions(self, actions) -> torch.Tensor:
        normalize, _ = _normalize_fns()
        x = _as_tensor(actions, torch.float32)
        if x.shape[-1] != self.cfg.action_dim:
            raise WmvlaError(f"actions have {x.shape[-1]} dims, the policy expects action_dim={self.cfg.action_dim}")
        return _as_tensor(normalize(x.numpy(), self.stats[self.cfg.action_key]), torch.float32)

    def unnormalize_actions(self, actions) -> np.ndarray:
        _, unnormalize = _normalize_fns()
        x = actions.detach().float().cpu().numpy() if isinstance(actions, torch.Tensor) else np.asarray(actions, np.float32)
        return np.asarray(unnormalize(x, self.stats[self.cfg.action_key]), dtype=np.float32)

    # ----------------------------------------------------------------------------------------- batches

    def __call__(self, batch: Mapping) -> dict:
        """A collated training batch (ChunkDataset collate + world latents) -> model inputs (CPU tensors).

        Expects `images` uint8 [B, n_cams, h, w, 3] (cameras in `cfg.camera_keys` order), `state` [B, S],
        `task` list[str]; optional `actions` [B, H, A] + `action_mask` [B, H], `world_history` [B, T, D],
        `world_future` [B, K, D], `future_mask` [B, K].
        """
        tasks = batch.get("task")
        if tasks is None:
            raise WmvlaError(f"batch has no `task` (keys: {sorted(batch)}); the policy needs the instruction text")
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        n_cams = len(self.cfg.camera_keys)
        # a frozen tower's cached outputs [B, n_cams, ...] (training with --vision-cache) replace the images
        cached = batch.get("vision_features")
        images = None if batch.get("images") is None else _as_tensor(batch["images"])  # converted once
        if images is None and cached is None:
            raise WmvlaError(f"batch has no `images` (keys: {sorted(batch)}); expected uint8 [B, {n_cams}, H, W, 3]")
        for name, x in (("images", images), ("vision_features", cached)):
            if x is None:
                continue
            if x.ndim != 5 or x.shape[1] != n_cams or (name == "images" and x.shape[-1] != 3):
                raise WmvlaError(f"{name} must be [B, {n_cams}, ...] (cameras {list(self.cfg.camera_keys)}; images "
                                 f"uint8 [B, {n_cams}, H, W, 3]), got {tuple(x.shape)}")
            if x.shape[0] != len(tasks):
                raise WmvlaError(f"{x.shape[0]} samples of {name} but {len(tasks)} task strings")
        out = self.tokenize(tasks)
        if images is not None:
            out["images"] = resize_images(images, self.cfg.image_size)  # uint8 [B, n_cams, 3, S, S]
        if cached is not None:
            out["vision_features"] = cached
        if self.cfg.use_state:
            if batch.get("state") is None:
                raise WmvlaError("use_state=True but the batch has no `state`")
            out["state"] = self.normalize_state(batch["state"])
        if batch.get("actions") is not None:
            actions = _as_tensor(batch["actions"], torch.float32)
            if actions.shape[-2] != self.cfg.chunk_size:
                raise WmvlaError(f"action chunk has {actions.shape[-2]} steps, chunk_size={self.cfg.chunk_size}")
            out["actions"] = self.normalize_actions(actions)
            mask = batch.get("action_mask")
            out["action_mask"] = (torch.ones(actions.shape[:-1], dtype=torch.bool) if mask is None
                                  else _as_tensor(mask).bool())
        for key in ("world_history", "world_future"):
            if batch.get(key) is not None:
                out[key] = _as_tensor(batch[key], torch.float32)
        if batch.get("future_mask") is not None:
            out["future_mask"] = _as_tensor(batch["future_mask"]).bool()
        out["task"] = tasks
        return out

    def observations(self, observations: Sequence[Mapping], tasks: Sequence[str]) -> dict:
        """Rollout observations {"images": {camera_key: uint8 HxWx3}, "state": [S]} -> model inputs (same path)."""
        if len(observations) != len(tasks):
            raise WmvlaError(f"{len(observations)} observations but {len(tasks)} task strings")
        stacked = []
        for obs in observations:
            imgs = obs["images"]
            if isinstance(imgs, Mapping):
                missing = [k for k in self.cfg.camera_keys if k not in imgs]
                if missing:
                    raise WmvlaError(f"observation lacks camera(s) {missing} (has {sorted(imgs)}); the policy was "
                                     f"trained on {list(self.cfg.camera_keys)}")
                imgs = [np.asarray(imgs[k]) for k in self.cfg.camera_keys]
            stacked.append(np.stack([np.asarray(i) for i in imgs]))
        batch = {"images": np.stack(stacked), "task": list(tasks)}
        if self.cfg.use_state:
            batch["state"] = np.stack([np.asarray(o["state"], dtype=np.float32) for o in observations])
        return self(batch)


def move_to_device(inputs: Mapping, device: torch.device | str) -> dict:
    """Tensors to `device` (non_blocking: pinned host memory overlaps the copy); other values unchanged."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
