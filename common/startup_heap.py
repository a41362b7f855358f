"""The heap a process builds at start-up, taken out of the garbage collector's view.

Python's full collections walk every tracked object. After loading torch, the model, the
tokenizer and Triton's kernels that is hundreds of thousands of objects, and one full collection
stalls the process long enough to make engine steps late. Objects made at start-up live as long
as the process, so they are frozen (as vLLM does): later collections only walk what requests
allocate.
"""

import atexit
import gc


def freeze_startup_heap() -> None:
    """Collects once, then moves every surviving object to the permanent generation.

    At exit the heap is unfrozen again: the interpreter's last collections skip frozen objects,
    so reference cycles in it (Triton's modules hold some) would never be freed, and nanobind
    prints ~30 lines of "leaked instances/types/functions" for Triton's bindings.
    """
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)  # once, however often this is called
    atexit.register(gc.unfreeze)
