"""Pixel pseudo-labels from class score maps: cleaning, dense CRF, RRM reliable regions, and the
divergence-based reliability selection.

Each stage module has a pure core (arrays in, a uint8 (H, W) label map out, 255 = ignore), a thin
``run_<stage>`` edge and its command. The edges share the job engine of ``pseudo.jobs``.
"""
