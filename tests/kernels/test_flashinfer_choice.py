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


def _capability(monkeypatch, major: int, minor: int) -> torch.device:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    return torch.device("cuda")


def test_auto_is_fa3_on_hopper_with_a_16_bit_pool_and_a_head_dim_fa3_builds(monkeypatch) -> None:
    hopper = _capability(monkeypatch, 9, 0)
    assert prefill_kernels("auto", hopper, torch.bfloat16, 128) == "fa3"
    assert prefill_kernels("auto", hopper, torch.float8_e4m3fn, 128) == "fa2"  # an FP8 pool reads through fa2
    assert prefill_kernels("auto", hopper, torch.bfloat16, 96) == "fa2"  # fa3 builds 64, 128 and 256
    assert prefill_kernels("fa2", hopper, torch.bfloat16, 128) == "fa2"
    assert prefill_kernels("fa3", hopper, torch.bfloat16, 128) == "fa3"


def test_fa3_elsewhere_is_fa2_for_auto_and_refused_when_asked_for(monkeypatch) -> None:
    ampere = _capability(monkeypatch, 8, 0)
    assert prefill_kernels("auto", ampere, torch.bfloat16, 128) == "fa2"
    with pytest.raises(ValueError, match=r"--flashinfer-prefill\) fa3 needs an sm90 \(Hopper\) GPU .* not sm80 and 128"):
        prefill_kernels("fa3", ampere, torch.bfloat16, 128)


def test_the_flag_reaches_the_worker_command_line() -> None:
    args = build_parser().parse_args(["worker", "--model", "m", "--flashinfer-prefill", "fa2"])
    config = engine_config(args, "m")
    assert config.flashinfer_prefill == "fa2"
    argv, _ = command_line("worker", config)
    assert argv[argv.index("--flashinfer-prefill") + 1] == "fa2"
    assert build_parser().parse_args(argv[argv.index("worker"):]).flashinfer_prefill == "fa2"
    args = build_parser().parse_args(["worker", "--model", "m", "--flashinfer-decode", "cuda-cores"])
    argv, _ = command_line("worker", engine_config(args, "m"))
    assert build_parser().parse_args(argv[argv.index("worker"):]).flashinfer_decode == "cuda-cores"


def test_decode_runs_on_tensor_cores_unless_asked_for_cuda_cores() -> None:
    assert decode_on_tensor_cores("auto") and decode_on_tensor_cores("tensor-cores")
    assert not decode_on_tensor_cores("cuda-cores")
    assert EngineConfig(model_path="m").flashinfer_decode == "auto"
    with pytest.raises(ValueError, match=r"flashinfer_decode \(--flashinfer-decode\) must be one of"):
        EngineConfig(model_path="m", flashinfer_decode="tensor")
