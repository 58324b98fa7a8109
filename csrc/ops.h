// The C++ CPU kernels of the lalora:: ops, each defined in the file named after it and bound to
// Python in bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace lalora {

void packed_cov_update_(at::Tensor P, const at::Tensor& X, const c10::optional<at::Tensor>& mask, double weight,
                        int64_t tile);
std::tuple<at::Tensor, at::Tensor> grouped_gram(const at::Tensor& D, const at::Tensor& arena, at::IntArrayRef classes,
                                                int64_t tile);
std::tuple<at::Tensor, at::Tensor> grouped_gram_quad(const at::Tensor& D, const at::Tensor& arena,
                                                     at::IntArrayRef classes, int64_t tile, const at::Tensor& C,
                                                     bool grad);

}  // namespace lalora
