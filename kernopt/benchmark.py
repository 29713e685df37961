"""Benchmark results in the one schema of shared/BENCHMARKS.md, and the timing rules behind them.

Every suite script in examples/ builds a `Suite`, adds rows whose kernopt number comes from an output
checked against the reference in the same run (`check=` problem string -> the row records the error
and drops the kernopt number), prints the table and writes `benchmarks/results/<suite>-<gpu>.json`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import re
import subprocess
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def gpu_slug(name: str) -> str:
    m = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]?)\b", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _commit() -> str:
    if os.environ.get("KERNOPT_COMMIT"):  # the GPU machine gets a copy of the tree without .git
        return os.environ["KERNOPT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except Exception:
        return "unknown"


def time_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of `fn` on the GPU (CUDA events; L2 flushed between repeats by do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def time_rotating_ms(make_fn: Callable[[int], Callable[[], object]], copies: int, warmup: int = 25,
                     rep: int = 100) -> float:
    """Median ms per call, cycling through `copies` input sets so that repeats don't run from L2."""
    fns = [make_fn(i) for i in range(copies)]
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % copies
        return fns[state["i"]]()

    return time_ms(step, warmup, rep)


L2_BYTES = 50 * 2**20  # H100's L2 (H200: 60 MB); inputs rotate through at least 3x the L2 so repeats read HBM


def l2_bytes() -> int:
    """The current GPU's L2 size (L2_BYTES when there is no GPU or torch does not report it)."""
    if torch.cuda.is_available():
        size = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
        if size:
            return int(size)
    return L2_BYTES


def rotation(bytes_per_call: int, l2: Optional[int] = None) -> tuple[int, int]:
    """(input copies, calls per graph): copies covering 3x the L2 (`l2` bytes, default this GPU's), calls for
    ~1 ms of HBM traffic per replay."""
    l2 = l2 if l2 is not None else l2_bytes()
    bytes_per_call = max(1, bytes_per_call)
    copies = max(1, min(16, math.ceil(3 * l2 / bytes_per_call)))
    calls = math.ceil(max(copies, min(128, math.ceil(3e9 / bytes_per_call))) / copies) * copies
    return copies, calls


def time_graph_ms(make_call: Callable[[int], Callable[[], object]], copies: int, calls: int, rep: int = 50) -> float:
    """Median ms per call of one CUDA graph holding `calls` calls of make_call(i % copies)().

    Graph replay takes the Python launch cost out of the number (the kernels run back to back, as they do
    inside a CUDA-graphed decode step); every system in a suite is timed the same way.
    """
    fns = [make_call(i) for i in range(copies)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: compilation, allocator pools
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % copies]()
    try:
        return time_ms(graph.replay, warmup=10, rep=rep) / calls
    finally:
        del graph


class Suite:
    def __init__(self, suite: str):
        self.suite = suite
        self.device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        try:
            import triton

            triton_version = triton.__version__
        except Exception:
            triton_version = "none"
        self.header = {
            "suite": suite,
            "device": self.device,
            "torch": torch.__version__,
            "triton": triton_version,
            "kernopt_commit": _commit(),
            "date": _dt.date.today().isoformat(),
        }
        self.rows: list[dict] = []

    def add(self, case: str, metric: str, higher_is_better: bool, results: dict[str, float],
            config: str = "", error: Optional[str] = None, **extra) -> dict:
        results = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()}
        row = {"case": case, "metric": metric, "higher_is_better": higher_is_better, "results": results}
        if config:
            row["config"] = config
        if error:
            row["error"] = error
            row["results"].pop("kernopt", None)
        row.update(extra)
        self.rows.append(row)
        return row

    def table(self, baseline: Optional[str] = None) -> str:
        """The rows as a text table, with speedups: kernopt's against every other system, or, with `baseline`
        (a system of the suite, e.g. the llama suite's hf_static_inductor), every kernopt system's against it.
        A ratio needs both systems from the same run ("-" where one was merged in from an earlier run)."""
        from tabulate import tabulate

        systems: list[str] = []
        for r in self.rows:
            for k in r["results"]:
                if k not in systems:
                    systems.append(k)
        if baseline is not None and baseline not in systems:
            baseline = None
        if baseline is None:
            pairs = [("kernopt", s) for s in systems if s != "kernopt"]
            title = "kernopt speedup vs " + "/".join(s for _, s in pairs)
        else:
            pairs = [(s, baseline) for s in systems if s.startswith("kernopt")]
            title = "speedup vs " + baseline + " (" + "/".join(s for s, _ in pairs) + ")"
        out = []
        for r in self.rows:
            res = r["results"]
            line = [r["case"], r["metric"]] + [res.get(s, "") for s in systems]
            runs = r.get("from_run", {})  # systems merged in from an earlier run: no ratio across runs
            ratios = []
            for mine, other in pairs:
                if res.get(mine) and res.get(other):
                    k, o = res[mine], res[other]
                    same = runs.get(mine) == runs.get(other)
                    ratios.append(f"{(k / o) if r['higher_is_better'] else (o / k):.2f}" if same else "-")
                elif baseline is not None:
                    ratios.append("-")
            shown = " ".join(ratios) if any(x != "-" for x in ratios) or baseline is None else ""
            line.append(shown or r.get("error", ""))
            out.append(line)
        return tabulate(out, headers=["case", "metric", *systems, title], floatfmt=".2f")

    def write(self, directory: Optional[Path] = None, plot: bool = False) -> Path:
        directory = Path(directory) if directory else RESULTS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.suite}-{gpu_slug(self.device)}.json"
        path.write_text(json.dumps({**self.header, "rows": self.rows}, indent=1) + "\n")
        if plot:
            self.plot(path.with_suffix(".png"))
        return path

    def plot(self, path: Path) -> Optional[Path]:
        """Bars per case and system, one panel per metric (tok/s, ms, s never share an axis). None without
        matplotlib (the `plot` extra)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print(f"{self.suite}: matplotlib is not installed (pip install 'kernopt[plot]'): no plot")
            return None
        metrics = list(dict.fromkeys(r["metric"] for r in self.rows)) or [""]
        fig, axes = plt.subplots(len(metrics), 1, squeeze=False,
                                 figsize=(max(6, len(self.rows) * 0.8), 3.2 * len(metrics)))
        for ax, metric in zip(axes[:, 0], metrics):
            rows = [r for r in self.rows if r["metric"] == metric]
            systems = sorted({k for r in rows for k in r["results"]}, key=lambda s: (s != "kernopt", s))
            width = 0.8 / max(1, len(systems))
            for i, s in enumerate(systems):
                xs = [j + i * width for j in range(len(rows))]
                ax.bar(xs, [r["results"].get(s, 0) for r in rows], width, label=s)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
            ax.set_xticklabels([r["case"] for r in rows], rotation=30, ha="right", fontsize=7)
            better = "higher" if rows and rows[0]["higher_is_better"] else "lower"
            ax.set_ylabel(f"{metric} ({better} is better)")
            ax.legend(fontsize=7)
        axes[0, 0].set_title(f"kernopt {self.suite} on {self.device}")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{script}: benchmarks time GPU kernels; no CUDA device here. "
                         "Run it on the GPU machine (see README, 'Benchmarks').")


@contextlib.contextmanager
def env_vars(**values: Optional[str]):
    """Set environment variables for the block (None: unset one); restore what was there after."""
    prev = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in prev.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
