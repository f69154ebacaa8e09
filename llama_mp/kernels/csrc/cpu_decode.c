/* llama_mp's CPU decode kernels: one new token for each of `rows` sequences on x86-64, and the matrix
 * products of prompts; weights in float32, bfloat16, int8 or int4, all arithmetic in float32. Built
 * on first use by kernels/cpu.py with the system C compiler, twice (AVX-512 and AVX2 + FMA, see `vf`
 * below), and called through ctypes.
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
 * Quantized weights likewise give the float32 model holding the dequantised weights, with a half
 * (int8) or a quarter (int4) of bfloat16's bytes to stream.
 *
 * A prompt of many tokens (prefill) is compute-bound instead: `matvec` then takes a register tile of
 * rows x outputs, so each weight vector, once loaded and dequantised, feeds several rows' sums. Its
 * ceiling is the float32 FMA rate (on our 2-core Zen 4, ~60-70 GFLOP/s a core, as MKL's sgemm), and
 * for a single row of int8 or int4 the widening of integers to float32, not memory, is the limit on
 * that machine: int8 and int4 decode run at about the same speed there.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Weight formats (kernels/cpu.py F32 .. INT4). int8: int8 [out, in] and one float32 scale per output row,
 * applied to the finished dot product. int4: uint8 [out, in / 2], in each block of 32 inputs byte j
 * holds input j (low nibble) and input j + 16 (high nibble) as q + 8, and one bfloat16 scale per
 * `group_size` inputs of a row (quant/scheme.py). Integers become float32 in registers; all sums are
 * float32. */
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

/* The vector width this file is compiled for: cpu.py builds it twice, once with AVX-512 (16 floats
 * a register, 32 registers) and once with AVX2 + FMA (8 floats, 16 registers), and loads the one the
 * CPU runs. Everything below is written once over `vf`. TILE_ROWS x TILE_OUTS is the register tile of
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

/* The register tile: y[r, o0 + o] = x[r, :] . w[o0 + o, :] for R rows of x and O outputs. Each weight
 * vector is loaded (and dequantised) once and used for all R rows; each x vector once for all O
 * outputs. R and O are constants at every call, so the loops unroll into straight FMAs. */
INLINE void tile(int fmt, int R, int O, const float *x, const void *w, const void *scales, int64_t group,
                 float *y, int64_t o0, int64_t in, int64_t out) {
    vf acc[8][4];  /* [R][O], R and O at most the largest tile */
    Row rows[4];
    for (int o = 0; o < O; ++o) rows[o] = weight_row(fmt, w, scales, o0 + o, in, group);
    for (int r = 0; r < R; ++r)
        for (int o = 0; o < O; ++o) acc[r][o] = vzero();
    const int64_t blocks = in / BLOCK;
    for (int64_t b = 0; b < blocks; ++b)
        for (int c = 0; c < CHUNKS; ++c) {
            vf wv[4];
            for (int o = 0; o < O; ++o) wv[o] = weight_chunk(fmt, rows[o], b, c);
            for (int r = 0; r < R; ++r) {
                const vf xv = vload(x + r * in + b * BLOCK + c * VL);
                for (int o = 0; o < O; ++o) acc[r][o] = vfma(xv, wv[o], acc[r][o]);
            }
        }
    for (int r = 0; r < R; ++r)
        for (int o = 0; o < O; ++o) {
            float total = vsum(acc[r][o]);
            for (int64_t i = blocks * BLOCK; i < in; ++i) total += x[r * in + i] * weight_at(fmt, rows[o], i);
            y[r * out + o0 + o] = total * rows[o].scale;
        }
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
    if (end - o0 == O)
        for (; r + R <= n; r += R) tile(fmt, R, O, x + r * in, w, scales, group, y + r * out, o0, in, out);
    else
        for (int64_t o = o0; o < end; ++o)
            for (r = 0; r + R <= n; r += R) tile(fmt, R, 1, x + r * in, w, scales, group, y + r * out, o, in, out);
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

/* y[r, o] = x[r, :] . w[o, :] for `rows` rows of x (float32 [rows, in]) and a weight matrix of `out`
 * rows in `format` (with `scales` and `group` for int8 and int4). Each tile of weight rows is read
 * from memory once and reused from L1 for every row of x; threads take contiguous ranges of tiles. */
void matvec(const float *x, const void *w, const void *scales, float *y, int64_t rows, int64_t in, int64_t out,
            int64_t threads, int64_t format, int64_t group) {
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
    matvec(m->x, l->wqkv, l->sqkv, m->qkv, rows, dim, qkv_dim, m->threads, m->format, m->group_size);
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
    matvec(m->att, l->wo, l->so, partial, rows, q_dim, dim, m->threads, m->format, m->group_size);
}

void ffn_block(const Model *m, int64_t layer, int64_t rows, float *h, const float *incoming, float *partial) {
    const Layer *l = m->layers + layer;
    const int64_t dim = m->dim, hidden = m->hidden;
    add_incoming(m, rows, h, incoming);
    for (int64_t r = 0; r < rows; ++r) rmsnorm(m->x + r * dim, h + r * dim, l->ffn_norm, dim, m->eps);
    matvec(m->x, l->w13, l->s13, m->ffn, rows, dim, 2 * hidden, m->threads, m->format, m->group_size);  /* w1 rows, then w3 rows */
    for (int64_t r = 0; r < rows; ++r) {
        const float *gate = m->ffn + r * 2 * hidden, *up = gate + hidden;
        float *act = m->act + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) act[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
    matvec(m->act, l->w2, l->s2, partial, rows, hidden, dim, m->threads, m->format, m->group_size);
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
