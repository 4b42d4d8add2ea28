// CUDA build of the backward kernels (the source is shared with the emulation build).
#include "backward_launch.cuh"
