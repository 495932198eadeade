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

from weakseg import store
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


def compute_superpixels(image: np.ndarray, method: str = "slic", n_segments: int = 200, compactness: float = 10.0,
                        iterations: int = 10, felzenszwalb_sigma: float = 0.8) -> np.ndarray:
    """Superpixel label map (H, W) int32, labels 0..n-1, every pixel covered."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if method in ("slic", "slico"):
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
        region = max(2, int(round(math.sqrt(h * w / n_segments))))
        algo = cv2.ximgproc.SLIC if method == "slic" else cv2.ximgproc.SLICO
        sp = cv2.ximgproc.createSuperpixelSLIC(lab, algorithm=algo, region_size=region, ruler=float(compactness))
        sp.iterate(iterations)
        sp.enforceLabelConnectivity(25)
        labels = sp.getLabels()
    elif method == "seeds":
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        sp = cv2.ximgproc.createSuperpixelSEEDS(w, h, 3, n_segments, num_levels=4, prior=2, histogram_bins=5)
        sp.iterate(hsv, iterations)
        labels = sp.getLabels()
    elif method == "felzenszwalb":
        labels = _felzenszwalb(image, n_segments, felzenszwalb_sigma)
    elif method == "skimage_slic":
        from skimage.segmentation import slic

        labels = slic(image, n_segments=n_segments, compactness=compactness, max_num_iter=iterations, start_label=0)
    else:
        raise ValueError(f"superpixels.method: unknown method {method!r} (choose from {', '.join(METHODS)})")
    return relabel_consecutive(labels)


def _one_image(args, params: dict):
    data_path, image_id = args
    cv2.setNumThreads(1)  # parallelism is across images
    _, group = open_data(data_path)
    return image_id, compute_superpixels(read_image(group, image_id), **params)


def run_superpixels(config: dict, data_path, out_path, threads: int = 1, shard: int = 0, n_shards: int = 1) -> int:
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
        out.attrs["mean_count"] = float(np.mean(counts)) if counts else 0.0
    log.info("superpixels: %d images, %.1f superpixels per image on average (%s, requested %d)",
             len(ids), np.mean(counts) if counts else 0, params["method"], params["n_segments"])
    return len(ids)
