"""LLaVA-style data for OLA-VLM (SPEC §4): tokenizer + chat templates with checked labels,
a procedurally generated built-in image–text set, the lazy LLaVA JSON dataset, collate, and a
resumable distributed loader.

Read top to bottom:
1. ChatTokenizer   — a `tokenizer.json` + the llama3 / phi3 template -> (input_ids, labels)
2. train_tokenizer — the tiny Llama-3-style BPE of the built-in data
3. builtin_dataset — Pillow-drawn shape scenes: PT captions, IFT QA, a CV-Bench-style val split
4. LLaVADataset    — one record -> ids, labels, image tensor (+ teacher inputs); bad records skipped
5. collate / Loader / make_loader — the batch dict of CONTRACT; exact resume by (epoch, batches_done)
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.utils.data import DataLoader, Dataset

from encoders import clip_preprocess, square_view

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id, replaced by image + task tokens in the model
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- 1. chat templates
@dataclass(frozen=True)
class ChatTemplate:
    """MPT-style LLaVA template: prompt = system + sep + Σ(role + message + sep) (official §5.4)."""
    system: str
    user: str
    assistant: str
    sep: str  # end-of-turn token, a label target after every answer
    end_of_text: str  # the tokenizer's end-of-text token: second stop id, and the pad id


TEMPLATES = {
    "llama3": ChatTemplate(
        system="<|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an "
               "artificial intelligence assistant. The assistant gives helpful, detailed, and polite "
               "answers to the user's questions.",
        user="<|start_header_id|>user<|end_header_id|>\n\n",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
        sep="<|eot_id|>", end_of_text="<|end_of_text|>"),
    "phi3": ChatTemplate(
        system="<|system|>\nYou are a helpful AI assistant.", user="\n<|user|>\n",
        assistant="\n<|assistant|>\n", sep="<|end|>", end_of_text="<|endoftext|>"),
}


class LabelMismatchError(RuntimeError):
    """The labelled tokens of a sample do not decode to its answers + end-of-turn tokens."""


class ChatTokenizer:
    """A `tokenizer.json` (read with `tokenizers`) and a chat template (SPEC §4).

    Special-token ids are looked up by string. `bos_ids` is what the file's post-processor
    prepends (Llama-3: `<|begin_of_text|>`). `eos_ids` = (end-of-turn, end-of-text) are the stop
    ids for generation. `pad_id` is the end-of-text token: Llama-3 has no pad token, and any
    existing id works because padded positions are masked (attention_mask False, labels -100);
    the official code instead adds a `<pad>` row (vocab 128257, official §5.3), we do not resize.
    """

    def __init__(self, path: str | os.PathLike, template: str = "llama3"):
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; expected one of {sorted(TEMPLATES)}")
        self.path, self.name, self.template = str(path), template, TEMPLATES[template]
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (expected a tokenizer.json)")
        self.tok = Tokenizer.from_file(self.path)
        t = self.template
        for special in re.findall(r"<\|[^|]+\|>", t.system + t.user + t.assistant + t.sep + t.end_of_text):
            i = self.tok.token_to_id(special)
            if i is None or self.encode(special) != [i]:
                raise ValueError(f"{self.path}: template {template!r} needs {special!r} as a single "
                                 f"special token, but the tokenizer encodes it as {self.encode(special)}")
        self.sep_id = self.tok.token_to_id(t.sep)
        self.pad_id = self.tok.token_to_id(t.end_of_text)
        self.eos_ids = (self.sep_id, self.pad_id)
        self.bos_ids = self.tok.encode("").ids
        if self.tok.encode("a").ids != self.bos_ids + self.encode("a"):
            raise ValueError(f"{self.path}: the post-processor must only prepend tokens (a BOS), "
                             f"got {self.tok.encode('a').tokens} for 'a'")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, special tokens in the text matched, nothing added."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def n_prefix_tokens(self) -> int:
        """Tokens before the image placeholder: OLA-VLM's NUM_SYS_TOKENS (38 Llama-3, 13 Phi-3)."""
        ids, _ = self.encode_conversation([{"from": "human", "value": "x"}], with_image=True)
        return ids.index(IMAGE_TOKEN_INDEX)

    def _messages(self, conversations: list, with_image: bool) -> list[str]:
        """Validated, stripped messages; with an image, `<image>` is moved (or, if absent,
        inserted) to the front of the first user turn as "<image>\\n" + text (official §5.4)."""
        if not isinstance(conversations, list) or not conversations:
            raise ValueError(f"'conversations' must be a non-empty list, got {conversations!r:.60}")
        messages = []
        for k, turn in enumerate(conversations):
            role = ("human", "gpt")[k % 2]
            if not isinstance(turn, dict) or turn.get("from") != role or not isinstance(turn.get("value"), str):
                raise ValueError(f"turn {k}: expected {{'from': '{role}', 'value': str}}, got {turn!r:.80}")
            messages.append(turn["value"])
        n_images = sum(m.count(IMAGE_TOKEN) for m in messages)
        if not with_image and n_images:
            raise ValueError(f"'{IMAGE_TOKEN}' in the text but the record has no 'image'")
        if n_images > 1:
            raise ValueError(f"{n_images} '{IMAGE_TOKEN}' placeholders; one image per sample is supported")
        # strip like Llama-3's own chat template (`| trim`): answers never start with whitespace that
        # an rstrip special token (Phi-3's <|assistant|>) would swallow
        messages = [m.replace(IMAGE_TOKEN, "").strip() for m in messages]
        if with_image:
            messages[0] = (IMAGE_TOKEN + "\n" + messages[0]).strip()
        return messages

    def encode_conversation(self, conversations: list, with_image: bool,
                            sample_id: str = "?") -> tuple[list[int], list[int]]:
        """LLaVA conversations [{"from": "human"|"gpt", "value": str}, ...] -> (input_ids, labels).

        input_ids follow `tokenizer_image_token` (official §5.5): the prompt is split on `<image>`,
        chunks are encoded separately, BOS kept once, chunks joined with IMAGE_TOKEN_INDEX.
        Labels: a token is a target iff it starts inside an answer or its end-of-turn token
        (character offsets); then, per answer, the labelled tokens must decode to exactly
        answer + sep, else LabelMismatchError naming `sample_id`. A trailing human turn gives a
        generation prompt ending with the assistant header (no targets). Malformed -> ValueError.
        """
        t = self.template
        pieces = [(t.system + t.sep, False)]
        for k, message in enumerate(self._messages(conversations, with_image)):
            pieces.append((message + t.sep, True) if k % 2 else (t.user + message + t.sep + t.assistant, False))
        text, spans, pos = "", [], 0
        for piece, target in pieces:
            if target:
                spans.append((pos, pos + len(piece)))
            text, pos = text + piece, pos + len(piece)

        ids, starts = list(self.bos_ids), [-1] * len(self.bos_ids)  # starts: char offset per token
        pos = 0
        for k, chunk in enumerate(text.split(IMAGE_TOKEN)):
            if k:
                ids.append(IMAGE_TOKEN_INDEX)
                starts.append(-1)
                pos += len(IMAGE_TOKEN)
            enc = self.tok.encode(chunk, add_special_tokens=False)
            ids += enc.ids
            starts += [pos + a for a, _ in enc.offsets]
            pos += len(chunk)

        labels = [IGNORE_INDEX] * len(ids)
        for n, (a, b) in enumerate(spans):
            inside = [j for j, s in enumerate(starts) if a <= s < b]
            for j in inside:
                labels[j] = ids[j]
            got = self.decode([ids[j] for j in inside], skip_special_tokens=False)
            if got != text[a:b] or not inside or ids[inside[-1]] != self.sep_id:
                raise LabelMismatchError(
                    f"sample {sample_id}: the labelled tokens of answer {n} decode to {got!r}, expected "
                    f"{text[a:b]!r} (tokenizer {self.path}, template {self.name})")
        return ids, labels


# ----------------------------------------------------------------------------- 2. tiny tokenizer
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>",
                   *(f"<|reserved_special_token_{i}|>" for i in range(4)),
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_tokenizer(texts: Iterable[str], path: str | os.PathLike, vocab_size: int = 1000) -> Path:
    """Train a Llama-3-style byte-level BPE on `texts` and save it as `path` (weights.md §5):
    Llama-3 split regex + ByteLevel, the 10 first Llama-3 specials, BOS via TemplateProcessing.
    Deterministic for the same texts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(LLAMA3_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = LLAMA3_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(path))
    return Path(path)


# ----------------------------------------------------------------------------- 3. built-in data
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "purple": (140, 60, 180), "orange": (245, 140, 30)}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (128, 128, 128), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIDES = {"circle": "A circle has no corners.", "square": "A square has four sides.",
         "triangle": "A triangle has three sides.", "diamond": "A diamond has four sides."}
NUMBERS = ("zero", "one", "two", "three", "four", "five")
PT_PROMPTS = ("Describe the image concisely.", "Provide a brief description of the given image.",
              "Give a short and clear explanation of the subsequent image.",
              "Summarize the visual content of the image.", "What is in the photo?",
              "Write a terse but informative summary of the picture.")
# CV-Bench answer instruction (SPEC §6); IFT teaches it, eval.py appends it to val prompts
MC_SUFFIX = "\nOnly answer the option as the output. For example, if your answer is the option A, answer (A)."
IMAGE_SIZE = 128


@dataclass
class Shape:
    kind: str
    color: str
    size: int  # side of the bounding box, pixels
    x: float  # centre
    y: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return self.x - h, self.y - h, self.x + h, self.y + h

    def where(self) -> str:
        col = ("left", "center", "right")[min(2, int(self.x * 3 / IMAGE_SIZE))]
        row = ("top", "middle", "bottom")[min(2, int(self.y * 3 / IMAGE_SIZE))]
        if row == "middle":
            return "in the center" if col == "center" else f"on the {col}"
        return f"at the {row}" if col == "center" else f"in the {row} {col}"


def _scene(rng: random.Random) -> tuple[str, list[Shape]]:
    """A background colour and 1-4 shapes of distinct colours (so "the red X" is unique)."""
    shapes = []
    for color in rng.sample(list(COLORS), rng.randint(1, 4)):
        size = rng.randint(16, 52)
        x, y = (rng.uniform(size / 2, IMAGE_SIZE - size / 2) for _ in range(2))
        shapes.append(Shape(rng.choice(SHAPES), color, size, x, y))
    return rng.choice(list(BACKGROUNDS)), shapes


def _draw(background: str, shapes: list[Shape]) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    for s in shapes:  # later shapes are drawn on top
        x0, y0, x1, y1 = s.box()
        fill = COLORS[s.color]
        if s.kind == "circle":
            d.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            d.rectangle((x0, y0, x1, y1), fill=fill)
        elif s.kind == "triangle":
            d.polygon([(s.x, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            d.polygon([(s.x, y0), (x1, s.y), (s.x, y1), (x0, s.y)], fill=fill)
    return img


def _overlaps(a: Shape, b: Shape) -> bool:
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box(), b.box()
    return ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1


def _caption(rng: random.Random, background: str, shapes: list[Shape]) -> str:
    n = len(shapes)
    parts = [f"a {('small', 'medium', 'large')[(s.size >= 28) + (s.size >= 40)]} {s.name} {s.where()}" for s in shapes]
    listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    opening = rng.choice(("A {bg} background with {n}: {l}.", "An image of {n} on a {bg} background: {l}.",
                          "{N} on a {bg} background: {l}."))
    count = f"{NUMBERS[n]} shape{'s' * (n > 1)}"
    text = opening.format(bg=background, n=count, N=count.capitalize(), l=listed)
    for i, a in enumerate(shapes):
        for b in shapes[i + 1:]:
            if _overlaps(a, b):
                text += f" The {b.name} overlaps the {a.name}."
    return text


def _pairs(shapes: list[Shape], key: Callable[[Shape], float], margin: float) -> list[tuple[Shape, Shape]]:
    """Ordered pairs (a, b) with key(a) < key(b) - margin: unambiguous comparisons only."""
    return [(a, b) for a in shapes for b in shapes if key(a) < key(b) - margin]


def _questions(rng: random.Random, background: str, shapes: list[Shape]) -> list[tuple[str, str]]:
    """Every applicable (question, answer) pair for a scene, in LLaVA-665K style."""
    n, kinds = len(shapes), [s.kind for s in shapes]
    qa = [("How many shapes are in the image?", f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} "
                                                f"shape{'s' * (n > 1)}."),
          ("What color is the background?", f"The background is {background}.")]
    qa += [(f"What color is the {k}?", f"The {k} is {s.color}.") for k, s in zip(kinds, shapes)
           if kinds.count(k) == 1]
    qa += [(f"What shape is the {s.color} object?", f"It is a {s.kind}.") for s in shapes]
    kind = rng.choice(SHAPES)
    qa.append((f"Is there a {kind} in the image?", "Yes." if kind in kinds else "No."))
    for a, b in _pairs(shapes, lambda s: s.x, 12):  # a is left of b
        p, q = rng.sample([a, b], 2)
        qa.append((f"Which is further to the left, the {p.name} or the {q.name}?", f"The {a.name}."))
    for a, b in _pairs(shapes, lambda s: s.y, 12):  # a is above b
        p, q = rng.sample([a, b], 2)
        qa.append((f"Is the {p.name} above or below the {q.name}?",
                   f"The {p.name} is {'above' if p is a else 'below'} the {q.name}."))
    for a, b in _pairs(shapes, lambda s: s.size, 8):  # b is bigger
        p, q = rng.sample([a, b], 2)
        qa.append((f"Which is bigger, the {p.name} or the {q.name}?", f"The {b.name} is bigger."))
    return qa


def _multiple_choice(rng: random.Random, shapes: list[Shape]) -> list[tuple[str, str, list[str], str]]:
    """CV-Bench-style (task, prompt with options, choices, "(X)") for Count, Relation and Size."""
    n = len(shapes)
    out = [("Count", "How many shapes are in the image?", str(n),
            rng.sample([str(k) for k in range(1, 6) if k != n], 3))]
    if pairs := _pairs(shapes, lambda s: s.x, 12):  # a is left of b
        a, b = rng.choice(pairs)
        p, q = rng.sample([a, b], 2)
        out.append(("Relation", f"Considering the relative positions of the {p.name} and the {q.name} in the image, "
                    f"where is the {p.name} located with respect to the {q.name}?",
                    "left" if p is a else "right", ["right" if p is a else "left"]))
    if pairs := _pairs(shapes, lambda s: s.size, 8):  # b is bigger
        a, b = rng.choice(pairs)
        out.append(("Size", "Which object is bigger?", f"the {b.name}", [f"the {a.name}"]))
    items = []
    for task, question, right, wrong in out:
        choices = rng.sample([right] + wrong, len(wrong) + 1)
        options = "\n".join(f"({c}) {x}" for c, x in zip("ABCD", choices))
        items.append((task, f"{question} Select from the following choices.\n{options}", choices,
                      f"({'ABCD'[choices.index(right)]})"))
    return items


def _text_only(rng: random.Random) -> list[tuple[str, str]]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
            (f"How many sides does a {(k := rng.choice(SHAPES))} have?", SIDES[k]),
            ("Name a primary color.", f"{rng.choice(['Red', 'Blue', 'Yellow'])} is a primary color.")]


def _conversation(qa: list[tuple[str, str]]) -> list[dict]:
    return [{"from": r, "value": v} for q, a in qa for r, v in (("human", q), ("gpt", a))]


def builtin_dataset(root: str | os.PathLike = "data_cache/builtin", seed: int = 0, n_pt: int = 300,
                    n_ift: int = 500, n_val: int = 100, vocab_size: int = 1000) -> dict[str, Path]:
    """Write (once) the built-in image-text set in LLaVA layout and return its paths:
    {"root", "images", "pt" (558K-like captions), "ift" (665K-like multi-turn QA, 10% text-only),
    "qa_val" (CV-Bench-style jsonl: id, image, task, question, choices, answer "(X)"),
    "tokenizer" (trained on all of the text)}. Deterministic by `seed`. Written to a temporary
    folder then renamed, so a folder with `manifest.json` is complete; safe on many ranks.
    """
    root = Path(root)
    config = {"seed": seed, "n_pt": n_pt, "n_ift": n_ift, "n_val": n_val, "vocab_size": vocab_size}
    paths = {"root": root, "images": root / "images", "pt": root / "pt.json", "ift": root / "ift.json",
             "qa_val": root / "qa_val.jsonl", "tokenizer": root / "tokenizer.json"}
    manifest = root / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()) == config:
        return paths
    if root.exists() and not manifest.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not a built-in data folder (no manifest.json)")
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    records: dict[str, list[dict]] = {"pt": [], "ift": [], "val": []}
    for split, n in (("pt", n_pt), ("ift", n_ift), ("val", n_val)):
        for i in range(n):
            rng = random.Random(f"{seed}-{split}-{i}")
            record = {"id": f"{split}_{i:05d}"}
            if split == "ift" and i % 10 == 9:  # text-only records, as in LLaVA-665K
                record["conversations"] = _conversation(rng.sample(_text_only(rng), rng.randint(1, 2)))
            else:
                background, shapes = _scene(rng)
                record["image"] = f"{record['id']}.png"
                _draw(background, shapes).save(tmp / "images" / record["image"])
                if split == "val":
                    task, prompt, choices, answer = rng.choice(_multiple_choice(rng, shapes))
                    record.update(task=task, type="2D", source="builtin", question=prompt.split(" Select")[0],
                                  choices=choices, prompt=prompt, answer=answer)
                else:
                    if split == "pt":
                        qa = [(rng.choice(PT_PROMPTS), _caption(rng, background, shapes))]
                    else:  # 1-3 free-form turns and one CV-Bench-style multiple-choice turn, in random order
                        qa = rng.sample(_questions(rng, background, shapes), rng.randint(1, 3))
                        _, prompt, _, answer = rng.choice(_multiple_choice(rng, shapes))
                        qa.insert(rng.randint(0, len(qa)), (prompt + MC_SUFFIX, answer))
                    q = qa[0][0]  # LLaVA files put <image> before or after the first question
                    qa[0] = (f"{IMAGE_TOKEN}\n{q}" if rng.random() < 0.7 else f"{q}\n{IMAGE_TOKEN}", qa[0][1])
                    record["conversations"] = _conversation(qa)
            records[split].append(record)
    (tmp / "pt.json").write_text(json.dumps(records["pt"], indent=1))
    (tmp / "ift.json").write_text(json.dumps(records["ift"], indent=1))
    (tmp / "qa_val.jsonl").write_text("".join(json.dumps(v) + "\n" for v in records["val"]))
    texts = [TEMPLATES["llama3"].system] + [v["prompt"] + MC_SUFFIX for v in records["val"]]
    texts += [t["value"] for r in records["pt"] + records["ift"] for t in r["conversations"]]
    train_tokenizer(texts, tmp / "tokenizer.json", vocab_size)
    (tmp / "manifest.json").write_text(json.dumps(config))
    old = root.with_name(f"{root.name}.old{os.getpid()}")
    if root.exists():  # built with other settings: replace
        root.rename(old)
    try:
        tmp.rename(root)
    except OSError:  # another rank finished first
        shutil.rmtree(tmp)
    shutil.rmtree(old, ignore_errors=True)
    return paths


# ----------------------------------------------------------------------------- 4. dataset
def read_records(path: str | os.PathLike) -> list:
    """A LLaVA `.json` list of records, or `.jsonl` (one record a line, official §5.6).
    Malformed JSON -> ValueError naming the file and line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if "jsonl" in path.name:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                records += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON line ({e.msg} at column {e.colno})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    return records


class BadSample(Exception):
    """A record that cannot be used (malformed, unreadable image, too long): skipped and counted."""


class LLaVADataset(Dataset):
    """LLaVA records (558K, ALLaVA, 665K incl. multi-turn and text-only) -> training samples, lazily.

    view: 'crop' (PT) or 'pad' (VPT/IFT): the square view the base encoder and the teachers see
    (SPEC §1, §4). A sample is {"id", "input_ids" (T,), "labels" (T,), "image" (3, S, S) | None,
    "targets" {task: (3, s, s)} | None, "skipped"}. `image_seq_len` = the positions the
    placeholder becomes in the model (image tokens + 24 task tokens); a sequence longer than
    `max_length` positions is cut at the end, never through the placeholder.

    Bad records are skipped, each with a log line naming the file, record and reason:
    no 'conversations' or a malformed one; `<image>` in the text without an 'image' field;
    a missing or unreadable image file; an image that does not fit in `max_length`. An 'image'
    field without `<image>` is not bad: the placeholder is inserted at the front of the first
    user turn (where the model puts the image anyway). A skipped record is replaced by the next
    good one (i+1, i+2, ...), so batches keep their size on every rank and DataLoader workers need
    no special handling; the reads skipped on the way are listed in sample["skipped"] and counted
    in the main process by `count_bad` (the Loader calls it). The run stops with an error when
    the bad fraction exceeds `max_bad_fraction`: while running it is measured over at least 100
    reads, at the end of each pass over all reads. A label mismatch (LabelMismatchError) is a
    bug, not bad data: it always stops the run.
    """

    def __init__(self, records: str | os.PathLike, image_folder: str | os.PathLike, tokenizer: ChatTokenizer,
                 view: str = "pad", image_size: int = 336,
                 target_preprocess: Callable[[Image.Image], dict[str, torch.Tensor]] | None = None,
                 max_length: int = 4096, image_seq_len: int = 576 + 24, max_bad_fraction: float = 0.1):
        if view not in ("crop", "pad"):
            raise ValueError(f"view must be 'crop' or 'pad', got {view!r}")
        self.path, self.image_folder = str(records), Path(image_folder)
        self.records = read_records(records)
        if not self.records:
            raise ValueError(f"{records}: no records")
        self.tokenizer, self.view, self.image_size = tokenizer, view, image_size
        self.target_preprocess, self.max_length, self.image_seq_len = target_preprocess, max_length, image_seq_len
        self.max_bad_fraction = max_bad_fraction
        self.bad_samples: dict[str, str] = {}  # "file record i (id ...)" -> reason, distinct records
        self.n_reads = self.n_bad = 0  # reads, bad reads (a record read twice counts twice)

    def __len__(self) -> int:
        return len(self.records)

    def where(self, i: int) -> str:
        record = self.records[i]
        sid = record.get("id", "?") if isinstance(record, dict) else "?"
        return f"{self.path} record {i} (id {sid})"

    def __getitem__(self, i: int) -> dict:
        skipped = []
        for j in range(i, i + len(self.records)):
            j %= len(self.records)
            try:
                return {**self.load(j), "skipped": skipped}
            except BadSample as e:
                log.warning("skipping %s: %s", self.where(j), e)
                skipped.append((self.where(j), str(e)))
                self.check(len(skipped), len(skipped), dict(skipped), final=False)
        self.check(len(skipped), len(skipped), dict(skipped), final=True)
        raise RuntimeError(f"{self.path}: all {len(self.records)} records are bad")

    def load(self, i: int) -> dict:
        """Record i -> sample; raises BadSample."""
        record = self.records[i]
        if not isinstance(record, dict) or "conversations" not in record:
            raise BadSample("no 'conversations'")
        sid, file = str(record.get("id", i)), record.get("image")
        if "image" in record and not isinstance(file, str):
            raise BadSample(f"'image' must be a path relative to {self.image_folder}, got {file!r:.60}")
        try:
            ids, labels = self.tokenizer.encode_conversation(record["conversations"], file is not None, sid)
        except ValueError as e:
            raise BadSample(f"malformed conversations: {e}") from None
        n_pos = len(ids) + (self.image_seq_len - 1 if file is not None else 0)  # (T,) after image expansion
        if n_pos > self.max_length:
            keep = len(ids) - (n_pos - self.max_length)
            if file is not None and ids.index(IMAGE_TOKEN_INDEX) >= keep:
                raise BadSample(f"the image (token {ids.index(IMAGE_TOKEN_INDEX)}, {self.image_seq_len} "
                                f"positions) does not fit in max_length {self.max_length}")
            ids, labels = ids[:keep], labels[:keep]
        image = targets = None
        if file is not None:
            path = self.image_folder / file
            try:
                with Image.open(path) as img:
                    square = square_view(img.convert("RGB"), self.view)
            except (OSError, ValueError, Image.DecompressionBombError) as e:  # missing, truncated, not an image
                raise BadSample(f"cannot read image {path}: {e}") from None
            image = clip_preprocess(square, self.image_size)  # (3, S, S)
            targets = self.target_preprocess(square) if self.target_preprocess else None
        return {"id": sid, "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "image": image, "targets": targets}

    def count_bad(self, skipped: list[tuple[str, str]], n_good: int, final: bool = False) -> None:
        """Count a batch's skipped reads (main process) and stop the run above max_bad_fraction."""
        self.bad_samples.update(skipped)
        self.n_bad += len(skipped)
        self.n_reads += len(skipped) + n_good
        self.check(self.n_bad, self.n_reads, self.bad_samples, final)

    def check(self, n_bad: int, n_reads: int, examples: dict[str, str], final: bool) -> None:
        if n_bad > self.max_bad_fraction * (n_reads if final else max(n_reads, 100)):
            where, why = next(iter(examples.items()))
            raise RuntimeError(f"{self.path}: {n_bad} of {n_reads} sample reads were bad, above "
                               f"max_bad_fraction={self.max_bad_fraction:g}; first: {where}: {why}")

    def summary(self) -> str:
        """End-of-run line: how many records were skipped, and which."""
        lines = [f"{self.path}: {len(self.bad_samples)} bad records skipped "
                 f"({self.n_bad} of {self.n_reads} reads)"]
        return "\n".join(lines + [f"  {w}: {r}" for w, r in list(self.bad_samples.items())[:10]])


# ----------------------------------------------------------------------------- 5. batches
def collate(batch: list[dict], pad_id: int, image_size: int = 0) -> dict:
    """Samples -> the CONTRACT batch dict; right padding. `image_size` only shapes an empty
    `images` (0, 3, S, S) when no sample has an image. target_images is {} without teachers."""
    B, T = len(batch), max(len(s["input_ids"]) for s in batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, s in enumerate(batch):
        n = len(s["input_ids"])
        input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = s["input_ids"], s["labels"], True
    with_image = [s for s in batch if s["image"] is not None]
    images = (torch.stack([s["image"] for s in with_image]) if with_image
              else torch.zeros(0, 3, image_size, image_size))  # (N_img, 3, S, S)
    tasks = (with_image[0]["targets"] or {}) if with_image else {}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "images": images,
            "has_image": torch.tensor([s["image"] is not None for s in batch], dtype=torch.bool),
            "target_images": {t: torch.stack([s["targets"][t] for s in with_image]) for t in tasks},
            "ids": [s["id"] for s in batch]}


def _collate_with_skips(batch: list[dict], pad_id: int, image_size: int) -> tuple[dict, list]:
    return collate(batch, pad_id, image_size), [x for s in batch for x in s["skipped"]]


class Loader:
    """This rank's batches of `dataset`, resumable at batch granularity.

    Epoch e visits perm_e (torch.randperm with seed + e, or arange), wrapped around to a multiple
    of the global batch B*W so every rank gets the same number of full batches. Global batch k is
    perm_e[k*B*W : (k+1)*B*W] and rank r takes its r-th slice of B, so the union of the ranks'
    k-th batches does not depend on the world size (2 ranks x b == 1 rank x 2b).
    Iterating yields the rest of the current epoch and then moves to the next. Resume: save
    `state_dict()` ({epoch, batches_done, bad-sample counts}) with the checkpoint and call
    `load_state_dict` before iterating: the next batch is the first one not yet consumed.
    """

    def __init__(self, dataset: LLaVADataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0):
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.epoch = self.batches_done = 0

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return -(-len(self.dataset) // (self.batch_size * self.world_size))

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's index batches of `epoch`."""
        n, g = len(self.dataset), self.batch_size * self.world_size
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)) if self.shuffle
                 else torch.arange(n))
        order = order.repeat(-(-len(self) * g // n))[:len(self) * g].tolist()
        lo = self.rank * self.batch_size
        return [order[k * g + lo: k * g + lo + self.batch_size] for k in range(len(self))]

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        loader = DataLoader(ds, batch_sampler=self.batches(self.epoch)[self.batches_done:],
                            num_workers=self.num_workers,
                            collate_fn=partial(_collate_with_skips, pad_id=ds.tokenizer.pad_id,
                                               image_size=ds.image_size))
        for batch, skipped in loader:
            self.batches_done += 1
            ds.count_bad(skipped, len(batch["ids"]))
            yield batch
        ds.count_bad([], 0, final=True)
        self.epoch, self.batches_done = self.epoch + 1, 0

    def state_dict(self) -> dict:
        ds = self.dataset
        return {"epoch": self.epoch, "batches_done": self.batches_done, "n_reads": ds.n_reads,
                "n_bad": ds.n_bad, "bad_samples": dict(ds.bad_samples)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
        ds = self.dataset
        ds.n_reads, ds.n_bad, ds.bad_samples = state["n_reads"], state["n_bad"], dict(state["bad_samples"])


def make_loader(dataset: LLaVADataset, batch_size: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                world_size: int = 1, num_workers: int = 0) -> Loader:
    """The training loader of one rank (see Loader for order, padding and resume)."""
    return Loader(dataset, batch_size, shuffle, seed, rank, world_size, num_workers)
