// Weight and bias gradients of a tanh MLP with a linear head, in one pass over the batch.
//
// Layer by layer, the backward of a [65536, 64] MLP makes about ten passes over 16 MB
// tensors in memory (tanh derivative, input gradient, weight gradient, bias sum, per
// layer), and the weight-gradient products, whose long dimension is the inner one, run
// on one thread. Here each thread takes contiguous blocks of rows and carries one block
// through all the layers while it is in cache, adding to its own gradient sums; the sums
// of the threads are added at the end.
//
// The block's products go to oneDNN's batch-reduce GEMM micro-kernel through ATen
// (at::native::cpublas::brgemm: row-major C (+)= A B; ATen falls back to its BLAS where
// the CPU has no such kernel). On the AMD EPYC we benchmark on, it runs these thin
// products 2.5x faster than MKL (docs/benchmarks.md). A weight gradient sums over the
// rows, so it needs the block's gradient transposed: one transpose per layer, into a
// buffer whose rows are padded so that they do not all map to the same cache sets.
//
// Given the layer inputs x [B, in] and the tanh outputs a_1 .. a_{L-1} [B, h_i], the
// weights W_1 .. W_L ([h_i, h_{i-1}], the head last) and the gradient g at the head's
// output [B, out], for l = L .. 1:
//     dW_l += g^T a_{l-1}     db_l += 1^T g     (a_0 = x)
//     g = (g W_l) * (1 - a_{l-1}^2)             (for l > 1)
// The input gradient is not computed: the MLP's input is data.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#if defined(__x86_64__)
#include <fbgemm/Utils.h>
#endif

#include <algorithm>
#include <vector>

namespace {

// Floats of padding after each row of a transposed block (see above).
constexpr int64_t kTransposePad = 32;

// C[M, N] = A[M, K] B[K, N], plus C when accumulate; row-major with leading dimensions.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

// dst[cols, rows] = src[rows, cols]^T.
void transpose(int64_t rows, int64_t cols, const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
#if defined(__x86_64__)
  fbgemm::transpose_simd<float>(rows, cols, src, ld_src, dst, ld_dst);  // AVX-512 or AVX2, picked at run time
#else
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
#endif
}

void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous(),
              name, " must be a contiguous 2-D float32 CPU tensor, got ", t.sizes(), " ", t.scalar_type(),
              " on ", t.device());
}

std::vector<at::Tensor> tanh_mlp_backward(const at::Tensor& x, const std::vector<at::Tensor>& activations,
                                          const std::vector<at::Tensor>& weights, const at::Tensor& grad_out,
                                          int64_t block_rows) {
  const int64_t layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(activations.size()) == layers - 1,
              "one activation per hidden layer: got ", activations.size(), " for ", layers, " weights");
  TORCH_CHECK(block_rows > 0, "block_rows must be positive, got ", block_rows);
  check_matrix(x, "x");
  check_matrix(grad_out, "grad_out");
  const int64_t batch = x.size(0);
  for (int64_t l = 0; l < layers; ++l) {
    check_matrix(weights[l], "weight");
    const at::Tensor& input = l == 0 ? x : activations[l - 1];
    check_matrix(input, "activation");
    TORCH_CHECK(input.size(0) == batch && input.size(1) == weights[l].size(1),
                "layer ", l, ": input ", input.sizes(), " does not match weight ", weights[l].sizes());
  }
  TORCH_CHECK(grad_out.size(0) == batch && grad_out.size(1) == weights[layers - 1].size(0),
              "grad_out ", grad_out.sizes(), " does not match the head's weight ", weights[layers - 1].sizes());

  const int64_t blocks = (batch + block_rows - 1) / block_rows;
  // One share of the blocks per thread, each with its own gradient sums, one buffer per hidden
  // layer for a block's gradient and one for its transpose. The shares depend only on the thread
  // count, so the same thread count adds the same rows in the same order every time.
  const int64_t shares = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  const int64_t ld_transposed = block_rows + kTransposePad;
  int64_t widest = 0;
  for (const at::Tensor& weight : weights) widest = std::max(widest, weight.size(0));
  const at::Tensor ones = at::ones({block_rows}, x.options());  // 1^T g is the bias gradient
  std::vector<std::vector<at::Tensor>> grad_w(shares), grad_b(shares), block_grad(shares);
  std::vector<at::Tensor> transposed(shares);
  for (int64_t s = 0; s < shares; ++s) {
    transposed[s] = at::empty({widest, ld_transposed}, x.options());
    for (int64_t l = 0; l < layers; ++l) {
      grad_w[s].push_back(at::zeros_like(weights[l]));
      grad_b[s].push_back(at::zeros({weights[l].size(0)}, weights[l].options()));
      // The gradient at layer l's input, for l > 0: the first layer's input is data.
      block_grad[s].push_back(l == 0 ? at::Tensor() : at::empty({block_rows, weights[l].size(1)}, weights[l].options()));
    }
  }
  at::parallel_for(0, shares, 1, [&](int64_t first_share, int64_t end_share) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: the pool's threads do not see the caller's
    for (int64_t s = first_share; s < end_share; ++s) {
      float* g_transposed = transposed[s].data_ptr<float>();
      for (int64_t b = s * blocks / shares; b < (s + 1) * blocks / shares; ++b) {
        const int64_t first = b * block_rows, rows = std::min(block_rows, batch - first);
        const float* g = grad_out.data_ptr<float>() + first * grad_out.size(1);
        for (int64_t l = layers - 1; l >= 0; --l) {
          const at::Tensor& input = l == 0 ? x : activations[l - 1];
          const int64_t out_width = weights[l].size(0), in_width = weights[l].size(1);
          const float* input_rows = input.data_ptr<float>() + first * in_width;
          transpose(rows, out_width, g, out_width, g_transposed, ld_transposed);
          gemm(out_width, in_width, rows, g_transposed, ld_transposed, input_rows, in_width,
               grad_w[s][l].data_ptr<float>(), in_width, true);
          gemm(1, out_width, rows, ones.data_ptr<float>(), rows, g, out_width, grad_b[s][l].data_ptr<float>(),
               out_width, true);
          if (l > 0) {
            at::Tensor next = block_grad[s][l].narrow(0, 0, rows);
            gemm(rows, in_width, out_width, g, out_width, weights[l].data_ptr<float>(), in_width,
                 next.data_ptr<float>(), in_width, false);
            at::tanh_backward_out(next, next, input.narrow(0, first, rows));
            g = next.data_ptr<float>();
          }
        }
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
  std::vector<at::Tensor> grads;
  for (int64_t l = 0; l < layers; ++l) {
    for (int64_t s = 1; s < shares; ++s) {
      grad_w[0][l].add_(grad_w[s][l]);
      grad_b[0][l].add_(grad_b[s][l]);
    }
    grads.push_back(grad_w[0][l]);
    grads.push_back(grad_b[0][l]);
  }
  return grads;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tanh_mlp_backward", &tanh_mlp_backward,
        "[dW_1, db_1, ..., dW_L, db_L] of a tanh MLP with a linear head, from the head's output gradient");
}
