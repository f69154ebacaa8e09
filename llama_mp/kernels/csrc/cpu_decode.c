/* llama_mp's CPU decode kernels: one new token for each of `rows` sequences on x86-64, and the matrix
 * products of prompts; weights in float32, bfloat16, int8 or int4, sums in float32. Built on first use
 * by kernels/cpu.py with the system C compiler, five times (AVX-512 with AVX512_BF16 and VNNI, AVX-512
 * with VNNI, AVX-512, AVX2 + FMA with AVX-VNNI, and AVX2 + FMA, see `vf`, `BF16_DOT` and `INT_DOT`
 * below), and called through ctypes. int8 and int4 products may take x quantized to int8 and integer
 * dot products instead (`matvec_q`, "int8 activations").
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
 * float32), so the results differ from the eager path only by the rounding of sums.
 *
 * Precision. A float32 or float16 model computes in float32 throughout: its products are those of
 * the float32 model holding the same (widened, or dequantised) weights, the exact-parity path. When
 * the model's dtype is bfloat16 (embedding_type EMB_BF16, or `round_x` of matvec), the input of every
 * matrix product (x) is rounded to bfloat16 (round to nearest, ties to even) once per call, as
 * PyTorch, Meta's reference and llama.cpp do for bfloat16 models; weights (bfloat16, or int8 / int4
 * levels, which are exact in bfloat16) times bfloat16 x are exact products, and all sums stay float32.
 * Norms, rotary, attention, softmax, the residual stream and the KV cache stay float32. Every build
 * implements the same rule: the AVX2 and plain AVX-512 builds round x to bfloat16 and then use their
 * float32 multiply-adds (the same products; their results differ from the bfloat16-product build only
 * by summation order). Quantized weights give the model holding the dequantised weights, with a half
 * (int8) or a quarter (int4) of bfloat16's bytes to stream.
 *
 * A prompt of many tokens (prefill) is compute-bound instead: `matvec` then takes a register tile of
 * rows x outputs, so each weight vector, once loaded and dequantised, feeds several rows' sums. In
 * float32 its ceiling is the FMA rate (on our 2-core Zen 4, ~60-70 GFLOP/s a core, as MKL's sgemm);
 * the avx512bf16 build's vdpbf16ps does 32 bfloat16 products per instruction (twice the float32
 * FMA's 16), which roughly doubles the tiles' rate for a bfloat16 model, and turns int4 nibbles into
 * bfloat16 weights with one table lookup (vpermw) instead of a widening and a conversion to float32.
 * Measured on the 2-core Zen 4 (32 rows of the 110M shape's matrices, 2 threads): bfloat16 weights
 * ~400-420 GFLOP/s, int8 ~330-370 (weights widened to bfloat16 once per block of outputs), int4 ~280-310:
 * its per-group scales cost a float32 multiply-add per four vdpbf16ps (applied per 128 inputs), which
 * caps it near 80% of bfloat16's rate so long as x keeps bfloat16 precision (llama.cpp's faster Q4_0
 * prompts round x to 8-bit integers and use integer dot products instead: matvec_q, below, when int8_x).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Weight formats (kernels/cpu.py F32 .. INT4). int8: int8 [out, in] and one float32 scale per output row,
 * applied to the finished dot product. int4: uint8 [out, in / 2], in each block of 32 inputs byte j
 * holds input j (low nibble) and input j + 16 (high nibble) as q + 8, and one bfloat16 scale per
 * `group_size` inputs of a row (quant/scheme.py). Integers become float32 (or, in the bfloat16-product
 * path, bfloat16) in registers; all sums are float32. */
enum { F32 = 0, BF16 = 1, INT8 = 2, INT4 = 3 };
/* The embedding table's type (the model dtype): float32, bfloat16 or float16. */
enum { EMB_F32 = 0, EMB_BF16 = 1, EMB_F16 = 2 };

typedef struct {
    const float *attention_norm, *ffn_norm;                /* float32 */
    const void *wqkv, *wo, *w13, *w2;                      /* [out, in] (int4: [out, in / 2]) */
    const void *sqkv, *so, *s13, *s2;                      /* their scales (int8, int4), else NULL */
    float *cache_k, *cache_v;  /* [max_rows, kv_heads, max_seq_len, head_dim] */
} Layer;

typedef struct {
    /* this rank's share: heads, kv_heads and hidden (FFN features) are per rank */
    int64_t dim, n_layers, heads, kv_heads, head_dim, hidden, max_rows, max_seq_len, threads;
    int64_t embedding_type;  /* EMB_* */
    int64_t format, group_size;  /* the layers' weight format and (int4) inputs per scale */
    int64_t int8_x;              /* int8 / int4 weights: products with x quantized to int8 (matvec_q) */
    float eps;
    const float *rotation;   /* [max_seq_len, head_dim / 2, 2]: cos and sin of each position and pair */
    const float *norm;       /* final norm weight, float32 */
    const void *embedding;   /* whole embedding table [vocab_total, dim] */
    int64_t vocab_total;
    const Layer *layers;
    /* scratch, max_rows rows each */
    float *x, *qkv, *att, *scores, *ffn, *act;
} Model;

#define INLINE static inline __attribute__((always_inline))

/* The vector width this file is compiled for: cpu.py builds it with AVX-512 (16 floats a register, 32
 * registers; once more with AVX512_BF16 added, which enables the bfloat16-product path, BF16_DOT) and
 * with AVX2 + FMA (8 floats, 16 registers), and loads the best the CPU runs. Everything but that path
 * is written once over `vf`. TILE_ROWS x TILE_OUTS is the register tile of
 * the matrix product: that many accumulators, plus one weight vector per output and one x vector.
 * int4 takes more rows and fewer outputs: unpacking its weights costs more than loading x, so each
 * unpacked vector should feed more rows (measured on a 2-core Zen 4: 8 x 2 beat 4 x 4 by ~20%). */
#ifdef __AVX512F__
#define VL 16
#define TILE_ROWS(fmt) ((fmt) == INT4 ? 8 : 4)
#define TILE_OUTS(fmt) ((fmt) == INT4 ? 2 : 4)
typedef __m512 vf;
#define vzero _mm512_setzero_ps
#define vload _mm512_loadu_ps
#define vfma _mm512_fmadd_ps
#define vadd _mm512_add_ps
#define vset1 _mm512_set1_ps
INLINE float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#define vstore _mm512_storeu_ps
/* Lane i of the result is the sum of the lanes of v[i], for i < n (n <= 16, constant; the rest count
 * as zero): four rounds of shuffles and adds, each halving the vectors, where a horizontal sum per
 * vector would take 16 serial chains of four. Round 1 adds the 256-bit halves of pairs, round 2 the
 * 128-bit quarters, rounds 3 and 4 the lanes within quarters; the lanes come out transposed, so the
 * inputs go in transposed: t[k] = v[4 (k % 4) + k / 4]. */
INLINE vf hsums(const vf *v, int n) {
    vf t[16], u[8], q[4], p[2];
    for (int k = 0; k < 16; ++k) {
        const int i = 4 * (k % 4) + k / 4;
        t[k] = i < n ? v[i] : vzero();
    }
    for (int k = 0; k < 8; ++k)
        u[k] = vadd(_mm512_shuffle_f32x4(t[2 * k], t[2 * k + 1], 0x44), _mm512_shuffle_f32x4(t[2 * k], t[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; ++k)
        q[k] = vadd(_mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], 0x88), _mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], 0xDD));
    for (int k = 0; k < 2; ++k)
        p[k] = vadd(_mm512_shuffle_ps(q[2 * k], q[2 * k + 1], 0x88), _mm512_shuffle_ps(q[2 * k], q[2 * k + 1], 0xDD));
    return vadd(_mm512_shuffle_ps(p[0], p[1], 0x88), _mm512_shuffle_ps(p[0], p[1], 0xDD));
}
INLINE vf load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
INLINE vf load_i8(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
/* Chunk c (0, 1) of a 32-input int4 block at p (16 bytes), dequantised: inputs 16c..16c+15 times
 * `scale`. vpermps picks each lane's value from a table by the low 4 bits of its index, so the table
 * of the 16 levels (n - 8) * scale turns nibbles straight into weights: no mask, no integer-to-float
 * conversion, no multiply per weight; and each entry is rounded once, exactly as dequantize rounds. */
INLINE vf int4_chunk(const uint8_t *p, int c, float scale) {
    const vf levels = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm512_permutexvar_ps(c ? _mm512_srli_epi32(bytes, 4) : bytes, _mm512_mul_ps(levels, vset1(scale)));
}
#define ISA_BITS 512
#else
#define VL 8
#define TILE_ROWS(fmt) ((fmt) == INT4 ? 6 : 4)
#define TILE_OUTS(fmt) 2
typedef __m256 vf;
#define vzero _mm256_setzero_ps
#define vload _mm256_loadu_ps
#define vfma _mm256_fmadd_ps
#define vadd _mm256_add_ps
#define vset1 _mm256_set1_ps
INLINE float vsum(vf s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#define vstore _mm256_storeu_ps
/* Lane i of the result is the sum of the lanes of v[i], for i < n (n <= 8, constant; the rest count as
 * zero): the AVX-512 build's hsums in three rounds (128-bit halves, then lanes within halves). */
INLINE vf hsums(const vf *v, int n) {
    vf t[8], u[4], q[2];
    for (int k = 0; k < 8; ++k) {
        const int i = 4 * (k % 2) + k / 2;
        t[k] = i < n ? v[i] : vzero();
    }
    for (int k = 0; k < 4; ++k)
        u[k] = vadd(_mm256_permute2f128_ps(t[2 * k], t[2 * k + 1], 0x20), _mm256_permute2f128_ps(t[2 * k], t[2 * k + 1], 0x31));
    for (int k = 0; k < 2; ++k)
        q[k] = vadd(_mm256_shuffle_ps(u[2 * k], u[2 * k + 1], 0x88), _mm256_shuffle_ps(u[2 * k], u[2 * k + 1], 0xDD));
    return vadd(_mm256_shuffle_ps(q[0], q[1], 0x88), _mm256_shuffle_ps(q[0], q[1], 0xDD));
}
INLINE vf load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
INLINE vf load_i8(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
/* Chunk c (0..3) of a 32-input int4 block at p, dequantised: inputs 8c..8c+7 times `scale`, from bytes
 * 8(c % 2).. (low nibbles for c < 2, high for c >= 2); (n - 8) * scale is one fused multiply-add,
 * n * scale - 8 * scale, rounded once, exactly as dequantize rounds. */
INLINE vf int4_chunk(const uint8_t *p, int c, float scale) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * (c & 1))));
    const __m256i nib = c >= 2 ? _mm256_srli_epi32(bytes, 4) : _mm256_and_si256(bytes, _mm256_set1_epi32(15));
    return vfma(_mm256_cvtepi32_ps(nib), vset1(scale), vset1(-8.0f * scale));
}
#define ISA_BITS 256
#endif

#define BLOCK 32            /* inputs per step of the product loops (and per int4 packing block) */
#define CHUNKS (BLOCK / VL) /* vectors per block */

/* Which variant was loaded: 512 (AVX-512) or 256 (AVX2). */
int64_t isa_bits(void) { return ISA_BITS; }

INLINE float widen_bf16(uint16_t bits16) {
    const uint32_t bits = (uint32_t)bits16 << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* One weight row as the product loops read it. `scale` is the row's int8 scale, applied to the
 * finished sum (1 for the float formats); int4 rows carry their per-group scales. */
typedef struct {
    const void *w;
    const uint16_t *group_scales; /* int4: this row's bfloat16 scales */
    float scale;
    int blocks_per_group_log2;    /* int4: block b's scale is group_scales[b >> this] (no division) */
} Row;

INLINE Row weight_row(int fmt, const void *w, const void *scales, int64_t o, int64_t in, int64_t group) {
    Row r = {0, 0, 1.0f, 0};
    switch (fmt) {
    case F32: r.w = (const float *)w + o * in; break;
    case BF16: r.w = (const uint16_t *)w + o * in; break;
    case INT8: r.w = (const int8_t *)w + o * in; r.scale = ((const float *)scales)[o]; break;
    default:
        r.w = (const uint8_t *)w + o * (in / 2);
        r.group_scales = (const uint16_t *)scales + o * (in / group);
        r.blocks_per_group_log2 = __builtin_ctzll((unsigned long long)(group / BLOCK));  /* 32, 64, 128 */
    }
    return r;
}

/* Chunk c of block b of a row, as float32 (int8 unscaled; int4 times its group's scale). */
INLINE vf weight_chunk(int fmt, Row r, int64_t b, int c) {
    const int64_t i = b * BLOCK + c * VL;
    switch (fmt) {
    case F32: return vload((const float *)r.w + i);
    case BF16: return load_bf16((const uint16_t *)r.w + i);
    case INT8: return load_i8((const int8_t *)r.w + i);
    default: return int4_chunk((const uint8_t *)r.w + b * (BLOCK / 2), c, widen_bf16(r.group_scales[b >> r.blocks_per_group_log2]));
    }
}

/* Input i of a row past the last whole block (float formats and int8 only: int4 rows are whole blocks). */
INLINE float weight_at(int fmt, Row r, int64_t i) {
    switch (fmt) {
    case F32: return ((const float *)r.w)[i];
    case BF16: return widen_bf16(((const uint16_t *)r.w)[i]);
    default: return (float)((const int8_t *)r.w)[i];
    }
}

/* Bytes of one 32-input block of a weight row. */
#define BLOCK_BYTES(fmt) ((fmt) == F32 ? 128 : (fmt) == BF16 ? 64 : (fmt) == INT8 ? 32 : 16)

/* The tiles read O weight rows side by side: short interleaved streams that the hardware prefetchers
 * follow poorly (measured on Zen 4: 4 rows x 4 outputs through a float32 [16000, 288] matrix streamed
 * at ~8 GB/s where one row at a time reached ~30). So while at block b, a tile fetches each of its
 * rows PREFETCH_BYTES ahead, continuing into the same row of the next tile (the memory after its own);
 * rows shorter than that are fetched one whole row ahead (the next tile's row, in step). */
#define PREFETCH_BYTES 1024
INLINE void prefetch_ahead(int fmt, int O, const void *first_row, int64_t in, int64_t b) {
    const int64_t row_bytes = in / BLOCK * BLOCK_BYTES(fmt);
    const int64_t at = b * BLOCK_BYTES(fmt) + (row_bytes < PREFETCH_BYTES ? row_bytes : PREFETCH_BYTES);
    const char *base = (const char *)first_row + (at < row_bytes ? at : at - row_bytes + O * row_bytes);
    for (int o = 0; o < O; ++o)
        for (int i = 0; i < BLOCK_BYTES(fmt); i += 64) _mm_prefetch(base + o * row_bytes + i, _MM_HINT_T0);
}

/* The epilogue of a register tile: y[r, o0 + o] = (sum of acc[r][o] + the inputs from `done` on, if
 * any) * row o's scale. The R x O accumulators are summed together, VL at a time (hsums). */
INLINE void store_sums(int fmt, int R, int O, vf acc[8][4], const Row *rows, const float *x, float *y, int64_t o0,
                       int64_t in, int64_t out, int64_t done) {
    float sums[32];
    for (int g = 0; g < R * O; g += VL) {
        vf part[VL];
        for (int i = 0; i < VL && g + i < R * O; ++i) part[i] = acc[(g + i) / O][(g + i) % O];
        vstore(sums + g, hsums(part, R * O - g < VL ? R * O - g : VL));
    }
    for (int r = 0; r < R; ++r)
        for (int o = 0; o < O; ++o) {
            float total = sums[r * O + o];
            for (int64_t i = done; i < in; ++i) total += x[r * in + i] * weight_at(fmt, rows[o], i);
            y[r * out + o0 + o] = total * rows[o].scale;
        }
}

/* The register tile: y[r, o0 + o] = x[r, :] . w[o0 + o, :] for R rows of x and O outputs. Each weight
 * vector is loaded (and dequantised) once and used for all R rows; each x vector once for all O
 * outputs. R and O are constants at every call, so the loops unroll into straight FMAs. */
INLINE void tile(int fmt, int R, int O, const float *x, const void *w, const void *scales, int64_t group,
                 float *y, int64_t o0, int64_t in, int64_t out, int prefetch) {
    vf acc[8][4];  /* [R][O], R and O at most the largest tile */
    Row rows[4];
    for (int o = 0; o < O; ++o) rows[o] = weight_row(fmt, w, scales, o0 + o, in, group);
    for (int r = 0; r < R; ++r)
        for (int o = 0; o < O; ++o) acc[r][o] = vzero();
    const int64_t blocks = in / BLOCK;
    for (int64_t b = 0; b < blocks; ++b) {
        if (prefetch) prefetch_ahead(fmt, O, rows[0].w, in, b);
        for (int c = 0; c < CHUNKS; ++c) {
            vf wv[4];
            for (int o = 0; o < O; ++o) wv[o] = weight_chunk(fmt, rows[o], b, c);
            for (int r = 0; r < R; ++r) {
                const vf xv = vload(x + r * in + b * BLOCK + c * VL);
                for (int o = 0; o < O; ++o) acc[r][o] = vfma(xv, wv[o], acc[r][o]);
            }
        }
    }
    store_sums(fmt, R, O, acc, rows, x, y, o0, in, out, blocks * BLOCK);
}

INLINE float row_dot_int8(const float *x, const int8_t *w, int64_t in, float scale);
INLINE int64_t row_dot_int4_lanes(const float *lanes, Row row, int64_t in, float *total);

/* One row of x against one weight row: the decode step's product, bound by streaming the weights,
 * so the row is read front to back (the hardware prefetcher's favourite) with four independent sums
 * in flight to hide the FMA latency. `lanes`: x rearranged for int4 (see int4_lanes), or NULL. */
INLINE float row_dot(int fmt, const float *x, const float *lanes, const void *w, const void *scales,
                     int64_t group, int64_t o, int64_t in) {
    if (fmt == INT8) return row_dot_int8(x, (const int8_t *)w + o * in, in, ((const float *)scales)[o]);
    const Row row = weight_row(fmt, w, scales, o, in, group);
    vf s[4] = {vzero(), vzero(), vzero(), vzero()};
    float total = 0.0f;
    int64_t b = 0;
    if (fmt == INT4 && lanes) b = row_dot_int4_lanes(lanes, row, in, &total);
    const int64_t blocks = in / BLOCK;
    for (; b + 4 / CHUNKS <= blocks; b += 4 / CHUNKS)
        for (int k = 0; k < 4; ++k)
            s[k] = vfma(vload(x + b * BLOCK + k * VL), weight_chunk(fmt, row, b + k / CHUNKS, k % CHUNKS), s[k]);
    for (; b < blocks; ++b)
        for (int c = 0; c < CHUNKS; ++c)
            s[c] = vfma(vload(x + b * BLOCK + c * VL), weight_chunk(fmt, row, b, c), s[c]);
    total += vsum(vadd(vadd(s[0], s[1]), vadd(s[2], s[3])));
    for (int64_t i = blocks * BLOCK; i < in; ++i) total += x[i] * weight_at(fmt, row, i);
    return total * row.scale;
}

/* row_dot for int8, in 256-bit registers whatever the build: widening bytes to 32-bit lanes is a
 * shuffle, and on Zen 4 the 512-bit form (vpmovsxbd zmm) ran a single-row product ~1.5x slower than
 * two 256-bit ones. Several rows (the register tiles) amortise the widening and keep the wide form. */
INLINE float row_dot_int8(const float *x, const int8_t *w, int64_t in, float scale) {
    __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 32 <= in; i += 32)
        for (int k = 0; k < 4; ++k) {
            const __m256 wk = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + i + 8 * k))));
            s[k] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8 * k), wk, s[k]);
        }
    const __m256 t = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    float total = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    for (; i < in; ++i) total += x[i] * (float)w[i];
    return total * scale;
}

/* int4 against one row of x without widening shuffles (AVX-512 only; the AVX2 build has no `lanes`).
 * 64 bytes of weights (four blocks, 128 inputs) load as 16 lanes of 32 bits; lane l holds bytes
 * 4l..4l+3, and nibble k (shift 4k, mask 15) of every lane is one vector of 16 weights, made by a shift,
 * a mask and a conversion. The inputs those nibbles stand for are scattered, so x is rearranged once per
 * call to match (int4_lanes): lanes[c + 16k + l] is the input of nibble k of lane l in the 128-input
 * chunk c, and after the chunk's 128 values come the 16 sums of each lane's 8 inputs, with which the
 * offset is applied per lane, sum((n - 8) x) = sum(n x) - 8 sum(x), and then each lane's group scale.
 * Returns the blocks done (whole chunks), adding their sum to *total. */
#ifdef __AVX512F__
#define INT4_LANES 1
/* The nibble at bit `shift` of every lane, as float32 (0..15). */
INLINE __m512 nibbles(__m512i v, int shift, __m512i mask) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(shift ? _mm512_srli_epi32(v, shift) : v, mask));
}

INLINE void int4_lanes(const float *x, int64_t in, float *lanes) {
    for (int64_t c = 0; c + 128 <= in; c += 128) {
        float *chunk = lanes + c / 128 * 144;
        for (int l = 0; l < 16; ++l) {
            float sum = 0.0f;
            for (int k = 0; k < 8; ++k) {
                const float v = x[c + (l / 4) * 32 + 4 * (l % 4) + k / 2 + 16 * (k % 2)];
                chunk[16 * k + l] = v;
                sum += v;
            }
            chunk[128 + l] = sum;
        }
    }
}
#define LANES_PER_ROW(in) ((in) / 128 * 144)

INLINE int64_t row_dot_int4_lanes(const float *lanes, Row row, int64_t in, float *total) {
    const __m512i mask = _mm512_set1_epi32(15);
    const __m512i lane_block = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc = _mm512_setzero_ps();
    const int64_t chunks = in / 128;
    for (int64_t c = 0; c < chunks; ++c) {
        const __m512i v = _mm512_loadu_si512((const void *)((const uint8_t *)row.w + c * 64));
        const float *xc = lanes + c * 144;
        __m512 p0 = _mm512_mul_ps(nibbles(v, 0, mask), _mm512_loadu_ps(xc));
        __m512 p1 = _mm512_mul_ps(nibbles(v, 4, mask), _mm512_loadu_ps(xc + 16));
        p0 = _mm512_fmadd_ps(nibbles(v, 8, mask), _mm512_loadu_ps(xc + 32), p0);
        p1 = _mm512_fmadd_ps(nibbles(v, 12, mask), _mm512_loadu_ps(xc + 48), p1);
        p0 = _mm512_fmadd_ps(nibbles(v, 16, mask), _mm512_loadu_ps(xc + 64), p0);
        p1 = _mm512_fmadd_ps(nibbles(v, 20, mask), _mm512_loadu_ps(xc + 80), p1);
        p0 = _mm512_fmadd_ps(nibbles(v, 24, mask), _mm512_loadu_ps(xc + 96), p0);
        p1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 28)), _mm512_loadu_ps(xc + 112), p1);
        const int64_t b = 4 * c;
        const __m128 s4 = _mm_set_ps(widen_bf16(row.group_scales[(b + 3) >> row.blocks_per_group_log2]),
                                     widen_bf16(row.group_scales[(b + 2) >> row.blocks_per_group_log2]),
                                     widen_bf16(row.group_scales[(b + 1) >> row.blocks_per_group_log2]),
                                     widen_bf16(row.group_scales[b >> row.blocks_per_group_log2]));
        const __m512 scale = _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(s4));
        const __m512 sums = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), _mm512_loadu_ps(xc + 128), _mm512_add_ps(p0, p1));
        acc = _mm512_fmadd_ps(sums, scale, acc);
    }
    *total += _mm512_reduce_add_ps(acc);
    return chunks * 4;
}
#else
#define INT4_LANES 0
#define LANES_PER_ROW(in) 0
INLINE void int4_lanes(const float *x, int64_t in, float *lanes) { (void)x, (void)in, (void)lanes; }
INLINE int64_t row_dot_int4_lanes(const float *lanes, Row row, int64_t in, float *total) {
    (void)lanes, (void)row, (void)in, (void)total;
    return 0;
}
#endif

/* Output tile t (TILE_OUTS(fmt) outputs from t * TILE_OUTS(fmt)) for n rows of x: whole register
 * tiles of rows, then the rows short of one by row_dot (with their `lanes`, if any). */
INLINE void output_tile(int fmt, const float *x, const float *lanes, const void *w, const void *scales,
                        int64_t group, float *y, int64_t n, int64_t in, int64_t out, int64_t t) {
    const int R = TILE_ROWS(fmt), O = TILE_OUTS(fmt);
    const int64_t o0 = t * O, end = o0 + O < out ? o0 + O : out;
    int64_t r = 0;
    if (fmt == F32 && n >= 4 && n <= 8) {
        /* 4 to 8 rows of float32 (a batch of decode steps) are bound by streaming the weights, not by
         * the multiply-adds: one weight row at a time against every row of x keeps the read a single
         * front-to-back stream. Measured on the 2-core Zen 4, a 15M model's 8-row step: 5.4 ms against
         * 8.1 ms with the 4 x 4 tile, which reads 4 short rows side by side; prompts keep the tile. */
        for (int64_t o = o0; o < end; ++o)
            if (n == 8) tile(fmt, 8, 1, x, w, scales, group, y, o, in, out, 0);
            else tile(fmt, 4, 1, x, w, scales, group, y, o, in, out, 0);
        r = n == 8 ? 8 : 4;
    } else if (end - o0 == O)
        for (; r + R <= n; r += R) tile(fmt, R, O, x + r * in, w, scales, group, y + r * out, o0, in, out, r == 0);
    else
        for (int64_t o = o0; o < end; ++o)
            for (r = 0; r + R <= n; r += R) tile(fmt, R, 1, x + r * in, w, scales, group, y + r * out, o, in, out, 0);
    for (int64_t k = 0; r < n; ++r, ++k)
        for (int64_t o = o0; o < end; ++o)
            y[r * out + o] = row_dot(fmt, x + r * in, lanes ? lanes + k * LANES_PER_ROW(in) : NULL, w, scales,
                                     group, o, in);
}

/* One function per format, each with its format a constant, so that every branch on it above folds
 * away and the tiles unroll into registers. (The OpenMP loop calls these rather than inlining the
 * generic code: GCC outlines a parallel loop's body before it propagates constants into it, so a
 * format passed down as a variable would stay a variable there, and the tile would live in memory.) */
typedef void (*TileFn)(const float *, const float *, const void *, const void *, int64_t, float *, int64_t,
                       int64_t, int64_t, int64_t);
#define OUTPUT_TILE_OF(FMT)                                                                               \
    static void output_tile_##FMT(const float *x, const float *lanes, const void *w, const void *scales,  \
                                  int64_t group, float *y, int64_t n, int64_t in, int64_t out, int64_t t) { \
        output_tile(FMT, x, lanes, w, scales, group, y, n, in, out, t);                                   \
    }
OUTPUT_TILE_OF(F32)
OUTPUT_TILE_OF(BF16)
OUTPUT_TILE_OF(INT8)
OUTPUT_TILE_OF(INT4)
static const TileFn OUTPUT_TILES[4] = {output_tile_F32, output_tile_BF16, output_tile_INT8, output_tile_INT4};

/* Up to this many rows of x share one pass over the weights; their rows then stay in the caches. */
#define ROW_BLOCK 64
/* A bfloat16 model's single-row (decode) products of int8 and bfloat16 weights: 1 takes the float32
 * path with x rounded (the same products) rather than vdpbf16ps. Measured on the 2-core Zen 4, 110M
 * shape: int8 decode ran at the same speed either way (the widening is the work in both); bfloat16
 * decode, which streams from memory, ran ~10% slower through dot_b (106-112 tok/s against 122-128). */
#ifndef INT8_ROW_FLOAT
#define INT8_ROW_FLOAT 1
#endif
#ifndef BF16_ROW_FLOAT
#define BF16_ROW_FLOAT 1
#endif

/* Rounding x to bfloat16, for a bfloat16 model (see the header): round to nearest, ties to even, as
 * PyTorch's .bfloat16() does (NaN stays NaN). Every build rounds with these integer operations, so all
 * of them multiply by the same values. */
INLINE uint16_t bf16_bits(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* bf16_bits of n floats (x to out), 16 at a time where the build has AVX-512: the same integer steps. */
INLINE void round_bf16(const float *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff), abs = _mm512_set1_epi32(0x7fffffff);
    const __m512i inf = _mm512_set1_epi32(0x7f800000), nan = _mm512_set1_epi32(0x7fc0);
    for (; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512i bits = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, x + i));
        __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(bits, 16), one)));
        r = _mm512_mask_mov_epi32(_mm512_srli_epi32(r, 16), _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, abs), inf), nan);
        _mm256_mask_storeu_epi16(out + i, m, _mm512_cvtepi32_epi16(r));
    }
#endif
    for (; i < n; ++i) out[i] = bf16_bits(x[i]);
}

/* Per-thread scratch, grown as needed and kept (a decode step calls matvec ~50 times): slot 0 for the
 * rounded x (the calling thread), slot 1 for weights widened to bfloat16 (each thread of a product),
 * slot 2 for x quantized to int8 (matvec_q, the calling thread). */
static __thread void *scratch_memory[3];
static __thread size_t scratch_size[3];
static void *scratch_at(int slot, size_t bytes) {
    if (bytes > scratch_size[slot]) {
        free(scratch_memory[slot]);
        scratch_size[slot] = (bytes + 4095) & ~(size_t)4095;
        if (!(scratch_memory[slot] = aligned_alloc(64, scratch_size[slot]))) scratch_size[slot] = 0;
    }
    return scratch_memory[slot];
}
static void *scratch(size_t bytes) { return scratch_at(0, bytes); }

#ifdef __AVX512BF16__
/* The bfloat16 products of the avx512bf16 build: x is rounded to bfloat16 once per call, and weights
 * become bfloat16 exactly (bfloat16 as stored; int8 levels by widening; int4 levels from a table), so
 * vdpbf16ps multiplies 32 pairs a time, exactly, and adds each two neighbours' products into one of 16
 * float32 sums. */
#define BF16_DOT 1
/* Register tiles (rows x outputs) of this path. bfloat16: 4 x 4, its weights are plain loads. int8 and
 * int4: 8 x 2, so that each weight vector converted to bfloat16 (int4: four from one load; int8: a
 * widening and two conversions per 32) feeds 8 rows' sums; int4 keeps 4 x 2 weight vectors and the 2
 * outputs' scale vectors in registers beside the 16 accumulators. Measured on the 2-core Zen 4 (A/B in
 * one process, 32 rows): int8 8 x 2 1.2-1.3x the 4 x 4 tile, int4 8 x 2 ~1.08x 4 x 2; bfloat16 at 8 x 3
 * or 8 x 2 ran 0.85-0.95x its 4 x 4 (which is at vdpbf16ps's rate already). (-D overrides for A/B builds.) */
#ifndef TILE_ROWS_B
#define TILE_ROWS_B(fmt) ((fmt) == BF16 ? 4 : 8)
#endif
#ifndef TILE_OUTS_B
#define TILE_OUTS_B(fmt) ((fmt) == BF16 ? 4 : 2)
#endif
#define INT4_CHUNK 128 /* inputs per 64 bytes of int4 weights */
/* From this many rows, int8 weights are widened to bfloat16 once per block of outputs (into L2) and
 * the bfloat16 tiles run on them, instead of widening in every tile of rows (16-64 rows: 1.05-1.35x;
 * 8 rows: up to 0.65x on the memory-bound [32000, 768]). */
#ifndef INT8_WIDEN_ROWS
#define INT8_WIDEN_ROWS 16
#endif
/* Outputs per block of a thread's work: every tile of rows meets all of a block's output tiles before
 * the next, so x's rows stay in L1 and the block's weights in L2 (+5-10% over a tile of outputs at a time
 * for all rows, where x, 48 KB at 32 x 768, streamed from L2 once per tile). */
#ifndef SUPER_OUTS
#define SUPER_OUTS 64
#endif

INLINE __m512 dpbf16(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

/* Word i: bfloat16 of (i & 15) - 8, the int4 levels twice over, so that vpermw (which reads 5 bits of
 * each index) needs no mask on the nibble in the low bits of a word. */
INLINE __m512i int4_levels_bf16(void) {
    const __m256i t = (__m256i)_mm512_cvtneps_pbh(_mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8));
    return _mm512_inserti64x4(_mm512_castsi256_si512(t), t, 1);
}

/* 32 weights (one block) of a bfloat16 or int8 row as bfloat16 words; `mask`: the valid ones of a row's
 * last, partial block (the rest read as zero), or ~0. int8 levels are exact in bfloat16. */
INLINE __m512i block_bf16(int fmt, const void *row, int64_t b, __mmask32 mask, int tail) {
    if (fmt == BF16) {
        const uint16_t *p = (const uint16_t *)row + b * BLOCK;
        return tail ? _mm512_maskz_loadu_epi16(mask, p) : _mm512_loadu_si512((const void *)p);
    }
    const int8_t *p = (const int8_t *)row + b * BLOCK;
    const __m256i raw = tail ? _mm256_maskz_loadu_epi8(mask, p) : _mm256_loadu_si256((const __m256i *)p);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* 32 inputs of a bfloat16 x row (tail: masked as block_bf16). */
INLINE __m512i x_bf16(const uint16_t *x, int64_t b, __mmask32 mask, int tail) {
    return tail ? _mm512_maskz_loadu_epi16(mask, x + b * BLOCK) : _mm512_loadu_si512((const void *)(x + b * BLOCK));
}

/* x for int4 rows: 64 bytes of weights (a chunk of 128 inputs) load as 32 words, and nibble k of every
 * word (shift 4k, then vpermw from int4_levels_bf16) is one vector of 32 bfloat16 weights; word w's
 * nibble k is input 32 b + j + 16 (k % 2) for byte B = 2 w + k / 2 = 16 b + j. x is rearranged once per
 * call to match: out[128 c + 32 k + w] = that input of chunk c, and zeros past `in` (whole chunks). The
 * pairs vdpbf16ps adds (words 2i, 2i + 1: bytes 4i..4i+3) belong to block i / 4 of the chunk, so sum
 * lane i takes that block's scale. */
INLINE void int4_order_bf16(const uint16_t *x, int64_t in, uint16_t *out) {
    const int64_t padded = (in + INT4_CHUNK - 1) / INT4_CHUNK * INT4_CHUNK;
    /* Output words 0-15 of vector k come from the chunk's first 64 inputs, words 16-31 from the last 64,
     * each at index 2 (w % 8) + 32 ((w / 8) % 2) + 16 (k % 2) + k / 2 of its half: two vpermt2w and a blend. */
    const __m512i base = _mm512_set_epi16(46, 44, 42, 40, 38, 36, 34, 32, 14, 12, 10, 8, 6, 4, 2, 0,
                                          46, 44, 42, 40, 38, 36, 34, 32, 14, 12, 10, 8, 6, 4, 2, 0);
    for (int64_t c = 0; c < padded; c += INT4_CHUNK) {
        __m512i a[4];
        for (int q = 0; q < 4; ++q) {
            const int64_t left = in - c - 32 * q;
            const __mmask32 m = left >= 32 ? ~(__mmask32)0 : left <= 0 ? 0 : (__mmask32)((1u << left) - 1);
            a[q] = _mm512_maskz_loadu_epi16(m, x + c + 32 * q);
        }
        for (int k = 0; k < 4; ++k) {
            const __m512i idx = _mm512_add_epi16(base, _mm512_set1_epi16((short)(16 * (k % 2) + k / 2)));
            const __m512i lo = _mm512_permutex2var_epi16(a[0], idx, a[1]), hi = _mm512_permutex2var_epi16(a[2], idx, a[3]);
            _mm512_storeu_si512((void *)(out + c + 32 * k), _mm512_mask_blend_epi16(0xFFFF0000u, lo, hi));
        }
    }
}

/* One row of x against one weight row, unreduced (the decode step's product): the row is read front
 * to back, a single stream (several rows side by side streamed ~1.6x slower here), with independent
 * sums in flight to cover vdpbf16ps's latency. */
INLINE __m512 dot_b(int fmt, const uint16_t *x, Row row, int64_t in, __m512i levels, __m512i pick) {
    __m512 s0 = vzero(), s1 = vzero();
    if (fmt == INT4) {
        const int log2 = row.blocks_per_group_log2;
        const int64_t blocks = in / BLOCK, chunks = (blocks + 3) / 4, groups = in >> log2 >> 5;
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t left = blocks - 4 * c;
            const __mmask64 bytes = left >= 4 ? ~(__mmask64)0 : (((__mmask64)1 << (16 * left)) - 1);
            const int64_t g0 = (4 * c) >> log2, here = (4 >> log2) < groups - g0 ? (4 >> log2) : groups - g0;
            const uint8_t *p = (const uint8_t *)row.w + c * 64;
            const __m512i v = left >= 4 ? _mm512_loadu_si512((const void *)p) : _mm512_maskz_loadu_epi8(bytes, p);
            const __m128i sc = _mm_maskz_loadu_epi16((__mmask8)((1u << here) - 1), row.group_scales + g0);
            const __m512 scale = (__m512)_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, pick, _mm512_castsi128_si512(sc));
            const uint16_t *xc = x + c * INT4_CHUNK;
            __m512 p0 = dpbf16(vzero(), _mm512_loadu_si512((const void *)xc), _mm512_permutexvar_epi16(v, levels));
            __m512 p1 = dpbf16(vzero(), _mm512_loadu_si512((const void *)(xc + 32)),
                               _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), levels));
            p0 = dpbf16(p0, _mm512_loadu_si512((const void *)(xc + 64)), _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), levels));
            p1 = dpbf16(p1, _mm512_loadu_si512((const void *)(xc + 96)), _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), levels));
            if (c & 1) s1 = vfma(vadd(p0, p1), scale, s1);
            else s0 = vfma(vadd(p0, p1), scale, s0);
        }
        return vadd(s0, s1);
    }
    const int64_t blocks = in / BLOCK;
    const __mmask32 tail = (__mmask32)((1ull << (in % BLOCK)) - 1);
    __m512 s2 = vzero(), s3 = vzero();
    int64_t b = 0;
    for (; b + 4 <= blocks; b += 4) {
        s0 = dpbf16(s0, x_bf16(x, b, tail, 0), block_bf16(fmt, row.w, b, tail, 0));
        s1 = dpbf16(s1, x_bf16(x, b + 1, tail, 0), block_bf16(fmt, row.w, b + 1, tail, 0));
        s2 = dpbf16(s2, x_bf16(x, b + 2, tail, 0), block_bf16(fmt, row.w, b + 2, tail, 0));
        s3 = dpbf16(s3, x_bf16(x, b + 3, tail, 0), block_bf16(fmt, row.w, b + 3, tail, 0));
    }
    for (; b < blocks; ++b) s0 = dpbf16(s0, x_bf16(x, b, tail, 0), block_bf16(fmt, row.w, b, tail, 0));
    if (in % BLOCK) s1 = dpbf16(s1, x_bf16(x, blocks, tail, 1), block_bf16(fmt, row.w, blocks, tail, 1));
    return vadd(vadd(s0, s1), vadd(s2, s3));
}

#define INT4_PICK_BASE _mm512_set_epi16(3, 0, 3, 0, 3, 0, 3, 0, 2, 0, 2, 0, 2, 0, 2, 0, \
                                        1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)

/* The register tile of the bfloat16 products: y[r, o0 + o] = x[r] . w[o0 + o] for R rows of x (bfloat16,
 * `xs` apart; int4: in int4_order_bf16's order) and O outputs; a single row takes the outputs one after
 * the other (dot_b) and sums them together. */
INLINE void tile_b(int fmt, int R, int O, const uint16_t *x, int64_t xs, const void *w, const void *scales,
                   int64_t group, float *y, int64_t o0, int64_t in, int64_t out, int prefetch) {
    vf acc[8][4];
    Row rows[4];
    for (int o = 0; o < O; ++o) rows[o] = weight_row(fmt, w, scales, o0 + o, in, group);
    if (R == 1) {
        const __m512i pick = _mm512_srl_epi16(INT4_PICK_BASE, _mm_cvtsi32_si128(rows[0].blocks_per_group_log2));
        for (int o = 0; o < O; ++o) acc[0][o] = dot_b(fmt, x, rows[o], in, int4_levels_bf16(), pick);
        store_sums(fmt, R, O, acc, rows, NULL, y, o0, in, out, in);
        return;
    }
    for (int r = 0; r < R; ++r)
        for (int o = 0; o < O; ++o) acc[r][o] = vzero();
    if (fmt == INT4) {
        const __m512i levels = int4_levels_bf16();
        /* sum lane i's scale: bfloat16 word 2i + 1 = scale (i / 4) >> log2 of those loaded (word 2i: 0) */
        const int log2 = rows[0].blocks_per_group_log2;
        const __m512i pick = _mm512_srl_epi16(INT4_PICK_BASE, _mm_cvtsi32_si128(log2));
        const int64_t blocks = in / BLOCK, chunks = (blocks + 3) / 4, groups = in / group;
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t left = blocks - 4 * c;  /* blocks of this chunk: 4 but in the last */
            const __mmask64 bytes = left >= 4 ? ~(__mmask64)0 : (((__mmask64)1 << (16 * left)) - 1);
            const int64_t g0 = (4 * c) >> log2, scales_here = (4 >> log2) < groups - g0 ? (4 >> log2) : groups - g0;
            __m512i v[4];
            __m512 scale[4];
            for (int o = 0; o < O; ++o) {
                const uint8_t *p = (const uint8_t *)rows[o].w + c * 64;
                v[o] = left >= 4 ? _mm512_loadu_si512((const void *)p) : _mm512_maskz_loadu_epi8(bytes, p);
                const __m128i s = _mm_maskz_loadu_epi16((__mmask8)((1u << scales_here) - 1), rows[o].group_scales + g0);
                scale[o] = (__m512)_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, pick, _mm512_castsi128_si512(s));
            }
            if (prefetch)
                for (int o = 0; o < O; ++o) _mm_prefetch((const char *)rows[o].w + c * 64 + (in / 2 < 512 ? O * (in / 2) : 512), _MM_HINT_T0);
            __m512i wq[4][4];  /* [o][k]: nibble k of every word of output o's chunk, as bfloat16 */
            for (int o = 0; o < O; ++o) {
                wq[o][0] = _mm512_permutexvar_epi16(v[o], levels);
                for (int k = 1; k < 4; ++k) wq[o][k] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v[o], 4 * k), levels);
            }
            for (int r = 0; r < R; ++r) {
                const uint16_t *xr = x + r * xs + c * INT4_CHUNK;
                for (int o = 0; o < O; ++o) {
                    /* one chain of four products, then the lanes' scales: 5 vector operations per 128
                     * inputs (R x O chains are in flight to cover the latency) */
                    __m512 p = dpbf16(vzero(), _mm512_loadu_si512((const void *)xr), wq[o][0]);
                    for (int k = 1; k < 4; ++k) p = dpbf16(p, _mm512_loadu_si512((const void *)(xr + 32 * k)), wq[o][k]);
                    acc[r][o] = vfma(p, scale[o], acc[r][o]);
                }
            }
        }
    } else {
        const int64_t blocks = in / BLOCK;
        const __mmask32 tail = (__mmask32)((1ull << (in % BLOCK)) - 1);
#define TILE_B_STEP(B, TAIL)                                                                           \
        do {                                                                                           \
            __m512i wv[4];                                                                             \
            for (int o = 0; o < O; ++o) wv[o] = block_bf16(fmt, rows[o].w, (B), tail, (TAIL));         \
            for (int r = 0; r < R; ++r) {                                                              \
                const __m512i xv = x_bf16(x + r * xs, (B), tail, (TAIL));                              \
                for (int o = 0; o < O; ++o) acc[r][o] = dpbf16(acc[r][o], xv, wv[o]);                  \
            }                                                                                          \
        } while (0)
        for (int64_t b = 0; b < blocks; ++b) {
            if (prefetch) prefetch_ahead(fmt, O, rows[0].w, in, b);
            TILE_B_STEP(b, 0);
        }
        if (in % BLOCK) TILE_B_STEP(blocks, 1);
#undef TILE_B_STEP
    }
    store_sums(fmt, R, O, acc, rows, NULL, y, o0, in, out, in);
}

/* K rows of x against output tile t (O outputs from t * O; the last, partial tile one output at a time). */
INLINE void tile_at(int fmt, int K, const uint16_t *x, int64_t xs, const void *w, const void *scales, int64_t group,
                    float *y, int64_t in, int64_t out, int64_t t, int prefetch) {
    const int O = TILE_OUTS_B(fmt);
    const int64_t o0 = t * O;
    if (o0 + O <= out) tile_b(fmt, K, O, x, xs, w, scales, group, y, o0, in, out, prefetch);
    else
        for (int64_t o = o0; o < out; ++o) tile_b(fmt, K, 1, x, xs, w, scales, group, y, o, in, out, 0);
}

/* int8 rows o0 .. o1 - 1 as bfloat16 (exact) into wb, [o1 - o0, in]. */
INLINE void widen_int8_rows(const int8_t *w, int64_t o0, int64_t o1, int64_t in, uint16_t *wb) {
    const int64_t n = (o1 - o0) * in;
    const int8_t *p = w + o0 * in;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(p + i));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
        _mm512_storeu_si512((void *)(wb + i), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    for (; i < n; ++i) wb[i] = bf16_bits((float)p[i]);
}

/* All n rows of x against output tiles t0 .. t1 - 1: for each register tile of rows (then one smaller
 * tile), every output tile in turn. The rows' x stays in L1 while it meets every tile's weights, and
 * those weights (t1 - t0 tiles, a few dozen KB) stay in L2 from one tile of rows to the next. */
INLINE void row_tiles_b(int fmt, const uint16_t *x, int64_t xs, const void *w, const void *scales, int64_t group,
                        float *y, int64_t n, int64_t in, int64_t out, int64_t t0, int64_t t1);

INLINE void output_tiles_b(int fmt, const uint16_t *x, int64_t xs, const void *w, const void *scales, int64_t group,
                           float *y, int64_t n, int64_t in, int64_t out, int64_t t0, int64_t t1) {
    if (fmt == INT8 && n >= INT8_WIDEN_ROWS) {
        /* Many rows: widen the block's int8 rows to bfloat16 once (into L2), run the bfloat16 tiles on
         * them, and scale the sums after (the same multiply as store_sums's: sum, then times the scale). */
        const int64_t o0 = t0 * TILE_OUTS_B(INT8), o1 = t1 * TILE_OUTS_B(INT8) < out ? t1 * TILE_OUTS_B(INT8) : out;
        uint16_t *wb = scratch_at(1, (size_t)((o1 - o0) * in) * sizeof(uint16_t));
        if (!wb) abort();
        widen_int8_rows((const int8_t *)w, o0, o1, in, wb);
        const uint16_t *rows = (const uint16_t *)((uintptr_t)wb - (uintptr_t)(o0 * in) * sizeof(uint16_t));  /* row o at rows + o * in */
        const int64_t b0 = o0 / TILE_OUTS_B(BF16), b1 = (o1 + TILE_OUTS_B(BF16) - 1) / TILE_OUTS_B(BF16);
        row_tiles_b(BF16, x, xs, rows, NULL, 0, y, n, in, out, b0, b1);
        const float *scale = (const float *)scales;
        for (int64_t r = 0; r < n; ++r)
            for (int64_t o = o0; o < o1; o += 16) {
                const __mmask16 m = o1 - o >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (o1 - o)) - 1);
                float *yo = y + r * out + o;
                _mm512_mask_storeu_ps(yo, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, yo), _mm512_maskz_loadu_ps(m, scale + o)));
            }
        return;
    }
    row_tiles_b(fmt, x, xs, w, scales, group, y, n, in, out, t0, t1);
}

INLINE void row_tiles_b(int fmt, const uint16_t *x, int64_t xs, const void *w, const void *scales, int64_t group,
                        float *y, int64_t n, int64_t in, int64_t out, int64_t t0, int64_t t1) {
    const int R = TILE_ROWS_B(fmt);
    int64_t r = 0;
    for (; r + R <= n; r += R)
        for (int64_t t = t0; t < t1; ++t) tile_at(fmt, R, x + r * xs, xs, w, scales, group, y + r * out, in, out, t, r == 0);
    x += r * xs, y += r * out;
    const int pf = r == 0;
    switch (n - r) {
#define TILE_B_CASE(K)                                                                                        \
    case K:                                                                                                   \
        if (K < R)                                                                                            \
            for (int64_t t = t0; t < t1; ++t) tile_at(fmt, K < R ? K : 1, x, xs, w, scales, group, y, in, out, t, pf); \
        break;
    TILE_B_CASE(1) TILE_B_CASE(2) TILE_B_CASE(3) TILE_B_CASE(4) TILE_B_CASE(5) TILE_B_CASE(6) TILE_B_CASE(7)
#undef TILE_B_CASE
    default: break;
    }
}

typedef void (*TileFnB)(const uint16_t *, int64_t, const void *, const void *, int64_t, float *, int64_t, int64_t,
                        int64_t, int64_t, int64_t);
#define OUTPUT_TILE_B_OF(FMT)                                                                              \
    static void output_tile_b_##FMT(const uint16_t *x, int64_t xs, const void *w, const void *scales,     \
                                    int64_t group, float *y, int64_t n, int64_t in, int64_t out, int64_t t0, \
                                    int64_t t1) {                                                          \
        output_tiles_b(FMT, x, xs, w, scales, group, y, n, in, out, t0, t1);                               \
    }
OUTPUT_TILE_B_OF(BF16)
OUTPUT_TILE_B_OF(INT8)
OUTPUT_TILE_B_OF(INT4)
static const TileFnB OUTPUT_TILES_B[4] = {NULL, output_tile_b_BF16, output_tile_b_INT8, output_tile_b_INT4};

/* matvec's bfloat16-product path (formats BF16, INT8, INT4). */
static void matvec_b(const float *x, const void *w, const void *scales, float *y, int64_t rows, int64_t in,
                     int64_t out, int64_t threads, int64_t format, int64_t group) {
    const int64_t xs = format == INT4 ? (in + INT4_CHUNK - 1) / INT4_CHUNK * INT4_CHUNK : in;
    uint16_t *xb = scratch((size_t)(rows * xs + (format == INT4 ? in : 0)) * sizeof(uint16_t));
    if (!xb) abort();
    for (int64_t r = 0; r < rows; ++r) {
        uint16_t *row = format == INT4 ? xb + rows * xs : xb + r * in;
        round_bf16(x + r * in, in, row);
        if (format == INT4) int4_order_bf16(row, in, xb + r * xs);
    }
    const TileFnB fn = OUTPUT_TILES_B[format];
    const int64_t tiles = (out + TILE_OUTS_B(format) - 1) / TILE_OUTS_B(format);
    const int64_t per = (SUPER_OUTS + TILE_OUTS_B(format) - 1) / TILE_OUTS_B(format);  /* tiles a block */
    const int64_t supers = (tiles + per - 1) / per;
    for (int64_t first = 0; first < rows; first += ROW_BLOCK) {
        const int64_t n = rows - first < ROW_BLOCK ? rows - first : ROW_BLOCK;
        #pragma omp parallel for schedule(static) num_threads(threads) if (out * in >= 65536)
        for (int64_t k = 0; k < supers; ++k)
            fn(xb + first * xs, xs, w, scales, group, y + first * out, n, in, out, k * per,
               (k + 1) * per < tiles ? (k + 1) * per : tiles);
    }
}
#else
#define BF16_DOT 0
static void matvec_b(const float *x, const void *w, const void *scales, float *y, int64_t rows, int64_t in,
                     int64_t out, int64_t threads, int64_t format, int64_t group) {
    (void)x, (void)w, (void)scales, (void)y, (void)rows, (void)in, (void)out, (void)threads, (void)format, (void)group;
}
#endif

/* Whether this build multiplies bfloat16 by bfloat16 (vdpbf16ps): 1 in the avx512bf16 build. */
int64_t bf16_dot(void) { return BF16_DOT; }

/* ---- int8 activations: integer dot products for int8 and int4 weights ----
 *
 * With `int8_x` (cpu.py's LLAMA_MP_CPU_ACTIVATIONS), a product of int8 or int4 weights quantizes x once
 * per call, as llama.cpp's Q8_0 does: per block of 32 inputs of a row, d = max|x| / 127 (float32),
 * q = round(x / d) by x * (1 / d) rounded to nearest even, q in [-127, 127], and zeros past `in`. Every
 * output row then takes integer dot products per block: int8 weights w (their row's float32 scale s)
 * give y = s * sum_b d_b * sum_i w_i q_i; int4 weights n = q + 8 (0..15, the stored nibbles) with group
 * scales g give y = sum_b g_b d_b (sum_i n_i q_i - 8 sum_i q_i), the 8 sum q of each block computed once
 * per row of x (`c` below, 8 d_b sum q, a float32) and applied after the blocks as one dot product with
 * the row's scales. The block sums are exact integers (int32); the scaling and the sums across blocks
 * are float32. The integer products take 32 bytes at a time in 256-bit registers in every build:
 * vpdpbusd (AVX512-VNNI with VL, or AVX-VNNI), else vpmaddubsw + vpmaddwd (AVX2), unsigned bytes times
 * signed bytes: int4 nibbles are unsigned as stored; int8 weights give |w| and q with w's sign
 * (vpsignb), whose products are w q. vpmaddubsw adds pairs with int16 saturation, which none of these
 * reach (|w| <= 128 with |q| <= 127: 2 x 128 x 127 = 32512; nibbles: 2 x 15 x 127), so every build's
 * block sums are the same integers. Non-finite x (inf, NaN) in a block makes its d NaN, so the output
 * is NaN as in the float path. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define INT_DOT 3
INLINE __m256i dot_u8s8(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
#elif defined(__AVXVNNI__)
#define INT_DOT 2
INLINE __m256i dot_u8s8(__m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s); }
#else
#define INT_DOT 1
INLINE __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
#endif
/* Which integer dot product this build uses: 3 AVX512-VNNI, 2 AVX-VNNI, 1 AVX2 (vpmaddubsw). */
int64_t int_dot(void) { return INT_DOT; }

#define QBLOCK 32
/* Blocks of a quantized x row, padded to a multiple of 8 (zeros), so that loops may take 8 at a time. */
#define QBLOCKS(in) (((in) + 8 * QBLOCK - 1) / (8 * QBLOCK) * 8)

INLINE float hsum256(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* One row of x (in floats) as QBLOCKS(in) blocks: q [QBLOCKS * 32] int8, d and c [QBLOCKS] (c = 8 d sum q). */
static void quantize_x_row(const float *x, int64_t in, int8_t *q, float *d, float *c) {
    const int64_t blocks = QBLOCKS(in), full = in / QBLOCK;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(3.402823466e38f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < blocks; ++b) {
        float v[QBLOCK];
        const float *p = x + b * QBLOCK;
        if (b >= full) {  /* the partial last block, and the padding */
            const int64_t n = in - b * QBLOCK > 0 ? in - b * QBLOCK : 0;
            for (int i = 0; i < QBLOCK; ++i) v[i] = i < n ? p[i] : 0.0f;
            p = v;
        }
        __m256 x0 = _mm256_loadu_ps(p), x1 = _mm256_loadu_ps(p + 8), x2 = _mm256_loadu_ps(p + 16), x3 = _mm256_loadu_ps(p + 24);
        __m256 a0 = _mm256_and_ps(x0, absmask), a1 = _mm256_and_ps(x1, absmask);
        __m256 a2 = _mm256_and_ps(x2, absmask), a3 = _mm256_and_ps(x3, absmask);
        const __m256 bad = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(a0, big, _CMP_NLE_UQ), _mm256_cmp_ps(a1, big, _CMP_NLE_UQ)),
                                        _mm256_or_ps(_mm256_cmp_ps(a2, big, _CMP_NLE_UQ), _mm256_cmp_ps(a3, big, _CMP_NLE_UQ)));
        const __m256 m = _mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        const float scale = _mm256_movemask_ps(bad) ? NAN : amax / 127.0f;
        const float inv = scale != 0.0f && scale == scale ? 1.0f / scale : 0.0f;
        const __m256 iv = _mm256_set1_ps(inv);
        /* x * (1 / d) rounded to nearest even (the default rounding mode), |q| <= 127: no saturation below */
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(x0, iv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(x1, iv));
        const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(x2, iv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(x3, iv));
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + b * QBLOCK), _mm256_permutevar8x32_epi32(packed, order));
        const __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
        d[b] = scale;
        c[b] = scale * (float)(8 * _mm_cvtsi128_si32(t));
    }
}

/* x quantized: row r's blocks at q + r * QBLOCKS(in) * 32, its scales at d + r * QBLOCKS(in) (and c). */
typedef struct {
    const int8_t *q;
    const float *d, *c;
    int64_t blocks;  /* QBLOCKS(in), the stride of d and c; q's is blocks * 32 */
} QX;

/* The 32 unsigned nibbles (q + 8) of int4 block b of a row, in input order: low nibbles of its 16 bytes
 * are inputs 0..15, high ones 16..31. */
INLINE __m256i int4_block_u8(const uint8_t *row, int64_t b) {
    /* the 16 bytes in both halves (one load), the upper half shifted by 4: each byte's high nibble */
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(row + b * (QBLOCK / 2))));
    const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    return _mm256_and_si256(_mm256_srlv_epi32(both, shift), _mm256_set1_epi8(15));
}

/* 32 int8 weights of block b (the last, partial block of a row read into zeros: q is zero there too). */
INLINE __m256i int8_block(const int8_t *row, int64_t b, int64_t in) {
    if ((b + 1) * QBLOCK <= in) return _mm256_loadu_si256((const __m256i *)(row + b * QBLOCK));
    int8_t tail[QBLOCK] = {0};
    memcpy(tail, row + b * QBLOCK, (size_t)(in - b * QBLOCK));
    return _mm256_loadu_si256((const __m256i *)tail);
}

/* int4: the offset term sum_b g_b c_b of a row of x (c) and a weight row's group scales. */
INLINE float int4_offset(const float *c, const uint16_t *gs, int log2, int64_t blocks) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    if (log2 == 0)
        for (; b + 8 <= blocks; b += 8) {
            const __m256 g = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(gs + b))), 16));
            acc = _mm256_fmadd_ps(g, _mm256_loadu_ps(c + b), acc);
        }
    float total = hsum256(acc);
    for (; b < blocks; ++b) total += widen_bf16(gs[b >> log2]) * c[b];
    return total;
}

/* The 8 int32 lanes of each of s[0..7] summed: lane k of the result is the sum of s[k]'s lanes. */
INLINE __m256i hsums_epi32(const __m256i *s) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(s[4], s[5]), _mm256_hadd_epi32(s[6], s[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* The group scales of blocks b..b+7 of an int4 row as float32 (block k's is gs[(b + k) >> log2]). */
INLINE __m256 int4_scales8(const uint16_t *gs, int64_t b, int log2) {
    const uint16_t *p = gs + (b >> log2);
    const __m128i raw = log2 == 0 ? _mm_loadu_si128((const __m128i *)p)
                        : log2 == 1 ? _mm_loadl_epi64((const __m128i *)p) : _mm_cvtsi32_si128(*(const int32_t *)p);
    const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16);
    const __m256i pick = _mm256_srlv_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(log2));
    return _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(wide, pick));
}

/* One int4 row against one row of quantized x (the decode step's product), eight blocks at a time: their
 * eight block sums are reduced to one vector (a block a lane), so the conversion, the offset and the
 * scales (x's d, the row's groups) take one vector operation each per eight blocks. The row is read
 * front to back, a single stream. */
INLINE float qrow_int4(const QX *x, const uint8_t *row, const uint16_t *gs, int log2, int64_t blocks) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= blocks; b += 8) {
        __m256i s[8];
        /* two lines 2 KB ahead (into the next rows, which follow this one): 1.06x (quartiles 1.03-1.09)
         * the int4 decode products without on a 2-core Zen 4, A/B alternating in one process (int8's
         * qrow_int8, measured likewise, gained nothing from it) */
        _mm_prefetch((const char *)row + b * (QBLOCK / 2) + 2048, _MM_HINT_T0);
        _mm_prefetch((const char *)row + b * (QBLOCK / 2) + 2048 + 64, _MM_HINT_T0);
        for (int k = 0; k < 8; ++k)
            s[k] = dot_u8s8(int4_block_u8(row, b + k), _mm256_loadu_si256((const __m256i *)(x->q + (b + k) * QBLOCK)));
        /* per block: d (sum n q) - 8 d sum q, times the group's scale */
        const __m256 t = _mm256_fmsub_ps(_mm256_cvtepi32_ps(hsums_epi32(s)), _mm256_loadu_ps(x->d + b), _mm256_loadu_ps(x->c + b));
        acc = _mm256_fmadd_ps(t, int4_scales8(gs, b, log2), acc);
    }
    float total = hsum256(acc);
    for (; b < blocks; ++b) {
        const __m256i s = dot_u8s8(int4_block_u8(row, b), _mm256_loadu_si256((const __m256i *)(x->q + b * QBLOCK)));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
        total += ((float)_mm_cvtsi128_si32(t) * x->d[b] - x->c[b]) * widen_bf16(gs[b >> log2]);
    }
    return total;
}

/* int8 weights against one row of quantized x, as qrow_int4: eight blocks' integer sums reduced to one
 * vector (a block a lane) and scaled by x's eight d at once, where qtile's single row converts and
 * scales every block; then the row's scale. */
INLINE float qrow_int8(const QX *x, const int8_t *row, float scale, int64_t in) {
    const int64_t full = in / QBLOCK, blocks = (in + QBLOCK - 1) / QBLOCK;
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= full; b += 8) {
        __m256i s[8];
        for (int k = 0; k < 8; ++k) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(row + (b + k) * QBLOCK));
            s[k] = dot_u8s8(_mm256_abs_epi8(wv), _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x->q + (b + k) * QBLOCK)), wv));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsums_epi32(s)), _mm256_loadu_ps(x->d + b), acc);
    }
    float total = hsum256(acc);
    for (; b < blocks; ++b) {
        const __m256i wv = int8_block(row, b, in);
        const __m256i s = dot_u8s8(_mm256_abs_epi8(wv), _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x->q + b * QBLOCK)), wv));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
        total += (float)_mm_cvtsi128_si32(t) * x->d[b];
    }
    return total * scale;
}

/* The register tile of the integer products: y[r, o0 + o] for R rows of quantized x and O weight rows.
 * Each weight block is loaded (int4: unpacked; int8: its |w|) once for all R rows, each x block once for
 * all O outputs; per pair a dot product (2 instructions, 1 with VNNI; int8: a vpsignb more), a conversion
 * and one or two float multiplies. A single row (R == 1, the decode step) keeps four blocks in flight. */
INLINE void qtile(int fmt, int R, int O, const QX *x, const void *w, const void *scales, int64_t group,
                  float *y, int64_t o0, int64_t in, int64_t out) {
    __m256 acc[4][2][4];  /* [R][O][chain]: R * O * K accumulators, K = 4 for one row and one output */
    const int K = R == 1 && O == 1 ? 4 : 1;
    const int64_t blocks = (in + QBLOCK - 1) / QBLOCK, rb = x->blocks * QBLOCK;
    const int log2 = fmt == INT4 ? __builtin_ctzll((unsigned long long)(group / QBLOCK)) : 0;
    const void *row[2];
    const uint16_t *gs[2];
    for (int o = 0; o < O; ++o) {
        row[o] = fmt == INT4 ? (const void *)((const uint8_t *)w + (o0 + o) * (in / 2)) : (const void *)((const int8_t *)w + (o0 + o) * in);
        gs[o] = fmt == INT4 ? (const uint16_t *)scales + (o0 + o) * (in / group) : NULL;
    }
    for (int r = 0; r < R; ++r)
        for (int o = 0; o < O; ++o)
            for (int k = 0; k < K; ++k) acc[r][o][k] = _mm256_setzero_ps();
#define QTILE_STEP(B, k)                                                                                     \
    do {                                                                                                     \
        __m256i wv[2], uv[2];                                                                                \
        __m256 g[2];                                                                                         \
        for (int o = 0; o < O; ++o) {                                                                        \
            if (fmt == INT4) {                                                                               \
                uv[o] = int4_block_u8((const uint8_t *)row[o], (B));                                         \
                g[o] = _mm256_set1_ps(widen_bf16(gs[o][(B) >> log2]));                                       \
            } else {                                                                                         \
                wv[o] = int8_block((const int8_t *)row[o], (B), in);                                         \
                uv[o] = _mm256_abs_epi8(wv[o]);                                                              \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < R; ++r) {                                                                        \
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(x->q + r * rb + (B) * QBLOCK));         \
            const __m256 dv = _mm256_broadcast_ss(x->d + r * x->blocks + (B));                               \
            for (int o = 0; o < O; ++o) {                                                                    \
                const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(uv[o], fmt == INT4 ? xv : _mm256_sign_epi8(xv, wv[o]))); \
                acc[r][o][k] = fmt == INT4 ? _mm256_fmadd_ps(_mm256_mul_ps(p, dv), g[o], acc[r][o][k])       \
                                           : _mm256_fmadd_ps(p, dv, acc[r][o][k]);                           \
            }                                                                                                \
        }                                                                                                    \
    } while (0)
    int64_t b = 0;
    if (K == 4)
        for (; b + 4 <= blocks; b += 4) {
            QTILE_STEP(b, 0);
            QTILE_STEP(b + 1, 1);
            QTILE_STEP(b + 2, 2);
            QTILE_STEP(b + 3, 3);
        }
    for (; b < blocks; ++b) QTILE_STEP(b, 0);
#undef QTILE_STEP
    for (int r = 0; r < R; ++r)
        for (int o = 0; o < O; ++o) {
            __m256 s = acc[r][o][0];
            for (int k = 1; k < K; ++k) s = _mm256_add_ps(s, acc[r][o][k]);
            float total = hsum256(s);
            if (fmt == INT4) total -= int4_offset(x->c + r * x->blocks, gs[o], log2, blocks);
            else total *= ((const float *)scales)[o0 + o];
            y[r * out + o0 + o] = total;
        }
}

/* Register tile sizes of the integer products (AVX2's 16 registers: R x O accumulators, O weight
 * vectors and their |w| or scales, an x block and its scale). */
#define QTILE_ROWS 4
/* Decode rows (one row of x): 1 takes qrow_int8 / qrow_int4 (eight blocks scaled at once), 0 qtile's single
 * row (a conversion and a multiply-add per block); -D overrides for A/B builds. Measured on the 2-core
 * Zen 3 (AVX2), one thread, CPU time, 25 alternating passes over the 110M shape's 49 matrices: qrow_int8
 * 1.07x qtile (min 10.7 against 11.3 ms), qrow_int4 1.10x (7.0 against 7.6 ms). */
#ifndef QROW_INT8
#define QROW_INT8 1
#endif
#ifndef QROW_INT4
#define QROW_INT4 1
#endif
#define QTILE_OUTS 2

/* Output tile t (QTILE_OUTS outputs from t * QTILE_OUTS; the last, partial one an output at a time) for
 * the n rows of x: tiles of QTILE_ROWS rows, then the rest as one smaller tile; one row (decode) takes
 * the outputs one at a time, each a single stream of weights. */
INLINE void qoutput_tile(int fmt, const QX *x, const void *w, const void *scales, int64_t group, float *y,
                         int64_t n, int64_t in, int64_t out, int64_t t) {
    const int64_t o0 = t * QTILE_OUTS, end = o0 + QTILE_OUTS < out ? o0 + QTILE_OUTS : out;
    if (n == 1) {
        if (fmt == INT4 && QROW_INT4) {
            const int log2 = __builtin_ctzll((unsigned long long)(group / QBLOCK));
            for (int64_t o = o0; o < end; ++o)
                y[o] = qrow_int4(x, (const uint8_t *)w + o * (in / 2), (const uint16_t *)scales + o * (in / group), log2, in / QBLOCK);
        } else
            for (int64_t o = o0; o < end; ++o)
                if (fmt == INT8 && QROW_INT8) y[o] = qrow_int8(x, (const int8_t *)w + o * in, ((const float *)scales)[o], in);
                else qtile(fmt, 1, 1, x, w, scales, group, y, o, in, out);
        return;
    }
    int64_t r = 0;
    QX at = *x;
    for (; r + QTILE_ROWS <= n; r += QTILE_ROWS) {
        at.q = x->q + r * x->blocks * QBLOCK, at.d = x->d + r * x->blocks, at.c = x->c + r * x->blocks;
        if (end - o0 == QTILE_OUTS) qtile(fmt, QTILE_ROWS, QTILE_OUTS, &at, w, scales, group, y + r * out, o0, in, out);
        else
            for (int64_t o = o0; o < end; ++o) qtile(fmt, QTILE_ROWS, 1, &at, w, scales, group, y + r * out, o, in, out);
    }
    at.q = x->q + r * x->blocks * QBLOCK, at.d = x->d + r * x->blocks, at.c = x->c + r * x->blocks;
    switch (n - r) {
#define QREST(K)                                                                                                 \
    case K:                                                                                                      \
        if (end - o0 == QTILE_OUTS) qtile(fmt, K, QTILE_OUTS, &at, w, scales, group, y + r * out, o0, in, out); \
        else                                                                                                     \
            for (int64_t o = o0; o < end; ++o) qtile(fmt, K, 1, &at, w, scales, group, y + r * out, o, in, out); \
        break;
    QREST(1) QREST(2) QREST(3)
#undef QREST
    default: break;
    }
}

typedef void (*QTileFn)(const QX *, const void *, const void *, int64_t, float *, int64_t, int64_t, int64_t, int64_t);
static void qoutput_tile_INT8(const QX *x, const void *w, const void *s, int64_t g, float *y, int64_t n, int64_t in,
                              int64_t out, int64_t t) {
    qoutput_tile(INT8, x, w, s, g, y, n, in, out, t);
}
static void qoutput_tile_INT4(const QX *x, const void *w, const void *s, int64_t g, float *y, int64_t n, int64_t in,
                              int64_t out, int64_t t) {
    qoutput_tile(INT4, x, w, s, g, y, n, in, out, t);
}

/* matvec's integer path (formats INT8 and INT4, see above). */
static void matvec_q(const float *x, const void *w, const void *scales, float *y, int64_t rows, int64_t in,
                     int64_t out, int64_t threads, int64_t format, int64_t group) {
    const int64_t blocks = QBLOCKS(in);
    char *mem = scratch_at(2, (size_t)(rows * blocks) * (QBLOCK + 2 * sizeof(float)));
    if (!mem) abort();
    float *d = (float *)mem, *c = d + rows * blocks;
    int8_t *q = (int8_t *)(c + rows * blocks);
    for (int64_t r = 0; r < rows; ++r)
        quantize_x_row(x + r * in, in, q + r * blocks * QBLOCK, d + r * blocks, c + r * blocks);
    const QTileFn fn = format == INT4 ? qoutput_tile_INT4 : qoutput_tile_INT8;
    const int64_t tiles = (out + QTILE_OUTS - 1) / QTILE_OUTS;
    for (int64_t first = 0; first < rows; first += ROW_BLOCK) {
        const int64_t n = rows - first < ROW_BLOCK ? rows - first : ROW_BLOCK;
        const QX qx = {q + first * blocks * QBLOCK, d + first * blocks, c + first * blocks, blocks};
        #pragma omp parallel for schedule(static) num_threads(threads) if (out * in >= 65536)
        for (int64_t t = 0; t < tiles; ++t) fn(&qx, w, scales, group, y + first * out, n, in, out, t);
    }
}

/* x quantized as matvec_q does (for tests): q [rows, QBLOCKS(in) * 32], d [rows, QBLOCKS(in)]; returns QBLOCKS(in). */
int64_t quantize_x(const float *x, int64_t rows, int64_t in, int8_t *q, float *d) {
    const int64_t blocks = QBLOCKS(in);
    float *c = malloc((size_t)blocks * sizeof(float));
    if (!c) abort();
    for (int64_t r = 0; r < rows; ++r) quantize_x_row(x + r * in, in, q + r * blocks * QBLOCK, d + r * blocks, c);
    free(c);
    return blocks;
}

/* The block sums of matvec_q (for tests): dots[r, o, b] = sum over block b of q[r] times weight row o's
 * integers as the kernels multiply them (int8: w; int4: the stored nibbles, q + 8), each by the build's
 * dot product. q as quantize_x lays it out (QBLOCKS(in) blocks a row). */
void block_dots(const int8_t *q, const void *w, int32_t *dots, int64_t rows, int64_t in, int64_t out, int64_t format) {
    const int64_t blocks = (in + QBLOCK - 1) / QBLOCK, stride = QBLOCKS(in) * QBLOCK;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = 0; o < out; ++o)
            for (int64_t b = 0; b < blocks; ++b) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(q + r * stride + b * QBLOCK));
                __m256i s;
                if (format == INT4) s = dot_u8s8(int4_block_u8((const uint8_t *)w + o * (in / 2), b), xv);
                else {
                    const __m256i wv = int8_block((const int8_t *)w + o * in, b, in);
                    s = dot_u8s8(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
                }
                __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
                dots[(r * out + o) * blocks + b] = _mm_cvtsi128_si32(t);
            }
}

/* y[r, o] = x[r, :] . w[o, :] for `rows` rows of x (float32 [rows, in]) and a weight matrix of `out`
 * rows in `format` (with `scales` and `group` for int8 and int4). Each tile of weight rows is read
 * from memory once and reused from L1 for every row of x; threads take contiguous ranges of tiles.
 * `round_x` (a bfloat16 model): x is rounded to bfloat16 first (see the header). `int8_x`: int8 and int4
 * weights take x quantized to int8 instead (matvec_q, integer dot products; round_x does not apply);
 * INT8_X_WHERE_FASTER (cpu.py's `auto` for int4 weights) only where that is the faster arithmetic: not in
 * a bfloat16 model's products of several rows on the avx512bf16 build, whose vdpbf16ps tiles (matvec_b,
 * x rounded to bfloat16) ran those 1.3-1.7x faster than the integer tiles at 2-32 rows (2-core Zen 4,
 * 110M shape's matrices, int4 g32 and int8); single rows (decode) stream fastest as integers there too. */
#define INT8_X_WHERE_FASTER 2
void matvec(const float *x, const void *w, const void *scales, float *y, int64_t rows, int64_t in, int64_t out,
            int64_t threads, int64_t format, int64_t group, int64_t round_x, int64_t int8_x) {
    if (int8_x == INT8_X_WHERE_FASTER) int8_x = !(BF16_DOT && round_x && rows > 1);
    if (int8_x && (format == INT8 || format == INT4)) {
        matvec_q(x, w, scales, y, rows, in, out, threads, format, group);
        return;
    }
    if (round_x) {
        if (BF16_DOT && format != F32 && !(rows == 1 && ((format == INT8 && INT8_ROW_FLOAT) ||
                                                          (format == BF16 && BF16_ROW_FLOAT)))) {
            matvec_b(x, w, scales, y, rows, in, out, threads, format, group);
            return;
        }
        float *rounded = scratch((size_t)(rows * in) * sizeof(float));
        if (!rounded) abort();
        int64_t i = 0;
#ifdef __AVX512F__
        const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff), abs = _mm512_set1_epi32(0x7fffffff);
        const __m512i inf = _mm512_set1_epi32(0x7f800000), nan = _mm512_set1_epi32(0x7fc00000), high = _mm512_set1_epi32(-65536);
        for (; i + 16 <= rows * in; i += 16) {  /* bf16_bits, widened back, 16 at a time */
            const __m512i bits = _mm512_castps_si512(_mm512_loadu_ps(x + i));
            __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(bits, 16), one)));
            r = _mm512_mask_mov_epi32(_mm512_and_si512(r, high), _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, abs), inf), nan);
            _mm512_storeu_ps(rounded + i, _mm512_castsi512_ps(r));
        }
#endif
        for (; i < rows * in; ++i) {
            const uint32_t bits = (uint32_t)bf16_bits(x[i]) << 16;
            memcpy(rounded + i, &bits, sizeof bits);
        }
        x = rounded;
    }
    const TileFn fn = OUTPUT_TILES[format];
    const int64_t tiles = (out + TILE_OUTS(format) - 1) / TILE_OUTS(format);
    for (int64_t first = 0; first < rows; first += ROW_BLOCK) {
        const int64_t n = rows - first < ROW_BLOCK ? rows - first : ROW_BLOCK;
        const int64_t single = n % TILE_ROWS(format);  /* rows that row_dot takes */
        float *lanes = NULL;
        if (INT4_LANES && format == INT4 && single && in >= 128 &&
            (lanes = malloc(single * LANES_PER_ROW(in) * sizeof(float))))
            for (int64_t k = 0; k < single; ++k) int4_lanes(x + (first + n - single + k) * in, in, lanes + k * LANES_PER_ROW(in));
        #pragma omp parallel for schedule(static) num_threads(threads) if (out * in >= 65536)
        for (int64_t t = 0; t < tiles; ++t)
            fn(x + first * in, lanes, w, scales, group, y + first * out, n, in, out, t);
        free(lanes);
    }
}

static float dot(const float *a, const float *b, int64_t n) {
    vf s0 = vzero(), s1 = vzero();
    int64_t i = 0;
    for (; i + 2 * VL <= n; i += 2 * VL) {
        s0 = vfma(vload(a + i), vload(b + i), s0);
        s1 = vfma(vload(a + i + VL), vload(b + i + VL), s1);
    }
    for (; i + VL <= n; i += VL) s0 = vfma(vload(a + i), vload(b + i), s0);
    float total = vsum(vadd(s0, s1));
    for (; i < n; ++i) total += a[i] * b[i];
    return total;
}

static float embedding_at(const Model *m, int64_t i) {
    switch (m->embedding_type) {
    case EMB_F32: return ((const float *)m->embedding)[i];
    case EMB_BF16: return widen_bf16(((const uint16_t *)m->embedding)[i]);
    default: return _cvtsh_ss(((const uint16_t *)m->embedding)[i]);
    }
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

/* Row r's queries against cached positions 0..pos of their kv head: att[r, head] = softmax(q k^T) v.
   With `slots` and `positions` (continuous batching), row r reads cache row slots[r] up to positions[r]
   and `pos` is the largest of them; without (NULL), row r reads cache row r up to `pos`. */
static void attend(const Model *m, const Layer *l, int64_t rows, int64_t pos, const int64_t *slots,
                   const int64_t *positions) {
    const int64_t hd = m->head_dim, seq = m->max_seq_len, group = m->heads / m->kv_heads;
    const int64_t qkv_dim = (m->heads + 2 * m->kv_heads) * hd;
    #pragma omp parallel for schedule(static) num_threads(m->threads) if (rows * m->heads * (pos + 1) * hd >= 32768)
    for (int64_t task = 0; task < rows * m->heads; ++task) {
        const int64_t r = task / m->heads, head = task % m->heads;
        const int64_t slot = slots ? slots[r] : r, last = positions ? positions[r] : pos;
        const float *q = m->qkv + r * qkv_dim + head * hd;
        const int64_t cache_row = (slot * m->kv_heads + head / group) * seq * hd;
        const float *keys = l->cache_k + cache_row, *values = l->cache_v + cache_row;
        float *p = m->scores + task * seq, *out = m->att + (r * m->heads + head) * hd;
        float top = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t <= last; ++t) {
            p[t] = dot(q, keys + t * hd, hd);
            top = p[t] > top ? p[t] : top;
        }
        for (int64_t t = 0; t <= last; ++t) total += (p[t] = expf(p[t] - top));
        for (int64_t i = 0; i < hd; ++i) out[i] = 0.0f;
        for (int64_t t = 0; t <= last; ++t) {
            const float weight = p[t] / total, *v = values + t * hd;
            for (int64_t i = 0; i < hd; ++i) out[i] += weight * v[i];
        }
    }
}

/* `slots` and `positions` as in `attend` (NULL: row r at cache row r and position `pos`). */
void attention_block(const Model *m, int64_t layer, int64_t rows, int64_t pos, const int64_t *slots,
                     const int64_t *positions, float *h, const float *incoming, float *partial) {
    const Layer *l = m->layers + layer;
    const int64_t hd = m->head_dim, dim = m->dim, seq = m->max_seq_len;
    const int64_t q_dim = m->heads * hd, kv_dim = m->kv_heads * hd, qkv_dim = q_dim + 2 * kv_dim;
    const float scale = (float)(1.0 / sqrt((double)hd));
    add_incoming(m, rows, h, incoming);
    for (int64_t r = 0; r < rows; ++r) rmsnorm(m->x + r * dim, h + r * dim, l->attention_norm, dim, m->eps);
    matvec(m->x, l->wqkv, l->sqkv, m->qkv, rows, dim, qkv_dim, m->threads, m->format, m->group_size, m->embedding_type == EMB_BF16, m->int8_x);
    for (int64_t r = 0; r < rows; ++r) {
        float *q = m->qkv + r * qkv_dim, *k = q + q_dim, *v = k + kv_dim;
        const int64_t slot = slots ? slots[r] : r, at_pos = positions ? positions[r] : pos;
        rotate(m, q, m->heads + m->kv_heads, at_pos);  /* q and k are adjacent: rotate them together */
        for (int64_t i = 0; i < q_dim; ++i) q[i] *= scale;
        for (int64_t g = 0; g < m->kv_heads; ++g) {
            const int64_t at = ((slot * m->kv_heads + g) * seq + at_pos) * hd;
            memcpy(l->cache_k + at, k + g * hd, hd * sizeof(float));
            memcpy(l->cache_v + at, v + g * hd, hd * sizeof(float));
        }
    }
    attend(m, l, rows, pos, slots, positions);
    matvec(m->att, l->wo, l->so, partial, rows, q_dim, dim, m->threads, m->format, m->group_size, m->embedding_type == EMB_BF16, m->int8_x);
}

void ffn_block(const Model *m, int64_t layer, int64_t rows, float *h, const float *incoming, float *partial) {
    const Layer *l = m->layers + layer;
    const int64_t dim = m->dim, hidden = m->hidden;
    add_incoming(m, rows, h, incoming);
    for (int64_t r = 0; r < rows; ++r) rmsnorm(m->x + r * dim, h + r * dim, l->ffn_norm, dim, m->eps);
    matvec(m->x, l->w13, l->s13, m->ffn, rows, dim, 2 * hidden, m->threads, m->format, m->group_size, m->embedding_type == EMB_BF16, m->int8_x);  /* w1 rows, then w3 rows */
    /* a prompt's rows (tens of thousands of expf) split across the threads; a decode step's stay on one */
    #pragma omp parallel for schedule(static) num_threads(m->threads) if (rows * hidden >= 16384)
    for (int64_t r = 0; r < rows; ++r) {
        const float *gate = m->ffn + r * 2 * hidden, *up = gate + hidden;
        float *act = m->act + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) act[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
    matvec(m->act, l->w2, l->s2, partial, rows, hidden, dim, m->threads, m->format, m->group_size, m->embedding_type == EMB_BF16, m->int8_x);
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
        for (int64_t i = 0; i < m->dim; ++i) h[r * m->dim + i] = embedding_at(m, id * m->dim + i);
    }
    return -1;
}

/* The whole step on a single rank (nothing to sum across ranks): out = normed hidden state. */
int64_t decode(const Model *m, const int64_t *tokens, int64_t stride, int64_t rows, int64_t pos,
               const int64_t *slots, const int64_t *positions, float *h, float *partial, float *out) {
    const int64_t bad = embed(m, tokens, stride, rows, h);
    if (bad >= 0) return bad;
    for (int64_t layer = 0; layer < m->n_layers; ++layer) {
        attention_block(m, layer, rows, pos, slots, positions, h, layer ? partial : NULL, partial);
        ffn_block(m, layer, rows, h, partial, partial);
    }
    finish(m, rows, h, partial, out);
    return -1;
}
