# With shards > 1, per-image stages run as N jobs writing disjoint shard stores; one gather rule
# per stage merges them into the stage store (identical to a one-shard run).
if N_SHARDS > 1:
    for _name, _final, _kind in (
        ("superpixels", RUN.superpixels, "superpixels"),
        ("scores", RUN.scores, "scores"),
        ("crf", RUN.crf, "labels"),
        ("round_scores", RUN.round_scores("{r}", "{split}"), "scores"),
        ("round_crf", RUN.round_labels("{r}", "crf", "{split}"), "labels"),
    ):
        # Round stores carry the {r} and {split} wildcards; their logs must too.
        _tag = (
            f"gather_{_name}_round{{r}}_{{split}}"
            if "{" in str(_final)
            else f"gather_{_name}"
        )

        rule:
            name:
                f"gather_{_name}"
            input:
                all_shards(_final),
            output:
                directory(P(_final)),
            log:
                log_for(_tag),
            benchmark:
                bench_for(_tag)
            conda:
                CONDA_ENV
            params:
                kind=_kind,
            shell:
                "weakseg gather --kind {params.kind} --out {output} {input} 2> {log}"
