// What the linear kernels share whatever their vector width (avx2_linear.cpp, avx512_linear.cpp):
// W packed into panels of NR output columns, x copied into blocks of MB rows, and the panels
// split among the calling thread's OpenMP team. Each kernel brings its micro-kernel (a tile of up
// to MB rows x NR columns of y).
#pragma once

#include <omp.h>

#include <cstdint>
#include <vector>

namespace pml {

// P[ceil(N/NR)][K][NR] from W [N, K] (row-major); padding columns are 0.
template <int NR>
void pack_panels(const float* w, int64_t N, int64_t K, float* out) {
    const int64_t panels = (N + NR - 1) / NR;
    for (int64_t i = 0; i < panels; ++i)
        for (int64_t k = 0; k < K; ++k)
            for (int j = 0; j < NR; ++j) {
                const int64_t n = i * NR + j;
                out[(i * K + k) * NR + j] = n < N ? w[n * K + k] : 0.f;
            }
}

// Tile::run<MR> for the block's number of rows, MR = rows (1..MB), chosen at compile time
template <class Tile, int MB, int MR = 1>
inline void run_tile(int rows, const float* xb, const float* p, int64_t K, const float* bias, float* y, int64_t ldy,
                     int ncols) {
    if constexpr (MR < MB) {
        if (rows != MR) return run_tile<Tile, MB, MR + 1>(rows, xb, p, K, bias, y, ldy, ncols);
    }
    Tile::template run<MR>(xb, p, K, bias, y, ldy, ncols);
}

// y [M, N] = x [M, K] (row-major) @ W^T + bias (bias may be null); P from pack_panels<NR>.
// Tile::run<MR>(xb, p, K, bias, y, ldy, ncols) computes MR rows of y (MR = 1..MB) at one panel.
template <int NR, int MB, class Tile>
void panel_linear(const float* x, int64_t M, int64_t K, const float* P, const float* bias, int64_t N, float* y) {
    const int64_t blocks = (M + MB - 1) / MB, panels = (N + NR - 1) / NR;
    // x in blocks: a decoding step's few rows in a buffer the thread keeps (no allocation per
    // call), a prompt's many in one of their own (a server's threads would otherwise each keep
    // the largest they ever saw)
    constexpr int64_t KEEP = 64 * 1024;   // floats
    thread_local std::vector<float> kept;
    std::vector<float> own;
    std::vector<float>& xs = blocks * K * MB <= KEEP ? kept : own;
    xs.resize(blocks * K * MB);   // no zeros: a last block of fewer than MB rows is read for its rows only
    for (int64_t b = 0; b < blocks; ++b)
        for (int m = 0; m < MB && b * MB + m < M; ++m)
            for (int64_t k = 0; k < K; ++k) xs[(b * K + k) * MB + m] = x[(b * MB + m) * K + k];
    const float* xp = xs.data();
    auto panel = [&](int64_t i) {   // panel i (NR output columns) for every block of rows
        const float* p = P + i * K * NR;
        const int ncols = N - i * NR < NR ? static_cast<int>(N - i * NR) : NR;
        const float* bi = bias ? bias + i * NR : nullptr;
        for (int64_t b = 0; b < blocks; ++b) {
            const int rows = M - b * MB < MB ? static_cast<int>(M - b * MB) : MB;
            run_tile<Tile, MB>(rows, xp + b * K * MB, p, K, bi, y + b * MB * N + i * NR, N, ncols);
        }
    };
    // a team for any weight of more than 128 KB (streaming it takes longer than waking a thread);
    // one thread below that. From 4 blocks of rows on, panels are handed out one at a time, not in
    // equal halves: a thread that joins late (woken from sleep, preempted) then takes fewer,
    // instead of the others waiting for it at the end (60-120 rows 1.05-1.10x); a decoding step's
    // few rows keep equal halves, where a panel is too little work for the hand-out's cost
    // (docs/bench/avx2_linear.md). Every output column is summed by one thread in one order.
    const bool team = panels * K * NR >= 32768;
    if (blocks >= 4) {
#pragma omp parallel for schedule(dynamic, 1) if (team)
        for (int64_t i = 0; i < panels; ++i) panel(i);
    } else {
#pragma omp parallel for schedule(static) if (team)
        for (int64_t i = 0; i < panels; ++i) panel(i);
    }
}

}  // namespace pml
