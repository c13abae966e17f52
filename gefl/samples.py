"""`gefl samples RUN_DIR`: a picture of what a run's generator learned.

One row per class. An image-level generator (GeFL) shows its generated images; a feature-level
one (GeFL-F) shows its generated FE feature maps on the left and real ones (the run's frozen FE
applied to test images of that class) on the right, on one shared colour scale, so the eye can
judge whether generated features look like real ones. The three feature channels are drawn as
red, green and blue.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from gefl.errors import GeflError
from gefl.generators import IMAGE, generator_spec
from gefl.rounds.rundir import load_generator, load_tier, run_tiers

LABEL_WIDTH = 90
GAP = 12


def _real_per_class(dataset: str, data_dir: str | None, per_class: int, num_classes: int) -> torch.Tensor:
    from gefl.data import load_dataset

    test = load_dataset(dataset, data_dir).test
    picks = [torch.nonzero(test.labels == c).flatten()[:per_class] for c in range(num_classes)]
    if any(len(p) < per_class for p in picks):
        raise GeflError(f"the {dataset} test set has fewer than {per_class} images of some class; lower --per-class")
    return test.images[torch.cat(picks)]


def render_samples(run_dir: str | Path, out: str | Path | None = None, per_class: int = 8, seed: int = 0,
                   data_dir: str | None = None) -> Path:
    """Write the grid PNG (default RUN_DIR/samples.png) and return its path."""
    run_dir = Path(run_dir)
    generator, meta = load_generator(run_dir)
    classes = json.loads(meta.get("classes", "[]")) or [str(c) for c in range(generator.num_classes)]
    num_classes = generator.num_classes
    torch.manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    with torch.no_grad():
        generated = generator.sample(labels)
    if generator_spec(meta["family"]).level == IMAGE:
        panels = [(generated + 1) / 2]  # [-1, 1] -> [0, 1]
    else:
        fe = load_tier(run_dir, run_tiers(run_dir)[0])[0].fe  # every tier holds the same frozen FE
        with torch.no_grad():
            real = fe(_real_per_class(meta["dataset"], data_dir, per_class, num_classes))
        scale = torch.quantile(real.flatten(), 0.99).clamp(min=1e-6)
        panels = [(generated / scale).clamp(0, 1), (real / scale).clamp(0, 1)]
    zoom = max(1, 32 // panels[0].shape[-1])  # 16x16 feature maps drawn at the images' 32x32
    grids = [make_grid(torch.nn.functional.interpolate(p, scale_factor=zoom, mode="nearest"), nrow=per_class,
                       padding=2, pad_value=1.0) for p in panels]
    pictures = [Image.fromarray((g.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for g in grids]
    width = LABEL_WIDTH + sum(p.width for p in pictures) + GAP * (len(pictures) - 1)
    height = pictures[0].height + 16
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = LABEL_WIDTH
    titles = ["generated"] if len(pictures) == 1 else ["generated features", "real features (frozen FE)"]
    for picture, title in zip(pictures, titles):
        canvas.paste(picture, (x, 16))
        draw.text((x + 2, 2), title, fill="black")
        x += picture.width + GAP
    row = (pictures[0].height - 2) / num_classes
    for c, name in enumerate(classes[:num_classes]):
        draw.text((4, 16 + 2 + row * c + row / 2 - 6), name[:14], fill="black")
    path = Path(out) if out is not None else run_dir / "samples.png"
    canvas.save(path)
    return path
