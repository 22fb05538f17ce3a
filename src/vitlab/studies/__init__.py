"""The inductive-bias studies: many Trainer runs under one step budget, summed up as a table, a JSON and a plot.

- `data_size`: each model family on balanced subsets of growing size (the ViT paper's Figs. 3-4);
- `posemb`: none vs learned 1D vs 2D sin-cos position embeddings in the same ViT (Table 8);
- `resolution`: pre-train at low resolution and fine-tune at a higher one vs one resolution throughout (§3.2).

`budget` sets every run's steps, `runs` plans, runs and reuses them, `report` writes the table and JSON; the
families are the `study-*` recipes of `vitlab.train.config`, and the plots live in `vitlab.analysis.plots`. A run
whose record says it finished is reused, so a study's run records (not their weights) can be kept in version
control and summed up again without training.
"""

from vitlab.studies.budget import QUICK_BUDGET, Budget
from vitlab.studies.data_size import FULL_SIZES, QUICK_SIZES, data_size_study
from vitlab.studies.posemb import POSEMBS, posemb_study
from vitlab.studies.resolution import resolution_study
from vitlab.studies.runs import Run, Study, StudyResult, family_recipes
from vitlab.train.config import FAMILY_RECIPES

QUICK_SIZE = 400  # the training-set size of --quick posemb and resolution studies

__all__ = ["FAMILY_RECIPES", "FULL_SIZES", "POSEMBS", "QUICK_BUDGET", "QUICK_SIZE", "QUICK_SIZES", "Budget", "Run",
           "Study", "StudyResult", "data_size_study", "family_recipes", "posemb_study", "resolution_study"]
