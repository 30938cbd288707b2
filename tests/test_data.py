"""tokenizer.py, data.py, shapes.py: chat templates and labels, bad data, built-in data, collate, truncation,
loader resume."""

import json
import logging
import re

import pytest
import torch
from PIL import Image
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

import data
import shapes
import tokenizer
from data import LLaVADataset, Loader, collate
from preprocess import resize_normalize
from tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LLAMA3_CHAT_TOKENS, ChatTokenizer

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "You are a helpful AI assistant.",
    "How many shapes are in the image? There are three shapes.",
    "What color is the red circle? The circle is red. Describe the image briefly.",
    "Which is bigger, the blue square or the green triangle? The blue square is bigger.",
] * 5

# The prompts exactly as the released templates write them (not taken from tokenizer.py).
LLAMA3_SYSTEM = (
    "<|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's "
    "questions.<|eot_id|>"
)
PHI3_SYSTEM = "<|system|>\nYou are a helpful AI assistant.<|end|>"
ROLES = {
    "llama3": (
        "<|start_header_id|>user<|end_header_id|>\n\n",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
    "phi3": ("\n<|user|>\n", "\n<|assistant|>\n", "<|end|>"),
}
PHI3_ADDED = [
    "<|endoftext|>",
    "<|assistant|>",
    *(f"<|placeholder{i}|>" for i in range(1, 5)),
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]


def llama3_tokenizer(path):
    """Byte-level BPE with the Llama-3 split regex, the 10 first Llama-3 specials and a BOS."""
    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    specials = list(LLAMA3_CHAT_TOKENS)  # the first ten Llama-3 special tokens, ids 128000-128009
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))],
    )
    tok.save(str(path))
    return path


def phi3_tokenizer(path, rstrip):
    """SentencePiece-style BPE: Prepend/Replace normalizer, byte fallback, the 11 Phi-3 added tokens
    (the real file has rstrip=True on all but <|endoftext|>), `<s>` TemplateProcessing."""
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base = Tokenizer(models.BPE())
    base.normalizer = norm
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    m = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for t in sorted(m["vocab"], key=m["vocab"].get):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ")) for x in m["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens(
        [
            AddedToken(s, special=True, normalized=False, rstrip=rstrip and s != "<|endoftext|>")
            for s in PHI3_ADDED
        ]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def tokenizers_(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return {
        "llama3": ChatTokenizer(llama3_tokenizer(d / "llama3.json"), "llama3"),
        "phi3": ChatTokenizer(phi3_tokenizer(d / "phi3.json", rstrip=False), "phi3"),
        "phi3-rstrip": ChatTokenizer(phi3_tokenizer(d / "phi3r.json", rstrip=True), "phi3"),
    }


def conv(*turns):
    return [{"from": ("human", "gpt")[k % 2], "value": v} for k, v in enumerate(turns)]


RECORDS = {  # (conversations, has image)
    "558k": (
        conv("Describe the image briefly.\n<image>", "Three shapes: a red circle, a blue square."),
        True,
    ),
    "665k": (
        conv(
            "<image>\nHow many shapes are in the image?",
            "There are 3 shapes.",
            "What color is the circle?",
            "The circle is red, like a café awning.",
            "Which is bigger?",
            "The blue square.",
        ),
        True,
    ),
    "text": (conv("What is 2 plus 2?", "2 plus 2 is 4.", "And 3 plus 3?", "6."), False),
    "no-token": (conv("Describe the image briefly.", "A green triangle."), True),  # image field, no <image>
}


def key(name):
    return "llama3" if name == "llama3" else "phi3"


def runs(labels):
    """Maximal runs of labelled positions."""
    out, cur = [], []
    for j, lab in enumerate(labels):
        if lab != IGNORE_INDEX:
            cur.append(j)
        elif cur:
            out, cur = out + [cur], []
    return out + [cur] if cur else out


@pytest.mark.parametrize("name", ["llama3", "phi3", "phi3-rstrip"])
def test_chat_specials_encode_to_one_id(tokenizers_, name):
    tok = tokenizers_[name].tok
    template = "".join(ROLES[key(name)]) + (LLAMA3_SYSTEM if name == "llama3" else PHI3_SYSTEM)
    specials = set(re.findall(r"<\|[^|]+\|>", template))
    assert len(specials) >= 3
    for s in specials:
        assert tok.encode(s, add_special_tokens=False).ids == [tok.token_to_id(s)]


@pytest.mark.parametrize("name", ["llama3", "phi3", "phi3-rstrip"])
@pytest.mark.parametrize("record", list(RECORDS))
def test_labels_are_exactly_answers_and_end_of_turn(tokenizers_, name, record):
    ct = tokenizers_[name]
    turns, has_image = RECORDS[record]
    ids, labels = ct.encode_conversation(turns, with_image=has_image, sample_id=record)
    assert len(ids) == len(labels)
    sep = ROLES[key(name)][2]
    answers = [t["value"] for t in turns[1::2]]
    got = [ct.tok.decode([ids[j] for j in run], skip_special_tokens=False) for run in runs(labels)]
    assert got == [("\n\n" if name == "llama3" else "") + a + sep for a in answers]  # released llama3 rule
    assert all(labels[j] in (IGNORE_INDEX, ids[j]) for j in range(len(ids)))
    assert ids.count(IMAGE_TOKEN_INDEX) == int(has_image)
    bos = ct.tok.token_to_id("<|begin_of_text|>" if name == "llama3" else "<s>")
    assert ids[0] == bos and ids.count(bos) == 1
    if has_image:  # <image> sits at the front of the first user turn, after the system prompt
        assert ids.index(IMAGE_TOKEN_INDEX) == ct.n_prefix_tokens
        prefix = (LLAMA3_SYSTEM if name == "llama3" else PHI3_SYSTEM) + ROLES[key(name)][0]
        assert ids[: ct.n_prefix_tokens] == ct.tok.encode(prefix).ids


def llava_prompt(name, turns, has_image):
    """The prompt string of the released templates, `<image>` moved to the front as LLaVA does."""
    user, assistant, sep = ROLES[name]
    msgs = [t["value"] for t in turns]
    if has_image:
        msgs[0] = "<image>\n" + msgs[0].replace("<image>", "").strip()
    text = LLAMA3_SYSTEM if name == "llama3" else PHI3_SYSTEM
    for q, a in zip(msgs[::2], msgs[1::2]):
        text += user + q + sep + assistant + a + sep
    return text


@pytest.mark.parametrize("name", ["llama3", "phi3", "phi3-rstrip"])
def test_ids_match_llava_tokenizer_image_token(tokenizers_, name):
    """Reference: LLaVA's mm_utils.tokenizer_image_token with a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    ct = tokenizers_[name]
    ref = PreTrainedTokenizerFast(
        tokenizer_file=ct.path, bos_token="<|begin_of_text|>" if name == "llama3" else "<s>"
    )
    for turns, has_image in RECORDS.values():
        chunks = [ref(c).input_ids for c in llava_prompt(key(name), turns, has_image).split("<image>")]
        offset = 1 if chunks[0][0] == ref.bos_token_id else 0
        expected = chunks[0][:offset]
        for k, c in enumerate(chunks):
            expected += ([IMAGE_TOKEN_INDEX] if k else []) + c[offset:]
        assert ct.encode_conversation(turns, has_image)[0] == expected


def test_label_mismatch_raises_with_sample_id(tmp_path):
    path = llama3_tokenizer(tmp_path / "t.json")
    tok = Tokenizer.from_file(str(path))
    tok.decoder = None  # decoding now yields byte-level symbols (Ġ, Ċ): answers cannot match
    tok.save(str(path))
    with pytest.raises(tokenizer.LabelMismatchError, match="sample rec-7"):
        ChatTokenizer(path, "llama3").encode_conversation(RECORDS["558k"][0], True, "rec-7")


def test_missing_special_token_is_named(tmp_path):
    path = phi3_tokenizer(tmp_path / "p.json", rstrip=False)
    with pytest.raises(ValueError, match=r"<\|start_header_id\|>"):
        ChatTokenizer(path, "llama3")


# ----------------------------------------------------------------------------- bad data
@pytest.fixture()
def bad_data(tmp_path, tokenizers_):
    img = tmp_path / "images"
    img.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(img / "good.png")
    (img / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    records = [
        {"id": "ok0", "image": "good.png", "conversations": RECORDS["558k"][0]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": RECORDS["558k"][0]},
        {"id": "missing", "image": "missing.png", "conversations": RECORDS["558k"][0]},
        {"id": "no-conv", "image": "good.png"},
        {"id": "token-no-image", "conversations": RECORDS["558k"][0]},
        {"id": "image-no-token", "image": "good.png", "conversations": RECORDS["no-token"][0]},
        {"id": "ok6", "conversations": RECORDS["text"][0]},
    ]
    (tmp_path / "r.json").write_text(json.dumps(records))
    return tmp_path


def dataset(root, tok, **kw):
    return LLaVADataset(
        root / "r.json", root / "images", tok, view="pad", image_size=28, image_seq_len=4, **kw
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_skipped_logged_and_counted(bad_data, tokenizers_, caplog, workers):
    ds = dataset(bad_data, tokenizers_["llama3"], max_bad_fraction=1.0)
    caplog.set_level(logging.WARNING)
    batches = list(Loader(ds, batch_size=7, shuffle=False, num_workers=workers))
    ids = batches[0]["ids"]
    assert set(ids) == {"ok0", "image-no-token", "ok6"}  # bad records replaced by the next good one
    assert set(ds.bad_samples) == {
        f"{bad_data / 'r.json'} record {i} (id {n})"
        for i, n in [(1, "corrupt"), (2, "missing"), (3, "no-conv"), (4, "token-no-image")]
    }
    reasons = "\n".join(ds.bad_samples.values())
    assert "corrupt.png" in reasons and "missing.png" in reasons and "no 'conversations'" in reasons
    assert "'<image>' in the text but the record has no 'image'" in reasons
    if workers == 0:  # worker processes log to their own stderr
        assert "corrupt.png" in caplog.text and "id missing" in caplog.text
    # an image field without <image>: the placeholder is inserted at the front of the first turn
    sample = ds[5]
    assert sample["input_ids"].tolist().index(IMAGE_TOKEN_INDEX) == tokenizers_["llama3"].n_prefix_tokens
    assert sample["image"].shape == (3, 28, 28)
    assert "4 bad records skipped" in ds.summary()


def test_bad_fraction_threshold_stops_the_run(bad_data, tokenizers_):
    ds = dataset(bad_data, tokenizers_["llama3"], max_bad_fraction=0.1)
    # reads: 0 ok; 1 -> 1,2,3,4 bad, 5 ok; 2 -> 3 bad; 3 -> 2 bad; 4 -> 1 bad; 5, 6 ok: 10 bad of 17
    with pytest.raises(data.BadData, match=r"10 of 17 sample reads were bad, above max_bad_fraction=0.1"):
        list(Loader(ds, batch_size=7, shuffle=False))


def test_malformed_json_names_file_and_line(tmp_path, tokenizers_):
    (tmp_path / "r.json").write_text('[\n {"id": 1},\n {"id": 2,,}\n]')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'r.json'}:3")):
        LLaVADataset(tmp_path / "r.json", tmp_path, tokenizers_["llama3"])
    (tmp_path / "r.jsonl").write_text('{"id": 1}\n{"id": 2\n')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'r.jsonl'}:2")):
        LLaVADataset(tmp_path / "r.jsonl", tmp_path, tokenizers_["llama3"])


# ----------------------------------------------------------------------------- built-in data
@pytest.fixture(scope="session")
def builtin(tmp_path_factory):
    return shapes.builtin_dataset(
        tmp_path_factory.mktemp("b") / "builtin", seed=0, n_pt=40, n_ift=40, n_val=20
    )


def test_builtin_is_deterministic_llava_layout(builtin, tmp_path):
    again = shapes.builtin_dataset(tmp_path / "again", seed=0, n_pt=40, n_ift=40, n_val=20)
    other = shapes.builtin_dataset(tmp_path / "other", seed=1, n_pt=40, n_ift=40, n_val=20)
    for key in ("pt", "ift", "qa_val", "tokenizer"):
        assert builtin[key].read_bytes() == again[key].read_bytes()
        assert builtin[key].read_bytes() != other[key].read_bytes()
    files = sorted(p.name for p in builtin["images"].iterdir())
    assert files == sorted(p.name for p in again["images"].iterdir())
    assert all((builtin["images"] / f).read_bytes() == (again["images"] / f).read_bytes() for f in files)
    mtime = builtin["pt"].stat().st_mtime_ns
    assert shapes.builtin_dataset(builtin["root"], seed=0, n_pt=40, n_ift=40, n_val=20) == builtin
    assert builtin["pt"].stat().st_mtime_ns == mtime  # complete: not rewritten

    tok = ChatTokenizer(builtin["tokenizer"], "llama3")
    assert tok.vocab_size <= 1000
    for key, n in (("pt", 40), ("ift", 40)):
        records = json.loads(builtin[key].read_text())
        assert len(records) == n and len({r["id"] for r in records}) == n
        for r in records:
            c = r["conversations"]
            assert [t["from"] for t in c] == ["human", "gpt"] * (len(c) // 2)
            assert sum(t["value"].count("<image>") for t in c) == ("image" in r)
            if "image" in r:
                for kind, mode in (("image", "RGB"), ("depth", "I;16"), ("seg", "L")):  # maps beside it
                    with Image.open(builtin["images"] / r[kind]) as img:
                        assert img.size == (128, 128) and img.mode == mode
            tok.encode_conversation(c, "image" in r, r["id"])  # labels check passes
        if key == "ift":
            assert any("image" not in r for r in records) and any(
                len(r["conversations"]) > 2 for r in records
            )
    for line in builtin["qa_val"].read_text().splitlines():
        q = json.loads(line)
        letter = q["answer"][1]
        assert re.fullmatch(r"\([A-D]\)", q["answer"]) and f"({letter}) " in q["prompt"]
        assert (builtin["images"] / q["image"]).exists() and q["task"] in shapes.MC_TASKS
        assert (builtin["images"] / q["depth"]).exists() and (builtin["images"] / q["seg"]).exists()


def test_collate_obeys_contract(builtin):
    tok = ChatTokenizer(builtin["tokenizer"], "llama3")
    targets = lambda sq: {"depth": resize_normalize(sq, 14), "gen": resize_normalize(sq, 7)}
    ds = LLaVADataset(
        builtin["ift"],
        builtin["images"],
        tok,
        view="pad",
        image_size=28,
        target_preprocess=targets,
        image_seq_len=10,
    )
    samples = [ds[i] for i in range(10)]  # record 9 is text-only
    b = collate(samples, tok.pad_id, image_size=28)
    B, T = b["input_ids"].shape
    lengths = [len(s["input_ids"]) for s in samples]
    assert B == 10 and max(lengths) == T and b["input_ids"].dtype == torch.long
    assert b["has_image"].tolist() == [s["image"] is not None for s in samples] and not b["has_image"][9]
    n_img = int(b["has_image"].sum())
    assert b["images"].shape == (n_img, 3, 28, 28)
    assert b["target_images"]["depth"].shape == (n_img, 3, 14, 14)
    assert b["target_images"]["gen"].shape == (n_img, 3, 7, 7)
    assert torch.equal(b["images"][0], samples[0]["image"])
    for i, n in enumerate(lengths):
        row = b["input_ids"][i]
        assert b["attention_mask"][i].tolist() == [True] * n + [False] * (T - n)
        assert (row[n:] == tok.pad_id).all() and (b["labels"][i, n:] == IGNORE_INDEX).all()
        assert (row == IMAGE_TOKEN_INDEX).sum() == int(b["has_image"][i])
        if b["has_image"][i]:
            assert row[tok.n_prefix_tokens] == IMAGE_TOKEN_INDEX
        assert (b["labels"][i] == IMAGE_TOKEN_INDEX).sum() == 0
    assert b["ids"] == [s["id"] for s in samples]
    empty = collate([samples[9]], tok.pad_id, image_size=28)
    assert empty["images"].shape == (0, 3, 28, 28) and empty["target_images"] == {}


def test_truncation_never_cuts_the_image(builtin, tmp_path):
    tok = ChatTokenizer(builtin["tokenizer"], "llama3")
    turns = conv("<image>\nDescribe it.", *["The red circle is left of the blue square."] * 19)
    (tmp_path / "r.json").write_text(
        json.dumps(
            [
                {"id": "long", "image": "pt_00000.png", "conversations": turns},
                {"id": "text", "conversations": conv(*["Two words."] * 20)},
            ]
        )
    )
    full, labels = tok.encode_conversation(turns, True)
    p = tok.n_prefix_tokens  # the image placeholder's index; it becomes 16 positions
    answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)  # first labelled id
    for max_length in (p + 16, p + 17, len(full) + 14, len(full) + 15, len(full) + 200):
        ds = LLaVADataset(
            tmp_path / "r.json",
            builtin["images"],
            tok,
            image_size=28,
            image_seq_len=16,
            max_length=max_length,
        )
        if max_length - 15 <= answer:  # the image fits, no answer does: nothing to learn, the record is bad
            with pytest.raises(data.BadSample, match="no labelled"):
                ds.load(0)
            continue
        ids = ds.load(0)["input_ids"].tolist()
        assert ids.count(IMAGE_TOKEN_INDEX) == 1 and len(ids) - 1 + 16 == min(max_length, len(full) + 15)
        assert ids == full[: len(ids)]
    ds = LLaVADataset(
        tmp_path / "r.json", builtin["images"], tok, image_size=28, image_seq_len=16, max_length=p + 15
    )  # the image would end past max_length: the record is bad
    with pytest.raises(data.BadSample, match="does not fit in max_length"):
        ds.load(0)
    text_labels = tok.encode_conversation(conv(*["Two words."] * 20), False)[1]
    cut = next(i for i, label in enumerate(text_labels) if label != IGNORE_INDEX) + 5
    ds = LLaVADataset(tmp_path / "r.json", builtin["images"], tok, max_length=cut)
    assert len(ds.load(1)["input_ids"]) == cut  # text-only: a plain cut at max_length


def test_loader_resume_and_world_size(builtin):
    tok = ChatTokenizer(builtin["tokenizer"], "llama3")
    ds = LLaVADataset(builtin["pt"], builtin["images"], tok, view="crop", image_size=28, image_seq_len=10)
    full = Loader(ds, batch_size=3, shuffle=True, seed=5)
    one = [b["ids"] for b in full] + [b["ids"] for b in full]  # two epochs
    assert len(full) == 14 and len(one) == 28 and one[:14] != one[14:]
    assert sorted({i for b in one[:14] for i in b}) == sorted(
        r["id"] for r in json.loads(builtin["pt"].read_text())
    )
    # resume mid-epoch from a saved state
    part = Loader(ds, batch_size=3, shuffle=True, seed=5)
    it = iter(part)
    seen = [next(it)["ids"] for _ in range(4)]
    state = json.loads(json.dumps(part.state_dict()))
    resumed = Loader(ds, batch_size=3, shuffle=True, seed=5)
    resumed.load_state_dict(state)
    assert seen + [b["ids"] for b in resumed] + [b["ids"] for b in resumed] == one
    # 2 ranks x b: the union of the ranks' k-th batches is 1 rank's k-th batch of 2b
    g = Loader(ds, batch_size=4, shuffle=True, seed=5).batches(0)
    r0, r1 = (Loader(ds, batch_size=2, shuffle=True, seed=5, rank=r, world_size=2).batches(0) for r in (0, 1))
    assert len(r0) == len(r1) == len(g) and all(a + b == c for a, b, c in zip(r0, r1, g))
