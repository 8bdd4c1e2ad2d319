"""End a distributed run cleanly, before the interpreter shuts down.

mmengine 0.10 (and mmdet 3.3's ``tools/train.py``) never destroy the process
group: the processes just exit. With torch 2.13 that exit can abort a rank
(``terminate called without an active exception``, SIGABRT, so ``torchrun``
reports the whole run as failed after the checkpoint and the metrics were
written). The cause is upstream (pytorch/pytorch#190489): a gloo worker thread
drops its last reference to a finished collective's tensors a moment after the
main thread went on; if the interpreter is already finalizing, the thread's
attempt to take the GIL for the tensor's Python object kills the process. On
this project's CPU machine one two-process run in five to eight ended so (a
plain ``all_reduce`` followed by ``exit()`` is enough).

:func:`shutdown_distributed` is what torch's documentation asks of every
trainer process ("call destroy_process_group near the end of main()"), plus
the one step that closes the race while Python is still fully alive.
``tools/train.py`` and ``tools/test.py`` call it after a run that succeeded.
"""
import time

import torch.distributed as dist

#: seconds the main thread sleeps (GIL released) after destroying the group,
#: so the backend's worker threads finish dropping the tensors of the last
#: collectives; they need microseconds once they get the GIL
SETTLE_SECONDS = 0.2


def shutdown_distributed(settle_seconds: float = SETTLE_SECONDS) -> bool:
    """Wait for every rank, destroy the process group, let its threads settle.

    Call it on every rank, after the last collective, on the success path only
    (after an exception the other ranks may never reach the barrier).

    Args:
        settle_seconds (float): time given to the backend's worker threads to
            release what they still hold before the interpreter exits.
            Must be >= 0.

    Returns:
        bool: whether a process group was initialized (and is now destroyed).

    Example:
        >>> from ce_mmdet.engine import shutdown_distributed
        >>> shutdown_distributed()  # not distributed: nothing to do
        False
    """
    if isinstance(settle_seconds, bool) or not isinstance(
            settle_seconds, (int, float)):
        raise TypeError('settle_seconds must be a number, got '
                        f'{type(settle_seconds).__name__}')
    if not settle_seconds >= 0:
        raise ValueError(f'settle_seconds must be >= 0, got {settle_seconds}')
    if not (dist.is_available() and dist.is_initialized()):
        return False
    # no rank tears its group down (rank 0 hosts the store) while another
    # still talks to it
    dist.barrier()
    dist.destroy_process_group()
    # the barrier's work keeps the last collectives' works alive; the worker
    # thread that completed it drops them after our wait returned and needs
    # the GIL for each tensor that has a Python object: give it the GIL now,
    # not during interpreter finalization
    time.sleep(settle_seconds)
    return True
