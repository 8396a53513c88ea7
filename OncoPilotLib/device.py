"""Choosing the torch device and CPU thread count."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def available_devices() -> list[str]:
    """Devices usable here, best first: cuda, mps, cpu."""
    import torch

    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices + ["cpu"]


def select_device(preferred: str | None = None):
    """The torch device to use: ``preferred`` ('cuda', 'cuda:1', 'mps', 'cpu') if usable, else the best available.

    An unusable explicit choice falls back to the best available device with a warning rather than failing,
    so a scene or script saved on a GPU workstation still opens on a laptop.
    """
    import torch

    available = available_devices()
    if preferred in (None, "", "auto"):
        return torch.device(available[0])
    if preferred.split(":")[0] in available:
        return torch.device(preferred)
    logger.warning("device %r is not available here; using %s (available: %s)", preferred, available[0],
                   ", ".join(available))
    return torch.device(available[0])


def set_cpu_threads(threads: int | None) -> None:
    """Limit torch's intra-op CPU threads (None leaves torch's default)."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"CPU thread count must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
