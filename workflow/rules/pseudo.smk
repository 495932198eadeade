# Pseudo-labels from score maps: cleaning -> dense CRF -> RRM reliable regions; divergence-based
# reliability and top-K selection; their evaluation on the training split.
SOURCE = config["pseudo"][
    "source"
]  # which score maps feed the pseudo-labels: spcam or cam
SELECTED_VARIANT = config["segment"][
    "first_round_input"
]  # the variant round 1 trains on


rule clean:
    input:
        data=P(RUN.data),
        scores=P(RUN.scores),
    output:
        directory(P(RUN.cleaned)),
    log:
        log_for("clean"),
    benchmark:
        bench_for("clean")
    conda:
        CONDA_ENV
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("clean"),
        key=SOURCE,
    shell:
        "weakseg clean --config {params.cfg:q} --data {input.data} --scores {input.scores}"
        " --key {params.key} --out {output} 2> {log}"


rule crf:
    input:
        data=P(RUN.data),
        scores=P(RUN.scores),
        model=P(RUN.cam_model),  # its encoder's features, for pseudo.crf.unary: prototypes
    output:
        directory(shard_path(RUN.crf)),
    log:
        log_for(sharded("crf")),
    benchmark:
        bench_for(sharded("crf"))
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("crf"),
        key=SOURCE,
        shard=lambda w: int(getattr(w, "shard", 0)),
        shards=N_SHARDS,
    shell:
        "weakseg crf --config {params.cfg:q} --data {input.data} --scores {input.scores} --key {params.key}"
        " --model {input.model} --out {output} --threads {threads} --shard {params.shard} --shards {params.shards} 2> {log}"


rule reliable:
    input:
        data=P(RUN.data),
        scores=P(RUN.scores),
        crf=P(RUN.crf),
    output:
        directory(P(RUN.reliable)),
    log:
        log_for("reliable"),
    benchmark:
        bench_for("reliable")
    conda:
        CONDA_ENV
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("rrm"),
        key=SOURCE,
    shell:
        "weakseg rrm --config {params.cfg:q} --data {input.data} --scores {input.scores}"
        " --key {params.key} --crf {input.crf} --out {output} 2> {log}"


rule reliability:
    input:
        unpack(lambda w: reliability_inputs(P(RUN.cam_model), P(RUN.pseudo("cleaned")))),
        data=P(RUN.data),
        labels=P(RUN.pseudo(SELECTED_VARIANT)),
    output:
        P(RUN.reliability),
    log:
        log_for("reliability"),
    benchmark:
        bench_for("reliability")
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


rule evaluate_pseudo:
    input:
        data=P(RUN.data),
        gt=P(RUN.gt),
        labels=lambda w: P(RUN.pseudo(w.variant)),
        selection=P(RUN.reliability),
    output:
        metrics=metrics_csv("{variant}", TRAIN),
        per_image=per_image_csv("{variant}", TRAIN),
    log:
        log_for("evaluate_{variant}"),
    benchmark:
        bench_for("evaluate_{variant}")
    wildcard_constraints:
        variant="cleaned|crf|reliable",
    conda:
        CONDA_ENV
    resources:
        **CPU_RESOURCES,
    params:
        cfg=cfg_for("evaluate"),
        split=TRAIN,
    shell:
        "weakseg evaluate --config {params.cfg:q} --data {input.data} --gt {input.gt} --pred {input.labels}"
        " --stage {wildcards.variant} --split {params.split} --out {output.metrics}"
        " --per-image {output.per_image} --selection {input.selection} 2> {log}"


rule reliability_curve:
    input:
        gt=P(RUN.gt),
        labels=P(RUN.pseudo(SELECTED_VARIANT)),
        reliability=P(RUN.reliability),
    output:
        P(RUN.reliability_curve),
    log:
        log_for("reliability_curve"),
    benchmark:
        bench_for("reliability_curve")
    conda:
        CONDA_ENV
    params:
        points=config["evaluate"]["reliability_curve_points"],
    shell:
        "weakseg reliability-curve --gt {input.gt} --labels {input.labels} --reliability {input.reliability}"
        " --points {params.points} --out {output} 2> {log}"
