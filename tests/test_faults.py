"""Bad input and faults, one representative case per class (docs/design.md §12): hostile or damaged files
are errors that name the file, samples without labels are skipped and counted, a failed save (full disk)
leaves the previous checkpoint intact, and the command-line tools end in one line instead of a traceback.
The kill -9 cases are end-to-end runs in test_train.py."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from PIL import Image
from test_data import RECORDS, llama3_tokenizer

import train
from data import LLaVADataset, Loader
from encoders import CLIPVisionConfig
from tokenizer import ChatTokenizer, check_vocabulary
from weights import last_complete, load_tensors_only, read_state_dict, write_folder


class Hostile:
    """A pickle that runs code when unpickled without restrictions."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_asks_for_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": Hostile(marker), "step": 3}, tmp_path / "trainer.pt")
    with pytest.raises(ValueError, match=r"trainer.pt: refused, it holds more than tensors"):
        load_tensors_only(tmp_path / "trainer.pt")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_a_damaged_safetensors_file_is_named(tmp_path, damage):
    from safetensors.torch import save_file

    file = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(file))
    if damage == "truncated":
        os.truncate(file, file.stat().st_size // 2)
    else:
        file.write_bytes(b"\xff" * 8 + b"not a header")
    with pytest.raises(ValueError, match=rf"{file}: not a readable safetensors file"):
        read_state_dict(tmp_path)


def test_a_tokenizer_that_is_not_json_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"tokenizer.json: not a readable tokenizer.json"):
        ChatTokenizer(tmp_path / "tokenizer.json")


def test_a_vision_config_that_is_not_clip_is_refused():
    with pytest.raises(ValueError, match=r"model_type 'siglip' is not CLIP"):
        CLIPVisionConfig.from_json({"model_type": "siglip", "vision_config": {"hidden_size": 64}})


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    tok = ChatTokenizer(llama3_tokenizer(tmp_path / "t.json"))
    with pytest.raises(ValueError, match=rf"{tok.vocab_size} tokens, but the LLM's embedding has"):
        check_vocabulary(tok, tok.vocab_size - 1)
    check_vocabulary(tok, tok.vocab_size)  # as many rows as ids: fine


@pytest.fixture()
def records(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "images" / "a.png")
    question_only = RECORDS["558k"][0][:1]
    rows = [
        {"id": "ok", "image": "a.png", "conversations": RECORDS["558k"][0]},
        {"id": "no-answer", "image": "a.png", "conversations": question_only},
        {"id": "text", "conversations": RECORDS["text"][0]},
    ]
    (tmp_path / "r.json").write_text(json.dumps(rows))
    return tmp_path


def dataset(root, **kw) -> LLaVADataset:
    tok = ChatTokenizer(llama3_tokenizer(root / "t.json"))
    return LLaVADataset(
        root / "r.json", root / "images", tok, view="pad", image_size=28, image_seq_len=4, **kw
    )


def test_samples_without_labelled_tokens_are_skipped_and_counted(records):
    """No assistant turn, or the answer cut away by max_length: nothing to learn, skipped like a bad image."""
    ds = dataset(records, max_bad_fraction=1.0)
    (batch,) = Loader(ds, batch_size=3, shuffle=False, num_workers=0)
    assert "no-answer" not in batch["ids"] and "ok" in batch["ids"]
    assert list(ds.bad_samples.values()) == ["no labelled (answer) tokens within max_length 4096"]
    answer_start = ds.load(0)["labels"].ne(-100).nonzero()[0].item()
    short = dataset(records, max_bad_fraction=1.0, max_length=answer_start + 3)  # image + 3 (3 - 3 = 0)
    with pytest.raises(Exception, match="no labelled"):
        short.load(0)


def test_pt_data_without_images_is_refused(records):
    text_only = [json.loads((records / "r.json").read_text())[2]]
    (records / "r.json").write_text(json.dumps(text_only))
    with pytest.raises(ValueError, match=r"r.json: no record has an 'image', but PT trains on images"):
        train.check_images(dataset(records))


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path):
    folder = tmp_path / "final"
    write_folder(folder, lambda tmp: (tmp / "config.json").write_text("{}"))

    def fill_the_disk(tmp):
        (tmp / "config.json").write_text('{"new": 1}')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match=rf"could not write {folder}: No space left on device"):
        write_folder(folder, fill_the_disk)
    assert (folder / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary folder left behind
    assert last_complete(tmp_path) == folder


def test_command_line_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe[]")
    cmd = [sys.executable, str(ROOT / "train.py"), "--stage", "ift", "--data", str(tmp_path / "bad.json")]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"error: {tmp_path / 'bad.json'}: not UTF-8 text" in p.stderr
