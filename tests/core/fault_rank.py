"""`python -m tests.core.fault_rank ...` is `python -m dpo_lora ...` with one rank failing on purpose.

DPO_LORA_FAULT="MODE:RANK:STEP" makes rank RANK, at its STEP-th micro-batch, either raise
(MODE=raise), die at once as under the OOM killer (MODE=kill, SIGKILL), or hang without dying
(MODE=hang: a stuck kernel, a dead filesystem). With DPO_LORA_FAULT_STAMP set, the faulting rank
writes the time of the fault (time.time()) to that file first.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import dpo_lora.train.loop
from dpo_lora.cli import main

mode, fault_rank, fault_step = os.environ["DPO_LORA_FAULT"].split(":")
real_step = dpo_lora.train.loop.preference_step
calls = 0


def faulty_step(*args, **kwargs):
    global calls
    calls += 1
    if int(os.environ.get("RANK", "0")) == int(fault_rank) and calls == int(fault_step):
        if stamp := os.environ.get("DPO_LORA_FAULT_STAMP"):  # when the fault struck, for the test's clock
            Path(stamp).write_text(f"{time.time()}\n")
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while mode == "hang":
            time.sleep(60)
        raise RuntimeError("planted fault")
    return real_step(*args, **kwargs)


dpo_lora.train.loop.preference_step = faulty_step
sys.exit(main())
