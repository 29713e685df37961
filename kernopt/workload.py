"""Workload shape -> scenario -> kernel config, and the on-disk cache of tuned configs.

Scenarios follow MLPerf's inference scenarios, read off the shape an op sees:

| scenario        | what the shape looks like                        | what the kernels favour            |
|-----------------|--------------------------------------------------|------------------------------------|
| single-stream   | decode (q_len <= 4) at batch 1                   | latency: split-K / split-KV, GEMV  |
| interactive     | decode at batch <= 16                            | memory bandwidth, small M tiles    |
| server          | decode at larger batch, or prefill <= 4096 tokens| balanced tiles                     |
| offline         | prefill / batched work over 4096 tokens          | throughput: big tensor-core tiles  |

Each kernel family keeps its own shape -> config table beside the kernel (`select_config` in
`kernopt/kernels/<family>.py`); this module only names the scenario, buckets shapes, and overlays
tuned configs from the cache, so a tuned entry always wins over the table. Configs are tuned by
`kernopt tune` ahead of time, or on first use of a shape with ``KERNOPT_AUTOTUNE=1`` (off by default: the
first call of each new shape then costs a sweep).

The cache is JSON (never pickle), one file per (device, triton version) under
``$KERNOPT_CACHE_DIR`` (default ``~/.cache/kernopt``), keyed by kernel and shape bucket. Writes are
atomic (temp file + rename) and merged under a file lock, so concurrent processes don't lose entries;
a corrupt or foreign file is ignored with a warning and moved aside, never silently overwritten.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

SCENARIOS = ("offline", "server", "single-stream", "interactive")
CACHE_FORMAT = 1


def classify(tokens: int, q_len: Optional[int] = None, batch: Optional[int] = None) -> str:
    """The scenario for an op that processes `tokens` rows (batch * q_len) of `batch` sequences."""
    if q_len is None or batch is None:
        batch, q_len = tokens, 1
    decode = q_len <= 4
    if decode and batch <= 1:
        return "single-stream"
    if decode and batch <= 16:
        return "interactive"
    if tokens <= 4096:
        return "server"
    return "offline"


def resolve_scenario(requested: str, tokens: int, q_len: Optional[int] = None, batch: Optional[int] = None) -> str:
    if requested == "auto":
        return classify(tokens, q_len, batch)
    if requested not in SCENARIOS:
        raise ValueError(f"unknown scenario {requested!r}; valid: 'auto', {', '.join(map(repr, SCENARIOS))}")
    return requested


def scenario_for_activation(requested: str, shape) -> str:
    """The scenario for a linear layer's input of `shape` [..., S, K]: batch = the leading dims, q_len = S.

    A 2-D input [M, K] gives no sequence axis; it is read as M sequences of one token (decode).
    """
    dims = [int(d) for d in shape]
    if len(dims) >= 3:
        batch = 1
        for d in dims[:-2]:
            batch *= d
        return resolve_scenario(requested, batch * dims[-2], q_len=dims[-2], batch=batch)
    return resolve_scenario(requested, dims[0] if dims else 1)


def bucket(n: int, smallest: int = 1) -> int:
    """Round up to a power of two: shapes in one bucket share a config."""
    n = max(int(n), smallest)
    return 1 << (n - 1).bit_length()


def gemm_bucket(m: int, n: int, k: int, *extra) -> str:
    """The cache key of a GEMM-like op: M by power-of-two bucket, N and K exact (they are weight shapes)."""
    tail = "".join(f"-{str(e).replace('torch.', '')}" for e in extra)
    return f"M{bucket(m)}-N{n}-K{k}{tail}"


# ------------------------------------------------------------------------------------------------
# Tuned-config cache
# ------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("KERNOPT_CACHE_DIR") or Path.home() / ".cache" / "kernopt")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "unknown"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


class ConfigCache:
    """Tuned configs for one device and triton version: {"kernel|bucket": config dict}."""

    def __init__(self, directory: Optional[Path] = None, device: Optional[str] = None,
                 triton: Optional[str] = None):
        self.device = device or device_name()
        self.triton = triton or triton_version()
        self.directory = Path(directory) if directory else cache_dir()
        self.path = self.directory / f"configs-{_slug(self.device)}-triton{_slug(self.triton)}.json"
        self._entries: Optional[dict[str, dict]] = None
        self._lock = threading.Lock()

    @staticmethod
    def key(kernel: str, shape_bucket: str) -> str:
        return f"{kernel}|{shape_bucket}"

    def _read(self) -> dict[str, dict]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            warnings.warn(f"kernopt: cannot read tuned-config cache {self.path}: {e}; ignoring it")
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {data.get('format') if isinstance(data, dict) else None!r}")
            if data.get("device") != self.device or data.get("triton") != self.triton:
                raise ValueError(f"written for {data.get('device')!r} / triton {data.get('triton')!r}")
            entries = data["entries"]
            if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
                raise ValueError("entries are not a mapping of configs")
            return entries
        except (ValueError, KeyError, TypeError) as e:
            aside = self.path.with_suffix(f".bad-{os.getpid()}.json")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            warnings.warn(f"kernopt: ignoring tuned-config cache {self.path} ({e}); moved it to {aside.name}")
            return {}

    def entries(self) -> dict[str, dict]:
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            return self._entries

    def get(self, kernel: str, shape_bucket: str) -> Optional[dict]:
        return self.entries().get(self.key(kernel, shape_bucket))

    def put_many(self, items: dict[str, dict]) -> None:
        """Merge entries into the file: lock, re-read (another process may have written), write atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock, _file_lock(self.path.with_suffix(".lock")):
            merged = self._read()
            merged.update(items)
            payload = {"format": CACHE_FORMAT, "device": self.device, "triton": self.triton, "entries": merged}
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".configs-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(payload, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._entries = merged
            global _STORES
            _STORES += 1

    def put(self, kernel: str, shape_bucket: str, config: dict) -> None:
        self.put_many({self.key(kernel, shape_bucket): config})


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic rename still keeps the file whole
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_CACHE: Optional[ConfigCache] = None
_CACHE_ENV: tuple = ()
_OPENS = 0  # config_cache() re-opens, and stores into any cache: what config_epoch() counts
_STORES = 0


def config_cache() -> ConfigCache:
    """The process's cache object, re-opened when the variables that place it (KERNOPT_CACHE_DIR, HOME) change.
    Compared as strings: every kernel call asks (building the Path each time cost ~35 us of a ~200 us int4 op
    call on the CPU side, which the prompt's uncaptured forward pays per launch)."""
    global _CACHE, _CACHE_ENV, _OPENS
    env = (os.environ.get("KERNOPT_CACHE_DIR"), os.environ.get("HOME"))
    if _CACHE is None or env != _CACHE_ENV:
        _CACHE, _CACHE_ENV = ConfigCache(), env
        _OPENS += 1
    return _CACHE


def config_epoch() -> tuple:
    """Everything `config_for`'s answer for a key depends on besides the key: the cache in use (re-opened when its
    place changes), the stores made since, and the variables that bypass the cache or turn tuning on. A memo of
    config_for's answers (kernopt.ops' prompt lane) is valid while this stays equal."""
    config_cache()
    return _OPENS, _STORES, os.environ.get("KERNOPT_NO_CACHE"), os.environ.get("KERNOPT_AUTOTUNE")


def tuned_config(kernel: str, shape_bucket: str) -> Optional[dict]:
    if os.environ.get("KERNOPT_NO_CACHE") == "1":
        return None
    return config_cache().get(kernel, shape_bucket)


_AUTOTUNE_TRIED: set[str] = set()


def autotune_enabled() -> bool:
    return os.environ.get("KERNOPT_AUTOTUNE") == "1"


def config_for(kernel: str, shape_bucket: str, candidates: Callable[[], Iterable[dict]],
               run: Callable[[dict], Any], kit: Optional[Callable[[], tuple]] = None) -> Optional[dict]:
    """The config for one call: the tuned one from the cache; else, with KERNOPT_AUTOTUNE=1 on a GPU and outside
    CUDA-graph capture, one tuned now (first use: `autotune` with the (check, timer) that `kit()` builds, only
    then) and stored; else None, and the kernel's own table decides."""
    cfg = tuned_config(kernel, shape_bucket)
    key = ConfigCache.key(kernel, shape_bucket)
    if cfg is not None or not autotune_enabled() or key in _AUTOTUNE_TRIED:
        return cfg
    import torch

    if not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
        return None
    _AUTOTUNE_TRIED.add(key)  # one attempt per process, whatever its outcome
    try:
        check, timer = kit() if kit is not None else (None, None)
        return autotune(kernel, shape_bucket, candidates(), run, check=check, timer=timer)[0]
    except Exception as e:  # tuning is an optimisation: the table's config still runs
        warnings.warn(f"kernopt: autotuning {key} failed ({e}); using the default table")
        return None


def autotune(kernel: str, shape_bucket: str, candidates: Iterable[dict], run: Callable[[dict], Any],
             save: bool = True, check: Optional[Callable[[Any], Optional[str]]] = None,
             timer: Optional[Callable[[dict], float]] = None) -> tuple[dict, dict[str, float]]:
    """Time each candidate on the GPU; store and return the fastest.

    ``check(run(config))`` (when given) says what is wrong with a candidate's output, or None: a candidate
    is timed only after its output passed, and again after it was timed (single-pass split-K kernels must
    leave their counters re-armed), so a config that computes a wrong answer is never stored. ``timer(config)``
    gives milliseconds per call (kernopt.ops.tuning_kit: CUDA-graph replay over operand copies that don't fit
    in L2); without it, `triton.testing.do_bench` of an eager `run`, which at decode sizes also counts the
    Python launch. A candidate that fails to compile, launch or check is skipped (inf in the timings).
    """
    import triton.testing

    def passes(cfg) -> bool:
        return check is None or check(run(cfg)) is None

    timings: dict[str, float] = {}
    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            if not passes(cfg):
                ms = float("inf")
            elif timer is not None:
                ms = timer(cfg)
            else:
                ms = triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")
            if ms != float("inf") and not passes(cfg):
                ms = float("inf")
        except Exception:  # an invalid tile (e.g. too much shared memory) is not an error of the user's
            ms = float("inf")
        timings[json.dumps(cfg, sort_keys=True)] = ms
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"autotune {kernel} {shape_bucket}: no candidate config ran")
    if save:
        config_cache().put(kernel, shape_bucket, best)
    return best, timings
