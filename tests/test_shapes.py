"""shapes.py, the built-in world (docs/design.md §9): the rendered image, depth map and segmentation map agree
with the scene description (occlusion order, object count), the held-out CV-Bench-style answers follow from
the scene and its maps, the answer letters are balanced, and the held-out scenes are unseen."""

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import shapes
from shapes import MM_PER_METRE

Y, X = np.mgrid[0 : shapes.IMAGE_SIZE, 0 : shapes.IMAGE_SIZE].astype(np.float64)  # pixel coordinates


def inside(s: dict, margin: float) -> np.ndarray:
    """Pixels lying inside shape `s` (a scene entry) by at least `margin` pixels (outside by -margin for a
    negative one), from its geometry written out here, not from the renderer. -> (S, S) bool"""
    h, dx, dy = s["size"] / 2, X - s["x"], Y - s["y"]
    if s["kind"] == "circle":
        return np.hypot(dx, dy) <= h - margin
    if s["kind"] == "square":
        return np.maximum(abs(dx), abs(dy)) <= h - margin
    if s["kind"] == "diamond":
        return (h - abs(dx) - abs(dy)) / 2**0.5 >= margin
    # triangle: apex (0, -h), base corners (±h, h); a side's distance is its half-width gap · 2 / sqrt(5)
    return (((dy + h) / 2 - abs(dx)) * 2 / 5**0.5 >= margin) & (h - dy >= margin)


def name_of(s: dict) -> str:
    return f"the {s['color']} {s['kind']}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    paths = shapes.builtin_dataset(tmp_path_factory.mktemp("w") / "builtin", n_pt=60, n_ift=200, n_val=200)
    records = {split: json.loads(paths[split].read_text()) for split in ("pt", "ift")}
    records["val"] = [json.loads(line) for line in paths["qa_val"].read_text().splitlines()]
    return paths, records


def load(paths, record):
    """(image (S, S, 3), depth in millimetres (S, S), segment ids (S, S)) of a record."""
    return tuple(np.asarray(Image.open(paths["images"] / record[k])) for k in ("image", "depth", "seg"))


def test_maps_agree_with_the_scene(world):
    """At every pixel clearly inside or outside each shape, image, depth map and seg map all show the
    nearest shape covering it (where none does, the wall above the horizon and the receding floor below it,
    the floor's depth from the ground-plane formula written out here); the seg map holds one id per shape."""
    paths, records = world
    overlaps = 0
    for record in [r for split in records.values() for r in split if "image" in r]:
        image, depth, seg = load(paths, record)
        assert image.shape == (128, 128, 3) and depth.dtype == np.uint16 and seg.dtype == np.uint8
        scene = record["scene"]
        bg = shapes.BACKGROUNDS[scene["background"]]
        objects = scene["shapes"]
        assert len({s["depth"] for s in objects}) == len({s["segment"] for s in objects}) == len(objects)
        assert set(np.unique(seg)) - {0, shapes.FLOOR_SEGMENT} == {s["segment"] for s in objects}  # the count
        covered = np.stack([inside(s, 2.0) for s in objects])  # (n, S, S)
        clear = (covered | ~np.stack([inside(s, -2.0) for s in objects])).all(0)  # no shape's edge is near
        depths = np.array([s["depth"] for s in objects])[:, None, None]
        nearest = np.where(covered, depths, np.inf).argmin(0)
        for k, s in enumerate(objects):
            shown = clear & covered.any(0) & (nearest == k)
            f = shapes.FOG * s["depth"] / shapes.FAR
            color = [round((1 - f) * c + f * b) for c, b in zip(shapes.COLORS[s["color"]], bg)]
            assert (seg[shown] == s["segment"]).all(), record["id"]
            assert (depth[shown] == round(s["depth"] * MM_PER_METRE)).all()
            assert (image[shown] == color).all()
        overlaps += (clear & (covered.sum(0) >= 2)).sum()
        background = clear & ~covered.any(0)
        wall = background & (scene["horizon"] >= Y + 0.5)
        assert (seg[wall] == 0).all() and (depth[wall] == shapes.FAR * MM_PER_METRE).all()
        assert (image[wall] == bg).all()
        floor = background & (scene["horizon"] < Y + 0.5)
        # a ground plane: inverse depth linear in the rows below the horizon, 1/NEAR at the bottom edge
        t = (Y + 0.5 - scene["horizon"]) / (shapes.IMAGE_SIZE - scene["horizon"])
        expected = 1 / (1 / shapes.FAR + t * (1 / shapes.NEAR - 1 / shapes.FAR))
        assert (seg[floor] == shapes.FLOOR_SEGMENT).all()
        assert np.abs(depth[floor] - expected[floor] * MM_PER_METRE).max() <= 0.5
        f = shapes.FOG * expected[floor] / shapes.FAR
        color = (1 - f)[:, None] * np.array(shapes.FLOORS[scene["floor"]]) + f[:, None] * np.array(bg)
        assert np.abs(image[floor] - color).max() <= 0.5
        for s in objects:  # every shape stands on the floor where it is as far away as the shape
            assert np.isclose(s["y"] + s["size"] / 2, shapes.floor_row(s["depth"], scene["horizon"]))
    assert overlaps > 1000  # occlusion was tested, not only lone shapes


def derived_answer(record: dict, seg: np.ndarray, depth: np.ndarray) -> str:
    """The answer of a held-out question, worked out from its scene description and its maps."""
    objects = {name_of(s): s for s in record["scene"]["shapes"]}
    question, choices = record["question"], record["choices"]
    if record["task"] == "Count":
        assert len(set(np.unique(seg)) - {0, shapes.FLOOR_SEGMENT}) == len(objects)  # one id per shape
        return str(len(objects))
    if record["task"] == "Depth":  # the median depth the depth map shows over each shape's segment
        return min(choices, key=lambda c: np.median(depth[seg == objects[c]["segment"]]))
    if record["task"] == "Relation":
        p, q = re.fullmatch(
            r"Considering the relative positions of (.+) and (.+) in the image, .*", question
        ).groups()
        return "left" if objects[p]["x"] < objects[q]["x"] else "right"
    ref = objects[re.fullmatch(r"Which shape is closer to (.+) in the image\?", question).group(1)]
    return min(choices, key=lambda c: np.hypot(objects[c]["x"] - ref["x"], objects[c]["y"] - ref["y"]))


def test_held_out_answers_follow_from_the_scene(world):
    paths, records = world
    for record in records["val"]:
        _, depth, seg = load(paths, record)
        letter = re.fullmatch(r"\(([A-D])\)", record["answer"]).group(1)
        assert record["choices"][ord(letter) - ord("A")] == derived_answer(record, seg, depth), record["id"]
        for c, choice in zip("ABCD", record["choices"]):
            assert f"({c}) {choice}" in record["prompt"]
        assert record["type"] == ("3D" if record["task"] == "Depth" else "2D")


IFT_TASK_KEYS = {
    "Count": "How many",
    "Depth": "closer to the camera",
    "Relation": "relative positions",
    "Distance": "in the image?",
}


def letter_shares(items: list[tuple[str, int, str]]) -> dict[str, tuple[int, float]]:
    """(task, number of choices, letter) -> {task: (number of choices, largest share of one letter)}."""
    shares = {}
    for task in {t for t, _, _ in items}:
        letters = [letter for t, _, letter in items if t == task]
        n_choices = {n for t, n, _ in items if t == task}
        assert len(n_choices) == 1
        shares[task] = (n_choices.pop(), max(Counter(letters).values()) / len(letters))
    return shares


def test_answer_letters_are_balanced(world):
    """No letter above 35 % for the 4-way Count questions, 2-way tasks close to 50 % (the held-out split
    exactly: its answer letters cycle; IFT's where each record's task applies)."""
    _, records = world
    val = [(r["task"], len(r["choices"]), r["answer"]) for r in records["val"]]
    assert set(Counter(t for t, _, _ in val).values()) == {50}  # the four tasks in equal parts
    ift = []
    for r in records["ift"]:
        for ask, answer in zip(r["conversations"][::2], r["conversations"][1::2]):
            if "Select from the following choices." in ask["value"]:
                task = next(t for t, key in IFT_TASK_KEYS.items() if key in ask["value"])
                ift.append((task, ask["value"].count("\n("), answer["value"]))
    assert len(ift) == 180  # one multiple-choice turn per image record
    for split, items, two_way in (("val", val, 0.52), ("ift", ift, 0.6)):
        for task, (n_choices, top) in letter_shares(items).items():
            assert n_choices == (4 if task == "Count" else 2)
            assert top <= (0.35 if n_choices == 4 else two_way), (split, task, top)


def test_held_out_scenes_are_unseen(world):
    paths, records = world
    digest = lambda r: hashlib.sha256((paths["images"] / r["image"]).read_bytes()).hexdigest()
    train = {digest(r) for split in ("pt", "ift") for r in records[split] if "image" in r}
    assert not train & {digest(r) for r in records["val"]}
    assert not {json.dumps(r["scene"]) for r in records["val"]} & {
        json.dumps(r["scene"]) for split in ("pt", "ift") for r in records[split] if "image" in r
    }
