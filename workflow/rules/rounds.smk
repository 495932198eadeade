# Iterative segmentation rounds (SPN paper §6): train on the selected reliable pseudo-labels of
# round r-1 (round 1: the pseudo-label stage; with joint.enabled, round 0), predict the training
# images, clean with the image labels, optional CRF, reliability selection -> the annotations of
# round r. Every round is trained from ImageNet weights, never from the previous round.
ROUND = P(RUN.root / "round{r}")
# Val rows: round<r> = argmax over all classes of the network's probabilities; _gated = restricted
# to the classes the CAM classifier predicts (segment.val_labels); _crf = gated + dense CRF.
VAL_PREDICTIONS = {
    "": "scores_{split}.zarr",
    "_gated": "cleaned_{split}.zarr",
    "_crf": "crf_{split}.zarr",
}


def round_inputs(w):
    r = int(w.r)
    if r == 1 and not JOINT:
        return {
            "labels": P(RUN.pseudo(config["segment"]["first_round_input"])),
            "selection": P(RUN.reliability),
        }
    return {
        "labels": annotation_of(r - 1),
        "selection": P(RUN.round_reliability(r - 1)),
    }


def annotation_of(r):
    """A round's train annotation (segment.annotation): cleaned, CRF-refined or RRM reliable regions."""
    return P(RUN.round_labels(r, f"{config['segment']['annotation']}_{TRAIN}"))


rule train_seg:
    input:
        unpack(round_inputs),
        data=P(RUN.data),
    output:
        P(RUN.root / "round{r}" / "model.pt"),
    log:
        log_for("train_seg_round{r}"),
    benchmark:
        bench_for("train_seg_round{r}")
    threads: THREADS
    resources:
        **gpu_resources(),
    params:
        cfg=cfg("dataset", "device", segment="model"),
        out_dir=ROUND,
    shell:
        "weakseg train-seg --config {params.cfg:q} --data {input.data} --labels {input.labels}"
        " --selection {input.selection} --out-dir {params.out_dir} --threads {threads} --gpus {resources.gpu} 2> {log}"


rule predict_seg:
    input:
        data=P(RUN.data),
        model=P(RUN.root / "round{r}" / "model.pt"),
    output:
        directory(shard_path(RUN.root / "round{r}" / "scores_{split}.zarr")),
    log:
        log_for("predict_seg_round{r}_{split}" + ("" if N_SHARDS == 1 else "-{shard}")),
    benchmark:
        bench_for(
            "predict_seg_round{r}_{split}" + ("" if N_SHARDS == 1 else "-{shard}")
        )
    threads: THREADS
    resources:
        **gpu_resources(),
    params:
        cfg=cfg("dataset", "device", segment=list(SEGMENT_PREDICTION)),
        shard=lambda w: int(getattr(w, "shard", 0)),
    shell:
        "weakseg predict-seg --config {params.cfg:q} --data {input.data} --model {input.model} --split {wildcards.split}"
        " --out {output} --threads {threads} --gpus {resources.gpu} --shard {params.shard} --shards "
        + str(N_SHARDS)
        + " 2> {log}"


rule clean_round:
    input:
        data=P(RUN.data),
        scores=P(RUN.root / "round{r}" / "scores_{split}.zarr"),
        labels_from=P(RUN.scores),
    output:
        directory(P(RUN.root / "round{r}" / "cleaned_{split}.zarr")),
    log:
        log_for("clean_round{r}_{split}"),
    benchmark:
        bench_for("clean_round{r}_{split}")
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg("dataset", "pseudo", segment=["val_labels", "label_threshold"]),
    shell:
        # The image's classes only, then argmax (on val the classes the CAM classifier predicts, see
        # segment.val_labels).
        "weakseg decide --config {params.cfg:q} --data {input.data} --scores {input.scores} --key seg"
        " --split {wildcards.split} --labels-from {input.labels_from} --out {output} 2> {log}"


rule crf_round:
    input:
        data=P(RUN.data),
        scores=P(RUN.root / "round{r}" / "scores_{split}.zarr"),
        labels_from=P(RUN.scores),
    output:
        directory(shard_path(RUN.root / "round{r}" / "crf_{split}.zarr")),
    log:
        log_for("crf_round{r}_{split}" + ("" if N_SHARDS == 1 else "-{shard}")),
    benchmark:
        bench_for("crf_round{r}_{split}" + ("" if N_SHARDS == 1 else "-{shard}"))
    threads: THREADS
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg("dataset", "pseudo", segment=["val_labels", "label_threshold"]),
        shard=lambda w: int(getattr(w, "shard", 0)),
    shell:
        "weakseg crf --config {params.cfg:q} --data {input.data} --scores {input.scores} --key seg"
        " --split {wildcards.split} --labels-from {input.labels_from} --out {output} --threads {threads} --shard {params.shard} --shards "
        + str(N_SHARDS)
        + " 2> {log}"


rule reliable_round:
    input:
        data=P(RUN.data),
        scores=P(RUN.root / "round{r}" / f"scores_{TRAIN}.zarr"),
        crf=P(RUN.root / "round{r}" / f"crf_{TRAIN}.zarr"),
    output:
        directory(P(RUN.root / "round{r}" / f"reliable_{TRAIN}.zarr")),
    log:
        log_for("reliable_round{r}"),
    benchmark:
        bench_for("reliable_round{r}")
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg("dataset", "pseudo"),
        confidence=config["segment"]["reliable_confidence"],
    shell:
        "weakseg reliable --config {params.cfg:q} --data {input.data} --scores {input.scores} --key seg"
        " --crf {input.crf} --confidence {params.confidence} --out {output} 2> {log}"


rule reliability_round:
    input:
        data=P(RUN.data),
        labels=lambda w: annotation_of(int(w.r)),
    output:
        P(RUN.root / "round{r}" / "reliability.csv"),
    log:
        log_for("reliability_round{r}"),
    benchmark:
        bench_for("reliability_round{r}")
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg("dataset", "pseudo"),
    shell:
        "weakseg reliability --config {params.cfg:q} --data {input.data} --labels {input.labels} --out {output}"
        " 2> {log}"


rule evaluate_round_train:
    input:
        data=P(RUN.data),
        gt=P(RUN.gt),
        labels=lambda w: annotation_of(int(w.r)),
        selection=P(RUN.root / "round{r}" / "reliability.csv"),
    output:
        metrics=P(RUN.metrics_dir / ("round{r}_" + TRAIN + ".csv")),
        per_image=P(RUN.metrics_dir / ("round{r}_" + TRAIN + "_per_image.csv")),
    log:
        log_for("evaluate_round{r}_train"),
    benchmark:
        bench_for("evaluate_round{r}_train")
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg("dataset", "evaluate"),
    shell:
        "weakseg evaluate --config {params.cfg:q} --data {input.data} --gt {input.gt} --pred {input.labels}"
        " --stage round{wildcards.r} --split "
        + TRAIN
        + " --out {output.metrics} --per-image {output.per_image}"
        " --selection {input.selection} 2> {log}"


rule evaluate_round_val:
    input:
        data=P(RUN.data),
        gt=P(RUN.gt),
        pred=lambda w: P(
            RUN.root / f"round{w.r}" / VAL_PREDICTIONS[w.post].format(split=VAL)
        ),
    output:
        metrics=P(RUN.metrics_dir / ("round{r}{post}_" + str(VAL) + ".csv")),
        per_image=P(RUN.metrics_dir / ("round{r}{post}_" + str(VAL) + "_per_image.csv")),
    log:
        log_for("evaluate_round{r}{post}_val"),
    benchmark:
        bench_for("evaluate_round{r}{post}_val")
    wildcard_constraints:
        post="|_gated|_crf",
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg("dataset", "evaluate"),
    shell:
        "weakseg evaluate --config {params.cfg:q} --data {input.data} --gt {input.gt} --pred {input.pred}"
        " --stage round{wildcards.r}{wildcards.post} --split "
        + str(VAL)
        + " --out {output.metrics}"
        " --per-image {output.per_image} 2> {log}"
