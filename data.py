"""LLaVA-style training data (Sec. 5.1; docs/design.md §5): records -> samples (ids, labels, the base
encoder's pixels, the teachers' pixels of the same square view), bad records skipped and counted, and a
loader that resumes exactly at a batch and gives 2 ranks × b the batches of 1 rank × 2b."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from preprocess import VIEWS, clip_preprocess, read_image, square_view
from tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ChatTokenizer
from weights import read_jsonl

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- records and samples
def read_records(path: str | os.PathLike) -> list:
    """A LLaVA `.json` list of records, or `.jsonl` (one record a line); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if "jsonl" in path.name:
        return [record for _, record in read_jsonl(path)]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    return records


class BadSample(Exception):
    """A record that cannot be used (malformed, unreadable image, too long): skipped and counted."""


class BadData(ValueError):
    """Too many bad samples (or all of them): the run stops, naming the data file and the first reason."""


class LLaVADataset(Dataset):
    """LLaVA records (558K, ALLaVA, 665K incl. multi-turn and text-only) -> training samples, lazily.

    view: 'crop' (PT) or 'pad' (VPT/IFT), the square view of the base encoder and the teachers
    (docs/design.md §2); `target_preprocess(square)` makes the teachers' pixels from that view. A sample is
    {"id", "input_ids" (T,), "labels" (T,), "image" (3, S, S) | None, "targets" {task: (3, s, s)} | None,
    "skipped"}. `image_preprocess` turns the view into the base encoder's pixels (default: CLIP's at
    image_size). The placeholder becomes `image_seq_len` positions in the model (image + special tokens); a
    sequence past `max_length` positions is cut at the end, never through the placeholder. A bad record is
    logged and replaced by the next good one (i+1, ...), so batches keep their size on every rank; the
    skipped reads (sample["skipped"]) are counted in the main process by `count_bad`, which stops the run
    above `max_bad_fraction` (over >= 100 reads, exactly at the end of a pass). A LabelMismatchError is a
    bug, not bad data: it always stops the run.
    """

    def __init__(
        self,
        records: str | os.PathLike,
        image_folder: str | os.PathLike,
        tokenizer: ChatTokenizer,
        view: str = "pad",
        image_size: int = 336,
        target_preprocess: Callable[[Image.Image, dict[str, Image.Image]], dict] | None = None,
        max_length: int = 4096,
        image_seq_len: int = 576 + 24,
        max_bad_fraction: float = 0.1,
        image_preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
    ):
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        self.path = str(records)
        self.records = read_records(records)
        if not self.records:
            raise ValueError(f"{records}: no records")
        self.image_folder = Path(image_folder) if image_folder is not None else None
        if self.image_folder is not None and not self.image_folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_folder} (--image-folder)")
        self.tokenizer = tokenizer
        self.view = view
        self.image_size = image_size
        self.image_preprocess = image_preprocess or partial(clip_preprocess, size=image_size)
        self.image_seq_len = image_seq_len
        self.target_preprocess = target_preprocess
        self.max_length = max_length
        self.max_bad_fraction = max_bad_fraction
        self.bad_samples: dict[str, str] = {}  # "file record i (id ...)" -> reason, distinct records
        self.n_reads = 0  # sample reads (a record read twice counts twice)
        self.n_bad = 0  # bad reads

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        skipped = []
        for j in range(i, i + len(self.records)):
            j %= len(self.records)
            try:
                return {**self.load(j), "skipped": skipped}
            except BadSample as e:
                sid = self.records[j].get("id", "?") if isinstance(self.records[j], dict) else "?"
                skipped.append((f"{self.path} record {j} (id {sid})", str(e)))
                log.warning("skipping %s: %s", *skipped[-1])
                self.check(len(skipped), len(skipped), dict(skipped), final=False)
        self.check(len(skipped), len(skipped), dict(skipped), final=True)
        raise BadData(f"{self.path}: all {len(self.records)} records are bad")

    def load(self, i: int) -> dict:
        """Record i -> sample; raises BadSample."""
        record = self.records[i]
        if not isinstance(record, dict) or "conversations" not in record:
            raise BadSample("no 'conversations'")
        sid = str(record.get("id", i))
        file = record.get("image")
        if "image" in record and not isinstance(file, str):
            raise BadSample(f"'image' must be a path relative to {self.image_folder}, got {file!r:.60}")
        try:
            ids, labels = self.tokenizer.encode_conversation(record["conversations"], file is not None, sid)
        except ValueError as e:
            raise BadSample(f"malformed conversations: {e}") from None
        keep = self.max_length - (self.image_seq_len - 1 if file is not None else 0)  # ids that fit
        if file is not None and ids.index(IMAGE_TOKEN_INDEX) >= keep:
            raise BadSample(
                f"the image (token {ids.index(IMAGE_TOKEN_INDEX)}, {self.image_seq_len} "
                f"positions) does not fit in max_length {self.max_length}"
            )
        ids = ids[:keep]
        labels = labels[:keep]
        if all(label == IGNORE_INDEX for label in labels):  # nothing to learn from (no answer, or cut away)
            raise BadSample(f"no labelled (answer) tokens within max_length {self.max_length}")
        image = targets = None
        if file is not None:
            if self.image_folder is None:
                raise BadSample(f"image {file!r} but no image folder was given (--image-folder)")
            try:  # missing, truncated, not an image, a refused format or shape (preprocess.read_image)
                square = square_view(read_image(self.image_folder / file), self.view)
            except ValueError as e:
                raise BadSample(str(e)) from None
            image = self.image_preprocess(square)  # (3, S, S)
            if self.target_preprocess:
                targets = self.target_preprocess(square)
        return {
            "id": sid,
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "image": image,
            "targets": targets,
        }

    def count_bad(self, skipped: list[tuple[str, str]], n_good: int, final: bool = False) -> None:
        """Count a batch's skipped reads (main process) and stop the run above max_bad_fraction."""
        self.bad_samples.update(skipped)
        self.n_bad += len(skipped)
        self.n_reads += len(skipped) + n_good
        self.check(self.n_bad, self.n_reads, self.bad_samples, final)

    def check(self, n_bad: int, n_reads: int, examples: dict[str, str], final: bool) -> None:
        if n_bad > self.max_bad_fraction * (n_reads if final else max(n_reads, 100)):
            where, why = next(iter(examples.items()))
            raise BadData(
                f"{self.path}: {n_bad} of {n_reads} sample reads were bad, above "
                f"max_bad_fraction={self.max_bad_fraction:g}; first: {where}: {why}"
            )

    def summary(self) -> str:
        """End-of-run line: how many records were skipped, and which."""
        lines = [
            f"{self.path}: {len(self.bad_samples)} bad records skipped ({self.n_bad} of {self.n_reads} reads)"
        ]
        return "\n".join(lines + [f"  {w}: {r}" for w, r in list(self.bad_samples.items())[:10]])


# ----------------------------------------------------------------------------- batches
def collate(batch: list[dict], pad_id: int, image_size: int = 0) -> dict:
    """Samples -> the batch dict (docs/design.md §5), right-padded. `image_size` only shapes an empty `images`
    (0, 3, S, S) when no sample has an image; target_images is {} without teachers."""
    ids = [s["input_ids"] for s in batch]
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_id)  # (B, T)
    labels = pad_sequence([s["labels"] for s in batch], batch_first=True, padding_value=IGNORE_INDEX)
    attention_mask = pad_sequence(
        [torch.ones_like(s["input_ids"], dtype=torch.bool) for s in batch], batch_first=True
    )
    with_image = [s for s in batch if s["image"] is not None]
    images = torch.zeros(0, 3, image_size, image_size)  # (N_img, 3, S, S)
    if with_image:
        images = torch.stack([s["image"] for s in with_image])
    tasks = (with_image[0]["targets"] or {}) if with_image else {}
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "images": images,
        "has_image": torch.tensor([s["image"] is not None for s in batch], dtype=torch.bool),
        "target_images": {t: torch.stack([s["targets"][t] for s in with_image]) for t in tasks},
        "ids": [s["id"] for s in batch],
    }


class Loader:
    """This rank's batches of `dataset`, resumable at batch granularity. Epoch e visits perm_e (randperm with
    seed + e, or arange) wrapped to a multiple of the global batch B*W; global batch k is perm_e[k*B*W :
    (k+1)*B*W] and rank r takes its r-th slice of B, so 2 ranks x b == 1 rank x 2b. Iterating yields the rest
    of the epoch (workers load samples, collate runs here); resume with `load_state_dict(state_dict())`."""

    def __init__(
        self,
        dataset: LLaVADataset,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.epoch = self.batches_done = 0

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return -(-len(self.dataset) // (self.batch_size * self.world_size))

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's index batches of `epoch`."""
        n = len(self.dataset)
        g = self.batch_size * self.world_size
        order = torch.arange(n)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        order = order.repeat(-(-len(self) * g // n))[: len(self) * g]  # row k of the view = global batch k
        return order.view(len(self), self.world_size, self.batch_size)[:, self.rank].tolist()

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        loader = DataLoader(
            ds,
            batch_sampler=self.batches(self.epoch)[self.batches_done :],
            num_workers=self.num_workers,
            collate_fn=list,
        )
        for samples in loader:
            self.batches_done += 1
            ds.count_bad([x for s in samples for x in s["skipped"]], len(samples))
            yield collate(samples, ds.tokenizer.pad_id, ds.image_size)
        ds.count_bad([], 0, final=True)
        self.epoch = self.epoch + 1
        self.batches_done = 0

    def state_dict(self) -> dict:
        ds = self.dataset
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "n_reads": ds.n_reads,
            "n_bad": ds.n_bad,
            "bad_samples": dict(ds.bad_samples),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.batches_done = state["batches_done"]
        ds = self.dataset
        ds.n_reads, ds.n_bad, ds.bad_samples = state["n_reads"], state["n_bad"], dict(state["bad_samples"])
