"""Encoders: parity against transformers on tiny random models saved in the Hub layouts (docs/design.md §8),
preprocessing against CLIPImageProcessor / LLaVA's expand2square, and loader strictness."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DINO_CFG, TOL, maxdiff, photo, pixels, randomize, rewrite
from PIL import Image
from safetensors.torch import load_file

from encoders import CLIPVision, DINOv2
from preprocess import (
    CLIP_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop_square,
    clip_preprocess,
    pad_to_square,
    resize_normalize,
    square_view,
)
from swin import Swin


# --------------------------------------------------------------------------- CLIP
def test_clip_full_checkpoint_parity_and_text_tower_skipped(tf, clip_full):
    ref, path = clip_full
    tower = tf.CLIPVisionModel.from_pretrained(
        path, attn_implementation="eager"
    ).eval()  # LLaVA's tower class
    ours = CLIPVision.from_pretrained(path)
    assert ours.config.hidden_act == "quick_gelu" and ours.config.projection_dim == 24
    px = pixels(56)
    with torch.no_grad():
        out = tower(pixel_values=px, output_hidden_states=True)
        assert maxdiff(ours.features(px), out.hidden_states[-2][:, 1:]) <= TOL  # LLaVA's feature
        for layer in (0, 1, -1, -5):
            assert maxdiff(ours.features(px, layer), out.hidden_states[layer][:, 1:]) <= TOL
        assert maxdiff(ours.image_embeds(px), ref.visual_projection(out.pooler_output)) <= TOL
    with pytest.raises(ValueError, match="out of range"):
        ours.features(px, -6)


def test_clip_loads_pytorch_model_bin_with_position_ids(clip_full, tmp_path):
    ref, path = clip_full

    def add_old_buffers(sd):
        sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        sd["text_model.embeddings.position_ids"] = torch.arange(16)[None]
        return sd

    ckpt = rewrite(path, tmp_path / "bin", add_old_buffers, name="pytorch_model.bin")
    ours = CLIPVision.from_pretrained(ckpt)
    px = pixels(56)
    with torch.no_grad():
        ref_out = ref.vision_model(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert maxdiff(ours.features(px), ref_out) <= TOL


def test_unclip_image_embeds_parity(unclip):
    ref, path = unclip
    ours = CLIPVision.from_pretrained(path)
    assert ours.config.hidden_act == "gelu"
    px = pixels(42)
    with torch.no_grad():
        out = ref(pixel_values=px, output_hidden_states=True)
        assert maxdiff(ours.image_embeds(px), out.image_embeds) <= TOL
        assert maxdiff(ours.features(px), out.hidden_states[-2][:, 1:]) <= TOL
    with pytest.raises(ValueError, match="42"):
        ours.features(pixels(56))


# --------------------------------------------------------------------------- DINOv2
@pytest.mark.parametrize("size", [56, 70, (56, 84)], ids=["interpolated", "native", "non-square"])
def test_dinov2_parity_offset0(dinov2, size):
    ref, path = dinov2
    ours = DINOv2.from_pretrained(path, interpolate_offset=0.0)
    px = pixels(size)
    with torch.no_grad():
        out = ref(pixel_values=px, output_hidden_states=True)
        mine = ours.intermediate_layers(px, [0, 1, 2, 3])
        for b in range(4):
            assert maxdiff(mine[b], ref.layernorm(out.hidden_states[b + 1])[:, 1:]) <= TOL
        assert maxdiff(ours.intermediate_layers(px, [-1])[0], out.last_hidden_state[:, 1:]) <= TOL
        assert maxdiff(ours.intermediate_layers(px, [2], norm=False)[0], out.hidden_states[3][:, 1:]) <= TOL


def test_dinov2_offset01_matches_original_formula(dinov2):
    """Offset 0.1 = original DINOv2 / DAv2: bicubic with scale_factor (h + 0.1) / M (docs/design.md §2)."""
    ref, path = dinov2
    ours = DINOv2.from_pretrained(path)  # default offset 0.1
    table = ref.embeddings.position_embeddings.detach()  # (1, 26, 64), 5×5 grid
    grid = table[:, 1:].reshape(1, 5, 5, 64).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, scale_factor=(4.1 / 5, 4.1 / 5), mode="bicubic", antialias=False)
    expected = torch.cat([table[:, :1], direct.flatten(2).transpose(1, 2)], dim=1)
    assert maxdiff(ours.position_embeddings(4, 4), expected) <= TOL
    assert torch.equal(ours.position_embeddings(5, 5), table)  # native grid: untouched, as the original code
    hf = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    assert maxdiff(direct, hf) > 1e-3  # the offset really changes the sampled positions

    # the whole forward with the original interpolation swapped into the reference
    px = pixels(56)
    ref.embeddings.interpolate_pos_encoding = lambda emb, h, w: expected
    try:
        with torch.no_grad():
            out = ref(pixel_values=px, output_hidden_states=True)
            mine = ours.intermediate_layers(px, [1, 3])
        assert maxdiff(mine[0], ref.layernorm(out.hidden_states[2])[:, 1:]) <= TOL
        assert maxdiff(mine[1], out.last_hidden_state[:, 1:]) <= TOL
    finally:
        del ref.embeddings.interpolate_pos_encoding


def test_dinov2_with_registers_parity(tf, tmp_path):
    ref = randomize(
        tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**DINO_CFG, num_register_tokens=2))
    )
    ref.save_pretrained(tmp_path)
    ours = DINOv2.from_pretrained(tmp_path, interpolate_offset=0.0)
    assert ours.config.num_register_tokens == 2
    px = pixels(56)
    with torch.no_grad():
        assert (
            maxdiff(ours.intermediate_layers(px, [-1])[0], ref(pixel_values=px).last_hidden_state[:, 3:])
            <= TOL
        )


def test_depth_anything_backbone_layout(depth_anything):
    ref, path = depth_anything
    keys = load_file(path / "model.safetensors").keys()
    assert any(k.startswith("neck.") for k in keys) and any(k.startswith("head.") for k in keys)
    ours = DINOv2.from_pretrained(path, interpolate_offset=0.0)
    px = pixels(56)
    with torch.no_grad():
        maps = ref.backbone(px).feature_maps  # out_indices 1..4, final norm, CLS kept
        mine = ours.intermediate_layers(px, [0, 1, 2, 3])
    for a, b in zip(mine, maps):
        assert maxdiff(a, b[:, 1:]) <= TOL


# --------------------------------------------------------------------------- Swin
def check_swin(ours, ref, px):
    with torch.no_grad():
        maps = ref(px).feature_maps  # (B, C, H, W) per stage
        mine = ours.feature_maps(px)
        assert maxdiff(ours(px), maps[-1].flatten(2).transpose(1, 2)) <= TOL  # row-major stage-4 tokens
    assert len(mine) == 4
    for a, b in zip(mine, maps):
        assert maxdiff(a, b.permute(0, 2, 3, 1)) <= TOL


@pytest.mark.parametrize("size", [(98, 102), (96, 96)], ids=["padding", "exact"])
def test_swin_backbone_parity(swin, size):
    """Window 3, shifts everywhere; 98×102 pads the patch embedding and every stage."""
    ref, path = swin
    check_swin(Swin.from_pretrained(path), ref, pixels(size))


def test_swin_oneformer_layout(swin, oneformer_swin):
    ref, _ = swin
    check_swin(Swin.from_pretrained(oneformer_swin), ref, pixels((98, 102)))


# --------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("wh", [(640, 427), (333, 500)], ids=["landscape", "portrait"])
def test_clip_preprocess_matches_clip_image_processor(tf, wh):
    img = photo(*wh)
    for size in (336, 224):
        proc = tf.CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        ref = torch.as_tensor(np.asarray(proc(img, return_tensors="np")["pixel_values"][0]))
        assert maxdiff(clip_preprocess(img, size), ref) <= TOL


def expand2square(pil_img, background_color):
    """LLaVA's rule (llava/mm_utils.py), as the reference."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


@pytest.mark.parametrize("wh", [(64, 41), (41, 64), (50, 50)])
def test_pad_to_square_is_llava_expand2square(wh):
    img = photo(*wh)
    llava = expand2square(img, tuple(int(x * 255) for x in CLIP_MEAN))
    assert np.array_equal(np.asarray(pad_to_square(img)), np.asarray(llava))
    assert np.array_equal(np.asarray(square_view(img, "pad")), np.asarray(llava))
    assert tuple(int(x * 255) for x in CLIP_MEAN) == (122, 116, 104)


def test_center_crop_square_and_resize_normalize():
    img = photo(65, 40)
    arr = np.asarray(img)
    assert np.array_equal(np.asarray(center_crop_square(img)), arr[:, 12:52])
    assert np.array_equal(np.asarray(square_view(img, "crop")), arr[:, 12:52])
    with pytest.raises(ValueError, match="crop"):
        square_view(img, "square")
    x = resize_normalize(img.resize((8, 8)), 8, IMAGENET_MEAN, IMAGENET_STD)
    manual = (np.asarray(img.resize((8, 8)), dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    assert x.shape == (3, 8, 8) and maxdiff(x, torch.as_tensor(manual).permute(2, 0, 1)) <= TOL


# --------------------------------------------------------------------------- loader strictness
@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_loader_is_strict_and_names_the_key(dinov2, tmp_path, case):
    _, path = dinov2
    key = "encoder.layer.2.layer_scale1.lambda1"
    edits = {
        "missing": lambda sd: {k: v for k, v in sd.items() if k != key},
        "unexpected": lambda sd: {**sd, "encoder.layer.9.extra.weight": torch.zeros(3)},
        "shape": lambda sd: {**sd, key: torch.zeros(5)},
    }
    ckpt = rewrite(path, tmp_path / case, edits[case])
    with pytest.raises(ValueError) as err:
        DINOv2.from_pretrained(ckpt)
    msg = str(err.value)
    assert {"missing": key, "unexpected": "encoder.layer.9.extra.weight", "shape": key}[case] in msg
    assert case.replace("shape", "wrong shape") in msg


def test_text_tower_keys_are_skipped_but_vision_keys_are_strict(clip_full, tmp_path):
    _, path = clip_full
    ckpt = rewrite(
        path, tmp_path / "c", lambda sd: {k: v for k, v in sd.items() if k != "visual_projection.weight"}
    )
    with pytest.raises(ValueError, match="visual_projection.weight"):
        CLIPVision.from_pretrained(ckpt)
    assert any(k.startswith("text_model.") for k in load_file(path / "model.safetensors"))


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Swin.from_pretrained(tmp_path)
