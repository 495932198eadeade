"""Reliability of pseudo-label annotations by content: does the dataset agree with each annotation?

The divergence (``weakseg.pseudo.divergence``) judges an annotation by its shape, and cannot see an
object's label grown over a compact stretch of background (a boat over its water, a bird over its sky):
the grown region is as compact as the object. This score judges it by what it covers instead. Every
class gets one prototype for the whole dataset: the mean encoder feature over the pixels that a seed
annotation (the confident, cleaned labels) gives the class in all training images. At each location of
an image the classes that compete there (the image's labels, and the background when the dataset has
one) get a softmax over the cosine similarity of the location's feature to their prototypes; an
annotation's consistency is the mean probability of its own class over the pixels it labels. A region
that the rest of the dataset calls background (or another labelled class) scores low wherever the
grown part lies.

The features are those of the per-image prototypes of the CRF unary (``weakseg.pseudo.prototypes``):
an encoder's last stride-8 and stride-16 layers; nothing is trained. Pure functions first, then the
two passes over a store (prototypes, then scores).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from weakseg import store
from weakseg.datasets import IGNORE, DatasetInfo, read_image
from weakseg.nets.model_file import ModelFileError
from weakseg.parallel import progress
from weakseg.pseudo.prototypes import cell_weights, class_feature_sums, encoder_features


def annotation_consistency(
    features: torch.Tensor,
    labels: np.ndarray,
    prototypes: torch.Tensor,
    scored,
    competitors,
    temperature: float,
) -> dict[int, float]:
    """{class: consistency} for each class of ``scored`` that ``labels`` (H, W) labels.

    ``prototypes`` (n_classes, D) unit rows (a zero row for a class without seeds); at each cell of the
    (D, h, w) ``features`` the ``competitors`` get a softmax over ``temperature`` x their cosine
    similarity (clipped at 0). Consistency = mean over the annotation's pixels of its class's
    probability, in [0, 1]. A class that is not among the competitors scores 0.
    """
    if temperature <= 0:
        raise ValueError(f"pseudo.consistency_temperature: expected a positive number, got {temperature}")
    competitors = sorted({int(c) for c in competitors})
    scored = [int(c) for c in scored if int(c) != IGNORE]
    if not scored:
        return {}
    cells = features.reshape(features.shape[0], -1)
    similarity = (prototypes[competitors] @ cells).clamp(min=0)
    probability = torch.softmax(temperature * similarity, dim=0)  # (K, h*w)
    weights = cell_weights(labels, scored, features.shape[-2:])
    result = {}
    for row, c in enumerate(scored):
        total = float(weights[row].sum())
        if total > 0:
            own = probability[competitors.index(c)] if c in competitors else torch.zeros_like(weights[row])
            result[c] = float((weights[row] * own).sum()) / total
    return result


def competing_classes(info: DatasetInfo, image_id: str) -> list[int]:
    """The classes that may label an image's pixels: its labels, and the background if the dataset has
    one (the label rules of ``weakseg.labels``)."""
    classes = {int(c) for c in info.image_labels(image_id).tolist()}
    return sorted(classes | ({0} if info.has_background else set()))


# ----------------------------------------------------------------------------------------------
# Edge: a model file's encoder, two passes over the train images
# ----------------------------------------------------------------------------------------------


def load_feature_encoder(model_path, info: DatasetInfo):
    """The encoder of a CAM model file (``weakseg train-cam``) or of a segmentation model file
    (``weakseg train-seg`` / ``train-joint``), checked against the data store's classes."""
    from weakseg.cam.infer import load_cam_model
    from weakseg.segment.predict import load_segmenter

    try:
        return load_cam_model(model_path, info).encoder.eval()
    except ModelFileError as cam_error:
        try:
            return load_segmenter(model_path, "cpu", info.class_names)[0].encoder.eval()
        except ModelFileError as seg_error:
            raise ModelFileError(
                f"{model_path}: neither a CAM nor a segmentation model file of these classes "
                f"({cam_error}; {seg_error})"
            ) from seg_error


def dataset_consistency(
    info: DatasetInfo, data, encoder, seeds, labels, ids, scored_of, temperature: float
) -> dict[str, dict[int, float]]:
    """{image id: annotation_consistency(...)} for the images ``ids`` of the labels group ``labels``,
    with the prototypes of the seeds group ``seeds`` over the same images. ``scored_of(id)`` gives the
    classes whose annotations an image contributes. The features are computed in each pass rather than
    kept, so memory does not grow with the dataset."""
    sums = None
    for image_id in progress(ids, "consistency: prototypes"):
        features = encoder_features(encoder, read_image(data, image_id))
        part = class_feature_sums(features, store.get(seeds, store.LABELS, image_id), range(info.n_classes))
        sums = part if sums is None else sums + part
    if sums is None:
        return {}
    prototypes = F.normalize(sums, dim=1)
    result = {}
    for image_id in progress(ids, "consistency: annotations"):
        features = encoder_features(encoder, read_image(data, image_id))
        result[image_id] = annotation_consistency(
            features,
            store.get(labels, store.LABELS, image_id),
            prototypes,
            scored_of(image_id),
            competing_classes(info, image_id),
            temperature,
        )
    return result
