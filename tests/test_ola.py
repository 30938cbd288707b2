"""OLA-VLM model tests: special-token spans, predictor keys, PT gradients, stages, checkpoints, the task
table (any subset, a fourth task) and LLaVA-1.5 as the degenerate case."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, teacher_pixels, tiny_ola, toy_batch

import tasks as task_table
from checkpoint import from_checkpoint, save_checkpoint
from encoders import CLIPVision, CLIPVisionConfig
from llm import LLM
from ola import OLAVLM, OLAConfig, embedding_predictors
from predictors import SeekTokens
from recipe import set_trainable
from tasks import IMAGE, PAD, SYS, TASKS, TEXT, Task, tiny_teachers
from teachers import DepthTeacher
from tokenizer import IGNORE_INDEX

GEN, DEPTH, SEG = (TASKS[t].segment for t in ("gen", "depth", "seg"))


@pytest.fixture(scope="module")
def model_and_teachers():
    return tiny_ola()


def test_spans_labels_and_text_only(model_and_teachers):
    model, _ = model_and_teachers
    input_ids, mask, labels, images, has_image = toy_batch()
    embeds, attn, new_labels, seg = model.splice(input_ids, mask, labels, images)
    N, K = model.num_image_tokens, model.cfg.num_seek_tokens
    for b, (img, p) in enumerate(zip(has_image.tolist(), (5, 3, 7))):
        n_text = int(mask[b].sum()) - int(img)
        if not img:  # text-only: no image, no special tokens, labels unchanged
            assert (seg[b, :n_text] == TEXT).all() and (seg[b, n_text:] == PAD).all()
            assert torch.equal(new_labels[b, :n_text], labels[b, :n_text])
            continue
        # Sec. 5.1: <sys> (p tokens) | <img> (N) | <g> x8 | <d> x8 | <s> x8 | <txt>
        expect = [SYS] * p + [IMAGE] * N + [GEN] * K + [DEPTH] * K + [SEG] * K + [TEXT] * (n_text - p)
        assert seg[b, : len(expect)].tolist() == expect
        assert (seg[b, len(expect) :] == PAD).all() and attn[b].sum() == len(expect)
        assert (new_labels[b, p : p + N + 3 * K] == IGNORE_INDEX).all()
        assert torch.equal(new_labels[b, p + N + 3 * K : len(expect)], labels[b, p + 1 : n_text + 1])
        # the inserted embeddings are the pooled query chunks and the <g> tokens
        assert torch.allclose(embeds[b, p + N + K : p + N + 2 * K], model.tokens("depth"), atol=1e-6)
        assert torch.allclose(embeds[b, p + N : p + N + K], model.tokens.gen_tokens, atol=1e-6)
    assert model.tokens("seg").shape == (K, model.llm.config.hidden_size)
    assert torch.allclose(model.tokens("seg")[1], model.tokens.q_seg[N // K : 2 * N // K].mean(0))


@pytest.mark.parametrize("task", ["depth", "seg", "gen"])
def test_predictor_keys_ignore_other_tasks_tokens(model_and_teachers, task):
    model, _ = model_and_teachers
    input_ids, mask, labels, images, _ = toy_batch()
    _, _, _, seg = model.splice(input_ids, mask, labels, images)
    hidden = torch.randn(*seg.shape, model.llm.config.hidden_size)
    layer = model.predictors.layer_sets[task][0]

    def predict(h):
        return model.predictors.predict(task, layer, h, seg, model.tokens)

    base = predict(hidden)
    own = TASKS[task].segment
    for code in (DEPTH, SEG, GEN, PAD):
        changed = hidden.clone()
        changed[seg == code] += 10 * torch.randn_like(changed[seg == code])
        same = torch.allclose(predict(changed), base, atol=1e-6)
        assert same == (code != own), f"{task} predictor vs segment {code}"
    for code in (SYS, IMAGE, TEXT):  # system prompt, image and text are keys
        changed = hidden.clone()
        changed[seg == code] += 1.0
        assert not torch.allclose(predict(changed), base, atol=1e-6)


def test_pt_step_gradients(model_and_teachers):
    model, teachers = model_and_teachers
    set_trainable(model, "pt")
    input_ids, mask, labels, images, has_image = toy_batch()
    targets = teachers(teacher_pixels(teachers, int(has_image.sum())))
    model.zero_grad(set_to_none=True)
    out = model(input_ids, mask, labels, images, has_image, targets)
    out.loss.backward()
    assert out.terms["emb"] > 0 and out.terms["ntp"] > 0
    layer_sets = model.predictors.layer_sets
    expected_terms = {
        f"{t}@{layer}/{k}" for t, ls in layer_sets.items() for layer in ls for k in ("sl1", "con")
    }
    assert expected_terms <= set(out.terms)

    def nonzero(p):
        return p.grad is not None and p.grad.abs().sum() > 0

    for name, p in model.predictors.named_parameters():
        assert nonzero(p), f"predictor parameter {name} got no gradient"
    for name, p in model.tokens.named_parameters():
        assert nonzero(p), f"special tokens {name}"
    assert all(nonzero(p) for p in model.projector.parameters())
    frozen = list(model.llm.parameters()) + list(model.vision.parameters()) + list(teachers.parameters())
    assert all(p.grad is None and not p.requires_grad for p in frozen)


def test_special_tokens_are_named_after_the_paper(model_and_teachers):
    model, _ = model_and_teachers
    names = {name for name, _ in model.tokens.named_parameters()}
    assert names == {"q_depth", "q_seg", "gen_tokens"}


def test_ift_stage_drops_predictors_and_freezes_tokens():
    model, _ = tiny_ola(seed=1)
    counts = set_trainable(model, "ift", verbose=False)
    assert model.predictors is None and "predictors" not in counts
    assert not any(p.requires_grad for p in model.tokens.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.llm.parameters())
    input_ids, mask, labels, images, has_image = toy_batch()
    out = model(input_ids, mask, labels, images, has_image)  # the tokens are still inserted
    assert set(out.terms) == {"ntp"} and (out.segments == GEN).sum() == 2 * model.cfg.num_seek_tokens


def test_layer_sets_scale_with_depth():
    cfg = OLAConfig()
    assert cfg.layer_set("depth", 32) == (8, 20) and cfg.layer_set("seg", 32) == (10, 18)
    assert cfg.layer_set("gen", 32) == (12, 20)
    assert cfg.layer_set("depth", 8) == (2, 5) and cfg.layer_set("gen", 16) == (6, 10)


def test_a_task_subset_builds_only_its_parameters():
    """--tasks depth: no seg/gen tokens, predictors or logit scales exist (so DDP never sees unused ones)."""
    model, teachers = tiny_ola(OLAConfig(tasks=("depth",)))
    assert list(teachers.teachers) == ["depth"] and list(model.predictors.heads) == ["depth"]
    assert {n for n, _ in model.tokens.named_parameters()} == {"q_depth"}
    assert list(model.predictors.logit_scales) == ["depth"]
    input_ids, mask, labels, images, has_image = toy_batch()
    _, _, _, seg = model.splice(input_ids, mask, labels, images)
    assert set(seg.unique().tolist()) == {PAD, SYS, IMAGE, DEPTH, TEXT}
    set_trainable(model, "pt", verbose=False)
    out = model(input_ids, mask, labels, images, has_image, teachers(teacher_pixels(teachers, 2)))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_llava_is_the_degenerate_case_and_equals_a_plain_llava_forward():
    """No tasks and N_seek = 0 is LLaVA-1.5: no special tokens, no predictors, and its PT loss equals a
    plain LLaVA forward written out here (CLIP features -> projector -> spliced embeddings -> LLM -> CE)."""
    model, teachers = tiny_ola(OLAConfig(tasks=(), num_seek_tokens=0))
    assert teachers is None and model.tokens is None and model.predictors is None
    counts = set_trainable(model, "pt", verbose=False)
    assert counts["total"][0] == sum(p.numel() for p in model.projector.parameters())
    input_ids, mask, labels, images, has_image = toy_batch()
    out = model(input_ids, mask, labels, images, has_image)
    with torch.no_grad():
        feats = model.vision.features(images)  # (2, 64, 64)
        projected = model.projector(feats)
        rows, n = [], 0
        for b in range(len(input_ids)):
            ids, lab = input_ids[b][mask[b]], labels[b][mask[b]]
            emb = model.llm.embed_tokens(ids.clamp(min=0))
            hit = (ids < 0).nonzero().flatten()
            if len(hit):
                p = int(hit[0])
                emb = torch.cat([emb[:p], projected[n], emb[p + 1 :]])
                lab = torch.cat([lab[:p], torch.full((len(projected[n]),), IGNORE_INDEX), lab[p + 1 :]])
                n += 1
            rows.append((emb, lab))
        losses, count = 0.0, 0
        for emb, lab in rows:  # one sample at a time: no padding involved at all
            logits = model.llm(inputs_embeds=emb[None]).logits[0]
            losses += F.cross_entropy(logits[:-1], lab[1:], ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((lab[1:] != IGNORE_INDEX).sum())
    assert abs(out.loss.item() - losses.item() / count) <= 1e-5
    assert set(out.terms) == {"ntp"}


def test_no_seek_tokens_keeps_the_embedding_losses_with_own_queries():
    """Tab. 5, N_seek = 0: no special tokens in the sequence; each predictor learns its own queries, as wide
    as its target (the released DepthHead: dim = output_dim), not the LLM's H = 128."""
    model, teachers = tiny_ola(OLAConfig(num_seek_tokens=0))
    assert model.tokens is None and model.image_seq_len == model.num_image_tokens
    input_ids, mask, labels, images, has_image = toy_batch()
    out = model(input_ids, mask, labels, images, has_image, teachers(teacher_pixels(teachers, 2)))
    assert torch.isfinite(out.loss) and out.terms["emb"] > 0
    depth = teachers.dims["depth"]
    assert depth != model.llm.config.hidden_size
    assert model.predictors.heads["depth"]["2"].latents.shape == (1, model.num_image_tokens, depth)


def test_a_fourth_task_is_one_table_entry(monkeypatch):
    """A toy 'normals' teacher (a tiny DINOv2, its last block) added through the task table alone trains
    one PT step: its tokens, predictor and loss terms exist and get gradients."""

    class NormalsTeacher(DepthTeacher):
        @classmethod
        def tiny(cls, input_size):
            teacher = super().tiny(input_size)
            teacher.blocks = (3,)
            return teacher

    normals = Task("normals", 7, True, (16,), "target", NormalsTeacher, 14, "a toy surface-normal teacher")
    monkeypatch.setitem(task_table.TASKS, "normals", normals)
    cfg = OLAConfig(tasks=("depth", "seg", "gen", "normals"))
    assert cfg.token_order == ("gen", "depth", "seg", "normals")
    model, teachers = tiny_ola(cfg)
    set_trainable(model, "pt", verbose=False)
    input_ids, mask, labels, images, has_image = toy_batch()
    out = model(input_ids, mask, labels, images, has_image, teachers(teacher_pixels(teachers, 2)))
    out.loss.backward()
    assert {"normals@4/sl1", "normals@4/con"} <= set(out.terms)
    assert model.tokens.q_normals.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.predictors.heads["normals"].parameters())
    _, _, _, seg = model.splice(input_ids, mask, labels, images)
    assert (seg[0] == 7).sum() == model.cfg.num_seek_tokens


def test_pt_checkpoint_stores_only_trained_parts_and_round_trips(tmp_path, tf):
    """With base weights in folders (official layouts), a PT checkpoint holds only the projector, the
    special tokens and the predictors, and reloads to identical outputs; a removed key is named."""
    ref = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    ref.save_pretrained(tmp_path / "llm")
    vc = CLIPVisionConfig.tiny()
    vision_config = dict(
        hidden_size=vc.hidden_size,
        intermediate_size=vc.intermediate_size,
        num_hidden_layers=vc.n_layers,
        num_attention_heads=vc.n_heads,
        image_size=vc.image_size,
        patch_size=vc.patch_size,
    )
    text_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    clip = tf.CLIPModel(
        tf.CLIPConfig(vision_config=vision_config, text_config=text_config, projection_dim=16)
    )
    clip.save_pretrained(tmp_path / "clip")
    teachers = tiny_teachers(("depth", "seg", "gen"), grid=8)
    llm = LLM.from_pretrained(tmp_path / "llm")
    vision = CLIPVision.from_pretrained(tmp_path / "clip")
    sources = {"llm": str(tmp_path / "llm"), "vision": str(tmp_path / "clip")}
    model = OLAVLM(OLAConfig(), llm, vision, teachers.dims, sources)
    save_checkpoint(model, tmp_path / "pt", ("projector", "tokens", "predictors"))
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tmp_path / "pt" / "model.safetensors"), "pt") as f:
        stored = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118
    assert stored == {"projector", "tokens", "predictors"}
    again = from_checkpoint(tmp_path / "pt")
    assert again.vision.kind == "clip" and again.cfg == model.cfg
    input_ids, mask, labels, images, has_image = toy_batch()
    targets = teachers(teacher_pixels(teachers, 2))
    a = model(input_ids, mask, labels, images, has_image, targets)
    b = again(input_ids, mask, labels, images, has_image, targets)
    assert torch.equal(a.loss, b.loss)
    bad = tmp_path / "pt" / "model.safetensors"
    sd = load_file(str(bad))
    sd.pop(next(k for k in sd if k.startswith("predictors.")))
    save_file(sd, str(bad))
    with pytest.raises(ValueError, match="predictors"):
        from_checkpoint(tmp_path / "pt")


def test_config_round_trips_through_json():
    cfg = OLAConfig(
        tasks=("seg", "gen"), layer_sets={"seg": (3,)}, task_weights={"gen": 0.25}, token_order=None
    )
    again = OLAConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg and again.token_order == ("gen", "seg")


def test_generate_appends_answer_tokens(model_and_teachers):
    model, _ = model_and_teachers
    model.eval()
    input_ids, mask, _, images, _ = toy_batch()
    out = model.generate(input_ids, mask, images, max_new_tokens=4)
    assert out.shape == (3, 4) and out.dtype == torch.long
    # batched generation equals one-by-one generation (left padding after the splice)
    n = int(mask[0].sum())
    first = model.generate(input_ids[:1, :n], mask[:1, :n], images[:1], max_new_tokens=4)
    assert torch.equal(out[:1], first)


def test_real_size_predictor_and_token_counts():
    """Llama-3-8B sizes on the meta device: per-layer predictor sizes equal the hand counts of the released
    heads (docs/design.md §3: depth 62.95M incl. its 3 1024-d MLPs of 6.30M that we do not build, seg 14.17M,
    gen 7.87M) and the special tokens are 2·576·4096 + 8·4096."""
    with torch.device("meta"):
        dims = {"depth": 1024, "seg": 1536, "gen": 1024}
        predictors = embedding_predictors(OLAConfig(), 4096, 32, dims, 576)
        tokens = SeekTokens(("depth", "seg", "gen"), 576, 4096, 8)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    mlps = 3 * (2 * 1024 * 1024 + 2 * 1024)
    assert count(predictors.heads["depth"]["8"]) == 62_952_448 - mlps == 56_654_848
    assert count(predictors.heads["seg"]["10"]) == 14_171_136
    assert count(predictors.heads["gen"]["12"]) == 7_874_560
    layers = {t: sorted(map(int, predictors.heads[t])) for t in predictors.heads}
    assert layers == {"depth": [8, 20], "seg": [10, 18], "gen": [12, 20]}
    assert count(tokens) == 2 * 576 * 4096 + 8 * 4096


def test_real_size_predictors_without_special_tokens_match_the_released_resamplers():
    """N_seek = 0 (Tab. 5 row 0): the released code's heads are plain Resamplers with their own latents, as
    wide as their output (DepthHead: dim = output_dim = 1024). Hand counts at Llama-3-8B sizes: latents Q·d,
    proj_in 4096·d + d, attention 4d + 128d + 256d + 128d, feed-forward 2d + 2d², proj_out d·C + C, norm 2C:
    depth (Q 576, d = C = 1024) 8,464,384; seg (576, 1536) 15,055,872; gen (1, 1024) 7,875,584."""
    with torch.device("meta"):
        dims = {"depth": 1024, "seg": 1536, "gen": 1024}
        predictors = embedding_predictors(OLAConfig(num_seek_tokens=0), 4096, 32, dims, 576, own_latents=True)
    for task, n in {"depth": 8_464_384, "seg": 15_055_872, "gen": 7_875_584}.items():
        head = next(iter(predictors.heads[task].values()))
        assert sum(p.numel() for p in head.parameters()) == n, task
        assert head.latents.shape[-2:] == ((576 if task != "gen" else 1), dims[task])


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task"):
        OLAConfig(tasks=("depth", "normals"))
    with pytest.raises(ValueError, match="token_order"):
        OLAConfig(tasks=("depth", "seg"), token_order=("depth",))
    with pytest.raises(ValueError, match="key_input"):
        OLAConfig(key_input="everything")
