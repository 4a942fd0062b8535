/* sdport._casts: float32 <-> float16 and float32 <-> bfloat16 conversions at memory speed.
 *
 * The same results as torch's CPU .to() (and sdport.dtypes' numpy path): round to nearest even,
 * subnormals and infinities kept, NaNs made quiet with their sign and top payload bits (float16, as
 * F16C does) or written as one given pattern (bfloat16, as torch's kernels do). The kernel is chosen
 * once, at import, from what the CPU offers: AVX-512F, else AVX2 with F16C; on other CPUs
 * level() is "" and sdport uses numpy. Each function takes a source and a writable destination
 * buffer (C-contiguous), checks that their element counts agree, and runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SDPORT_X86 1
#include <immintrin.h>
#endif

typedef void (*kernel)(const void *src, void *dst, Py_ssize_t n, uint16_t nan);

#ifdef SDPORT_X86
#define AVX2 __attribute__((target("avx2,f16c,fma")))
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,avx2")))
#define RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

/* bfloat16 by integer arithmetic, written so that the compiler vectorises it under each target */
#define BF16_BODY                                                                  \
    const uint32_t *s = (const uint32_t *)src;                                     \
    uint16_t *d = (uint16_t *)dst;                                                 \
    for (Py_ssize_t i = 0; i < n; i++) {                                           \
        uint32_t b = s[i];                                                         \
        uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;                       \
        d[i] = (b & 0x7FFFFFFFu) > 0x7F800000u ? nan : (uint16_t)r;                \
    }
#define WIDEN_BF16_BODY                                                            \
    const uint16_t *s = (const uint16_t *)src;                                     \
    uint32_t *d = (uint32_t *)dst;                                                 \
    for (Py_ssize_t i = 0; i < n; i++)                                             \
        d[i] = (uint32_t)s[i] << 16;

AVX2 static void to_bf16_avx2(const void *src, void *dst, Py_ssize_t n, uint16_t nan) { BF16_BODY }
AVX512 static void to_bf16_avx512(const void *src, void *dst, Py_ssize_t n, uint16_t nan) { BF16_BODY }
AVX2 static void from_bf16_avx2(const void *src, void *dst, Py_ssize_t n, uint16_t nan) { (void)nan; WIDEN_BF16_BODY }
AVX512 static void from_bf16_avx512(const void *src, void *dst, Py_ssize_t n, uint16_t nan) { (void)nan; WIDEN_BF16_BODY }

AVX2 static void to_f16_avx2(const void *src, void *dst, Py_ssize_t n, uint16_t nan) {
    (void)nan;
    const float *s = (const float *)src;
    uint16_t *d = (uint16_t *)dst;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), RNE));
    if (i < n) {  /* the tail through a padded block */
        float tail[8] = {0};
        uint16_t out[8];
        memcpy(tail, s + i, (size_t)(n - i) * sizeof(float));
        _mm_storeu_si128((__m128i *)out, _mm256_cvtps_ph(_mm256_loadu_ps(tail), RNE));
        memcpy(d + i, out, (size_t)(n - i) * sizeof(uint16_t));
    }
}

AVX512 static void to_f16_avx512(const void *src, void *dst, Py_ssize_t n, uint16_t nan) {
    (void)nan;
    const float *s = (const float *)src;
    uint16_t *d = (uint16_t *)dst;
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtps_ph(_mm512_loadu_ps(s + i), RNE));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        _mm256_mask_storeu_epi16(d + i, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, s + i), RNE));
    }
}

AVX2 static void from_f16_avx2(const void *src, void *dst, Py_ssize_t n, uint16_t nan) {
    (void)nan;
    const uint16_t *s = (const uint16_t *)src;
    float *d = (float *)dst;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    if (i < n) {
        uint16_t tail[8] = {0};
        float out[8];
        memcpy(tail, s + i, (size_t)(n - i) * sizeof(uint16_t));
        _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tail)));
        memcpy(d + i, out, (size_t)(n - i) * sizeof(float));
    }
}

AVX512 static void from_f16_avx512(const void *src, void *dst, Py_ssize_t n, uint16_t nan) {
    (void)nan;
    const uint16_t *s = (const uint16_t *)src;
    float *d = (float *)dst;
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i))));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(d + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s + i)));
    }
}
#endif

enum { TO_F16, FROM_F16, TO_BF16, FROM_BF16 };
static kernel kernels[4];
static const char *level = "";

static void choose(void) {
    const char *off = getenv("SDPORT_NO_FASTCAST");
    if (off && *off && strcmp(off, "0"))
        return;
#ifdef SDPORT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c")) {
        kernels[TO_F16] = to_f16_avx512, kernels[FROM_F16] = from_f16_avx512;
        kernels[TO_BF16] = to_bf16_avx512, kernels[FROM_BF16] = from_bf16_avx512;
        level = "avx512";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
               __builtin_cpu_supports("fma")) {
        kernels[TO_F16] = to_f16_avx2, kernels[FROM_F16] = from_f16_avx2;
        kernels[TO_BF16] = to_bf16_avx2, kernels[FROM_BF16] = from_bf16_avx2;
        level = "avx2+f16c";
    }
#endif
}

/* run kernel k from src (elements of `in` bytes) into dst (elements of `out` bytes) */
static PyObject *run(PyObject *args, int k, Py_ssize_t in, Py_ssize_t out) {
    Py_buffer s, d;
    unsigned short nan = 0;
    if (!kernels[k]) {
        PyErr_SetString(PyExc_RuntimeError, "sdport._casts: no fast kernel on this CPU");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*w*|H", &s, &d, &nan))
        return NULL;
    Py_ssize_t n = s.len / in;
    if (s.len % in || d.len != n * out) {
        PyBuffer_Release(&s);
        PyBuffer_Release(&d);
        PyErr_SetString(PyExc_ValueError, "sdport._casts: source and destination sizes disagree");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    kernels[k](s.buf, d.buf, n, (uint16_t)nan);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&s);
    PyBuffer_Release(&d);
    Py_RETURN_NONE;
}

static PyObject *f32_to_f16(PyObject *self, PyObject *args) { (void)self; return run(args, TO_F16, 4, 2); }
static PyObject *f16_to_f32(PyObject *self, PyObject *args) { (void)self; return run(args, FROM_F16, 2, 4); }
static PyObject *f32_to_bf16(PyObject *self, PyObject *args) { (void)self; return run(args, TO_BF16, 4, 2); }
static PyObject *bf16_to_f32(PyObject *self, PyObject *args) { (void)self; return run(args, FROM_BF16, 2, 4); }

static PyObject *get_level(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyUnicode_FromString(level);
}

static PyMethodDef methods[] = {
    {"f32_to_f16", f32_to_f16, METH_VARARGS, "f32_to_f16(src, dst): float32 -> float16, round to nearest even"},
    {"f16_to_f32", f16_to_f32, METH_VARARGS, "f16_to_f32(src, dst): float16 -> float32, NaNs made quiet"},
    {"f32_to_bf16", f32_to_bf16, METH_VARARGS, "f32_to_bf16(src, dst, nan): float32 -> bfloat16, NaNs -> nan"},
    {"bf16_to_f32", bf16_to_f32, METH_VARARGS, "bf16_to_f32(src, dst): bfloat16 -> float32 (exact)"},
    {"level", get_level, METH_NOARGS, "the kernel in use: 'avx512', 'avx2+f16c', or '' (none: use numpy)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "sdport._casts", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__casts(void) {
    choose();
    return PyModule_Create(&module);
}
