"""The authors' released OLA-VLM checkpoints (shi-labs on the Hub; docs/design.md §12): IFT folders
(`LlavaLlamaForCausalLM`, the Phi-3 and ConvNeXt variants) and PT folders (`OlaLlavaLlamaForCausalLM`, with
predictors) read into our `OLAVLM` through ONE key table, strictly, without transformers.

    config.json (LLaVA fields)  -> OLAConfig + LLMConfig + the vision tower's config (`parse_config`)
    safetensors headers         -> the key plan: every key used, or skipped by a named rule (`key_plan`)
    the tensors                 -> copied shard by shard into a model allocated once (`from_released`)"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from convnext import ConvNeXtConfig, infer_shape
from encoders import VISION_TOWERS, CLIPVisionConfig
from llm import LLM, LLMConfig
from ola import OLAVLM, OLAConfig
from tasks import PAPER_TOKEN_ORDER
from weights import checkpoint_files, read_json, read_state_dict

IFT_ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaPhi3ForCausalLM")
PT_ARCHITECTURES = ("OlaLlavaLlamaForCausalLM", "OlaLlavaPhi3ForCausalLM")
SECTIONS = {"depth": "image_depth", "seg": "image_seg", "gen": "image_gen"}  # each task's config block
TOWER = "model.vision_tower.vision_tower."
CLIP = TOWER + "vision_model."

# THE key table: released name -> our name. {i}, {j}: block indices; {task}: depth | seg | gen; {k}: the
# k-th layer of the task's `*_layer_indices` (head `image_{task}_heads.{k}` reads our layer {layer}). A tuple
# of our names is one fused released tensor whose rows are ours in that order (Phi-3: q|k|v, gate|up). An
# entry ending in "." maps every key under that prefix. Applied ours -> released: our state dict says what
# must exist.
L, O = "model.layers.{i}.", "llm.layers.{i}."  # a decoder block: released (Hub names under `model.`), ours
H, P = "image_{task}_heads.{k}.projector.", "predictors.heads.{task}.{layer}."  # a PT predictor
KEY_TABLE: list[tuple[str, str | tuple[str, ...]]] = [
    # the LLM
    ("model.embed_tokens.weight", "llm.embed_tokens.weight"),  # 128,257 rows for Llama-3 (+ <pad>)
    (L + "input_layernorm.weight", O + "attn_norm.weight"),
    (L + "self_attn.q_proj.weight", O + "attn.q_proj.weight"),
    (L + "self_attn.k_proj.weight", O + "attn.k_proj.weight"),
    (L + "self_attn.v_proj.weight", O + "attn.v_proj.weight"),
    (
        L + "self_attn.qkv_proj.weight",
        (O + "attn.q_proj.weight", O + "attn.k_proj.weight", O + "attn.v_proj.weight"),
    ),
    (L + "self_attn.o_proj.weight", O + "attn.o_proj.weight"),
    (L + "post_attention_layernorm.weight", O + "mlp_norm.weight"),
    (L + "mlp.gate_proj.weight", O + "mlp.gate_proj.weight"),
    (L + "mlp.up_proj.weight", O + "mlp.up_proj.weight"),
    (L + "mlp.gate_up_proj.weight", (O + "mlp.gate_proj.weight", O + "mlp.up_proj.weight")),
    (L + "mlp.down_proj.weight", O + "mlp.down_proj.weight"),
    ("model.norm.weight", "llm.norm.weight"),
    ("lm_head.weight", "llm.lm_head.weight"),
    # the mlp2x_gelu projector
    ("model.mm_projector.0.", "projector.0."),
    ("model.mm_projector.2.", "projector.2."),
    # the special tokens <t> (Sec. 4.1): Q_depth, Q_seg (576 × H) and the 8 <g> tokens
    ("model.special_depth_tokens", "tokens.q_depth"),
    ("model.special_seg_tokens", "tokens.q_seg"),
    ("model.special_gen_tokens", "tokens.gen_tokens"),
    # the CLIP tower: transformers CLIPVisionModel names (no visual projection)
    (CLIP + "embeddings.class_embedding", "vision.class_embedding"),
    (CLIP + "embeddings.patch_embedding.", "vision.patch_embed."),
    (CLIP + "embeddings.position_embedding.weight", "vision.pos_embed"),
    (CLIP + "pre_layrnorm.", "vision.pre_norm."),
    (CLIP + "encoder.layers.{i}.layer_norm1.", "vision.blocks.{i}.norm1."),
    (CLIP + "encoder.layers.{i}.layer_norm2.", "vision.blocks.{i}.norm2."),
    (CLIP + "encoder.layers.{i}.mlp.fc1.", "vision.blocks.{i}.fc1."),
    (CLIP + "encoder.layers.{i}.mlp.fc2.", "vision.blocks.{i}.fc2."),
    (CLIP + "encoder.layers.{i}.self_attn.q_proj.", "vision.blocks.{i}.attn.q."),
    (CLIP + "encoder.layers.{i}.self_attn.k_proj.", "vision.blocks.{i}.attn.k."),
    (CLIP + "encoder.layers.{i}.self_attn.v_proj.", "vision.blocks.{i}.attn.v."),
    (CLIP + "encoder.layers.{i}.self_attn.out_proj.", "vision.blocks.{i}.attn.o."),
    (CLIP + "post_layernorm.", "vision.post_norm."),
    # the ConvNeXt tower: the timm trunk, whose names are ours (convnext.py)
    (TOWER + "stem.", "vision.stem."),
    (TOWER + "stages.", "vision.stages."),
    # PT only: the embedding predictors (the released Perceiver: layers.{j}.0 = attention with norm1 on the
    # keys and norm2 on the latents; layers.{j}.1 = the feed-forward Sequential) and the InfoNCE logit scales
    (H + "proj_in.", P + "proj_in."),
    (H + "layers.{j}.0.norm1.", P + "layers.{j}.attn.norm_keys."),
    (H + "layers.{j}.0.norm2.", P + "layers.{j}.attn.norm_latents."),
    (H + "layers.{j}.0.to_q.", P + "layers.{j}.attn.to_q."),
    (H + "layers.{j}.0.to_kv.", P + "layers.{j}.attn.to_kv."),
    (H + "layers.{j}.0.to_out.", P + "layers.{j}.attn.to_out."),
    (H + "layers.{j}.1.", P + "layers.{j}.ff."),
    (H + "proj_out.", P + "proj_out."),
    (H + "norm_out.", P + "norm_out."),
    ("{task}_logit_scale", "predictors.logit_scales.{task}"),
]
FUSED = {name for _, ours in KEY_TABLE if isinstance(ours, tuple) for name in ours}  # Phi-3 stores them fused
# Released keys that are never read, each with its reason (a regex on the key).
SKIP_RULES: list[tuple[str, str]] = [
    (
        r"oneformer\.",
        "frozen OneFormer seg teacher stored by PT (teachers are loaded from their own folders)",
    ),
    (r"da_v2_head\.", "frozen Depth Anything V2 DPT decoder stored by PT (visualisation only)"),
    (re.escape(TOWER) + r"head\.", "the ConvNeXt trunk's CLIP head, unused (as in convnext.py)"),
    (r".*(position_ids|rotary_emb\.inv_freq)$", "a buffer we recompute (docs/design.md §8)"),
]
PREDICTOR_KEYS = r"image_\w+_heads\.|\w+_logit_scale$"  # skipped when the predictors are not wanted


@dataclass
class ReleasedConfig:
    """What a released config.json + its tensor shapes say, in our terms."""

    stage: str  # "ift" | "pt"
    ola: OLAConfig
    llm: LLMConfig
    vision_kind: str  # "clip" | "convnext"
    vision: CLIPVisionConfig | ConvNeXtConfig
    vision_tower: str  # the released `mm_vision_tower` id
    image_aspect_ratio: str  # "pad" (IFT, inference) | "square" (PT: center crop)
    layers: dict[str, tuple[int, ...]]  # task -> layers in `*_layer_indices` order (head k reads layers[k])
    target_dims: dict[str, int] | None  # PT: each task's predictor output width


def is_released(config: dict) -> bool:
    """A config.json of a released OLA-VLM folder (its `architectures`), not one of ours."""
    return any(a in IFT_ARCHITECTURES + PT_ARCHITECTURES for a in config.get("architectures") or ())


# ----------------------------------------------------------------------------- config
def parse_layers(text: str, n_layers: int, where: str) -> tuple[int, ...]:
    """'8-20' -> (8, 20): '-' separates a list, not a range; 1-based block outputs (docs/design.md §1)."""
    try:
        layers = tuple(dict.fromkeys(int(x) for x in str(text).split("-")))
    except ValueError:
        raise ValueError(
            f"{where}: layer indices {text!r} are not a '-'-separated list like '8-20'"
        ) from None
    if not layers or not all(1 <= layer <= n_layers for layer in layers):
        raise ValueError(f"{where}: layer indices {text!r} must lie in 1..{n_layers}")
    return layers


def section_value(section: dict, suffix: str, default=None):
    """The value of the one key of a task's config block ending in `suffix` (e.g. depth_layer_indices)."""
    found = [v for k, v in section.items() if k.endswith(suffix)]
    return found[0] if found else default


def llm_config(config: dict, rows: int, phi3: bool, folder: Path | None, source: str) -> LLMConfig:
    """LLMConfig of the released config.json (a Llama / Phi-3 config with LLaVA fields added), parsed by
    LLMConfig.from_json with the Hub model_type and the checkpoint's row count as the vocabulary."""
    hub = {**config, "model_type": "phi3" if phi3 else "llama", "vocab_size": rows}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(hub))
        if folder is not None and (folder / "generation_config.json").is_file():
            shutil.copy(folder / "generation_config.json", tmp)
        try:
            return LLMConfig.from_json(Path(tmp) / "config.json")
        except ValueError as e:
            raise ValueError(str(e).replace(str(Path(tmp) / "config.json"), source)) from None


def vision_config(config: dict, shapes: dict[str, tuple[int, ...]], source: str):
    """(kind, config) of the tower stored in the checkpoint, from its tensor shapes (the released config
    names it only by id). CLIP: OpenAI ViTs, quick-GELU, 64-d heads; ConvNeXt: '-res768' sets the input."""
    tower = str(config.get("mm_vision_tower") or config.get("vision_tower") or "")
    if CLIP + "embeddings.class_embedding" in shapes:
        n_pos, _ = shapes[CLIP + "embeddings.position_embedding.weight"]
        hidden = shapes[CLIP + "embeddings.class_embedding"][0]
        patch = shapes[CLIP + "embeddings.patch_embedding.weight"][-1]
        blocks = {
            int(m[1]) for k in shapes if (m := re.match(re.escape(CLIP) + r"encoder\.layers\.(\d+)\.", k))
        }
        if config.get("mm_vision_select_feature", "patch") != "patch":
            raise ValueError(f"{source}: mm_vision_select_feature must be 'patch' (CLS dropped)")
        return "clip", CLIPVisionConfig(
            image_size=math.isqrt(n_pos - 1) * patch,
            patch_size=patch,
            hidden_size=hidden,
            intermediate_size=shapes[CLIP + "encoder.layers.0.mlp.fc1.weight"][0],
            n_layers=len(blocks),
            n_heads=hidden // 64,
            projection_dim=None,
            select_layer=int(config.get("mm_vision_select_layer", -2)),
        )
    if TOWER + "stem.0.weight" in shapes:
        trunk = {
            k[len(TOWER) :]: torch.empty(s, device="meta") for k, s in shapes.items() if k.startswith(TOWER)
        }
        depths, dims = infer_shape(trunk, source)
        size = re.search(r"-res(\d+)", tower)
        return "convnext", ConvNeXtConfig(image_size=int(size[1]) if size else 256, depths=depths, dims=dims)
    raise ValueError(f"{source}: no vision tower under {TOWER}* (expected the CLIP or the ConvNeXt tower)")


def parse_config(
    config: dict, shapes: dict[str, tuple[int, ...]], folder: Path | None = None, source: str = "config.json"
) -> ReleasedConfig:
    """Map the released fields to ours: token order from `aux_mode`, layer sets from `*_layer_indices`,
    N_seek from `num_task_tokens`, the loss weights, the vision tower, select layer and aspect ratio."""
    if not is_released(config):
        raise ValueError(
            f"{source}: architectures {config.get('architectures')} is not a released OLA-VLM "
            f"(expected one of {list(IFT_ARCHITECTURES + PT_ARCHITECTURES)})"
        )
    for field, wanted in (("mm_projector_type", "mlp2x_gelu"), ("mm_patch_merge_type", "flat")):
        if config.get(field, wanted) != wanted:
            raise ValueError(f"{source}: {field}={config[field]!r} is not supported (expected {wanted!r})")
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise ValueError(f"{source}: mm_use_im_start_end / mm_use_im_patch_token must be false")
    aspect = config.get("image_aspect_ratio", "square")
    if aspect not in ("pad", "square"):
        raise ValueError(
            f"{source}: image_aspect_ratio={aspect!r} is not supported (expected 'pad' or 'square')"
        )
    stage = "pt" if any(a in PT_ARCHITECTURES for a in config["architectures"]) else "ift"
    embed = shapes.get("model.embed_tokens.weight")
    if embed is None:
        raise ValueError(f"{source}: no model.embed_tokens.weight in the checkpoint")
    phi3 = any(k.endswith("self_attn.qkv_proj.weight") for k in shapes)
    llm = llm_config(config, embed[0], phi3, folder, source)
    kind, vision = vision_config(config, shapes, source)

    order = tuple(t for t in str(config.get("aux_mode") or "").split("-") if t)
    special = [t for t in PAPER_TOKEN_ORDER if f"model.special_{t}_tokens" in shapes]
    if not order and special:
        raise ValueError(f"{source}: special tokens {special} stored but no aux_mode gives their order")
    if unknown := [t for t in order if t not in SECTIONS]:
        raise ValueError(
            f"{source}: aux_mode {config['aux_mode']!r} names {unknown}; expected tasks of {list(SECTIONS)}"
        )
    layers, weights, width = {}, {}, set()
    for task in order:
        section = config.get(SECTIONS.get(task, ""), {})
        where = f"{source} {SECTIONS.get(task, task)}"
        text = section_value(section, "layer_indices")
        if text is None and any(k.startswith(f"image_{task}_heads.") for k in shapes):
            raise ValueError(f"{where}: PT heads stored but no *_layer_indices says which layers they read")
        layers[task] = parse_layers(text, llm.n_layers, where) if text is not None else ()
        if section_value(section, "loss_weight") is not None:
            weights[task] = float(section_value(section, "loss_weight"))
        if int(section.get("ff_mult", 1)) != 1:
            raise ValueError(f"{where}: ff_mult={section['ff_mult']} is not supported (expected 1)")
        width.add(
            (int(section.get("num_heads", 4)), int(section.get("dim_head", 32)), int(section.get("depth", 1)))
        )
    if len(width) > 1:
        raise ValueError(
            f"{source}: the tasks' predictors differ in (num_heads, dim_head, depth): {sorted(width)}"
        )
    heads, dim_head, depth = width.pop() if width else (4, 32, 1)
    contrastive = (
        float(config.get("contrastive_loss_weight", 0.3)) if config.get("use_contrastive", True) else 0.0
    )
    ola = released_ola_config(
        source,
        tasks=order,
        layer_sets={task: to_32_layers(ls, llm.n_layers) for task, ls in layers.items() if ls},
        num_seek_tokens=int(config.get("num_task_tokens", 0)),
        token_order=order,
        task_weights=weights,
        contrastive_weight=contrastive,
        key_input="sys+img+t+txt" if config.get("pass_text_to_aux", True) else "sys+img+t",
        predictor_heads=heads,
        predictor_dim_head=dim_head,
        predictor_depth=depth,
    )
    for task, ls in layers.items():
        if ls and ola.layer_set(task, llm.n_layers) != tuple(sorted(set(ls))):
            raise ValueError(
                f"{source}: layers {ls} of {task} cannot be expressed for a {llm.n_layers}-layer LLM"
            )
    if config.get("task_token_format", "expand_emb") != "expand_emb":
        warnings.warn(
            f"{source}: task_token_format={config['task_token_format']!r}; this code inserts the N_seek "
            f"mean-pooled tokens per task, as PT does (docs/design.md §11)",
            stacklevel=2,
        )
    dims = {
        t: shapes[f"image_{t}_heads.0.projector.norm_out.weight"][0]
        for t in order
        if f"image_{t}_heads.0.projector.norm_out.weight" in shapes
    }
    target_dims = None
    if stage == "pt" and dims:  # a task without stored heads is reported missing by key_plan
        target_dims = {t: dims.get(t, int(config.get(SECTIONS[t], {}).get("output_dim", 1))) for t in order}
    tower = str(config.get("mm_vision_tower") or config.get("vision_tower") or "")
    return ReleasedConfig(stage, ola, llm, kind, vision, tower, aspect, layers, target_dims)


def released_ola_config(source: str, **values) -> OLAConfig:
    """OLAConfig(**values), its errors naming the released config."""
    try:
        return OLAConfig(**values)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def to_32_layers(layers: tuple[int, ...], n_layers: int) -> tuple[int, ...]:
    """Our layer sets are written for a 32-layer LLM and scaled (OLAConfig.layer_set); released ones are
    absolute: write them on the 32-layer scale."""
    return tuple(sorted({round(layer * 32 / n_layers) for layer in layers}))


# ----------------------------------------------------------------------------- the key plan
def _compile(template: str) -> re.Pattern:
    """A table name -> a regex: {task} matches a word, the other placeholders a number; a trailing '.'
    makes it a prefix (the rest of the key kept in `rest`)."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(
        re.escape(p) if n % 2 == 0 else f"(?P<{p}>[a-z]+)" if p == "task" else f"(?P<{p}>\\d+)"
        for n, p in enumerate(parts)
    )
    return re.compile(regex + ("(?P<rest>.*)" if template.endswith(".") else ""))


def released_name(key: str, layers: dict[str, tuple[int, ...]], fused: bool) -> tuple[str, int] | None:
    """Our state-dict key -> (its released key, its place among the rows of a fused tensor), by KEY_TABLE.
    `fused`: the LLM stores q|k|v and gate|up in one tensor (Phi-3). None when no entry maps the key."""
    for theirs, ours in KEY_TABLE:
        candidates = ours if isinstance(ours, tuple) else (ours,)
        if (isinstance(ours, tuple) and not fused) or (fused and ours in FUSED):
            continue  # the other LLM layout
        for place, candidate in enumerate(candidates):
            match = _compile(candidate).fullmatch(key)
            if match is None:
                continue
            groups = match.groupdict()
            if "layer" in groups:  # head k of a task reads layer layers[task][k]
                task_layers = layers.get(groups["task"], ())
                if int(groups["layer"]) not in task_layers:
                    return None
                groups["k"] = task_layers.index(int(groups["layer"]))
            return theirs.format(**groups) + groups.get("rest", ""), place
    return None


def skip_reason(key: str, skip_predictors: bool) -> str | None:
    """Why a released key that our model does not take is skipped, or None (then it is a problem)."""
    if skip_predictors and re.match(PREDICTOR_KEYS, key):
        return "the predictors were not asked for (with_predictors=False)"
    return next((reason for rule, reason in SKIP_RULES if re.match(rule, key)), None)


Plan = dict[str, list[tuple[str, slice | None]]]  # released key -> our keys (and their rows, when fused)


def key_plan(
    model: OLAVLM,
    layers: dict[str, tuple[int, ...]],
    shapes: dict[str, tuple[int, ...]],
    source: str,
    files: dict[str, str] | None = None,
) -> tuple[Plan, dict[str, str]]:
    """Match our state dict to the checkpoint's keys and shapes: every released key is used or skipped by a
    rule, every parameter of ours has its key with the expected shape; else one ValueError naming each problem
    (key, file, expected and found shape). -> (plan, {skipped key: reason})"""
    files = files or {}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fused = model.llm.config.model_type == "phi3"
    expected: dict[str, list[tuple[int, str]]] = {}
    problems = []
    for key in ours:
        name = released_name(key, layers, fused)
        if name is None:
            problems.append(f"  no released name for our parameter {key} (released.KEY_TABLE)")
        else:
            expected.setdefault(name[0], []).append((name[1], key))
    plan: Plan = {}
    for theirs, members in expected.items():
        members = [key for _, key in sorted(members)]
        first = ours[members[0]]
        want = (sum(ours[k][0] for k in members), *first[1:]) if len(members) > 1 else first
        where = files.get(theirs, source)
        if theirs not in shapes:
            problems.append(
                f"  missing     {theirs} (ours {', '.join(members)}): expected {list(want)} in {source}"
            )
        elif tuple(shapes[theirs]) != want:
            problems.append(
                f"  wrong shape {theirs} in {where}: expected {list(want)}, found {list(shapes[theirs])}"
            )
        elif len(members) == 1:
            plan[theirs] = [(members[0], None)]
        else:
            bounds = torch.tensor([0] + [ours[k][0] for k in members]).cumsum(0).tolist()
            plan[theirs] = [(k, slice(a, b)) for k, a, b in zip(members, bounds, bounds[1:])]
    skipped = {}
    for key, shape in shapes.items():
        if key in expected:
            continue
        reason = skip_reason(key, skip_predictors=model.predictors is None)
        if reason is None:
            problems.append(
                f"  unexpected  {key} in {files.get(key, source)}: found {list(shape)} "
                f"(no entry of released.KEY_TABLE or SKIP_RULES)"
            )
        else:
            skipped[key] = reason
    if problems:
        raise ValueError(
            f"cannot load {source} into OLAVLM ({len(problems)} problems):\n" + "\n".join(problems)
        )
    return plan, skipped


# ----------------------------------------------------------------------------- loading
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def read_headers(folder: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, torch.dtype]]:
    """Shape, file and dtype of every tensor, from the safetensors headers (no tensor is read; a `.bin`
    checkpoint is read whole)."""
    shapes, files, dtypes = {}, {}, {}
    for file in checkpoint_files(folder):
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (not a dict)
                        part = f.get_slice(key)
                        shapes[key] = tuple(part.get_shape())
                        dtypes[key] = DTYPES.get(part.get_dtype(), torch.float32)
                        files[key] = str(file)
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        else:
            for key, tensor in read_state_dict(file).items():
                shapes[key], dtypes[key], files[key] = tuple(tensor.shape), tensor.dtype, str(file)
    return shapes, files, dtypes


def build_model(rc: ReleasedConfig, with_predictors: bool = True) -> OLAVLM:
    """The model a released config describes, on the meta device (no memory)."""
    tower_cls, _ = VISION_TOWERS[rc.vision_kind]
    with torch.device("meta"):
        dims = rc.target_dims if with_predictors else None
        return OLAVLM(rc.ola, LLM(rc.llm), tower_cls(rc.vision), dims, {"llm": None, "vision": None})


def from_released(
    folder: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    with_predictors: bool = True,
) -> OLAVLM:
    """A released OLA-VLM folder -> our OLAVLM in eval mode, strictly (see key_plan). `dtype` None keeps the
    stored one (IFT fp32, PT bf16); the model is allocated once and filled shard by shard, and the skipped
    teacher leftovers are never read. `model.released` keeps the parsed ReleasedConfig."""
    folder = Path(folder)
    config = read_json(folder / "config.json")
    shapes, files, dtypes = read_headers(folder)
    rc = parse_config(config, shapes, folder, str(folder / "config.json"))
    model = build_model(rc, with_predictors)
    plan, _ = key_plan(model, rc.layers, shapes, str(folder), files)
    model = model.to(dtype or dtypes["model.embed_tokens.weight"]).to_empty(device=device)
    state = model.state_dict()
    with torch.no_grad():
        for file in sorted({files[k] for k in plan}):
            tensors = read_state_dict(file, keep=lambda key: key in plan)
            for key, tensor in tensors.items():
                for ours, rows in plan[key]:
                    state[ours].copy_(tensor if rows is None else tensor[rows])
    if rc.image_aspect_ratio != "pad":
        warnings.warn(
            f"{folder}: image_aspect_ratio={rc.image_aspect_ratio!r} (center crop); inference here pads to a "
            f"square (docs/design.md §2)",
            stacklevel=2,
        )
    model.released = rc
    return model.eval()
