"""How torch's CPU threads wait between parallel regions. Imports no torch: it must run before torch loads.

torch on CPU parallelises each op with OpenMP (libgomp). Between ops, libgomp's idle threads spin
for a while before they sleep. That is fast on cores nobody else wants, but lvd's model processes
always share their cores: the embed actor runs beside the decode tasks, the trainer beside its
augmentation threads, and a shared node beside other jobs. A spinning thread burns CPU the others
need, and a thread that loses its core in the middle of an op holds up every thread waiting for it
at the op's end. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a futex wake per op, which is small
next to ops of milliseconds; `benchmarks/embed.py` and `benchmarks/pretrain.py` print the policy they ran with.

libgomp reads the variable once, when torch is imported, so it has to be in the environment first:
`actor_env()` goes into a Ray actor's runtime_env, and `wait_passively()` sets it in this process
when torch is not loaded yet. A policy the user set in the environment is kept in both.
"""

from __future__ import annotations

import os
import sys

OMP_WAIT_POLICY = "OMP_WAIT_POLICY"
PASSIVE = "PASSIVE"


def actor_env() -> dict[str, str]:
    """Environment variables for a Ray actor that runs torch on CPU: the user's policy, else passive."""
    return {OMP_WAIT_POLICY: os.environ.get(OMP_WAIT_POLICY, PASSIVE)}


def wait_passively() -> str:
    """Ask for passive OpenMP waiting in this process unless the user chose a policy or torch is
    already loaded (then it is too late); returns the policy the process runs with."""
    if OMP_WAIT_POLICY not in os.environ and "torch" not in sys.modules:
        os.environ[OMP_WAIT_POLICY] = PASSIVE
    return omp_wait_policy()


def omp_wait_policy() -> str:
    """The wait policy of this process's environment ("default" when none is set)."""
    return os.environ.get(OMP_WAIT_POLICY, "default").upper()
