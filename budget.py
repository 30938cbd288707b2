"""The 8B budget of OLA-VLM (`python bench.py --estimate`; README "Performance"): FLOPs per sample of PT and
IFT, memory per GPU with and without activation checkpointing and FSDP2, and hours for LLaVA-558K PT and
LLaVA-665K IFT on 8×H100, from the real configs (docs/design.md §1-§6, §8). Pure arithmetic: every
assumption is a named constant below and is printed with the table."""

from __future__ import annotations

# Llama-3-8B(-Instruct) (docs/design.md §8)
H, LAYERS, MLP, HEADS, KV_HEADS, VOCAB = 4096, 32, 14336, 32, 8, 128256
HKV = H // HEADS * KV_HEADS  # 1024: the width of k and of v
IMAGE, SEEK, SYS = 576, 24, 38  # image tokens, <g>|<d>|<s> × 8 (Tab. III), Llama-3 tokens before the image
# (width, MLP, blocks run, tokens): CLIP-L/14-336 (penultimate block: 23 of 24), DINOv2-L/14 at 336 px,
# CLIP-H/14 at 224 px (unCLIP's image encoder)
CLIP_L, DINO_L, CLIP_H = (1024, 4096, 23, 577), (1024, 4096, 24, 577), (1280, 5120, 32, 257)
SWIN_L = (192, (2, 2, 18, 2), 12, 768)  # stage-1 width, depths, window, input px (stage 4: 24×24×1536)
PREDICTORS = {"depth": (H, IMAGE, 1024), "seg": (1536, IMAGE, 1536), "gen": (1024, 1, 1024)}  # width, Q, C
LAYERS_PER_TASK = 2  # Tab. 3: two predictor layers per task
# Assumptions on the data and the machines (stated with the table)
PT_TEXT, PT_LABELS, PT_SAMPLES, PT_MICRO = 30, 20, 558_128, 32  # LLaVA-558K: a short BLIP caption
IFT_TEXT, IFT_LABELS, IFT_SAMPLES, IFT_MICRO = 300, 150, 665_298, 16  # LLaVA-665K: multi-turn answers
GPUS, PEAK = 8, 989e12  # H100 SXM, dense bf16 FLOP/s
GB = 1e9


def vit_flops(width: int, mlp: int, blocks: int, tokens: int) -> float:
    """Forward FLOPs of a ViT: 2 · params · tokens + 4 · tokens² · width per block (QKᵀ and AV)."""
    return blocks * (2 * (4 * width**2 + 2 * width * mlp) * tokens + 4 * tokens**2 * width)


def swin_flops() -> float:
    """Forward FLOPs of Swin-L at 768 px: blocks (12 C² params per token, 144-token windows) + merges."""
    c, depths, window, px = SWIN_L
    n, total = (px // 4) ** 2, 2 * (px // 4) ** 2 * 48 * c  # + the 4×4 patch embedding
    for stage, depth in enumerate(depths):
        total += depth * (24 * c**2 * n + 4 * n * window**2 * c)
        if stage < 3:
            total += 4 * n * c**2  # patch merging: Linear(4C -> 2C) on n / 4 tokens
            n, c = n // 4, 2 * c
    return total


def llm_flops(tokens: int, logits: int) -> float:
    """Forward FLOPs of the decoder: 2 · params · tokens + causal attention 2 · tokens² · H per layer, and
    the LM head at `logits` positions."""
    per_layer = 2 * (2 * H * H + 2 * H * HKV + 3 * H * MLP) * tokens + 2 * tokens**2 * H
    return LAYERS * per_layer + 2 * H * VOCAB * logits


def predictor_flops(tokens: int) -> float:
    """Forward FLOPs of every PT predictor (single-layer Perceiver resampler, 4 heads × 32)."""
    total = 0.0
    for width, q, c in PREDICTORS.values():
        keys = tokens - SEEK + 8 + q  # its keys: <sys>|<img>|own <t>|<txt>, plus the latents
        total += 2 * keys * H * width + 2 * keys * width * 256 + 4 * q * keys * 128  # proj_in, to_kv, attn
        total += 2 * q * width * 256 + 4 * q * width**2 + 2 * q * width * c  # to_q + to_out, FF, proj_out
    return LAYERS_PER_TASK * total


def flops_per_sample() -> dict[str, float]:
    """FLOPs of one sample: PT (ours: logits at the labels; theirs: at every position), IFT."""
    t_pt, t_ift = SYS + IMAGE + SEEK + PT_TEXT, SYS + IMAGE + SEEK + IFT_TEXT
    teachers = vit_flops(*DINO_L) + swin_flops() + vit_flops(*CLIP_H)
    projector = 2 * IMAGE * (1024 * H + H * H)
    frozen_llm = 2 * llm_flops(t_pt, PT_LABELS)  # frozen: backward = input gradients only (about 1× forward)
    pt = vit_flops(*CLIP_L) + teachers + 3 * projector + frozen_llm + 3 * predictor_flops(t_pt)
    # the released step also computes all logits and runs CLIP's 24th block
    released = pt + 2 * llm_flops(0, t_pt - PT_LABELS) + vit_flops(1024, 4096, 1, 577)
    ift = vit_flops(*CLIP_L) + 3 * projector + 3 * llm_flops(t_ift, IFT_LABELS)  # trained: 3× forward
    return {
        "pt": pt,
        "pt_released": released,
        "teachers": teachers,
        "ift": ift,
        "ift_ckpt": ift + llm_flops(t_ift, 0),
    }


def memory_gb(stage: str, checkpointing: bool, fsdp: bool) -> dict[str, float]:
    """Per GPU (GB): weights + gradients + AdamW states, and activations of a micro-batch. bf16 autocast, fp32
    master weights (16 B per trained parameter), frozen weights bf16 (docs/design.md §6), FlashAttention."""
    llm = LAYERS * (2 * H * H + 2 * H * HKV + 3 * H * MLP) + 2 * VOCAB * H  # 8.03 B
    clip = 24 * (4 * 1024**2 + 2 * 1024 * 4096)
    teachers = 304e6 + 197e6 + 632e6  # DINOv2-L, Swin-L, CLIP-H (bf16, never sharded)
    shard = GPUS if fsdp else 1
    if stage == "pt":
        trained = 2 * 1024 * H + 2 * IMAGE * H + 8 * H + 157.4e6  # projector, Q_depth, Q_seg, <g>, predictors
        states = (2 * (llm + clip) + 16 * trained) / shard + 2 * teachers
        micro, tokens, labels = PT_MICRO, SYS + IMAGE + SEEK + PT_TEXT, PT_LABELS
        per_token_layer = 12 * H + 4 * HKV + 6 * MLP  # frozen: norm inputs, q k v o, MLP acts
        block_input = 2 * H  # bf16 residual stream
        predictors = sum(
            LAYERS_PER_TASK * ((tokens + q) * w * 8 + q * w * 10) for w, q, _ in PREDICTORS.values()
        )
    else:
        states = (16 * llm + 2 * clip) / shard
        micro, tokens, labels = IFT_MICRO, SYS + IMAGE + SEEK + IFT_TEXT, IFT_LABELS
        per_token_layer = 32 * H + 4 * HKV + 8 * MLP  # + the bf16 inputs of every trained Linear
        block_input = 4 * H  # fp32 residual stream
        predictors = 0
    layers = LAYERS * tokens * (block_input if checkpointing else per_token_layer)
    recompute = tokens * per_token_layer if checkpointing else 0  # one block's activations during backward
    logits = labels * VOCAB * 10  # bf16 logits + fp32 log-softmax + its gradient, at the labels only
    activations = micro * (layers + recompute + logits + predictors)
    return {"states": states / GB, "activations": activations / GB, "total": (states + activations) / GB}


def estimate_table(mfu: float) -> str:
    """The budget as markdown: FLOPs and hours, memory per GPU, and the assumptions."""
    f = flops_per_sample()
    rate = GPUS * PEAK * mfu
    hours = {"pt": f["pt"] * PT_SAMPLES / rate / 3600, "ift": f["ift"] * IFT_SAMPLES / rate / 3600}
    ckpt_hours = f["ift_ckpt"] * IFT_SAMPLES / rate / 3600
    lines = [
        f"OLA-VLM, Llama-3-8B + CLIP-L/336 (+ DINOv2-L, Swin-L, CLIP-H in PT), {GPUS}×H100 at MFU {mfu:.0%}",
        "",
        "| stage | TFLOP / sample | samples | hours (8×H100) |",
        "|---|---|---|---|",
        f"| PT (LLaVA-558K), ours | {f['pt'] / 1e12:.1f} (teachers {f['teachers'] / 1e12:.2f}) | "
        f"{PT_SAMPLES:,} | {hours['pt']:.1f} |",
        f"| PT, released assembly (all-position logits, 24 CLIP blocks) | {f['pt_released'] / 1e12:.1f} | "
        f"{PT_SAMPLES:,} | {hours['pt'] * f['pt_released'] / f['pt']:.1f} |",
        f"| IFT (LLaVA-665K) | {f['ift'] / 1e12:.1f} ({f['ift_ckpt'] / 1e12:.1f} with checkpointing) | "
        f"{IFT_SAMPLES:,} | {hours['ift']:.1f} ({ckpt_hours:.1f}) |",
        "",
        "| memory per GPU (GB) | states | activations | total |",
        "|---|---|---|---|",
    ]
    for stage, micro in (("pt", PT_MICRO), ("ift", IFT_MICRO)):
        for ckpt in (False, True):
            for fsdp in (False, True):
                m = memory_gb(stage, ckpt, fsdp)
                name = (
                    f"{stage.upper()}, micro-batch {micro}, {'checkpointing' if ckpt else 'no checkpointing'}"
                )
                name += ", FSDP2" if fsdp else ", replicated"
                lines.append(f"| {name} | {m['states']:.1f} | {m['activations']:.1f} | {m['total']:.1f} |")
    lines += [
        "",
        f"Assumptions: PT samples = {SYS} + {IMAGE} + {SEEK} + {PT_TEXT} tokens ({PT_LABELS} labelled), "
        f"IFT samples = {SYS} + {IMAGE} + {SEEK} + {IFT_TEXT} tokens ({IFT_LABELS} labelled); micro-batch "
        f"{PT_MICRO} (PT, global 256) and {IFT_MICRO} (IFT, global 128) on {GPUS} GPUs; {PEAK / 1e12:.0f} "
        "TFLOP/s dense bf16 per H100; frozen backward = 1× forward, trained = 2×; bf16 autocast with fp32 "
        "master weights (16 B per trained parameter), frozen weights and teachers in bf16; FlashAttention "
        "(no T² activations); activations per token per layer 12H + 4H_kv + 6I bytes (PT, frozen LLM) and "
        "32H + 4H_kv + 8I (IFT); checkpointing keeps each block's input and recomputes one block at a "
        "time; the teachers' transient (no_grad) activations and allocator fragmentation are not counted.",
    ]
    return "\n".join(lines)
