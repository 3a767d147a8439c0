"""Our Triton kernels compiled for the H200 (sm_90) on this CPU, and read without a GPU.

The interpreter (test_triton_fused.py) checks what the kernels compute; only the compiler sees
what the GPU would run. Triton's wheel carries ptxas and cuobjdump, so this builds each kernel's
cubin as a launch on aligned tensors would (pointers and row strides divisible by 16) and checks
the machine code: 16-byte loads and stores, no local memory (spills), few enough registers.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from llmrpc.kernels import sampling, triton_decode, triton_fused, triton_gemv  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


_BUILD = """
import json, sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llmrpc.kernels import sampling, triton_decode, triton_fused, triton_gemv

kernels = {"qk_norm_rope": lambda: triton_fused._kernels()[1], "store_kv": lambda: triton_fused._kernels()[2],
           "race": sampling._triton_kernel, "gemv": lambda: triton_gemv._kernel()[1],
           "decode": lambda: triton_decode._kernel()[1]}
name, signature, constexprs, aligned, out = json.loads(sys.argv[1])
num_warps = constexprs.pop("num_warps", 4)
names = list(signature)
attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
source = ASTSource(fn=kernels[name](), signature=signature, constexprs=constexprs, attrs=attrs)
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
Path(out).write_bytes(compiled.asm["cubin"])
"""


def sm90(kernel: str, signature: dict[str, str], constexprs: dict[str, object], aligned: tuple[str, ...],
         tmp_path: Path) -> bytes:
    """The cubin of `kernel` built for sm_90, the `aligned` args divisible by 16 as a launch would find them.

    Built in a fresh interpreter without TRITON_INTERPRET: under the interpreter (tests/conftest.py)
    triton.language's own jit functions (tl.sum, ...) are interpreted ones, which the compiler cannot lower.
    """
    out = tmp_path / f"{kernel}.cubin"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _BUILD, json.dumps([kernel, signature, constexprs, aligned, str(out)])],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out.read_bytes()


def _inspect(cubin: bytes, tmp_path: Path) -> tuple[str, dict[str, int]]:
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([str(CUOBJDUMP), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                           check=True).stdout
    return sass, {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}


pytestmark = pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this Triton wheel carries no cuobjdump")


@pytest.mark.parametrize("norm", [True, False])
def test_qk_norm_rope_moves_16_bytes_per_access_without_spills(norm: bool, tmp_path: Path) -> None:
    signature = {"q_ptr": "*bf16", "k_ptr": "*bf16", "q_row_stride": "i32", "k_row_stride": "i32",
                 "q_weight_ptr": "*bf16", "k_weight_ptr": "*bf16", "positions_ptr": "*i64", "cos_sin_ptr": "*fp32",
                 "cos_sin_stride": "i32", "num_tokens": "i32", "eps": "fp32", "NUM_Q_HEADS": "constexpr",
                 "HEAD_DIM": "constexpr", "NORM": "constexpr", "BLOCK_T": "constexpr"}
    aligned = ("q_ptr", "k_ptr", "q_row_stride", "k_row_stride", "q_weight_ptr", "k_weight_ptr", "positions_ptr",
               "cos_sin_ptr", "cos_sin_stride")
    sass, usage = _inspect(sm90("qk_norm_rope", signature, {"NUM_Q_HEADS": 16, "HEAD_DIM": 128, "NORM": norm,
                                                            "BLOCK_T": triton_fused.NORM_ROPE_BLOCK_T}, aligned,
                                tmp_path), tmp_path)
    # q/k halves and cos/sin, then the two halves back: every access of a tile row 16 bytes wide.
    assert "LDG.E.128" in sass and "STG.E.128" in sass
    assert "STG.E.U16" not in sass and "LDG.E.U16" not in sass
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0 and usage["REG"] <= 128


def test_store_kv_moves_16_bytes_per_access_without_spills(tmp_path: Path) -> None:
    signature = {"k_ptr": "*bf16", "v_ptr": "*bf16", "k_row_stride": "i32", "v_row_stride": "i32",
                 "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "loc_ptr": "*i64", "num_tokens": "i32",
                 "ROW": "constexpr", "BLOCK_T": "constexpr", "BLOCK_C": "constexpr", "SATURATE": "constexpr",
                 "LIMIT": "constexpr"}
    aligned = ("k_ptr", "v_ptr", "k_row_stride", "v_row_stride", "k_cache_ptr", "v_cache_ptr", "loc_ptr")
    sass, usage = _inspect(sm90("store_kv", signature, {"ROW": 1024, "BLOCK_T": triton_fused.STORE_BLOCK_T,
                                                        "BLOCK_C": 1024, "SATURATE": False, "LIMIT": 0.0}, aligned,
                                tmp_path), tmp_path)
    assert "LDG.E.128" in sass and "STG.E.128" in sass and "STG.E.U16" not in sass
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0 and usage["REG"] <= 128


def test_race_kernel_builds_without_spills(tmp_path: Path) -> None:
    signature = {"logits_ptr": "*bf16", "stride": "i32", "inv_t_ptr": "*fp32", "key_lo_ptr": "*i64",
                 "key_hi_ptr": "*i64", "best_ptr": "*fp32", "best_id_ptr": "*i32", "vocab": "i32",
                 "num_segments": "i32", "SEGMENT": "constexpr", "BLOCK": "constexpr"}
    aligned = ("logits_ptr", "stride", "inv_t_ptr", "key_lo_ptr", "key_hi_ptr", "best_ptr", "best_id_ptr", "vocab")
    sass, usage = _inspect(sm90("race", signature, {"SEGMENT": sampling._SEGMENT, "BLOCK": sampling._BLOCK},
                                aligned, tmp_path), tmp_path)
    assert "LDG.E.128" in sass  # the logits stream in 16-byte loads
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0


GEMV_SIGNATURE = {"x_ptr": "*bf16", "res_ptr": "*bf16", "res_out_ptr": "*bf16", "norm_w_ptr": "*bf16", "w_ptr": "*bf16",
                  "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "x_stride": "i32", "res_stride": "i32",
                  "y_stride": "i32", "eps": "fp32", "K": "constexpr", "PROLOGUE": "constexpr", "HAS_BIAS": "constexpr",
                  "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}


@pytest.mark.parametrize(("k", "n", "prologue", "rows"), [
    (1024, 4096, triton_gemv.ADD_RMSNORM, 1), (1024, 6144, triton_gemv.ADD_RMSNORM, 4),  # Qwen3-0.6B's QKV, gate_up
    (2048, 1024, triton_gemv.LINEAR, 4), (3072, 1024, triton_gemv.SILU_MUL, 4),  # its O and down
    (4096, 6144, triton_gemv.RMSNORM, 1), (12288, 4096, triton_gemv.SILU_MUL, 4)])  # Qwen3-8B's
def test_gemv_streams_weights_in_16_byte_loads_without_spills(k, n, prologue, rows, tmp_path: Path) -> None:
    """Each default tile of Qwen3-0.6B's and -8B's linears: the weights (and x) read 16 bytes at a time,
    nothing spilled, registers left for 2+ programs an SM."""
    tile = triton_gemv.default_tile(n, k)
    aligned = ("x_ptr", "res_ptr", "res_out_ptr", "norm_w_ptr", "w_ptr", "b_ptr", "y_ptr", "N", "x_stride",
               "res_stride", "y_stride")
    constexprs = {"K": k, "PROLOGUE": prologue, "HAS_BIAS": False, "BLOCK_M": rows, "BLOCK_N": tile.block_n,
                  "BLOCK_K": tile.block_k, "num_warps": tile.num_warps}
    sass, usage = _inspect(sm90("gemv", GEMV_SIGNATURE, constexprs, aligned, tmp_path), tmp_path)
    assert "LDG.E.128" in sass and "LDG.E.U16" not in sass
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0 and usage["REG"] <= 128


DECODE_SIGNATURE = {
    "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "q_row_stride": "i32", "k_row_stride": "i32",
    "v_row_stride": "i32", "q_weight_ptr": "*bf16", "k_weight_ptr": "*bf16", "eps": "fp32", "positions_ptr": "*i64",
    "cos_sin_ptr": "*fp32", "cos_sin_stride": "i32", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
    "kv_indptr_ptr": "*i32", "kv_indices_ptr": "*i32", "last_page_len_ptr": "*i32", "out_loc_ptr": "*i64",
    "out_ptr": "*bf16", "partial_o_ptr": "*fp32", "partial_ml_ptr": "*fp32", "counters_ptr": "*i32",
    "scale_log2": "fp32", "PAGE_SIZE": "constexpr", "KV_HEADS": "constexpr", "GROUP": "constexpr",
    "HEAD_DIM": "constexpr", "NORM": "constexpr", "SPLITS": "constexpr", "GROUP_BLOCK": "constexpr",
    "Q_BLOCK": "constexpr", "SPLITS_BLOCK": "constexpr", "BLOCK_N": "constexpr", "DOT_F32": "constexpr"}


@pytest.mark.parametrize(("kv_heads", "group", "splits"), [(8, 2, 16), (8, 4, 16), (8, 2, 1)])  # Qwen3-0.6B, -8B
def test_decode_attention_reads_pages_in_16_byte_loads_in_registers(kv_heads, group, splits,
                                                                      tmp_path: Path) -> None:
    """Qwen3-0.6B's and -8B's heads at bs=1: the cached K and V rows read 16 bytes at a time, the split
    counter an atomic (none with one split), nothing spilled."""
    aligned = tuple(name for name, kind in DECODE_SIGNATURE.items() if kind.startswith("*")) + (
        "q_row_stride", "k_row_stride", "v_row_stride", "cos_sin_stride")
    group_block = triton_gemv.next_pow2(group)
    constexprs = {"PAGE_SIZE": 16, "KV_HEADS": kv_heads, "GROUP": group, "HEAD_DIM": 128, "NORM": True,
                  "SPLITS": splits, "GROUP_BLOCK": group_block, "SPLITS_BLOCK": triton_gemv.next_pow2(splits),
                  "Q_BLOCK": max(16, group_block), "BLOCK_N": triton_decode.BLOCK_N, "DOT_F32": False,
                  "num_warps": triton_decode.NUM_WARPS}
    sass, usage = _inspect(sm90("decode", DECODE_SIGNATURE, constexprs, aligned, tmp_path), tmp_path)
    # The pages in 16-byte loads (the new token's few elements a thread may load 2 bytes at a time).
    assert sass.count("LDG.E.128") >= 8  # this block's K and V halves and the next block's
    assert bool(re.search(r"\b(ATOMG|RED)\.", sass)) == (splits > 1)
    # One program a row, KV head and split, two an SM: 168 registers leave room for both; the 8-16 byte stack
    # frame of the measured-fastest tile is all that goes past them.
    assert usage["LOCAL"] == 0 and usage["STACK"] <= 16 and usage["REG"] <= 192
