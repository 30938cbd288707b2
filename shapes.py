"""The built-in shapes world (docs/design.md §9): Pillow-drawn scenes of 1-4 coloured shapes standing at
distinct depths on a floor that recedes to a plain wall at the horizon, written once in the LLaVA layouts so
`python train.py` needs no download: PT captions (558K-like), IFT multi-turn QA with 10% text-only records
(665K-like), a held-out split of the four CV-Bench tasks (Count, Depth, Relation, Distance) with balanced
answer letters, and a tiny tokenizer trained on the training text. Every image has its true depth map and
segmentation map beside it, rendered from the same rasterisation, and every image record names them and
describes its scene."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tokenizer import IMAGE_TOKEN, TEMPLATES, train_tokenizer
from weights import build_once

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (128, 128, 128), "black": (15, 15, 15)}  # the wall
FLOORS = {"brown": (125, 85, 50), "beige": (205, 185, 150), "slate": (70, 90, 115)}
SHAPES = ("circle", "square", "triangle", "diamond")  # segmentation classes 1..4 (0 = the wall)
FLOOR_SEGMENT = 50  # the floor's id in the segmentation map: class 5, as COCO's "floor" stuff class
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
FAR = 10.0  # metres: the background wall, met by the floor at the horizon; shapes at 1, 1.5, ..., 9 m
NEAR = 1.0  # metres: the floor at the bottom row of the image
HORIZON = (0.3, 0.65)  # the horizon's row, as a fraction of the image height (the camera's tilt)
FOG = 0.6  # aerial perspective: what is at depth d is mixed with FOG·d/FAR of the wall colour
MIN_VISIBLE = 0.6  # every shape keeps this fraction of its pixels in view, so it can be counted
DEPTH_MARGIN = 1.5  # metres: Depth questions compare shapes at least this far apart
MARGIN = 12  # pixels: Relation and Distance questions compare positions at least this far apart
MM_PER_METRE = 1000  # depth maps are 16-bit PNGs of millimetres, 0 = no depth (as NYU-v2 stores them)
WORLD_VERSION = 4  # bumped when the records or images change: a cached world is then rebuilt


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
        """Its colour seen through the fog: farther shapes fade into the wall colour."""
        return fogged(COLORS[self.color], background, self.depth)

    def where(self) -> str:
        col = ("left", "center", "right")[min(2, int(self.x * 3 / IMAGE_SIZE))]
        row = ("top", "middle", "bottom")[min(2, int(self.y * 3 / IMAGE_SIZE))]
        if row == "middle":
            return "in the center" if col == "center" else f"on the {col}"
        return f"at the {row}" if col == "center" else f"in the {row} {col}"


@dataclass
class Scene:
    background: str  # the wall's colour
    shapes: list[Shape]  # far to near: the painting order
    floor: str = "brown"
    horizon: float = IMAGE_SIZE / 2  # the row (pixels from the top) where the floor meets the wall


def fogged(color, background, depth):
    """A colour at `depth` metres seen through the fog (FOG·depth/FAR of the wall colour)."""
    f = FOG * depth / FAR
    return tuple(round((1 - f) * c + f * b) for c, b in zip(color, background))


def floor_depth(row: np.ndarray, horizon: float) -> np.ndarray:
    """Depth of the floor at pixel rows `row` (centres row + 0.5): a ground plane seen by a level camera,
    so inverse depth falls linearly from 1/NEAR at the bottom edge to 1/FAR at the horizon (the wall
    above it)."""
    t = (row + 0.5 - horizon) / (IMAGE_SIZE - horizon)
    return np.where(t > 0, 1 / (1 / FAR + t * (1 / NEAR - 1 / FAR)), FAR)


def floor_row(depth: float, horizon: float) -> float:
    """The image row where the floor is `depth` metres away: where a shape at that depth stands."""
    return horizon + (IMAGE_SIZE - horizon) * (1 / depth - 1 / FAR) / (1 / NEAR - 1 / FAR)


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


def random_scene(rng: random.Random) -> Scene:
    """A wall and floor colour, a horizon, and 1-4 shapes of distinct colours (so "the red X" is unique) at
    distinct depths, each standing on the floor where it is that far away (nearer shapes lower in the
    image, as in a photograph) and at least MIN_VISIBLE in view; segment ids number each class's instances
    from left to right."""
    n = rng.randint(1, 4)
    colors = rng.sample(list(COLORS), n)
    background = rng.choice(list(BACKGROUNDS))
    floor = rng.choice(list(FLOORS))
    horizon = rng.uniform(*HORIZON) * IMAGE_SIZE
    while True:
        shapes = []
        for color, half_metres in zip(colors, rng.sample(range(2, 19), n)):
            depth = half_metres / 2
            bottom = floor_row(depth, horizon)
            size = rng.randint(16, min(52, int(bottom)))
            x = rng.uniform(size / 2, IMAGE_SIZE - size / 2)
            shapes.append(Shape(rng.choice(SHAPES), color, size, x, bottom - size / 2, depth))
        shapes.sort(key=lambda s: -s.depth)
        masks = [_mask(s) for s in shapes]
        owner = _owners(masks)
        if all((owner == k + 1).sum() >= MIN_VISIBLE * m.sum() for k, m in enumerate(masks)):
            break
    for c, kind in enumerate(SHAPES, 1):
        for instance, s in enumerate(sorted((s for s in shapes if s.kind == kind), key=lambda s: s.x)):
            s.segment = 10 * c + instance
    return Scene(background, shapes, floor, horizon)


def render(scene: Scene) -> tuple[Image.Image, Image.Image, Image.Image]:
    """The image (RGB), its true depth map (16-bit, millimetres: the wall at FAR, the floor receding to it)
    and its segmentation map (8-bit segment ids: 0 = the wall, FLOOR_SEGMENT = the floor), from one
    rasterisation: at every pixel the three show the nearest surface there."""
    owner = _owners([_mask(s) for s in scene.shapes])  # (S, S)
    wall = BACKGROUNDS[scene.background]
    rows = np.arange(IMAGE_SIZE)
    depth = floor_depth(rows, scene.horizon)  # (S,) the wall and floor, row by row
    on_floor = rows + 0.5 > scene.horizon
    floor = np.array([fogged(FLOORS[scene.floor], wall, d) for d in depth])
    row_color = np.where(on_floor[:, None], floor, np.array(wall))  # (S, 3)
    image = np.repeat(row_color[:, None], IMAGE_SIZE, 1)  # (S, S, 3)
    depth_map = np.repeat(depth[:, None], IMAGE_SIZE, 1)
    seg = np.repeat(np.where(on_floor, FLOOR_SEGMENT, 0)[:, None], IMAGE_SIZE, 1)
    for k, s in enumerate(scene.shapes, 1):
        shown = owner == k
        image[shown], depth_map[shown], seg[shown] = s.rgb(wall), s.depth, s.segment
    depth_mm = np.round(depth_map * MM_PER_METRE).astype(np.uint16)
    return (
        Image.fromarray(image.astype(np.uint8)),
        Image.fromarray(depth_mm),
        Image.fromarray(seg.astype(np.uint8)),
    )


def caption(rng: random.Random, scene: Scene) -> str:
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
    text += f" The floor is {scene.floor}."
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


def questions(rng: random.Random, scene: Scene) -> list[tuple[str, str]]:
    """Every applicable (question, answer) pair for a scene, in LLaVA-665K style."""
    shapes = scene.shapes
    n, kinds = len(shapes), [s.kind for s in shapes]
    qa = [
        (
            "How many shapes are in the image?",
            f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' * (n > 1)}.",
        ),
        ("What color is the background?", f"The background is {scene.background}."),
        ("What color is the floor?", f"The floor is {scene.floor}."),
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
    triples = [  # a is nearer to r than b, in the image
        (r, a, b)
        for r in shapes
        for a, b in _pairs([s for s in shapes if s is not r], partial(_distance, r), MARGIN)
    ]
    if not triples:
        return None
    r, a, b = rng.choice(triples)
    return f"Which shape is closer to the {r.name} in the image?", f"the {a.name}", [f"the {b.name}"]


def multiple_choice(
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


def text_only_qa(rng: random.Random) -> list[tuple[str, str]]:
    """One or two turns that need no image (LLaVA-665K's text-only records)."""
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    qa = [
        (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
        (f"How many sides does a {(k := rng.choice(SHAPES))} have?", SIDES[k]),
        ("Name a primary color.", f"{rng.choice(['Red', 'Blue', 'Yellow'])} is a primary color."),
    ]
    return rng.sample(qa, rng.randint(1, 2))


def instruction_qa(rng: random.Random, scene: Scene, i: int) -> list[tuple[str, str]]:
    """The turns of instruction record i about `scene`: 1-3 free-form questions and one CV-Bench-style
    multiple-choice question of task MC_TASKS[i % 4] (else another that applies, Count last: it always
    does), its answer at option i // 4, in random order."""
    qa = rng.sample(questions(rng, scene), rng.randint(1, 3))
    first = MC_TASKS[i % len(MC_TASKS)]
    tasks = [first] + [t for t in MC_TASKS if t not in (first, "Count")] + ["Count"]
    slot = i // len(MC_TASKS)
    prompt, _, answer = next(filter(None, (multiple_choice(rng, scene, t, slot) for t in tasks)))
    qa.insert(rng.randint(0, len(qa)), (prompt + MC_SUFFIX, answer))
    return qa


def conversation(qa: list[tuple[str, str]]) -> list[dict]:
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
        return {"id": rid, "conversations": conversation(text_only_qa(rng))}
    scene = random_scene(rng)
    if split == "val":
        task = MC_TASKS[i % len(MC_TASKS)]
        while (mc := multiple_choice(rng, scene, task, i // len(MC_TASKS))) is None:
            scene = random_scene(rng)  # held-out scenes are drawn until the task applies
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
        qa = [(rng.choice(PT_PROMPTS), caption(rng, scene))]
    else:
        qa = instruction_qa(rng, scene, i)
    q = qa[0][0]  # LLaVA files put <image> before or after the first question
    qa[0] = (f"{IMAGE_TOKEN}\n{q}" if rng.random() < 0.7 else f"{q}\n{IMAGE_TOKEN}", qa[0][1])
    return {"id": rid, **_save(scene, rid, images), "conversations": conversation(qa)}


def world_paths(root: str | os.PathLike) -> dict[str, Path]:
    """Where a built-in world folder keeps its files."""
    root = Path(root)
    return {
        "root": root,
        "images": root / "images",
        "pt": root / "pt.json",
        "ift": root / "ift.json",
        "qa_val": root / "qa_val.jsonl",
        "tokenizer": root / "tokenizer.json",
    }


def write_world(
    folder: str | os.PathLike, seed: int, n_pt: int, n_ift: int, n_val: int, vocab_size: int
) -> dict[str, Path]:
    """Write the built-in image-text set in LLaVA layout into `folder`, deterministically by `seed`; return
    its paths: {"root", "images", "pt" (558K-like captions), "ift" (665K-like multi-turn QA, 10% text-only),
    "qa_val" (CV-Bench-style jsonl: id, image, task, question, choices, answer "(X)"), "tokenizer" (trained
    on the training text)}. Image records also name their maps ("depth", "seg": files in images/) and
    describe their "scene"."""
    paths = world_paths(folder)
    paths["images"].mkdir(parents=True, exist_ok=True)
    splits = {"pt": n_pt, "ift": n_ift, "val": n_val}
    records = {
        split: [_record(split, i, seed, paths["images"]) for i in range(n)] for split, n in splits.items()
    }
    for split in ("pt", "ift"):
        paths[split].write_text(json.dumps(records[split], indent=1))
    paths["qa_val"].write_text("".join(json.dumps(v) + "\n" for v in records["val"]))
    texts = [TEMPLATES["llama3"].system, MC_SUFFIX]
    texts += [t["value"] for r in records["pt"] + records["ift"] for t in r["conversations"]]
    train_tokenizer(texts, paths["tokenizer"], vocab_size)
    return paths


def builtin_dataset(
    root: str | os.PathLike,
    seed: int = 0,
    n_pt: int = 300,
    n_ift: int = 500,
    n_val: int = 100,
    vocab_size: int = 1000,
) -> dict[str, Path]:
    """The built-in world alone (no pretrained parts: miniature.builtin() has both), written once into
    `root` by `write_world` and reused while its manifest records the same settings."""
    config = {"world": WORLD_VERSION, "seed": seed, "n_pt": n_pt, "n_ift": n_ift, "n_val": n_val}
    config["vocab_size"] = vocab_size
    build_once(Path(root), config, lambda tmp: write_world(tmp, seed, n_pt, n_ift, n_val, vocab_size))
    return world_paths(root)
