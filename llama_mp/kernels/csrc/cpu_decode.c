/* llama_mp's CPU decode kernels: one new token for each of `rows` sequences on x86-64 with AVX2 and
 * FMA; weights in float32 or bfloat16, all arithmetic in float32. Built on first use by kernels/cpu.py
 * with the system C compiler and called through ctypes.
 *
 * Why C: decoding reads every weight once per token, so it runs at the speed weights stream from
 * memory. Two things keep eager PyTorch well below that on a CPU: about 25 operators per layer at a
 * few microseconds each, and MKL's matrix-vector product, which on the machines we measured streams
 * at ~15 GB/s where a plain loop of dot products over [out, in] rows reaches the ~21 GB/s of a bare
 * memory read. So this file is the math of model.py's decode step written out, two calls per layer:
 *
 *   attention_block: h += incoming; x = rmsnorm(h); q, k, v = x @ wqkv; rotate q, k; append k, v to
 *                    the cache; softmax attention; partial = attention output @ wo
 *   ffn_block:       h += incoming; x = rmsnorm(h); partial = (silu(x @ w1) * (x @ w3)) @ w2
 *   finish:          h += incoming; out = rmsnorm(h)
 *
 * `partial` is this rank's share of a row-parallel product; the ranks sum it (collectives.all_sum) and
 * the sum comes back as the next call's `incoming`. With one rank, `decode` runs the whole step in one
 * call. Weights keep the checkpoint's [out, in] layout, so every output is one contiguous dot product,
 * and every operation follows model.py's order (q is scaled after rotation, the softmax is taken in
 * float32), so the results differ from the eager path only by the rounding of sums. With bfloat16
 * weights the result is that of the float32 model holding the same (widened) weights: half the bytes
 * to stream, and none of the precision lost by rounding activations to bfloat16 between operations.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const float *attention_norm, *ffn_norm;                /* float32 */
    const void *wqkv, *wo, *w13, *w2;                      /* [out, in], float32 or bfloat16 */
    float *cache_k, *cache_v;  /* [max_rows, kv_heads, max_seq_len, head_dim] */
} Layer;

typedef struct {
    /* this rank's share: heads, kv_heads and hidden (FFN features) are per rank */
    int64_t dim, n_layers, heads, kv_heads, head_dim, hidden, max_rows, max_seq_len, threads;
    int64_t bf16;            /* weights and embedding are bfloat16 (else float32) */
    float eps;
    const float *rotation;   /* [max_seq_len, head_dim / 2, 2]: cos and sin of each position and pair */
    const float *norm;       /* final norm weight, float32 */
    const void *embedding;   /* whole embedding table [vocab_total, dim], in the weights' type */
    int64_t vocab_total;
    const Layer *layers;
    /* scratch, max_rows rows each */
    float *x, *qkv, *att, *scores, *ffn, *act;
} Model;

/* Weights may be bfloat16: the upper half of a float32, so widening is a 16-bit shift. Everything
 * else (activations, norms, the cache) is float32. The functions below take `bf16` as a constant
 * from their callers and are inlined, so each loop is compiled once per weight type. */
#define INLINE static inline __attribute__((always_inline))

INLINE __m256 load8(const void *w, int64_t i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)w + i);
    const __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

INLINE float load1(const void *w, int64_t i, int bf16) {
    if (!bf16) return ((const float *)w)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)w)[i] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static float hsum(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

INLINE float dot_any(const float *a, const void *b, int64_t n, int bf16) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {  /* four independent sums keep both FMA units busy */
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b, i, bf16), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b, i + 8, bf16), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), load8(b, i + 16, bf16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), load8(b, i + 24, bf16), s3);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b, i, bf16), s0);
    float total = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; ++i) total += a[i] * load1(b, i, bf16);
    return total;
}

static float dot(const float *a, const float *b, int64_t n) { return dot_any(a, b, n, 0); }

/* Four rows of x (row stride n) against one weight row at once: each weight load feeds four FMAs,
 * which is what makes a few rows (a prompt, a batch) cheaper than four separate passes. */
INLINE void dot4(const float *x, const void *w, int64_t n, float *y, int64_t y_stride, int bf16) {
    __m256 s[8];
    for (int k = 0; k < 8; ++k) s[k] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 w0 = load8(w, i, bf16), w1 = load8(w, i + 8, bf16);
        for (int r = 0; r < 4; ++r) {
            s[2 * r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * n + i), s[2 * r]);
            s[2 * r + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * n + i + 8), s[2 * r + 1]);
        }
    }
    for (int r = 0; r < 4; ++r) {
        float total = hsum(_mm256_add_ps(s[2 * r], s[2 * r + 1]));
        for (int64_t j = i; j < n; ++j) total += x[r * n + j] * load1(w, j, bf16);
        y[r * y_stride] = total;
    }
}

/* Up to this many rows of x share one pass over the weights; their rows then stay in the caches. */
#define ROW_BLOCK 32

INLINE void matvec_any(const float *x, const void *w, float *y, int64_t rows, int64_t in, int64_t out,
                       int64_t threads, int bf16) {
    const int64_t row_bytes = in * (bf16 ? 2 : 4);
    for (int64_t first = 0; first < rows; first += ROW_BLOCK) {
        const int64_t last = first + ROW_BLOCK < rows ? first + ROW_BLOCK : rows;
        #pragma omp parallel for schedule(static) num_threads(threads) if (out * in >= 65536)
        for (int64_t o = 0; o < out; ++o) {
            const void *row = (const char *)w + o * row_bytes;
            int64_t r = first;
            for (; r + 4 <= last; r += 4) dot4(x + r * in, row, in, y + r * out + o, out, bf16);
            for (; r < last; ++r) y[r * out + o] = dot_any(x + r * in, row, in, bf16);
        }
    }
}

/* y[r, o] = x[r, :] . w[o, :] for `rows` rows of x, w float32 or (bf16) bfloat16. Each weight row
 * is read from memory once per block of rows and reused from L1 for each of them; threads take
 * contiguous ranges of output features. */
void matvec(const float *x, const void *w, float *y, int64_t rows, int64_t in, int64_t out, int64_t threads,
            int64_t bf16) {
    if (bf16)
        matvec_any(x, w, y, rows, in, out, threads, 1);
    else
        matvec_any(x, w, y, rows, in, out, threads, 0);
}

static void rmsnorm(float *out, const float *x, const float *weight, int64_t n, float eps) {
    float scale = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * weight[i];
}

static void add_incoming(const Model *m, int64_t rows, float *h, const float *incoming) {
    if (incoming)
        for (int64_t i = 0; i < rows * m->dim; ++i) h[i] += incoming[i];
}

/* Rotate the interleaved pairs (v[2i], v[2i+1]) of `heads` vectors by position `pos`'s angles. */
static void rotate(const Model *m, float *v, int64_t heads, int64_t pos) {
    const float *rot = m->rotation + pos * m->head_dim;
    for (int64_t h = 0; h < heads; ++h, v += m->head_dim)
        for (int64_t i = 0; i < m->head_dim; i += 2) {
            float a = v[i], b = v[i + 1], c = rot[i], s = rot[i + 1];
            v[i] = a * c - b * s;
            v[i + 1] = a * s + b * c;
        }
}

/* Row r's queries against cached positions 0..pos of their kv head: att[r, head] = softmax(q k^T) v. */
static void attend(const Model *m, const Layer *l, int64_t rows, int64_t pos) {
    const int64_t hd = m->head_dim, seq = m->max_seq_len, group = m->heads / m->kv_heads;
    const int64_t qkv_dim = (m->heads + 2 * m->kv_heads) * hd;
    #pragma omp parallel for schedule(static) num_threads(m->threads) if (rows * m->heads * (pos + 1) * hd >= 32768)
    for (int64_t task = 0; task < rows * m->heads; ++task) {
        const int64_t r = task / m->heads, head = task % m->heads;
        const float *q = m->qkv + r * qkv_dim + head * hd;
        const int64_t cache_row = (r * m->kv_heads + head / group) * seq * hd;
        const float *keys = l->cache_k + cache_row, *values = l->cache_v + cache_row;
        float *p = m->scores + task * seq, *out = m->att + (r * m->heads + head) * hd;
        float top = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t <= pos; ++t) {
            p[t] = dot(q, keys + t * hd, hd);
            top = p[t] > top ? p[t] : top;
        }
        for (int64_t t = 0; t <= pos; ++t) total += (p[t] = expf(p[t] - top));
        for (int64_t i = 0; i < hd; ++i) out[i] = 0.0f;
        for (int64_t t = 0; t <= pos; ++t) {
            const float weight = p[t] / total, *v = values + t * hd;
            for (int64_t i = 0; i < hd; ++i) out[i] += weight * v[i];
        }
    }
}

void attention_block(const Model *m, int64_t layer, int64_t rows, int64_t pos, float *h,
                     const float *incoming, float *partial) {
    const Layer *l = m->layers + layer;
    const int64_t hd = m->head_dim, dim = m->dim, seq = m->max_seq_len;
    const int64_t q_dim = m->heads * hd, kv_dim = m->kv_heads * hd, qkv_dim = q_dim + 2 * kv_dim;
    const float scale = (float)(1.0 / sqrt((double)hd));
    add_incoming(m, rows, h, incoming);
    for (int64_t r = 0; r < rows; ++r) rmsnorm(m->x + r * dim, h + r * dim, l->attention_norm, dim, m->eps);
    matvec(m->x, l->wqkv, m->qkv, rows, dim, qkv_dim, m->threads, m->bf16);
    for (int64_t r = 0; r < rows; ++r) {
        float *q = m->qkv + r * qkv_dim, *k = q + q_dim, *v = k + kv_dim;
        rotate(m, q, m->heads + m->kv_heads, pos);  /* q and k are adjacent: rotate them together */
        for (int64_t i = 0; i < q_dim; ++i) q[i] *= scale;
        for (int64_t g = 0; g < m->kv_heads; ++g) {
            const int64_t at = ((r * m->kv_heads + g) * seq + pos) * hd;
            memcpy(l->cache_k + at, k + g * hd, hd * sizeof(float));
            memcpy(l->cache_v + at, v + g * hd, hd * sizeof(float));
        }
    }
    attend(m, l, rows, pos);
    matvec(m->att, l->wo, partial, rows, q_dim, dim, m->threads, m->bf16);
}

void ffn_block(const Model *m, int64_t layer, int64_t rows, float *h, const float *incoming, float *partial) {
    const Layer *l = m->layers + layer;
    const int64_t dim = m->dim, hidden = m->hidden;
    add_incoming(m, rows, h, incoming);
    for (int64_t r = 0; r < rows; ++r) rmsnorm(m->x + r * dim, h + r * dim, l->ffn_norm, dim, m->eps);
    matvec(m->x, l->w13, m->ffn, rows, dim, 2 * hidden, m->threads, m->bf16);  /* w1 rows, then w3 rows */
    for (int64_t r = 0; r < rows; ++r) {
        const float *gate = m->ffn + r * 2 * hidden, *up = gate + hidden;
        float *act = m->act + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) act[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
    matvec(m->act, l->w2, partial, rows, hidden, dim, m->threads, m->bf16);
}

void finish(const Model *m, int64_t rows, float *h, const float *incoming, float *out) {
    add_incoming(m, rows, h, incoming);
    for (int64_t r = 0; r < rows; ++r) rmsnorm(out + r * m->dim, h + r * m->dim, m->norm, m->dim, m->eps);
}

/* h[r] = embedding[tokens[r * stride]]. Returns the first row with an out-of-range id, or -1. */
int64_t embed(const Model *m, const int64_t *tokens, int64_t stride, int64_t rows, float *h) {
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t id = tokens[r * stride];
        if (id < 0 || id >= m->vocab_total) return r;
        for (int64_t i = 0; i < m->dim; ++i) h[r * m->dim + i] = load1(m->embedding, id * m->dim + i, (int)m->bf16);
    }
    return -1;
}

/* The whole step on a single rank (nothing to sum across ranks): out = normed hidden state. */
int64_t decode(const Model *m, const int64_t *tokens, int64_t stride, int64_t rows, int64_t pos, float *h,
               float *partial, float *out) {
    const int64_t bad = embed(m, tokens, stride, rows, h);
    if (bad >= 0) return bad;
    for (int64_t layer = 0; layer < m->n_layers; ++layer) {
        attention_block(m, layer, rows, pos, h, layer ? partial : NULL, partial);
        ffn_block(m, layer, rows, h, partial, partial);
    }
    finish(m, rows, h, partial, out);
    return -1;
}
