"""Sweeps: a DAG ``Param`` (a grid or a list of trials) turned into one operator-argument dict per trial."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["trial_arguments", "trial_configs", "trials"]


def trial_configs(grid: Mapping[str, Sequence[Any]] | None, explicit: Sequence[Mapping[str, Any]] | None) -> list[dict]:
    """The trials' hyperparameters: ``explicit`` when it has any, else every combination of ``grid``'s values
    (``{"lr": [1e-3, 3e-3], "layers": [2, 4]}``: four trials), in a stable order."""
    if explicit:
        return [dict(t) for t in explicit]
    if not grid:
        return [{}]
    keys = list(grid)
    for key in keys:
        if isinstance(grid[key], (str, bytes)) or not isinstance(grid[key], Sequence) or not grid[key]:
            raise ValueError(f"grid[{key!r}] must be a non-empty list of values, not {grid[key]!r}")
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def trial_arguments(command: Sequence[str], config: Mapping[str, Any]) -> list[str]:
    """``command`` followed by ``--<key> <value>`` for each hyperparameter (``d_model`` -> ``--d-model``)."""
    args = [str(c) for c in command]
    for key, value in config.items():
        args += [f"--{str(key).replace('_', '-')}", str(value)]
    return args


def trials(
    command: Sequence[str],
    grid: Mapping[str, Sequence[Any]] | None = None,
    explicit: Sequence[Mapping[str, Any]] | None = None,
    *,
    fixed: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """For ``.expand_kwargs()``: ``[{"trial": "t000", "arguments": [...]}, ...]``; ``fixed`` hyperparameters
    (``{"steps": 500}``) go to every trial."""
    return [
        {"trial": f"t{i:03d}", "arguments": trial_arguments(command, {**(fixed or {}), **config})}
        for i, config in enumerate(trial_configs(grid, explicit))
    ]
