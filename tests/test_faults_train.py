"""Bad flags, configs and checkpoints of training and loading (issue 23 of docs/design.md §12's fault list),
one representative case per class: each ends in one error naming its input, never in a silent run."""

import json

import pytest
import torch
from conftest import tiny_ola
from safetensors import SafetensorError

import checkpoint
import run_state
import train
import weights
from checkpoint import from_checkpoint, save_checkpoint, stored_config
from concat import ConcatVLM
from llm import LLMConfig
from ola import OLAConfig
from recipe import parse_args
from tasks import tiny_teachers
from weights import checkpoint_files, last_complete, write_folder


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layers", "depth=99"], "layer_sets depth=[99]: expected layers 1..32"),
        (["--layers", "depth=0,8"], "layer_sets depth=[0, 8]: expected layers 1..32"),
        (["--task-weight", "depth=-1"], "task_weights depth=-1.0: a loss weight must be >= 0"),
        (["--contrastive-weight", "-0.3"], "contrastive_weight=-0.3: a loss weight must be >= 0"),
        (["--tasks", "depth", "--layers", "seg=10"], "--layers seg: not among --tasks depth"),
        (["--tasks", "depth", "--task-weight", "gen=1"], "--task-weight gen: not among --tasks depth"),
        (["--max-steps", "0"], "--max-steps: expected a whole number >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size: expected a whole number >= 1, got 0"),
        (["--save-every", "0"], "--save-every: expected a whole number >= 1, got 0"),
        (["--epochs", "0"], "--epochs: expected a number > 0, got 0.0"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio 1.5: expected a fraction"),
    ],
)
def test_a_flag_that_would_be_clamped_ignored_or_divide_by_zero_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_paper_defaults_still_parse():
    args = parse_args(["--layers", "depth=1,32", "--task-weight", "depth=0"])
    assert args.ola.layer_sets["depth"] == (1, 32) and args.ola.task_weight("depth") == 0


def test_resume_with_other_flags_is_refused(tmp_path):
    args = parse_args(["--out", str(tmp_path)])
    recorded = tmp_path / "args.json"
    recorded.write_text(json.dumps(run_state.json_args(args)))
    run_state.check_same_flags(parse_args(["--out", str(tmp_path), "--max-steps", "5", "--resume"]), recorded)
    with pytest.raises(ValueError, match=r"args.json was trained with other flags \(lr: None -> 0.5"):
        run_state.check_same_flags(parse_args(["--out", str(tmp_path), "--lr", "0.5", "--resume"]), recorded)


def test_a_second_writer_to_one_out_folder_is_refused(tmp_path):
    refused = pytest.raises(ValueError, match="another train.py is writing there")
    with run_state.sole_writer(tmp_path), refused, run_state.sole_writer(tmp_path):
        pass
    with run_state.sole_writer(tmp_path):  # released when the first run ends
        pass


def test_a_shard_path_outside_the_folder_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../x.safetensors"}})
    )
    with pytest.raises(ValueError, match=r"shard names \['../x.safetensors'\] are not file names"):
        checkpoint_files(tmp_path)


def test_a_kill_between_the_two_renames_never_gives_the_older_model(tmp_path, monkeypatch):
    stage = tmp_path / "pt"
    model, _ = tiny_ola(OLAConfig(tasks=()), seed=0)
    save_checkpoint(model, stage / "final", ("projector",))
    newer, _ = tiny_ola(OLAConfig(tasks=()), seed=1)
    renames = []

    def killed_after_the_first(src, dst):  # final -> final.old happens, final.tmp -> final does not
        if renames:
            raise KeyboardInterrupt("killed")
        renames.append(src)
        src.rename(dst)

    monkeypatch.setattr(
        weights,
        "replace_folder",
        lambda tmp, folder: (
            killed_after_the_first(folder, folder.with_name("final.old")),
            killed_after_the_first(tmp, folder),
        ),
    )
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(newer, stage / "final", ("projector",))
    assert not (stage / "final").exists() and (stage / "final.old").exists()
    picked = last_complete(stage)
    assert picked == stage / "final.tmp"
    loaded = from_checkpoint(picked)
    assert torch.equal(loaded.projector[0].weight, newer.projector[0].weight)


def test_safetensors_own_error_on_a_full_disk_names_the_folder_and_leaves_no_tmp(tmp_path, monkeypatch):
    model, _ = tiny_ola(OLAConfig(tasks=()), seed=0)

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match=r"could not write .*step_000002.*No space left"):
        write_folder(
            tmp_path / "step_000002", lambda tmp: save_checkpoint(model, tmp / "model", ("projector",))
        )
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_config_without_its_keys_or_with_a_bad_block_names_the_file(tmp_path):
    model, _ = tiny_ola(OLAConfig(tasks=()), seed=0)
    save_checkpoint(model, tmp_path / "ckpt", ("projector",))
    path = tmp_path / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in config.items() if k != "stored"}))
    with pytest.raises(
        ValueError, match=r"ckpt/config.json: not an OLA checkpoint config, missing \['stored'\]"
    ):
        from_checkpoint(tmp_path / "ckpt")
    path.write_text(json.dumps({**config, "ola": {**config["ola"], "mode": "bogus"}}))
    with pytest.raises(ValueError, match=r"ckpt/config.json: bad \"ola\" block: mode 'bogus'"):
        stored_config(tmp_path / "ckpt")


def test_a_generation_config_that_is_not_json_names_the_file(tmp_path):
    config = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16}
    config |= {"num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config.json:1: malformed JSON"):
        LLMConfig.from_json(tmp_path / "config.json")


def test_feat_concat_channels_follow_the_paper_not_the_token_order():
    """[base | gen | depth | seg] per image token (Tab. 1) even when the <t> order is another."""
    cfg = OLAConfig(mode="feat-concat", token_order=("depth", "seg", "gen"))
    base, _ = tiny_ola(OLAConfig(tasks=()), seed=0)
    model = ConcatVLM(cfg, base.llm, base.vision, tiny_teachers(cfg.tasks, grid=8, seed=0))
    dims = model.inputs.dims
    feats = {
        task: torch.full((1, 1 if task == "gen" else 64, dims[task]), value)
        for task, value in (("gen", 1.0), ("depth", 2.0), ("seg", 3.0))
    }
    row = model.inputs.concat(torch.zeros(1, 64, 4), feats)[0, 0]
    widths = [4, dims["gen"], dims["depth"], dims["seg"]]
    assert [float(part.unique()) for part in row.split(widths)] == [0.0, 1.0, 2.0, 3.0]


def test_the_tiny_preset_keeps_the_llm_vision_and_teacher_flags(monkeypatch):
    """The miniature's folders only fill the flags that were not given (train.builtin_defaults)."""
    parts = ("llm", "clip", "depth", "seg", "gen", "images")
    monkeypatch.setattr(train.miniature, "builtin", lambda: {k: f"/built/{k}" for k in parts})
    args = parse_args(["--llm", "my-llm", "--vision", "my-clip", "--teacher", "depth=my-depth"])
    train.builtin_defaults(args, rank=0)
    assert (args.llm, args.vision) == ("my-llm", "my-clip")
    assert args.teachers == {"depth": "my-depth", "seg": "/built/seg", "gen": "/built/gen"}
