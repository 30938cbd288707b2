"""The rows of the paper's comparison tables as data (Tab. 1, 3-6, App. Tab. I-V): each row a label and the
train.py flags of its PT and IFT stages, with the paper's number beside it. experiments.py runs them at the
tiny scale; docs/reproduce.md gives the same rows at full scale."""

from __future__ import annotations

import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One row of a table: its folder name, its cells in the paper's label columns, its train.py flags,
    the paper's numbers of that row (None: the row is not in the paper), and whether it runs by default."""

    name: str
    label: tuple[str, ...]
    flags: tuple[str, ...]
    paper: tuple[float, ...] | None
    default: bool = True


@dataclass(frozen=True)
class Table:
    """A table of the paper: what it varies, its label columns and benchmark columns, and its rows."""

    key: str
    varies: str
    label_columns: tuple[str, ...]
    paper_columns: tuple[str, ...]
    variants: tuple[Variant, ...]


def row(
    name: str, label: str | tuple[str, ...], flags: str, paper: str | None, default: bool = True
) -> Variant:
    """A Variant from strings: flags as on a command line, the paper's numbers space-separated."""
    label = (label,) if isinstance(label, str) else label
    numbers = None if paper is None else tuple(float(x) for x in paper.split())
    return Variant(name, label, tuple(shlex.split(flags)), numbers, default)


SHORT = ("CV-Bench 2D", "CV-Bench 3D", "MMStar", "Avg")  # the ablations' columns (Sec. 5.1)
WITH_RWQA = ("CV-Bench 2D", "CV-Bench 3D", "MMStar", "RWQA", "Avg")
CVBENCH_TASKS = ("Count 2D", "Depth 3D", "Relation 2D", "Distance 3D")
LLAVA = "--mode llava"  # the single-encoder LLaVA-1.5 baseline: no predictors, no special tokens
TABLES: dict[str, Table] = {
    t.key: t
    for t in (
        Table(
            "1",
            "the single- and multi-encoder baselines against OLA-VLM, both base encoders (Llama3-8b rows)",
            ("method", "encoder"),
            (*CVBENCH_TASKS, "MMStar", "RWQA", "OK-VQA", "Avg"),
            (
                row("llava", ("LLaVA-1.5", "CLIP"), LLAVA, "50.4 73.3 64.9 48.7 38.8 57.8 56.9 55.1"),
                row(
                    "feat-concat",
                    ("LLaVA-1.5 (feat concat.)", "CLIP + E_depth + E_seg + E_gen"),
                    "--mode feat-concat",
                    "45.3 75.5 70.9 54.3 36.1 57.5 58.3 56.8",
                ),
                row(
                    "token-concat",
                    ("LLaVA-1.5 (token concat.)", "CLIP + E_depth + E_seg + E_gen"),
                    "--mode token-concat",
                    "45.9 75.7 68.9 52.7 37.8 56.5 59.3 56.7",
                ),
                row("ola", ("OLA-VLM", "CLIP"), "", "51.3 74.2 69.4 54.3 39.5 57.9 56.6 57.6"),
                row(
                    "llava-convnext",
                    ("LLaVA-1.5", "ConvNeXT"),
                    f"{LLAVA} --vision-type convnext",
                    "54.1 62.8 69.5 49.8 37.4 57.5 56.3 55.3",
                ),
                row(
                    "ola-convnext",
                    ("OLA-VLM", "ConvNeXT"),
                    "--vision-type convnext",
                    "57.4 71.5 66.8 52.8 38.5 55.0 59.0 57.3",
                ),
            ),
        ),
        Table(
            "3",
            "the layer sets D, S, G of the embedding losses (numbers for 32 layers, scaled to the tiny 8)",
            ("D", "S", "G"),
            SHORT,
            tuple(
                row(
                    name,
                    tuple("{" + ";".join(layers.split(",")) + "}" for layers in (d, s, g)),
                    f"--layers depth={d} --layers seg={s} --layers gen={g}",
                    paper,
                )
                for name, d, s, g, paper in (
                    ("d18-s18-g20", "18", "18", "20", "58.9 60.9 37.9 52.6"),
                    ("d20-s18-g20", "20", "18", "20", "57.6 60.8 38.8 52.4"),
                    ("d8,14-s10,16-g12,18", "8,14", "10,16", "12,18", "56.5 56.4 38.8 50.6"),
                    ("d8,20-s10,18-g12,20", "8,20", "10,18", "12,20", "58.6 64.2 39.5 54.1"),
                    ("d18,20-s18,20-g16,20", "18,20", "18,20", "16,20", "55.8 59.5 40.8 52.0"),
                    (
                        "d16,18,20-s16,18,20-g16,18,20",
                        "16,18,20",
                        "16,18,20",
                        "16,18,20",
                        "56.8 61.3 37.0 51.7",
                    ),
                )
            ),
        ),
        Table(
            "4",
            "the stages with embedding losses (PT, IFT)",
            ("PT", "IFT"),
            WITH_RWQA,
            (
                row("llava", ("single-encoder", ""), LLAVA, "56.0 61.0 38.8 57.8 53.4"),
                row("tokens", ("✗ (<t> learnable)", "✗"), "--emb-losses none", "57.7 62.9 38.8 57.5 54.2"),
                row("pt", ("✓", "✗"), "--emb-losses pt", "58.6 64.2 39.5 57.9 55.1"),
                row("pt+ift", ("✓", "✓"), "--emb-losses pt+ift", "59.1 58.3 38.3 56.2 53.0"),
            ),
        ),
        Table(
            "5",
            "the number N_seek of special tokens per task",
            ("N_seek",),
            WITH_RWQA,
            (
                # Tab. 5 in < 15 min on 2 cores: 5 rows by default, --variants all adds these two
                row("llava", "single-encoder", LLAVA, "56.0 61.0 38.8 57.8 53.4", default=False),
                *(
                    row(f"n{n}", str(n), f"--num-seek-tokens {n}", paper, default=n != 12)
                    for n, paper in (
                        (0, "56.1 62.0 40.1 56.3 53.6"),
                        (4, "60.3 57.9 38.1 56.6 53.2"),
                        (8, "58.6 64.2 39.5 57.9 55.1"),
                        (12, "58.7 60.7 37.9 57.5 53.7"),
                        (16, "56.6 63.6 37.1 54.5 52.9"),
                        (24, "55.7 60.0 39.3 57.4 53.1"),
                    )
                ),
            ),
        ),
        Table(
            "6",
            "the special tokens during IFT (dropped: not in the paper)",
            ("<t> during IFT",),
            WITH_RWQA,
            (
                row("frozen", "frozen", "--ift-tokens frozen", "58.6 64.2 39.5 57.9 55.1"),
                row("learnable", "learnable", "--ift-tokens learnable", "56.9 56.1 39.0 57.3 52.3"),
                row("none", "dropped", "--ift-tokens none", None),
            ),
        ),
        Table(
            "I",
            "the key input of the embedding predictors",
            ("key input",),
            WITH_RWQA,
            (
                row("img+t", "<img>|<t>", "--key-input img+t", "53.0 54.6 38.4 56.7 50.7"),
                row("sys+img+t", "<sys>|<img>|<t>", "--key-input sys+img+t", "58.7 63.0 38.8 57.4 54.5"),
                row(
                    "sys+img+t+txt",
                    "<sys>|<img>|<t>|<txt>",
                    "--key-input sys+img+t+txt",
                    "58.6 64.2 39.5 57.9 55.1",
                ),
            ),
        ),
        Table(
            "II",
            "which embedding losses (teachers) are distilled",
            ("mode",),
            SHORT,
            (
                row("llava", "LLaVA-1.5", LLAVA, "56.0 61.0 38.8 51.9"),
                *(
                    row(tasks.replace(",", "+"), tasks.replace(",", " + "), f"--tasks {tasks}", paper)
                    for tasks, paper in (
                        ("depth", "58.6 63.5 38.8 53.6"),
                        ("seg", "56.2 57.6 38.2 50.7"),
                        ("gen", "56.2 65.8 39.3 53.8"),
                        ("depth,seg", "58.6 61.8 38.6 53.0"),
                        ("depth,gen", "53.6 61.8 38.8 51.4"),
                        ("seg,gen", "54.2 60.2 39.3 51.2"),
                        ("depth,seg,gen", "58.6 64.2 39.5 54.1"),
                    )
                ),
            ),
        ),
        Table(
            "III",
            "the order of the special-token blocks after the image tokens",
            ("<t> order",),
            (*CVBENCH_TASKS, "Overall"),
            (
                row("llava", "LLaVA-1.5", LLAVA, "50.4 73.3 64.9 48.7 58.5"),
                *(
                    row(
                        "-".join(order.split(",")),
                        "|".join(f"<{t[0]}>" for t in order.split(",")),
                        f"--token-order {order}",
                        paper,
                    )
                    for order, paper in (
                        ("depth,seg,gen", "49.4 68.7 69.2 56.2 59.9"),
                        ("depth,gen,seg", "51.6 72.8 70.3 54.5 61.4"),
                        ("seg,depth,gen", "48.7 71.3 65.2 52.5 58.5"),
                        ("seg,gen,depth", "46.7 71.3 71.2 50.8 58.9"),
                        ("gen,depth,seg", "51.3 74.2 69.4 54.3 61.4"),
                        ("gen,seg,depth", "50.9 68.8 70.0 50.5 59.2"),
                    )
                ),
            ),
        ),
        Table(
            "IV",
            "the weight λ of every embedding loss",
            ("λ_depth", "λ_seg", "λ_gen"),
            SHORT,
            (
                row("llava", ("LLaVA-1.5", "", ""), LLAVA, "56.0 61.0 38.8 51.9"),
                *(
                    row(
                        f"w{w}",
                        (w, w, w),
                        " ".join(f"--task-weight {t}={w}" for t in ("depth", "seg", "gen")),
                        paper,
                    )
                    for w, paper in (
                        ("0.10", "60.5 61.3 38.3 53.4"),
                        ("0.25", "56.3 59.4 37.1 50.9"),
                        ("0.50", "58.6 64.2 39.5 54.1"),
                        ("0.75", "57.9 59.4 37.6 51.6"),
                        ("1.00", "55.8 61.7 38.1 51.9"),
                    )
                ),
            ),
        ),
        Table(
            "V",
            "the terms of the embedding loss (contrastive only: not in the paper)",
            ("L_sL1", "L_contrastive"),
            SHORT,
            (
                row("sl1", ("✓", "✗"), "--contrastive-weight 0", "56.8 62.3 38.3 52.5"),
                row("sl1+con", ("✓", "✓"), "", "58.6 64.2 39.5 54.1"),
                row("con", ("✗", "✓"), "--sl1-weight 0", None),
            ),
        ),
    )
}
