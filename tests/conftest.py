"""Test-session set-up.

Without CUDA, the kernel tests run the real Triton kernels under Triton's interpreter: the variable
must be set before triton decorates any kernel, hence here, before any test module imports fastlora.
Tests that need compiled Triton (torch.compile) run in a subprocess with the variable removed.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

torch.set_num_threads(min(2, torch.get_num_threads()))
