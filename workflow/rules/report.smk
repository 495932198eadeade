# metrics.csv (every evaluated stage's rows), the resolved config and the static HTML report.


rule resolved_config:
    output:
        P(RUN.resolved_config),
    log:
        log_for("resolved_config"),
    conda:
        CONDA_ENV
    params:
        cfg=json.dumps(config, sort_keys=True),
    shell:
        "weakseg resolve-config --config {params.cfg:q} --out {output} 2> {log}"


rule metrics:
    input:
        metric_files(),
    output:
        report(P(RUN.metrics), caption="../report/metrics.rst", category="Metrics"),
    log:
        log_for("metrics"),
    benchmark:
        bench_for("metrics")
    conda:
        CONDA_ENV
    shell:
        "weakseg metrics --out {output} {input} 2> {log}"


rule report:
    input:
        stage_outputs(),
        config=P(RUN.resolved_config),
        metrics=[P(RUN.metrics)] if EVAL_SPLITS else [],
        curve=[P(RUN.reliability_curve)] if EVAL_TRAIN else [],
    output:
        # One self-contained page (images inlined), so `snakemake --report` carries every image.
        report(P(RUN.report_page), caption="../report/index.rst", category="Report"),
    log:
        log_for("report"),
    benchmark:
        bench_for("report")
    conda:
        CONDA_ENV
    params:
        # The report reads the whole run folder: the folder that holds its resolved config.
        run_dir=lambda w, input: P(Path(input.config).parent),
        gallery=config["inspect"]["gallery_images"],
    shell:
        "weakseg report {params.run_dir} --out {output} --gallery {params.gallery} 2> {log}"
