/* The small all-reduce of algorithms/shm.py in compiled code (issue 29).
 *
 * Python spends ~13 us per call on the shared-memory path where MPICH's whole MPI_Allreduce
 * is 1.4-3.6 us (docs/benchmarks.md, section 18); this file does one call's work in one
 * C call: wait until every rank is done reading the previous call's slots, copy in, post
 * "arrived", wait for every rank's arrival, reduce slots 0..p-1 in rank order into the
 * caller's tensor, post "done". The protocol, layout and counters are shm.py's and
 * shm_segment.py's, so a call here and a call through the Python path interleave freely:
 *
 *     [ counters (3 phases, p ranks, one 64-byte line each) | slot 0 | ... | slot p-1 | out ]
 *
 * Waiting is bounded: `spins` checks with a pause, then `yields` sched_yield()s. A wait that
 * is still unmet returns to Python, which waits with the group's timeout, checks that the
 * laggards' processes live, and names the rank in its error (shm_segment.wait_for); the call
 * is then resumed at the stage it stopped at. So this file never blocks for long and never
 * holds the GIL while a peer is gone.
 *
 * Exactness: element i of the result is ((s0[i] op s1[i]) op s2[i]) ... in rank order, each
 * step rounded once as torch's in-place add_/mul_/maximum/minimum round it (built without
 * -ffast-math, with -ffp-contract=off), and avg divides the sum once by p at the end, as
 * ops.finish_ does. Integer sums and products wrap as torch's do.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PAUSE() _mm_pause()
#else
#define PAUSE() ((void)0)
#endif

#define LINE 64       /* bytes per counter: shm_segment.LINE */
#define ARRIVED 0     /* phases: shm.ARRIVED, shm.DONE */
#define DONE 1

/* dtype codes (shm_fast.DTYPES) and op codes (shm_fast.OPS) */
enum { F32, F64, I32, I64, U8, I8, I16 };
enum { SUM, AVG, MAX, MIN, PROD };

static inline _Atomic int64_t *counter(char *base, long p, long phase, long rank) {
    return (_Atomic int64_t *)(base + (phase * p + rank) * LINE);
}

/* Whether every rank's counter of `phase` reached `seq`; bounded wait. */
static int wait_all(char *base, long p, long phase, int64_t seq, long spins, long yields) {
    long rank = 0;
    for (long i = 0; i <= spins + yields; i++) {
        while (rank < p && atomic_load_explicit(counter(base, p, phase, rank),
                                                memory_order_acquire) >= seq)
            rank++;
        if (rank == p)
            return 1;
        if (i < spins)
            PAUSE();
        else
            sched_yield();
    }
    return 0;
}

static void post(char *base, long p, long phase, long rank, int64_t seq) {
    /* A full fence, not only release order: x86's release store does not order the
     * non-temporal stores a large memcpy may use (shm_segment.fence says the same). */
    atomic_thread_fence(memory_order_seq_cst);
    atomic_store_explicit(counter(base, p, phase, rank), seq, memory_order_release);
}

/* out[i] = s_0[i] op s_1[i] op ... op s_{p-1}[i]; slot j at first + j * stride. */
#define REDUCE(T, UT, NAME)                                                              \
static void NAME(T *out, const char *first, long stride, long p, long n, int op) {      \
    const T *s0 = (const T *)first;                                                     \
    memcpy(out, s0, (size_t)n * sizeof(T));                                             \
    for (long j = 1; j < p; j++) {                                                      \
        const T *s = (const T *)(first + j * stride);                                   \
        switch (op) {                                                                   \
        case SUM: case AVG:                                                             \
            for (long i = 0; i < n; i++) out[i] = (T)((UT)out[i] + (UT)s[i]);           \
            break;                                                                      \
        case PROD:                                                                      \
            for (long i = 0; i < n; i++) out[i] = (T)((UT)out[i] * (UT)s[i]);           \
            break;                                                                      \
        case MAX:                                                                       \
            for (long i = 0; i < n; i++) out[i] = MAXOF(out[i], s[i]);                  \
            break;                                                                      \
        case MIN:                                                                       \
            for (long i = 0; i < n; i++) out[i] = MINOF(out[i], s[i]);                  \
            break;                                                                      \
        }                                                                               \
    }                                                                                   \
}

/* torch.maximum / minimum propagate NaN; x != x only for NaN (integers never). */
#define MAXOF(a, b) ((a) != (a) || (b) != (b) ? ((a) != (a) ? (a) : (b)) : ((a) > (b) ? (a) : (b)))
#define MINOF(a, b) ((a) != (a) || (b) != (b) ? ((a) != (a) ? (a) : (b)) : ((a) < (b) ? (a) : (b)))

REDUCE(float, float, reduce_f32)
REDUCE(double, double, reduce_f64)
REDUCE(int32_t, uint32_t, reduce_i32)
REDUCE(int64_t, uint64_t, reduce_i64)
REDUCE(uint8_t, uint32_t, reduce_u8)
REDUCE(int8_t, uint32_t, reduce_i8)
REDUCE(int16_t, uint32_t, reduce_i16)

static const long ITEMSIZE[] = {4, 8, 4, 8, 1, 1, 2};

static void reduce(void *out, const char *first, long stride, long p, long n, int dtype,
                   int op) {
    switch (dtype) {
    case F32:
        reduce_f32(out, first, stride, p, n, op);
        if (op == AVG)
            for (long i = 0; i < n; i++) ((float *)out)[i] /= (float)p;
        break;
    case F64:
        reduce_f64(out, first, stride, p, n, op);
        if (op == AVG)
            for (long i = 0; i < n; i++) ((double *)out)[i] /= (double)p;
        break;
    case I32: reduce_i32(out, first, stride, p, n, op); break;
    case I64: reduce_i64(out, first, stride, p, n, op); break;
    case U8: reduce_u8(out, first, stride, p, n, op); break;
    case I8: reduce_i8(out, first, stride, p, n, op); break;
    case I16: reduce_i16(out, first, stride, p, n, op); break;
    }
}

/* all_reduce(base, header, capacity, p, rank, seq, data, n, dtype, op, spins, yields, stage)
 *   -> 0 when the call is complete, else the stage to resume at once Python's wait is met:
 *      1: waiting for every rank's DONE >= seq - 1 (nothing done yet);
 *      2: waiting for every rank's ARRIVED >= seq (this rank's data is in, arrival posted).
 * base: the segment's address; header: bytes before slot 0; capacity: bytes per slot;
 * data: the caller's contiguous tensor of n elements of `dtype`, reduced in place. */
static PyObject *all_reduce(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long v[13];
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "all_reduce takes 13 integer arguments");
        return NULL;
    }
    for (int k = 0; k < 13; k++) {
        v[k] = PyLong_AsLong(args[k]);
        if (v[k] == -1 && PyErr_Occurred())
            return NULL;
    }
    char *base = (char *)(uintptr_t)(unsigned long)v[0];
    long header = v[1], capacity = v[2], p = v[3], rank = v[4];
    int64_t seq = v[5];
    void *data = (void *)(uintptr_t)(unsigned long)v[6];
    long n = v[7], spins = v[10], yields = v[11], stage = v[12];
    int dtype = (int)v[8], op = (int)v[9];
    if (dtype < F32 || dtype > I16 || op < SUM || op > PROD || p < 1 || rank < 0 || rank >= p
        || n * ITEMSIZE[dtype] > capacity) {
        PyErr_SetString(PyExc_ValueError, "all_reduce: bad dtype, op, rank or size");
        return NULL;
    }
    long nbytes = n * ITEMSIZE[dtype];
    char *slots = base + header;
    if (stage == 0) {
        if (seq > 1 && !wait_all(base, p, DONE, seq - 1, spins, yields))
            return PyLong_FromLong(1);
        stage = 1;
    }
    if (stage == 1) {
        memcpy(slots + rank * capacity, data, (size_t)nbytes);
        post(base, p, ARRIVED, rank, seq);
        if (!wait_all(base, p, ARRIVED, seq, spins, yields))
            return PyLong_FromLong(2);
    }
    reduce(data, slots, capacity, p, n, dtype, op);
    post(base, p, DONE, rank, seq);
    return PyLong_FromLong(0);
}

static PyMethodDef methods[] = {
    {"all_reduce", (PyCFunction)(void (*)(void))all_reduce, METH_FASTCALL,
     "One small shared-memory all-reduce; see the file's comment."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_shmfast", "The small shared-memory all-reduce in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__shmfast(void) { return PyModule_Create(&module); }
