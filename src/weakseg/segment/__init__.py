"""Segmentation rounds: networks trained on pseudo-labels (DeepLab, DecoupledNet) and their prediction.

This module stays light (no torch): it declares the package's commands, whose stage functions are
imported only when a command runs.
"""

from weakseg.commands import (
    DATA,
    OUT_DIR,
    SHARD,
    SPLIT_REQUIRED,
    THREADS,
    Command,
    non_negative,
    option,
    optional,
    output,
    required,
)

COMMANDS = (
    Command(
        "train-seg",
        "train a segmentation net on selected pseudo-labels (resumes)",
        "weakseg.segment.train:run_train_seg",
        (
            THREADS,
            DATA,
            required("--labels", "labels_path", "labels store of the annotations to train on"),
            required("--selection", "selection_csv", "reliability CSV with image_selected"),
            optional(
                "--init", "init_model", "model.pt whose weights replace ImageNet's (segment.warm_start)"
            ),
            option(
                "--init-lr-mult",
                dest="init_lr_mult",
                type=float,
                default=1.0,
                help="a run that starts from --init trains at segment.lr x this (segment.warm_start_lr_mult)",
            ),
            optional(
                "--init-encoder",
                "init_encoder",
                "CAM model.pt whose encoder replaces ImageNet's; the heads start fresh (segment.init: cam)",
            ),
            OUT_DIR,
        ),
        sections=("dataset", "device", "segment[model]"),
        writes=("out_dir",),
        network=True,
    ),
    # Writes where its user says, outside any run: no run lock.
    Command(
        "predict",
        "segment new images with a trained model (palette PNG per image)",
        "weakseg.segment.predict:predict_files",
        (
            required("--model", "model_path", "model.pt of a segmentation round"),
            option("inputs", nargs="+", help="image files or folders"),
            output("out_dir", "output folder"),
            option("--probabilities", action="store_true", help="also write <id>.npy class probabilities"),
            option(
                "--prior-adjustment",
                type=non_negative,
                metavar="TAU",
                help="divide the training labels' class prior out, p(c|x) / prior(c)^TAU "
                "(default: the segment.prior_adjustment the model was trained with)",
            ),
            option("--device", choices=["auto", "cpu", "cuda"], default="auto"),
            option(
                "--overlay",
                action="store_true",
                help="also write <id>_overlay.png (the image under its label colours) and legend.png "
                "(colour and name of each class found)",
            ),
            option(
                "--overwrite", action="store_true", help="replace output files that exist (default: refuse)"
            ),
            option(
                "--strict",
                action="store_true",
                help="stop at the first unreadable image (default: skip it with one line, go on, exit 3)",
            ),
        ),
        call="weakseg.segment.predict:predict_and_say",
    ),
    Command(
        "predict-seg",
        "segmentation-net class probabilities for a split (scores store)",
        "weakseg.segment.predict:run_predict_store",
        (
            *SHARD,
            THREADS,
            DATA,
            required(
                "--model", "model_path", "round<r>/model.pt written by train-seg (round 0: train-joint)"
            ),
            SPLIT_REQUIRED,
            output("out_path", "output scores store (key seg)"),
        ),
        sections=("dataset", "device", "segment[prediction]"),
        writes=("out_path",),
        network=True,
    ),
)
