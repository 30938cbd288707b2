"""LLaVA-style data for OLA-VLM (SPEC §4), top to bottom:
1. ChatTokenizer   — a `tokenizer.json` + the llama3 / phi3 template -> (input_ids, labels), labels checked
2. train_tokenizer — the tiny Llama-3-style BPE of the built-in data
3. builtin_dataset — Pillow-drawn shape scenes: PT captions, IFT QA, a CV-Bench-style val split
4. LLaVADataset    — one record -> ids, labels, image tensor (+ teacher inputs); bad records skipped
5. collate / Loader — the batch dict of CONTRACT; exact resume by (epoch, batches_done)"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.nn.utils.rnn import pad_sequence
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
        system="<|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an artificial "
               "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's "
               "questions.",
        user="<|start_header_id|>user<|end_header_id|>\n\n",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n", sep="<|eot_id|>", end_of_text="<|end_of_text|>"),
    "phi3": ChatTemplate(
        system="<|system|>\nYou are a helpful AI assistant.", user="\n<|user|>\n",
        assistant="\n<|assistant|>\n", sep="<|end|>", end_of_text="<|endoftext|>"),
}


class LabelMismatchError(RuntimeError):
    """The labelled tokens of a sample do not decode to its answers + end-of-turn tokens."""


class ChatTokenizer:
    """A `tokenizer.json` and a chat template (SPEC §4). `bos_ids`: what the post-processor prepends
    (Llama-3: `<|begin_of_text|>`); `eos_ids` = (end-of-turn, end-of-text) stop generation; `pad_id` =
    end-of-text, as Llama-3 has no pad token (padded positions are masked; official §5.3 adds a `<pad>` row)."""

    def __init__(self, path: str | os.PathLike, template: str = "llama3"):
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; expected one of {sorted(TEMPLATES)}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (expected a tokenizer.json)")
        self.path, self.name, self.template = str(path), template, TEMPLATES[template]
        self.tok = Tokenizer.from_file(self.path)
        t = self.template
        for special in re.findall(r"<\|[^|]+\|>", t.system + t.user + t.assistant + t.sep + t.end_of_text):
            if self.encode(special) != [self.tok.token_to_id(special)]:
                raise ValueError(f"{self.path}: template {template!r} needs {special!r} as a single "
                                 f"special token, but the tokenizer encodes it as {self.encode(special)}")
        self.sep_id, self.pad_id = self.tok.token_to_id(t.sep), self.tok.token_to_id(t.end_of_text)
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
        return self.encode_conversation([{"from": "human", "value": "x"}], with_image=True)[0].index(IMAGE_TOKEN_INDEX)

    def encode_conversation(self, conversations: list, with_image: bool,
                            sample_id: str = "?") -> tuple[list[int], list[int]]:
        """LLaVA conversations [{"from": "human"|"gpt", "value": str}, ...] -> (input_ids, labels).

        With an image, `<image>` is moved (or inserted) to the front of the first user turn (official
        §5.4); input_ids follow `tokenizer_image_token` (official §5.5): chunks between `<image>`s are
        encoded separately, joined by IMAGE_TOKEN_INDEX, BOS kept once. A token is a label iff it starts
        inside an answer + sep (character offsets), and each answer's labels must decode to exactly
        that text, else LabelMismatchError. A trailing human turn ends with the assistant header.
        """
        if not isinstance(conversations, list) or not conversations:
            raise ValueError(f"'conversations' must be a non-empty list, got {conversations!r:.60}")
        for k, turn in enumerate(conversations):
            role = ("human", "gpt")[k % 2]
            if not isinstance(turn, dict) or turn.get("from") != role or not isinstance(turn.get("value"), str):
                raise ValueError(f"turn {k}: expected {{'from': '{role}', 'value': str}}, got {turn!r:.80}")
        messages = [turn["value"] for turn in conversations]
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
        t = self.template
        text, spans = t.system + t.sep, []  # spans: character ranges of the answers + their sep
        for k, message in enumerate(messages):
            if k % 2:
                spans.append((len(text), len(text) + len(message + t.sep)))
                text += message + t.sep
            else:
                text += t.user + message + t.sep + t.assistant
        ids, starts, pos = list(self.bos_ids), [-1] * len(self.bos_ids), 0  # starts: char offset per token
        for k, chunk in enumerate(text.split(IMAGE_TOKEN)):
            enc = self.tok.encode(chunk, add_special_tokens=False)
            ids += ([IMAGE_TOKEN_INDEX] if k else []) + enc.ids
            starts += ([-1] if k else []) + [pos + a for a, _ in enc.offsets]
            pos += len(chunk) + len(IMAGE_TOKEN)
        labels = [IGNORE_INDEX] * len(ids)
        for n, (a, b) in enumerate(spans):
            inside = [j for j, s in enumerate(starts) if a <= s < b]
            for j in inside:
                labels[j] = ids[j]
            got = self.decode([ids[j] for j in inside], skip_special_tokens=False)
            if got != text[a:b] or not inside or ids[inside[-1]] != self.sep_id:
                raise LabelMismatchError(f"sample {sample_id}: the labelled tokens of answer {n} decode to {got!r}, "
                                         f"expected {text[a:b]!r} (tokenizer {self.path}, template {self.name})")
        return ids, labels


# ----------------------------------------------------------------------------- 2. tiny tokenizer
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", *(f"<|reserved_special_token_{i}|>" for i in range(4)),
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_tokenizer(texts: Iterable[str], path: str | os.PathLike, vocab_size: int = 1000) -> Path:
    """Train a Llama-3-style byte-level BPE on `texts`, deterministically, and save it as `path` (weights.md
    §5): Llama-3 split regex + ByteLevel, the 10 first Llama-3 specials, BOS via TemplateProcessing."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(LLAMA3_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = LLAMA3_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
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
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box(), b.box()
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
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
    out = [("Count", "How many shapes are in the image?", str(len(shapes)),
            rng.sample([str(k) for k in range(1, 6) if k != len(shapes)], 3))]
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


def _conversation(qa: list[tuple[str, str]]) -> list[dict]:
    return [{"from": r, "value": v} for q, a in qa for r, v in (("human", q), ("gpt", a))]


def _record(split: str, i: int, seed: int, images: Path) -> dict:
    """Record i of `split`, drawn from its own random stream; its image is saved in `images`."""
    rng = random.Random(f"{seed}-{split}-{i}")
    rid = f"{split}_{i:05d}"
    if split == "ift" and i % 10 == 9:  # text-only records, as in LLaVA-665K
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        qa = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
              (f"How many sides does a {(k := rng.choice(SHAPES))} have?", SIDES[k]),
              ("Name a primary color.", f"{rng.choice(['Red', 'Blue', 'Yellow'])} is a primary color.")]
        return {"id": rid, "conversations": _conversation(rng.sample(qa, rng.randint(1, 2)))}
    background, shapes = _scene(rng)
    _draw(background, shapes).save(images / f"{rid}.png")
    if split == "val":
        task, prompt, choices, answer = rng.choice(_multiple_choice(rng, shapes))
        return {"id": rid, "image": f"{rid}.png", "task": task, "type": "2D", "source": "builtin",
                "question": prompt.split(" Select")[0], "choices": choices, "prompt": prompt, "answer": answer}
    if split == "pt":
        qa = [(rng.choice(PT_PROMPTS), _caption(rng, background, shapes))]
    else:  # 1-3 free-form turns and one CV-Bench-style multiple-choice turn, in random order
        qa = rng.sample(_questions(rng, background, shapes), rng.randint(1, 3))
        _, prompt, _, answer = rng.choice(_multiple_choice(rng, shapes))
        qa.insert(rng.randint(0, len(qa)), (prompt + MC_SUFFIX, answer))
    q = qa[0][0]  # LLaVA files put <image> before or after the first question
    qa[0] = (f"{IMAGE_TOKEN}\n{q}" if rng.random() < 0.7 else f"{q}\n{IMAGE_TOKEN}", qa[0][1])
    return {"id": rid, "image": f"{rid}.png", "conversations": _conversation(qa)}


def builtin_dataset(root: str | os.PathLike = "data_cache/builtin", seed: int = 0, n_pt: int = 300,
                    n_ift: int = 500, n_val: int = 100, vocab_size: int = 1000) -> dict[str, Path]:
    """Write (once, deterministically by `seed`) the built-in image-text set in LLaVA layout; return its paths:
    {"root", "images", "pt" (558K-like captions), "ift" (665K-like multi-turn QA, 10% text-only), "qa_val"
    (CV-Bench-style jsonl: id, image, task, question, choices, answer "(X)"), "tokenizer" (trained on all the
    text)}. Written to a temporary folder, then renamed: a folder with `manifest.json` is complete; rank-safe."""
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
    splits = {"pt": n_pt, "ift": n_ift, "val": n_val}
    records = {split: [_record(split, i, seed, tmp / "images") for i in range(n)] for split, n in splits.items()}
    for split in ("pt", "ift"):
        (tmp / f"{split}.json").write_text(json.dumps(records[split], indent=1))
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
    """A LLaVA `.json` list of records, or `.jsonl` (one record a line, official §5.6)."""
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

    view: 'crop' (PT) or 'pad' (VPT/IFT), the square view of the base encoder and teachers (SPEC §1, §4).
    A sample is {"id", "input_ids" (T,), "labels" (T,), "image" (3, S, S) | None, "targets" {task: (3, s, s)}
    | None, "skipped"}. The placeholder becomes `image_seq_len` positions in the model (image + 24 task
    tokens); a sequence past `max_length` positions is cut at the end, never through the placeholder.
    A bad record is logged and replaced by the next good one (i+1, ...), so batches keep their size on
    every rank; the skipped reads (sample["skipped"]) are counted in the main process by `count_bad`, which
    stops the run above `max_bad_fraction` (over >= 100 reads, exactly at the end of a pass).
    A LabelMismatchError is a bug, not bad data: it always stops the run.
    """

    def __init__(self, records: str | os.PathLike, image_folder: str | os.PathLike, tokenizer: ChatTokenizer,
                 view: str = "pad", image_size: int = 336, target_preprocess: Callable[..., dict] | None = None,
                 max_length: int = 4096, image_seq_len: int = 576 + 24, max_bad_fraction: float = 0.1):
        if view not in ("crop", "pad"):
            raise ValueError(f"view must be 'crop' or 'pad', got {view!r}")
        self.path, self.image_folder, self.records = str(records), Path(image_folder), read_records(records)
        if not self.records:
            raise ValueError(f"{records}: no records")
        self.tokenizer, self.view, self.image_size, self.image_seq_len = tokenizer, view, image_size, image_seq_len
        self.target_preprocess, self.max_length, self.max_bad_fraction = target_preprocess, max_length, max_bad_fraction
        self.bad_samples: dict[str, str] = {}  # "file record i (id ...)" -> reason, distinct records
        self.n_reads = self.n_bad = 0  # reads, bad reads (a record read twice counts twice)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        skipped = []
        for j in range(i, i + len(self.records)):
            j %= len(self.records)
            try:
                return {**self.load(j), "skipped": skipped}
            except BadSample as e:
                sid = self.records[j].get("id", "?") if isinstance(self.records[j], dict) else "?"
                skipped.append((f"{self.path} record {j} (id {sid})", str(e)))
                log.warning("skipping %s: %s", *skipped[-1])
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
        keep = self.max_length - (self.image_seq_len - 1 if file is not None else 0)  # ids that fit
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
        lines = [f"{self.path}: {len(self.bad_samples)} bad records skipped ({self.n_bad} of {self.n_reads} reads)"]
        return "\n".join(lines + [f"  {w}: {r}" for w, r in list(self.bad_samples.items())[:10]])


# ----------------------------------------------------------------------------- 5. batches
def collate(batch: list[dict], pad_id: int, image_size: int = 0) -> dict:
    """Samples -> the CONTRACT batch dict, right-padded. `image_size` only shapes an empty `images`
    (0, 3, S, S) when no sample has an image; target_images is {} without teachers."""
    input_ids = pad_sequence([s["input_ids"] for s in batch], batch_first=True, padding_value=pad_id)  # (B, T)
    labels = pad_sequence([s["labels"] for s in batch], batch_first=True, padding_value=IGNORE_INDEX)
    attention_mask = pad_sequence([torch.ones_like(s["input_ids"], dtype=torch.bool) for s in batch], batch_first=True)
    with_image = [s for s in batch if s["image"] is not None]
    images = (torch.stack([s["image"] for s in with_image]) if with_image
              else torch.zeros(0, 3, image_size, image_size))  # (N_img, 3, S, S)
    tasks = (with_image[0]["targets"] or {}) if with_image else {}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "images": images,
            "has_image": torch.tensor([s["image"] is not None for s in batch], dtype=torch.bool),
            "target_images": {t: torch.stack([s["targets"][t] for s in with_image]) for t in tasks},
            "ids": [s["id"] for s in batch]}


class Loader:
    """This rank's batches of `dataset`, resumable at batch granularity. Epoch e visits perm_e (randperm with
    seed + e, or arange) wrapped to a multiple of the global batch B*W; global batch k is perm_e[k*B*W :
    (k+1)*B*W] and rank r takes its r-th slice of B, so 2 ranks x b == 1 rank x 2b. Iterating yields the rest
    of the epoch (workers load samples, collate runs here); resume with `load_state_dict(state_dict())`."""

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
        order = order.repeat(-(-len(self) * g // n))[:len(self) * g]  # row k of the view = global batch k
        return order.view(len(self), self.world_size, self.batch_size)[:, self.rank].tolist()

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        loader = DataLoader(ds, batch_sampler=self.batches(self.epoch)[self.batches_done:],
                            num_workers=self.num_workers, collate_fn=list)
        for samples in loader:
            self.batches_done += 1
            ds.count_bad([x for s in samples for x in s["skipped"]], len(samples))
            yield collate(samples, ds.tokenizer.pad_id, ds.image_size)
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


make_loader = Loader  # the training loader of one rank (public name used by train.py)
