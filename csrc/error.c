/* Thread-local last error, status strings and versions. */
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"

#if defined(_MSC_VER)
#define SALS_THREAD_LOCAL __declspec(thread)
#else
#define SALS_THREAD_LOCAL _Thread_local
#endif

/* Long enough for any message this library writes; vsnprintf truncates the rest. */
static SALS_THREAD_LOCAL char g_last_error[512];

sals_status_t sals_set_error(sals_status_t status, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_last_error, sizeof g_last_error, fmt, ap);
  va_end(ap);
  return status;
}

const char* sals_last_error(void) { return g_last_error; }

const char* sals_status_string(sals_status_t status) {
  switch (status) {
    case SALS_OK: return "SALS_OK";
    case SALS_ERR_INVALID_ARGUMENT: return "SALS_ERR_INVALID_ARGUMENT";
    case SALS_ERR_UNSUPPORTED: return "SALS_ERR_UNSUPPORTED";
    case SALS_ERR_OUT_OF_MEMORY: return "SALS_ERR_OUT_OF_MEMORY";
    case SALS_ERR_CAPACITY: return "SALS_ERR_CAPACITY";
    case SALS_ERR_NOT_FINITE: return "SALS_ERR_NOT_FINITE";
    case SALS_ERR_DEVICE: return "SALS_ERR_DEVICE";
  }
  return "SALS_ERR_UNKNOWN";
}

const char* sals_version(void) { return SALS_VERSION_STRING; }

int32_t sals_abi_version(void) { return SALS_ABI_VERSION; }

int32_t sals_cuda_available(void) {
#if defined(SALS_WITH_CUDA)
  return sals_cuda_device_usable();
#else
  return 0;
#endif
}
