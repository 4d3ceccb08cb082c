// The elementwise work of a bf16 decoder layer in one pass each: RMSNorm, the gated MLP's
// silu(gate) * up and the rotary embedding; and the KV cache's row shifts in place. Decoding
// steps and verifications run them over a handful of rows, where torch's chain of small ops (8
// for a norm, 2 for the gate, 6 for each rotary embedding) costs more in dispatch than in
// arithmetic. Each keeps the roundings of the code it stands in for (drafter/fused.py).
// Registered as torch.ops.drafter_fused; built with few_rows_linear.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>

extern "C" __m512 Sleef_expf16_u10(__m512);  // torch's own exp (libtorch_cpu), as its silu uses

namespace {

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

TARGET inline __mmask16 first(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }

TARGET inline __m512 load(const at::BFloat16* p, __mmask16 m) {  // 16 bf16 (masked: 0) as floats
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

TARGET inline __m256i to_bf16(__m512 x) {  // round to nearest even, as Tensor.to(bfloat16) (NaN kept quiet)
  __m512i bits = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(rounded);
}

TARGET inline __m512 round_trip(__m512 x) {  // x rounded to bf16, as a float
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(x)), 16));
}

// LlamaRMSNorm (and Qwen's, Mistral's): w * bf16(x * rsqrt(mean(x^2) + eps)), the product rounded to bf16.
TARGET void norm_row(const at::BFloat16* x, const at::BFloat16* w, float eps, int64_t n, at::BFloat16* out) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    __m512 v = load(x + i, first(n - i));
    acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
  }
  const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(acc) / float(n) + eps));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = first(n - i);
    __m512 y = round_trip(_mm512_mul_ps(load(x + i, m), r));
    _mm256_mask_storeu_epi16(out + i, m, to_bf16(_mm512_mul_ps(load(w + i, m), y)));
  }
}

// x [..., n] bf16 (rows contiguous), weight [n] bf16 -> [..., n] bf16
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "rms_norm: bf16 x and weight");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, "rms_norm: weight [", n, "]");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  auto out = at::empty_like(xc);
  const int64_t rows = n ? xc.numel() / n : 0;
  const at::BFloat16 *xp = xc.data_ptr<at::BFloat16>(), *wp = wc.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) norm_row(xp + r * n, wp, float(eps), n, op + r * n);
  });
  return out;
}

// bf16(bf16(silu(gate)) * up) for elements [begin, end), silu(g) = g / (1 + exp(-g)) in float32
// (torch's own formula and exp)
TARGET void silu_mul_range(const at::BFloat16* gp, const at::BFloat16* upp, at::BFloat16* op, int64_t begin,
                           int64_t end) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = begin; i < end; i += 16) {
    const __mmask16 m = first(end - i);
    __m512 x = load(gp + i, m);
    __m512 s = round_trip(_mm512_div_ps(x, _mm512_add_ps(one, Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), x)))));
    _mm256_mask_storeu_epi16(op + i, m, to_bf16(_mm512_mul_ps(s, load(upp + i, m))));
  }
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.scalar_type() == at::kBFloat16 && up.scalar_type() == at::kBFloat16 && gate.sizes() == up.sizes(),
              "silu_mul: bf16 gate and up of one shape");
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  auto out = at::empty_like(g);
  const at::BFloat16 *gp = g.data_ptr<at::BFloat16>(), *upp = u.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, g.numel(), 16384, [&](int64_t begin, int64_t end) { silu_mul_range(gp, upp, op, begin, end); });
  return out;
}

// Rotary embedding of one [D] vector as transformers' apply_rotary_pos_emb computes it in bf16:
// bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), rotate_half(x) = [-x2, x1].
TARGET void rope_row(const at::BFloat16* x, const at::BFloat16* c, const at::BFloat16* s, int64_t dim,
                     at::BFloat16* out) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < dim; i += 16) {
    const __mmask16 m = first(dim - i);
    const int64_t j = i < half ? i + half : i - half;  // the partner of element i (half is a multiple of 16)
    __m512 a = round_trip(_mm512_mul_ps(load(x + i, m), load(c + i, m)));
    __m512 b = round_trip(_mm512_mul_ps(load(x + j, m), load(s + i, m)));
    _mm256_mask_storeu_epi16(out + i, m, to_bf16(i < half ? _mm512_sub_ps(a, b) : _mm512_add_ps(a, b)));
  }
}

// x [B, H, T, D] bf16 (any strides, D contiguous), cos/sin [B or 1, T, D] bf16 (D contiguous)
// -> [B, H, T, D] contiguous
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.strides() == sin.strides(),
              "rope: x [B, H, T, D], cos and sin [B, T, D]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16,
              "rope: bf16");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 32 == 0 && x.stride(3) == 1 && cos.stride(2) == 1 && cos.size(1) == T && cos.size(2) == D &&
              (cos.size(0) == B || cos.size(0) == 1), "rope: D a multiple of 32, contiguous; cos/sin [B or 1, T, D]");
  auto out = at::empty({B, H, T, D}, x.options());
  const at::BFloat16 *xp = x.data_ptr<at::BFloat16>(), *cp = cos.data_ptr<at::BFloat16>(), *sp = sin.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), ct = cos.stride(1);
  at::parallel_for(0, B * H * T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const int64_t b = r / (H * T), h = r / T % H, t = r % T;
      rope_row(xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2), cp + b * cb + t * ct, sp + b * cb + t * ct, D,
               op + r * D);
    }
  });
  return out;
}

// In each [B, H, S, D] tensor (each head's S x D slots contiguous), row rows[i]'s slots
// [firsts[i], S - shifts[i]) move right by shifts[i]: the engine realigns a batch's KV cache this
// way after its rows reject different numbers of drafts. One memmove per row and head (the ranges
// overlap), instead of a copy into a temporary and back for each.
void shift_slots(at::TensorList tensors, at::IntArrayRef rows, at::IntArrayRef shifts, at::IntArrayRef firsts) {
  TORCH_CHECK(rows.size() == shifts.size() && rows.size() == firsts.size(), "shift_slots: one shift and first per row");
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1 && t.stride(2) == t.size(3),
                "shift_slots: [B, H, S, D] tensors, each head's S x D slots contiguous");
    const int64_t S = t.size(2), item = t.element_size(), slot = t.size(3) * item;
    char* base = static_cast<char*>(t.data_ptr());
    for (size_t i = 0; i < rows.size(); i++) {
      const int64_t r = rows[i], j = shifts[i], f = firsts[i];
      TORCH_CHECK(r >= 0 && r < t.size(0) && j >= 0 && f >= 0 && f + j <= S, "shift_slots: a shift beyond the row's slots");
      for (int64_t h = 0; h < t.size(1); h++) {
        char* head = base + (r * t.stride(0) + h * t.stride(1)) * item;
        std::memmove(head + (f + j) * slot, head + f * slot, (S - j - f) * slot);
      }
    }
  }
}

}  // namespace

TORCH_LIBRARY(drafter_fused, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", rms_norm);
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor", silu_mul);
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", rope);
  m.def("shift_slots(Tensor(a!)[] tensors, int[] rows, int[] shifts, int[] firsts) -> ()", shift_slots);
}
