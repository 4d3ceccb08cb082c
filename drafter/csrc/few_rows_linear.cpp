// bf16 linear layers for a few rows (decoding steps, verification, small batches) on AVX-512 CPUs.
// See drafter/few_rows.py for why. Built by torch.utils.cpp_extension and registered as
// torch.ops.drafter_few_rows.{pack, linear}.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

namespace {

constexpr int64_t kCols = 64;      // output columns a tile computes: 4 vectors of 16 floats
constexpr int64_t kPrefetch = 64;  // k steps ahead (8 KiB) a tile asks for the weight it will read

// W [N, K] -> [ceil(N / 64), K, 64]: a tile's weight, k after k, so one tile streams from memory.
// In each 32 of a k's 64 values, element 2i is column i and 2i+1 column 16+i: a 32-bit shift and a
// mask turn 32 bf16 into 2 x 16 floats (a bf16 is the top half of its float).
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "pack: a 2-D bf16 weight");
  int64_t n = weight.size(0), k = weight.size(1), tiles = (n + kCols - 1) / kCols;
  auto padded = at::zeros({tiles * kCols, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  // column c = 64 t + 32 h + 16 j + i  ->  [t, k, h, i, j]
  return padded.view({tiles, 2, 2, 16, k}).permute({0, 4, 1, 3, 2}).contiguous().view({tiles, k, kCols});
}

// out[m, 0:cols] = x[m, :] . W_tile for MT rows; one float32 FMA chain per output, k in order,
// so a row's result does not depend on the other rows, the tile size or the thread.
template <int MT>
void tile(const float* x, int64_t k_len, const uint16_t* w, float* out, int64_t ld_out, int64_t cols) {
  __m512 acc[MT][4];
  for (int m = 0; m < MT; m++)
    for (int b = 0; b < 4; b++) acc[m][b] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(0xFFFF0000);
  for (int64_t k = 0; k < k_len; k++) {
    const uint16_t* wk = w + k * kCols;
    _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetch * kCols), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetch * kCols + 32), _MM_HINT_T0);
    __m512i lo = _mm512_loadu_si512(wk), hi = _mm512_loadu_si512(wk + 32);
    __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16));
    __m512 w1 = _mm512_castsi512_ps(_mm512_and_si512(lo, high));
    __m512 w2 = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16));
    __m512 w3 = _mm512_castsi512_ps(_mm512_and_si512(hi, high));
    for (int m = 0; m < MT; m++) {
      __m512 xm = _mm512_set1_ps(x[m * k_len + k]);
      acc[m][0] = _mm512_fmadd_ps(xm, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(xm, w1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(xm, w2, acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(xm, w3, acc[m][3]);
    }
  }
  for (int m = 0; m < MT; m++) {
    float row[kCols];
    for (int b = 0; b < 4; b++) _mm512_storeu_ps(row + 16 * b, acc[m][b]);
    std::copy(row, row + cols, out + m * ld_out);
  }
}

using TileFn = void (*)(const float*, int64_t, const uint16_t*, float*, int64_t, int64_t);
constexpr TileFn kTiles[] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

// x [M, K] bf16 (float32 accepted) @ packed W [N, K]^T (+ bias) -> [M, N] bf16, rounded once.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(1) == x.size(1) && packed.size(2) == kCols,
              "linear: x [M, K] and a weight packed for K = x.size(1)");
  TORCH_CHECK(n > (packed.size(0) - 1) * kCols && n <= packed.size(0) * kCols, "linear: n does not match the packed weight");
  auto xf = x.to(at::kFloat).contiguous();
  int64_t rows = x.size(0), k_len = x.size(1);
  auto out = at::empty({rows, n}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, packed.size(0), 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      int64_t cols = std::min(kCols, n - t * kCols);
      for (int64_t m = 0; m < rows; m += 6) {  // the weight tile stays in L2 for the next rows
        int64_t mt = std::min<int64_t>(6, rows - m);
        kTiles[mt](xp + m * k_len, k_len, wp + t * k_len * kCols, op + m * n + t * kCols, n, cols);
      }
    }
  });
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(at::kBFloat16);
}

}  // namespace

TORCH_LIBRARY(drafter_few_rows, m) {
  m.def("pack(Tensor weight) -> Tensor", pack);
  m.def("linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor", linear);
}
