// FEDTREELORA_HD marks math that runs on both sides: __host__ __device__ under nvcc, nothing in g++.
#pragma once

#if defined(__CUDACC__)
#define FEDTREELORA_HD __host__ __device__
#else
#define FEDTREELORA_HD
#endif
