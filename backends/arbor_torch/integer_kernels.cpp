// arbor's CPU integer kernels: y = x @ W.T with W held as integer codes and x quantized to int8 once per call.
//
// Two weight forms (integer_kernels.py builds them and says why):
//   q4k: GGUF Q4_K's numbers as they are, w = d * sc * q - dmin * m (q 0..15; sc, m 6-bit per 32 inputs; d, dmin
//        fp16 per 256 inputs and row), re-ordered so that 16 output rows are interleaved: per group of 16 rows and
//        super-block of 256 inputs, SUPER_BYTES bytes =
//          codes [8 sub-blocks][4 chunks t][16 rows][4 bytes]: low nibble input 32j + 4t + i, high nibble 32j+16+4t+i
//          d [16] fp16, dmin [16] fp16, sc [8][16] u8, m [8][16] u8
//        A 64-byte load is then 4 inputs of 16 rows, one VNNI dot product (u8 codes x s8 activations) per nibble half.
//   q6k: GGUF Q6_K's numbers as they are, w = d * sc * (q - 32) (q 0..63; sc int8 per 16 inputs; d fp16 per 256
//        inputs and row), 16 rows interleaved as q4k's: per group and super-block Q6K_SUPER_BYTES bytes =
//          per 32 inputs j: q4k's nibbles of the low 4 bits [4 t][16 rows][4 bytes], then the high 2 bits of the
//          first 16 inputs [16 rows][4 bytes] (bits 2t..2t+1: chunk t), then those of the last 16
//          d [16] fp16, sc [16 sub-blocks][16 rows] int8
//        6.5625 bits a weight, as in the file.
//   q8:  GGUF Q8_0's (and Q5_0's, stored as Q8_0) numbers as they are, w = d * q (q int8, d fp16 per 32 inputs and
//        row), 16 rows interleaved: per group and 32 inputs Q8_BLOCK_BYTES bytes = codes [8 t][16 rows][4 bytes],
//        d [16] fp16. 8.5 bits a weight.
//   q5:  GGUF Q5_0's numbers as they are, w = d * (q - 16) (q 0..31, d fp16 per 32 inputs and row), 16 rows
//        interleaved: per group and 32 inputs Q5_BLOCK_BYTES bytes = q4k's nibbles of the low 4 bits [4 t][16 rows]
//        [4 bytes], the high bits [16 rows][4 bytes] (bit t: input 4t + i, bit 4 + t: input 16 + 4t + i), d [16]
//        fp16. 5.5 bits a weight, as in the file.
//   i8:  int8 rows [N, K] with one scale per row (quantize.Int8Linear's buffers, unchanged).
// Activations: per 32 inputs, dx = max|x| / 127, qx = round(x / dx) in int8; the dot of a block is exact in int32
// and scaled in float32. ISA: AVX512-VNNI, AVX2 or plain C++, chosen at run time (ARBOR_KERNEL_ISA=avx2|scalar
// caps it; set_isa too); the results of the three differ only by float32 summation order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace {

constexpr int64_t QK = 32;            // inputs per activation block and per Q4_K sub-block
constexpr int64_t SUPER = 256;        // inputs per Q4_K super-block
constexpr int64_t ROWS = 16;          // output rows interleaved in the q4k layout
constexpr int64_t CODE_BYTES = SUPER / 2 * ROWS;              // 2048
constexpr int64_t SUPER_BYTES = CODE_BYTES + 4 * ROWS + 16 * ROWS;  // + d, dmin (fp16) + sc, m (u8 x 8) = 2368
constexpr int64_t Q8_BLOCK_BYTES = QK * ROWS + 2 * ROWS;            // 544
constexpr int64_t Q5_BLOCK_BYTES = QK / 2 * ROWS + QK / 8 * ROWS + 2 * ROWS;  // 256 + 64 + 32 = 352
constexpr int64_t Q6K_BLOCK_BYTES = 384;                            // one 32 of 16 rows: 256 nibble + 128 high
constexpr int64_t Q6K_CODE_BYTES = 8 * Q6K_BLOCK_BYTES;              // 3072
constexpr int64_t Q6K_SUPER_BYTES = Q6K_CODE_BYTES + 2 * ROWS + 16 * ROWS;  // + d (fp16) + sc (int8 x 16) = 3360

enum Isa : int64_t { SCALAR = 0, AVX2 = 1, AVX512 = 2 };

int64_t best_isa() {
  __builtin_cpu_init();
  int64_t best = SCALAR;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = AVX2;
  if (best == AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    best = AVX512;
  return best;
}

int64_t isa_from_env() {
  int64_t best = best_isa();
  const char* env = std::getenv("ARBOR_KERNEL_ISA");
  if (env == nullptr) return best;
  if (std::strcmp(env, "scalar") == 0) return SCALAR;
  if (std::strcmp(env, "avx2") == 0) return std::min<int64_t>(best, AVX2);
  return best;
}

std::atomic<int64_t> current_isa{isa_from_env()};

// ---- activations -------------------------------------------------------------------------------------------

struct Quantized {
  at::Tensor q;     // int8 [M, Kp], Kp = K rounded up to 64 (the tail zero)
  at::Tensor d;     // float [M, Kp / 32] block scales (0 in the tail)
  at::Tensor dsum;  // float [M, Kp / 32] d * sum(q) of each block
  at::Tensor sum16; // int32 [M, Kp / 16] sum(q) of each 16 (Q6_K's offset of 32 is taken off with it)
};

Quantized quantize_rows(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + 63) / 64 * 64, nb = Kp / QK;
  Quantized out{at::empty({M, Kp}, at::kChar), at::empty({M, nb}, at::kFloat), at::empty({M, nb}, at::kFloat),
                at::empty({M, 2 * nb}, at::kInt)};
  int32_t* s16 = out.sum16.data_ptr<int32_t>();
  const float* xp = x.data_ptr<float>();
  int8_t* qp = out.q.data_ptr<int8_t>();
  float* dp = out.d.data_ptr<float>();
  float* sp = out.dsum.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < nb; ++b) {
        int8_t* q = qp + m * Kp + b * QK;
        if (b * QK >= K) {
          std::memset(q, 0, QK);
          dp[m * nb + b] = sp[m * nb + b] = 0.f;
          s16[m * 2 * nb + 2 * b] = s16[m * 2 * nb + 2 * b + 1] = 0;
          continue;
        }
        const float* v = xp + m * K + b * QK;
        float amax = 0.f;
        for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(v[i]));
        const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0, first = 0;
        for (int i = 0; i < QK; ++i) {
          const int32_t c = static_cast<int32_t>(std::nearbyint(v[i] * id));
          q[i] = static_cast<int8_t>(c);
          sum += c;
          if (i == QK / 2 - 1) first = sum;
        }
        s16[m * 2 * nb + 2 * b] = first;
        s16[m * 2 * nb + 2 * b + 1] = sum - first;
        dp[m * nb + b] = d;
        sp[m * nb + b] = d * static_cast<float>(sum);
      }
    }
  });
  return out;
}

// ---- q4k: scalar ------------------------------------------------------------------------------------------

// One group of 16 rows, activation rows [m0, m1): y[m, row0 + r] for r < valid.
void q4k_group_scalar(const uint8_t* w, int64_t S, const Quantized& a, int64_t m0, int64_t m1, float* y,
                      int64_t N, int64_t row0, int64_t valid) {
  const int64_t Kp = a.q.size(1), nb = a.d.size(1);
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xq = a.q.data_ptr<int8_t>() + m * Kp;
    const float* xd = a.d.data_ptr<float>() + m * nb;
    const float* xs = a.dsum.data_ptr<float>() + m * nb;
    for (int64_t r = 0; r < valid; ++r) {
      float acc = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        const uint8_t* blk = w + s * SUPER_BYTES;
        const uint16_t* halves = reinterpret_cast<const uint16_t*>(blk + CODE_BYTES);
        const float d = c10::detail::fp16_ieee_to_fp32_value(halves[r]);
        const float dmin = c10::detail::fp16_ieee_to_fp32_value(halves[ROWS + r]);
        const uint8_t* sc = blk + CODE_BYTES + 4 * ROWS;
        const uint8_t* mn = sc + 8 * ROWS;
        for (int64_t j = 0; j < 8; ++j) {
          const int64_t b = s * 8 + j;
          const int8_t* xb = xq + b * QK;
          int32_t dot = 0;
          for (int64_t t = 0; t < 4; ++t)
            for (int64_t i = 0; i < 4; ++i) {
              const uint8_t byte = blk[j * 256 + t * 64 + r * 4 + i];
              dot += (byte & 15) * xb[4 * t + i] + (byte >> 4) * xb[16 + 4 * t + i];
            }
          acc += d * sc[j * ROWS + r] * xd[b] * static_cast<float>(dot) - dmin * mn[j * ROWS + r] * xs[b];
        }
      }
      y[m * N + row0 + r] = acc;
    }
  }
}

// ---- q4k: AVX2 (8 rows of the 16 at a time) ----------------------------------------------------------------

template <int T>
__attribute__((target("avx2,fma,f16c"))) void q4k_tile_avx2(const uint8_t* w, int64_t S, const int8_t* xq,
                                                             int64_t ldq, const float* xd, const float* xs,
                                                             int64_t ldd, float* y, int64_t N, int64_t row0,
                                                             int64_t valid) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  #pragma GCC unroll 16
  for (int h = 0; h < 2; ++h) {
    if (h * 8 >= valid) break;
    __m256 acc[T];
    #pragma GCC unroll 16
    for (int tt = 0; tt < T; ++tt) acc[tt] = _mm256_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
      const uint8_t* blk = w + s * SUPER_BYTES;
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + CODE_BYTES + 16 * h)));
      const __m256 mv =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + CODE_BYTES + 32 + 16 * h)));
      const uint8_t* sc = blk + CODE_BYTES + 4 * ROWS + 8 * h;
      const uint8_t* mn = sc + 8 * ROWS;
      for (int64_t j = 0; j < 8; ++j) {
        __m256i lo[4], hi[4];
        #pragma GCC unroll 16
        for (int t = 0; t < 4; ++t) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + j * 256 + t * 64 + 32 * h));
          lo[t] = _mm256_and_si256(v, low);
          hi[t] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
        const __m256 ws = _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + j * ROWS)))),
            dv);
        const __m256 wm = _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + j * ROWS)))),
            mv);
        const int64_t b = s * 8 + j;
        #pragma GCC unroll 16
        for (int tt = 0; tt < T; ++tt) {
          const int8_t* xb = xq + tt * ldq + b * QK;
          // 8 products of 2 pairs each: |sum| <= 8 * 2 * 15 * 128 < 32768, no saturation
          __m256i p = _mm256_setzero_si256();
          #pragma GCC unroll 16
          for (int t = 0; t < 4; ++t) {
            int32_t xl, xh;
            std::memcpy(&xl, xb + 4 * t, 4);
            std::memcpy(&xh, xb + 16 + 4 * t, 4);
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(lo[t], _mm256_set1_epi32(xl)));
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(hi[t], _mm256_set1_epi32(xh)));
          }
          const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
          acc[tt] = _mm256_fmadd_ps(dot, _mm256_mul_ps(ws, _mm256_set1_ps(xd[tt * ldd + b])), acc[tt]);
          acc[tt] = _mm256_fnmadd_ps(wm, _mm256_set1_ps(xs[tt * ldd + b]), acc[tt]);
        }
      }
    }
    #pragma GCC unroll 16
    for (int tt = 0; tt < T; ++tt) {
      float out[8];
      _mm256_storeu_ps(out, acc[tt]);
      const int64_t n = std::min<int64_t>(8, valid - 8 * h);
      std::memcpy(y + tt * N + row0 + 8 * h, out, n * sizeof(float));
    }
  }
}

// ---- q4k: AVX512-VNNI ------------------------------------------------------------------------------------------

template <int T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma,f16c"))) void q4k_tile_avx512(
    const uint8_t* w, int64_t S, const int8_t* xq, int64_t ldq, const float* xd, const float* xs, int64_t ldd,
    float* y, int64_t N, int64_t row0, int64_t valid) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[T];
  #pragma GCC unroll 16
  for (int tt = 0; tt < T; ++tt) acc[tt] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    const uint8_t* blk = w + s * SUPER_BYTES;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + CODE_BYTES)));
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + CODE_BYTES + 32)));
    const uint8_t* sc = blk + CODE_BYTES + 4 * ROWS;
    const uint8_t* mn = sc + 8 * ROWS;
    for (int64_t j = 0; j < 8; ++j) {
      __m512i lo[4], hi[4];
      #pragma GCC unroll 16
      for (int t = 0; t < 4; ++t) {
        const __m512i v = _mm512_loadu_si512(blk + j * 256 + t * 64);
        lo[t] = _mm512_and_si512(v, low);
        hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      const __m512 ws = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + j * ROWS)))),
          dv);
      const __m512 wm = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + j * ROWS)))),
          mv);
      const int64_t b = s * 8 + j;
      #pragma GCC unroll 16
      for (int tt = 0; tt < T; ++tt) {
        const int8_t* xb = xq + tt * ldq + b * QK;
        __m512i ia = _mm512_setzero_si512(), ib = _mm512_setzero_si512();
        #pragma GCC unroll 16
        for (int t = 0; t < 4; ++t) {
          int32_t xl, xh;
          std::memcpy(&xl, xb + 4 * t, 4);
          std::memcpy(&xh, xb + 16 + 4 * t, 4);
          ia = _mm512_dpbusd_epi32(ia, lo[t], _mm512_set1_epi32(xl));
          ib = _mm512_dpbusd_epi32(ib, hi[t], _mm512_set1_epi32(xh));
        }
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(ia, ib));
        acc[tt] = _mm512_fmadd_ps(dot, _mm512_mul_ps(ws, _mm512_set1_ps(xd[tt * ldd + b])), acc[tt]);
        acc[tt] = _mm512_fnmadd_ps(wm, _mm512_set1_ps(xs[tt * ldd + b]), acc[tt]);
      }
    }
  }
  const __mmask16 mask = valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
  #pragma GCC unroll 16
  for (int tt = 0; tt < T; ++tt) _mm512_mask_storeu_ps(y + tt * N + row0, mask, acc[tt]);
}

// Activation rows a tile shares its unpacked weights with (at most 8; set_tile changes it, for measuring). 8 over 4
// at 512 rows, quiet box (load 0.6), 2 threads: q4k 2-3% faster, q6k 12%, q5 10% (gate+up 17920x1536: 46.7 /
// 57.0 / 49.6 ms against 48.1 / 64.7 / 55.2).
std::atomic<int64_t> tile_tokens{8};

void q4k_group(int64_t isa, const uint8_t* w, int64_t S, const Quantized& a, float* y, int64_t N, int64_t row0,
               int64_t valid) {
  const int64_t M = a.q.size(0), Kp = a.q.size(1), nb = a.d.size(1);
  if (isa == SCALAR) {
    q4k_group_scalar(w, S, a, 0, M, y, N, row0, valid);
    return;
  }
  const int8_t* xq = a.q.data_ptr<int8_t>();
  const float* xd = a.d.data_ptr<float>();
  const float* xs = a.dsum.data_ptr<float>();
  for (int64_t m = 0; m < M;) {
    const int64_t left = M - m;
    const int64_t T = std::min<int64_t>(tile_tokens.load(), left);
    const int8_t* q = xq + m * Kp;
    const float* d = xd + m * nb;
    const float* s = xs + m * nb;
    float* out = y + m * N;
#define ARBOR_Q4K_CASE(n)                                                              \
  case n:                                                                              \
    if (isa == AVX512)                                                                 \
      q4k_tile_avx512<n>(w, S, q, Kp, d, s, nb, out, N, row0, valid);                  \
    else                                                                               \
      q4k_tile_avx2<n>(w, S, q, Kp, d, s, nb, out, N, row0, valid);                    \
    break;
    switch (T) {
      ARBOR_Q4K_CASE(1)
      ARBOR_Q4K_CASE(2)
      ARBOR_Q4K_CASE(3)
      ARBOR_Q4K_CASE(4)
      ARBOR_Q4K_CASE(5)
      ARBOR_Q4K_CASE(6)
      ARBOR_Q4K_CASE(7)
      ARBOR_Q4K_CASE(8)
    }
#undef ARBOR_Q4K_CASE
    m += T;
  }
}

at::Tensor as_float_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.size(-1) == K, "arbor integer kernel: input has ", x.size(-1), " features, the weight ", K);
  return x.reshape({-1, K}).to(at::kFloat).contiguous();
}

// One matmul over a packed layout: x [M, K] float -> [M, n] float32, the activations quantized once, the groups
// of ROWS output rows split over threads, each run by the kind's `group` (its ISA paths inside).
using GroupFn = void (*)(int64_t isa, const uint8_t* w, int64_t blocks, const Quantized& a, float* y, int64_t N,
                         int64_t row0, int64_t valid);

at::Tensor packed_mm(const char* name, const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t block_bytes,
                     int64_t block_inputs, GroupFn group) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == block_bytes &&
                  packed.is_contiguous(),
              "arbor ", name, ": packed must be contiguous uint8 [N/16, K/", block_inputs, ", ", block_bytes, "]");
  const int64_t G = packed.size(0), B = packed.size(1), K = B * block_inputs;
  TORCH_CHECK(n > (G - 1) * ROWS && n <= G * ROWS, "arbor ", name, ": ", n, " rows do not fit ", G, " groups");
  const at::Tensor rows = as_float_rows(x, K);
  const Quantized a = quantize_rows(rows);
  at::Tensor y = at::empty({rows.size(0), n}, at::kFloat);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t isa = current_isa.load();
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      group(isa, w + g * B * block_bytes, B, a, yp, n, g * ROWS, std::min<int64_t>(ROWS, n - g * ROWS));
  });
  return y;
}

at::Tensor q4k_mm(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return packed_mm("q4k_mm", x, packed, n, SUPER_BYTES, SUPER, q4k_group);
}

// ---- q6k: scalar, AVX2, AVX512-VNNI ----------------------------------------------------------------------------

inline int q6k_code(const uint8_t* blk, int64_t j, int64_t r, int64_t k) {  // input 32j + k of row r, 0..63
  const int64_t half = k / 16, t = (k % 16) / 4, i = k % 4;
  const uint8_t* b = blk + j * Q6K_BLOCK_BYTES;
  const int low = half ? b[t * 64 + r * 4 + i] >> 4 : b[t * 64 + r * 4 + i] & 15;
  const int high = (b[256 + half * 64 + r * 4 + i] >> (2 * t)) & 3;
  return low | (high << 4);
}

void q6k_group_scalar(const uint8_t* w, int64_t S, const Quantized& a, float* y, int64_t N, int64_t row0,
                      int64_t valid) {
  const int64_t M = a.q.size(0), Kp = a.q.size(1), nb = a.d.size(1);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = a.q.data_ptr<int8_t>() + m * Kp;
    const float* xd = a.d.data_ptr<float>() + m * nb;
    for (int64_t r = 0; r < valid; ++r) {
      float acc = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        const uint8_t* blk = w + s * Q6K_SUPER_BYTES;
        const float d = c10::detail::fp16_ieee_to_fp32_value(
            reinterpret_cast<const uint16_t*>(blk + Q6K_CODE_BYTES)[r]);
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + Q6K_CODE_BYTES + 2 * ROWS);
        for (int64_t j = 0; j < 8; ++j) {
          const int8_t* xb = xq + (s * 8 + j) * QK;
          float block = 0.f;
          for (int64_t half = 0; half < 2; ++half) {
            int32_t dot = 0;
            for (int64_t k = 16 * half; k < 16 * half + 16; ++k) dot += (q6k_code(blk, j, r, k) - 32) * xb[k];
            block += d * sc[(2 * j + half) * ROWS + r] * static_cast<float>(dot);
          }
          acc += block * xd[s * 8 + j];
        }
      }
      y[m * N + row0 + r] = acc;
    }
  }
}

template <int T>
__attribute__((target("avx2,fma,f16c"))) void q6k_tile_avx2(const uint8_t* w, int64_t S, const int8_t* xq,
                                                             int64_t ldq, const float* xd, const int32_t* s16,
                                                             int64_t ldd, float* y, int64_t N, int64_t row0,
                                                             int64_t valid) {
  const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    if (h * 8 >= valid) break;
    __m256 acc[T];
#pragma GCC unroll 16
    for (int tt = 0; tt < T; ++tt) acc[tt] = _mm256_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
      const uint8_t* blk = w + s * Q6K_SUPER_BYTES;
      const __m256 dv =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + Q6K_CODE_BYTES + 16 * h)));
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + Q6K_CODE_BYTES + 2 * ROWS) + 8 * h;
      for (int64_t j = 0; j < 8; ++j) {
        const uint8_t* b = blk + j * Q6K_BLOCK_BYTES;
        const __m256i h0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 256 + 32 * h));
        const __m256i h1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 320 + 32 * h));
        __m256i lo[4], hi[4];
#pragma GCC unroll 16
        for (int t = 0; t < 4; ++t) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + t * 64 + 32 * h));
          lo[t] = _mm256_or_si256(_mm256_and_si256(v, low),
                                  _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h0, 2 * t), two), 4));
          hi[t] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low),
                                  _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h1, 2 * t), two), 4));
        }
        const __m256 wa = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + 2 * j * ROWS)))),
                                        dv);
        const __m256 wb = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                            reinterpret_cast<const __m128i*>(sc + (2 * j + 1) * ROWS)))),
                                        dv);
        const int64_t b32 = s * 8 + j;
#pragma GCC unroll 16
        for (int tt = 0; tt < T; ++tt) {
          const int8_t* xb = xq + tt * ldq + b32 * QK;
          __m256i ia = _mm256_setzero_si256(), ib = _mm256_setzero_si256();
#pragma GCC unroll 16
          for (int t = 0; t < 4; ++t) {  // |pair sums| <= 2 * 63 * 128: each 4 widened to int32 at once
            int32_t xl, xh;
            std::memcpy(&xl, xb + 4 * t, 4);
            std::memcpy(&xh, xb + 16 + 4 * t, 4);
            ia = _mm256_add_epi32(ia, _mm256_madd_epi16(_mm256_maddubs_epi16(lo[t], _mm256_set1_epi32(xl)), ones));
            ib = _mm256_add_epi32(ib, _mm256_madd_epi16(_mm256_maddubs_epi16(hi[t], _mm256_set1_epi32(xh)), ones));
          }
          ia = _mm256_sub_epi32(ia, _mm256_set1_epi32(32 * s16[tt * 2 * ldd + 2 * b32]));
          ib = _mm256_sub_epi32(ib, _mm256_set1_epi32(32 * s16[tt * 2 * ldd + 2 * b32 + 1]));
          const __m256 blockv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ib), wb, _mm256_mul_ps(_mm256_cvtepi32_ps(ia), wa));
          acc[tt] = _mm256_fmadd_ps(blockv, _mm256_set1_ps(xd[tt * ldd + b32]), acc[tt]);
        }
      }
    }
#pragma GCC unroll 16
    for (int tt = 0; tt < T; ++tt) {
      float out[8];
      _mm256_storeu_ps(out, acc[tt]);
      const int64_t n = std::min<int64_t>(8, valid - 8 * h);
      std::memcpy(y + tt * N + row0 + 8 * h, out, n * sizeof(float));
    }
  }
}

template <int T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma,f16c"))) void q6k_tile_avx512(
    const uint8_t* w, int64_t S, const int8_t* xq, int64_t ldq, const float* xd, const int32_t* s16, int64_t ldd,
    float* y, int64_t N, int64_t row0, int64_t valid) {
  const __m512i low = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(3);
  __m512 acc[T];
#pragma GCC unroll 16
  for (int tt = 0; tt < T; ++tt) acc[tt] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    const uint8_t* blk = w + s * Q6K_SUPER_BYTES;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + Q6K_CODE_BYTES)));
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + Q6K_CODE_BYTES + 2 * ROWS);
    for (int64_t j = 0; j < 8; ++j) {
      const uint8_t* b = blk + j * Q6K_BLOCK_BYTES;
      const __m512i h0 = _mm512_loadu_si512(b + 256);
      const __m512i h1 = _mm512_loadu_si512(b + 320);
      __m512i lo[4], hi[4];
#pragma GCC unroll 16
      for (int t = 0; t < 4; ++t) {
        const __m512i v = _mm512_loadu_si512(b + t * 64);
        lo[t] = _mm512_or_si512(_mm512_and_si512(v, low),
                                _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(h0, 2 * t), two), 4));
        hi[t] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low),
                                _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(h1, 2 * t), two), 4));
      }
      const __m512 wa = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 2 * j * ROWS)))),
          dv);
      const __m512 wb = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                          _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + (2 * j + 1) * ROWS)))),
                                      dv);
      const int64_t b32 = s * 8 + j;
#pragma GCC unroll 16
      for (int tt = 0; tt < T; ++tt) {
        const int8_t* xb = xq + tt * ldq + b32 * QK;
        __m512i ia = _mm512_set1_epi32(-32 * s16[tt * 2 * ldd + 2 * b32]);  // the codes' offset of 32
        __m512i ib = _mm512_set1_epi32(-32 * s16[tt * 2 * ldd + 2 * b32 + 1]);
#pragma GCC unroll 16
        for (int t = 0; t < 4; ++t) {
          int32_t xl, xh;
          std::memcpy(&xl, xb + 4 * t, 4);
          std::memcpy(&xh, xb + 16 + 4 * t, 4);
          ia = _mm512_dpbusd_epi32(ia, lo[t], _mm512_set1_epi32(xl));
          ib = _mm512_dpbusd_epi32(ib, hi[t], _mm512_set1_epi32(xh));
        }
        const __m512 blockv = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ib), wb, _mm512_mul_ps(_mm512_cvtepi32_ps(ia), wa));
        acc[tt] = _mm512_fmadd_ps(blockv, _mm512_set1_ps(xd[tt * ldd + b32]), acc[tt]);
      }
    }
  }
  const __mmask16 mask = valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
#pragma GCC unroll 16
  for (int tt = 0; tt < T; ++tt) _mm512_mask_storeu_ps(y + tt * N + row0, mask, acc[tt]);
}

void q6k_group(int64_t isa, const uint8_t* w, int64_t S, const Quantized& a, float* y, int64_t N, int64_t row0,
               int64_t valid) {
  const int64_t M = a.q.size(0), Kp = a.q.size(1), nb = a.d.size(1);
  if (isa == SCALAR) {
    q6k_group_scalar(w, S, a, y, N, row0, valid);
    return;
  }
  const int8_t* xq = a.q.data_ptr<int8_t>();
  const float* xd = a.d.data_ptr<float>();
  const int32_t* s16 = a.sum16.data_ptr<int32_t>();
  for (int64_t m = 0; m < M;) {
    const int64_t T = std::min<int64_t>(tile_tokens.load(), M - m);
    const int8_t* q = xq + m * Kp;
    const float* d = xd + m * nb;
    const int32_t* s = s16 + m * 2 * nb;
    float* out = y + m * N;
#define ARBOR_Q6K_CASE(n)                                             \
  case n:                                                             \
    if (isa == AVX512)                                                \
      q6k_tile_avx512<n>(w, S, q, Kp, d, s, nb, out, N, row0, valid); \
    else                                                              \
      q6k_tile_avx2<n>(w, S, q, Kp, d, s, nb, out, N, row0, valid);   \
    break;
    switch (T) {
      ARBOR_Q6K_CASE(1)
      ARBOR_Q6K_CASE(2)
      ARBOR_Q6K_CASE(3)
      ARBOR_Q6K_CASE(4)
      ARBOR_Q6K_CASE(5)
      ARBOR_Q6K_CASE(6)
      ARBOR_Q6K_CASE(7)
      ARBOR_Q6K_CASE(8)
    }
#undef ARBOR_Q6K_CASE
    m += T;
  }
}

at::Tensor q6k_mm(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return packed_mm("q6k_mm", x, packed, n, Q6K_SUPER_BYTES, SUPER, q6k_group);
}

// ---- q8: scalar, AVX2, AVX512-VNNI -----------------------------------------------------------------------------

void q8_group_scalar(const uint8_t* w, int64_t B, const Quantized& a, float* y, int64_t N, int64_t row0,
                     int64_t valid) {
  const int64_t M = a.q.size(0), Kp = a.q.size(1), nb = a.d.size(1);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = a.q.data_ptr<int8_t>() + m * Kp;
    const float* xd = a.d.data_ptr<float>() + m * nb;
    for (int64_t r = 0; r < valid; ++r) {
      float acc = 0.f;
      for (int64_t b = 0; b < B; ++b) {
        const uint8_t* blk = w + b * Q8_BLOCK_BYTES;
        const int8_t* codes = reinterpret_cast<const int8_t*>(blk);
        int32_t dot = 0;
        for (int64_t t = 0; t < 8; ++t)
          for (int64_t i = 0; i < 4; ++i) dot += codes[t * 64 + r * 4 + i] * xq[b * QK + 4 * t + i];
        const float d = c10::detail::fp16_ieee_to_fp32_value(reinterpret_cast<const uint16_t*>(blk + QK * ROWS)[r]);
        acc += d * xd[b] * static_cast<float>(dot);
      }
      y[m * N + row0 + r] = acc;
    }
  }
}

template <int T>
__attribute__((target("avx2,fma,f16c"))) void q8_tile_avx2(const uint8_t* w, int64_t B, const int8_t* xq,
                                                            int64_t ldq, const float* xd, int64_t ldd, float* y,
                                                            int64_t N, int64_t row0, int64_t valid) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    if (h * 8 >= valid) break;
    __m256 acc[T];
#pragma GCC unroll 16
    for (int tt = 0; tt < T; ++tt) acc[tt] = _mm256_setzero_ps();
    for (int64_t b = 0; b < B; ++b) {
      const uint8_t* blk = w + b * Q8_BLOCK_BYTES;
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + QK * ROWS + 16 * h)));
      __m256i wv[8], wa[8];
#pragma GCC unroll 16
      for (int t = 0; t < 8; ++t) {
        wv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + t * 64 + 32 * h));
        wa[t] = _mm256_sign_epi8(wv[t], wv[t]);
      }
#pragma GCC unroll 16
      for (int tt = 0; tt < T; ++tt) {
        const int8_t* xb = xq + tt * ldq + b * QK;
        __m256i ia = _mm256_setzero_si256();
#pragma GCC unroll 16
        for (int t = 0; t < 8; ++t) {  // |w| x x in u8 x s8 pairs: <= 2 * 127 * 128, no saturation
          int32_t x4;
          std::memcpy(&x4, xb + 4 * t, 4);
          const __m256i p = _mm256_maddubs_epi16(wa[t], _mm256_sign_epi8(_mm256_set1_epi32(x4), wv[t]));
          ia = _mm256_add_epi32(ia, _mm256_madd_epi16(p, ones));
        }
        acc[tt] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia), _mm256_mul_ps(dv, _mm256_set1_ps(xd[tt * ldd + b])),
                                  acc[tt]);
      }
    }
#pragma GCC unroll 16
    for (int tt = 0; tt < T; ++tt) {
      float out[8];
      _mm256_storeu_ps(out, acc[tt]);
      const int64_t n = std::min<int64_t>(8, valid - 8 * h);
      std::memcpy(y + tt * N + row0 + 8 * h, out, n * sizeof(float));
    }
  }
}

template <int T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma,f16c"))) void q8_tile_avx512(
    const uint8_t* w, int64_t B, const int8_t* xq, int64_t ldq, const float* xd, const int32_t* s16, int64_t ldd,
    float* y, int64_t N, int64_t row0, int64_t valid) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[T];
#pragma GCC unroll 16
  for (int tt = 0; tt < T; ++tt) acc[tt] = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* blk = w + b * Q8_BLOCK_BYTES;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + QK * ROWS)));
    __m512i wv[8];
#pragma GCC unroll 16
    for (int t = 0; t < 8; ++t) wv[t] = _mm512_xor_si512(_mm512_loadu_si512(blk + t * 64), flip);  // q + 128
#pragma GCC unroll 16
    for (int tt = 0; tt < T; ++tt) {
      const int8_t* xb = xq + tt * ldq + b * QK;
      __m512i ia = _mm512_set1_epi32(-128 * (s16[tt * 2 * ldd + 2 * b] + s16[tt * 2 * ldd + 2 * b + 1]));
#pragma GCC unroll 16
      for (int t = 0; t < 8; ++t) {
        int32_t x4;
        std::memcpy(&x4, xb + 4 * t, 4);
        ia = _mm512_dpbusd_epi32(ia, wv[t], _mm512_set1_epi32(x4));
      }
      acc[tt] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia), _mm512_mul_ps(dv, _mm512_set1_ps(xd[tt * ldd + b])), acc[tt]);
    }
  }
  const __mmask16 mask = valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
#pragma GCC unroll 16
  for (int tt = 0; tt < T; ++tt) _mm512_mask_storeu_ps(y + tt * N + row0, mask, acc[tt]);
}

void q8_group(int64_t isa, const uint8_t* w, int64_t B, const Quantized& a, float* y, int64_t N, int64_t row0,
              int64_t valid) {
  const int64_t M = a.q.size(0), Kp = a.q.size(1), nb = a.d.size(1);
  if (isa == SCALAR) {
    q8_group_scalar(w, B, a, y, N, row0, valid);
    return;
  }
  const int8_t* xq = a.q.data_ptr<int8_t>();
  const float* xd = a.d.data_ptr<float>();
  const int32_t* s16 = a.sum16.data_ptr<int32_t>();
  for (int64_t m = 0; m < M;) {
    const int64_t T = std::min<int64_t>(tile_tokens.load(), M - m);
    const int8_t* q = xq + m * Kp;
    const float* d = xd + m * nb;
    const int32_t* s = s16 + m * 2 * nb;
    float* out = y + m * N;
#define ARBOR_Q8_CASE(n)                                             \
  case n:                                                            \
    if (isa == AVX512)                                               \
      q8_tile_avx512<n>(w, B, q, Kp, d, s, nb, out, N, row0, valid); \
    else                                                             \
      q8_tile_avx2<n>(w, B, q, Kp, d, nb, out, N, row0, valid);      \
    break;
    switch (T) {
      ARBOR_Q8_CASE(1)
      ARBOR_Q8_CASE(2)
      ARBOR_Q8_CASE(3)
      ARBOR_Q8_CASE(4)
      ARBOR_Q8_CASE(5)
      ARBOR_Q8_CASE(6)
      ARBOR_Q8_CASE(7)
      ARBOR_Q8_CASE(8)
    }
#undef ARBOR_Q8_CASE
    m += T;
  }
}

at::Tensor q8_mm(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return packed_mm("q8_mm", x, packed, n, Q8_BLOCK_BYTES, QK, q8_group);
}

// ---- q5: scalar, AVX2, AVX512-VNNI -----------------------------------------------------------------------------

void q5_group_scalar(const uint8_t* w, int64_t B, const Quantized& a, float* y, int64_t N, int64_t row0,
                     int64_t valid) {
  const int64_t M = a.q.size(0), Kp = a.q.size(1), nb = a.d.size(1);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = a.q.data_ptr<int8_t>() + m * Kp;
    const float* xd = a.d.data_ptr<float>() + m * nb;
    for (int64_t r = 0; r < valid; ++r) {
      float acc = 0.f;
      for (int64_t b = 0; b < B; ++b) {
        const uint8_t* blk = w + b * Q5_BLOCK_BYTES;
        int32_t dot = 0;
        for (int64_t t = 0; t < 4; ++t)
          for (int64_t i = 0; i < 4; ++i) {
            const uint8_t byte = blk[t * 64 + r * 4 + i], high = blk[256 + r * 4 + i];
            const int lo = (byte & 15) | (((high >> t) & 1) << 4), hi = (byte >> 4) | (((high >> (4 + t)) & 1) << 4);
            dot += (lo - 16) * xq[b * QK + 4 * t + i] + (hi - 16) * xq[b * QK + 16 + 4 * t + i];
          }
        const float d = c10::detail::fp16_ieee_to_fp32_value(reinterpret_cast<const uint16_t*>(blk + 320)[r]);
        acc += d * xd[b] * static_cast<float>(dot);
      }
      y[m * N + row0 + r] = acc;
    }
  }
}

template <int T>
__attribute__((target("avx2,fma,f16c"))) void q5_tile_avx2(const uint8_t* w, int64_t B, const int8_t* xq,
                                                            int64_t ldq, const float* xd, const int32_t* s16,
                                                            int64_t ldd, float* y, int64_t N, int64_t row0,
                                                            int64_t valid) {
  const __m256i low = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    if (h * 8 >= valid) break;
    __m256 acc[T];
#pragma GCC unroll 16
    for (int tt = 0; tt < T; ++tt) acc[tt] = _mm256_setzero_ps();
    for (int64_t b = 0; b < B; ++b) {
      const uint8_t* blk = w + b * Q5_BLOCK_BYTES;
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 320 + 16 * h)));
      const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 256 + 32 * h));
      __m256i lo[4], hi[4];
#pragma GCC unroll 16
      for (int t = 0; t < 4; ++t) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + t * 64 + 32 * h));
        lo[t] = _mm256_or_si256(_mm256_and_si256(v, low),
                                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, t), one), 4));
        hi[t] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low),
                                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4 + t), one), 4));
      }
#pragma GCC unroll 16
      for (int tt = 0; tt < T; ++tt) {
        const int8_t* xb = xq + tt * ldq + b * QK;
        __m256i pl = _mm256_setzero_si256(), ph = _mm256_setzero_si256();
#pragma GCC unroll 16
        for (int t = 0; t < 4; ++t) {  // 4 pair sums of 31 x 128: below 32768
          int32_t xl, xh;
          std::memcpy(&xl, xb + 4 * t, 4);
          std::memcpy(&xh, xb + 16 + 4 * t, 4);
          pl = _mm256_add_epi16(pl, _mm256_maddubs_epi16(lo[t], _mm256_set1_epi32(xl)));
          ph = _mm256_add_epi16(ph, _mm256_maddubs_epi16(hi[t], _mm256_set1_epi32(xh)));
        }
        __m256i ia = _mm256_add_epi32(_mm256_madd_epi16(pl, ones), _mm256_madd_epi16(ph, ones));
        ia = _mm256_sub_epi32(ia, _mm256_set1_epi32(16 * (s16[tt * 2 * ldd + 2 * b] + s16[tt * 2 * ldd + 2 * b + 1])));
        acc[tt] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia), _mm256_mul_ps(dv, _mm256_set1_ps(xd[tt * ldd + b])),
                                  acc[tt]);
      }
    }
#pragma GCC unroll 16
    for (int tt = 0; tt < T; ++tt) {
      float out[8];
      _mm256_storeu_ps(out, acc[tt]);
      const int64_t n = std::min<int64_t>(8, valid - 8 * h);
      std::memcpy(y + tt * N + row0 + 8 * h, out, n * sizeof(float));
    }
  }
}

template <int T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma,f16c"))) void q5_tile_avx512(
    const uint8_t* w, int64_t B, const int8_t* xq, int64_t ldq, const float* xd, const int32_t* s16, int64_t ldd,
    float* y, int64_t N, int64_t row0, int64_t valid) {
  const __m512i low = _mm512_set1_epi8(0x0F), one = _mm512_set1_epi8(1);
  __m512 acc[T];
#pragma GCC unroll 16
  for (int tt = 0; tt < T; ++tt) acc[tt] = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* blk = w + b * Q5_BLOCK_BYTES;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 320)));
    const __m512i hb = _mm512_loadu_si512(blk + 256);
    __m512i lo[4], hi[4];
#pragma GCC unroll 16
    for (int t = 0; t < 4; ++t) {
      const __m512i v = _mm512_loadu_si512(blk + t * 64);
      lo[t] = _mm512_or_si512(_mm512_and_si512(v, low),
                              _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hb, t), one), 4));
      hi[t] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low),
                              _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hb, 4 + t), one), 4));
    }
#pragma GCC unroll 16
    for (int tt = 0; tt < T; ++tt) {
      const int8_t* xb = xq + tt * ldq + b * QK;
      __m512i ia = _mm512_set1_epi32(-16 * (s16[tt * 2 * ldd + 2 * b] + s16[tt * 2 * ldd + 2 * b + 1]));
      __m512i ib = _mm512_setzero_si512();
#pragma GCC unroll 16
      for (int t = 0; t < 4; ++t) {
        int32_t xl, xh;
        std::memcpy(&xl, xb + 4 * t, 4);
        std::memcpy(&xh, xb + 16 + 4 * t, 4);
        ia = _mm512_dpbusd_epi32(ia, lo[t], _mm512_set1_epi32(xl));
        ib = _mm512_dpbusd_epi32(ib, hi[t], _mm512_set1_epi32(xh));
      }
      acc[tt] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(ia, ib)),
                                _mm512_mul_ps(dv, _mm512_set1_ps(xd[tt * ldd + b])), acc[tt]);
    }
  }
  const __mmask16 mask = valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
#pragma GCC unroll 16
  for (int tt = 0; tt < T; ++tt) _mm512_mask_storeu_ps(y + tt * N + row0, mask, acc[tt]);
}

void q5_group(int64_t isa, const uint8_t* w, int64_t B, const Quantized& a, float* y, int64_t N, int64_t row0,
              int64_t valid) {
  const int64_t M = a.q.size(0), Kp = a.q.size(1), nb = a.d.size(1);
  if (isa == SCALAR) {
    q5_group_scalar(w, B, a, y, N, row0, valid);
    return;
  }
  const int8_t* xq = a.q.data_ptr<int8_t>();
  const float* xd = a.d.data_ptr<float>();
  const int32_t* s16 = a.sum16.data_ptr<int32_t>();
  for (int64_t m = 0; m < M;) {
    const int64_t T = std::min<int64_t>(tile_tokens.load(), M - m);
    const int8_t* q = xq + m * Kp;
    const float* d = xd + m * nb;
    const int32_t* s = s16 + m * 2 * nb;
    float* out = y + m * N;
#define ARBOR_Q5_CASE(n)                                             \
  case n:                                                            \
    if (isa == AVX512)                                               \
      q5_tile_avx512<n>(w, B, q, Kp, d, s, nb, out, N, row0, valid); \
    else                                                             \
      q5_tile_avx2<n>(w, B, q, Kp, d, s, nb, out, N, row0, valid);   \
    break;
    switch (T) {
      ARBOR_Q5_CASE(1)
      ARBOR_Q5_CASE(2)
      ARBOR_Q5_CASE(3)
      ARBOR_Q5_CASE(4)
      ARBOR_Q5_CASE(5)
      ARBOR_Q5_CASE(6)
      ARBOR_Q5_CASE(7)
      ARBOR_Q5_CASE(8)
    }
#undef ARBOR_Q5_CASE
    m += T;
  }
}

at::Tensor q5_mm(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return packed_mm("q5_mm", x, packed, n, Q5_BLOCK_BYTES, QK, q5_group);
}

// ---- rows of the layouts as float32 (an embedding's lookup) ---------------------------------------------------

enum Layout : int64_t { LAYOUT_Q4K = 0, LAYOUT_Q5 = 1, LAYOUT_Q6K = 2, LAYOUT_Q8 = 3 };

float half_at(const uint8_t* p, int64_t i) {
  return c10::detail::fp16_ieee_to_fp32_value(reinterpret_cast<const uint16_t*>(p)[i]);
}

// Row r (of 16) of one group, K inputs, as the file's float32 values: the products formed as gguf forms them.
void group_row(int64_t layout, const uint8_t* g, int64_t K, int64_t r, float* out) {
  if (layout == LAYOUT_Q4K || layout == LAYOUT_Q6K) {
    for (int64_t s = 0; s < K / SUPER; ++s) {
      if (layout == LAYOUT_Q4K) {
        const uint8_t* blk = g + s * SUPER_BYTES;
        const float d = half_at(blk + CODE_BYTES, r), dmin = half_at(blk + CODE_BYTES, ROWS + r);
        const uint8_t* sc = blk + CODE_BYTES + 4 * ROWS;
        for (int64_t j = 0; j < 8; ++j) {
          const float scale = d * static_cast<float>(sc[j * ROWS + r]), low = dmin * static_cast<float>(sc[(8 + j) * ROWS + r]);
          for (int64_t k = 0; k < QK; ++k) {
            const uint8_t byte = blk[j * 256 + (k % 16) / 4 * 64 + r * 4 + k % 4];
            const int q = k < 16 ? byte & 15 : byte >> 4;
            out[s * SUPER + j * QK + k] = scale * static_cast<float>(q) - low;
          }
        }
      } else {
        const uint8_t* blk = g + s * Q6K_SUPER_BYTES;
        const float d = half_at(blk + Q6K_CODE_BYTES, r);
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + Q6K_CODE_BYTES + 2 * ROWS);
        for (int64_t j = 0; j < 8; ++j)
          for (int64_t k = 0; k < QK; ++k) {
            const float scale = d * static_cast<float>(sc[(2 * j + k / 16) * ROWS + r]);
            out[s * SUPER + j * QK + k] = scale * static_cast<float>(q6k_code(blk, j, r, k) - 32);
          }
      }
    }
    return;
  }
  const int64_t bytes = layout == LAYOUT_Q5 ? Q5_BLOCK_BYTES : Q8_BLOCK_BYTES;
  for (int64_t b = 0; b < K / QK; ++b) {
    const uint8_t* blk = g + b * bytes;
    const float d = half_at(blk + (layout == LAYOUT_Q5 ? 320 : QK * ROWS), r);
    for (int64_t k = 0; k < QK; ++k) {
      int q;
      if (layout == LAYOUT_Q5) {
        const int64_t t = (k % 16) / 4, i = k % 4;
        const uint8_t byte = blk[t * 64 + r * 4 + i], high = blk[256 + r * 4 + i];
        q = k < 16 ? ((byte & 15) | (((high >> t) & 1) << 4)) : ((byte >> 4) | (((high >> (4 + t)) & 1) << 4));
        q -= 16;
      } else {
        q = reinterpret_cast<const int8_t*>(blk)[(k / 4) * 64 + r * 4 + k % 4];
      }
      out[b * QK + k] = d * static_cast<float>(q);
    }
  }
}

at::Tensor packed_rows(const at::Tensor& packed, int64_t layout, const at::Tensor& tokens) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "arbor packed_rows: packed must be contiguous uint8 [groups, blocks, bytes]");
  const int64_t per_block = layout == LAYOUT_Q4K || layout == LAYOUT_Q6K ? SUPER : QK;
  const int64_t G = packed.size(0), K = packed.size(1) * per_block, group_bytes = packed.size(1) * packed.size(2);
  const at::Tensor ids = tokens.reshape({-1}).to(at::kLong).contiguous();
  const int64_t T = ids.numel();
  at::Tensor out = at::empty({T, K}, at::kFloat);
  const int64_t* ip = ids.data_ptr<int64_t>();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(ip[t] >= 0 && ip[t] < G * ROWS, "arbor packed_rows: row ", ip[t], " out of range");
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) group_row(layout, w + (ip[t] / ROWS) * group_bytes, K, ip[t] % ROWS, op + t * K);
  });
  return out;
}

// ---- i8: int8 rows, one scale per row ------------------------------------------------------------------------

float scale_at(const at::Tensor& scale, int64_t n) {
  if (scale.scalar_type() == at::kBFloat16) return static_cast<float>(scale.data_ptr<c10::BFloat16>()[n]);
  if (scale.scalar_type() == at::kHalf) return static_cast<float>(scale.data_ptr<c10::Half>()[n]);
  return scale.data_ptr<float>()[n];
}

void i8_rows_scalar(const int8_t* w, int64_t K, const Quantized& a, int64_t n0, int64_t n1, const float* scales,
                    float* y, int64_t N) {
  const int64_t M = a.q.size(0), Kp = a.q.size(1), nb = a.d.size(1);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = a.q.data_ptr<int8_t>() + m * Kp;
    const float* xd = a.d.data_ptr<float>() + m * nb;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = w + n * K;
      float acc = 0.f;
      for (int64_t b = 0; b * QK < K; ++b) {
        int32_t dot = 0;
        for (int64_t i = 0; i < QK; ++i) dot += row[b * QK + i] * xq[b * QK + i];
        acc += xd[b] * static_cast<float>(dot);
      }
      y[m * N + n] = scales[n] * acc;
    }
  }
}

// A tile: I8_ROWS weight rows x I8_TOKENS activation rows. One activation row (decode) reads one weight row at a
// time: 4 rows' interleaved streams ran at half the speed from memory (151936x1536: 9 against 18-20 GB/s, one
// thread), and software prefetching made both slower.
constexpr int I8_ROWS = 4, I8_TOKENS = 4;

template <int R, int T>
__attribute__((target("avx2,fma"))) void i8_tile_avx2(const int8_t* w, int64_t K, const int8_t* xq, int64_t ldq,
                                                       const float* xd, int64_t ldd, const float* scales, float* y,
                                                       int64_t N) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][T];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b * QK < K; ++b) {
    __m256i wv[R], wa[R];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + b * QK));
      wa[r] = _mm256_sign_epi8(wv[r], wv[r]);  // |w| <= 127: u8 x s8 pairs stay below 32768
    }
    #pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + t * ldq + b * QK));
      const __m256 dx = _mm256_set1_ps(xd[t * ldd + b]);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wa[r], _mm256_sign_epi8(xv, wv[r])), ones);
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dx, acc[r][t]);
      }
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]), _mm256_extractf128_ps(acc[r][t], 1));
      v = _mm_add_ps(v, _mm_movehl_ps(v, v));
      v = _mm_add_ss(v, _mm_movehdup_ps(v));
      y[t * N + r] = scales[r] * _mm_cvtss_f32(v);
    }
}

template <int R, int T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma"))) void i8_tile_avx512(
    const int8_t* w, int64_t K, const int8_t* xq, int64_t ldq, const float* dexp, int64_t lde, const float* corr,
    const float* scales, float* y, int64_t N) {
  // dpbusd multiplies unsigned by signed bytes: the weights go in as w + 128 (xor 0x80) and 128 * sum(qx) is
  // taken off once per row (corr = sum over blocks of dx * sum(qx)); the sums are exact in int32.
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R][T];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t chunks = K / 64;
  for (int64_t c = 0; c <= chunks; ++c) {
    if (c == chunks && K % 64 == 0) break;
    __m512i wv[R];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const int8_t* src = w + r * K + c * 64;
      const __m512i v = c < chunks ? _mm512_loadu_si512(src) : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, src);
      wv[r] = _mm512_xor_si512(v, flip);  // the tail's missing bytes become 128 against zero activations
    }
    #pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const __m512i xv = _mm512_loadu_si512(xq + t * ldq + c * 64);
      const __m512 dx = _mm512_loadu_ps(dexp + t * lde + c * 16);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[r], xv)), dx,
                                    acc[r][t]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int t = 0; t < T; ++t) y[t * N + r] = scales[r] * (_mm512_reduce_add_ps(acc[r][t]) - 128.f * corr[t]);
}


at::Tensor i8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "arbor i8_mm: q must be int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(K % QK == 0, "arbor i8_mm: K must be a multiple of 32, got ", K);
  TORCH_CHECK(scale.numel() == N, "arbor i8_mm: one scale per row");
  const at::Tensor rows = as_float_rows(x, K);
  const Quantized a = quantize_rows(rows);
  const int64_t M = rows.size(0), Kp = a.q.size(1), nb = a.d.size(1);
  at::Tensor scales = scale.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, at::kFloat);
  const int8_t* w = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t isa = current_isa.load();
  if (isa == SCALAR) {
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { i8_rows_scalar(w, K, a, n0, n1, sp, yp, N); });
    return y;
  }
  const int8_t* xq = a.q.data_ptr<int8_t>();
  const float* xd = a.d.data_ptr<float>();
  at::Tensor dexp, corr;
  if (isa == AVX512) {  // each block's scale over its 8 lanes of a 64-input dot product; the offset's correction
    dexp = at::empty({M, Kp / 64, 16}, at::kFloat);
    corr = at::empty({M}, at::kFloat);
    float* ep = dexp.data_ptr<float>();
    float* cp = corr.data_ptr<float>();
    const float* ds = a.dsum.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      float c = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        for (int i = 0; i < 8; ++i) ep[m * nb * 8 + b * 8 + i] = xd[m * nb + b];
        c += ds[m * nb + b];
      }
      cp[m] = c;
    }
  }
  const int64_t rows_per_tile = M < I8_TOKENS ? 1 : I8_ROWS;
  const int64_t tiles = (N + rows_per_tile - 1) / rows_per_tile;
  at::parallel_for(0, tiles, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i * rows_per_tile, R = std::min<int64_t>(rows_per_tile, N - n);
      for (int64_t m = 0; m < M;) {
        const int64_t T = std::min<int64_t>(I8_TOKENS, M - m);
        const int8_t* wr = w + n * K;
        const int8_t* xr = xq + m * Kp;
        float* out = yp + m * N + n;
        if (isa == AVX512) {
          const float* e = dexp.data_ptr<float>() + m * nb * 8;
          const float* c = corr.data_ptr<float>() + m;
#define ARBOR_I8_CASE(r, t) \
  if (R == r && T == t) i8_tile_avx512<r, t>(wr, K, xr, Kp, e, nb * 8, c, sp + n, out, N);
          ARBOR_I8_CASE(4, 4) else ARBOR_I8_CASE(4, 3) else ARBOR_I8_CASE(4, 2) else ARBOR_I8_CASE(4, 1)
          else ARBOR_I8_CASE(3, 4) else ARBOR_I8_CASE(3, 3) else ARBOR_I8_CASE(3, 2) else ARBOR_I8_CASE(3, 1)
          else ARBOR_I8_CASE(2, 4) else ARBOR_I8_CASE(2, 3) else ARBOR_I8_CASE(2, 2) else ARBOR_I8_CASE(2, 1)
          else ARBOR_I8_CASE(1, 4) else ARBOR_I8_CASE(1, 3) else ARBOR_I8_CASE(1, 2) else ARBOR_I8_CASE(1, 1)
#undef ARBOR_I8_CASE
        } else {
          const float* d = xd + m * nb;
#define ARBOR_I8_CASE(r, t) \
  if (R == r && T == t) i8_tile_avx2<r, t>(wr, K, xr, Kp, d, nb, sp + n, out, N);
          ARBOR_I8_CASE(4, 4) else ARBOR_I8_CASE(4, 3) else ARBOR_I8_CASE(4, 2) else ARBOR_I8_CASE(4, 1)
          else ARBOR_I8_CASE(3, 4) else ARBOR_I8_CASE(3, 3) else ARBOR_I8_CASE(3, 2) else ARBOR_I8_CASE(3, 1)
          else ARBOR_I8_CASE(2, 4) else ARBOR_I8_CASE(2, 3) else ARBOR_I8_CASE(2, 2) else ARBOR_I8_CASE(2, 1)
          else ARBOR_I8_CASE(1, 4) else ARBOR_I8_CASE(1, 3) else ARBOR_I8_CASE(1, 2) else ARBOR_I8_CASE(1, 1)
#undef ARBOR_I8_CASE
        }
        m += T;
      }
    }
  });
  return y;
}

int64_t set_tile(int64_t tokens) {
  if (tokens >= 1 && tokens <= 8) tile_tokens.store(tokens);
  return tile_tokens.load();
}

int64_t set_isa(int64_t isa) {
  // -1: report the ISA in use; otherwise use min(isa, the best this CPU has) and report it
  if (isa >= 0) current_isa.store(std::min<int64_t>(isa, best_isa()));
  return current_isa.load();
}

}  // namespace

TORCH_LIBRARY(arbor, m) {
  m.def("q4k_mm(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("q6k_mm(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("q5_mm(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("i8_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("packed_rows(Tensor packed, int layout, Tensor tokens) -> Tensor");
  m.def("set_isa(int isa) -> int", &set_isa);
  m.def("set_tile(int tokens) -> int", &set_tile);
}

TORCH_LIBRARY_IMPL(arbor, CPU, m) {
  m.impl("q4k_mm", &q4k_mm);
  m.impl("q6k_mm", &q6k_mm);
  m.impl("q8_mm", &q8_mm);
  m.impl("q5_mm", &q5_mm);
  m.impl("i8_mm", &i8_mm);
  m.impl("packed_rows", &packed_rows);
}
