"""Checkpoint I/O shared by every loader: finding a folder's weight files, reading them (safetensors,
sharded safetensors, or `pytorch_model.bin` without unpickling code), strict loading with errors that
name each key, key tables from our names to a checkpoint's (both ways: the miniature's parts are written in
the official layouts), and atomic folder writes (docs/design.md §12)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# Buffers that old checkpoint files carry but that we recompute: skipped by name (docs/design.md §8).
SKIPPED_BUFFERS = ("position_ids", "relative_position_index", "rotary_emb.inv_freq")


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint folder (or a single file)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' object of key -> shard file")
        shards = sorted(set(weight_map.values()))
        # a shard is a file name in the folder: never a path that reads weights elsewhere ("../x", "/x")
        if bad := [s for s in shards if not isinstance(s, str) or Path(s).name != s or s in ("", ".", "..")]:
            raise ValueError(f"{index}: shard names {bad} are not file names in {path}")
        return [path / shard for shard in shards]
    for name in (
        "model.safetensors",
        "pytorch_model.bin",
        "open_clip_pytorch_model.safetensors",
        "open_clip_pytorch_model.bin",
    ):
        if (path / name).exists():
            return [path / name]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors, model.safetensors.index.json "
        f"(+ shards) or pytorch_model.bin"
    )


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, value) for each non-blank line of a JSON-lines file; bad UTF-8 or a malformed line is
    an error naming the file (and the line)."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{path}:{n}: malformed JSON line ({e.msg} at column {e.colno})"
                    ) from None
                yield n, value
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`; a missing file, bad UTF-8 or bad JSON is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


def _read_safetensors(file: Path, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if wanted(k)}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors raises its own error types for bad headers and sizes
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def load_tensors_only(file: Path) -> object:
    """torch.load restricted to tensors and plain containers (weights_only=True): a pickle that asks for
    code is refused, never run; a truncated or hostile file is an error naming it."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message: the refused global, among generic advice
        refused = [line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        reason = refused[0] if refused else str(e).splitlines()[0]
        raise ValueError(
            f"{file}: refused, it holds more than tensors and plain containers ({reason})"
        ) from None
    except Exception as e:  # a truncated or garbage file: RuntimeError, EOFError, ...
        raise ValueError(f"{file}: cannot be read as a tensors-only checkpoint ({e})") from None


def _read_pickle(file: Path, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    state = load_tensors_only(file)
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a dict of tensors, got a {type(state).__name__}")
    return {k: v for k, v in state.items() if wanted(k)}


def read_state_dict(
    path: str | os.PathLike, keep: Callable[[str], bool] = lambda key: True
) -> dict[str, torch.Tensor]:
    """The tensors whose key passes `keep` and does not end in one of SKIPPED_BUFFERS. Safetensors are read
    key by key; `.bin`/`.pth` with torch.load(weights_only=True) (a {"model"|"state_dict": ...} wrapper is
    unwrapped)."""

    def wanted(key: str) -> bool:
        return keep(key) and not key.endswith(SKIPPED_BUFFERS)

    out: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        reader = _read_safetensors if file.suffix == ".safetensors" else _read_pickle
        out.update(reader(file, wanted))
    return out


def load_strict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str | os.PathLike,
    names: dict[str, str] | None = None,
) -> nn.Module:
    """Copy `state` (our key names) into `module`. Every missing, unexpected or mis-shaped key is listed,
    with expected and found shapes, in one ValueError; `names` (our key -> checkpoint key) names both."""
    names = names or {}
    ours = module.state_dict()

    def label(key: str) -> str:
        theirs = names.get(key, key)
        return key if theirs == key else f"{key} (checkpoint key {theirs})"

    problems = [
        f"  missing    {label(k)}: expected {list(v.shape)}" for k, v in ours.items() if k not in state
    ]
    problems += [f"  unexpected {label(k)}: found {list(v.shape)}" for k, v in state.items() if k not in ours]
    problems += [
        f"  wrong shape {label(k)}: expected {list(ours[k].shape)}, found {list(v.shape)}"
        for k, v in state.items()
        if k in ours and ours[k].shape != v.shape
    ]
    if problems:
        raise ValueError(f"cannot load {source} into {type(module).__name__}:\n" + "\n".join(problems))
    with torch.no_grad():
        for key, param in ours.items():
            param.copy_(state[key])
    return module


def config_json(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint folder, or the one next to a weights file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"no config.json next to the checkpoint {path} (expected {folder / 'config.json'})"
        )
    return read_json(folder / "config.json")


def rename(key: str, rules: list[tuple[str, str]]) -> str:
    """Our key -> checkpoint key by the first matching (ours, theirs) prefix rule; {i}, {j} are indices."""
    for ours, theirs in rules:
        pattern = re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
        match = re.match(pattern + "(?P<rest>.*)$", key)
        if match:
            return theirs.format(**match.groupdict()) + match["rest"]
    raise KeyError(f"no checkpoint name for parameter {key}")


def load_with_table(
    module: nn.Module,
    path: str | os.PathLike,
    rules: list[tuple[str, str]],
    keep: Callable[[str], bool],
    dtype: torch.dtype,
    prefix: str = "",
) -> nn.Module:
    """Strictly load the checkpoint keys that pass `keep` into `module` through the key table `rules`
    (our prefix -> checkpoint prefix, after `prefix`); the module comes back in `dtype`, in eval mode."""
    names = {k: prefix + rename(k, rules) for k in module.state_dict()}
    ours_of = {theirs: k for k, theirs in names.items()}
    state = {ours_of.get(k, k): v for k, v in read_state_dict(path, keep).items()}
    return load_strict(module, state, path, names).to(dtype).eval()


def save_with_table(
    module: nn.Module, folder: str | os.PathLike, rules: list[tuple[str, str]], config: dict, prefix: str = ""
) -> None:
    """Write `module` as an official checkpoint folder, the inverse of load_with_table: config.json (the
    official config) and model.safetensors with each of our keys renamed by the table, atomically."""
    state = {prefix + rename(k, rules): v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    write_folder(Path(folder), write)


COMPLETE = "COMPLETE"  # written last into a folder that write_folder fills


def write_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Write `folder` atomically: `write(tmp)` fills a temporary sibling, which then replaces `folder` in one
    rename. If writing fails (a full disk: an OSError, or safetensors' own error), the temporary folder is
    removed and an existing `folder` is left as it was; the error names the folder. A COMPLETE file marks the
    temporary folder whole while it replaces `folder` (last_complete), and is removed after."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        (tmp / COMPLETE).touch()
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or e
        raise OSError(f"could not write {folder}: {reason}; nothing there was replaced") from None
    replace_folder(tmp, folder)
    (folder / COMPLETE).unlink()  # needed only while final.tmp and final.old stand side by side


def build_once(root: Path, config: dict, build: Callable[[Path], None], what: str = "built-in data") -> dict:
    """Make `root` a complete build of `config`, once, and return its manifest. A folder whose manifest.json
    records the same config is reused; otherwise `build(tmp)` fills a temporary sibling, manifest.json adds
    the config, a SHA-256 of every file and one `hash` over them, and the folder replaces `root` in one
    rename (of two concurrent builders, the first to finish wins). A folder without a manifest is not ours:
    refused."""
    manifest = root / "manifest.json"
    config = json.loads(json.dumps(config))  # as the manifest will hold it (tuples are lists)
    if manifest.is_file():
        recorded = read_json(manifest)
        if recorded.get("config") == config:
            return recorded
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not a {what} folder (no manifest.json): move it away")
    print(f"building the {what} in {root} (once) ...", file=sys.stderr, flush=True)
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        files = {
            str(p.relative_to(tmp)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        recorded = {"config": config, "hash": digest, "files": files}
        (tmp / "manifest.json").write_text(json.dumps(recorded, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = root.with_name(f"{root.name}.old{os.getpid()}")
    if root.exists():  # built with other settings: replaced
        root.rename(old)
    try:
        tmp.rename(root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp)
    shutil.rmtree(old, ignore_errors=True)
    return read_json(manifest)


def last_complete(stage: Path) -> Path:
    """The newest complete model of a training stage folder: final/; else, while (or after a kill while)
    final/ is being replaced, the complete final.tmp/ that replaces it (never the older final.old/); else
    the newest step_*/model/ (each is written by write_folder: never half)."""
    candidates = [stage / "final"]
    if (stage / "final.tmp" / COMPLETE).is_file():
        candidates.append(stage / "final.tmp")
    candidates += [step / "model" for step in sorted(stage.glob("step_*[0-9]"), reverse=True)]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"no complete checkpoint in {stage} (expected final/ or step_*/model/)")


def replace_folder(tmp: Path, folder: Path) -> None:
    """Make the complete folder `tmp` appear as `folder` in one rename: a reader never sees half of it.
    An old `folder` is first renamed aside, then removed."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
