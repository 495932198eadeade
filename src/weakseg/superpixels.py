"""Superpixels per image: OpenCV ximgproc SLIC / SLICO / SEEDS, scikit-image Felzenszwalb / SLIC.

Pure core: ``compute_superpixels(image, ...) -> int32 (H, W)`` with labels 0..n-1 (consecutive).
Edge: ``run_superpixels`` maps it over a data store's images on the rule's threads.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import cv2
import numpy as np

from weakseg import store, timing
from weakseg.commands import DATA, SHARD, THREADS, Command, output
from weakseg.config import ConfigError
from weakseg.datasets import open_data, read_image
from weakseg.parallel import map_images

log = logging.getLogger("weakseg")
METHODS = ("slic", "slico", "seeds", "felzenszwalb", "skimage_slic")


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int32)


def _felzenszwalb(image: np.ndarray, n_segments: int, sigma: float) -> np.ndarray:
    """Felzenszwalb has no target count: bisect its scale (log space) until the count is near n."""
    from skimage.segmentation import felzenszwalb

    min_size = max(4, int(image.shape[0] * image.shape[1] / n_segments / 4))
    lo, hi = math.log(1.0), math.log(2000.0)
    best = None
    for _ in range(8):
        scale = math.exp((lo + hi) / 2)
        labels = felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size)
        n = labels.max() + 1
        if best is None or abs(n - n_segments) < abs(best.max() + 1 - n_segments):
            best = labels
        if abs(n - n_segments) <= 0.1 * n_segments:
            break
        lo, hi = (math.log(scale), hi) if n > n_segments else (lo, math.log(scale))
    return best


def _ximgproc():
    """OpenCV's contrib module of SLIC, SLICO and SEEDS. A plain opencv-python wheel installed beside the
    contrib one shadows it, and its absence would otherwise surface as an AttributeError mid-stage."""
    if not hasattr(cv2, "ximgproc"):
        raise ConfigError(
            f"superpixels.method: slic, slico and seeds need OpenCV's contrib module ximgproc, which this cv2 "
            f"({cv2.__version__}, {cv2.__file__}) lacks: install opencv-contrib-python-headless (without "
            "opencv-python or opencv-python-headless beside it), or choose felzenszwalb or skimage_slic"
        )
    return cv2.ximgproc


def _seeds_near(width: int, height: int, n_segments: int):
    """A SEEDS object whose block grid is closest to ``n_segments``.

    OpenCV rounds the finest block size up and halves the grid per level, so with 4 levels a
    request can yield a third of it (150 on 128x96 gives 48; 1000 on 320x213 gives 260). Creating
    the object only sizes the grid (no image work), so try a few requests and level counts.
    """
    ximgproc = _ximgproc()
    candidates = (
        ximgproc.createSuperpixelSEEDS(
            width, height, 3, int(round(n_segments * factor)), num_levels=levels, prior=2, histogram_bins=5
        )
        for factor in (1.0, 1.25, 1.5, 2.0)
        for levels in (4, 3, 2)
    )
    return min(candidates, key=lambda sp: abs(sp.getNumberOfSuperpixels() - n_segments))


def compute_superpixels(
    image: np.ndarray,
    method: str = "slic",
    n_segments: int = 200,
    compactness: float = 10.0,
    iterations: int = 10,
    felzenszwalb_sigma: float = 0.8,
    smoothing_sigma: float = 1.0,
) -> np.ndarray:
    """Superpixel label map (H, W) int32, labels 0..n-1, every pixel covered."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if method in ("slic", "slico", "skimage_slic") and smoothing_sigma > 0:
        # SLIC's connectivity step merges the fragments that fine texture (checks, stripes) cuts its
        # clusters into; unsmoothed, a textured image can keep a tenth of the superpixels asked for.
        image = cv2.GaussianBlur(image, (0, 0), smoothing_sigma)
    if method in ("slic", "slico"):
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
        region = max(2, int(round(math.sqrt(h * w / n_segments))))
        ximgproc = _ximgproc()
        algo = ximgproc.SLIC if method == "slic" else ximgproc.SLICO
        sp = ximgproc.createSuperpixelSLIC(lab, algorithm=algo, region_size=region, ruler=float(compactness))
        sp.iterate(iterations)
        sp.enforceLabelConnectivity(25)
        labels = sp.getLabels()
    elif method == "seeds":
        sp = _seeds_near(w, h, n_segments)
        sp.iterate(cv2.cvtColor(image, cv2.COLOR_RGB2HSV), iterations)
        labels = sp.getLabels()
    elif method == "felzenszwalb":
        labels = _felzenszwalb(image, n_segments, felzenszwalb_sigma)
    elif method == "skimage_slic":
        from skimage.segmentation import slic

        labels = slic(
            image, n_segments=n_segments, compactness=compactness, max_num_iter=iterations, start_label=0
        )
    else:
        raise ValueError(f"superpixels.method: unknown method {method!r} (choose from {', '.join(METHODS)})")
    return relabel_consecutive(labels)


def _one_image(args, params: dict):
    data_path, image_id = args
    cv2.setNumThreads(1)  # parallelism is across images
    _, group = open_data(data_path)
    image = read_image(group, image_id)
    with timing.kernel("superpixels"):
        return image_id, compute_superpixels(image, **params)


def run_superpixels(
    config: dict, data_path, out_path, threads: int = 1, shard: int = 0, n_shards: int = 1
) -> int:
    """Compute superpixels of every image in the data store (all splits) into ``out_path``."""
    info, _ = open_data(data_path)
    ids = store.shard_ids(list(info.ids), shard, n_shards)
    params = dict(config["superpixels"])
    fn = partial(_one_image, params=params)
    counts = []
    with store.writing(out_path, "superpixels", store.provenance("superpixels", params)) as out:
        for image_id, labels in map_images(fn, [(str(data_path), i) for i in ids], threads, "superpixels"):
            store.put(out, store.SUPERPIXELS, image_id, labels)
            counts.append(int(labels.max()) + 1)
    log.info(
        "superpixels: %d images, %.1f superpixels per image on average (%s, requested %d)",
        len(ids),
        np.mean(counts) if counts else 0,
        params["method"],
        params["n_segments"],
    )
    timing.log_kernel_seconds()
    return len(ids)


COMMAND = Command(
    "superpixels",
    "compute superpixels of every image",
    run_superpixels,
    (
        THREADS,
        *SHARD,
        DATA,
        output("out_path", "output superpixels store (.zarr)"),
    ),
    sections=("superpixels",),
    writes=("out_path",),
)
