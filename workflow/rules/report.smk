# metrics.csv (every stage's rows) and the static HTML report.


def metric_files():
    files = [metrics_csv("superpixel_oracle", TRAIN), metrics_csv("cam", TRAIN), metrics_csv("spcam", TRAIN)]
    files += [metrics_csv(v, TRAIN) for v in ("cleaned", "crf", "reliable")]
    if HAS_VAL:
        files += [metrics_csv("cam_gated", VAL), metrics_csv("spcam_gated", VAL)]
    for r in ROUNDS:
        files.append(metrics_csv(f"round{r}", TRAIN))
        if HAS_VAL:
            files.append(metrics_csv(f"round{r}", VAL))
            files.append(metrics_csv(f"round{r}_gated", VAL))
            if config["segment"]["eval_crf"]:
                files.append(metrics_csv(f"round{r}_crf", VAL))
    return files


rule metrics:
    input:
        metric_files(),
    output:
        report(P(RUN.metrics), caption="../report/metrics.rst", category="Metrics"),
    log:
        log_for("metrics"),
    benchmark:
        bench_for("metrics"),
    shell:
        "weakseg metrics --out {output} {input} 2> {log}"


rule report:
    input:
        metrics=P(RUN.metrics),
        curve=P(RUN.root / "pseudo" / "reliability_curve.csv"),
    output:
        report(P(RUN.report_dir / "index.html"), caption="../report/index.rst", category="Report"),
    params:
        run_dir=P(RUN.root),
        gallery=config["inspect"]["gallery_images"],
    log:
        log_for("report"),
    benchmark:
        bench_for("report"),
    shell:
        "weakseg report {params.run_dir} --out {output} --gallery {params.gallery} 2> {log}"
