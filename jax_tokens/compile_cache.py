"""JAX's persistent compilation cache for train.py and eval.py: a rerun compiles nothing.

    with compile_cache.persistent("/tmp/run/compilation_cache") as stats:
        ...                                # every XLA compile is looked up there first
    print(stats.summary())                 # "3 programs loaded (41.2 s of compiling saved), ..."

Inside the block, every program JAX compiles (whatever its compile time: the threshold is set
to 0 so that the small eval and statistics programs are kept too) is read from the directory
when an identical one (same HLO, compile options, XLA flags, jax/jaxlib version and device
kind) was written before, and written to it otherwise. On GPU, XLA's per-fusion autotuning
results go there as well. The previous cache settings are restored on exit, so a library user
who calls `train.train` in a process of their own keeps theirs.

The counts come from `jax.monitoring` events: a program is counted as loaded on a cache hit and
as written when its executable is stored (JAX records a miss only when it writes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

_HIT = "/jax/compilation_cache/cache_hits"
_WRITTEN = "/jax/compilation_cache/cache_misses"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"
_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")


@dataclasses.dataclass
class CacheStats:
    """What the cache did inside one `persistent` block."""

    directory: str | None
    loaded: int = 0          # programs read from the cache instead of compiled
    written: int = 0         # programs compiled and stored
    saved_seconds: float = 0.0

    def summary(self) -> str:
        if self.directory is None:
            return "compilation cache off"
        return (f"compilation cache {self.directory}: {self.loaded} programs loaded "
                f"({self.saved_seconds:.1f} s of compiling saved), {self.written} compiled "
                "and written")

    def as_dict(self) -> dict:
        return {"directory": self.directory, "loaded": self.loaded, "written": self.written,
                "saved_seconds": round(self.saved_seconds, 1)}


_ACTIVE: list[CacheStats] = []      # the listeners count into the innermost block
_LOCK = threading.Lock()
_listening = False


def _on_event(event: str, **_) -> None:
    if _ACTIVE and event in (_HIT, _WRITTEN):
        with _LOCK:
            stats = _ACTIVE[-1]
            if event == _HIT:
                stats.loaded += 1
            else:
                stats.written += 1


def _on_duration(event: str, duration_secs: float, **_) -> None:
    if _ACTIVE and event == _SAVED:
        with _LOCK:
            _ACTIVE[-1].saved_seconds += max(float(duration_secs), 0.0)


def prepare(setting: str | None, workdir: str | None) -> str | None:
    """The cache directory a `compilation_cache` setting names, created: "workdir" is
    WORKDIR/compilation_cache (no cache without a workdir), "" or None is off, anything else a
    directory. In a multi-process run each process gets its own subdirectory (processes write
    their entries without a lock). Raises ValueError for a setting that is not a string and
    OSError naming the directory when it cannot be created."""
    if setting is not None and not isinstance(setting, str):
        raise ValueError(f"{setting!r} is not 'workdir', a directory or '' (off)")
    if not setting:
        return None
    if setting == "workdir":
        if not workdir:
            return None
        setting = os.path.join(workdir, "compilation_cache")
    if jax.process_count() > 1:
        setting = os.path.join(setting, f"process{jax.process_index()}")
    if "://" not in setting:
        try:
            os.makedirs(setting, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create the cache directory {setting}: "
                          f"{e.strerror or e}") from e
    return setting


@contextlib.contextmanager
def persistent(directory: str | None) -> Iterator[CacheStats]:
    """Uses `directory` (see `prepare`) as JAX's persistent compilation cache inside the block
    (None: no cache, the settings untouched)."""
    global _listening
    stats = CacheStats(directory)
    if directory is None:
        yield stats
        return
    with _LOCK:
        if not _listening:
            jax.monitoring.register_event_listener(_on_event)
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            _listening = True
    previous = {name: getattr(jax.config, name) for name in _SETTINGS}
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _jax_cache.reset_cache()          # the cache object is built once, for the directory then
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)
        for name, value in previous.items():
            jax.config.update(name, value)
        _jax_cache.reset_cache()
