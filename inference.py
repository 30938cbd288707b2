"""Using a trained OLA-VLM (docs/design.md §10): loading a checkpoint and its chat tokenizer for inference,
the square view of an image, batched greedy (or sampled) answers with left padding, and streaming chat."""

from __future__ import annotations

import sys
from itertools import takewhile
from pathlib import Path

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

import shapes
from chat import ChatTokenizer
from ola import OLAVLM
from preprocess import square_view

DEFAULT_RUN = Path("runs/tiny")  # where `python train.py` writes
BUILTIN = Path("data_cache/builtin")  # the built-in data (and tokenizer) train.py uses


# ----------------------------------------------------------------------------- loading
def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_model(
    folder: str | Path,
    tokenizer: str | Path | None = None,
    with_predictors: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[OLAVLM, ChatTokenizer]:
    """An OLA checkpoint (train.py's `final`) in eval mode and its chat tokenizer. Checkpoints do not record
    their tokenizer: default = the LLM source folder's tokenizer.json, or the built-in one for a tiny LLM."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder}: not an OLA checkpoint (no config.json); train one with "
            f"`python train.py` or pass the checkpoint folder"
        )
    model = OLAVLM.from_checkpoint(folder, dtype=dtype, device=device, with_predictors=with_predictors).eval()
    llm_folder = model.sources.get("llm")
    path = Path(
        tokenizer
        or (
            Path(llm_folder) / "tokenizer.json"
            if llm_folder
            else shapes.builtin_dataset(BUILTIN)["tokenizer"]
        )
    )
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
) -> list[str]:
    """Answers to a batch of prompts (one image each, or none), greedy by default. OLAVLM.generate
    left-pads the spliced sequences, so the batch can mix prompt lengths."""
    rows = [torch.tensor(prompt_ids(tok, p, images is not None)) for p in prompts]
    ids = pad_sequence(rows, batch_first=True, padding_value=tok.pad_id)  # (B, T) right-padded
    mask = torch.arange(ids.shape[1]) < torch.tensor([len(r) for r in rows])[:, None]  # (B, T)
    device = model.projector[0].weight.device
    dtype = model.projector[0].weight.dtype
    pixels = torch.stack(images).to(device, dtype) if images is not None else None
    out = model.generate(
        ids.to(device),
        mask.to(device),
        images=pixels,
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

    images = [image_pixels(image, model.vision)[1]] if image else None
    text = answer(model, tok, [prompt], images, max_new_tokens, temperature, streamer)[0]
    stream.write("\n")
    return text
