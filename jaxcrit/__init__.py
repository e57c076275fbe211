"""jaxcrit: which handful of neurons holds an LLM together (arXiv 2510.10238), in JAX/Flax."""
from jaxcrit.api import Model, engine_for, evaluate, grow, importance, load, scan

__all__ = ["Model", "load", "engine_for", "importance", "grow", "scan", "evaluate"]
