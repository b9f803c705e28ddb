// wkv.cu -- the RWKV-4 WKV operator, forward and backward, float32.
//
// For every batch b and channel c, with w = e^{time_decay} > 0 the decay rate and u =
// time_first the bonus of the current token:
//
//   y_t = ( sum_{i<t} e^{-(t-1-i) w + k_i} v_i  +  e^{u + k_t} v_t )
//       / ( sum_{i<t} e^{-(t-1-i) w + k_i}      +  e^{u + k_t}     )
//
// computed as an RNN over t.  The sums are kept as (a, b) scaled by e^{-p}, where p is the
// largest exponent seen so far (the "max trick"): nothing overflows even for |k| in the
// hundreds.  The backward pass needs no per-thread arrays over T and so no compile-time T
// limit: it parks what the reverse sweep needs in gk/gv, which each thread owns for its
// channels.
//
// Layout: k, v, y, gy, gk, gv are contiguous (B, T, C); w, u are (C,); gw, gu are (B, C)
// partial sums that the caller reduces over B.  No two arrays overlap (__restrict__).
//
// Threads: one per (batch, group of WKV_LANES adjacent channels); launch at least
// B * ceil(C / WKV_LANES) of them, any B, T, C.  On the GPU WKV_LANES is 1: one thread per
// (batch, channel), and a warp runs 32 channels in lock-step.  facerwkv.py also compiles this
// file unmodified as C++ for the CPU, with WKV_LANES 64: there the loops over lanes do what the
// warp does in hardware, g++ turns them into vector instructions, and every step reads whole
// cache lines.  So: no __shared__, __syncthreads, atomics or warp intrinsics -- every
// (batch, channel) is independent.
#ifndef WKV_LANES
#define WKV_LANES 1
#endif

// The max trick: for two numbers held in the log domain, return m = max(x, y) and the
// factors e^{x - m}, e^{y - m} that rescale both to it.  One of them is e^0 = 1, so one expf
// (of minus the gap) gives both.
__device__ __forceinline__ float rescale(float x, float y, float* ex, float* ey) {
    const float e = expf(-fabsf(x - y));
    *ex = (x >= y) ? 1.0f : e;
    *ey = (x >= y) ? e : 1.0f;
    return fmaxf(x, y);
}

extern "C" __global__ void wkv_forward(int B, int T, int C,
                                       const float* __restrict__ w, const float* __restrict__ u,
                                       const float* __restrict__ k, const float* __restrict__ v,
                                       float* __restrict__ y) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int groups = (C + WKV_LANES - 1) / WKV_LANES;
    if (idx >= (long long)B * groups) return;
    const int c0 = (int)(idx % groups) * WKV_LANES;                  // this thread's first channel
    const int lanes = (C - c0 < WKV_LANES) ? C - c0 : WKV_LANES;
    const long long start = (idx / groups) * (long long)T * C + c0;  // element (b, 0, c0)

    // state: numerator a = aa e^{pp}, denominator b = bb e^{pp}, empty at t = 0, where
    // pp = pk - n w is the largest exponent seen, pk, decayed over the n steps since.
    // Recomputing pp from (pk, n), rather than subtracting w from it at every step, keeps
    // its rounding error at an ulp even for tiny w and long T.
    float aa[WKV_LANES], bb[WKV_LANES], pk[WKV_LANES];
    int n[WKV_LANES];
    for (int l = 0; l < lanes; l++) { aa[l] = 0.0f; bb[l] = 0.0f; pk[l] = -1e38f; n[l] = 0; }

    for (int t = 0; t < T; t++) {
        const long long i = start + (long long)t * C;
        for (int l = 0; l < lanes; l++) {
            const float ww = w[c0 + l], uu = u[c0 + l], kk = k[i + l], vv = v[i + l];
            float e1, e2;

            // output: the past (scale e^{pp}) plus the current token with its bonus (e^{u + k})
            rescale(pk[l] - n[l] * ww, uu + kk, &e1, &e2);
            y[i + l] = (e1 * aa[l] + e2 * vv) / (e1 * bb[l] + e2);

            // state update: decay the past by e^{-w}, then add the current token without bonus
            const float past = pk[l] - (n[l] + 1) * ww;
            rescale(past, kk, &e1, &e2);
            aa[l] = e1 * aa[l] + e2 * vv;
            bb[l] = e1 * bb[l] + e2;
            n[l] = (past >= kk) ? n[l] + 1 : 0;
            pk[l] = (past >= kk) ? pk[l] : kk;
        }
    }
}

// Gradients, with D_t the denominator above and q_t = gy_t / D_t:
//   gu   = sum_t q_t e^{u+k_t} (v_t - y_t)
//   gw   = -sum_t q_t (a'_t - y_t b'_t),   a'_t, b'_t: the sums above weighted by (t-1-i)
//   gv_t = q_t e^{u+k_t} + e^{k_t} A_t,    gk_t = q_t e^{u+k_t} (v_t - y_t) + e^{k_t} (v_t A_t - B_t)
//   with A_t = sum_{j>t} e^{-(j-1-t) w} q_j  and  B_t = the same with q_j y_j.
// Sweep 1 (t ascending) replays the forward state and accumulates gw, gu; it leaves
// q_t = Q_t e^{-P_t} in gk (Q_t) and gv (P_t).  Sweep 2 (t descending) builds A_t, B_t,
// kept as (ga, gb) scaled by e^{pa}, and overwrites gk, gv with the gradients.
extern "C" __global__ void wkv_backward(int B, int T, int C,
                                        const float* __restrict__ w, const float* __restrict__ u,
                                        const float* __restrict__ k, const float* __restrict__ v,
                                        const float* __restrict__ y, const float* __restrict__ gy,
                                        float* __restrict__ gw, float* __restrict__ gu,
                                        float* __restrict__ gk, float* __restrict__ gv) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int groups = (C + WKV_LANES - 1) / WKV_LANES;
    if (idx >= (long long)B * groups) return;
    const int c0 = (int)(idx % groups) * WKV_LANES;
    const int lanes = (C - c0 < WKV_LANES) ? C - c0 : WKV_LANES;
    const long long start = (idx / groups) * (long long)T * C + c0;

    // sweep 1: a = aa e^{pp}, b = bb e^{pp} as in the forward; a' = da e^{pp}, b' = db e^{pp}
    float aa[WKV_LANES], bb[WKV_LANES], da[WKV_LANES], db[WKV_LANES], pk[WKV_LANES];
    float sum_gw[WKV_LANES], sum_gu[WKV_LANES];
    int n[WKV_LANES];
    for (int l = 0; l < lanes; l++) {
        aa[l] = 0.0f; bb[l] = 0.0f; da[l] = 0.0f; db[l] = 0.0f; pk[l] = -1e38f; n[l] = 0;
        sum_gw[l] = 0.0f; sum_gu[l] = 0.0f;
    }
    for (int t = 0; t < T; t++) {
        const long long i = start + (long long)t * C;
        for (int l = 0; l < lanes; l++) {
            const float ww = w[c0 + l], uu = u[c0 + l], kk = k[i + l], vv = v[i + l], yy = y[i + l];
            float e1, e2;

            const float p = rescale(pk[l] - n[l] * ww, uu + kk, &e1, &e2);  // D_t = e^p (e1 bb + e2)
            const float q = gy[i + l] / (e1 * bb[l] + e2);                  // q_t = q e^{-p}
            sum_gw[l] -= q * e1 * (da[l] - yy * db[l]);
            sum_gu[l] += q * e2 * (vv - yy);
            gk[i + l] = q;
            gv[i + l] = p;

            // a'_{t+1} = e^{-w} (a'_t + a_t): every past token is one step further away
            const float past = pk[l] - (n[l] + 1) * ww;
            rescale(past, kk, &e1, &e2);
            da[l] = e1 * (da[l] + aa[l]);
            db[l] = e1 * (db[l] + bb[l]);
            aa[l] = e1 * aa[l] + e2 * vv;
            bb[l] = e1 * bb[l] + e2;
            n[l] = (past >= kk) ? n[l] + 1 : 0;
            pk[l] = (past >= kk) ? pk[l] : kk;
        }
    }
    const long long bc = (idx / groups) * C + c0;  // element (b, c0) of gw, gu
    for (int l = 0; l < lanes; l++) { gw[bc + l] = sum_gw[l]; gu[bc + l] = sum_gu[l]; }

    // sweep 2: A_t = ga e^{pa}, B_t = gb e^{pa}, empty after the last token; pa = pk - n w
    // as in sweep 1, now over the exponents -P_j of the future tokens.
    float ga[WKV_LANES], gb[WKV_LANES];
    for (int l = 0; l < lanes; l++) { ga[l] = 0.0f; gb[l] = 0.0f; pk[l] = -1e38f; n[l] = 0; }
    for (int t = T - 1; t >= 0; t--) {
        const long long i = start + (long long)t * C;
        for (int l = 0; l < lanes; l++) {
            const float ww = w[c0 + l], uu = u[c0 + l], kk = k[i + l], vv = v[i + l], yy = y[i + l];
            const float q = gk[i + l], p = gv[i + l];
            float e1, e2;

            const float direct = q * expf(uu + kk - p);           // q_t e^{u+k_t}; exponent <= 0
            const float future = expf(kk + pk[l] - n[l] * ww);    // e^{k_t} e^{pa}; exponent <= 0 (*)
            gv[i + l] = direct + future * ga[l];
            gk[i + l] = direct * (vv - yy) + future * (ga[l] * vv - gb[l]);

            // A_{t-1} = e^{-w} A_t + q_t
            const float past = pk[l] - (n[l] + 1) * ww;
            rescale(past, -p, &e1, &e2);
            ga[l] = e1 * ga[l] + e2 * q;
            gb[l] = e1 * gb[l] + e2 * q * yy;
            n[l] = (past >= -p) ? n[l] + 1 : 0;
            pk[l] = (past >= -p) ? pk[l] : -p;
        }
    }
    // (*) pa = max_{j>t} (-P_j - (j-1-t) w) and P_j >= k_t - (j-1-t) w (token t is part of
    // D_j), so k_t + pa <= 0: splitting e^{k_t} A_t this way never overflows.
}
