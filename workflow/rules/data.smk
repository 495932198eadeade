# Dataset -> data.zarr + gt.zarr; superpixels; the superpixel oracle.


rule synth:
    output:
        directory(P(RUN.synthetic)),
    log:
        log_for("synth"),
    benchmark:
        bench_for("synth")
    conda:
        CONDA_ENV
    params:
        cfg=cfg_for("synth"),
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
    conda:
        CONDA_ENV
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("ingest"),
    shell:
        "weakseg ingest --config {params.cfg:q} --root {input} --data {output.data} --gt {output.gt} 2> {log}"


rule superpixels:
    input:
        P(RUN.data),
    output:
        directory(shard_path(RUN.superpixels)),
    log:
        log_for(sharded("superpixels")),
    benchmark:
        bench_for(sharded("superpixels"))
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("superpixels"),
        shard=lambda w: int(getattr(w, "shard", 0)),
        shards=N_SHARDS,
    shell:
        "weakseg superpixels --config {params.cfg:q} --data {input} --out {output} --threads {threads}"
        " --shard {params.shard} --shards {params.shards} 2> {log}"


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
    conda:
        CONDA_ENV
    resources:
        **CPU_RESOURCES,
    params:
        split=TRAIN,
    shell:
        "weakseg oracle --data {input.data} --gt {input.gt} --superpixels {input.sp} --split {params.split}"
        " --out {output} 2> {log}"
