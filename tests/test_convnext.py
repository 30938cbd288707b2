"""CLIP-ConvNeXT-XXL (convnext.py; the ConvNeXt rows of Tab. 1-2): parity on tiny random trunks saved in the
official open_clip key layout, loader strictness, the real size on the meta device, and preprocessing.

Reference: transformers' ConvNextModel (same maths as timm's ConvNeXt: stem, stride-2 downsamples, depthwise
7×7 blocks with layer scale; `last_hidden_state` is the last stage's map before any head). timm was not used:
`pip install timm` would replace the installed torch 2.13.0+cpu (it resolves torchvision 0.29 -> torch 2.14).
ConvNextModel hard-codes eps=1e-6 in its LayerNorms, whereas convnext_xxlarge uses 1e-5, so parity is checked
twice: our model loaded with layer_norm_eps=1e-6 against the stock reference, and our default (1e-5)
against the reference with every LayerNorm's `eps` attribute set to 1e-5. Its weights are renamed to
open_clip's
`visual.trunk.*` names (HF `embeddings.patch_embeddings` -> `stem.0`,
`layers.{j}.dwconv` -> `blocks.{j}.conv_dw`,
...) with HF's pooling norm standing in for `visual.trunk.head.norm`, plus a fake `visual.head.proj` and text
tower keys that the loader must skip."""

import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from checkpoint import from_checkpoint, save_checkpoint
from convnext import ConvNeXt, ConvNeXtConfig, infer_shape

transformers = pytest.importorskip("transformers")

TOL = 1e-5
TINY = ConvNeXtConfig.tiny()

# HF ConvNextModel name -> open_clip trunk name (after `visual.trunk.`), applied in order.
HF_TO_OPEN_CLIP = [
    (r"^embeddings\.patch_embeddings\.", "stem.0."),
    (r"^embeddings\.layernorm\.", "stem.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"^encoder\.stages\.(\d+)\.layers\.", r"stages.\1.blocks."),
    (r"\.dwconv\.", ".conv_dw."),
    (r"\.layernorm\.", ".norm."),
    (r"\.pwconv1\.", ".mlp.fc1."),
    (r"\.pwconv2\.", ".mlp.fc2."),
    (r"\.layer_scale_parameter$", ".gamma"),
    (r"^layernorm\.", "head.norm."),  # the pooled-output norm: open_clip's trunk.head.norm, skipped
]


def hf_reference(config: ConvNeXtConfig, seed: int = 0) -> nn.Module:
    """A tiny random transformers ConvNextModel with every parameter randomised so activations are O(1):
    weights ~ N(0, 1/fan_in), biases ~ N(0, 0.2²), LayerNorm weights and layer-scale gammas ~ U(0.5, 1.5)."""
    hf_config = transformers.ConvNextConfig(
        num_channels=3,
        patch_size=4,
        num_stages=len(config.depths),
        depths=list(config.depths),
        hidden_sizes=list(config.dims),
        hidden_act="gelu",
        layer_scale_init_value=1e-6,
        drop_path_rate=0.0,
    )
    model = transformers.ConvNextModel(hf_config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:  # LayerNorm weight or layer_scale_parameter
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def open_clip_state(model: nn.Module, prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """The reference's weights under open_clip names, plus a CLIP projection and text-tower keys."""
    state = {}
    for key, value in model.state_dict().items():
        for pattern, repl in HF_TO_OPEN_CLIP:
            key = re.sub(pattern, repl, key)
        state[prefix + "trunk." + key] = value.clone()
    width = model.config.hidden_sizes[-1]
    state[prefix + "head.proj.weight"] = torch.randn(8, width)
    if prefix:
        state["token_embedding.weight"] = torch.randn(10, 8)
        state["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(24, 8)
        state["logit_scale"] = torch.tensor(4.6)
    return state


def reference_features(model: nn.Module, pixels: torch.Tensor, eps: float) -> torch.Tensor:
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = eps
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state  # (B, C, h, w)
    return out.flatten(2).transpose(1, 2)  # (B, h·w, C), row-major


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    return hf_reference(TINY)


@pytest.fixture
def saved(tmp_path, reference) -> dict[str, Path]:
    """The reference in the open_clip layout, as a safetensors folder and as a torch.save .bin file."""
    state = open_clip_state(reference)
    folder = tmp_path / "convnext_st"
    folder.mkdir()
    save_file(state, str(folder / "open_clip_pytorch_model.safetensors"))
    binary = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(state, binary)
    return {"safetensors": folder, "bin": binary}


# --------------------------------------------------------------------------- 1. parity
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("side", [256, 200])  # 200 is no multiple of 32: 50 -> 25 -> 12 -> 6
def test_parity_with_reference(saved, reference, fmt, eps, side):
    model = ConvNeXt.from_pretrained(saved[fmt], layer_norm_eps=eps)
    assert model.config.depths == TINY.depths
    assert model.config.dims == TINY.dims
    pixels = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side))
    want = reference_features(reference, pixels, eps)
    assert want.std() > 0.3  # O(1) activations: a wrong gamma / norm / bias would show
    with torch.no_grad():
        got = model.features(pixels)
    assert got.shape == (2, (side // 32) ** 2, TINY.dims[-1])
    assert maxdiff(got, want) < TOL


def test_default_eps_and_tiny_shapes(saved):
    model = ConvNeXt.from_pretrained(saved["safetensors"], image_size=256)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 1 + 3 + sum(TINY.depths)  # stem, three downsamples, one per block
    assert all(m.eps == 1e-5 for m in norms)
    assert model.kind == "convnext"
    assert (model.image_size, model.grid, model.num_tokens, model.width) == (256, 8, 64, 64)
    with torch.no_grad():
        assert model.features(torch.zeros(1, 3, 256, 256)).shape == (1, 64, 64)


def test_visual_only_checkpoint(tmp_path, reference):
    """A state dict saved without the `visual.` prefix (trunk.*, head.*) loads the same weights."""
    save_file(open_clip_state(reference, prefix=""), str(tmp_path / "model.safetensors"))
    model = ConvNeXt.from_pretrained(tmp_path, layer_norm_eps=1e-6)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert maxdiff(model.features(pixels), reference_features(reference, pixels, 1e-6)) < TOL


def test_dtype(saved):
    model = ConvNeXt.from_pretrained(saved["bin"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model.features(torch.zeros(1, 3, 64, 64)).dtype == torch.bfloat16


# --------------------------------------------------------------------------- 2. strictness
def load_modified(tmp_path, reference, edit) -> None:
    state = open_clip_state(reference)
    edit(state)
    save_file(state, str(tmp_path / "open_clip_pytorch_model.safetensors"))
    ConvNeXt.from_pretrained(tmp_path)


def test_missing_key_is_named(tmp_path, reference):
    key = "visual.trunk.stages.1.blocks.0.mlp.fc1.bias"
    with pytest.raises(ValueError, match=re.escape(key)):
        load_modified(tmp_path, reference, lambda s: s.pop(key))


@pytest.mark.parametrize("key", ["visual.trunk.stages.2.blocks.1.extra", "visual.proj_extra"])
def test_unexpected_key_is_named(tmp_path, reference, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        load_modified(tmp_path, reference, lambda s: s.update({key: torch.zeros(3)}))


def test_wrong_shape_is_named(tmp_path, reference):
    key = "visual.trunk.stages.2.blocks.1.norm.weight"
    with pytest.raises(ValueError, match=re.escape(key) + r".*expected \[48\], found \[47\]"):
        load_modified(tmp_path, reference, lambda s: s.update({key: torch.ones(47)}))


def test_no_trunk_is_an_error(tmp_path):
    save_file({"token_embedding.weight": torch.zeros(4, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="token_embedding.weight|no ConvNeXt trunk"):
        ConvNeXt.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- 3. real size (meta device)
def test_real_size_on_meta():
    with torch.device("meta"):
        model = ConvNeXt(ConvNeXtConfig())
        out = model.features(torch.empty(2, 3, 768, 768))
    assert out.shape == (2, 576, 3072)
    assert (model.grid, model.num_tokens, model.width) == (24, 576, 3072)
    # stem: conv 3·384·4·4 + 384, LayerNorm2d 2·384
    stem = 3 * 384 * 16 + 384 + 2 * 384
    # downsample into C from P: LayerNorm2d 2P + conv 2×2 4·P·C + C
    downsamples = sum(2 * p + 4 * p * c + c for p, c in [(384, 768), (768, 1536), (1536, 3072)])
    # block of width C: dwconv 49C + C, norm 2C, fc1 4C² + 4C, fc2 4C² + C, gamma C = 8C² + 58C
    blocks = sum(d * (8 * c * c + 58 * c) for d, c in [(3, 384), (4, 768), (30, 1536), (3, 3072)])
    assert (stem, downsamples, blocks) == (19_584, 24_783_360, 818_588_928)
    assert sum(p.numel() for p in model.parameters()) == stem + downsamples + blocks == 843_391_872
    # from_pretrained's shape inference on the real key layout: (3, 4, 30, 3) blocks of (384, ..., 3072)
    assert infer_shape(model.state_dict(), "meta") == ((3, 4, 30, 3), (384, 768, 1536, 3072))


# --------------------------------------------------------------------------- 4. preprocess
def test_preprocess():
    with torch.device("meta"):  # preprocess needs no weights
        model = ConvNeXt(ConvNeXtConfig())
    assert model.preprocess(Image.new("RGB", (300, 200), (1, 2, 3))).shape == (3, 768, 768)
    colour = (10, 200, 77)
    mean = (0.48145466, 0.4578275, 0.40821073)
    std = (0.26862954, 0.26130258, 0.27577711)
    x = model.preprocess(Image.new("RGB", (500, 500), colour))
    assert x.shape == (3, 768, 768)
    for c in range(3):
        want = (colour[c] / 255 - mean[c]) / std[c]
        assert torch.allclose(x[c], torch.full((768, 768), want), atol=1e-6)


# --------------------------------------------------------------------------- as the base encoder of OLA-VLM
def test_convnext_base_encoder_trains_pt_and_ift_and_round_trips(tmp_path):
    """A tiny ConvNeXt base encoder (8×8 tokens at 256 px): one PT step and one IFT step train, the projector
    input is the trunk's last width, and a checkpoint rebuilds the same tower with identical outputs."""
    from conftest import teacher_pixels, tiny_ola, toy_batch

    from recipe import set_trainable

    tower = ConvNeXt(ConvNeXtConfig.tiny())
    model, teachers = tiny_ola(vision=tower)
    assert model.num_image_tokens == 64 and model.projector[0].in_features == tower.width
    input_ids, mask, labels, _, has_image = toy_batch()
    images = torch.randn(2, 3, 256, 256)
    for stage in ("pt", "ift"):
        set_trainable(model, stage, verbose=False)
        targets = teachers(teacher_pixels(teachers, 2)) if stage == "pt" else None
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        out = model(input_ids, mask, labels, images, has_image, targets)
        out.loss.backward()
        optimizer.step()
        assert torch.isfinite(out.loss) and ("emb" in out.terms) == (stage == "pt")
        assert all(p.grad is None for p in model.vision.parameters())
    save_checkpoint(model, tmp_path / "ift", ("llm", "projector", "tokens"))
    again = from_checkpoint(tmp_path / "ift")
    assert isinstance(again.vision, ConvNeXt) and again.vision.config == tower.config
    with torch.no_grad():
        a = model(input_ids, mask, labels, images, has_image).loss
        b = again(input_ids, mask, labels, images, has_image).loss
    assert torch.equal(a, b)
