"""Triton kernels run on CPU tensors here: TRITON_INTERPRET=1 before any kernel is built.

Triton reads the switch when a function is decorated with @triton.jit, not when
triton is imported, so it holds for every kernel that is built after this file
loads (ours are built on first use). CUDA tensors never reach these tests.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
