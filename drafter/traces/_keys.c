/* The per-prompt arithmetic of the dedup keys (drafter/traces/dedup.py), in C.

   In Python, a prompt's keys cost ~18 us (~30 words), mostly in making objects: a bytes object for
   each word shingle handed to rensa, then its signature as 128 ints, packed again into bytes and
   sliced into 8 bands for xxhash. Here (~10 us, most of it rensa's signatures as Python ints):

   shingle_hashes(texts, shingle) -> (hashes, offsets)
       Each text's word shingles (as dedup.shingles makes them: its UTF-8 bytes split at ASCII
       whitespace, `shingle` words joined by one space, or all of them when there are no more)
       hashed as rensa hashes a bytes token. `hashes` is their uint64s, text after text;
       `offsets` the uint64 start of each text's run and the end (len(texts) + 1 of them):
       what RMinHash.digest_matrix_from_flat_token_hashes reads.

   keys(texts, signatures, bands, rows) -> bytes
       Per text, 1 + bands int64 (native order): the exact key, XXH64 of its UTF-8 bytes (seed 0),
       then for each band b the XXH64 (seed 1 + b) of the signature's values b*rows ... as
       little-endian uint32, each minus 2**63 (signed, as SQLite keeps them).

   Both are checked against the Python definitions (tests/test_traces_dedup.py). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "little-endian only (the values are read and packed as they lie in memory): dedup.py falls back to Python"
#endif

/* ----- rensa's hash of a bytes token (rensa 0.5: utils.rs calculate_hash_fast) ---------------- */
static const uint64_t K = 0xf1357aea2e62a9c5ULL, SEED1 = 0x243f6a8885a308d3ULL,
                      SEED2 = 0x13198a2e03707344ULL, SPREAD = 0xa4093822299f31d0ULL;

static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static inline uint64_t mix(uint64_t x, uint64_t y) {
    __uint128_t full = (__uint128_t)x * y;
    return (uint64_t)full ^ (uint64_t)(full >> 64);
}

static uint64_t token_hash(const uint8_t *b, size_t n) {
    uint64_t s0 = SEED1, s1 = SEED2;
    if (n <= 16) {
        if (n >= 8) { s0 ^= rd64(b); s1 ^= rd64(b + n - 8); }
        else if (n >= 4) { s0 ^= rd32(b); s1 ^= rd32(b + n - 4); }
        else if (n > 0) { s0 ^= b[0]; s1 ^= ((uint64_t)b[n - 1] << 8) | b[n / 2]; }
    } else {
        for (size_t off = 0; off < n - 16; off += 16) {
            uint64_t t = mix(s0 ^ rd64(b + off), SPREAD ^ rd64(b + off + 8));
            s0 = s1;
            s1 = t;
        }
        s0 ^= rd64(b + n - 16);
        s1 ^= rd64(b + n - 8);
    }
    uint64_t h = (mix(s0, s1) ^ (uint64_t)n) * K;
    return (h << 26) | (h >> 38);
}

/* ----- XXH64 (the xxHash specification) ---------------------------------------------------------- */
static const uint64_t P1 = 0x9E3779B185EBCA87ULL, P2 = 0xC2B2AE3D27D4EB4FULL, P3 = 0x165667B19E3779F9ULL,
                      P4 = 0x85EBCA77C2B2AE63ULL, P5 = 0x27D4EB2F165667C5ULL;

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t round64(uint64_t acc, uint64_t in) { return rotl(acc + in * P2, 31) * P1; }
static inline uint64_t merge64(uint64_t acc, uint64_t v) { return (acc ^ round64(0, v)) * P1 + P4; }

static uint64_t xxh64(const uint8_t *p, size_t n, uint64_t seed) {
    const uint8_t *end = p + n;
    uint64_t h;
    if (n >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        do {
            v1 = round64(v1, rd64(p)); v2 = round64(v2, rd64(p + 8));
            v3 = round64(v3, rd64(p + 16)); v4 = round64(v4, rd64(p + 24));
            p += 32;
        } while (p + 32 <= end);
        h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
        h = merge64(h, v1); h = merge64(h, v2); h = merge64(h, v3); h = merge64(h, v4);
    } else {
        h = seed + P5;
    }
    h += (uint64_t)n;
    for (; p + 8 <= end; p += 8) h = rotl(h ^ round64(0, rd64(p)), 27) * P1 + P4;
    if (p + 4 <= end) { h = rotl(h ^ ((uint64_t)rd32(p) * P1), 23) * P2 + P3; p += 4; }
    for (; p < end; p++) h = rotl(h ^ (*p * P5), 11) * P1;
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
    return h;
}

/* ----- shingle_hashes ------------------------------------------------------------------------------ */
static inline int is_space(uint8_t c) { return c == ' ' || (c >= '\t' && c <= '\r'); }  /* bytes.split() */

/* A growable uint64 array. */
typedef struct { uint64_t *v; size_t n, cap; } U64s;

static int push(U64s *a, uint64_t x) {
    if (a->n == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 4096;
        uint64_t *v = PyMem_Realloc(a->v, cap * sizeof *v);
        if (!v) { PyErr_NoMemory(); return -1; }
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return 0;
}

static PyObject *shingle_hashes(PyObject *self, PyObject *args) {
    PyObject *texts, *seq;
    Py_ssize_t shingle;
    if (!PyArg_ParseTuple(args, "On", &texts, &shingle)) return NULL;
    if (shingle < 1) { PyErr_SetString(PyExc_ValueError, "shingle must be at least 1"); return NULL; }
    if (!(seq = PySequence_Fast(texts, "texts must be a sequence of str"))) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    U64s hashes = {0}, offsets = {0};
    size_t *starts = NULL, *ends = NULL, words_cap = 0;  /* word bounds of one text */
    uint8_t *buf = NULL;
    size_t buf_cap = 0;
    PyObject *result = NULL;
    if (push(&offsets, 0) < 0) goto done;
    for (Py_ssize_t t = 0; t < count; t++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, t);
        Py_ssize_t len;
        const uint8_t *s = (const uint8_t *)PyUnicode_AsUTF8AndSize(item, &len);
        if (!s) goto done;
        size_t nw = 0;
        for (Py_ssize_t i = 0; i < len;) {
            while (i < len && is_space(s[i])) i++;
            if (i == len) break;
            if (nw == words_cap) {
                words_cap = words_cap ? 2 * words_cap : 256;
                size_t *a = PyMem_Realloc(starts, words_cap * sizeof *a), *b;
                if (!a) { PyErr_NoMemory(); goto done; }
                starts = a;
                if (!(b = PyMem_Realloc(ends, words_cap * sizeof *b))) { PyErr_NoMemory(); goto done; }
                ends = b;
            }
            starts[nw] = (size_t)i;
            while (i < len && !is_space(s[i])) i++;
            ends[nw++] = (size_t)i;
        }
        size_t width = nw <= (size_t)shingle ? nw : (size_t)shingle;  /* words a shingle */
        size_t runs = nw <= (size_t)shingle ? 1 : nw - (size_t)shingle + 1;
        for (size_t r = 0; r < runs; r++) {
            /* the shingle's words joined by one space: a slice of the text when they already are */
            size_t a = width ? starts[r] : 0, z = width ? ends[r + width - 1] : 0, n = 0;
            int single = 1;
            for (size_t w = r; w + 1 < r + width; w++) single &= starts[w + 1] - ends[w] == 1 && s[ends[w]] == ' ';
            const uint8_t *token = s + a;
            if (single) {
                n = z - a;
            } else {
                if (z - a > buf_cap) {
                    uint8_t *nb = PyMem_Realloc(buf, z - a);
                    if (!nb) { PyErr_NoMemory(); goto done; }
                    buf = nb;
                    buf_cap = z - a;
                }
                for (size_t w = r; w < r + width; w++) {
                    if (w > r) buf[n++] = ' ';
                    memcpy(buf + n, s + starts[w], ends[w] - starts[w]);
                    n += ends[w] - starts[w];
                }
                token = buf;
            }
            if (push(&hashes, token_hash(token, n)) < 0) goto done;
        }
        if (push(&offsets, hashes.n) < 0) goto done;
    }
    result = Py_BuildValue("(y#y#)", (const char *)hashes.v, (Py_ssize_t)(hashes.n * 8),
                           (const char *)offsets.v, (Py_ssize_t)(offsets.n * 8));
done:
    PyMem_Free(hashes.v);
    PyMem_Free(offsets.v);
    PyMem_Free(starts);
    PyMem_Free(ends);
    PyMem_Free(buf);
    Py_DECREF(seq);
    return result;
}

/* ----- keys ------------------------------------------------------------------------------------------ */
static PyObject *keys(PyObject *self, PyObject *args) {
    PyObject *texts, *signatures, *tseq = NULL, *sseq = NULL, *out = NULL;
    Py_ssize_t bands, rows;
    if (!PyArg_ParseTuple(args, "OOnn", &texts, &signatures, &bands, &rows)) return NULL;
    if (bands < 1 || rows < 1) { PyErr_SetString(PyExc_ValueError, "bands and rows must be at least 1"); return NULL; }
    if (!(tseq = PySequence_Fast(texts, "texts must be a sequence of str"))) goto done;
    if (!(sseq = PySequence_Fast(signatures, "signatures must be a sequence of lists of int"))) goto done;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(tseq);
    if (PySequence_Fast_GET_SIZE(sseq) != count) {
        PyErr_SetString(PyExc_ValueError, "one signature per text");
        goto done;
    }
    if (!(out = PyBytes_FromStringAndSize(NULL, count * (1 + bands) * 8))) goto done;
    int64_t *dst = (int64_t *)PyBytes_AS_STRING(out);
    uint32_t packed[1024];
    if (bands * rows > 1024) { PyErr_SetString(PyExc_ValueError, "at most 1024 values a signature"); goto fail; }
    for (Py_ssize_t t = 0; t < count; t++) {
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(tseq, t), &len);
        if (!s) goto fail;
        *dst++ = (int64_t)(xxh64((const uint8_t *)s, (size_t)len, 0) - (1ULL << 63));
        PyObject *sig = PySequence_Fast(PySequence_Fast_GET_ITEM(sseq, t), "a signature must be a list of int");
        if (!sig) goto fail;
        if (PySequence_Fast_GET_SIZE(sig) < bands * rows) {
            Py_DECREF(sig);
            PyErr_SetString(PyExc_ValueError, "a signature shorter than bands * rows");
            goto fail;
        }
        for (Py_ssize_t i = 0; i < bands * rows; i++) {
            unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(sig, i));
            if (v == (unsigned long)-1 && PyErr_Occurred()) { Py_DECREF(sig); goto fail; }
            if (v > 0xffffffffUL) {
                Py_DECREF(sig);
                PyErr_SetString(PyExc_OverflowError, "a signature value past uint32");
                goto fail;
            }
            uint32_t u = (uint32_t)v;
            packed[i] = u;  /* (little-endian in memory, as struct.pack("<I")) */
        }
        Py_DECREF(sig);
        for (Py_ssize_t b = 0; b < bands; b++)
            *dst++ = (int64_t)(xxh64((const uint8_t *)(packed + b * rows), (size_t)rows * 4, (uint64_t)(1 + b))
                               - (1ULL << 63));
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    Py_XDECREF(tseq);
    Py_XDECREF(sseq);
    return out;
}

static PyMethodDef methods[] = {
    {"shingle_hashes", shingle_hashes, METH_VARARGS, "(texts, shingle) -> (uint64 hashes, uint64 offsets) as bytes"},
    {"keys", keys, METH_VARARGS, "(texts, signatures, bands, rows) -> int64 keys as bytes, 1 + bands a text"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_keys", NULL, -1, methods};

PyMODINIT_FUNC PyInit__keys(void) { return PyModule_Create(&module); }
