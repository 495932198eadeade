"""Class activation maps: the CAM generators (CAM, the Superpixel Pooling Network, SEAM, the dual-branch
network), their training on image labels and their multi-scale inference.

This module stays light (no torch): it names the generators and declares the package's commands, whose
stage functions are imported only when a command runs.
"""

from weakseg.commands import DATA, OUT_DIR, SHARD, SUPERPIXELS, THREADS, Command, output, required

MODELS = ("cam", "spn", "seam", "dual")  # cam.model: the CAM generators

COMMANDS = (
    Command(
        "train-cam",
        "train the CAM generator (cam.model: spn, cam, seam or dual) on image-level labels (resumes)",
        "weakseg.cam.train:run_train_cam",
        (THREADS, DATA, SUPERPIXELS, OUT_DIR),
        sections=("dataset", "cam", "superpixels", "device"),
        writes=("out_dir",),
        network=True,
    ),
    Command(
        "infer-cam",
        "multi-scale CAM and SP-CAM score maps for every image",
        "weakseg.cam.infer:run_infer_cam",
        (
            THREADS,
            *SHARD,
            DATA,
            SUPERPIXELS,
            required("--model", "model_path", "cam/model.pt written by train-cam"),
            output("out_path", "output scores store (keys cam, spcam)"),
        ),
        sections=("dataset", "cam", "device"),
        writes=("out_path",),
        network=True,
    ),
)
