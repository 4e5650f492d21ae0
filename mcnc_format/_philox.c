/* Philox4x32-10 of SPEC.md §8, compiled: the CPU kernels behind mcnc_format/philox.py.
 *
 * Why C: the NumPy path spends most of its time moving uint64 temporaries through memory
 * (about ten passes per round); here a block's four words stay in registers for all ten
 * rounds and each value is written once. On x86-64 the rounds run 8 blocks per AVX2 vector
 * (16 per AVX-512 vector), chosen at run time with __builtin_cpu_supports; elsewhere, or on
 * CPUs without AVX2 and FMA, the portable scalar C below runs.
 *
 * Every kernel is a pure function of (key, element index) writing into a caller's buffer, and
 * releases the GIL, so Python threads can fill disjoint parts of one buffer in parallel.
 *
 * Bits: words and uniform values (§8.2) are exact on every path. Normal values (§8.3) are
 * computed in float32 with polynomial log and cos (within the spec's tolerance); the scalar
 * code mirrors the vector code operation for operation (fmaf where the vectors use an FMA), so
 * an element's bits do not depend on whether a vector, a tail or a scattered draw made it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MCNC_X86 1
#include <immintrin.h>
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))
#else
#define MCNC_X86 0
#endif

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define ROUNDS 10

typedef struct {
    uint32_t k0[ROUNDS], k1[ROUNDS];
} keys_t;

static void schedule(keys_t *keys, uint32_t seed, uint32_t stream) {
    for (int r = 0; r < ROUNDS; r++) {
        keys->k0[r] = seed + (uint32_t)r * PHILOX_W0;
        keys->k1[r] = stream + (uint32_t)r * PHILOX_W1;
    }
}

/* ---- scalar ------------------------------------------------------------------------------ */

/* The four words of block `block` (counter (block mod 2^32, block >> 32, 0, 0), §8.1). */
static inline void block_scalar(uint64_t block, const keys_t *keys, uint32_t w[4]) {
    uint32_t c0 = (uint32_t)block, c1 = (uint32_t)(block >> 32), c2 = 0, c3 = 0;
    for (int r = 0; r < ROUNDS; r++) {
        uint64_t p0 = (uint64_t)c0 * PHILOX_M0, p1 = (uint64_t)c2 * PHILOX_M1;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ keys->k0[r];
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ keys->k1[r];
        c1 = (uint32_t)p1;
        c3 = (uint32_t)p0;
        c0 = n0;
        c2 = n2;
    }
    w[0] = c0; w[1] = c1; w[2] = c2; w[3] = c3;
}

/* §8.2: float32(bound) * ((x >> 8) - 2^23) * 2^-23; the unit is exact, the product rounds once. */
static inline float uniform_of(uint32_t x, float bound) {
    return (float)((int32_t)(x >> 8) - (1 << 23)) * 0x1p-23f * bound;
}

/* Polynomial coefficients (Cephes logf, sinf, cosf), shared by the scalar and vector code. */
#define LOG_P0 7.0376836292e-2f
#define LOG_P1 -1.1514610310e-1f
#define LOG_P2 1.1676998740e-1f
#define LOG_P3 -1.2420140846e-1f
#define LOG_P4 1.4249322787e-1f
#define LOG_P5 -1.6668057665e-1f
#define LOG_P6 2.0000714765e-1f
#define LOG_P7 -2.4999993993e-1f
#define LOG_P8 3.3333331174e-1f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define SQRT_HALF 0.707106781186547524f
#define SIN_P0 -1.9515295891e-4f
#define SIN_P1 8.3321608736e-3f
#define SIN_P2 -1.6666654611e-1f
#define COS_P0 2.443315711809948e-5f
#define COS_P1 -1.388731625493765e-3f
#define COS_P2 4.166664568298827e-2f
#define TWO_PI 6.28318530717958647692f

static inline float bits_to_float(uint32_t i) { float f; memcpy(&f, &i, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t i; memcpy(&i, &f, 4); return i; }

/* ln(u) for u in [2^-24, 1]: u = 2^e m, m in [sqrt(1/2), sqrt(2)), a polynomial in m - 1. */
static inline float log_unit(float u) {
    uint32_t i = float_to_bits(u);
    int32_t e = (int32_t)(i >> 23) - 126;
    float m = bits_to_float((i & 0x007FFFFFu) | 0x3F000000u); /* [0.5, 1) */
    if (m < SQRT_HALF) {
        e -= 1;
        m = m + m - 1.0f;
    } else {
        m = m - 1.0f;
    }
    float z = m * m;
    float p = LOG_P0;
    p = fmaf(p, m, LOG_P1); p = fmaf(p, m, LOG_P2); p = fmaf(p, m, LOG_P3);
    p = fmaf(p, m, LOG_P4); p = fmaf(p, m, LOG_P5); p = fmaf(p, m, LOG_P6);
    p = fmaf(p, m, LOG_P7); p = fmaf(p, m, LOG_P8);
    float fe = (float)e;
    float y = p * m * z;
    y = fmaf(fe, LN2_LO, y);
    y = fmaf(-0.5f, z, y);
    float r = m + y;
    return fmaf(fe, LN2_HI, r);
}

/* cos(2 pi j 2^-24) for j < 2^24: j = 2^22 n + t with |t| <= 2^21 (exact), then the
 * quadrant's sin or cos of theta = 2 pi t 2^-24 in [-pi/4, pi/4]. */
static inline float cos_turn(uint32_t j) {
    uint32_t n = (j + (1u << 21)) >> 22;
    float t = (float)((int32_t)j - (int32_t)(n << 22)) * 0x1p-24f;
    float theta = t * TWO_PI;
    float z = theta * theta;
    float s = fmaf(SIN_P0, z, SIN_P1);
    s = fmaf(s, z, SIN_P2);
    s = fmaf(s * z, theta, theta);
    float c = fmaf(COS_P0, z, COS_P1);
    c = fmaf(c, z, COS_P2);
    c = fmaf(c * z, z, fmaf(-0.5f, z, 1.0f));
    float v = (n & 1u) ? s : c;
    return bits_to_float(float_to_bits(v) ^ (((n + 1u) & 2u) << 30));
}

/* §8.3: z = sqrt(-2 ln u1) cos(2 pi u2), u1 = ((xa >> 8) + 1) 2^-24, u2 = (xb >> 8) 2^-24. */
static inline float normal_of(uint32_t xa, uint32_t xb) {
    float u1 = (float)((xa >> 8) + 1u) * 0x1p-24f;
    return sqrtf(-2.0f * log_unit(u1)) * cos_turn(xb >> 8);
}

/* ---- AVX2 -------------------------------------------------------------------------------- */
#if MCNC_X86

TARGET_AVX2 static inline void mulhilo8(__m256i a, __m256i m, __m256i *hi, __m256i *lo) {
    __m256i even = _mm256_mul_epu32(a, m);
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

/* Two independent groups of 8 blocks at once, so one group's multiplies fill the other's
 * latency. c[g][j]: word j of the group's 8 blocks. */
TARGET_AVX2 static inline void rounds8x2(__m256i c[2][4], const keys_t *keys) {
    const __m256i m0 = _mm256_set1_epi32((int)PHILOX_M0), m1 = _mm256_set1_epi32((int)PHILOX_M1);
    for (int r = 0; r < ROUNDS; r++) {
        const __m256i k0 = _mm256_set1_epi32((int)keys->k0[r]);
        const __m256i k1 = _mm256_set1_epi32((int)keys->k1[r]);
        for (int g = 0; g < 2; g++) {
            __m256i hi0, lo0, hi1, lo1;
            mulhilo8(c[g][0], m0, &hi0, &lo0);
            mulhilo8(c[g][2], m1, &hi1, &lo1);
            c[g][0] = _mm256_xor_si256(_mm256_xor_si256(hi1, c[g][1]), k0);
            c[g][1] = lo1;
            c[g][2] = _mm256_xor_si256(_mm256_xor_si256(hi0, c[g][3]), k1);
            c[g][3] = lo0;
        }
    }
}

/* Counters of the 16 blocks first .. first + 15. */
TARGET_AVX2 static inline void counters16(uint64_t first, __m256i c[2][4]) {
    uint32_t lo = (uint32_t)first;
    if (lo <= 0xFFFFFFFFu - 15) { /* no carry into word 1 within the 16 blocks */
        const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for (int g = 0; g < 2; g++) {
            c[g][0] = _mm256_add_epi32(_mm256_set1_epi32((int)(lo + 8u * (uint32_t)g)), iota);
            c[g][1] = _mm256_set1_epi32((int)(uint32_t)(first >> 32));
            c[g][2] = c[g][3] = _mm256_setzero_si256();
        }
        return;
    }
    uint32_t w0[16], w1[16];
    for (int i = 0; i < 16; i++) {
        w0[i] = (uint32_t)(first + (uint64_t)i);
        w1[i] = (uint32_t)((first + (uint64_t)i) >> 32);
    }
    for (int g = 0; g < 2; g++) {
        c[g][0] = _mm256_loadu_si256((const __m256i *)(w0 + 8 * g));
        c[g][1] = _mm256_loadu_si256((const __m256i *)(w1 + 8 * g));
        c[g][2] = c[g][3] = _mm256_setzero_si256();
    }
}

/* Rows b0..b7 of the 8x4 matrix whose columns are f0..f3, as four vectors of two rows each:
 * the element order of the stream (word j of block b is element 4 b + j). */
TARGET_AVX2 static inline void store_interleaved8(float *out, __m256 f0, __m256 f1, __m256 f2,
                                                  __m256 f3) {
    __m256 t0 = _mm256_unpacklo_ps(f0, f1), t1 = _mm256_unpackhi_ps(f0, f1);
    __m256 t2 = _mm256_unpacklo_ps(f2, f3), t3 = _mm256_unpackhi_ps(f2, f3);
    __m256 u0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    __m256 u1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    __m256 u2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    __m256 u3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
}

TARGET_AVX2 static inline __m256 uniform8(__m256i x, __m256 scale) {
    __m256i v = _mm256_sub_epi32(_mm256_srli_epi32(x, 8), _mm256_set1_epi32(1 << 23));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(0x1p-23f)), scale);
}

TARGET_AVX2 static inline __m256 log_unit8(__m256 u) {
    __m256i i = _mm256_castps_si256(u);
    __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(i, 23), _mm256_set1_epi32(126));
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_and_si256(i, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F000000)));
    __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(SQRT_HALF), _CMP_LT_OQ);
    e = _mm256_add_epi32(e, _mm256_castps_si256(small)); /* the mask is -1 where small */
    __m256 one = _mm256_set1_ps(1.0f);
    __m256 doubled = _mm256_sub_ps(_mm256_add_ps(m, m), one);
    m = _mm256_blendv_ps(_mm256_sub_ps(m, one), doubled, small);
    __m256 z = _mm256_mul_ps(m, m);
    __m256 p = _mm256_set1_ps(LOG_P0);
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(LOG_P1));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(LOG_P2));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(LOG_P3));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(LOG_P4));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(LOG_P5));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(LOG_P6));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(LOG_P7));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(LOG_P8));
    __m256 fe = _mm256_cvtepi32_ps(e);
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, m), z);
    y = _mm256_fmadd_ps(fe, _mm256_set1_ps(LN2_LO), y);
    y = _mm256_fmadd_ps(_mm256_set1_ps(-0.5f), z, y);
    __m256 r = _mm256_add_ps(m, y);
    return _mm256_fmadd_ps(fe, _mm256_set1_ps(LN2_HI), r);
}

TARGET_AVX2 static inline __m256 cos_turn8(__m256i j) {
    __m256i n = _mm256_srli_epi32(_mm256_add_epi32(j, _mm256_set1_epi32(1 << 21)), 22);
    __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(j, _mm256_slli_epi32(n, 22))),
                             _mm256_set1_ps(0x1p-24f));
    __m256 theta = _mm256_mul_ps(t, _mm256_set1_ps(TWO_PI));
    __m256 z = _mm256_mul_ps(theta, theta);
    __m256 s = _mm256_fmadd_ps(_mm256_set1_ps(SIN_P0), z, _mm256_set1_ps(SIN_P1));
    s = _mm256_fmadd_ps(s, z, _mm256_set1_ps(SIN_P2));
    s = _mm256_fmadd_ps(_mm256_mul_ps(s, z), theta, theta);
    __m256 c = _mm256_fmadd_ps(_mm256_set1_ps(COS_P0), z, _mm256_set1_ps(COS_P1));
    c = _mm256_fmadd_ps(c, z, _mm256_set1_ps(COS_P2));
    c = _mm256_fmadd_ps(_mm256_mul_ps(c, z), z,
                        _mm256_fmadd_ps(_mm256_set1_ps(-0.5f), z, _mm256_set1_ps(1.0f)));
    __m256i odd = _mm256_slli_epi32(n, 31); /* sign bit set where n is odd */
    __m256 v = _mm256_blendv_ps(c, s, _mm256_castsi256_ps(odd));
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(n, _mm256_set1_epi32(1)),
                                                      _mm256_set1_epi32(2)), 30);
    return _mm256_xor_ps(v, _mm256_castsi256_ps(sign));
}

TARGET_AVX2 static inline __m256 normal8(__m256i xa, __m256i xb) {
    __m256i a = _mm256_add_epi32(_mm256_srli_epi32(xa, 8), _mm256_set1_epi32(1));
    __m256 u1 = _mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(0x1p-24f));
    __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log_unit8(u1)));
    return _mm256_mul_ps(radius, cos_turn8(_mm256_srli_epi32(xb, 8)));
}

/* Blocks first .. first + 16 n - 1 into out: `kind` 0 words (int64), 1 uniform, 2 normal. */
TARGET_AVX2 static void blocks_avx2(uint64_t first, size_t n16, const keys_t *keys, int kind,
                                    void *out, float bound) {
    const __m256 scale = _mm256_set1_ps(bound);
    for (size_t i = 0; i < n16; i++) {
        __m256i c[2][4];
        counters16(first + 16 * (uint64_t)i, c);
        rounds8x2(c, keys);
        for (int g = 0; g < 2; g++) {
            size_t b = 16 * i + 8 * (size_t)g; /* the group's first block, from `first` */
            if (kind == 1) {
                store_interleaved8((float *)out + 4 * b, uniform8(c[g][0], scale),
                                   uniform8(c[g][1], scale), uniform8(c[g][2], scale),
                                   uniform8(c[g][3], scale));
            } else if (kind == 2) {
                __m256 za = normal8(c[g][0], c[g][1]), zb = normal8(c[g][2], c[g][3]);
                __m256 lo = _mm256_unpacklo_ps(za, zb), hi = _mm256_unpackhi_ps(za, zb);
                float *o = (float *)out + 2 * b;
                _mm256_storeu_ps(o, _mm256_permute2f128_ps(lo, hi, 0x20));
                _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
            } else {
                float words[32];
                store_interleaved8(words, _mm256_castsi256_ps(c[g][0]),
                                   _mm256_castsi256_ps(c[g][1]), _mm256_castsi256_ps(c[g][2]),
                                   _mm256_castsi256_ps(c[g][3]));
                int64_t *o = (int64_t *)out + 4 * b;
                for (int q = 0; q < 8; q++) {
                    __m128i w = _mm_loadu_si128((const __m128i *)(words + 4 * q));
                    _mm256_storeu_si256((__m256i *)(o + 4 * q), _mm256_cvtepu32_epi64(w));
                }
            }
        }
    }
}

/* Scattered elements, 16 at a time, each in a vector lane of its own (its block drawn
 * there): out[i] = element index[i] (uniform or normal). */
TARGET_AVX2 static void at_avx2(const uint64_t *index, size_t n, const keys_t *keys, int normal,
                                float *out, float bound) {
    const __m256 scale = _mm256_set1_ps(bound);
    const unsigned shift = normal ? 1 : 2;
    const uint64_t mask = normal ? 1 : 3;
    for (size_t i = 0; i < n; i += 16) {
        size_t m = n - i < 16 ? n - i : 16;
        uint32_t w0[16], w1[16], lane[16];
        for (size_t q = 0; q < 16; q++) {
            uint64_t e = q < m ? index[i + q] : 0;
            w0[q] = (uint32_t)(e >> shift);
            w1[q] = (uint32_t)(e >> (32 + shift));
            lane[q] = (uint32_t)(e & mask);
        }
        __m256i c[2][4];
        for (int g = 0; g < 2; g++) {
            c[g][0] = _mm256_loadu_si256((const __m256i *)(w0 + 8 * g));
            c[g][1] = _mm256_loadu_si256((const __m256i *)(w1 + 8 * g));
            c[g][2] = c[g][3] = _mm256_setzero_si256();
        }
        rounds8x2(c, keys);
        float values[16];
        for (int g = 0; g < 2; g++) {
            __m256i l = _mm256_loadu_si256((const __m256i *)(lane + 8 * g));
            __m256 v;
            if (normal) {
                __m256i odd = _mm256_cmpeq_epi32(l, _mm256_set1_epi32(1));
                v = normal8(_mm256_blendv_epi8(c[g][0], c[g][2], odd),
                            _mm256_blendv_epi8(c[g][1], c[g][3], odd));
            } else {
                __m256i w = c[g][0];
                for (int j = 1; j < 4; j++)
                    w = _mm256_blendv_epi8(w, c[g][j], _mm256_cmpeq_epi32(l, _mm256_set1_epi32(j)));
                v = uniform8(w, scale);
            }
            _mm256_storeu_ps(values + 8 * g, v);
        }
        memcpy(out + i, values, m * sizeof(float));
    }
}

/* The end of the run of consecutive indices that starts at i (4 compared per step). */
TARGET_AVX2 static size_t run_end_avx2(const uint64_t *x, size_t i, size_t n) {
    size_t j = i + 1;
    const __m256i step = _mm256_setr_epi64x(1, 2, 3, 4);
    const __m256i four = _mm256_set1_epi64x(4);
    while (j + 8 <= n) {
        __m256i expect = _mm256_add_epi64(_mm256_set1_epi64x((long long)x[j - 1]), step);
        __m256i a = _mm256_cmpeq_epi64(expect, _mm256_loadu_si256((const __m256i *)(x + j)));
        __m256i b = _mm256_cmpeq_epi64(_mm256_add_epi64(expect, four),
                                       _mm256_loadu_si256((const __m256i *)(x + j + 4)));
        unsigned same = (unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(a))
                        | (unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(b)) << 4;
        if (same != 0xFF) return j + (size_t)__builtin_ctz(~same);
        j += 8;
    }
    while (j < n && x[j] == x[j - 1] + 1) j++;
    return j;
}

/* ---- AVX-512: the same rounds, 16 blocks per vector --------------------------------------- */

TARGET_AVX512 static inline void mulhilo16(__m512i a, __m512i m, __m512i *hi, __m512i *lo) {
    __m512i even = _mm512_mul_epu32(a, m);
    __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

TARGET_AVX512 static inline void rounds16x2(__m512i c[2][4], const keys_t *keys) {
    const __m512i m0 = _mm512_set1_epi32((int)PHILOX_M0), m1 = _mm512_set1_epi32((int)PHILOX_M1);
    for (int r = 0; r < ROUNDS; r++) {
        const __m512i k0 = _mm512_set1_epi32((int)keys->k0[r]);
        const __m512i k1 = _mm512_set1_epi32((int)keys->k1[r]);
        for (int g = 0; g < 2; g++) {
            __m512i hi0, lo0, hi1, lo1;
            mulhilo16(c[g][0], m0, &hi0, &lo0);
            mulhilo16(c[g][2], m1, &hi1, &lo1);
            c[g][0] = _mm512_ternarylogic_epi32(hi1, c[g][1], k0, 0x96); /* a ^ b ^ c */
            c[g][1] = lo1;
            c[g][2] = _mm512_ternarylogic_epi32(hi0, c[g][3], k1, 0x96);
            c[g][3] = lo0;
        }
    }
}

TARGET_AVX512 static inline void store_interleaved16(float *out, __m512 f0, __m512 f1,
                                                     __m512 f2, __m512 f3) {
    __m512 t0 = _mm512_unpacklo_ps(f0, f1), t1 = _mm512_unpackhi_ps(f0, f1);
    __m512 t2 = _mm512_unpacklo_ps(f2, f3), t3 = _mm512_unpackhi_ps(f2, f3);
    __m512 u0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    __m512 u1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    __m512 u2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    __m512 u3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    /* u0 = blocks [0|4|8|12], u1 = [1|5|9|13], u2 = [2|6|10|14], u3 = [3|7|11|15] */
    __m512 v0 = _mm512_shuffle_f32x4(u0, u1, 0x44), v1 = _mm512_shuffle_f32x4(u2, u3, 0x44);
    __m512 v2 = _mm512_shuffle_f32x4(u0, u1, 0xEE), v3 = _mm512_shuffle_f32x4(u2, u3, 0xEE);
    _mm512_storeu_ps(out, _mm512_shuffle_f32x4(v0, v1, 0x88));
    _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(v0, v1, 0xDD));
    _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(v2, v3, 0x88));
    _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(v2, v3, 0xDD));
}

TARGET_AVX512 static inline __m512 uniform16(__m512i x, __m512 scale) {
    __m512i v = _mm512_sub_epi32(_mm512_srli_epi32(x, 8), _mm512_set1_epi32(1 << 23));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(0x1p-23f)), scale);
}

/* log_unit8, cos_turn8 and normal8 on 16 lanes: the same operations in the same order. */
TARGET_AVX512 static inline __m512 log_unit16(__m512 u) {
    __m512i i = _mm512_castps_si512(u);
    __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(i, 23), _mm512_set1_epi32(126));
    __m512 m = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_and_si512(i, _mm512_set1_epi32(0x007FFFFF)), _mm512_set1_epi32(0x3F000000)));
    __mmask16 small = _mm512_cmp_ps_mask(m, _mm512_set1_ps(SQRT_HALF), _CMP_LT_OQ);
    e = _mm512_mask_sub_epi32(e, small, e, _mm512_set1_epi32(1));
    __m512 one = _mm512_set1_ps(1.0f);
    __m512 doubled = _mm512_sub_ps(_mm512_add_ps(m, m), one);
    m = _mm512_mask_blend_ps(small, _mm512_sub_ps(m, one), doubled);
    __m512 z = _mm512_mul_ps(m, m);
    __m512 p = _mm512_set1_ps(LOG_P0);
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(LOG_P1));
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(LOG_P2));
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(LOG_P3));
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(LOG_P4));
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(LOG_P5));
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(LOG_P6));
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(LOG_P7));
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(LOG_P8));
    __m512 fe = _mm512_cvtepi32_ps(e);
    __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, m), z);
    y = _mm512_fmadd_ps(fe, _mm512_set1_ps(LN2_LO), y);
    y = _mm512_fmadd_ps(_mm512_set1_ps(-0.5f), z, y);
    __m512 r = _mm512_add_ps(m, y);
    return _mm512_fmadd_ps(fe, _mm512_set1_ps(LN2_HI), r);
}

TARGET_AVX512 static inline __m512 cos_turn16(__m512i j) {
    __m512i n = _mm512_srli_epi32(_mm512_add_epi32(j, _mm512_set1_epi32(1 << 21)), 22);
    __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(j, _mm512_slli_epi32(n, 22))),
                             _mm512_set1_ps(0x1p-24f));
    __m512 theta = _mm512_mul_ps(t, _mm512_set1_ps(TWO_PI));
    __m512 z = _mm512_mul_ps(theta, theta);
    __m512 s = _mm512_fmadd_ps(_mm512_set1_ps(SIN_P0), z, _mm512_set1_ps(SIN_P1));
    s = _mm512_fmadd_ps(s, z, _mm512_set1_ps(SIN_P2));
    s = _mm512_fmadd_ps(_mm512_mul_ps(s, z), theta, theta);
    __m512 c = _mm512_fmadd_ps(_mm512_set1_ps(COS_P0), z, _mm512_set1_ps(COS_P1));
    c = _mm512_fmadd_ps(c, z, _mm512_set1_ps(COS_P2));
    c = _mm512_fmadd_ps(_mm512_mul_ps(c, z), z,
                        _mm512_fmadd_ps(_mm512_set1_ps(-0.5f), z, _mm512_set1_ps(1.0f)));
    __m512 v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(n, _mm512_set1_epi32(1)), c, s);
    __m512i sign = _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(n, _mm512_set1_epi32(1)),
                                                      _mm512_set1_epi32(2)), 30);
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign));
}

TARGET_AVX512 static inline __m512 normal16(__m512i xa, __m512i xb) {
    __m512i a = _mm512_add_epi32(_mm512_srli_epi32(xa, 8), _mm512_set1_epi32(1));
    __m512 u1 = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(0x1p-24f));
    __m512 radius = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log_unit16(u1)));
    return _mm512_mul_ps(radius, cos_turn16(_mm512_srli_epi32(xb, 8)));
}

/* Words (kind 0), uniform (1) or normal values (2) of blocks first .. first + 32 n - 1. */
TARGET_AVX512 static void blocks_avx512(uint64_t first, size_t n32, const keys_t *keys, int kind,
                                        void *out, float bound) {
    const __m512 scale = _mm512_set1_ps(bound);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (size_t i = 0; i < n32; i++) {
        uint64_t b0 = first + 32 * (uint64_t)i;
        __m512i c[2][4];
        if ((uint32_t)b0 <= 0xFFFFFFFFu - 31) {
            for (int g = 0; g < 2; g++) {
                c[g][0] = _mm512_add_epi32(_mm512_set1_epi32((int)((uint32_t)b0 + 16u * (uint32_t)g)),
                                           iota);
                c[g][1] = _mm512_set1_epi32((int)(uint32_t)(b0 >> 32));
                c[g][2] = c[g][3] = _mm512_setzero_si512();
            }
        } else {
            uint32_t w0[32], w1[32];
            for (int q = 0; q < 32; q++) {
                w0[q] = (uint32_t)(b0 + (uint64_t)q);
                w1[q] = (uint32_t)((b0 + (uint64_t)q) >> 32);
            }
            for (int g = 0; g < 2; g++) {
                c[g][0] = _mm512_loadu_si512(w0 + 16 * g);
                c[g][1] = _mm512_loadu_si512(w1 + 16 * g);
                c[g][2] = c[g][3] = _mm512_setzero_si512();
            }
        }
        rounds16x2(c, keys);
        for (int g = 0; g < 2; g++) {
            size_t b = 32 * i + 16 * (size_t)g;
            if (kind == 1) {
                store_interleaved16((float *)out + 4 * b, uniform16(c[g][0], scale),
                                    uniform16(c[g][1], scale), uniform16(c[g][2], scale),
                                    uniform16(c[g][3], scale));
            } else if (kind == 2) { /* element 2 b' + q of block b' is z_q(b') */
                const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7,
                                                        20, 21, 22, 23);
                const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13,
                                                         14, 15, 28, 29, 30, 31);
                __m512 za = normal16(c[g][0], c[g][1]), zb = normal16(c[g][2], c[g][3]);
                __m512 lo = _mm512_unpacklo_ps(za, zb), hi = _mm512_unpackhi_ps(za, zb);
                float *o = (float *)out + 2 * b;
                _mm512_storeu_ps(o, _mm512_permutex2var_ps(lo, first, hi));
                _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(lo, second, hi));
            } else {
                float words[64];
                store_interleaved16(words, _mm512_castsi512_ps(c[g][0]),
                                    _mm512_castsi512_ps(c[g][1]), _mm512_castsi512_ps(c[g][2]),
                                    _mm512_castsi512_ps(c[g][3]));
                int64_t *o = (int64_t *)out + 4 * b;
                for (int q = 0; q < 8; q++) {
                    __m256i w = _mm256_loadu_si256((const __m256i *)(words + 8 * q));
                    _mm512_storeu_si512(o + 8 * q, _mm512_cvtepu32_epi64(w));
                }
            }
        }
    }
}

#endif /* MCNC_X86 */

/* ---- dispatch ---------------------------------------------------------------------------- */

typedef enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 } isa_t;
static isa_t isa = ISA_SCALAR;
static const char *const ISA_NAMES[] = {"scalar", "avx2", "avx512"};

static void detect_isa(void) {
#if MCNC_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = ISA_AVX2;
    if (isa == ISA_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"))
        isa = ISA_AVX512;
#endif
}

/* Blocks per call of the vector kernels (0: none on this CPU). */
static size_t vector_group(void) {
#if MCNC_X86
    if (isa == ISA_AVX512) return 32;
    if (isa >= ISA_AVX2) return 16;
#endif
    return 0;
}

/* Blocks first .. first + n - 1 (n a multiple of vector_group()) by the vector kernel. */
static void blocks_vector(uint64_t first, size_t n, const keys_t *keys, int kind, void *out,
                          float bound) {
#if MCNC_X86
    if (isa == ISA_AVX512)
        blocks_avx512(first, n / 32, keys, kind, out, bound);
    else
        blocks_avx2(first, n / 16, keys, kind, out, bound);
#else
    (void)first; (void)n; (void)keys; (void)kind; (void)out; (void)bound;
#endif
}

static void at_scalar(const uint64_t *index, size_t n, const keys_t *keys, int normal,
                      float *out, float bound) {
    for (size_t i = 0; i < n; i++) {
        uint32_t w[4];
        uint64_t e = index[i];
        if (normal) {
            block_scalar(e >> 1, keys, w);
            out[i] = normal_of(w[2 * (e & 1)], w[2 * (e & 1) + 1]);
        } else {
            block_scalar(e >> 2, keys, w);
            out[i] = uniform_of(w[e & 3], bound);
        }
    }
}

static void at_vector(const uint64_t *index, size_t n, const keys_t *keys, int normal,
                      float *out, float bound) {
#if MCNC_X86
    if (isa >= ISA_AVX2) {
        at_avx2(index, n, keys, normal, out, bound);
        return;
    }
#endif
    at_scalar(index, n, keys, normal, out, bound);
}

static inline size_t run_end(const uint64_t *x, size_t i, size_t n) {
    if (i + 1 >= n || x[i + 1] != x[i] + 1) return i + 1; /* a single element */
#if MCNC_X86
    if (isa >= ISA_AVX2) return run_end_avx2(x, i, n);
#endif
    size_t j = i + 1;
    while (j < n && x[j] == x[j - 1] + 1) j++;
    return j;
}

/* ---- the draws --------------------------------------------------------------------------- */

typedef enum { KIND_WORDS = 0, KIND_UNIFORM = 1, KIND_NORMAL = 2 } kind_t;

/* Elements per block of each kind: a block is 4 words or uniforms, or 2 normals. */
static inline int per_block(kind_t kind) { return kind == KIND_NORMAL ? 2 : 4; }

/* Element `lane` of a block's words as an output value. */
static inline void emit(kind_t kind, const uint32_t w[4], int lane, void *out, size_t at,
                        float bound) {
    if (kind == KIND_WORDS)
        ((int64_t *)out)[at] = (int64_t)w[lane];
    else if (kind == KIND_UNIFORM)
        ((float *)out)[at] = uniform_of(w[lane], bound);
    else
        ((float *)out)[at] = normal_of(w[2 * lane], w[2 * lane + 1]);
}

/* `count` elements from element `lane` of block `block` into out[0 .. count). */
static void draw_range(uint64_t block, int lane, size_t count, const keys_t *keys, kind_t kind,
                       void *out, float bound) {
    const size_t per = (size_t)per_block(kind);
    const size_t item = kind == KIND_WORDS ? sizeof(int64_t) : sizeof(float);
    const size_t group = vector_group();
    size_t done = 0;
    if (!group) { /* the portable scalar C */
        uint32_t w[4];
        for (; done < count; block++, lane = 0) {
            block_scalar(block, keys, w);
            for (; lane < (int)per && done < count; lane++, done++)
                emit(kind, w, lane, out, done, bound);
        }
        return;
    }
    /* Whole vector groups straight into out; a partly wanted group (the head when the range
     * starts inside a block, the tail) through a buffer, so every element is made by the
     * same vector code (a normal's bits do not depend on where its range starts). */
    while (done < count) {
        size_t left = count - done;
        if (!lane && left >= group * per) {
            size_t n = left / (group * per) * group;
            blocks_vector(block, n, keys, kind, (char *)out + done * item, bound);
            block += n;
            done += n * per;
        } else {
            int64_t buffer[32 * 4]; /* a group's values: at most 32 blocks of 4 words */
            blocks_vector(block, group, keys, kind, buffer, bound);
            size_t take = group * per - (size_t)lane < left ? group * per - (size_t)lane : left;
            memcpy((char *)out + done * item, (char *)buffer + (size_t)lane * item, take * item);
            done += take;
            block += group;
            lane = 0;
        }
    }
}

/* Runs of at least this many consecutive indices are drawn as ranges, a block's words once;
 * shorter ones are gathered, PENDING at a time, and drawn one element per vector lane. */
#define RUN_MIN 32
#define PENDING 256
/* A long run is scanned and drawn this many indices at a time, so its indices are still in
 * cache when the values are written. */
#define RUN_STEP 16384
/* A stretch of at least RUN_MIN ascending indices whose steps are at most a block's elements
 * (every second column of a box, say) is drawn as the range it spans, at most SPAN_MAX values
 * at a time, through a buffer: no more blocks than one per index, and all of them by the
 * range's vector code rather than one gathered lane per index. */
#define SPAN_MAX 4096

/* The end of the stretch of ascending indices from i whose steps are at most `gap` and whose
 * span is at most SPAN_MAX values. */
static inline size_t stretch_end(const uint64_t *x, size_t i, size_t n, uint64_t gap) {
    size_t j = i + 1;
    while (j < n && x[j] > x[j - 1] && x[j] - x[j - 1] <= gap && x[j] - x[i] < SPAN_MAX) j++;
    return j;
}

/* out[i] = element index[i] of the stream (uniform or normal values); -1 if an index is
 * negative. */
static int draw_at(const int64_t *signed_index, size_t n, const keys_t *keys, kind_t kind,
                   float *out, float bound) {
    const uint64_t *index = (const uint64_t *)signed_index;
    const int normal = kind == KIND_NORMAL;
    const uint64_t per = (uint64_t)per_block(kind);
    uint64_t pending[PENDING];
    size_t at[PENDING], held = 0;
    float values[PENDING];
    size_t i = 0;
    size_t probed = 0; /* a stretch from an index below this one is known to be too short */
    while (i < n || held) {
        size_t limit = n - i > RUN_STEP ? i + RUN_STEP : n;
        size_t j = i < n ? run_end(index, i, limit) : i;
        if (i < n && (signed_index[i] < 0 || signed_index[j - 1] < 0)) return -1;
        int ranged = j - i >= RUN_MIN;
        size_t spread = i;
        if (!ranged && i < n && i >= probed) {
            spread = stretch_end(index, i, limit, per);
            /* too short: so is every stretch from inside it (it ended at a step, not at
             * SPAN_MAX, which fewer than RUN_MIN steps of at most a block cannot reach) */
            if (spread - i < RUN_MIN) probed = spread;
        }
        if (ranged) {
            draw_range(index[i] / per, (int)(index[i] % per), j - i, keys, kind, out + i, bound);
        } else if (spread - i >= RUN_MIN) {
            float span[SPAN_MAX];
            uint64_t first = index[i];
            if (signed_index[spread - 1] < 0) return -1;
            draw_range(first / per, (int)(first % per), (size_t)(index[spread - 1] - first) + 1,
                       keys, kind, span, bound);
            for (size_t q = i; q < spread; q++) out[q] = span[index[q] - first];
            j = spread;
        } else {
            for (; i < j && held < PENDING; i++, held++) {
                pending[held] = index[i];
                at[held] = i;
            }
            j = i; /* what did not fit is taken after the flush */
        }
        if (held == PENDING || (j >= n && held)) {
            at_vector(pending, held, keys, normal, values, bound);
            for (size_t q = 0; q < held; q++) out[at[q]] = values[q];
            held = 0;
        }
        i = j;
    }
    return 0;
}

/* ---- Python ------------------------------------------------------------------------------ */

static int parse_key(PyObject *seed_obj, PyObject *stream_obj, keys_t *keys) {
    unsigned long long seed = PyLong_AsUnsignedLongLong(seed_obj);
    if (seed == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    unsigned long long stream = PyLong_AsUnsignedLongLong(stream_obj);
    if (stream == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (seed > 0xFFFFFFFFull || stream > 0xFFFFFFFFull) {
        PyErr_SetString(PyExc_ValueError, "seed and stream must be uint32 values");
        return -1;
    }
    schedule(keys, (uint32_t)seed, (uint32_t)stream);
    return 0;
}

static int get_buffer(PyObject *obj, Py_buffer *view, size_t itemsize, int writable) {
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS
                                                : PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if ((size_t)view->len % itemsize) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "buffer of %zd bytes is not a whole number of %zu-byte "
                     "items", view->len, itemsize);
        return -1;
    }
    return 0;
}

static PyObject *range_draw(PyObject *args, kind_t kind) {
    PyObject *out_obj, *seed, *stream;
    unsigned long long block;
    int lane;
    double bound = 0.0;
    if (kind == KIND_UNIFORM) {
        if (!PyArg_ParseTuple(args, "OOOKid", &out_obj, &seed, &stream, &block, &lane, &bound))
            return NULL;
    } else if (!PyArg_ParseTuple(args, "OOOKi", &out_obj, &seed, &stream, &block, &lane)) {
        return NULL;
    }
    keys_t keys;
    if (parse_key(seed, stream, &keys) < 0) return NULL;
    Py_buffer out;
    size_t item = kind == KIND_WORDS ? sizeof(int64_t) : sizeof(float);
    if (get_buffer(out_obj, &out, item, 1) < 0) return NULL;
    size_t count = (size_t)out.len / item;
    uint64_t per = (uint64_t)per_block(kind);
    /* the last block is block + (lane + count - 1) / per, which must stay below 2^63 */
    if (lane < 0 || (uint64_t)lane >= per || block >= (1ull << 63)
        || (count && ((uint64_t)lane + count - 1) / per >= (1ull << 63) - block)) {
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "elements outside blocks 0 .. 2**63");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    draw_range((uint64_t)block, lane, count, &keys, kind, out.buf, (float)bound);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

static PyObject *indexed_draw(PyObject *args, kind_t kind) {
    PyObject *out_obj, *index_obj, *seed, *stream;
    double bound = 0.0;
    if (kind == KIND_UNIFORM) {
        if (!PyArg_ParseTuple(args, "OOOOd", &out_obj, &seed, &stream, &index_obj, &bound))
            return NULL;
    } else if (!PyArg_ParseTuple(args, "OOOO", &out_obj, &seed, &stream, &index_obj)) {
        return NULL;
    }
    keys_t keys;
    if (parse_key(seed, stream, &keys) < 0) return NULL;
    Py_buffer out, index;
    size_t item = kind == KIND_WORDS ? sizeof(int64_t) : sizeof(float);
    if (get_buffer(out_obj, &out, item, 1) < 0) return NULL;
    if (get_buffer(index_obj, &index, sizeof(int64_t), 0) < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    size_t n = (size_t)index.len / sizeof(int64_t);
    int status = 0;
    if ((size_t)out.len / item != n) {
        status = -2;
    } else {
        Py_BEGIN_ALLOW_THREADS
        status = draw_at((const int64_t *)index.buf, n, &keys, kind, (float *)out.buf,
                         (float)bound);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&index);
    PyBuffer_Release(&out);
    if (status == -1) {
        PyErr_SetString(PyExc_ValueError, "negative element index");
        return NULL;
    }
    if (status == -2) {
        PyErr_SetString(PyExc_ValueError, "out and index differ in length");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_words(PyObject *self, PyObject *args) {
    (void)self;
    return range_draw(args, KIND_WORDS);
}
static PyObject *py_uniform(PyObject *self, PyObject *args) {
    (void)self;
    return range_draw(args, KIND_UNIFORM);
}
static PyObject *py_normal(PyObject *self, PyObject *args) {
    (void)self;
    return range_draw(args, KIND_NORMAL);
}
static PyObject *py_uniform_at(PyObject *self, PyObject *args) {
    (void)self;
    return indexed_draw(args, KIND_UNIFORM);
}
static PyObject *py_normal_at(PyObject *self, PyObject *args) {
    (void)self;
    return indexed_draw(args, KIND_NORMAL);
}

static PyObject *py_isa(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    return PyUnicode_FromString(ISA_NAMES[isa]);
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    isa_t best = isa;
    isa = ISA_SCALAR;
    detect_isa();
    isa_t supported = isa;
    isa = best;
    for (int i = 0; i <= (int)ISA_AVX512; i++) {
        if (strcmp(name, ISA_NAMES[i]) == 0) {
            if ((isa_t)i > supported) {
                PyErr_Format(PyExc_ValueError, "this CPU does not support %s", name);
                return NULL;
            }
            isa = (isa_t)i;
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_ValueError, "unknown instruction set %s", name);
    return NULL;
}

static PyMethodDef methods[] = {
    {"words", py_words, METH_VARARGS,
     "words(out, seed, stream, block, lane): the stream from word `lane` of `block`, as int64."},
    {"uniform", py_uniform, METH_VARARGS,
     "uniform(out, seed, stream, block, lane, bound): float32 bound * s (§8.2), 4 per block."},
    {"normal", py_normal, METH_VARARGS,
     "normal(out, seed, stream, block, lane): float32 normal values (§8.3), 2 per block."},
    {"uniform_at", py_uniform_at, METH_VARARGS,
     "uniform_at(out, seed, stream, index, bound): uniform values at int64 element indices."},
    {"normal_at", py_normal_at, METH_VARARGS,
     "normal_at(out, seed, stream, index): normal values at int64 element indices."},
    {"isa", py_isa, METH_NOARGS, "isa(): the instruction set the kernels use."},
    {"set_isa", py_set_isa, METH_VARARGS,
     "set_isa(name): use 'scalar', 'avx2' or 'avx512' (if the CPU has it); for tests."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_philox", "Compiled Philox4x32-10 kernels (SPEC.md §8).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__philox(void) {
    detect_isa();
    return PyModule_Create(&module);
}
