/* DLPack ABI of csrc/include/sals/dlpack.h against the specification (LP64 layouts). */
#include <stddef.h>

#include "util.h"

int main(void) {
  CHECK(sizeof(DLDevice) == 8, "DLDevice %zu", sizeof(DLDevice));
  CHECK(offsetof(DLDevice, device_id) == 4, "DLDevice.device_id");
  CHECK(sizeof(DLDataType) == 4, "DLDataType %zu", sizeof(DLDataType));
  CHECK(offsetof(DLDataType, bits) == 1 && offsetof(DLDataType, lanes) == 2, "DLDataType fields");
  CHECK(sizeof(DLPackVersion) == 8 && offsetof(DLPackVersion, minor) == 4, "DLPackVersion");
  CHECK(kDLCPU == 1 && kDLCUDA == 2 && kDLCUDAHost == 3 && kDLCUDAManaged == 13, "device codes");
  CHECK(kDLInt == 0 && kDLUInt == 1 && kDLFloat == 2 && kDLBfloat == 4 && kDLBool == 6,
        "dtype codes");
  CHECK(DLPACK_FLAG_BITMASK_READ_ONLY == 1 && DLPACK_FLAG_BITMASK_IS_COPIED == 2, "flags");
  if (sizeof(void*) == 8) {
    CHECK(sizeof(DLTensor) == 48, "DLTensor %zu", sizeof(DLTensor));
    CHECK(offsetof(DLTensor, data) == 0, "data");
    CHECK(offsetof(DLTensor, device) == 8, "device");
    CHECK(offsetof(DLTensor, ndim) == 16, "ndim");
    CHECK(offsetof(DLTensor, dtype) == 20, "dtype");
    CHECK(offsetof(DLTensor, shape) == 24, "shape");
    CHECK(offsetof(DLTensor, strides) == 32, "strides");
    CHECK(offsetof(DLTensor, byte_offset) == 40, "byte_offset");
    CHECK(sizeof(DLManagedTensor) == 64, "DLManagedTensor %zu", sizeof(DLManagedTensor));
    CHECK(offsetof(DLManagedTensor, manager_ctx) == 48, "manager_ctx");
    CHECK(offsetof(DLManagedTensor, deleter) == 56, "deleter");
    CHECK(sizeof(DLManagedTensorVersioned) == 80, "DLManagedTensorVersioned %zu",
          sizeof(DLManagedTensorVersioned));
    CHECK(offsetof(DLManagedTensorVersioned, version) == 0, "version");
    CHECK(offsetof(DLManagedTensorVersioned, manager_ctx) == 8, "manager_ctx");
    CHECK(offsetof(DLManagedTensorVersioned, deleter) == 16, "deleter");
    CHECK(offsetof(DLManagedTensorVersioned, flags) == 24, "flags");
    CHECK(offsetof(DLManagedTensorVersioned, dl_tensor) == 32, "dl_tensor");
  }
  CHECK(DLPACK_MAJOR_VERSION == 1 && DLPACK_MINOR_VERSION == 3, "version macros");
  return finish();
}
