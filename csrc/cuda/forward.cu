// CUDA build of the forward kernels (the source is shared with the emulation build).
#include "forward_launch.cuh"
