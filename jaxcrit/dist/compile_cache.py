"""JAX's persistent compilation cache: compiled programs kept on disk, so a second run (or a second
notebook kernel) reads them instead of compiling again.

The config field `compile_cache` (jaxcrit/run/fields.py) says where: "auto" is
$JAX_COMPILATION_CACHE_DIR when set, else $XDG_CACHE_HOME/jaxcrit/jax, else ~/.cache/jaxcrit/jax;
"" turns it off; anything else is the directory. The CLI calls `use` with the field before any
work, the Python API with its default when a model is loaded (`use_default`) and again when a
call names the field.

Several processes: in a jax.distributed run only process 0 writes entries (jax's own rule), the
others read. Separate runs sharing the directory may write the same entry at once; jax writes
entries whole but not atomically, and a reader that meets a torn entry warns and compiles
instead (jax's _cache_read), so a race costs a compile, never a wrong program.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

AUTO = "auto"
# every program (jax's entry-size floor is 0 already): on a CPU most of jaxcrit's programs compile in
# well under jax's default floor of 1 s, and together they are a third of the default run
MIN_COMPILE_SECONDS = 0.0

_current: list[str | None] = []   # the directory in use ([] before the first `use`; [None]: off)


def directory(setting: str) -> Path | None:
    """The cache directory a `compile_cache` setting names (None: off)."""
    if setting == AUTO:
        given = os.environ.get("JAX_COMPILATION_CACHE_DIR")
        if given:
            return Path(given).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base).expanduser() / "jaxcrit" / "jax"
    return Path(setting).expanduser() if setting else None


def use(setting: str = AUTO) -> Path | None:
    """Turns the persistent cache on at the directory `setting` names, or off for ""; returns the
    directory. Takes effect for programs compiled from now on; calling it again with another
    setting moves or stops the cache."""
    path = directory(setting)
    where = None if path is None else str(path)
    if _current == [where]:
        return path
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_dir", where)
    jax_cache.reset_cache()     # jax opens its cache once; a new directory needs a fresh start
    _current[:] = [where]
    return path


def use_default() -> None:
    """The default cache ("auto"), unless `use` already chose one in this process."""
    if not _current:
        use(AUTO)
