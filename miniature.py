r"""The miniature (docs/design.md §9): the built-in world with every part of the paper's setting pretrained
the way its real counterpart was, built once on first use and cached, so that `python train.py` runs the
paper's pipeline with nothing downloaded.

    python miniature.py                 # build (or find) the cache and print what each part learned
    OLA_MINIATURE=fast python ...       # the small build the tests use (≈ 1½ minutes)

`builtin()` returns the folder of the current preset, `data_cache/builtin` (`builtin-fast`), building what is
missing: the world's data (shapes.py: PT captions, IFT QA, the held-out CV-Bench-style split, a tokenizer)
and, trained on scenes of their own streams (pretrain.py), a Llama-style LLM (`llm/`), the CLIP ViT base
encoder (`clip/`), and the three teachers (`depth/` DINOv2, `seg/` Swin, `gen/` a wider CLIP ViT), each
saved in its official Hugging Face layout, so the tiny preset loads them exactly as the real presets load
Llama-3, CLIP-L and the teachers. `report.json` holds every part's held-out scores against a trivial
predictor; manifest.json the build's settings, a SHA-256 of every file and one hash over them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

import pretrain
import shapes
from encoders import CLIPVision, CLIPVisionConfig, DINOv2, DINOv2Config
from llm import LLM, LLMConfig
from preprocess import resize_normalize
from swin import Swin, SwinConfig
from tokenizer import ChatTokenizer
from weights import build_once, read_json

PARTS = ("llm", "clip", "depth", "seg", "gen")  # the pretrained parts, each a folder of the build


@dataclass(frozen=True)
class MiniatureConfig:
    """What the build renders and how long it trains each part (steps × batch; lr of AdamW)."""

    seed: int = 0
    n_pt: int = 1000  # the world's PT captions, IFT records and held-out questions (shapes.write_world)
    n_ift: int = 2000
    n_val: int = 200
    vocab_size: int = 1000
    n_scenes: int = 3000  # pretraining scenes (stream "pre"), shared by every part
    n_check: int = 200  # the build's own held-out scenes (stream "check"), for report.json
    clip: tuple[int, int, float] = (1000, 64, 1e-3)
    gen: tuple[int, int, float] = (800, 64, 1e-3)
    depth: tuple[int, int, float] = (1000, 32, 1e-3)
    seg: tuple[int, int, float] = (400, 16, 2e-3)
    llm: tuple[int, int, float] = (1000, 16, 3e-3)


PRESETS = {
    "full": MiniatureConfig(),
    "fast": MiniatureConfig(
        n_pt=120,
        n_ift=160,
        n_val=40,
        n_scenes=300,
        n_check=80,
        clip=(120, 32, 2e-3),
        gen=(80, 32, 2e-3),
        depth=(300, 16, 2e-3),
        seg=(200, 16, 3e-3),
        llm=(80, 8, 3e-3),
    ),
}


# ----------------------------------------------------------------------------- the parts' sizes
def llm_config(tok: ChatTokenizer) -> LLMConfig:
    """The miniature LLM: the tiny preset of Llama-3's architecture (128 wide, 8 blocks, GQA 4 / 2) with the
    world tokenizer's vocabulary and special ids."""
    return replace(
        LLMConfig.preset("tiny"),
        vocab_size=tok.vocab_size,
        bos_token_id=tok.bos_ids[0],
        eos_token_ids=tuple(tok.eos_ids),
        pad_token_id=tok.pad_id,
    )


CLIP = replace(CLIPVisionConfig.tiny(), projection_dim=64)  # 112 px / 14 -> 8×8 tokens, 64 wide
GEN = replace(
    CLIPVisionConfig.tiny_unclip(), hidden_size=128, intermediate_size=512, n_layers=3, projection_dim=64
)
DEPTH = replace(DINOv2Config.tiny(), image_size=112)  # native 8×8 grid at the teacher's 112 px
DEPTH_OUT_INDICES = (1, 2, 3, 4)  # hidden states averaged into the target: every block, as DAv2's four
SEG = SwinConfig.tiny()  # 256 px -> stage 4 8×8×128


# ----------------------------------------------------------------------------- the jobs
def _clip_job(cfg: MiniatureConfig, folder: Path, part: str) -> dict:
    """The base encoder (part "clip") or the gen teacher ("gen"): CLIP's contrastive recipe."""
    tok = ChatTokenizer(folder / "tokenizer.json")
    train, check = (
        pretrain.render_scenes(s, n, cfg.seed) for s, n in (("pre", cfg.n_scenes), ("check", cfg.n_check))
    )
    torch.manual_seed(cfg.seed)
    tower = CLIPVision(CLIP if part == "clip" else GEN)
    # CLIP's own initialisation of the position table (N(0, 0.02)), not the unit-scale one that makes an
    # untrained tower's tokens carry their place: at unit scale positions drown the patches' colours
    torch.nn.init.normal_(tower.pos_embed, std=0.02)
    pixels, check_pixels = (pretrain.views(s.images, tower.preprocess) for s in (train, check))
    captions, check_captions = ([tok.encode(c) for c in s.captions] for s in (train, check))
    report = {}
    if part == "clip":  # what a linear read of the tokens finds, before and after pretraining
        report["random"] = _carry(tower, train, check, pixels, check_pixels)
    steps, batch, lr = getattr(cfg, part)
    text, scale, losses = pretrain.contrastive(
        tower, pixels, captions, tok.vocab_size, steps, batch, lr, cfg.seed, f"pretrain {part}"
    )
    report["retrieval_top1"] = pretrain.retrieval_top1(tower, text, check_pixels, check_captions)
    report["chance"] = 1 / cfg.n_check
    if part == "clip":
        report["pretrained"] = _carry(tower, train, check, pixels, check_pixels)
    tower.save_pretrained(folder / part)
    return {**report, "loss": _ends(losses)}


def _carry(tower, train, check, pixels, check_pixels) -> dict:
    n = min(len(train), 600)
    depth = torch.cat([train.depth[:n], check.depth])
    classes = torch.cat([train.classes[:n], check.classes])
    return pretrain.what_tokens_carry(tower, torch.cat([pixels[:n], check_pixels]), depth, classes, n)


def _depth_job(cfg: MiniatureConfig, folder: Path, part: str = "depth") -> dict:
    train, check = (
        pretrain.render_scenes(s, n, cfg.seed) for s, n in (("pre", cfg.n_scenes), ("check", cfg.n_check))
    )
    torch.manual_seed(cfg.seed)
    encoder = DINOv2(DEPTH)
    blocks = [i - 1 for i in DEPTH_OUT_INDICES]

    def features(x: torch.Tensor) -> torch.Tensor:  # = DepthTeacher.features
        return torch.stack(encoder.intermediate_layers(x, blocks)).mean(0)

    size = DEPTH.image_size
    pixels, check_pixels = (
        pretrain.views(s.images, lambda im: resize_normalize(im, size)) for s in (train, check)
    )
    depth, check_depth = (pretrain.resize_map(s.depth, size) for s in (train, check))
    steps, batch, lr = cfg.depth
    head, losses = pretrain.depth_regression(encoder, features, pixels, depth, steps, batch, lr, cfg.seed)
    pred = pretrain.batched(lambda x: head(features(x)), check_pixels)
    constant = depth.mean(0).expand_as(check_depth)  # the per-pixel mean depth of the training scenes
    encoder.save_pretrained(folder / part, DEPTH_OUT_INDICES)
    return {
        "teacher": pretrain.depth_scores(pred, check_depth),
        "constant": pretrain.depth_scores(constant, check_depth),
        "loss": _ends(losses),
    }


def _seg_job(cfg: MiniatureConfig, folder: Path, part: str = "seg") -> dict:
    train, check = (
        pretrain.render_scenes(s, n, cfg.seed) for s, n in (("pre", cfg.n_scenes), ("check", cfg.n_check))
    )
    torch.manual_seed(cfg.seed)
    encoder = Swin(SEG)
    size, cells = 256, 64  # the teacher's input (grid 8 × 32 px); 8 × 8 cells per token
    pixels, check_pixels = (
        pretrain.views(s.images, lambda im: resize_normalize(im, size)) for s in (train, check)
    )
    classes, check_classes = (pretrain.resize_map(s.classes, cells) for s in (train, check))
    steps, batch, lr = cfg.seg
    head, losses = pretrain.segmentation(encoder, pixels, classes, steps, batch, lr, cfg.seed)
    pred = pretrain.batched(lambda x: head(encoder(x)), check_pixels, 16).argmax(1)
    encoder.save_pretrained(folder / part)
    return {  # against the per-pixel most frequent class of the training scenes
        "teacher": pretrain.seg_scores(pred, check_classes),
        "constant": pretrain.seg_scores(classes.mode(0).values.expand_as(check_classes), check_classes),
        "loss": _ends(losses),
    }


def _llm_job(cfg: MiniatureConfig, folder: Path, part: str = "llm") -> dict:
    tok = ChatTokenizer(folder / "tokenizer.json")
    train, check = (
        pretrain.render_scenes(s, n, cfg.seed) for s, n in (("pre", cfg.n_scenes), ("check", cfg.n_check))
    )
    sequences = pretrain.lm_sequences(tok, train.conversations)
    check_sequences = pretrain.lm_sequences(tok, check.conversations)
    torch.manual_seed(cfg.seed)
    llm = LLM(llm_config(tok))
    steps, batch, lr = cfg.llm
    losses = pretrain.language_model(llm, sequences, tok.pad_id, steps, batch, lr, cfg.seed)
    with torch.no_grad():
        held_out = pretrain.lm_loss(llm, check_sequences, tok.pad_id).item()
    llm.save_pretrained(folder / part)
    shutil.copy(folder / "tokenizer.json", folder / part / "tokenizer.json")
    return {
        "ntp_loss": held_out,
        "unigram_loss": pretrain.unigram_loss(sequences, check_sequences, tok.vocab_size),
        "loss": _ends(losses),
    }


def _ends(losses: list[float]) -> dict:
    """Mean of the first and of the last 10 training losses."""
    return {"first": sum(losses[:10]) / len(losses[:10]), "last": sum(losses[-10:]) / len(losses[-10:])}


JOBS = {"clip": _clip_job, "gen": _clip_job, "depth": _depth_job, "seg": _seg_job, "llm": _llm_job}


def _start_worker(steps) -> None:
    """A build worker: one core (two parts side by side: tiny matrices scale badly with threads), and its
    training steps counted in the shared `steps` for the build's one progress bar."""
    torch.set_num_threads(1)

    def count() -> None:
        with steps.get_lock():
            steps.value += 1

    pretrain.on_step = count


def _run_job(part: str, cfg: MiniatureConfig, folder: Path) -> tuple[dict, float]:
    t0 = time.time()
    report = JOBS[part](cfg, folder, part)
    return report, time.time() - t0


# ----------------------------------------------------------------------------- the build
def build(folder: Path, cfg: MiniatureConfig, workers: int = 2) -> None:
    """Write the world's data, then train every part (two at a time, longest first) into `folder`, with one
    progress bar over all their steps; report.json gets each part's held-out scores."""
    t0 = time.time()
    shapes.write_world(folder, cfg.seed, cfg.n_pt, cfg.n_ift, cfg.n_val, cfg.vocab_size)
    print(f"  world data: {time.time() - t0:.0f} s", file=sys.stderr)
    context = multiprocessing.get_context("spawn")
    steps = context.Value("l", 0)
    order = ("llm", "clip", "seg", "depth", "gen")
    report = {}
    with ProcessPoolExecutor(workers, context, _start_worker, (steps,)) as pool:
        futures = {pool.submit(_run_job, part, cfg, folder): part for part in order}
        total = sum(getattr(cfg, part)[0] for part in order)
        with tqdm(total=total, desc="pretraining the parts", unit="step", dynamic_ncols=True) as bar:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=1)
                for future in done:
                    scores, seconds = future.result()
                    report[futures[future]] = scores
                    bar.write(f"  {futures[future]}: {seconds:.0f} s")
                bar.update(steps.value - bar.n)
    report = {part: report[part] for part in order}  # no timings: two builds must be identical
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    print(f"  built in {time.time() - t0:.0f} s", file=sys.stderr)


def builtin(preset: str | None = None) -> dict[str, Path]:
    """The built-in world and its pretrained parts for `preset` (default: $OLA_MINIATURE, else "full"),
    built on first use. -> shapes.world_paths + {part: folder} + "report"."""
    preset = preset or os.environ.get("OLA_MINIATURE", "full")
    if preset not in PRESETS:
        raise ValueError(f"OLA_MINIATURE={preset!r}: expected one of {list(PRESETS)}")
    cache = Path(os.environ.get("OLA_DATA_CACHE", "data_cache"))
    root = cache / ("builtin" if preset == "full" else f"builtin-{preset}")
    cfg = PRESETS[preset]
    config = {"miniature": 1, "world": shapes.WORLD_VERSION, **asdict(cfg)}
    build_once(root, config, lambda tmp: build(tmp, cfg), f"miniature ({preset} preset: minutes)")
    return {
        **shapes.world_paths(root),
        **{part: root / part for part in PARTS},
        "report": root / "report.json",
    }


def teacher_folders(tasks) -> dict[str, str]:
    """{task: the miniature's trained teacher folder}, the default teachers of the built-in world."""
    paths = builtin()
    return {task: str(paths[task]) for task in tasks}


if __name__ == "__main__":
    paths = builtin(sys.argv[1] if len(sys.argv) > 1 else None)
    print(json.dumps(read_json(paths["report"]), indent=1))
