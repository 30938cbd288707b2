"""Probing (Sec. 3): the probes learn what the hidden states hold and nothing else;
the MLLM feature path (one frozen forward per batch) and the probing targets."""

import pytest
import torch
from conftest import teacher_pixels, tiny_ola

import shapes
from probe import (
    PROMPT,
    MLLMFeatures,
    ProbeBatch,
    ProbeConfig,
    Probes,
    builtin_images,
    evaluate,
    train_probes,
)
from tokenizer import ChatTokenizer

H, D_CONTENT, N_TEXT, N_IMG, C = 32, 16, 4, 16, 64
BATCH = 32


def synthetic(n: int, g: torch.Generator, pos: torch.Tensor, maps: dict, related: bool) -> list[ProbeBatch]:
    """Hidden states of 3 "layers": [0] zeros, [1] = cat(content, positional code), [2] fresh noise.
    Targets: a fixed linear map of layer 1's content (depth-like: per image token; gen-like: of the
    mean over tokens), or, when not `related`, offset noise drawn independently of everything."""
    T = N_TEXT + N_IMG
    content = torch.randn(n, T, D_CONTENT, generator=g)
    layer1 = torch.cat([content, pos.expand(n, -1, -1)], -1)  # (n, T, H)
    hidden = (torch.zeros(n, T, H), layer1, torch.randn(n, T, H, generator=g))
    if related:
        targets = {
            "depth": content[:, N_TEXT:] @ maps["depth"],  # (n, 16, C)
            "gen": content.mean(1, keepdim=True) @ maps["gen"],
        }  # (n, 1, C)
    else:  # trivial level = cosine of the constant mean (0.7 everywhere) with held-out targets, ~0.57
        targets = {
            "depth": 0.7 + torch.randn(n, N_IMG, C, generator=g),
            "gen": 0.7 + torch.randn(n, 1, C, generator=g),
        }
    mask = torch.ones(n, T, dtype=torch.bool)
    b = BATCH
    return [
        ProbeBatch(
            tuple(h[i : i + b] for h in hidden),
            mask[i : i + b],
            {t: y[i : i + b] for t, y in targets.items()},
        )
        for i in range(0, n, b)
    ]


def run(related: bool, layers: list[int], epochs: int):
    g = torch.Generator().manual_seed(0)
    pos = 3 * torch.randn(N_TEXT + N_IMG, H - D_CONTENT, generator=g)  # lets query q find image token q
    maps = {t: torch.randn(D_CONTENT, C, generator=g) / D_CONTENT**0.5 for t in ("depth", "gen")}
    train, val = synthetic(512, g, pos, maps, related), synthetic(128, g, pos, maps, related)
    torch.manual_seed(0)
    probes = Probes(H, layers, {"depth": (N_IMG, C), "gen": (1, C)})
    mean_targets = train_probes(probes, train, ProbeConfig(lr=1e-2, batch_size=BATCH, epochs=epochs))
    return evaluate(probes, val, mean_targets)


def test_probe_recovers_a_linear_map_of_the_hidden_states():
    scores, trivial = run(related=True, layers=[1, 2], epochs=30)
    for t in ("depth", "gen"):
        assert trivial[t] < 0.1  # zero-mean targets: predicting the mean gets ~0
        assert scores[t][1] > 0.9, scores  # layer 1 holds the targets linearly
        assert scores[t][2] < 0.15, scores  # layer 2 (noise, trained jointly) holds nothing


def test_probe_stays_at_trivial_level_for_unrelated_targets():
    """Targets independent of the input: the best any probe can do on held-out images is the
    constant mean-target predictor. The probes must get there and not beyond it."""
    scores, trivial = run(related=False, layers=[1], epochs=15)
    for t in ("depth", "gen"):
        assert 0.5 < trivial[t] < 0.65
        assert trivial[t] - 0.05 < scores[t][1] < trivial[t] + 0.01, (t, scores, trivial)


# ----------------------------------------------------------------------------- the MLLM path
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = shapes.builtin_dataset(tmp_path_factory.mktemp("b") / "builtin", n_pt=6, n_ift=4, n_val=4)
    tok = ChatTokenizer(paths["tokenizer"], "llama3")
    special = dict(eos_token_ids=tok.eos_ids, pad_token_id=tok.pad_id)
    model, teachers = tiny_ola(vocab=tok.vocab_size, n_layers=4, **special)
    model.predictors = None
    model.requires_grad_(False).eval()
    return paths, tok, model, teachers


def test_mllm_features_and_probe_pipeline(tiny):
    paths, tok, model, teachers = tiny
    train_paths, val_paths = builtin_images(paths, "train"), builtin_images(paths, "val")
    assert len(train_paths) == 10 and len(val_paths) == 4  # 6 PT + 4 IFT images; the QA images held out
    assert len(set(train_paths)) == 10 and not set(train_paths) & set(val_paths)
    feats = MLLMFeatures(
        model, tok, teachers, val_paths, ["depth", "seg", "gen"], batch_size=3, shuffle=False
    )
    batches = list(feats)
    assert len(batches) == len(feats) == 2
    b = batches[0]
    ids = tok.encode_conversation([{"from": "human", "value": PROMPT}], with_image=True)[0]
    T = len(ids) - 1 + model.image_seq_len  # the placeholder becomes 64 image + 24 task tokens
    assert len(b.hidden_states) == model.llm.config.n_layers + 1
    assert b.hidden_states[1].shape == (3, T, model.llm.config.hidden_size) and b.key_mask.all()
    N = model.num_image_tokens
    dims = teachers.dims
    assert {t: tuple(y.shape) for t, y in b.targets.items()} == {
        "depth": (3, N, dims["depth"]),
        "seg": (3, N, dims["seg"]),
        "gen": (3, 1, dims["gen"]),
    }
    target_shapes = {t: tuple(y.shape[1:]) for t, y in b.targets.items()}
    probes = Probes(model.llm.config.hidden_size, [1, 2, 3, 4], target_shapes)
    train_probes(probes, batches, ProbeConfig(epochs=1))
    scores, _ = evaluate(probes, batches)
    assert set(scores) == {"depth", "seg", "gen"} and all(list(s) == [1, 2, 3, 4] for s in scores.values())
    assert all(-1 <= v <= 1 for s in scores.values() for v in s.values())


def test_depth_probe_target_is_the_last_dinov2_block(tiny):
    *_, teachers = tiny
    x = teacher_pixels(teachers, 2)
    y = teachers.probe_targets(x)
    dinov2 = teachers.teachers["depth"].encoder
    last = dinov2.config.n_layers - 1
    expected = dinov2.intermediate_layers(x["depth"], [last])[0]  # the last block, final-normed
    torch.testing.assert_close(y["depth"], expected, rtol=0, atol=0)
    assert not torch.allclose(y["depth"], teachers(x)["depth"])  # not the PT mean of 4 blocks
    assert torch.equal(y["seg"], teachers(x)["seg"]) and torch.equal(y["gen"], teachers(x)["gen"])
