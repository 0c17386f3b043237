/*
 * ceiling - the throughput ceiling of a PKCS#11 token for one key.
 *
 * A plain C loop: C_Initialize with CKF_OS_LOCKING_OK, log in once, open one
 * R/O session per thread (they share the login), then N threads each loop
 * C_SignInit + C_Sign (or C_DecryptInit + C_Decrypt) on their own session
 * until a shared atomic counter reaches --count.  Output buffers are sized
 * once up front, so each operation is exactly two calls (no length query).
 * Prints one line of JSON:
 *
 *   {"ops": M, "threads": N, "seconds": s, "ops_per_s": x, ...}
 *
 * Build: cc -O2 -pthread -I native benchmarks/ceiling/ceiling.c -ldl
 * (or benchmarks/ceiling/build.py).  See docs/design.md, "Performance method".
 */
#define _GNU_SOURCE 1

#include <dlfcn.h>
#include <getopt.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pkcs11_min.h"

#define MAX_THREADS 256
#define BIG_BUF 8192

static CK_FUNCTION_LIST_PTR p11;

/* ---- errors -------------------------------------------------------------- */

static const char *
rv_name(CK_RV rv)
{
    switch (rv) {
#define N(x)                                                                                \
    case x:                                                                                 \
        return #x;
        N(CKR_OK) N(CKR_HOST_MEMORY) N(CKR_SLOT_ID_INVALID) N(CKR_GENERAL_ERROR)
        N(CKR_FUNCTION_FAILED) N(CKR_ARGUMENTS_BAD) N(CKR_CANT_LOCK)
        N(CKR_ATTRIBUTE_READ_ONLY) N(CKR_ATTRIBUTE_TYPE_INVALID) N(CKR_ATTRIBUTE_VALUE_INVALID)
        N(CKR_DATA_INVALID) N(CKR_DATA_LEN_RANGE) N(CKR_DEVICE_ERROR) N(CKR_DEVICE_MEMORY)
        N(CKR_ENCRYPTED_DATA_INVALID) N(CKR_ENCRYPTED_DATA_LEN_RANGE)
        N(CKR_FUNCTION_NOT_SUPPORTED) N(CKR_KEY_HANDLE_INVALID) N(CKR_KEY_TYPE_INCONSISTENT)
        N(CKR_KEY_FUNCTION_NOT_PERMITTED) N(CKR_MECHANISM_INVALID)
        N(CKR_MECHANISM_PARAM_INVALID) N(CKR_OBJECT_HANDLE_INVALID) N(CKR_OPERATION_ACTIVE)
        N(CKR_OPERATION_NOT_INITIALIZED) N(CKR_PIN_INCORRECT) N(CKR_PIN_LOCKED)
        N(CKR_SESSION_COUNT) N(CKR_SESSION_HANDLE_INVALID) N(CKR_SESSION_READ_ONLY)
        N(CKR_TEMPLATE_INCOMPLETE) N(CKR_TEMPLATE_INCONSISTENT) N(CKR_TOKEN_NOT_PRESENT)
        N(CKR_USER_ALREADY_LOGGED_IN) N(CKR_USER_NOT_LOGGED_IN) N(CKR_BUFFER_TOO_SMALL)
        N(CKR_CRYPTOKI_NOT_INITIALIZED) N(CKR_CRYPTOKI_ALREADY_INITIALIZED)
#undef N
    default:
        return "CKR_?";
    }
}

static void
die(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fprintf(stderr, "ceiling: %s\n", msg);
    /* Also as JSON on stdout so callers that parse stdout see the reason. */
    printf("{\"error\": \"");
    for (const char *c = msg; *c; c++) {
        if (*c == '"' || *c == '\\')
            putchar('\\');
        putchar(*c >= 0x20 ? *c : ' ');
    }
    printf("\"}\n");
    exit(1);
}

#define CHECK(call)                                                                         \
    do {                                                                                    \
        CK_RV rv_ = (call);                                                                 \
        if (rv_ != CKR_OK)                                                                  \
            die("%s failed: %s (0x%lx)", #call, rv_name(rv_), (unsigned long)rv_);          \
    } while (0)

/* ---- options --------------------------------------------------------------- */

typedef struct {
    const char *name;
    int decrypt;
    CK_MECHANISM_TYPE mech;
    int pss;  /* CK_RSA_PKCS_PSS_PARAMS (SHA-256, MGF1-SHA256, 32) */
    int oaep; /* CK_RSA_PKCS_OAEP_PARAMS (SHA-1, MGF1-SHA1, empty label) */
    int input; /* what is signed: 0 = 32-byte message/digest, 1 = SHA-256 DigestInfo */
} mech_spec;

static const mech_spec MECHS[] = {
    /* what a user would ask for */
    {"rsa-pkcs1-sha256", 0, CKM_SHA256_RSA_PKCS, 0, 0, 0},
    {"rsa-pss-sha256", 0, CKM_SHA256_RSA_PKCS_PSS, 1, 0, 0},
    {"ecdsa-sha256", 0, CKM_ECDSA, 0, 0, 0}, /* SoftHSM2 has no CKM_ECDSA_SHA256 */
    {"rsa-oaep-sha1", 1, CKM_RSA_PKCS_OAEP, 0, 1, 0},
    /* what hsmbridge's native engine sends (hashing done by the caller) */
    {"rsa-pkcs1", 0, CKM_RSA_PKCS, 0, 0, 1},
    {"rsa-pss", 0, CKM_RSA_PKCS_PSS, 1, 0, 0},
};

typedef struct {
    const char *module, *token, *pin, *key, *op;
    const mech_spec *mech;
    int threads;
    long count;
    int warmup;
    int session_copy;
} options;

static void
usage(FILE *f)
{
    fprintf(f,
            "usage: ceiling --module PATH --token LABEL --pin PIN --key LABEL\n"
            "               [--op sign|decrypt] --mech MECH [--threads N] [--count M]\n"
            "               [--warmup K] [--session-copy]\n"
            "MECH: rsa-pkcs1-sha256 | rsa-pss-sha256 | ecdsa-sha256 | rsa-oaep-sha1\n"
            "      | rsa-pkcs1 (CKM_RSA_PKCS on a DigestInfo) | rsa-pss (CKM_RSA_PKCS_PSS)\n"
            "--warmup K: operations per thread before timing starts (default 1)\n"
            "--session-copy: use a session-object copy of the key (C_CopyObject)\n");
}

static options
parse_args(int argc, char **argv)
{
    options o = {0};
    o.threads = 1;
    o.count = 1000;
    o.warmup = 1;
    static const struct option longopts[] = {
        {"module", required_argument, NULL, 'm'}, {"token", required_argument, NULL, 't'},
        {"pin", required_argument, NULL, 'p'},    {"key", required_argument, NULL, 'k'},
        {"op", required_argument, NULL, 'o'},     {"mech", required_argument, NULL, 'M'},
        {"threads", required_argument, NULL, 'n'}, {"count", required_argument, NULL, 'c'},
        {"warmup", required_argument, NULL, 'w'}, {"session-copy", no_argument, NULL, 's'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0},
    };
    const char *mech = NULL;
    int c;
    char *end;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': o.module = optarg; break;
        case 't': o.token = optarg; break;
        case 'p': o.pin = optarg; break;
        case 'k': o.key = optarg; break;
        case 'o': o.op = optarg; break;
        case 'M': mech = optarg; break;
        case 'n':
            o.threads = (int)strtol(optarg, &end, 10);
            if (*end || o.threads < 1 || o.threads > MAX_THREADS)
                die("--threads must be 1..%d", MAX_THREADS);
            break;
        case 'c':
            o.count = strtol(optarg, &end, 10);
            if (*end || o.count < 1)
                die("--count must be a positive integer");
            break;
        case 'w':
            o.warmup = (int)strtol(optarg, &end, 10);
            if (*end || o.warmup < 0)
                die("--warmup must be >= 0");
            break;
        case 's': o.session_copy = 1; break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); exit(2);
        }
    }
    if (!o.module || !o.token || !o.pin || !o.key || !mech) {
        usage(stderr);
        exit(2);
    }
    for (size_t i = 0; i < sizeof(MECHS) / sizeof(MECHS[0]); i++)
        if (strcmp(MECHS[i].name, mech) == 0)
            o.mech = &MECHS[i];
    if (o.mech == NULL)
        die("unknown --mech %s", mech);
    if (o.op == NULL)
        o.op = o.mech->decrypt ? "decrypt" : "sign";
    if (strcmp(o.op, "sign") != 0 && strcmp(o.op, "decrypt") != 0)
        die("--op must be sign or decrypt");
    if ((strcmp(o.op, "decrypt") == 0) != o.mech->decrypt)
        die("--mech %s does not go with --op %s", o.mech->name, o.op);
    return o;
}

/* ---- token helpers ----------------------------------------------------------- */

static CK_SLOT_ID
find_slot(const char *label)
{
    CK_ULONG n = 0;
    CHECK(p11->C_GetSlotList(CK_TRUE, NULL, &n));
    CK_SLOT_ID *slots = calloc(n ? n : 1, sizeof(CK_SLOT_ID));
    CHECK(p11->C_GetSlotList(CK_TRUE, slots, &n));
    char padded[32];
    size_t len = strlen(label);
    if (len > 32)
        die("token label longer than 32 bytes");
    memset(padded, ' ', sizeof(padded));
    memcpy(padded, label, len);
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        if (p11->C_GetTokenInfo(slots[i], &info) != CKR_OK)
            continue;
        if ((info.flags & CKF_TOKEN_INITIALIZED) && memcmp(info.label, padded, 32) == 0) {
            CK_SLOT_ID id = slots[i];
            free(slots);
            return id;
        }
    }
    die("no token labelled %s", label);
    return 0;
}

static CK_OBJECT_HANDLE
find_key(CK_SESSION_HANDLE s, CK_OBJECT_CLASS cls, const char *label)
{
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_LABEL, (void *)label, strlen(label)},
    };
    CK_OBJECT_HANDLE found[2];
    CK_ULONG n = 0;
    CHECK(p11->C_FindObjectsInit(s, tmpl, 2));
    CHECK(p11->C_FindObjects(s, found, 2, &n));
    CHECK(p11->C_FindObjectsFinal(s));
    if (n != 1)
        die("%lu %s keys labelled %s (want exactly 1)", (unsigned long)n,
            cls == CKO_PRIVATE_KEY ? "private" : "public", label);
    return found[0];
}

/* ---- the loop ---------------------------------------------------------------- */

typedef struct {
    int decrypt;
    CK_MECHANISM mech;
    CK_OBJECT_HANDLE key;
    const CK_BYTE *input;
    CK_ULONG input_len;
    CK_ULONG out_len;
    long count;
    int warmup;
    atomic_long next;
    atomic_int failed;
    atomic_ulong first_rv;
    pthread_barrier_t start;
} bench;

typedef struct {
    bench *b;
    CK_SESSION_HANDLE session;
    pthread_t tid;
} worker;

/* One operation: Init + one C_Sign/C_Decrypt into out (*len bytes in, result out). */
static CK_RV
one_op(const bench *b, CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG *len)
{
    CK_MECHANISM mech = b->mech;
    CK_RV rv;
    if (b->decrypt) {
        rv = p11->C_DecryptInit(s, &mech, b->key);
        if (rv == CKR_OK)
            rv = p11->C_Decrypt(s, (CK_BYTE_PTR)b->input, b->input_len, out, len);
    } else {
        rv = p11->C_SignInit(s, &mech, b->key);
        if (rv == CKR_OK)
            rv = p11->C_Sign(s, (CK_BYTE_PTR)b->input, b->input_len, out, len);
    }
    return rv;
}

static void
fail(bench *b, CK_RV rv)
{
    unsigned long zero = 0;
    atomic_compare_exchange_strong(&b->first_rv, &zero, (unsigned long)rv);
    atomic_store(&b->failed, 1);
}

static void *
worker_main(void *arg)
{
    worker *w = arg;
    bench *b = w->b;
    CK_BYTE *out = malloc(b->out_len);
    CK_ULONG len;
    for (int i = 0; i < b->warmup; i++) {
        len = b->out_len;
        CK_RV rv = one_op(b, w->session, out, &len);
        if (rv != CKR_OK)
            fail(b, rv);
    }
    pthread_barrier_wait(&b->start);
    while (!atomic_load_explicit(&b->failed, memory_order_relaxed)) {
        long i = atomic_fetch_add_explicit(&b->next, 1, memory_order_relaxed);
        if (i >= b->count)
            break;
        len = b->out_len;
        CK_RV rv = one_op(b, w->session, out, &len);
        if (rv != CKR_OK)
            fail(b, rv);
    }
    free(out);
    return NULL;
}

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int
main(int argc, char **argv)
{
    options o = parse_args(argc, argv);

    void *lib = dlopen(o.module, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL)
        die("cannot load %s: %s", o.module, dlerror());
    CK_C_GetFunctionList get_list = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
    if (get_list == NULL)
        die("%s has no C_GetFunctionList", o.module);
    CHECK(get_list(&p11));

    CK_C_INITIALIZE_ARGS init = {0};
    init.flags = CKF_OS_LOCKING_OK;
    CHECK(p11->C_Initialize(&init));

    CK_SLOT_ID slot = find_slot(o.token);
    CK_SESSION_HANDLE login;
    CHECK(p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &login));
    CHECK(p11->C_Login(login, CKU_USER, (CK_UTF8CHAR_PTR)o.pin, strlen(o.pin)));

    CK_OBJECT_HANDLE key = find_key(login, CKO_PRIVATE_KEY, o.key);
    CK_OBJECT_HANDLE copy = CK_INVALID_HANDLE;
    if (o.session_copy) {
        /* docs/design.md, fact 5: a session object skips SoftHSM2's per-use file checks.
         * Label and ID blanked so that searches never return the copy. */
        CK_BBOOL no = CK_FALSE;
        CK_ATTRIBUTE tmpl[] = {
            {CKA_TOKEN, &no, sizeof(no)},
            {CKA_LABEL, "", 0},
            {CKA_ID, "", 0},
        };
        CHECK(p11->C_CopyObject(login, key, tmpl, 3, &copy));
        key = copy;
    }

    bench *b = calloc(1, sizeof(bench));
    b->decrypt = o.mech->decrypt;
    b->key = key;
    b->count = o.count;
    b->warmup = o.warmup;
    CK_RSA_PKCS_PSS_PARAMS pss = {CKM_SHA256, CKG_MGF1_SHA256, 32};
    CK_RSA_PKCS_OAEP_PARAMS oaep = {CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, NULL, 0};
    b->mech.mechanism = o.mech->mech;
    if (o.mech->pss) {
        b->mech.pParameter = &pss;
        b->mech.ulParameterLen = sizeof(pss);
    } else if (o.mech->oaep) {
        b->mech.pParameter = &oaep;
        b->mech.ulParameterLen = sizeof(oaep);
    }

    /* The input: a 32-byte message/digest, a SHA-256 DigestInfo, or (decrypt) one
     * OAEP ciphertext made with the public key and decrypted over and over. */
    static CK_BYTE input[BIG_BUF];
    static const CK_BYTE digest_info_prefix[19] = {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60,
                                                   0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                                                   0x01, 0x05, 0x00, 0x04, 0x20};
    CK_BYTE message[32];
    for (int i = 0; i < 32; i++)
        message[i] = (CK_BYTE)(i * 7 + 1);
    if (o.mech->decrypt) {
        CK_OBJECT_HANDLE pub = find_key(login, CKO_PUBLIC_KEY, o.key);
        CK_ULONG len = sizeof(input);
        CHECK(p11->C_EncryptInit(login, &b->mech, pub));
        CHECK(p11->C_Encrypt(login, message, sizeof(message), input, &len));
        b->input_len = len;
    } else if (o.mech->input == 1) {
        memcpy(input, digest_info_prefix, sizeof(digest_info_prefix));
        memcpy(input + sizeof(digest_info_prefix), message, sizeof(message));
        b->input_len = sizeof(digest_info_prefix) + sizeof(message);
    } else {
        memcpy(input, message, sizeof(message));
        b->input_len = sizeof(message);
    }
    b->input = input;

    /* Size the output once, like hsmbridge's engine: one operation with a big
     * buffer.  RSA decryption needs a modulus-sized buffer (SoftHSM2 checks that)
     * whatever the plaintext length, so decrypt uses the ciphertext length. */
    {
        static CK_BYTE out[BIG_BUF];
        CK_ULONG len = sizeof(out);
        CK_RV rv = one_op(b, login, out, &len);
        if (rv != CKR_OK)
            die("first %s with %s failed: %s (0x%lx)", o.op, o.mech->name, rv_name(rv),
                (unsigned long)rv);
        b->out_len = b->decrypt ? b->input_len : len;
    }

    worker *workers = calloc((size_t)o.threads, sizeof(worker));
    for (int i = 0; i < o.threads; i++) {
        workers[i].b = b;
        /* R/O sessions: the login above covers them. */
        CHECK(p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &workers[i].session));
    }
    atomic_init(&b->next, 0);
    atomic_init(&b->failed, 0);
    atomic_init(&b->first_rv, 0);
    pthread_barrier_init(&b->start, NULL, (unsigned)o.threads + 1);

    for (int i = 0; i < o.threads; i++)
        if (pthread_create(&workers[i].tid, NULL, worker_main, &workers[i]) != 0)
            die("pthread_create failed");
    pthread_barrier_wait(&b->start);
    double t0 = now();
    for (int i = 0; i < o.threads; i++)
        pthread_join(workers[i].tid, NULL);
    double seconds = now() - t0;

    if (atomic_load(&b->failed)) {
        CK_RV rv = (CK_RV)atomic_load(&b->first_rv);
        die("%s with %s failed: %s (0x%lx)", o.op, o.mech->name, rv_name(rv),
            (unsigned long)rv);
    }

    printf("{\"ops\": %ld, \"threads\": %d, \"seconds\": %.6f, \"ops_per_s\": %.1f, "
           "\"op\": \"%s\", \"mech\": \"%s\", \"session_copy\": %s, \"out_len\": %lu}\n",
           o.count, o.threads, seconds, (double)o.count / seconds, o.op, o.mech->name,
           o.session_copy ? "true" : "false", (unsigned long)b->out_len);
    fflush(stdout);

    for (int i = 0; i < o.threads; i++)
        p11->C_CloseSession(workers[i].session);
    if (copy != CK_INVALID_HANDLE)
        p11->C_DestroyObject(login, copy);
    p11->C_Logout(login);
    p11->C_CloseSession(login);
    p11->C_Finalize(NULL);
    pthread_barrier_destroy(&b->start);
    free(workers);
    free(b);
    return 0;
}
