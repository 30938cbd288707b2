"""eval.py, inference.py on a tiny random checkpoint: batched answers equal one-at-a-time
answers, every benchmark of Tab. 1 runs end to end from 3-row fixtures in its published layout, `report`
prints the table; chat streams; the predictor pictures (Fig. 6)."""

import base64
import io
import json

import pytest
import torch
from conftest import tiny_ola
from PIL import Image

import shapes
from benchmarks import BENCHMARKS
from checkpoint import save_checkpoint
from eval import main, pca_rgb, predicted_features, run_benchmark, show
from inference import answer, chat, load_model
from tokenizer import ChatTokenizer


# ----------------------------------------------------------------------------- tiny checkpoint
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Built-in data (tokenizer, QA, images) and a random tiny PT checkpoint with predictors."""
    root = tmp_path_factory.mktemp("eval")
    paths = shapes.builtin_dataset(root / "builtin", n_pt=4, n_ift=4, n_val=6)
    tok = ChatTokenizer(paths["tokenizer"], "llama3")
    special = dict(bos_token_id=tok.bos_ids[0], eos_token_ids=tok.eos_ids, pad_token_id=tok.pad_id)
    model, teachers = tiny_ola(vocab=tok.vocab_size, n_layers=4, **special)
    save_checkpoint(model, root / "ckpt", ("projector", "tokens", "predictors"))
    return paths, root / "ckpt", teachers


def test_batched_answers_equal_one_at_a_time(tiny):
    """Left padding: a batch mixing prompt lengths answers exactly like one prompt at a time (greedy)."""
    paths, ckpt, _ = tiny
    model, tok = load_model(ckpt, paths["tokenizer"])
    bench = BENCHMARKS["builtin"]
    rows = bench.read(paths["qa_val"], paths["images"])
    assert len({len(r["prompt"]) for r in rows}) > 1
    batched = run_benchmark(model, tok, bench, rows, batch_size=4, max_new_tokens=6)
    single = [run_benchmark(model, tok, bench, [r], batch_size=1, max_new_tokens=6)[0] for r in rows]
    assert [r["output"] for r in batched] == [r["output"] for r in single]
    assert len(batched) == 6 and 0 <= bench.aggregate(batched)["accuracy"] <= 1


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def benchmark_fixtures(root):
    """3 rows per benchmark in its published field layout (CV-Bench in the current 2D / 3D split)."""
    (root / "cv" / "img").mkdir(parents=True)
    for i in range(3):
        (root / "cv" / "img" / f"{i}.png").write_bytes(png((40 * i, 90, 200)))
    kinds = [("2D", "Count", "ADE20K"), ("2D", "Relation", "COCO"), ("3D", "Depth", "Omni3D")]
    cv = [
        dict(
            idx=i,
            type=t,
            task=task,
            source=src,
            filename=f"img/{i}.png",
            prompt="Which? (A) x (B) y",
            answer="(A)",
        )
        for i, (t, task, src) in enumerate(kinds)
    ]
    cv = [{**r, "answer": "(A)"} for r in cv]
    write_jsonl(root / "cv" / "test_2d.jsonl", cv[:2])
    write_jsonl(root / "cv" / "test_3d.jsonl", cv[2:])
    image = base64.b64encode(png((10, 200, 30))).decode()
    categories = ["coarse perception", "math", "math"]
    mmstar = [
        dict(index=i, question="Which?\nA. x\nB. y", image=image, answer="B", category=c, l2_category="s")
        for i, c in enumerate(categories)
    ]
    write_jsonl(root / "mmstar.jsonl", mmstar)
    question = "How many? Please answer directly with only the letter of the correct option and nothing else."
    write_jsonl(
        root / "rwqa.jsonl", [dict(question=question, image=image, answer=a) for a in ("A", "2", "B")]
    )
    okvqa = [dict(question_id=i, question="What is it?", image=image, answers=["dog"] * 10) for i in range(3)]
    write_jsonl(root / "okvqa.jsonl", okvqa)
    return {
        "cvbench": root / "cv",
        "mmstar": root / "mmstar.jsonl",
        "realworldqa": root / "rwqa.jsonl",
        "okvqa": root / "okvqa.jsonl",
    }


def test_every_benchmark_runs_end_to_end_and_report_prints_the_table(tiny, tmp_path, capsys):
    paths, ckpt, _ = tiny
    fixtures = benchmark_fixtures(tmp_path / "data")
    common = ["--model", str(ckpt), "--tokenizer", str(paths["tokenizer"]), "--max-new-tokens", "4"]
    for name, data in fixtures.items():
        main([name, "--data", str(data), "--out", str(tmp_path / "eval" / name), *common])
        summary = json.loads((tmp_path / "eval" / name / "summary.json").read_text())
        lines = (tmp_path / "eval" / name / "predictions.jsonl").read_text().splitlines()
        assert summary["benchmark"] == name and summary["metrics"]["n"] == 3 and len(lines) == 3
    builtin_out = tmp_path / "eval" / "qa"
    main(
        [
            "qa",
            "--data",
            str(paths["qa_val"]),
            "--images",
            str(paths["images"]),
            "--out",
            str(builtin_out),
            *common,
        ]
    )
    capsys.readouterr()
    main(["report", str(tmp_path / "eval"), "--paper"])
    table = capsys.readouterr().out.strip().splitlines()
    header = [c.strip() for c in table[0].split("|")[2:10]]
    assert header == ["Count", "Depth", "Relation", "Distance", "MMStar", "RWQA", "OK-VQA", "Avg"]
    assert table[2].startswith(f"| {ckpt} |") and table[-1].startswith("| OLA-VLM (paper, Tab. 1) |")
    cells = [c.strip() for c in table[2].split("|")[2:10]]
    assert cells[3] == "–" and all(c != "–" for c in cells[:3] + cells[4:])  # no Distance question here


def test_chat_streams_the_answer(tiny):
    paths, ckpt, _ = tiny
    model, tok = load_model(ckpt, paths["tokenizer"])
    image = next(paths["images"].iterdir())
    stream = io.StringIO()
    text = chat(model, tok, "What is in the image?", image, max_new_tokens=8, stream=stream)
    assert isinstance(text, str) and stream.getvalue() == text + "\n"  # streamed pieces add up to the answer
    assert answer(model, tok, ["Name a primary color."], None, max_new_tokens=4)[0] == chat(
        model, tok, "Name a primary color.", None, max_new_tokens=4, stream=io.StringIO()
    )


def test_show_pictures(tiny, tmp_path):
    paths, ckpt, teachers = tiny
    model, tok = load_model(ckpt, paths["tokenizer"], with_predictors=True)
    square, feats = predicted_features(model, tok, teachers, next(paths["images"].iterdir()))
    sets = model.predictors.layer_sets
    assert set(feats) == {(t, l) for t in ("depth", "seg", "gen") for l in sets[t]}
    pred, target = feats[("seg", sets["seg"][0])]
    assert pred.shape == target.shape == (model.num_image_tokens, teachers.dims["seg"])
    a, b = pca_rgb(pred, target)
    assert a.shape == b.shape == (8, 8, 3) and a.min() >= 0 and a.max() <= 1
    same_a, same_b = pca_rgb(target, target)  # fitted jointly: equal features, equal colours
    assert torch.allclose(same_a, same_b)
    show(square, feats, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    ift_model, _ = load_model(ckpt, paths["tokenizer"])  # without predictors: a clear error
    with pytest.raises(ValueError, match="PT checkpoint"):
        predicted_features(ift_model, tok, teachers, next(paths["images"].iterdir()))
