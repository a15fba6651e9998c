"""Load and validate the mofo configuration outside Snakemake.

The Snakefile validates with ``snakemake.utils.validate``; this module applies the same JSON
schema (``config/config.schema.yaml``) with ``jsonschema`` so that the library and the CLI
see exactly the settings the workflow sees. There is one source of truth: the defaults are
``config/config.yaml``, overlays are merged on top of it key by key.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "config" / "config.yaml"
SCHEMA = REPO_ROOT / "config" / "config.schema.yaml"


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


def deep_merge(base: dict, overlay: dict) -> dict:
    """Return ``base`` updated recursively with ``overlay`` (neither is modified)."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def validate(config: dict) -> dict:
    """Validate ``config`` against the schema; raise ConfigError naming the bad key."""
    schema = load_yaml(SCHEMA)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors[:10]:
            key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            lines.append(f"  {key}: {err.message}")
        raise ConfigError("invalid mofo configuration:\n" + "\n".join(lines))
    return config


def load_config(paths: Iterable[str | Path] = (), overrides: dict | None = None) -> dict:
    """Defaults from config/config.yaml, then each overlay file, then ``overrides``."""
    config = load_yaml(DEFAULT_CONFIG)
    for path in paths:
        config = deep_merge(config, load_yaml(path))
    if overrides:
        config = deep_merge(config, overrides)
    return validate(config)


REAL_OVERLAYS = {"ssv2": "config/ssv2.yaml", "epic100": "config/epic100.yaml", "list": "config/list.yaml"}


def check_preset(config: dict) -> dict:
    """Stop a real dataset from running on the demo's defaults (32-px model, DIS flow).

    ``preset`` is ``demo`` in config/config.yaml and ``real`` in the real-data overlays; an
    own overlay alone keeps ``demo``. Raises ConfigError naming the overlay to add.
    """
    name = config["dataset"]["name"]
    if name != "demo" and config["preset"] == "demo":
        overlay = REAL_OVERLAYS[name]
        raise ConfigError(
            f"dataset.name is {name!r} but the demo's defaults are in force (preset: demo: a "
            f"32-px model and DIS flow, sized for the synthetic demo). Put the real-data "
            f"defaults first: --configfile {overlay} your-overlay.yaml (or set `preset: real` "
            f"in your overlay if you really mean to set every training key yourself)"
        )
    return config


def get(config: dict, dotted: str) -> Any:
    """``get(cfg, "optical_flow.tvl1.tau")`` with an error that names the missing key."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"missing config key: {dotted}")
        node = node[part]
    return node
