import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and on a busy machine two threads
    # spin-wait on each other (a 0.1 s test took 10 s at load 5 on 2 cores). Restoring the
    # count afterwards also undoes train()'s torch.set_num_threads from one test to the next.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
