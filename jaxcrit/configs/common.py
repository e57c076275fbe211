"""The defaults every config starts from: the paper's method (shared/docs/method.md) as fields.

Each field's comment says what it turns; jaxcrit/run/validate.py says what values it takes. A config
for a model overrides `model` and what differs.
"""
from __future__ import annotations

import ml_collections

from jaxcrit.data.texts import BOOKENDS

PROMPTS = ("The capital of France is", "Water boils at a temperature of", "Once upon a time, there was a")


def base(model: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = model                 # embedded name (smollm2), HF checkpoint dir, .gguf file, or converted dir
    c.dtype = "float32"             # params and activations: float32 | bfloat16 | float16 (norms, softmax, loss in f32)
    c.text = BOOKENDS               # the text Stage 1 perturbs and Stage 2 scores (>= 10 tokens)
    c.max_tokens = 512              # texts are cut to this many tokens
    c.seed = 42                     # noise and random-baseline seed
    c.overwrite = False             # reuse a workdir that holds results of a different config
    c.progress = True               # progress bars on stderr
    c.dry_run = False               # print the memory plan (compiled from shapes, no weight read) and stop
    c.plan = "auto"                 # memory plan before loading, refusing a run that would not fit: auto (GPU/TPU) | always | never

    c.stage1 = ml_collections.ConfigDict()
    c.stage1.alpha = 5.0            # noise scale on the input embeddings (> 0)
    c.stage1.samples = 100          # K, noisy passes
    c.stage1.batch = 10             # noisy passes per compiled batch (one forward of batch + 1 sequences; a divisor of samples wastes none)
    c.stage1.top_n = 10000          # ranked entries kept
    c.stage1.threshold = 1e-6       # scores <= this are dropped
    c.stage1.ranking = "channel"    # channel: (site, layer, channel), max over positions; position: the reference's list

    c.stage2 = ml_collections.ConfigDict()
    c.stage2.epsilon = 1.0          # collapse threshold on delta = log10(PPL_masked / PPL_base)
    c.stage2.max_steps = 1000       # largest prefix n tried
    c.stage2.full_curve = False     # evaluate every n up to max_steps instead of stopping at epsilon

    c.baselines = ml_collections.ConfigDict()
    c.baselines.names = ("random", "activation", "gradient", "massive")  # baselines grown like Stage 2 (empty: none)
    c.baselines.random_repeats = 10                # seeded repeats of the random baseline
    c.baselines.ns = (1, 3, 10, 30, 100, 300, 1000)  # set sizes the baselines are scored at

    c.scan = ml_collections.ConfigDict()
    c.scan.sites = ("down_proj",)   # sites scanned neuron by neuron (empty: no scan)
    c.scan.layers = ()              # layers scanned; empty: the layers of the critical set
    c.scan.max_layers = 0           # with layers empty, scan at most this many of them (0: all)
    c.scan.channels = ()            # channels scanned at each site and layer; empty: every channel
    c.scan.top = 0                  # > 0: only the `top` channels of each site and layer that Stage 1 ranks highest
    c.scan.greedy_steps = 8         # greedy search on measured deltas: at most this many steps (0: off)
    c.scan.greedy_pool = 32         # candidates of the greedy search: the scan's top single neurons

    c.map = ml_collections.ConfigDict()
    c.map.enabled = True            # the whole-model map: every neuron screened, the screens' best verified exactly
    c.map.screens = ("first_order", "magnitude", "importance")  # screens whose rankings give the candidates
    c.map.top_k = 10                # the exact top-k the stopping rule watches (and summary.md lists)
    c.map.block = 0                 # candidates taken from each screen per round (one resumable unit); 0: max(top_k, engine.chunk / screens)
    c.map.max_rounds = 50           # stop after this many rounds even if the rule has not (0: no limit)
    c.map.audit = 128               # seeded random unverified neurons verified to measure misses and screen error

    c.evaluate = ml_collections.ConfigDict()
    c.evaluate.file = ""            # text file evaluated before/after masking (rows > 50 chars); empty: c.text only
    c.evaluate.limit = 0            # evaluate only the first N rows of the file (0: all)
    c.evaluate.batch = 8            # texts per resumable evaluation block
    c.evaluate.sets = ()            # neuron sets scored next to the critical set: greedy, learned, prefix@E (the ranking's first prefix reaching delta E)

    # --- generations: what the model says with the critical set masked (jaxcrit/evaluate/generation.py)
    c.generate = ml_collections.ConfigDict()
    c.generate.enabled = True         # the generations stage: prompts continued by the clean and the masked model
    c.generate.prompts = PROMPTS      # the prompts (one batch)
    c.generate.max_new_tokens = 24    # tokens generated per prompt (fewer when the model's EOS token comes first)
    c.generate.temperature = 0.0      # 0: greedy; > 0: sampled (seeded by `seed`) at this temperature
    c.generate.top_k = 0              # sampling: keep the k most likely tokens (0: all)
    c.generate.top_p = 1.0            # sampling: keep the smallest set of tokens with this much probability (1: all)

    c.engine = ml_collections.ConfigDict()
    c.engine.chunk = 64             # ablations per compiled call; 0: the largest that fits free device memory
    c.engine.vocab_chunk = 16384    # vocabulary columns per loss step
    c.engine.prefix_sharing = True  # run layers below a chunk's first perturbed layer once, clean
    c.engine.sites = ()             # sites every compiled program holds masks for (all nine: one program for every stage)
    c.engine.attention = "auto"     # auto | xla | cudnn (fused, GPU with bf16/fp16)
    c.engine.mlp = "auto"           # auto | xla | pallas (fused gate|up GEMM + SiLU·mul in unedited layers, one Hopper GPU, bf16/fp16)
    c.engine.loss = "auto"          # auto | xla | pallas (fused matmul + exp-sum kernel, one GPU, bf16/fp16)
    c.engine.ahead = "auto"         # auto | always | never: build the engine and compile Stage 2 in a thread while Stage 1 runs (auto: GPU/TPU, one process, chunk given)

    # --- issue 15: the study (jaxcrit/run/study.py; configs/study.py turns it on) and the learned mask
    c.study = ml_collections.ConfigDict()
    c.study.other_ranking = False   # rank Stage 1's scores the other way too (channel <-> position) and grow that curve
    c.study.seeds = ()              # Stage 1 + Stage 2 again with each seed (stability; the main seed is the main run)
    c.study.alphas = ()             # ... with each stage1.alpha
    c.study.samples = ()            # ... with each stage1.samples (K)
    c.study.texts = ()              # ... on each text of jaxcrit.data.texts.STUDY_TEXTS (by name)
    c.study.dtypes = ()             # the ranking's prefixes and the critical set scored in each dtype
    c.study.massive = 0             # list the N largest |down_proj output| channels and where the critical set ranks (0: off)

    c.tasks = ml_collections.ConfigDict()
    c.tasks.enabled = False         # lm-eval scores, clean and with each set of the evaluation masked, on tasks built from evaluate.file (jaxcrit/evaluate/tasks.py; needs jaxcrit[eval])
    c.tasks.limit = 100             # items per task (fewer where the corpus gives fewer)
    c.tasks.batch = 16              # sequences per compiled call of the lm-eval model

    c.learned = ml_collections.ConfigDict()
    c.learned.candidates = 0        # gate the first N distinct neurons of Stage 1's ranking (0: no learned mask)
    c.learned.steps = 200           # Adam steps on the gates
    c.learned.lr = 0.1              # Adam's learning rate (on the gates' logits)
    c.learned.sparsity = 0.01       # penalty per unit of gate (a gate is the share of a channel removed)
    c.learned.margin = 1.0          # the gates push delta to stage2.epsilon + margin
    c.learned.init = 0.95           # every gate's starting value, in (0, 1)
    c.learned.temperature = 0.0     # > 0: binary-concrete gates sampled at this temperature; 0: deterministic sigmoid gates
    # --- end issue 15

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1)          # (data, model) device mesh; -1 takes the remaining devices
    c.mesh.params = "replicated"    # params over 'data': replicated (a whole copy per data row) | fsdp (split over 'data' too)
    c.mesh.device_memory_gib = 0.0  # memory of one device for the plan, GiB; 0: what the device reports (CPU: free host memory)
    c.mesh.distributed = False      # several processes: jax.distributed.initialize() from the cluster (SLURM, TPU, k8s)
    c.mesh.coordinator = ""         # several processes, explicitly: HOST:PORT of process 0 ("" : not this way)
    c.mesh.num_processes = 1        # with coordinator: how many processes
    c.mesh.process_id = 0           # with coordinator: this process's index (0 writes the files)
    c.mesh.peer_timeout = 60        # several processes: seconds without a sign of life from another before the run ends
    return c


def checkpoint(arg: str | None, name: str) -> ml_collections.ConfigDict:
    """A checkpoint given after the colon (`--config=NAME:/path`), run bf16 with the chunk planned
    from free device memory. Without the path: one error line saying how to give it."""
    from jaxcrit.errors import JaxcritError
    if not arg:
        raise JaxcritError(f"the {name} config needs a checkpoint: --config=configs/{name}.py:/path/to/checkpoint")
    c = base(arg)
    c.dtype = "bfloat16"
    c.engine.chunk = 0
    return c
