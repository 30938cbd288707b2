"""eval.py: the answer parser, per-sample scoring, CV-Bench aggregation, and
smoke runs of qa / chat / show on a tiny random checkpoint."""

import io
import json

import pytest
import torch
from conftest import tiny_ola

import shapes
from chat import ChatTokenizer
from eval import (
    answer,
    chat,
    load_model,
    main,
    metrics,
    parse_choice,
    pca_rgb,
    predicted_features,
    read_questions,
    run_questions,
    score,
    show,
)


# ----------------------------------------------------------------------------- parser and scoring
@pytest.mark.parametrize(
    "text, expected",
    [
        ("(B)", "(B)"),
        ("B", "(B)"),
        ("The answer is (C).", "(C)"),
        ("B) because it is closer", "(B)"),
        ("  D.", "(D)"),
        ("The answer is A", "(A)"),
        ("(A) left", "(A)"),
        ("The red circle is on the left.", None),
        ("A circle.", None),
        ("", None),
        ("I cannot tell", None),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


def test_unparseable_answer_is_wrong_and_never_reuses_the_previous_one():
    records = [{"id": i, "answer": "(A)", "prompt": "q", "task": "Count", "source": "COCO"} for i in range(3)]
    rows = score(records, ["(A)", "the left one", "B"])
    assert [r["prediction"] for r in rows] == ["(A)", None, "(B)"]
    assert [r["correct"] for r in rows] == [True, False, False]  # the released parser would score row 2 right
    assert metrics(rows)["unparsed"] == 1


def row(source, task, correct):
    return {
        "source": source,
        "task": task,
        "type": "3D" if source == "Omni3D" else "2D",
        "correct": correct,
        "prediction": "(A)",
    }


def test_cvbench_aggregation():
    rows = (
        [row("ADE20K", "Count", c) for c in (1, 1, 0, 0)]
        + [row("COCO", "Relation", 1)]
        + [row("Omni3D", "Depth", c) for c in (1, 0)]
        + [row("Omni3D", "Distance", c) for c in (0, 0)]
    )
    m = metrics(rows)
    assert m["sources"] == {"ADE20K": 0.5, "COCO": 1.0, "Omni3D": 0.25}
    assert m["tasks"] == {"Count": 0.5, "Depth": 0.5, "Distance": 0.0, "Relation": 1.0}
    assert m["cvbench"] == {"2D": 0.75, "3D": 0.25, "Overall": 0.5}  # 2D = mean of sources, not of samples
    assert m["accuracy"] == pytest.approx(4 / 9)
    assert metrics(rows[:5])["cvbench"] == {"2D": 0.75, "3D": None, "Overall": None}


def test_read_questions_names_the_bad_record(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(
        json.dumps({"prompt": "p", "answer": "(A)", "image": "x.png"}) + "\n" + json.dumps({"prompt": "p"})
    )
    with pytest.raises(ValueError, match=r"q.jsonl: record 2 lacks \['answer', 'filename\|image'\]"):
        read_questions(f)


# ----------------------------------------------------------------------------- tiny checkpoint
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Built-in data (tokenizer, QA, images) and a random tiny PT checkpoint with predictors."""
    root = tmp_path_factory.mktemp("eval")
    paths = shapes.builtin_dataset(root / "builtin", n_pt=4, n_ift=4, n_val=6)
    tok = ChatTokenizer(paths["tokenizer"], "llama3")
    special = dict(bos_token_id=tok.bos_ids[0], eos_token_ids=tok.eos_ids, pad_token_id=tok.pad_id)
    model, teachers = tiny_ola(vocab=tok.vocab_size, n_layers=4, **special)
    model.save(root / "ckpt", ("projector", "tokens", "predictors"))
    return paths, root / "ckpt", teachers


def test_qa_smoke_and_batching(tiny, tmp_path):
    paths, ckpt, _ = tiny
    model, tok = load_model(ckpt, paths["tokenizer"])
    records = read_questions(paths["qa_val"])
    rows = run_questions(model, tok, records, paths["images"], batch_size=4, max_new_tokens=6)
    assert len(rows) == 6 and all(isinstance(r["output"], str) for r in rows)
    assert 0 <= metrics(rows)["accuracy"] <= 1
    # left padding: a batch mixing prompt lengths answers exactly like one prompt at a time
    one_by_one = [
        r["output"]
        for k in range(6)
        for r in run_questions(
            model, tok, records[k : k + 1], paths["images"], batch_size=1, max_new_tokens=6
        )
    ]
    assert len({len(r["prompt"]) for r in records}) > 1 and [r["output"] for r in rows] == one_by_one
    # the CLI writes metrics and every sample
    out = tmp_path / "qa.json"
    main(
        [
            "qa",
            "--model",
            str(ckpt),
            "--tokenizer",
            str(paths["tokenizer"]),
            "--data",
            str(paths["qa_val"]),
            "--images",
            str(paths["images"]),
            "--limit",
            "3",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["metrics"]["n"] == 3 and len(result["samples"]) == 3


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
