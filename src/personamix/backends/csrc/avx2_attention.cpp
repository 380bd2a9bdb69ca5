// Attention of a packed forward's short calls over the KV pool, fp32, AVX2 + FMA (loaded with ctypes
// by backends/cpu_attention.py; the CPU path of batching.py's _Batch.attend).
//
// What: for every query row i (a position of a decoding step, a draft or an SCR chunk) and head h,
//
//     o[i, h] = sum_{j < limit[i]} softmax_j(scale * q[i, h] . K[slot[i], h / g, j]) V[slot[i], h / g, j]
//
// (scaled dot-product attention, Vaswani et al. 2017, eq. 1; grouped-query heads: g = H / KV query
// heads read one KV head; limit[i] = its position + 1, causal). K and V are the pool's tensors
// [slots, KV, capacity, D] (cache.KVPool), read in place: each row reads its own slot and its own
// length only (no padding to the longest row, no gather of the slots, no mask tensor), a varlen
// kernel in the sense of FlashAttention's. Rows come in segments: the consecutive rows of one slot
// (a call's row: T new tokens), which share its keys. Work items are (segment, KV head): its T x g
// query vectors read the item's keys and values once from memory (then from cache), one query
// vector at a time. What bounds it on a 2-core Zen 3 inside a forward is reading the pool from
// DRAM in short per-slot streams (16 drafts at 60 keys, 30 layers: 4.4-4.7 ms with each layer's
// own pool, 1.6-1.9 ms with one pool in cache); sharing each key's loads among an item's query
// vectors (0.95-1.10x) and prefetching the next item's block (0.74-1.15x) did not pay.
//
// Softmax in two passes over the item's scores (exact max, then e^(s - max) / sum), exp by Cephes'
// polynomial for expf (as in avx_mathfun; relative error about 1e-7), so the result equals
// PyTorch's fp32 attention up to float rounding (tests/test_cpu_attention.py).
#include <immintrin.h>
#include <omp.h>

#include "avx2_math.h"

#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t PF = 16;   // keys ahead: the first query of a work item prefetches its keys and values

using pml::exp256;
using pml::hsum;

// q . k over D (a multiple of 8) floats
inline float dot(const float* __restrict q, const float* __restrict k, int64_t D) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), a);
    return hsum(a);
}

// q . k_j for the 8 rows k_0..k_7 of k (row stride D), as one vector: 8 accumulators, then one
// reduction of all 8 (hadd tree) instead of a horizontal sum per key
inline __m256 dot8(const float* __restrict q, const float* __restrict k, int64_t D) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t d = 0; d < D; d += 8) {
        const __m256 x = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + d), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + D + d), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 2 * D + d), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 3 * D + d), a3);
        a4 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 4 * D + d), a4);
        a5 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 5 * D + d), a5);
        a6 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 6 * D + d), a6);
        a7 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 7 * D + d), a7);
    }
    // lane l of u0: sums of rows (0,1,2,3)[l % 4] over half l / 4 of the lanes; u1 the same for rows 4-7
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// the scores of one query row against keys 0..lim-1 -> its softmax weights, in place in s[0, lp)
// (lp: lim rounded up to 8; the padding's weights are 0)
inline void softmax(float* s, int64_t lim, int64_t lp) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < lim; ++j) m = s[j] > m ? s[j] : m;
    for (int64_t j = lim; j < lp; ++j) s[j] = -std::numeric_limits<float>::infinity();
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < lp; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));   // padding: ~1e-38, next to >= 1
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.f / hsum(sum));
    for (int64_t j = 0; j < lp; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inv));
}

// rows j .. j + n - 1 of the [L, D] blocks of K and V into L1 ahead of use (a prefetch past the
// block's end touches the pool's next rows: harmless)
inline void prefetch_rows(const float* kb, const float* vb, int64_t j, int64_t n, int64_t D) {
    for (int64_t d = 0; d < n * D; d += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(kb + j * D + d), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(vb + j * D + d), _MM_HINT_T0);
    }
}

}  // namespace

extern "C" {

// q: query rows, q[i, h, :] at q + i * q_row + h * q_head (D contiguous floats); o [rows, H, D].
// K, V: [slots, KV, cap, D] contiguous. slot, limit: per row. seg[0..n_seg]: segment s is rows
// seg[s] .. seg[s+1]-1, all of one slot.
void pml_attention(const float* q, int64_t q_row, int64_t q_head, int64_t H, int64_t D, const float* K,
                   const float* V, int64_t KV, int64_t cap, const int64_t* slot, const int64_t* limit,
                   const int64_t* seg, int64_t n_seg, float scale, float* o) {
    const int64_t g = H / KV, items = n_seg * KV;
    int64_t work = 0;                                     // (query vector, key) pairs: a team above ~15 us of work
    for (int64_t s = 0; s < n_seg; ++s) work += (seg[s + 1] - seg[s]) * H * limit[seg[s + 1] - 1];
#pragma omp parallel if (work * D >= 262144)
    {
        std::vector<float> scores;                        // [lp]: one query vector's scores, then its weights
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; ++it) {
            const int64_t s = it / KV, kvh = it % KV, r0 = seg[s], nr = seg[s + 1] - r0;
            int64_t lmax = 0;
            for (int64_t r = r0; r < r0 + nr; ++r) lmax = limit[r] > lmax ? limit[r] : lmax;
            const int64_t lp = (lmax + 7) / 8 * 8;
            const float* kb = K + (slot[r0] * KV + kvh) * cap * D;
            const float* vb = V + (slot[r0] * KV + kvh) * cap * D;
            scores.resize(lp);
            for (int64_t r = r0; r < r0 + nr; ++r)
                for (int64_t h = kvh * g; h < (kvh + 1) * g; ++h) {
                    const float* x = q + r * q_row + h * q_head;
                    float* sc = scores.data();
                    const int64_t lim = limit[r];
                    const bool first = r == r0 && h == kvh * g;   // reads the item's keys and values from memory
                    int64_t j = 0;
                    for (; j + 8 <= lim; j += 8) {
                        if (first) prefetch_rows(kb, vb, j + PF, 8, D);
                        _mm256_storeu_ps(sc + j, _mm256_mul_ps(_mm256_set1_ps(scale), dot8(x, kb + j * D, D)));
                    }
                    for (; j < lim; ++j) sc[j] = scale * dot(x, kb + j * D, D);
                    softmax(sc, lim, lp);
                    // o = sum_j p_j V[j], 64 columns in 8 registers at a time (8 independent FMA chains)
                    for (int64_t d0 = 0; d0 < D; d0 += 64) {
                        const int64_t w = D - d0 < 64 ? D - d0 : 64;    // a multiple of 8
                        float* y = o + (r * H + h) * D + d0;
                        if (w == 64) {
                            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
                            for (int64_t jj = 0; jj < lim; ++jj) {
                                const __m256 p = _mm256_broadcast_ss(sc + jj);
                                const float* vj = vb + jj * D + d0;
                                a0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj), a0);
                                a1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8), a1);
                                a2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 16), a2);
                                a3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 24), a3);
                                a4 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 32), a4);
                                a5 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 40), a5);
                                a6 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 48), a6);
                                a7 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 56), a7);
                            }
                            _mm256_storeu_ps(y, a0), _mm256_storeu_ps(y + 8, a1), _mm256_storeu_ps(y + 16, a2);
                            _mm256_storeu_ps(y + 24, a3), _mm256_storeu_ps(y + 32, a4), _mm256_storeu_ps(y + 40, a5);
                            _mm256_storeu_ps(y + 48, a6), _mm256_storeu_ps(y + 56, a7);
                        } else {
                            __m256 a[8];
                            for (int u = 0; 8 * u < w; ++u) a[u] = _mm256_setzero_ps();
                            for (int64_t jj = 0; jj < lim; ++jj) {
                                const __m256 p = _mm256_broadcast_ss(sc + jj);
                                for (int u = 0; 8 * u < w; ++u)
                                    a[u] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vb + jj * D + d0 + 8 * u), a[u]);
                            }
                            for (int u = 0; 8 * u < w; ++u) _mm256_storeu_ps(y + 8 * u, a[u]);
                        }
                    }
                }
        }
    }
}

}  // extern "C"
