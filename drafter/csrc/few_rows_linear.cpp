// bf16 linear layers for a few rows (decoding steps, verification, small batches) on AVX-512 CPUs.
// See drafter/few_rows.py for why. Built by torch.utils.cpp_extension and registered as
// torch.ops.drafter_few_rows.{pack, pack_pairs, linear}.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstring>

#include <sys/syscall.h>
#include <unistd.h>

namespace {

constexpr int64_t kCols = 64;      // output columns a tile computes: 4 vectors of 16 floats
constexpr int64_t kPairCols = 48;  // the same with `vdpbf16ps`: 3 vectors, so 8 rows' sums fit the registers
constexpr int64_t kPrefetch = 64;  // k steps ahead (8 KiB) a tile asks for the weight it will read
constexpr int kRows = 6, kPairRows = 8;  // rows a pass over a tile (the rest reread it from L2)

// `weight` [N, K] bf16 zero-padded to whole tiles of `cols` columns and to a multiple of `k_step` in k.
at::Tensor padded(const at::Tensor& weight, int64_t cols, int64_t k_step) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "pack: a 2-D bf16 weight");
  int64_t n = weight.size(0), k = weight.size(1), tiles = (n + cols - 1) / cols;
  auto out = at::zeros({tiles * cols, (k + k_step - 1) / k_step * k_step}, weight.options());
  out.narrow(0, 0, n).narrow(1, 0, k).copy_(weight);
  return out;
}

// W [N, K] -> [ceil(N / 64), K, 64]: a tile's weight, k after k, so one tile streams from memory.
// In each 32 of a k's 64 values, element 2i is column i and 2i+1 column 16+i: a 32-bit shift and a
// mask turn 32 bf16 into 2 x 16 floats (a bf16 is the top half of its float).
at::Tensor pack(const at::Tensor& weight) {
  auto w = padded(weight, kCols, 1);
  int64_t tiles = w.size(0) / kCols, k = w.size(1);
  // column c = 64 t + 32 h + 16 j + i  ->  [t, k, h, i, j]
  return w.view({tiles, 2, 2, 16, k}).permute({0, 4, 1, 3, 2}).contiguous().view({tiles, k, kCols});
}

// W [N, K] -> [ceil(N / 48), ceil(K / 2), 96]: tiles of 48 columns, k in pairs. Each k pair holds
// 3 x 16 columns, each column's two bf16 side by side: the operand of one `vdpbf16ps` for 16 columns.
// 48 rather than 64 columns: 8 rows x 3 sums + 3 weight vectors fit the 32 registers, so a
// verification of 8 tokens reads each weight once (with 64, 6 rows did and 2 reread the tile).
at::Tensor pack_pairs(const at::Tensor& weight) {
  auto w = padded(weight, kPairCols, 2);
  int64_t tiles = w.size(0) / kPairCols, pairs = w.size(1) / 2;
  // column c = 48 t + c', k = 2 p + e  ->  [t, p, c', e]
  return w.view({tiles, kPairCols, pairs, 2}).permute({0, 2, 1, 3}).contiguous().view({tiles, pairs, 2 * kPairCols});
}

// One row's float32 sums (+ bias) rounded once to bf16 (as `Tensor.to(bfloat16)` rounds) into `out`.
__attribute__((always_inline)) inline void store_row(const float* sums, const float* bias, at::BFloat16* out,
                                                     int64_t cols) {
  for (int64_t c = 0; c < cols; c++) out[c] = at::BFloat16(bias ? sums[c] + bias[c] : sums[c]);
}

// A tile's sums for MT rows, each stored by `store_row`.
template <int MT, int B>
inline void store(const __m512 (&acc)[MT][B], const float* bias, at::BFloat16* out, int64_t ld_out, int64_t cols) {
  for (int m = 0; m < MT; m++) {
    float row[16 * B];
    for (int b = 0; b < B; b++) _mm512_storeu_ps(row + 16 * b, acc[m][b]);
    store_row(row, bias, out + m * ld_out, cols);
  }
}

inline float to_float(uint16_t bf16) {
  uint32_t bits = uint32_t(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// out[m, 0:cols] = x[m, :] . W_tile for MT rows; one float32 FMA chain per output, k in order,
// so a row's result does not depend on the other rows, the tile size or the thread.
template <int MT>
void tile(const uint16_t* x, int64_t k_len, const uint16_t* w, const float* bias, at::BFloat16* out, int64_t ld_out,
          int64_t cols) {
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
      __m512 xm = _mm512_set1_ps(to_float(x[m * k_len + k]));
      acc[m][0] = _mm512_fmadd_ps(xm, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(xm, w1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(xm, w2, acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(xm, w3, acc[m][3]);
    }
  }
  store<MT, 4>(acc, bias, out, ld_out, cols);
}

// The same tile with `vdpbf16ps`: x and W as bf16 pairs, each output's float32 sum over k pairs in
// order (the instruction adds a pair's two products to the sum; its rounding is the CPU's, the
// same for every row), so a row's result still does not depend on the other rows or the thread.
template <int MT>
__attribute__((target("avx512f,avx512bf16")))
void tile_pairs(const uint16_t* x, int64_t pairs, const uint16_t* w, const float* bias, at::BFloat16* out,
                int64_t ld_out, int64_t cols) {
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x);
  __m512 acc[MT][3];
  for (int m = 0; m < MT; m++)
    for (int b = 0; b < 3; b++) acc[m][b] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; p++) {
    const uint16_t* wp = w + p * 2 * kPairCols;
    const char* ahead = reinterpret_cast<const char*>(wp + kPrefetch * kCols);  // the same 8 KiB ahead
    for (int line = 0; line < 3; line++) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp), w1 = (__m512bh)_mm512_loadu_si512(wp + 32);
    __m512bh w2 = (__m512bh)_mm512_loadu_si512(wp + 64);
    for (int m = 0; m < MT; m++) {
      __m512bh xm = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[m * pairs + p]));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xm, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xm, w1);
      acc[m][2] = _mm512_dpbf16_ps(acc[m][2], xm, w2);
    }
  }
  store<MT, 3>(acc, bias, out, ld_out, cols);
}

// With AMX, the pairs layout feeds the tile unit instead: a 48-column tile's 16 k-pairs are 3 B
// tiles (16 pairs x 16 columns, 192 bytes apart), the rows' 32 k values an A tile, and `tdpbf16ps`
// adds the 16 pairs' products to each output's float32 sum. The tile unit's work does not grow
// with the rows (up to 16), so verifying 8 tokens costs about what decoding 1 does: both read
// each weight once. Each row's sums still depend only on that row (its own A tile row), so a
// row's result does not depend on the other rows or the thread.
constexpr int kAmxRows = 16;
constexpr int64_t kAmxPairs = 16;  // k pairs a `tdpbf16ps` takes
constexpr int kAmxChunkLines = kAmxPairs * 2 * kPairCols * 2 / 64;  // cache lines of the 3 B tiles a step reads

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Whether this CPU has AMX-BF16 and the kernel let this process use its tile data (Linux asks).
bool amx_ready() {
  unsigned a, b, c, d;
  __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
  constexpr long kReqPerm = 0x1023, kXtileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return tile && bf16 && syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0;
}

// out [rows, n] (+ bias), the columns of tiles [begin, end) = x [rows, 2 * pairs] . W. Past 16 rows
// x holds whole blocks of 16 (zero rows after the last), and each weight tile, once read, serves
// every block from the cache.
__attribute__((target("amx-tile,amx-bf16,avx512f")))
void tiles_amx(const uint16_t* x, int64_t rows, int64_t pairs, const uint16_t* w, int64_t tile_len, const float* bias,
               at::BFloat16* out, int64_t n, int64_t begin, int64_t end) {
  const int block = std::min<int64_t>(rows, kAmxRows);
  TileConfig cfg;
  for (int t = 0; t < 3; t++) cfg.rows[t] = block, cfg.colsb[t] = 64;  // C: block rows x 16 floats
  cfg.rows[3] = block, cfg.colsb[3] = 64;                                // A: block rows x 16 pairs
  for (int t = 4; t < 7; t++) cfg.rows[t] = kAmxPairs, cfg.colsb[t] = 64;  // B: 16 pairs x 16 columns
  _tile_loadconfig(&cfg);
  const int64_t x_stride = 4 * pairs, w_stride = 4 * kPairCols;  // bytes between rows
  float sums[kAmxRows * kPairCols];
  for (int64_t t = begin; t < end; t++) {
    const uint16_t* wt = w + t * tile_len;
    const int64_t cols = std::min(kPairCols, n - t * kPairCols);
    const float* bt = bias ? bias + t * kPairCols : nullptr;
    for (int64_t m0 = 0; m0 < rows; m0 += block) {
      const uint16_t* xm = x + m0 * 2 * pairs;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      for (int64_t p = 0; p < pairs; p += kAmxPairs) {
        const uint16_t* wp = wt + p * 2 * kPairCols;
        if (m0 == 0) {  // 8 KiB ahead, as above; the next blocks find the tile in the cache
          const char* ahead = reinterpret_cast<const char*>(wp + kPrefetch * kCols);
          for (int line = 0; line < kAmxChunkLines; line++) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
        }
        _tile_loadd(3, xm + 2 * p, x_stride);
        _tile_loadd(4, wp, w_stride);
        _tile_loadd(5, wp + 32, w_stride);
        _tile_loadd(6, wp + 64, w_stride);
        _tile_dpbf16ps(0, 3, 4);
        _tile_dpbf16ps(1, 3, 5);
        _tile_dpbf16ps(2, 3, 6);
      }
      _tile_stored(0, sums, 4 * kPairCols);
      _tile_stored(1, sums + 16, 4 * kPairCols);
      _tile_stored(2, sums + 32, 4 * kPairCols);
      for (int64_t m = 0; m < std::min<int64_t>(block, rows - m0); m++)
        store_row(sums + m * kPairCols, bt, out + (m0 + m) * n + t * kPairCols, cols);
    }
  }
  _tile_release();
}

using TileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, const float*, at::BFloat16*, int64_t, int64_t);
constexpr TileFn kTiles[] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};
constexpr TileFn kPairTiles[] = {nullptr, tile_pairs<1>, tile_pairs<2>, tile_pairs<3>, tile_pairs<4>,
                                 tile_pairs<5>, tile_pairs<6>, tile_pairs<7>, tile_pairs<8>};

// x [M, K] bf16 @ packed W [N, K]^T (+ bias) -> [M, N] bf16, each output rounded once. The packed
// layout picks the arithmetic: [tiles, K, 64] float32 FMAs, [tiles, ceil(K / 2), 96] `vdpbf16ps`.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && packed.dim() == 3, "linear: bf16 x [M, K] and a packed weight");
  int64_t rows = x.size(0), k_len = x.size(1), pairs = (k_len + 1) / 2;
  const bool paired = packed.size(2) == 2 * kPairCols;
  const int64_t tile_cols = paired ? kPairCols : kCols, pass_rows = paired ? kPairRows : kRows;
  TORCH_CHECK(paired ? packed.size(1) == pairs : packed.size(1) == k_len && packed.size(2) == kCols,
              "linear: a weight packed for K = x.size(1)");
  TORCH_CHECK(n > (packed.size(0) - 1) * tile_cols && n <= packed.size(0) * tile_cols,
              "linear: n does not match the packed weight");
  at::Tensor xs = x.contiguous();
  if (paired && k_len % 2) {  // whole pairs: a zero after each row's odd last k
    xs = at::zeros({rows, 2 * pairs}, x.options());
    xs.narrow(1, 0, k_len).copy_(x);
  }
  at::Tensor b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  auto out = at::empty({rows, n}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xs.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  const float* bp = bias.has_value() ? b.data_ptr<float>() : nullptr;
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  int64_t x_row = xs.size(1), steps = packed.size(1), tile_len = steps * packed.size(2);
  const TileFn* tiles = paired ? kPairTiles : kTiles;
  static const bool amx = amx_ready();
  if (paired && amx && pairs % kAmxPairs == 0) {
    if (rows > kAmxRows && rows % kAmxRows) {  // whole blocks of 16 rows: zero rows after the last
      at::Tensor whole = at::zeros({(rows + kAmxRows - 1) / kAmxRows * kAmxRows, 2 * pairs}, x.options());
      whole.narrow(0, 0, rows).copy_(xs);
      xs = whole;
      xp = reinterpret_cast<const uint16_t*>(xs.data_ptr<at::BFloat16>());
    }
    at::parallel_for(0, packed.size(0), 4, [&](int64_t begin, int64_t end) {
      tiles_amx(xp, rows, pairs, wp, tile_len, bp, op, n, begin, end);
    });
    return out;
  }
  at::parallel_for(0, packed.size(0), 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      int64_t cols = std::min(tile_cols, n - t * tile_cols);
      for (int64_t m = 0; m < rows; m += pass_rows) {  // the weight tile stays in L2 for the next rows
        int64_t mt = std::min(pass_rows, rows - m);
        tiles[mt](xp + m * x_row, steps, wp + t * tile_len, bp ? bp + t * tile_cols : nullptr,
                  op + m * n + t * tile_cols, n, cols);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(drafter_few_rows, m) {
  m.def("pack(Tensor weight) -> Tensor", pack);
  m.def("pack_pairs(Tensor weight) -> Tensor", pack_pairs);
  m.def("linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor", linear);
}
