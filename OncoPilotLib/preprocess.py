"""Slice preprocessing for SAM-family models and the exact slice <-> model-input coordinate mapping.

Coordinates on a slice are continuous pixel coordinates ``(x, y) = (i, j)`` with pixel centres at integers.
A slice (or a crop of it) of ``h x w`` pixels is resized so that its longest side becomes the model's input
size (aspect ratio kept; ``round`` for the other side) and padded at the bottom/right. With
``scale = resized / original`` per axis, pixel centres map as ``m = (x - x0 + 0.5) * scale - 0.5``, which is
exactly the sampling of bilinear interpolation with ``align_corners=False``: image, prompts and masks all use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SliceTransform:
    """Mapping between one slice region and the square model input.

    Attributes:
        crop: (x0, y0, x1, y1) half-open pixel box of the slice that is encoded (the whole slice by default).
        img_size: side of the model input.
    """

    crop: tuple[int, int, int, int]
    img_size: int

    @classmethod
    def for_slice(cls, slice_shape: tuple[int, int], img_size: int, crop=None) -> "SliceTransform":
        """Transform for a (J, I) slice, optionally restricted to ``crop`` = (x0, y0, x1, y1) (clipped to the slice)."""
        rows, cols = int(slice_shape[0]), int(slice_shape[1])
        if crop is None:
            return cls((0, 0, cols, rows), img_size)
        x0, y0, x1, y1 = (int(round(v)) for v in crop)
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(cols, x1), min(rows, y1)
        if x1 - x0 < 2 or y1 - y0 < 2:
            raise ValueError(f"crop {tuple(crop)} leaves less than 2 x 2 pixels of a {rows} x {cols} slice")
        return cls((x0, y0, x1, y1), img_size)

    @property
    def crop_shape(self) -> tuple[int, int]:
        """(rows, cols) of the cropped region."""
        return self.crop[3] - self.crop[1], self.crop[2] - self.crop[0]

    @property
    def resized_shape(self) -> tuple[int, int]:
        """(rows, cols) of the region once resized, before padding to img_size x img_size."""
        rows, cols = self.crop_shape
        factor = self.img_size / max(rows, cols)
        return max(1, int(rows * factor + 0.5)), max(1, int(cols * factor + 0.5))

    @property
    def scale_xy(self) -> np.ndarray:
        """Model pixels per slice pixel along x and y (exact, from the integer resized shape)."""
        rows, cols = self.crop_shape
        out_rows, out_cols = self.resized_shape
        return np.array([out_cols / cols, out_rows / rows])

    def to_model(self, xy) -> np.ndarray:
        """(..., 2) slice pixel coordinates -> model-input pixel coordinates."""
        xy = np.asarray(xy, dtype=float)
        return (xy - np.array(self.crop[:2]) + 0.5) * self.scale_xy - 0.5

    def to_slice(self, xy) -> np.ndarray:
        """(..., 2) model-input pixel coordinates -> slice pixel coordinates (inverse of :meth:`to_model`)."""
        xy = np.asarray(xy, dtype=float)
        return (xy + 0.5) / self.scale_xy - 0.5 + np.array(self.crop[:2])

    def box_to_model(self, box) -> np.ndarray:
        """(x0, y0, x1, y1) box on the slice (pixel centres of its extreme pixels) -> model-input box."""
        box = np.asarray(box, dtype=float).reshape(2, 2)
        return self.to_model(box).reshape(4)


def window_to_unit(slice_hu: np.ndarray, window_hu: tuple[float, float]) -> np.ndarray:
    """(J, I) HU -> float32 in [0, 1] after clipping to the HU window (low, high)."""
    low, high = window_hu
    if high <= low:
        raise ValueError(f"HU window must have high > low, got {window_hu}")
    return ((np.clip(slice_hu.astype(np.float32), low, high) - low) / (high - low)).astype(np.float32)


def model_input(slice_hu: np.ndarray, transform: SliceTransform, window_hu, pixel_mean=None, pixel_std=None):
    """(J, I) HU slice -> (1, 3, S, S) float32 torch tensor ready for the image encoder (S = img_size).

    Window to [0, 1]; for SAM-style models scale to [0, 255] and normalise with pixel_mean/std; resize the
    crop bilinearly (longest side S), pad bottom/right with 0 (after normalisation, as SAM does).
    """
    import torch
    import torch.nn.functional as F

    x0, y0, x1, y1 = transform.crop
    image = torch.from_numpy(window_to_unit(slice_hu[y0:y1, x0:x1], window_hu))[None, None]
    image = F.interpolate(image, size=transform.resized_shape, mode="bilinear", align_corners=False,
                          antialias=True).expand(1, 3, -1, -1)
    if pixel_mean is not None:
        mean = torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1)
        image = (image * 255.0 - mean) / std
    rows, cols = transform.resized_shape
    return F.pad(image, (0, transform.img_size - cols, 0, transform.img_size - rows)).contiguous()


def logits_to_slice(low_res_logits, transform: SliceTransform, slice_shape, fill: float = -20.0) -> np.ndarray:
    """(1, 1, h, w) decoder logits (model frame, h = w = S / 4 or S) -> (J, I) float32 logits on the full slice.

    Outside the encoded crop the slice gets ``fill`` (confidently background).
    """
    import torch.nn.functional as F

    size = transform.img_size
    logits = F.interpolate(low_res_logits.float(), size=(size, size), mode="bilinear", align_corners=False)
    rows, cols = transform.resized_shape
    logits = F.interpolate(logits[..., :rows, :cols], size=transform.crop_shape, mode="bilinear",
                           align_corners=False)
    out = np.full(tuple(slice_shape), fill, dtype=np.float32)
    x0, y0, x1, y1 = transform.crop
    out[y0:y1, x0:x1] = logits[0, 0].cpu().numpy()
    return out


def slice_logits_to_model(slice_logits: np.ndarray, transform: SliceTransform, low_res: int,
                          fill: float = -20.0, clip: float = 20.0):
    """(J, I) logits on the slice -> (1, 1, low_res, low_res) mask prompt in the model frame.

    Logits are clipped to +-``clip`` (the range the decoder itself produces) so that a hard 0/1 mask turned
    into +-large values does not saturate the prompt encoder.
    """
    import torch
    import torch.nn.functional as F

    x0, y0, x1, y1 = transform.crop
    crop = torch.from_numpy(np.clip(slice_logits[y0:y1, x0:x1], -clip, clip).astype(np.float32))[None, None]
    resized = F.interpolate(crop, size=transform.resized_shape, mode="bilinear", align_corners=False)
    rows, cols = transform.resized_shape
    padded = F.pad(resized, (0, transform.img_size - cols, 0, transform.img_size - rows), value=fill)
    return F.interpolate(padded, size=(low_res, low_res), mode="bilinear", align_corners=False)
