# Iterative segmentation rounds (SPN paper §6): train on the selected reliable pseudo-labels of
# round r-1 (round 1: the pseudo-label stage; with joint.enabled, round 0), predict the training
# images, clean with the image labels, optional CRF, reliability selection -> the annotations of
# round r. Every round is trained from ImageNet weights, as in the paper; segment.init: cam starts the
# encoder from the CAM network's, segment.warm_start rounds 2, 3, ... from the previous round's weights.


rule train_seg:
    input:
        unpack(round_inputs),
        data=P(RUN.data),
    output:
        P(RUN.round_model("{r}")),
    log:
        log_for("train_seg_round{r}"),
    benchmark:
        bench_for("train_seg_round{r}")
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **gpu_resources(),
    params:
        cfg=cfg_for("train-seg"),
        out_dir=lambda w, output: P(Path(output[0]).parent),
        init=init_options,
    shell:
        "weakseg train-seg --config {params.cfg:q} --data {input.data} --labels {input.labels}"
        " --selection {input.selection} {params.init:q} --out-dir {params.out_dir} --threads {threads}"
        " --gpus {resources.gpu} 2> {log}"


rule predict_seg:
    input:
        data=P(RUN.data),
        model=P(RUN.round_model("{r}")),
    output:
        directory(shard_path(RUN.round_scores("{r}", "{split}"))),
    log:
        log_for(sharded("predict_seg_round{r}_{split}")),
    benchmark:
        bench_for(sharded("predict_seg_round{r}_{split}"))
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **gpu_resources(),
    params:
        cfg=cfg_for("predict-seg"),
        shard=lambda w: int(getattr(w, "shard", 0)),
        shards=N_SHARDS,
    shell:
        "weakseg predict-seg --config {params.cfg:q} --data {input.data} --model {input.model}"
        " --split {wildcards.split} --out {output} --threads {threads} --gpus {resources.gpu}"
        " --shard {params.shard} --shards {params.shards} 2> {log}"


rule clean_round:
    input:
        data=P(RUN.data),
        scores=P(RUN.round_scores("{r}", "{split}")),
        labels_from=P(RUN.scores),
    output:
        directory(P(RUN.round_labels("{r}", "cleaned", "{split}"))),
    log:
        log_for("clean_round{r}_{split}"),
    benchmark:
        bench_for("clean_round{r}_{split}")
    conda:
        CONDA_ENV
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("decide"),
    shell:
        # The image's classes only, then argmax (on val the classes the CAM classifier predicts, see
        # segment.val_labels).
        "weakseg decide --config {params.cfg:q} --data {input.data} --scores {input.scores} --key seg"
        " --split {wildcards.split} --labels-from {input.labels_from} --out {output} 2> {log}"


rule crf_round:
    input:
        data=P(RUN.data),
        scores=P(RUN.round_scores("{r}", "{split}")),
        labels_from=P(RUN.scores),
    output:
        directory(shard_path(RUN.round_labels("{r}", "crf", "{split}"))),
    log:
        log_for(sharded("crf_round{r}_{split}")),
    benchmark:
        bench_for(sharded("crf_round{r}_{split}"))
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("crf"),
        shard=lambda w: int(getattr(w, "shard", 0)),
        shards=N_SHARDS,
    shell:
        "weakseg crf --config {params.cfg:q} --data {input.data} --scores {input.scores} --key seg --unary scores"
        " --split {wildcards.split} --labels-from {input.labels_from} --out {output} --threads {threads}"
        " --shard {params.shard} --shards {params.shards} 2> {log}"


rule reliable_round:
    input:
        data=P(RUN.data),
        scores=P(RUN.round_scores("{r}", TRAIN)),
        crf=P(RUN.round_labels("{r}", "crf", TRAIN)),
    output:
        directory(P(RUN.round_labels("{r}", "reliable", TRAIN))),
    log:
        log_for("reliable_round{r}"),
    benchmark:
        bench_for("reliable_round{r}")
    conda:
        CONDA_ENV
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("rrm"),
        confidence=config["segment"]["reliable_confidence"],
    shell:
        "weakseg rrm --config {params.cfg:q} --data {input.data} --scores {input.scores} --key seg"
        " --crf {input.crf} --confidence {params.confidence} --out {output} 2> {log}"


# segment.annotation consensus or pruned: the round's reliable regions checked against the first
# pseudo-labels.
rule consensus_round:
    input:
        data=P(RUN.data),
        labels=P(RUN.round_labels("{r}", "reliable", TRAIN)),
        reference=P(RUN.pseudo(config["segment"]["first_round_input"])),
    output:
        directory(P(RUN.round_labels("{r}", "{rule}", TRAIN))),
    log:
        log_for("{rule}_round{r}"),
    benchmark:
        bench_for("{rule}_round{r}")
    wildcard_constraints:
        rule=CHECKED_ANNOTATIONS,
    conda:
        CONDA_ENV
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("consensus"),
    shell:
        "weakseg consensus --config {params.cfg:q} --data {input.data} --labels {input.labels}"
        " --reference {input.reference} --rule {wildcards.rule} --out {output} 2> {log}"


rule reliability_round:
    input:
        unpack(
            lambda w: reliability_inputs(
                P(RUN.round_model(w.r)), P(RUN.round_labels(w.r, "reliable", TRAIN))
            )
        ),
        data=P(RUN.data),
        labels=lambda w: annotation_of(int(w.r)),
    output:
        P(RUN.round_reliability("{r}")),
    log:
        log_for("reliability_round{r}"),
    benchmark:
        bench_for("reliability_round{r}")
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("reliability"),
        consistency=consistency_options,
    shell:
        "weakseg reliability --config {params.cfg:q} --data {input.data} --labels {input.labels}"
        " {params.consistency} --threads {threads} --out {output} 2> {log}"


rule evaluate_round_train:
    input:
        data=P(RUN.data),
        gt=P(RUN.gt),
        labels=lambda w: annotation_of(int(w.r)),
        selection=P(RUN.round_reliability("{r}")),
    output:
        metrics=metrics_csv("round{r}", TRAIN),
        per_image=per_image_csv("round{r}", TRAIN),
    log:
        log_for("evaluate_round{r}_train"),
    benchmark:
        bench_for("evaluate_round{r}_train")
    conda:
        CONDA_ENV
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("evaluate"),
        split=TRAIN,
    shell:
        "weakseg evaluate --config {params.cfg:q} --data {input.data} --gt {input.gt} --pred {input.labels}"
        " --stage round{wildcards.r} --split {params.split} --out {output.metrics}"
        " --per-image {output.per_image} --selection {input.selection} 2> {log}"


rule evaluate_round_val:
    input:
        data=P(RUN.data),
        gt=P(RUN.gt),
        pred=lambda w: val_prediction(w.r, w.post),
    output:
        metrics=metrics_csv("round{r}{post}", VAL),
        per_image=per_image_csv("round{r}{post}", VAL),
    log:
        log_for("evaluate_round{r}{post}_val"),
    benchmark:
        bench_for("evaluate_round{r}{post}_val")
    wildcard_constraints:
        post="|_gated|_crf",
    conda:
        CONDA_ENV
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("evaluate"),
        split=VAL,
    shell:
        "weakseg evaluate --config {params.cfg:q} --data {input.data} --gt {input.gt} --pred {input.pred}"
        " --stage round{wildcards.r}{wildcards.post} --split {params.split} --out {output.metrics}"
        " --per-image {output.per_image} 2> {log}"
