/* The per-prompt arithmetic of ingestion, in C: the dedup keys (drafter/traces/dedup.py) and the
   decontamination probes (drafter/traces/decontam.py).

   In Python, a prompt's dedup keys cost ~18 us (~30 words), mostly in making objects: a bytes
   object for each word shingle handed to rensa, its signature as 128 Python ints, packed again
   into bytes and sliced into 8 bands for xxhash. Here no object is made for a prompt (~3 us):

   signatures(texts, shingle, num_perm, seed) -> bytes
       Per text, rensa's R-MinHash signature (num_perm uint32, native order) of its word shingles:
       its UTF-8 bytes split at ASCII whitespace, `shingle` words joined by one space (or all of
       them when there are no more: dedup.shingles), each hashed as rensa hashes a bytes token.

   keys(texts, shingle, num_perm, seed, bands, rows) -> bytes
       Per text, 1 + bands int64 (native order): the exact key, XXH64 of its UTF-8 bytes (seed 0),
       then for each band b the XXH64 (seed 1 + b) of its signature's values b*rows ... as
       little-endian uint32, each minus 2**63 (signed, as SQLite keeps them).

   normalize_ascii(text) -> str: dedup.normalize of an ASCII text.

   grams(texts, width, stride) -> (keys, offsets), probe(texts, n, k, stride, bits) -> bytes:
       decontam.gram_keys_py and decontam.probe_py.

   RMINHASH_VERSION: the rensa RMinHash.ALGORITHM_VERSION whose signatures these are (dedup.py
   uses them only under that version). Every function is checked against rensa or the Python
   definitions (tests/test_traces_dedup.py, tests/test_traces_decontam.py). */

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

/* ----- rensa's R-MinHash, ALGORITHM_VERSION 2 (rensa 0.5: src/rminhash/bucket.rs) ---------------------
   Each token's hash is thrown into one of num_perm buckets in each of three rounds, keeping per
   bucket the least rank (the round in the top 2 bits, then 30 bits of the mixed hash): a bucket no
   round reached takes the least of an affine permutation of the token's fallback hash, tagged with
   rank 3. The permutations are rensa's: (a | 1, b) pairs drawn from Xoshiro256++ seeded by SplitMix64. */
#define RMINHASH_VERSION 2
#define MAX_PERM 1024
static const uint64_t GOLDEN = 0x9E3779B97F4A7C15ULL, BUCKET_DOMAIN = 0x6a09e667f3bcc909ULL,
                      ROUND_DOMAIN = 0x3c6ef372fe94f82bULL, FALLBACK_DOMAIN = 0xbb67ae8584caa73bULL;
static const uint32_t FALLBACK = 3U << 30;

static inline uint64_t splitmix64(uint64_t x) {
    uint64_t z = x + GOLDEN;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

typedef struct { uint64_t a[MAX_PERM], b[MAX_PERM]; uint32_t n; } Perms;

static void perms_init(Perms *p, uint32_t n, uint64_t seed) {
    uint64_t s[4];
    for (int i = 0; i < 4; i++) s[i] = splitmix64(seed + (uint64_t)i * GOLDEN);
    for (uint32_t i = 0; i < 2 * n; i++) {
        uint64_t out = rotl(s[0] + s[3], 23) + s[0], t = s[1] << 17;
        s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 45);
        if (i % 2 == 0) p->a[i / 2] = out | 1; else p->b[i / 2] = out;
    }
    p->n = n;
}

static inline uint32_t bucket_of(uint64_t mixed, uint32_t count) {  /* Lemire's product, with rejection */
    uint32_t threshold = (0U - count) % count;  /* (0 for a power of two) */
    for (;;) {
        uint64_t product = (uint64_t)(uint32_t)mixed * count;
        if ((uint32_t)product >= threshold) return (uint32_t)(product >> 32);
        mixed = splitmix64(mixed);
    }
}

static void signature(const Perms *p, const uint64_t *hashes, size_t n, uint32_t *out) {
    uint32_t count = p->n;
    for (uint32_t i = 0; i < count; i++) out[i] = UINT32_MAX;
    for (uint32_t round = 0; round < 3; round++) {
        uint64_t seed = p->b[0] ^ BUCKET_DOMAIN ^ (round * ROUND_DOMAIN);
        for (size_t t = 0; t < n; t++) {
            uint64_t mixed = splitmix64(hashes[t] ^ seed);
            uint32_t rank = (round << 30) | (uint32_t)(mixed >> 34), *v = out + bucket_of(mixed, count);
            if (rank < *v) *v = rank;
        }
    }
    /* Buckets no round reached: the least of a*h + b over the fallback hashes (bits 34..63 of the
       wrapped sum: the same bits of rensa's 128-bit one). Every bucket a round reached ranks lower. */
    uint64_t fallback[256];
    for (size_t start = 0; start < n; start += 256) {
        size_t m = n - start < 256 ? n - start : 256;
        for (size_t t = 0; t < m; t++) fallback[t] = splitmix64(hashes[start + t] ^ p->a[0] ^ FALLBACK_DOMAIN);
        for (uint32_t i = 0; i < count; i++) {
            if (out[i] < FALLBACK) continue;
            uint64_t a = p->a[i], b = p->b[i], least = UINT64_MAX;
            for (size_t t = 0; t < m; t++) {
                uint64_t x = a * fallback[t] + b;
                least = x < least ? x : least;
            }
            uint32_t rank = FALLBACK | (uint32_t)(least >> 34);
            if (rank < out[i]) out[i] = rank;
        }
    }
}

/* ----- a text's shingle hashes ------------------------------------------------------------------------ */
static inline int is_space(uint8_t c) { return c == ' ' || (c >= '\t' && c <= '\r'); }  /* bytes.split() */

/* What one text needs, reused from text to text: word bounds, a shingle's bytes, its hashes. */
typedef struct {
    size_t *words, words_cap;  /* each word's start and end */
    uint8_t *buf;
    size_t buf_cap;
    uint64_t *hashes;
    size_t hashes_cap;
} Scratch;

static void scratch_free(Scratch *s) {
    PyMem_Free(s->words);
    PyMem_Free(s->buf);
    PyMem_Free(s->hashes);
}

static int grow(void **p, size_t *cap, size_t want, size_t size) {
    if (want <= *cap) return 0;
    size_t c = *cap ? *cap : 256;
    while (c < want) c *= 2;
    void *q = PyMem_Realloc(*p, c * size);
    if (!q) { PyErr_NoMemory(); return -1; }
    *p = q;
    *cap = c;
    return 0;
}

#define START(w) s->words[2 * (w)]
#define END(w) s->words[2 * (w) + 1]
/* The text's words (split at ASCII whitespace, as bytes.split), their bounds into s->words: how
   many (-1: error). */
static Py_ssize_t split_words(Scratch *s, const uint8_t *text, Py_ssize_t len) {
    size_t nw = 0;
    for (Py_ssize_t i = 0; i < len;) {
        while (i < len && is_space(text[i])) i++;
        if (i == len) break;
        if (grow((void **)&s->words, &s->words_cap, 2 * nw + 2, sizeof(size_t)) < 0) return -1;
        START(nw) = (size_t)i;
        while (i < len && !is_space(text[i])) i++;
        END(nw++) = (size_t)i;
    }
    return (Py_ssize_t)nw;
}

/* Words r ... r + width - 1 of the split text joined by one space: a slice of the text when they
   already are, else copied into s->buf (NULL: error). */
static const uint8_t *joined(Scratch *s, const uint8_t *text, size_t r, size_t width, size_t *n) {
    size_t a = width ? START(r) : 0, z = width ? END(r + width - 1) : 0;
    int single = 1;
    for (size_t w = r; w + 1 < r + width; w++) single &= START(w + 1) - END(w) == 1 && text[END(w)] == ' ';
    if (single) {
        *n = z - a;
        return text + a;
    }
    if (grow((void **)&s->buf, &s->buf_cap, z - a, 1) < 0) return NULL;
    *n = 0;
    for (size_t w = r; w < r + width; w++) {
        if (w > r) s->buf[(*n)++] = ' ';
        memcpy(s->buf + *n, text + START(w), END(w) - START(w));
        *n += END(w) - START(w);
    }
    return s->buf;
}
#undef START
#undef END

/* The text's shingles (dedup.shingles: `shingle` words, or all of them when there are no more)
   hashed as rensa hashes bytes tokens, into s->hashes: how many (-1: error). */
static Py_ssize_t shingle_hashes(Scratch *s, const uint8_t *text, Py_ssize_t len, size_t shingle) {
    Py_ssize_t nw = split_words(s, text, len);
    if (nw < 0) return -1;
    size_t width = (size_t)nw <= shingle ? (size_t)nw : shingle;  /* words a shingle */
    size_t runs = (size_t)nw <= shingle ? 1 : (size_t)nw - shingle + 1, n;
    if (grow((void **)&s->hashes, &s->hashes_cap, runs, sizeof(uint64_t)) < 0) return -1;
    for (size_t r = 0; r < runs; r++) {
        const uint8_t *token = joined(s, text, r, width, &n);
        if (!token) return -1;
        s->hashes[r] = token_hash(token, n);
    }
    return (Py_ssize_t)runs;
}

/* ----- signatures and keys ---------------------------------------------------------------------------- */
/* Each text's signature (or, with_keys, its keys): the work of both functions. */
static PyObject *run(PyObject *texts, Py_ssize_t shingle, Py_ssize_t num_perm, unsigned long long seed,
                     int with_keys, Py_ssize_t bands, Py_ssize_t rows) {
    if (shingle < 1) { PyErr_SetString(PyExc_ValueError, "shingle must be at least 1"); return NULL; }
    if (num_perm < 1 || num_perm > MAX_PERM) { PyErr_SetString(PyExc_ValueError, "num_perm must be 1 ... 1024"); return NULL; }
    if (with_keys && (bands < 1 || rows < 1 || bands * rows > num_perm)) {
        PyErr_SetString(PyExc_ValueError, "bands and rows must be at least 1, bands * rows at most num_perm");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(texts, "texts must be a sequence of str"), *out = NULL;
    if (!seq) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq), width = with_keys ? 1 + bands : num_perm;
    Perms *perms = PyMem_Malloc(sizeof *perms);
    Scratch scratch = {0};
    uint32_t sig[MAX_PERM];
    if (!perms) { PyErr_NoMemory(); goto done; }
    perms_init(perms, (uint32_t)num_perm, (uint64_t)seed);
    if (!(out = PyBytes_FromStringAndSize(NULL, count * width * (with_keys ? 8 : 4)))) goto done;
    int64_t *keys = (int64_t *)PyBytes_AS_STRING(out);
    uint32_t *sigs = (uint32_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t t = 0; t < count; t++) {
        Py_ssize_t len, n;
        const uint8_t *s = (const uint8_t *)PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(seq, t), &len);
        if (!s || (n = shingle_hashes(&scratch, s, len, (size_t)shingle)) < 0) { Py_CLEAR(out); goto done; }
        uint32_t *dst = with_keys ? sig : sigs + t * num_perm;
        signature(perms, scratch.hashes, (size_t)n, dst);
        if (!with_keys) continue;
        *keys++ = (int64_t)(xxh64(s, (size_t)len, 0) - (1ULL << 63));
        for (Py_ssize_t b = 0; b < bands; b++)  /* (the values lie little-endian in memory: struct.pack("<I")) */
            *keys++ = (int64_t)(xxh64((const uint8_t *)(sig + b * rows), (size_t)rows * 4, (uint64_t)(1 + b))
                                - (1ULL << 63));
    }
done:
    PyMem_Free(perms);
    scratch_free(&scratch);
    Py_DECREF(seq);
    return out;
}

static PyObject *signatures(PyObject *self, PyObject *args) {
    PyObject *texts;
    Py_ssize_t shingle, num_perm;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "OnnK", &texts, &shingle, &num_perm, &seed)) return NULL;
    return run(texts, shingle, num_perm, seed, 0, 0, 0);
}

static PyObject *keys(PyObject *self, PyObject *args) {
    PyObject *texts;
    Py_ssize_t shingle, num_perm, bands, rows;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "OnnKnn", &texts, &shingle, &num_perm, &seed, &bands, &rows)) return NULL;
    return run(texts, shingle, num_perm, seed, 1, bands, rows);
}

/* ----- normalize_ascii -------------------------------------------------------------------------------- */
/* dedup.normalize of an ASCII str: letters lowercased, digits and "_" kept, any other character a
   space; the words joined by one space (" ".join(text.translate(ASCII_WORDS).split())). */
static PyObject *normalize_ascii(PyObject *self, PyObject *text) {
    if (!PyUnicode_Check(text) || !PyUnicode_IS_ASCII(text)) {
        PyErr_SetString(PyExc_TypeError, "an ASCII str");
        return NULL;
    }
    Py_ssize_t len = PyUnicode_GET_LENGTH(text), n = 0;
    const uint8_t *s = PyUnicode_1BYTE_DATA(text);
    uint8_t small[4096], *buf = len <= (Py_ssize_t)sizeof small ? small : PyMem_Malloc((size_t)len);
    if (!buf) return PyErr_NoMemory();
    int gap = 0;  /* a non-word character since the last word character */
    for (Py_ssize_t i = 0; i < len; i++) {
        uint8_t c = s[i];
        int upper = c >= 'A' && c <= 'Z';
        if (upper || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_') {
            if (gap && n) buf[n++] = ' ';
            gap = 0;
            buf[n++] = upper ? c + 32 : c;
        } else {
            gap = 1;
        }
    }
    PyObject *out = PyUnicode_New(n, 127);
    if (out) memcpy(PyUnicode_1BYTE_DATA(out), buf, (size_t)n);
    if (buf != small) PyMem_Free(buf);
    return out;
}

/* ----- decontamination: word n-gram keys and probes (drafter/traces/decontam.py) ---------------------- */
static inline int64_t gram_key(const uint8_t *p, size_t n) { return (int64_t)(xxh64(p, n, 0) - (1ULL << 63)); }

/* Each text's `width`-word grams starting at every `stride`-th word (none in a text of fewer
   words): the keys, text after text, and the start of each text's run and the end. */
static PyObject *grams(PyObject *self, PyObject *args) {
    PyObject *texts, *seq, *result = NULL;
    Py_ssize_t width, stride;
    if (!PyArg_ParseTuple(args, "Onn", &texts, &width, &stride)) return NULL;
    if (width < 1 || stride < 1) { PyErr_SetString(PyExc_ValueError, "width and stride must be at least 1"); return NULL; }
    if (!(seq = PySequence_Fast(texts, "texts must be a sequence of str"))) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    Scratch scratch = {0};
    int64_t *keys = NULL, *offsets = PyMem_Malloc((size_t)(count + 1) * sizeof *offsets);
    size_t nkeys = 0, cap = 0, n;
    if (!offsets) { PyErr_NoMemory(); goto done; }
    offsets[0] = 0;
    for (Py_ssize_t t = 0; t < count; t++) {
        Py_ssize_t len, nw;
        const uint8_t *s = (const uint8_t *)PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(seq, t), &len);
        if (!s || (nw = split_words(&scratch, s, len)) < 0) goto done;
        for (Py_ssize_t r = 0; r + width <= nw; r += stride) {
            const uint8_t *g = joined(&scratch, s, (size_t)r, (size_t)width, &n);
            if (!g || grow((void **)&keys, &cap, nkeys + 1, sizeof *keys) < 0) goto done;
            keys[nkeys++] = gram_key(g, n);
        }
        offsets[t + 1] = (int64_t)nkeys;
    }
    result = Py_BuildValue("(y#y#)", (const char *)keys, (Py_ssize_t)(nkeys * 8), (const char *)offsets,
                           (Py_ssize_t)((count + 1) * 8));
done:
    PyMem_Free(keys);
    PyMem_Free(offsets);
    scratch_free(&scratch);
    Py_DECREF(seq);
    return result;
}

/* Per text one byte: 1 when it has fewer than n words, 2 when one of its k-gram probes (every
   stride-th word) has both bits in the filter (its key's low bits and those from bit 32), else 0. */
static PyObject *probe(PyObject *self, PyObject *args) {
    PyObject *texts, *seq, *out = NULL;
    Py_ssize_t n, k, stride;
    Py_buffer bits;
    if (!PyArg_ParseTuple(args, "Onnny*", &texts, &n, &k, &stride, &bits)) return NULL;
    uint64_t nbits = (uint64_t)bits.len * 8, mask = nbits - 1;
    const uint8_t *filter = bits.buf;
    Scratch scratch = {0};
    if (k < 1 || stride < 1 || n < k || nbits == 0 || (nbits & mask)) {
        PyErr_SetString(PyExc_ValueError, "1 <= k <= n, stride >= 1 and a filter of a power of two bits");
        PyBuffer_Release(&bits);
        return NULL;
    }
    if (!(seq = PySequence_Fast(texts, "texts must be a sequence of str"))) { PyBuffer_Release(&bits); return NULL; }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    if (!(out = PyBytes_FromStringAndSize(NULL, count))) goto done;
    uint8_t *code = (uint8_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t t = 0; t < count; t++) {
        Py_ssize_t len, nw;
        size_t glen;
        const uint8_t *s = (const uint8_t *)PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(seq, t), &len);
        if (!s || (nw = split_words(&scratch, s, len)) < 0) { Py_CLEAR(out); goto done; }
        code[t] = nw < n;
        for (Py_ssize_t r = 0; !code[t] && r + k <= nw; r += stride) {
            const uint8_t *g = joined(&scratch, s, (size_t)r, (size_t)k, &glen);
            if (!g) { Py_CLEAR(out); goto done; }
            uint64_t key = (uint64_t)gram_key(g, glen), lo = key & mask, hi = (key >> 32) & mask;
            if ((filter[lo >> 3] >> (lo & 7) & 1) && (filter[hi >> 3] >> (hi & 7) & 1)) code[t] = 2;
        }
    }
done:
    scratch_free(&scratch);
    Py_DECREF(seq);
    PyBuffer_Release(&bits);
    return out;
}

static PyMethodDef methods[] = {
    {"signatures", signatures, METH_VARARGS, "(texts, shingle, num_perm, seed) -> uint32 signatures as bytes"},
    {"keys", keys, METH_VARARGS, "(texts, shingle, num_perm, seed, bands, rows) -> int64 keys as bytes, 1 + bands a text"},
    {"normalize_ascii", normalize_ascii, METH_O, "dedup.normalize of an ASCII str"},
    {"grams", grams, METH_VARARGS, "(texts, width, stride) -> (int64 gram keys, int64 offsets) as bytes"},
    {"probe", probe, METH_VARARGS, "(texts, n, k, stride, filter bits) -> a byte a text: 0 clean, 1 short, 2 scan"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_keys", NULL, -1, methods};

PyMODINIT_FUNC PyInit__keys(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "RMINHASH_VERSION", RMINHASH_VERSION) < 0) Py_CLEAR(m);
    return m;
}
