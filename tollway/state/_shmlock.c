/* Robust, process-shared mutexes living in a shared memory buffer (tollway.state.shared uses them).
 *
 * Why C: a check-and-update on the node-shared table must cost about a microsecond, and a lock/unlock
 * pair costs 1.4 us of CPU through fcntl (two syscalls), 0.5 us through ctypes and 0.04 us here (an
 * uncontended futex never enters the kernel); bench/state_local.py measures them. Robust mutexes are what make a worker
 * killed while holding a lock harmless: the kernel marks the mutex owner-dead and the next locker gets
 * EOWNERDEAD, makes it consistent and goes on.
 *
 * The same mutexes are driven through ctypes when this module is not built (TOLLWAY_PURE_PYTHON), so
 * compiled and pure-Python processes can share one table. Keep MUTEX_STRIDE and the attributes in step
 * with tollway/state/shared.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define ABI 1
#define MUTEX_STRIDE 64 /* bytes reserved per mutex: room for any pthread_mutex_t, one cache line */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    char *base;
    Py_ssize_t count;
    unsigned long long recovered;
    /* the table's geometry (`layout`), for the one-call checks: byte offsets of the fingerprints and of
     * the records, and the bucket mask; keys_offset 0 = not given yet */
    Py_ssize_t keys_offset, records_offset;
    unsigned long long bucket_mask;
} MutexArray;

static inline pthread_mutex_t *mutex_at(MutexArray *self, Py_ssize_t i) {
    return (pthread_mutex_t *)(self->base + i * MUTEX_STRIDE);
}

static int MutexArray_init(MutexArray *self, PyObject *args, PyObject *kwds) {
    PyObject *buffer;
    Py_ssize_t offset, count;
    if (!PyArg_ParseTuple(args, "Onn", &buffer, &offset, &count))
        return -1;
    if (sizeof(pthread_mutex_t) > MUTEX_STRIDE) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_mutex_t larger than MUTEX_STRIDE");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0)
        return -1;
    if (offset < 0 || count <= 0 || offset % 64 != 0 || offset + count * MUTEX_STRIDE > self->view.len) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "mutex array outside the buffer or misaligned");
        return -1;
    }
    self->base = (char *)self->view.buf + offset;
    self->count = count;
    return 0;
}

static void MutexArray_dealloc(MutexArray *self) {
    if (self->view.obj != NULL)
        PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *MutexArray_initialize(MutexArray *self, PyObject *unused) {
    pthread_mutexattr_t attr;
    int err = pthread_mutexattr_init(&attr);
    if (!err) err = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (!err) err = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    for (Py_ssize_t i = 0; !err && i < self->count; i++)
        err = pthread_mutex_init(mutex_at(self, i), &attr);
    pthread_mutexattr_destroy(&attr);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* acquire(i, timeout) -> bool: True when the previous owner died holding the lock (the data it guarded
 * may be half-updated). Raises TimeoutError after `timeout` seconds. */
static PyObject *MutexArray_acquire(MutexArray *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "acquire(index, timeout)");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[0]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0 || i >= self->count) {
        PyErr_SetString(PyExc_IndexError, "mutex index out of range");
        return NULL;
    }
    pthread_mutex_t *m = mutex_at(self, i);
    int err = pthread_mutex_trylock(m); /* the common case: free, no syscall, keep the GIL */
    if (err == EBUSY) {
        double timeout = PyFloat_AsDouble(args[1]);
        if (timeout == -1.0 && PyErr_Occurred())
            return NULL;
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += (time_t)timeout;
        deadline.tv_nsec += (long)((timeout - (double)(time_t)timeout) * 1e9);
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec += 1;
            deadline.tv_nsec -= 1000000000L;
        }
        /* Another thread of this process may hold it: wait without the GIL. */
        Py_BEGIN_ALLOW_THREADS
        err = pthread_mutex_timedlock(m, &deadline);
        Py_END_ALLOW_THREADS
    }
    if (err == 0)
        Py_RETURN_FALSE;
    if (err == EOWNERDEAD) {
        pthread_mutex_consistent(m);
        self->recovered++;
        Py_RETURN_TRUE;
    }
    if (err == ETIMEDOUT) {
        PyErr_SetString(PyExc_TimeoutError, "shared table lock not acquired in time");
        return NULL;
    }
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *MutexArray_release(MutexArray *self, PyObject *arg) {
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0 || i >= self->count) {
        PyErr_SetString(PyExc_IndexError, "mutex index out of range");
        return NULL;
    }
    int err = pthread_mutex_unlock(mutex_at(self, i));
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* layout(keys_offset, records_offset, buckets): where the table's fingerprints (8 words per bucket) and
 * records (8 x 64 bytes per bucket) are, so that a check passes only the fingerprint. */
static PyObject *MutexArray_layout(MutexArray *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "layout(keys_offset, records_offset, buckets)");
        return NULL;
    }
    Py_ssize_t keys = PyLong_AsSsize_t(args[0]);
    Py_ssize_t records = PyLong_AsSsize_t(args[1]);
    Py_ssize_t buckets = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred())
        return NULL;
    /* powers of two: a stripe is the bucket's low bits, as SharedTable.lock computes it */
    if (buckets <= 0 || (buckets & (buckets - 1)) || (self->count & (self->count - 1)) ||
        self->count > buckets || keys <= 0 || keys % 64 || records % 64 ||
        keys + buckets * 64 > self->view.len || records < keys + buckets * 64 ||
        records + buckets * 8 * 64 > self->view.len) {
        PyErr_SetString(PyExc_ValueError, "layout outside the table");
        return NULL;
    }
    self->keys_offset = keys;
    self->records_offset = records;
    self->bucket_mask = (unsigned long long)buckets - 1;
    Py_RETURN_NONE;
}

/* A number argument as a double: floats and small ints without a detour through a new object. */
static inline double as_double(PyObject *obj) {
    if (PyFloat_CheckExact(obj))
        return PyFloat_AS_DOUBLE(obj);
    if (PyLong_CheckExact(obj)) {
        int overflow;
        long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
        if (!overflow)
            return (double)value;
    }
    return PyFloat_AsDouble(obj);
}

/* Lock `fp`'s stripe if it is free at once and find the way of its bucket that holds it. Returns the
 * way (the stripe is then locked: *mutex to unlock), or a status: NOT_FOUND (unlocked again), BUSY,
 * RECOVERED (a dead owner's lock made consistent and released) or -1 with an exception set. */
enum { FOUND_NOT, FOUND_BUSY, FOUND_RECOVERED };
static int lock_and_find(MutexArray *self, unsigned long long fp, pthread_mutex_t **mutex, double **record,
                         int *status) {
    unsigned long long bucket = fp & self->bucket_mask;
    pthread_mutex_t *m = mutex_at(self, (Py_ssize_t)(bucket & (unsigned long long)(self->count - 1)));
    int err = pthread_mutex_trylock(m);
    if (err == EBUSY) {
        *status = FOUND_BUSY;
        return 0;
    }
    if (err == EOWNERDEAD) {
        pthread_mutex_consistent(m);
        self->recovered++;
        pthread_mutex_unlock(m);
        *status = FOUND_RECOVERED;
        return 0;
    }
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    const uint64_t *ways = (const uint64_t *)((char *)self->view.buf + self->keys_offset + bucket * 64);
    for (int w = 0; w < 8; w++) {
        if (ways[w] == fp) {
            *mutex = m;
            *record = (double *)((char *)self->view.buf + self->records_offset + (bucket * 8 + w) * 64);
            return 1;
        }
    }
    pthread_mutex_unlock(m);
    *status = FOUND_NOT;
    return 0;
}

static int check_layout(MutexArray *self) {
    if (self->keys_offset == 0) {
        PyErr_SetString(PyExc_RuntimeError, "layout() not called");
        return -1;
    }
    return 0;
}

/* (status, values[0], ..., values[n - 1]) */
static PyObject *status_tuple(int status, int n, const double *values) {
    PyObject *result = PyTuple_New(n + 1);
    if (result == NULL)
        return NULL;
    PyObject *item = PyLong_FromLong(status);
    if (item == NULL) {
        Py_DECREF(result);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, item);
    for (int i = 0; i < n; i++) {
        item = PyFloat_FromDouble(values[i]);
        if (item == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyTuple_SET_ITEM(result, i + 1, item);
    }
    return result;
}

/* Python's float floor division (floatobject.c, float_floor_div), so that a window id computed here is
 * the very one `now // window` gives the Python path and the other processes. */
static double floor_div(double vx, double wx) {
    double mod = fmod(vx, wx);
    double div = (vx - mod) / wx;
    if (mod && ((wx < 0) != (mod < 0)))
        div -= 1.0;
    if (div) {
        double floordiv = floor(div);
        if (div - floordiv > 0.5)
            floordiv += 1.0;
        return floordiv;
    }
    return copysign(0.0, vx / wx);
}

enum { WINDOW_DENIED, WINDOW_ALLOWED, WINDOW_NOT_FOUND, WINDOW_BUSY, WINDOW_RECOVERED };

/* fixed_window(fp, now, window, limit, cost) -> (status, count, end)
 *
 * The fixed-window check of tollway.state.local.LocalFixedWindow for a key already in the table, in one
 * call: lock the stripe if it is free at once, find `fp` among the 8 ways of its bucket, read and update
 * the way's record (end, window id, count), unlock. Why C: the same steps through memoryview items cost
 * ~4,000 instructions per request compiled (boxed ints and floats, generic item access); here a few
 * hundred. Status WINDOW_ALLOWED / WINDOW_DENIED: decided, with the window's count after it and its end.
 * Otherwise nothing was changed and the caller takes the general path: the key is new (NOT_FOUND),
 * another process holds the stripe (BUSY: the general path waits with a timeout), or the stripe's
 * previous owner died holding it (RECOVERED: made consistent and released here; the caller counts it). */
static PyObject *MutexArray_fixed_window(MutexArray *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "fixed_window(fp, now, window, limit, cost)");
        return NULL;
    }
    if (check_layout(self) < 0)
        return NULL;
    unsigned long long fp = PyLong_AsUnsignedLongLong(args[0]);
    double now = as_double(args[1]), window = as_double(args[2]);
    double limit = as_double(args[3]), cost = as_double(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (!(window > 0)) {
        PyErr_SetString(PyExc_ValueError, "fixed_window: the window must be positive");
        return NULL;
    }
    pthread_mutex_t *m;
    double *fields;
    int status;
    double count = 0.0, end = 0.0;
    int found = lock_and_find(self, fp, &m, &fields, &status);
    if (found < 0)
        return NULL;
    if (found) {
        double wid = floor_div(now, window);
        if (fields[1] >= wid) { /* this window (or a later one, if the clock stepped back) */
            wid = fields[1];
            count = fields[2];
        }
        end = (wid + 1.0) * window;
        status = count + cost <= limit ? WINDOW_ALLOWED : WINDOW_DENIED;
        if (status == WINDOW_ALLOWED) {
            count += cost;
            fields[0] = end;
            fields[1] = wid;
            fields[2] = count;
        }
        pthread_mutex_unlock(m);
    } else {
        status = WINDOW_NOT_FOUND + status; /* FOUND_NOT, FOUND_BUSY, FOUND_RECOVERED in that order */
    }
    return status_tuple(status, 2, (double[]){count, end});
}

enum { RESERVE_TAKEN, RESERVE_BLOCKED, RESERVE_EMPTY, RESERVE_NOT_FOUND, RESERVE_BUSY, RESERVE_RECOVERED };

/* take_reserve(fp, now, cost) -> (status, expires, reserve, retry_at, remaining, stock)
 *
 * The batched Redis policy's local step (tollway.state.batched.BatchedRedisPolicy._local) for a key
 * already in the table, in one call, for the same reason as fixed_window. The record's doubles: expires,
 * wid, reserve, blocked_until, retry_at, remaining, stock, last_fetch. TAKEN: `cost` units came out of
 * an unexpired reserve (only `reserve` is written; the reserve after it is returned); BLOCKED: Redis had
 * nothing left and the block holds; EMPTY: a slice is needed (nothing changed). NOT_FOUND, BUSY and
 * RECOVERED as for fixed_window: the caller takes the general path. */
static PyObject *MutexArray_take_reserve(MutexArray *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "take_reserve(fp, now, cost)");
        return NULL;
    }
    if (check_layout(self) < 0)
        return NULL;
    unsigned long long fp = PyLong_AsUnsignedLongLong(args[0]);
    double now = as_double(args[1]), cost = as_double(args[2]);
    if (PyErr_Occurred())
        return NULL;
    pthread_mutex_t *m;
    double *fields;
    int status;
    double f[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    int found = lock_and_find(self, fp, &m, &fields, &status);
    if (found < 0)
        return NULL;
    if (found) {
        memcpy(f, fields, sizeof f);
        if (f[2] >= cost && f[0] > now) {
            f[2] -= cost;
            fields[2] = f[2];
            status = RESERVE_TAKEN;
        } else {
            status = f[3] > now ? RESERVE_BLOCKED : RESERVE_EMPTY;
        }
        pthread_mutex_unlock(m);
    } else {
        status = RESERVE_NOT_FOUND + status;
    }
    /* expires, reserve, retry_at, remaining, stock */
    return status_tuple(status, 5, (double[]){f[0], f[2], f[4], f[5], f[6]});
}

static PyObject *MutexArray_get_recovered(MutexArray *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->recovered);
}

static PyMethodDef MutexArray_methods[] = {
    {"initialize", (PyCFunction)MutexArray_initialize, METH_NOARGS, "initialize every mutex (creator only)"},
    {"acquire", (PyCFunction)(void (*)(void))MutexArray_acquire, METH_FASTCALL,
     "acquire(index, timeout) -> True if the previous owner died holding it"},
    {"release", (PyCFunction)MutexArray_release, METH_O, "release(index)"},
    {"layout", (PyCFunction)(void (*)(void))MutexArray_layout, METH_FASTCALL,
     "layout(keys_offset, records_offset, buckets): the table's geometry, for the one-call checks"},
    {"fixed_window", (PyCFunction)(void (*)(void))MutexArray_fixed_window, METH_FASTCALL,
     "fixed_window(fp, now, window, limit, cost) -> (status, count, end)"},
    {"take_reserve", (PyCFunction)(void (*)(void))MutexArray_take_reserve, METH_FASTCALL,
     "take_reserve(fp, now, cost) -> (status, expires, reserve, retry_at, remaining, stock)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef MutexArray_getset[] = {
    {"recovered", (getter)MutexArray_get_recovered, NULL, "locks taken over from dead owners", NULL},
    {NULL},
};

static PyTypeObject MutexArrayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tollway.state._shmlock.MutexArray",
    .tp_basicsize = sizeof(MutexArray),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "MutexArray(buffer, offset, count): robust process-shared mutexes inside a buffer",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)MutexArray_init,
    .tp_dealloc = (destructor)MutexArray_dealloc,
    .tp_methods = MutexArray_methods,
    .tp_getset = MutexArray_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_shmlock", "Robust process-shared mutexes in shared memory.", -1, NULL,
};

PyMODINIT_FUNC PyInit__shmlock(void) {
    if (PyType_Ready(&MutexArrayType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&MutexArrayType);
    if (PyModule_AddObject(m, "MutexArray", (PyObject *)&MutexArrayType) < 0 ||
        PyModule_AddIntConstant(m, "ABI", ABI) < 0 ||
        PyModule_AddIntConstant(m, "MUTEX_STRIDE", MUTEX_STRIDE) < 0 ||
        PyModule_AddIntConstant(m, "MUTEX_SIZE", (long)sizeof(pthread_mutex_t)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
