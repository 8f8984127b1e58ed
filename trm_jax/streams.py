"""PRNG stream tags: the ``jax.random.fold_in`` salts of every random stream, in one place.

Every routine receives the experiment's per-seed key and folds in its own tag, so
no two routines can draw the same random numbers from one seed (the attack never
shares keys with training, scratch inits differ from the protected model's, a
resumed meta-training draws exactly the tasks of an uninterrupted one). A new
stream gets a new, distinct constant here; tests check that they are distinct.
"""
from __future__ import annotations

#: The fine-tuning attack: fresh head and shuffles (``trm_jax.attacks``).
ATTACK = 0x0A77
#: The scratch reference's random initialisation.
SCRATCH = 0x5C7A
#: Meta-training step keys: ``fold_in(fold_in(key, META), step)``.
META = 0x3E7A
#: Inside an attack: the re-initialised layers below the fresh head.
REINIT = 1
#: Inside an attack: the warm start's shuffles (folded into the attack's shuffle key).
WARM_START = 2
#: SKD: a fresh student (``init_student(..., "fresh")``).
SKD_STUDENT = 1
#: SKD: the fresh head attached to the masked student.
SKD_HEAD = 2
#: SKD's honesty check: the fresh malicious head of the fine-tune gradient probe.
SKD_PROBE_HEAD = 3
#: UNSIR stages (noise, impair subset, repair subset).
UNSIR_NOISE, UNSIR_IMPAIR, UNSIR_REPAIR = 1, 2, 3
#: Few-shot evaluation episodes (``trm_jax.fewshot``), then one stream per half.
FEWSHOT_EVAL = 0
FEWSHOT_BENEFICIAL, FEWSHOT_MALICIOUS = 1, 2

#: The top-level tags, which must be distinct (the small ones are folded into
#: already-derived keys, where they cannot collide with these).
TOP_LEVEL = {"ATTACK": ATTACK, "SCRATCH": SCRATCH, "META": META}
