# weakseg: image-level labels -> SPN / CAM -> pseudo-labels -> segmentation rounds.
# Reads like the SPN paper's pipeline figure; each stage is one rule file in workflow/rules/.
#   snakemake --cores 2                       the demo run (config.yaml: synthetic dataset)
#   snakemake --cores 2 --configfile my.yaml  your run: my.yaml alone (+ schema defaults), results/my/
#   snakemake --cores 8 --profile slurm       on a Slurm cluster (edit slurm/config.yaml first)
#   snakemake -n                              show what would run

# One config per run: the demo config only when no --configfile is given, never merged under yours.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/cam.smk"
include: "workflow/rules/pseudo.smk"
include: "workflow/rules/rounds.smk"
include: "workflow/rules/joint.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/shards.smk"


rule all:
    input:
        P(RUN.resolved_config),
        [P(RUN.metrics)] if EVAL_SPLITS else [],
        P(RUN.report_page),
        # Every stage's store, so that a store deleted by a killed --forcerun is made again by a plain run.
        [P(path) for path in (RUN.superpixels, RUN.scores)],
        [P(stage.path) for stage in expected_label_stages(RUN, config)],


# One writer per run: this workflow holds results/<run>/.weakseg.lock while it runs; the weakseg
# commands of its jobs (here or on cluster nodes, which get this environment) carry its token.
# Another workflow or a weakseg command run by hand on the same run is refused.
onstart:
    import os
    from weakseg.store import RUN_LOCK_TOKEN, RunLockedError, acquire_run_lock

    try:
        os.environ[RUN_LOCK_TOKEN] = acquire_run_lock(RUN.root)["token"]
    except RunLockedError as exc:
        raise WorkflowError(str(exc))


onsuccess:
    import os
    from weakseg.store import RUN_LOCK_TOKEN, release_run_lock

    release_run_lock(RUN.root, os.environ.get(RUN_LOCK_TOKEN, ""))
    if RUN.report_page.exists():
        print(f"weakseg: the report of run '{config['run']}' is {RUN.report_page}")


onerror:
    import os
    from weakseg.store import RUN_LOCK_TOKEN, release_run_lock

    release_run_lock(RUN.root, os.environ.get(RUN_LOCK_TOKEN, ""))
