"""pytest -n auto (pytest-xdist): one torch thread per worker process, so that the workers and
the processes some tests start share the cores without oversubscribing them (system.py)."""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # read by system.set_threads and by child processes
    import torch
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The longest test first: under -n auto it then runs beside all the others instead of
    starting last and running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)  # stable
