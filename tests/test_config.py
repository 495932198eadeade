"""Config loading: schema defaults filled in, every error names its key path, YAML / inline JSON / dict."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from weakseg import config
from weakseg.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _schema_defaults(node: dict) -> dict:
    """Defaults read straight from the schema, independently of config._fill_defaults."""
    out = {}
    for key, sub in node.get("properties", {}).items():
        if sub.get("type") == "object":
            out[key] = _schema_defaults(sub)
        elif "default" in sub:
            out[key] = sub["default"]
    return out


def test_defaults_are_filled_from_the_schema():
    cfg = config.load(None)
    assert cfg == _schema_defaults(config.schema())
    assert cfg == config.load({})
    # Spot checks that the nesting really happened (not just top-level keys).
    assert cfg["cam"]["lr"] == config.schema()["properties"]["cam"]["properties"]["lr"]["default"]
    assert set(cfg["pseudo"]["crf"]) == set(
        config.schema()["properties"]["pseudo"]["properties"]["crf"]["properties"]
    )
    assert config.run_dir(cfg) == Path(cfg["results"]) / cfg["run"]


def test_given_values_are_kept_and_siblings_get_defaults():
    given = {
        "run": "r1",
        "cam": {"lr": 0.5},
        "pseudo": {"crf": {"iterations": 3}},
        "dataset": {"synthetic": {"n_train": 2}},
    }
    original = copy.deepcopy(given)
    cfg = config.load(given)
    defaults = config.load(None)
    assert cfg["run"] == "r1" and cfg["cam"]["lr"] == 0.5
    assert cfg["pseudo"]["crf"]["iterations"] == 3
    assert cfg["pseudo"]["crf"]["gaussian_sxy"] == defaults["pseudo"]["crf"]["gaussian_sxy"]
    assert cfg["pseudo"]["clean_ratio"] == defaults["pseudo"]["clean_ratio"]
    assert cfg["dataset"]["synthetic"]["n_train"] == 2
    assert cfg["dataset"]["synthetic"]["seed"] == defaults["dataset"]["synthetic"]["seed"]
    assert cfg["cam"]["iterations"] == defaults["cam"]["iterations"]
    assert given == original  # the caller's dict is not modified


def test_default_lists_are_not_shared_between_loads():
    a = config.load(None)
    a["cam"]["train_sizes"].append(999)
    assert 999 not in config.load(None)["cam"]["train_sizes"]


@pytest.mark.parametrize(
    "bad, key_path, expectation",
    [
        ({"cam": {"lrr": 0.1}}, "cam.lrr", "unknown key"),
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"pseudo": {"crf": {"sxy": 3}}}, "pseudo.crf.sxy", "unknown key"),
        ({"cam": {"lr": "x"}}, "cam.lr", "'x' is not of type 'number'"),
        ({"cam": {"lr": 0}}, "cam.lr", "less than or equal to the minimum of 0"),
        ({"superpixels": {"n_segments": 1}}, "superpixels.n_segments", "less than the minimum of 2"),
        ({"pseudo": {"clean_ratio": 1.5}}, "pseudo.clean_ratio", "greater than the maximum of 1"),
        ({"superpixels": {"method": "quickshift"}}, "superpixels.method", "is not one of"),
        ({"cam": {"train_sizes": []}}, "cam.train_sizes", "should be non-empty"),
        ({"cam": {"train_sizes": [96, 8]}}, "cam.train_sizes.1", "less than the minimum of 32"),
        ({"run": "a/b"}, "run", "does not match"),
        ({"segment": {"iterations": 2.5}}, "segment.iterations", "not of type 'integer'"),
    ],
)
def test_bad_values_name_the_key_path(bad, key_path, expectation):
    with pytest.raises(ConfigError) as err:
        config.load(bad)
    message = str(err.value)
    assert f"{key_path}: " in message, message
    assert expectation in message, message


def test_unknown_key_lists_the_allowed_keys():
    with pytest.raises(ConfigError, match=r"cam\.lrr: unknown key \(allowed here: .*\blr\b"):
        config.load({"cam": {"lrr": 0.1}})


def test_several_errors_are_all_reported_in_one_message():
    with pytest.raises(ConfigError) as err:
        config.load({"cam": {"lr": "x"}, "superpixels": {"n_segments": 0}})
    assert "cam.lr" in str(err.value) and "superpixels.n_segments" in str(err.value)


def test_inline_json_config():
    cfg = config.load('{"run": "inline", "superpixels": {"method": "seeds"}}')
    assert cfg["run"] == "inline" and cfg["superpixels"]["method"] == "seeds"
    assert cfg["superpixels"]["n_segments"] == config.load(None)["superpixels"]["n_segments"]
    with pytest.raises(ConfigError, match=r"inline config: cam\.lr: "):
        config.load(json.dumps({"cam": {"lr": "x"}}))
    with pytest.raises(ConfigError, match="inline config: not valid JSON"):
        config.load('{"run": ')


def test_yaml_file_config_and_file_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run": "from_file", "pseudo": {"top_k": 3}}))
    cfg = config.load(path)
    assert cfg["run"] == "from_file" and cfg["pseudo"]["top_k"] == 3
    assert config.load(str(path)) == cfg  # str or Path

    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        config.load(tmp_path / "missing.yaml")

    (tmp_path / "broken.yaml").write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        config.load(tmp_path / "broken.yaml")

    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping of keys, got list"):
        config.load(tmp_path / "list.yaml")

    (tmp_path / "bad_value.yaml").write_text("cam:\n  lr: x\n")
    with pytest.raises(ConfigError, match=r"bad_value\.yaml: cam\.lr: "):
        config.load(tmp_path / "bad_value.yaml")

    (tmp_path / "empty.yaml").write_text("")  # an empty file is the all-defaults config
    assert config.load(tmp_path / "empty.yaml") == config.load(None)


def test_shipped_configs_are_valid():
    shipped = (
        sorted(REPO.glob("config*.yaml"))
        + sorted((REPO / "config").glob("*.yaml"))
        + sorted((REPO / "tests" / "configs").glob("*.yaml"))
    )
    assert shipped, "no config files found in the repository"
    for path in shipped:
        config.load(path)  # raises ConfigError naming the file and key if one drifted from the schema


def test_a_run_is_named_after_its_config_file_unless_it_says_run(tmp_path):
    assert config.resolve({}, [tmp_path / "my.yaml"])["run"] == "my"
    assert (
        config.resolve({}, ["a.yaml", tmp_path / "my trial.v2.yaml"])["run"] == "my_trial.v2"
    )  # the last file
    assert config.resolve({"run": "mine"}, [tmp_path / "my.yaml"])["run"] == "mine"  # run: wins
    assert config.resolve({}, [])["run"] == config.load(None)["run"]  # no file: the schema default
    path = tmp_path / "field-test.yaml"
    path.write_text("cam: {iterations: 3}\n")
    assert config.load(path, run_from_file=True)["run"] == "field-test"
    assert config.load(path)["run"] == config.load(None)["run"]  # a stage command's config: run unused


def test_resolved_config_is_written_atomically_and_loads_back(tmp_path):
    cfg = config.load({"run": "r", "cam": {"lr": 0.5}})
    out = config.write_resolved(cfg, tmp_path / "results" / "r" / "config.resolved.yaml")
    assert out.read_text().startswith("# The resolved configuration")
    assert config.load(out) == cfg
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.resolved.yaml"]


def _folder(tmp_path, train_masks: int, val_masks: int) -> dict:
    root = tmp_path / "photos"
    (root / "SegmentationClass").mkdir(parents=True)
    (root / "train.txt").write_text("t1\nt2\nt3\n")
    (root / "val.txt").write_text("v1\nv2\n")
    for image_id in ["t1", "t2", "t3"][:train_masks] + ["v1", "v2"][:val_masks]:
        (root / "SegmentationClass" / f"{image_id}.png").write_bytes(b"")
    return config.load({"dataset": {"kind": "folder", "root": str(root)}})


def test_evaluation_splits_follow_the_masks_that_exist(tmp_path):
    cfg = _folder(tmp_path, train_masks=1, val_masks=0)
    assert config.evaluation_splits(cfg) == ["train"]  # some train masks, no val masks
    assert config.count_masks(cfg["dataset"], "train") == 1
    cfg["dataset"]["max_images"] = 1
    assert config.evaluation_splits(cfg) == ["train"]
    cfg["dataset"]["max_images"] = None
    cfg["evaluate"]["enabled"] = True
    assert config.evaluation_splits(cfg) == ["train", "val"]
    cfg["evaluate"]["enabled"] = False
    assert config.evaluation_splits(cfg) == []
    cfg = _folder(tmp_path / "none", train_masks=0, val_masks=0)
    assert config.evaluation_splits(cfg) == []
    cfg["dataset"]["val_split"] = None
    assert config.evaluation_splits(cfg) == []
    assert config.evaluation_splits(config.load(None)) == ["train", "val"]  # synthetic: always masked
    with pytest.raises(ConfigError, match="evaluate.enabled"):
        config.load({"evaluate": {"enabled": "sometimes"}})


def _leaves_and_sections(node: dict, path: str = ""):
    for key, sub in node.get("properties", {}).items():
        full = f"{path}.{key}" if path else key
        yield full, sub
        if sub.get("type") == "object":
            yield from _leaves_and_sections(sub, full)


def test_every_schema_key_has_a_description():
    keys = list(_leaves_and_sections(config.schema()))
    assert len(keys) > 90
    undocumented = [k for k, sub in keys if not str(sub.get("description", "")).strip()]
    assert not undocumented, f"schema keys without a description: {', '.join(undocumented)}"
    # every key the code reads is in the schema; cam.workers was read nowhere and is gone
    assert (
        "cam.workers" not in dict(keys) and "cam.log_every" in dict(keys) and "evaluate.enabled" in dict(keys)
    )


def test_schema_enums_are_the_code_registries():
    """A choice the schema offers must exist in code, and a registered one must be selectable."""
    from weakseg import cam, store, superpixels
    from weakseg.inspect.stages import ANNOTATION_STEPS
    from weakseg.joint.model import SEG_HEADS
    from weakseg.nets.backbones import BACKBONES
    from weakseg.pseudo.consensus import RULES as CHECKING_RULES
    from weakseg.segment.models import MODELS as SEGMENT_MODELS

    props = config.schema()["properties"]
    enum = lambda section, key: list(props[section]["properties"][key]["enum"])  # noqa: E731
    assert sorted(enum("cam", "model")) == sorted(cam.MODELS)
    assert sorted(enum("superpixels", "method")) == sorted(superpixels.METHODS)
    assert sorted(enum("segment", "model")) == sorted(SEGMENT_MODELS)
    assert enum("cam", "backbone") == enum("segment", "backbone")
    assert sorted(enum("cam", "backbone")) == sorted(BACKBONES)
    assert sorted(enum("joint", "head")) == sorted(SEG_HEADS)
    # every annotation has its steps, and the checked ones a rule of `weakseg consensus` and a store name
    assert sorted(enum("segment", "annotation")) == sorted(ANNOTATION_STEPS)
    assert set(CHECKING_RULES) <= set(enum("segment", "annotation")) <= set(store.ROUND_LABEL_VARIANTS)


def test_network_keys_are_declared_once_for_both_networks():
    shared = config.schema()["$defs"]["network_keys"]
    props = config.schema()["properties"]
    for section in ("cam", "segment"):
        assert all(props[section]["properties"][key] == spec for key, spec in shared.items())
    text = (Path(config.__file__).parent / "schemas" / "config.schema.yaml").read_text()
    assert text.count("backbone: {") == 1
