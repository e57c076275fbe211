"""Lazy safetensors reading: header parsed once, each tensor (or slice of one) read on demand.

Reading per tensor (not one big mmap) keeps host memory at one tensor beyond the placed params,
and lets a corrupt or truncated file fail with a message that names it. A slice (what one
device holds under tensor parallelism or FSDP) is read through a memory map of that tensor alone,
so a host reads about its devices' share of the bytes (whole pages: a row's slice narrower than a
page costs the page).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxcrit.errors import JaxcritError

DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8), "BOOL": np.dtype(np.bool_),
}


class SafetensorsFile:
    """One .safetensors file: names, shapes and dtypes from the header; data read per tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise JaxcritError(f"{self.path}: not a safetensors file (too short); re-download or re-save it")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise JaxcritError(f"{self.path}: corrupt safetensors header (length {n}); re-download or re-save it")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise JaxcritError(f"{self.path}: corrupt safetensors header ({e}); re-download or re-save it") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise JaxcritError(f"{self.path}: tensor {name} has unsupported dtype {e.get('dtype')}")
            lo, hi = e["data_offsets"]
            dt = DTYPES[e["dtype"]]
            shape = tuple(e["shape"])
            if hi - lo != dt.itemsize * int(np.prod(shape)) or self.base + hi > size:
                raise JaxcritError(f"{self.path}: tensor {name} lies outside the file (truncated?); re-download it")
            self.entries[name] = (dt, shape, self.base + lo, hi - lo)

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """The tensor, or the part of it `index` (slices, one per leading dim) names, as a new array."""
        dt, shape, off, nbytes = self.entries[name]
        if any(s != slice(None) for s in index):
            return np.array(np.memmap(self.path, dt, "r", off, shape)[index])
        buf = bytearray(nbytes)
        with open(self.path, "rb") as f:
            f.seek(off)
            if f.readinto(buf) != nbytes:
                raise JaxcritError(f"{self.path}: short read of {name}; the file is truncated")
        return np.frombuffer(buf, dtype=dt).reshape(shape)


class Checkpoint:
    """All safetensors of a HF checkpoint dir, as one name -> tensor view."""

    def __init__(self, directory: Path):
        d = Path(directory)
        index = d / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise JaxcritError(f"{index}: unreadable index ({e}); re-download the checkpoint") from None
            files = sorted(set(weight_map.values()))
        elif (d / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise JaxcritError(f"{d}: no model.safetensors or model.safetensors.index.json; "
                               "point at a Hugging Face checkpoint directory saved with safetensors")
        self.where: dict[str, SafetensorsFile] = {}
        for name in files:
            if not (d / name).exists():
                raise JaxcritError(f"{d / name}: listed in the index but missing; re-download the checkpoint")
            f = SafetensorsFile(d / name)
            for t in f.entries:
                self.where[t] = f

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.where[name].entries[name][0]

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        return self.where[name].read(name, index)
