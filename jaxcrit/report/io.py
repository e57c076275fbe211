"""Atomic writers and the run manifest.

Every writer renders into a temporary file in the destination's directory and then
`os.replace`s it over the destination, so a reader sees either the previous complete file or
the new complete file, never a partial one. If rendering raises, the temporary file is removed
and the previous file is left untouched.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

PathLike = str | os.PathLike


_UMASK: int | None = None


def _umask() -> int:
    """The process umask, read once (from /proc where possible: os.umask must set it to read)."""
    global _UMASK
    if _UMASK is None:
        try:
            with open("/proc/self/status") as f:
                _UMASK = next(int(l.split()[1], 8) for l in f if l.startswith("Umask:"))
        except Exception:
            mask = os.umask(0o022)
            os.umask(mask)
            _UMASK = mask
    return _UMASK


@contextlib.contextmanager
def _atomic(path: PathLike, mode: str = "w", **open_kw) -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit fsync and os.replace it onto `path`."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _json_default(o: Any) -> Any:
    """numpy scalars/arrays, paths, sets and dataclasses; anything else raises TypeError."""
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    import dataclasses
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def write_json(path: PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write `obj` as JSON atomically. NaN/inf are written as JSON's NaN/Infinity extension."""
    with _atomic(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, default=_json_default)
        f.write("\n")


def read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_csv(path: PathLike, rows: Sequence[dict], fieldnames: Sequence[str]) -> None:
    """Write dict rows under a header of `fieldnames` atomically; unknown keys raise ValueError."""
    with _atomic(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fieldnames))
        w.writeheader()
        for row in rows:
            w.writerow(row)


def write_text(path: PathLike, s: str) -> None:
    with _atomic(path, "w", encoding="utf-8") as f:
        f.write(s)


def write_png(path: PathLike, fig, *, dpi: int = 120, close: bool = False) -> None:
    """Save a matplotlib Figure as PNG atomically. `close` releases it from pyplot if managed."""
    with _atomic(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    if close:
        with contextlib.suppress(Exception):
            import matplotlib.pyplot as plt
            plt.close(fig)


def _package_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("jaxcrit")
        except PackageNotFoundError:
            return "dev"
    except Exception:  # pragma: no cover
        return "dev"


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                             timeout=5, check=True)
        return out.stdout.strip() or None
    except Exception:
        return None


def _git_info() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository holding the jaxcrit sources, or (None, None)."""
    pkg_dir = Path(__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], pkg_dir)
    if commit is None:
        return None, None
    status = _git(["status", "--porcelain", "--untracked-files=no", "--", "."], pkg_dir)
    return commit, bool(status)


def _jax_info() -> dict:
    info: dict[str, Any] = {"jax": None, "jaxlib": None, "flax": None,
                            "devices": {"count": 0, "kinds": [], "platform": None}}
    try:
        import jax
        info["jax"] = jax.__version__
        try:
            import jaxlib
            info["jaxlib"] = getattr(jaxlib, "__version__", None)
        except Exception:
            pass
        devs = jax.devices()
        kinds: dict[str, int] = {}
        for d in devs:
            k = getattr(d, "device_kind", str(d.platform))
            kinds[k] = kinds.get(k, 0) + 1
        info["devices"] = {"count": len(devs), "platform": devs[0].platform if devs else None,
                           "kinds": [{"kind": k, "count": c} for k, c in kinds.items()],
                           "process_count": jax.process_count()}
    except Exception as e:  # no jax, or no backend: the manifest still gets written
        info["devices"]["error"] = f"{type(e).__name__}: {e}"
    try:
        import flax
        info["flax"] = flax.__version__
    except Exception:
        pass
    return info


def manifest(config_dict: dict | None = None) -> dict:
    """Provenance of a run: versions, git commit, devices, python, time, and the config."""
    commit, dirty = _git_info()
    jx = _jax_info()
    return {
        "jaxcrit": _package_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "jax": jx["jax"],
        "jaxlib": jx["jaxlib"],
        "flax": jx["flax"],
        "devices": jx["devices"],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dict(config_dict) if config_dict is not None else {},
    }

