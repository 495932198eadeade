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
