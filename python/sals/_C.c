/*
 * sals._C: the CPython binding of libsals (one abi3 module, Limited API 3.10: CMakeLists.txt
 * defines Py_LIMITED_API).
 *
 * Thin on purpose: it imports DLPack tensors, calls the C ABI with the GIL released, and turns
 * a failed status into the matching sals exception carrying sals_last_error(). Output
 * allocation, dtype and framework choices live in the Python layer (python/sals/).
 *
 * Tensor import, per argument:
 *   - if type(x).__dlpack_c_exchange_api__ exists (DLPack 1.3, torch >= 2.10): import through
 *     managed_tensor_from_py_object_no_sync (no stream synchronisation) and take the work
 *     stream from current_work_stream;
 *   - else x.__dlpack__(max_version=(1, 3)) (plus stream= for CUDA tensors), falling back to
 *     x.__dlpack__() for producers that predate max_version; both "dltensor_versioned" and
 *     "dltensor" capsules are accepted, renamed "used_..." and their deleter called when the
 *     call returns.
 * Outputs refuse READ_ONLY tensors. An imported DLTensor with ndim outside 0..64 or a NULL
 * shape is refused here (describe() and the Python layer read its shape); otherwise it is
 * passed through untouched (byte_offset and NULL strides are handled by libsals). A producer
 * that raises or returns garbage becomes a sals error naming the argument, chained to the
 * producer's exception.
 *
 * Stream: an explicit `stream` (an int holding a cudaStream_t; 0 = legacy default) wins;
 * otherwise the first tensor of the call decides: the exchange API's current work stream for
 * its device, or the legacy default stream for CUDA tensors of other producers, NULL on the CPU.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "sals/sals.h"

/* The exception factory, sals.errors._from_status(status, message) -> exception instance. */
static PyObject* g_from_status = NULL;
/* sals.errors.SalsError: exceptions of this class pass through unchanged. */
static PyObject* g_sals_error = NULL;

/* ------------------------------------------------------------------------------------------ */
/* Errors                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* Raise the sals exception for `status` with libsals's last error message. Returns NULL. */
static PyObject* raise_status(sals_status_t status) {
  const char* msg = sals_last_error();
  if (msg == NULL || msg[0] == '\0') msg = sals_status_string(status);
  PyObject* exc = PyObject_CallFunction(g_from_status, "is", (int)status, msg);
  if (exc == NULL) return NULL;
  PyErr_SetObject((PyObject*)Py_TYPE(exc), exc);
  Py_DECREF(exc);
  return NULL;
}

/*
 * Raise the sals exception for `status` with a printf-style message (PyUnicode_FromFormat).
 * An exception already set becomes its __cause__. Returns NULL.
 */
static PyObject* raise_sals(sals_status_t status, const char* fmt, ...) {
  PyObject *ct = NULL, *cv = NULL, *ctb = NULL;
  PyErr_Fetch(&ct, &cv, &ctb);
  va_list ap;
  va_start(ap, fmt);
  PyObject* msg = PyUnicode_FromFormatV(fmt, ap);
  va_end(ap);
  PyObject* exc = msg == NULL ? NULL : PyObject_CallFunction(g_from_status, "iO", (int)status, msg);
  Py_XDECREF(msg);
  if (exc == NULL) {
    Py_XDECREF(ct);
    Py_XDECREF(cv);
    Py_XDECREF(ctb);
    return NULL;
  }
  if (ct != NULL) {
    PyErr_NormalizeException(&ct, &cv, &ctb);
    if (ctb != NULL) PyException_SetTraceback(cv, ctb);
    PyException_SetCause(exc, cv); /* steals cv */
    Py_XDECREF(ct);
    Py_XDECREF(ctb);
  }
  PyErr_SetObject((PyObject*)Py_TYPE(exc), exc);
  Py_DECREF(exc);
  return NULL;
}

/*
 * A producer's method failed with the exception now set: re-raise it as a sals error naming
 * argument `name` ("x: __dlpack__() raised BufferError: ..."), chained to the original.
 * sals errors pass through, and so do exceptions that are not errors (KeyboardInterrupt,
 * SystemExit); a MemoryError becomes OutOfMemoryError. Returns NULL.
 */
static PyObject* reraise_as_sals(const char* name, const char* what) {
  if (!PyErr_ExceptionMatches(PyExc_Exception) || PyErr_ExceptionMatches(g_sals_error)) return NULL;
  PyObject *t, *v, *tb;
  PyErr_Fetch(&t, &v, &tb);
  PyErr_NormalizeException(&t, &v, &tb);
  PyObject* tname = t != NULL ? PyObject_GetAttrString(t, "__name__") : NULL;
  PyObject* text = v != NULL ? PyObject_Str(v) : NULL;
  const int oom = t != NULL && PyErr_GivenExceptionMatches(t, PyExc_MemoryError);
  PyErr_Clear();
  PyErr_Restore(t, v, tb); /* becomes the cause */
  raise_sals(oom ? SALS_ERR_OUT_OF_MEMORY : SALS_ERR_INVALID_ARGUMENT, "%s: %s raised %S: %S", name,
             what, tname != NULL ? tname : Py_None, text != NULL ? text : Py_None);
  Py_XDECREF(tname);
  Py_XDECREF(text);
  return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* DLPack import                                                                               */
/* ------------------------------------------------------------------------------------------ */

#define MAX_ARGS 12
/* The most dims an imported tensor may claim (numpy's limit); more is a broken producer. */
#define MAX_DLPACK_DIMS 64

/* One imported tensor: exactly one of `versioned` / `legacy` is set while it is held. */
typedef struct {
  DLManagedTensorVersioned* versioned;
  DLManagedTensor* legacy;
  PyObject* capsule; /* the consumed capsule (kept alive until the deleter ran), or NULL */
} held_t;

/* The tensors of one call and the stream they run on. */
typedef struct {
  held_t held[MAX_ARGS];
  int n_held;
  int stream_known;
  void* stream;
} call_t;

/* Release every imported tensor (the producers' deleters run here, GIL held). */
static void call_release(call_t* c) {
  for (int i = 0; i < c->n_held; ++i) {
    held_t* h = &c->held[i];
    if (h->versioned != NULL && h->versioned->deleter != NULL) h->versioned->deleter(h->versioned);
    if (h->legacy != NULL && h->legacy->deleter != NULL) h->legacy->deleter(h->legacy);
    Py_XDECREF(h->capsule);
  }
  c->n_held = 0;
}

/* The DLPack exchange table of type(obj), or NULL (no exception) when it has none we can use. */
static const DLPackExchangeAPI* exchange_api_of(PyObject* obj) {
  PyObject* cap = PyObject_GetAttrString((PyObject*)Py_TYPE(obj), "__dlpack_c_exchange_api__");
  if (cap == NULL) {
    PyErr_Clear();
    return NULL;
  }
  const DLPackExchangeAPI* api = NULL;
  if (PyCapsule_IsValid(cap, "dlpack_exchange_api")) {
    api = (const DLPackExchangeAPI*)PyCapsule_GetPointer(cap, "dlpack_exchange_api");
  }
  /* The table is static in the producer (lives for the process): dropping the capsule is safe. */
  Py_DECREF(cap);
  if (api == NULL || api->header.version.major != DLPACK_MAJOR_VERSION ||
      api->managed_tensor_from_py_object_no_sync == NULL || api->current_work_stream == NULL) {
    PyErr_Clear();
    return NULL;
  }
  return api;
}

/* obj.__dlpack_device__() -> (device_type, device_id). Returns 0 on success. */
static int dlpack_device_of(PyObject* obj, const char* name, int* type, int* id) {
  PyObject* dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
  if (dev == NULL) {
    reraise_as_sals(name, "__dlpack_device__()");
    return -1;
  }
  int ok = PyTuple_Check(dev) && PyArg_ParseTuple(dev, "ii", type, id);
  if (!ok) {
    PyErr_Clear();
    raise_sals(SALS_ERR_INVALID_ARGUMENT,
               "%s: __dlpack_device__() must return (device_type, device_id), got %R", name, dev);
  }
  Py_DECREF(dev);
  return ok ? 0 : -1;
}

/* Call obj.__dlpack__ with max_version (1, 3), retrying without it for old producers. */
static PyObject* call_dlpack(PyObject* obj, PyObject* stream_value) {
  PyObject* meth = PyObject_GetAttrString(obj, "__dlpack__");
  if (meth == NULL) return NULL;
  PyObject* args = PyTuple_New(0);
  PyObject* kw = PyDict_New();
  PyObject* capsule = NULL;
  if (args == NULL || kw == NULL) goto done;
  if (stream_value != NULL && PyDict_SetItemString(kw, "stream", stream_value) < 0) goto done;
  PyObject* version = Py_BuildValue("(ii)", DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION);
  if (version == NULL) goto done;
  int rc = PyDict_SetItemString(kw, "max_version", version);
  Py_DECREF(version);
  if (rc < 0) goto done;
  capsule = PyObject_Call(meth, args, kw);
  if (capsule == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
    /* A producer older than DLPack 1.0 does not know max_version. */
    PyErr_Clear();
    if (PyDict_DelItemString(kw, "max_version") < 0) goto done;
    capsule = PyObject_Call(meth, args, kw);
  }
done:
  Py_DECREF(meth);
  Py_XDECREF(args);
  Py_XDECREF(kw);
  return capsule;
}

/*
 * Import `obj` (argument `name`) for this call. `writable` refuses read-only tensors.
 * Returns the DLTensor (valid until call_release) or NULL with an exception set.
 */
/* A failed import (the exception is set): NULL as a DLTensor*. */
static DLTensor* no_tensor(PyObject* null) {
  (void)null;
  return NULL;
}

static DLTensor* call_import(call_t* c, PyObject* obj, const char* name, int writable) {
  if (c->n_held >= MAX_ARGS) {
    PyErr_SetString(PyExc_RuntimeError, "sals._C: too many tensor arguments");
    return NULL;
  }
  held_t* h = &c->held[c->n_held];
  const DLPackExchangeAPI* api = exchange_api_of(obj);
  if (api != NULL) {
    DLManagedTensorVersioned* mt = NULL;
    if (api->managed_tensor_from_py_object_no_sync((void*)obj, &mt) != 0 || mt == NULL) {
      if (PyErr_Occurred()) return no_tensor(reraise_as_sals(name, "the DLPack exchange API"));
      return no_tensor(
          raise_sals(SALS_ERR_INVALID_ARGUMENT, "%s: the producer could not export it", name));
    }
    h->versioned = mt;
    c->n_held++;
    if (!c->stream_known) {
      void* s = NULL;
      if (mt->dl_tensor.device.device_type != kDLCPU) {
        if (api->current_work_stream(mt->dl_tensor.device.device_type,
                                     mt->dl_tensor.device.device_id, &s) != 0) {
          if (PyErr_Occurred()) return no_tensor(reraise_as_sals(name, "current_work_stream"));
          return no_tensor(
              raise_sals(SALS_ERR_DEVICE, "%s: no current stream for its device", name));
        }
      }
      c->stream = s;
      c->stream_known = 1;
    }
  } else {
    if (!PyObject_HasAttrString(obj, "__dlpack__"))
      return no_tensor(
          raise_sals(SALS_ERR_INVALID_ARGUMENT,
                     "%s: expected a DLPack tensor (an object with __dlpack__), got %R", name,
                     (PyObject*)Py_TYPE(obj)));
    int dev_type = kDLCPU, dev_id = 0;
    if (dlpack_device_of(obj, name, &dev_type, &dev_id) < 0) return NULL;
    PyObject* stream_value = NULL;
    if (dev_type == kDLCUDA || dev_type == kDLROCM) {
      if (!c->stream_known) {
        c->stream = NULL;
        c->stream_known = 1;
      }
      /* DLPack: 1 names the legacy default stream, which NULL means to CUDA. */
      stream_value = c->stream == NULL ? PyLong_FromLong(1) : PyLong_FromVoidPtr(c->stream);
      if (stream_value == NULL) return NULL;
    }
    PyObject* capsule = call_dlpack(obj, stream_value);
    Py_XDECREF(stream_value);
    if (capsule == NULL) return no_tensor(reraise_as_sals(name, "__dlpack__()"));
    if (PyCapsule_IsValid(capsule, "dltensor_versioned")) {
      DLManagedTensorVersioned* mt =
          (DLManagedTensorVersioned*)PyCapsule_GetPointer(capsule, "dltensor_versioned");
      if (mt->version.major != DLPACK_MAJOR_VERSION) {
        /* Another major has another layout: only version may be read, and the deleter not
         * called through our struct; the capsule's destructor releases it. */
        raise_sals(SALS_ERR_UNSUPPORTED, "%s: DLPack major version %u is not supported (need %d)",
                   name, (unsigned)mt->version.major, DLPACK_MAJOR_VERSION);
        Py_DECREF(capsule);
        return NULL;
      }
      if (PyCapsule_SetName(capsule, "used_dltensor_versioned") < 0) {
        Py_DECREF(capsule);
        return NULL;
      }
      h->versioned = mt;
    } else if (PyCapsule_IsValid(capsule, "dltensor")) {
      DLManagedTensor* mt = (DLManagedTensor*)PyCapsule_GetPointer(capsule, "dltensor");
      if (PyCapsule_SetName(capsule, "used_dltensor") < 0) {
        Py_DECREF(capsule);
        return NULL;
      }
      h->legacy = mt;
    } else {
      raise_sals(SALS_ERR_INVALID_ARGUMENT,
                 "%s: __dlpack__() returned %R, not a \"dltensor\" or \"dltensor_versioned\" "
                 "capsule (already consumed?)",
                 name, (PyObject*)Py_TYPE(capsule));
      Py_DECREF(capsule);
      return NULL;
    }
    h->capsule = capsule;
    c->n_held++;
    if (!c->stream_known) c->stream_known = 1; /* a CPU tensor first: no stream */
  }
  if (writable && h->versioned != NULL && (h->versioned->flags & DLPACK_FLAG_BITMASK_READ_ONLY))
    return no_tensor(raise_sals(SALS_ERR_INVALID_ARGUMENT,
                                "%s: the tensor is read-only and cannot be written to", name));
  DLTensor* t = h->versioned != NULL ? &h->versioned->dl_tensor : &h->legacy->dl_tensor;
  /* What describe() and the Python layer read before libsals checks the rest. */
  if (t->ndim < 0 || t->ndim > MAX_DLPACK_DIMS)
    return no_tensor(raise_sals(SALS_ERR_INVALID_ARGUMENT,
                                "%s: the DLPack tensor has ndim %d (0..%d)", name, (int)t->ndim,
                                MAX_DLPACK_DIMS));
  if (t->ndim > 0 && t->shape == NULL)
    return no_tensor(raise_sals(SALS_ERR_INVALID_ARGUMENT,
                                "%s: the DLPack tensor has %d dims but a NULL shape", name,
                                (int)t->ndim));
  return t;
}

/* One tensor argument of a call: imported into *out. */
typedef struct {
  PyObject* obj;
  const char* name;
  int flags;
  DLTensor** out;
} arg_t;

enum {
  ARG_WRITE = 1,    /* an output: refuse read-only tensors */
  ARG_OPTIONAL = 2, /* None is allowed and gives NULL */
};

/*
 * Start a call: read its stream argument and import its tensors in order. Returns 0, or -1 with
 * an exception set and nothing held.
 */
static int call_begin(call_t* c, PyObject* stream_arg, const arg_t* args, int n) {
  memset(c, 0, sizeof(*c));
  if (stream_arg != NULL && stream_arg != Py_None) {
    c->stream = PyLong_Check(stream_arg) ? PyLong_AsVoidPtr(stream_arg) : NULL;
    if (!PyLong_Check(stream_arg) || (c->stream == NULL && PyErr_Occurred())) {
      PyErr_Clear();
      raise_sals(SALS_ERR_INVALID_ARGUMENT,
                 "stream: expected an int (a cudaStream_t) or None, "
                 "got %R",
                 stream_arg);
      return -1;
    }
    c->stream_known = 1;
  }
  for (int i = 0; i < n; ++i) {
    *args[i].out = NULL;
    if ((args[i].flags & ARG_OPTIONAL) && args[i].obj == Py_None) continue;
    *args[i].out = call_import(c, args[i].obj, args[i].name, args[i].flags & ARG_WRITE);
    if (*args[i].out == NULL) {
      call_release(c);
      return -1;
    }
  }
  return 0;
}

/* Finish a call: release its tensors; raise the sals exception of a failed status. 0 or -1. */
static int call_end(call_t* c, sals_status_t st) {
  call_release(c);
  if (st == SALS_OK) return 0;
  raise_status(st);
  return -1;
}

/* Run the sals call `expr` without the GIL, finish call `c`, and return None (or raise). */
#define CALL_RETURN_NONE(c, expr)             \
  do {                                        \
    sals_status_t st_;                        \
    Py_BEGIN_ALLOW_THREADS                    \
    st_ = (expr);                             \
    Py_END_ALLOW_THREADS                      \
    if (call_end(&(c), st_) < 0) return NULL; \
    Py_RETURN_NONE;                           \
  } while (0)

/* ------------------------------------------------------------------------------------------ */
/* RoPE and config conversion                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* rope: (inv_freq as float32 bytes, rotary_dim, attention_scaling, interleaved). The bytes
 * object must outlive the use of r->inv_freq (it is kept by the caller's argument tuple). */
static int parse_rope(PyObject* obj, sals_rope_t* r) {
  PyObject* freq = NULL;
  int rotary_dim = 0, interleaved = 0;
  float scaling = 1.0f;
  if (!PyTuple_Check(obj) ||
      !PyArg_ParseTuple(obj, "Oifi", &freq, &rotary_dim, &scaling, &interleaved) ||
      !PyBytes_Check(freq)) {
    PyErr_Clear();
    raise_sals(SALS_ERR_INVALID_ARGUMENT,
               "rope: expected (inv_freq bytes, rotary_dim, attention_scaling, interleaved)");
    return -1;
  }
  char* data = NULL;
  Py_ssize_t n = 0;
  if (PyBytes_AsStringAndSize(freq, &data, &n) < 0) return -1;
  if (n % (Py_ssize_t)sizeof(float) != 0 || (rotary_dim > 0 && n / 4 != rotary_dim / 2)) {
    raise_sals(SALS_ERR_INVALID_ARGUMENT,
               "rope: inv_freq holds %zd bytes, need rotary_dim / 2 = %d floats", n,
               rotary_dim / 2);
    return -1;
  }
  r->inv_freq = (const float*)data;
  r->rotary_dim = rotary_dim;
  r->attention_scaling = scaling;
  r->interleaved = interleaved;
  return 0;
}

static int dict_int(PyObject* d, const char* key, int32_t* out) {
  PyObject* v = PyDict_GetItemString(d, key); /* borrowed */
  if (v == NULL) {
    raise_sals(SALS_ERR_INVALID_ARGUMENT, "config: missing %s", key);
    return -1;
  }
  long x = PyLong_Check(v) ? PyLong_AsLong(v) : -1;
  if (!PyLong_Check(v) || (x == -1 && PyErr_Occurred()) || x < INT32_MIN || x > INT32_MAX) {
    PyErr_Clear();
    raise_sals(SALS_ERR_INVALID_ARGUMENT, "config.%s: %R is not an int32", key, v);
    return -1;
  }
  *out = (int32_t)x;
  return 0;
}

static int dict_float(PyObject* d, const char* key, float* out) {
  PyObject* v = PyDict_GetItemString(d, key);
  if (v == NULL) {
    raise_sals(SALS_ERR_INVALID_ARGUMENT, "config: missing %s", key);
    return -1;
  }
  double x = PyFloat_Check(v) ? PyFloat_AsDouble(v) : -1.0;
  if (!PyFloat_Check(v) || (x == -1.0 && PyErr_Occurred())) {
    PyErr_Clear();
    raise_sals(SALS_ERR_INVALID_ARGUMENT, "config.%s: %R is not a float", key, v);
    return -1;
  }
  *out = (float)x;
  return 0;
}

static int parse_config(PyObject* d, sals_config_t* cfg) {
  if (!PyDict_Check(d)) {
    raise_sals(SALS_ERR_INVALID_ARGUMENT, "config: expected a dict");
    return -1;
  }
  *cfg = sals_config_default();
  int32_t dtype = 0, dev_type = 0, dev_id = 0;
  if (dict_int(d, "n_head_q", &cfg->n_head_q) || dict_int(d, "n_head_kv", &cfg->n_head_kv) ||
      dict_int(d, "head_dim", &cfg->head_dim) || dict_int(d, "rank", &cfg->rank) ||
      dict_int(d, "score_rank", &cfg->score_rank) || dict_int(d, "value_bits", &cfg->value_bits) ||
      dict_int(d, "value_group", &cfg->value_group) || dict_int(d, "key_bits", &cfg->key_bits) ||
      dict_int(d, "key_group", &cfg->key_group) || dict_int(d, "n_sink", &cfg->n_sink) ||
      dict_int(d, "n_recent", &cfg->n_recent) || dict_float(d, "budget_frac", &cfg->budget_frac) ||
      dict_int(d, "budget_tokens", &cfg->budget_tokens) ||
      dict_int(d, "select_per_head", &cfg->select_per_head) || dict_int(d, "dense", &cfg->dense) ||
      dict_int(d, "max_batch", &cfg->max_batch) || dict_int(d, "max_tokens", &cfg->max_tokens) ||
      dict_int(d, "dtype", &dtype) || dict_float(d, "scale", &cfg->scale) ||
      dict_int(d, "check_finite", &cfg->check_finite) ||
      dict_int(d, "n_threads", &cfg->n_threads) || dict_int(d, "device_type", &dev_type) ||
      dict_int(d, "device_id", &dev_id))
    return -1;
  cfg->dtype = (sals_dtype_t)dtype;
  cfg->device.device_type = (DLDeviceType)dev_type;
  cfg->device.device_id = dev_id;
  return 0;
}

static PyObject* config_to_dict(const sals_config_t* c) {
  return Py_BuildValue(
      "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:d,s:i,s:i,s:i,s:i,s:i,s:i,s:d,s:i,s:i,s:i,"
      "s:i}",
      "n_head_q", c->n_head_q, "n_head_kv", c->n_head_kv, "head_dim", c->head_dim, "rank", c->rank,
      "score_rank", c->score_rank, "value_bits", c->value_bits, "value_group", c->value_group,
      "key_bits", c->key_bits, "key_group", c->key_group, "n_sink", c->n_sink, "n_recent",
      c->n_recent, "budget_frac", (double)c->budget_frac, "budget_tokens", c->budget_tokens,
      "select_per_head", c->select_per_head, "dense", c->dense, "max_batch", c->max_batch,
      "max_tokens", c->max_tokens, "dtype", (int)c->dtype, "scale", (double)c->scale,
      "check_finite", c->check_finite, "n_threads", c->n_threads, "device_type",
      (int)c->device.device_type, "device_id", c->device.device_id);
}

/* ------------------------------------------------------------------------------------------ */
/* sals._C.Cache                                                                               */
/* ------------------------------------------------------------------------------------------ */

/*
 * One cache, one thread at a time (README): a method holds `active` (under the GIL) from
 * before it imports its tensors until the library call returns, so a second thread's call,
 * or close() meanwhile (which would free the cache under the running call), is refused with
 * InvalidArgumentError instead of racing.
 */
typedef struct {
  PyObject_HEAD sals_cache_t* cache;
  const char* active; /* the method inside the cache now, or NULL */
} CacheObject;

/* The cache for method `method`, now held; NULL with InvalidArgumentError if closed or busy. */
static sals_cache_t* cache_enter(CacheObject* self, const char* method) {
  if (self->cache == NULL) {
    raise_sals(SALS_ERR_INVALID_ARGUMENT, "cache: is closed (%s() after close())", method);
    return NULL;
  }
  if (self->active != NULL) {
    raise_sals(SALS_ERR_INVALID_ARGUMENT,
               "cache: %s() called while %s() is using it (one cache may be used by one "
               "thread at a time)",
               method, self->active);
    return NULL;
  }
  self->active = method;
  return self->cache;
}

static void cache_leave(CacheObject* self) { self->active = NULL; }

/* Import a cache method's tensors; on failure the cache is released. 0 or -1. */
static int cache_call_begin(CacheObject* self, call_t* c, PyObject* stream_arg, const arg_t* args,
                            int n) {
  if (call_begin(c, stream_arg, args, n) == 0) return 0;
  cache_leave(self);
  return -1;
}

/* Run the cache call `expr` without the GIL, release the cache and return None (or raise). */
#define CACHE_CALL_RETURN_NONE(self, c, expr) \
  do {                                        \
    sals_status_t st_;                        \
    Py_BEGIN_ALLOW_THREADS                    \
    st_ = (expr);                             \
    Py_END_ALLOW_THREADS                      \
    cache_leave(self);                        \
    if (call_end(&(c), st_) < 0) return NULL; \
    Py_RETURN_NONE;                           \
  } while (0)

/* Cache(config: dict, rope: tuple, projection, stream=None) */
/* The object made by sals_cache_create or sals_paged_create (`paged`) from __init__'s arguments
 * (config: dict, rope: tuple, projection, stream=None), the projection imported for the call and
 * the GIL released while it runs; NULL with the exception set. */
static void* create_from_args(PyObject* args, PyObject* kwargs, int paged) {
  static char* kwlist[] = {"config", "rope", "projection", "stream", NULL};
  PyObject *cfg_obj, *rope_obj, *proj_obj, *stream_obj = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|O", kwlist, &cfg_obj, &rope_obj, &proj_obj,
                                   &stream_obj))
    return NULL;
  sals_config_t cfg;
  sals_rope_t rope;
  if (parse_config(cfg_obj, &cfg) < 0 || parse_rope(rope_obj, &rope) < 0) return NULL;
  call_t c;
  DLTensor* proj;
  const arg_t in[] = {{proj_obj, "projection", 0, &proj}};
  if (call_begin(&c, stream_obj, in, 1) < 0) return NULL;
  sals_cache_t* cache = NULL;
  sals_paged_t* pg = NULL;
  sals_status_t st;
  Py_BEGIN_ALLOW_THREADS
  st = paged ? sals_paged_create(&cfg, &rope, proj, &pg)
             : sals_cache_create(&cfg, &rope, proj, &cache);
  Py_END_ALLOW_THREADS
  if (call_end(&c, st) < 0) return NULL;
  return paged ? (void*)pg : (void*)cache;
}

static int Cache_init(CacheObject* self, PyObject* args, PyObject* kwargs) {
  if (self->active != NULL) {
    raise_sals(SALS_ERR_INVALID_ARGUMENT, "cache: __init__() called while %s() is using it",
               self->active);
    return -1;
  }
  sals_cache_t* cache = create_from_args(args, kwargs, 0);
  if (cache == NULL) return -1;
  if (self->active != NULL) { /* another thread entered while the projection was imported */
    sals_cache_destroy(cache);
    raise_sals(SALS_ERR_INVALID_ARGUMENT, "cache: __init__() called while %s() is using it",
               self->active);
    return -1;
  }
  sals_cache_destroy(self->cache); /* __init__ called twice */
  self->cache = cache;
  return 0;
}

static void Cache_dealloc(CacheObject* self) {
  sals_cache_destroy(self->cache);
  self->cache = NULL;
  PyTypeObject* tp = Py_TYPE(self);
  freefunc f = (freefunc)PyType_GetSlot(tp, Py_tp_free);
  f(self);
  Py_DECREF(tp);
}

/* append(k, v, pos, stream=None, *, first=0) */
static PyObject* Cache_append(CacheObject* self, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"k", "v", "pos", "stream", "first", NULL};
  PyObject *k_obj, *v_obj, *pos_obj, *stream_obj = Py_None;
  long long first = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|O$L", kwlist, &k_obj, &v_obj, &pos_obj,
                                   &stream_obj, &first))
    return NULL;
  sals_cache_t* cache = cache_enter(self, "append");
  if (cache == NULL) return NULL;
  call_t c;
  DLTensor *k, *v, *pos;
  const arg_t in[] = {{k_obj, "k", 0, &k}, {v_obj, "v", 0, &v}, {pos_obj, "positions", 0, &pos}};
  if (cache_call_begin(self, &c, stream_obj, in, 3) < 0) return NULL;
  CACHE_CALL_RETURN_NONE(self, c,
                         sals_cache_append_range(cache, (int64_t)first, k, v, pos, c.stream));
}

/* attend(q, pos, out, stream=None, *, first=0) */
static PyObject* Cache_attend(CacheObject* self, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"q", "pos", "out", "stream", "first", NULL};
  PyObject *q_obj, *pos_obj, *out_obj, *stream_obj = Py_None;
  long long first = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|O$L", kwlist, &q_obj, &pos_obj, &out_obj,
                                   &stream_obj, &first))
    return NULL;
  sals_cache_t* cache = cache_enter(self, "attend");
  if (cache == NULL) return NULL;
  call_t c;
  DLTensor *q, *pos, *out;
  const arg_t in[] = {
      {q_obj, "q", 0, &q}, {pos_obj, "positions", 0, &pos}, {out_obj, "out", ARG_WRITE, &out}};
  if (cache_call_begin(self, &c, stream_obj, in, 3) < 0) return NULL;
  CACHE_CALL_RETURN_NONE(self, c,
                         sals_cache_attend_range(cache, (int64_t)first, q, pos, out, c.stream));
}

/* lengths(out, stream=None) */
static PyObject* Cache_lengths(CacheObject* self, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"out", "stream", NULL};
  PyObject *out_obj, *stream_obj = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O", kwlist, &out_obj, &stream_obj)) return NULL;
  sals_cache_t* cache = cache_enter(self, "lengths");
  if (cache == NULL) return NULL;
  call_t c;
  DLTensor* out;
  const arg_t in[] = {{out_obj, "out", ARG_WRITE, &out}};
  if (cache_call_begin(self, &c, stream_obj, in, 1) < 0) return NULL;
  CACHE_CALL_RETURN_NONE(self, c, sals_cache_lengths(cache, out, c.stream));
}

/* selected(idx, count, stream=None) */
static PyObject* Cache_selected(CacheObject* self, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"idx", "count", "stream", NULL};
  PyObject *idx_obj, *count_obj, *stream_obj = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O", kwlist, &idx_obj, &count_obj, &stream_obj))
    return NULL;
  sals_cache_t* cache = cache_enter(self, "selected");
  if (cache == NULL) return NULL;
  call_t c;
  DLTensor *idx, *count;
  const arg_t in[] = {{idx_obj, "idx", ARG_WRITE, &idx}, {count_obj, "count", ARG_WRITE, &count}};
  if (cache_call_begin(self, &c, stream_obj, in, 2) < 0) return NULL;
  CACHE_CALL_RETURN_NONE(self, c, sals_cache_selected(cache, idx, count, c.stream));
}

/* memory(stream=None) -> dict of sals_memory_t fields */
static PyObject* Cache_memory(CacheObject* self, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"stream", NULL};
  PyObject* stream_obj = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O", kwlist, &stream_obj)) return NULL;
  sals_cache_t* cache = cache_enter(self, "memory");
  if (cache == NULL) return NULL;
  call_t c;
  if (cache_call_begin(self, &c, stream_obj, NULL, 0) < 0) return NULL;
  sals_memory_t m;
  sals_status_t st;
  Py_BEGIN_ALLOW_THREADS
  st = sals_cache_memory(cache, &m, c.stream);
  Py_END_ALLOW_THREADS
  cache_leave(self);
  if (call_end(&c, st) < 0) return NULL;
  return Py_BuildValue(
      "{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "latent_keys", (unsigned long long)m.latent_keys,
      "values", (unsigned long long)m.values, "value_scales", (unsigned long long)m.value_scales,
      "exact_window", (unsigned long long)m.exact_window, "positions",
      (unsigned long long)m.positions, "projection", (unsigned long long)m.projection, "total",
      (unsigned long long)m.total, "dense_fp16", (unsigned long long)m.dense_fp16, "allocated",
      (unsigned long long)m.allocated);
}

/* reset_range(first, batch, stream=None) */
static PyObject* Cache_reset_range(CacheObject* self, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"first", "batch", "stream", NULL};
  long long first, batch;
  PyObject* stream_obj = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LL|O", kwlist, &first, &batch, &stream_obj))
    return NULL;
  sals_cache_t* cache = cache_enter(self, "reset_range");
  if (cache == NULL) return NULL;
  call_t c;
  if (cache_call_begin(self, &c, stream_obj, NULL, 0) < 0) return NULL;
  CACHE_CALL_RETURN_NONE(self, c,
                         sals_cache_reset_range(cache, (int64_t)first, (int64_t)batch, c.stream));
}

/* reserve(batch, tokens) */
static PyObject* Cache_reserve(CacheObject* self, PyObject* args) {
  long long batch;
  int tokens;
  if (!PyArg_ParseTuple(args, "Li", &batch, &tokens)) return NULL;
  sals_cache_t* cache = cache_enter(self, "reserve");
  if (cache == NULL) return NULL;
  sals_status_t st = sals_cache_reserve(cache, (int64_t)batch, (int32_t)tokens);
  cache_leave(self);
  if (st != SALS_OK) return raise_status(st);
  Py_RETURN_NONE;
}

/* check(wait, stream=None) */
static PyObject* Cache_check(CacheObject* self, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"wait", "stream", NULL};
  int wait;
  PyObject* stream_obj = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "p|O", kwlist, &wait, &stream_obj)) return NULL;
  sals_cache_t* cache = cache_enter(self, "check");
  if (cache == NULL) return NULL;
  call_t c;
  if (cache_call_begin(self, &c, stream_obj, NULL, 0) < 0) return NULL;
  CACHE_CALL_RETURN_NONE(self, c, sals_cache_check(cache, (int32_t)wait, c.stream));
}

/* config() -> dict (the fields of sals_config_t as the library resolved them) */
static PyObject* Cache_config(CacheObject* self, PyObject* Py_UNUSED(ignored)) {
  sals_cache_t* cache = self->cache; /* the config never changes: no need to hold the cache */
  if (cache == NULL)
    return raise_sals(SALS_ERR_INVALID_ARGUMENT, "cache: is closed (config() after close())");
  sals_config_t cfg;
  sals_status_t st = sals_cache_get_config(cache, &cfg);
  if (st != SALS_OK) return raise_status(st);
  return config_to_dict(&cfg);
}

/* close(): free the cache now; later calls raise InvalidArgumentError (a ValueError).
 * Idempotent. Refused while another call is using the cache. */
static PyObject* Cache_close(CacheObject* self, PyObject* Py_UNUSED(ignored)) {
  if (self->active != NULL)
    return raise_sals(SALS_ERR_INVALID_ARGUMENT,
                      "cache: close() called while %s() is using it; close it after that call "
                      "returns (one cache may be used by one thread at a time)",
                      self->active);
  sals_cache_t* cache = self->cache;
  self->cache = NULL;
  Py_BEGIN_ALLOW_THREADS
  sals_cache_destroy(cache);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject* Cache_get_closed(CacheObject* self, void* Py_UNUSED(closure)) {
  return PyBool_FromLong(self->cache == NULL);
}

static PyMethodDef Cache_methods[] = {
    {"append", (PyCFunction)(void (*)(void))Cache_append, METH_VARARGS | METH_KEYWORDS,
     "append(k, v, pos, stream=None, *, first=0): sals_cache_append_range."},
    {"attend", (PyCFunction)(void (*)(void))Cache_attend, METH_VARARGS | METH_KEYWORDS,
     "attend(q, pos, out, stream=None, *, first=0): sals_cache_attend_range into out."},
    {"lengths", (PyCFunction)(void (*)(void))Cache_lengths, METH_VARARGS | METH_KEYWORDS,
     "lengths(out, stream=None): sals_cache_lengths."},
    {"selected", (PyCFunction)(void (*)(void))Cache_selected, METH_VARARGS | METH_KEYWORDS,
     "selected(idx, count, stream=None): sals_cache_selected."},
    {"memory", (PyCFunction)(void (*)(void))Cache_memory, METH_VARARGS | METH_KEYWORDS,
     "memory(stream=None) -> dict: sals_cache_memory."},
    {"reset_range", (PyCFunction)(void (*)(void))Cache_reset_range, METH_VARARGS | METH_KEYWORDS,
     "reset_range(first, batch, stream=None): sals_cache_reset_range."},
    {"reserve", (PyCFunction)Cache_reserve, METH_VARARGS,
     "reserve(batch, tokens): sals_cache_reserve."},
    {"check", (PyCFunction)(void (*)(void))Cache_check, METH_VARARGS | METH_KEYWORDS,
     "check(wait, stream=None): sals_cache_check."},
    {"config", (PyCFunction)Cache_config, METH_NOARGS, "config() -> dict: sals_cache_get_config."},
    {"close", (PyCFunction)Cache_close, METH_NOARGS,
     "close(): sals_cache_destroy; idempotent; refused while a call is using the cache."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Cache_getset[] = {
    {"closed", (getter)Cache_get_closed, NULL, "True after close().", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Cache_slots[] = {
    {Py_tp_doc, "Cache(config: dict, rope: tuple, projection, stream=None): one sals_cache_t."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, Cache_init},
    {Py_tp_dealloc, Cache_dealloc},
    {Py_tp_methods, Cache_methods},
    {Py_tp_getset, Cache_getset},
    {0, NULL},
};

static PyType_Spec Cache_spec = {
    "sals._C.Cache", sizeof(CacheObject), 0, Py_TPFLAGS_DEFAULT, Cache_slots,
};

/* ------------------------------------------------------------------------------------------ */
/* sals._C.Paged                                                                               */
/* ------------------------------------------------------------------------------------------ */

/* One sals_paged_t. Its settings never change and hold no tokens, so calls need no guard: any
 * number of threads may use one object at once (sals.h). */
typedef struct {
  PyObject_HEAD sals_paged_t* paged;
} PagedObject;

/* Paged(config: dict, rope: tuple, projection, stream=None) */
static int Paged_init(PagedObject* self, PyObject* args, PyObject* kwargs) {
  if (self->paged != NULL) {
    /* Other threads may be inside calls of the settings this would free. */
    raise_sals(SALS_ERR_INVALID_ARGUMENT, "paged: __init__() called twice");
    return -1;
  }
  sals_paged_t* paged = create_from_args(args, kwargs, 1);
  if (paged == NULL) return -1;
  if (self->paged != NULL) { /* another thread initialised it while the projection was read */
    sals_paged_destroy(paged);
    raise_sals(SALS_ERR_INVALID_ARGUMENT, "paged: __init__() called twice");
    return -1;
  }
  self->paged = paged;
  return 0;
}

static void Paged_dealloc(PagedObject* self) {
  sals_paged_destroy(self->paged);
  self->paged = NULL;
  PyTypeObject* tp = Py_TYPE(self);
  freefunc f = (freefunc)PyType_GetSlot(tp, Py_tp_free);
  f(self);
  Py_DECREF(tp);
}

static sals_paged_t* paged_of(PagedObject* self) {
  if (self->paged == NULL)
    raise_sals(SALS_ERR_INVALID_ARGUMENT, "paged: not initialised (__init__ failed)");
  return self->paged;
}

/* append(k, v, slot_mapping, pages, window_rows=None, window=None, stream=None) */
static PyObject* Paged_append(PagedObject* self, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"k",           "v",      "slot_mapping", "pages",
                           "window_rows", "window", "stream",       NULL};
  PyObject *k_obj, *v_obj, *s_obj, *p_obj, *r_obj = Py_None, *w_obj = Py_None,
                                           *stream_obj = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|OOO", kwlist, &k_obj, &v_obj, &s_obj, &p_obj,
                                   &r_obj, &w_obj, &stream_obj))
    return NULL;
  sals_paged_t* paged = paged_of(self);
  if (paged == NULL) return NULL;
  call_t c;
  DLTensor *k, *v, *slots, *pages, *rows, *window;
  const arg_t in[] = {{k_obj, "k", 0, &k},
                      {v_obj, "v", 0, &v},
                      {s_obj, "slot_mapping", 0, &slots},
                      {p_obj, "pages", ARG_WRITE, &pages},
                      {r_obj, "window_rows", ARG_OPTIONAL, &rows},
                      {w_obj, "window", ARG_WRITE | ARG_OPTIONAL, &window}};
  if (call_begin(&c, stream_obj, in, 6) < 0) return NULL;
  CALL_RETURN_NONE(c, sals_paged_append(paged, k, v, slots, pages, rows, window, c.stream));
}

/* attend(q, query_start, seq_lens, block_table, pages, out, window_rows=None, window=None,
 *        selected=None, stream=None) */
static PyObject* Paged_attend(PagedObject* self, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"q",           "query_start", "seq_lens", "block_table", "pages", "out",
                           "window_rows", "window",      "selected", "stream",      NULL};
  PyObject *q_obj, *qs_obj, *l_obj, *t_obj, *p_obj, *o_obj,
      *r_obj = Py_None, *w_obj = Py_None, *sel_obj = Py_None, *stream_obj = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO|OOOO", kwlist, &q_obj, &qs_obj, &l_obj,
                                   &t_obj, &p_obj, &o_obj, &r_obj, &w_obj, &sel_obj, &stream_obj))
    return NULL;
  sals_paged_t* paged = paged_of(self);
  if (paged == NULL) return NULL;
  call_t c;
  DLTensor *q, *qs, *lens, *table, *pages, *out, *rows, *window, *sel;
  const arg_t in[] = {{q_obj, "q", 0, &q},
                      {qs_obj, "query_start", 0, &qs},
                      {l_obj, "seq_lens", 0, &lens},
                      {t_obj, "block_table", 0, &table},
                      {p_obj, "pages", 0, &pages},
                      {o_obj, "out", ARG_WRITE, &out},
                      {r_obj, "window_rows", ARG_OPTIONAL, &rows},
                      {w_obj, "window", ARG_OPTIONAL, &window},
                      {sel_obj, "selected", ARG_WRITE | ARG_OPTIONAL, &sel}};
  if (call_begin(&c, stream_obj, in, 9) < 0) return NULL;
  CALL_RETURN_NONE(
      c, sals_paged_attend(paged, q, qs, lens, table, pages, rows, window, out, sel, c.stream));
}

/* check(wait, stream=None) */
static PyObject* Paged_check(PagedObject* self, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"wait", "stream", NULL};
  int wait;
  PyObject* stream_obj = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "p|O", kwlist, &wait, &stream_obj)) return NULL;
  sals_paged_t* paged = paged_of(self);
  if (paged == NULL) return NULL;
  call_t c;
  if (call_begin(&c, stream_obj, NULL, 0) < 0) return NULL;
  CALL_RETURN_NONE(c, sals_paged_check(paged, (int32_t)wait, c.stream));
}

static PyMethodDef Paged_methods[] = {
    {"append", (PyCFunction)(void (*)(void))Paged_append, METH_VARARGS | METH_KEYWORDS,
     "append(k, v, slot_mapping, pages, window_rows=None, window=None, stream=None): "
     "sals_paged_append."},
    {"attend", (PyCFunction)(void (*)(void))Paged_attend, METH_VARARGS | METH_KEYWORDS,
     "attend(q, query_start, seq_lens, block_table, pages, out, window_rows=None, window=None, "
     "selected=None, stream=None): sals_paged_attend."},
    {"check", (PyCFunction)(void (*)(void))Paged_check, METH_VARARGS | METH_KEYWORDS,
     "check(wait, stream=None): sals_paged_check."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Paged_slots[] = {
    {Py_tp_doc, "Paged(config: dict, rope: tuple, projection, stream=None): one sals_paged_t."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, Paged_init},
    {Py_tp_dealloc, Paged_dealloc},
    {Py_tp_methods, Paged_methods},
    {0, NULL},
};

static PyType_Spec Paged_spec = {
    "sals._C.Paged", sizeof(PagedObject), 0, Py_TPFLAGS_DEFAULT, Paged_slots,
};

/* ------------------------------------------------------------------------------------------ */
/* sals._C.Array: CPU memory owned by the extension, exported through DLPack                    */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
  PyObject_HEAD void* data;
  int32_t ndim;
  int64_t shape[8];
  DLDataType dtype;
  size_t nbytes;
  const char* dtype_name;
} ArrayObject;

typedef struct {
  const char* name;
  DLDataType dtype;
} dtype_entry_t;

static const dtype_entry_t k_dtypes[] = {
    {"float32", {kDLFloat, 32, 1}},   {"float16", {kDLFloat, 16, 1}},
    {"bfloat16", {kDLBfloat, 16, 1}}, {"int32", {kDLInt, 32, 1}},
    {"int64", {kDLInt, 64, 1}},       {"uint8", {kDLUInt, 8, 1}},
    {"float64", {kDLFloat, 64, 1}},
};

static const char* dtype_name(DLDataType t) {
  for (size_t i = 0; i < sizeof(k_dtypes) / sizeof(k_dtypes[0]); ++i) {
    if (k_dtypes[i].dtype.code == t.code && k_dtypes[i].dtype.bits == t.bits &&
        k_dtypes[i].dtype.lanes == t.lanes)
      return k_dtypes[i].name;
  }
  return NULL;
}

/* Array(shape: tuple of ints, dtype: str): zero-filled, C-contiguous. */
static int Array_init(ArrayObject* self, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"shape", "dtype", NULL};
  PyObject* shape_obj;
  const char* name;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Os", kwlist, &shape_obj, &name)) return -1;
  const dtype_entry_t* e = NULL;
  for (size_t i = 0; i < sizeof(k_dtypes) / sizeof(k_dtypes[0]); ++i)
    if (strcmp(k_dtypes[i].name, name) == 0) e = &k_dtypes[i];
  if (e == NULL) {
    PyErr_Format(PyExc_ValueError, "dtype: unknown dtype '%s'", name);
    return -1;
  }
  PyObject* seq = PySequence_Tuple(shape_obj);
  if (seq == NULL) return -1;
  Py_ssize_t nd = PyTuple_Size(seq);
  if (nd > 8) {
    Py_DECREF(seq);
    PyErr_SetString(PyExc_ValueError, "shape: at most 8 dims");
    return -1;
  }
  size_t count = 1;
  for (Py_ssize_t i = 0; i < nd; ++i) {
    long long n = PyLong_AsLongLong(PyTuple_GetItem(seq, i));
    if (n == -1 && PyErr_Occurred()) {
      Py_DECREF(seq);
      return -1;
    }
    if (n < 0) {
      Py_DECREF(seq);
      PyErr_Format(PyExc_ValueError, "shape: negative extent %lld", n);
      return -1;
    }
    self->shape[i] = n;
    count *= (size_t)n;
  }
  Py_DECREF(seq);
  size_t nbytes = count * (e->dtype.bits / 8);
  void* data = calloc(nbytes > 0 ? nbytes : 1, 1);
  if (data == NULL) {
    PyErr_NoMemory();
    return -1;
  }
  free(self->data);
  self->data = data;
  self->ndim = (int32_t)nd;
  self->dtype = e->dtype;
  self->dtype_name = e->name;
  self->nbytes = nbytes;
  return 0;
}

static void Array_dealloc(ArrayObject* self) {
  free(self->data);
  PyTypeObject* tp = Py_TYPE(self);
  freefunc f = (freefunc)PyType_GetSlot(tp, Py_tp_free);
  f(self);
  Py_DECREF(tp);
}

/* The exported tensor owns a reference to the Array; the deleter drops it on any thread. */
typedef struct {
  DLManagedTensorVersioned versioned;
  DLManagedTensor legacy;
  int64_t shape[8];
} export_t;

static void export_release(PyObject* owner, export_t* ex) {
  PyGILState_STATE g = PyGILState_Ensure();
  Py_DECREF(owner);
  PyGILState_Release(g);
  free(ex);
}

static void deleter_versioned(DLManagedTensorVersioned* self) {
  export_t* ex = (export_t*)((char*)self - offsetof(export_t, versioned));
  export_release((PyObject*)self->manager_ctx, ex);
}

static void deleter_legacy(DLManagedTensor* self) {
  export_t* ex = (export_t*)((char*)self - offsetof(export_t, legacy));
  export_release((PyObject*)self->manager_ctx, ex);
}

/* Capsule destructors: free only a capsule nobody consumed (it still has its original name). */
static void capsule_versioned_destructor(PyObject* cap) {
  if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
    DLManagedTensorVersioned* mt = PyCapsule_GetPointer(cap, "dltensor_versioned");
    mt->deleter(mt);
  }
}

static void capsule_legacy_destructor(PyObject* cap) {
  if (PyCapsule_IsValid(cap, "dltensor")) {
    DLManagedTensor* mt = PyCapsule_GetPointer(cap, "dltensor");
    mt->deleter(mt);
  }
}

/* __dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None) */
static PyObject* Array_dlpack(ArrayObject* self, PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"stream", "max_version", "dl_device", "copy", NULL};
  PyObject *stream = Py_None, *max_version = Py_None, *dl_device = Py_None, *copy = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOOO", kwlist, &stream, &max_version,
                                   &dl_device, &copy))
    return NULL;
  if (stream != Py_None) {
    PyErr_SetString(PyExc_BufferError, "sals._C.Array is CPU memory: stream must be None");
    return NULL;
  }
  if (dl_device != Py_None) {
    int t = 0, id = 0;
    if (!PyArg_ParseTuple(dl_device, "ii", &t, &id)) return NULL;
    if (t != kDLCPU) {
      PyErr_SetString(PyExc_BufferError, "sals._C.Array can only be exported to the CPU");
      return NULL;
    }
  }
  if (copy == Py_True) {
    PyErr_SetString(PyExc_BufferError, "sals._C.Array does not export copies (copy=True)");
    return NULL;
  }
  int versioned = 0;
  if (max_version != Py_None) {
    int major = 0, minor = 0;
    if (!PyArg_ParseTuple(max_version, "ii", &major, &minor)) return NULL;
    versioned = major >= 1;
  }
  export_t* ex = (export_t*)calloc(1, sizeof(export_t));
  if (ex == NULL) return PyErr_NoMemory();
  memcpy(ex->shape, self->shape, sizeof(ex->shape));
  DLTensor t;
  memset(&t, 0, sizeof(t));
  t.data = self->data;
  t.device.device_type = kDLCPU;
  t.device.device_id = 0;
  t.ndim = self->ndim;
  t.dtype = self->dtype;
  t.shape = ex->shape;
  t.strides = NULL; /* compact row-major */
  t.byte_offset = 0;
  Py_INCREF(self);
  PyObject* cap;
  if (versioned) {
    ex->versioned.version.major = DLPACK_MAJOR_VERSION;
    ex->versioned.version.minor = DLPACK_MINOR_VERSION;
    ex->versioned.manager_ctx = self;
    ex->versioned.deleter = deleter_versioned;
    ex->versioned.flags = 0;
    ex->versioned.dl_tensor = t;
    cap = PyCapsule_New(&ex->versioned, "dltensor_versioned", capsule_versioned_destructor);
  } else {
    ex->legacy.dl_tensor = t;
    ex->legacy.manager_ctx = self;
    ex->legacy.deleter = deleter_legacy;
    cap = PyCapsule_New(&ex->legacy, "dltensor", capsule_legacy_destructor);
  }
  if (cap == NULL) {
    Py_DECREF(self);
    free(ex);
  }
  return cap;
}

static PyObject* Array_dlpack_device(ArrayObject* Py_UNUSED(self), PyObject* Py_UNUSED(ignored)) {
  return Py_BuildValue("(ii)", (int)kDLCPU, 0);
}

static PyObject* Array_get_shape(ArrayObject* self, void* Py_UNUSED(closure)) {
  PyObject* t = PyTuple_New(self->ndim);
  if (t == NULL) return NULL;
  for (int i = 0; i < self->ndim; ++i) {
    PyObject* n = PyLong_FromLongLong(self->shape[i]);
    if (n == NULL) {
      Py_DECREF(t);
      return NULL;
    }
    PyTuple_SetItem(t, i, n);
  }
  return t;
}

static PyObject* Array_get_dtype(ArrayObject* self, void* Py_UNUSED(closure)) {
  return PyUnicode_FromString(self->dtype_name);
}

static PyObject* Array_get_nbytes(ArrayObject* self, void* Py_UNUSED(closure)) {
  return PyLong_FromSize_t(self->nbytes);
}

static PyObject* Array_repr(ArrayObject* self) {
  PyObject* shape = Array_get_shape(self, NULL);
  if (shape == NULL) return NULL;
  PyObject* r =
      PyUnicode_FromFormat("sals._C.Array(shape=%R, dtype='%s')", shape, self->dtype_name);
  Py_DECREF(shape);
  return r;
}

static PyMethodDef Array_methods[] = {
    {"__dlpack__", (PyCFunction)(void (*)(void))Array_dlpack, METH_VARARGS | METH_KEYWORDS,
     "__dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None) -> capsule"},
    {"__dlpack_device__", (PyCFunction)Array_dlpack_device, METH_NOARGS,
     "__dlpack_device__() -> (1, 0): host memory"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Array_getset[] = {
    {"shape", (getter)Array_get_shape, NULL, "tuple of extents", NULL},
    {"dtype", (getter)Array_get_dtype, NULL, "dtype name ('float32', 'bfloat16', ...)", NULL},
    {"nbytes", (getter)Array_get_nbytes, NULL, "bytes of data", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Array_slots[] = {
    {Py_tp_doc,
     "Array(shape, dtype): zero-filled C-contiguous host memory owned by sals, exported through "
     "DLPack (numpy.from_dlpack / torch.from_dlpack view it without a copy)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, Array_init},
    {Py_tp_dealloc, Array_dealloc},
    {Py_tp_methods, Array_methods},
    {Py_tp_getset, Array_getset},
    {Py_tp_repr, Array_repr},
    {0, NULL},
};

static PyType_Spec Array_spec = {
    "sals._C.Array", sizeof(ArrayObject), 0, Py_TPFLAGS_DEFAULT, Array_slots,
};

/* ------------------------------------------------------------------------------------------ */
/* Module functions                                                                            */
/* ------------------------------------------------------------------------------------------ */

/* describe(x, name="x") -> (device_type, device_id, dtype name or None, shape tuple, read_only);
 * errors name the argument `name`. */
static PyObject* mod_describe(PyObject* Py_UNUSED(m), PyObject* args) {
  PyObject* obj;
  const char* name = "x";
  if (!PyArg_ParseTuple(args, "O|s", &obj, &name)) return NULL;
  call_t c;
  DLTensor* t;
  const arg_t in[] = {{obj, name, 0, &t}};
  if (call_begin(&c, Py_None, in, 1) < 0) return NULL;
  PyObject* shape = PyTuple_New(t->ndim);
  if (shape != NULL) {
    for (int i = 0; i < t->ndim; ++i) PyTuple_SetItem(shape, i, PyLong_FromLongLong(t->shape[i]));
  }
  const char* dtype = dtype_name(t->dtype);
  int read_only = c.held[0].versioned != NULL &&
                  (c.held[0].versioned->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
  PyObject* r = shape == NULL ? NULL
                              : Py_BuildValue("(iizOi)", (int)t->device.device_type,
                                              t->device.device_id, dtype, shape, read_only);
  Py_XDECREF(shape);
  call_release(&c);
  return r;
}

static PyObject* mod_project(PyObject* Py_UNUSED(m), PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"x", "proj", "out", "stream", NULL};
  PyObject *x_o, *p_o, *out_o, *stream_obj = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|O", kwlist, &x_o, &p_o, &out_o, &stream_obj))
    return NULL;
  call_t c;
  DLTensor *x, *p, *out;
  const arg_t in[] = {{x_o, "x", 0, &x}, {p_o, "proj", 0, &p}, {out_o, "out", ARG_WRITE, &out}};
  if (call_begin(&c, stream_obj, in, 3) < 0) return NULL;
  CALL_RETURN_NONE(c, sals_project(x, p, out, c.stream));
}

static PyObject* mod_rope_apply(PyObject* Py_UNUSED(m), PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"x", "pos", "rope", "out", "stream", NULL};
  PyObject *x_o, *pos_o, *rope_o, *out_o, *stream_obj = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|O", kwlist, &x_o, &pos_o, &rope_o, &out_o,
                                   &stream_obj))
    return NULL;
  sals_rope_t rope;
  if (parse_rope(rope_o, &rope) < 0) return NULL;
  call_t c;
  DLTensor *x, *pos, *out;
  const arg_t in[] = {{x_o, "x", 0, &x}, {pos_o, "pos", 0, &pos}, {out_o, "out", ARG_WRITE, &out}};
  if (call_begin(&c, stream_obj, in, 3) < 0) return NULL;
  CALL_RETURN_NONE(c, sals_rope_apply(x, pos, &rope, out, c.stream));
}

static PyObject* mod_score_select(PyObject* Py_UNUSED(m), PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"q_lat",    "k_lat",  "lengths", "score_rank", "n_sink",
                           "n_recent", "budget", "out",     "stream",     NULL};
  PyObject *q_o, *k_o, *len_o, *out_o, *stream_obj = Py_None;
  int score_rank, n_sink, n_recent, budget;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOiiiiO|O", kwlist, &q_o, &k_o, &len_o,
                                   &score_rank, &n_sink, &n_recent, &budget, &out_o, &stream_obj))
    return NULL;
  call_t c;
  DLTensor *q, *k, *len, *out;
  const arg_t in[] = {{q_o, "q_lat", 0, &q},
                      {k_o, "k_lat", 0, &k},
                      {len_o, "lengths", ARG_OPTIONAL, &len},
                      {out_o, "out", ARG_WRITE, &out}};
  if (call_begin(&c, stream_obj, in, 4) < 0) return NULL;
  CALL_RETURN_NONE(
      c, sals_score_select(q, k, len, score_rank, n_sink, n_recent, budget, out, c.stream));
}

static PyObject* mod_rebuild_rope(PyObject* Py_UNUSED(m), PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"k_lat", "proj", "pos", "rope", "out", "stream", NULL};
  PyObject *k_o, *p_o, *pos_o, *rope_o, *out_o, *stream_obj = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|O", kwlist, &k_o, &p_o, &pos_o, &rope_o,
                                   &out_o, &stream_obj))
    return NULL;
  sals_rope_t rope;
  if (parse_rope(rope_o, &rope) < 0) return NULL;
  call_t c;
  DLTensor *k, *p, *pos, *out;
  const arg_t in[] = {{k_o, "k_lat", 0, &k},
                      {p_o, "proj", 0, &p},
                      {pos_o, "pos", 0, &pos},
                      {out_o, "out", ARG_WRITE, &out}};
  if (call_begin(&c, stream_obj, in, 4) < 0) return NULL;
  CALL_RETURN_NONE(c, sals_rebuild_rope(k, p, pos, &rope, out, c.stream));
}

static PyObject* mod_sparse_attention(PyObject* Py_UNUSED(m), PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"q", "k", "v", "idx", "lengths", "scale", "out", "stream", NULL};
  PyObject *q_o, *k_o, *v_o, *idx_o, *len_o, *out_o, *stream_obj = Py_None;
  float scale;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOfO|O", kwlist, &q_o, &k_o, &v_o, &idx_o,
                                   &len_o, &scale, &out_o, &stream_obj))
    return NULL;
  call_t c;
  DLTensor *q, *k, *v, *idx, *len, *out;
  const arg_t in[] = {{q_o, "q", 0, &q},
                      {k_o, "k", 0, &k},
                      {v_o, "v", 0, &v},
                      {idx_o, "idx", ARG_OPTIONAL, &idx},
                      {len_o, "lengths", ARG_OPTIONAL, &len},
                      {out_o, "out", ARG_WRITE, &out}};
  if (call_begin(&c, stream_obj, in, 6) < 0) return NULL;
  CALL_RETURN_NONE(c, sals_sparse_attention(q, k, v, idx, len, scale, out, c.stream));
}

static PyObject* mod_quantize_values(PyObject* Py_UNUSED(m), PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"v", "bits", "group", "packed", "scale", "zero", "stream", NULL};
  PyObject *v_o, *pk_o, *sc_o, *z_o, *stream_obj = Py_None;
  int bits, group;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiiOOO|O", kwlist, &v_o, &bits, &group, &pk_o,
                                   &sc_o, &z_o, &stream_obj))
    return NULL;
  call_t c;
  DLTensor *v, *pk, *sc, *z;
  const arg_t in[] = {{v_o, "v", 0, &v},
                      {pk_o, "packed", ARG_WRITE, &pk},
                      {sc_o, "scale", ARG_WRITE, &sc},
                      {z_o, "zero", ARG_WRITE, &z}};
  if (call_begin(&c, stream_obj, in, 4) < 0) return NULL;
  CALL_RETURN_NONE(c, sals_quantize_values(v, bits, group, pk, sc, z, c.stream));
}

static PyObject* mod_dequantize_values(PyObject* Py_UNUSED(m), PyObject* args, PyObject* kwargs) {
  static char* kwlist[] = {"packed", "scale", "zero", "bits", "group", "out", "stream", NULL};
  PyObject *pk_o, *sc_o, *z_o, *out_o, *stream_obj = Py_None;
  int bits, group;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOiiO|O", kwlist, &pk_o, &sc_o, &z_o, &bits,
                                   &group, &out_o, &stream_obj))
    return NULL;
  call_t c;
  DLTensor *pk, *sc, *z, *out;
  const arg_t in[] = {{pk_o, "packed", 0, &pk},
                      {sc_o, "scale", 0, &sc},
                      {z_o, "zero", 0, &z},
                      {out_o, "out", ARG_WRITE, &out}};
  if (call_begin(&c, stream_obj, in, 4) < 0) return NULL;
  CALL_RETURN_NONE(c, sals_dequantize_values(pk, sc, z, bits, group, out, c.stream));
}

/* paged_slot_bytes(config: dict) -> int */
static PyObject* mod_paged_slot_bytes(PyObject* Py_UNUSED(m), PyObject* cfg_obj) {
  sals_config_t cfg;
  if (parse_config(cfg_obj, &cfg) < 0) return NULL;
  int64_t bytes = 0;
  sals_status_t st = sals_paged_slot_bytes(&cfg, &bytes);
  if (st != SALS_OK) return raise_status(st);
  return PyLong_FromLongLong((long long)bytes);
}

static PyObject* mod_version(PyObject* Py_UNUSED(m), PyObject* Py_UNUSED(ignored)) {
  return PyUnicode_FromString(sals_version());
}

static PyObject* mod_abi_version(PyObject* Py_UNUSED(m), PyObject* Py_UNUSED(ignored)) {
  return PyLong_FromLong(sals_abi_version());
}

static PyObject* mod_cuda_available(PyObject* Py_UNUSED(m), PyObject* Py_UNUSED(ignored)) {
  int32_t r;
  Py_BEGIN_ALLOW_THREADS
  r = sals_cuda_available();
  Py_END_ALLOW_THREADS
  return PyBool_FromLong(r);
}

static PyObject* mod_config_check(PyObject* Py_UNUSED(m), PyObject* cfg_obj) {
  sals_config_t cfg;
  if (parse_config(cfg_obj, &cfg) < 0) return NULL;
  const sals_status_t st = sals_config_check(&cfg);
  if (st != SALS_OK) return raise_status(st);
  Py_RETURN_NONE;
}

#define KW(f) (PyCFunction)(void (*)(void))(f), METH_VARARGS | METH_KEYWORDS
static PyMethodDef module_methods[] = {
    {"version", mod_version, METH_NOARGS, "version() -> str: sals_version()."},
    {"abi_version", mod_abi_version, METH_NOARGS, "abi_version() -> int: sals_abi_version()."},
    {"cuda_available", mod_cuda_available, METH_NOARGS,
     "cuda_available() -> bool: sals_cuda_available()."},
    {"config_check", mod_config_check, METH_O,
     "config_check(config: dict): sals_config_check (the checks of Cache() on the config)."},
    {"describe", mod_describe, METH_VARARGS,
     "describe(x, name='x') -> (device_type, device_id, dtype name or None, shape, read_only)."},
    {"paged_slot_bytes", mod_paged_slot_bytes, METH_O,
     "paged_slot_bytes(config: dict) -> int: sals_paged_slot_bytes."},
    {"project", KW(mod_project), "project(x, proj, out, stream=None): sals_project."},
    {"rope_apply", KW(mod_rope_apply), "rope_apply(x, pos, rope, out, stream=None)."},
    {"score_select", KW(mod_score_select),
     "score_select(q_lat, k_lat, lengths, score_rank, n_sink, n_recent, budget, out, "
     "stream=None)."},
    {"rebuild_rope", KW(mod_rebuild_rope),
     "rebuild_rope(k_lat, proj, pos, rope, out, stream=None)."},
    {"sparse_attention", KW(mod_sparse_attention),
     "sparse_attention(q, k, v, idx, lengths, scale, out, stream=None)."},
    {"quantize_values", KW(mod_quantize_values),
     "quantize_values(v, bits, group, packed, scale, zero, stream=None)."},
    {"dequantize_values", KW(mod_dequantize_values),
     "dequantize_values(packed, scale, zero, bits, group, out, stream=None)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "sals._C",
    "CPython binding of libsals (the sals C ABI). Use the `sals` package instead.",
    -1,
    module_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__C(void) {
  if (sals_abi_version() != SALS_ABI_VERSION) {
    PyErr_Format(PyExc_ImportError,
                 "sals._C was built for libsals ABI %d but the loaded libsals has ABI %d "
                 "(version %s): reinstall sals so that both come from one build",
                 SALS_ABI_VERSION, (int)sals_abi_version(), sals_version());
    return NULL;
  }
  PyObject* errors = PyImport_ImportModule("sals.errors");
  if (errors == NULL) return NULL;
  g_from_status = PyObject_GetAttrString(errors, "_from_status");
  g_sals_error = PyObject_GetAttrString(errors, "SalsError");
  Py_DECREF(errors);
  if (g_from_status == NULL || g_sals_error == NULL) return NULL;

  PyObject* m = PyModule_Create(&module_def);
  if (m == NULL) return NULL;
  PyObject* array_type = NULL;
  PyObject* cache_type = PyType_FromSpec(&Cache_spec);
  if (cache_type == NULL || PyModule_AddObjectRef(m, "Cache", cache_type) < 0) goto fail;
  Py_DECREF(cache_type);
  cache_type = NULL;
  PyObject* paged_type = PyType_FromSpec(&Paged_spec);
  if (paged_type == NULL || PyModule_AddObjectRef(m, "Paged", paged_type) < 0) {
    Py_XDECREF(paged_type);
    goto fail;
  }
  Py_DECREF(paged_type);
  array_type = PyType_FromSpec(&Array_spec);
  if (array_type == NULL || PyModule_AddObjectRef(m, "Array", array_type) < 0) goto fail;
  Py_DECREF(array_type);
  array_type = NULL;
  if (PyModule_AddIntConstant(m, "ABI_VERSION", SALS_ABI_VERSION) < 0) goto fail;
  return m;
fail:
  Py_XDECREF(cache_type);
  Py_XDECREF(array_type);
  Py_DECREF(m);
  return NULL;
}
