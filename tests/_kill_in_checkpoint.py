"""Runs `python -m mlscore_jax.main` but SIGKILLs itself inside the Nth checkpoint write.

The kill comes when orbax has written a checkpoint into its temporary directory and is about to
rename it into place (the commit): the worst moment for a crash. N comes from the environment
variable KILL_AT_CHECKPOINT_COMMIT. Used by tests/test_train.py.
"""

import os
import signal

from absl import app
from orbax.checkpoint._src.path import async_path

from mlscore_jax import main

_target = int(os.environ["KILL_AT_CHECKPOINT_COMMIT"])
_rename = async_path.rename
_count = 0


async def _rename_then_maybe_die(src, dst):
    global _count
    _count += 1
    if _count == _target:
        os.kill(os.getpid(), signal.SIGKILL)
    return await _rename(src, dst)


async_path.rename = _rename_then_maybe_die

if __name__ == "__main__":
    app.run(main.main)
