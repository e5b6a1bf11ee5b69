// Schemas of every LETTER op. Backend kernels register themselves with
// TORCH_LIBRARY_IMPL in csrc/cpu/<op>.cpp and csrc/cuda/<op>_binding.cpp.
#include <torch/library.h>

#include "cpu/isa.h"

TORCH_LIBRARY(letter, m) {
  // Residual nearest-code search over L codebooks [L, N, d].
  // residuals is [B, L, d] when return_residuals, else an empty tensor.
  // (quantized comes first: a floating output first keeps opcheck's output sum in float.)
  m.def(
      "residual_quantize(Tensor x, Tensor codebooks, bool return_residuals=False)"
      " -> (Tensor quantized, Tensor codes, Tensor residuals)");
  // Softmax cross-entropy over dot products q [B, d] . keys [M, d] (+ bias [M]) / temperature,
  // exclude[i] (or -1) removed from row i, rows with targets == ignore_index give 0.
  // Forward returns per-row losses and logsumexps (fp64 for fp64 q, else fp32); backward
  // recomputes the logits from lse and returns dq, dkeys, dbias (empty without bias).
  m.def(
      "dot_product_cross_entropy_fwd(Tensor q, Tensor keys, Tensor targets, Tensor? exclude,"
      " Tensor? bias, float temperature, int ignore_index) -> (Tensor loss_rows, Tensor lse)");
  m.def(
      "dot_product_cross_entropy_bwd(Tensor grad_rows, Tensor q, Tensor keys, Tensor targets,"
      " Tensor? exclude, Tensor? bias, Tensor lse, float temperature, int ignore_index)"
      " -> (Tensor dq, Tensor dkeys, Tensor dbias)");
  // The same loss by the chunked-GEMM path: logits of a chunk of rows by one GEMM into a reused
  // buffer. Returns loss_rows and lse as above; with grad_rows (the upstream gradient of each
  // row's loss) also dq, dkeys and dbias (empty without bias), computed in the same pass; without
  // it those three are empty.
  m.def(
      "dot_product_cross_entropy_chunked(Tensor q, Tensor keys, Tensor targets, Tensor? exclude,"
      " Tensor? bias, float temperature, int ignore_index, Tensor? grad_rows)"
      " -> (Tensor loss_rows, Tensor lse, Tensor dq, Tensor dkeys, Tensor dbias)");
  // One step of trie-constrained beam search: logits [B*K_in, V], beam_scores [B, K_in],
  // nodes [B, K_in], this level's CSR (row_ptr [n+1], child_token [E]). Returns the num_beams
  // best (beam, child) pairs per row: scores, parent beam, token, child node (edge index);
  // empty slots are (-inf, 0, -1, -1). Optional bans: banned_ptr [B+1], banned_node [nnz], a CSR
  // of child node ids per batch row, each row sorted ascending (duplicates allowed); banned
  // children are never chosen. Spec: letter_ext.reference.constrained_beam_step.
  m.def(
      "constrained_beam_step(Tensor logits, Tensor beam_scores, Tensor nodes, Tensor row_ptr,"
      " Tensor child_token, int num_beams, Tensor? banned_ptr=None, Tensor? banned_node=None)"
      " -> (Tensor scores, Tensor parent, Tensor token, Tensor node)");
  // The instruction set of the CPU kernels (csrc/cpu/isa.h): 'scalar', 'avx2' or 'avx512'.
  m.def("set_isa(str isa) -> ()", [](const std::string& isa) { letter::set_active_isa(isa); });
  m.def("isa() -> str", []() { return std::string(letter::isa_name(letter::active_isa())); });
  m.def("best_isa() -> str", []() { return std::string(letter::isa_name(letter::cpu_best_isa())); });
  // Whether bf16 inputs get bf16 GEMMs on this CPU now (csrc/cpu/isa.h).
  m.def("bf16_gemms() -> bool", []() { return letter::bf16_gemms_pay(); });
}
