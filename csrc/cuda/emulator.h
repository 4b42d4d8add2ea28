// CPU SIMT emulator for the portable CUDA subset (portable.cuh includes this under a host compiler).
//
// A launch runs one host thread per CUDA thread of a block. The threads walk the grid's blocks in
// order together; each block gets fresh shared memory semantics because blocks run one at a time
// (static __shared__ arrays and the dynamic buffer are reused after an end-of-block barrier).
// __syncthreads is a std::barrier over the block, a warp exchange is a std::barrier over the warp
// around a slot array. Launches are serialized by a global mutex (emulated shared memory is
// per process). Launches the hardware would reject raise std::runtime_error.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace sa_emu {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDimZ = 64;
constexpr unsigned long long kMaxGridDimX = 2147483647ull;
constexpr unsigned kMaxGridDimYZ = 65535;
// The budget the kernels target: the opt-in maximum of an H100/H200 block (227 KiB).
constexpr size_t kMaxSharedBytes = 227 * 1024;

struct Block {
  explicit Block(unsigned threads) : sync(threads), slots(threads) {
    for (unsigned base = 0; base < threads; base += kWarpSize) {
      const unsigned width = threads - base < kWarpSize ? threads - base : kWarpSize;
      warps.push_back(std::make_unique<std::barrier<>>(width));
    }
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<unsigned long long> slots;  // one 8-byte exchange slot per thread
  std::vector<unsigned char> shared;      // dynamic shared memory
};

inline thread_local Block* current_block = nullptr;
inline thread_local unsigned linear_tid = 0;

inline unsigned char* dynamic_shared_memory() { return current_block->shared.data(); }

// Kernel launches since the process started: tests count the launches of one op call.
inline std::atomic<int64_t>& launch_counter() {
  static std::atomic<int64_t> count{0};
  return count;
}

inline int64_t launches() { return launch_counter().load(); }

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline void check_launch(const dim3& grid, const dim3& block, size_t smem_bytes) {
  auto fail = [](const std::string& what) {
    throw std::runtime_error("sa_cuda emulator: invalid launch: " + what);
  };
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0) fail("a block dimension is 0");
  if (threads > kMaxThreadsPerBlock || block.z > kMaxBlockDimZ) {
    fail("block of " + std::to_string(threads) + " threads (the limit is 1024, z <= 64)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("a grid dimension is 0");
  if (grid.x > kMaxGridDimX || grid.y > kMaxGridDimYZ || grid.z > kMaxGridDimYZ) {
    fail("grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
         std::to_string(grid.z) + ") exceeds (2^31 - 1, 65535, 65535)");
  }
  if (smem_bytes > kMaxSharedBytes) {
    fail(std::to_string(smem_bytes) + " bytes of dynamic shared memory (the budget is " +
         std::to_string(kMaxSharedBytes) + ")");
  }
}

// Runs body() once per CUDA thread of every block of the grid.
template <typename Body>
void launch(dim3 grid, dim3 block, size_t smem_bytes, const Body& body) {
  check_launch(grid, block, smem_bytes);
  ++launch_counter();
  std::lock_guard<std::mutex> lock(launch_mutex());
  const unsigned threads = block.x * block.y * block.z;
  Block state(threads);
  state.shared.resize(smem_bytes);
  auto run_thread = [&](unsigned tid) {
    current_block = &state;
    linear_tid = tid;
    blockDim = block;
    gridDim = grid;
    threadIdx = dim3(tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y));
    for (unsigned bz = 0; bz < grid.z; ++bz) {
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          blockIdx = dim3(bx, by, bz);
          body();
          state.sync.arrive_and_wait();  // the block is done before its shared memory is reused
        }
      }
    }
    current_block = nullptr;
  };
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned tid = 0; tid < threads; ++tid) pool.emplace_back(run_thread, tid);
  for (auto& t : pool) t.join();
}

// One warp-wide exchange: every lane publishes v, then reads lane src's value. A source lane
// outside the (possibly partial) warp yields the caller's own value, as on the hardware for
// __shfl_down_sync past the end.
template <typename T>
T warp_exchange(unsigned mask, T v, int src_lane) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of an 8-byte value at most");
  if (mask != 0xffffffffu) throw std::runtime_error("sa_cuda emulator: only full-mask shuffles are supported");
  Block& b = *current_block;
  const unsigned base = linear_tid - linear_tid % kWarpSize;
  const unsigned width = static_cast<unsigned>(b.slots.size()) - base < kWarpSize
                             ? static_cast<unsigned>(b.slots.size()) - base
                             : kWarpSize;
  std::barrier<>& warp = *b.warps[linear_tid / kWarpSize];
  std::memcpy(&b.slots[linear_tid], &v, sizeof(T));
  warp.arrive_and_wait();
  T out = v;
  if (src_lane >= 0 && static_cast<unsigned>(src_lane) < width) {
    std::memcpy(&out, &b.slots[base + src_lane], sizeof(T));
  }
  warp.arrive_and_wait();  // nobody overwrites a slot before every lane has read
  return out;
}

inline unsigned lane_id() { return linear_tid % kWarpSize; }

}  // namespace sa_emu

inline void __syncthreads() { sa_emu::current_block->sync.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = static_cast<int>(sa_emu::lane_id());
  const int src = (lane ^ lane_mask);
  return sa_emu::warp_exchange(mask, v, (src / width == lane / width) ? src : lane);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(sa_emu::lane_id());
  const int src = lane + static_cast<int>(delta);
  return sa_emu::warp_exchange(mask, v, (src / width == lane / width) ? src : lane);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = static_cast<int>(sa_emu::lane_id());
  return sa_emu::warp_exchange(mask, v, (lane / width) * width + src_lane % width);
}
