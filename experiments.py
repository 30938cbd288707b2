r"""The paper's comparison tables at the tiny scale: every row of a table as a train.py variant (PT, then IFT
from its checkpoint, on the built-in data; the same seed and budget for all rows), scored on the built-in
held-out QA and printed in the table's layout. docs/reproduce.md gives the same rows at full scale with the
paper's numbers.

    python experiments.py --table 5                 # N_seek 0 / 4 / 8 / 16 / 24 (--variants all: +12, LLaVA)
    python experiments.py --table III --dry-run     # print the commands only
    python experiments.py --table IV --seeds 0 1 2  # mean ± sample std over seeds
    python experiments.py --table 1 --epochs tiny   # train.py's own tiny budget (≈3 min per run)

Each run goes to runs/experiments/table<N>/<variant>/seed<S>: train.py's stages, log.txt (the output of its
three commands) and result.json; a run whose result.json holds the same commands is not run again (--force
reruns it). The table goes to runs/experiments/table<N>/results.{md,json}. The numbers are whatever the tiny
model scores: the miniature's 1.4 M-parameter LLM is close to chance on the multiple-choice questions, and
one seed on 200 questions moves by several points, so they show that every row runs, not the paper's
effects.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ablations import TABLES, Table, Variant

ROOT = Path(__file__).resolve().parent
OUT = Path("runs/experiments")
# The default budget: PT 1 epoch (63 steps at the tiny batch of 16), IFT 1 epoch (125 steps), so that three
# seeds of demo.py's two rows finish in < 15 minutes on 2 idle CPU cores; "tiny" = train.py's own tiny
# budget (PT 2, IFT 2 epochs).
DEFAULT_EPOCHS = "1,1"
TASK_ORDER = ("Count", "Depth", "Relation", "Distance")  # Tab. 1's CV-Bench columns; the built-in QA's tasks


# ----------------------------------------------------------------------------- commands
@dataclass(frozen=True)
class Budget:
    """The epochs of PT and of IFT, passed to train.py --epochs; None: train.py's own tiny budget."""

    pt: str | None
    ift: str | None

    def flags(self, stage: str) -> list[str]:
        epochs = getattr(self, stage)
        return [] if epochs is None else ["--epochs", epochs]

    def __str__(self) -> str:
        if self.pt is None:
            return "train.py's own tiny budget (PT 2, IFT 2 epochs)"
        return f"PT {self.pt} epochs, IFT {self.ift} epochs"


def epochs_budget(text: str) -> Budget:
    """--epochs: 'PT,IFT' or one number for both (positive epochs), or 'tiny' (train.py's own budget)."""
    if text == "tiny":
        return Budget(None, None)
    parts = text.split(",")
    try:
        ok = len(parts) <= 2 and all(float(x) > 0 for x in parts)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected 'tiny', E or PT,IFT (positive epochs), got {text!r}")
    return Budget(parts[0], parts[-1])


def run_folder(out: Path, table: Table, variant: Variant, seed: int) -> Path:
    return out / f"table{table.key}" / variant.name / f"seed{seed}"


def relative(path: Path) -> Path:
    """`path` (absolute) as the commands name it: relative to the repository when inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def commands(variant: Variant, folder: Path, seed: int, budget: Budget) -> list[list[str]]:
    """The variant's commands (without the interpreter): train.py PT, train.py IFT from its checkpoint (as
    at full scale, docs/reproduce.md: IFT takes the model's configuration from it and acts on --ift-tokens
    and --emb-losses), eval.py's built-in QA."""
    out = str(relative(folder))
    common = [*variant.flags, "--seed", str(seed), "--out", out]
    pt = ["train.py", "--stage", "pt", *common, *budget.flags("pt")]
    ift = ["train.py", "--stage", "ift", "--init", f"{out}/pt/final", *common, *budget.flags("ift")]
    return [pt, ift, ["eval.py", "qa", "--run", out]]


def shell(command: list[str]) -> str:
    return shlex.join(["python", *command])


# ----------------------------------------------------------------------------- running
def cached(folder: Path, cmds: list[list[str]]) -> dict | None:
    """The run's result.json if it was made by exactly these commands."""
    path = folder / "result.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("commands") == cmds else None


def stage_steps(folder: Path) -> dict[str, int]:
    """Optimizer steps per stage, from each stage's metrics.jsonl."""
    return {m.parent.name: len(m.read_text().splitlines()) for m in sorted(folder.glob("*/metrics.jsonl"))}


def pt_layers(folder: Path) -> dict[str, list[int]]:
    """The layers whose embedding losses PT trained, per task, read off its loss terms ('depth@2/sl1')."""
    path = folder / "pt" / "metrics.jsonl"
    if not path.exists():
        return {}
    layers: dict[str, set[int]] = {}
    for key in json.loads(path.read_text().splitlines()[0]):
        task, at, rest = key.partition("@")
        if at:
            layers.setdefault(task, set()).add(int(rest.split("/")[0]))
    return {task: sorted(found) for task, found in layers.items()}


def run_logged(cmds: list[list[str]], path: Path, threads: int | None = None) -> None:
    """Run the commands in the repository one after the other, their output into `path` (`threads`: each
    process's CPU threads, OMP_NUM_THREADS; default torch's); raise RuntimeError with the end of the log if
    one fails."""
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(path, "w") as log:
        for command in cmds:
            log.write(f"$ {shell(command)}\n")
            log.flush()
            done = subprocess.run(
                [sys.executable, *command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
            )
            if done.returncode != 0:
                tail = "\n".join(path.read_text().splitlines()[-15:])
                raise RuntimeError(
                    f"{shell(command)} exited with {done.returncode}; the end of its log:\n{tail}"
                )


def run_variant(folder: Path, cmds: list[list[str]], force: bool, threads: int | None = None) -> dict:
    """Run (or reuse) one variant -> its result: the commands, seconds, steps, PT layers and QA metrics."""
    if not force and (result := cached(folder, cmds)) is not None:
        print(f"  cached   {relative(folder)}")
        return result
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.time()
    run_logged(cmds, folder / "log.txt", threads)
    summary = json.loads((folder / "eval" / "qa" / "summary.json").read_text())["metrics"]
    result = {
        "commands": cmds,
        "seconds": round(time.time() - t0, 1),
        "steps": stage_steps(folder),
        "pt_layers": pt_layers(folder),
        "qa": summary,
    }
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    print(f"  {result['seconds']:6.0f} s  {relative(folder)}: QA {100 * summary['accuracy']:.1f} %")
    return result


# ----------------------------------------------------------------------------- the table
def cell(values: list[float]) -> str:
    """Percent, mean ± sample standard deviation over seeds."""
    if not values:
        return "failed"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def qa_tasks(results: dict[str, list[dict]]) -> list[str]:
    """The built-in QA's tasks found in the results, in Tab. 1's order (any others after it)."""
    found = {task for runs in results.values() for r in runs for task in r["qa"]["tasks"]}
    rank = {task: i for i, task in enumerate(TASK_ORDER)}
    return sorted(found, key=lambda task: (rank.get(task, len(rank)), task))


def qa_columns(runs: list[dict], tasks: list[str]) -> dict[str, list[float]]:
    """The built-in QA per task and overall, one value per seed that finished."""
    columns = {task: [r["qa"]["tasks"][task] for r in runs if task in r["qa"]["tasks"]] for task in tasks}
    columns["overall"] = [r["qa"]["accuracy"] for r in runs]
    return columns


def render(table: Table, variants: list[Variant], results: dict[str, list[dict]], show_layers: bool) -> str:
    """A markdown table in the paper's layout: its label columns, the built-in QA (%), the paper's last
    column for reference (and the layers the tiny PT trained, for Tab. 3)."""
    tasks = qa_tasks(results)
    header = [*table.label_columns, *(f"{t} (QA)" for t in tasks), "overall (QA)", "unparsed"]
    header.append(f"paper {table.paper_columns[-1]}")
    if show_layers:
        header.append("tiny layers D / S / G")
    rows = [header]
    for v in variants:
        done = results.get(v.name, [])
        cells = [*v.label, *(cell(values) for values in qa_columns(done, tasks).values())]
        cells.append(f"{statistics.fmean(r['qa']['unparsed'] for r in done):g}" if done else "")
        cells.append("—" if v.paper is None else f"{v.paper[-1]:.1f}")
        if show_layers:
            layers = done[0]["pt_layers"] if done else {}
            cells.append(" / ".join(",".join(map(str, layers.get(t, []))) for t in ("depth", "seg", "gen")))
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def budget_note(budget: Budget, results: dict[str, list[dict]], seeds: list[int]) -> str:
    """What every row was trained with: the budget, the optimizer steps per stage, the seeds."""
    steps = sorted(
        {" / ".join(f"{k} {n}" for k, n in r["steps"].items()) for rs in results.values() for r in rs}
    )
    return f"budget: {budget} (steps: {'; '.join(steps) or '-'}); seeds {seeds}"


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, choices=list(TABLES), help="the paper's table (App. tables I-V)")
    p.add_argument(
        "--epochs",
        default=DEFAULT_EPOCHS,
        type=epochs_budget,
        help=f"epochs of PT,IFT (or one number for both), passed to train.py --epochs (default "
        f"{DEFAULT_EPOCHS}: the demo's 3 seeds in < 15 min on 2 cores); 'tiny' = train.py's own tiny "
        "budget (PT 2, IFT 2 epochs, ≈4 min per run)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (default 0)")
    p.add_argument(
        "--variants", help="comma list of variant names, or 'all' (default: every row, but two of Tab. 5)"
    )
    p.add_argument("--out", type=Path, default=OUT, help=f"output root (default {OUT})")
    p.add_argument("--force", action="store_true", help="rerun variants whose result.json exists")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    args.out = (Path.cwd() / args.out).resolve()  # the commands run in the repository
    table = TABLES[args.table]
    names = [v.name for v in table.variants]
    if args.variants == "all":
        args.variants = names
    elif args.variants:
        args.variants = args.variants.split(",")
    else:
        args.variants = [v.name for v in table.variants if v.default]
    if unknown := sorted(set(args.variants) - set(names)):
        p.error(f"--variants: unknown {unknown}; table {table.key} has {names}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    table = TABLES[args.table]
    variants = [v for v in table.variants if v.name in args.variants]
    plan = [(v, seed, run_folder(args.out, table, v, seed)) for v in variants for seed in args.seeds]
    print(f"Table {table.key}: {table.varies}; {len(variants)} variants x {len(args.seeds)} seed(s)")
    if args.dry_run:
        for v, seed, folder in plan:
            print(f"# {v.name}, seed {seed}")
            for command in commands(v, folder, seed, args.epochs):
                print(shell(command))
        return
    t0 = time.time()
    results: dict[str, list[dict]] = {}
    failed = []
    for v, seed, folder in plan:
        try:
            results.setdefault(v.name, []).append(
                run_variant(folder, commands(v, folder, seed, args.epochs), args.force)
            )
        except RuntimeError as e:
            failed.append(v.name)
            print(f"  FAILED   {relative(folder)}: {e}")
    wall = time.time() - t0
    markdown = render(table, variants, results, show_layers=table.key == "3")
    note = budget_note(args.epochs, results, args.seeds)
    title = (
        f"Table {table.key} at the tiny scale: {table.varies}. Built-in held-out QA accuracy (%), "
        f"{len(args.seeds)} seed(s); paper: {', '.join(table.paper_columns)} (docs/reproduce.md)."
    )
    skipped = [v.name for v in table.variants if v not in variants]
    if skipped:
        note += f"; rows not run: {', '.join(skipped)} (--variants all)"
    load = os.getloadavg()[0]
    note += f"; wall time {wall:.0f} s on {os.cpu_count()} cores (load average {load:.1f} at the end)"
    text = f"{title}\n\n{markdown}\n\n{note}"
    print("\n" + text)
    folder = args.out / f"table{table.key}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.md").write_text(text + "\n")
    record = {
        "table": table.key,
        "varies": table.varies,
        "budget": {"pt_epochs": args.epochs.pt, "ift_epochs": args.epochs.ift},
        "seeds": args.seeds,
        "wall_seconds": round(wall, 1),
        "variants": {
            v.name: {"label": list(v.label), "paper": v.paper, "runs": results.get(v.name, [])}
            for v in variants
        },
    }
    (folder / "results.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {relative(folder / 'results.md')} and {relative(folder / 'results.json')}")
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (see their log.txt)")


if __name__ == "__main__":
    main()
