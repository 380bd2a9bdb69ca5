// The LoRA deltas of a multi-adapter forward, fp32, AVX2 + FMA (loaded with ctypes by
// backends/cpu_lora.py; the CPU path of multilora.py's MultiLoraLinear).
//
// What: the positions of a forward come in segments, each of one adapter a (a call's row, or all
// positions of one adapter in a packed forward of many calls); for every position p of segment s
//
//     y[pos[p]] += (x[pos[p]] A[a]) B[a]        a = adapter[s]
//
// (LoRA, Hu et al. 2021, eq. 3, the scale folded into B), with the stacked A [N, K, R] and
// B [N, R, O] read in place: no gather of x, no padding of the segments to a common length, no
// scatter back. Two stages in one OpenMP region:
//   1. xa[p] = x[pos[p]] A[a]: tiles of up to 4 positions x 24 of the R columns in registers
//      (per k: up to 3 loads of A, 4 broadcasts of x, 12 FMAs), into a scratch [P, R];
//   2. y[pos[p]] += xa[p] B[a]: tiles of 4 positions x 24 output columns (12 accumulators
//      loaded from y), rows j of B limited to [jlo, jhi) per 8 columns, the rows where any
//      adapter's B is nonzero there: a fused q/k/v layer's B is block-diagonal (qkv.py), so
//      each column reads only its own projection's rank rows. Skipping B's zeros is exact.
// Each element of xa and y is summed by one thread in a fixed order, whatever the team's size:
// the same bits on one core and on many. Equal to PyTorch's matmuls up to float rounding.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int MR = 4;    // positions per tile
constexpr int RC = 24;   // columns of xa per stage-1 tile (3 ymm)
constexpr int OC = 24;   // columns of y per stage-2 tile (3 ymm)
constexpr int64_t CHUNK = 96;   // columns of y per stage-2 work item

// xa[m, 0:8*V] = x_m A[:, 0:8*V] for the M rows x_m (a is A's column block, row stride R)
template <int M, int V>
inline void xa_tile(const float* const* xr, const float* __restrict a, int64_t K, int64_t R, float* xa,
                    int64_t ldxa) {
    __m256 acc[M][V];
    for (int m = 0; m < M; ++m)
        for (int v = 0; v < V; ++v) acc[m][v] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        __m256 av[V];
        for (int v = 0; v < V; ++v) av[v] = _mm256_loadu_ps(a + k * R + 8 * v);
        for (int m = 0; m < M; ++m) {
            const __m256 xb = _mm256_broadcast_ss(xr[m] + k);
            for (int v = 0; v < V; ++v) acc[m][v] = _mm256_fmadd_ps(xb, av[v], acc[m][v]);
        }
    }
    for (int m = 0; m < M; ++m)
        for (int v = 0; v < V; ++v) _mm256_storeu_ps(xa + m * ldxa + 8 * v, acc[m][v]);
}

// y_m[0:8*V] += xa_m[jl:jh] B[jl:jh, 0:8*V] for the M rows y_m (b is B's column block, row stride O)
template <int M, int V>
inline void y_tile(float* const* yr, const float* __restrict xa, int64_t ldxa, const float* __restrict b,
                   int64_t O, int64_t jl, int64_t jh) {
    __m256 acc[M][V];
    for (int m = 0; m < M; ++m)
        for (int v = 0; v < V; ++v) acc[m][v] = _mm256_loadu_ps(yr[m] + 8 * v);
    for (int64_t j = jl; j < jh; ++j) {
        __m256 bv[V];
        for (int v = 0; v < V; ++v) bv[v] = _mm256_loadu_ps(b + j * O + 8 * v);
        for (int m = 0; m < M; ++m) {
            const __m256 xb = _mm256_broadcast_ss(xa + m * ldxa + j);
            for (int v = 0; v < V; ++v) acc[m][v] = _mm256_fmadd_ps(xb, bv[v], acc[m][v]);
        }
    }
    for (int m = 0; m < M; ++m)
        for (int v = 0; v < V; ++v) _mm256_storeu_ps(yr[m] + 8 * v, acc[m][v]);
}

// the templates for m (1..MR) rows and v (1..3) vectors
template <template <int, int> class F, typename... Args>
inline void dispatch(int m, int v, Args... args) {
    switch (m * 4 + v) {
        case 5: F<1, 1>::run(args...); break;
        case 6: F<1, 2>::run(args...); break;
        case 7: F<1, 3>::run(args...); break;
        case 9: F<2, 1>::run(args...); break;
        case 10: F<2, 2>::run(args...); break;
        case 11: F<2, 3>::run(args...); break;
        case 13: F<3, 1>::run(args...); break;
        case 14: F<3, 2>::run(args...); break;
        case 15: F<3, 3>::run(args...); break;
        case 17: F<4, 1>::run(args...); break;
        case 18: F<4, 2>::run(args...); break;
        default: F<4, 3>::run(args...); break;
    }
}
template <int M, int V>
struct XaTile {
    static void run(const float* const* xr, const float* a, int64_t K, int64_t R, float* xa, int64_t ldxa) {
        xa_tile<M, V>(xr, a, K, R, xa, ldxa);
    }
};
template <int M, int V>
struct YTile {
    static void run(float* const* yr, const float* xa, int64_t ldxa, const float* b, int64_t O, int64_t jl,
                    int64_t jh) {
        y_tile<M, V>(yr, xa, ldxa, b, O, jl, jh);
    }
};

struct Block {        // up to MR consecutive positions of one segment
    int64_t p0, m, a;  // first position (index into pos), how many, adapter
};

}  // namespace

extern "C" {

// x [T, K], y [T, O] (row-major, O a multiple of 8); A [N, K, R], B [N, R, O] (R a multiple of 8);
// jlo / jhi [O / 8]; pos [P]; segment s is pos[seg[s]] .. pos[seg[s+1] - 1], of adapter adapter[s].
void pml_lora(const float* x, int64_t K, float* y, int64_t O, const float* A, const float* B, int64_t R,
              const int64_t* jlo, const int64_t* jhi, const int64_t* pos, const int64_t* seg,
              const int64_t* adapter, int64_t n_seg) {
    std::vector<Block> blocks;
    for (int64_t s = 0; s < n_seg; ++s)
        for (int64_t p = seg[s]; p < seg[s + 1]; p += MR)
            blocks.push_back({p, std::min<int64_t>(MR, seg[s + 1] - p), adapter[s]});
    const int64_t nb = static_cast<int64_t>(blocks.size()), P = seg[n_seg];
    if (!nb) return;
    std::vector<float> xa(P * R);
    const int64_t chunks = (O + CHUNK - 1) / CHUNK;
    // the team even for a decoding step's few positions: reading the adapters' A and B from DRAM
    // is what those cost, and two cores read faster than one (a 4-position step's 60 layers 1.1-1.3x)
#pragma omp parallel
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < nb; ++i) {
            const Block& bl = blocks[i];
            const float* xr[MR];
            for (int m = 0; m < bl.m; ++m) xr[m] = x + pos[bl.p0 + m] * K;
            for (int64_t r = 0; r < R; r += RC) {
                const int v = static_cast<int>(std::min<int64_t>(RC, R - r) / 8);
                dispatch<XaTile>(static_cast<int>(bl.m), v, static_cast<const float* const*>(xr),
                                 A + bl.a * K * R + r, K, R, xa.data() + bl.p0 * R + r, R);
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < nb * chunks; ++i) {
            const Block& bl = blocks[i / chunks];
            const int64_t c0 = (i % chunks) * CHUNK, c1 = std::min(O, c0 + CHUNK);
            float* yr[MR];
            for (int64_t c = c0; c < c1; c += OC) {
                const int64_t w = std::min<int64_t>(OC, c1 - c);
                int64_t jl = R, jh = 0;
                for (int64_t v = c / 8; v < (c + w) / 8; ++v) jl = std::min(jl, jlo[v]), jh = std::max(jh, jhi[v]);
                if (jl >= jh) continue;
                for (int m = 0; m < bl.m; ++m) yr[m] = y + pos[bl.p0 + m] * O + c;
                dispatch<YTile>(static_cast<int>(bl.m), static_cast<int>(w / 8), static_cast<float* const*>(yr),
                                static_cast<const float*>(xa.data() + bl.p0 * R), R, B + bl.a * R * O + c, O, jl,
                                jh);
            }
        }
    }
}

}  // extern "C"
