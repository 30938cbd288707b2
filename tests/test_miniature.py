"""The miniature (miniature.py, pretrain.py): a deterministic cached build, each pretrained part better than
a trivial predictor on scenes it never saw, no pretraining step on the held-out split, and every part saved
in the official layout that transformers reads, with the same numbers as ours."""

import json

import pytest
import torch
from conftest import TOL, maxdiff
from PIL import Image

import miniature
import pretrain
from encoders import CLIPVision, DINOv2
from llm import LLM
from swin import Swin
from teachers import DepthTeacher
from weights import build_once, read_json


def test_a_second_build_is_identical(miniature_build, tmp_path, monkeypatch):
    """Same settings, another folder: every file (weights, data, report) hashes the same."""
    monkeypatch.setenv("OLA_DATA_CACHE", str(tmp_path))
    again = miniature.builtin("fast")
    first = read_json(miniature_build["root"] / "manifest.json")
    second = read_json(again["root"] / "manifest.json")
    assert second["files"] == first["files"] and second["hash"] == first["hash"]
    assert {"llm/model.safetensors", "clip/config.json", "seg/model.safetensors", "report.json"} <= set(
        first["files"]
    )


def test_every_part_beats_a_trivial_predictor_on_held_out_scenes(miniature_build):
    """report.json, scored on the build's own held-out stream: each teacher against a constant, the encoders
    against chance and against their random initialisation, the LLM against a unigram model."""
    report = read_json(miniature_build["report"])
    depth, seg = report["depth"], report["seg"]
    assert depth["teacher"]["rmse"] < depth["constant"]["rmse"]
    assert depth["teacher"]["delta1"] > depth["constant"]["delta1"]
    assert seg["teacher"]["miou"] > seg["constant"]["miou"]
    assert seg["teacher"]["pixel_accuracy"] > seg["constant"]["pixel_accuracy"]
    for part in ("clip", "gen"):
        assert report[part]["retrieval_top1"] > 3 * report[part]["chance"]
    clip = report["clip"]
    assert clip["pretrained"]["depth_r2"] > clip["random"]["depth_r2"]
    assert clip["pretrained"]["seg_r2"] > clip["random"]["seg_r2"]
    assert report["llm"]["ntp_loss"] < 0.5 * report["llm"]["unigram_loss"]


def test_no_pretraining_step_sees_the_held_out_split(miniature_build):
    """The held-out QA images are never among the pretraining scenes (streams "pre" and "check"), and no
    pretraining stream may be the held-out one."""
    cfg = miniature.PRESETS["fast"]
    pretraining = pretrain.render_scenes("pre", cfg.n_scenes, cfg.seed).images
    pretraining += pretrain.render_scenes("check", cfg.n_check, cfg.seed).images
    seen = {image.tobytes() for image in pretraining}
    records = [json.loads(line) for line in miniature_build["qa_val"].read_text().splitlines()]
    held_out = [(miniature_build["images"] / r["image"]) for r in records]
    assert len(held_out) == cfg.n_val
    assert not any(Image.open(path).convert("RGB").tobytes() in seen for path in held_out)
    with pytest.raises(ValueError, match="held-out"):
        pretrain.render_scenes("val", 1, cfg.seed)


def test_the_parts_load_in_transformers_with_our_numbers(miniature_build):
    """Each folder is an official layout: transformers reads it strictly and computes what we compute."""
    tf = pytest.importorskip("transformers")
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    clip = CLIPVision.from_pretrained(miniature_build["clip"])
    theirs = tf.CLIPVisionModelWithProjection.from_pretrained(miniature_build["clip"]).eval()
    with torch.no_grad():
        assert maxdiff(clip.image_embeds(x), theirs(pixel_values=x).image_embeds) <= TOL
        hidden = theirs(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert maxdiff(clip.features(x), hidden) <= TOL

    depth = DepthTeacher.from_pretrained(miniature_build["depth"], 112)
    dino = tf.Dinov2Model.from_pretrained(miniature_build["depth"]).eval()
    with torch.no_grad():
        hs = dino(pixel_values=x, output_hidden_states=True).hidden_states
        expected = torch.stack([dino.layernorm(hs[i])[:, 1:] for i in dino.config.out_indices]).mean(0)
        assert maxdiff(depth(x), expected) <= TOL

    seg = Swin.from_pretrained(miniature_build["seg"])
    backbone = tf.SwinBackbone.from_pretrained(miniature_build["seg"]).eval()
    x256 = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stage4 = backbone(pixel_values=x256).feature_maps[-1].flatten(2).transpose(1, 2)
        assert maxdiff(seg(x256), stage4) <= TOL

    llm = LLM.from_pretrained(miniature_build["llm"])
    lm = tf.LlamaForCausalLM.from_pretrained(miniature_build["llm"]).eval()
    ids = torch.randint(0, llm.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert maxdiff(llm(ids).logits, lm(ids).logits) <= TOL
    assert (miniature_build["llm"] / "tokenizer.json").is_file()


def test_save_pretrained_round_trips(tmp_path):
    """Our writers and loaders are inverse: a random module comes back bit for bit."""
    from encoders import CLIPVisionConfig, DINOv2Config
    from llm import LLMConfig
    from swin import SwinConfig

    for module, load in (
        (CLIPVision(CLIPVisionConfig.tiny()), CLIPVision.from_pretrained),
        (DINOv2(DINOv2Config.tiny()), DINOv2.from_pretrained),
        (Swin(SwinConfig.tiny()), Swin.from_pretrained),
        (LLM(LLMConfig.preset("tiny")), LLM.from_pretrained),
    ):
        folder = tmp_path / type(module).__name__
        module.save_pretrained(folder)
        loaded = load(folder).state_dict()
        assert all(torch.equal(v, loaded[k]) for k, v in module.state_dict().items()), folder


def test_a_cache_is_built_once_and_rebuilt_for_other_settings(tmp_path):
    """build_once: a complete folder is reused; other settings replace it; a folder that is not a build is
    refused; a failed build leaves nothing behind."""
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "a.txt").write_text(str(len(calls)))

    root = tmp_path / "cache"
    first = build_once(root, {"n": 1}, build)
    assert build_once(root, {"n": 1}, build) == first and len(calls) == 1
    assert build_once(root, {"n": 2}, build)["hash"] != first["hash"] and (root / "a.txt").read_text() == "2"
    with pytest.raises(RuntimeError):
        build_once(tmp_path / "broken", {"n": 1}, lambda folder: (_ for _ in ()).throw(RuntimeError("x")))
    assert not list(tmp_path.glob("broken*"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("")
    with pytest.raises(FileExistsError, match="no manifest.json"):
        build_once(tmp_path / "mine", {"n": 1}, build)
