"""Training: configs and recipes, optimizers and schedules, batch sources, checkpoints, run records, the loop."""

from vitlab.train.config import RECIPES, Recipe, TrainAugment, TrainConfig, get_recipe, override, recipe_config
from vitlab.train.run_dir import RunDir

__all__ = ["RECIPES", "Recipe", "RunDir", "TrainAugment", "TrainConfig", "get_recipe", "override", "recipe_config"]
