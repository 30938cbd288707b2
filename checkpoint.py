"""OLA-VLM checkpoints (docs/design.md §12): config.json + model.safetensors holding the components a stage
trained, every other base component named by the folder it came from; and loading them back, or a folder
of the authors' released models (released.py)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from concat import make_vlm
from encoders import VISION_TOWERS
from llm import LLM, LLMConfig
from ola import OLAVLM, OLAConfig
from released import from_released, parse_config, read_headers
from tasks import load_teachers, tiny_teachers
from weights import load_strict, read_json, read_state_dict, write_folder


def config_dict(model: OLAVLM, stored: list[str]) -> dict:
    """What config.json records: every config, the source folders, the stored components."""
    return {
        "ola": asdict(model.cfg),
        "llm": asdict(model.llm.config),
        "vision": {"kind": model.vision.kind, "config": asdict(model.vision.config)},
        "target_dims": model.target_dims,
        "sources": model.sources,
        "stored": stored,
    }


def save_checkpoint(
    model: OLAVLM,
    folder: str | os.PathLike,
    components: tuple[str, ...],
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write config.json + model.safetensors holding `components` (and every base component that has no
    source folder). `state`: a full state dict gathered under FSDP (default: the model's). Written to a
    temporary folder, then renamed: a checkpoint is never half-written."""
    state = model.state_dict() if state is None else state
    unsourced = {c for c in ("llm", "vision", "teachers") if not model.sources.get(c)}
    stored = [c for c in sorted(set(components) | unsourced) if getattr(model, c, None) is not None]
    state = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.split(".")[0] in stored}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config_dict(model, stored), indent=2))

    write_folder(Path(folder), write)


def from_checkpoint(
    folder: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    with_predictors: bool = True,
) -> OLAVLM:
    """Rebuild a model saved by `save_checkpoint`: base components the checkpoint does not store from their
    source folders, the others allocated uninitialised (meta device), then every stored part loaded
    strictly. A folder of the authors' released models (config.json with `architectures`) goes to
    released.from_released."""
    config = read_json(Path(folder) / "config.json")
    if "architectures" in config:  # a released folder (HF-style config)
        return from_released(folder, dtype, device, with_predictors)
    check_keys(config, Path(folder) / "config.json")
    sources, stored = config["sources"], config["stored"]
    cfg = ola_config(config, Path(folder) / "config.json")
    tower_cls, tower_cfg_cls = VISION_TOWERS[config["vision"]["kind"]]

    def empty(module_cls, module_cfg):
        with torch.device("meta"):
            module = module_cls(module_cfg)
        return module.to_empty(device=device)

    if "llm" in stored:
        llm = empty(LLM, LLMConfig(**config["llm"]))
    else:
        llm = LLM.from_pretrained(sources["llm"], dtype=dtype, device=device)
    tower_cfg = tower_cfg_cls(**config["vision"]["config"])
    if "vision" in stored:
        vision = empty(tower_cls, tower_cfg)
    else:
        vision = tower_cls.from_pretrained(sources["vision"], dtype=dtype)
        vision.config = tower_cfg  # e.g. the select layer the model was trained with
    target_dims = config["target_dims"] if with_predictors else None
    teachers = None
    if cfg.mode != "ola":  # the baselines' input teachers: from their folders, or tiny ones loaded below
        grid = math.isqrt(vision.num_tokens)
        if "teachers" in stored:
            teachers = tiny_teachers(cfg.tasks, grid)
        else:
            teachers = load_teachers(sources["teachers"], grid, dtype)
    model = make_vlm(cfg, llm, vision, target_dims, sources, teachers).to(device=device, dtype=dtype)
    return load_components(model, folder)


def check_keys(config: dict, path: Path) -> None:
    """A config.json of ours holds every key config_dict writes."""
    keys = ("ola", "llm", "vision", "target_dims", "sources", "stored")
    if missing := [k for k in keys if k not in config]:
        raise ValueError(
            f"{path}: not an OLA checkpoint config, missing {missing} (expected the keys {keys})"
        )


def ola_config(config: dict, path: Path) -> OLAConfig:
    """The "ola" block of a config.json of ours as an OLAConfig, its errors naming the file."""
    try:
        return OLAConfig.from_dict(config["ola"])
    except (TypeError, ValueError) as e:
        raise ValueError(f'{path}: bad "ola" block: {e}') from None


def load_components(model: OLAVLM, folder: str | os.PathLike) -> OLAVLM:
    """Strictly load every component a checkpoint stores (those the model has)."""
    config = read_json(Path(folder) / "config.json")
    check_keys(config, Path(folder) / "config.json")
    stored = config["stored"]
    stored = [c for c in stored if getattr(model, c, None) is not None]

    def wanted(key: str) -> bool:
        return key.split(".")[0] in stored

    state = read_state_dict(folder, keep=wanted)
    for component in stored:
        prefix = component + "."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        load_strict(getattr(model, component), sub, f"{folder} [{component}]")
    return model


def stored_config(folder: str | os.PathLike) -> OLAConfig:
    """The OLAConfig of a checkpoint folder, ours or a released one, without loading its weights."""
    folder = Path(folder)
    config = read_json(folder / "config.json")
    if "architectures" in config:  # a released folder (HF-style config)
        return parse_config(config, read_headers(folder)[0], folder).ola
    check_keys(config, folder / "config.json")
    return ola_config(config, folder / "config.json")
