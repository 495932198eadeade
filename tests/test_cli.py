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

SMALL = {
    "dataset": {"synthetic": {"n_train": 3, "n_val": 2, "height": 40, "width": 48, "n_classes": 3}},
    "superpixels": {"n_segments": 20},
}


def _commands() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_every_command_is_listed():
    assert {
        "synth",
        "ingest",
        "superpixels",
        "gather",
        "train-cam",
        "infer-cam",
        "clean",
        "crf",
        "rrm",
        "reliability",
        "train-seg",
        "predict-seg",
        "evaluate",
        "oracle",
        "metrics",
        "predict",
        "inspect",
        "report",
    } <= set(_commands())


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
    code = (
        "import sys\nfrom weakseg import cli\n"
        "try:\n    cli.main(['train-cam', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'zarr', 'cv2', 'pandas') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["train-cam", "--help"], ["predict", "--help"]])
def test_help_does_not_import_torch(argv):
    # Commands are declared next to their stage functions; the network stages' functions are imported
    # only when they run, so help and the CPU stages never pay for loading torch.
    code = (
        "import sys\nfrom weakseg import cli\n"
        f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_synth_ingest_superpixels_gather_through_the_cli(tmp_path):
    cfg = json.dumps(SMALL)
    folder, data, gt = tmp_path / "synthetic", tmp_path / "data.zarr", tmp_path / "gt.zarr"
    assert cli.main(["synth", "--config", cfg, "--out", str(folder)]) == 0
    assert len(list((folder / "JPEGImages").iterdir())) == 5
    assert (
        cli.main(["ingest", "--config", cfg, "--root", str(folder), "--data", str(data), "--gt", str(gt)])
        == 0
    )
    info, _ = open_data(data)
    assert len(info.ids) == 5 and info.n_classes == 4

    shards = [tmp_path / f"sp{s}.zarr" for s in range(2)]
    for s, path in enumerate(shards):
        argv = [
            "superpixels",
            "--config",
            cfg,
            "--data",
            str(data),
            "--out",
            str(path),
            "--shard",
            str(s),
            "--shards",
            "2",
        ]
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


def _ingest_argv(root, tmp_path) -> list[str]:
    return [
        "ingest",
        "--config",
        "{}",
        "--root",
        str(root),
        "--data",
        str(tmp_path / "d.zarr"),
        "--gt",
        str(tmp_path / "g.zarr"),
    ]


def test_ingest_of_a_bad_dataset_is_one_line_and_exit_3(synthetic_folder, tmp_path, capsys):
    (synthetic_folder / "classes.txt").unlink()
    argv = _ingest_argv(synthetic_folder, tmp_path)
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
    argv = _ingest_argv(synthetic_folder, tmp_path)
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
    assert (
        cli.main(
            [
                "superpixels",
                "--config",
                '{"cam": {"lr": "x"}}',
                "--data",
                str(tmp_path / "d.zarr"),
                "--out",
                str(tmp_path / "sp.zarr"),
            ]
        )
        == 3
    )
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "cam.lr" in lines[0]

    assert (
        cli.main(
            [
                "superpixels",
                "--config",
                str(tmp_path / "nope.yaml"),
                "--data",
                str(tmp_path / "d.zarr"),
                "--out",
                str(tmp_path / "sp.zarr"),
            ]
        )
        == 3
    )
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "nope.yaml: config file not found" in lines[0]

    assert (
        cli.main(
            [
                "superpixels",
                "--config",
                "{}",
                "--data",
                str(tmp_path / "d.zarr"),
                "--out",
                str(tmp_path / "sp.zarr"),
            ]
        )
        == 3
    )
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "d.zarr: store not found" in lines[0]

    assert (
        cli.main(
            [
                "gather",
                "--kind",
                "superpixels",
                "--out",
                str(tmp_path / "g.zarr"),
                str(tmp_path / "shard0.zarr"),
            ]
        )
        == 3
    )
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "shard0.zarr: store not found" in lines[0]


def test_predict_reports_an_unreadable_image_and_a_bad_tau_in_one_line(tmp_path, capsys, caplog):
    from weakseg import config as wconfig
    from weakseg.nets.model_file import save_model
    from weakseg.segment.models import build_segmenter

    config = wconfig.load({"device": "cpu", "segment": {"pretrained": False, "infer_scales": [1.0]}})
    save_model(
        tmp_path / "model.pt",
        build_segmenter(config["segment"], 3, True),
        config,
        ["background", "a", "b"],
        True,
        "segment",
    )
    (tmp_path / "broken.jpg").write_bytes(b"not a JPEG")
    predict = ["predict", "--model", str(tmp_path / "model.pt"), str(tmp_path / "broken.jpg")]
    predict += ["--out", str(tmp_path / "out")]
    assert cli.main([*predict, "--device", "cpu"]) == 3
    err = capsys.readouterr().err
    assert "broken.jpg: unreadable image" in caplog.text  # the line for the image, as it is skipped
    assert (
        "weakseg predict: error: skipped 1 of 1 images that could not be read" in err and "broken.jpg" in err
    )
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*predict, "--prior-adjustment", "-1"])
    assert (
        exit_info.value.code == 2 and "--prior-adjustment: expected a number >= 0" in capsys.readouterr().err
    )


def test_version(capsys):
    from weakseg import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"weakseg {__version__}"


def test_top_level_help_speaks_to_users(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "image-level labels" in out and "snakemake --cores 2 --configfile my.yaml" in out
    assert "weakseg COMMAND --help" in out


# `predict` belongs to another change (its --overlay and exit codes); its options are checked there.
@pytest.mark.parametrize("command", [c for c in _commands() if c != "predict"])
def test_every_option_has_help_and_shows_its_default(command):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, (
            f"weakseg {command} {'/'.join(action.option_strings) or action.dest}: no help text"
        )
    text = sub.format_help()
    for action in sub._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert f"default: {action.default}" in " ".join(text.split()), (command, action.dest)


def test_stage_help_names_real_stages(capsys):
    with pytest.raises(SystemExit):
        cli.main(["inspect", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "round<r>_gated" in out and "spcam" in out and "round1 " not in out


def test_resolve_config_prints_every_key_and_names_the_run_after_the_file(tmp_path, capsys):
    import yaml

    path = tmp_path / "field.yaml"
    path.write_text("cam: {iterations: 7}\n")
    assert cli.main(["resolve-config", "--config", str(path)]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["run"] == "field" and resolved["cam"]["iterations"] == 7
    assert resolved["segment"]["log_every"] >= 1 and "workers" not in resolved["cam"]
    assert cli.main(["resolve-config", "--config", str(path), "--out", str(tmp_path / "r.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "r.yaml").read_text().split("\n", 1)[1]) == resolved


def test_a_gpu_job_without_a_gpu_fails_at_once_in_one_line(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [
        "train-cam",
        "--config",
        "{}",
        "--gpus",
        "1",
        "--data",
        str(tmp_path / "d.zarr"),
        "--superpixels",
        str(tmp_path / "s.zarr"),
        "--out-dir",
        str(tmp_path / "cam"),
    ]
    assert cli.main(argv) == 3
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "resources.gpu: this job asked for 1 GPU(s)" in lines[0]
    # device: cpu says the CPU is fine: the command goes on (and stops at the missing store instead)
    assert cli.main([*argv[:2], '{"device": "cpu"}', *argv[3:]]) == 3
    assert "d.zarr: store not found" in _error_lines(capsys)[0]
