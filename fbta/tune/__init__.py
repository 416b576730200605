"""Optuna tuning (``fbta tune``): the search space (``space``) and the study around the training stage (``study``)."""
from __future__ import annotations

from fbta.tune.space import KNOBS, Space, search_space, suggest, with_values

__all__ = ["KNOBS", "Space", "search_space", "suggest", "with_values"]
