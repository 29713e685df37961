"""`kernopt.explain(model_or_fn, *args, **kwargs)`: compile with kernopt, run once, report what happened.

The report lists, for every graph Dynamo captured, each rewrite (pass, matched pattern, kernel op, config,
scenario, and how it runs here: triton / interpreter / reference) and each candidate left alone with its
reason. `print(report)` shows it as tables; `report.rewrites` / `report.fallbacks` hold it as data.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from kernopt.backend import Report, _active_reports, kernopt_backend, parse_options


def explain(model_or_fn: Any, *args: Any, options: Optional[dict] = None, mode: Optional[str] = None,
            **kwargs: Any) -> Report:
    parse_options(options, mode)  # a bad option is the caller's error, raised before any compiling
    fn = getattr(model_or_fn, "_orig_mod", model_or_fn)  # an already-compiled module: explain the original
    report = Report()
    compiled = torch.compile(fn, backend=functools.partial(kernopt_backend, mode=mode, options=options))
    _active_reports.append(report)
    try:
        with torch.no_grad():
            compiled(*args, **kwargs)
    finally:
        _active_reports.remove(report)
    return report
