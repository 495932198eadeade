# CAM / SPN training on image-level labels, multi-scale CAM + SP-CAM inference, their evaluation.


rule train_cam:
    input:
        data=P(RUN.data),
        sp=P(RUN.superpixels),
    output:
        P(RUN.cam_model),
    log:
        log_for("train_cam"),
    benchmark:
        bench_for("train_cam")
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **gpu_resources(),
    params:
        cfg=cfg_for("train-cam"),
        out_dir=lambda w, output: P(Path(output[0]).parent),
    shell:
        # Checkpoints live in cam/checkpoints/ (not an output), so a rerun after a kill resumes.
        "weakseg train-cam --config {params.cfg:q} --data {input.data} --superpixels {input.sp}"
        " --out-dir {params.out_dir} --threads {threads} --gpus {resources.gpu} 2> {log}"


rule infer_cam:
    input:
        data=P(RUN.data),
        sp=P(RUN.superpixels),
        model=P(RUN.cam_model),
    output:
        directory(shard_path(RUN.scores)),
    log:
        log_for(sharded("infer_cam")),
    benchmark:
        bench_for(sharded("infer_cam"))
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **gpu_resources(),
    params:
        cfg=cfg_for("infer-cam"),
        shard=lambda w: int(getattr(w, "shard", 0)),
        shards=N_SHARDS,
    shell:
        "weakseg infer-cam --config {params.cfg:q} --data {input.data} --superpixels {input.sp}"
        " --model {input.model} --out {output} --threads {threads} --gpus {resources.gpu}"
        " --shard {params.shard} --shards {params.shards} 2> {log}"


rule evaluate_scores:
    input:
        data=P(RUN.data),
        gt=P(RUN.gt),
        scores=P(RUN.scores),
    output:
        metrics=metrics_csv("{key}", "{split}"),
        per_image=per_image_csv("{key}", "{split}"),
    log:
        log_for("evaluate_{key}_{split}"),
    benchmark:
        bench_for("evaluate_{key}_{split}")
    wildcard_constraints:
        key="cam|spcam",
    conda:
        CONDA_ENV
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("evaluate"),
    shell:
        "weakseg evaluate --config {params.cfg:q} --data {input.data} --gt {input.gt} --pred {input.scores}"
        " --stage {wildcards.key} --split {wildcards.split} --out {output.metrics}"
        " --per-image {output.per_image} 2> {log}"


# The CAM / SPN network as a segmenter on val (the baseline the rounds must beat): the argmax of its
# score maps over the classes its own classifier predicts present (segment.val_labels), no GT labels.
rule gate_scores_val:
    input:
        data=P(RUN.data),
        scores=P(RUN.scores),
    output:
        directory(P(RUN.gated("{key}", VAL))),
    log:
        log_for("gate_{key}_val"),
    benchmark:
        bench_for("gate_{key}_val")
    wildcard_constraints:
        key="cam|spcam",
    conda:
        CONDA_ENV
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("decide"),
        split=VAL,
    shell:
        "weakseg decide --config {params.cfg:q} --data {input.data} --scores {input.scores}"
        " --key {wildcards.key} --split {params.split} --labels-from {input.scores} --out {output} 2> {log}"


rule evaluate_gated_val:
    input:
        data=P(RUN.data),
        gt=P(RUN.gt),
        labels=P(RUN.gated("{key}", VAL)),
    output:
        metrics=metrics_csv("{key}_gated", VAL),
        per_image=per_image_csv("{key}_gated", VAL),
    log:
        log_for("evaluate_{key}_gated_val"),
    benchmark:
        bench_for("evaluate_{key}_gated_val")
    wildcard_constraints:
        key="cam|spcam",
    conda:
        CONDA_ENV
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("evaluate"),
        split=VAL,
    shell:
        "weakseg evaluate --config {params.cfg:q} --data {input.data} --gt {input.gt} --pred {input.labels}"
        " --stage {wildcards.key}_gated --split {params.split} --out {output.metrics}"
        " --per-image {output.per_image} 2> {log}"
