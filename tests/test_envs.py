"""The conda environments in envs/ must ask for the same packages as pyproject.toml."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_requirements() -> dict[str, Requirement]:
    """The dependencies and the extras' (an env may carry a dev tool, e.g. transformers for
    checking Hugging Face exports); either way with the same version range."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lines = list(data["project"]["dependencies"])
    for extra in data["project"].get("optional-dependencies", {}).values():
        lines.extend(extra)
    reqs = [Requirement(r) for r in lines]
    return {r.name.lower(): r for r in reqs}


def _env_pip_requirements(path: Path) -> list[Requirement]:
    env = yaml.safe_load(path.read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert pip_sections, f"{path.name}: no pip section"
    return [Requirement(line) for line in pip_sections[0] if not line.startswith("-e")]


ENV_FILES = sorted((ROOT / "envs").glob("*.yaml"))


def test_there_are_env_files():
    assert {p.name for p in ENV_FILES} >= {"preprocess.yaml", "train.yaml"}


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_agrees_with_pyproject(env_file: Path):
    project = _pyproject_requirements()
    for req in _env_pip_requirements(env_file):
        assert req.name.lower() in project, f"{env_file.name}: {req.name} is not in pyproject.toml"
        assert req.specifier == project[req.name.lower()].specifier, (
            f"{env_file.name}: {req.name}{req.specifier} but pyproject.toml says "
            f"{project[req.name.lower()].specifier}"
        )


def test_envs_install_the_project_itself():
    for env_file in ENV_FILES:
        env = yaml.safe_load(env_file.read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        assert "-e ../" in pip, f"{env_file.name} must install mofo itself"


# Rules that run mofo code and so must name their conda env (the aggregating rules, e.g.
# ``probes`` and ``figures``, run nothing and need none).
RULES_WITH_ENV = {
    "demo_data": "preprocess", "manifest": "preprocess", "decode": "preprocess",
    "optical_flow": "preprocess", "trajectories": "preprocess", "motion_map": "preprocess",
    "motion_boxes": "preprocess", "motion_pictures": "preprocess", "box_quality": "preprocess",
    "features": "train", "probe": "train", "pretrain": "train", "finetune": "train",
    "evaluate": "train", "table": "train",
}


def rule_envs() -> dict[str, str | None]:
    """``{rule: the line after its conda: directive, or None}`` over rules/*.smk."""
    import re

    envs: dict[str, str | None] = {}
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        lines = [line.strip() for line in smk.read_text().splitlines()]
        rule = None
        for i, line in enumerate(lines):
            head = re.match(r"(?:rule|checkpoint)\s+(\w+)\s*:", line)
            if head:
                rule = head.group(1)
                envs[rule] = None
            elif line == "conda:":
                assert rule is not None, f"{smk.name}:{i + 1}: conda: outside a rule"
                envs[rule] = next(x for x in lines[i + 1:] if x)
    return envs


def test_every_rule_uses_an_env_that_exists():
    envs = rule_envs()
    missing = {rule for rule in RULES_WITH_ENV if envs.get(rule) is None}
    assert not missing, f"rules without a conda env (or gone from rules/): {sorted(missing)}"
    for rule, line in envs.items():
        if line is None:
            continue
        assert line.startswith('"../envs/') and line.endswith('.yaml"'), f"{rule}: {line}"
        assert (ROOT / "rules" / line.strip('"')).resolve().exists(), f"{rule}: {line}"
    for rule, name in RULES_WITH_ENV.items():
        assert envs[rule] == f'"../envs/{name}.yaml"', f"{rule}: {envs[rule]}"


def test_timm_internals_that_mofo_mirrors_are_there():
    """timm is pinned (pyproject.toml) because mofo reads these; a timm outside the pin that
    still passes this may be admitted by widening the pin."""
    import inspect

    from timm.data import auto_augment
    from timm.data.mixup import Mixup

    assert isinstance(auto_augment._LEVEL_DENOM, (int, float))
    op = auto_augment.AugmentOp("Rotate", prob=0.5, magnitude=7, hparams={"magnitude_std": 0.5})
    for name in ("name", "prob", "magnitude", "magnitude_std", "magnitude_max", "level_fn",
                 "aug_fn", "kwargs", "hparams"):
        assert hasattr(op, name), f"timm AugmentOp has no {name!r} (mofo.inputs.transforms)"
    ra = auto_augment.rand_augment_transform("rand-m7-n4-mstd0.5-inc1", {})
    for name in ("ops", "num_layers", "choice_weights"):
        assert hasattr(ra, name), f"timm RandAugment has no {name!r} (mofo.inputs.transforms)"
    params = inspect.signature(Mixup._params_per_batch).parameters
    assert list(params) == ["self"], "timm Mixup._params_per_batch changed (mofo.training.mixup)"
