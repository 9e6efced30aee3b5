"""Datasets for the trainer: scikit-learn digits (the default), CIFAR-10/100 from the python-pickle batches, an
ImageNet-style image folder, and synthetic images for benchmarks; plus device-side augmentation.

In-memory datasets (`ImageData`) hold uint8 images [N, C, H, W] and int64 labels [N] and live on the training device
as a whole (CIFAR-10 is 150 MB as uint8). A batch is gathered, normalised to fp32 ((x/255 − mean)/std per channel)
and augmented on that device with vectorised tensor ops (`augment_batch`), so nothing runs per image on the host.

Determinism (exact resume): the sample order of iteration i is a function of (seed, i) only — epoch e = i // S
(S = N // global_batch, the last partial batch is dropped) uses `randperm(N)` seeded by (seed, e) — and the
augmentation of iteration i draws its crop offsets and flips for the whole global batch from a CPU generator seeded by
(seed, i). A rank of a distributed run takes its slice of the global batch, so any number of ranks sees the same
global batch, augmented identically.

CIFAR pickles are read with `RestrictedUnpickler`, which resolves only the globals a pickled numpy array needs.
"""
from __future__ import annotations

import codecs
import io
import math
import os
import pickle
import tarfile
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

# ---- restricted unpickling ----------------------------------------------------------------------------------------


def _numpy_reconstruct():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray._reconstruct


# The only globals a pickle of numpy ndarrays (of plain dtypes) references, under numpy 1.x and 2.x module names:
# the array reconstructor, the ndarray type it rebuilds and the dtype constructor; plus `_codecs.encode`, with which
# protocol-2 pickles written by Python 3 store bytes (a pure str -> bytes conversion; the original Python-2 CIFAR
# files do not need it).
ALLOWED_GLOBALS: Dict[Tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside `ALLOWED_GLOBALS` (it could run code when loaded)."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only `ALLOWED_GLOBALS` (numpy arrays, dtypes) and refuses every other global.

    Plain containers and scalars (dict, list, str, bytes, int, float) need no global and load as usual. `source`
    names the file in error messages.
    """

    def __init__(self, file, source: str, **kwargs):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refusing to load the global {module}.{name}; a CIFAR batch only needs numpy "
                f"arrays (allowed: {', '.join(f'{m}.{n}' for m, n in ALLOWED_GLOBALS)}). The file is not a CIFAR "
                "batch or has been tampered with") from None


def restricted_load(data: bytes, source: str):
    """Unpickle bytes with `RestrictedUnpickler` (python-2 pickles: str read as bytes, like the CIFAR batches); a file
    that is not a pickle raises ValueError naming `source`."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source, encoding="bytes").load()
    except UnsafePickleError:
        raise
    # what unpickling junk raises, by the junk: a bad opcode, a cut-off file, a bad argument to an allowed global
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            MemoryError, UnicodeDecodeError) as e:
        raise ValueError(f"{source}: not a pickle of a CIFAR batch ({type(e).__name__}: {e})") from None


# ---- in-memory datasets -------------------------------------------------------------------------------------------
@dataclass
class ImageData:
    """uint8 images [N, C, H, W] and int64 labels [N] (on one device), with per-channel normalisation constants in
    the [0, 1] scale."""

    images: Tensor
    labels: Tensor
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images: expected uint8 [N, C, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels: expected shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "ImageData":
        return ImageData(self.images.to(device), self.labels.to(device), self.num_classes, self.mean, self.std)

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 [B, C, H, W] -> fp32 (x/255 − mean)/std per channel."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std


def channel_stats(images: Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of uint8 images [N, C, H, W]."""
    x = images.double() / 255.0
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())


DIGITS_TEST_SIZE = 360


def load_digits(size: int = 8) -> Tuple[ImageData, ImageData]:
    """scikit-learn's 1797 real 8×8 handwritten digits (values 0..16), as 3-channel uint8 images (the grey level
    repeated, scaled by 255/16), resized to size×size (nearest) if size != 8. Fixed split: a permutation seeded by 0,
    the last 360 images are the test set (20%); normalisation constants from the training set."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError("dataset 'digits' needs scikit-learn: pip install 'fastresnet[train]'") from e
    d = sk_load_digits()
    x = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1).repeat(1, 3, 1, 1)
    if size != 8:
        x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="nearest").round().to(torch.uint8)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:-DIGITS_TEST_SIZE], perm[-DIGITS_TEST_SIZE:]
    mean, std = channel_stats(x[tr])
    return ImageData(x[tr], y[tr], 10, mean, std), ImageData(x[te], y[te], 10, mean, std)


# CIFAR per-channel statistics of the training sets as fb.resnet.torch uses them (docs/paper.md §5.3), in [0, 1] units.
CIFAR_MEAN_STD = {
    10: ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    100: ((129.3 / 255, 124.1 / 255, 112.4 / 255), (68.2 / 255, 65.4 / 255, 70.4 / 255)),
}
_CIFAR_LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
         "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels",
          "cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def _read_cifar_files(root: str, num_classes: int) -> Dict[str, Tuple[str, bytes]]:
    """name -> (where it was read: a path, or archive:member, for messages; its bytes) of every batch file, from a
    folder (the extracted archive, or its parent) or the .tar.gz."""
    folder, train, test, _, archive, _ = _CIFAR_LAYOUT[num_classes]
    names = train + test
    if os.path.isfile(root) or os.path.isfile(os.path.join(root, archive)):
        path = root if os.path.isfile(root) else os.path.join(root, archive)
        out = {}
        try:
            with tarfile.open(path, "r:gz") as tar:
                for member in tar.getmembers():
                    base = os.path.basename(member.name)
                    if member.isfile() and base in names:
                        out[base] = (f"{path}:{member.name}", tar.extractfile(member).read())
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"data_dir: cannot read the CIFAR-{num_classes} archive {path}: {e}") from e
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(f"data_dir: the archive {path} lacks {missing}")
        return out
    for d in (os.path.join(root, folder), root):
        if all(os.path.isfile(os.path.join(d, n)) for n in names):
            out = {}
            for n in names:
                with open(os.path.join(d, n), "rb") as f:
                    out[n] = (os.path.join(d, n), f.read())
            return out
    raise FileNotFoundError(
        f"data_dir: no CIFAR-{num_classes} data under {root!r}: expected the folder {folder}/ with {names}, or "
        f"{archive} (get it from {_CIFAR_LAYOUT[num_classes][5]}, or pass --download)")


def _cifar_batch(data: bytes, source: str, label_key: bytes) -> Tuple[np.ndarray, List[int]]:
    batch = restricted_load(data, source)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ValueError(f"{source}: not a CIFAR batch (expected a dict with keys b'data' and {label_key!r})")
    images = batch[b"data"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise ValueError(f"{source}: b'data' must be a uint8 array [N, 3072], got "
                         f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
    raw = batch[label_key]
    labels = np.asarray(raw) if isinstance(raw, (list, np.ndarray)) else None
    if labels is None or labels.dtype.kind not in "iu" or labels.shape != (images.shape[0],):
        shown = type(raw).__name__ if labels is None else f"{type(raw).__name__} of {labels.dtype} {labels.shape}"
        raise ValueError(f"{source}: {label_key!r} must be a list of {images.shape[0]} integer labels, got {shown}")
    return images, labels.tolist()


def load_cifar(root: str, num_classes: int = 10, download: bool = False) -> Tuple[ImageData, ImageData]:
    """CIFAR-10 or CIFAR-100 (fine labels) from the python-pickle batches: a folder holding `cifar-10-batches-py/`
    (or `cifar-100-python/`), that folder itself, or the .tar.gz. `download`: fetch the archive into root first if it
    is missing (needs a network; never used by the tests)."""
    if num_classes not in _CIFAR_LAYOUT:
        raise ValueError(f"num_classes: CIFAR has 10 or 100 classes, got {num_classes}")
    folder, train, test, label_key, archive, url = _CIFAR_LAYOUT[num_classes]
    if download and not os.path.exists(os.path.join(root, folder)) and not os.path.isfile(
            os.path.join(root, archive)) and not os.path.isfile(root):
        import shutil
        import urllib.request

        from fastresnet.checkpoint import atomic_write
        os.makedirs(root, exist_ok=True)
        # whole or not at all: an interrupted download leaves no truncated archive, two at once do not collide
        with atomic_write(os.path.join(root, archive), "wb") as f, urllib.request.urlopen(url) as response:
            shutil.copyfileobj(response, f)
    files = _read_cifar_files(root, num_classes)

    def split(names: Sequence[str]) -> Tuple[Tensor, Tensor]:
        parts = [_cifar_batch(files[n][1], files[n][0], label_key) for n in names]
        x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.asarray([label for p in parts for label in p[1]], dtype=np.int64)
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"data_dir: CIFAR-{num_classes} labels out of range [0, {num_classes})")
        return torch.from_numpy(x), torch.from_numpy(y)

    mean, std = CIFAR_MEAN_STD[num_classes]
    (xtr, ytr), (xte, yte) = split(train), split(test)
    return ImageData(xtr, ytr, num_classes, mean, std), ImageData(xte, yte, num_classes, mean, std)


def synthetic(n: int, num_classes: int, size: int, channels: int = 3, seed: int = 0) -> ImageData:
    """Random uint8 images and labels (for benchmarks and smoke tests; nothing to learn)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return ImageData(x, y, num_classes, (0.5,) * channels, (0.25,) * channels)


# ---- sampling and augmentation ------------------------------------------------------------------------------------
def _mix(seed: int, i: int) -> int:
    """A generator seed for (run seed, counter) that differs for every pair with counter < 2^32."""
    return (seed * 0x9E3779B1 + i) % (2 ** 63)


class IterationSampler:
    """The global batch of every iteration, as a pure function of (seed, iteration) (module docstring).

    `indices(i)` -> int64 [global_batch] dataset indices on the CPU; `rank_slice` selects this rank's part.
    """

    def __init__(self, n: int, global_batch: int, seed: int, world_size: int = 1, rank: int = 0):
        if global_batch > n:
            raise ValueError(f"batch_size: {global_batch} exceeds the {n} training images")
        if global_batch % world_size:
            raise ValueError(f"batch_size: the global batch {global_batch} must divide by the {world_size} ranks")
        self.n, self.batch, self.seed, self.world, self.rank = n, global_batch, seed, world_size, rank
        self.steps_per_epoch = n // global_batch
        self._epoch, self._perm = -1, None

    def epoch_of(self, i: int) -> float:
        return i / self.steps_per_epoch

    def indices(self, i: int) -> Tensor:
        epoch, pos = divmod(i, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(self.seed, epoch)))
            self._epoch = epoch
        return self._perm[pos * self.batch:(pos + 1) * self.batch]

    def rank_slice(self) -> slice:
        per = self.batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


@dataclass
class AugmentParams:
    """Per-image crop offsets (int64 [B, 2], rows then columns, in [0, 2·pad]) and flips (bool [B])."""

    offsets: Tensor
    flips: Tensor

    def __getitem__(self, s: slice) -> "AugmentParams":
        return AugmentParams(self.offsets[s], self.flips[s])


def draw_augment(batch: int, pad: int, flip: bool, seed: int, i: int) -> AugmentParams:
    """Augmentation parameters of iteration i for the whole global batch, from a CPU generator seeded by (seed, i)."""
    g = torch.Generator().manual_seed(_mix(seed, i) ^ 0x5DEECE66D)
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=g)
    flips = torch.rand(batch, generator=g) < 0.5 if flip else torch.zeros(batch, dtype=torch.bool)
    return AugmentParams(offsets, flips)


def augment_batch(x: Tensor, pad: int, params: AugmentParams) -> Tensor:
    """Random translation + horizontal flip of a normalised batch x [B, C, H, W] on x's device, vectorised.

    Zero-pads `pad` pixels on each side (zero = the mean pixel after normalisation, as fb.resnet.torch pads), takes
    the H×W crop at `params.offsets`, then mirrors the images whose `params.flips` is set ([1]'s CIFAR
    augmentation with pad = 4). Returns a new contiguous tensor of x's shape and dtype.
    """
    b, c, h, w = x.shape
    if params.offsets.shape != (b, 2):
        raise ValueError(f"params: expected offsets for {b} images, got {tuple(params.offsets.shape)}")
    dev = x.device
    offsets, flips = params.offsets.to(dev, non_blocking=True), params.flips.to(dev, non_blocking=True)
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        rows = offsets[:, 0:1] + torch.arange(h, device=dev)                   # [B, H]
        cols = offsets[:, 1:2] + torch.arange(w, device=dev)                   # [B, W]
    else:
        padded = x
        rows = torch.arange(h, device=dev).expand(b, h)
        cols = torch.arange(w, device=dev).expand(b, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols)                     # a mirrored crop reads columns backwards
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


# ---- ImageNet-style image folder ----------------------------------------------------------------------------------
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image> (JPEG/PNG), read with PIL. Training: random-resized-crop (scale 0.08–1, aspect 3/4–4/3)
    to `size` and a horizontal flip, drawn from a generator seeded by (seed, iteration, position) so resume is exact;
    evaluation: resize the shorter side to size·8/7 and centre-crop `size`. Items: (uint8 [3, size, size], label)."""

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

    def __init__(self, root: str, size: int, train: bool, seed: int = 0):
        try:
            import PIL.Image  # noqa: F401
        except ImportError as e:
            raise ImportError("dataset 'imagenet' (an image folder) needs Pillow: pip install pillow") from e
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data_dir: expected an image folder root/<class>/<image>, {root!r} is missing")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.samples = [(os.path.join(root, c, f), k) for k, c in enumerate(self.classes)
                        for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(self.EXTENSIONS)]
        if not self.samples:
            raise FileNotFoundError(f"data_dir: no images under {root!r}")
        self.size, self.train, self.seed = size, train, seed

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, key: int = 0) -> Tuple[Tensor, int]:
        """Image `index`, augmented with the draw keyed by `key` (iteration·2^20 + position) when training."""
        import PIL.Image
        path, label = self.samples[index]
        with PIL.Image.open(path) as im:
            im = im.convert("RGB")
            if self.train:
                g = torch.Generator().manual_seed(_mix(self.seed, key))
                im = self._random_resized_crop(im, g)
                if torch.rand(1, generator=g).item() < 0.5:
                    im = im.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
            else:
                short = round(self.size * 8 / 7)
                w, h = im.size
                scale = short / min(w, h)
                im = im.resize((max(short, round(w * scale)), max(short, round(h * scale))), PIL.Image.BILINEAR)
                w, h = im.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                im = im.crop((left, top, left + self.size, top + self.size))
            arr = np.asarray(im, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), label

    def _random_resized_crop(self, im, g: torch.Generator):
        import PIL.Image
        w, h = im.size
        for _ in range(10):
            area = w * h * (0.08 + 0.92 * torch.rand(1, generator=g).item())
            logr = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(1, generator=g).item()
            cw, ch = round(math.sqrt(area * math.exp(logr))), round(math.sqrt(area / math.exp(logr)))
            if 0 < cw <= w and 0 < ch <= h:
                left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
                top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
                return im.resize((self.size, self.size), PIL.Image.BILINEAR, box=(left, top, left + cw, top + ch))
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        return im.resize((self.size, self.size), PIL.Image.BILINEAR, box=box)

    def __getitem__(self, item) -> Tuple[Tensor, int]:
        index, key = item if isinstance(item, tuple) else (item, 0)
        return self.load(index, key)


def collate_uint8(items) -> Tuple[Tensor, Tensor]:
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)
