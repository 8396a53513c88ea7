"""A stateful promptable predictor over a CT volume, in segment-anything's ``SamPredictor`` style.

``set_volume`` stores the HU volume; each axial slice (or a crop of it) is encoded once and its image
embedding kept in a byte-bounded LRU cache, so that prompts, propagation steps and edit clicks on an
already-encoded slice cost only the mask decoder (~20 ms on 2 CPU cores vs ~0.6 s for the encoder).
A background thread can prefetch embeddings around a slice of interest before the user clicks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .models import LoadedModel, load_model
from .preprocess import SliceTransform, logits_to_slice, model_input, slice_logits_to_model

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 1 << 30  # 1 GiB ~ 256 LiteMedSAM/SAM slice embeddings (256 x 64 x 64 float32 = 4 MiB each)


@dataclass
class Prediction:
    """One decoded mask on a slice.

    Attributes:
        logits: (J, I) float32 mask logits on the full slice (> 0 = lesion).
        iou: the decoder's predicted IoU of this mask.
        slice_index: k of the slice.
    """

    logits: np.ndarray
    iou: float
    slice_index: int

    @property
    def mask(self) -> np.ndarray:
        return self.logits > 0


class EmbeddingCache:
    """Thread-safe LRU cache of image embeddings bounded in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key):
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, tensor) -> None:
        size = tensor.element_size() * tensor.nelement()
        with self._lock:
            if key in self._items:
                self._bytes -= self._size(self._items.pop(key))
            if size > self.max_bytes:
                return
            self._items[key] = tensor
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= self._size(evicted)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @staticmethod
    def _size(tensor) -> int:
        return tensor.element_size() * tensor.nelement()


class EmbeddingStore:
    """Image embeddings kept on disk (float32 ``.pt`` files), so that a volume is encoded once across runs.

    Layout: ``<root>/<model tag>/<volume digest>/k<slice>_<crop>.pt``; the model tag covers the checkpoint file and
    the HU window, the digest the volume's voxels, so a changed model or volume never reads stale embeddings.
    Used by evaluation and training; interactive use keeps only the in-memory cache.
    """

    def __init__(self, root, model_tag: str):
        self.root = Path(root) / model_tag
        self.folder: Path | None = None

    def set_volume(self, volume: np.ndarray) -> None:
        digest = hashlib.sha1(np.ascontiguousarray(volume).tobytes()).hexdigest()[:16]
        self.folder = self.root / f"{volume.shape[0]}x{volume.shape[1]}x{volume.shape[2]}_{digest}"

    def _path(self, key) -> Path:
        slice_index, crop = key
        return self.folder / f"k{slice_index:04d}_{'_'.join(str(v) for v in crop)}.pt"

    def load(self, key):
        import torch

        path = self._path(key)
        return torch.load(str(path), weights_only=True) if path.is_file() else None

    def save(self, key, tensor) -> None:
        import torch

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}.partial")  # an interrupted write leaves no stub
        torch.save(tensor.detach().cpu().clone(), str(partial))
        partial.replace(path)


def model_tag(model: LoadedModel, window_hu) -> str:
    """Identifier of an image encoder + preprocessing, for on-disk embedding caches."""
    source = model.encoder_source or model.checkpoint or model.spec.name
    try:
        stat = os.stat(source)
        stamp = f"{stat.st_size}-{int(stat.st_mtime)}"
    except OSError:
        stamp = "none"
    digest = hashlib.sha1(f"{source}|{stamp}|{window_hu}".encode()).hexdigest()[:10]
    return f"{model.spec.name}_{digest}"


class VolumePredictor:
    """Encode CT slices on demand and decode masks from box / point / mask prompts.

    Args:
        model: a :class:`LoadedModel`, or a registry name / checkpoint path passed to :func:`load_model`.
        cache_bytes: bound of the embedding cache in bytes.
        window_hu: HU window (low, high); defaults to the model's own setting.
        autocast_bf16: run the image encoder under bfloat16 autocast (faster on CPUs with AVX-512 bf16).
        embedding_dir: also keep embeddings on disk there (see :class:`EmbeddingStore`), or None.
        fast: run the exact inference rewrites of :mod:`OncoPilotLib.fastpath` (same masks up to float rounding);
            False runs the model's own modules. The rewrites are built from the model's weights once, here.
    """

    def __init__(self, model: LoadedModel | str = "litemedsam", cache_bytes: int = DEFAULT_CACHE_BYTES,
                 window_hu: tuple[float, float] | None = None, autocast_bf16: bool = False, device=None,
                 embedding_dir=None, fast: bool = True):
        self.model = model if isinstance(model, LoadedModel) else load_model(model, device=device)
        network = self.model.network
        self.image_encoder, self.mask_decoder = network.image_encoder, network.mask_decoder
        if fast:
            from .fastpath import inference_decoder, inference_encoder

            self.image_encoder = inference_encoder(network.image_encoder)
            self.mask_decoder = inference_decoder(network.mask_decoder)
        import torch

        with torch.inference_mode():  # a fixed function of the grid (its Gaussian matrix is a buffer, never trained)
            self._dense_pe = network.prompt_encoder.get_dense_pe()
        self.window_hu = tuple(window_hu) if window_hu is not None else self.model.spec.window_hu
        self.autocast_bf16 = autocast_bf16
        self.cache = EmbeddingCache(cache_bytes)
        self.store = None if embedding_dir is None else EmbeddingStore(
            embedding_dir, model_tag(self.model, self.window_hu) + ("_bf16" if autocast_bf16 else ""))
        self.volume: np.ndarray | None = None
        self.spacing: np.ndarray | None = None
        self._encode_lock = threading.Lock()
        self._prefetch_queue: queue.Queue = queue.Queue()
        self._prefetch_thread: threading.Thread | None = None
        self._prefetch_generation = 0

    # ---- volume -------------------------------------------------------------------------------------------
    def set_volume(self, volume_hu: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
        """Use a (K, J, I) HU volume (axial slices first) with voxel spacing (sx, sy, sz) mm; clears the cache."""
        volume_hu = np.asarray(volume_hu)
        if volume_hu.ndim != 3:
            raise ValueError(f"a 3D (K, J, I) volume is needed, got an array of shape {volume_hu.shape}")
        if min(volume_hu.shape[1:]) < 8:
            raise ValueError(f"slices of {volume_hu.shape[1]} x {volume_hu.shape[2]} pixels are too small to segment")
        self.cancel_prefetch()
        self.volume = volume_hu
        self.spacing = np.asarray(spacing, dtype=float)
        self.cache.clear()
        if self.store is not None:
            self.store.set_volume(volume_hu)

    @property
    def img_size(self) -> int:
        return self.model.spec.img_size

    def transform(self, crop=None) -> SliceTransform:
        self._require_volume()
        return SliceTransform.for_slice(self.volume.shape[1:], self.img_size, crop)

    def _require_volume(self) -> None:
        if self.volume is None:
            raise RuntimeError("no volume set: call set_volume() first")

    def _check_slice(self, slice_index: int) -> int:
        self._require_volume()
        if not 0 <= int(slice_index) < self.volume.shape[0]:
            raise IndexError(f"slice {slice_index} is outside the volume (0..{self.volume.shape[0] - 1})")
        return int(slice_index)

    # ---- encoder ------------------------------------------------------------------------------------------
    def embedding(self, slice_index: int, crop=None):
        """(1, 256, 64, 64) image embedding of a slice (or crop), from the cache or encoded now."""
        slice_index = self._check_slice(slice_index)
        transform = self.transform(crop)
        key = (slice_index, transform.crop)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        with self._encode_lock:  # the prefetch thread may be encoding this very slice
            cached = self.cache.get(key)
            if cached is None and self.store is not None:
                cached = self.store.load(key)
            if cached is None:
                cached = self._encode(slice_index, transform)
                if self.store is not None:
                    self.store.save(key, cached)
            self.cache.put(key, cached)
        return cached

    def is_cached(self, slice_index: int, crop=None) -> bool:
        return (int(slice_index), self.transform(crop).crop) in self.cache

    def _encode(self, slice_index: int, transform: SliceTransform):
        import torch

        spec, device = self.model.spec, self.model.device
        image = model_input(self.volume[slice_index], transform, self.window_hu, spec.pixel_mean, spec.pixel_std)
        autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if self.autocast_bf16
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            features = self.image_encoder(image.to(device))
        return features.float()

    # ---- decoder ------------------------------------------------------------------------------------------
    def predict(self, slice_index: int, box=None, points=None, point_labels=None, mask_logits=None, crop=None,
                multimask_output: bool = False) -> Prediction:
        """Decode a mask on axial slice ``slice_index`` from prompts in slice pixel coordinates.

        Args:
            box: (x0, y0, x1, y1) = (i_min, j_min, i_max, j_max), pixel centres of the box's extreme pixels.
            points: (N, 2) clicks as (i, j); point_labels: (N,) 1 = lesion, 0 = background.
            mask_logits: (J, I) logits of a previous mask on this slice grid (e.g. the neighbouring slice's).
            crop: (x0, y0, x1, y1) half-open region to encode at full model resolution (zoom), or None.
            multimask_output: ask for SAM's 3 candidate masks and return the one with the best predicted IoU.
        Returns:
            :class:`Prediction` with (J, I) logits on the full slice.
        """
        boxes = None if box is None else np.asarray(box, dtype=float).reshape(1, 4)
        return self.predict_batch(slice_index, boxes, points, point_labels, mask_logits, crop, multimask_output)[0]

    def predict_batch(self, slice_index: int, boxes=None, points=None, point_labels=None, mask_logits=None,
                      crop=None, multimask_output: bool = False) -> list[Prediction]:
        """Like :meth:`predict` for B boxes (B, 4) at once, sharing the points and mask prompt.

        One decoder call for the whole batch. The image side of the decoder is per prompt, so a batch of B boxes costs
        about B single decodes (``bench/engine.py``); the batch saves the Python around them.
        """
        import torch

        if boxes is None and points is None and mask_logits is None:
            raise ValueError("predict() needs at least one prompt: box, points or mask_logits")
        slice_index = self._check_slice(slice_index)
        transform = self.transform(crop)
        embedding = self.embedding(slice_index, crop)
        sparse_points, sparse_boxes, dense_masks = self._prompts(transform, boxes, points, point_labels, mask_logits)
        network, device = self.model.network, self.model.device
        with torch.inference_mode():
            sparse, dense = network.prompt_encoder(points=sparse_points, boxes=sparse_boxes, masks=dense_masks)
            low_res, iou = self.mask_decoder(image_embeddings=embedding.to(device), image_pe=self._dense_pe,
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=multimask_output)
        best = torch.argmax(iou, dim=1) if multimask_output else torch.zeros(len(iou), dtype=torch.long)
        return [Prediction(logits_to_slice(low_res[b:b + 1, int(best[b]):int(best[b]) + 1], transform,
                                           self.volume.shape[1:]), float(iou[b, best[b]]), slice_index)
                for b in range(len(iou))]

    def _prompts(self, transform: SliceTransform, boxes, points, point_labels, mask_logits):
        import torch

        device = self.model.device
        batch = 1 if boxes is None else len(boxes)
        sparse_points = sparse_boxes = dense_masks = None
        if boxes is not None:
            # Boxes are clipped to the encoded region: the model never saw coordinates outside its input.
            x0, y0, x1, y1 = transform.crop
            low, high = np.array([x0, y0, x0, y0]), np.array([x1 - 1, y1 - 1, x1 - 1, y1 - 1])
            model_boxes = np.stack([transform.box_to_model(np.clip(b, low, high)) for b in boxes])
            sparse_boxes = torch.as_tensor(model_boxes, dtype=torch.float32, device=device)
        if points is not None:
            points = np.asarray(points, dtype=float).reshape(-1, 2)
            labels = np.ones(len(points)) if point_labels is None else np.asarray(point_labels).reshape(-1)
            if len(labels) != len(points):
                raise ValueError(f"{len(points)} points but {len(labels)} point labels")
            coords = torch.as_tensor(transform.to_model(points), dtype=torch.float32, device=device)[None]
            labels = torch.as_tensor(labels, dtype=torch.int64, device=device)[None]
            sparse_points = (coords.expand(batch, -1, -1), labels.expand(batch, -1))
        if mask_logits is not None:
            low_res = 4 * self.model.network.prompt_encoder.image_embedding_size[0]
            dense_masks = slice_logits_to_model(np.asarray(mask_logits, dtype=np.float32), transform, low_res)
            dense_masks = dense_masks.to(device)  # one mask for every prompt: decoders broadcast its embedding
        return sparse_points, sparse_boxes, dense_masks

    # ---- prefetch -----------------------------------------------------------------------------------------
    def prefetch(self, slice_indices, crop=None) -> None:
        """Encode these slices in a background thread, in the given order; replaces any pending request."""
        self._require_volume()
        self._prefetch_generation += 1
        generation = self._prefetch_generation
        for index in slice_indices:
            if 0 <= int(index) < self.volume.shape[0]:
                self._prefetch_queue.put((generation, int(index), crop))
        self._ensure_prefetch_thread()

    def _ensure_prefetch_thread(self) -> None:
        # One persistent daemon thread: torch keeps per-thread state, so reusing one thread stays fast.
        if self._prefetch_thread is None:
            self._prefetch_thread = threading.Thread(target=self._prefetch_loop, name="oncopilot-prefetch",
                                                     daemon=True)
            self._prefetch_thread.start()

    def prefetch_around(self, slice_index: int, radius: int = 10, crop=None) -> None:
        """Prefetch slices nearest to ``slice_index`` first, up to ``radius`` slices away on each side."""
        order = [slice_index] + [s for d in range(1, radius + 1) for s in (slice_index - d, slice_index + d)]
        self.prefetch(order, crop)

    def cancel_prefetch(self) -> None:
        """Drop pending prefetch work (a slice being encoded finishes first)."""
        self._prefetch_generation += 1

    def wait_prefetch(self, timeout: float | None = None) -> bool:
        """Block until the prefetch queue is drained; returns False on timeout."""
        done = threading.Event()
        self._ensure_prefetch_thread()
        self._prefetch_queue.put(("barrier", done))
        return done.wait(timeout)

    def _prefetch_loop(self) -> None:
        while True:
            item = self._prefetch_queue.get()
            if item[0] == "barrier":
                item[1].set()
                continue
            generation, index, crop = item
            if generation != self._prefetch_generation or self.volume is None:
                continue
            try:
                self.embedding(index, crop)
            except Exception:  # the next predict() on this slice reports the error to the caller
                logger.exception("prefetch of slice %d failed", index)
