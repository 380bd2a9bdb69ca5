// A decoder layer's pointwise steps, fp32, AVX2 + FMA (loaded with ctypes by
// backends/cpu_pointwise.py; the CPU path of decoder.py's PackedDecoder).
//
// What: the ops between a Llama layer's matmuls, each in ONE call instead of 4-8 PyTorch ops (each
// a dispatch, an allocation and a pass over memory; ~10 us apiece on a 2-core Zen 3, ~8% of a
// 5-row packed forward's time):
//   add_rms_norm  h += a (in place; skipped when a is null), then out = w * (h * rsqrt(mean(h^2) + eps))
//                 (RMSNorm, Zhang & Sennrich 2019, eq. 4, with the residual add before it fused in:
//                 vLLM's fused_add_rms_norm)
//   rope          out = x * cos + roll(x, D/2) * sin_signed, sin_signed = [-sin1, sin2]: the rotary
//                 embedding in the rotate-half layout (RoFormer, Su et al. 2021, eq. 34), as decoder.py
//   silu_mul      g = silu(g) * u = g / (1 + e^-g) * u (SwiGLU, Shazeer 2020, eq. 6)
// Every row is computed the same way whatever the rows around it and the team's size (each row's
// sum by one thread in a fixed order): a packed call's outputs do not depend on its company.
// Compiled with -ffp-contract=off: rope's multiply-multiply-add rounds like PyTorch's three ops,
// so it is bit for bit theirs. RMSNorm's mean sums in another order and silu's e^x is a polynomial
// (below) where PyTorch uses Sleef: those differ from PyTorch's by float rounding (a few ulp).
#include <immintrin.h>
#include <omp.h>

#include "avx2_math.h"

#include <cmath>
#include <cstdint>

namespace {

// floats per call below which one thread runs it (a team's wake-up costs more): silu's e^x and division
// are worth a team from fewer floats than the norm's and rope's few operations per float
constexpr int64_t TEAM_WORK = 1 << 18, TEAM_WORK_SILU = 1 << 15;

using pml::exp256;   // (x clamped to [-87.3, 88.3]: beyond it silu's result is the same to ~1e-38)
using pml::hsum;

inline __m256 silu_mul8(__m256 g, __m256 u) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), u);
}

}  // namespace

extern "C" {

// h [rows, d] (d a multiple of 8), a [rows, d] or null, w [d] -> h += a; out [rows, d]
void pml_add_rms_norm(float* h, const float* a, const float* w, float eps, float* out, int64_t rows, int64_t d) {
#pragma omp parallel for schedule(static) if (rows * d >= TEAM_WORK)
    for (int64_t r = 0; r < rows; ++r) {
        float* x = h + r * d;
        __m256 ss = _mm256_setzero_ps();
        for (int64_t j = 0; j < d; j += 8) {
            __m256 v = _mm256_loadu_ps(x + j);
            if (a) {
                v = _mm256_add_ps(v, _mm256_loadu_ps(a + r * d + j));
                _mm256_storeu_ps(x + j, v);
            }
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        const float var = hsum(ss) / static_cast<float>(d);
        const __m256 inv = _mm256_set1_ps(1.f / std::sqrt(var + eps));   // PyTorch's rsqrt: 1 / sqrt
        float* y = out + r * d;
        for (int64_t j = 0; j < d; j += 8)
            _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_loadu_ps(w + j), _mm256_mul_ps(_mm256_loadu_ps(x + j), inv)));
    }
}

// x: rows of `heads` vectors of D floats (D a multiple of 16), vector (r, h) at x + r * x_row + h * D;
// cos, sin [rows, D] -> out [rows, heads, D]
void pml_rope(const float* x, int64_t x_row, int64_t heads, int64_t D, const float* cos, const float* sin,
              float* out, int64_t rows) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) if (rows * heads * D >= TEAM_WORK)
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t h = 0; h < heads; ++h) {
            const float* v = x + r * x_row + h * D;
            float* y = out + (r * heads + h) * D;
            for (int64_t j = 0; j < D; j += 8) {
                const int64_t k = j < half ? j + half : j - half;      // roll(x, D/2)[j] = x[j - D/2 mod D]
                const __m256 a = _mm256_mul_ps(_mm256_loadu_ps(v + j), _mm256_loadu_ps(cos + r * D + j));
                const __m256 b = _mm256_mul_ps(_mm256_loadu_ps(v + k), _mm256_loadu_ps(sin + r * D + j));
                _mm256_storeu_ps(y + j, _mm256_add_ps(a, b));
            }
        }
}

// g, u [n] -> g = silu(g) * u
void pml_silu_mul(float* g, const float* u, int64_t n) {
    const int64_t blocks = (n + 1023) / 1024;
#pragma omp parallel for schedule(static) if (n >= TEAM_WORK_SILU)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t end = (b + 1) * 1024 < n ? (b + 1) * 1024 : n;
        int64_t i = b * 1024;
        for (; i + 8 <= end; i += 8) _mm256_storeu_ps(g + i, silu_mul8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
        if (i < end) {                                                   // the last < 8: through a buffer
            alignas(32) float gb[8] = {0}, ub[8] = {0};
            for (int64_t t = i; t < end; ++t) gb[t - i] = g[t], ub[t - i] = u[t];
            _mm256_store_ps(gb, silu_mul8(_mm256_load_ps(gb), _mm256_load_ps(ub)));
            for (int64_t t = i; t < end; ++t) g[t] = gb[t - i];
        }
    }
}

}  // extern "C"
