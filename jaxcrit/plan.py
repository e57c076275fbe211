"""The memory plan: what each program of a run needs on every device, from shapes alone.

Before any weight is read, the params are jax.ShapeDtypeStructs under the shardings the mesh and
`mesh.params` give them, and every big program a run compiles is lowered and compiled for that
mesh: Stage 1's batch of noisy passes, the clean pass, the engine's chunk with Stage 2's rows
(prefixes of max(stage2.max_steps, baselines.ns) entries; also the baselines' and the greedy
search's shape) and with single-neuron rows (the scan and the map's verification). XLA's memory
analysis of each compiled program gives its per-device bytes: arguments (params among them),
outputs and temporaries; what stays alive beside a program is added (Stage 1's running sums).
The map's screen pass (a gradient) is not planned. When the params alone do not fit a device,
nothing is compiled. On CPU, XLA converts bf16 weights to f32 for its matmuls (a copy of every
weight beside the bf16 one), so a CPU plan of a bf16 model overstates what a GPU or TPU needs:
plan on the target devices (docs/launch.md).

`--config.dry_run=True` prints the plan and stops; with `plan` on (auto: on GPUs and TPUs) a run
that would not fit is refused with the plan's one line before the weights are read. The plan
also suggests a mesh (the most 'data' rows whose params leave room for the rest) and a chunk.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from jaxcrit import engine as E
from jaxcrit.critical import stage1
from jaxcrit.errors import JaxcritError
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.params import param_table
from jaxcrit.models.sites import SITE_NAMES
from jaxcrit.sharding import LAYOUTS, make_mesh, named, rules

GIB = 2**30
HEADROOM = 0.7   # the share of free memory a planned chunk fills (as Engine.plan_chunk); also the
                 # share of a device the params may take in a suggestion made without compiling


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program's per-device bytes, and what is alive beside it."""
    name: str
    args: int
    out: int
    temp: int
    beside: int = 0

    @property
    def peak(self) -> int:
        return self.args + self.out + self.temp + self.beside


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh: tuple[int, int]
    layout: str
    tokens: int
    dtype: str
    capacity: int          # bytes of one device
    params: int            # bytes of params on one device
    chunk: int
    programs: tuple[Program, ...]
    suggestion: tuple[tuple[int, int], str] | None

    @property
    def peak(self) -> Program:
        return max(self.programs, key=lambda p: p.peak, default=Program("params", self.params, 0, 0))

    @property
    def fits(self) -> bool:
        return self.peak.peak <= self.capacity

    def lines(self) -> list[str]:
        """The plan as a table (per device, GiB) and its verdict."""
        g = lambda b: f"{b / GIB:.1f}"
        out = [f"memory plan per device: mesh {self.mesh[0]}x{self.mesh[1]} (data x model), params {self.layout}, "
               f"{self.tokens} tokens, {self.dtype}, device {g(self.capacity)} GiB",
               f"  {'program':<34}{'args':>8}{'out':>8}{'temp':>8}{'beside':>8}{'peak':>8}  GiB",
               f"  {'params':<34}{g(self.params):>8}{'':>32}{g(self.params):>8}"]
        out += [f"  {p.name:<34}{g(p.args):>8}{g(p.out):>8}{g(p.temp):>8}{g(p.beside):>8}{g(p.peak):>8}"
                for p in self.programs]
        out.append(self.verdict())
        return out

    def verdict(self) -> str:
        """The plan in one line: the peak against the device, and what to change."""
        p = self.peak
        line = (f"peak {p.peak / GIB:.1f} GiB per device ({p.name}) of {self.capacity / GIB:.1f} GiB: "
                f"{'fits' if self.fits else 'does not fit'}")
        if self.suggestion is None:
            return line + "; no mesh of these devices holds the params with room for the rest: more devices are needed"
        (d, m), layout = self.suggestion
        line += f"; suggested --config.mesh.shape='({d},{m})' --config.mesh.params={layout}"
        if ((d, m), layout) == (self.mesh, self.layout):
            line += f" --config.engine.chunk={self.chunk}"
        return line


def abstract_params(cfg: ModelConfig, dtype, mesh: Mesh, layout: str) -> dict[str, jax.ShapeDtypeStruct]:
    """The params as shapes under their shardings: nothing allocated, nothing read."""
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=named(axes, shape, mesh, rules(layout)))
            for name, (shape, axes) in param_table(cfg).items()}


def param_bytes(params: dict[str, jax.ShapeDtypeStruct]) -> int:
    """Bytes of these params on the device holding most of them."""
    return sum(math.prod(p.sharding.shard_shape(p.shape)) * p.dtype.itemsize for p in params.values())


def capacity(c: ConfigDict, mesh: Mesh) -> int:
    """Bytes of one device: mesh.device_memory_gib, else what the device reports, else (CPU) the
    free host memory shared by this process's devices."""
    if c.mesh.device_memory_gib:
        return int(c.mesh.device_memory_gib * GIB)
    stats = mesh.devices.flat[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // max(len(jax.local_devices()), 1)


def text_tokens(c: ConfigDict, path: Path) -> int:
    """Tokens of the config text with the checkpoint's tokenizer; a dry run of a model shape
    without one (tools/model_shape.py) plans for max_tokens."""
    from jaxcrit.convert.load import tokens
    from jaxcrit.data.tokenize import load_tokenizer
    if path.is_dir() and not (path / "tokenizer.json").exists() and c.dry_run:
        return c.max_tokens
    return len(tokens(load_tokenizer(path), c.text, c.max_tokens, min_tokens=10))


def _program(name: str, compiled, beside: int = 0) -> Program:
    m = compiled.memory_analysis()   # outputs aliased to (donated) arguments are counted once
    return Program(name, int(m.argument_size_in_bytes), int(m.output_size_in_bytes) - int(m.alias_size_in_bytes),
                   int(m.temp_size_in_bytes), beside)


def plan(c: ConfigDict) -> Plan:
    """Compiles the run's programs from shapes for its mesh and returns their per-device memory."""
    with jax.set_mesh(make_mesh(tuple(c.mesh.shape))):   # as pipeline.Run runs them (sharding.gathered)
        return _plan(c)


def _plan(c: ConfigDict) -> Plan:
    from jaxcrit.convert.checkpoints import resolve
    from jaxcrit.convert.load import DTYPES
    kind, path = resolve(c.model)
    cfg = kind.config(path)
    T = text_tokens(c, path)
    mesh = make_mesh(tuple(c.mesh.shape))
    data = mesh.shape["data"]
    dtype = jnp.dtype(DTYPES[c.dtype])
    params = abstract_params(cfg, dtype, mesh, c.mesh.params)
    cap = capacity(c, mesh)
    if param_bytes(params) > cap:   # nothing to compile: the params alone do not fit
        return Plan(tuple(mesh.shape.values()), c.mesh.params, T, c.dtype, cap, param_bytes(params), 0, (),
                    suggest(cfg, dtype, mesh.devices.size, int(HEADROOM * cap), 0))
    rep = NamedSharding(mesh, P())
    arr = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)
    programs = []

    # Stage 1: one batch of noisy passes; the running sums (the program's output shape) live beside it
    b = c.stage1.batch
    s1 = stage1._differences.lower(cfg, params, arr((1, T), jnp.int32), arr((b, T, cfg.d_model), jnp.float32),
                                   arr((), jnp.float32), arr((b,), jnp.float32)).compile()
    sums = int(s1.memory_analysis().output_size_in_bytes)
    programs.append(_program(f"stage 1 (batch {b})", s1, beside=sums))

    # the clean pass; its cache and shift are the chunk program's arguments
    valid = arr((1, T), jnp.bool_)
    clean = E._clean_pass.lower(cfg, params, arr((1, T), jnp.int32), valid, c.engine.vocab_chunk).compile()
    programs.append(_program("clean pass", clean))
    outs = jax.eval_shape(lambda p, t, v: E._clean_pass(cfg, p, t, v, c.engine.vocab_chunk), params,
                          arr((1, T), jnp.int32), valid)
    cache, shift = jax.tree.map(lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s), outs,
                                clean.output_shardings)
    resident = param_bytes(params) + int(clean.memory_analysis().output_size_in_bytes)

    # the engine's chunk: as configured, or planned as Engine.plan_chunk plans it
    attn, loss = E.kernels(cfg, dtype, c.engine.attention, c.engine.loss)
    tail = (arr((1, T - 1), jnp.int32), arr((1, T - 1), jnp.float32))
    static = lambda sites: dict(cfg=cfg, sites=sites, with_values=False, per_token=False,
                                vocab_chunk=c.engine.vocab_chunk, attn_impl=attn, loss_impl=loss, mesh=mesh)
    mem = lambda rows, entries, sites: E.chunk_memory(params, cache, valid, *tail, shift, mesh, rows, entries,
                                                      static(sites))
    if c.engine.chunk:
        chunk = max(data, -(-c.engine.chunk // data) * data)
    else:
        size = lambda rows: (lambda m: m.temp_size_in_bytes + m.output_size_in_bytes)(
            mem(rows, E.entries(1), SITE_NAMES))
        try:
            chunk = E.fit_chunk(size(8 * data), size(16 * data), data, HEADROOM * (cap - resident))
        except JaxcritError:
            chunk = 8 * data
    entries = max(c.stage2.max_steps, *c.baselines.ns) if c.baselines.names else c.stage2.max_steps
    entries = E.entries(min(entries, c.stage1.top_n))   # rows are padded as the engine pads them
    rows = dict(site=jnp.int32, layer=jnp.int32, channel=jnp.int32, scale=jnp.float32, value=jnp.float32)

    def chunk_program(name: str, entries: int, sites: tuple[str, ...]) -> Program:
        spec = {k: jax.ShapeDtypeStruct((chunk, entries), dt, sharding=NamedSharding(mesh, P("data")))
                for k, dt in rows.items()}
        compiled = E._chunk_nll.lower(params, cache, valid, *tail, shift, spec, arr((2,), jnp.int32),
                                      **static(sites)).compile()
        return _program(name, compiled)

    programs.append(chunk_program(f"stage 2 chunk {chunk} x {entries} entries", entries, SITE_NAMES))
    scan_sites = SITE_NAMES if c.map.enabled else tuple(c.scan.sites)
    if scan_sites:
        one = E.entries(1)
        programs.append(chunk_program(f"scan/map chunk {chunk} x {one} entries", one,
                                      tuple(sorted(scan_sites, key=SITE_NAMES.index))))
    others = max(p.peak for p in programs) - param_bytes(params)
    return Plan(tuple(mesh.shape.values()), c.mesh.params, T, c.dtype, cap, param_bytes(params), chunk,
                tuple(programs), suggest(cfg, dtype, mesh.devices.size, cap, others))


def suggest(cfg: ModelConfig, dtype, n_devices: int, cap: int, others: int) -> tuple[tuple[int, int], str] | None:
    """The mesh of n_devices with the most 'data' rows (then params replicated before FSDP) whose
    params per device plus `others` (the planned programs' largest need besides the params)
    fit in cap bytes; None when none does. Params per device are exact for each candidate (an
    abstract mesh: no devices needed); the rest is the planned mesh's, not recompiled."""
    cands = [((n_devices // m, m), layout) for m in range(1, n_devices + 1) if n_devices % m == 0
             for layout in LAYOUTS]
    for (d, m), layout in sorted(cands, key=lambda x: (-x[0][0], x[1] != "replicated")):
        mesh = AbstractMesh((d, m), ("data", "model"))
        if param_bytes(abstract_params(cfg, dtype, mesh, layout)) + others <= cap:
            return (d, m), layout
    return None
