"""Session-wide test settings: one BLAS/OpenMP thread per process, for this process and every child.

The tiny model's matrices are a few hundred wide: a second intra-op thread buys nothing on them and, on a
loaded machine, its spin-waits cost several times the work itself; results are identical with either
count (timings: docs/machine-notes.md). Children (accelerate ranks, sweep runs, notebook kernels, the wheel's
venv) inherit ``OMP_NUM_THREADS``, so a run in a subprocess and its in-process reference use the same
thread count. An ``OMP_NUM_THREADS`` already set in the environment wins. In the vLLM environment
(``tests/vllm_backend``, .venv-vllm) nothing changes: vLLM's CPU workers manage their own threads.

No test reaches a model or dataset hub: ``HF_HUB_OFFLINE=1`` (children inherit it too), so the hub-loading
code runs against local folders and local caches only, and ``"smollm2-135m"`` takes its offline copy.
"""

import importlib.util
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it at import
if importlib.util.find_spec("vllm") is None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, so children inherit it
    import torch

    THREADS = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(THREADS)

    @pytest.fixture(autouse=True)
    def _session_thread_count():
        """Put the thread count back after each test (a library call may set it: the tiny-model builder does)."""
        yield
        if torch.get_num_threads() != THREADS:
            torch.set_num_threads(THREADS)
