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

/* The way of the bucket whose fingerprints start at byte offset `keys` that holds `fp`, or -1. */
static int find_way(MutexArray *self, Py_ssize_t keys, unsigned long long fp) {
    const uint64_t *ways = (const uint64_t *)((char *)self->view.buf + keys);
    for (int w = 0; w < 8; w++) {
        if (ways[w] == fp)
            return w;
    }
    return -1;
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

/* fixed_window(stripe, keys, record, fp, now, window, limit, cost) -> (status, count, end)
 *
 * The fixed-window check of tollway.state.local.LocalFixedWindow for a key already in the table, in one
 * call: lock the stripe if it is free at once, find `fp` among the 8 ways of its bucket (64-bit words at
 * byte offset `keys`), read and update the way's record (end, window id, count: doubles at byte offset
 * `record` + way * 64), unlock. Why C: the same steps through memoryview items cost ~4,000 instructions
 * per request compiled (boxed ints and floats, generic item access); here a few hundred.
 * Status WINDOW_ALLOWED / WINDOW_DENIED: decided, with the window's count after it and its end. Otherwise
 * nothing was changed and the caller takes the general path: the key is new (NOT_FOUND), another
 * process holds the stripe (BUSY: the general path waits with a timeout), or the stripe's previous
 * owner died holding it (RECOVERED: made consistent and released here; the caller counts it). */
static PyObject *MutexArray_fixed_window(MutexArray *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "fixed_window(stripe, keys, record, fp, now, window, limit, cost)");
        return NULL;
    }
    Py_ssize_t stripe = PyLong_AsSsize_t(args[0]);
    Py_ssize_t keys = PyLong_AsSsize_t(args[1]);
    Py_ssize_t record = PyLong_AsSsize_t(args[2]);
    unsigned long long fp = PyLong_AsUnsignedLongLong(args[3]);
    double now = PyFloat_AsDouble(args[4]);
    double window = PyFloat_AsDouble(args[5]);
    double limit = PyFloat_AsDouble(args[6]);
    double cost = PyFloat_AsDouble(args[7]);
    if (PyErr_Occurred())
        return NULL;
    if (stripe < 0 || stripe >= self->count || keys < 0 || keys % 8 || keys + 64 > self->view.len ||
        record < 0 || record % 8 || record + 8 * 64 > self->view.len || window <= 0) {
        PyErr_SetString(PyExc_ValueError, "fixed_window: offsets outside the table");
        return NULL;
    }
    int status;
    double count = 0.0, end = 0.0;
    pthread_mutex_t *m = mutex_at(self, stripe);
    int err = pthread_mutex_trylock(m);
    if (err == EBUSY) {
        status = WINDOW_BUSY;
    } else if (err == EOWNERDEAD) {
        pthread_mutex_consistent(m);
        self->recovered++;
        pthread_mutex_unlock(m);
        status = WINDOW_RECOVERED;
    } else if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    } else {
        int way = find_way(self, keys, fp);
        if (way < 0) {
            status = WINDOW_NOT_FOUND;
        } else {
            double *fields = (double *)((char *)self->view.buf + record + way * 64);
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
        }
        pthread_mutex_unlock(m);
    }
    return status_tuple(status, 2, (double[]){count, end});
}

enum { RESERVE_TAKEN, RESERVE_BLOCKED, RESERVE_EMPTY, RESERVE_NOT_FOUND, RESERVE_BUSY, RESERVE_RECOVERED };

/* take_reserve(stripe, keys, record, fp, now, cost) -> (status, expires, reserve, retry_at, remaining)
 *
 * The batched Redis policy's local step (tollway.state.batched.BatchedRedisPolicy._local) for a key
 * already in the table, in one call, for the same reason as fixed_window. The record's doubles: expires,
 * wid, reserve, blocked_until, retry_at, remaining, stock, last_fetch. TAKEN: `cost` units came out of
 * an unexpired reserve (only `reserve` is written; the reserve after it is returned); BLOCKED: Redis had
 * nothing left and the block holds; EMPTY: a slice is needed (nothing changed). NOT_FOUND, BUSY and
 * RECOVERED as for fixed_window: the caller takes the general path. `stock` is the 6th item. */
static PyObject *MutexArray_take_reserve(MutexArray *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "take_reserve(stripe, keys, record, fp, now, cost)");
        return NULL;
    }
    Py_ssize_t stripe = PyLong_AsSsize_t(args[0]);
    Py_ssize_t keys = PyLong_AsSsize_t(args[1]);
    Py_ssize_t record = PyLong_AsSsize_t(args[2]);
    unsigned long long fp = PyLong_AsUnsignedLongLong(args[3]);
    double now = PyFloat_AsDouble(args[4]);
    double cost = PyFloat_AsDouble(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (stripe < 0 || stripe >= self->count || keys < 0 || keys % 8 || keys + 64 > self->view.len ||
        record < 0 || record % 8 || record + 8 * 64 > self->view.len) {
        PyErr_SetString(PyExc_ValueError, "take_reserve: offsets outside the table");
        return NULL;
    }
    int status;
    double f[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    pthread_mutex_t *m = mutex_at(self, stripe);
    int err = pthread_mutex_trylock(m);
    if (err == EBUSY) {
        status = RESERVE_BUSY;
    } else if (err == EOWNERDEAD) {
        pthread_mutex_consistent(m);
        self->recovered++;
        pthread_mutex_unlock(m);
        status = RESERVE_RECOVERED;
    } else if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    } else {
        int way = find_way(self, keys, fp);
        if (way < 0) {
            status = RESERVE_NOT_FOUND;
        } else {
            double *fields = (double *)((char *)self->view.buf + record + way * 64);
            memcpy(f, fields, sizeof f);
            if (f[2] >= cost && f[0] > now) {
                f[2] -= cost;
                fields[2] = f[2];
                status = RESERVE_TAKEN;
            } else {
                status = f[3] > now ? RESERVE_BLOCKED : RESERVE_EMPTY;
            }
        }
        pthread_mutex_unlock(m);
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
    {"fixed_window", (PyCFunction)(void (*)(void))MutexArray_fixed_window, METH_FASTCALL,
     "fixed_window(stripe, keys, record, fp, now, window, limit, cost) -> (status, count, end)"},
    {"take_reserve", (PyCFunction)(void (*)(void))MutexArray_take_reserve, METH_FASTCALL,
     "take_reserve(stripe, keys, record, fp, now, cost) -> (status, expires, reserve, retry_at, "
     "remaining, stock)"},
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
