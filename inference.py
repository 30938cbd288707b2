"""Using a trained OLA-VLM (docs/design.md §10): loading a checkpoint and its chat tokenizer for inference,
the square view of an image, batched greedy (or sampled) answers with left padding, and streaming chat."""

from __future__ import annotations

import sys
from itertools import takewhile
from pathlib import Path

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

import miniature
from checkpoint import from_checkpoint
from ola import OLAVLM
from preprocess import read_image, square_view
from tokenizer import ChatTokenizer, check_vocabulary, find_tokenizer

DEFAULT_RUN = Path("runs/tiny")  # where `python train.py` writes


# ----------------------------------------------------------------------------- loading
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
    model = from_checkpoint(folder, dtype=dtype, device=device, with_predictors=with_predictors).eval()
    path = find_tokenizer(tokenizer, folder, model.sources.get("llm"))
    if path is None and getattr(model, "released", None) is not None:
        raise FileNotFoundError(
            f"{folder}: a released checkpoint without tokenizer.json: pass --tokenizer (the tokenizer.json "
            f"of its LLM, e.g. Phi-3-mini-4k-instruct's)"
        )
    if path is None:  # a tiny LLM stored in the checkpoint: the built-in tokenizer
        path = Path(miniature.builtin()["tokenizer"])
    tok = ChatTokenizer(path, "phi3" if model.llm.config.model_type == "phi3" else "llama3")
    check_vocabulary(tok, model.llm.config.vocab_size)
    return model, tok


def prompt_ids(tok: ChatTokenizer, prompt: str, with_image: bool = True) -> list[int]:
    """One user turn ("<image>\\n" + prompt) ending with the assistant header: a generation prompt."""
    return tok.encode_conversation([{"from": "human", "value": prompt}], with_image)[0]


def image_pixels(path: str | Path, tower, view: str = "pad") -> tuple[Image.Image, torch.Tensor]:
    """The square view (pad at inference, crop for PT; docs/design.md §2) and the base encoder's pixels.
    An unreadable or refused image (preprocess.read_image) is a ValueError naming `path`."""
    square = square_view(read_image(path), view)
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
    teachers' pixels, for the baselines that take them. A prompt whose positions (its tokens, the image's
    image_seq_len - 1 beyond its placeholder, max_new_tokens) exceed the LLM's max_position_embeddings is
    refused: positions past those it was trained on give no answer worth having."""
    rows = [torch.tensor(prompt_ids(tok, p, images is not None)) for p in prompts]
    limit = model.llm.config.max_position_embeddings
    image = model.image_seq_len - 1 if images is not None else 0
    for prompt, row in zip(prompts, rows):
        total = len(row) + image + max_new_tokens
        if total > limit:
            shown = prompt if len(prompt) <= 40 else prompt[:40] + "..."
            raise ValueError(
                f"prompt {shown!r}: {len(row)} tokens + {image} image positions + {max_new_tokens} new "
                f"tokens = {total} positions, more than the LLM's {limit} (max_position_embeddings): shorten "
                f"the prompt or the answer"
            )
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
    out = model.generate(  # (B, n_new)
        ids.to(device),
        mask.to(device),
        images=pixels,
        teacher_images=fed,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_ids=tok.eos_ids,
        streamer=streamer,
    )
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
