# weakseg: image-level labels -> SPN / CAM -> pseudo-labels -> segmentation rounds.
# Reads like the SPN paper's pipeline figure; each stage is one rule file in workflow/rules/.
#   snakemake --cores 2                       the default run (config.yaml: synthetic dataset)
#   snakemake --cores 8 --profile slurm       on a Slurm cluster (edit slurm/config.yaml first)
#   snakemake -n                              show what would run

configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/cam.smk"
include: "workflow/rules/pseudo.smk"
include: "workflow/rules/rounds.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/shards.smk"


rule all:
    input:
        str(RUN.metrics),
        str(RUN.report_dir / "index.html"),


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


onerror:
    import os
    from weakseg.store import RUN_LOCK_TOKEN, release_run_lock

    release_run_lock(RUN.root, os.environ.get(RUN_LOCK_TOKEN, ""))
