"""OLA-VLM (Sec. 4, Fig. 4): a LLaVA-1.5-style MLLM whose pre-training distills teacher features into
intermediate LLM layers (docs/design.md §1-5).

    image -> base encoder (frozen) -> mlp2x_gelu projector -> N image tokens
    sequence = <sys> | <img> × N | <t> × N_seek per task (Tab. III order) | <txt>
    L_PT = L_NTP + Σ_task λ_task Σ_{l ∈ layer set} (λ_sL1 · smooth-L1 + λ_con · InfoNCE)   (Eq. 1)

With no tasks and N_seek = 0 the same class is exactly LLaVA-1.5, the baseline of every table."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from checkpoint import load_strict, read_json, read_state_dict, write_folder
from concat import TeacherInputs, mlp2x_gelu
from encoders import VISION_TOWERS
from llm import LLM, LLMConfig
from losses import ntp_loss
from predictors import KEY_INPUTS, EmbeddingPredictors, SeekTokens
from tasks import IMAGE, PAD, PAPER_TOKEN_ORDER, SYS, TASKS, TEXT, check_tasks, load_teachers, tiny_teachers
from teachers import TargetEncoders

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id in input_ids, replaced by the image + special tokens
IGNORE_INDEX = -100  # labels of positions without a next-token loss
MODES = ("ola", "feat-concat", "token-concat")  # distil the teachers, or feed their features (Tab. 1)


@dataclass
class OLAConfig:
    """OLA-VLM hyper-parameters with the paper's defaults (Sec. 4-5, Tab. 3-5, App. Tab. I-V)."""

    tasks: tuple[str, ...] = ("depth", "seg", "gen")  # distilled teachers (App. Tab. II); () = LLaVA-1.5
    mode: str = "ola"  # or a multi-encoder baseline: the tasks' teachers are inputs (Tab. 1; concat.py)
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
        teachers: TargetEncoders | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.sources = dict(sources or {"llm": None, "vision": None})
        H = llm.config.hidden_size
        self.num_image_tokens = vision.num_tokens  # 576 for both base encoders
        self.teachers = self.inputs = None  # the multi-encoder baselines' input teachers (Tab. 1; concat.py)
        if cfg.mode != "ola":
            if teachers is None or set(teachers.dims) != set(cfg.tasks):
                raise ValueError(f"mode {cfg.mode} needs the teachers of {list(cfg.tasks)} as its input")
            self.teachers = teachers.requires_grad_(False)
            self.inputs = TeacherInputs(cfg.mode, cfg.token_order, teachers.dims, H, cfg.num_seek_tokens)
        n_special = len(cfg.tasks) * cfg.num_seek_tokens if cfg.mode == "ola" else 0
        extra = self.inputs.n_positions if self.inputs else 0
        self.image_seq_len = self.num_image_tokens + n_special + extra  # positions one <image> becomes
        self.vision = vision.requires_grad_(False)
        self.llm = llm
        width = vision.width + (self.inputs.extra_width if self.inputs else 0)
        self.projector = mlp2x_gelu(width, H)  # (Sec. 5.1)
        self.tokens = None
        if n_special:
            self.tokens = SeekTokens(cfg.tasks, self.num_image_tokens, H, cfg.num_seek_tokens)
        self.target_dims = None
        self.predictors = None
        if target_dims and cfg.tasks and cfg.mode == "ola":
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
    def encode_images(
        self, images: torch.Tensor, teacher_images: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """(n, 3, S, S) -> (n, 576 + k, H): the frozen base encoder's features through the projector, then
        the k inserted tokens: the <t> blocks (OLA-VLM), or the teachers' tokens (token-concat; Tab. 1)."""
        dtype = self.projector[0].weight.dtype
        with torch.no_grad():
            feats = self.vision.features(images).to(dtype)  # (n, 576, 1024 | 3072)
        extra = None
        if self.inputs is not None:
            if teacher_images is None:
                raise ValueError(f"mode {self.cfg.mode} feeds the teachers' features: pass teacher_images")
            extra = self.inputs.features(self.teachers, teacher_images)  # {task: (n, 576 or 1, C)}
        if self.cfg.mode == "feat-concat":
            feats = self.inputs.concat(feats, extra)  # (n, 576, 1024 + 4608 - 1024)
        img = self.projector(feats)  # (n, 576, H)
        if self.cfg.mode == "token-concat":
            return torch.cat([img, self.inputs.tokens(extra, dtype)], dim=1)  # (n, 576 + 24, H)
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
        teacher_images: dict[str, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Answer ids (B, n_new) for prompts with an <image> placeholder; kwargs go to LLM.generate."""
        embeds, attn, _, _ = self.splice(
            input_ids, attention_mask, images=images, left_pad=True, teacher_images=teacher_images
        )
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
        unsourced = {c for c in ("llm", "vision", "teachers") if not self.sources.get(c)}
        stored = [c for c in sorted(set(components) | unsourced) if getattr(self, c) is not None]
        state = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.split(".")[0] in stored}

        def write(tmp: Path) -> None:
            save_file(state, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(self.config_dict(stored), indent=2))

        write_folder(folder, write)

    @classmethod
    def from_checkpoint(
        cls,
        folder: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        with_predictors: bool = True,
    ) -> OLAVLM:
        """Rebuild a model saved by `save`: base components the checkpoint does not store from their source
        folders, the others allocated uninitialised (meta device), then every stored part loaded strictly.
        A folder of the authors' released models (config.json with `architectures`) goes to from_released."""
        config = read_json(Path(folder) / "config.json")
        if "architectures" in config:
            return cls.from_released(folder, dtype, device, with_predictors)
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
        teachers = None
        if cfg.mode != "ola":  # the baselines' input teachers: from their folders, or tiny ones loaded below
            grid = math.isqrt(vision.num_tokens)
            if "teachers" in stored:
                teachers = tiny_teachers(cfg.tasks, grid)
            else:
                teachers = load_teachers(sources["teachers"], grid, dtype)
        model = cls(cfg, llm, vision, target_dims, sources, teachers).to(device=device, dtype=dtype)
        return model.load_components(folder)

    @classmethod
    def from_released(
        cls,
        folder: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        with_predictors: bool = True,
    ) -> OLAVLM:
        """A shi-labs released OLA-VLM folder (IFT `LlavaLlamaForCausalLM` and its Phi-3 / ConvNeXt variants,
        PT `OlaLlavaLlamaForCausalLM`) through released.py's key table; dtype None keeps the stored one."""
        from released import load_released  # released.py imports this module

        return load_released(folder, dtype=dtype, device=device, with_predictors=with_predictors)

    @staticmethod
    def stored_config(folder: str | os.PathLike) -> OLAConfig:
        """The OLAConfig of a checkpoint folder, ours or a released one, without loading its weights."""
        folder = Path(folder)
        config = read_json(folder / "config.json")
        if "architectures" in config:
            from released import parse_config, read_headers

            return parse_config(config, read_headers(folder)[0], folder).ola
        return OLAConfig.from_dict(config["ola"])

    def drop_tokens(self) -> None:
        """Remove the special tokens from the model and its sequence (N_seek = 0; Tab. 6 "dropped")."""
        if self.predictors is not None:
            raise ValueError("cannot drop the special tokens while the predictors read them")
        self.cfg.num_seek_tokens = 0
        self.tokens = None
        self.image_seq_len = self.num_image_tokens

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
COMPONENTS = ("vision", "teachers", "projector", "inputs", "tokens", "llm", "predictors")


def set_trainable(
    model: OLAVLM, stage: str, verbose: bool = True, emb_losses: bool | None = None, tokens: str = "frozen"
) -> dict[str, tuple[int, int]]:
    """Freeze per stage (Sec. 5.1): PT trains projector, special tokens, predictors (+ logit scales);
    VPT/IFT train LLM and projector and keep the base encoder and the tokens frozen. `emb_losses` (default:
    PT only; Tab. 4) keeps and trains the predictors, else they are dropped; `tokens` = "learnable" also
    trains the special tokens after PT, "none" drops them (Tab. 6). Returns (and prints) {component:
    (trainable, total) parameters}."""
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"unknown stage {stage!r}: expected one of {list(STAGE_TRAINABLE)}")
    trainable = STAGE_TRAINABLE[stage]
    if emb_losses is None:
        emb_losses = stage == "pt"
    if emb_losses:
        trainable = (*trainable, "predictors")
    else:  # IFT and inference keep the (frozen) special tokens, not the predictors (Sec. 4.1)
        model.predictors = None
        model.target_dims = None
    if stage != "pt" and tokens == "learnable":
        trainable = (*trainable, "tokens")
    if stage != "pt" and tokens == "none":
        model.drop_tokens()
    trainable = (*trainable, "inputs")  # the baselines' feature projectors train with the projector
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
