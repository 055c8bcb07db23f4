// Holds N MiB of memory on the (only visible) GPU until killed: stands in for whatever else
// occupies GPU 0 on a real rig (a display, another process) in the VRAM preflight proof of
// benchmarks/service_gpu.py --squeeze. Build: nvcc -O2 -o gpu_filler gpu_filler.cu
#include <cstdio>
#include <cstdlib>
#include <unistd.h>
#include <cuda_runtime.h>

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: gpu_filler MIB\n"); return 2; }
    size_t bytes = (size_t)atoll(argv[1]) << 20;
    void *p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e == cudaSuccess) e = cudaMemset(p, 0, bytes);
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e != cudaSuccess) { fprintf(stderr, "gpu_filler: %s\n", cudaGetErrorString(e)); return 1; }
    printf("held %s MiB\n", argv[1]);
    fflush(stdout);
    pause();
    return 0;
}
