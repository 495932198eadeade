"""One-stage training (issue 17): one encoder, a classification head and a segmentation head, the
segmentation head supervised by labels mined online from the classification branch's own CAMs.

* ``mining``: the pure cores that turn a batch's CAMs into pixel labels: the cosine-annealed
  threshold and PAR (``annealed``), the CRF ∩ confident-CAM reliable regions (``rrm``).
* ``losses``: the dense energy loss on the pixels the mined labels leave out.
* ``model``: the joint network, a segmenter like the rounds' networks (``weakseg predict`` takes it).
* ``train``: the edge: batches, the CRF worker pool, the shared training loop, the model file.
"""

from weakseg.commands import DATA, OUT_DIR, SUPERPIXELS, THREADS, Command

COMMANDS = (
    Command(
        "train-joint",
        "one-stage training (joint.method annealed or rrm): a CAM head and a segmentation head on labels "
        "mined online from its CAMs; writes a round-0 segmentation model (resumes)",
        "weakseg.joint.train:run_train_joint",
        (THREADS, DATA, SUPERPIXELS, OUT_DIR),
        sections=("dataset", "cam", "joint", "pseudo", "superpixels", "device", "segment[model]"),
        writes=("out_dir",),
        network=True,
    ),
)
