"""Recipes: YAML files naming a preset, the data, the stages and their settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


class RecipeError(ValueError):
    """A recipe that cannot be used, with a one-line reason."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    preset: str
    seed: int
    facts: Path
    stages: tuple[str, ...]
    settings: dict[str, dict[str, Any]]
    source: Path
    distributed: dict[str, Any] | None = None  # training.distributed.DistributedSettings fields

    def stage_settings(self, stage: str) -> dict[str, Any]:
        return dict(self.settings.get(stage) or {})


def resolve_recipe_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    return RECIPES_DIR / f"{name_or_path}.yaml"


def find_recipe(name_or_path: str) -> Path:
    """The recipe file for a name of training/recipes or a YAML path; a clear error if none."""
    path = resolve_recipe_path(name_or_path)
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise RecipeError(f"no recipe {name_or_path!r} (known: {', '.join(known)})")
    return path


def load_recipe(name_or_path: str, data_root: Path) -> Recipe:
    """Reads a recipe; its data must lie under `data_root` (no reading arbitrary paths)."""
    path = find_recipe(name_or_path)
    raw = read_recipe(path)
    root = data_root.resolve()
    facts = (root / str(raw.get("facts", "spoken_qa"))).resolve()
    if not facts.is_relative_to(root):
        raise RecipeError(f"{path}: data path {facts} lies outside the data root {root}")
    from training.stages import STAGE_ORDER

    stages = tuple(raw.get("stages") or ())
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        raise RecipeError(f"{path}: unknown stages {unknown} (known: {', '.join(STAGE_ORDER)})")
    return Recipe(
        name=str(raw.get("name", path.stem)),
        preset=str(raw.get("preset", "tiny")),
        seed=int(raw.get("seed", 0)),
        facts=facts,
        stages=stages,
        settings={str(k): dict(v or {}) for k, v in (raw.get("settings") or {}).items()},
        source=path,
        distributed=dict(raw["distributed"] or {}) if "distributed" in raw else None,
    )


def read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe's mapping. `extends: NAME` starts from that recipe of training/recipes (a name,
    never a path): its keys are replaced, its stage settings merged stage by stage, so one recipe
    states the settings and a variant only its change."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping")
    if "extends" not in raw:
        return raw
    name = str(raw.pop("extends"))
    if Path(name).name != name or name.endswith((".yaml", ".yml")):  # a name: never a file elsewhere
        raise RecipeError(f"{path}: extends {name!r}; name a recipe in training/recipes instead")
    try:
        base_path = find_recipe(name)
    except RecipeError as exc:
        raise RecipeError(f"{path}: extends {name!r}, but {exc}") from None
    chain = (*seen, path.resolve())
    if base_path.resolve() in chain:
        raise RecipeError(f"{path}: recipes extend each other in a circle")
    base = read_recipe(base_path, chain)
    settings = {str(k): dict(v or {}) for k, v in (base.get("settings") or {}).items()}
    for stage, values in (raw.pop("settings", None) or {}).items():
        settings[str(stage)] = {**settings.get(str(stage), {}), **(values or {})}
    inherited = {k: v for k, v in base.items() if k != "name"}  # a variant is named by its own file
    return {**inherited, **raw, "settings": settings}
