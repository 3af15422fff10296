"""Policy inputs: prompt (task text, two separate images, ACT tokens), image layout equal to transformers'
processor, M-RoPE positions equal to transformers' get_rope_index, normalisation through vla_core.data.normalize,
the <ACT_i> embedding rows, and loading a backbone from a local folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vla_core.data.normalize import normalize
from vla_core.policy.backbone import (
    IMAGE_PAD,
    ActTokenEmbedding,
    VLBackbone,
    build_tiny_tokenizer,
    mrope_position_ids,
    save_tiny_checkpoint,
)
from vla_core.policy.config import PolicyConfig, tiny_policy_config
from vla_core.policy.processing import PolicyProcessor, pixel_values_from_images, resize_images
from vla_core.policy.tiny import random_batch, random_observation, tiny_norm_stats
from vla_core.utils import WmvlaError

FAMILIES = ("qwen3_vl", "qwen2_5_vl")



@pytest.fixture(scope="module")
def backbones():
    return {f: VLBackbone(tiny_policy_config(family=f)) for f in FAMILIES}


def make_processor(cfg, backbone):
    return PolicyProcessor.from_backbone(cfg, backbone, tiny_norm_stats(cfg))


def test_prompt_has_task_both_images_and_act_tokens(backbones):
    cfg = tiny_policy_config()
    bb = backbones["qwen3_vl"]
    proc = make_processor(cfg, bb)
    task = "put the cream cheese in the bowl"
    text = proc.prompt_text(task)
    assert task in text
    assert text.count("<|vision_start|>") == 2 and text.count(IMAGE_PAD) == 2  # two images, not one pasted
    assert text.endswith("".join(f"<ACT_{i}>" for i in range(cfg.chunk_size)))
    assert "<|im_start|>assistant" in text  # the backbone's chat template produced the turn structure

    batch = random_batch(cfg, batch_size=3)
    batch["task"] = [task, "open the top drawer", task]
    out = proc(batch)
    ids = out["input_ids"]
    assert out["images"].shape == (3, 2, 3, cfg.image_size, cfg.image_size)
    # every sample: 2 x tokens_per_image image tokens, and the ACT positions hold the ACT ids in order
    n_img = (out["mm_token_type_ids"] == 1).sum(1)
    assert n_img.tolist() == [2 * bb.tokens_per_image] * 3
    assert (ids == bb.image_token_id).sum(1).tolist() == n_img.tolist()
    gathered = ids.gather(1, out["act_index"])
    assert gathered.tolist() == [bb.act_token_ids] * 3
    # right padding: the shorter prompt is padded after its ACT tokens and masked
    lengths = out["attention_mask"].sum(1)
    assert lengths[1] < lengths[0] and (out["act_index"][:, -1] == lengths - 1).all()
    decoded = bb.tokenizer.decode(ids[0][out["attention_mask"][0].bool()])
    assert "cream cheese" in decoded


def test_two_cameras_stay_separate_images():
    cfg = tiny_policy_config()
    batch = random_batch(cfg, batch_size=1)
    batch["images"][0, 0] = 255  # agent view white
    batch["images"][0, 1] = 0  # wrist view black
    imgs = resize_images(batch["images"], cfg.image_size)  # [1, 2, 3, S, S]
    pv, grid = pixel_values_from_images(imgs.flatten(0, 1), [0.5] * 3, [0.5] * 3, 8, 2, 2)
    per_image = int(grid[0].prod())
    assert grid.tolist() == [[1, 4, 4], [1, 4, 4]]
    assert torch.all(pv[:per_image] == 1.0) and torch.all(pv[per_image:] == -1.0)


def test_image_layout_matches_transformers_processor(backbones):
    """Our torch patchify + prompt expansion == transformers' Qwen3VLProcessor (PIL image backend), bit for bit."""
    import transformers

    ip_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None)
    if ip_cls is None:  # transformers before the backend split: the slow class is the PIL one
        from transformers import Qwen2VLImageProcessor as ip_cls
    from transformers import Qwen3VLProcessor

    class Processor(Qwen3VLProcessor):  # skip only the class check that needs torchvision's video processor
        def check_argument_for_proper_class(self, name, arg):
            return type(arg)

    cfg = tiny_policy_config()
    bb = backbones["qwen3_vl"]
    proc = make_processor(cfg, bb)
    ip = ip_cls(patch_size=8, merge_size=2, temporal_patch_size=2, image_mean=bb.image_mean, image_std=bb.image_std,
                size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    hf = Processor(image_processor=ip, tokenizer=bb.tokenizer, video_processor=None,
                   chat_template=bb.tokenizer.chat_template)
    batch = random_batch(cfg, batch_size=1, image_hw=cfg.image_size)  # already at size: no resize on either side
    task = batch["task"][0]
    ref = hf(text=[proc.prompt_text(task)], images=[list(batch["images"][0])], return_tensors="pt")
    ours = proc(batch)
    pixel_values, grid = pixel_values_from_images(ours["images"].flatten(0, 1), bb.image_mean, bb.image_std,
                                                  bb.patch_size, bb.merge_size, bb.temporal_patch_size)
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["mm_token_type_ids"].long(), torch.as_tensor(ref["mm_token_type_ids"]).long())
    assert torch.equal(grid, ref["image_grid_thw"])
    assert torch.allclose(pixel_values, ref["pixel_values"].float(), atol=1e-6)


def test_training_batch_and_rollout_observation_share_the_path(backbones):
    cfg = tiny_policy_config()
    proc = make_processor(cfg, backbones["qwen3_vl"])
    obs = random_observation(cfg, seed=3, image_hw=50)
    batch = {"images": np.stack([obs["images"][k] for k in cfg.camera_keys])[None],
             "state": obs["state"][None], "task": [obs["task"]]}
    a, b = proc(batch), proc.observations([obs], [obs["task"]])
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "act_index", "images", "state"):
        assert torch.equal(a[key], b[key]), key
    # a batch's images as a list of per-sample arrays: converted as the stacked array is
    listed = proc({**batch, "images": list(batch["images"])})
    assert torch.equal(listed["images"], a["images"])
    # state is normalised by vla_core.data.normalize (the one function pair), not re-implemented
    expected = normalize(obs["state"][None], proc.stats[cfg.state_key])
    assert torch.allclose(a["state"], torch.as_tensor(expected, dtype=torch.float32))


def test_resize_is_antialiased_bicubic_uint8():
    img = np.zeros((1, 64, 64, 3), np.uint8)
    img[:, :, 32:] = 200
    out = resize_images(img, 32)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 32, 32)
    assert out[0, :, :, :15].max() == 0 and out[0, :, :, 17:].min() == 200
    assert torch.equal(resize_images(img, 64)[0].permute(1, 2, 0), torch.as_tensor(img[0]))  # identity at size


def test_action_normalisation_round_trip_and_gripper_passthrough(backbones):
    cfg = tiny_policy_config()
    proc = make_processor(cfg, backbones["qwen3_vl"])
    actions = random_batch(cfg, batch_size=4)["actions"]
    norm = proc.normalize_actions(actions)
    assert torch.equal(norm[..., -1], torch.as_tensor(actions[..., -1]))  # the gripper is passed through
    assert norm[..., :-1].abs().max() <= 1.0  # quantile mode clips to [-1, 1]
    back = proc.unnormalize_actions(norm)
    inside = np.abs(norm[..., :-1].numpy()) < 1  # values clipped at the 1/99 % quantiles do not come back
    assert np.allclose(back[..., :-1][inside], actions[..., :-1][inside], atol=1e-5)


def test_bad_inputs_raise(backbones):
    cfg = tiny_policy_config()
    proc = make_processor(cfg, backbones["qwen3_vl"])
    batch = random_batch(cfg, batch_size=2)
    with pytest.raises(WmvlaError, match="task"):
        proc({**batch, "task": ["", "open the drawer"]})
    with pytest.raises(WmvlaError, match="images"):
        proc({**batch, "images": batch["images"][:, :1]})  # one camera only
    obs = random_observation(cfg)
    obs["images"].pop(cfg.camera_keys[1])
    with pytest.raises(WmvlaError, match="camera"):
        proc.observations([obs], ["open the drawer"])
    with pytest.raises(WmvlaError, match="stats"):
        PolicyProcessor.from_backbone(cfg, backbones["qwen3_vl"], {})
    with pytest.raises(WmvlaError, match="multiple"):
        VLBackbone(tiny_policy_config(image_size=40))


@pytest.mark.parametrize("family", FAMILIES)
def test_vectorised_mrope_positions_equal_transformers(family, backbones):
    cfg = tiny_policy_config(family=family)
    bb = backbones[family]
    proc = make_processor(cfg, bb)
    batch = random_batch(cfg, batch_size=3)
    batch["task"] = ["open the top drawer of the cabinet and put the bowl inside", "push", "stack the cups"]
    inp = proc(batch)
    pixel_values, grid = pixel_values_from_images(inp["images"].flatten(0, 1), bb.image_mean, bb.image_std,
                                                  bb.patch_size, bb.merge_size, bb.temporal_patch_size)
    ours = mrope_position_ids(inp["mm_token_type_ids"], inp["attention_mask"], bb.merged_grid, bb.merged_grid)
    ref = bb.hf_rope_index(inp["input_ids"], inp["attention_mask"], inp["mm_token_type_ids"], grid)
    assert torch.equal(ours, ref.to(ours.dtype))
    # left padding gives the same positions to the real tokens
    mask = inp["attention_mask"].bool()
    shifts = (~mask).sum(1)
    left_types = torch.stack([t.roll(int(s)) for t, s in zip(inp["mm_token_type_ids"], shifts)])
    left_mask = torch.stack([m.roll(int(s)) for m, s in zip(inp["attention_mask"], shifts)])
    assert left_mask[:, 0].tolist() == [1, 0, 0]  # the two shorter prompts are now padded on the left
    left = mrope_position_ids(left_types, left_mask, bb.merged_grid, bb.merged_grid)
    for i in range(3):
        assert torch.equal(left[:, i][:, left_mask[i].bool()], ours[:, i][:, mask[i]])
    # and the model's hidden states are the same with transformers computing the positions itself
    args = (inp["input_ids"], inp["attention_mask"], pixel_values, grid, inp["mm_token_type_ids"])
    with torch.no_grad():
        bb.vectorized_positions = True
        h_ours = bb(*args)
        bb.vectorized_positions = False
        h_ref = bb(*args)
        bb.vectorized_positions = True
    assert torch.allclose(h_ours[mask], h_ref[mask], atol=1e-5)


def test_act_embedding_rows_come_from_their_own_parameter():
    base = torch.nn.Embedding(10, 6)
    emb = ActTokenEmbedding(base, first_id=10, num=3, generator=torch.Generator().manual_seed(0))  # ids past the matrix
    ids = torch.tensor([[1, 10, 11, 12, 4]])
    out = emb(ids)
    assert torch.equal(out[0, 1:4], emb.act_weight)
    assert torch.equal(out[0, [0, 4]], base.weight[[1, 4]])
    out.sum().backward()
    assert emb.act_weight.grad is not None and torch.all(emb.act_weight.grad == 1)
    assert base.weight.grad[[0, 2, 3, 5]].abs().sum() == 0  # ids 10..12 never touch the base matrix


def test_act_embedding_gradient_is_the_sum_over_each_act_position_only():
    """A batch where ACT ids repeat and most positions are ordinary tokens (which read row 0 in the lookup): each
    ACT row's gradient is the sum of the upstream gradients at its own positions, nothing from the others."""
    gen = torch.Generator().manual_seed(1)
    emb = ActTokenEmbedding(torch.nn.Embedding(10, 6), first_id=10, num=3, generator=gen)
    ids = torch.randint(0, 13, (4, 50), generator=gen)
    upstream = torch.randn(4, 50, 6, generator=gen)
    (emb(ids) * upstream).sum().backward()
    expected = torch.stack([upstream[ids == 10 + j].sum(0) for j in range(3)])
    torch.testing.assert_close(emb.act_weight.grad, expected, rtol=1e-6, atol=1e-6)


def test_tiny_tokenizer_has_qwen_special_tokens():
    tok = build_tiny_tokenizer()
    for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", IMAGE_PAD, "<|video_pad|>",
              "<|endoftext|>"):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [t]
    # unknown words still encode (character fallback), nothing maps to [UNK]
    ids = tok("Zebra-crossing 42!", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_loads_from_local_folder(tmp_path, family):
    """The real loading path (ForConditionalGeneration.from_pretrained -> .model, AutoTokenizer, chat template)."""
    cfg = tiny_policy_config(family=family)
    save_tiny_checkpoint(cfg, tmp_path)
    loaded = VLBackbone(PolicyConfig(**{**cfg.__dict__, "backbone": str(tmp_path), "family": "auto"}))
    built = VLBackbone(cfg)
    assert loaded.family == family
    assert loaded.act_token_ids == built.act_token_ids
    assert loaded.tokenizer.chat_template == built.tokenizer.chat_template
    ref = {k: v for k, v in built.model.state_dict().items()}
    got = loaded.model.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        if k.endswith("act_weight"):
            continue
        assert torch.equal(got[k], ref[k].to(torch.bfloat16)), k
    assert loaded.image_mean == built.image_mean
