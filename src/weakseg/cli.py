"""``weakseg`` command line: argument parsing only; every command calls one stage function.

Snakemake rules call these commands with ``--config '<json>'`` (the config sections the stage
uses); people call them by hand with ``--config config.yaml``. Stage modules are imported lazily so
that ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("weakseg")


def _config(args):
    from weakseg.config import load

    return load(args.config)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="config.yaml",
                   help="run config: a YAML file or an inline JSON object (default: config.yaml)")


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


def cmd_train_cam(a):
    from weakseg.cam.train import run_train_cam

    run_train_cam(_config(a), a.data, a.superpixels, a.out_dir, threads=a.threads)


def cmd_infer_cam(a):
    from weakseg.cam.infer import run_infer_cam

    run_infer_cam(_config(a), a.data, a.superpixels, a.model, a.out, threads=a.threads, shard=a.shard,
                  n_shards=a.shards)


def cmd_clean(a):
    from weakseg.pseudo.clean import run_clean

    run_clean(_config(a), a.data, a.scores, a.key, a.out, ratio=a.ratio, shard=a.shard, n_shards=a.shards,
              split=a.split, labels_from=a.labels_from)


def cmd_decide(a):
    from weakseg.pseudo.clean import run_decide

    run_decide(_config(a), a.data, a.scores, a.key, a.out, shard=a.shard, n_shards=a.shards, split=a.split,
               labels_from=a.labels_from)


def cmd_reliability(a):
    from weakseg.pseudo.reliability import run_reliability

    run_reliability(_config(a), a.data, a.labels, a.out)


def cmd_crf(a):
    from weakseg.pseudo.crf import run_crf

    run_crf(_config(a), a.data, a.scores, a.key, a.out, a.threads, shard=a.shard, n_shards=a.shards, split=a.split,
            labels_from=a.labels_from)


def cmd_reliable(a):
    from weakseg.pseudo.reliable import run_reliable

    run_reliable(_config(a), a.data, a.scores, a.key, a.crf, a.out, shard=a.shard, n_shards=a.shards,
                 confidence=a.confidence)


def cmd_train_seg(a):
    from weakseg.segment.train import run_train_seg

    run_train_seg(_config(a), a.data, a.labels, a.selection, a.out_dir, threads=a.threads)


def cmd_predict_seg(a):
    from weakseg.segment.predict import run_predict_store

    run_predict_store(_config(a), a.data, a.model, a.split, a.out, shard=a.shard, n_shards=a.shards,
                      threads=a.threads)


def cmd_evaluate(a):
    from weakseg.evaluate import run_evaluate

    run_evaluate(_config(a), a.data, a.gt, a.pred, a.stage, a.split, a.out, selection_csv=a.selection,
                 per_image_csv=a.per_image, key=a.key)


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

    try:
        written = predict_files(a.model, a.inputs, a.out, a.probabilities, device=a.device,
                                prior_adjustment=a.prior_adjustment)
    except ValueError as exc:  # an unreadable image, a model file of another kind: the user's input
        print(f"weakseg predict: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(f"wrote {len(written)} label maps to {a.out}")


def cmd_inspect(a):
    from weakseg.inspect.panels import run_inspect

    written = run_inspect(a.run_dir, a.out or Path(a.run_dir) / "inspect", ids=a.ids, worst=a.worst,
                          stage=a.stage, class_name=a.class_name)
    print(f"wrote {len(written)} panels to {a.out or Path(a.run_dir) / 'inspect'}")


def cmd_report(a):
    from weakseg.inspect.report import write_report

    out = a.out or Path(a.run_dir) / "report" / "index.html"
    write_report(a.run_dir, out, gallery_images=a.gallery)
    print(f"report: {out}")


def cmd_benchmark(a):
    from weakseg.benchmark import run_benchmark

    run_benchmark(a.what, a.root, a.out, a.config, a.threads, methods=a.methods, split=a.split,
                  iterations=a.iterations, infer_scales=a.infer_scales)


# --- parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weakseg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, fn, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        return p

    p = command("synth", cmd_synth, "write the deterministic synthetic dataset as a VOC-style folder")
    _add_config(p)
    p.add_argument("--out", required=True, help="output folder")

    p = command("ingest", cmd_ingest, "read a VOC-style dataset folder into data.zarr (images, labels) and gt.zarr")
    _add_config(p)
    p.add_argument("--root", help="dataset folder (overrides dataset.root)")
    p.add_argument("--data", required=True, help="output data.zarr")
    p.add_argument("--gt", required=True, help="output gt.zarr (masks; read by evaluation only)")

    p = command("superpixels", cmd_superpixels, "compute superpixels of every image")
    _add_config(p), _add_threads(p), _add_shard(p)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)

    p = command("gather", cmd_gather, "merge shard stores (disjoint images) into one finished store")
    p.add_argument("--kind", required=True, help="store kind: superpixels, scores or labels")
    p.add_argument("--out", required=True)
    p.add_argument("shard_stores", nargs="+")

    p = command("train-cam", cmd_train_cam, "train the SPN / CAM classifier on image-level labels (resumes)")
    _add_config(p), _add_threads(p)
    p.add_argument("--data", required=True)
    p.add_argument("--superpixels", required=True)
    p.add_argument("--out-dir", required=True, help="writes model.pt, train_log.csv, checkpoints/")

    p = command("infer-cam", cmd_infer_cam, "multi-scale CAM and SP-CAM score maps for every image")
    _add_config(p), _add_threads(p), _add_shard(p)
    p.add_argument("--data", required=True)
    p.add_argument("--superpixels", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)

    for name, fn, text in (("clean", cmd_clean, "annotation cleaning: keep what the scores say with confidence"),
                           ("decide", cmd_decide, "dense labels: argmax over the image's (or predicted) classes, "
                                                  "background by the calibrated threshold"),
                           ("crf", cmd_crf, "dense CRF refinement of score maps")):
        p = command(name, fn, text)
        _add_config(p), _add_shard(p)
        if name == "crf":
            _add_threads(p)
        p.add_argument("--split", help="which split's images (default: the train split)")
        p.add_argument("--labels-from", help="CAM scores store whose classifier predicts the labels of images "
                       "outside the train split (segment.val_labels: predicted); else all classes compete")
        p.add_argument("--data", required=True)
        p.add_argument("--scores", required=True)
        p.add_argument("--key", default="spcam", help="score maps to use: spcam, cam or seg")
        p.add_argument("--out", required=True)
        if name == "clean":
            p.add_argument("--ratio", type=float, default=None, help="override pseudo.clean_ratio")

    p = command("reliable", cmd_reliable, "RRM reliable regions: CRF label where it agrees with a confident CAM label")
    _add_config(p), _add_shard(p)
    p.add_argument("--data", required=True)
    p.add_argument("--scores", required=True)
    p.add_argument("--key", default="spcam")
    p.add_argument("--crf", required=True, help="labels store of the CRF stage")
    p.add_argument("--out", required=True)
    p.add_argument("--confidence", type=float, default=None, help="override pseudo.reliable.confidence")

    p = command("reliability", cmd_reliability, "divergence (perimeter^2/area) per annotation and top-K selection")
    _add_config(p)
    p.add_argument("--data", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--out", required=True, help="CSV of scores and selection")

    p = command("train-seg", cmd_train_seg, "train a segmentation net on selected pseudo-labels (resumes)")
    _add_config(p), _add_threads(p)
    p.add_argument("--data", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--selection", required=True, help="reliability CSV with image_selected")
    p.add_argument("--out-dir", required=True)

    p = command("predict-seg", cmd_predict_seg, "segmentation-net class probabilities for a split (scores store)")
    _add_config(p), _add_shard(p), _add_threads(p)
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True)

    p = command("evaluate", cmd_evaluate, "metrics of a labels or scores store against ground truth")
    _add_config(p)
    p.add_argument("--data", required=True)
    p.add_argument("--gt", required=True)
    p.add_argument("--pred", required=True, help="labels store or scores store")
    p.add_argument("--stage", required=True, help="stage name written in the rows (cam, spcam, crf, round1, ...)")
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--selection", help="reliability CSV: also rows <stage>_selected for the selected images")
    p.add_argument("--per-image", help="CSV of per-image mIoU")
    p.add_argument("--key", help="score key of a scores store (default: the only key, or the one named like --stage)")

    p = command("oracle", cmd_oracle, "superpixel oracle: mIoU when each superpixel takes its majority GT class")
    p.add_argument("--data", required=True)
    p.add_argument("--gt", required=True)
    p.add_argument("--superpixels", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True)

    p = command("reliability-curve", cmd_reliability_curve, "mIoU of the top-k most reliable annotations vs k")
    p.add_argument("--gt", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--reliability", required=True)
    p.add_argument("--points", type=int, required=True, help="points on the curve (evaluate.reliability_curve_points)")
    p.add_argument("--out", required=True)

    p = command("metrics", cmd_metrics, "combine per-stage metric CSVs into metrics.csv")
    p.add_argument("--out", required=True)
    p.add_argument("csvs", nargs="+")

    p = command("predict", cmd_predict, "segment new images with a trained model (palette PNG per image)")
    p.add_argument("--model", required=True, help="model.pt of a segmentation round")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--probabilities", action="store_true", help="also write <id>.npy class probabilities")
    p.add_argument("--prior-adjustment", type=_non_negative, metavar="TAU",
                   help="divide the training labels' class prior out, p(c|x) / prior(c)^TAU "
                        "(default: the segment.prior_adjustment the model was trained with)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")

    p = command("inspect", cmd_inspect, "render per-image panels of every intermediate of a run")
    p.add_argument("run_dir")
    p.add_argument("--ids", nargs="+", help="image ids")
    p.add_argument("--worst", type=int, help="the N images with the lowest per-image mIoU at --stage")
    p.add_argument("--stage", help="stage for --worst (e.g. spcam, crf, reliable, round1)")
    p.add_argument("--class", dest="class_name", help="images labelled with this class")
    p.add_argument("--out", help="output folder (default <run dir>/inspect)")

    p = command("report", cmd_report, "write the static HTML report of a run")
    p.add_argument("run_dir")
    p.add_argument("--out", help="default <run dir>/report/index.html")
    p.add_argument("--gallery", type=int, default=None, help="panels in the gallery (default: config inspect.gallery_images)")

    p = command("benchmark", cmd_benchmark, "benchmarks on a real dataset (MSRC-21): prints a table, writes CSV")
    p.add_argument("what", choices=["superpixels", "crf", "pipeline", "bytes", "methods"])
    p.add_argument("--root", default="../shared/data/msrc21", help="dataset folder")
    p.add_argument("--config", default="config/msrc21.yaml", help="run config for the pipeline and methods benchmarks")
    p.add_argument("--out", default="bench", help="folder for CSV output")
    p.add_argument("--methods", nargs="+", choices=["cam", "spn", "seam", "dual"], default=["cam", "spn", "seam", "dual"],
                   help="methods: the CAM generators to compare (default: all)")
    p.add_argument("--split", help="methods: the split inferred and evaluated (default: the config's train split)")
    p.add_argument("--iterations", type=int, help="methods: training iterations of every method (default: cam.iterations)")
    p.add_argument("--infer-scales", type=float, nargs="+",
                   help="methods: inference scales of every method (default: cam.infer_scales)")
    _add_threads(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from weakseg.config import ConfigError
    from weakseg.datasets.folder import DatasetError
    from weakseg.inspect.panels import SelectionError
    from weakseg.store import StoreError

    try:
        args.fn(args)
    except (ConfigError, DatasetError, StoreError, SelectionError, FileNotFoundError, FileExistsError) as exc:
        # Expected user-facing problems: one clear line, no traceback.
        print(f"weakseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
