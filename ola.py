"""OLA-VLM (Sec. 4, Fig. 4): a LLaVA-1.5-style MLLM whose pre-training distills teacher features into
intermediate LLM layers (docs/design.md §1-5).

    image -> base encoder (frozen) -> mlp2x_gelu projector -> N image tokens
    sequence = <sys> | <img> × N | <t> × N_seek per task (Tab. III order) | <txt>
    L_PT = L_NTP + Σ_task λ_task Σ_{l ∈ layer set} (λ_sL1 · smooth-L1 + λ_con · InfoNCE)   (Eq. 1)

With no tasks and N_seek = 0 the same class is exactly LLaVA-1.5, the baseline of every table."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from llm import LLM
from losses import embedding_loss, ntp_loss
from predictors import KEY_INPUTS, EmbeddingPredictors, SeekTokens
from tasks import IMAGE, PAD, PAPER_TOKEN_ORDER, SYS, TASKS, TEXT, check_tasks
from tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX

MODES = ("ola", "feat-concat", "token-concat")  # distil the teachers, or feed their features (Tab. 1)


@dataclass
class OLAConfig:
    """OLA-VLM hyper-parameters with the paper's defaults (Sec. 4-5, Tab. 3-5, App. Tab. I-V)."""

    tasks: tuple[str, ...] = ("depth", "seg", "gen")  # distilled teachers (App. Tab. II); () = LLaVA-1.5
    mode: str = "ola"  # or a multi-encoder baseline: the tasks' teachers are inputs (Tab. 1; concat.py)
    layer_sets: dict[str, tuple[int, ...]] = field(default_factory=dict)  # task -> layers (of 32); Tab. 3
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
        for task, layers in self.layer_sets.items():
            if not layers or not all(1 <= layer <= 32 for layer in layers):
                raise ValueError(
                    f"layer_sets {task}={list(layers)}: expected layers 1..32 (of a 32-layer LLM)"
                )
        weights = {"sl1_weight": self.sl1_weight, "contrastive_weight": self.contrastive_weight}
        weights.update({f"task_weights {task}": w for task, w in self.task_weights.items()})
        if negative := [f"{name}={w}" for name, w in weights.items() if w < 0]:
            raise ValueError(f"{', '.join(negative)}: a loss weight must be >= 0 (a negative one ascends)")
        if self.key_input not in KEY_INPUTS:
            raise ValueError(f"key_input {self.key_input!r}: expected one of {list(KEY_INPUTS)}")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {list(MODES)}")
        if self.mode != "ola" and not self.tasks:
            raise ValueError(f"mode {self.mode} feeds the teachers of the tasks as input: it needs tasks")
        if self.mode == "token-concat" and not self.num_seek_tokens:
            raise ValueError(
                "token-concat places each teacher's features on N_seek tokens: num_seek_tokens > 0"
            )
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


def embedding_predictors(
    cfg: OLAConfig,
    hidden: int,
    n_layers: int,
    target_dims: dict[str, int],
    num_image_tokens: int,
    own_latents: bool = False,
) -> EmbeddingPredictors:
    """The predictors P_task^l of cfg (Sec. 4.1): each task's layer set scaled to an `n_layers` LLM, a logit
    scale per task when the contrastive term is on (Sec. 4.2)."""
    return EmbeddingPredictors(
        {task: cfg.layer_set(task, n_layers) for task in cfg.tasks},
        target_dims,
        hidden,
        num_image_tokens,
        cfg.key_input,
        cfg.predictor_heads,
        cfg.predictor_dim_head,
        cfg.predictor_depth,
        cfg.logit_scale_init if cfg.contrastive_weight else None,
        own_latents,
    )


def mlp2x_gelu(width: int, hidden: int) -> nn.Sequential:
    """LLaVA-1.5's projector (Sec. 5.1): Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))


class OLAVLM(nn.Module):
    """LLaVA-1.5-style MLLM with OLA-VLM's special tokens and embedding predictors (Fig. 4). Components:
    `vision` (the frozen base encoder), `projector` (mlp2x_gelu), `tokens` (<t>, or None), `llm`, and in PT
    `predictors` (or None). `sources`: the weight folder of each base component (None = random init).
    `extra_width`: feature channels the projector reads beyond the base encoder's (feat-concat; concat.py)."""

    modes = ("ola",)  # the cfg.mode values this class builds; the baselines are concat.ConcatVLM

    def __init__(
        self,
        cfg: OLAConfig,
        llm: LLM,
        vision: nn.Module,
        target_dims: dict[str, int] | None = None,
        sources: dict[str, str | None] | None = None,
        extra_width: int = 0,
    ):
        super().__init__()
        if cfg.mode not in self.modes:
            raise ValueError(f"mode {cfg.mode!r} is a baseline of Tab. 1: build it with concat.ConcatVLM")
        self.cfg = cfg
        self.sources = dict(sources or {"llm": None, "vision": None})
        H = llm.config.hidden_size
        self.num_image_tokens = vision.num_tokens  # 576 for both base encoders
        distills = cfg.mode == "ola"  # the baselines feed their teachers instead (concat.py)
        n_special = len(cfg.tasks) * cfg.num_seek_tokens if distills else 0
        self.image_seq_len = self.num_image_tokens + n_special  # positions one <image> becomes
        self.teachers = None  # the baselines' input teachers (Tab. 1; concat.ConcatVLM)
        self.vision = vision.requires_grad_(False)
        self.llm = llm
        self.projector = mlp2x_gelu(vision.width + extra_width, H)  # (Sec. 5.1)
        self.tokens = None
        if n_special:
            self.tokens = SeekTokens(cfg.tasks, self.num_image_tokens, H, cfg.num_seek_tokens)
        self.target_dims = None
        self.predictors = None
        if target_dims and cfg.tasks and distills:
            self.target_dims = {task: target_dims[task] for task in cfg.tasks}
            self.predictors = embedding_predictors(
                cfg,
                H,
                llm.config.n_layers,
                self.target_dims,
                self.num_image_tokens,
                own_latents=not n_special,
            )

    # ------------------------------------------------------------------ sequence assembly
    def encode_images(
        self, images: torch.Tensor, teacher_images: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """(n, 3, S, S) -> (n, 576 + k, H): the frozen base encoder's features through the projector, then
        the k = n_tasks · N_seek special tokens <t> (Sec. 4.1). `teacher_images` is for the baselines."""
        dtype = self.projector[0].weight.dtype
        with torch.no_grad():
            feats = self.vision.features(images).to(dtype)  # (n, 576, 1024 | 3072)
        img = self.projector(feats)  # (n, 576, H)
        special = self.special_tokens(dtype, img.device)  # (24, H) or (0, H)
        return torch.cat([img, special.expand(len(img), -1, -1)], dim=1)

    def inserted_segments(self, device: torch.device) -> torch.Tensor:
        """The segment ids of the positions one <image> becomes: IMAGE × 576, then the tasks' ids."""
        n = self.cfg.num_seek_tokens if self.image_seq_len > self.num_image_tokens else 0
        tasks = torch.tensor([TASKS[task].segment for task in self.cfg.token_order], device=device)
        image = torch.full((self.num_image_tokens,), IMAGE, device=device)
        return torch.cat([image, tasks.repeat_interleave(n)])

    def special_tokens(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The <t> blocks in token order: (n·N_seek, H) for n tasks, (0, H) without special tokens."""
        if self.tokens is None:
            return torch.zeros(0, self.llm.config.hidden_size, dtype=dtype, device=device)
        return torch.cat([self.tokens(task) for task in self.cfg.token_order]).to(dtype)

    def splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        left_pad: bool = False,
        teacher_images: dict[str, torch.Tensor] | None = None,
    ):
        """Replace each IMAGE_TOKEN_INDEX by the image tokens + the <t> blocks (Sec. 4.1). Returns
        inputs_embeds (B, T', H), attention mask, labels (-100 on inserted tokens) and `segments` (B, T'):
        the segment id of every position (PAD, SYS, IMAGE, a task's, TEXT)."""
        device = input_ids.device
        text = self.llm.embed_tokens(input_ids.clamp(min=0))  # (B, T, H)
        feats = None
        if images is not None and len(images):
            feats = self.encode_images(images, teacher_images)  # (n, 576 + 24, H)
        inserted_segments = self.inserted_segments(device)  # (576 + 24,)
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
                inserted = feats[n_used].to(text.dtype)  # (576 + 24, H)
                n_used += 1
                sys = torch.full((p,), SYS, device=device)
                emb = torch.cat([emb[:p], inserted, emb[p + 1 :]])
                seg = torch.cat([sys, inserted_segments, seg[p + 1 :]])
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
        teacher_images: dict[str, torch.Tensor] | None = None,
    ) -> OLAOutput:
        """L_PT = L_NTP + Σ_task λ_task Σ_l L_emb^l (Eq. 1). `targets[task]` has one row per image; without
        targets or predictors only L_NTP is computed."""
        embeds, attn, labels, segments = self.splice(
            input_ids, attention_mask, labels, images, teacher_images=teacher_images
        )
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
            predictions = self.predictors(out.hidden_states, segments, self.tokens)
            emb, emb_terms = self.embedding_losses(predictions, full, has_image)
            loss = loss + emb
            terms.update(emb_terms, emb=emb.detach())
            predictions = {key: pred.detach() for key, pred in predictions.items()}
        hidden = out.hidden_states if output_hidden_states else None
        return OLAOutput(loss, terms, predictions, hidden, segments)

    def embedding_losses(
        self, predictions: dict[tuple[str, int], torch.Tensor], targets: dict[str, torch.Tensor], valid
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Σ_task λ_task Σ_l (λ_sL1 · smooth-L1 + λ_con · InfoNCE) (Eq. 1, Sec. 4.2) and every term, detached.
        `targets[task]` is (B, ...); rows of samples without an image (valid False) are ignored."""
        cfg = self.cfg
        scales = self.predictors.logit_scales
        total = 0.0
        terms = {}
        for (task, layer), pred in predictions.items():
            scale = None if scales is None else scales[task]
            emb, sl1, con = embedding_loss(
                pred, targets[task], scale, valid, cfg.sl1_weight, cfg.contrastive_weight
            )
            total = total + cfg.task_weight(task) * emb
            terms[f"{task}@{layer}/sl1"] = sl1.detach()
            if con is not None:
                terms[f"{task}@{layer}/con"] = con.detach()
        return total, terms

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        images: torch.Tensor | None = None,
        teacher_images: dict[str, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Answer ids (B, n_new) for prompts with an <image> placeholder; kwargs go to LLM.generate."""
        embeds, attn, _, _ = self.splice(
            input_ids, attention_mask, images=images, left_pad=True, teacher_images=teacher_images
        )
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attn, **kwargs)

    def drop_tokens(self) -> None:
        """Remove the special tokens from the model and its sequence (N_seek = 0; Tab. 6 "dropped")."""
        if self.predictors is not None:
            raise ValueError("cannot drop the special tokens while the predictors read them")
        self.cfg.num_seek_tokens = 0
        self.tokens = None
        self.image_seq_len = self.num_image_tokens
