"""Qwen-VL backbone: loading (hub id / local path / offline tiny), the <ACT_i> token embeddings, forward.

Supported families: Qwen3-VL (2B/4B/8B: `Qwen/Qwen3-VL-2B-Instruct`, ...) and Qwen2.5-VL (`Qwen/Qwen2.5-VL-3B-
Instruct`). We keep only the base model (`Qwen3VLModel` / `Qwen2_5_VLModel`, i.e. the ForConditionalGeneration's
`.model`) and read its last hidden state: the policy never generates text, so no LM head is needed.

<ACT_i> embeddings. The H new tokens get ids after the tokenizer's vocabulary. Their embedding rows live in
a separate fp32 `nn.Parameter` [H, d] inside `ActTokenEmbedding`, which wraps the backbone's own embedding
module: positions holding an ACT id take their row from that parameter, all other positions are looked up
in the original matrix. Why this design:
  - the new rows train in every fine-tuning mode (the original matrix can be frozen, bf16 or LoRA'd) and
    provably nothing else of the frozen matrix changes: it never gets a gradient (requires_grad=False);
  - no resize of a 151k x d matrix, no optimizer state for it, no gradient-mask hook that weight decay
    would silently bypass;
  - the model is still called with `input_ids`, so transformers computes image placeholder masks and
    M-RoPE positions exactly as for any Qwen-VL input.

Offline "tiny" backbones use the same transformers classes built from a tiny config with seeded random
weights, and a tokenizer built here with the `tokenizers` library that has Qwen's special tokens and a
Qwen-style chat template, so the whole prompt/processor path is the one real models use.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os

import torch
from torch import nn

from vla_core.policy.config import PolicyConfig
from vla_core.utils import WmvlaError

log = logging.getLogger(__name__)

# Qwen's special tokens used by the chat template and the image placeholders.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# The Qwen2-VL/Qwen3-VL chat template, reduced to what a policy prompt uses (roles, text, image items).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Whole-word entries for common robot-task words (LIBERO, MetaWorld). Any other word still tokenizes:
# WordPiece falls back to single characters, which are all in the vocabulary.
TINY_WORDS = (
    "a an the of in on into onto to from and or with at top bottom left right front back behind near next "
    "middle center side up down it its this that is are robot user assistant system task what should do "
    "action pick place put push pull open close turn slide lift press reach move grasp stack insert hang "
    "drawer cabinet door window button peg hole basket bowl plate mug cup box bottle microwave stove oven "
    "shelf rack table caddy tray wine cream cheese ketchup butter milk soup sauce alphabet tomato orange "
    "juice salad dressing bbq chocolate pudding book black white red green blue yellow wooden ceramic "
    "small large big flat first second third goal object gripper handle lever knob faucet dial coffee "
    "hammer nut wall puck bin disassemble soccer sweep basketball shelf off"
).split()
TINY_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,:;!?'\"()[]{}-_/+*=<>|#&%$@")


def act_token(i: int) -> str:
    return f"<ACT_{i}>"


def build_tiny_tokenizer():
    """A small WordPiece tokenizer with Qwen's special tokens and chat template, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in ["[UNK]", *TINY_CHARS, *("##" + c for c in TINY_CHARS), *TINY_WORDS]:
        vocab.setdefault(tok, len(vocab))
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        chat_template=TINY_CHAT_TEMPLATE,
    )
    # Qwen's special tokens get ids after the word vocabulary, as in the real tokenizers.
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    return tokenizer


def add_act_tokens(tokenizer, num: int) -> int:
    """Add <ACT_0>..<ACT_{num-1}> as special tokens; return the id of <ACT_0> (the ids are contiguous)."""
    tokens = [act_token(i) for i in range(num)]
    existing = tokenizer.convert_tokens_to_ids(tokens)
    unk = tokenizer.unk_token_id
    if not all(isinstance(i, int) and i != unk for i in existing):
        # special: matched as whole strings before pre-tokenization, never split or normalised
        tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(ids[0], ids[0] + num)):
        raise WmvlaError(f"ACT token ids are not contiguous: {ids}. The tokenizer already had some <ACT_i> tokens "
                         "with other ids; use a tokenizer without them.")
    # each ACT token must encode to exactly one id (it is matched before pre-tokenization)
    enc = tokenizer("".join(tokens), add_special_tokens=False)["input_ids"]
    if enc != ids:
        raise WmvlaError(f"<ACT_i> tokens do not encode to single ids: {enc} vs {ids}")
    return ids[0]


class ActTokenEmbedding(nn.Module):
    """The backbone's token embedding with H trainable rows for <ACT_0..H-1> kept in a separate parameter.

    forward(ids) = base(ids) everywhere except at ACT ids, where the row comes from `act_weight`. ACT ids may
    lie beyond the base matrix (no resize needed). Sync-free (torch.where), so it runs inside CUDA graphs too.
    """

    def __init__(self, base: nn.Embedding, first_id: int, num: int, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.first_id = int(first_id)
        self.num = int(num)
        # Initialise near the existing embedding distribution: mean row + noise with the per-channel std.
        w = base.weight.detach().float()
        mean, std = w.mean(0), w.std(0)
        noise = torch.randn(num, w.shape[1], generator=generator, dtype=torch.float32)
        self.act_weight = nn.Parameter(mean + noise * std)

    # transformers sometimes reads these off the input-embedding module
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def padding_idx(self):
        return getattr(self.base, "padding_idx", None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rel = input_ids - self.first_id
        is_act = (rel >= 0) & (rel < self.num)
        emb = self.base(torch.where(is_act, torch.zeros_like(input_ids), input_ids))
        # an embedding lookup, not `act_weight[index]`: every non-ACT position reads row 0 too, and advanced
        # indexing's backward (a sorted index_put) accumulates those thousands of duplicates one after another
        # (2.5 ms per step at batch 32 on the H200); the embedding backward sums duplicates in parallel segments
        act = nn.functional.embedding(rel.clamp(0, self.num - 1), self.act_weight)
        return torch.where(is_act.unsqueeze(-1), act.to(emb.dtype), emb)


# ------------------------------------------------------------------------------------------------ loading


def resolve_family(cfg: PolicyConfig) -> str:
    if cfg.family != "auto":
        return cfg.family
    if cfg.is_tiny:
        return "qwen3_vl"
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(cfg.backbone, revision=cfg.revision).model_type
    except OSError as e:
        raise WmvlaError(f"cannot read config.json of backbone {cfg.backbone!r}: {e}. Pass a local folder with the "
                         "model files, or a hub id that is in the local Hugging Face cache.") from e
    if model_type not in ("qwen3_vl", "qwen2_5_vl"):
        raise WmvlaError(f"backbone {cfg.backbone!r} has model_type {model_type!r}; expected qwen3_vl or qwen2_5_vl")
    return model_type


def _model_classes(family: str):
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLModel

        return Qwen3VLConfig, Qwen3VLModel, Qwen3VLForConditionalGeneration
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel

        return Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2_5_VLForConditionalGeneration
    raise WmvlaError(f"unknown backbone family {family!r} (expected qwen3_vl or qwen2_5_vl)")


def pick_attn_implementation(requested: str, tiny: bool = False) -> str:
    if requested != "auto":
        return requested
    if tiny:
        return "sdpa"
    has_fa2 = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    return "flash_attention_2" if has_fa2 else "sdpa"


def tiny_model_config(family: str, cfg: PolicyConfig, tokenizer):
    """A tiny Qwen3-VL / Qwen2.5-VL config whose special-token ids come from the tiny tokenizer."""
    t = cfg.tiny
    config_cls, _, _ = _model_classes(family)
    head_dim = t.hidden_size // t.num_heads
    if head_dim % 8:
        raise WmvlaError(f"tiny backbone: hidden_size / num_heads = {head_dim}; expected a multiple of 8 (M-RoPE)")
    half = head_dim // 2  # M-RoPE splits the rotary frequencies into (temporal, height, width) sections
    mrope_section = [half - 2 * (half // 4), half // 4, half // 4]
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    vocab_size = ((len(tokenizer) + 63) // 64) * 64
    text = dict(
        vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        depth=t.vision_depth, hidden_size=t.vision_hidden_size, intermediate_size=t.vision_intermediate_size,
        num_heads=t.vision_heads, patch_size=t.patch_size, spatial_merge_size=2, temporal_patch_size=2,
        out_hidden_size=t.hidden_size,
    )
    if family == "qwen3_vl":
        text.update(head_dim=head_dim, rope_parameters=dict(
            rope_type="default", rope_theta=10000.0, mrope_section=mrope_section, mrope_interleaved=True))
        grid = max(cfg.image_size // t.patch_size, 2)
        vision.update(num_position_embeddings=grid * grid, deepstack_visual_indexes=list(range(t.vision_depth - 1)))
    else:
        text.update(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope_section),
                    bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id)
        # window attention: windows of 2x2 merged tokens; the last block attends globally as in the real model
        vision.update(window_size=t.patch_size * 2 * 2, fullatt_block_indexes=[t.vision_depth - 1])
    return config_cls(text_config=text, vision_config=vision, **ids)


# Published image normalisation per family (Qwen3-VL: 0.5/0.5; Qwen2.5-VL: the OpenAI CLIP values).
IMAGE_NORM_DEFAULTS = {
    "qwen3_vl": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "qwen2_5_vl": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
}


def _read_image_norm(path: str, revision: str | None, family: str) -> tuple[list[float], list[float]]:
    """Image mean/std from the checkpoint's preprocessor_config.json (plain JSON: no image-processor class)."""
    try:
        from transformers.utils import cached_file

        f = cached_file(path, "preprocessor_config.json", revision=revision)
        with open(f, encoding="utf-8") as fh:
            pc = json.load(fh)
        return list(pc["image_mean"]), list(pc["image_std"])
    except Exception as e:  # noqa: BLE001 - fall back to the family's published values
        log.warning("no preprocessor_config.json image_mean/std for %s (%s); using %s defaults", path, e, family)
        return IMAGE_NORM_DEFAULTS[family]


def _load_tokenizer(path: str, revision: str | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    if not tokenizer.chat_template:
        # Some Qwen-VL repos keep the chat template with the processor only.
        try:
            from transformers import AutoProcessor

            tokenizer.chat_template = AutoProcessor.from_pretrained(path, revision=revision).chat_template
        except Exception as e:  # noqa: BLE001
            raise WmvlaError(f"{path}: the tokenizer has no chat template and the processor could not provide one "
                             f"({e}). Add chat_template.jinja to the model folder.") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    return tokenizer


def mrope_position_ids(mm_token_type_ids: torch.Tensor, attention_mask: torch.Tensor, grid_h: int,
                       grid_w: int) -> torch.Tensor:
    """M-RoPE position ids [3, B, L] (temporal, height, width) for prompts of text and still images.

    A vectorised equivalent of transformers' `get_rope_index` (Qwen2.5-VL and Qwen3-VL agree for images),
    which loops over the batch in Python with a host sync per sample. Rules: text tokens take consecutive
    positions (the same on all 3 axes); an image of grid_h x grid_w merged tokens starting at position s gives
    token (r, c) the positions (s, s + r, s + c), and the next token continues at s + max(grid_h, grid_w).
    Padding (attention_mask 0, left or right) gets 0 and is skipped. All images must share one grid (the
    processor resizes every camera to image_size). Tested equal to get_rope_index for both families.
    """
    mask = attention_mask.bool()
    is_img = (mm_token_type_ids == 1) & mask
    is_txt = (mm_token_type_ids == 0) & mask
    per_image = grid_h * grid_w
    txt_before = torch.cumsum(is_txt, 1) - is_txt.long()
    img_before = torch.cumsum(is_img, 1) - is_img.long()
    start = txt_before + torch.div(img_before, per_image, rounding_mode="floor") * max(grid_h, grid_w)
    offset = img_before % per_image  # index of an image token inside its image (row-major)
    h = torch.where(is_img, start + torch.div(offset, grid_w, rounding_mode="floor"), start)
    w = torch.where(is_img, start + offset % grid_w, start)
    return torch.stack([start, h, w]).masked_fill(~mask, 0)


def _rotary_vision(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' `apply_rotary_pos_emb_vision` (Qwen2-VL lineage): rotate in fp32, back to the input dtype."""
    def rot(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    qf, kf = q.float(), k.float()
    return (qf * cos + rot(qf) * sin).to(q.dtype), (kf * cos + rot(kf) * sin).to(k.dtype)


def _batched_vision_attention_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                                      position_embeddings=None, **kwargs) -> torch.Tensor:
    """Qwen3-VL vision attention over equally sized images: one SDPA call on [images, heads, patches, dim].

    transformers' non-flash path splits the packed sequence by `cu_seqlens.tolist()` (a host sync per layer)
    and calls attention once per image (~2 x 64 small kernels per layer at batch 32). Every image the policy
    feeds has `image_size` pixels (the processor resizes all cameras), so the packed sequence is a plain
    [images, patches] grid and block-diagonal attention is batched attention. Anything else (a sequence that
    is not a whole number of images) takes transformers' own forward.
    """
    seq = hidden_states.shape[0]
    per = self._wmvla_patches_per_image
    if not self._wmvla_batched or position_embeddings is None or seq % per:
        return self._wmvla_hf_forward(hidden_states, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings,
                                      **kwargs)
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = _rotary_vision(q, k, *position_embeddings)
    n = seq // per
    q, k, v = (t.reshape(n, per, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(seq, -1))


def _patch_embed_matmul_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL's patch embedding (a Conv3d whose kernel equals its stride: one dot product per patch) as one
    matmul over the flattened patches. cuDNN picks an implicit-GEMM convolution for it (1.9 ms forward at
    batch 32 on the H200, docs/benchmarks.md); the matmul is the same function (weights flattened in the
    conv's (C, T, P, P) order, which is the patch layout) at a few percent of that time."""
    if not self._wmvla_batched:
        return self._wmvla_hf_forward(hidden_states)
    weight = self.proj.weight
    x = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
    return torch.nn.functional.linear(x, weight.reshape(weight.shape[0], -1), self.proj.bias)


def batch_vision_attention(model: nn.Module, patches_per_image: int) -> int:
    """Route every Qwen3-VL vision attention module of `model` through `_batched_vision_attention_forward`
    (patches_per_image = (image_size / patch_size)^2), and the patch embedding through
    `_patch_embed_matmul_forward`. Returns the number of attention modules changed."""
    import types

    n = 0
    for module in model.visual.modules():
        if type(module).__name__ == "Qwen3VLVisionAttention" and not hasattr(module, "_wmvla_hf_forward"):
            module._wmvla_hf_forward = module.forward
            module._wmvla_patches_per_image = int(patches_per_image)
            module._wmvla_batched = True  # set_batched_vision_attention(model, False): transformers' path
            module.forward = types.MethodType(_batched_vision_attention_forward, module)
            n += 1
    embed = getattr(model.visual, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if (isinstance(proj, nn.Conv3d) and tuple(proj.kernel_size) == tuple(proj.stride) and proj.padding == (0, 0, 0)
            and proj.groups == 1 and not hasattr(embed, "_wmvla_hf_forward")):
        embed._wmvla_hf_forward = embed.forward
        embed._wmvla_batched = True
        embed.forward = types.MethodType(_patch_embed_matmul_forward, embed)
    return n


def set_batched_vision_attention(model: nn.Module, on: bool) -> None:
    """Switch modules routed by `batch_vision_attention` (attention, patch embedding) between the fast and
    transformers' path (the equivalence checks compare the two on one model)."""
    for module in model.visual.modules():
        if hasattr(module, "_wmvla_batched"):
            module._wmvla_batched = bool(on)


class VisionGridInputs:
    """The vision tower's grid-derived inputs, computed once per image grid by transformers' own functions.

    Qwen3-VL's vision forward derives, from `grid_thw`, the position-embedding interpolation taps, the rotary
    position ids and the attention sequence boundaries, in Python loops over the images with a host sync per
    image (`.tolist()` / `.item()` on a GPU tensor): at batch 32 with two cameras, ~15 ms per step before the
    first vision kernel starts (docs/benchmarks.md, issue 21). The grid is the same every step (every camera is
    resized to `image_size`), so these tensors are computed once on the CPU, moved to the device and handed to
    the tower precomputed: transformers' `vision_utils` functions pop them from the forward's kwargs when given
    (the documented way to keep these data-dependent steps out of compiled graphs). Same functions, same values.
    `create` returns None when this transformers version or model has no such hook (then the grid goes to the
    device and transformers computes as before).
    """

    def __init__(self, visual: nn.Module, vision_utils, max_entries: int = 8):
        self._vu = vision_utils
        self.visual = visual
        self.max_entries = max_entries
        self.enabled = True  # off: transformers computes them from the grid (the equivalence checks)
        self._cache: dict[tuple, dict] = {}

    @classmethod
    def create(cls, visual: nn.Module) -> "VisionGridInputs | None":
        """None when this transformers version or model has no hook for precomputed grid inputs. They reach the
        tower through `_vision_forward` (`install_vision_forward`), not through the model's forward kwargs,
        which also reach the language model (whose `position_ids` are another tensor)."""
        try:
            from transformers import vision_utils
        except ImportError:
            return None
        fns = ("get_vision_interpolation_indices_and_weights", "get_vision_position_ids",
               "get_vision_attention_seqlens")
        attrs = ("num_grid_per_side", "interpolation_mode", "interpolation_align_corners", "spatial_merge_size")
        if not all(hasattr(vision_utils, f) for f in fns) or not all(hasattr(visual, a) for a in attrs):
            return None
        return cls(visual, vision_utils)

    def __call__(self, grid_thw: torch.Tensor, device: torch.device) -> dict:
        """Precomputed kwargs for the tower's forward; `grid_thw` must be a CPU tensor (no host sync)."""
        key = (str(device), tuple(map(tuple, grid_thw.tolist())))
        entry = self._cache.get(key)
        if entry is None:
            vu, visual = self._vu, self.visual
            interp_indices, interp_weights = vu.get_vision_interpolation_indices_and_weights(
                grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
                align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size)
            position_ids = vu.get_vision_position_ids(grid_thw, visual.spatial_merge_size)
            cu_seqlens, max_seqlen = vu.get_vision_attention_seqlens(grid_thw, visual.config)
            entry = {"interp_indices": interp_indices.to(device), "interp_weights": interp_weights.to(device),
                     "position_ids": position_ids.to(device), "cu_seqlens": cu_seqlens.to(device),
                     "max_seqlen": max_seqlen}
            if len(self._cache) >= self.max_entries:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = entry
        return dict(entry)  # a copy: the tower pops what it uses


def install_vision_forward(visual: nn.Module) -> "VisionGridInputs | None":
    """Route the Qwen3-VL tower's forward through `_vision_forward` (state on the module, as
    batch_vision_attention does, so a copy of the module stays self-contained). Returns its grid inputs (None:
    transformers computes them per call). `visual._wmvla_hf_forward` is transformers' forward
    (compile_blocks(vision_region="tower") compiles it in place)."""
    import types

    if not hasattr(visual, "_wmvla_hf_forward"):
        visual._wmvla_hf_forward = visual.forward
        visual._wmvla_grid_inputs = VisionGridInputs.create(visual)
        visual._wmvla_pending_features = None
        visual.forward = types.MethodType(_vision_forward, visual)
    return visual._wmvla_grid_inputs


def _vision_forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor | None = None, **kwargs):
    """The tower's forward, in this order:
    1. precomputed outputs handed in for this one call (`VLBackbone.forward(..., vision_features=...)`: a frozen
       tower's outputs for training frames, read from the vision-feature cache, vla_core/policy/vision_cache.py)
       are returned in the tower's own output type, so the backbone places them exactly as computed ones; the
       tower does not run;
    2. else transformers' forward, with the grid-derived inputs precomputed (`VisionGridInputs`) when the grid
       is a CPU tensor (a device grid: transformers computes them, as before).
    (Not through transformers' `mm_encoder_outputs` argument: the 5.17 installed on the GPU machine has none.)"""
    pending, self._wmvla_pending_features = self._wmvla_pending_features, None
    if pending is not None:  # [n_images, 1 + n_deepstack, tokens_per_image, d] (merged tokens first)
        if grid_thw is not None and int(grid_thw.shape[0]) != int(pending.shape[0]):
            raise WmvlaError(f"cached vision features hold {pending.shape[0]} images, the prompt has "
                             f"{grid_thw.shape[0]}")
        flat = pending.transpose(0, 1).flatten(1, 2)  # [1 + n_deepstack, n_images * tokens_per_image, d]
        return _vision_output(self, flat[0], list(flat[1:]))
    grid_inputs = self._wmvla_grid_inputs
    if grid_inputs is not None and grid_inputs.enabled and grid_thw is not None and grid_thw.device.type == "cpu":
        kwargs = {**grid_inputs(grid_thw, hidden_states.device), **kwargs}
    return self._wmvla_hf_forward(hidden_states, grid_thw=grid_thw, **kwargs)


def _vision_output(visual: nn.Module, merged: torch.Tensor, deepstack: list[torch.Tensor]):
    """The tower's output in this transformers version's own type (a dataclass in 5.x, a tuple before). Looked up
    along the class hierarchy: FSDP2's `fully_shard` swaps the module's class for a subclass defined elsewhere."""
    import sys

    modules = (sys.modules.get(c.__module__) for c in type(visual).__mro__)
    cls = next((m.BaseModelOutputWithDeepstackFeatures for m in modules
                if m is not None and hasattr(m, "BaseModelOutputWithDeepstackFeatures")), None)
    if cls is None:
        return merged, deepstack
    return cls(last_hidden_state=None, pooler_output=merged, deepstack_features=deepstack)


def rows_in_mask_order(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, L, d]: at the k-th True position of `mask` [B, L] (row-major) the k-th row of `rows` [N, d]; elsewhere
    some row (callers select with `torch.where(mask, ...)`). What `masked_scatter` / `x[mask] = rows` place, as a
    gather by the running count of True positions: no host sync (boolean indexing needs the count on the host)
    and static shapes, so it compiles into the surrounding graph. `index_select`: its backward is an
    `index_add` (the zero gradients of the unselected positions add exact zeros)."""
    index = (torch.cumsum(mask.flatten(), 0) - 1).clamp_(min=0)
    return torch.index_select(rows, 0, index).view(*mask.shape, rows.shape[-1])


def _deepstack_process_sync_free(self, hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
                                 visual_embeds: torch.Tensor) -> torch.Tensor:
    """transformers' Qwen3-VL `_deepstack_process` (hidden[mask] += visual_embeds after the first decoder
    layers), the same additions without boolean indexing (`rows_in_mask_order`): bit-identical outputs."""
    mask = visual_pos_masks.to(hidden_states.device)
    rows = rows_in_mask_order(mask, visual_embeds.to(hidden_states.device, hidden_states.dtype))
    return torch.where(mask.unsqueeze(-1), hidden_states + rows, hidden_states)


def install_sync_free_deepstack(language_model: nn.Module) -> None:
    """Replace the text model's `_deepstack_process` (instance attribute, as the vision patches do). Nothing when
    this transformers version has no such method (then the model's own forward is used, see VLBackbone)."""
    import types

    if hasattr(language_model, "_deepstack_process"):
        language_model._deepstack_process = types.MethodType(_deepstack_process_sync_free, language_model)


def tower_outputs(out) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(merged tokens [N, d], DeepStack features) from the tower's output (a dataclass in transformers 5.x,
    a tuple before)."""
    if isinstance(out, tuple):
        return out[0], list(out[1])
    return out.pooler_output, list(out.deepstack_features)


class VLBackbone(nn.Module):
    """A Qwen-VL base model + its tokenizer + the ACT-token embedding; forward -> last hidden state [B, L, d]."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.family = resolve_family(cfg)
        config_cls, base_cls, full_cls = _model_classes(self.family)
        attn = pick_attn_implementation(cfg.attn_implementation, tiny=cfg.is_tiny)
        if cfg.is_tiny:
            tokenizer = build_tiny_tokenizer()
            config = tiny_model_config(self.family, cfg, tokenizer)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.init_seed)
                model = base_cls._from_config(config, attn_implementation=attn)  # fp32 (the default dtype)
            self.image_mean, self.image_std = IMAGE_NORM_DEFAULTS[self.family]
        else:
            tokenizer = _load_tokenizer(cfg.backbone, cfg.revision)
            # Load through the ForConditionalGeneration class (its checkpoint-key mapping is the tested path),
            # keep `.model`, drop the LM head. Qwen-VL checkpoints are bf16: loading in bf16 is lossless;
            # trainable parts are upcast to fp32 by the policy.
            try:
                full = full_cls.from_pretrained(cfg.backbone, revision=cfg.revision, dtype=torch.bfloat16,
                                                attn_implementation=attn)
            except OSError as e:
                raise WmvlaError(f"cannot load backbone {cfg.backbone!r}: {e}. Nothing can be downloaded here: pass "
                                 "a local folder or a hub id already in the Hugging Face cache.") from e
            model = full.model
            del full
            self.image_mean, self.image_std = _read_image_norm(cfg.backbone, cfg.revision, self.family)
        model.config.use_cache = False
        self.model = model
        self.tokenizer = tokenizer
        self.attn_implementation = attn

        first = add_act_tokens(tokenizer, cfg.chunk_size)
        gen = torch.Generator().manual_seed(cfg.init_seed + 1)
        act_embedding = ActTokenEmbedding(model.get_input_embeddings(), first, cfg.chunk_size, gen)
        model.set_input_embeddings(act_embedding)  # registered once, inside the model (stable parameter names)
        self.act_token_ids = list(range(first, first + cfg.chunk_size))

        vc = model.config.vision_config
        self.patch_size = int(vc.patch_size)
        self.merge_size = int(vc.spatial_merge_size)
        self.temporal_patch_size = int(vc.temporal_patch_size)
        self.hidden_size = int(model.config.text_config.hidden_size)
        self.image_token_id = int(model.config.image_token_id)
        if tokenizer.convert_tokens_to_ids(IMAGE_PAD) != self.image_token_id:
            raise WmvlaError(f"tokenizer id of {IMAGE_PAD} ({tokenizer.convert_tokens_to_ids(IMAGE_PAD)}) differs from "
                             f"the model's image_token_id ({self.image_token_id}): tokenizer and weights do not match")
        factor = self.patch_size * self.merge_size
        if cfg.image_size % factor:
            raise WmvlaError(f"image_size={cfg.image_size} is not a multiple of patch_size*merge_size={factor} for "
                             f"{cfg.backbone!r}; use e.g. {max(factor, round(cfg.image_size / factor) * factor)}")
        self._rope_index_kwargs = set(inspect.signature(model.get_rope_index).parameters)
        self.merged_grid = cfg.image_size // factor  # merged tokens per image side
        self.tokens_per_image = self.merged_grid**2
        self.vectorized_positions = cfg.vectorized_positions
        self.batched_vision_attention = 0
        if cfg.batched_vision_attention and self.family == "qwen3_vl":  # Qwen2.5-VL attends in windows: as is
            self.batched_vision_attention = batch_vision_attention(model, (cfg.image_size // self.patch_size) ** 2)
        # Qwen3-VL: grid-derived vision inputs computed once per grid (None: transformers computes them per call)
        self.vision_grid_inputs = install_vision_forward(model.visual) if self.family == "qwen3_vl" else None
        self.sync_free_forward = self.family == "qwen3_vl"

    # -------------------------------------------------------------------------------------------- parts

    @property
    def precompute_vision_inputs(self) -> bool:
        return self.vision_grid_inputs is not None and self.vision_grid_inputs.enabled

    @precompute_vision_inputs.setter
    def precompute_vision_inputs(self, on: bool) -> None:
        if self.vision_grid_inputs is not None:
            self.vision_grid_inputs.enabled = bool(on)

    def grid_for_model(self, image_grid_thw: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The grid where the model reads it: on the CPU while the grid inputs are precomputed (the tower's
        forward, `_vision_forward`, and get_image_features' split sizes read it without a host sync),
        else on the device, as transformers computes from it there."""
        return image_grid_thw if self.precompute_vision_inputs else image_grid_thw.to(device)

    @property
    def sync_free_forward(self) -> bool:
        """Qwen3-VL: the backbone's forward for images without a host sync or a data-dependent shape
        (`_sync_free_model_forward`), so that the decoder stack compiles into one graph. Off: transformers' own
        `Qwen3VLModel.forward` (the reference of the equivalence tests). On exactly while the text model carries
        the sync-free DeepStack step (`install_sync_free_deepstack`; False where transformers has none)."""
        return "_deepstack_process" in vars(self.model.language_model)

    @sync_free_forward.setter
    def sync_free_forward(self, on: bool) -> None:
        if on and not self.sync_free_forward:
            install_sync_free_deepstack(self.model.language_model)
        elif not on and self.sync_free_forward:
            del self.model.language_model._deepstack_process  # the class's own method again

    def check_image_tokens(self, input_ids: torch.Tensor, n_images: int) -> None:
        """The prompts hold one run of `tokens_per_image` image tokens per image (what transformers checks
        inside its forward, with a host sync; here on the processor's CPU output, before the forward)."""
        found = int((input_ids == self.image_token_id).sum())
        if found != n_images * self.tokens_per_image:
            raise WmvlaError(f"the prompts hold {found} image tokens, the images give {n_images} x "
                             f"{self.tokens_per_image} = {n_images * self.tokens_per_image} features: inputs not "
                             "made by this policy's processor (PolicyProcessor) or for another image_size. Fix: "
                             "pass raw batches to the policy, or process them with policy.processor.")

    @property
    def act_embedding(self) -> ActTokenEmbedding:
        return self.model.get_input_embeddings()

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.visual

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @torch.no_grad()
    def hf_rope_index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mm_token_type_ids: torch.Tensor,
                      image_grid_thw: torch.Tensor) -> torch.Tensor:
        """M-RoPE position ids [3, B, L] by transformers' own `get_rope_index` (reference for the tests)."""
        kwargs = dict(input_ids=input_ids, image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
                      attention_mask=attention_mask)
        kwargs = {k: v for k, v in kwargs.items() if k in self._rope_index_kwargs}
        position_ids, _ = self.model.get_rope_index(**kwargs)
        return position_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                image_grid_thw: torch.Tensor, mm_token_type_ids: torch.Tensor,
                position_ids: torch.Tensor | None = None, vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """vision_features: the frozen tower's outputs for these images, [n_images, 1 + n_deepstack,
        tokens_per_image, d] (merged tokens, then the DeepStack features; images in pixel_values order):
        the tower does not run and `pixel_values` is not read (see `_vision_forward`)."""
        if position_ids is None and self.vectorized_positions:
            position_ids = mrope_position_ids(mm_token_type_ids, attention_mask, self.merged_grid, self.merged_grid)
        image_grid_thw = self.grid_for_model(image_grid_thw, input_ids.device)
        if vision_features is not None:
            if not hasattr(self.model.visual, "_wmvla_pending_features"):
                raise WmvlaError(f"cached vision features are supported for Qwen3-VL only; this backbone is "
                                 f"{self.family}. Fix: train without --vision-cache.")
            self.model.visual._wmvla_pending_features = vision_features
        try:
            out = self._model_forward(input_ids, attention_mask, position_ids, pixel_values, image_grid_thw,
                                      mm_token_type_ids)
        finally:  # never left for a later call (e.g. after an exception inside the model)
            if vision_features is not None:
                self.model.visual._wmvla_pending_features = None
        return out.last_hidden_state

    def _model_forward(self, input_ids, attention_mask, position_ids, pixel_values, image_grid_thw, mm_token_type_ids):
        if self.sync_free_forward and position_ids is not None:
            return self._sync_free_model_forward(input_ids, attention_mask, position_ids, pixel_values,
                                                 image_grid_thw)
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
            return_dict=True,
        )

    def _sync_free_model_forward(self, input_ids, attention_mask, position_ids, pixel_values, image_grid_thw):
        """transformers' Qwen3VLModel.forward for still images, the same operations in the same order, minus its
        host syncs: the image-token count check (`get_placeholder_mask`: done on the host by `check_image_tokens`),
        the per-image split of the tower's output (`.tolist()`), and boolean-mask scatters of the merged tokens and
        the DeepStack features (`rows_in_mask_order`). Bit-identical outputs (tests/test_train_memory.py);
        without a sync inside, the language model's whole forward traces as one graph (compile_blocks)."""
        model = self.model
        embeds = model.get_input_embeddings()(input_ids)
        merged, deepstack = tower_outputs(model.visual(pixel_values.type(model.visual.dtype), grid_thw=image_grid_thw,
                                                        return_dict=True))
        image_mask = input_ids == self.image_token_id
        merged = rows_in_mask_order(image_mask, merged.to(embeds.device, embeds.dtype))
        embeds = torch.where(image_mask.unsqueeze(-1), merged, embeds)
        return model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                    visual_pos_masks=image_mask, deepstack_visual_embeds=deepstack)


def save_tiny_checkpoint(cfg: PolicyConfig, path: str | os.PathLike) -> None:
    """Write a tiny random ForConditionalGeneration + tokenizer folder (used to test the real loading path)."""
    family = resolve_family(cfg)
    _, _, full_cls = _model_classes(family)
    tokenizer = build_tiny_tokenizer()
    config = tiny_model_config(family, cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = full_cls._from_config(config, attn_implementation="sdpa")
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    mean, std = IMAGE_NORM_DEFAULTS[family]
    vc = config.vision_config
    with open(os.path.join(path, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump({"image_processor_type": "Qwen2VLImageProcessor", "image_mean": mean, "image_std": std,
                   "patch_size": vc.patch_size, "merge_size": vc.spatial_merge_size,
                   "temporal_patch_size": vc.temporal_patch_size}, f, indent=2)
