# Dataset -> data.zarr + gt.zarr; superpixels; the superpixel oracle.


rule synth:
    output:
        directory(P(RUN.synthetic)),
    log:
        log_for("synth"),
    benchmark:
        bench_for("synth")
    params:
        cfg=cfg("dataset"),
    shell:
        "weakseg synth --config {params.cfg:q} --out {output} 2> {log}"


# A synthetic run generates its dataset; a folder run reads the user's.
if config["dataset"]["kind"] == "synthetic":
    DATASET_ROOT = P(RUN.synthetic)
else:
    DATASET_ROOT = config["dataset"]["root"]
    if not DATASET_ROOT:
        raise WorkflowError("dataset.root: required when dataset.kind is 'folder'")


rule ingest:
    input:
        DATASET_ROOT,
    output:
        data=directory(P(RUN.data)),
        gt=directory(P(RUN.gt)),
    log:
        log_for("ingest"),
    benchmark:
        bench_for("ingest")
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg("dataset"),
    shell:
        "weakseg ingest --config {params.cfg:q} --root {input} --data {output.data} --gt {output.gt} 2> {log}"


rule superpixels:
    input:
        P(RUN.data),
    output:
        directory(shard_path(RUN.superpixels)),
    log:
        log_for("superpixels" + ("" if N_SHARDS == 1 else "-{shard}")),
    benchmark:
        bench_for("superpixels" + ("" if N_SHARDS == 1 else "-{shard}"))
    threads: THREADS
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg("superpixels"),
        shard=lambda w: int(getattr(w, "shard", 0)),
    shell:
        "weakseg superpixels --config {params.cfg:q} --data {input} --out {output} --threads {threads}"
        " --shard {params.shard} --shards " + str(N_SHARDS) + " 2> {log}"


rule superpixel_oracle:
    input:
        data=P(RUN.data),
        gt=P(RUN.gt),
        sp=P(RUN.superpixels),
    output:
        metrics_csv("superpixel_oracle", TRAIN),
    log:
        log_for("superpixel_oracle"),
    benchmark:
        bench_for("superpixel_oracle")
    resources:
        **CPU_RESOURCES,
    shell:
        "weakseg oracle --data {input.data} --gt {input.gt} --superpixels {input.sp} --split "
        + TRAIN
        + " --out {output} 2> {log}"
