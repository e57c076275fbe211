"""The memory plan: what each program of a run needs on every device, from shapes alone.

Before any weight is read, the params are jax.ShapeDtypeStructs under the shardings the mesh and
`mesh.params` give them, and every big program a run compiles is lowered and compiled for that
mesh: Stage 1's batch of noisy passes, the clean pass, the engine's chunk with Stage 2's rows
(prefixes of max(stage2.max_steps, baselines.ns) entries; also the baselines' and the greedy
search's shape) and with single-neuron rows (the scan and the map's verification). XLA's memory
analysis of each compiled program gives its per-device bytes: arguments (params among them),
outputs and temporaries; what stays alive beside a program is added (Stage 1's running sums).
The map's screen pass (a gradient) is not planned. When the params alone do not fit a device,
nothing is compiled.

XLA:CPU has no bf16 or f16 matmul: it converts the weights to f32 beside the narrow ones, so a
narrow-dtype program compiled for CPU needs about three times the params' bytes. A plan of a
bf16 or f16 run made on CPU is therefore a plan for accelerators: its programs are compiled in
f32, arguments and outputs are counted exactly in the run's dtype (shapes and shardings), and
XLA's temporaries are scaled by the dtype's width (1/2). Checked against the H200: the 32B
shape's plan from 2 CPU cores and the peak measured on the GPU (docs/benchmarks.md). A dry run
may plan a mesh of fewer devices than the machine has (the plan for 2 GPUs made with 8 forced
CPU devices).

`--config.dry_run=True` prints the plan and stops; with `plan` on (auto: on GPUs and TPUs) a run
that would not fit is refused with the plan's one line before the weights are read. The plan
also suggests a mesh (the most 'data' rows whose params leave room for the rest) and a chunk.
The programs, their arguments' shapes and the chunk's arithmetic are the engine's and Stage 1's
own descriptions (engine/program.py, stage1.batch_shapes); the plan adds only the config's sizes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from jaxcrit import engine as E
from jaxcrit.critical import stage1
from jaxcrit.engine import program
from jaxcrit.errors import JaxcritError
from jaxcrit.kernels.selection import CHOICES, select
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.params import param_table
from jaxcrit.models.sites import SITE_NAMES
from jaxcrit.dist.sharding import LAYOUTS, make_mesh, named, placed, rules

GIB = 2**30


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
    note: str = ""         # how the programs were compiled, when not as the run compiles them

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
               f"{self.tokens} tokens, {self.dtype}, device {g(self.capacity)} GiB" + (f" ({self.note})" * bool(self.note)),
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


def capacity(c: ConfigDict, mesh: Mesh) -> int:
    """Bytes of one device: mesh.device_memory_gib, else what the device reports, else (CPU) the
    free host memory shared by this process's devices."""
    if c.mesh.device_memory_gib:
        return int(c.mesh.device_memory_gib * GIB)
    held = program.memory(mesh.devices.flat[0])
    return held[0] if held else program.host_free() // max(len(jax.local_devices()), 1)


def text_tokens(c: ConfigDict, path: Path) -> int:
    """Tokens of the config text with the checkpoint's tokenizer; a dry run of a model shape
    without one (tools/model_shape.py) plans for max_tokens."""
    from jaxcrit.convert.load import tokens
    from jaxcrit.convert.tokenizer import load_tokenizer
    if path.is_dir() and not (path / "tokenizer.json").exists() and c.dry_run:
        return c.max_tokens
    return len(tokens(load_tokenizer(path), c.text, c.max_tokens, min_tokens=10))


def shard_bytes(tree, shardings=None) -> int:
    """Bytes on the device holding most of the arrays (ShapeDtypeStructs) in tree, under their own
    shardings or the matching ones of `shardings`; other leaves (static args) count nothing."""
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.ShapeDtypeStruct)]
    shards = jax.tree.leaves(shardings) if shardings is not None else [x.sharding for x in leaves]
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(leaves, shards))


@dataclasses.dataclass(frozen=True)
class Compiler:
    """Compiles a program from its argument shapes in the run's dtype, or (a narrow dtype planned
    on XLA:CPU) in `compute` = f32 with the temporaries scaled back (the module docstring)."""
    dtype: jnp.dtype
    compute: jnp.dtype

    @property
    def note(self) -> str:
        return "" if self.compute == self.dtype else (
            f"planned for accelerators: XLA:CPU compiled in {self.compute.name}, temporaries scaled to {self.dtype.name}")

    @classmethod
    def of(cls, dtype) -> Compiler:
        dtype = jnp.dtype(dtype)
        upcast = jax.default_backend() == "cpu" and dtype.itemsize < 4
        return cls(dtype, jnp.dtype(jnp.float32) if upcast else dtype)

    def program(self, name: str, lower: Callable[..., jax.stages.Lowered], args: Callable[[jnp.dtype], tuple],
                beside: int = 0) -> Program:
        """The program lower(*args(dtype)) gives, its arguments in that param dtype (shapes; other
        arguments, such as static ones, count nothing)."""
        target = lower(*args(self.dtype))
        if self.compute == self.dtype:
            m = target.compile().memory_analysis()   # outputs aliased to donated arguments are counted once
            return Program(name, int(m.argument_size_in_bytes),
                           int(m.output_size_in_bytes) - int(m.alias_size_in_bytes), int(m.temp_size_in_bytes), beside)
        compiled = lower(*args(self.compute)).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes * self.dtype.itemsize // self.compute.itemsize
        return Program(name, shard_bytes(args(self.dtype)), shard_bytes(target.out_info, compiled.output_shardings),
                       int(temp), beside)


def target_mesh(c: ConfigDict) -> Mesh:
    """The run's mesh; a dry run may take the first devices of a larger machine."""
    return make_mesh(tuple(c.mesh.shape), subset=c.dry_run)


def plan(c: ConfigDict) -> Plan:
    """Compiles the run's programs from shapes for its mesh and returns their per-device memory."""
    with contextlib.ExitStack() as context:
        return _plan(c, context)


def _plan(c: ConfigDict, context: contextlib.ExitStack) -> Plan:
    from jaxcrit.convert.checkpoints import resolve
    from jaxcrit.convert.load import DTYPES
    kind, path = resolve(c.model)
    cfg = kind.config(path)
    T = text_tokens(c, path)
    mesh = target_mesh(c)
    data = mesh.shape["data"]
    comp = Compiler.of(DTYPES[c.dtype])
    params = {dt: abstract_params(cfg, dt, mesh, c.mesh.params) for dt in {comp.dtype, comp.compute}}
    held = shard_bytes(params[comp.dtype])
    cap = capacity(c, mesh)
    plan_of = partial(Plan, tuple(mesh.shape.values()), c.mesh.params, T, c.dtype, cap, held,
                      note=comp.note)
    if held > cap:   # nothing to compile: the params alone do not fit; they may take the chunk's share
        return plan_of(0, (), suggest(cfg, comp.dtype, mesh.devices.size, int(program.MEMORY_SHARE * cap), 0))
    context.enter_context(placed(mesh, params[comp.dtype]))   # as runner.Run runs them (sharding.gathered)
    rep = NamedSharding(mesh, P())
    arr = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)
    tokens, valid = arr((1, T), jnp.int32), arr((1, T), jnp.bool_)
    programs = []

    # Stage 1: one batch of noisy passes; the running sums (the program's output) live beside it
    b = c.stage1.batch
    s1 = lambda dt: (cfg, params[dt], tokens, *stage1.batch_shapes(cfg, T, b, rep))
    p1 = comp.program(f"stage 1 (batch {b})", stage1.differences.lower, s1)
    programs.append(dataclasses.replace(p1, beside=p1.out))

    # the clean pass; its cache and shift are the chunk program's arguments
    clean = lambda dt: (cfg, params[dt], tokens, valid, c.engine.vocab_chunk)
    programs.append(comp.program("clean pass", program.clean_pass.lower, clean))
    resident = held + programs[-1].out

    # ... as shapes in each dtype, placed as the compiled pass places them (whatever the dtype; the
    # compile is the one just made, so jax's cache has it: no narrow-dtype compile on XLA:CPU)
    placement = program.clean_pass.lower(*clean(comp.compute)).compile().output_shardings
    cached = {dt: jax.tree.map(lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s),
                               program.clean_pass.lower(*clean(dt)).out_info, placement) for dt in params}

    # the engine's chunk: as configured, or planned as Engine.plan_chunk plans it
    kernels = select(cfg, comp.dtype, mesh, **{spot: c.engine.get(spot, "auto") for spot in CHOICES})
    tail = (arr((1, T - 1), jnp.int32), arr((1, T - 1), jnp.float32))

    def chunk_program(name: str, rows: int, k: int, sites: tuple[str, ...]) -> Program:
        """The chunk program for rows of k entries (padded as the engine pads them)."""
        chunk_of = program.ChunkProgram(cfg, mesh, kernels, c.engine.vocab_chunk, sites)
        args = lambda dt: (params[dt], cached[dt][0], valid, *tail, cached[dt][1], rows, k)
        return comp.program(name, chunk_of.lower, args)

    if c.engine.chunk:
        chunk = program.round_chunk(c.engine.chunk, data)
    else:
        size = lambda rows: (lambda p: p.out + p.temp)(chunk_program("", rows, 1, SITE_NAMES))
        try:
            chunk = program.planned_chunk(size, data, cap - resident)
        except JaxcritError:
            chunk = 8 * data
    k = max(c.stage2.max_steps, *c.baselines.ns) if c.baselines.names else c.stage2.max_steps
    k = min(k, c.stage1.top_n)
    programs.append(chunk_program(f"stage 2 chunk {chunk} x {E.entries(k)} entries", chunk, k, SITE_NAMES))
    scan_sites = SITE_NAMES if c.map.enabled else tuple(c.scan.sites)
    if scan_sites:
        programs.append(chunk_program(f"scan/map chunk {chunk} x {E.entries(1)} entries", chunk, 1,
                                      tuple(sorted(scan_sites, key=SITE_NAMES.index))))
    others = max(p.peak for p in programs) - held
    return plan_of(chunk, tuple(programs), suggest(cfg, comp.dtype, mesh.devices.size, cap, others))


def suggest(cfg: ModelConfig, dtype, n_devices: int, cap: int, others: int) -> tuple[tuple[int, int], str] | None:
    """The mesh of n_devices with the most 'data' rows (then params replicated before FSDP) whose
    params per device plus `others` (the planned programs' largest need besides the params)
    fit in cap bytes; None when none does. Params per device are exact for each candidate (an
    abstract mesh: no devices needed); the rest is the planned mesh's, not recompiled."""
    cands = [((n_devices // m, m), layout) for m in range(1, n_devices + 1) if n_devices % m == 0
             for layout in LAYOUTS]
    for (d, m), layout in sorted(cands, key=lambda x: (-x[0][0], x[1] != "replicated")):
        mesh = AbstractMesh((d, m), ("data", "model"))
        if shard_bytes(abstract_params(cfg, dtype, mesh, layout)) + others <= cap:
            return (d, m), layout
    return None
