// y = x W^T + b for fp32 on x86 CPUs with AVX2 and FMA (backends/avx2.py loads this with ctypes).
//
// Why: on an AVX2-only CPU (AMD EPYC, Zen 3) oneDNN's matmul for the few rows of a decoding step
// neither streams the weights at the memory's bandwidth nor hides the arithmetic behind it (the
// 151 linear layers of SmolLM2-135M: 24 ms for one row, 32 for five), while the weights' bytes
// are the floor (537 MB at 33 GB/s: 16 ms). This kernel reads each weight once per call and
// keeps up to MB rows' partial sums in registers: 1.2-1.45x oneDNN up to 16 rows
// (docs/bench/avx2_linear.md).
//
// Layout: W [N, K] is packed once into panels of NR = 16 output columns, P[N/NR][K][NR] (the last
// panel zero-padded), so a panel is one contiguous stream. x is copied per call into blocks of MB
// = 6 rows, [K][MB], so the 6 rows' values at one k sit in one cache line. The micro-kernel
// computes a 6 x 16 tile of y in 12 ymm registers: per k, 2 loads of W, 6 broadcasts of x,
// 12 FMAs (the Haswell-era 6x16 tile of BLIS/oneDNN's own AVX2 kernels). OpenMP splits the
// panels among the calling thread's team: the team of the OpenMP runtime PyTorch has loaded
// (libgomp.so.1, matched by soname), so torch.set_num_threads and backends/omp.py govern it
// (panel_linear.h: the packing and the split, shared with avx512_linear.cpp).
#include <immintrin.h>

#include <cstdint>

#include "panel_linear.h"

namespace {

constexpr int NR = 16;  // output columns per panel (two ymm registers)
constexpr int MB = 6;   // rows per block of x (12 accumulators + 2 weights + 1 broadcast of 16 ymm)

// row m of the tile (compiled in only for the MR rows a block has): x[m, k] times the panel's
// 16 weights at k into its two accumulators; at the end, written to the ncols columns that exist
// (masked stores only in a panel cut short: on AMD Zen a masked store costs many plain ones)
#define FMA_ROW(m)                                                      \
    if constexpr (MR > m) {                                             \
        const __m256 xm = _mm256_broadcast_ss(xb + k * MB + m);         \
        c##m##0 = _mm256_fmadd_ps(xm, w0, c##m##0);                     \
        c##m##1 = _mm256_fmadd_ps(xm, w1, c##m##1);                     \
    }
#define STORE_ROW(m)                                                    \
    if constexpr (MR > m) {                                             \
        if (ncols == NR) {                                              \
            _mm256_storeu_ps(y + m * ldy, c##m##0);                     \
            _mm256_storeu_ps(y + m * ldy + 8, c##m##1);                 \
        } else {                                                        \
            _mm256_maskstore_ps(y + m * ldy, lo, c##m##0);              \
            _mm256_maskstore_ps(y + m * ldy + 8, hi, c##m##1);          \
        }                                                               \
    }

struct Tile {  // y's MR x NR tile at one panel (panel_linear.h)
template <int MR>
static inline void run(const float* __restrict xb, const float* __restrict p, int64_t K, const float* __restrict bias,
                       float* __restrict y, int64_t ldy, int ncols) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(ncols), lane);      // columns 0-7 to write
    const __m256i hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(ncols - 8), lane);  // columns 8-15
    const __m256 b0 = bias ? _mm256_maskload_ps(bias, lo) : _mm256_setzero_ps();
    const __m256 b1 = bias ? _mm256_maskload_ps(bias + 8, hi) : _mm256_setzero_ps();
    __m256 c00 = b0, c01 = b1, c10 = b0, c11 = b1, c20 = b0, c21 = b1;   // row m: c<m>0, c<m>1
    __m256 c30 = b0, c31 = b1, c40 = b0, c41 = b1, c50 = b0, c51 = b1;
    for (int64_t k = 0; k < K; ++k) {
        _mm_prefetch(reinterpret_cast<const char*>(p + (k + 16) * NR), _MM_HINT_T0);
        const __m256 w0 = _mm256_loadu_ps(p + k * NR), w1 = _mm256_loadu_ps(p + k * NR + 8);
        FMA_ROW(0);
        FMA_ROW(1);
        FMA_ROW(2);
        FMA_ROW(3);
        FMA_ROW(4);
        FMA_ROW(5);
    }
    STORE_ROW(0);
    STORE_ROW(1);
    STORE_ROW(2);
    STORE_ROW(3);
    STORE_ROW(4);
    STORE_ROW(5);
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
