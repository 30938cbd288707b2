r"""The paper's claim at the tiny scale, on a laptop: LLaVA-1.5 (NTP only) and OLA-VLM (NTP + the embedding
losses of Eq. 1 in PT) trained with the same seeds, data and budget on the built-in world, then probed
layer by layer (Fig. 3) and scored on the built-in held-out QA (Tab. 1's CV-Bench tasks).

    python demo.py                     # 3 seeds, PT checkpoints probed (≈ 15 min on 2 cores)
    python demo.py --seeds 0           # one seed (≈ 4 min)
    python demo.py --probe-stage ift   # probe the IFT checkpoints instead

Per seed, each model runs experiments.py's commands (train.py PT, train.py IFT from its checkpoint, eval.py
qa; Tab. 1's rows "llava" and "ola") into runs/demo/<model>/seed<S>, and probe.py probes both checkpoints
of the probed stage against the miniature's teachers into runs/demo/probe/seed<S>. A run whose result is on
disk from the same commands is reused (--force reruns). Writes runs/demo/demo.{png,json,md}: the probe
cosine per layer (mean and min-max over seeds, the layers OLA-VLM's PT supervises marked) and the QA per
task, mean ± sample std over seeds. docs/design.md §9 says what each pretrained part knows; the README shows
the numbers and what they do and do not show.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ablations import TABLES
from experiments import (
    DEFAULT_EPOCHS,
    TASK_ORDER,
    commands,
    epochs_budget,
    relative,
    run_logged,
    run_variant,
    shell,
)

MODELS = {"llava": "LLaVA-1.5", "ola": "OLA-VLM"}  # Tab. 1's rows: name -> label
PROBED = ("depth", "seg", "gen")
OUT = Path("runs/demo")


# ----------------------------------------------------------------------------- runs
def probe_command(
    folders: dict[str, Path], stage: str, seed: int, out: Path, images: int | None = None
) -> list[str]:
    """probe.py on each model's `stage` checkpoint against the miniature's teachers (those PT distilled), the
    probes seeded by `seed`; `images` caps the probe's train and val images."""
    models = [f"{relative(folder)}/{stage}/final" for folder in folders.values()]
    labels = [MODELS[name] for name in folders]
    cap = [] if images is None else ["--max-train-images", str(images), "--max-val-images", str(images)]
    return [
        "probe.py",
        "--models",
        *models,
        "--labels",
        *labels,
        "--seed",
        str(seed),
        "--out",
        str(relative(out)),
        *cap,
    ]


def run_probe(out: Path, command: list[str], force: bool) -> dict:
    """Run (or reuse) one probe command -> probe.py's scores.json, with the command."""
    path = out / "scores.json"
    if not force and path.exists() and json.loads(path.read_text()).get("command") == command:
        print(f"  cached   {relative(out)}")
        return json.loads(path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    run_logged([command], out / "log.txt")
    scores = json.loads(path.read_text())
    scores["command"] = command
    path.write_text(json.dumps(scores, indent=1))
    print(f"  {time.time() - t0:6.0f} s  {relative(out)}")
    return scores


# ----------------------------------------------------------------------------- summaries
def spread(values: list[float]) -> dict:
    """Mean, sample std (0 for one value), min and max of the values over seeds."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "mean": statistics.fmean(values),
        "std": std,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise(runs: dict[str, list[dict]], probes: list[dict]) -> dict:
    """Over seeds: QA per task and overall, probe cosine per task and layer, per model; the mean-target
    level per task; the layers OLA-VLM's PT supervised."""
    qa = {}
    for name, results in runs.items():
        tasks = [t for t in TASK_ORDER if all(t in r["qa"]["tasks"] for r in results)]
        qa[MODELS[name]] = {t: spread([r["qa"]["tasks"][t] for r in results]) for t in tasks}
        qa[MODELS[name]]["overall"] = spread([r["qa"]["accuracy"] for r in results])
    probe = {}
    for label in MODELS.values():
        per_task = {}
        for t in PROBED:
            layers = probes[0]["scores"][label][t]
            per_task[t] = {layer: spread([p["scores"][label][t][layer] for p in probes]) for layer in layers}
        probe[label] = per_task
    mean_target = {t: spread([p["mean_target"][t] for p in probes]) for t in PROBED}
    return {"qa": qa, "probe": probe, "mean_target": mean_target, "pt_layers": runs["ola"][0]["pt_layers"]}


def pm(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    """'mean ± std' of a spread (the mean alone for one seed)."""
    if s["n"] == 1:
        return f"{scale * s['mean']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def markdown(summary: dict) -> str:
    """Two tables: the QA per task in % (Tab. 1 layout) and the probe cosine at the layers PT supervises."""
    qa = summary["qa"]
    columns = list(next(iter(qa.values())))
    lines = table(
        ["model", *columns], [[label, *(pm(row[c], 100, 1) for c in columns)] for label, row in qa.items()]
    )
    supervised = [(t, str(layer)) for t, layers in summary["pt_layers"].items() for layer in layers]
    rows = []
    for label, per_task in summary["probe"].items():
        best = [max(per_task[t], key=lambda layer: per_task[t][layer]["mean"]) for t in PROBED]
        rows.append([label, *(pm(per_task[t][layer]) for t, layer in supervised), " / ".join(best)])
    lines += [
        "",
        *table(["probe cosine", *(f"{t}@{layer}" for t, layer in supervised), "best layer D / S / G"], rows),
    ]
    levels = ", ".join(f"{t} {pm(m)}" for t, m in summary["mean_target"].items())
    return "\n".join([*lines, "", f"Mean-target level (the constant probe): {levels}."])


def plot(summary: dict, path: Path, title: str) -> None:
    """Fig. 3 at the tiny scale: one panel per task, one curve per model (mean over seeds, band min-max), the
    mean-target level dashed, the layers OLA-VLM's PT supervises dotted."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(PROBED), 3.6))
    axes = fig.subplots(1, len(PROBED), squeeze=False)[0]
    for ax, t in zip(axes, PROBED):
        for label, per_task in summary["probe"].items():
            layers = sorted(per_task[t], key=int)
            x = [int(layer) for layer in layers]
            ax.plot(x, [per_task[t][layer]["mean"] for layer in layers], marker="o", label=label)
            low = [per_task[t][layer]["min"] for layer in layers]
            ax.fill_between(x, low, [per_task[t][layer]["max"] for layer in layers], alpha=0.2)
        ax.axhline(summary["mean_target"][t]["mean"], color="gray", linestyle="--", label="mean target")
        for i, layer in enumerate(summary["pt_layers"].get(t, [])):
            ax.axvline(
                layer, color="black", linestyle=":", alpha=0.6, label="PT-supervised" if i == 0 else None
            )
        ax.set(title=f"{t} probe", xlabel="LLM layer", ylabel="cosine similarity")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per model and seed")
    p.add_argument(
        "--epochs",
        default=DEFAULT_EPOCHS,
        type=epochs_budget,
        help=f"epochs of PT,IFT for both models (default {DEFAULT_EPOCHS}, as experiments.py)",
    )
    p.add_argument("--probe-stage", choices=("pt", "ift"), default="pt", help="the checkpoints probed")
    p.add_argument(
        "--serial", dest="parallel", action="store_false", help="train the two models one after the other"
    )
    p.add_argument(
        "--probe-images",
        type=int,
        default=300,
        help="cap the probe's train and val images (default 300: the 15-minute budget; 0 = all)",
    )
    p.add_argument("--out", type=Path, default=OUT, help=f"output root (default {OUT})")
    p.add_argument("--force", action="store_true", help="rerun what is on disk")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    args.out = (Path.cwd() / args.out).resolve()  # the commands run in the repository
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = {v.name: v for v in TABLES["1"].variants}
    t0 = time.time()
    runs: dict[str, list[dict]] = {name: [] for name in MODELS}
    probes = []
    for seed in args.seeds:
        folders = {name: args.out / name / f"seed{seed}" for name in MODELS}
        plan = {name: commands(rows[name], folders[name], seed, args.epochs) for name in MODELS}
        probe_out = args.out / "probe" / f"seed{seed}"
        probe = probe_command(folders, args.probe_stage, seed, probe_out, args.probe_images or None)
        if args.dry_run:
            print(
                "\n".join(
                    [f"# seed {seed}", *(shell(c) for cmds in plan.values() for c in cmds), shell(probe)]
                )
            )
            continue
        print(f"seed {seed}")
        # the two models side by side, one CPU thread each (tiny matrices: two processes beat two threads)
        threads = 1 if args.parallel else None
        with ThreadPoolExecutor(len(MODELS) if args.parallel else 1) as pool:
            done = {
                name: pool.submit(run_variant, folders[name], plan[name], args.force, threads)
                for name in MODELS
            }
        for name, future in done.items():
            runs[name].append(future.result())
        probes.append(run_probe(probe_out, probe, args.force))
    if args.dry_run:
        return
    wall = time.time() - t0
    summary = summarise(runs, probes)
    title = (
        f"LLaVA-1.5 vs OLA-VLM at the tiny scale: {args.probe_stage.upper()} checkpoints probed, seeds "
        f"{args.seeds}, budget {args.epochs}"
    )
    text = f"{title}\n\n{markdown(summary)}\n\nwall time {wall:.0f} s"
    print("\n" + text)
    plot(summary, args.out / "demo.png", title)
    (args.out / "demo.md").write_text(text + "\n")
    record = {
        "seeds": args.seeds,
        "budget": {"pt_epochs": args.epochs.pt, "ift_epochs": args.epochs.ift},
        "probe_stage": args.probe_stage,
        "wall_seconds": round(wall, 1),
        "summary": summary,
        "runs": {MODELS[name]: results for name, results in runs.items()},
        "probes": probes,
    }
    (args.out / "demo.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {relative(args.out / 'demo.png')}, demo.json and demo.md")


if __name__ == "__main__":
    main()
