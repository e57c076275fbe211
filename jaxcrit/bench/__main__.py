"""python -m jaxcrit.bench BENCHMARK [flags] [--out FILE]: one benchmark, its JSON report printed
(and written to FILE). `python -m jaxcrit.bench BENCHMARK --help` gives each one's flags. Programs
go to JAX's persistent compilation cache as the CLI's do (dist/compile_cache.py; timings exclude
compiles, so the cache shortens a process, never a measured figure)."""
from __future__ import annotations

import argparse
import sys

from jaxcrit.bench import convert, interventions, kernels, pipeline, scaling, scan, whole_map
from jaxcrit.bench.measure import write
from jaxcrit.dist import compile_cache

BENCHMARKS = {"scan": scan, "pipeline": pipeline, "map": whole_map, "scaling": scaling, "kernels": kernels,
              "convert": convert, "interventions": interventions}


def parser() -> argparse.ArgumentParser:
    """A subcommand per benchmark: its module's docstring as help, its flags, and --out."""
    ap = argparse.ArgumentParser(prog="python -m jaxcrit.bench", description=__doc__)
    sub = ap.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, module in BENCHMARKS.items():
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.add_argument("--out", help="write the JSON report to this file too")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["scan", *argv]   # flags alone run the scan, the first benchmark: `python -m jaxcrit.bench --out f`
    args = parser().parse_args(argv)
    compile_cache.use_default()
    write(BENCHMARKS[args.benchmark].run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
