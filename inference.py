"""Using a trained OLA-VLM (docs/design.md §10): loading a checkpoint and its chat tokenizer for inference,
the square view of an image, batched greedy (or sampled) answers with left padding, and streaming chat."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from itertools import takewhile
from pathlib import Path

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

import miniature
from chat import ChatTokenizer
from ola import OLAVLM
from preprocess import square_view

DEFAULT_RUN = Path("runs/tiny")  # where `python train.py` writes


# ----------------------------------------------------------------------------- loading
PRECISIONS = ("auto", "fp32", "bf16")  # --dtype of train.py, probe.py, eval.py


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype of the frozen weights and of autocast (docs/design.md §6): 'bf16', 'fp32', or 'auto' = bf16
    on a GPU, fp32 on a CPU. Trained weights stay fp32 (master weights) whatever it is."""
    if precision not in PRECISIONS:
        raise ValueError(f"--dtype: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def device_and_dtype(precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """cuda when there is one, else cpu, and its compute dtype."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, compute_dtype(device, precision)


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast when the compute dtype is bf16 (on a CPU too: AMX), else nothing."""
    if dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def load_model(
    folder: str | Path,
    tokenizer: str | Path | None = None,
    with_predictors: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[OLAVLM, ChatTokenizer]:
    """An OLA checkpoint (train.py's `final`) or a released OLA-VLM folder (docs/design.md §12) in eval mode,
    and its chat tokenizer: `tokenizer`, else the folder's own tokenizer.json (released folders ship one),
    else the LLM source folder's, else the built-in one for a tiny LLM."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder}: not an OLA checkpoint (no config.json); train one with "
            f"`python train.py` or pass the checkpoint folder"
        )
    model = OLAVLM.from_checkpoint(folder, dtype=dtype, device=device, with_predictors=with_predictors).eval()
    llm_folder = model.sources.get("llm")
    if tokenizer:
        path = Path(tokenizer)
    elif (folder / "tokenizer.json").is_file():
        path = folder / "tokenizer.json"
    elif llm_folder:
        path = Path(llm_folder) / "tokenizer.json"
    elif getattr(model, "released", None) is not None:
        raise FileNotFoundError(
            f"{folder}: a released checkpoint without tokenizer.json: pass --tokenizer (the tokenizer.json "
            f"of its LLM, e.g. Phi-3-mini-4k-instruct's)"
        )
    else:
        path = Path(miniature.builtin()["tokenizer"])
    tok = ChatTokenizer(path, "phi3" if model.llm.config.model_type == "phi3" else "llama3")
    if tok.vocab_size > model.llm.config.vocab_size:
        raise ValueError(
            f"tokenizer {path} has {tok.vocab_size} tokens, the LLM of {folder} only "
            f"{model.llm.config.vocab_size}: pass the tokenizer it was trained with (--tokenizer)"
        )
    return model, tok


def prompt_ids(tok: ChatTokenizer, prompt: str, with_image: bool = True) -> list[int]:
    """One user turn ("<image>\\n" + prompt) ending with the assistant header: a generation prompt."""
    return tok.encode_conversation([{"from": "human", "value": prompt}], with_image)[0]


def image_pixels(path: str | Path, tower, view: str = "pad") -> tuple[Image.Image, torch.Tensor]:
    """The square view (pad at inference, crop for PT; docs/design.md §2) and the base encoder's pixels."""
    try:
        with Image.open(path) as img:
            square = square_view(img.convert("RGB"), view)
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return square, tower.preprocess(square)


def image_inputs(model: OLAVLM, squares: list[Image.Image]) -> tuple[list[torch.Tensor], list[dict] | None]:
    """The base encoder's pixels of each square view, and the teachers' pixels of the multi-encoder
    baselines that take their features as input (Tab. 1; None for OLA-VLM and LLaVA-1.5)."""
    images = [model.vision.preprocess(square) for square in squares]
    if model.teachers is None:
        return images, None
    return images, [model.teachers.preprocess(square) for square in squares]


# ----------------------------------------------------------------------------- answers
@torch.no_grad()
def answer(
    model: OLAVLM,
    tok: ChatTokenizer,
    prompts: list[str],
    images: list[torch.Tensor] | None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    streamer=None,
    teacher_images: list[dict[str, torch.Tensor]] | None = None,
) -> list[str]:
    """Answers to a batch of prompts (one image each, or none), greedy by default. OLAVLM.generate
    left-pads the spliced sequences, so the batch can mix prompt lengths. `teacher_images`: image_inputs'
    teachers' pixels, for the baselines that take them."""
    rows = [torch.tensor(prompt_ids(tok, p, images is not None)) for p in prompts]
    ids = pad_sequence(rows, batch_first=True, padding_value=tok.pad_id)  # (B, T) right-padded
    mask = torch.arange(ids.shape[1]) < torch.tensor([len(r) for r in rows])[:, None]  # (B, T)
    device = model.projector[0].weight.device
    dtype = model.projector[0].weight.dtype
    pixels = torch.stack(images).to(device, dtype) if images is not None else None
    fed = None
    if teacher_images is not None:
        fed = {
            task: torch.stack([t[task] for t in teacher_images]).to(device, dtype)
            for task in teacher_images[0]
        }
    out = model.generate(
        ids.to(device),
        mask.to(device),
        images=pixels,
        teacher_images=fed,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_ids=tok.eos_ids,
        streamer=streamer,
    )  # (B, n_new)
    return [tok.decode(takewhile(lambda t: t not in tok.eos_ids, row)).strip() for row in out.tolist()]


# ----------------------------------------------------------------------------- chat
def chat(
    model: OLAVLM,
    tok: ChatTokenizer,
    prompt: str,
    image: str | Path | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    stream=sys.stdout,
) -> str:
    """Answer one prompt about one image (or none), printing the answer while it is generated."""
    ids = []
    shown = ""

    def streamer(next_id: torch.Tensor) -> None:  # LLM.generate calls it with each new id (B=1,)
        nonlocal shown
        if int(next_id[0]) in tok.eos_ids:  # generation stops after it
            return
        ids.append(int(next_id[0]))
        text = tok.decode(ids).strip()  # as `answer` returns it
        if not text.endswith("\ufffd"):  # else half of a multi-byte character: wait for the rest
            stream.write(text[len(shown) :])
            stream.flush()
            shown = text

    images = fed = None
    if image:
        images, fed = image_inputs(model, [image_pixels(image, model.vision)[0]])
    text = answer(model, tok, [prompt], images, max_new_tokens, temperature, streamer, fed)[0]
    stream.write("\n")
    return text
