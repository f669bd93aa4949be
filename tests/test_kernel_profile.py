"""Kernel categories and the summary of a profile's kernels (the GPU side needs CUPTI: run by `bench gpu`)."""

from __future__ import annotations

import pytest

from sparse_context.reference.kernel_profile import category, kernel_events, summarize_kernels


@pytest.mark.parametrize("name,expected", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("void onnxruntime::contrib::cuda::flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "attention"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopB_TNT", "matmul"),
    ("void onnxruntime::cuda::_ConcatKernel<long>(...)", "copy"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>", "copy"),
    ("void onnxruntime::cuda::_GatherKernel<...>", "copy"),
    ("void onnxruntime::contrib::cuda::SkipLayerNormKernelSmall<...>", "norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>>", "other"),
])
def test_kernel_names_fall_in_their_category(name, expected):
    assert category(name) == expected


def test_summary_adds_up_and_ranks_kernels():
    kernels = [("sm90_xmma_gemm_a", 600.0), ("sm90_xmma_gemm_a", 400.0), ("flash_fwd", 300.0),
               ("_ConcatKernel", 50.0), ("elementwise_add", 25.0)]
    summary = summarize_kernels(kernels, wall_s=0.0025, top=2)
    assert summary["ms_per_category"] == {"matmul": 1.0, "attention": 0.3, "copy": 0.05, "other": 0.025}
    assert summary["busy_ms"] == pytest.approx(1.375) and summary["busy_share"] == pytest.approx(0.55)
    assert summary["launches"] == 5
    assert [k["name"] for k in summary["top_kernels"]] == ["sm90_xmma_gemm_a", "flash_fwd"]
    assert summary["top_kernels"][0] == {"name": "sm90_xmma_gemm_a", "category": "matmul", "count": 2, "ms": 1.0}


def test_trace_events_keep_device_side_events_only():
    events = [{"ph": "X", "cat": "kernel", "name": "gemm", "dur": 10}, {"ph": "X", "cat": "cpu_op", "name": "x"},
              {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "dur": 2.5},
              {"ph": "f", "cat": "kernel", "name": "flow"}, {"ph": "X", "cat": "cuda_runtime", "name": "launch"}]
    assert kernel_events(events) == [("gemm", 10.0), ("Memcpy HtoD", 2.5)]


def test_profile_without_a_gpu_says_why():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the profile runs for real in `bench gpu`")
    from sparse_context.reference.kernel_profile import profile_kernels

    result = profile_kernels(lambda: None, lambda: None)
    assert result["status"] == "skipped" and "CUPTI" in result["reason"]
