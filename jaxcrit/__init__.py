"""jaxcrit: which handful of neurons holds an LLM together (arXiv 2510.10238), in JAX/Flax."""
from jaxcrit.api import (Model, config, engine_for, evaluate, find_critical, generate, grow, importance, load, map, run,
                         scan)
from jaxcrit.interventions import forward, intervene, patch
from jaxcrit.models.neurons import NeuronSet

__all__ = ["Model", "NeuronSet", "load", "config", "importance", "grow", "scan", "map", "evaluate", "generate",
           "find_critical", "forward", "intervene", "patch", "engine_for", "run"]
