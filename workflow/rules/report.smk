# metrics.csv (every evaluated stage's rows), the resolved config and the static HTML report.


def metric_files():
    """The metric CSVs of every stage on every split that has ground-truth masks (EVAL_SPLITS)."""
    files = []
    if EVAL_TRAIN:
        files += [
            metrics_csv(s, TRAIN)
            for s in ("superpixel_oracle", "cam", "spcam", "cleaned", "crf", "reliable")
        ]
    if EVAL_VAL:
        files += [metrics_csv("cam_gated", VAL), metrics_csv("spcam_gated", VAL)]
    for r in ROUNDS:
        if EVAL_TRAIN:
            files.append(metrics_csv(f"round{r}", TRAIN))
        if EVAL_VAL:
            files.append(metrics_csv(f"round{r}", VAL))
            files.append(metrics_csv(f"round{r}_gated", VAL))
            if config["segment"]["eval_crf"]:
                files.append(metrics_csv(f"round{r}_crf", VAL))
    return files


def stage_outputs():
    """The last products of every stage (pseudo-labels, each round's annotation and val predictions):
    the report waits for them whether or not anything is evaluated."""
    files = [P(RUN.pseudo(v)) for v in ("cleaned", "crf", "reliable")] + [
        P(RUN.reliability)
    ]
    if HAS_VAL:
        files += [
            P(RUN.cam_dir / f"{key}_gated_{VAL}.zarr") for key in ("cam", "spcam")
        ]
    for r in ROUNDS:
        files += [annotation_of(r), P(RUN.round_reliability(r))]
        if HAS_VAL:
            files.append(P(RUN.round_labels(r, f"cleaned_{VAL}")))
            if config["segment"]["eval_crf"]:
                files.append(P(RUN.round_labels(r, f"crf_{VAL}")))
    return files


rule resolved_config:
    output:
        P(RUN.resolved_config),
    log:
        log_for("resolved_config"),
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
    shell:
        "weakseg metrics --out {output} {input} 2> {log}"


rule report:
    input:
        stage_outputs(),
        P(RUN.resolved_config),
        [P(RUN.metrics)] if EVAL_SPLITS else [],
        [P(RUN.reliability_curve)] if EVAL_TRAIN else [],
    output:
        # One self-contained page (images inlined), so `snakemake --report` carries every image.
        report(P(RUN.report_page), caption="../report/index.rst", category="Report"),
    log:
        log_for("report"),
    benchmark:
        bench_for("report")
    params:
        run_dir=P(RUN.root),
        gallery=config["inspect"]["gallery_images"],
    shell:
        "weakseg report {params.run_dir} --out {output} --gallery {params.gallery} 2> {log}"
