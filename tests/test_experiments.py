"""experiments.py without training: every table's rows are valid train.py command lines (PT, then IFT from
its checkpoint) that set what the row varies, --dry-run prints the commands and runs nothing, finished runs
are reused and rendered in the paper's layout (mean ± std over seeds)."""

import json

import pytest

import experiments
import train
from experiments import TABLES, Budget, commands, epochs_budget, render, run_folder

BUDGET = Budget("2", "4")


def parsed(table: str, variant: str, seed: int = 0, stage: str = "pt"):
    """train.parse_args of the row's train.py command for `stage`."""
    t = TABLES[table]
    v = next(v for v in t.variants if v.name == variant)
    pt, ift, _ = commands(v, run_folder(experiments.ROOT / "runs", t, v, seed), seed, BUDGET)
    command = pt if stage == "pt" else ift
    assert command[0] == "train.py"
    return train.parse_args(command[1:])


@pytest.mark.parametrize("key", list(TABLES))
def test_every_row_is_a_valid_train_command(key):
    table = TABLES[key]
    names = [v.name for v in table.variants]
    assert len(set(names)) == len(names)
    for v in table.variants:
        assert len(v.label) == len(table.label_columns), v.name
        assert v.paper is None or len(v.paper) == len(table.paper_columns), v.name
        pt, ift = parsed(key, v.name, seed=3), parsed(key, v.name, seed=3, stage="ift")
        out = f"runs/table{key}/{v.name}/seed3"
        assert (pt.stages, pt.init, pt.epochs, pt.seed, pt.preset) == (["pt"], None, 2.0, 3, "tiny")
        assert (ift.stages, ift.init, ift.epochs, ift.seed) == (["ift"], f"{out}/pt/final", 4.0, 3)
        assert str(pt.out) == str(ift.out) == out
        assert vars(pt) | {"stage": None, "stages": None, "epochs": None} == vars(ift) | {
            "stage": None,
            "stages": None,
            "epochs": None,
            "init": None,
        }  # the same row flags in both stages


def test_rows_set_what_their_table_varies():
    assert parsed("1", "llava").tasks == ()
    assert parsed("1", "feat-concat").ola.mode == "feat-concat"
    assert parsed("1", "token-concat").ola.mode == "token-concat"
    assert parsed("1", "ola-convnext").vision_type == "convnext"
    layer_sets = {"depth": (8, 14), "seg": (10, 16), "gen": (12, 18)}
    assert parsed("3", "d8,14-s10,16-g12,18").ola.layer_sets == layer_sets
    emb_stages = [parsed("4", n, stage="ift").emb_stages for n in ("pt", "tokens", "pt+ift")]
    assert emb_stages == [("pt",), (), ("pt", "ift")]
    assert parsed("4", "tokens").ola.tasks == ("depth", "seg", "gen")  # the <t> tokens stay, no teachers run
    assert [parsed("5", f"n{n}").ola.num_seek_tokens for n in (0, 4, 8, 12, 16, 24)] == [0, 4, 8, 12, 16, 24]
    assert parsed("5", "llava").tasks == ()
    ift_tokens = [parsed("6", n, stage="ift").ift_tokens for n in ("frozen", "learnable", "none")]
    assert ift_tokens == ["frozen", "learnable", "none"]
    assert parsed("I", "img+t").ola.key_input == "img+t"
    assert parsed("II", "depth+gen").ola.tasks == ("depth", "gen")
    assert parsed("III", "seg-gen-depth").ola.token_order == ("seg", "gen", "depth")
    assert parsed("IV", "w0.25").ola.task_weights == {"depth": 0.25, "seg": 0.25, "gen": 0.25}
    sl1, con = parsed("V", "sl1").ola, parsed("V", "con").ola
    assert (sl1.sl1_weight, sl1.contrastive_weight, con.sl1_weight, con.contrastive_weight) == (1, 0, 0, 0.3)
    default = parsed("V", "sl1+con").ola
    assert default == parsed("5", "n8").ola == parsed("1", "ola").ola  # the paper's default model


def test_epochs_budget():
    assert epochs_budget("tiny") == Budget(None, None) and Budget(None, None).flags("pt") == []
    assert epochs_budget("0.5") == Budget("0.5", "0.5")
    assert epochs_budget("2,4").flags("ift") == ["--epochs", "4"]
    for bad in ("0", "1,2,3", "x", "2,-1"):
        with pytest.raises(Exception, match="positive"):
            epochs_budget(bad)


def dry_run(capsys, *argv: str) -> list[str]:
    experiments.main(["--dry-run", *argv])
    return capsys.readouterr().out.splitlines()


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiments.subprocess, "run", lambda *a, **k: pytest.fail("dry run ran a command"))
    tmp_path = tmp_path.resolve()
    lines = dry_run(capsys, "--table", "5", "--out", str(tmp_path), "--seeds", "0", "1", "--epochs", "2,4")
    trains = [line for line in lines if line.startswith("python train.py")]
    evals = [line for line in lines if line.startswith("python eval.py qa --run")]
    assert len(trains) == 2 * len(evals) == 2 * 5 * 2  # Tab. 5's default rows: N_seek 0, 4, 8, 16, 24
    out = f"{tmp_path}/table5/n0/seed1"
    assert f"python train.py --stage pt --num-seek-tokens 0 --seed 1 --out {out} --epochs 2" in trains
    ift = f"python train.py --stage ift --init {out}/pt/final --num-seek-tokens 0 --seed 1 --out {out}"
    assert ift + " --epochs 4" in trains
    assert not any(tmp_path.iterdir())
    every = dry_run(capsys, "--table", "5", "--variants", "all")
    assert sum(line.startswith("python eval.py") for line in every) == 7
    assert "python train.py --stage pt --mode llava --seed 0" in every[2]
    assert "--epochs 1" in every[2] and "--epochs 1" in every[3]  # the default budget
    assert (
        sum(line.startswith("#") for line in dry_run(capsys, "--table", "3", "--variants", "d18-s18-g20"))
        == 1
    )


def fake_result(folder, cmds, count: float, accuracy: float, unparsed: int = 0) -> None:
    folder.mkdir(parents=True)
    tasks = {"Distance": 0.5, "Relation": 0.5, "Depth": 0.5, "Count": count}  # any order: shown as Tab. 1's
    qa = {"accuracy": accuracy, "unparsed": unparsed, "tasks": tasks}
    result = {"commands": cmds, "seconds": 1.0, "steps": {"ift": 64, "pt": 38}, "pt_layers": {}, "qa": qa}
    (folder / "result.json").write_text(json.dumps(result))


def test_cached_runs_are_reused_and_rendered(tmp_path, capsys, monkeypatch):
    """Every run of Tab. V already has its result.json: nothing runs, the table shows mean ± std."""
    monkeypatch.setattr(experiments.subprocess, "run", lambda *a, **k: pytest.fail("a cached run ran"))
    table = TABLES["V"]
    for i, v in enumerate(table.variants):
        for seed in (0, 1):
            folder = run_folder(tmp_path, table, v, seed)
            fake_result(folder, commands(v, folder, seed, BUDGET), 0.25 + 0.1 * seed, 0.4 + 0.1 * i)
    experiments.main(["--table", "V", "--out", str(tmp_path), "--seeds", "0", "1", "--epochs", "2,4"])
    out = capsys.readouterr().out
    assert sum(line.startswith("  cached ") for line in out.splitlines()) == 6
    md = (tmp_path / "tableV" / "results.md").read_text()
    header, _, first, second, third = md.split("\n\n")[1].splitlines()
    columns = [c.strip() for c in header.split("|")[1:-1]]
    qa = [f"{t} (QA)" for t in ("Count", "Depth", "Relation", "Distance", "overall")]
    assert columns == [
        "L_sL1",
        "L_contrastive",
        *qa,
        "unparsed",
        "paper Avg",
    ]  # the paper's label columns first
    cells = [c.strip() for c in first.split("|")[1:-1]]
    assert cells == ["✓", "✗", "30.0 ± 7.1", *["50.0 ± 0.0"] * 3, "40.0 ± 0.0", "0", "52.5"]
    assert [c.strip() for c in third.split("|")[1:-1]][-1] == "—"  # contrastive only: not in the paper
    assert "budget: PT 2 epochs, IFT 4 epochs (steps: ift 64 / pt 38)" in md
    record = json.loads((tmp_path / "tableV" / "results.json").read_text())
    assert record["variants"]["sl1"]["paper"] == [56.8, 62.3, 38.3, 52.5]
    assert len(record["variants"]["con"]["runs"]) == 2


def test_a_result_of_other_commands_is_not_reused(tmp_path):
    table = TABLES["V"]
    v = table.variants[0]
    folder = run_folder(tmp_path, table, v, 0)
    fake_result(folder, commands(v, folder, 0, Budget("1", "1")), 0.3, 0.4)
    assert experiments.cached(folder, commands(v, folder, 0, BUDGET)) is None
    assert experiments.cached(folder, commands(v, folder, 0, Budget("1", "1"))) is not None


def test_render_single_seed_and_failed_rows():
    table = TABLES["5"]
    result = {
        "qa": {"accuracy": 0.43, "unparsed": 2, "tasks": {"Relation": 0.591, "Count": 0.321, "Size": 0.52}}
    }
    md = render(table, list(table.variants[:2]), {"llava": [result]}, show_layers=False)
    header, _, llava, n0 = md.splitlines()
    assert "| Count (QA) | Relation (QA) | Size (QA) | overall (QA) |" in " ".join(header.split())
    cells = [c.strip() for c in llava.split("|")[1:-1]]
    assert cells == ["single-encoder", "32.1", "59.1", "52.0", "43.0", "2", "53.4"]
    assert "failed" in n0
