"""A training run's state on disk (`--out`/<stage>/): what one stage trains with (`Run`), its step
checkpoints and resuming from them, run.json and metrics.jsonl, one writer per --out (docs/design.md §12)."""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
from checkpoint import save_checkpoint
from distributed import gather_states, load_optimizer_state
from ola import OLAVLM
from recipe import stored_components
from teachers import TargetEncoders
from weights import load_tensors_only, read_json, write_folder


def json_args(args) -> dict:
    """The run's arguments as plain JSON values (paths as strings, the model configuration as a dict; the
    built-in folders are in the paths they filled in)."""
    values = {k: v for k, v in vars(args).items() if k != "builtin"}
    return json.loads(json.dumps({**values, "ola": asdict(args.ola)}, default=str))


@dataclass
class Run:
    """Everything one stage trains with."""

    stage: str
    model: OLAVLM
    wrapped: torch.nn.Module
    teachers: TargetEncoders | None
    dataset: data.LLaVADataset
    loader: data.Loader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total: int  # optimizer steps of the stage
    accum: int  # micro-batches per optimizer step
    folder: Path
    dtype: torch.dtype  # frozen weights and autocast (--dtype)
    step: int = 0


def latest_checkpoint(args, stage: str) -> Path | None:
    """The newest complete step_* checkpoint of the stage when --resume is on."""
    if not args.resume:
        return None
    found = sorted((args.out / stage).glob("step_*[0-9]"))
    if not found:
        print(f"--resume: no checkpoint in {args.out / stage}; starting {stage} from scratch")
        return None
    check_same_flags(args, found[-1] / "args.json")
    return found[-1]


RESUMABLE = ("resume", "max_steps", "save_every", "keep", "num_workers")  # flags a resumed run may change


def check_same_flags(args, recorded: Path) -> None:
    """A resumed run continues the recorded one: refuse other flags (a run mixing two configurations would
    record only the second)."""
    before = read_json(recorded)
    now = json_args(args)
    changed = [
        k for k in sorted(set(before) | set(now)) if k not in RESUMABLE and before.get(k) != now.get(k)
    ]
    if changed:
        diffs = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(
            f"--resume: {recorded} was trained with other flags ({diffs}): resume with its flags"
        )


def resume(run: Run, checkpoint: Path, args, rank: int) -> None:
    """Optimizer, schedule, step, data position and RNG from a checkpoint's trainer.pt (tensors only)."""
    trainer = load_tensors_only(checkpoint / "trainer.pt")
    expected = ("optimizer", "scheduler", "step", "loader", "rng")
    if not isinstance(trainer, dict) or not set(expected) <= trainer.keys():
        raise ValueError(f"{checkpoint / 'trainer.pt'}: expected a dict with the keys {list(expected)}")
    load_optimizer_state(run.wrapped, run.optimizer, trainer["optimizer"], args)
    run.scheduler.load_state_dict(trainer["scheduler"])
    run.step = trainer["step"]
    run.loader.load_state_dict(trainer["loader"])
    torch.set_rng_state(trainer["rng"])
    if rank == 0:
        print(f"resumed {run.stage} from {checkpoint} at step {run.step}")


def save_step(run: Run, args, rank: int) -> None:
    """step_<n>/ = model/ (an OLA checkpoint) + trainer.pt, written to a temporary folder then renamed;
    only the newest --keep are kept."""
    state, optimizer_state = gather_states(run.wrapped, run.optimizer, args)
    if rank != 0:
        return
    trainer = {
        "optimizer": optimizer_state,
        "scheduler": run.scheduler.state_dict(),
        "step": run.step,
        "loader": run.loader.state_dict(),
        "rng": torch.get_rng_state(),
    }

    def write(tmp: Path) -> None:
        save_checkpoint(run.model, tmp / "model", stored_components(run.stage), state=state)
        torch.save(trainer, tmp / "trainer.pt")
        (tmp / "args.json").write_text(json.dumps(json_args(args), indent=1))

    write_folder(run.folder / f"step_{run.step:06d}", write)
    for old in sorted(run.folder.glob("step_*[0-9]"))[: -args.keep]:
        shutil.rmtree(old, ignore_errors=True)


def record_config(run: Run, args) -> None:
    """Print the stage's full configuration and write it as run.json beside metrics.jsonl."""
    config = {
        "stage": run.stage,
        "model": asdict(run.model.cfg),
        "trainable": [
            name
            for name, module in run.model.named_children()
            if any(p.requires_grad for p in module.parameters())
        ],
        "steps": run.total,
        "accumulation": run.accum,
        "args": json_args(args),
    }
    (run.folder / "run.json").write_text(json.dumps(config, indent=1))
    print(f"{run.stage}: model {config['model']}")
    print(f"{run.stage}: {run.total} steps x {run.accum} micro-batches; args {config['args']}")


def open_metrics(run: Run, resumed: bool):
    """metrics.jsonl of the stage; on resume the rows up to the checkpoint are kept (later ones re-run)."""
    path = run.folder / "metrics.jsonl"
    kept = []
    if resumed and path.exists():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):  # a kill tore the line being written
                print(f"{path}:{n}: dropping an incomplete metrics line")
                continue
            if step <= run.step:
                kept.append(line)
    metrics = open(path, "w")  # noqa: SIM115 (closed at the end of the stage)
    metrics.writelines(line + "\n" for line in kept)
    return metrics


@contextmanager
def sole_writer(out: Path) -> Iterator[None]:
    """One train.py per --out: an exclusive lock on <out>/.lock while the run lasts (the kernel releases it
    when the process ends, however it ends), else a clear refusal."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"--out {out}: another train.py is writing there (it holds {out / '.lock'}); "
                f"wait for it to finish or pass another --out"
            ) from None
        yield
