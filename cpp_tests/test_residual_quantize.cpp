// C++ check of letter::residual_quantize through the dispatcher against a naive double loop.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <limits>

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("letter::residual_quantize", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                                                      const at::Tensor&, bool)>();
  torch::manual_seed(0);
  int failures = 0;
  for (int64_t B : {1, 7, 257}) {
    for (int64_t d : {1, 3, 32, 33}) {
      const int64_t L = 3, N = 255;
      at::Tensor x = torch::randn({B, d}, torch::kDouble);
      at::Tensor cb = torch::randn({L, N, d}, torch::kDouble);
      auto [quantized, codes, residuals] = op.call(x, cb, true);
      auto xa = x.accessor<double, 2>();
      auto ca = cb.accessor<double, 3>();
      auto codes_a = codes.accessor<int64_t, 2>();
      for (int64_t b = 0; b < B; ++b) {
        std::vector<double> r(xa[b].data(), xa[b].data() + d);
        for (int64_t l = 0; l < L; ++l) {
          double best = std::numeric_limits<double>::infinity();
          int64_t best_j = -1;
          for (int64_t j = 0; j < N; ++j) {
            double dist = 0;
            for (int64_t k = 0; k < d; ++k) dist += (r[k] - ca[l][j][k]) * (r[k] - ca[l][j][k]);
            if (dist < best) best = dist, best_j = j;
          }
          if (codes_a[b][l] != best_j) {
            std::printf("mismatch B=%ld d=%ld row=%ld level=%ld: %ld vs %ld\n", B, d, b, l,
                        codes_a[b][l], best_j);
            ++failures;
          }
          for (int64_t k = 0; k < d; ++k) r[k] -= ca[l][codes_a[b][l]][k];
        }
      }
    }
  }
  std::printf("%s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
