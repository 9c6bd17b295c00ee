"""Every base kind under torch.compile: adapting a model adds no graph break to its frozen base's, and a compiled
training step (loss and every trainable parameter's gradient, with dropout, from one seed) equals the eager one.

The models run in a fresh interpreter without TRITON_INTERPRET (tests/compile_cases.py), all in one: importing
transformers and bitsandbytes once.  Most cases compile with the aot_eager backend, which traces as Inductor does
(fake tensors, functionalization, AOT autograd) without generating code; the nf4 case goes through Inductor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.compile_cases import CASES
from tests.tolerances import assert_close

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]


def _needs(name: str) -> str | None:
    if "nf4" in name or "int8" in name:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "needs bitsandbytes"
    return None


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from fastlora.bench.providers import compile_unavailable

    why = compile_unavailable(torch.device("cpu"))
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("compile")
    names = [name for name in CASES if _needs(name) is None]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.compile_cases", str(out), *names], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _result(results: Path, name: str) -> dict:
    if _needs(name):
        pytest.skip(_needs(name))
    result = torch.load(results / f"{name}.pt", weights_only=False)
    assert "error" not in result, result.get("error")
    return result


@pytest.mark.parametrize("name", list(CASES))
def test_adapting_adds_no_graph_break(results, name):
    result = _result(results, name)
    assert result["breaks"] == result["frozen_breaks"], "\n".join(result["reasons"])


@pytest.mark.parametrize("name", list(CASES))
def test_a_compiled_step_equals_the_eager_step(results, name):
    result = _result(results, name)
    eager, compiled = result["eager"], result["compiled"]
    assert set(compiled) == set(eager) and len(eager) > 1
    assert result["compiled_graphs"] > 0  # the compiled step ran compiled code, not eager code alone
    # fp32 values computed through activations of the case's dtype (the coarser tolerance of the two)
    low = result["activations"] if result["activations"] != torch.float32 else None
    for key, value in eager.items():
        assert value.abs().max() > 0, key  # every trainable parameter reached
        assert_close(compiled[key], value, kind="same_math_max", branch_dtype=low, msg=key)


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.adapter_names])
def test_a_compiled_mixed_batch_at_inference_equals_eager(results, name):
    """A mixed batch served (eval mode, no autograd): compiled logits equal eager ones."""
    eager, compiled = _result(results, name)["inference"]
    assert_close(compiled, eager, kind="same_math")
