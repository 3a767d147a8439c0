"""Which of FlashInfer's prefill and decode kernels the engine asks for (the kernels themselves run on a GPU:
bench/attention_backends.py and bench/gpu_check.py)."""
from __future__ import annotations

import pytest
import torch

from llmrpc.engine.config import FLASHINFER_PREFILL, EngineConfig
from llmrpc.kernels.flashinfer_backend import decode_on_tensor_cores, prefill_kernels
from llmrpc.services.cli import build_parser, command_line, engine_config


def test_the_choice_is_validated_by_name() -> None:
    assert EngineConfig(model_path="m").flashinfer_prefill == "auto"
    assert FLASHINFER_PREFILL == ("auto", "fa2", "fa3")
    with pytest.raises(ValueError, match=r"flashinfer_prefill \(--flashinfer-prefill\) must be one of auto, fa2, fa3"):
        EngineConfig(model_path="m", flashinfer_prefill="fa4")
    with pytest.raises(ValueError, match=r"fa3 reads a 16-bit KV cache only, not kv_cache_dtype \(--kv-cache-dtype\)"):
        EngineConfig(model_path="m", flashinfer_prefill="fa3", kv_cache_dtype="fp8_e4m3")
    assert EngineConfig(model_path="m", flashinfer_prefill="auto", kv_cache_dtype="fp8_e4m3").flashinfer_prefill == "auto"


def test_an_explicit_choice_is_kept_and_an_fp8_pool_reads_through_fa2() -> None:
    cpu = torch.device("cpu")  # never asked for its capability: the answer does not depend on it
    assert prefill_kernels("fa2", cpu, torch.bfloat16) == "fa2"
    assert prefill_kernels("fa3", cpu, torch.bfloat16) == "fa3"
    assert prefill_kernels("auto", cpu, torch.float8_e4m3fn) == "fa2"


def test_the_flag_reaches_the_worker_command_line() -> None:
    args = build_parser().parse_args(["worker", "--model", "m", "--flashinfer-prefill", "fa2"])
    config = engine_config(args, "m")
    assert config.flashinfer_prefill == "fa2"
    argv, _ = command_line("worker", config)
    assert argv[argv.index("--flashinfer-prefill") + 1] == "fa2"
    assert build_parser().parse_args(argv[argv.index("worker"):]).flashinfer_prefill == "fa2"


def test_decode_runs_on_tensor_cores_unless_asked_for_cuda_cores() -> None:
    assert decode_on_tensor_cores("auto") and decode_on_tensor_cores("tensor-cores")
    assert not decode_on_tensor_cores("cuda-cores")
    assert EngineConfig(model_path="m").flashinfer_decode == "auto"
    with pytest.raises(ValueError, match=r"flashinfer_decode \(--flashinfer-decode\) must be one of"):
        EngineConfig(model_path="m", flashinfer_decode="tensor")
