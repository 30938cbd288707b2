"""The teachers and the task table: targets against transformers' modules, input sizes derived from the base
encoder's grid, tiny teachers reproducible from a seed that encode the true depth / segmentation maps,
real-size shapes on the meta device."""

import numpy as np
import pytest
import torch
from conftest import TOL, maxdiff, photo
from PIL import Image

from encoders import CLIPVision, CLIPVisionConfig, DINOv2, DINOv2Config
from preprocess import clip_preprocess, resize_normalize, square_view
from swin import Swin, SwinConfig
from tasks import TASKS, load_teachers, teacher_input_size, tiny_teachers
from teachers import DepthTeacher, GenTeacher, SegTeacher, TargetEncoders


def scene_maps(side: int, edit=None) -> dict[str, Image.Image]:
    """Maps of a side² view as data.read_map gives them: two overlapping boxes (the nearer, id 11 at 2 m,
    over id 20 at 5 m) before a wall at 10 m; `edit(depth, seg)` changes the arrays in place first."""
    depth = np.full((side, side), 10.0, np.float32)
    seg = np.zeros((side, side), np.int32)
    for (y0, y1, x0, x1), d, i in (((0.45, 0.8, 0.15, 0.55), 5.0, 20), ((0.25, 0.6, 0.4, 0.85), 2.0, 11)):
        box = slice(int(y0 * side), int(y1 * side)), slice(int(x0 * side), int(x1 * side))
        depth[box], seg[box] = d, i
    if edit:
        edit(depth, seg)
    return {"depth": Image.fromarray(depth), "seg": Image.fromarray(seg)}


def test_teachers_from_pretrained_match_the_reference_targets(
    dinov2, depth_anything, swin, oneformer_swin, unclip
):
    """depth = mean of normed DINOv2 blocks, seg = stage-4 tokens, gen = (B, 1, P); probes: the last block."""
    depth = DepthTeacher(
        DINOv2.from_pretrained(depth_anything[1], interpolate_offset=0.0), 56, blocks=(0, 2, 3)
    )
    teachers = TargetEncoders(
        {
            "depth": depth,
            "seg": SegTeacher.from_pretrained(oneformer_swin, 98),
            "gen": GenTeacher.from_pretrained(unclip[1]),
        }
    )
    assert all(not p.requires_grad for p in teachers.parameters())
    teachers.train()
    assert not teachers.training and not teachers.teachers["seg"].training
    img = square_view(photo(90, 70), "pad")
    px = {k: v[None].repeat(2, 1, 1, 1) for k, v in teachers.preprocess(img).items()}
    assert {k: tuple(v.shape[-2:]) for k, v in px.items()} == {
        "depth": (56, 56),
        "seg": (98, 98),
        "gen": (42, 42),
    }
    out = teachers(px)
    with torch.no_grad():
        hs = depth_anything[0].backbone(px["depth"], output_hidden_states=True).hidden_states
        norm = depth_anything[0].backbone.layernorm
        expected = torch.stack([norm(hs[b + 1])[:, 1:] for b in (0, 2, 3)]).mean(0)
        assert maxdiff(out["depth"], expected) <= TOL
        probe = teachers.probe_targets({"depth": px["depth"]})["depth"]
        assert maxdiff(probe, norm(hs[4])[:, 1:]) <= TOL
        seg = swin[0](px["seg"]).feature_maps[-1].flatten(2).transpose(1, 2)
        assert maxdiff(out["seg"], seg) <= TOL
        assert maxdiff(out["gen"], unclip[0](pixel_values=px["gen"]).image_embeds[:, None]) <= TOL
    assert teachers.dims == {"depth": 64, "seg": 128, "gen": 48}
    assert out["depth"].requires_grad is False
    with pytest.raises(ValueError, match="no teacher"):
        TargetEncoders({"seg": teachers.teachers["seg"]})({"depth": px["depth"]})


def test_input_sizes_derive_from_the_base_grid(depth_anything, oneformer_swin, unclip):
    """Spatial teachers see grid × pixels-per-token (24 -> 336 / 768, 8 -> 112 / 256); gen its own."""
    assert teacher_input_size("depth", 24) == 336 and teacher_input_size("seg", 24) == 768
    assert teacher_input_size("depth", 8) == 112 and teacher_input_size("seg", 8) == 256
    assert teacher_input_size("gen", 24) is None
    paths = {"depth": depth_anything[1], "seg": oneformer_swin, "gen": unclip[1]}
    teachers = load_teachers(paths, grid=3)
    sizes = {task: teacher.input_size for task, teacher in teachers.teachers.items()}
    assert sizes == {"depth": 42, "seg": 96, "gen": 42}


def test_tiny_targets_match_tiny_base():
    base = CLIPVision(CLIPVisionConfig.tiny())
    teachers = tiny_teachers(tuple(TASKS), grid=base.grid, seed=0)
    img = square_view(photo(150, 100), "crop")
    px = {k: v[None] for k, v in teachers.preprocess(img, scene_maps(100)).items()}
    out = teachers(px)
    n = base.features(clip_preprocess(img, 112)[None]).shape[1]
    assert n == base.num_tokens == 64
    assert out["depth"].shape == (1, n, teachers.dims["depth"]) and out["seg"].shape == (
        1,
        n,
        teachers.dims["seg"],
    )
    assert out["gen"].shape == (1, 1, teachers.dims["gen"])
    assert teachers.teachers["depth"].encoder.grid != 8  # the tiny depth teacher interpolates its table
    again = tiny_teachers(tuple(TASKS), grid=8, seed=0)(px)
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert not torch.equal(tiny_teachers(tuple(TASKS), grid=8, seed=1)(px)["gen"], out["gen"])
    only_seg = tiny_teachers(("seg",), grid=8, seed=0)
    assert only_seg.tasks == ["seg"]


def test_tiny_targets_bf16():
    """The teachers run in the model's dtype (bf16 on GPU); bf16 stays close to fp32."""
    fp32 = tiny_teachers(tuple(TASKS), grid=8, seed=0)
    bf16 = tiny_teachers(tuple(TASKS), grid=8, seed=0, dtype=torch.bfloat16)
    px = {k: v[None] for k, v in fp32.preprocess(square_view(photo(120, 90), "pad"), scene_maps(120)).items()}
    ref, out = fp32(px), bf16(px)
    for k in ref:
        assert out[k].dtype == torch.bfloat16
        assert maxdiff(out[k], ref[k]) <= 0.1 * ref[k].abs().max().item()


def patch_edit(kind: str, q: int, value: float):
    """A scene_maps edit: map `kind` set to `value` over the patch of token q (16² px at 128 px, 8×8 grid)."""
    y, x = divmod(q, 8)

    def edit(depth, seg):
        (depth if kind == "depth" else seg)[16 * y : 16 * y + 16, 16 * x : 16 * x + 16] = value

    return edit


def test_tiny_targets_follow_their_maps():
    """The tiny depth target encodes the depth map, the seg target the segmentation map, the gen target the
    image — each only its own input — and a spatial target's token q reads the patch of image token q."""
    teachers = tiny_teachers(tuple(TASKS), grid=8, seed=0)
    assert {t: teacher.reads for t, teacher in teachers.teachers.items()} == {
        "depth": "depth",
        "seg": "seg",
        "gen": "image",
    }
    img = square_view(photo(128, 128), "crop")

    def targets(image=img, edit=None):
        return teachers({k: v[None] for k, v in teachers.preprocess(image, scene_maps(128, edit)).items()})

    def changed(a, b):
        return {t for t in a if not torch.equal(a[t], b[t])}

    def nearer(depth, seg):  # the far box moves closer
        depth[depth == 5.0] = 3.0

    def relabelled(depth, seg):  # the same layout, another object's id
        seg[seg == 20] = 30

    base = targets()
    assert changed(base, targets(edit=nearer)) == {"depth"}
    assert changed(base, targets(edit=relabelled)) == {"seg"}
    assert changed(base, targets(image=square_view(photo(128, 128, seed=1), "crop"))) == {"gen"}
    for q in (0, 59):
        for task, value in (("depth", 3.0), ("seg", 30)):
            delta = (targets(edit=patch_edit(task, q, value))[task] - base[task])[0].norm(dim=-1)  # (64,)
            assert delta.argmax() == q, task


def test_map_teachers_refuse_records_without_their_map():
    """Given maps, a map reader needs its own (a record without it is an error); given none at all (a caller
    that loads no maps), it encodes the image and says so. Image readers ignore maps."""
    teachers = tiny_teachers(tuple(TASKS), grid=8, seed=0)
    img = square_view(photo(64, 64), "crop")
    with pytest.raises(ValueError, match="names no 'depth' file"):
        teachers.preprocess(img, {"seg": scene_maps(64)["seg"]})
    with pytest.warns(UserWarning, match="encodes the image instead"):
        fallback = teachers.teachers["seg"].preprocess(img)
    assert torch.equal(fallback, resize_normalize(img, 256))
    gen = teachers.teachers["gen"]
    assert torch.equal(gen.preprocess(img, scene_maps(64)), gen.preprocess(img))


def test_real_size_shapes_on_meta():
    """The paper's shapes from the real architectures (meta device: no memory, no compute)."""
    with torch.device("meta"):
        base = CLIPVision(CLIPVisionConfig())
        teachers = TargetEncoders(
            {
                "depth": DepthTeacher(DINOv2(DINOv2Config()), teacher_input_size("depth", base.grid)),
                "seg": SegTeacher(Swin(SwinConfig()), teacher_input_size("seg", base.grid)),
                "gen": GenTeacher(CLIPVision(CLIPVisionConfig.unclip_h()), 224),
            }
        )
        assert base.features(torch.empty(2, 3, 336, 336)).shape == (2, 576, 1024)
        sizes = {task: teacher.input_size for task, teacher in teachers.teachers.items()}
        assert sizes == {"depth": 336, "seg": 768, "gen": 224}
        out = teachers({task: torch.empty(2, 3, s, s) for task, s in sizes.items()})
        probe = teachers.probe_targets({"depth": torch.empty(2, 3, 336, 336)})["depth"]
        assert probe.shape == (2, 576, 1024)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "depth": (2, 576, 1024),
        "seg": (2, 576, 1536),
        "gen": (2, 1, 1024),
    }
    assert teachers.dims == {"depth": 1024, "seg": 1536, "gen": 1024}

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(teachers.teachers["gen"]) == pytest.approx(632e6, rel=0.01)  # docs/design.md §8
    assert count(teachers.teachers["seg"]) == pytest.approx(195e6, rel=0.02)


def test_map_targets_are_relative_to_the_empty_scene():
    """A map reader's target is its features minus those of a scene without shapes, normalised per token
    (design §9): zero for a wall-only scene; image readers return their features."""
    teachers = tiny_teachers(tuple(TASKS), grid=8, seed=0)
    img = square_view(photo(128, 128), "crop")

    def wall_only(depth, seg):
        depth[:], seg[:] = 7.0, 0  # any uniform depth draws the same picture as the 10 m wall

    empty = {k: v[None] for k, v in teachers.preprocess(img, scene_maps(128, wall_only)).items()}
    px = {k: v[None] for k, v in teachers.preprocess(img, scene_maps(128)).items()}
    for task in ("depth", "seg"):
        teacher = teachers.teachers[task]
        assert teachers(empty)[task].abs().max() < 1e-5
        relative = teacher.features(px[task]) - teacher.features(empty[task])
        expected = torch.nn.functional.layer_norm(
            relative, relative.shape[-1:]
        )  # per token, as normed features
        assert maxdiff(teachers(px)[task], expected) < 1e-5
    assert torch.equal(teachers(px)["gen"], teachers.teachers["gen"].features(px["gen"]))
