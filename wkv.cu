// wkv.cu -- the RWKV-4 WKV operator and Vision-RWKV's Bi-WKV, forward and backward, float32.
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
// Layout (all four kernels): k, v, y, gy, gk, gv are contiguous (B, T, C); w, u are (C,); gw,
// gu are (B, C) partial sums that the caller reduces over B.  No two arrays overlap
// (__restrict__).
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

// This thread's share of the work: one batch element and its channels c0 .. c0 + lanes - 1
// (WKV_LANES of them, fewer at the end of a row).  False for the threads past the last (batch,
// group of channels): they do nothing.
__device__ __forceinline__ bool thread_channels(int B, int C, int* batch, int* c0, int* lanes) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int groups = (C + WKV_LANES - 1) / WKV_LANES;
    if (idx >= (long long)B * groups) return false;
    *batch = (int)(idx / groups);
    *c0 = (int)(idx % groups) * WKV_LANES;
    *lanes = (C - *c0 < WKV_LANES) ? C - *c0 : WKV_LANES;
    return true;
}

extern "C" __global__ void wkv_forward(int B, int T, int C,
                                       const float* __restrict__ w, const float* __restrict__ u,
                                       const float* __restrict__ k, const float* __restrict__ v,
                                       float* __restrict__ y) {
    int batch, c0, lanes;
    if (!thread_channels(B, C, &batch, &c0, &lanes)) return;
    const long long start = ((long long)batch * T) * C + c0;  // element (batch, 0, c0)

    // state: numerator a = aa e^{pp}, denominator b = bb e^{pp}, empty at t = 0, where
    // pp = p_max - steps_since w is the largest exponent seen, p_max, decayed over the steps
    // since.  Recomputing pp from (p_max, steps_since), rather than subtracting w from it at
    // every step, keeps its rounding error at an ulp even for tiny w and long T.
    float aa[WKV_LANES], bb[WKV_LANES], p_max[WKV_LANES];
    int steps_since[WKV_LANES];
    for (int l = 0; l < lanes; l++) { aa[l] = 0.0f; bb[l] = 0.0f; p_max[l] = -1e38f; steps_since[l] = 0; }

    for (int t = 0; t < T; t++) {
        const long long i = start + (long long)t * C;
        for (int l = 0; l < lanes; l++) {
            const float ww = w[c0 + l], uu = u[c0 + l], kk = k[i + l], vv = v[i + l];
            float e1, e2;

            // output: the past (scale e^{pp}) plus the current token with its bonus (e^{u + k})
            rescale(p_max[l] - steps_since[l] * ww, uu + kk, &e1, &e2);
            y[i + l] = (e1 * aa[l] + e2 * vv) / (e1 * bb[l] + e2);

            // state update: decay the past by e^{-w}, then add the current token without bonus
            const float past = p_max[l] - (steps_since[l] + 1) * ww;
            rescale(past, kk, &e1, &e2);
            aa[l] = e1 * aa[l] + e2 * vv;
            bb[l] = e1 * bb[l] + e2;
            steps_since[l] = (past >= kk) ? steps_since[l] + 1 : 0;
            p_max[l] = (past >= kk) ? p_max[l] : kk;
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
    int batch, c0, lanes;
    if (!thread_channels(B, C, &batch, &c0, &lanes)) return;
    const long long start = ((long long)batch * T) * C + c0;  // element (batch, 0, c0)

    // sweep 1: a = aa e^{pp}, b = bb e^{pp} as in the forward; a' = da e^{pp}, b' = db e^{pp}
    float aa[WKV_LANES], bb[WKV_LANES], da[WKV_LANES], db[WKV_LANES], p_max[WKV_LANES];
    float sum_gw[WKV_LANES], sum_gu[WKV_LANES];
    int steps_since[WKV_LANES];
    for (int l = 0; l < lanes; l++) {
        aa[l] = 0.0f; bb[l] = 0.0f; da[l] = 0.0f; db[l] = 0.0f; p_max[l] = -1e38f; steps_since[l] = 0;
        sum_gw[l] = 0.0f; sum_gu[l] = 0.0f;
    }
    for (int t = 0; t < T; t++) {
        const long long i = start + (long long)t * C;
        for (int l = 0; l < lanes; l++) {
            const float ww = w[c0 + l], uu = u[c0 + l], kk = k[i + l], vv = v[i + l], yy = y[i + l];
            float e1, e2;

            const float p = rescale(p_max[l] - steps_since[l] * ww, uu + kk, &e1, &e2);  // D_t = e^p (e1 bb + e2)
            const float q = gy[i + l] / (e1 * bb[l] + e2);                  // q_t = q e^{-p}
            sum_gw[l] -= q * e1 * (da[l] - yy * db[l]);
            sum_gu[l] += q * e2 * (vv - yy);
            gk[i + l] = q;
            gv[i + l] = p;

            // a'_{t+1} = e^{-w} (a'_t + a_t): every past token is one step further away
            const float past = p_max[l] - (steps_since[l] + 1) * ww;
            rescale(past, kk, &e1, &e2);
            da[l] = e1 * (da[l] + aa[l]);
            db[l] = e1 * (db[l] + bb[l]);
            aa[l] = e1 * aa[l] + e2 * vv;
            bb[l] = e1 * bb[l] + e2;
            steps_since[l] = (past >= kk) ? steps_since[l] + 1 : 0;
            p_max[l] = (past >= kk) ? p_max[l] : kk;
        }
    }
    const long long bc = (long long)batch * C + c0;  // element (batch, c0) of gw, gu
    for (int l = 0; l < lanes; l++) { gw[bc + l] = sum_gw[l]; gu[bc + l] = sum_gu[l]; }

    // sweep 2: A_t = ga e^{pa}, B_t = gb e^{pa}, empty after the last token; pa = p_max -
    // steps_since w as in sweep 1, now over the exponents -P_j of the future tokens.
    float ga[WKV_LANES], gb[WKV_LANES];
    for (int l = 0; l < lanes; l++) { ga[l] = 0.0f; gb[l] = 0.0f; p_max[l] = -1e38f; steps_since[l] = 0; }
    for (int t = T - 1; t >= 0; t--) {
        const long long i = start + (long long)t * C;
        for (int l = 0; l < lanes; l++) {
            const float ww = w[c0 + l], uu = u[c0 + l], kk = k[i + l], vv = v[i + l], yy = y[i + l];
            const float q = gk[i + l], p = gv[i + l];
            float e1, e2;

            const float direct = q * expf(uu + kk - p);           // q_t e^{u+k_t}; exponent <= 0
            const float future = expf(kk + p_max[l] - steps_since[l] * ww);  // e^{k_t} e^{pa}; exponent <= 0 (*)
            gv[i + l] = direct + future * ga[l];
            gk[i + l] = direct * (vv - yy) + future * (ga[l] * vv - gb[l]);

            // A_{t-1} = e^{-w} A_t + q_t
            const float past = p_max[l] - (steps_since[l] + 1) * ww;
            rescale(past, -p, &e1, &e2);
            ga[l] = e1 * ga[l] + e2 * q;
            gb[l] = e1 * gb[l] + e2 * q * yy;
            steps_since[l] = (past >= -p) ? steps_since[l] + 1 : 0;
            p_max[l] = (past >= -p) ? p_max[l] : -p;
        }
    }
    // (*) pa = max_{j>t} (-P_j - (j-1-t) w) and P_j >= k_t - (j-1-t) w (token t is part of
    // D_j), so k_t + pa <= 0: splitting e^{k_t} A_t this way never overflows.
}


// =============================================================================================
// Bi-WKV (Vision-RWKV): the WKV weights in both directions, for any real w and u
//
//   y_t = ( sum_{i != t} e^{-(|t-i|-1) w + k_i} v_i  +  e^{u + k_t} v_t )
//       / ( sum_{i != t} e^{-(|t-i|-1) w + k_i}      +  e^{u + k_t}     )
//
// The past part (i < t) is the RWKV-4 sum above; the future part (i > t) is the same sum on
// the reversed sequence.  So: two exclusive scans, the past sums A_t, B_t from the left and
// the future sums C_t, D_t from the right, each with the max trick, and y_t = (A_t + C_t +
// e^{u+k_t} v_t) / (B_t + D_t + e^{u+k_t}), the three parts rescaled to their largest.
//
// w and u are used as given: w < 0 (Vision-RWKV's "flexible decay") makes the weights GROW
// with distance, and the sums' exponents reach |w| T, thousands for long sequences, where a
// float exponent has already lost the 1e-4 that decides how past and future weigh against
// each other.  So an exponent is never formed as one float: it is kept as a pair (s, n)
// meaning s - n w, with s a k or u + k (or minus one: an exponent of 1 / D) and n an integer,
// and two exponents are only compared through (s1 - s2) - (n1 - n2) w, which is small, and
// so accurate, whenever the comparison matters.  An empty sum has s = -1e38, n = 0.
//
// BIWKV_WORK: the past sums of every token have to wait for the scan from the right, which
// runs the other way.  They are parked in the caller's scratch `work`, BIWKV_WORK planes of
// B*T*C floats (and, in the backward pass, q_t after them), so a thread keeps no arrays over T
// (no cap on T) and the kernels allocate nothing.  The forward uses planes 0-3 (the past's
// mantissas a, b and exponent s, n), the backward all six (see there); n is stored as int.
#define BIWKV_WORK 6

// Add a token with exponent (s2, n2) to a sum kept as mantissas scaled by e^{s - n w}: the
// sum decays one step, to (s, n + 1), and the result is scaled to the larger of the two.
// Returns in e_old, e_new the factors for the old mantissas and for the token's.
__device__ __forceinline__ void merge(float w, float* s, int* n, float s2, int n2,
                                      float* e_old, float* e_new) {
    const float d = (*s - s2) - (float)(*n + 1 - n2) * w;  // log(decayed sum's scale / token's)
    const float e = expf(-fabsf(d));
    *e_old = (d >= 0.0f) ? 1.0f : e;
    *e_new = (d >= 0.0f) ? e : 1.0f;
    *s = (d >= 0.0f) ? *s : s2;
    *n = (d >= 0.0f) ? *n + 1 : n2;
}

// The three parts of y_t -- past A (exponent sa - na w), future C (sc - nc w) and the current
// token U (su) -- rescaled to the largest: e_a, e_c, e_u are each part's e^{exponent - max},
// one of them 1, and (s, n) is the max.  Each factor comes from the difference of the pair
// it relates, never from two large exponents.
__device__ __forceinline__ void rescale3(float w, float sa, int na, float sc, int nc, float su,
                                         float* e_a, float* e_c, float* e_u, float* s, int* n) {
    const float d_au = (sa - su) - (float)na * w;         // log(A's scale / U's)
    const float d_cu = (sc - su) - (float)nc * w;         // log(C's scale / U's)
    const float d_ac = (sa - sc) - (float)(na - nc) * w;  // log(A's scale / C's)
    const bool a_max = d_au >= 0.0f && d_ac >= 0.0f;
    const bool c_max = !a_max && d_cu >= 0.0f && d_ac < 0.0f;
    const float e1 = expf(a_max ? -d_ac : c_max ? d_ac : d_au);   // C's if A is the max, else A's
    const float e2 = expf(a_max ? -d_au : c_max ? -d_cu : d_cu);  // U's if A or C is, else C's
    *e_a = a_max ? 1.0f : e1;
    *e_c = a_max ? e1 : c_max ? 1.0f : e2;
    *e_u = (a_max || c_max) ? e2 : 1.0f;
    *s = a_max ? sa : c_max ? sc : su;
    *n = a_max ? na : c_max ? nc : 0;
}

extern "C" __global__ void biwkv_forward(int B, int T, int C,
                                         const float* __restrict__ w, const float* __restrict__ u,
                                         const float* __restrict__ k, const float* __restrict__ v,
                                         float* __restrict__ y, float* __restrict__ work) {
    int batch, c0, lanes;
    if (!thread_channels(B, C, &batch, &c0, &lanes)) return;
    const long long start = ((long long)batch * T) * C + c0;  // element (batch, 0, c0)
    const long long N = (long long)B * T * C;  // one plane of work
    float* const a_work = work;
    float* const b_work = work + N;
    float* const s_work = work + 2 * N;
    int* const n_work = (int*)(work + 3 * N);

    // scan 1, left to right: park the past sums A_t = a e^{s - n w}, B_t = b e^{s - n w}
    float a[WKV_LANES], b[WKV_LANES], s[WKV_LANES];
    int n[WKV_LANES];
    for (int l = 0; l < lanes; l++) { a[l] = 0.0f; b[l] = 0.0f; s[l] = -1e38f; n[l] = 0; }
    for (int t = 0; t < T; t++) {
        const long long i = start + (long long)t * C;
        for (int l = 0; l < lanes; l++) {
            a_work[i + l] = a[l]; b_work[i + l] = b[l]; s_work[i + l] = s[l]; n_work[i + l] = n[l];
            float e_old, e_new;
            merge(w[c0 + l], &s[l], &n[l], k[i + l], 0, &e_old, &e_new);
            a[l] = e_old * a[l] + e_new * v[i + l];
            b[l] = e_old * b[l] + e_new;
        }
    }

    // scan 2, right to left: the future sums C_t, D_t (now in a, b, s, n), and y_t
    for (int l = 0; l < lanes; l++) { a[l] = 0.0f; b[l] = 0.0f; s[l] = -1e38f; n[l] = 0; }
    for (int t = T - 1; t >= 0; t--) {
        const long long i = start + (long long)t * C;
        for (int l = 0; l < lanes; l++) {
            const float ww = w[c0 + l], kk = k[i + l], vv = v[i + l];
            float e_a, e_c, e_u, s_max;
            int n_max;
            rescale3(ww, s_work[i + l], n_work[i + l], s[l], n[l], u[c0 + l] + kk, &e_a, &e_c, &e_u, &s_max, &n_max);
            y[i + l] = (e_a * a_work[i + l] + e_c * a[l] + e_u * vv) / (e_a * b_work[i + l] + e_c * b[l] + e_u);
            float e_old, e_new;
            merge(ww, &s[l], &n[l], kk, 0, &e_old, &e_new);
            a[l] = e_old * a[l] + e_new * vv;
            b[l] = e_old * b[l] + e_new;
        }
    }
}

// The backward pass runs its value scans in a second form: the sum as its mass b e^{s - n w}
// and mean m (A = m B), with their derivatives in w: lam = d(log mass)/dw + n and mu = dm/dw.
// (d(log mass)/dw = -(the mean distance of the sum's tokens); lam measures it from the
// largest term's, so it stays small, like s.)  Adds the token (k, v) as merge() does.
__device__ __forceinline__ void merge_mean(float w, float kk, float vv, float* b, float* m, float* s, int* n,
                                           float* lam, float* mu) {
    const int n_old = *n;
    float e_old, e_new;
    merge(w, s, n, kk, 0, &e_old, &e_new);
    const float b_new = e_old * *b + e_new, r = 1.0f / b_new;
    const float alpha = e_old * *b * r, beta = e_new * r;  // the old sum's share and the token's
    const float dlog_old = *lam - (float)(n_old + 1);      // d/dw of log(the old sum, decayed one step)
    // m' = alpha m + beta v, and d(alpha)/dw = alpha beta dlog_old (the token's log mass, k, has no w)
    *mu = alpha * *mu + alpha * beta * dlog_old * (*m - vv);
    // lam' = alpha dlog_old + n', written so that no two large terms cancel (beta = 1 - alpha)
    *lam = alpha * *lam + (float)(n_old + 1) * ((*n > 0) ? beta : -alpha);
    *m = alpha * *m + beta * vv;
    *b = b_new;
}

// Gradients.  With W_{t,i} the weight of token i in y_t (e^{u+k_t} for i = t, e^{-(|t-i|-1) w
// + k_i} else), D_t the denominator and q_t = gy_t / D_t: dL/dW_{t,i} = q_t (v_i - y_t), so
//   gu   = sum_t q_t e^{u+k_t} (v_t - y_t)
//   gv_i = sum_t q_t W_{t,i}             = q_i e^{u+k_i} + e^{k_i} (G_i + H_i)
//   gk_i = sum_t q_t W_{t,i} (v_i - y_t) = q_i e^{u+k_i} (v_i - y_i) + e^{k_i} (v_i (G_i + H_i) - (G^y_i + H^y_i))
// with G_s = sum_{t>s} e^{-(t-1-s) w} q_t, H_s the same over t < s, and G^y, H^y the same of
// q_t y_t: two more exclusive scans, of q, one from each side.  And gw = sum_t gy_t dy_t/dw,
// forward mode: y_t = sum_p pi_p m_p over its three parts p = past, future, current (pi_p the
// share of the mass, m_p the mean), so
//   dy_t/dw = sum_p pi_p ((m_p - y_t) l_p + mu_p),   l_p = d(log mass_p)/dw (0 for the current token)
// Since sum_p pi_p (m_p - y_t) = 0, any constant may be taken off every l_p; taking off the
// l_p of the heaviest part removes its term, which would otherwise cancel (with w < 0 the far
// tokens dominate: l ~ -T and m_p ~ y_t) -- what the sums' derivatives alone would not avoid.
// Sweep 1 (left to right) parks the past (b, m, s, n, lam, mu).  Sweep 2 (right to left)
// runs the future and G: with the parked past it forms q_t, gu, gw, the direct and future
// parts of gv, gk, and parks q_t = Q e^{-(s_max - n_max w)} over b, s, n.  Sweep 3 (left to
// right) runs H and adds the past parts.
extern "C" __global__ void biwkv_backward(int B, int T, int C,
                                          const float* __restrict__ w, const float* __restrict__ u,
                                          const float* __restrict__ k, const float* __restrict__ v,
                                          const float* __restrict__ y, const float* __restrict__ gy,
                                          float* __restrict__ gw, float* __restrict__ gu,
                                          float* __restrict__ gk, float* __restrict__ gv,
                                          float* __restrict__ work) {
    int batch, c0, lanes;
    if (!thread_channels(B, C, &batch, &c0, &lanes)) return;
    const long long start = ((long long)batch * T) * C + c0;  // element (batch, 0, c0)
    const long long N = (long long)B * T * C;
    // work planes: the past (b, m, s, n, lam, mu) after sweep 1; q_t's (Q, s, n) over b, s, n after sweep 2
    float* const b_work = work;
    float* const m_work = work + N;
    float* const s_work = work + 2 * N;
    int* const n_work = (int*)(work + 3 * N);
    float* const lam_work = work + 4 * N;
    float* const mu_work = work + 5 * N;

    // sweep 1, left to right: the past, mass b e^{s - n w} and mean m, with lam and mu
    float b[WKV_LANES], m[WKV_LANES], s[WKV_LANES], lam[WKV_LANES], mu[WKV_LANES];
    int n[WKV_LANES];
    for (int l = 0; l < lanes; l++) { b[l] = 0.0f; m[l] = 0.0f; s[l] = -1e38f; n[l] = 0; lam[l] = 0.0f; mu[l] = 0.0f; }
    for (int t = 0; t < T; t++) {
        const long long i = start + (long long)t * C;
        for (int l = 0; l < lanes; l++) {
            b_work[i + l] = b[l]; m_work[i + l] = m[l]; s_work[i + l] = s[l]; n_work[i + l] = n[l];
            lam_work[i + l] = lam[l]; mu_work[i + l] = mu[l];
            merge_mean(w[c0 + l], k[i + l], v[i + l], &b[l], &m[l], &s[l], &n[l], &lam[l], &mu[l]);
        }
    }

    // sweep 2, right to left: the future (now in b, m, s, n, lam, mu) and
    // G_t = g e^{sg - ng w}, G^y_t = gyy e^{sg - ng w}
    float g[WKV_LANES], gyy[WKV_LANES], sg[WKV_LANES], sum_gw[WKV_LANES], sum_gu[WKV_LANES];
    int ng[WKV_LANES];
    for (int l = 0; l < lanes; l++) {
        b[l] = 0.0f; m[l] = 0.0f; s[l] = -1e38f; n[l] = 0; lam[l] = 0.0f; mu[l] = 0.0f;
        g[l] = 0.0f; gyy[l] = 0.0f; sg[l] = -1e38f; ng[l] = 0; sum_gw[l] = 0.0f; sum_gu[l] = 0.0f;
    }
    for (int t = T - 1; t >= 0; t--) {
        const long long i = start + (long long)t * C;
        for (int l = 0; l < lanes; l++) {
            const float ww = w[c0 + l], kk = k[i + l], vv = v[i + l], yy = y[i + l];
            const float b_past = b_work[i + l], m_past = m_work[i + l], lam_past = lam_work[i + l];
            const int n_past = n_work[i + l];
            float e_a, e_c, e_u, s_max;
            int n_max;
            rescale3(ww, s_work[i + l], n_past, s[l], n[l], u[c0 + l] + kk, &e_a, &e_c, &e_u, &s_max, &n_max);
            // the three masses over e^{s_max - n_max w}; q_t = Q e^{-(s_max - n_max w)}
            const float mass_a = e_a * b_past, mass_c = e_c * b[l];
            const float Q = gy[i + l] / (mass_a + mass_c + e_u);
            sum_gu[l] += Q * e_u * (vv - yy);
            // dy_t/dw, each l_p less that of the heaviest part
            const bool ref_a = mass_a >= mass_c && mass_a >= e_u, ref_c = !ref_a && mass_c >= e_u;
            const float lam_ref = ref_a ? lam_past : ref_c ? lam[l] : 0.0f;
            const int n_ref = ref_a ? n_past : ref_c ? n[l] : 0;
            const float l_a = (lam_past - lam_ref) - (float)(n_past - n_ref);
            const float l_c = (lam[l] - lam_ref) - (float)(n[l] - n_ref);
            const float l_u = (float)n_ref - lam_ref;
            sum_gw[l] += Q * (mass_a * ((m_past - yy) * l_a + mu_work[i + l]) + mass_c * ((m[l] - yy) * l_c + mu[l])
                              + e_u * (vv - yy) * l_u);
            const float direct = Q * e_u;                                 // q_t e^{u+k_t}
            const float future = expf((kk + sg[l]) - (float)ng[l] * ww);  // e^{k_t} e^{sg - ng w} <= 1 (*)
            gv[i + l] = direct + future * g[l];
            gk[i + l] = direct * (vv - yy) + future * (g[l] * vv - gyy[l]);
            b_work[i + l] = Q; s_work[i + l] = s_max; n_work[i + l] = n_max;

            merge_mean(ww, kk, vv, &b[l], &m[l], &s[l], &n[l], &lam[l], &mu[l]);  // C_{t-1} = e^{-w} C_t + e^{k_t} v_t
            float e_old, e_new;
            merge(ww, &sg[l], &ng[l], -s_max, -n_max, &e_old, &e_new);  // G_{t-1} = e^{-w} G_t + q_t
            g[l] = e_old * g[l] + e_new * Q;
            gyy[l] = e_old * gyy[l] + e_new * Q * yy;
        }
    }
    const long long bc = (long long)batch * C + c0;  // element (batch, c0) of gw, gu
    for (int l = 0; l < lanes; l++) { gw[bc + l] = sum_gw[l]; gu[bc + l] = sum_gu[l]; }

    // sweep 3, left to right: H_t = g e^{sg - ng w}, H^y_t = gyy e^{sg - ng w}, and the past parts
    for (int l = 0; l < lanes; l++) { g[l] = 0.0f; gyy[l] = 0.0f; sg[l] = -1e38f; ng[l] = 0; }
    for (int t = 0; t < T; t++) {
        const long long i = start + (long long)t * C;
        for (int l = 0; l < lanes; l++) {
            const float ww = w[c0 + l], kk = k[i + l], Q = b_work[i + l];
            const float past = expf((kk + sg[l]) - (float)ng[l] * ww);  // e^{k_t} e^{sg - ng w} <= 1 (*)
            gv[i + l] += past * g[l];
            gk[i + l] += past * (g[l] * v[i + l] - gyy[l]);
            float e_old, e_new;
            merge(ww, &sg[l], &ng[l], -s_work[i + l], -n_work[i + l], &e_old, &e_new);  // H_{t+1} = e^{-w} H_t + q_t
            g[l] = e_old * g[l] + e_new * Q;
            gyy[l] = e_old * gyy[l] + e_new * Q * y[i + l];
        }
    }
    // (*) as in wkv_backward: token i is a term of every D_t, so D_t >= e^{-(|t-i|-1) w + k_i},
    // and e^{k_i} times any term of G_i or H_i is at most 1: the split never overflows.
}
