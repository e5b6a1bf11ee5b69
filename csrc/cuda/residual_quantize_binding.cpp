// Torch binding of the CUDA residual_quantize kernel (compiled only in CUDA
// builds; the kernel itself is in residual_quantize.cu).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "residual_quantize.h"

namespace letter {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_quantize_cuda(
    const at::Tensor& x, const at::Tensor& codebooks, bool return_residuals) {
  TORCH_CHECK(x.dim() == 2 && codebooks.dim() == 3 && codebooks.size(2) == x.size(1),
              "residual_quantize: expected x [B, d] and codebooks [L, N, d]");
  TORCH_CHECK(x.size(1) <= kResidualQuantizeMaxDim,
              "residual_quantize: the CUDA kernel supports d <= ", kResidualQuantizeMaxDim,
              "; use backend='triton'");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), d = x.size(1), L = codebooks.size(0), N = codebooks.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor cbf = codebooks.to(at::kFloat).contiguous();
  at::Tensor codes = at::empty({B, L}, x.options().dtype(at::kLong));
  at::Tensor quantized = at::empty({B, d}, x.options().dtype(at::kFloat));
  at::Tensor residuals = return_residuals ? at::empty({B, L, d}, x.options().dtype(at::kFloat))
                                          : at::empty({0}, x.options().dtype(at::kFloat));
  const cudaError_t err = launch_residual_quantize(
      xf.data_ptr<float>(), cbf.data_ptr<float>(), B, d, L, N, codes.data_ptr<int64_t>(),
      quantized.data_ptr<float>(), return_residuals ? residuals.data_ptr<float>() : nullptr,
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "residual_quantize CUDA kernel failed: ", cudaGetErrorString(err));
  return {quantized.to(x.scalar_type()), codes, residuals.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(letter, CUDA, m) { m.impl("residual_quantize", &residual_quantize_cuda); }

}  // namespace letter
