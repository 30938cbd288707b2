"""The built-in shapes world (docs/design.md §9): Pillow-drawn scenes of 1-4 coloured shapes on a plain
background, written once in the LLaVA layouts so `python train.py` needs no download: PT captions
(558K-like), IFT multi-turn QA with 10% text-only records (665K-like), a held-out CV-Bench-style
multiple-choice split, and a tiny tokenizer trained on all of the text."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from chat import IMAGE_TOKEN, TEMPLATES, train_tokenizer

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (128, 128, 128), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIDES = {
    "circle": "A circle has no corners.",
    "square": "A square has four sides.",
    "triangle": "A triangle has three sides.",
    "diamond": "A diamond has four sides.",
}
NUMBERS = ("zero", "one", "two", "three", "four", "five")
PT_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short and clear explanation of the subsequent image.",
    "Summarize the visual content of the image.",
    "What is in the photo?",
    "Write a terse but informative summary of the picture.",
)
# CV-Bench answer instruction (docs/design.md §10); IFT teaches it, eval.py appends it to val prompts
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
    parts = [
        f"a {('small', 'medium', 'large')[(s.size >= 28) + (s.size >= 40)]} {s.name} {s.where()}"
        for s in shapes
    ]
    listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    opening = rng.choice(
        (
            "A {bg} background with {n}: {l}.",
            "An image of {n} on a {bg} background: {l}.",
            "{N} on a {bg} background: {l}.",
        )
    )
    count = f"{NUMBERS[n]} shape{'s' * (n > 1)}"
    text = opening.format(bg=background, n=count, N=count.capitalize(), l=listed)
    for i, a in enumerate(shapes):
        for b in shapes[i + 1 :]:
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
    qa = [
        (
            "How many shapes are in the image?",
            f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' * (n > 1)}.",
        ),
        ("What color is the background?", f"The background is {background}."),
    ]
    qa += [
        (f"What color is the {k}?", f"The {k} is {s.color}.")
        for k, s in zip(kinds, shapes)
        if kinds.count(k) == 1
    ]
    qa += [(f"What shape is the {s.color} object?", f"It is a {s.kind}.") for s in shapes]
    kind = rng.choice(SHAPES)
    qa.append((f"Is there a {kind} in the image?", "Yes." if kind in kinds else "No."))
    for a, b in _pairs(shapes, lambda s: s.x, 12):  # a is left of b
        p, q = rng.sample([a, b], 2)
        qa.append((f"Which is further to the left, the {p.name} or the {q.name}?", f"The {a.name}."))
    for a, b in _pairs(shapes, lambda s: s.y, 12):  # a is above b
        p, q = rng.sample([a, b], 2)
        qa.append(
            (
                f"Is the {p.name} above or below the {q.name}?",
                f"The {p.name} is {'above' if p is a else 'below'} the {q.name}.",
            )
        )
    for a, b in _pairs(shapes, lambda s: s.size, 8):  # b is bigger
        p, q = rng.sample([a, b], 2)
        qa.append((f"Which is bigger, the {p.name} or the {q.name}?", f"The {b.name} is bigger."))
    return qa


def _multiple_choice(rng: random.Random, shapes: list[Shape]) -> list[tuple[str, str, list[str], str]]:
    """CV-Bench-style (task, prompt with options, choices, "(X)") for Count, Relation and Size."""
    out = [
        (
            "Count",
            "How many shapes are in the image?",
            str(len(shapes)),
            rng.sample([str(k) for k in range(1, 6) if k != len(shapes)], 3),
        )
    ]
    if pairs := _pairs(shapes, lambda s: s.x, 12):  # a is left of b
        a, b = rng.choice(pairs)
        p, q = rng.sample([a, b], 2)
        out.append(
            (
                "Relation",
                f"Considering the relative positions of the {p.name} and the {q.name} in the image, "
                f"where is the {p.name} located with respect to the {q.name}?",
                "left" if p is a else "right",
                ["right" if p is a else "left"],
            )
        )
    if pairs := _pairs(shapes, lambda s: s.size, 8):  # b is bigger
        a, b = rng.choice(pairs)
        out.append(("Size", "Which object is bigger?", f"the {b.name}", [f"the {a.name}"]))
    items = []
    for task, question, right, wrong in out:
        choices = rng.sample([right] + wrong, len(wrong) + 1)
        options = "\n".join(f"({c}) {x}" for c, x in zip("ABCD", choices))
        items.append(
            (
                task,
                f"{question} Select from the following choices.\n{options}",
                choices,
                f"({'ABCD'[choices.index(right)]})",
            )
        )
    return items


def _conversation(qa: list[tuple[str, str]]) -> list[dict]:
    return [{"from": r, "value": v} for q, a in qa for r, v in (("human", q), ("gpt", a))]


def _record(split: str, i: int, seed: int, images: Path) -> dict:
    """Record i of `split`, drawn from its own random stream; its image is saved in `images`."""
    rng = random.Random(f"{seed}-{split}-{i}")
    rid = f"{split}_{i:05d}"
    if split == "ift" and i % 10 == 9:  # text-only records, as in LLaVA-665K
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        qa = [
            (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
            (f"How many sides does a {(k := rng.choice(SHAPES))} have?", SIDES[k]),
            ("Name a primary color.", f"{rng.choice(['Red', 'Blue', 'Yellow'])} is a primary color."),
        ]
        return {"id": rid, "conversations": _conversation(rng.sample(qa, rng.randint(1, 2)))}
    background, shapes = _scene(rng)
    _draw(background, shapes).save(images / f"{rid}.png")
    if split == "val":
        task, prompt, choices, answer = rng.choice(_multiple_choice(rng, shapes))
        return {
            "id": rid,
            "image": f"{rid}.png",
            "task": task,
            "type": "2D",
            "source": "builtin",
            "question": prompt.split(" Select")[0],
            "choices": choices,
            "prompt": prompt,
            "answer": answer,
        }
    if split == "pt":
        qa = [(rng.choice(PT_PROMPTS), _caption(rng, background, shapes))]
    else:  # 1-3 free-form turns and one CV-Bench-style multiple-choice turn, in random order
        qa = rng.sample(_questions(rng, background, shapes), rng.randint(1, 3))
        _, prompt, _, answer = rng.choice(_multiple_choice(rng, shapes))
        qa.insert(rng.randint(0, len(qa)), (prompt + MC_SUFFIX, answer))
    q = qa[0][0]  # LLaVA files put <image> before or after the first question
    qa[0] = (f"{IMAGE_TOKEN}\n{q}" if rng.random() < 0.7 else f"{q}\n{IMAGE_TOKEN}", qa[0][1])
    return {"id": rid, "image": f"{rid}.png", "conversations": _conversation(qa)}


def builtin_dataset(
    root: str | os.PathLike = "data_cache/builtin",
    seed: int = 0,
    n_pt: int = 300,
    n_ift: int = 500,
    n_val: int = 100,
    vocab_size: int = 1000,
) -> dict[str, Path]:
    """Write (once, deterministically by `seed`) the built-in image-text set in LLaVA layout; return paths:
    {"root", "images", "pt" (558K-like captions), "ift" (665K-like multi-turn QA, 10% text-only), "qa_val"
    (CV-Bench-style jsonl: id, image, task, question, choices, answer "(X)"), "tokenizer" (trained on all the
    text)}. Written to a temporary folder, then renamed: a folder with `manifest.json` is complete."""
    root = Path(root)
    config = {"seed": seed, "n_pt": n_pt, "n_ift": n_ift, "n_val": n_val, "vocab_size": vocab_size}
    paths = {
        "root": root,
        "images": root / "images",
        "pt": root / "pt.json",
        "ift": root / "ift.json",
        "qa_val": root / "qa_val.jsonl",
        "tokenizer": root / "tokenizer.json",
    }
    manifest = root / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()) == config:
        return paths
    if root.exists() and not manifest.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not a built-in data folder (no manifest.json)")
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    splits = {"pt": n_pt, "ift": n_ift, "val": n_val}
    records = {
        split: [_record(split, i, seed, tmp / "images") for i in range(n)] for split, n in splits.items()
    }
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
