// y = x W^T + b for fp32 on x86 CPUs with AVX-512F (backends/avx512.py loads this with ctypes).
//
// The AVX2 kernel (avx2_linear.cpp) with zmm registers: where the CPU has AVX-512, a decoding
// step's rows past ~8 are bound by arithmetic, not by reading the weights, and 16-wide FMAs do
// twice the work of 8-wide ones (docs/bench/avx512_linear.md has the measurements).
//
// Layout: W [N, K] is packed once into panels of NR = 32 output columns, P[N/NR][K][NR] (the last
// panel zero-padded), so a panel is one contiguous stream (two cache lines per k). x is copied
// per call into blocks of MB = 12 rows, [K][MB]. The micro-kernel computes a 12 x 32 tile of y in
// 24 zmm registers: per k, 2 loads of W, 12 broadcasts of x (memory operands of the FMAs), 24
// FMAs (the 32 x 12 tile of BLIS's and oneDNN's own AVX-512 sgemm kernels). OpenMP splits the
// panels among the calling thread's team in PyTorch's OpenMP runtime (panel_linear.h, shared
// with avx2_linear.cpp).
#include <immintrin.h>

#include <cstdint>

#include "panel_linear.h"

namespace {

constexpr int NR = 32;  // output columns per panel (two zmm registers)
constexpr int MB = 12;  // rows per block of x (24 accumulators + 2 weights of 32 zmm)

struct Tile {  // y's MR x NR tile at one panel (panel_linear.h)
template <int MR>
static inline void run(const float* __restrict xb, const float* __restrict p, int64_t K, const float* __restrict bias,
                       float* __restrict y, int64_t ldy, int ncols) {
    // columns 0-15 and 16-31 that exist (a panel cut short writes only those)
    const __mmask16 lo = ncols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << ncols) - 1);
    const __mmask16 hi = ncols >= 32 ? __mmask16(0xFFFF) : ncols <= 16 ? __mmask16(0) : __mmask16((1u << (ncols - 16)) - 1);
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(lo, bias) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_maskz_loadu_ps(hi, bias + 16) : _mm512_setzero_ps();
    __m512 c[MR][2];
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m) c[m][0] = b0, c[m][1] = b1;
    for (int64_t k = 0; k < K; ++k) {
        _mm_prefetch(reinterpret_cast<const char*>(p + (k + 8) * NR), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(p + (k + 8) * NR + 16), _MM_HINT_T0);
        const __m512 w0 = _mm512_loadu_ps(p + k * NR), w1 = _mm512_loadu_ps(p + k * NR + 16);
#pragma GCC unroll 12
        for (int m = 0; m < MR; ++m) {
            const __m512 xm = _mm512_set1_ps(xb[k * MB + m]);
            c[m][0] = _mm512_fmadd_ps(xm, w0, c[m][0]);
            c[m][1] = _mm512_fmadd_ps(xm, w1, c[m][1]);
        }
    }
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m) {
        if (ncols == NR) {
            _mm512_storeu_ps(y + m * ldy, c[m][0]);
            _mm512_storeu_ps(y + m * ldy + 16, c[m][1]);
        } else {
            _mm512_mask_storeu_ps(y + m * ldy, lo, c[m][0]);
            _mm512_mask_storeu_ps(y + m * ldy + 16, hi, c[m][1]);
        }
    }
}
};

}  // namespace

extern "C" {

void pml_pack(const float* w, int64_t N, int64_t K, float* out) { pml::pack_panels<NR>(w, N, K, out); }

// y [M, N] = x [M, K] (row-major) @ W^T + bias (bias may be null); P from pml_pack.
void pml_linear(const float* x, int64_t M, int64_t K, const float* P, const float* bias, int64_t N, float* y) {
    pml::panel_linear<NR, MB, Tile>(x, M, K, P, bias, N, y);
}

}  // extern "C"
