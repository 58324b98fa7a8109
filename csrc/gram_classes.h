// The class table of lalora::grouped_gram and grouped_gram_quad (lalora_kernels/gram_meta.py, where
// the same fields are defined in the same order for Python and Triton; docs/glossary.md):
//   classes = [n, R, m, d_off, s_off, g_off] per class, flattened
// m bundles of R stacked rows against their own n x n factor each; bundle b of the class reads its
// rows at D[d_off + b R n : ...], its factor at arena[s_off + b * factor_numel(n) : ...] and writes
// its R x R Gram at G[g_off + b R R : ...].
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace lalora {

// Column of each field in a class row.
struct ClassField {
  enum : int64_t { n = 0, R = 1, m = 2, d_off = 3, s_off = 4, g_off = 5 };
};
constexpr int64_t CLASS_FIELDS = 6;

struct GramClass {
  int64_t n, R, m, d_off, s_off, g_off;
  static GramClass at(c10::ArrayRef<int64_t> classes, int64_t c) {
    const int64_t* f = classes.data() + c * CLASS_FIELDS;
    return {f[ClassField::n], f[ClassField::R], f[ClassField::m], f[ClassField::d_off], f[ClassField::s_off],
            f[ClassField::g_off]};
  }
};

}  // namespace lalora
