/*
 * hsmbridge._native - batch sign/decrypt over a set of PKCS#11 sessions.
 *
 * run_batch() takes the handles of sessions and a key that python-pkcs11 has
 * already opened/found in this process, copies every input into C memory,
 * releases the GIL once, and runs one native thread per session.  Each thread
 * takes the next item index from a shared atomic counter and makes exactly
 * two PKCS#11 calls per item: C_SignInit + C_Sign (or C_DecryptInit +
 * C_Decrypt) into a buffer of the caller's out_len - no NULL-buffer length
 * query.  The Python result list is built after the GIL is taken back.
 *
 * The module's function list is the one hsmbridge's loader initialised and
 * registered with use_function_list(path, address); python-pkcs11 uses the
 * same instance, so its session and object handles are valid here.  Modules
 * that hand out a new instance on every C_GetFunctionList (p11-kit's proxy
 * and client) make this essential: python-pkcs11 then loads the module
 * through this extension's own C_GetFunctionList, which returns the
 * registered instance.  For a path nobody registered, the list comes from
 * dlopen(path, RTLD_NOW|RTLD_NOLOAD) + C_GetFunctionList, which for ordinary
 * modules is the instance python-pkcs11 loaded.  This code never calls
 * C_Initialize/C_Finalize: the caller is responsible for having initialised
 * the module with CKF_OS_LOCKING_OK before using more than one session
 * (docs/design.md, fact 1).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __linux__
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "pkcs11_min.h"

#define OP_SIGN 0
#define OP_DECRYPT 1

/* Upper bounds that catch nonsense arguments early. */
#define MAX_SESSIONS 256
#define MAX_OUT_LEN (1UL << 20) /* per item output buffer, 1 MiB */
#define MAX_MODULES 16

/* ------------------------------------------------------------------------ */
/* function-list cache                                                       */
/* ------------------------------------------------------------------------ */

typedef struct {
    char *path;
    void *handle; /* dlopen reference kept for the life of the process */
    CK_FUNCTION_LIST_PTR fl;
} module_entry;

static module_entry g_modules[MAX_MODULES];
static int g_nmodules;
static pthread_mutex_t g_modules_lock = PTHREAD_MUTEX_INITIALIZER;

/*
 * Find the function list of an already loaded and initialised module.
 * Returns NULL with a Python exception set on failure.  Called with the GIL.
 */
static CK_FUNCTION_LIST_PTR
get_function_list(const char *path)
{
    CK_FUNCTION_LIST_PTR fl = NULL;
    int i;

    pthread_mutex_lock(&g_modules_lock);
    for (i = 0; i < g_nmodules; i++) {
        if (strcmp(g_modules[i].path, path) == 0) {
            fl = g_modules[i].fl;
            pthread_mutex_unlock(&g_modules_lock);
            return fl;
        }
    }

    void *handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    int fresh = 0;
    if (handle == NULL) {
        handle = dlopen(path, RTLD_NOW);
        fresh = 1;
    }
    if (handle == NULL) {
        const char *err = dlerror();
        pthread_mutex_unlock(&g_modules_lock);
        PyErr_Format(PyExc_RuntimeError,
                     "PKCS#11 module %s is not loaded in this process and could not be "
                     "loaded (%s); load and initialise it with python-pkcs11 first",
                     path, err ? err : "unknown dlopen error");
        return NULL;
    }

    CK_C_GetFunctionList get_list = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
    if (get_list == NULL) {
        dlclose(handle);
        pthread_mutex_unlock(&g_modules_lock);
        PyErr_Format(PyExc_RuntimeError,
                     "%s does not export C_GetFunctionList; is it a PKCS#11 module?", path);
        return NULL;
    }
    CK_RV rv = get_list(&fl);
    if (rv != CKR_OK || fl == NULL) {
        dlclose(handle);
        pthread_mutex_unlock(&g_modules_lock);
        PyErr_Format(PyExc_RuntimeError, "C_GetFunctionList of %s failed (CK_RV 0x%lx)", path,
                     (unsigned long)rv);
        return NULL;
    }

    /* The handles we are given only mean something in an initialised module:
     * C_GetInfo answers CKR_CRYPTOKI_NOT_INITIALIZED otherwise. */
    CK_INFO info;
    rv = fl->C_GetInfo(&info);
    if (rv != CKR_OK) {
        dlclose(handle);
        pthread_mutex_unlock(&g_modules_lock);
        if (rv == CKR_CRYPTOKI_NOT_INITIALIZED) {
            PyErr_Format(PyExc_RuntimeError,
                         "PKCS#11 module %s is %s in this process; open it with "
                         "python-pkcs11 (pkcs11.lib(path)) before calling run_batch",
                         path, fresh ? "not loaded" : "loaded but not initialised");
        } else {
            PyErr_Format(PyExc_RuntimeError, "C_GetInfo of %s failed (CK_RV 0x%lx)", path,
                         (unsigned long)rv);
        }
        return NULL;
    }

    if (g_nmodules >= MAX_MODULES) {
        /* Still usable, just not cached: keep the dlopen reference anyway. */
        pthread_mutex_unlock(&g_modules_lock);
        return fl;
    }
    char *copy = strdup(path);
    if (copy == NULL) {
        pthread_mutex_unlock(&g_modules_lock);
        return fl;
    }
    g_modules[g_nmodules].path = copy;
    g_modules[g_nmodules].handle = handle;
    g_modules[g_nmodules].fl = fl;
    g_nmodules++;
    pthread_mutex_unlock(&g_modules_lock);
    return fl;
}

/*
 * Register the function list at `address` (an initialised instance) as the
 * one run_batch uses for `path`, replacing whatever was cached.
 */
static int
register_function_list(const char *path, CK_FUNCTION_LIST_PTR fl)
{
    int i;
    pthread_mutex_lock(&g_modules_lock);
    for (i = 0; i < g_nmodules; i++) {
        if (strcmp(g_modules[i].path, path) == 0) {
            g_modules[i].fl = fl;
            pthread_mutex_unlock(&g_modules_lock);
            return 0;
        }
    }
    if (g_nmodules >= MAX_MODULES) {
        pthread_mutex_unlock(&g_modules_lock);
        PyErr_Format(PyExc_RuntimeError, "more than %d PKCS#11 modules registered",
                     MAX_MODULES);
        return -1;
    }
    char *copy = strdup(path);
    if (copy == NULL) {
        pthread_mutex_unlock(&g_modules_lock);
        PyErr_NoMemory();
        return -1;
    }
    g_modules[g_nmodules].path = copy;
    g_modules[g_nmodules].handle = NULL;
    g_modules[g_nmodules].fl = fl;
    g_nmodules++;
    pthread_mutex_unlock(&g_modules_lock);
    return 0;
}

/* The instance this extension's C_GetFunctionList hands out: the one most
 * recently registered (the loader holds a lock around register + load). */
static _Atomic(CK_FUNCTION_LIST_PTR) g_handed_out;

/*
 * A PKCS#11 entry point, so that python-pkcs11 can "load" this extension as
 * a module and get exactly the instance hsmbridge initialised.  The extension
 * is loaded RTLD_LOCAL: the symbol is found only by dlsym on its own handle.
 */
__attribute__((visibility("default"))) CK_RV
C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out)
{
    CK_FUNCTION_LIST_PTR fl = atomic_load(&g_handed_out);
    if (out == NULL)
        return CKR_ARGUMENTS_BAD;
    if (fl == NULL)
        return CKR_GENERAL_ERROR;
    *out = fl;
    return CKR_OK;
}

PyDoc_STRVAR(use_function_list_doc,
"use_function_list(module_path, address) -> str\n"
"\n"
"From now on run_batch(module_path, ...) uses the CK_FUNCTION_LIST at address\n"
"(an instance the caller has initialised), and this extension's own\n"
"C_GetFunctionList returns it.  Returns the file of this extension, for\n"
"python-pkcs11 to load as the module.");

static PyObject *
use_function_list(PyObject *self, PyObject *args)
{
    PyObject *path_bytes = NULL;
    unsigned long long address;
    Dl_info info;

    (void)self;
    if (!PyArg_ParseTuple(args, "O&K:use_function_list", PyUnicode_FSConverter, &path_bytes,
                          &address))
        return NULL;
    if (address == 0) {
        Py_DECREF(path_bytes);
        PyErr_SetString(PyExc_ValueError, "address of the function list is NULL");
        return NULL;
    }
    CK_FUNCTION_LIST_PTR fl = (CK_FUNCTION_LIST_PTR)(uintptr_t)address;
    int rc = register_function_list(PyBytes_AS_STRING(path_bytes), fl);
    Py_DECREF(path_bytes);
    if (rc < 0)
        return NULL;
    atomic_store(&g_handed_out, fl);
    if (dladdr((void *)&C_GetFunctionList, &info) == 0 || info.dli_fname == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cannot find the file of hsmbridge._native");
        return NULL;
    }
    return PyUnicode_DecodeFSDefault(info.dli_fname);
}

/* ------------------------------------------------------------------------ */
/* the batch                                                                 */
/* ------------------------------------------------------------------------ */

enum { ITEM_NOT_DONE = 0, ITEM_OK = 1, ITEM_ERROR = 2 };

typedef struct {
    unsigned char *out; /* malloc'd, exactly len bytes (ITEM_OK) */
    CK_ULONG len;
    CK_RV rv;           /* ITEM_ERROR */
    int state;
} item_result;

typedef CK_RV (*init_fn)(CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_OBJECT_HANDLE);
typedef CK_RV (*oneshot_fn)(CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR,
                            CK_ULONG_PTR);

typedef enum { PARAM_NONE = 0, PARAM_PSS, PARAM_OAEP } param_kind;

typedef struct {
    init_fn init;
    oneshot_fn oneshot;
    CK_MECHANISM_TYPE mechanism;
    param_kind pkind;
    CK_RSA_PKCS_PSS_PARAMS pss;
    CK_RSA_PKCS_OAEP_PARAMS oaep;
    CK_OBJECT_HANDLE key;
    const unsigned char *arena; /* all inputs, back to back */
    const size_t *offsets;      /* n + 1 offsets into arena */
    size_t n;
    CK_ULONG out_len;
    int stop_on_error;
    int ecdsa_der;
    atomic_size_t next;
    atomic_int stop;
    item_result *results;
} batch_t;

typedef struct {
    batch_t *b;
    CK_SESSION_HANDLE session;
    pthread_t tid;
    int started;
    int nice; /* added to this thread's nice value before it works (Linux) */
    int idle; /* and whether it switches to SCHED_IDLE first (Linux) */
} worker_t;

static void
set_error(item_result *r, CK_RV rv)
{
    r->state = ITEM_ERROR;
    r->rv = rv;
}

/*
 * End an operation left active on the session (ours after a second
 * CKR_BUFFER_TOO_SMALL, or a leftover from earlier use of the session).  In
 * PKCS#11 v2.40 an active single-part operation ends when C_Sign/C_Decrypt
 * returns anything but CKR_BUFFER_TOO_SMALL (or a successful length query),
 * so call it with dummy input and a buffer big enough for the answer; the
 * result is thrown away.
 */
static void
finish_active(const batch_t *b, CK_SESSION_HANDLE session)
{
    CK_BYTE dummy[1] = {0};
    CK_ULONG cap = b->out_len > 1024 ? b->out_len : 1024;
    int tries;

    for (tries = 0; tries < 3 && cap <= MAX_OUT_LEN; tries++) {
        CK_BYTE_PTR buf = malloc(cap);
        if (buf == NULL)
            return;
        CK_ULONG len = cap;
        CK_RV rv = b->oneshot(session, dummy, 0, buf, &len);
        free(buf);
        if (rv != CKR_BUFFER_TOO_SMALL)
            return;
        cap = len > cap ? len : cap * 4;
    }
}

/*
 * ECDSA r||s (what PKCS#11 returns) to the DER SEQUENCE of two INTEGERs that
 * X.509 and OpenSSL expect. Done here, outside the GIL, because on the hot
 * path it costs more in Python than the rest of the per-item work together.
 * out must hold len + 9 bytes; returns the DER length, 0 if len is unusable.
 */
static size_t
der_integer(const unsigned char *v, size_t n, unsigned char *out)
{
    while (n > 1 && v[0] == 0) {
        v++;
        n--;
    }
    size_t pad = (v[0] & 0x80) ? 1 : 0;
    out[0] = 0x02;
    out[1] = (unsigned char)(n + pad);
    out[2] = 0;
    memcpy(out + 2 + pad, v, n);
    return 2 + pad + n;
}

static size_t
ecdsa_raw_to_der(const unsigned char *raw, size_t len, unsigned char *out)
{
    if (len == 0 || len % 2 != 0 || len > 2 * 100)
        return 0;
    unsigned char body[2 * (100 + 3)];
    size_t half = len / 2;
    size_t n = der_integer(raw, half, body);
    n += der_integer(raw + half, half, body + n);
    size_t h = 0;
    out[h++] = 0x30;
    if (n >= 0x80)
        out[h++] = 0x81;
    out[h++] = (unsigned char)n;
    memcpy(out + h, body, n);
    return h + n;
}

/* One item: exactly one Init and one C_Sign/C_Decrypt (a second one only when
 * the token answers CKR_BUFFER_TOO_SMALL to a buffer of out_len). */
static void
run_one(const batch_t *b, CK_SESSION_HANDLE session, CK_MECHANISM *mech,
        const unsigned char *in, CK_ULONG in_len, unsigned char *scratch, item_result *r)
{
    CK_RV rv = b->init(session, mech, b->key);
    if (rv == CKR_OPERATION_ACTIVE) {
        finish_active(b, session);
        rv = b->init(session, mech, b->key);
    }
    if (rv != CKR_OK) {
        set_error(r, rv);
        return;
    }

    unsigned char *buf = scratch;
    unsigned char *big = NULL;
    CK_ULONG cap = b->out_len;
    CK_ULONG len = cap;
    rv = b->oneshot(session, (CK_BYTE_PTR)in, in_len, buf, &len);

    if (rv == CKR_BUFFER_TOO_SMALL) {
        /* The operation is still active: retry once with the reported size. */
        CK_ULONG want = len > cap ? len : cap;
        if (want > MAX_OUT_LEN || (big = malloc(want)) == NULL) {
            finish_active(b, session);
            set_error(r, want > MAX_OUT_LEN ? CKR_BUFFER_TOO_SMALL : CKR_HOST_MEMORY);
            return;
        }
        buf = big;
        cap = want;
        len = want;
        rv = b->oneshot(session, (CK_BYTE_PTR)in, in_len, buf, &len);
        if (rv == CKR_BUFFER_TOO_SMALL) {
            free(big);
            finish_active(b, session);
            set_error(r, rv);
            return;
        }
    }
    /* Any other failure has terminated the operation (PKCS#11 v2.40 5.2). */
    if (rv != CKR_OK) {
        free(big);
        set_error(r, rv);
        return;
    }
    if (len > cap) { /* a module that wrote past our buffer would be broken */
        free(big);
        set_error(r, CKR_GENERAL_ERROR);
        return;
    }
    if (b->ecdsa_der) {
        unsigned char *der = malloc(len + 9);
        size_t der_len = der != NULL ? ecdsa_raw_to_der(buf, len, der) : 0;
        free(big);
        if (der_len == 0) {
            free(der);
            set_error(r, der == NULL ? CKR_HOST_MEMORY : CKR_GENERAL_ERROR);
            return;
        }
        r->out = der;
        len = der_len;
    } else if (big != NULL) {
        r->out = big;
    } else {
        r->out = malloc(len ? len : 1);
        if (r->out == NULL) {
            set_error(r, CKR_HOST_MEMORY);
            return;
        }
        memcpy(r->out, buf, len);
    }
    r->len = len;
    r->state = ITEM_OK;
}

/* The CK_MECHANISM of a batch, pointing at the caller's copies of the parameters. */
static void
make_mechanism(const batch_t *b, CK_MECHANISM *mech, CK_RSA_PKCS_PSS_PARAMS *pss,
               CK_RSA_PKCS_OAEP_PARAMS *oaep)
{
    mech->mechanism = b->mechanism;
    switch (b->pkind) {
    case PARAM_PSS:
        mech->pParameter = pss;
        mech->ulParameterLen = sizeof(*pss);
        break;
    case PARAM_OAEP:
        mech->pParameter = oaep;
        mech->ulParameterLen = sizeof(*oaep);
        break;
    default:
        mech->pParameter = NULL;
        mech->ulParameterLen = 0;
        break;
    }
}

/* Lower the calling thread's CPU priority by `nice` and, with `idle`, switch it
 * to SCHED_IDLE: it then runs only on a core no other thread wants and is
 * preempted as soon as one wakes (Linux: both are per thread; elsewhere they are
 * the process's, so nothing is done). The nice value stays as the fallback where
 * SCHED_IDLE is refused. Only threads started for one batch call this, and they
 * end with it. */
static void
lower_priority(int nice, int idle)
{
#ifdef __linux__
    if (nice > 0) {
        id_t tid = (id_t)syscall(SYS_gettid);
        errno = 0;
        int now = getpriority(PRIO_PROCESS, tid);
        if (errno == 0)
            (void)setpriority(PRIO_PROCESS, tid, now + nice);
    }
    if (idle) {
        struct sched_param param = {0};
        (void)pthread_setschedparam(pthread_self(), SCHED_IDLE, &param);
    }
#else
    (void)nice;
    (void)idle;
#endif
}

static void *
worker_main(void *arg)
{
    worker_t *w = (worker_t *)arg;
    batch_t *b = w->b;

    lower_priority(w->nice, w->idle);

    /* Each worker gets its own copy of the mechanism and its parameters. */
    CK_RSA_PKCS_PSS_PARAMS pss = b->pss;
    CK_RSA_PKCS_OAEP_PARAMS oaep = b->oaep;
    CK_MECHANISM mech;
    make_mechanism(b, &mech, &pss, &oaep);

    unsigned char *scratch = malloc(b->out_len);
    for (;;) {
        if (b->stop_on_error && atomic_load_explicit(&b->stop, memory_order_relaxed))
            break;
        size_t i = atomic_fetch_add_explicit(&b->next, 1, memory_order_relaxed);
        if (i >= b->n)
            break;
        item_result *r = &b->results[i];
        if (scratch == NULL)
            set_error(r, CKR_HOST_MEMORY);
        else
            run_one(b, w->session, &mech, b->arena + b->offsets[i],
                    (CK_ULONG)(b->offsets[i + 1] - b->offsets[i]), scratch, r);
        if (r->state == ITEM_ERROR && b->stop_on_error)
            atomic_store_explicit(&b->stop, 1, memory_order_relaxed);
    }
    free(scratch);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* argument conversion                                                       */
/* ------------------------------------------------------------------------ */

/* An int in 0..ULONG_MAX; TypeError for non-ints, ValueError when out of range. */
static int
to_ck_ulong(PyObject *o, const char *what, CK_ULONG *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long v = PyLong_AsUnsignedLong(o);
    if (v == (unsigned long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be in 0..%lu, got %R", what, ULONG_MAX, o);
        return -1;
    }
    *out = (CK_ULONG)v;
    return 0;
}

static int
parse_param(PyObject *param, batch_t *b)
{
    b->pkind = PARAM_NONE;
    if (param == Py_None)
        return 0;
    if (!PyTuple_Check(param) || PyTuple_GET_SIZE(param) < 1 ||
        !PyUnicode_Check(PyTuple_GET_ITEM(param, 0))) {
        PyErr_Format(PyExc_TypeError,
                     "param must be None, ('pss', hashAlg, mgf, sLen) or "
                     "('oaep', hashAlg, mgf), not %R",
                     param);
        return -1;
    }
    const char *kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(param, 0));
    if (kind == NULL)
        return -1;
    Py_ssize_t size = PyTuple_GET_SIZE(param);
    if (strcmp(kind, "pss") == 0) {
        if (size != 4) {
            PyErr_Format(PyExc_ValueError,
                         "PSS param must be ('pss', hashAlg, mgf, sLen), got %zd items", size);
            return -1;
        }
        if (to_ck_ulong(PyTuple_GET_ITEM(param, 1), "PSS hashAlg", &b->pss.hashAlg) < 0 ||
            to_ck_ulong(PyTuple_GET_ITEM(param, 2), "PSS mgf", &b->pss.mgf) < 0 ||
            to_ck_ulong(PyTuple_GET_ITEM(param, 3), "PSS sLen", &b->pss.sLen) < 0)
            return -1;
        b->pkind = PARAM_PSS;
        return 0;
    }
    if (strcmp(kind, "oaep") == 0) {
        if (size != 3) {
            PyErr_Format(PyExc_ValueError,
                         "OAEP param must be ('oaep', hashAlg, mgf), got %zd items", size);
            return -1;
        }
        if (to_ck_ulong(PyTuple_GET_ITEM(param, 1), "OAEP hashAlg", &b->oaep.hashAlg) < 0 ||
            to_ck_ulong(PyTuple_GET_ITEM(param, 2), "OAEP mgf", &b->oaep.mgf) < 0)
            return -1;
        b->oaep.source = CKZ_DATA_SPECIFIED;
        b->oaep.pSourceData = NULL; /* empty label */
        b->oaep.ulSourceDataLen = 0;
        b->pkind = PARAM_OAEP;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "unknown param kind %R; expected 'pss' or 'oaep'",
                 PyTuple_GET_ITEM(param, 0));
    return -1;
}

/* The checks run_batch and ceiling share: op, out_len, key, mechanism and its param. */
static int
parse_operation(batch_t *b, int op, Py_ssize_t out_len, PyObject *key_obj, PyObject *mech_obj,
                PyObject *param_obj)
{
    if (op != OP_SIGN && op != OP_DECRYPT) {
        PyErr_Format(PyExc_ValueError, "op must be 0 (sign) or 1 (decrypt), got %d", op);
        return -1;
    }
    if (out_len <= 0 || (size_t)out_len > MAX_OUT_LEN) {
        PyErr_Format(PyExc_ValueError, "out_len must be in 1..%lu, got %zd", MAX_OUT_LEN,
                     out_len);
        return -1;
    }
    b->out_len = (CK_ULONG)out_len;
    if (to_ck_ulong(key_obj, "key_handle", &b->key) < 0)
        return -1;
    if (b->key == CK_INVALID_HANDLE) {
        PyErr_SetString(PyExc_ValueError, "key_handle 0 is CK_INVALID_HANDLE");
        return -1;
    }
    if (to_ck_ulong(mech_obj, "mechanism", &b->mechanism) < 0)
        return -1;
    return parse_param(param_obj, b);
}

/*
 * A list of distinct, valid session handles into a PyMem_Malloc'd array.
 * Returns -1 with a Python exception set on failure.
 */
static int
parse_sessions(PyObject *sessions_obj, CK_SESSION_HANDLE **out, Py_ssize_t *count)
{
    PyObject *seq;
    CK_SESSION_HANDLE *sessions;
    Py_ssize_t n, k, j;

    if (!PyList_Check(sessions_obj) && !PyTuple_Check(sessions_obj)) {
        PyErr_Format(PyExc_TypeError, "sessions must be a list of session handles, not %.100s",
                     Py_TYPE(sessions_obj)->tp_name);
        return -1;
    }
    seq = PySequence_Fast(sessions_obj, "sessions must be a list");
    if (seq == NULL)
        return -1;
    n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > MAX_SESSIONS) {
        PyErr_Format(PyExc_ValueError, "sessions must hold 1..%d session handles, got %zd",
                     MAX_SESSIONS, n);
        Py_DECREF(seq);
        return -1;
    }
    sessions = PyMem_Malloc((size_t)n * sizeof(CK_SESSION_HANDLE));
    if (sessions == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (k = 0; k < n; k++) {
        if (to_ck_ulong(PySequence_Fast_GET_ITEM(seq, k), "session handle", &sessions[k]) < 0)
            goto fail;
        if (sessions[k] == CK_INVALID_HANDLE) {
            PyErr_Format(PyExc_ValueError, "sessions[%zd] is 0 (CK_INVALID_HANDLE)", k);
            goto fail;
        }
        for (j = 0; j < k; j++) {
            if (sessions[j] == sessions[k]) {
                PyErr_Format(PyExc_ValueError,
                             "session handle %lu appears twice in sessions; each worker "
                             "thread needs a session of its own",
                             (unsigned long)sessions[k]);
                goto fail;
            }
        }
    }
    Py_DECREF(seq);
    *out = sessions;
    *count = n;
    return 0;

fail:
    Py_DECREF(seq);
    PyMem_Free(sessions);
    return -1;
}

/* Point b->init/b->oneshot at the module's sign or decrypt functions. */
static int
bind_module(batch_t *b, const char *path, int op)
{
    CK_FUNCTION_LIST_PTR fl = get_function_list(path);
    if (fl == NULL)
        return -1;
    if (op == OP_SIGN) {
        b->init = fl->C_SignInit;
        b->oneshot = fl->C_Sign;
    } else {
        b->init = fl->C_DecryptInit;
        b->oneshot = fl->C_Decrypt;
    }
    if (b->init == NULL || b->oneshot == NULL) {
        PyErr_Format(PyExc_RuntimeError, "PKCS#11 module %s has no %s", path,
                     op == OP_SIGN ? "C_SignInit/C_Sign" : "C_DecryptInit/C_Decrypt");
        return -1;
    }
    return 0;
}

/* Copy every input into one arena; offsets[n] is the total length. */
static int
copy_inputs(PyObject *seq, size_t n, unsigned char **arena_out, size_t **offsets_out)
{
    size_t *offsets = PyMem_Malloc((n + 1) * sizeof(size_t));
    unsigned char *arena = NULL;
    size_t i, total = 0;
    Py_buffer view;

    if (offsets == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, (Py_ssize_t)i);
        if (!PyObject_CheckBuffer(item) || PyUnicode_Check(item)) {
            PyErr_Format(PyExc_TypeError, "inputs[%zu] must be bytes-like, not %.100s", i,
                         Py_TYPE(item)->tp_name);
            goto fail;
        }
        if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "inputs[%zu] must be a contiguous bytes-like object (%.100s)", i,
                         Py_TYPE(item)->tp_name);
            goto fail;
        }
        offsets[i] = total;
        total += (size_t)view.len;
        PyBuffer_Release(&view);
    }
    offsets[n] = total;

    /* +1: never hand a module a NULL data pointer, even for empty inputs
     * (SoftHSM2 answers CKR_ARGUMENTS_BAD to NULL without ending the op). */
    arena = PyMem_Malloc(total + 1);
    if (arena == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, (Py_ssize_t)i);
        if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0)
            goto fail;
        if ((size_t)view.len != offsets[i + 1] - offsets[i]) {
            PyBuffer_Release(&view);
            PyErr_Format(PyExc_RuntimeError, "inputs[%zu] changed size while being copied", i);
            goto fail;
        }
        if (view.len)
            memcpy(arena + offsets[i], view.buf, (size_t)view.len);
        PyBuffer_Release(&view);
    }
    *arena_out = arena;
    *offsets_out = offsets;
    return 0;

fail:
    PyMem_Free(arena);
    PyMem_Free(offsets);
    return -1;
}

/* ------------------------------------------------------------------------ */
/* run_batch                                                                 */
/* ------------------------------------------------------------------------ */

PyDoc_STRVAR(run_batch_doc,
"run_batch(module_path, op, sessions, key_handle, mechanism, param, inputs, out_len,\n"
"          stop_on_error=False, ecdsa_der=False, nice=0, idle=False)\n"
"          -> list[bytes | int | None]\n"
"\n"
"Sign (op=0: C_SignInit + C_Sign) or decrypt (op=1: C_DecryptInit + C_Decrypt)\n"
"every input with one private key, one native thread per session, the GIL\n"
"released once for the whole batch.\n"
"\n"
"module_path: path of a PKCS#11 module already loaded and initialised in this\n"
"    process (by python-pkcs11); its handles are used as they are.\n"
"sessions: distinct open session handles; len(sessions) is the parallelism.\n"
"key_handle, mechanism: CK_OBJECT_HANDLE and CK_MECHANISM_TYPE.\n"
"param: None, ('pss', hashAlg, mgf, sLen) or ('oaep', hashAlg, mgf) (empty label).\n"
"inputs: bytes-like items (digest/DigestInfo to sign, ciphertext to decrypt).\n"
"out_len: output buffer per item (modulus bytes for RSA, 2*field bytes for ECDSA).\n"
"stop_on_error: once an item fails, take no new items.\n"
"ecdsa_der: encode each output (ECDSA r||s) as a DER signature.\n"
"nice: when above 0, every session gets a new thread that lowers its own CPU\n"
"    priority by this much first (Linux), and the calling thread only waits:\n"
"    the caller's threads keep their priority (hsmbridge.aio, docs/design.md).\n"
"idle: the same, and the new threads switch to SCHED_IDLE (Linux): they run\n"
"    only on a core no other thread wants.\n"
"\n"
"Returns a list in input order: bytes (the output), int (the CK_RV of a failed\n"
"item) or None (not attempted because stop_on_error stopped the batch).");

static PyObject *
run_batch(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"module_path", "op",     "sessions", "key_handle",    "mechanism",
                             "param",       "inputs", "out_len",  "stop_on_error", "ecdsa_der",
                             "nice",        "idle",          NULL};
    PyObject *path_bytes = NULL;
    int op;
    PyObject *sessions_obj, *key_obj, *mech_obj, *param_obj, *inputs_obj;
    Py_ssize_t out_len;
    int stop_on_error = 0;
    int ecdsa_der = 0;
    int nice = 0;
    int idle = 0;

    PyObject *inputs_seq = NULL, *result = NULL;
    CK_SESSION_HANDLE *sessions = NULL;
    worker_t *workers = NULL;
    unsigned char *arena = NULL;
    size_t *offsets = NULL;
    item_result *results = NULL;
    size_t n = 0, i;
    Py_ssize_t nsessions = 0;
    batch_t *b = NULL;

    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&iOOOOOn|ppip:run_batch", kwlist,
                                     PyUnicode_FSConverter, &path_bytes, &op, &sessions_obj,
                                     &key_obj, &mech_obj, &param_obj, &inputs_obj, &out_len,
                                     &stop_on_error, &ecdsa_der, &nice, &idle))
        return NULL;
    if (nice < 0 || nice > 19) {
        Py_XDECREF(path_bytes);
        PyErr_Format(PyExc_ValueError, "nice must be 0-19, got %d", nice);
        return NULL;
    }

    b = PyMem_Calloc(1, sizeof(batch_t));
    if (b == NULL) {
        PyErr_NoMemory();
        goto done;
    }

    if (parse_operation(b, op, out_len, key_obj, mech_obj, param_obj) < 0)
        goto done;
    b->stop_on_error = stop_on_error;
    b->ecdsa_der = ecdsa_der;

    if (parse_sessions(sessions_obj, &sessions, &nsessions) < 0)
        goto done;

    /* inputs */
    if (!PyList_Check(inputs_obj) && !PyTuple_Check(inputs_obj)) {
        PyErr_Format(PyExc_TypeError, "inputs must be a list of bytes, not %.100s",
                     Py_TYPE(inputs_obj)->tp_name);
        goto done;
    }
    inputs_seq = PySequence_Fast(inputs_obj, "inputs must be a list");
    if (inputs_seq == NULL)
        goto done;
    n = (size_t)PySequence_Fast_GET_SIZE(inputs_seq);
    if (copy_inputs(inputs_seq, n, &arena, &offsets) < 0)
        goto done;

    /* the module (after the cheap checks, so argument errors come first) */
    if (bind_module(b, PyBytes_AS_STRING(path_bytes), op) < 0)
        goto done;

    result = PyList_New((Py_ssize_t)n);
    if (result == NULL || n == 0)
        goto done;

    results = PyMem_Calloc(n, sizeof(item_result));
    size_t nthreads = (size_t)nsessions < n ? (size_t)nsessions : n;
    workers = PyMem_Calloc(nthreads, sizeof(worker_t));
    if (results == NULL || workers == NULL) {
        Py_CLEAR(result);
        PyErr_NoMemory();
        goto done;
    }
    b->arena = arena;
    b->offsets = offsets;
    b->n = n;
    b->results = results;
    atomic_init(&b->next, 0);
    atomic_init(&b->stop, 0);
    for (i = 0; i < nthreads; i++) {
        workers[i].b = b;
        workers[i].session = sessions[i];
        workers[i].nice = nice;
        workers[i].idle = idle;
    }
    /* With nice or idle, the calling thread only waits (it keeps its priority). */
    size_t first_new = nice > 0 || idle ? 0 : 1;

    Py_BEGIN_ALLOW_THREADS
    if (nthreads > first_new) {
        /* Workers block asynchronous signals (SIGINT, ...) so that they are
         * delivered to Python's thread; faults stay deliverable. */
        sigset_t all, old;
        sigfillset(&all);
        sigdelset(&all, SIGSEGV);
        sigdelset(&all, SIGBUS);
        sigdelset(&all, SIGFPE);
        sigdelset(&all, SIGILL);
        sigdelset(&all, SIGABRT);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        for (i = first_new; i < nthreads; i++) {
            /* A thread that cannot be created leaves its session unused. */
            workers[i].started =
                pthread_create(&workers[i].tid, NULL, worker_main, &workers[i]) == 0;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    if (first_new == 1)
        worker_main(&workers[0]); /* the calling thread works too */
    else {
        /* No thread at all could be started: work here, at the caller's priority. */
        int any = 0;
        for (i = 0; i < nthreads; i++)
            any |= workers[i].started;
        if (!any) {
            workers[0].nice = 0;
            workers[0].idle = 0;
            worker_main(&workers[0]);
        }
    }
    for (i = first_new; i < nthreads; i++) {
        if (workers[i].started)
            pthread_join(workers[i].tid, NULL);
    }
    Py_END_ALLOW_THREADS

    for (i = 0; i < n; i++) {
        item_result *r = &results[i];
        PyObject *v;
        if (r->state == ITEM_OK) {
            v = PyBytes_FromStringAndSize((const char *)r->out, (Py_ssize_t)r->len);
        } else if (r->state == ITEM_ERROR) {
            v = PyLong_FromUnsignedLong((unsigned long)r->rv);
        } else {
            v = Py_NewRef(Py_None);
        }
        if (v == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, (Py_ssize_t)i, v);
    }

done:
    if (results != NULL) {
        for (i = 0; i < n; i++)
            free(results[i].out);
        PyMem_Free(results);
    }
    PyMem_Free(workers);
    PyMem_Free(arena);
    PyMem_Free(offsets);
    PyMem_Free(sessions);
    PyMem_Free(b);
    Py_XDECREF(inputs_seq);
    Py_XDECREF(path_bytes);
    return result;
}

/* ------------------------------------------------------------------------ */
/* ceiling                                                                   */
/* ------------------------------------------------------------------------ */

/*
 * The token's ceiling: the plainest C loop over the same two calls per
 * operation the engine makes (C_xxxInit + C_Sign/C_Decrypt into a buffer of
 * out_len), one input over and over, nothing kept, no Python anywhere.
 * Shipped in the extension so that `pip install` users have it too.
 */
typedef struct {
    batch_t *b; /* init, oneshot, mechanism, key, out_len */
    const unsigned char *input;
    CK_ULONG input_len;
    long count;
    int warmup;
    atomic_long next;
    atomic_int failed;
    atomic_ulong first_rv;
    pthread_barrier_t start;
} ceiling_t;

typedef struct {
    ceiling_t *c;
    CK_SESSION_HANDLE session;
    pthread_t tid;
    int started;
} ceiling_worker_t;

static CK_RV
ceiling_op(const batch_t *b, CK_SESSION_HANDLE s, CK_MECHANISM *mech, const unsigned char *in,
           CK_ULONG in_len, unsigned char *out)
{
    CK_ULONG len = b->out_len;
    CK_RV rv = b->init(s, mech, b->key);
    if (rv == CKR_OK)
        rv = b->oneshot(s, (CK_BYTE_PTR)in, in_len, out, &len);
    return rv;
}

static void
ceiling_fail(ceiling_t *c, CK_RV rv)
{
    unsigned long zero = 0;
    atomic_compare_exchange_strong(&c->first_rv, &zero, (unsigned long)rv);
    atomic_store(&c->failed, 1);
}

static void *
ceiling_main(void *arg)
{
    ceiling_worker_t *w = arg;
    ceiling_t *c = w->c;
    const batch_t *b = c->b;
    CK_RSA_PKCS_PSS_PARAMS pss = b->pss;
    CK_RSA_PKCS_OAEP_PARAMS oaep = b->oaep;
    CK_MECHANISM mech;
    make_mechanism(b, &mech, &pss, &oaep);
    unsigned char *out = malloc(b->out_len);

    for (int i = 0; i < c->warmup && out != NULL; i++) {
        CK_RV rv = ceiling_op(b, w->session, &mech, c->input, c->input_len, out);
        if (rv != CKR_OK)
            ceiling_fail(c, rv);
    }
    if (out == NULL)
        ceiling_fail(c, CKR_HOST_MEMORY);
    pthread_barrier_wait(&c->start);
    while (!atomic_load_explicit(&c->failed, memory_order_relaxed)) {
        long i = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
        if (i >= c->count)
            break;
        CK_RV rv = ceiling_op(b, w->session, &mech, c->input, c->input_len, out);
        if (rv != CKR_OK)
            ceiling_fail(c, rv);
    }
    free(out);
    return NULL;
}

static double
clock_seconds(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

PyDoc_STRVAR(ceiling_doc,
"ceiling(module_path, op, sessions, key_handle, mechanism, param, input, out_len,\n"
"        count, warmup=1) -> (seconds, cpu_seconds, ck_rv)\n"
"\n"
"The token's ceiling: one native thread per session, each looping C_SignInit +\n"
"C_Sign (op=0) or C_DecryptInit + C_Decrypt (op=1) on the same input until\n"
"count operations are done between them, after warmup operations per thread\n"
"that are not timed. Arguments as for run_batch, with one input.\n"
"\n"
"Returns the wall and process CPU seconds of the timed part and the CK_RV of\n"
"the first failed operation (0 when every one succeeded).");

static PyObject *
ceiling(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"module_path", "op",    "sessions", "key_handle", "mechanism",
                             "param",       "input", "out_len",  "count",      "warmup",
                             NULL};
    PyObject *path_bytes = NULL, *result = NULL;
    PyObject *sessions_obj, *key_obj, *mech_obj, *param_obj;
    Py_buffer input = {0};
    int op, warmup = 1;
    Py_ssize_t out_len;
    long count;
    CK_SESSION_HANDLE *sessions = NULL;
    Py_ssize_t nsessions = 0, i;
    ceiling_worker_t *workers = NULL;
    unsigned char *in_copy = NULL;
    batch_t *b = NULL;
    ceiling_t *c = NULL;
    int barrier = 0;

    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&iOOOOy*nl|i:ceiling", kwlist,
                                     PyUnicode_FSConverter, &path_bytes, &op, &sessions_obj,
                                     &key_obj, &mech_obj, &param_obj, &input, &out_len, &count,
                                     &warmup))
        return NULL;
    b = PyMem_Calloc(1, sizeof(batch_t));
    c = PyMem_Calloc(1, sizeof(ceiling_t));
    in_copy = PyMem_Malloc((size_t)input.len + 1);
    if (b == NULL || c == NULL || in_copy == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (parse_operation(b, op, out_len, key_obj, mech_obj, param_obj) < 0)
        goto done;
    if (count < 1 || warmup < 0) {
        PyErr_Format(PyExc_ValueError, "count must be >= 1 and warmup >= 0, got %ld and %d",
                     count, warmup);
        goto done;
    }
    if (parse_sessions(sessions_obj, &sessions, &nsessions) < 0)
        goto done;
    if (bind_module(b, PyBytes_AS_STRING(path_bytes), op) < 0)
        goto done;
    workers = PyMem_Calloc((size_t)nsessions, sizeof(ceiling_worker_t));
    if (workers == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(in_copy, input.buf, (size_t)input.len);
    c->b = b;
    c->input = in_copy;
    c->input_len = (CK_ULONG)input.len;
    c->count = count;
    c->warmup = warmup;
    atomic_init(&c->next, 0);
    atomic_init(&c->failed, 0);
    atomic_init(&c->first_rv, 0);

    double wall = 0, cpu = 0;
    int create_failed = 0;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t started = 0;
    sigset_t all, old;
    sigfillset(&all);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGILL);
    sigdelset(&all, SIGABRT);
    pthread_barrier_init(&c->start, NULL, (unsigned)nsessions + 1);
    barrier = 1;
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (i = 0; i < nsessions; i++) {
        workers[i].c = c;
        workers[i].session = sessions[i];
        if (pthread_create(&workers[i].tid, NULL, ceiling_main, &workers[i]) != 0)
            break;
        workers[i].started = 1;
        started++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (started < nsessions) {
        /* The barrier counts every session: stand in for the threads never made. */
        create_failed = 1;
        atomic_store(&c->failed, 1);
        for (i = started; i < nsessions; i++)
            pthread_barrier_wait(&c->start);
    }
    pthread_barrier_wait(&c->start);
    double wall0 = clock_seconds(CLOCK_MONOTONIC);
    double cpu0 = clock_seconds(CLOCK_PROCESS_CPUTIME_ID);
    for (i = 0; i < nsessions; i++)
        if (workers[i].started)
            pthread_join(workers[i].tid, NULL);
    wall = clock_seconds(CLOCK_MONOTONIC) - wall0;
    cpu = clock_seconds(CLOCK_PROCESS_CPUTIME_ID) - cpu0;
    Py_END_ALLOW_THREADS

    if (create_failed) {
        PyErr_SetString(PyExc_RuntimeError, "could not create the ceiling's threads");
        goto done;
    }
    result = Py_BuildValue("(ddk)", wall, cpu, (unsigned long)atomic_load(&c->first_rv));

done:
    if (barrier)
        pthread_barrier_destroy(&c->start);
    PyMem_Free(workers);
    PyMem_Free(sessions);
    PyMem_Free(in_copy);
    PyMem_Free(c);
    PyMem_Free(b);
    PyBuffer_Release(&input);
    Py_XDECREF(path_bytes);
    return result;
}

/* ------------------------------------------------------------------------ */
/* module                                                                    */
/* ------------------------------------------------------------------------ */

static PyMethodDef native_methods[] = {
    {"run_batch", (PyCFunction)(void (*)(void))run_batch, METH_VARARGS | METH_KEYWORDS,
     run_batch_doc},
    {"use_function_list", use_function_list, METH_VARARGS, use_function_list_doc},
    {"ceiling", (PyCFunction)(void (*)(void))ceiling, METH_VARARGS | METH_KEYWORDS, ceiling_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(module_doc,
"Native batch engine: PKCS#11 sign/decrypt over a set of sessions with the GIL\n"
"released once per batch, and the token's ceiling loop.  See native/README.md.");

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "hsmbridge._native", module_doc, -1, native_methods,
    NULL,                  NULL,                NULL,       NULL,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "OP_SIGN", OP_SIGN) < 0 ||
        PyModule_AddIntConstant(m, "OP_DECRYPT", OP_DECRYPT) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SESSIONS", MAX_SESSIONS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_OUT_LEN", (long)MAX_OUT_LEN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
