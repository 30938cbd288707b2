"""The distillation tasks of OLA-VLM as data (Sec. 4.1, Fig. 4; docs/design.md §3). One row per task says
which segment id its special tokens <t> get in the spliced sequence, whether its target is spatial (one
token per image token) or global (one token per image), its default layer set (Tab. 3, 1-based block
outputs of a 32-layer LLM), the width rule of its predictor, and its teacher with the input-size rule.
Adding a fourth teacher is one entry here (plus its Teacher class if it is new)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from teachers import DepthTeacher, GenTeacher, SegTeacher, TargetEncoders, Teacher

# Segment ids recorded at splice time: which span each position of the spliced sequence belongs to. SYS =
# text before the image, TEXT = text after it (and text-only samples); 3, 4, 5 are the special tokens <g>,
# <d>, <s> of gen, depth, seg (Task.segment in TASKS below).
PAD, SYS, IMAGE, TEXT = 0, 1, 2, 6


@dataclass(frozen=True)
class Task:
    name: str
    segment: int  # segment id of its special tokens <t>
    spatial: bool  # target (N, C) aligned with the N image tokens, or one global (1, C) token
    layers: tuple[int, ...]  # default layer set for a 32-layer LLM (Tab. 3)
    predictor_width: str  # the predictor's internal width: "llm" (H) or "target" (the target's channels)
    teacher: type[Teacher]
    pixels_per_token: int | None  # teacher input side = base grid × this; None: the teacher's own size
    weights: str  # the official checkpoint the teacher loads (for --help)


TASKS: dict[str, Task] = {
    "depth": Task("depth", 4, True, (8, 20), "llm", DepthTeacher, 14, "Depth-Anything-V2-Large-hf"),
    "seg": Task("seg", 5, True, (10, 18), "target", SegTeacher, 32, "oneformer_coco_swin_large"),
    "gen": Task("gen", 3, False, (12, 20), "target", GenTeacher, None, "sd-2-1-unclip/image_encoder"),
}
PAPER_TOKEN_ORDER = ("gen", "depth", "seg")  # <g>|<d>|<s> after the image tokens (Sec. 5.1, Tab. III)


def check_tasks(tasks: tuple[str, ...]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: expected some of {list(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task listed twice in {list(tasks)}")


def teacher_input_size(task: str, grid: int) -> int | None:
    """A spatial teacher sees the square view at grid × its pixels per token, so that its token q is the
    base encoder's token q (24 × 14 = 336 for DINOv2, 24 × 32 = 768 for Swin); a global one its own size."""
    per_token = TASKS[task].pixels_per_token
    return None if per_token is None else grid * per_token


def load_teachers(
    paths: dict[str, str | os.PathLike], grid: int, dtype: torch.dtype = torch.float32
) -> TargetEncoders:
    """The official teachers of `paths` ({task: weight folder}), sized for a base encoder of grid × grid."""
    check_tasks(tuple(paths))
    teachers = {}
    for task, path in paths.items():
        teachers[task] = TASKS[task].teacher.from_pretrained(
            path, teacher_input_size(task, grid), dtype=dtype
        )
    return TargetEncoders(teachers)


def tiny_teachers(
    tasks: tuple[str, ...], grid: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> TargetEncoders:
    """Random teachers of `tasks` at the tiny sizes (the real classes), reproducible from `seed`: for tests,
    and the skeleton a checkpoint that stores its teachers is loaded into. The built-in world's trained
    teachers are the miniature's folders (miniature.teacher_folders)."""
    check_tasks(tasks)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        teachers = {task: TASKS[task].teacher.tiny(teacher_input_size(task, grid)) for task in tasks}
    return TargetEncoders(teachers).to(dtype)


def make_teachers(
    paths: dict[str, str | os.PathLike], tasks: tuple[str, ...], grid: int, dtype: torch.dtype = torch.float32
) -> TargetEncoders | None:
    """The teachers of `tasks` from their weight folders `paths` ({task: folder}); None without tasks."""
    if not tasks:
        return None
    missing = [t for t in tasks if t not in paths]
    if missing:
        raise ValueError(f"no teacher weights for task(s) {missing}: pass --teacher TASK=PATH for each")
    return load_teachers({t: paths[t] for t in tasks}, grid, dtype)


def add_teacher_args(parser) -> None:
    """--teacher TASK=PATH (repeatable) and its spellings --depth / --seg / --gen, for every CLI."""
    parser.add_argument(
        "--teacher", action="append", metavar="TASK=PATH", help="a teacher's weights (repeatable)"
    )
    for task in ("depth", "seg", "gen"):
        parser.add_argument(f"--{task}", help=f"= --teacher {task}=PATH ({TASKS[task].weights})")


def teacher_paths(args, error) -> dict[str, str]:
    """{task: weight folder} from --teacher TASK=PATH and --depth/--seg/--gen; `error` reports a bad item."""
    paths = {}
    for item in args.teacher or []:
        task, sep, path = item.partition("=")
        if not sep or task not in TASKS:
            error(f"--teacher {item!r}: expected TASK=PATH with TASK one of {list(TASKS)}")
        paths[task] = path
    for task in ("depth", "seg", "gen"):
        if getattr(args, task):
            paths[task] = getattr(args, task)
    return paths
