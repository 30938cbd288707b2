r"""Pretraining the parts of the miniature (docs/design.md §9): the built-in world's base encoder, LLM and
teachers, each trained the way its real counterpart was, on the world's own scenes (streams of their own,
never the held-out split), and each scored on scenes it never saw against a trivial predictor.

| part | its real counterpart | the miniature's recipe | held-out score |
|---|---|---|---|
| base encoder | CLIP ViT-L/14-336 (contrastive, image-text pairs) | tiny CLIP ViT, InfoNCE against a bag-of-words text tower on the captions | retrieval top-1, ridge R² of depth and segments |
| LLM | Llama-3-8B-Instruct | next-token prediction on the world's text: captions, questions and answers in the chat template | NTP loss vs a unigram model |
| depth teacher | DINOv2-L of Depth Anything V2 | tiny DINOv2 + a linear per-patch depth head, L1 on depth | RMSE, δ < 1.25 vs the mean depth map |
| seg teacher | Swin-L of OneFormer COCO | tiny Swin + a linear per-token class head, cross-entropy on the classes | pixel accuracy, mIoU vs all-background |
| gen teacher | CLIP ViT-H/14 of SD-2.1-unCLIP | a wider tiny CLIP ViT, the base encoder's recipe | retrieval top-1 |

Only the encoders are kept: the text tower and the heads exist for training and scoring, as in the real
pipeline, where OLA-VLM uses DINOv2 without its DPT head and Swin without OneFormer's decoder.
"""  # noqa: E501  (a table)

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import shapes
from encoders import CLIPVision, DINOv2
from llm import LLM
from schedule import warmup_cosine
from swin import Swin
from tokenizer import ChatTokenizer

N_CLASSES = 2 + len(shapes.SHAPES)  # segmentation classes: wall, circle, square, triangle, diamond, floor


# ----------------------------------------------------------------------------- the scenes
@dataclass
class Scenes:
    """Rendered scenes of one random stream, in memory."""

    images: list[Image.Image]  # RGB, IMAGE_SIZE²
    depth: torch.Tensor  # (N, S, S) metres
    classes: torch.Tensor  # (N, S, S) segmentation class per pixel, 0 = background
    captions: list[str]
    conversations: list[list[tuple[str, str]]]  # the LM's text: a question about the scene after its caption

    def __len__(self) -> int:
        return len(self.images)


def render_scenes(split: str, n: int, seed: int) -> Scenes:
    """Scenes 0..n-1 of the stream `split` (random.Random(f"{seed}-{split}-{i}"), as the built-in records;
    the held-out split is "val", which no pretraining stream is). The LM's conversation of scene i asks one
    of its questions (multiple-choice for odd i) after its caption; every tenth needs no scene."""
    if split == "val":
        raise ValueError("the held-out split 'val' is never a pretraining stream")
    images, depths, classes, captions, conversations = [], [], [], [], []
    for i in range(n):
        rng = random.Random(f"{seed}-{split}-{i}")
        scene = shapes.random_scene(rng)
        image, depth, seg = shapes.render(scene)
        images.append(image)
        depths.append(np.asarray(depth, dtype=np.float32) / shapes.MM_PER_METRE)
        classes.append(np.asarray(seg, dtype=np.int64) // 10)  # segment id 10 · class + instance -> class
        captions.append(shapes.caption(rng, scene))
        if i % 10 == 9:
            conversations.append(shapes.text_only_qa(rng))
            continue
        qa = shapes.instruction_qa(rng, scene, i)  # one of its questions, with the scene's caption before it
        q, a = next(t for t in qa if ("Select from" in t[0]) == (i % 2 == 1))
        conversations.append([(f"{captions[-1]}\n{q}", a)])
    depth, cls = torch.from_numpy(np.stack(depths)), torch.from_numpy(np.stack(classes))
    return Scenes(images, depth, cls, captions, conversations)


def views(images: list[Image.Image], preprocess) -> torch.Tensor:
    """Every image through an encoder's own preprocessing, kept in half precision. -> (N, 3, S, S)"""
    return torch.stack([preprocess(image) for image in images]).half()


def resize_map(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(N, S, S) per-pixel values -> (N, size, size), nearest: classes stay classes, depths stay depths."""
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(maps.dtype)


# ----------------------------------------------------------------------------- one training loop
on_step = None  # set by a build that shows one progress bar for all its parts: called once per step


def fit(
    modules: list[nn.Module], loss_fn, n: int, steps: int, batch_size: int, lr: float, seed: int, desc: str
) -> list[float]:
    """AdamW (weight decay 0.05) with warmup + cosine over `steps` minibatches of `batch_size` indices drawn
    without replacement from range(n), epoch after epoch; loss_fn(indices) -> scalar. Returns the losses."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    scheduler = warmup_cosine(optimizer, steps)
    g = torch.Generator().manual_seed(seed)
    order, losses = torch.empty(0, dtype=torch.long), []
    for m in modules:
        m.train()
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True, mininterval=2, disable=on_step is not None)
    for _ in bar:
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=g)])
        idx, order = order[:batch_size], order[batch_size:]
        loss = loss_fn(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if on_step is not None:
            on_step()
    for m in modules:
        m.eval()
    return losses


def batched(fn, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """fn over x in chunks, no grad, fp32 inputs, concatenated."""
    with torch.no_grad():
        return torch.cat([fn(x[i : i + batch_size].float()) for i in range(0, len(x), batch_size)])


# ----------------------------------------------------------------------------- contrastive (CLIP)
class BagOfWords(nn.Module):
    """The text tower of the miniature's CLIP: mean of token embeddings, then an MLP to the joint space."""

    def __init__(self, vocab_size: int, width: int, out: int):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, width, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out))

    def forward(self, ids: list[list[int]]) -> torch.Tensor:
        offsets = torch.tensor([0] + [len(x) for x in ids[:-1]]).cumsum(0)
        return self.mlp(self.embed(torch.tensor([t for x in ids for t in x]), offsets))  # (B, out)


def clip_logits(tower: CLIPVision, text: BagOfWords, scale: torch.Tensor, pixels, ids) -> torch.Tensor:
    """Cosine similarities of images and captions times the learned temperature. -> (B, B)"""
    image = F.normalize(tower.image_embeds(pixels.float()), dim=-1)
    caption = F.normalize(text(ids), dim=-1)
    return scale.exp().clamp(max=100) * image @ caption.T


def contrastive(
    tower: CLIPVision,
    pixels: torch.Tensor,
    captions: list[list[int]],
    vocab_size: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str,
) -> tuple[BagOfWords, torch.Tensor, list[float]]:
    """CLIP's objective (Radford et al. 2021): symmetric InfoNCE of image and caption embeddings over the
    batch, learned temperature (init 1/0.07). -> the text tower, the log-temperature, the losses"""
    torch.manual_seed(seed)
    text = BagOfWords(vocab_size, 128, tower.config.projection_dim)
    scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    holder = nn.ParameterList([scale])

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        logits = clip_logits(tower, text, scale, pixels[idx], [captions[i] for i in idx])
        target = torch.arange(len(idx))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    losses = fit([tower, text, holder], loss_fn, len(pixels), steps, batch_size, lr, seed, desc)
    return text, scale, losses


def retrieval_top1(
    tower: CLIPVision, text: BagOfWords, pixels: torch.Tensor, captions: list[list[int]]
) -> float:
    """Image -> caption retrieval among all held-out captions: the share of images whose own caption scores
    highest (chance: 1 / N)."""
    with torch.no_grad():
        logits = clip_logits(tower, text, torch.tensor(0.0), pixels, captions)
    return (logits.argmax(1) == torch.arange(len(pixels))).float().mean().item()


def ridge_r2(train_x, train_y, test_x, test_y, alpha: float = 1.0) -> float:
    """Held-out R² of a ridge regression x -> y (rows are samples; one fit for all outputs)."""
    mx, my = train_x.mean(0), train_y.mean(0)
    a, b = train_x - mx, train_y - my
    w = torch.linalg.solve(a.T @ a + alpha * torch.eye(a.shape[1], dtype=a.dtype), a.T @ b)
    pred = (test_x - mx) @ w + my
    return 1 - ((pred - test_y) ** 2).sum().item() / ((test_y - test_y.mean(0)) ** 2).sum().item()


def what_tokens_carry(tower: CLIPVision, pixels, depth, classes, split: int) -> dict[str, float]:
    """How much of the scene's depth and segment classes a linear read of the base encoder's tokens finds:
    ridge R² from token q's features (+ its position one-hot) to patch q's mean depth / class shares,
    fitted on the first `split` scenes, scored on the rest."""
    tokens = batched(tower.features, pixels).double()  # (N, grid², C)
    n, q, _ = tokens.shape
    grid = math.isqrt(q)
    position = torch.eye(q, dtype=torch.double).expand(n, -1, -1)
    x = torch.cat([tokens, position], -1).flatten(0, 1)
    patch_depth = F.adaptive_avg_pool2d(depth[:, None].double(), grid).flatten(1).reshape(-1, 1)
    onehot = F.one_hot(classes, N_CLASSES).permute(0, 3, 1, 2).double()
    shares = F.adaptive_avg_pool2d(onehot, grid).flatten(2).transpose(1, 2).reshape(-1, N_CLASSES)
    cut = split * q
    return {
        "depth_r2": ridge_r2(x[:cut], patch_depth[:cut], x[cut:], patch_depth[cut:]),
        "seg_r2": ridge_r2(x[:cut], shares[:cut], x[cut:], shares[cut:]),
    }


# ----------------------------------------------------------------------------- the LLM
def lm_sequences(tok: ChatTokenizer, conversations: list[list[tuple[str, str]]]) -> list[list[int]]:
    """Text-only conversations in the chat template -> token ids (the whole sequence is the LM's text)."""
    turns = [
        [{"from": r, "value": v} for q, a in qa for r, v in (("human", q), ("gpt", a))]
        for qa in conversations
    ]
    return [tok.encode_conversation(t, with_image=False)[0] for t in turns]


def lm_loss(llm: LLM, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of right-padded sequences."""
    T = max(map(len, sequences))
    ids = torch.full((len(sequences), T), pad_id)
    mask = torch.zeros(len(sequences), T, dtype=torch.bool)
    for b, s in enumerate(sequences):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = True
    logits = llm(ids, attention_mask=mask).logits[:, :-1]
    target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def language_model(
    llm: LLM, sequences: list[list[int]], pad_id: int, steps: int, batch_size: int, lr: float, seed: int
) -> list[float]:
    """Next-token prediction on the world's text (the LLM's pretraining)."""
    return fit(
        [llm],
        lambda idx: lm_loss(llm, [sequences[i] for i in idx], pad_id),
        len(sequences),
        steps,
        batch_size,
        lr,
        seed,
        "pretrain llm",
    )


def unigram_loss(train: list[list[int]], test: list[list[int]], vocab_size: int) -> float:
    """The NTP loss of a unigram model of the training text (add-one smoothing) on the held-out text."""
    counts = torch.ones(vocab_size)
    for s in train:
        counts += torch.bincount(torch.tensor(s[1:]), minlength=vocab_size)
    logp = (counts / counts.sum()).log()
    return -torch.cat([logp[torch.tensor(s[1:])] for s in test]).mean().item()


# ----------------------------------------------------------------------------- the depth teacher
class DepthHead(nn.Module):
    """Per patch token, its patch's depth at every pixel (metres / 10): a linear read of the target features,
    the miniature's stand-in for Depth Anything's DPT head."""

    def __init__(self, width: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(width, patch * patch)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, _ = tokens.shape
        g, p = math.isqrt(N), self.patch
        x = self.proj(tokens).view(B, g, g, p, p).permute(0, 1, 3, 2, 4)  # (B, g, p, g, p)
        return 10.0 * x.reshape(B, g * p, g * p)  # (B, S, S) metres


def depth_regression(
    encoder: DINOv2,
    features,
    pixels: torch.Tensor,
    depth: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> tuple[DepthHead, list[float]]:
    """Train encoder + head to give each pixel's depth from the image (L1 in metres / 10). `features`:
    the teacher's target function of the encoder, pixels -> (B, N, C), which the head reads."""
    torch.manual_seed(seed)
    head = DepthHead(encoder.config.hidden_size, encoder.config.patch_size)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(head(features(pixels[idx].float())), depth[idx]) / 10.0

    return head, fit([encoder, head], loss_fn, len(pixels), steps, batch_size, lr, seed, "pretrain depth")


def depth_scores(pred: torch.Tensor, depth: torch.Tensor) -> dict[str, float]:
    """RMSE (metres) and δ < 1.25 (the share of pixels within a factor 1.25 of the truth)."""
    pred = pred.clamp(min=0.1)
    ratio = torch.maximum(pred / depth, depth / pred)
    return {
        "rmse": ((pred - depth) ** 2).mean().sqrt().item(),
        "delta1": (ratio < 1.25).float().mean().item(),
    }


# ----------------------------------------------------------------------------- the seg teacher
class SegHead(nn.Module):
    """Per stage-4 token, class logits of its cells² sub-cells: the stand-in for OneFormer's decoder."""

    def __init__(self, width: int, cells: int):
        super().__init__()
        self.cells = cells
        self.proj = nn.Linear(width, cells * cells * N_CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, _ = tokens.shape
        g, c = math.isqrt(N), self.cells
        x = self.proj(tokens).view(B, g, g, c, c, N_CLASSES).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, N_CLASSES, g * c, g * c)  # (B, classes, g·c, g·c)


def segmentation(
    encoder: Swin,
    pixels: torch.Tensor,
    classes: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> tuple[SegHead, list[float]]:
    """Train encoder + head to give each cell's class from the image (cross-entropy); `classes` are at the
    head's resolution (grid · cells)²."""
    torch.manual_seed(seed)
    grid = math.isqrt(encoder(pixels[:1].float()).shape[1])
    head = SegHead(encoder.dim, classes.shape[-1] // grid)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(encoder(pixels[idx].float())), classes[idx])

    return head, fit([encoder, head], loss_fn, len(pixels), steps, batch_size, lr, seed, "pretrain seg")


def seg_scores(pred: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
    """Pixel accuracy and mean IoU over the classes present in prediction or truth."""
    ious = []
    for c in range(N_CLASSES):
        inter = ((pred == c) & (classes == c)).sum().item()
        union = ((pred == c) | (classes == c)).sum().item()
        if union:
            ious.append(inter / union)
    return {"pixel_accuracy": (pred == classes).float().mean().item(), "miou": sum(ious) / len(ious)}
