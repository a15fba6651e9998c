"""The configuration: defaults validate, bad values stop with the key's name."""

from __future__ import annotations

import pytest

from mofo.config import ConfigError, deep_merge, get, load_config


def test_defaults_validate_and_run_the_demo():
    config = load_config()
    assert config["dataset"]["name"] == "demo"
    assert config["optical_flow"]["method"] in {"tvl1", "dis", "farneback"}


@pytest.mark.parametrize(
    "overrides, key, bad",
    [
        ({"optical_flow": {"method": "raft"}}, "optical_flow.method", "'raft'"),
        ({"shards": {"clips_per_shard": 0}}, "shards.clips_per_shard", "0"),
        ({"decode": {"jpeg_quality": 101}}, "decode.jpeg_quality", "101"),
        ({"motion_boxes": {"rel_max_threshold": 1.5}}, "motion_boxes.rel_max_threshold", "1.5"),
        ({"dataset": {"name": "kinetics"}}, "dataset.name", "'kinetics'"),
        # an unknown key: the path of the section it is in, and the key itself
        ({"optical_flow": {"tvl1": {"tua": 0.3}}}, "optical_flow.tvl1", "'tua'"),
    ],
)
def test_bad_value_names_the_key(overrides, key, bad):
    """One line per problem, starting with the full dotted key path, naming the bad value
    (not loose substrings that could come from anywhere in the message)."""
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    lines = [line.strip() for line in str(err.value).splitlines()]
    ours = [line for line in lines if line.startswith(f"{key}: ")]
    assert len(ours) == 1, lines
    assert bad in ours[0].removeprefix(f"{key}: "), ours[0]


def test_missing_overlay_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config([tmp_path / "nope.yaml"])


def test_overlay_merges_key_by_key(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("optical_flow:\n  tvl1:\n    tau: 0.5\n")
    config = load_config([overlay])
    assert config["optical_flow"]["tvl1"]["tau"] == 0.5
    assert config["optical_flow"]["tvl1"]["warps"] == load_config()["optical_flow"]["tvl1"]["warps"]


def test_deep_merge_does_not_modify_inputs():
    base = {"a": {"b": 1, "c": 2}}
    merged = deep_merge(base, {"a": {"b": 3}})
    assert merged == {"a": {"b": 3, "c": 2}} and base == {"a": {"b": 1, "c": 2}}


def test_get_names_missing_key():
    with pytest.raises(ConfigError, match="optical_flow.nope"):
        get(load_config(), "optical_flow.nope")


@pytest.mark.parametrize("overlay", ["ssv2.yaml", "epic100.yaml", "list.yaml"])
def test_dataset_overlays_validate(overlay):
    from mofo.config import REPO_ROOT

    config = load_config([REPO_ROOT / "config" / overlay])
    assert config["dataset"]["name"] == overlay.removesuffix(".yaml")


def _closed_objects(schema: dict, defaults: dict, path: tuple = ()):
    """(config path, schema node, defaults node) for every object of the schema reached
    through plain ``properties`` chains that config/config.yaml fills with a mapping."""
    if "properties" in schema:  # not a map of the user's own names (variants)
        yield path, schema, defaults
    for key, sub in schema.get("properties", {}).items():
        if isinstance(defaults.get(key), dict) and sub.get("type") == "object":
            yield from _closed_objects(sub, defaults[key], (*path, key))


def test_the_schema_requires_every_key_the_defaults_set():
    """One owner per default: config/config.yaml sets every key and the schema requires each
    one, so the code reads validated keys without a second, code-side default
    (``.get(key, default)``) that could disagree with the file."""
    import yaml

    from mofo.config import DEFAULT_CONFIG, SCHEMA

    schema, defaults = yaml.safe_load(SCHEMA.read_text()), yaml.safe_load(DEFAULT_CONFIG.read_text())
    missing = {".".join(path) or "<root>": sorted(set(node) - set(sch.get("required", [])))
               for path, sch, node in _closed_objects(schema, defaults)}
    assert not {k: v for k, v in missing.items() if v}, missing


def test_a_missing_key_is_a_config_error_naming_it():
    import copy

    from mofo.config import ConfigError, load_config, validate

    config = copy.deepcopy(load_config())
    del config["engine"]["precision"]
    with pytest.raises(ConfigError, match="precision"):
        validate(config)
