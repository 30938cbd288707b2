"""released.py: the authors' released OLA-VLM folders, and the real config.json files of the official
checkpoints (tests/fixtures/).

- Tiny folders in the released layout (names as in tests/fixtures/released/keys_*.json, written by the
  rename rules of THIS file, not by released.py; teacher leftovers; a vocabulary with one added `<pad>` row,
  as the Llama-3 ones have 128,257) give the logits and PT predictions of the same weights loaded through
  our own checkpoint format, for Llama-3 + CLIP (IFT, PT), Phi-3 (fused q|k|v, gate|up) and ConvNeXt.
- The full-size key lists of the IFT and PT checkpoints plan on the meta device: every key used or skipped.
- Every real config.json parses into its published sizes and its model builds on the meta device with the
  parameter count of the transformers model of the same config."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TOL, maxdiff, randomize
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer

import released
from checkpoint import from_checkpoint, save_checkpoint, stored_config
from convnext import ConvNeXt, ConvNeXtConfig
from encoders import CLIPVision, CLIPVisionConfig, DINOv2, DINOv2Config
from inference import answer, load_model
from llm import LLM, LLMConfig
from ola import OLAVLM, OLAConfig
from released import from_released
from swin import Swin, SwinConfig
from tokenizer import IMAGE_TOKEN_INDEX, train_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
KEYS = {
    "ift": FIXTURES / "released" / "keys_ift_OLA-VLM-CLIP-ViT-Llama3-8b.json",
    "pt": FIXTURES / "released" / "keys_pt_pretrain_dsg_OLA-VLM-CLIP-ViT-Llama3-8b.json",
}
LEFTOVERS = ("oneformer.", "da_v2_head.")
V = "model.vision_tower.vision_tower."
DIMS = {"depth": 32, "seg": 48, "gen": 24}  # the tiny predictors' target widths
LAYERS = {
    "depth": "2-5",
    "seg": "3-5",
    "gen": "3-5",
}  # Tab. 3's sets on an 8-layer LLM, as released writes them

# ours (regex) -> released, written from the published key lists; predictor heads are renamed in released_key
RENAMES = [
    (r"llm\.embed_tokens\.", "model.embed_tokens."),
    (r"llm\.layers\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"llm\.layers\.(\d+)\.attn\.(\w)_proj\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"llm\.layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"llm\.layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
    (r"llm\.norm\.", "model.norm."),
    (r"llm\.lm_head\.", "lm_head."),
    (r"projector\.", "model.mm_projector."),
    (r"tokens\.q_(depth|seg)$", r"model.special_\1_tokens"),
    (r"tokens\.gen_tokens$", "model.special_gen_tokens"),
    (r"vision\.class_embedding$", V + "vision_model.embeddings.class_embedding"),
    (r"vision\.patch_embed\.", V + "vision_model.embeddings.patch_embedding."),
    (r"vision\.pos_embed$", V + "vision_model.embeddings.position_embedding.weight"),
    (r"vision\.pre_norm\.", V + "vision_model.pre_layrnorm."),
    (r"vision\.post_norm\.", V + "vision_model.post_layernorm."),
    (r"vision\.blocks\.(\d+)\.norm(\d)\.", V + r"vision_model.encoder.layers.\1.layer_norm\2."),
    (r"vision\.blocks\.(\d+)\.(fc\d)\.", V + r"vision_model.encoder.layers.\1.mlp.\2."),
    (r"vision\.blocks\.(\d+)\.attn\.(q|k|v)\.", V + r"vision_model.encoder.layers.\1.self_attn.\2_proj."),
    (r"vision\.blocks\.(\d+)\.attn\.o\.", V + r"vision_model.encoder.layers.\1.self_attn.out_proj."),
    (r"vision\.(stem|stages)\.", V + r"\1."),  # ConvNeXt: the timm trunk names
    (r"predictors\.logit_scales\.(\w+)$", r"\1_logit_scale"),
]
HEAD = [  # inside a predictor: ours -> the released Perceiver's
    (r"layers\.(\d+)\.attn\.norm_keys\.", r"layers.\1.0.norm1."),
    (r"layers\.(\d+)\.attn\.norm_latents\.", r"layers.\1.0.norm2."),
    (r"layers\.(\d+)\.attn\.", r"layers.\1.0."),
    (r"layers\.(\d+)\.ff\.", r"layers.\1.1."),
]


def released_key(key: str) -> str:
    head = re.match(r"predictors\.heads\.(\w+)\.(\d+)\.(.*)", key)
    if head:
        task, layer, rest = head.groups()
        k = [int(x) for x in LAYERS[task].split("-")].index(int(layer))
        for pattern, repl in HEAD:
            rest = re.sub("^" + pattern, repl, rest)
        return f"image_{task}_heads.{k}.projector.{rest}"
    for pattern, repl in RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    raise KeyError(key)


def pattern(key: str) -> str:
    return re.sub(r"\.\d+(?=\.)", ".N", key)


# ----------------------------------------------------------------------------- tiny released folders
VARIANTS = {  # name: (LLM, tower, stage)
    "llama3-clip-ift": ("llama", "clip", "ift"),
    "llama3-clip-pt": ("llama", "clip", "pt"),
    "phi3-clip-ift": ("phi3", "clip", "ift"),
    "llama3-convnext-ift": ("llama", "convnext", "ift"),
}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A tiny Llama-3-style tokenizer plus an added <pad>, as the released Llama-3 tokenizer has."""
    texts = ["a red circle and a blue square", "what is in the image?"] * 4
    path = train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer.json", 300)
    tok = Tokenizer.from_file(str(path))
    tok.add_special_tokens(["<pad>"])
    tok.save(str(path))
    return path


def tiny_model(variant: str, vocab: int) -> OLAVLM:
    """Our tiny OLA-VLM of a variant, random; 64-d CLIP heads (the released config names no head count)."""
    kind, tower, stage = VARIANTS[variant]
    llm = replace(LLMConfig.preset("tiny"), vocab_size=vocab, hidden_size=128, n_heads=4, n_kv_heads=2)
    if kind == "phi3":
        llm = replace(llm, model_type="phi3", rope_theta=10000.0, sliding_window=16, n_kv_heads=4)
    torch.manual_seed(0)
    if tower == "clip":
        vision = CLIPVision(replace(CLIPVisionConfig.tiny(), hidden_size=128, n_heads=2, n_layers=2))
    else:
        vision = ConvNeXt(ConvNeXtConfig.tiny())
    cfg = OLAConfig(tasks=("gen", "depth", "seg"))
    return randomize(OLAVLM(cfg, LLM(llm), vision, DIMS if stage == "pt" else None), seed=1)


def released_config(variant: str, model: OLAVLM) -> dict:
    kind, tower, stage = VARIANTS[variant]
    c = model.llm.config
    arch = {"llama": "LlavaLlamaForCausalLM", "phi3": "LlavaPhi3ForCausalLM"}[kind]
    config = {
        "architectures": ["Ola" + arch if stage == "pt" else arch],
        "model_type": ("ola_" if stage == "pt" else "llava_") + kind,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": False,
        "aux_mode": "gen-depth-seg",
        "num_task_tokens": 8,
        "contrastive_loss_weight": 0.3,
        "image_aspect_ratio": "pad",
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336" if tower == "clip" else "convnext-res256",
        "mm_hidden_size": model.vision.width,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
    }
    if kind == "phi3":
        config["sliding_window"] = c.sliding_window
    for task, section in (("depth", "image_depth"), ("seg", "image_seg"), ("gen", "image_gen")):
        prefix = {"depth": "depth", "seg": "seg", "gen": "img"}[task]
        config[section] = {f"{prefix}_layer_indices": LAYERS[task], f"{prefix}_loss_weight": 0.5}
        config[section].update(depth=1, dim_head=32, num_heads=4, ff_mult=1, output_dim=DIMS[task])
    return config


def write_released(folder: Path, state: dict, config: dict) -> Path:
    """Two safetensors shards + model.safetensors.index.json + config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k].contiguous() for k in part}, folder / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def released_state(model: OLAVLM, kind: str) -> dict[str, torch.Tensor]:
    state = {released_key(k): v.clone() for k, v in model.state_dict().items()}
    if kind == "phi3":  # Phi-3 fuses q|k|v and gate|up
        for i in range(model.llm.config.n_layers):
            p = f"model.layers.{i}."
            q, k, v = (state.pop(f"{p}self_attn.{x}_proj.weight") for x in "qkv")
            state[p + "self_attn.qkv_proj.weight"] = torch.cat([q, k, v])
            gate, up = (state.pop(f"{p}mlp.{x}_proj.weight") for x in ("gate", "up"))
            state[p + "mlp.gate_up_proj.weight"] = torch.cat([gate, up])
    real = json.loads(KEYS["pt"].read_text())  # a few real leftover names (their shapes do not matter)
    for key in [k for k in real if k.startswith("oneformer.")][:5] + [
        k for k in real if k.startswith("da_v2")
    ][:3]:
        state[key] = torch.randn(3, 2)
    return state


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer_json):
    """variant -> (its folder in our format, the same weights in the released layout), made once."""
    made = {}

    def make(variant: str) -> tuple[Path, Path]:
        if variant not in made:
            vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(with_added_tokens=True)
            model = tiny_model(variant, vocab)
            root = tmp_path_factory.mktemp(variant)
            save_checkpoint(model, root / "ours", components=("projector", "tokens", "predictors"))
            state = released_state(model, VARIANTS[variant][0])
            folder = write_released(root / "released", state, released_config(variant, model))
            (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
            made[variant] = root / "ours", folder
        return made[variant]

    return make


def batch(model: OLAVLM, seed: int = 0):
    """Right-padded ids of 3 samples (2 with an image), their mask and images."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.llm.config.vocab_size
    rows = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (9, 14, 6)]
    rows[0].insert(4, IMAGE_TOKEN_INDEX)
    rows[2].insert(2, IMAGE_TOKEN_INDEX)
    ids = torch.zeros(3, max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), True
    size = model.vision.image_size
    return ids, mask, torch.randn(2, 3, size, size, generator=g)


def logits(model: OLAVLM, ids, mask, images) -> torch.Tensor:
    embeds, attn, _, _ = model.splice(ids, mask, images=images)
    return model.llm(inputs_embeds=embeds, attention_mask=attn).logits  # (B, T', V)


def test_tiny_folder_has_the_released_key_names():
    """The rename rules above write the names of the published PT key list (numbers aside)."""
    real = {pattern(k) for k in json.loads(KEYS["pt"].read_text()) if not k.startswith(LEFTOVERS)}
    model = tiny_model("llama3-clip-pt", 301)
    assert {pattern(released_key(k)) for k in model.state_dict()} == real


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_released_folder_gives_the_logits_of_our_checkpoint(folders, variant):
    ours, folder = folders(variant)
    a = from_checkpoint(ours)
    b = from_released(folder)
    ids, mask, images = batch(a)
    with torch.no_grad():
        diff = maxdiff(logits(a, ids, mask, images), logits(b, ids, mask, images))
    assert diff <= TOL, f"{variant}: max |logits diff| {diff}"
    assert b.llm.config.vocab_size == a.llm.config.vocab_size == 301  # 300 tokens + the added <pad> row
    assert b.cfg.token_order == ("gen", "depth", "seg") and b.cfg.num_seek_tokens == 8
    assert [b.cfg.layer_set(t, 8) for t in ("depth", "seg", "gen")] == [(2, 5), (3, 5), (3, 5)]
    assert b.released.stage == VARIANTS[variant][2]
    assert (b.predictors is None) == (VARIANTS[variant][2] == "ift")


def test_released_pt_folder_gives_our_predictions_and_loss(folders):
    ours, folder = folders("llama3-clip-pt")
    a, b = from_checkpoint(ours), from_checkpoint(folder)  # from_checkpoint dispatches
    ids, mask, images = batch(a, seed=1)
    labels = torch.where(mask, ids, -100)
    g = torch.Generator().manual_seed(2)
    targets = {t: torch.randn(2, 64 if t != "gen" else 1, c, generator=g) for t, c in DIMS.items()}
    has_image = torch.tensor([True, False, True])
    with torch.no_grad():
        out_a, out_b = (m(ids, mask, labels, images, has_image, targets) for m in (a, b))
    assert sorted(out_a.predictions) == sorted(out_b.predictions) and len(out_a.predictions) == 6
    for key, pred in out_a.predictions.items():
        assert maxdiff(pred, out_b.predictions[key]) <= TOL, key
    assert abs(out_a.loss.item() - out_b.loss.item()) <= TOL


@pytest.mark.parametrize("variant", ["llama3-clip-ift", "llama3-clip-pt", "llama3-convnext-ift"])
def test_load_model_reads_a_released_folder_and_its_tokenizer(folders, variant):
    ours, folder = folders(variant)
    model, tok = load_model(folder)  # the folder's own tokenizer.json (with <pad>)
    reference, _ = load_model(ours, tokenizer=folder / "tokenizer.json")
    assert tok.vocab_size == 301 and model.predictors is None
    images = [model.vision.preprocess(Image.new("RGB", (40, 30), (200, 30, 30)))]
    assert answer(model, tok, ["what is in the image?"], images, 6) == answer(
        reference, tok, ["what is in the image?"], images, 6
    )


def test_bf16_is_loaded_as_stored_or_cast_on_request(tmp_path):
    model = tiny_model("llama3-clip-pt", 301)
    state = {k: v.bfloat16() for k, v in released_state(model, "llama").items()}
    folder = write_released(tmp_path / "bf16", state, released_config("llama3-clip-pt", model))
    stored = from_released(folder)
    assert {p.dtype for p in stored.parameters()} == {torch.bfloat16}
    cast = from_released(folder, dtype=torch.float32)
    assert {p.dtype for p in cast.parameters()} == {torch.float32}
    for ours, theirs in (
        ("llm.embed_tokens.weight", "model.embed_tokens.weight"),
        ("tokens.q_seg", "model.special_seg_tokens"),
    ):
        assert torch.equal(cast.state_dict()[ours], state[theirs].float())


def test_every_problem_is_named_with_file_key_and_shape(tmp_path):
    model = tiny_model("llama3-clip-ift", 301)
    state = released_state(model, "llama")
    del state["model.layers.3.mlp.up_proj.weight"]
    state["model.mm_projector.0.weight"] = torch.zeros(128, 7)
    state["model.image_newline"] = torch.zeros(128)
    folder = write_released(tmp_path / "bad", state, released_config("llama3-clip-ift", model))
    with pytest.raises(ValueError) as e:
        from_released(folder)
    msg = str(e.value)
    assert "3 problems" in msg
    assert re.search(r"missing +model\.layers\.3\.mlp\.up_proj\.weight .*expected \[256, 128\]", msg)
    assert re.search(
        r"wrong shape model\.mm_projector\.0\.weight in .*model-0000\d-of-00002\.safetensors: "
        r"expected \[128, 128\], found \[128, 7\]",
        msg,
    )
    assert re.search(r"unexpected +model\.image_newline in .*\.safetensors: found \[128\]", msg)
    assert "oneformer" not in msg and "da_v2_head" not in msg  # leftovers are skipped by rule


# ----------------------------------------------------------------------------- config fields
def full_config(stage: str) -> dict:
    """The released config.json of OLA-VLM-CLIP-ViT-Llama3-8b as far as it is known: the Llama-3 fields (its
    LLM's config.json), the published leading part, and the fields the README names (seg's indices key is
    assumed to be seg_layer_indices, like depth's and gen's)."""
    config = json.loads(
        (FIXTURES / "configs" / "meta-llama_Meta-Llama-3-8B-Instruct" / "config.json").read_text()
    )
    partial = json.loads(
        (FIXTURES / "released" / "config_partial_OLA-VLM-CLIP-ViT-Llama3-8b.json").read_text()
    )
    config.update({k: v for k, v in partial.items() if not k.startswith(("_", "image_seg"))})
    config["image_seg"] = {"seg_layer_indices": "10-18", "seg_loss_weight": 0.5, "depth": 1, "dim_head": 32}
    config["image_seg"].update(ff_mult=1, num_heads=4, num_tokens=576, output_dim=1536)
    config.update(num_task_tokens=8, mm_vision_select_layer=-2, mm_projector_type="mlp2x_gelu")
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    config["architectures"] = ["OlaLlavaLlamaForCausalLM" if stage == "pt" else "LlavaLlamaForCausalLM"]
    return config


def plan(stage: str, with_predictors: bool = True, edit=lambda shapes: shapes):
    shapes = edit({k: tuple(v) for k, v in json.loads(KEYS[stage].read_text()).items()})
    rc = released.parse_config(full_config(stage), shapes)
    model = released.build_model(rc, with_predictors)
    return shapes, model, *released.key_plan(model, rc.layers, shapes, KEYS[stage].name)


@pytest.mark.parametrize("stage", ["ift", "pt"])
def test_full_size_key_lists_plan_on_the_meta_device(stage):
    shapes, model, used, skipped = plan(stage)
    assert set(used) | set(skipped) == set(shapes) and not set(used) & set(skipped)
    assert set(skipped) == {k for k in shapes if k.startswith(LEFTOVERS)}
    assert len(used) == {"ift": 689, "pt": 794}[stage] and len(skipped) == {"ift": 0, "pt": 802 + 64}[stage]
    numel = sum(torch.Size(shapes[k]).numel() for k in used)
    assert numel == sum(p.numel() for p in model.parameters())  # every tensor of ours once, with its shape
    if stage == "ift":
        assert numel == 8_359_507_968  # the README's 8.360 B (33.4 GB in fp32)
    assert model.llm.config.vocab_size == 128_257 and model.num_image_tokens == 576
    assert model.cfg.token_order == ("gen", "depth", "seg")
    assert [model.cfg.layer_set(t, 32) for t in ("depth", "seg", "gen")] == [(8, 20), (10, 18), (12, 20)]


def test_full_size_pt_without_predictors_skips_them_by_rule():
    shapes, model, used, skipped = plan("pt", with_predictors=False)
    assert model.predictors is None and len(used) == 689
    assert sum("not asked for" in r for r in skipped.values()) == 6 * 17 + 3


def test_full_size_shape_mismatch_names_key_and_expected_shape():
    def edit(shapes):
        shapes["model.special_seg_tokens"] = (575, 4096)
        return shapes

    with pytest.raises(
        ValueError, match=r"wrong shape model\.special_seg_tokens in .*: expected \[576, 4096\]"
    ):
        plan("ift", edit=edit)


def test_config_fields_map_to_ours():
    shapes = {k: tuple(v) for k, v in json.loads(KEYS["ift"].read_text()).items()}
    config = full_config("ift")
    config.update(aux_mode="depth-seg-gen", mm_vision_select_layer=-1, image_aspect_ratio="pad")
    config["image_depth"]["depth_layer_indices"] = "20-8"
    rc = released.parse_config(config, shapes)
    assert rc.ola.token_order == ("depth", "seg", "gen") and rc.vision.select_layer == -1
    assert rc.layers["depth"] == (20, 8) and rc.ola.layer_set("depth", 32) == (8, 20)  # a list, not a range
    assert rc.llm.vocab_size == 128_257 and rc.llm.eos_token_ids == (128009,) and rc.vision_kind == "clip"
    assert rc.ola.task_weights == {"depth": 0.5, "seg": 0.5, "gen": 0.5} and rc.stage == "ift"
    for field, value, error in (
        ("image_aspect_ratio", "anyres", "image_aspect_ratio"),
        ("mm_projector_type", "linear", "mm_projector_type"),
        ("architectures", ["LlamaForCausalLM"], "not a released OLA-VLM"),
    ):
        with pytest.raises(ValueError, match=error):
            released.parse_config({**config, field: value}, shapes)
    config["image_depth"]["depth_layer_indices"] = "8-33"
    with pytest.raises(ValueError, match=r"image_depth: layer indices '8-33' must lie in 1\.\.32"):
        released.parse_config(config, shapes)


# ----------------------------------------------------------------------------- the real config files
CONFIGS = FIXTURES / "configs"


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(build):
    with torch.device("meta"):
        return build()


@pytest.mark.parametrize(
    "repo, sizes",
    [
        ("meta-llama_Meta-Llama-3-8B-Instruct", (4096, 14336, 32, 32, 8, 128256, 500000.0, None)),
        ("microsoft_Phi-3-mini-4k-instruct", (3072, 8192, 32, 32, 32, 32064, 10000.0, 2047)),
    ],
)
def test_real_llm_configs(tf, repo, sizes):
    c = LLMConfig.from_json(CONFIGS / repo / "config.json")
    got = (
        c.hidden_size,
        c.intermediate_size,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.vocab_size,
        c.rope_theta,
    )
    assert (*got, c.sliding_window) == sizes
    eos = json.loads((CONFIGS / repo / "generation_config.json").read_text())["eos_token_id"]
    assert set(eos) <= set(c.eos_token_ids)  # e.g. Llama-3's <|eot_id|> 128009, Phi-3's <|end|> 32007
    hf_cls = tf.LlamaForCausalLM if c.model_type == "llama" else tf.Phi3ForCausalLM
    hf_config = tf.AutoConfig.from_pretrained(CONFIGS / repo)
    assert count(on_meta(lambda: LLM(c))) == count(on_meta(lambda: hf_cls(hf_config)))


@pytest.mark.parametrize(
    "file, projection",
    [
        ("openai_clip-vit-large-patch14-336/config_compact_resave.json", 768),
        ("openai_clip-vit-large-patch14-336/config_legacy_layout_RECONSTRUCTED.json", 768),
        ("openai_clip-vit-large-patch14-336/config_vision_only_llava_style.json", None),
        ("stabilityai_stable-diffusion-2-1-unclip/image_encoder/config.json", 1024),
    ],
)
def test_real_clip_configs(tf, file, projection):
    raw = json.loads((CONFIGS / file).read_text())
    c = CLIPVisionConfig.from_json(raw)
    unclip = "unclip" in file
    want = (224, 1280, 5120, 32, "gelu") if unclip else (336, 1024, 4096, 24, "quick_gelu")
    assert (c.image_size, c.hidden_size, c.intermediate_size, c.n_layers, c.hidden_act) == want
    assert (c.patch_size, c.n_heads, c.projection_dim) == (14, 16, projection)
    ours = on_meta(lambda: CLIPVision(c))
    assert ours.num_tokens == (256 if unclip else 576)
    vision = tf.CLIPVisionConfig(**{**raw.get("vision_config", raw), "projection_dim": projection or 1})
    hf_cls = tf.CLIPVisionModelWithProjection if projection else tf.CLIPVisionModel
    assert count(ours) == count(on_meta(lambda: hf_cls(vision)))


def test_real_dinov2_config(tf):
    raw = json.loads((CONFIGS / "depth-anything_Depth-Anything-V2-Large-hf" / "config.json").read_text())
    c = DINOv2Config.from_json(raw)
    assert (c.image_size, c.patch_size, c.hidden_size, c.intermediate_size, c.n_layers, c.n_heads) == (
        518,
        14,
        1024,
        4096,
        24,
        16,
    )
    hf = on_meta(lambda: tf.Dinov2Model(tf.Dinov2Config(**raw["backbone_config"])))
    assert count(on_meta(lambda: DINOv2(c))) == count(hf)


def test_real_oneformer_swin_config(tf):
    raw = json.loads(
        (CONFIGS / "shi-labs_oneformer_coco_swin_large" / "config_RECONSTRUCTED.json").read_text()
    )
    c = SwinConfig.from_json(raw)
    assert (c.embed_dim, c.depths, c.n_heads, c.window_size) == (192, (2, 2, 18, 2), (6, 12, 24, 48), 12)
    hf = on_meta(lambda: tf.SwinBackbone(tf.SwinConfig(**raw["backbone_config"])))
    assert on_meta(lambda: Swin(c)).config.embed_dim * 8 == 1536  # stage 4: 1536 channels (the seg target)
    assert count(on_meta(lambda: Swin(c))) == count(hf) - count(hf.swin.layernorm)  # never applied: skipped


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant,stage", [("llama3-clip-ift", "pt"), ("llama3-clip-ift", "ift"), ("llama3-clip-pt", "pt")]
)
def test_train_init_from_a_released_folder(folders, variant, stage, tmp_path):
    """train.py --init takes a released folder directly: its config, tokenizer and weights (PT from the IFT
    model adds fresh predictors; IFT fine-tunes it). The tiny PT fixture's predictors are narrower than
    the tiny teachers: a clear error, not a shape error deep in the loss."""
    import subprocess
    import sys

    folder = folders(variant)[1]
    cmd = [sys.executable, str(ROOT / "train.py"), "--stage", stage, "--init", str(folder)]
    cmd += ["--max-steps", "1", "--batch-size", "4", "--num-workers", "0", "--out", str(tmp_path / "run")]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    if variant == "llama3-clip-pt":
        assert p.returncode == 1 and "its predictors predict" in p.stderr and "Traceback" not in p.stderr
        return
    assert p.returncode == 0, p.stderr[-3000:]
    record = json.loads((tmp_path / "run" / stage / "metrics.jsonl").read_text().splitlines()[0])
    assert ("emb" in record) == (stage == "pt")
    assert from_checkpoint(tmp_path / "run" / stage / "final").cfg == stored_config(folder)
