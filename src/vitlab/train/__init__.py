"""Training: configs and recipes, optimizers and schedules, checkpoints, the loop."""

from vitlab.train.config import RECIPES, TrainConfig, override, recipe_config

__all__ = ["RECIPES", "TrainConfig", "override", "recipe_config"]
