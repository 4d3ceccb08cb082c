// Attention of a few bf16 query tokens (decoding steps, verification) over a KV cache, with
// AVX-512 BF16 (`vdpbf16ps`). See drafter/attention.py for why and for the roundings it keeps.
// Registered as torch.ops.drafter_attention.attend; built with few_rows_linear.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstring>
#include <limits>
#include <vector>

extern "C" __m512 Sleef_expf16_u10(__m512);  // torch's own exp (libtorch_cpu), as its softmax uses

namespace {

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

TARGET inline __m512 round_bf16(__m512 x) {  // to the nearest bf16 (even on ties), as a float
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

// 16 x 16 32-bit transpose: r[j]'s element i -> r[i]'s element j.
TARGET inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int k = 0; k < 8; k++) {  // per 128-bit lane: rows 2k, 2k+1 interleaved
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; k++) {  // r[4k + e], lane L: rows 4k..4k+3 of column 4L + e
    r[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    r[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int e = 0; e < 4; e++) {  // column 4L + e: lane L of r[e], r[4 + e], r[8 + e], r[12 + e]
    __m512i x0 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x44), x1 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xEE);
    __m512i y0 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x44), y1 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xEE);
    t[e] = _mm512_shuffle_i32x4(x0, y0, 0x88), t[4 + e] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    t[8 + e] = _mm512_shuffle_i32x4(x1, y1, 0x88), t[12 + e] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
  for (int i = 0; i < 16; i++) r[i] = t[i];
}

// G queries' (bf16 pairs `q[g]`) scores against one block of 16 keys laid out pair by pair
// (`kt`: 16 * VECS vectors, pair i of the 16 keys), each a float32 sum over the pairs in CHAINS
// interleaved chains (pairs c, c + CHAINS, ...) added at the end: independent chains keep the
// units busy when G is small, and their number never depends on G, so a query's score has the
// same bits whatever the other queries (decoding stays lossless).
constexpr int CHAINS = 2;
template <int VECS, int G, int C = CHAINS>
TARGET inline void block_scores(const uint32_t* const q[], const __m512bh* kt, __m512 out[]) {
  __m512 acc[C][G];
  for (int c = 0; c < C; c++)
    for (int g = 0; g < G; g++) acc[c][g] = _mm512_setzero_ps();
  for (int i = 0; i < 16 * VECS; i += C)
    for (int c = 0; c < C; c++)
      for (int g = 0; g < G; g++)
        acc[c][g] = _mm512_dpbf16_ps(acc[c][g], (__m512bh)_mm512_set1_epi32(q[g][i + c]), kt[i + c]);
  for (int g = 0; g < G; g++) {
    out[g] = acc[0][g];
    for (int c = 1; c < C; c++) out[g] = _mm512_add_ps(out[g], acc[c][g]);
  }
}

// G queries' outputs: float32 sums over the key pairs in order, rounded to bf16.
template <int VECS, int G>
TARGET inline void block_output(const uint32_t* const p[], const uint16_t* vpairs, int64_t pairs, int64_t dim,
                                at::BFloat16* const o[]) {
  __m512 acc[G][2 * VECS];
  for (int g = 0; g < G; g++)
    for (int i = 0; i < 2 * VECS; i++) acc[g][i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < pairs; j++) {
    uint32_t any = 0;
    for (int g = 0; g < G; g++) any |= p[g][j];
    if (any == 0) continue;  // keys no query here sees (a query's own zeros leave its sum as it is)
    const uint16_t* vp = vpairs + 2 * j * dim;
    for (int i = 0; i < 2 * VECS; i++) {
      __m512bh x = (__m512bh)_mm512_loadu_si512(vp + 32 * i);
      for (int g = 0; g < G; g++) acc[g][i] = _mm512_dpbf16_ps(acc[g][i], (__m512bh)_mm512_set1_epi32(p[g][j]), x);
    }
  }
  for (int g = 0; g < G; g++)
    for (int i = 0; i < 2 * VECS; i++)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o[g] + 16 * i), (__m256i)_mm512_cvtneps_pbh(acc[g][i]));
}

// Which of the 16 keys from s0 query token t may attend to: `mask` [T, S] (any strides) or none
// (causal, the queries last), and only the `length` real keys.
TARGET inline __mmask16 allowed(const bool* mask, int64_t mask_t, int64_t mask_s, int64_t t, int64_t tokens,
                                int64_t s0, int64_t length) {
  const int64_t n = std::min<int64_t>(16, length - s0);
  __mmask16 real = n == 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
  if (!mask) {
    const int64_t last = length - tokens + t - s0;  // the last key it sees, from s0
    return last >= 15 ? real : last < 0 ? 0 : (__mmask16)(real & ((1u << (last + 1)) - 1));
  }
  const bool* m = mask + t * mask_t + s0 * mask_s;
  if (mask_s == 1) return _mm_test_epi8_mask(_mm_maskz_loadu_epi8(real, m), _mm_set1_epi8(1));
  __mmask16 bits = 0;
  for (int64_t j = 0; j < n; j++) bits |= (__mmask16)(m[j * mask_s] ? 1u << j : 0);
  return bits;
}

// One KV head of one row: the group's heads x `active` first of its T = `tokens` query tokens
// (bf16, scaled; laid out heads x T) against `length` cached keys whose rows lie `dim` = 32 * VECS
// apart; the other tokens' outputs are left unset. Rounds where the
// matrix-product path does: scores to bf16, softmax in float32, probabilities to bf16, the output
// to bf16. Each block of 16 keys is transposed once (pairs of the 16 keys side by side) and then
// shared by every query: 16 scores a `vdpbf16ps` chain, no horizontal sums.
template <int VECS>
TARGET void head(const uint16_t* q, int64_t group, int64_t tokens, int64_t active, const uint16_t* k, const uint16_t* v,
                 int64_t length, const bool* mask, int64_t mask_t, int64_t mask_s, float* scores, uint16_t* probs,
                 uint16_t* vpairs, at::BFloat16* out, int64_t out_head, int64_t out_token) {
  constexpr int64_t dim = 32 * VECS;
  constexpr int QG = 8, OG = 2 * VECS <= 4 ? 4 : 2 * VECS <= 8 ? 2 : 1;  // queries a pass (registers)
  const int64_t padded = (length + 15) / 16 * 16, even = (length + 1) / 2 * 2;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const __m512 ninf = _mm512_set1_ps(neg_inf);
  const uint32_t* q32 = reinterpret_cast<const uint32_t*>(q);
  const int64_t queries = group * active;  // query a: head a / active, token a % active
  // scores, masked keys at -inf
  alignas(64) __m512bh kt[16 * VECS];
  for (int64_t s0 = 0; s0 < length; s0 += 16) {
    const int64_t n = std::min<int64_t>(16, length - s0);
    for (int64_t c = 0; c < VECS; c++) {
      __m512i r[16];
      for (int64_t j = 0; j < 16; j++)
        r[j] = j < n ? _mm512_loadu_si512(k + (s0 + j) * dim + 32 * c) : _mm512_setzero_si512();
      transpose16(r);
      for (int64_t i = 0; i < 16; i++) kt[16 * c + i] = (__m512bh)r[i];
    }
    for (int64_t q0 = 0; q0 < queries; q0 += QG) {
      const int64_t g = std::min<int64_t>(QG, queries - q0);
      const uint32_t* qs[QG];
      for (int64_t i = 0; i < g; i++) qs[i] = q32 + ((q0 + i) / active * tokens + (q0 + i) % active) * (dim / 2);
      __m512 acc[QG];
      switch (g) {
        case 8: block_scores<VECS, 8>(qs, kt, acc); break;
        case 7: block_scores<VECS, 7>(qs, kt, acc); break;
        case 6: block_scores<VECS, 6>(qs, kt, acc); break;
        case 5: block_scores<VECS, 5>(qs, kt, acc); break;
        case 4: block_scores<VECS, 4>(qs, kt, acc); break;
        case 3: block_scores<VECS, 3>(qs, kt, acc); break;
        case 2: block_scores<VECS, 2>(qs, kt, acc); break;
        default: block_scores<VECS, 1>(qs, kt, acc);
      }
      for (int64_t i = 0; i < g; i++) {
        const __mmask16 ok = allowed(mask, mask_t, mask_s, (q0 + i) % active, tokens, s0, length);
        _mm512_storeu_ps(scores + (q0 + i) * padded + s0, _mm512_mask_blend_ps(ok, ninf, round_bf16(acc[i])));
      }
    }
  }
  // softmax per query in float32 (masked keys: probability 0), probabilities rounded to bf16
  for (int64_t qi = 0; qi < queries; qi++) {
    float* row = scores + qi * padded;
    __m512 top = ninf;
    for (int64_t s = 0; s < padded; s += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(row + s));
    const float m = _mm512_reduce_max_ps(top);
    uint16_t* p = probs + qi * even;
    if (m == neg_inf) {  // nothing to attend to
      std::memset(p, 0, even * sizeof(uint16_t));
      continue;
    }
    __m512 total = _mm512_setzero_ps(), mv = _mm512_set1_ps(m);
    for (int64_t s = 0; s < padded; s += 16) {
      __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_loadu_ps(row + s), mv));
      _mm512_storeu_ps(row + s, e);
      total = _mm512_add_ps(total, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
    for (int64_t s = 0; s < even; s += 16) {
      __m256bh pb = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(row + s), inv));
      const int64_t left = std::min<int64_t>(16, even - s);
      _mm256_mask_storeu_epi16(p + s, left == 16 ? 0xFFFF : (__mmask16)((1u << left) - 1), (__m256i)pb);
    }
  }
  // values in key pairs: for keys 2j, 2j+1 and each d, (v[2j][d], v[2j+1][d]) side by side
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                      37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t s = 0; s < even; s += 2) {
    for (int64_t i = 0; i < VECS; i++) {
      __m512i a = _mm512_loadu_si512(v + s * dim + 32 * i);
      __m512i b = s + 1 < length ? _mm512_loadu_si512(v + (s + 1) * dim + 32 * i) : _mm512_setzero_si512();
      _mm512_storeu_si512(vpairs + s * dim + 64 * i, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(vpairs + s * dim + 64 * i + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
  // outputs, OG queries a pass sharing each pair of value rows
  for (int64_t q0 = 0; q0 < queries; q0 += OG) {
    const int64_t g = std::min<int64_t>(OG, queries - q0);
    const uint32_t* ps[OG];
    at::BFloat16* os[OG];
    for (int64_t i = 0; i < g; i++) {
      ps[i] = reinterpret_cast<const uint32_t*>(probs + (q0 + i) * even);
      os[i] = out + ((q0 + i) / active) * out_head + ((q0 + i) % active) * out_token;
    }
    if (g == OG) block_output<VECS, OG>(ps, vpairs, even / 2, dim, os);
    else for (int64_t i = 0; i < g; i++) block_output<VECS, 1>(ps + i, vpairs, even / 2, dim, os + i);
  }
}

using HeadFn = void (*)(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t*, const uint16_t*, int64_t, const bool*,
                        int64_t, int64_t, float*, uint16_t*, uint16_t*, at::BFloat16*, int64_t, int64_t);
constexpr HeadFn HEADS[8] = {head<1>, head<2>, head<3>, head<4>, head<5>, head<6>, head<7>, head<8>};

// query [B, H, T, D] bf16, already scaled; key, value [B, KV, S, D] bf16, D a multiple of 32 up to
// 256, each head's S x D rows contiguous (any batch and head strides, the same for both); mask
// bool [B, T, S] (true: attend; any strides) or none (causal, the queries last); tokens int64 [B]
// or none: row b's queries are its first tokens[b] (packed verification: rows of different
// lengths), the others' outputs are left unset. -> [B, H, T, D].
at::Tensor attend(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& tokens_of) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "attend: 4-D query, key and value");
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 &&
              value.scalar_type() == at::kBFloat16, "attend: bf16 query, key and value");
  const int64_t batch = query.size(0), heads = query.size(1), tokens = query.size(2), dim = query.size(3);
  const int64_t kv = key.size(1), length = key.size(2);
  TORCH_CHECK(dim % 32 == 0 && dim <= 256 && heads % kv == 0, "attend: head size a multiple of 32 up to 256");
  TORCH_CHECK(key.sizes() == value.sizes() && key.size(0) == batch && key.size(3) == dim, "attend: key/value shape");
  TORCH_CHECK(key.stride(3) == 1 && key.stride(2) == dim && key.strides() == value.strides(),
              "attend: each head's keys and values S x D contiguous, with the same strides");
  const bool* mp = nullptr;
  int64_t mask_b = 0, mask_t = 0, mask_s = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 3 && m.size(0) == batch && m.size(1) == tokens &&
                m.size(2) == length, "attend: a bool mask [B, T, S]");
    mp = m.data_ptr<bool>();
    mask_b = m.stride(0), mask_t = m.stride(1), mask_s = m.stride(2);
  }
  std::vector<int64_t> active(batch, tokens);
  if (tokens_of.has_value()) {
    const at::Tensor t = tokens_of->to(at::kLong).contiguous();
    TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "attend: tokens [B]");
    for (int64_t b = 0; b < batch; b++) {
      active[b] = t.data_ptr<int64_t>()[b];
      TORCH_CHECK(active[b] >= 0 && active[b] <= tokens, "attend: a row's tokens between 0 and T");
    }
  }
  const int64_t group = heads / kv, queries = group * tokens;
  const at::Tensor q = query.contiguous();
  auto out = at::empty({batch, heads, tokens, dim}, query.options());
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(key.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(value.data_ptr<at::BFloat16>());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t padded = (length + 15) / 16 * 16, even = (length + 1) / 2 * 2;
  at::parallel_for(0, batch * kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(queries * padded);
    std::vector<uint16_t> probs(queries * even + 16), vpairs(even * dim);
    for (int64_t i = begin; i < end; i++) {
      const int64_t b = i / kv, h = i % kv;
      if (active[b] == 0) continue;
      HEADS[dim / 32 - 1](qp + (b * heads + h * group) * tokens * dim, group, tokens, active[b], kp + b * key.stride(0) + h * key.stride(1),
           vp + b * value.stride(0) + h * value.stride(1), length, mp ? mp + b * mask_b : nullptr, mask_t, mask_s,
           scores.data(), probs.data(), vpairs.data(), op + (b * heads + h * group) * tokens * dim, tokens * dim, dim);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(drafter_attention, m) {
  m.def("attend(Tensor query, Tensor key, Tensor value, Tensor? mask, Tensor? tokens=None) -> Tensor", attend);
}
