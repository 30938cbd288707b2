"""The two models bench.py compares, from the same random weights saved in the official key layouts: ours
(OLAVLM + TargetEncoders) and the PT step assembled from transformers modules the way the released code does
it (docs/design.md §11). Like the tests, this file may import transformers; runtime files never do."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.utils.rnn import pad_sequence

from encoders import CLIPVision, DINOv2
from llm import LLM
from losses import embedding_loss
from ola import OLAVLM, OLAConfig, embedding_predictors
from precision import autocast, compute_dtype
from predictors import SeekTokens
from recipe import set_trainable
from tasks import IMAGE, PAD, SYS, TASKS, TEXT
from teachers import DepthTeacher, GenTeacher, SegTeacher, TargetEncoders
from tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX

TRAINED = ("projector", "tokens", "predictors")  # what PT trains (Sec. 5.1); both sides start from one copy


def dtypes(a) -> tuple[torch.dtype, torch.device, object]:
    """(frozen weights' dtype, device, autocast factory): bf16 = frozen weights bf16, trained ones fp32 under
    autocast (docs/design.md §6), on both sides."""
    device = torch.device(a.device)
    frozen = compute_dtype(device, a.dtype)
    return frozen, device, lambda: autocast(device, frozen)


def transformers():
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers as tf

    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    return tf


# ----------------------------------------------------------------------------- weights (official layouts)
def save_weights(a, folder: Path) -> None:
    """Random transformers models saved with save_pretrained (the Hub key layouts), one folder each."""
    tf = transformers()
    torch.manual_seed(a.seed)
    w, n = a.vision_width, a.vision_layers
    vit = dict(
        hidden_size=w, intermediate_size=4 * w, num_hidden_layers=n, num_attention_heads=max(1, w // 64)
    )
    llm = dict(hidden_size=a.hidden, intermediate_size=a.mlp, num_hidden_layers=a.layers, vocab_size=a.vocab)
    llm |= dict(num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, rope_theta=5e5)
    llama = tf.LlamaConfig(**llm, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(vit, image_size=a.grid * 14, patch_size=14, hidden_act="quick_gelu")
    clip = tf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=32)
    unclip = tf.CLIPVisionConfig(**vit, image_size=112, patch_size=14, hidden_act="gelu", projection_dim=w)
    dino = tf.Dinov2Config(**vit, mlp_ratio=4, image_size=(a.grid + 4) * 14, patch_size=14)  # interpolated
    neck = dict(neck_hidden_sizes=[8] * 4, fusion_hidden_size=8, reassemble_hidden_size=w)
    swin = dict(embed_dim=a.swin_dim, depths=[2, 2, 6, 2], window_size=6, out_features=["stage1", "stage2"])
    swin["out_features"] += ["stage3", "stage4"]  # OneFormer's: every stage norm
    swin["num_heads"] = [max(1, a.swin_dim * 2**i // 32) for i in range(4)]
    for name, model in (
        ("llm", tf.LlamaForCausalLM(llama)),
        ("clip", tf.CLIPModel(clip)),
        ("unclip", tf.CLIPVisionModelWithProjection(unclip)),
        ("depth", tf.DepthAnythingForDepthEstimation(tf.DepthAnythingConfig(backbone_config=dino, **neck))),
        ("swin", tf.SwinBackbone(tf.SwinConfig(**swin))),
    ):
        model.save_pretrained(folder / name)


def depth_blocks(n_layers: int) -> tuple[int, ...]:
    """DAv2's DINOv2 blocks {4, 11, 17, 23} of 24 (docs/design.md §2), scaled to n_layers."""
    return tuple(sorted({b * n_layers // 24 for b in (4, 11, 17, 23)}))


def target_dims(a) -> dict[str, int]:
    return {"depth": a.vision_width, "seg": 8 * a.swin_dim, "gen": a.vision_width}


# ----------------------------------------------------------------------------- the two sides
def build_ours(a, folder: Path, stage: str = "pt") -> tuple[OLAVLM, TargetEncoders | None]:
    """Our OLA-VLM (and in PT its teachers). The first build saves the trained parts' initial weights
    (trained.safetensors), which every later build of either side loads."""
    frozen, device, _ = dtypes(a)
    llm = LLM.from_pretrained(folder / "llm", dtype=frozen if stage == "pt" else torch.float32, device=device)
    vision = CLIPVision.from_pretrained(folder / "clip", dtype=frozen)
    model = OLAVLM(OLAConfig(), llm, vision, target_dims(a)).to(device)
    trained = folder / "trained.safetensors"
    if trained.exists():
        model.load_state_dict(load_file(trained, device=a.device), strict=False)
    else:
        save_file({k: v for k, v in model.state_dict().items() if k.split(".")[0] in TRAINED}, trained)
    set_trainable(model, stage, verbose=False)
    if stage != "pt":
        return model, None
    dino = DINOv2.from_pretrained(folder / "depth", frozen, interpolate_offset=0.0)  # transformers' resize
    teachers = {
        "depth": DepthTeacher(dino, a.grid * 14, depth_blocks(a.vision_layers)),
        "seg": SegTeacher.from_pretrained(folder / "swin", a.grid * 32, frozen),
        "gen": GenTeacher.from_pretrained(folder / "unclip", dtype=frozen),
    }
    return model, TargetEncoders(teachers).to(device)


class Released(nn.Module):
    """The PT / IFT step as the released code assembles it from transformers modules."""

    def __init__(self, a, folder: Path, stage: str = "pt"):
        super().__init__()
        tf = transformers()
        frozen, device, _ = dtypes(a)
        self.cfg, self.grid, self.blocks = OLAConfig(), a.grid, depth_blocks(a.vision_layers)
        llm_dtype = frozen if stage == "pt" else torch.float32
        self.llm = tf.LlamaForCausalLM.from_pretrained(folder / "llm", dtype=llm_dtype)
        self.vision = tf.CLIPVisionModel.from_pretrained(folder / "clip", dtype=frozen)
        H, w = a.hidden, a.vision_width
        self.projector = nn.Sequential(nn.Linear(w, H), nn.GELU(), nn.Linear(H, H))  # mlp2x_gelu
        self.tokens = SeekTokens(self.cfg.tasks, a.grid**2, H, self.cfg.num_seek_tokens)
        self.predictors = self.teachers = None
        if stage == "pt":
            self.predictors = embedding_predictors(self.cfg, H, a.layers, target_dims(a), a.grid**2)
            depth = tf.DepthAnythingForDepthEstimation.from_pretrained(
                folder / "depth", dtype=frozen
            ).backbone
            seg = tf.SwinBackbone.from_pretrained(folder / "swin", dtype=frozen)
            gen = tf.CLIPVisionModelWithProjection.from_pretrained(folder / "unclip", dtype=frozen)
            self.teachers = nn.ModuleDict({"depth": depth, "seg": seg, "gen": gen})
        self.load_state_dict(load_file(folder / "trained.safetensors"), strict=False)
        self.to(device).requires_grad_(False).eval()
        for name in TRAINED if stage == "pt" else ("projector", "llm"):
            getattr(self, name).requires_grad_(True)

    @torch.no_grad()
    def targets(self, px: dict[str, torch.Tensor], looped: bool = True) -> dict[str, torch.Tensor]:
        """The teachers' targets, one image at a time as released (`looped`), or batched."""
        if looped:
            one = [{t: x[i : i + 1] for t, x in px.items()} for i in range(len(px["gen"]))]
            parts = [self.targets(p, looped=False) for p in one]
            return {t: torch.cat([p[t] for p in parts]) for t in px}
        t = self.teachers
        hs = t["depth"](px["depth"], output_hidden_states=True).hidden_states
        depth = torch.stack([t["depth"].layernorm(hs[b + 1])[:, 1:] for b in self.blocks]).mean(0)
        seg = t["seg"](px["seg"]).feature_maps[-1]  # (B, C, h, w), resized to the base grid as released
        seg = F.interpolate(seg, (self.grid, self.grid), mode="bilinear", align_corners=False)
        gen = t["gen"](pixel_values=px["gen"]).image_embeds[:, None]
        return {"depth": depth, "seg": seg.flatten(2).transpose(1, 2), "gen": gen}

    def splice(self, ids, mask, labels, images):
        """LLaVA's prepare_inputs_labels_for_multimodal: image features and <t> blocks at -200, right pads."""
        with torch.no_grad():
            feats = self.vision(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = self.projector(feats.to(self.projector[0].weight.dtype))
        text = self.llm.get_input_embeddings()(ids.clamp(min=0))
        order, n = self.cfg.token_order, self.cfg.num_seek_tokens
        special = torch.cat([self.tokens(task) for task in order]).to(text.dtype)
        special_seg = [TASKS[t].segment for t in order for _ in range(n)]
        rows = []
        for b in range(len(ids)):
            real = mask[b].bool()
            i, e, lab = ids[b][real], text[b][real], labels[b][real]
            p = int((i == IMAGE_TOKEN_INDEX).nonzero()[0])
            img = torch.cat([feats[b].to(text.dtype), special])
            seg = [SYS] * p + [IMAGE] * len(feats[b]) + special_seg + [TEXT] * (len(i) - p - 1)
            lab = torch.cat([lab[:p], torch.full((len(img),), IGNORE_INDEX, device=ids.device), lab[p + 1 :]])
            rows.append((torch.cat([e[:p], img, e[p + 1 :]]), torch.tensor(seg, device=ids.device), lab))
        embeds, segments, labels = (
            pad_sequence(list(col), batch_first=True, padding_value=v)
            for col, v in zip(zip(*rows), (0.0, PAD, IGNORE_INDEX))
        )
        return embeds, segments != PAD, labels, segments

    def forward(self, ids, mask, labels, images, has_image, targets=None) -> torch.Tensor:
        embeds, attn, labels, segments = self.splice(ids, mask, labels, images)
        hidden = targets is not None
        out = self.llm(inputs_embeds=embeds, attention_mask=attn.long(), output_hidden_states=hidden)
        logits = out.logits[:, :-1].float()  # (B, T - 1, V): every position
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        if targets is None:
            return loss
        cfg, scales = self.cfg, self.predictors.logit_scales
        preds = self.predictors(out.hidden_states, segments, self.tokens)
        for (t, _), p in preds.items():
            emb = embedding_loss(
                p, targets[t].float(), scales[t], has_image, cfg.sl1_weight, cfg.contrastive_weight
            )
            loss = loss + cfg.task_weight(t) * emb[0]
        return loss
