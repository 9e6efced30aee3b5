"""One torch thread for the tests' tiny training runs: on a small shared machine the fastest and steadiest."""
import contextlib

import torch


@contextlib.contextmanager
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
