"""The ``weakseg`` command line: help for every command, wiring of the foundation commands, and
bad input as one line with exit status 3 (no traceback); usage errors exit with 2."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from weakseg import cli, store
from weakseg.datasets import open_data

SMALL = {"dataset": {"synthetic": {"n_train": 3, "n_val": 2, "height": 40, "width": 48, "n_classes": 3}},
         "superpixels": {"n_segments": 20}}


def _commands() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_every_command_is_listed():
    assert {"synth", "ingest", "superpixels", "gather", "train-cam", "infer-cam", "clean", "crf", "reliable",
            "reliability", "train-seg", "predict-seg", "evaluate", "oracle", "metrics", "predict", "inspect",
            "report"} <= set(_commands())


def test_top_level_help_exits_0_and_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: weakseg")
    assert all(command in out for command in _commands())


@pytest.mark.parametrize("command", _commands())
def test_command_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: weakseg {command}")


def test_missing_command_or_argument_is_a_usage_error(capsys):
    for argv in ([], ["ingest"], ["nosuchcommand"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert "usage: weakseg" in capsys.readouterr().err


def test_help_does_not_import_the_heavy_stage_modules():
    code = ("import sys\nfrom weakseg import cli\n"
            "try:\n    cli.main(['train-cam', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'zarr', 'cv2', 'pandas') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_synth_ingest_superpixels_gather_through_the_cli(tmp_path):
    cfg = json.dumps(SMALL)
    folder, data, gt = tmp_path / "synthetic", tmp_path / "data.zarr", tmp_path / "gt.zarr"
    assert cli.main(["synth", "--config", cfg, "--out", str(folder)]) == 0
    assert len(list((folder / "JPEGImages").iterdir())) == 5
    assert cli.main(["ingest", "--config", cfg, "--root", str(folder), "--data", str(data), "--gt", str(gt)]) == 0
    info, _ = open_data(data)
    assert len(info.ids) == 5 and info.n_classes == 4

    shards = [tmp_path / f"sp{s}.zarr" for s in range(2)]
    for s, path in enumerate(shards):
        argv = ["superpixels", "--config", cfg, "--data", str(data), "--out", str(path), "--shard", str(s),
                "--shards", "2"]
        assert cli.main(argv) == 0
    gathered = tmp_path / "superpixels.zarr"
    assert cli.main(["gather", "--kind", "superpixels", "--out", str(gathered), *map(str, shards)]) == 0
    group = store.open_store(gathered, "superpixels")
    assert store.ids_in(group, store.SUPERPIXELS) == sorted(info.ids)
    labels = store.get(group, store.SUPERPIXELS, info.ids[0])
    assert labels.shape == (40, 48) and labels.dtype == np.int32 and labels.max() >= 5


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line]


def test_ingest_of_a_bad_dataset_is_one_line_and_exit_3(synthetic_folder, tmp_path, capsys):
    (synthetic_folder / "classes.txt").unlink()
    argv = ["ingest", "--config", "{}", "--root", str(synthetic_folder), "--data", str(tmp_path / "d.zarr"),
            "--gt", str(tmp_path / "g.zarr")]
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("weakseg ingest: error: ")
    assert str(synthetic_folder / "classes.txt") in lines[0]
    assert not (tmp_path / "d.zarr").exists()


def test_ingest_error_in_the_image_loop_is_one_error_line(synthetic_folder, tmp_path, capsys):
    image_id = (synthetic_folder / "val.txt").read_text().split()[0]
    (synthetic_folder / "JPEGImages" / f"{image_id}.png").unlink()
    argv = ["ingest", "--config", "{}", "--root", str(synthetic_folder), "--data", str(tmp_path / "d.zarr"),
            "--gt", str(tmp_path / "g.zarr")]
    assert cli.main(argv) == 3
    lines = _error_lines(capsys)
    assert len(lines) == 1 and image_id in lines[0] and "image file not found" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no store, no temp dir


def test_ingest_without_a_dataset_root_names_the_key_and_exits_3(tmp_path, capsys):
    argv = ["ingest", "--config", "{}", "--data", str(tmp_path / "d.zarr"), "--gt", str(tmp_path / "g.zarr")]
    assert cli.main(argv) == 3
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "dataset.root" in lines[0]


def test_config_and_store_errors_exit_3_naming_the_problem(tmp_path, capsys):
    assert cli.main(["superpixels", "--config", '{"cam": {"lr": "x"}}', "--data", str(tmp_path / "d.zarr"),
                     "--out", str(tmp_path / "sp.zarr")]) == 3
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "cam.lr" in lines[0]

    assert cli.main(["superpixels", "--config", str(tmp_path / "nope.yaml"), "--data", str(tmp_path / "d.zarr"),
                     "--out", str(tmp_path / "sp.zarr")]) == 3
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "nope.yaml: config file not found" in lines[0]

    assert cli.main(["superpixels", "--config", "{}", "--data", str(tmp_path / "d.zarr"),
                     "--out", str(tmp_path / "sp.zarr")]) == 3
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "d.zarr: store not found" in lines[0]

    assert cli.main(["gather", "--kind", "superpixels", "--out", str(tmp_path / "g.zarr"),
                     str(tmp_path / "shard0.zarr")]) == 3
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "shard0.zarr: store not found" in lines[0]


def test_predict_reports_an_unreadable_image_and_a_bad_tau_in_one_line(tmp_path, capsys, caplog):
    from weakseg import config as wconfig
    from weakseg.segment.models import build_segmenter
    from weakseg.training import save_model

    config = wconfig.load({"device": "cpu", "segment": {"pretrained": False, "infer_scales": [1.0]}})
    save_model(tmp_path / "model.pt", build_segmenter(config["segment"], 3, True), config, ["background", "a", "b"],
               True, "segment")
    (tmp_path / "broken.jpg").write_bytes(b"not a JPEG")
    assert cli.main(["predict", "--model", str(tmp_path / "model.pt"), str(tmp_path / "broken.jpg"),
                     "--out", str(tmp_path / "out"), "--device", "cpu"]) == 3
    err = capsys.readouterr().err
    assert "broken.jpg: unreadable image" in caplog.text  # the line for the image, as it is skipped
    assert "weakseg predict: error: skipped 1 of 1 images that could not be read" in err and "broken.jpg" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "--model", str(tmp_path / "model.pt"), str(tmp_path / "broken.jpg"),
                  "--out", str(tmp_path / "out"), "--prior-adjustment", "-1"])
    assert exit_info.value.code == 2 and "--prior-adjustment: expected a number >= 0" in capsys.readouterr().err
