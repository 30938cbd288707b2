"""Pictures of what the PT embedding predictors learned (Fig. 6): for one image, the predictors' outputs at
every supervised layer beside the teachers' targets, as PCA colour maps fitted jointly on both."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

import shapes
from chat import ChatTokenizer
from inference import image_pixels, prompt_ids
from losses import cosine
from ola import OLAVLM
from teachers import TargetEncoders


@torch.no_grad()
def predicted_features(
    model: OLAVLM,
    tok: ChatTokenizer,
    teachers: TargetEncoders,
    image: str | Path,
    prompt: str = shapes.PT_PROMPTS[0],
) -> tuple[Image.Image, dict]:
    """PT predictors' outputs at every supervised layer and the teachers' targets for one image
    (PT's center-crop view) -> (square image, {(task, layer): (pred (N, C), target (N, C))})."""
    if model.predictors is None:
        raise ValueError(
            "this checkpoint has no embedding predictors: pass a PT checkpoint (e.g. runs/tiny/pt/final)"
        )
    square, pixels = image_pixels(image, model.vision, view="crop")
    device = model.projector[0].weight.device
    targets = teachers({t: x[None].to(device) for t, x in teachers.preprocess(square).items()})
    ids = torch.tensor([prompt_ids(tok, prompt)], device=device)
    out = model(
        ids,
        torch.ones_like(ids, dtype=torch.bool),
        images=pixels[None].to(device),
        has_image=torch.tensor([True], device=device),
        targets=targets,
    )
    return square, {
        (t, layer): (p[0].float(), targets[t][0].float()) for (t, layer), p in out.predictions.items()
    }


def pca_rgb(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) x 2 -> two (h, w, 3) images in [0, 1]: the top-3 principal components of the
    prediction and target tokens, fitted jointly so both use the same colours."""
    x = torch.cat([pred, target])
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # v: (min(2N, C), C)
    y = x @ v[:3].T  # (2N, 3)
    lo, hi = y.quantile(0.01, dim=0), y.quantile(0.99, dim=0)
    y = ((y - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1)
    side = math.isqrt(len(pred))
    return y[: len(pred)].view(side, side, -1), y[len(pred) :].view(side, side, -1)


def show(square: Image.Image, features: dict, path: Path) -> None:
    """One row per spatial task: the input, then per supervised layer the PCA of the prediction
    beside the target's (Fig. 6), titled with their cosine similarity."""
    from matplotlib.figure import Figure

    tasks = [t for t in ("depth", "seg") if any(k[0] == t for k in features)]
    layers = {t: sorted(layer for task, layer in features if task == t) for t in tasks}
    ncols = 1 + 2 * max(map(len, layers.values()))
    fig = Figure(figsize=(2.2 * ncols, 2.4 * len(tasks)))
    axes = fig.subplots(len(tasks), ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, t in zip(axes, tasks):
        row[0].imshow(square)
        row[0].set_title(f"input ({t})", fontsize=9)
        for k, layer in enumerate(layers[t]):
            pred, target = features[(t, layer)]
            cos = cosine(pred[None], target[None]).item()
            for ax, img, name in zip(
                row[1 + 2 * k : 3 + 2 * k], pca_rgb(pred, target), ("predicted", "target")
            ):
                ax.imshow(img.numpy(), interpolation="nearest")
                ax.set_title(
                    f"{t} L{layer} {name}" + (f"\ncos {cos:.2f}" if name == "predicted" else "\n"), fontsize=9
                )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
