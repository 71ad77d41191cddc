"""The low-res (384) and high-res (1024) views the model really receives.

Rebuilt from the exact tensors the processor produced, undoing its normalisation with its own
mean/std and rescale factor. No resizing of our own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Normalisation:
    """How the processor turned 0–255 pixels into model inputs: (x * rescale - mean) / std."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=torch.float32, device=like.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=like.device).view(3, 1, 1)
        return mean, std

    def to_image(self, tensor: torch.Tensor) -> Image.Image:
        """A (3, H, W) normalised tensor → the RGB image it encodes."""
        tensor = tensor.detach().float()
        mean, std = self._stats(tensor)
        pixels = ((tensor * std + mean) / self.rescale).round().clamp(0, 255).to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy(), mode="RGB")

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """An RGB image → the normalised (3, H, W) tensor (the inverse of to_image)."""
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
        mean, std = self._stats(pixels)
        return (pixels * self.rescale - mean) / std


def normalisations(processor: Any) -> tuple[Normalisation, Normalisation | None]:
    """The processor's own (low-res, high-res) normalisations; high-res is None for the 1.3B family."""
    ip = processor.image_processor
    low = Normalisation(tuple(ip.image_mean), tuple(ip.image_std), float(ip.rescale_factor))
    high_mean = getattr(ip, "high_res_image_mean", None)
    high = None
    if high_mean is not None:
        high = Normalisation(tuple(high_mean), tuple(ip.high_res_image_std), float(ip.rescale_factor))
    return low, high


@dataclass(frozen=True)
class ImageView:
    """One conversation image as the model sees it."""

    number: int  # 1-based, in prompt order across the conversation
    name: str
    original_size: tuple[int, int]
    low_res: Image.Image
    high_res: Image.Image | None

    @property
    def caption(self) -> str:
        w, h = self.original_size
        return f"Image {self.number} · {self.name} · {w}×{h}"


def image_views(
    processor: Any, inputs: Any, names: Sequence[str], sizes: Sequence[tuple[int, int]], first_number: int = 1
) -> list[ImageView]:
    """Views of every image in `inputs` (the processor's output), in prompt order."""
    if "pixel_values" not in inputs:
        return []
    low_norm, high_norm = normalisations(processor)
    low = inputs["pixel_values"]
    high = inputs.get("high_res_pixel_values") if high_norm is not None else None
    views = []
    for i in range(low.shape[0]):
        views.append(
            ImageView(
                number=first_number + i,
                name=names[i] if i < len(names) else f"image {i + 1}",
                original_size=tuple(sizes[i]) if i < len(sizes) else (0, 0),
                low_res=low_norm.to_image(low[i]),
                high_res=high_norm.to_image(high[i]) if high is not None else None,
            )
        )
    return views
