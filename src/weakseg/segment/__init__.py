"""Segmentation rounds: networks trained on pseudo-labels (DeepLab, DecoupledNet) and their prediction."""

from weakseg.segment.models import DecoupledNet, DeepLab, Segmenter, build_segmenter

__all__ = ["DecoupledNet", "DeepLab", "Segmenter", "build_segmenter"]
