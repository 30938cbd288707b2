"""Shared test helpers: numeric comparison, parameter randomisation, checkpoint rewriting, synthetic images
and inputs, and the ONE tiny OLA-VLM builder every test uses."""

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
# Every test, and every train.py / probe.py / eval.py a test starts, uses the small miniature build, built
# once into the repository's data_cache/ (miniature.py; a subprocess inherits these).
os.environ.setdefault("OLA_MINIATURE", "fast")
os.environ.setdefault("OLA_DATA_CACHE", str(ROOT / "data_cache"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/dist_*.py helpers

from encoders import CLIPVision, CLIPVisionConfig  # noqa: E402
from llm import LLM, LLMConfig  # noqa: E402
from ola import IGNORE_INDEX, IMAGE_TOKEN_INDEX, OLAVLM, OLAConfig  # noqa: E402
from tasks import tiny_teachers  # noqa: E402

TOL = 1e-5  # fp32 parity on O(1) activations: float32 rounding of ~1e3-term sums stays well below it
VOCAB = 97  # vocabulary of the random test LLM (ids 0..96, 0 = pad)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (layer scales, position tables, norms ...): default inits hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def rewrite(src: Path, dst: Path, edit=lambda sd: sd, config=None, name="model.safetensors") -> Path:
    """Copy a saved checkpoint folder with an edited state dict (and optionally another config.json)."""
    dst.mkdir(parents=True, exist_ok=True)
    sd = edit(load_file(src / "model.safetensors"))
    if name.endswith(".bin"):
        torch.save(sd, dst / name)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, dst / name)
    if config is None:
        shutil.copy(src / "config.json", dst / "config.json")
    else:
        (dst / "config.json").write_text(json.dumps(config))
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            shutil.copy(src / extra, dst / extra)
    return dst


def pixels(size, batch: int = 2, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Photo-like: smooth gradients, a coloured block, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([np.sin(6 * x + 1) * 0.5 + 0.5, y, (x * y) ** 0.5], -1) * 200
    img[h // 4 : h // 2, w // 3 : w // 2] = (230, 40, 60)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def tiny_ola(
    cfg: OLAConfig | None = None,
    seed: int = 0,
    vocab: int = VOCAB,
    n_layers: int = 8,
    sources=None,
    vision=None,
    **llm,
):
    """The tiny OLA-VLM of the built-in run (random LLM and CLIP) and its tiny teachers, from `seed`.
    `vision`: a base encoder with an 8×8 grid (default: the tiny CLIP); `llm` overrides LLMConfig fields."""
    cfg = cfg or OLAConfig()
    teachers = tiny_teachers(cfg.tasks, grid=8, seed=seed) if cfg.tasks else None
    torch.manual_seed(seed)
    fields = {"vocab_size": vocab, "n_layers": n_layers, "pad_token_id": 0, **llm}
    llm_cfg = replace(LLMConfig.preset("tiny"), **fields)
    vision = vision or CLIPVision(CLIPVisionConfig.tiny())
    dims = teachers.dims if teachers is not None else None
    return OLAVLM(cfg, LLM(llm_cfg), vision, dims, sources), teachers


def toy_batch(with_image=(True, False, True), prefix=(5, 3, 7), text=(6, 9, 4), seed=0, vocab: int = VOCAB):
    """Right-padded ids with one IMAGE_TOKEN_INDEX after `prefix` tokens for image samples, labels on the last
    3 text tokens; tiny-CLIP images. -> input_ids, mask, labels, images, has_image"""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for img, p, t in zip(with_image, prefix, text):
        ids = torch.randint(1, vocab, (p + t,), generator=g).tolist()
        if img:
            ids.insert(p, IMAGE_TOKEN_INDEX)
        rows.append(ids)
    T = max(map(len, rows))
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, ids in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, len(ids) - 3 : len(ids)] = input_ids[b, len(ids) - 3 : len(ids)]
        mask[b, : len(ids)] = True
    images = torch.randn(sum(with_image), 3, 112, 112, generator=g)
    return input_ids, mask, labels, images, torch.tensor(with_image)


def teacher_pixels(teachers, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random teacher inputs for n images at each teacher's input size."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for task, teacher in teachers.teachers.items():
        out[task] = torch.randn(n, 3, teacher.input_size, teacher.input_size, generator=g)
    return out


@pytest.fixture(scope="session")
def tf():
    """transformers, imported once per session (the numerical reference; tests only)."""
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


# ----------------------------------------------------------------------- fixtures (transformers, saved once)
def saved(model, tmp_path_factory, name: str):
    """(reference model, folder it was saved to with save_pretrained: the Hub key layout)."""
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="session")
def clip_full(tf, tmp_path_factory):
    """A full CLIPModel (vision + text tower), the openai/clip-vit-large-patch14-336 layout."""
    cfg = tf.CLIPConfig(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
            hidden_act="quick_gelu",
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=99,
            max_position_embeddings=16,
        ),
        projection_dim=24,
        attn_implementation="eager",
    )
    model = randomize(tf.CLIPModel(cfg))
    return saved(model, tmp_path_factory, "clip_full")


@pytest.fixture(scope="session")
def unclip(tf, tmp_path_factory):
    """A CLIPVisionModelWithProjection with exact gelu, the SD-2.1-unCLIP image_encoder/ layout."""
    cfg = tf.CLIPVisionConfig(
        hidden_size=80,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=42,
        patch_size=14,
        hidden_act="gelu",
        projection_dim=48,
        attn_implementation="eager",
    )
    model = randomize(tf.CLIPVisionModelWithProjection(cfg))
    return saved(model, tmp_path_factory, "unclip")


DINO_CFG = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    mlp_ratio=2,
    image_size=70,
    patch_size=14,
    attn_implementation="eager",
)  # table 5×5


@pytest.fixture(scope="session")
def dinov2(tf, tmp_path_factory):
    model = randomize(tf.Dinov2Model(tf.Dinov2Config(**DINO_CFG)))
    return saved(model, tmp_path_factory, "dinov2")


@pytest.fixture(scope="session")
def depth_anything(tf, tmp_path_factory):
    """DepthAnythingForDepthEstimation: DINOv2 under `backbone.*`, plus neck.* / head.* to be skipped."""
    backbone = tf.Dinov2Config(
        **DINO_CFG, out_indices=[1, 2, 3, 4], apply_layernorm=True, reshape_hidden_states=False
    )
    cfg = tf.DepthAnythingConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        reassemble_hidden_size=64,
    )
    model = randomize(tf.DepthAnythingForDepthEstimation(cfg))
    return saved(model, tmp_path_factory, "depth_anything")


SWIN_CFG = dict(
    embed_dim=16,
    depths=[2, 2, 2, 2],
    num_heads=[1, 2, 2, 4],
    window_size=3,
    out_features=["stage1", "stage2", "stage3", "stage4"],
    attn_implementation="eager",
)


@pytest.fixture(scope="session")
def swin(tf, tmp_path_factory):
    model = randomize(tf.SwinBackbone(tf.SwinConfig(**SWIN_CFG)))
    return saved(model, tmp_path_factory, "swin")


@pytest.fixture(scope="session")
def oneformer_swin(swin, tmp_path_factory):
    """The OneFormer layout: the SwinBackbone keys under model.pixel_level_module.encoder.*, the rest of
    OneFormer
    beside it, the old relative_position_index buffers, and no dead swin.layernorm."""
    _, src = swin
    prefix = "model.pixel_level_module.encoder."

    def nest(sd):
        out = {prefix + k: v for k, v in sd.items() if not k.startswith("swin.layernorm.")}
        for k in [k for k in out if k.endswith("relative_position_bias_table")]:
            old_buffer = k.replace("relative_position_bias_table", "relative_position_index")
            out[old_buffer] = torch.zeros(9, 9, dtype=torch.long)
        out["model.pixel_level_module.decoder.mask_projection.weight"] = torch.ones(4, 4)
        out["model.transformer_module.queries.weight"] = torch.ones(8, 4)
        return out

    config = {"model_type": "oneformer", "backbone_config": json.loads((src / "config.json").read_text())}
    return rewrite(src, tmp_path_factory.mktemp("oneformer") / "ckpt", nest, config)


@pytest.fixture(scope="session")
def miniature_build() -> dict[str, Path]:
    """The fast miniature (miniature.py), built once before any test process needs it."""
    import miniature

    return miniature.builtin()
