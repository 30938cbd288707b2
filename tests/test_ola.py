"""OLA-VLM model tests (issue 4): special-token spans, predictor keys, PT gradients, stages, checkpoints."""
from dataclasses import replace

import pytest
import torch

from encoders import CLIPVision, CLIPVisionConfig, TargetEncoders
from ola import (DEPTH, GEN, IMAGE, PAD, SEG, TEXT, IGNORE_INDEX, IMAGE_TOKEN_INDEX, LLM, LLMConfig, OLAConfig,
                 OLAVLM, set_trainable)

V = 97  # vocabulary of the random test LLM


def tiny_model(seed: int = 0, sources=None) -> tuple[OLAVLM, TargetEncoders]:
    torch.manual_seed(seed)
    teachers = TargetEncoders.tiny(seed=seed)
    llm = LLM(replace(LLMConfig.preset("tiny"), vocab_size=V, pad_token_id=0))
    return OLAVLM(OLAConfig(), llm, CLIPVision(CLIPVisionConfig.tiny()), teachers.dims, sources), teachers


def batch(with_image=(True, False, True), prefix=(5, 3, 7), text=(6, 9, 4), seed=0):
    """Right-padded ids with one IMAGE_TOKEN_INDEX after `prefix` tokens for image samples;
    labels on the last 3 text tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for img, p, t in zip(with_image, prefix, text):
        ids = torch.randint(1, V, (p + t,), generator=g).tolist()
        if img:
            ids.insert(p, IMAGE_TOKEN_INDEX)
        rows.append(ids)
    T = max(map(len, rows))
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, ids in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, len(ids) - 3:len(ids)] = input_ids[b, len(ids) - 3:len(ids)]
        mask[b, :len(ids)] = True
    n_img = sum(with_image)
    images = torch.randn(n_img, 3, 112, 112, generator=g)
    return input_ids, mask, labels, images, torch.tensor(with_image)


@pytest.fixture(scope="module")
def model_and_teachers():
    return tiny_model()


def test_spans_labels_and_text_only(model_and_teachers):
    model, _ = model_and_teachers
    input_ids, mask, labels, images, has_image = batch()
    embeds, attn, new_labels, seg = model.splice(input_ids, mask, labels, images)
    N, K = model.num_image_tokens, model.cfg.num_seek_tokens
    for b, (img, p) in enumerate(zip(has_image.tolist(), (5, 3, 7))):
        n_text = int(mask[b].sum()) - int(img)
        if not img:  # text-only: no image, no special tokens, labels unchanged
            assert not torch.isin(seg[b], torch.tensor([IMAGE, GEN, DEPTH, SEG])).any()
            assert torch.equal(new_labels[b, :n_text], labels[b, :n_text])
            continue
        # SPEC §1: <sys> (p tokens) | <img> (N) | <g> x8 | <d> x8 | <s> x8 | <txt>
        expect = [TEXT] * p + [IMAGE] * N + [GEN] * K + [DEPTH] * K + [SEG] * K + [TEXT] * (n_text - p)
        assert seg[b, :len(expect)].tolist() == expect
        assert (seg[b, len(expect):] == PAD).all() and attn[b].sum() == len(expect)
        assert (new_labels[b, p:p + N + 3 * K] == IGNORE_INDEX).all()
        assert torch.equal(new_labels[b, p + N + 3 * K:len(expect)], labels[b, p + 1:n_text + 1])
        # the inserted embeddings are the projected image features and the pooled query chunks
        assert torch.allclose(embeds[b, p + N + K:p + N + 2 * K], model.tokens("depth"), atol=1e-6)
        assert torch.allclose(embeds[b, p + N:p + N + K], model.tokens.gen, atol=1e-6)
    assert model.tokens("seg").shape == (K, model.llm.config.hidden_size)
    assert torch.allclose(model.tokens("seg")[1], model.tokens.seg[N // K:2 * N // K].mean(0))


@pytest.mark.parametrize("task", ["depth", "seg", "gen"])
def test_predictor_keys_ignore_other_tasks_tokens(model_and_teachers, task):
    model, _ = model_and_teachers
    input_ids, mask, labels, images, _ = batch()
    _, _, _, seg = model.splice(input_ids, mask, labels, images)
    H = model.llm.config.hidden_size
    hidden = torch.randn(*seg.shape, H)
    layer = model.predictors.layer_sets[task][0]
    predict = lambda h: model.predictors.predict(task, layer, h, seg, model.tokens)
    base = predict(hidden)
    own, = [code for t, code in (("depth", DEPTH), ("seg", SEG), ("gen", GEN)) if t == task]
    for code in (DEPTH, SEG, GEN, PAD):
        changed = hidden.clone()
        changed[seg == code] += 10 * torch.randn_like(changed[seg == code])
        same = torch.allclose(predict(changed), base, atol=1e-6)
        assert same == (code != own), f"{task} predictor vs segment {code}"
    changed = hidden.clone()
    changed[seg == TEXT] += 1.0
    assert not torch.allclose(predict(changed), base, atol=1e-6)  # text is a key


def test_pt_step_gradients(model_and_teachers):
    model, teachers = model_and_teachers
    set_trainable(model, "pt")
    input_ids, mask, labels, images, has_image = batch()
    pixels = {t: torch.randn(int(has_image.sum()), 3, s, s)
              for t, s in (("depth", 112), ("seg", 256), ("gen", 56))}
    targets = teachers(pixels)
    model.zero_grad(set_to_none=True)
    out = model(input_ids, mask, labels, images, has_image, targets)
    out.loss.backward()
    assert out.terms["emb"] > 0 and out.terms["ntp"] > 0
    expected_terms = {f"{t}@{l}/{k}" for t, ls in model.predictors.layer_sets.items() for l in ls for k in ("sl1", "con")}
    assert expected_terms <= set(out.terms)
    nonzero = lambda p: p.grad is not None and p.grad.abs().sum() > 0
    for name, p in model.predictors.named_parameters():
        assert nonzero(p), f"predictor parameter {name} got no gradient"
    for name in ("depth", "seg", "gen"):
        assert nonzero(getattr(model.tokens, name)), f"special tokens {name}"
    assert all(nonzero(p) for p in model.projector.parameters())
    assert all(nonzero(model.predictors.logit_scales[t]) for t in ("depth", "seg", "gen"))
    frozen = list(model.llm.parameters()) + list(model.vision.parameters()) + list(teachers.parameters())
    assert all(p.grad is None and not p.requires_grad for p in frozen)


def test_ift_stage_drops_predictors_and_freezes_tokens():
    model, _ = tiny_model(1)
    counts = set_trainable(model, "ift")
    assert model.predictors is None and "predictors" not in counts
    assert not any(p.requires_grad for p in model.tokens.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.llm.parameters())
    input_ids, mask, labels, images, has_image = batch()
    out = model(input_ids, mask, labels, images, has_image)  # tokens are still inserted
    assert set(out.terms) == {"ntp"} and (out.segments == GEN).sum() == 2 * model.cfg.num_seek_tokens


def test_layer_sets_scale_with_depth():
    cfg = OLAConfig()
    assert cfg.layer_set("depth", 32) == (8, 20) and cfg.layer_set("seg", 32) == (10, 18)
    assert cfg.layer_set("gen", 32) == (12, 20)
    assert cfg.layer_set("depth", 8) == (2, 5) and cfg.layer_set("gen", 16) == (6, 10)


def test_pt_checkpoint_stores_only_trained_parts_and_round_trips(tmp_path):
    """With base weights in folders (official layouts), a PT checkpoint holds only the projector,
    the special tokens and the predictors, and reloads to identical outputs."""
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2)).eval()
    ref.save_pretrained(tmp_path / "llm")
    vc = CLIPVisionConfig.tiny()
    clip = CLIPModel(CLIPConfig(vision_config=dict(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                                                   num_hidden_layers=vc.n_layers, num_attention_heads=vc.n_heads,
                                                   image_size=vc.image_size, patch_size=vc.patch_size),
                                text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2), projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    torch.manual_seed(0)
    teachers = TargetEncoders.tiny(seed=0)
    llm = LLM.from_pretrained(tmp_path / "llm")
    vision = CLIPVision.from_pretrained(tmp_path / "clip")
    model = OLAVLM(OLAConfig(), llm, vision, teachers.dims,
                   {"llm": str(tmp_path / "llm"), "vision": str(tmp_path / "clip")})
    model.save(tmp_path / "pt", ("projector", "tokens", "predictors"))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "pt" / "model.safetensors"), "pt") as f:
        stored = {k.split(".")[0] for k in f.keys()}
    assert stored == {"projector", "tokens", "predictors"}
    again = OLAVLM.from_checkpoint(tmp_path / "pt")
    input_ids, mask, labels, images, has_image = batch()
    pixels = {t: torch.randn(int(has_image.sum()), 3, s, s) for t, s in (("depth", 112), ("seg", 256), ("gen", 56))}
    targets = teachers(pixels)
    a = model(input_ids, mask, labels, images, has_image, targets)
    b = again(input_ids, mask, labels, images, has_image, targets)
    assert torch.equal(a.loss, b.loss)
    with pytest.raises(ValueError, match="predictors"):
        bad = tmp_path / "pt" / "model.safetensors"
        from safetensors.torch import load_file, save_file
        sd = load_file(str(bad))
        sd.pop(next(k for k in sd if k.startswith("predictors.")))
        save_file(sd, str(bad))
        OLAVLM.from_checkpoint(tmp_path / "pt")


def test_generate_appends_answer_tokens(model_and_teachers):
    model, _ = model_and_teachers
    model.eval()
    input_ids, mask, _, images, has_image = batch()
    out = model.generate(input_ids, mask, images, max_new_tokens=4)
    assert out.shape == (3, 4) and out.dtype == torch.long
    # batched generation equals one-by-one generation (left padding after the splice)
    first = model.generate(input_ids[:1, :int(mask[0].sum())], mask[:1, :int(mask[0].sum())], images[:1],
                           max_new_tokens=4)
    assert torch.equal(out[:1], first)


def test_real_size_predictor_and_token_counts():
    """Llama-3-8B sizes on the meta device: per-layer predictor sizes equal the hand counts of the
    released heads (reference §2.2: depth 62.95M incl. its 3 unused-by-us 1024-d MLPs of 6.30M,
    seg 14.17M, gen 7.87M) and the special tokens are 2·576·4096 + 8·4096."""
    from ola import EmbeddingPredictors, SeekTokens
    with torch.device("meta"):
        predictors = EmbeddingPredictors(OLAConfig(), 4096, 32, {"depth": 1024, "seg": 1536, "gen": 1024})
        tokens = SeekTokens(576, 4096, 8)
    count = lambda m: sum(p.numel() for p in m.parameters())
    mlps = 3 * (2 * 1024 * 1024 + 2 * 1024)
    assert count(predictors.heads["depth"]["8"]) == 62_952_448 - mlps == 56_654_848
    assert count(predictors.heads["seg"]["10"]) == 14_171_136
    assert count(predictors.heads["gen"]["12"]) == 7_874_560
    assert {t: sorted(map(int, predictors.heads[t])) for t in predictors.heads} == \
        {"depth": [8, 20], "seg": [10, 18], "gen": [12, 20]}
    assert count(tokens) == 2 * 576 * 4096 + 8 * 4096
