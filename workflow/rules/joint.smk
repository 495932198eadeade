# One-stage training (joint.enabled): the joint network's segmentation head is round 0. Its model
# file is a segmentation model, so round 0's prediction, cleaning, CRF, reliability and evaluation
# are the rounds' own rules (rounds.smk), and round 1 trains on round 0's annotation.


ruleorder: train_joint > train_seg


rule train_joint:
    input:
        data=P(RUN.data),
        sp=P(RUN.superpixels),
    output:
        P(RUN.round_model(0)),
    log:
        log_for("train_joint"),
    benchmark:
        bench_for("train_joint")
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **gpu_resources(),
    params:
        cfg=cfg_for("train-joint"),
        out_dir=lambda w, output: P(Path(output[0]).parent),
    shell:
        # Checkpoints live in round0/checkpoints/ (not an output), so a rerun after a kill resumes.
        "weakseg train-joint --config {params.cfg:q} --data {input.data} --superpixels {input.sp}"
        " --out-dir {params.out_dir} --threads {threads} --gpus {resources.gpu} 2> {log}"
