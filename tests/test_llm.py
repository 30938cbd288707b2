"""Decoder LLM (llm.py) against transformers' LlamaForCausalLM / Phi3ForCausalLM.

Reference models are tiny and random, saved with `save_pretrained` (the Hub key layout, incl. Phi-3's
fused qkv_proj / gate_up_proj) and loaded with our `LLM.from_pretrained`; all comparisons at fp32.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm import LLM, LLMConfig, sample

TOL = 1e-5
PAD, BOS, EOS = 0, 1, 2
LLAMA = dict(
    vocab_size=157,
    hidden_size=96,
    intermediate_size=200,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
PHI3 = dict(
    vocab_size=131,
    hidden_size=72,
    intermediate_size=120,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=3,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    sliding_window=2047,
)
CASES = {  # name -> (reference class, config kwargs, save_pretrained kwargs)
    "llama": ("LlamaForCausalLM", LLAMA, {}),
    "llama_sharded": ("LlamaForCausalLM", LLAMA, {"max_shard_size": "60KB"}),
    # Llama-3.1 rope scaling: wavelengths 6.3 (kept), 32.5 (blended), 168+ (divided by 8) with original 64;
    # also multi-query attention (1 KV head) and a tied head
    "llama3_scaled_tied": (
        "LlamaForCausalLM",
        dict(
            LLAMA,
            hidden_size=80,
            num_attention_heads=5,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        {},
    ),
    "phi3": ("Phi3ForCausalLM", PHI3, {}),
    "phi3_window8": ("Phi3ForCausalLM", dict(PHI3, sliding_window=8), {}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (reference model, checkpoint folder, our model loaded from it)."""
    import transformers

    torch.manual_seed(0)
    out = {}
    for name, (cls_name, kw, save_kw) in CASES.items():
        cls = getattr(transformers, cls_name)
        cfg = cls.config_class(
            **kw, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, attn_implementation="eager"
        )
        ref = cls(cfg).eval()
        # O(1) activations and peaked attention (the default std 0.02 gives near-uniform attention that
        # hides mask / rope bugs), non-unit norm weights
        with torch.no_grad():
            for p in ref.parameters():
                if p.ndim == 1:
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0, p.shape[1] ** -0.5)
        path = tmp_path_factory.mktemp(name)
        ref.save_pretrained(path, **save_kw)
        out[name] = (ref, path, LLM.from_pretrained(path))
    return out


def batch(vocab, lengths, T, left=False, seed=0):
    """Random ids (B, T) and a bool mask with `lengths` real tokens per row (right or left padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    pos, n = torch.arange(T), torch.tensor(lengths)[:, None]
    mask = pos >= T - n if left else pos < n
    return ids.masked_fill(~mask, PAD), mask


def maxdiff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("padded", [False, True])
def test_parity_logits_and_every_hidden_state(models, name, padded):
    ref, path, ours = models[name]
    ids, mask = batch(ref.config.vocab_size, [24, 17] if padded else [24, 24], 24)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        o = ours(ids, attention_mask=mask, output_hidden_states=True)
    assert len(o.hidden_states) == len(r.hidden_states) == ours.config.n_layers + 1
    assert maxdiff(o.logits[mask], r.logits[mask]) <= TOL
    for k, (a, b) in enumerate(zip(o.hidden_states, r.hidden_states)):
        assert maxdiff(a[mask], b[mask]) <= TOL, f"hidden_states[{k}]"


def test_checkpoint_layouts_exercised(models):
    _, sharded, _ = models["llama_sharded"]
    shards = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 1
    assert "lm_head.weight" not in load_file(models["llama3_scaled_tied"][1] / "model.safetensors")
    assert models["llama3_scaled_tied"][2].lm_head is None
    assert "model.layers.0.self_attn.qkv_proj.weight" in load_file(models["phi3"][1] / "model.safetensors")


def test_sliding_window_is_active(models):
    """Past the window, Phi-3 W=8 differs from the same weights without a window (matching the reference)."""
    ours = models["phi3_window8"][2]
    ids, _ = batch(ours.config.vocab_size, [24], 24)
    unwindowed = LLM(dataclasses.replace(ours.config, sliding_window=None))
    unwindowed.load_state_dict(ours.state_dict())
    with torch.no_grad():
        a, b = ours(ids).logits, unwindowed(ids).logits
    assert maxdiff(a[:, :8], b[:, :8]) <= TOL and maxdiff(a[:, 8:], b[:, 8:]) > 1e-3


@pytest.mark.parametrize("name", ["llama", "llama3_scaled_tied", "phi3_window8"])
def test_kv_cache_decoding_matches_full_forward(models, name):
    """Left-padded batch: prefill 10 tokens, then decode 14 one by one (past the Phi-3 window of 8)."""
    ours = models[name][2]
    ids, mask = batch(ours.config.vocab_size, [24, 19], 24, left=True, seed=1)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits  # (B, 24, V)
        step = ours(ids[:, :10], attention_mask=mask[:, :10], use_cache=True)
        logits = [step.logits]
        for t in range(10, 24):
            step = ours(
                ids[:, t : t + 1], attention_mask=mask[:, t : t + 1], kv_cache=step.kv_cache, use_cache=True
            )
            logits.append(step.logits)
        # left padding changes nothing for the real tokens: row 1 alone, unpadded
        alone = ours(ids[1:, 5:]).logits
    assert torch.isfinite(full).all()  # padding queries (no real key) must not produce NaN
    assert maxdiff(torch.cat(logits, 1)[mask], full[mask]) <= TOL
    assert maxdiff(alone[0], full[1, 5:]) <= TOL
    assert step.kv_cache.layers[0][0].shape == (2, ours.config.n_kv_heads, 24, ours.config.head_dim)


def reference_greedy(ref, prompt, n, eos):
    ref.generation_config.eos_token_id = eos
    out = ref.generate(
        prompt[None],
        attention_mask=torch.ones_like(prompt[None]),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=PAD,
    )
    return out[0, prompt.shape[0] :]


@pytest.mark.parametrize("name", ["llama", "phi3_window8"])
def test_greedy_generate_matches_reference(models, name):
    ref, _, ours = models[name]
    ids, _ = batch(ours.config.vocab_size, [9], 9, seed=2)
    mine = ours.generate(ids, max_new_tokens=12, eos_token_ids=())
    assert mine.shape == (1, 12)
    assert torch.equal(mine[0], reference_greedy(ref, ids[0], 12, None))
    eos = int(mine[0, 4])  # stop on a token greedy produces: both must stop at its first hit
    stopped = ours.generate(ids, max_new_tokens=12, eos_token_ids=(eos,))
    assert stopped.shape[1] < 12 and torch.equal(stopped[0], reference_greedy(ref, ids[0], 12, eos))


def test_left_padded_batch_generate_matches_per_prompt_reference(models):
    ref, _, ours = models["llama"]
    ids, mask = batch(ours.config.vocab_size, [12, 7], 12, left=True, seed=3)
    prompts = [ids[i][mask[i]] for i in range(2)]
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_ids=())
    for i in range(2):
        assert torch.equal(free[i], reference_greedy(ref, prompts[i], 10, None))
    eos = int(free[0, 2])  # row 0 stops early; the rest of its row is padding
    seen = []
    out = ours.generate(
        ids, attention_mask=mask, max_new_tokens=10, eos_token_ids=(eos,), streamer=seen.append
    )
    assert torch.equal(torch.stack(seen, 1), out)
    for i in range(2):
        expect = reference_greedy(ref, prompts[i], 10, eos)
        assert torch.equal(out[i, : len(expect)], expect) and (out[i, len(expect) :] == PAD).all()


def test_inputs_embeds_logits_mask_and_generate_from_embeddings(models):
    ours = models["phi3"][2]
    ids, mask = batch(ours.config.vocab_size, [20, 13], 20)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        sel = ours(inputs_embeds=ours.embed_tokens(ids), attention_mask=mask, logits_mask=mask).logits
    assert sel.shape == (33, ours.config.vocab_size) and maxdiff(sel, full[mask]) <= TOL
    emb = ours.embed_tokens(ids[:1]).detach()
    assert torch.equal(
        ours.generate(inputs_embeds=emb, max_new_tokens=6, eos_token_ids=()),
        ours.generate(ids[:1], max_new_tokens=6, eos_token_ids=()),
    )
    with pytest.raises(ValueError, match="left padding"):
        ours.generate(ids, attention_mask=mask)


def test_sampling_respects_top_p():
    torch.manual_seed(0)
    logits = torch.tensor([[0.5, 0.3, 0.2, 1e-9]]).log().expand(400, -1)
    drawn = sample(logits, temperature=1.0, top_p=0.6)  # nucleus {0, 1}: 0.5 < 0.6 <= 0.8
    assert set(drawn.tolist()) == {0, 1}
    assert torch.equal(sample(logits, 1.0, 1e-6), logits.argmax(-1))
    assert set(sample(logits, 1.0, 1.0).tolist()) == {0, 1, 2}


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = LLM(dataclasses.replace(LLMConfig.preset("tiny"), vocab_size=97, n_layers=2)).train()
    ids, mask = batch(97, [16, 11], 16)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(ids, attention_mask=mask, logits_mask=mask).logits.logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0 and maxdiff(*grads) <= 1e-6


def test_from_pretrained_bf16(models):
    _, path, fp32 = models["llama"]
    bf16 = LLM.from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in bf16.parameters())
    ids, _ = batch(fp32.config.vocab_size, [16], 16)
    with torch.no_grad():
        a, b = fp32(ids).logits, bf16(ids).logits.float()
    assert maxdiff(a, b) <= 0.05 * a.abs().max()


# ------------------------------------------------------------------------------------ bad input
def broken_copy(src, dst, edit):
    shutil.copy(src / "config.json", dst / "config.json")
    sd = load_file(src / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing", ["missing", "layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]),
        ("extra", ["unexpected", "model.layers.0.self_attn.q_norm.weight"]),
        ("shape", ["wrong shape", "model.layers.0.self_attn.k_proj.weight", "[32, 96]", "[31, 96]"]),
        ("fused", ["model.layers.1.self_attn.qkv_proj.weight", "72 + 36 + 36"]),
    ],
)
def test_bad_checkpoint_names_the_key(models, tmp_path, case, expect):
    edits = {
        "missing": lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"),
        "extra": lambda sd: sd.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}),
        "shape": lambda sd: sd.update(
            {"model.layers.0.self_attn.k_proj.weight": sd["model.layers.0.self_attn.k_proj.weight"][:31]}
        ),
        "fused": lambda sd: sd.update(
            {"model.layers.1.self_attn.qkv_proj.weight": sd["model.layers.1.self_attn.qkv_proj.weight"][:-1]}
        ),
    }
    src = models["phi3" if case == "fused" else "llama"][1]
    with pytest.raises(ValueError) as err:
        LLM.from_pretrained(broken_copy(src, tmp_path, edits[case]))
    for text in expect:
        assert text in str(err.value)


def test_unknown_model_type(models, tmp_path):
    cfg = json.loads((models["llama"][1] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="mistral")))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'mistral' is not supported"):
        LLM.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------ configs
# The official config.json files (Hub / transformers-4 layout; values as published on the Hub).
HUB_CONFIGS = {
    "llama3-8b": (
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": 128256,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "max_position_embeddings": 8192,
            "rope_theta": 500000.0,
            "rope_scaling": None,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 128000,
            "eos_token_id": 128009,
            "torch_dtype": "bfloat16",
        },
        {"eos_token_id": [128001, 128009]},
    ),
    "phi3-mini-4k": (
        {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "vocab_size": 32064,
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "sliding_window": 2047,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 32000,
            "pad_token_id": 32000,
        },
        {"eos_token_id": [32000, 32001, 32007]},
    ),
}


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_presets_equal_official_configs(tmp_path, name):
    cfg, gen = HUB_CONFIGS[name]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    assert LLMConfig.from_json(tmp_path / "config.json") == LLMConfig.preset(name)


def test_hub_rope_scaling_layout_and_errors(tmp_path):
    cfg, _ = HUB_CONFIGS["llama3-8b"]
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }  # Llama-3.1 config.json
    f = tmp_path / "config.json"
    f.write_text(json.dumps(dict(cfg, rope_scaling=scaling)))
    c = LLMConfig.from_json(f)
    assert c.rope_theta == 500000.0 and c.rope_scaling == {
        k: v for k, v in scaling.items() if k != "rope_type"
    }
    for bad, match in [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ({"hidden_size": None}, None),
    ]:
        f.write_text(json.dumps({k: v for k, v in dict(cfg, **bad).items() if v is not None}))
        with pytest.raises(ValueError, match=match or "missing field\\(s\\) \\[.hidden_size.\\]"):
            LLMConfig.from_json(f)
