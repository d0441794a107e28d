/* Native kernels of `imitate clean`: what its per-record Python and numpy spent most of the CPU on.
 *   map step     char_shingles, minhash, band_keys (near-dedup); normalize_ascii (the keys' normal form); words,
 *                repetition (the Gopher filter); phrase_search (the refusal phrases); ngram_hashes
 *   dedup        band_edges (candidate pairs); pair_jaccard (the exact check)
 *
 * Optional: setup.py builds this module when a C compiler is there, and the Python code falls back to its numpy and
 * regex paths otherwise (or with IMITATE_NATIVE=0). Both give the same numbers bit for bit -- the same uint64
 * polynomial hashes, the same uint32 affine permutations, the same counts divided the same way, the same matches --
 * so the files `imitate clean` writes do not depend on which ran; tests/test_native.py compares each kernel with
 * the code it stands in for, and the whole clean with and without them.
 *
 * Arrays come in through the buffer protocol (numpy arrays, C-contiguous, dtypes set by the Python wrappers), so
 * the module needs neither numpy's headers nor numpy at build time. Every kernel checks that offsets and lengths
 * fit the buffers it was given before it reads them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MUL 0x9E3779B97F4A7C15ULL

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
/* one build, the widest vector unit the CPU running it has (resolved once at load time) */
#define WIDEST __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define WIDEST
#endif

/* ngram_hashes(tokens: u64[T], lengths: i64[S], n, out_h: u64[T], out_pos: i64[T]) -> G
 * The polynomial hash (h = h * MUL + t, from the first token) of every n-gram inside each segment, in order; the
 * position of each n-gram's first token in out_pos. Segments are back to back in tokens. */
static PyObject *ngram_hashes(PyObject *self, PyObject *args) {
    Py_buffer tok, len, oh, op;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*y*nw*w*", &tok, &len, &n, &oh, &op)) return NULL;
    const uint64_t *t = tok.buf;
    const int64_t *lengths = len.buf;
    uint64_t *out = oh.buf;
    int64_t *pos = op.buf;
    Py_ssize_t n_tok = tok.len / 8, n_seg = len.len / 8, cap = oh.len / 8, g = 0, start = 0;
    int bad = n < 1 || op.len / 8 < cap;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t s = 0; s < n_seg && !bad; s++) {
        int64_t L = lengths[s];
        if (L < 0 || L > n_tok - start) { bad = 1; break; } /* (L > n - start: no overflow for any L) */
        for (int64_t i = 0; i <= L - n; i++) {
            if (g >= cap) { bad = 1; break; }
            const uint64_t *w = t + start + i;
            uint64_t h = w[0];
            for (Py_ssize_t j = 1; j < n; j++) h = h * MUL + w[j];
            out[g] = h;
            pos[g++] = start + i;
        }
        start += L;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&tok);
    PyBuffer_Release(&len);
    PyBuffer_Release(&oh);
    PyBuffer_Release(&op);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "ngram_hashes: lengths do not fit the tokens or the output");
        return NULL;
    }
    return PyLong_FromSsize_t(g);
}

static inline uint64_t fmix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDULL;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53ULL;
    return h ^ (h >> 33);
}

/* char_shingles(codes: u32[C], lengths: i64[S], tags: u64[S], short: u64[S], n, out: u64[cap]) -> G
 * Character n-gram hashes of each turn (code points back to back), turn after turn: each character is the token
 * fmix64(code + 1), an n-gram the polynomial hash of its tokens (as ngram_hashes), xor-ed with its turn's tag. A
 * turn shorter than n is one shingle, short[s] ^ tags[s] (the caller's hash of the whole turn). */
static PyObject *char_shingles(PyObject *self, PyObject *args) {
    Py_buffer cb, lb, tb, sb, ob;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*y*y*y*nw*", &cb, &lb, &tb, &sb, &n, &ob)) return NULL;
    const uint32_t *codes = cb.buf;
    const int64_t *lengths = lb.buf;
    const uint64_t *tags = tb.buf, *shorts = sb.buf;
    uint64_t *out = ob.buf;
    Py_ssize_t n_codes = cb.len / 4, n_seg = lb.len / 8, cap = ob.len / 8, g = 0, start = 0;
    int bad = n < 1 || n > 64 || tb.len != lb.len || sb.len != lb.len;
    Py_BEGIN_ALLOW_THREADS
    uint64_t ring[64], top = 1; /* top = MUL^(n-1): the weight of the token leaving the window */
    for (Py_ssize_t j = 1; j < n; j++) top *= MUL;
    for (Py_ssize_t s = 0; s < n_seg && !bad; s++) {
        int64_t L = lengths[s];
        if (L < 0 || L > n_codes - start || (L >= n ? L - n + 1 : 1) > cap - g) { bad = 1; break; }
        if (L < n) {
            out[g++] = shorts[s] ^ tags[s];
            start += L;
            continue;
        }
        const uint32_t *c = codes + start;
        uint64_t h = 0;
        Py_ssize_t k = 0; /* ring[k]: the oldest token in the window */
        for (int64_t i = 0; i < L; i++) {
            uint64_t t = fmix64((uint64_t)c[i] + 1);
            if (i < n) {
                h = h * MUL + t; /* (all arithmetic mod 2^64: rolling gives the same sum as hashing each window) */
                ring[i] = t;
            } else {
                h = (h - ring[k] * top) * MUL + t;
                ring[k] = t;
                if (++k == n) k = 0;
            }
            if (i >= n - 1) out[g++] = h ^ tags[s];
        }
        start += L;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&cb);
    PyBuffer_Release(&lb);
    PyBuffer_Release(&tb);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&ob);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "char_shingles: lengths do not fit the codes, the tags or the output");
        return NULL;
    }
    return PyLong_FromSsize_t(g);
}

#define LANES 32 /* permutations per pass over a record's shingles: their running minima stay in registers */

WIDEST
static void minhash_rows(const uint32_t *x, int step, const int64_t *starts, Py_ssize_t n_rec, const uint32_t *a,
                         const uint32_t *b, Py_ssize_t P, uint32_t *sig) {
    for (Py_ssize_t r = 0; r < n_rec; r++) {
        uint32_t *m = sig + r * P;
        Py_ssize_t p0 = 0;
        for (; p0 + LANES <= P; p0 += LANES) {
            uint32_t acc[LANES];
            const uint32_t *ap = a + p0, *bp = b + p0;
            for (int p = 0; p < LANES; p++) acc[p] = 0xFFFFFFFFu;
            for (int64_t k = starts[r]; k < starts[r + 1]; k++) {
                const uint32_t v = x[k * step];
                for (int p = 0; p < LANES; p++) {
                    uint32_t y = ap[p] * v + bp[p]; /* mod 2^32 */
                    acc[p] = y < acc[p] ? y : acc[p];
                }
            }
            memcpy(m + p0, acc, sizeof acc);
        }
        for (Py_ssize_t p = p0; p < P; p++) m[p] = 0xFFFFFFFFu; /* the permutations left over, one at a time */
        for (int64_t k = starts[r]; k < starts[r + 1]; k++)
            for (Py_ssize_t p = p0; p < P; p++) {
                uint32_t y = a[p] * x[k * step] + b[p];
                m[p] = y < m[p] ? y : m[p];
            }
    }
}

/* minhash(x: u32[G] or u64[G], starts: i64[R+1], a: u32[P], b: u32[P], out: u32[R, P])
 * Row r of out: min over the values x[starts[r]:starts[r+1]] of (a * x + b) mod 2^32, each of the P permutations
 * (all ones for a record without shingles). A u64 array (x.itemsize 8) gives its high 32 bits as the values. */
static PyObject *minhash(PyObject *self, PyObject *args) {
    PyObject *x_obj;
    Py_buffer xb = {0}, sb, ab, bb, ob;
    if (!PyArg_ParseTuple(args, "Oy*y*y*w*", &x_obj, &sb, &ab, &bb, &ob)) return NULL;
    int bad = PyObject_GetBuffer(x_obj, &xb, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0 ? 2 : 0;
    int step = !bad && xb.itemsize == 8 ? 2 : 1; /* u64: every other u32, the high halves */
    Py_ssize_t G = bad ? 0 : xb.len / 4 / step, R = sb.len / 8 - 1, P = ab.len / 4;
    const int64_t *starts = sb.buf;
    if (!bad && ((xb.itemsize != 4 && xb.itemsize != 8) || R < 0 || bb.len != ab.len || ob.len != (R < 0 ? 0 : R) * P * 4))
        bad = 1;
    for (Py_ssize_t r = 0; r < R && !bad; r++)
        bad = starts[r] < 0 || starts[r] > starts[r + 1] || starts[r + 1] > G;
    if (!bad) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        const uint32_t *x = xb.buf;
#else
        const uint32_t *x = (const uint32_t *)xb.buf + (step == 2 ? 1 : 0);
#endif
        Py_BEGIN_ALLOW_THREADS
        minhash_rows(x, step, starts, R, ab.buf, bb.buf, P, ob.buf);
        Py_END_ALLOW_THREADS
    }
    if (xb.obj) PyBuffer_Release(&xb);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&ab);
    PyBuffer_Release(&bb);
    PyBuffer_Release(&ob);
    if (bad == 1) {
        PyErr_SetString(PyExc_ValueError, "minhash: starts do not fit the shingles, or out is not [records, perms]");
        return NULL;
    }
    if (bad) return NULL;
    Py_RETURN_NONE;
}

/* band_keys(sig: u32[R, P], bands, rows, guards: u64[R] | None, out: u64[R, bands])
 * One key per LSH band: k = band + 1, then k = fmix64(k * MUL + sig value) for each of the band's rows of the
 * signature, then (with guards) k = fmix64(k * MUL + guard). */
static PyObject *band_keys(PyObject *self, PyObject *args) {
    Py_buffer sb, ob, gb = {0};
    Py_ssize_t bands, rows;
    PyObject *g_obj;
    if (!PyArg_ParseTuple(args, "y*nnOw*", &sb, &bands, &rows, &g_obj, &ob)) return NULL;
    int bad = g_obj != Py_None && PyObject_GetBuffer(g_obj, &gb, PyBUF_SIMPLE) < 0 ? 2 : 0;
    Py_ssize_t R = bands > 0 ? ob.len / 8 / bands : 0, P = R > 0 ? sb.len / 4 / R : 0;
    if (!bad && (bands < 1 || rows < 1 || (R > 0 && rows > P / bands) || ob.len != R * bands * 8 ||
                 sb.len != R * P * 4 || (gb.obj && gb.len != R * 8)))
        bad = 1; /* (R = 0: no records, nothing to do) */
    if (!bad) {
        const uint32_t *sig = sb.buf;
        const uint64_t *guards = gb.obj ? gb.buf : NULL;
        uint64_t *out = ob.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < R; r++)
            for (Py_ssize_t band = 0; band < bands; band++) {
                uint64_t k = (uint64_t)band + 1;
                for (Py_ssize_t j = 0; j < rows; j++) k = fmix64(k * MUL + sig[r * P + band * rows + j]);
                out[r * bands + band] = guards ? fmix64(k * MUL + guards[r]) : k;
            }
        Py_END_ALLOW_THREADS
    }
    if (gb.obj) PyBuffer_Release(&gb);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&ob);
    if (bad == 1) {
        PyErr_SetString(PyExc_ValueError, "band_keys: the signature, bands x rows, guards and out do not fit");
        return NULL;
    }
    if (bad) return NULL;
    Py_RETURN_NONE;
}

/* words(buf: bytes, lens: i64[S], word_byte: u8[256], counts: i64[S], tokens: u64[W] | None, wlen: i64[W] | None)
 * The words of S texts laid end to end in buf (a word: a run of bytes whose word_byte entry is 1, never crossing
 * from one text into the next): the count of each text; with tokens, each word's hash, fmix64 of the sum of
 * (byte_j + 1) * MUL^(j + 1) over its bytes j = 0, 1, ...; with wlen, its length in bytes. Returns W. */
static PyObject *words(PyObject *self, PyObject *args) {
    Py_buffer bb, lb, wb, cb, tb = {0}, nb = {0};
    PyObject *tok_obj, *len_obj;
    if (!PyArg_ParseTuple(args, "y*y*y*w*OO", &bb, &lb, &wb, &cb, &tok_obj, &len_obj)) return NULL;
    int with_tok = tok_obj != Py_None, with_len = len_obj != Py_None, bad = 0;
    if (with_tok && PyObject_GetBuffer(tok_obj, &tb, PyBUF_WRITABLE) < 0) bad = 2;
    if (!bad && with_len && PyObject_GetBuffer(len_obj, &nb, PyBUF_WRITABLE) < 0) bad = 2;
    const unsigned char *buf = bb.buf, *isw = wb.buf;
    const int64_t *lens = lb.buf;
    int64_t *counts = cb.buf, *wl = nb.buf;
    uint64_t *tokens = tb.buf;
    Py_ssize_t S = lb.len / 8, n_tok = with_tok ? tb.len / 8 : 0, n_len = with_len ? nb.len / 8 : 0, W = 0, at = 0;
    if (!bad && (wb.len != 256 || cb.len / 8 != S)) bad = 1;
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t s = 0; s < S && !bad; s++) {
            if (lens[s] < 0 || lens[s] > bb.len - at) { bad = 1; break; }
            const unsigned char *c = buf + at, *end = buf + at + lens[s];
            int64_t n = 0;
            while (c < end) {
                if (!isw[*c]) { c++; continue; }
                uint64_t h = 0, pw = MUL;
                const unsigned char *w0 = c;
                for (; c < end && isw[*c]; c++) {
                    h += ((uint64_t)*c + 1) * pw;
                    pw *= MUL;
                }
                if ((with_tok && W >= n_tok) || (with_len && W >= n_len)) { bad = 1; break; }
                if (with_tok) tokens[W] = fmix64(h);
                if (with_len) wl[W] = c - w0;
                W++;
                n++;
            }
            counts[s] = n;
            at += lens[s];
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&bb);
    PyBuffer_Release(&lb);
    PyBuffer_Release(&wb);
    PyBuffer_Release(&cb);
    if (tb.obj) PyBuffer_Release(&tb); /* (a view that was not taken has no obj) */
    if (nb.obj) PyBuffer_Release(&nb);
    if (bad == 1) {
        PyErr_SetString(PyExc_ValueError, "words: lengths do not fit the bytes, or the outputs are too short");
        return NULL;
    }
    if (bad) return NULL;
    return PyLong_FromSsize_t(W);
}

/* Distinct values of a (flag 1) and b (flag 2) in one open-addressing table of `size` (a power of 2) slots:
 * *na, *nb = distinct counts, return = shared distinct values. */
static int64_t shared_distinct(const uint32_t *a, int64_t la, const uint32_t *b, int64_t lb, uint32_t *keys,
                               unsigned char *flags, int64_t size, int64_t *na, int64_t *nb) {
    int bits = 0;
    while (((int64_t)1 << bits) < size) bits++;
    memset(flags, 0, (size_t)size);
    int64_t da = 0, db = 0, both = 0;
    for (int pass = 0; pass < 2; pass++) {
        const uint32_t *v = pass ? b : a;
        int64_t n = pass ? lb : la;
        unsigned char f = pass ? 2 : 1;
        for (int64_t i = 0; i < n; i++) {
            uint32_t x = v[i];
            int64_t slot = bits ? (int64_t)((x * 0x9E3779B1u) >> (32 - bits)) : 0;
            while (flags[slot] && keys[slot] != x) slot = (slot + 1) & (size - 1);
            if (!flags[slot]) keys[slot] = x;
            if (!(flags[slot] & f)) {
                if (pass) { db++; both += flags[slot] == 1; } else da++;
                flags[slot] |= f;
            }
        }
    }
    *na = da;
    *nb = db;
    return both;
}

/* pair_jaccard(av: u32, ao: i64[P+1], at: i64, ato: i64[P+1], bv, bo, bt, bto, out: f64[P])
 * For pair p, side a: its values av[ao[p]:ao[p+1]] cut into turns of the lengths at[ato[p]:ato[p+1]] (the same for
 * side b). out[p] = the smallest Jaccard similarity of the distinct values of aligned turns; 0 when the sides have
 * different numbers of turns (or none); two empty turns are alike (1), one empty turn is not (0). */
static PyObject *pair_jaccard(PyObject *self, PyObject *args) {
    Py_buffer buf[9];
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*w*", &buf[0], &buf[1], &buf[2], &buf[3], &buf[4], &buf[5], &buf[6],
                          &buf[7], &buf[8]))
        return NULL;
    const uint32_t *av = buf[0].buf, *bv = buf[4].buf;
    const int64_t *ao = buf[1].buf, *at = buf[2].buf, *ato = buf[3].buf;
    const int64_t *bo = buf[5].buf, *bt = buf[6].buf, *bto = buf[7].buf;
    double *out = buf[8].buf;
    Py_ssize_t P = buf[8].len / 8;
    int bad = buf[1].len != (P + 1) * 8 || buf[3].len != (P + 1) * 8 || buf[5].len != (P + 1) * 8 ||
              buf[7].len != (P + 1) * 8;
    int64_t longest = 0;
    for (Py_ssize_t p = 0; p < P && !bad; p++) { /* every turn inside its side's values, every side inside the arrays */
        for (int side = 0; side < 2 && !bad; side++) {
            const int64_t *o = side ? bo : ao, *t = side ? bt : at, *to = side ? bto : ato;
            int64_t n_val = (side ? buf[4].len : buf[0].len) / 4, n_turn = (side ? buf[6].len : buf[2].len) / 8;
            if (o[p] < 0 || o[p] > o[p + 1] || o[p + 1] > n_val || to[p] < 0 || to[p] > to[p + 1] || to[p + 1] > n_turn) {
                bad = 1;
                break;
            }
            int64_t left = o[p + 1] - o[p]; /* the side's values, handed out turn by turn (no sum to overflow) */
            for (int64_t k = to[p]; k < to[p + 1] && !bad; k++) {
                if (t[k] < 0 || t[k] > left) bad = 1;
                else left -= t[k];
                if (t[k] > longest) longest = t[k];
            }
            if (left != 0) bad = 1;
        }
    }
    uint32_t *keys = NULL;
    unsigned char *flags = NULL;
    int64_t cap = 16;
    while (cap < 4 * longest) cap <<= 1; /* >= 2x the values of two turns: the table stays at most half full */
    if (!bad) {
        keys = PyMem_RawMalloc((size_t)cap * 4);
        flags = PyMem_RawMalloc((size_t)cap);
        if (!keys || !flags) bad = 2;
    }
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t p = 0; p < P; p++) {
            int64_t nt = ato[p + 1] - ato[p];
            if (nt != bto[p + 1] - bto[p] || nt == 0) {
                out[p] = 0.0;
                continue;
            }
            const uint32_t *a = av + ao[p], *b = bv + bo[p];
            double best = 2.0;
            for (int64_t t = 0; t < nt; t++) {
                int64_t la = at[ato[p] + t], lb = bt[bto[p] + t], na, nb, size = 16;
                while (size < 2 * (la + lb)) size <<= 1;
                int64_t both = shared_distinct(a, la, b, lb, keys, flags, size, &na, &nb);
                double j = (na == 0 || nb == 0) ? (na == nb ? 1.0 : 0.0) : (double)both / (double)(na + nb - both);
                if (j < best) best = j;
                a += la;
                b += lb;
            }
            out[p] = best;
        }
        Py_END_ALLOW_THREADS
    }
    PyMem_RawFree(keys);
    PyMem_RawFree(flags);
    for (int i = 0; i < 9; i++) PyBuffer_Release(&buf[i]);
    if (bad == 2) return PyErr_NoMemory();
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "pair_jaccard: offsets or turn lengths do not fit the values");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* What str.split() and str.splitlines() treat as whitespace and line breaks, for ASCII (\x1c-\x1f included). */
static inline int ws(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }
static inline int lb(unsigned char c) { return (c >= '\n' && c <= '\r') || (c >= 0x1c && c <= 0x1e); }

/* One ASCII text into its normal form (keys.normalize): case folded (A-Z), stripped, cut into lines, blank lines
 * dropped, each line's leading whitespace kept and its words joined by one space; lines joined by \n. Returns the
 * length written to out (out holds at least n bytes). */
static Py_ssize_t normalize_ascii(const unsigned char *t, Py_ssize_t n, unsigned char *out) {
    Py_ssize_t i = 0, o = 0;
    while (n > 0 && ws(t[n - 1])) n--; /* strip */
    while (i < n && ws(t[i])) i++;
    int first_line = 1;
    while (i < n) {
        Py_ssize_t end = i; /* this line: [i, end) */
        while (end < n && !lb(t[end])) end++;
        Py_ssize_t k = i;
        while (k < end && ws(t[k])) k++;
        if (k < end) { /* not blank */
            if (!first_line) out[o++] = '\n';
            first_line = 0;
            for (Py_ssize_t j = i; j < k; j++) out[o++] = t[j]; /* the indentation, as it is */
            int gap = 0;
            for (Py_ssize_t j = k; j < end; j++) {
                unsigned char c = t[j];
                if (ws(c)) { gap = 1; continue; }
                if (gap) { out[o++] = ' '; gap = 0; }
                out[o++] = (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
            }
        }
        if (end < n && t[end] == '\r' && end + 1 < n && t[end + 1] == '\n') end++; /* \r\n: one break */
        i = end + 1;
    }
    return o;
}

/* normalize_ascii(texts: list[str]) -> list[str | None]: the normal form of each ASCII text; None for the others
 * (the caller normalizes those: NFKC and Unicode case folding). */
static PyObject *normalize_many(PyObject *self, PyObject *arg) {
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "normalize_ascii: a list of str");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(arg);
    PyObject *res = PyList_New(n);
    if (!res) return NULL;
    unsigned char *scratch = NULL;
    Py_ssize_t cap = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *s = PyList_GET_ITEM(arg, k), *v;
        if (!PyUnicode_Check(s) || !PyUnicode_IS_ASCII(s)) {
            Py_INCREF(Py_None);
            PyList_SET_ITEM(res, k, Py_None);
            continue;
        }
        Py_ssize_t len = PyUnicode_GET_LENGTH(s);
        if (len > cap) {
            PyMem_Free(scratch);
            cap = len < 4096 ? 4096 : len;
            scratch = PyMem_Malloc((size_t)cap);
            if (!scratch) {
                Py_DECREF(res);
                return PyErr_NoMemory();
            }
        }
        Py_ssize_t m = normalize_ascii(PyUnicode_1BYTE_DATA(s), len, scratch);
        v = PyUnicode_FromKindAndData(PyUnicode_1BYTE_KIND, scratch, m);
        if (!v) {
            PyMem_Free(scratch);
            Py_DECREF(res);
            return NULL;
        }
        PyList_SET_ITEM(res, k, v);
    }
    PyMem_Free(scratch);
    return res;
}

/* repetition(tokens: u64[W], lengths: i64[S], wlen: i64[W], stop_below: float, top: f64[3, S], dup: f64[6, S])
 * Gopher's n-gram repetition statistics of S texts given as word hashes (repetition.repetition_stats_batch):
 *   top[n-2, s]: characters of the most frequent repeated n-gram (ties: the most characters) times its count, over
 *                the text's word characters, n = 2..4;
 *   dup[n-5, s]: word characters inside any occurrence, after the first, of a repeated n-gram, n = 5..10; a text
 *                whose fraction falls below stop_below (> 0) skips the larger n (left 0).
 * n-grams are the polynomial hashes of ngram_hashes; equal hashes are the same n-gram. */
static PyObject *repetition(PyObject *self, PyObject *args) {
    Py_buffer tb, lb, wb, topb, dupb;
    double stop_below;
    if (!PyArg_ParseTuple(args, "y*y*y*dw*w*", &tb, &lb, &wb, &stop_below, &topb, &dupb)) return NULL;
    const uint64_t *tok = tb.buf;
    const int64_t *lengths = lb.buf, *wlen = wb.buf;
    double *top = topb.buf, *dup = dupb.buf;
    Py_ssize_t W = tb.len / 8, S = lb.len / 8, longest = 0, at = 0;
    int bad = wb.len != tb.len || topb.len != 3 * S * 8 || dupb.len != 6 * S * 8;
    for (Py_ssize_t s = 0; s < S && !bad; s++) {
        if (lengths[s] < 0 || lengths[s] > W - at) bad = 1;
        else if (lengths[s] > longest) longest = lengths[s];
        at += lengths[s];
    }
    int64_t size = 16;
    while (size < 2 * longest) size <<= 1;
    uint64_t *keys = NULL;
    int64_t *count = NULL, *first = NULL, *edge = NULL;
    unsigned char *used = NULL;
    if (!bad) {
        keys = PyMem_RawMalloc((size_t)size * 8);
        count = PyMem_RawMalloc((size_t)size * 8);
        first = PyMem_RawMalloc((size_t)size * 8);
        used = PyMem_RawMalloc((size_t)size);
        edge = PyMem_RawMalloc((size_t)(longest + 1) * 8);
        if (!keys || !count || !first || !used || !edge) bad = 2;
    }
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        at = 0;
        for (Py_ssize_t s = 0; s < S; s++) {
            const int64_t L = lengths[s];
            const uint64_t *t = tok + at;
            const int64_t *wl = wlen + at;
            double total = 0;
            for (int64_t i = 0; i < L; i++) total += (double)wl[i];
            if (total < 1) total = 1;
            for (int n = 2; n <= 10; n++) {
                if (n <= 4) top[(n - 2) * S + s] = 0;
                else dup[(n - 5) * S + s] = 0;
            }
            for (int n = 2; n <= 10; n++) {
                int64_t m = L - n + 1, sz = 16;
                if (m <= 0) break; /* (no n-gram: this and every larger n stay 0) */
                while (sz < 2 * m) sz <<= 1;
                int bits = 0;
                while (((int64_t)1 << bits) < sz) bits++;
                memset(used, 0, (size_t)sz);
                if (n >= 5) memset(edge, 0, (size_t)(L + 1) * 8);
                for (int64_t p = 0; p < m; p++) {
                    uint64_t h = t[p];
                    for (int j = 1; j < n; j++) h = h * MUL + t[p + j];
                    int64_t slot = (int64_t)((h * 0x9E3779B97F4A7C15ULL) >> (64 - bits));
                    while (used[slot] && keys[slot] != h) slot = (slot + 1) & (sz - 1);
                    if (!used[slot]) {
                        used[slot] = 1;
                        keys[slot] = h;
                        count[slot] = 1;
                        first[slot] = p;
                    } else {
                        count[slot]++;
                        if (n >= 5) { /* an occurrence after the first: its words are covered */
                            edge[p]++;
                            edge[p + n]--;
                        }
                    }
                }
                if (n <= 4) {
                    int64_t best = 0;
                    for (int64_t k = 0; k < sz; k++) {
                        if (!used[k] || count[k] < 2) continue;
                        int64_t chars = 0;
                        for (int j = 0; j < n; j++) chars += wl[first[k] + j];
                        /* (in uint64, as numpy's int64 wraps: no signed overflow, the same bits) */
                        int64_t score = (int64_t)(((uint64_t)count[k] << 40) + (uint64_t)chars * (uint64_t)count[k]);
                        if (score > best) best = score;
                    }
                    top[(n - 2) * S + s] = (double)(best & (((int64_t)1 << 40) - 1)) / total;
                } else {
                    int64_t run = 0, covered = 0;
                    for (int64_t i = 0; i < L; i++) {
                        run += edge[i];
                        if (run > 0) covered += wl[i];
                    }
                    double frac = (double)covered / total;
                    dup[(n - 5) * S + s] = frac;
                    if (stop_below > 0 && frac < stop_below) break;
                }
            }
            at += L;
        }
        Py_END_ALLOW_THREADS
    }
    PyMem_RawFree(keys);
    PyMem_RawFree(count);
    PyMem_RawFree(first);
    PyMem_RawFree(used);
    PyMem_RawFree(edge);
    PyBuffer_Release(&tb);
    PyBuffer_Release(&lb);
    PyBuffer_Release(&wb);
    PyBuffer_Release(&topb);
    PyBuffer_Release(&dupb);
    if (bad == 2) return PyErr_NoMemory();
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "repetition: lengths do not fit the words, or the outputs are not [3|6, S]");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* A phrase trie, flattened: node i's edges are e = edge_start[i] .. edge_start[i+1]-1, in the regex's alternation
 * order; edge e's word is words[word_start[e]:word_start[e+1]], its node child[e]; end[i]: a phrase ends at node i. */
typedef struct {
    const int64_t *edge_start, *word_start, *child;
    const unsigned char *end, *words;
} Trie;

/* Where the trie regex of filters._trie_regex, tried at `pos`, ends its match (-1: none). Alternatives in order; a
 * word then `\s+` and the child's alternatives, optional when a phrase may end at the child. `\s+` takes all the
 * whitespace (a word never starts with whitespace, so giving some back cannot help). */
static int64_t trie_match(const Trie *t, int64_t node, const unsigned char *s, int64_t n, int64_t pos) {
    for (int64_t e = t->edge_start[node]; e < t->edge_start[node + 1]; e++) {
        int64_t w0 = t->word_start[e], wl = t->word_start[e + 1] - w0;
        if (wl > n - pos || s[pos] != t->words[w0] || memcmp(s + pos, t->words + w0, (size_t)wl) != 0) continue;
        int64_t p = pos + wl, c = t->child[e];
        if (t->edge_start[c] == t->edge_start[c + 1]) return p; /* a phrase's last word */
        int64_t q = p;
        while (q < n && ws(s[q])) q++;
        if (q > p) {
            int64_t r = trie_match(t, c, s, n, q);
            if (r >= 0) return r;
        }
        if (t->end[c]) return p;
    }
    return -1;
}

/* phrase_search(texts: list[str], edge_start: i64, end: u8, word_start: i64, child: i64, words: bytes, out: i64[n, 2])
 * The leftmost match of the trie regex in each ASCII text: out[k] = (start, end), (-1, -1) for none, (-2, -2) for
 * a text that is not ASCII (the caller searches those with the regex). */
static PyObject *phrase_search(PyObject *self, PyObject *args) {
    PyObject *texts;
    Py_buffer es, en, wst, ch, wd, ob;
    if (!PyArg_ParseTuple(args, "O!y*y*y*y*y*w*", &PyList_Type, &texts, &es, &en, &wst, &ch, &wd, &ob)) return NULL;
    Py_ssize_t n_text = PyList_GET_SIZE(texts), N = en.len, E = ch.len / 8;
    Trie t = {es.buf, wst.buf, ch.buf, en.buf, wd.buf};
    int bad = es.len != (N + 1) * 8 || wst.len != (E + 1) * 8 || ob.len != n_text * 16 || N < 1;
    for (Py_ssize_t i = 0; i < N && !bad; i++)
        bad = t.edge_start[i] < 0 || t.edge_start[i] > t.edge_start[i + 1] || t.edge_start[i + 1] > E;
    for (Py_ssize_t e = 0; e < E && !bad; e++) /* children further down only: no cycles, the recursion ends */
        bad = t.child[e] <= 0 || t.child[e] >= N || t.word_start[e] < 0 || t.word_start[e] >= t.word_start[e + 1] ||
              t.word_start[e + 1] > wd.len;
    for (Py_ssize_t i = 0; i < N && !bad; i++)
        for (int64_t e = t.edge_start[i]; e < t.edge_start[i + 1] && !bad; e++) bad = t.child[e] <= i;
    unsigned char first[256] = {0};
    for (int64_t e = bad ? 0 : t.edge_start[0]; !bad && e < t.edge_start[1]; e++)
        if (t.word_start[e + 1] > t.word_start[e]) first[t.words[t.word_start[e]]] = 1;
    int64_t *out = ob.buf;
    for (Py_ssize_t k = 0; k < n_text && !bad; k++) {
        PyObject *s = PyList_GET_ITEM(texts, k);
        out[2 * k] = out[2 * k + 1] = -2;
        if (!PyUnicode_Check(s) || !PyUnicode_IS_ASCII(s)) continue;
        const unsigned char *c = PyUnicode_1BYTE_DATA(s);
        int64_t n = PyUnicode_GET_LENGTH(s), hit = -1, stop = -1;
        for (int64_t pos = 0; pos < n && hit < 0; pos++) {
            if (!first[c[pos]]) continue;
            stop = trie_match(&t, 0, c, n, pos);
            if (stop >= 0) hit = pos;
        }
        out[2 * k] = hit;
        out[2 * k + 1] = hit >= 0 ? stop : -1;
    }
    PyBuffer_Release(&es);
    PyBuffer_Release(&en);
    PyBuffer_Release(&wst);
    PyBuffer_Release(&ch);
    PyBuffer_Release(&wd);
    PyBuffer_Release(&ob);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "phrase_search: the trie's arrays do not fit together, or out is not [n, 2]");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* band_edges(keys: u64[n, B], max_pairs: int) -> bytes of u64 (a << 32 | b), a < b, not yet unique
 * The candidate pairs of dedup.candidate_edges: records (rows, in order) sharing a key in a band (column) are a
 * bucket; a bucket of 2..max_pairs members (max_pairs > 2) gives all its pairs, a bigger one a star from its first
 * (smallest) member. */
static PyObject *band_edges(PyObject *self, PyObject *args) {
    Py_buffer kb;
    Py_ssize_t B, max_pairs;
    if (!PyArg_ParseTuple(args, "y*nn", &kb, &B, &max_pairs)) return NULL;
    Py_ssize_t n = B > 0 ? kb.len / 8 / B : 0;
    if (B < 1 || kb.len != n * B * 8 || n >= ((Py_ssize_t)1 << 32)) {
        PyBuffer_Release(&kb);
        PyErr_SetString(PyExc_ValueError, "band_edges: keys are not [n, bands] with n < 2^32");
        return NULL;
    }
    const uint64_t *keys = kb.buf;
    int64_t size = 16;
    while (size < 2 * n) size <<= 1;
    int bits = 0;
    while (((int64_t)1 << bits) < size) bits++;
    int64_t *slot_bucket = PyMem_RawMalloc((size_t)size * 8); /* -1: empty */
    int64_t *bucket_of = PyMem_RawMalloc((size_t)(n + 1) * 8), *count = PyMem_RawMalloc((size_t)(n + 1) * 8);
    int64_t *start = PyMem_RawMalloc((size_t)(n + 2) * 8), *members = PyMem_RawMalloc((size_t)(n + 1) * 8);
    uint64_t *bucket_key = PyMem_RawMalloc((size_t)(n + 1) * 8);
    Py_ssize_t cap = 1024, m = 0;
    uint64_t *out = PyMem_RawMalloc((size_t)cap * 8);
    int bad = !slot_bucket || !bucket_of || !count || !start || !members || !bucket_key || !out;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t band = 0; band < B && !bad; band++) {
        int64_t nb = 0;
        for (int64_t i = 0; i < size; i++) slot_bucket[i] = -1;
        for (Py_ssize_t r = 0; r < n; r++) { /* bucket of each row, numbered in order of first member */
            uint64_t k = keys[r * B + band];
            int64_t sl = (int64_t)((k * 0x9E3779B97F4A7C15ULL) >> (64 - bits));
            while (slot_bucket[sl] >= 0 && bucket_key[slot_bucket[sl]] != k) sl = (sl + 1) & (size - 1);
            if (slot_bucket[sl] < 0) {
                slot_bucket[sl] = nb;
                bucket_key[nb] = k;
                count[nb++] = 0;
            }
            bucket_of[r] = slot_bucket[sl];
            count[bucket_of[r]]++;
        }
        start[0] = 0;
        for (int64_t b = 0; b < nb; b++) start[b + 1] = start[b] + count[b];
        for (int64_t b = 0; b < nb; b++) count[b] = start[b]; /* (now: the next free place of each bucket) */
        for (Py_ssize_t r = 0; r < n; r++) members[count[bucket_of[r]]++] = r; /* ascending within a bucket */
        for (int64_t b = 0; b < nb && !bad; b++) {
            int64_t lo = start[b], hi = start[b + 1], sz = hi - lo;
            if (sz < 2) continue;
            int all_pairs = max_pairs > 2 && sz <= max_pairs;
            Py_ssize_t need = all_pairs ? sz * (sz - 1) / 2 : sz - 1;
            if (m + need > cap) {
                while (m + need > cap) cap *= 2;
                uint64_t *grown = PyMem_RawRealloc(out, (size_t)cap * 8);
                if (!grown) { bad = 1; break; }
                out = grown;
            }
            for (int64_t i = lo; i < (all_pairs ? hi : lo + 1); i++)
                for (int64_t j = i + 1; j < hi; j++) out[m++] = ((uint64_t)members[i] << 32) | (uint64_t)members[j];
        }
    }
    Py_END_ALLOW_THREADS
    PyObject *res = bad ? PyErr_NoMemory() : PyBytes_FromStringAndSize((const char *)out, m * 8);
    PyMem_RawFree(slot_bucket);
    PyMem_RawFree(bucket_of);
    PyMem_RawFree(count);
    PyMem_RawFree(start);
    PyMem_RawFree(members);
    PyMem_RawFree(bucket_key);
    PyMem_RawFree(out);
    PyBuffer_Release(&kb);
    return res;
}

static PyMethodDef methods[] = {
    {"ngram_hashes", ngram_hashes, METH_VARARGS, "Polynomial hashes of every n-gram inside each segment."},
    {"char_shingles", char_shingles, METH_VARARGS, "Tagged character n-gram hashes of each turn."},
    {"words", words, METH_VARARGS, "Word counts, hashes and lengths of texts' UTF-8 bytes."},
    {"band_keys", band_keys, METH_VARARGS, "LSH band keys of MinHash signatures."},
    {"pair_jaccard", pair_jaccard, METH_VARARGS, "Smallest turn Jaccard of record pairs, from unsorted values."},
    {"normalize_ascii", normalize_many, METH_O, "The normal form of ASCII texts (None for the others)."},
    {"repetition", repetition, METH_VARARGS, "Gopher n-gram repetition statistics of texts' word hashes."},
    {"phrase_search", phrase_search, METH_VARARGS, "Leftmost match of a phrase trie in ASCII texts."},
    {"band_edges", band_edges, METH_VARARGS, "Candidate pairs of records sharing a key in a band."},
    {"minhash", minhash, METH_VARARGS, "MinHash signatures of records' shingles under affine permutations mod 2^32."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "Native kernels of imitate clean.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
