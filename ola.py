"""OLA-VLM (Sec. 4, Fig. 4): a LLaVA-1.5-style MLLM whose pre-training distills teacher features into
intermediate LLM layers (docs/design.md §1-5).

    image -> base encoder (frozen) -> mlp2x_gelu projector -> N image tokens
    sequence = <sys> | <img> × N | <t> × N_seek per task (Tab. III order) | <txt>
    L_PT = L_NTP + Σ_task λ_task Σ_{l ∈ layer set} (λ_sL1 · smooth-L1 + λ_con · InfoNCE)   (Eq. 1)

With no tasks and N_seek = 0 the same class is exactly LLaVA-1.5, the baseline of every table."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from checkpoint import load_strict, read_json, read_state_dict, replace_folder
from encoders import VISION_TOWERS
from llm import LLM, LLMConfig
from losses import ntp_loss
from predictors import KEY_INPUTS, EmbeddingPredictors, SeekTokens
from tasks import IMAGE, PAD, PAPER_TOKEN_ORDER, SYS, TASKS, TEXT, check_tasks

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id in input_ids, replaced by the image + special tokens
IGNORE_INDEX = -100  # labels of positions without a next-token loss


@dataclass
class OLAConfig:
    """OLA-VLM hyper-parameters with the paper's defaults (Sec. 4-5, Tab. 3-5, App. Tab. I-V)."""

    tasks: tuple[str, ...] = ("depth", "seg", "gen")  # distilled teachers (App. Tab. II); () = LLaVA-1.5
    layer_sets: dict[str, tuple[int, ...]] = field(
        default_factory=dict
    )  # task -> layers (32-layer LLM); Tab. 3
    num_seek_tokens: int = 8  # N_seek special tokens per task in the sequence (Tab. 5); 0 = none
    token_order: tuple[str, ...] | None = None  # order of the <t> blocks (App. Tab. III); None: <g>|<d>|<s>
    task_weights: dict[str, float] = field(default_factory=dict)  # λ_task (App. Tab. IV); missing: 0.5
    sl1_weight: float = 1.0  # λ_sL1 (Sec. 4.2; App. Tab. V)
    contrastive_weight: float = 0.3  # λ_con (Sec. 4.2; App. Tab. V)
    logit_scale_init: float = 2.0  # InfoNCE scale = clamp(exp(s), max=100)
    key_input: str = "sys+img+t+txt"  # the predictor's keys (App. Tab. I)
    predictor_heads: int = 4  # single-layer Perceiver resampler, 4 heads × 32 (Sec. 4.1)
    predictor_dim_head: int = 32
    predictor_depth: int = 1

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        check_tasks(self.tasks)
        if self.token_order is None:
            paper = [t for t in PAPER_TOKEN_ORDER if t in self.tasks]
            self.token_order = tuple(paper + [t for t in self.tasks if t not in paper])
        self.token_order = tuple(self.token_order)
        if sorted(self.token_order) != sorted(self.tasks):
            raise ValueError(f"token_order {self.token_order} must order exactly the tasks {self.tasks}")
        self.layer_sets = {task: tuple(layers) for task, layers in self.layer_sets.items()}
        extra = set(self.layer_sets) | set(self.task_weights)
        if extra - set(TASKS):
            raise ValueError(f"layer_sets / task_weights name unknown task(s) {sorted(extra - set(TASKS))}")
        if self.key_input not in KEY_INPUTS:
            raise ValueError(f"key_input {self.key_input!r}: expected one of {list(KEY_INPUTS)}")
        if self.num_seek_tokens < 0:
            raise ValueError(f"num_seek_tokens must be >= 0, got {self.num_seek_tokens}")

    def layer_set(self, task: str, n_layers: int) -> tuple[int, ...]:
        """The task's layer set, scaled proportionally when the LLM is not 32 layers deep."""
        layers = self.layer_sets.get(task, TASKS[task].layers)
        return tuple(sorted({min(n_layers, max(1, int(layer * n_layers / 32 + 0.5))) for layer in layers}))

    def task_weight(self, task: str) -> float:
        return self.task_weights.get(task, 0.5)

    @classmethod
    def from_dict(cls, values: dict) -> OLAConfig:
        """From `asdict` output read back from JSON (lists -> tuples)."""
        values = dict(values)
        for key in ("tasks", "token_order"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass
class OLAOutput:
    loss: torch.Tensor | None
    terms: dict[str, torch.Tensor]  # every loss term, detached, for logging
    predictions: dict[tuple[str, int], torch.Tensor]
    hidden_states: tuple[torch.Tensor, ...] | None = None
    segments: torch.Tensor | None = None


class OLAVLM(nn.Module):
    """LLaVA-1.5-style MLLM with OLA-VLM's special tokens and embedding predictors (Fig. 4). Components:
    `vision` (the frozen base encoder), `projector` (mlp2x_gelu), `tokens` (<t>, or None), `llm`, and in PT
    `predictors` (or None). `sources`: the weight folder of each base component (None = random init)."""

    def __init__(
        self,
        cfg: OLAConfig,
        llm: LLM,
        vision: nn.Module,
        target_dims: dict[str, int] | None = None,
        sources: dict[str, str | None] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.sources = dict(sources or {"llm": None, "vision": None})
        H = llm.config.hidden_size
        self.num_image_tokens = vision.num_tokens  # 576 for both base encoders
        n_special = len(cfg.tasks) * cfg.num_seek_tokens
        self.image_seq_len = self.num_image_tokens + n_special  # positions one <image> becomes
        self.vision = vision.requires_grad_(False)
        self.llm = llm
        self.projector = nn.Sequential(nn.Linear(vision.width, H), nn.GELU(), nn.Linear(H, H))  # mlp2x_gelu
        self.tokens = None
        if n_special:
            self.tokens = SeekTokens(cfg.tasks, self.num_image_tokens, H, cfg.num_seek_tokens)
        self.target_dims = None
        self.predictors = None
        if target_dims and cfg.tasks:
            self.target_dims = {task: target_dims[task] for task in cfg.tasks}
            self.predictors = EmbeddingPredictors(
                cfg,
                H,
                llm.config.n_layers,
                self.target_dims,
                self.num_image_tokens,
                own_latents=not n_special,
            )

    # ------------------------------------------------------------------ sequence assembly
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, 576, H): frozen base-encoder features, then the projector."""
        with torch.no_grad():
            feats = self.vision.features(images)  # (N, 576, 1024 | 3072)
        return self.projector(feats.to(self.projector[0].weight.dtype))

    def special_tokens(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The <t> blocks in token order and their segment ids: (n·N_seek, H), (n·N_seek,) for n tasks"""
        if self.tokens is None:
            hidden = self.llm.config.hidden_size
            return torch.zeros(0, hidden, dtype=dtype, device=device), torch.zeros(
                0, dtype=torch.long, device=device
            )
        order = self.cfg.token_order
        embeds = torch.cat([self.tokens(task) for task in order]).to(dtype)
        n = self.cfg.num_seek_tokens
        segments = torch.cat([torch.full((n,), TASKS[task].segment, device=device) for task in order])
        return embeds, segments

    def splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        left_pad: bool = False,
    ):
        """Replace each IMAGE_TOKEN_INDEX by the image tokens + the <t> blocks (Sec. 4.1). Returns
        inputs_embeds (B, T', H), attention mask, labels (-100 on inserted tokens) and `segments` (B, T'):
        the segment id of every position (PAD, SYS, IMAGE, a task's, TEXT)."""
        device = input_ids.device
        text = self.llm.embed_tokens(input_ids.clamp(min=0))  # (B, T, H)
        feats = None
        if images is not None and len(images):
            feats = self.encode_images(images)
        special, special_segments = self.special_tokens(text.dtype, device)  # (24, H), (24,)
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        rows = []
        n_used = 0
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].bool()
            ids, emb, lab = input_ids[b][real], text[b][real], labels[b][real]
            seg = torch.full_like(ids, TEXT)
            where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            if len(where) > 1:
                raise ValueError(f"sample {b} has {len(where)} images; OLA-VLM takes at most one")
            if where:
                p = where[0]
                img = feats[n_used].to(text.dtype)
                n_used += 1
                inserted = torch.cat([img, special])  # (576 + 24, H)
                image_segments = torch.full((len(img),), IMAGE, device=device)
                sys = torch.full((p,), SYS, device=device)
                emb = torch.cat([emb[:p], inserted, emb[p + 1 :]])
                seg = torch.cat([sys, image_segments, special_segments, seg[p + 1 :]])
                no_loss = torch.full((len(inserted),), IGNORE_INDEX, device=device)
                lab = torch.cat([lab[:p], no_loss, lab[p + 1 :]])
            rows.append((emb, seg, lab))
        if feats is not None and n_used != len(feats):
            raise ValueError(f"{len(feats)} images for {n_used} <image> placeholders")
        side = "left" if left_pad else "right"
        embeds, segments, labels = (
            pad_sequence(list(column), batch_first=True, padding_value=value, padding_side=side)
            for column, value in zip(zip(*rows), (0.0, PAD, IGNORE_INDEX))  # zero embeddings on pads
        )
        return embeds, segments != PAD, labels, segments

    # ------------------------------------------------------------------ training forward
    def full_targets(
        self, targets: dict[str, torch.Tensor], has_image: torch.Tensor, like: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Targets come one row per image: scatter them to one row per sample (zeros for text-only samples,
        which the losses mask)."""
        rows = has_image.nonzero().flatten()
        full = {}
        for task in self.cfg.tasks:
            n = self.num_image_tokens if TASKS[task].spatial else 1
            full[task] = like.new_zeros(len(has_image), n, self.target_dims[task], dtype=torch.float32)
            if task in targets:
                full[task] = full[task].index_copy(0, rows, targets[task].float())
        return full

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        targets: dict[str, torch.Tensor] | None = None,
        output_hidden_states: bool = False,
    ) -> OLAOutput:
        """L_PT = L_NTP + Σ_task λ_task Σ_l L_emb^l (Eq. 1). `targets[task]` has one row per image; without
        targets or predictors only L_NTP is computed."""
        embeds, attn, labels, segments = self.splice(input_ids, attention_mask, labels, images)
        distill = self.predictors is not None and targets is not None
        shift = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=attn,
            output_hidden_states=distill or output_hidden_states,
            logits_mask=F.pad(shift, (0, 1), value=False),  # logits only where a label follows
        )
        ntp = ntp_loss(out.logits, labels[:, 1:][shift])
        loss = ntp
        terms = {"ntp": ntp.detach()}
        predictions = {}
        if distill:
            if has_image is None:
                raise ValueError("PT forward needs has_image to align targets with samples")
            full = self.full_targets(targets, has_image, embeds)
            emb, emb_terms, predictions = self.predictors(
                out.hidden_states, segments, self.tokens, full, has_image
            )
            loss = loss + emb
            terms.update(emb_terms, emb=emb.detach())
        hidden = out.hidden_states if output_hidden_states else None
        return OLAOutput(loss, terms, predictions, hidden, segments)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        images: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Answer ids (B, n_new) for prompts with an <image> placeholder; kwargs go to LLM.generate."""
        embeds, attn, _, _ = self.splice(input_ids, attention_mask, images=images, left_pad=True)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attn, **kwargs)

    # ------------------------------------------------------------------ checkpoints (docs/design.md §12)
    def config_dict(self, stored: list[str]) -> dict:
        return {
            "ola": asdict(self.cfg),
            "llm": asdict(self.llm.config),
            "vision": {"kind": self.vision.kind, "config": asdict(self.vision.config)},
            "target_dims": self.target_dims,
            "sources": self.sources,
            "stored": stored,
        }

    def save(
        self,
        folder: str | os.PathLike,
        components: tuple[str, ...],
        state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write config.json + model.safetensors holding `components` (and every base component that has no
        source folder). `state`: a full state dict gathered under FSDP (default: ours). Written to a
        temporary folder, then renamed: a checkpoint is never half-written."""
        from safetensors.torch import save_file

        folder = Path(folder)
        state = self.state_dict() if state is None else state
        unsourced = {c for c in ("llm", "vision") if not self.sources.get(c)}
        stored = [c for c in sorted(set(components) | unsourced) if getattr(self, c) is not None]
        state = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.split(".")[0] in stored}
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(self.config_dict(stored), indent=2))
        replace_folder(tmp, folder)

    @classmethod
    def from_checkpoint(
        cls,
        folder: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        with_predictors: bool = True,
    ) -> OLAVLM:
        """Rebuild a model saved by `save`: base components the checkpoint does not store from their source
        folders, the others allocated uninitialised (meta device), then every stored part loaded strictly."""
        config = read_json(Path(folder) / "config.json")
        sources, stored = config["sources"], config["stored"]
        cfg = OLAConfig.from_dict(config["ola"])
        tower_cls, tower_cfg_cls = VISION_TOWERS[config["vision"]["kind"]]

        def empty(module_cls, module_cfg):
            with torch.device("meta"):
                module = module_cls(module_cfg)
            return module.to_empty(device=device)

        if "llm" in stored:
            llm = empty(LLM, LLMConfig(**config["llm"]))
        else:
            llm = LLM.from_pretrained(sources["llm"], dtype=dtype, device=device)
        tower_cfg = tower_cfg_cls(**config["vision"]["config"])
        if "vision" in stored:
            vision = empty(tower_cls, tower_cfg)
        else:
            vision = tower_cls.from_pretrained(sources["vision"], dtype=dtype)
            vision.config = tower_cfg  # e.g. the select layer the model was trained with
        target_dims = config["target_dims"] if with_predictors else None
        model = cls(cfg, llm, vision, target_dims, sources).to(device=device, dtype=dtype)
        return model.load_components(folder)

    def load_components(self, folder: str | os.PathLike) -> OLAVLM:
        """Strictly load every component a checkpoint stores (those this model has)."""
        stored = read_json(Path(folder) / "config.json")["stored"]
        stored = [c for c in stored if getattr(self, c) is not None]

        def wanted(key: str) -> bool:
            return key.split(".")[0] in stored

        state = read_state_dict(folder, keep=wanted)
        for component in stored:
            prefix = component + "."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            load_strict(getattr(self, component), sub, f"{folder} [{component}]")
        return self


STAGE_TRAINABLE = {  # Sec. 5.1: what each stage trains
    "pt": ("projector", "tokens", "predictors"),
    "vpt": ("llm", "projector"),
    "ift": ("llm", "projector"),
}
COMPONENTS = ("vision", "projector", "tokens", "llm", "predictors")


def set_trainable(model: OLAVLM, stage: str, verbose: bool = True) -> dict[str, tuple[int, int]]:
    """Freeze per stage (Sec. 5.1): PT trains projector, special tokens, predictors (+ logit scales);
    VPT/IFT train LLM and projector, drop the predictors and keep the base encoder and the tokens frozen.
    Returns (and prints) {component: (trainable, total) parameters}."""
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"unknown stage {stage!r}: expected one of {list(STAGE_TRAINABLE)}")
    trainable = STAGE_TRAINABLE[stage]
    if stage != "pt":  # IFT and inference keep the (frozen) special tokens, not the predictors (Sec. 4.1)
        model.predictors = None
        model.target_dims = None
    counts = {}
    for name in COMPONENTS:
        module = getattr(model, name)
        if module is None:
            continue
        module.requires_grad_(name in trainable)
        n = sum(p.numel() for p in module.parameters())
        counts[name] = (n if name in trainable else 0, n)
    counts["total"] = tuple(map(sum, zip(*counts.values())))
    if verbose:
        print(f"stage {stage}: trainable / all parameters")
        print("\n".join(f"  {name:<10} {t:>14,} / {n:>14,}" for name, (t, n) in counts.items()))
    return counts
