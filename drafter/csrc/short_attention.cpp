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

#define TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// r[j] = the sum of v[j]'s 16 lanes, for 16 vectors.
TARGET inline __m512 sum16(__m512 v[16]) {
  __m512 t[8], u[4];
  for (int k = 0; k < 8; k++)  // per 128-bit lane: v[2k] at places 0, 2; v[2k+1] at 1, 3
    t[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int m = 0; m < 4; m++) {  // per 128-bit lane: v[4m + p]'s lane sum at place p
    __m512d a = _mm512_castps_pd(t[2 * m]), b = _mm512_castps_pd(t[2 * m + 1]);
    u[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
  __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88), _mm512_shuffle_f32x4(x0, x1, 0xDD));
}

TARGET inline __m512 round_bf16(__m512 x) {  // to the nearest bf16 (even on ties), as a float
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

// One KV head of one row: `queries` bf16 query vectors (the group's heads x T tokens, scaled)
// against `length` cached keys whose rows lie `dim` apart. Rounds where the matrix-product path
// does: scores to bf16, softmax in float32, probabilities to bf16, the output to bf16.
TARGET void head(const uint16_t* q, int64_t queries, int64_t tokens, int64_t dim, const uint16_t* k,
                 const uint16_t* v, int64_t length, const bool* mask, int64_t mask_t, int64_t mask_s,
                 float* scores, uint16_t* probs, uint16_t* vpairs, at::BFloat16* out, int64_t out_head,
                 int64_t out_token) {
  const int64_t vecs = dim / 32, padded = (length + 15) / 16 * 16, even = (length + 1) / 2 * 2;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // scores: each block of 16 keys against each query, 16 sums at once
  for (int64_t s0 = 0; s0 < length; s0 += 16) {
    const int64_t n = std::min<int64_t>(16, length - s0);
    for (int64_t qi = 0; qi < queries; qi++) {
      __m512bh qv[8];
      for (int64_t i = 0; i < vecs; i++) qv[i] = (__m512bh)_mm512_loadu_si512(q + qi * dim + 32 * i);
      __m512 part[16];
      for (int64_t j = 0; j < 16; j++) {
        __m512 acc = _mm512_setzero_ps();
        if (j < n)
          for (int64_t i = 0; i < vecs; i++)
            acc = _mm512_dpbf16_ps(acc, qv[i], (__m512bh)_mm512_loadu_si512(k + (s0 + j) * dim + 32 * i));
        part[j] = acc;
      }
      _mm512_storeu_ps(scores + qi * padded + s0, round_bf16(sum16(part)));
    }
  }
  // softmax per query in float32 (masked keys: probability 0), probabilities rounded to bf16
  for (int64_t qi = 0; qi < queries; qi++) {
    float* row = scores + qi * padded;
    const int64_t t = qi % tokens;
    for (int64_t s = 0; s < length; s++) {
      bool allowed = mask ? mask[t * mask_t + s * mask_s] : s <= length - tokens + t;  // none: causal, queries last
      if (!allowed) row[s] = neg_inf;
    }
    for (int64_t s = length; s < padded; s++) row[s] = neg_inf;
    __m512 top = _mm512_set1_ps(neg_inf);
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
      uint16_t tmp[16];
      _mm256_storeu_si256((__m256i*)tmp, (__m256i)pb);
      std::memcpy(p + s, tmp, std::min<int64_t>(16, even - s) * sizeof(uint16_t));
    }
  }
  // values in key pairs: for keys 2j, 2j+1 and each d, (v[2j][d], v[2j+1][d]) side by side
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                      37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t s = 0; s < even; s += 2) {
    for (int64_t i = 0; i < vecs; i++) {
      __m512i a = _mm512_loadu_si512(v + s * dim + 32 * i);
      __m512i b = s + 1 < length ? _mm512_loadu_si512(v + (s + 1) * dim + 32 * i) : _mm512_setzero_si512();
      _mm512_storeu_si512(vpairs + s * dim + 64 * i, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(vpairs + s * dim + 64 * i + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
  // output: each query's float32 sum over the keys (in pairs), rounded to bf16
  for (int64_t qi = 0; qi < queries; qi++) {
    const uint32_t* pp = reinterpret_cast<const uint32_t*>(probs + qi * even);
    __m512 acc[16];
    for (int64_t i = 0; i < 2 * vecs; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < even / 2; j++) {
      if (pp[j] == 0) continue;
      __m512bh pv = (__m512bh)_mm512_set1_epi32(pp[j]);
      const uint16_t* vp = vpairs + 2 * j * dim;
      for (int64_t i = 0; i < 2 * vecs; i++) acc[i] = _mm512_dpbf16_ps(acc[i], pv, (__m512bh)_mm512_loadu_si512(vp + 32 * i));
    }
    at::BFloat16* o = out + (qi / tokens) * out_head + (qi % tokens) * out_token;
    for (int64_t i = 0; i < 2 * vecs; i++)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * i), (__m256i)_mm512_cvtneps_pbh(acc[i]));
  }
}

// query [B, H, T, D] bf16, already scaled; key, value [B, KV, S, D] bf16, D a multiple of 32 up to
// 256, each head's S x D rows contiguous (any batch and head strides, the same for both); mask
// bool [B, T, S] (true: attend; any strides) or none (causal, the queries last). -> [B, H, T, D].
at::Tensor attend(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  const std::optional<at::Tensor>& mask) {
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
      head(qp + (b * heads + h * group) * tokens * dim, queries, tokens, dim, kp + b * key.stride(0) + h * key.stride(1),
           vp + b * value.stride(0) + h * value.stride(1), length, mp ? mp + b * mask_b : nullptr, mask_t, mask_s,
           scores.data(), probs.data(), vpairs.data(), op + (b * heads + h * group) * tokens * dim, tokens * dim, dim);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(drafter_attention, m) {
  m.def("attend(Tensor query, Tensor key, Tensor value, Tensor? mask) -> Tensor", attend);
}
