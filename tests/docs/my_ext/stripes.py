"""A new dataset: striped images on disk, with semantic segmentation and brightness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mtl.data.base import BadSampleError, FolderDataset, read_png


class Stripes(FolderDataset):
    """``<root>/images/<id>.png`` (RGB), ``semseg/<id>.png`` (0 dark, 1 bright, 255 ignore),
    ``brightness/<id>.png`` (grey level × 255) and ``splits/<split>.txt`` (one id per line)."""

    KEY = "stripes"
    TASKS = ("semseg", "brightness")
    CLASS_NAMES = {"semseg": ("dark", "bright")}
    NUM_CLASSES = {"semseg": 2}
    SPLITS = ("train", "val", "test")
    SPLITS_NOTE = "test is held out: neither training nor the choice of best.ckpt sees it."

    def split_file(self, split: str) -> Path:
        return self.root / "splits" / f"{split}.txt"

    def path(self, kind: str, sample_id: str) -> Path:
        """The file of ``kind`` (``image`` or a task) for one id."""
        folder = "images" if kind == "image" else kind
        return self.root / folder / f"{sample_id}.png"

    def files(self, sample_id: str) -> list[Path]:
        return [self.path(kind, sample_id) for kind in ("image", *self.tasks)]

    def load(self, sample_id: str) -> dict:
        image = read_png(self.path("image", sample_id), sample_id, mode="RGB")
        sample: dict = {"image": image, "meta": {"id": sample_id, "size": image.shape[:2]}}
        for task in self.tasks:
            stored = read_png(self.path(task, sample_id), sample_id)
            if stored.shape != image.shape[:2]:
                raise BadSampleError(sample_id, self.path(task, sample_id), f"size {stored.shape}")
            sample[task] = stored if task == "semseg" else stored.astype(np.float32) / 255.0
        return sample


def write_stripes(root: Path, *, n: dict[str, int], size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    """Writes a small Stripes root with ``n[split]`` random images per split."""
    rng = np.random.default_rng(seed)
    h, w = size
    for folder in ("images", "semseg", "brightness", "splits"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, count in n.items():
        ids = [f"{split}_{i:03d}" for i in range(count)]
        for sid in ids:
            bright = (rng.random(w // 4) > 0.5).repeat(4)[None, :].repeat(h, 0)
            grey = np.where(bright, 0.8, 0.2) + 0.05 * rng.standard_normal((h, w))
            grey8 = (grey.clip(0, 1) * 255).astype(np.uint8)
            Image.fromarray(np.stack([grey8] * 3, axis=-1)).save(root / "images" / f"{sid}.png")
            Image.fromarray(bright.astype(np.uint8)).save(root / "semseg" / f"{sid}.png")
            Image.fromarray(grey8).save(root / "brightness" / f"{sid}.png")
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
