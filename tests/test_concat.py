"""The multi-encoder baselines of Tab. 1 (concat.py): the teachers' features as LLM input. Real sizes on the
meta device (a 4608-wide projector for feat-concat; 576 + 8 + 8 + 8 positions for token-concat), the
inserted embeddings recomputed by hand, the checkpoint round trip with the teachers rebuilt."""

import pytest
import torch
import torch.nn as nn
from conftest import maxdiff, teacher_pixels, tiny_ola, toy_batch

from checkpoint import from_checkpoint, save_checkpoint
from concat import ConcatVLM, make_vlm
from encoders import CLIPVision, CLIPVisionConfig
from llm import LLM, LLMConfig
from ola import OLAVLM, OLAConfig
from recipe import set_trainable
from tasks import IMAGE, SYS, TASKS, tiny_teachers


class RealSizeTeachers(nn.Module):
    """Only what the model reads of its teachers: the real feature widths (docs/design.md §2)."""

    dims = {"depth": 1024, "seg": 1536, "gen": 1024}


@pytest.mark.parametrize("mode", ["feat-concat", "token-concat"])
def test_real_sizes_on_the_meta_device(mode):
    with torch.device("meta"):
        model = ConcatVLM(
            OLAConfig(mode=mode), LLM(LLMConfig()), CLIPVision(CLIPVisionConfig()), RealSizeTeachers()
        )
    H = 4096
    if mode == "feat-concat":  # [CLIP | gen × 576 | depth | seg] per image token -> one projector
        assert model.projector[0].in_features == 1024 + 1024 + 1024 + 1536 and model.image_seq_len == 576
        assert model.inputs.projectors is None
    else:  # CLIP's projector, and one per teacher over 8 tokens each
        assert model.projector[0].in_features == 1024 and model.image_seq_len == 576 + 8 + 8 + 8
        widths = {t: p[0].in_features for t, p in model.inputs.projectors.items()}
        assert widths == RealSizeTeachers.dims
        assert all(p[2].out_features == H for p in model.inputs.projectors.values())
    assert model.tokens is None and model.predictors is None


def concat_model(mode: str):
    cfg = OLAConfig(mode=mode)
    teachers = tiny_teachers(cfg.tasks, grid=8, seed=0)
    model, _ = tiny_ola(OLAConfig(tasks=()), seed=0)  # the same LLM and CLIP as a LLaVA-1.5 model
    return ConcatVLM(cfg, model.llm, model.vision, teachers), teachers


@pytest.mark.parametrize("mode", ["feat-concat", "token-concat"])
def test_inserted_embeddings_are_the_projected_teacher_features(mode):
    model, teachers = concat_model(mode)
    ids, mask, labels, images, has_image = toy_batch()
    fed = teacher_pixels(teachers, len(images))
    embeds, _, _, segments = model.splice(ids, mask, labels, images, teacher_images=fed)
    with torch.no_grad():
        clip = model.vision.features(images)  # (2, 64, 64)
        feats = teachers(fed)
        first = embeds[0][segments[0] != SYS][: model.image_seq_len]  # sample 0: the image block
        if mode == "feat-concat":
            gen = feats["gen"].repeat(1, 64, 1)
            expected = model.projector(torch.cat([clip, gen, feats["depth"], feats["seg"]], -1))[0]
            assert (segments[0] == IMAGE).sum() == 64
        else:
            blocks = [model.projector(clip)[0]]
            for task in ("gen", "depth", "seg"):  # the paper's token order
                x = feats[task][0]
                rows = (
                    x.repeat(8, 1)
                    if len(x) == 1
                    else torch.stack([x[8 * k : 8 * k + 8].mean(0) for k in range(8)])
                )
                blocks.append(model.inputs.projectors[task](rows))
                assert (segments[0] == TASKS[task].segment).sum() == 8
            expected = torch.cat(blocks)
    assert maxdiff(first, expected) < 1e-5


@pytest.mark.parametrize("mode", ["feat-concat", "token-concat"])
def test_checkpoint_stores_tiny_teachers_and_rebuilds_the_model(mode, tmp_path):
    model, teachers = concat_model(mode)
    counts = set_trainable(model, "pt", verbose=False)
    assert counts["teachers"][0] == 0 and counts["projector"][0] > 0
    assert all(not p.requires_grad for p in model.teachers.parameters())
    save_checkpoint(model, tmp_path / "ckpt", ("projector", "inputs"))
    again = from_checkpoint(tmp_path / "ckpt")
    ids, mask, labels, images, has_image = toy_batch()
    fed = teacher_pixels(teachers, len(images))
    with torch.no_grad():
        a = model(ids, mask, labels, images, has_image, teacher_images=fed).loss
        b = again(ids, mask, labels, images, has_image, teacher_images=fed).loss
    assert abs(a.item() - b.item()) < 1e-6
    with pytest.raises(ValueError, match="pass teacher_images"):
        again(ids, mask, labels, images, has_image)


def test_each_mode_has_its_class():
    """OLAVLM refuses a baseline's config (it would build a model without its input teachers); make_vlm
    picks the class of the mode."""
    model, _ = tiny_ola(OLAConfig(tasks=()), seed=0)
    cfg = OLAConfig(mode="feat-concat")
    with pytest.raises(ValueError, match="build it with concat.ConcatVLM"):
        OLAVLM(cfg, model.llm, model.vision)
    teachers = tiny_teachers(cfg.tasks, grid=8, seed=0)
    assert type(make_vlm(cfg, model.llm, model.vision, teachers=teachers)) is ConcatVLM
    assert type(make_vlm(OLAConfig(tasks=()), model.llm, model.vision)) is OLAVLM
