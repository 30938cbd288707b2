"""The teachers and the task table: targets against transformers' modules, input sizes derived from the base
encoder's grid, the averaged DINOv2 blocks read from the config, tiny teachers reproducible from a seed,
real-size shapes on the meta device."""

import pytest
import torch
from conftest import TOL, maxdiff, photo

from encoders import CLIPVision, CLIPVisionConfig, DINOv2, DINOv2Config
from preprocess import clip_preprocess, square_view
from swin import Swin, SwinConfig
from tasks import TASKS, load_teachers, teacher_input_size, tiny_teachers
from teachers import DepthTeacher, GenTeacher, SegTeacher, TargetEncoders


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
    px = {k: v[None] for k, v in teachers.preprocess(img).items()}
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
    px = {k: v[None] for k, v in fp32.preprocess(square_view(photo(120, 90), "pad")).items()}
    ref, out = fp32(px), bf16(px)
    for k in ref:
        assert out[k].dtype == torch.bfloat16
        assert maxdiff(out[k], ref[k]) <= 0.1 * ref[k].abs().max().item()


def test_depth_teacher_averages_the_blocks_its_config_names(tmp_path):
    """Depth Anything's config names the averaged hidden states (`out_indices`, 1-based): a 4-block DINOv2
    takes them from its config, DAv2-L's 5, 12, 18, 24 are the default, and an index past the blocks is
    refused with the folder named."""
    encoder = DINOv2(DINOv2Config.tiny())
    encoder.save_pretrained(tmp_path / "four", out_indices=(2, 4))
    assert DepthTeacher.from_pretrained(tmp_path / "four", 112).blocks == (1, 3)
    assert DepthTeacher(encoder, 112).blocks == (4, 11, 17, 23)
    encoder.save_pretrained(tmp_path / "bad", out_indices=(5,))
    with pytest.raises(ValueError, match="bad: out_indices"):
        DepthTeacher.from_pretrained(tmp_path / "bad", 112)


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
