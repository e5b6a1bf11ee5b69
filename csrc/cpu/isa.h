// Run-time choice of the instruction set the CPU kernels use. One binary serves every x86-64 CPU:
// each kernel has a portable (scalar) path and AVX2 + FMA and/or AVX-512 paths compiled with
// __attribute__((target(...))), and picks the best path that is <= active_isa(). The default is the
// best this CPU runs; letter::set_isa (letter_ext.set_isa, or $LETTER_ISA at import) forces a lower
// one, e.g. to test every path on one machine or to stand in for an AVX2-only CPU.
#pragma once
#include <atomic>
#include <string>

#include <ATen/cpu/Utils.h>
#include <c10/util/Exception.h>

namespace letter {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

// The widest ISA this CPU runs that the kernels have a path for (AVX-512: F, BW, DQ and VL).
inline Isa cpu_best_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return Isa::avx512;
  if (avx2) return Isa::avx2;
#endif
  return Isa::scalar;
}

// One slot for the whole library (an inline function's static is shared by every translation unit).
inline std::atomic<int>& active_isa_slot() {
  static std::atomic<int> slot{static_cast<int>(cpu_best_isa())};
  return slot;
}

inline Isa active_isa() { return static_cast<Isa>(active_isa_slot().load(std::memory_order_relaxed)); }

inline void set_active_isa(const std::string& name) {
  Isa wanted;
  if (name == "scalar") wanted = Isa::scalar;
  else if (name == "avx2") wanted = Isa::avx2;
  else if (name == "avx512") wanted = Isa::avx512;
  else TORCH_CHECK_VALUE(false, "set_isa: isa must be 'scalar', 'avx2' or 'avx512', got '", name, "'");
  TORCH_CHECK_VALUE(static_cast<int>(wanted) <= static_cast<int>(cpu_best_isa()), "set_isa: this CPU does not run '",
                    name, "' (its best is '", isa_name(cpu_best_isa()), "')");
  active_isa_slot().store(static_cast<int>(wanted), std::memory_order_relaxed);
}

// Whether bf16 GEMMs beat fp32 ones here, so that bf16 inputs should run their GEMMs in bf16: the
// CPU has bf16 matrix instructions (AMX-BF16 or AVX512-BF16, which oneDNN's bf16 GEMM uses) and the
// avx512 path is active (forcing avx2 stands in for a CPU without them).
inline bool bf16_gemms_pay() {
  if (active_isa() < Isa::avx512) return false;
  const auto caps = at::cpu::get_cpu_capabilities();
  const auto has = [&](const char* name) {
    const auto it = caps.find(name);
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  };
  return has("amx_bf16") || has("avx512_bf16");
}

}  // namespace letter
