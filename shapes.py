"""The built-in shapes world (docs/design.md §9): Pillow-drawn scenes of 1-4 coloured shapes floating at
distinct depths in front of a plain background, written once in the LLaVA layouts so `python train.py` needs
no download: PT captions (558K-like), IFT multi-turn QA with 10% text-only records (665K-like), a held-out
split of the four CV-Bench tasks (Count, Depth, Relation, Distance) with balanced answer letters, and a
tiny tokenizer trained on all of the text. Every image has its true depth map and segmentation map beside
it, rendered from the same rasterisation, and every image record names them and describes its scene."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from chat import IMAGE_TOKEN, TEMPLATES, train_tokenizer
from data import MM_PER_METRE

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (128, 128, 128), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "diamond")  # segmentation classes 1..4 (0 = background)
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
MC_TASKS = ("Count", "Depth", "Relation", "Distance")  # CV-Bench's four tasks (Tab. 1)
IMAGE_SIZE = 128
FAR = 10.0  # metres: the background wall; shapes float at distinct depths in 1, 1.5, ..., 9 m
FOG = 0.6  # aerial perspective, the visible depth cue: a shape at depth d is FOG·d/FAR background colour
MIN_VISIBLE = 0.6  # every shape keeps this fraction of its pixels in view, so it can be counted
DEPTH_MARGIN = 1.5  # metres: Depth questions compare shapes at least this far apart
MARGIN = 12  # pixels: Relation and Distance questions compare positions at least this far apart


@dataclass
class Shape:
    kind: str
    color: str
    size: int  # side of the bounding box, pixels
    x: float  # centre, pixels
    y: float
    depth: float  # distance from the camera, metres
    segment: int = 0  # its id in the segmentation map: 10 · class + instance (class = 1 + SHAPES index)

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return self.x - h, self.y - h, self.x + h, self.y + h

    def rgb(self, background: tuple[int, int, int]) -> tuple[int, int, int]:
        """Its colour seen through the fog: farther shapes fade into the background."""
        f = FOG * self.depth / FAR
        return tuple(round((1 - f) * c + f * b) for c, b in zip(COLORS[self.color], background))

    def where(self) -> str:
        col = ("left", "center", "right")[min(2, int(self.x * 3 / IMAGE_SIZE))]
        row = ("top", "middle", "bottom")[min(2, int(self.y * 3 / IMAGE_SIZE))]
        if row == "middle":
            return "in the center" if col == "center" else f"on the {col}"
        return f"at the {row}" if col == "center" else f"in the {row} {col}"


@dataclass
class Scene:
    background: str
    shapes: list[Shape]  # far to near: the painting order


def _mask(s: Shape) -> np.ndarray:
    """The pixels the shape covers on its own. -> (S, S) bool"""
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = s.box()
    if s.kind == "circle":
        d.ellipse((x0, y0, x1, y1), fill=255)
    elif s.kind == "square":
        d.rectangle((x0, y0, x1, y1), fill=255)
    elif s.kind == "triangle":
        d.polygon([(s.x, y0), (x1, y1), (x0, y1)], fill=255)
    else:
        d.polygon([(s.x, y0), (x1, s.y), (s.x, y1), (x0, s.y)], fill=255)
    return np.asarray(img) > 0


def _owners(masks: list[np.ndarray]) -> np.ndarray:
    """Painter's algorithm over masks ordered far to near: 0 = background, k + 1 = shape k. -> (S, S)"""
    owner = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.int64)
    for k, m in enumerate(masks):
        owner[m] = k + 1
    return owner


def _scene(rng: random.Random) -> Scene:
    """A background and 1-4 shapes of distinct colours (so "the red X" is unique) at distinct depths, each
    at least MIN_VISIBLE in view; segment ids number each class's instances from left to right."""
    n = rng.randint(1, 4)
    colors = rng.sample(list(COLORS), n)
    background = rng.choice(list(BACKGROUNDS))
    while True:
        shapes = []
        for color, half_metres in zip(colors, rng.sample(range(2, 19), n)):
            size = rng.randint(16, 52)
            x, y = (rng.uniform(size / 2, IMAGE_SIZE - size / 2) for _ in range(2))
            shapes.append(Shape(rng.choice(SHAPES), color, size, x, y, half_metres / 2))
        shapes.sort(key=lambda s: -s.depth)
        masks = [_mask(s) for s in shapes]
        owner = _owners(masks)
        if all((owner == k + 1).sum() >= MIN_VISIBLE * m.sum() for k, m in enumerate(masks)):
            break
    for c, kind in enumerate(SHAPES, 1):
        for instance, s in enumerate(sorted((s for s in shapes if s.kind == kind), key=lambda s: s.x)):
            s.segment = 10 * c + instance
    return Scene(background, shapes)


def render(scene: Scene) -> tuple[Image.Image, Image.Image, Image.Image]:
    """The image (RGB), its true depth map (16-bit, millimetres; the background at FAR) and its segmentation
    map (8-bit segment ids, 0 = background), from one rasterisation: at every pixel the three show the
    nearest shape there."""
    owner = _owners([_mask(s) for s in scene.shapes])  # (S, S)
    bg = BACKGROUNDS[scene.background]
    colors = np.array([bg] + [s.rgb(bg) for s in scene.shapes], dtype=np.uint8)
    depths = np.round(np.array([FAR] + [s.depth for s in scene.shapes]) * MM_PER_METRE).astype(np.uint16)
    segments = np.array([0] + [s.segment for s in scene.shapes], dtype=np.uint8)
    return Image.fromarray(colors[owner]), Image.fromarray(depths[owner]), Image.fromarray(segments[owner])


def _caption(rng: random.Random, scene: Scene) -> str:
    shapes = scene.shapes
    n = len(shapes)
    parts = [
        f"a {('small', 'medium', 'large')[(s.size >= 28) + (s.size >= 40)]} {s.name} {s.where()}"
        for s in rng.sample(shapes, n)
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
    text = opening.format(bg=scene.background, n=count, N=count.capitalize(), l=listed)
    if n > 1:
        text += f" The {shapes[-1].name} is the closest."
    masks = [_mask(s) for s in shapes]
    for i, far in enumerate(shapes):
        for j in range(i + 1, n):
            if (masks[i] & masks[j]).any():
                text += f" The {shapes[j].name} is in front of the {far.name}."
    return text


def _pairs(shapes: list[Shape], key: Callable[[Shape], float], margin: float) -> list[tuple[Shape, Shape]]:
    """Ordered pairs (a, b) with key(a) < key(b) - margin: unambiguous comparisons only."""
    return [(a, b) for a in shapes for b in shapes if key(a) < key(b) - margin]


def _distance(a: Shape, b: Shape) -> float:
    return ((a.x - b.x) ** 2 + (a.y - b.y) ** 2) ** 0.5


def _questions(rng: random.Random, scene: Scene) -> list[tuple[str, str]]:
    """Every applicable (question, answer) pair for a scene, in LLaVA-665K style."""
    shapes = scene.shapes
    n, kinds = len(shapes), [s.kind for s in shapes]
    qa = [
        (
            "How many shapes are in the image?",
            f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' * (n > 1)}.",
        ),
        ("What color is the background?", f"The background is {scene.background}."),
    ]
    qa += [
        (f"What color is the {k}?", f"The {k} is {s.color}.")
        for k, s in zip(kinds, shapes)
        if kinds.count(k) == 1
    ]
    qa += [(f"What shape is the {s.color} object?", f"It is a {s.kind}.") for s in shapes]
    kind = rng.choice(SHAPES)
    qa.append((f"Is there a {kind} in the image?", "Yes." if kind in kinds else "No."))
    for a, b in _pairs(shapes, lambda s: s.x, MARGIN):  # a is left of b
        p, q = rng.sample([a, b], 2)
        qa.append((f"Which is further to the left, the {p.name} or the {q.name}?", f"The {a.name}."))
    for a, b in _pairs(shapes, lambda s: s.y, MARGIN):  # a is above b
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
    for a, b in _pairs(shapes, lambda s: s.depth, DEPTH_MARGIN):  # a is nearer
        p, q = rng.sample([a, b], 2)
        qa.append(
            (f"Which is closer to the camera, the {p.name} or the {q.name}?", f"The {a.name} is closer.")
        )
    return qa


def _task_item(rng: random.Random, scene: Scene, task: str) -> tuple[str, str, list[str]] | None:
    """(question, right answer, wrong answers) of a CV-Bench task for the scene; None if it does not apply."""
    shapes = scene.shapes
    if task == "Count":
        n = len(shapes)
        wrong = rng.sample([str(k) for k in range(1, 6) if k != n], 3)
        return "How many shapes are in the image?", str(n), wrong
    if task == "Depth":
        if not (pairs := _pairs(shapes, lambda s: s.depth, DEPTH_MARGIN)):
            return None
        a, b = rng.choice(pairs)  # a is nearer
        return "Which of these two shapes is closer to the camera?", f"the {a.name}", [f"the {b.name}"]
    if task == "Relation":
        if not (pairs := _pairs(shapes, lambda s: s.x, MARGIN)):
            return None
        a, b = rng.choice(pairs)  # a is left of b
        p, q = rng.sample([a, b], 2)
        question = (
            f"Considering the relative positions of the {p.name} and the {q.name} in the image, "
            f"where is the {p.name} located with respect to the {q.name}?"
        )
        return question, "left" if p is a else "right", ["right" if p is a else "left"]
    triples = [
        (r, a, b)
        for r in shapes
        for a, b in _pairs([s for s in shapes if s is not r], partial(_distance, r), MARGIN)
    ]  # a is nearer to r than b, in the image
    if not triples:
        return None
    r, a, b = rng.choice(triples)
    return f"Which shape is closer to the {r.name} in the image?", f"the {a.name}", [f"the {b.name}"]


def _multiple_choice(
    rng: random.Random, scene: Scene, task: str, slot: int
) -> tuple[str, list[str], str] | None:
    """A CV-Bench-style question of `task`: (prompt with options, choices, "(X)"), the right answer at
    option `slot` mod the number of choices (cycling slots balances the letters); None if it doesn't apply."""
    if (item := _task_item(rng, scene, task)) is None:
        return None
    question, right, choices = item
    position = slot % (len(choices) + 1)
    choices.insert(position, right)
    options = "\n".join(f"({c}) {x}" for c, x in zip("ABCD", choices))
    return f"{question} Select from the following choices.\n{options}", choices, f"({'ABCD'[position]})"


def _conversation(qa: list[tuple[str, str]]) -> list[dict]:
    return [{"from": r, "value": v} for q, a in qa for r, v in (("human", q), ("gpt", a))]


def _save(scene: Scene, rid: str, images: Path) -> dict:
    """Write the image and its maps beside it; -> the record's fields naming them, and the scene."""
    files = {"image": f"{rid}.png", "depth": f"{rid}_depth.png", "seg": f"{rid}_seg.png"}
    for picture, name in zip(render(scene), files.values()):
        picture.save(images / name)
    return {**files, "scene": asdict(scene)}


def _record(split: str, i: int, seed: int, images: Path) -> dict:
    """Record i of `split`, drawn from its own random stream; its image and maps are saved in `images`.
    Its multiple-choice question is of task MC_TASKS[i % 4], the answer at option i // 4 (mod the number of
    choices), so that tasks and answer letters are balanced."""
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
    scene = _scene(rng)
    if split == "val":
        task = MC_TASKS[i % len(MC_TASKS)]
        while (mc := _multiple_choice(rng, scene, task, i // len(MC_TASKS))) is None:
            scene = _scene(rng)  # held-out scenes are drawn until the task applies
        prompt, choices, answer = mc
        return {
            "id": rid,
            **_save(scene, rid, images),
            "task": task,
            "type": "3D" if task == "Depth" else "2D",
            "source": "builtin",
            "question": prompt.split(" Select")[0],
            "choices": choices,
            "prompt": prompt,
            "answer": answer,
        }
    if split == "pt":
        qa = [(rng.choice(PT_PROMPTS), _caption(rng, scene))]
    else:  # 1-3 free-form turns and one CV-Bench-style multiple-choice turn, in random order
        qa = rng.sample(_questions(rng, scene), rng.randint(1, 3))
        first = MC_TASKS[i % len(MC_TASKS)]  # else another that applies, Count (always applies) last
        tasks = [first] + [t for t in MC_TASKS if t not in (first, "Count")] + ["Count"]
        prompt, _, answer = next(
            filter(None, (_multiple_choice(rng, scene, t, i // len(MC_TASKS)) for t in tasks))
        )
        qa.insert(rng.randint(0, len(qa)), (prompt + MC_SUFFIX, answer))
    q = qa[0][0]  # LLaVA files put <image> before or after the first question
    qa[0] = (f"{IMAGE_TOKEN}\n{q}" if rng.random() < 0.7 else f"{q}\n{IMAGE_TOKEN}", qa[0][1])
    return {"id": rid, **_save(scene, rid, images), "conversations": _conversation(qa)}


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
    text)}. Image records also name their maps ("depth", "seg": files in images/) and describe their "scene".
    Written to a temporary folder, then renamed: a folder with `manifest.json` is complete."""
    root = Path(root)
    config = {
        "world": 2,
        "seed": seed,
        "n_pt": n_pt,
        "n_ift": n_ift,
        "n_val": n_val,
        "vocab_size": vocab_size,
    }
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
