"""``gxpo_lib.rl.trainer.prefer_expandable_segments``: the native trainer's process asks the CUDA caching allocator
for expandable segments (the update's micro-batches vary in length; fixed segments fragment).

The cases run in a child interpreter started without any of the allocator variables (they are process
state, and torch reads them once); each case starts with none of them set unless it sets one:
``PYTORCH_CUDA_ALLOC_CONF``, ``PYTORCH_ALLOC_CONF`` (torch >= 2.9's name), ``PYTORCH_HIP_ALLOC_CONF`` (ROCm).

This machine has no CUDA, so besides the real answer here (nothing set) the CUDA cases replace
``torch.cuda.is_available`` / ``torch.cuda.is_initialized`` in the child with constants: what the function
decides from them. On a CUDA machine `test_on_this_gpu_the_allocator_uses_expandable_segments` checks the
real allocator.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ALLOC_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")

CHILD = """
import json, os, sys
import torch
from gxpo_lib.rl import trainer

names = json.loads(sys.argv[2])
real = torch.cuda.is_available, torch.cuda.is_initialized
results = []
for mode, env in json.loads(sys.argv[1]):  # each case from a clean slate
    for name in names:
        os.environ.pop(name, None)
    os.environ.update(env)
    torch.cuda.is_available, torch.cuda.is_initialized = real
    if mode != "real":  # this machine has no CUDA: stand in for what torch.cuda reports
        torch.cuda.is_available = lambda: True
        torch.cuda.is_initialized = lambda mode=mode: mode == "initialised"
    returned = trainer.prefer_expandable_segments()
    results.append({"returned": returned, "env": {k: os.environ.get(k) for k in names}})
print(json.dumps(results))
"""

USER_SETTINGS = [
    ("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128"),
    ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False"),
    ("PYTORCH_CUDA_ALLOC_CONF", ""),  # set, even empty: the user's choice
    ("PYTORCH_ALLOC_CONF", "garbage_collection_threshold:0.6"),
    ("PYTORCH_HIP_ALLOC_CONF", "garbage_collection_threshold:0.6"),
]
CASES = {"real": ("real", {}), "fresh": ("fresh", {}), "initialised": ("initialised", {}),
         **{f"user:{name}={value}": ("fresh", {name: value}) for name, value in USER_SETTINGS}}
UNSET = dict.fromkeys(ALLOC_VARIABLES)


@pytest.fixture(scope="module")
def outcome() -> dict:
    """Every case's result, from one child interpreter started with none of the allocator variables set."""
    clean = {k: v for k, v in os.environ.items() if k not in ALLOC_VARIABLES}
    clean["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), clean.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(list(CASES.values())),
                           json.dumps(ALLOC_VARIABLES)], env=clean, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return dict(zip(CASES, json.loads(done.stdout.strip().splitlines()[-1]), strict=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA answer; CUDA machines run the GPU test")
def test_without_cuda_nothing_is_set(outcome):
    assert outcome["real"] == {"returned": False, "env": UNSET}


def test_clean_environment_gets_expandable_segments(outcome):
    assert outcome["fresh"] == {"returned": True,
                                "env": UNSET | {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}}


@pytest.mark.parametrize("name, value", USER_SETTINGS)
def test_a_users_setting_is_kept(outcome, name, value):
    assert outcome[f"user:{name}={value}"] == {"returned": False, "env": UNSET | {name: value}}


def test_after_cuda_initialised_nothing_is_set(outcome):
    """The allocator has read its settings by then: setting the variable would be a silent no-op."""
    assert outcome["initialised"] == {"returned": False, "env": UNSET}


GPU_CHILD = """
import json, os
import torch
from gxpo_lib.rl import trainer

first = trainer.prefer_expandable_segments()   # before CUDA initialises (importing gxpo_lib did not)
torch.zeros(1, device="cuda")
settings = torch.cuda.memory._snapshot().get("allocator_settings", {})
second = trainer.prefer_expandable_segments()  # already set and CUDA initialised
print(json.dumps({"first": first, "second": second, "env": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                  "expandable": settings.get("expandable_segments")}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks the real caching allocator")
def test_on_this_gpu_the_allocator_uses_expandable_segments():
    clean = {k: v for k, v in os.environ.items() if k not in ALLOC_VARIABLES}
    clean["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), clean.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", GPU_CHILD], env=clean, cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["first"] is True and result["second"] is False
    assert result["env"] == "expandable_segments:True"
    assert result["expandable"] in (True, None)  # None: this torch's snapshot does not report it
