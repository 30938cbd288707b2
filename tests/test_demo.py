"""demo.py: the same seed and budget for both models, the statistics over seeds, and (slow) one end-to-end run
of the whole comparison at a token budget."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import demo
import experiments

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_gives_both_models_the_same_seed_and_budget(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiments.subprocess, "run", lambda *a, **k: pytest.fail("dry run ran a command"))
    demo.main(["--dry-run", "--seeds", "4", "--epochs", "3,5", "--out", str(tmp_path)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python train.py")]
    assert len(lines) == 4  # PT and IFT of each model
    for line in lines:
        assert "--seed 4" in line and ("--epochs 3" in line) == ("--stage pt" in line)
    assert sum("--mode llava" in line for line in lines) == 2  # the baseline's two stages; OLA-VLM by default
    assert not list(tmp_path.iterdir())


def fake_result(accuracy: float, count: float) -> dict:
    tasks = {"Count": count, "Depth": 0.5, "Relation": 0.5, "Distance": 0.5}
    return {"qa": {"accuracy": accuracy, "tasks": tasks}, "pt_layers": {"depth": [2, 5]}}


def fake_probe(depth: float, level: float) -> dict:
    scores = {t: {"1": 0.1, "2": depth} for t in demo.PROBED}
    return {
        "scores": dict.fromkeys(demo.MODELS.values(), scores),
        "mean_target": dict.fromkeys(demo.PROBED, level),
    }


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = {
        name: [fake_result(0.4, 0.2), fake_result(0.5, 0.4), fake_result(0.6, 0.3)] for name in demo.MODELS
    }
    probes = [fake_probe(0.3, 0.2), fake_probe(0.5, 0.2), fake_probe(0.4, 0.2)]
    summary = demo.summarise(runs, probes)
    count = summary["qa"]["OLA-VLM"]["Count"]
    assert count["mean"] == pytest.approx(0.3) and count["std"] == pytest.approx(0.1)
    assert (count["min"], count["max"], count["n"]) == (0.2, 0.4, 3)
    assert summary["qa"]["LLaVA-1.5"]["overall"]["mean"] == pytest.approx(0.5)
    depth2 = summary["probe"]["LLaVA-1.5"]["depth"]["2"]
    assert depth2["mean"] == pytest.approx(0.4) and depth2["std"] == pytest.approx(
        statistics.stdev([0.3, 0.5, 0.4])
    )
    assert summary["pt_layers"] == {"depth": [2, 5]}
    text = demo.markdown({**summary, "pt_layers": {"depth": [2]}})
    assert "| OLA-VLM | 30.0 ± 10.0 | 50.0 ± 0.0 |" in text  # Count, then Depth, in %
    assert "0.400 ± 0.100" in text  # the depth probe at the supervised layer 2


@pytest.mark.slow
def test_the_demo_runs_end_to_end_at_a_token_budget(tmp_path, miniature_build):
    """Both models trained (one PT and one IFT step), evaluated and probed; the plot and the JSON of every
    number."""
    cmd = [sys.executable, "demo.py", "--seeds", "0", "--epochs", "0.15,0.1", "--probe-images", "16"]
    done = subprocess.run([*cmd, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((tmp_path / "demo.json").read_text())
    summary = record["summary"]
    assert set(summary["qa"]) == {"LLaVA-1.5", "OLA-VLM"}
    assert set(summary["qa"]["OLA-VLM"]) == {"Count", "Depth", "Relation", "Distance", "overall"}
    assert summary["pt_layers"] == {
        "depth": [2, 5],
        "seg": [3, 5],
        "gen": [3, 5],
    }  # Tab. 3 scaled to 8 layers
    for label in ("LLaVA-1.5", "OLA-VLM"):
        assert sorted(summary["probe"][label]["depth"], key=int) == [str(i) for i in range(1, 9)]
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "LLaVA-1.5" in (tmp_path / "demo.md").read_text()
