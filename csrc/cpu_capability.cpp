// Which instruction set's kernels run (cpu_kernels.h): the best this CPU supports, capped by
// LALORA_CPU_CAPABILITY or, when that is unset, by ATEN_CPU_CAPABILITY (the variable with which
// PyTorch caps its own kernels), so one variable can put both on the same path.
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cpu_kernels.h"

namespace lalora {
namespace {

int level_of(const std::string& name) {
  if (name == "default") return 0;
  if (name == "avx2") return 1;
  if (name == "avx512") return 2;
  return -1;
}

int cpu_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

const CpuKernels& choose() {
  int level = cpu_level();
  const char* var = "LALORA_CPU_CAPABILITY";
  const char* cap = std::getenv(var);
  if (cap == nullptr || *cap == '\0') {
    var = "ATEN_CPU_CAPABILITY";
    cap = std::getenv(var);
  }
  if (cap != nullptr && *cap != '\0') {
    const int want = level_of(cap);
    if (want < 0 && var[0] == 'L')     // ATen's own names for other CPUs (vsx, sve256, ...) do not cap ours
      throw std::invalid_argument(std::string(var) + "=" + cap + " is unknown; use default, avx2 or avx512");
    if (want >= 0 && want < level) level = want;
  }
  if (level >= 2 && isa_avx512::kernels() != nullptr) return *isa_avx512::kernels();
  if (level >= 1 && isa_avx2::kernels() != nullptr) return *isa_avx2::kernels();
  return isa_default::kernels();
}

}  // namespace

const CpuKernels& cpu_kernels() {
  static const CpuKernels& k = choose();
  return k;
}

}  // namespace lalora
