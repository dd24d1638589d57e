/*
 * DLPack ABI, version 1.3, declared from the DLPack specification
 * (https://dmlc.github.io/dlpack/latest/c_api.html).
 *
 * The include guard and every name are the official ones, so a translation
 * unit that also includes the upstream <dlpack/dlpack.h> sees one definition:
 * whichever header comes first wins, and both describe the same layout.
 * tests/c/test_dlpack_abi.c checks sizes and offsets against the specification.
 */
#ifndef DLPACK_DLPACK_H_
#define DLPACK_DLPACK_H_

#include <stddef.h>
#include <stdint.h>

/** Major version: bumped when the layout of a struct changes. */
#define DLPACK_MAJOR_VERSION 1
/** Minor version: bumped when fields or enum values are only added. */
#define DLPACK_MINOR_VERSION 3

#ifdef __cplusplus
extern "C" {
#endif

/** The version of a DLManagedTensorVersioned. */
typedef struct {
  uint32_t major; /**< layout changes bump this; consumers reject an unknown major */
  uint32_t minor; /**< additions only */
} DLPackVersion;

/** Kind of device that holds the memory. Values are fixed by the specification. */
typedef enum {
  kDLCPU = 1,          /**< host memory */
  kDLCUDA = 2,         /**< CUDA device memory */
  kDLCUDAHost = 3,     /**< pinned host memory (cudaMallocHost) */
  kDLOpenCL = 4,
  kDLVulkan = 7,
  kDLMetal = 8,
  kDLVPI = 9,
  kDLROCM = 10,
  kDLROCMHost = 11,
  kDLExtDev = 12,
  kDLCUDAManaged = 13, /**< CUDA unified memory (cudaMallocManaged) */
  kDLOneAPI = 14,
  kDLWebGPU = 15,
  kDLHexagon = 16,
  kDLMAIA = 17,
  kDLTrn = 18,
} DLDeviceType;

/** A device: its kind and its ordinal among devices of that kind. */
typedef struct {
  DLDeviceType device_type; /**< stored as a 32-bit int */
  int32_t device_id;        /**< 0 for the host */
} DLDevice;

/** Type codes of DLDataType. */
typedef enum {
  kDLInt = 0U,
  kDLUInt = 1U,
  kDLFloat = 2U,
  kDLOpaqueHandle = 3U,
  kDLBfloat = 4U,
  kDLComplex = 5U,
  kDLBool = 6U,
  kDLFloat8_e3m4 = 7U,
  kDLFloat8_e4m3 = 8U,
  kDLFloat8_e4m3b11fnuz = 9U,
  kDLFloat8_e4m3fn = 10U,
  kDLFloat8_e4m3fnuz = 11U,
  kDLFloat8_e5m2 = 12U,
  kDLFloat8_e5m2fnuz = 13U,
  kDLFloat8_e8m0fnu = 14U,
  kDLFloat6_e2m3fn = 15U,
  kDLFloat6_e3m2fn = 16U,
  kDLFloat4_e2m1fn = 17U,
} DLDataTypeCode;

/** Element type: fp16 is {kDLFloat, 16, 1}, bf16 {kDLBfloat, 16, 1}, int32 {kDLInt, 32, 1}. */
typedef struct {
  uint8_t code;   /**< a DLDataTypeCode */
  uint8_t bits;   /**< bits of one lane */
  uint16_t lanes; /**< vector lanes; 1 for scalars */
} DLDataType;

/** A strided view of memory. Does not manage memory. */
typedef struct {
  /** Start of the allocation; the first element is at (char*)data + byte_offset. */
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  /** ndim extents. */
  int64_t* shape;
  /** ndim strides in elements (not bytes); NULL means compact row-major. */
  int64_t* strides;
  uint64_t byte_offset;
} DLTensor;

/** A DLTensor with an owner (DLPack < 1.0 exchange, capsule name "dltensor"). */
typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  /** The producer's context; the consumer does not touch it. */
  void* manager_ctx;
  /** Called once by the consumer when done; may be NULL; may run on any thread. */
  void (*deleter)(struct DLManagedTensor* self);
} DLManagedTensor;

/** The tensor may not be written through (DLManagedTensorVersioned.flags). */
#define DLPACK_FLAG_BITMASK_READ_ONLY (1UL << 0UL)
/** The producer copied the data; the consumer may own it exclusively. */
#define DLPACK_FLAG_BITMASK_IS_COPIED (1UL << 1UL)
/** Sub-byte dtypes are padded to whole bytes. */
#define DLPACK_FLAG_BITMASK_IS_SUBBYTE_TYPE_PADDED (1UL << 2UL)

/** A versioned, owned tensor (DLPack >= 1.0, capsule name "dltensor_versioned"). */
typedef struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensorVersioned* self);
  /** Bit mask of DLPACK_FLAG_BITMASK_*. */
  uint64_t flags;
  DLTensor dl_tensor;
} DLManagedTensorVersioned;

/* ---- DLPack 1.3 C exchange API (`type(x).__dlpack_c_exchange_api__`) ----------------------- */
/*
 * A framework publishes one static DLPackExchangeAPI, as a PyCapsule named
 * "dlpack_exchange_api" on its tensor *type*. Consumers use it to import tensors without
 * stream synchronisation and to ask for the framework's current work stream. Every function
 * returns 0 on success and -1 with a Python exception set (the GIL must be held), except
 * DLPackManagedTensorAllocator, which reports through SetError.
 */

/** Allocate a tensor in the producer framework shaped like `prototype` (dtype, ndim, shape,
 * device). */
typedef int (*DLPackManagedTensorAllocator)(DLTensor* prototype, DLManagedTensorVersioned** out,
                                            void* error_ctx,
                                            void (*SetError)(void* error_ctx, const char* kind,
                                                             const char* message));

/** Export `py_object` (a PyObject* of the publishing type) as an owned tensor; no stream sync. */
typedef int (*DLPackManagedTensorFromPyObjectNoSync)(void* py_object,
                                                     DLManagedTensorVersioned** out);

/** Fill `out` with a view of `py_object`, valid only until control returns to the producer. */
typedef int (*DLPackDLTensorFromPyObjectNoSync)(void* py_object, DLTensor* out);

/** The framework's current work stream on a device (a cudaStream_t for CUDA; NULL on the CPU). */
typedef int (*DLPackCurrentWorkStream)(DLDeviceType device_type, int32_t device_id,
                                       void** out_current_stream);

/** Wrap an owned tensor as a Python object of the framework (ownership is stolen); no sync. */
typedef int (*DLPackManagedTensorToPyObjectNoSync)(DLManagedTensorVersioned* tensor,
                                                   void** out_py_object);

/** The part of the table that stays stable across versions. */
typedef struct DLPackExchangeAPIHeader {
  /** Check `version.major` before touching any other field. */
  DLPackVersion version;
  /** An older table in the chain, or NULL. */
  struct DLPackExchangeAPIHeader* prev_api;
} DLPackExchangeAPIHeader;

/** The exchange table (DLPack 1.3). Lives for the whole process; never freed by consumers. */
typedef struct DLPackExchangeAPI {
  DLPackExchangeAPIHeader header;
  DLPackManagedTensorAllocator managed_tensor_allocator;                       /**< not NULL */
  DLPackManagedTensorFromPyObjectNoSync managed_tensor_from_py_object_no_sync; /**< not NULL */
  DLPackManagedTensorToPyObjectNoSync managed_tensor_to_py_object_no_sync;     /**< not NULL */
  DLPackDLTensorFromPyObjectNoSync dltensor_from_py_object_no_sync;            /**< may be NULL */
  DLPackCurrentWorkStream current_work_stream;                                 /**< not NULL */
} DLPackExchangeAPI;

#ifdef __cplusplus
}
#endif
#endif /* DLPACK_DLPACK_H_ */
