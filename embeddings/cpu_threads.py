"""How torch's CPU threads wait between parallel regions. Imports no torch: it must run before torch loads.

torch on CPU parallelises each op with OpenMP (libgomp). Between ops, libgomp's idle threads spin
for a while before they sleep. That is fast on cores nobody else wants, but lvd's model processes
always share their cores: the embed actor runs beside the decode tasks, the trainer beside its
augmentation threads, and a shared node beside other jobs. A spinning thread burns CPU the others
need, and a thread that loses its core in the middle of an op holds up every thread waiting for it
at the op's end. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a futex wake per op, which is small
next to ops of milliseconds; `benchmarks/embed.py` and `benchmarks/pretrain.py` print the policy they ran with.

libgomp reads the variable once, when torch is imported, so it has to be in the environment first.
The driver decides the policy (`chosen_policy`: the user's, else passive) and a model process applies
it before it imports torch:
  - the embed actors get it as a constructor argument and call `wait_with` first thing. A Ray
    `runtime_env` would do the same, but an actor with its own runtime_env cannot take one of Ray's
    pre-started workers: Ray starts a new worker process for it, on the stage's critical path;
  - Ray Train workers import torch before the training function runs, so they get it through their
    `runtime_env` (`actor_env()`);
  - `lvd pretrain` and the benchmarks call `wait_passively()` before they import torch.
"""

from __future__ import annotations

import logging
import os
import sys

OMP_WAIT_POLICY = "OMP_WAIT_POLICY"
PASSIVE = "PASSIVE"

log = logging.getLogger("lvd")


def chosen_policy() -> str:
    """The policy for lvd's model processes: the one the user set in this environment, else passive."""
    return os.environ.get(OMP_WAIT_POLICY, PASSIVE)


def actor_env() -> dict[str, str]:
    """Environment variables for a Ray actor that imports torch before lvd's code runs (a Ray Train
    worker): goes into its runtime_env."""
    return {OMP_WAIT_POLICY: chosen_policy()}


def wait_with(policy: str) -> bool:
    """In a model process, before torch loads: run with `policy` (from the driver's `chosen_policy`).
    Returns False, with a warning, when torch is already loaded with another policy (too late)."""
    if "torch" in sys.modules:
        if omp_wait_policy() != policy.upper():
            log.warning(
                "torch was imported before OMP_WAIT_POLICY=%s could be set; its threads wait with %s",
                policy,
                omp_wait_policy(),
            )
            return False
        return True
    os.environ[OMP_WAIT_POLICY] = policy
    return True


def wait_passively() -> str:
    """Ask for passive OpenMP waiting in this process unless the user chose a policy or torch is
    already loaded (then it is too late); returns the policy the process runs with."""
    if OMP_WAIT_POLICY not in os.environ and "torch" not in sys.modules:
        os.environ[OMP_WAIT_POLICY] = PASSIVE
    return omp_wait_policy()


def omp_wait_policy() -> str:
    """The wait policy of this process's environment ("default" when none is set)."""
    return os.environ.get(OMP_WAIT_POLICY, "default").upper()
