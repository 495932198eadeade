"""``weakseg`` command line: argument parsing only; every command calls one stage function.

Snakemake rules call these commands with ``--config '<json>'`` (the config sections the stage
uses); people call them by hand with ``--config config.yaml``. Stage modules are imported lazily so
that ``--help`` stays fast.

Exit status: 0 done, 2 usage error, 3 bad input or data (one line ``weakseg <command>: error: ...``
naming the file or key; ``-v`` adds the traceback), 1 a bug (traceback). A command that writes into
a run directory holds that run's lock while it runs (see ``weakseg.store.run_writer``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import traceback
from pathlib import Path

from weakseg.errors import EXIT_USER_ERROR, UserError
from weakseg.inspect.stages import STAGE_HELP

log = logging.getLogger("weakseg")


def _config(args):
    from weakseg.config import load

    return load(args.config)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default="config.yaml",
        help="run config: a YAML file or an inline JSON object (default: config.yaml)",
    )


def _add_shard(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", type=int, default=0, help="which shard of the images to process (0-based)")
    p.add_argument("--shards", type=int, default=1, help="number of shards the images are split into")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help="worker processes/threads")


# --- command implementations (thin: parse -> one call) ---------------------------------------


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def cmd_synth(a):
    from weakseg.datasets.synthetic import write_folder

    cfg = _config(a)
    write_folder(cfg["dataset"]["synthetic"], cfg["dataset"]["has_background"], a.out)


def cmd_ingest(a):
    from weakseg import store
    from weakseg.config import ConfigError
    from weakseg.datasets.folder import ingest

    cfg = _config(a)
    root = a.root or cfg["dataset"]["root"]
    if root is None:
        raise ConfigError("dataset.root: not set; give --root or set it in the config")
    ingest(root, cfg["dataset"], a.data, a.gt, store.provenance("ingest", cfg["dataset"]))


def cmd_superpixels(a):
    from weakseg.superpixels import run_superpixels

    run_superpixels(_config(a), a.data, a.out, a.threads, a.shard, a.shards)


def cmd_gather(a):
    from weakseg import store

    store.gather(a.shard_stores, a.out, a.kind, store.provenance(f"gather:{a.kind}"))


def _network_config(a):
    """The config of a command that runs a network; stops at once when the job asked for a GPU
    (--gpus) that this machine does not have."""
    from weakseg.training import check_gpu_request

    cfg = _config(a)
    check_gpu_request(cfg["device"], a.gpus)
    return cfg


def cmd_train_cam(a):
    from weakseg.cam.train import run_train_cam

    run_train_cam(_network_config(a), a.data, a.superpixels, a.out_dir, threads=a.threads)


def cmd_infer_cam(a):
    from weakseg.cam.infer import run_infer_cam

    run_infer_cam(
        _network_config(a),
        a.data,
        a.superpixels,
        a.model,
        a.out,
        threads=a.threads,
        shard=a.shard,
        n_shards=a.shards,
    )


def cmd_clean(a):
    from weakseg.pseudo.clean import run_clean

    run_clean(
        _config(a),
        a.data,
        a.scores,
        a.key,
        a.out,
        ratio=a.ratio,
        shard=a.shard,
        n_shards=a.shards,
        split=a.split,
        labels_from=a.labels_from,
    )


def cmd_decide(a):
    from weakseg.pseudo.clean import run_decide

    run_decide(
        _config(a),
        a.data,
        a.scores,
        a.key,
        a.out,
        shard=a.shard,
        n_shards=a.shards,
        split=a.split,
        labels_from=a.labels_from,
    )


def cmd_reliability(a):
    from weakseg.pseudo.reliability import run_reliability

    run_reliability(_config(a), a.data, a.labels, a.out)


def cmd_crf(a):
    from weakseg.pseudo.crf import run_crf

    run_crf(
        _config(a),
        a.data,
        a.scores,
        a.key,
        a.out,
        a.threads,
        shard=a.shard,
        n_shards=a.shards,
        split=a.split,
        labels_from=a.labels_from,
    )


def cmd_reliable(a):
    from weakseg.pseudo.reliable import run_reliable

    run_reliable(
        _config(a),
        a.data,
        a.scores,
        a.key,
        a.crf,
        a.out,
        shard=a.shard,
        n_shards=a.shards,
        confidence=a.confidence,
    )


def cmd_train_seg(a):
    from weakseg.segment.train import run_train_seg

    run_train_seg(_network_config(a), a.data, a.labels, a.selection, a.out_dir, threads=a.threads)


def cmd_train_joint(a):
    from weakseg.joint.train import run_train_joint

    run_train_joint(_network_config(a), a.data, a.superpixels, a.out_dir, threads=a.threads)


def cmd_predict_seg(a):
    from weakseg.segment.predict import run_predict_store

    run_predict_store(
        _network_config(a),
        a.data,
        a.model,
        a.split,
        a.out,
        shard=a.shard,
        n_shards=a.shards,
        threads=a.threads,
    )


def cmd_evaluate(a):
    from weakseg.evaluate import run_evaluate

    run_evaluate(
        _config(a),
        a.data,
        a.gt,
        a.pred,
        a.stage,
        a.split,
        a.out,
        selection_csv=a.selection,
        per_image_csv=a.per_image,
        key=a.key,
    )


def cmd_oracle(a):
    from weakseg.evaluate import run_oracle

    run_oracle(a.data, a.gt, a.superpixels, a.split, a.out)


def cmd_reliability_curve(a):
    from weakseg.evaluate import run_reliability_curve

    run_reliability_curve(a.gt, a.labels, a.reliability, a.out, a.points)


def cmd_metrics(a):
    from weakseg.evaluate import combine_metrics

    combine_metrics(a.csvs, a.out)


def cmd_predict(a):
    from weakseg.segment.predict import predict_files

    written = predict_files(
        a.model,
        a.inputs,
        a.out,
        a.probabilities,
        device=a.device,
        prior_adjustment=a.prior_adjustment,
        overwrite=a.overwrite,
        strict=a.strict,
        overlay=a.overlay,
    )
    print(f"wrote {len(written)} label maps to {a.out}")


def cmd_inspect(a):
    from weakseg.inspect.panels import run_inspect

    written = run_inspect(
        a.run_dir,
        a.out or Path(a.run_dir) / "inspect",
        ids=a.ids,
        worst=a.worst,
        stage=a.stage,
        class_name=a.class_name,
    )
    print(f"wrote {len(written)} panels to {a.out or Path(a.run_dir) / 'inspect'}")


def cmd_report(a):
    from weakseg.inspect.report import write_report

    out = a.out or Path(a.run_dir) / "report" / "index.html"
    write_report(a.run_dir, out, gallery_images=a.gallery)
    print(f"report: {out}")


def cmd_resolve_config(a):
    from weakseg.config import load, write_resolved

    cfg = load(a.config, run_from_file=True)
    if a.out:
        write_resolved(cfg, a.out)
        print(f"wrote {a.out}")
    else:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=100), end="")


def cmd_benchmark(a):
    from weakseg.benchmark import run_benchmark

    run_benchmark(
        a.what,
        a.root,
        a.out,
        a.config,
        a.threads,
        methods=a.methods,
        split=a.split,
        iterations=a.iterations,
        infer_scales=a.infer_scales,
        joint_methods=a.joint_methods,
    )


# --- parser ---------------------------------------------------------------------------------

DESCRIPTION = """\
weakseg: weakly supervised semantic segmentation from image-level labels.

You give photos with image labels ("cow;grass"); weakseg trains a classifier (SPN or CAM), turns
its class maps into pixel pseudo-labels (cleaning, dense CRF, reliable regions) and trains a
segmentation network on them in rounds. The whole pipeline is a Snakemake workflow:

  snakemake --cores 2                          the demo run (synthetic data, results/demo/)
  snakemake --cores 2 --configfile my.yaml     your dataset (results/my/, see README)

The commands below are the workflow's steps, each usable by hand, plus tools to look at a run and
to segment new images."""

EPILOG = """\
examples:
  weakseg inspect results/demo --worst 8 --stage crf    panels of the 8 worst CRF pseudo-labels
  weakseg report results/demo                           (re)write results/demo/report/index.html
  weakseg predict --model results/demo/round2/model.pt photos/ --out predictions/
  weakseg resolve-config --config my.yaml               every key of a config, defaults filled in
Run 'weakseg COMMAND --help' for a command's options."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and appends each option's default to its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            action.default not in (None, False, argparse.SUPPRESS)
            and action.option_strings
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


def _add_gpus(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpus",
        type=int,
        default=0,
        help="GPUs this job asked for (resources.gpu); with N > 0 and no usable CUDA device the "
        "command stops at once, unless the config says device: cpu",
    )


def build_parser() -> argparse.ArgumentParser:
    from weakseg import __version__

    parser = argparse.ArgumentParser(
        prog="weakseg", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"weakseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, fn, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(fn=fn)
        return p

    p = command("synth", cmd_synth, "write the deterministic synthetic dataset as a VOC-style folder")
    _add_config(p)
    p.add_argument("--out", required=True, help="output folder")

    p = command(
        "ingest", cmd_ingest, "read a VOC-style dataset folder into data.zarr (images, labels) and gt.zarr"
    )
    _add_config(p)
    p.add_argument("--root", help="dataset folder (overrides dataset.root)")
    p.add_argument("--data", required=True, help="output data.zarr")
    p.add_argument("--gt", required=True, help="output gt.zarr (masks; read by evaluation only)")

    p = command("superpixels", cmd_superpixels, "compute superpixels of every image")
    _add_config(p), _add_threads(p), _add_shard(p)
    p.add_argument("--data", required=True, help="data.zarr of the run")
    p.add_argument("--out", required=True, help="output superpixels store (.zarr)")

    p = command("gather", cmd_gather, "merge shard stores (disjoint images) into one finished store")
    p.add_argument("--kind", required=True, help="store kind: superpixels, scores or labels")
    p.add_argument("--out", required=True, help="output store (.zarr)")
    p.add_argument("shard_stores", nargs="+", help="the shard stores to merge")

    p = command("train-cam", cmd_train_cam, "train the SPN / CAM classifier on image-level labels (resumes)")
    _add_config(p), _add_threads(p), _add_gpus(p)
    p.add_argument("--data", required=True, help="data.zarr of the run")
    p.add_argument("--superpixels", required=True, help="superpixels store of the run")
    p.add_argument("--out-dir", required=True, help="writes model.pt, train_log.csv, checkpoints/")

    p = command("infer-cam", cmd_infer_cam, "multi-scale CAM and SP-CAM score maps for every image")
    _add_config(p), _add_threads(p), _add_shard(p), _add_gpus(p)
    p.add_argument("--data", required=True, help="data.zarr of the run")
    p.add_argument("--superpixels", required=True, help="superpixels store of the run")
    p.add_argument("--model", required=True, help="cam/model.pt written by train-cam")
    p.add_argument("--out", required=True, help="output scores store (keys cam, spcam)")

    for name, fn, text in (
        ("clean", cmd_clean, "annotation cleaning: keep what the scores say with confidence"),
        (
            "decide",
            cmd_decide,
            "dense labels: argmax over the image's (or predicted) classes, "
            "background by the calibrated threshold",
        ),
        ("crf", cmd_crf, "dense CRF refinement of score maps"),
    ):
        p = command(name, fn, text)
        _add_config(p), _add_shard(p)
        if name == "crf":
            _add_threads(p)
        p.add_argument("--split", help="which split's images (default: the train split)")
        p.add_argument(
            "--labels-from",
            help="CAM scores store whose classifier predicts the labels of images "
            "outside the train split (segment.val_labels: predicted); else all classes compete",
        )
        p.add_argument("--data", required=True, help="data.zarr of the run")
        p.add_argument("--scores", required=True, help="scores store to turn into labels")
        p.add_argument("--key", default="spcam", help="score maps to use: spcam, cam or seg")
        p.add_argument("--out", required=True, help="output labels store (.zarr)")
        if name == "clean":
            p.add_argument("--ratio", type=float, default=None, help="override pseudo.clean_ratio")

    p = command(
        "reliable", cmd_reliable, "RRM reliable regions: CRF label where it agrees with a confident CAM label"
    )
    _add_config(p), _add_shard(p)
    p.add_argument("--data", required=True, help="data.zarr of the run")
    p.add_argument("--scores", required=True, help="scores store of the confident labels")
    p.add_argument("--key", default="spcam", help="score maps to use: spcam, cam or seg")
    p.add_argument("--crf", required=True, help="labels store of the CRF stage")
    p.add_argument("--out", required=True, help="output labels store (.zarr), 255 = not reliable")
    p.add_argument("--confidence", type=float, default=None, help="override pseudo.reliable.confidence")

    p = command(
        "reliability", cmd_reliability, "divergence (perimeter^2/area) per annotation and top-K selection"
    )
    _add_config(p)
    p.add_argument("--data", required=True, help="data.zarr of the run")
    p.add_argument("--labels", required=True, help="labels store whose annotations are scored")
    p.add_argument("--out", required=True, help="CSV of scores and selection")

    p = command("train-seg", cmd_train_seg, "train a segmentation net on selected pseudo-labels (resumes)")
    _add_config(p), _add_threads(p), _add_gpus(p)
    p.add_argument("--data", required=True, help="data.zarr of the run")
    p.add_argument("--labels", required=True, help="labels store of the annotations to train on")
    p.add_argument("--selection", required=True, help="reliability CSV with image_selected")
    p.add_argument("--out-dir", required=True, help="writes model.pt, train_log.csv, checkpoints/")

    p = command(
        "train-joint",
        cmd_train_joint,
        "one-stage training (joint.method annealed or rrm): a CAM head and a segmentation head on labels "
        "mined online from its CAMs; writes a round-0 segmentation model (resumes)",
    )
    _add_config(p), _add_threads(p), _add_gpus(p)
    p.add_argument("--data", required=True, help="data.zarr of the run")
    p.add_argument("--superpixels", required=True, help="superpixels store (SPN head, padding of the views)")
    p.add_argument("--out-dir", required=True, help="writes model.pt, train_log.csv, checkpoints/")

    p = command(
        "predict-seg", cmd_predict_seg, "segmentation-net class probabilities for a split (scores store)"
    )
    _add_config(p), _add_shard(p), _add_threads(p), _add_gpus(p)
    p.add_argument("--data", required=True, help="data.zarr of the run")
    p.add_argument(
        "--model", required=True, help="round<r>/model.pt written by train-seg (round 0: train-joint)"
    )
    p.add_argument("--split", required=True, help="which split's images")
    p.add_argument("--out", required=True, help="output scores store (key seg)")

    p = command("evaluate", cmd_evaluate, "metrics of a labels or scores store against ground truth")
    _add_config(p)
    p.add_argument("--data", required=True, help="data.zarr of the run")
    p.add_argument("--gt", required=True, help="gt.zarr of the run (images without a mask are skipped)")
    p.add_argument("--pred", required=True, help="labels store or scores store")
    p.add_argument("--stage", required=True, help="stage name written in the rows: " + STAGE_HELP)
    p.add_argument("--split", required=True, help="which split's images")
    p.add_argument("--out", required=True, help="output tidy metrics CSV")
    p.add_argument("--selection", help="reliability CSV: also rows <stage>_selected for the selected images")
    p.add_argument("--per-image", help="CSV of per-image mIoU")
    p.add_argument(
        "--key", help="score key of a scores store (default: the only key, or the one named like --stage)"
    )

    p = command(
        "oracle", cmd_oracle, "superpixel oracle: mIoU when each superpixel takes its majority GT class"
    )
    p.add_argument("--data", required=True, help="data.zarr of the run")
    p.add_argument("--gt", required=True, help="gt.zarr of the run")
    p.add_argument("--superpixels", required=True, help="superpixels store of the run")
    p.add_argument("--split", required=True, help="which split's images")
    p.add_argument("--out", required=True, help="output tidy metrics CSV")

    p = command(
        "reliability-curve", cmd_reliability_curve, "mIoU of the top-k most reliable annotations vs k"
    )
    p.add_argument("--gt", required=True, help="gt.zarr of the run")
    p.add_argument("--labels", required=True, help="labels store of the ranked annotations")
    p.add_argument("--reliability", required=True, help="reliability CSV (image_divergence ranks the images)")
    p.add_argument(
        "--points", type=int, required=True, help="points on the curve (evaluate.reliability_curve_points)"
    )
    p.add_argument("--out", required=True, help="output CSV (k, fraction, miou)")

    p = command("metrics", cmd_metrics, "combine per-stage metric CSVs into metrics.csv")
    p.add_argument("--out", required=True, help="output metrics.csv")
    p.add_argument("csvs", nargs="+", help="tidy metric CSVs, in pipeline order")

    p = command(
        "resolve-config",
        cmd_resolve_config,
        "print or write a run's resolved config: every key, schema defaults filled in",
    )
    p.add_argument(
        "--config",
        default="config.yaml",
        help="run config: a YAML file (without 'run:' the run is named after the file) or an inline "
        "JSON object",
    )
    p.add_argument("--out", help="write this YAML file (atomically) instead of printing")

    p = command("predict", cmd_predict, "segment new images with a trained model (palette PNG per image)")
    p.add_argument("--model", required=True, help="model.pt of a segmentation round")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--probabilities", action="store_true", help="also write <id>.npy class probabilities")
    p.add_argument(
        "--prior-adjustment",
        type=_non_negative,
        metavar="TAU",
        help="divide the training labels' class prior out, p(c|x) / prior(c)^TAU "
        "(default: the segment.prior_adjustment the model was trained with)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--overlay",
        action="store_true",
        help="also write <id>_overlay.png (the image under its label colours) and legend.png "
        "(colour and name of each class found)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace output files that exist (default: refuse)"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image (default: skip it with one line, go on, exit 3)",
    )

    p = command("inspect", cmd_inspect, "render per-image panels of every intermediate of a run")
    p.add_argument("run_dir", help="the run's folder, e.g. results/demo")
    p.add_argument("--ids", nargs="+", help="image ids")
    p.add_argument("--worst", type=int, help="the N images with the lowest per-image mIoU at --stage")
    p.add_argument("--stage", help="stage for --worst: " + STAGE_HELP)
    p.add_argument("--class", dest="class_name", help="images labelled with this class")
    p.add_argument("--out", help="output folder (default <run dir>/inspect)")

    p = command("report", cmd_report, "write the static HTML report of a run (one self-contained page)")
    p.add_argument("run_dir", help="the run's folder, e.g. results/demo")
    p.add_argument("--out", help="default <run dir>/report/index.html")
    p.add_argument(
        "--gallery",
        type=int,
        default=None,
        help="images in the gallery (default: the run's inspect.gallery_images)",
    )

    p = command(
        "benchmark", cmd_benchmark, "benchmarks on a real dataset (MSRC-21): prints a table, writes CSV"
    )
    p.add_argument(
        "what",
        choices=["superpixels", "crf", "pipeline", "bytes", "methods", "joint"],
        help="what to measure (joint: the one-stage variants next to the config's two-step run)",
    )
    p.add_argument("--root", default="../shared/data/msrc21", help="dataset folder")
    p.add_argument(
        "--config", default="config/msrc21.yaml", help="run config for the pipeline and methods benchmarks"
    )
    p.add_argument("--out", default="bench", help="folder for CSV output")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=["cam", "spn", "seam", "dual"],
        default=["cam", "spn", "seam", "dual"],
        help="methods: the CAM generators to compare",
    )
    p.add_argument(
        "--joint-methods",
        nargs="+",
        choices=["annealed", "rrm"],
        default=["annealed", "rrm"],
        help="joint: the one-stage methods to compare",
    )
    p.add_argument(
        "--split", help="methods: the split inferred and evaluated (default: the config's train split)"
    )
    p.add_argument(
        "--iterations",
        type=int,
        help="methods, joint: training iterations of every method (default: cam.iterations, joint.iterations)",
    )
    p.add_argument(
        "--infer-scales",
        type=float,
        nargs="+",
        help="methods: inference scales of every method (default: cam.infer_scales)",
    )
    _add_threads(p)
    return parser


# Commands whose outputs are not the pipeline's: predict writes where its user says, inspect its own
# viewer folder, and benchmark starts a workflow that takes the run lock itself.
_OUTSIDE_RUN_LOCK = ("predict", "inspect", "benchmark")


def _outputs(args) -> list:
    """The paths a command writes (for the run lock)."""
    if args.command in _OUTSIDE_RUN_LOCK:
        return []
    if args.command == "report":
        return [args.out or Path(args.run_dir) / "report" / "index.html"]
    names = ("out", "out_dir", "per_image") + (("data", "gt") if args.command == "ingest" else ())
    return [value for value in (getattr(args, name, None) for name in names) if value]


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (UserError, FileNotFoundError, FileExistsError)):
        return True
    # inspect's SelectionError predates UserError; look it up only when inspect is loaded.
    panels = sys.modules.get("weakseg.inspect.panels")
    return panels is not None and isinstance(exc, panels.SelectionError)


def _exit_on_sigterm(signum, frame):
    """SIGTERM (Slurm, Snakemake stopping jobs) unwinds like Ctrl-C: temporaries removed, lock released."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    from weakseg import store

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    try:
        with store.run_writer(_outputs(args), command=" ".join(["weakseg", *(argv or sys.argv[1:])])):
            args.fn(args)
    except Exception as exc:
        if not _is_user_error(exc):
            raise  # a bug: keep the traceback (exit status 1)
        if args.verbose:
            traceback.print_exception(exc, file=sys.stderr)
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"weakseg {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
