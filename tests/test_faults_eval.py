"""Bad input to evaluation, chat and image reading, one case per class (docs/design.md §12, Faults): each
ends in one error naming its flag, file, key or record and what was expected, or, in training data, a
logged and counted skip. Tiny inputs made in tmp_path; no model is loaded where the input fails first."""

import errno
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_ola
from PIL import Image
from test_data import RECORDS, llama3_tokenizer

import eval as eval_py
import preprocess
from benchmarks import open_image
from cli import user_errors
from data import LLaVADataset
from inference import answer, image_pixels
from probe import coco_images
from tokenizer import ChatTokenizer


def save(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    Image.new(mode, size, 90).save(path)
    return path


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["mmstar", "--data", "m.jsonl", "--limit", "-1"], "--limit"),
        (["mmstar", "--data", "m.jsonl", "--batch-size", "0"], "--batch-size"),
        (["okvqa", "--data", "o.jsonl", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["chat", "--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens"),
    ],
)
def test_count_flags_below_one_are_refused(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        eval_py.parse_args([*argv, "--model", str(tmp_path)])
    assert exit_.value.code == 2
    assert f"argument {flag}: expected a whole number >= 1, got" in capsys.readouterr().err


def test_an_empty_benchmark_file_is_refused_before_the_model_loads(tmp_path):
    (tmp_path / "mmstar.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"mmstar.jsonl: no questions, expected at least one mmstar record"):
        eval_py.main(["mmstar", "--data", str(tmp_path / "mmstar.jsonl"), "--model", str(tmp_path / "none")])


def test_a_full_disk_leaves_the_previous_predictions_and_summary_as_a_pair(tmp_path, monkeypatch):
    out = tmp_path / "eval"
    eval_py.write_results(out, [{"id": 0, "correct": True}], {"n": 1}, {"benchmark": "old", "model": "m"})
    before = {p.name: p.read_text() for p in out.iterdir()}
    write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):  # the disk fills half-way through `name`
        if name in self.name:
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    records = [{"id": i, "correct": False} for i in range(50)]
    for name in ("predictions.jsonl", "summary.json"):
        with pytest.raises(OSError, match=rf"could not write {out / name}: No space left on device"):
            eval_py.write_results(out, records, {"n": 50}, {"benchmark": "new", "model": "m"})
        assert {p.name: p.read_text() for p in out.iterdir()} == before  # no temporary file left either
    monkeypatch.undo()
    eval_py.write_results(out, records, {"n": 50}, {"benchmark": "new", "model": "m"})
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["metrics"] == {"n": 50}
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 50


def test_a_decompression_bomb_names_the_image(tmp_path, monkeypatch):
    png = save(tmp_path / "bomb.png", (40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1200 pixels > 2 × 100: PIL's error, not a warning
    with pytest.raises(ValueError, match=rf"cannot read image {png}: Image size \(1200 pixels\) exceeds"):
        image_pixels(png, tower=None)  # chat, show, probe
    with pytest.raises(
        ValueError, match=r"m.jsonl:3: cannot read image of \d+ bytes: Image size \(1200 pixels\)"
    ):
        open_image({"image": png.read_bytes(), "where": "m.jsonl:3"})  # every benchmark


def test_extreme_shapes_and_other_formats_are_refused_before_any_view(tmp_path, monkeypatch):
    """One guard (preprocess.read_image) in chat/probe, the benchmarks and training data alike."""
    (tmp_path / "images").mkdir()
    wide = save(tmp_path / "images" / "wide.png", (400, 1), "L")
    with pytest.raises(ValueError, match=rf"cannot read image {wide}: 400×1 pixels: aspect ratio 400:1"):
        image_pixels(wide, tower=None)
    with pytest.raises(ValueError, match=rf"cv.jsonl:2: cannot read image {wide}: 400×1 pixels: aspect"):
        open_image({"image": wide, "where": "cv.jsonl:2"})
    rows = [{"id": "wide", "image": "wide.png", "conversations": RECORDS["558k"][0]}]
    (tmp_path / "r.json").write_text(json.dumps(rows + [{"id": "text", "conversations": RECORDS["text"][0]}]))
    tok = ChatTokenizer(llama3_tokenizer(tmp_path / "t.json"))
    ds = LLaVADataset(tmp_path / "r.json", tmp_path / "images", tok, image_size=28, image_seq_len=4)
    sample = ds[0]  # skipped (and counted by the loader), replaced by the next good record
    assert sample["id"] == "text"
    assert sample["skipped"] == [
        (
            f"{ds.path} record 0 (id wide)",
            f"cannot read image {wide}: 400×1 pixels: aspect ratio 400:1, over the 20:1 limit (MAX_ASPECT)",
        )
    ]
    monkeypatch.setattr(preprocess, "MAX_SIDE", 64)
    big = save(tmp_path / "big.png", (80, 60))
    with pytest.raises(ValueError, match=r"big.png: 80×60 pixels: the long side is over the 64 px limit"):
        image_pixels(big, tower=None)
    ppm = save(tmp_path / "photo.ppm", (8, 8))  # a format PIL reads but no data set holds
    with pytest.raises(ValueError, match=rf"cannot read image {ppm}: cannot identify image file"):
        image_pixels(ppm, tower=None)


def test_a_prompt_longer_than_the_llm_positions_is_refused(tmp_path):
    tok = ChatTokenizer(llama3_tokenizer(tmp_path / "t.json"))
    special = dict(bos_token_id=tok.bos_ids[0], eos_token_ids=tok.eos_ids, pad_token_id=tok.pad_id)
    model, _ = tiny_ola(vocab=tok.vocab_size, n_layers=2, max_position_embeddings=128, **special)
    with pytest.raises(
        ValueError,
        match=r"tokens \+ 0 image positions \+ 4 new tokens = \d+ positions, more "
        r"than the LLM's 128 \(max_position_embeddings\)",
    ):
        answer(model, tok, ["Describe the picture. " * 20], None, max_new_tokens=4)
    image = [torch.zeros(3, 112, 112)]
    with pytest.raises(ValueError, match=rf"\+ {model.image_seq_len - 1} image positions \+ 4 new tokens"):
        answer(model, tok, ["Hi"], image, max_new_tokens=4)
    assert isinstance(answer(model, tok, ["Hi"], None, max_new_tokens=4)[0], str)  # one that fits runs


def test_report_names_a_torn_or_incomplete_summary(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text('{"benchmark": "mmstar", "mod')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'a' / 'summary.json'}: not a readable summary.json"):
        eval_py.main(["report", str(tmp_path)])
    (tmp_path / "a" / "summary.json").write_text(json.dumps({"benchmark": "mmstar", "metrics": {}}))
    with pytest.raises(ValueError, match=r"a/summary.json: a benchmark summary without 'model'$"):
        eval_py.main(["report", str(tmp_path)])


def test_coco_captions_errors_name_the_file_and_the_image_id(tmp_path):
    captions = tmp_path / "captions_val2017.json"
    captions.write_text('{"images": [')
    with pytest.raises(ValueError, match=rf"{captions}: not a readable COCO captions JSON file"):
        coco_images(captions, tmp_path)
    coco = {"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [{"image_id": 1}, {"image_id": 7}]}
    captions.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=rf"{captions}: annotations point to image id 7, not among its"):
        coco_images(captions, tmp_path)


def test_parquet_without_pyarrow_is_one_line_naming_the_file(tmp_path, monkeypatch):
    (tmp_path / "mmstar.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.delenv("OLA_DEBUG", raising=False)
    argv = ["mmstar", "--data", str(tmp_path / "mmstar.parquet"), "--model", str(tmp_path / "none")]
    with pytest.raises(SystemExit) as exit_, user_errors():
        eval_py.main(argv)
    assert str(exit_.value).splitlines()[0] == (
        f"error: {tmp_path / 'mmstar.parquet'}: reading .parquet files needs pyarrow: pip install pyarrow"
    )
