// CPU SIMT emulator for the portable CUDA subset (portable.cuh includes this under a host
// compiler).
//
// A launch runs the CUDA threads of a block as fibers on the launching host thread
// (emulator_fibers.h); they run the grid's blocks together, one block at a time. __syncthreads is a
// barrier over the block, a warp exchange is a barrier over the warp around a slot array. Launches
// are serialized by a global mutex.
// Checks cost no per-access instrumentation: a memset per block, a scan of the arrivals per
// barrier.
//
// Besides running the kernels, the emulator checks what the hardware leaves undefined or silent,
// so that such a bug fails in CI instead of on a GPU (each check has a planted-bug test,
// tests/emulator/test_emulator.py):
// - Shared memory is per block and poisoned (0xFF bytes: NaN as float or double, -1 as an integer)
//   before each block runs: the dynamic buffer and every SA_SHARED_ARRAY, which gets storage of its
//   own per launch, keyed by its declaration site. A read before any thread wrote shows up as NaN.
// - Blocks run in a pseudo-random order, a permutation of the grid drawn from a seed: the
//   environment variable SA_EMU_SEED (an integer) or a fixed default, so a run is reproducible. A
//   kernel whose block reads what another block of the same launch wrote gives wrong results.
// - Barriers are checked: every thread records where it waits (the call site of __syncthreads or
//   of a shuffle, or the end of the block), and the barrier's completion step, run once all
//   threads arrived, compares them. Threads of one block at different barriers (a __syncthreads in
//   divergent code, or a thread that returned while others still synchronize) raise an error
//   naming the sites and the threads; never a hang. A warp that returns early is fine when nobody
//   syncs afterwards. A thread at a block barrier also arrives (without waiting) at its warp's
//   barrier, so a shuffle that only some lanes reach completes too, and is reported.
// - Launches the hardware would reject raise std::runtime_error: block and grid sizes, dynamic
//   shared memory over the budget, static shared memory over 48 KiB.
// - An exception thrown in a kernel thread (say, an emulator check) ends the launch: the thread
//   leaves the block's barriers, the other threads stop at their next __syncthreads or block end,
//   and launch() throws.
// Every error message names the block and the block-order seed.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <source_location>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "emulator_fibers.h"

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
// Statically declared shared memory (SA_SHARED_ARRAY) is limited to 48 KiB per block.
constexpr size_t kMaxStaticSharedBytes = 48 * 1024;
constexpr unsigned char kSharedPoison = 0xFF;
constexpr uint64_t kDefaultBlockOrderSeed = 0x5A5EED;

inline std::string to_string(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// SA_EMU_SEED, or the default: the block order is reproducible run to run.
inline uint64_t block_order_seed() {
  const char* text = std::getenv("SA_EMU_SEED");
  if (text == nullptr || *text == '\0') return kDefaultBlockOrderSeed;
  char* end = nullptr;
  const uint64_t seed = std::strtoull(text, &end, 0);
  if (*end != '\0')
    throw std::runtime_error(std::string("sa_cuda emulator: SA_EMU_SEED=") + text +
                             " is not an integer");
  return seed;
}

// A pseudo-random permutation of [0, n) without storage (grids reach 2^31 - 1 blocks): a keyed
// bijection of the smallest power-of-two range holding n (rounds of multiply by an odd key, xor
// shift, add a key), cycle-walked until it lands below n (under two steps on average).
class BlockOrder {
 public:
  BlockOrder(uint64_t n, uint64_t seed) : n_(n) {
    while ((uint64_t(1) << bits_) < n) ++bits_;
    mask_ = (uint64_t(1) << bits_) - 1;
    uint64_t state = seed ^ (n * 0xD1B54A32D192ED03ull);
    for (Round& r : rounds_) {
      r.mul = splitmix64(state) | 1;
      r.add = splitmix64(state);
    }
  }
  uint64_t operator()(uint64_t ordinal) const {
    uint64_t x = ordinal;
    do {
      for (const Round& r : rounds_) {
        x = (x * r.mul) & mask_;
        x ^= x >> (bits_ / 2 + 1);
        x = (x + r.add) & mask_;
      }
    } while (x >= n_);
    return x;
  }

 private:
  struct Round {
    uint64_t mul, add;
  };
  uint64_t n_, mask_ = 0;
  unsigned bits_ = 0;
  Round rounds_[3];
};

// Thrown in the threads of a launch that an error ends (caught by launch()).
struct Abort {};

// Where a thread waits: at a barrier of the block, or at a warp shuffle.
struct Arrival {
  enum Kind : unsigned char { kSyncthreads, kBlockBoundary, kShuffle } kind;
  std::source_location where;  // of the __syncthreads or the shuffle

  bool same_barrier(const Arrival& o) const {
    if (kind != o.kind) return false;
    if (kind == kBlockBoundary) return true;
    return where.line() == o.where.line() && where.column() == o.where.column() &&
           (where.file_name() == o.where.file_name() ||
            std::strcmp(where.file_name(), o.where.file_name()) == 0);
  }
  std::string describe() const {
    if (kind == kBlockBoundary) return "returned from the kernel";
    return std::string(kind == kSyncthreads ? "wait at __syncthreads() at "
                                            : "wait at a warp shuffle at ") +
           where.file_name() + ":" + std::to_string(where.line()) + ":" +
           std::to_string(where.column());
  }
};

struct AlignedFree {
  void operator()(unsigned char* p) const { ::operator delete(p, std::align_val_t(16)); }
};
using SharedBytes = std::unique_ptr<unsigned char, AlignedFree>;

// An exactly sized 16-byte aligned allocation (so AddressSanitizer sees any overrun).
inline SharedBytes allocate_shared(size_t bytes) {
  return SharedBytes(
      static_cast<unsigned char*>(::operator new(bytes > 0 ? bytes : 1, std::align_val_t(16))));
}

// The state of one launch: the block its threads run, its shared memory, its barriers.
class Block {
 public:
  Block(dim3 grid, dim3 block, size_t dynamic_bytes, uint64_t seed)
      : grid_(grid),
        threads_(block.x * block.y * block.z),
        seed_(seed),
        blocks_(uint64_t(grid.x) * grid.y * grid.z),
        order_(blocks_, seed),
        sync_(threads_, Completion{this}),
        arrivals_(threads_),
        slots_(threads_),
        dynamic_(allocate_shared(dynamic_bytes)),
        dynamic_bytes_(dynamic_bytes) {
    for (unsigned base = 0; base < threads_; base += kWarpSize) {
      warps_.push_back(std::make_unique<FiberBarrier<WarpCompletion>>(
          std::min(kWarpSize, threads_ - base), WarpCompletion{this, base}));
    }
  }

  unsigned threads() const { return threads_; }
  unsigned char* dynamic_shared() const { return dynamic_.get(); }

  // A barrier of the block for thread tid; throws Abort when the launch has failed. At a block
  // boundary the completion step moves every thread to the next block (finished() once done).
  // The thread also arrives (without waiting) at its warp's barrier: a lane still waiting at a
  // shuffle there is then released, and the warp's completion step reports the divergence.
  void arrive(unsigned tid, Arrival arrival) {
    arrivals_[tid] = arrival;
    warps_[tid / kWarpSize]->arrive();
    sync_.arrive_and_wait();
    if (failed()) throw Abort{};
  }
  bool finished() const { return finished_; }
  dim3 current() const { return current_; }

  // One warp-wide exchange (warp_exchange): every lane publishes v, then reads lane src's value
  // (its own value for a lane outside the warp).
  unsigned long long exchange(unsigned tid, unsigned long long v, int src_lane,
                              std::source_location where) {
    const unsigned base = tid - tid % kWarpSize, width = std::min(kWarpSize, threads_ - base);
    FiberBarrier<WarpCompletion>& warp = *warps_[tid / kWarpSize];
    arrivals_[tid] = {Arrival::kShuffle, where};
    slots_[tid] = v;
    warp.arrive_and_wait();
    if (failed()) throw Abort{};
    const unsigned long long out =
        src_lane >= 0 && static_cast<unsigned>(src_lane) < width ? slots_[base + src_lane] : v;
    warp.arrive_and_wait();  // nobody overwrites a slot before every lane has read
    if (failed()) throw Abort{};
    return out;
  }

  // Thread tid ends early, the launch having failed (what: the exception it threw, if any): it
  // leaves the barriers so that the other threads are not left waiting for it.
  void leave(unsigned tid, const char* what) {
    if (what != nullptr)
      fail("thread " + std::to_string(tid) + " of block " + to_string(current_) +
           " threw: " + what);
    warps_[tid / kWarpSize]->arrive_and_drop();
    sync_.arrive_and_drop();
  }

  bool failed() const { return failed_.load(std::memory_order_acquire); }
  std::string error() const {
    return error_ + " [emulated launch of grid " + to_string(grid_) + ", block order seed " +
           std::to_string(seed_) + ": SA_EMU_SEED=" + std::to_string(seed_) + " reproduces it]";
  }

  // The storage of the SA_SHARED_ARRAY declared at `site` (bytes long), created (poisoned) by the
  // first thread that reaches the declaration in this launch and poisoned again at each block
  // start.
  unsigned char* static_shared(const void* site, size_t bytes) {
    // The count is atomic for ThreadSanitizer only (the fibers run on one host thread): its
    // release and acquire order the array's creation before the other CUDA threads' use.
    const unsigned count = static_count_.load(std::memory_order_acquire);
    for (unsigned i = 0; i < count; ++i) {
      if (statics_[i].site == site) return statics_[i].bytes.get();
    }
    size_t total = bytes;
    for (unsigned i = 0; i < count; ++i) total += statics_[i].size;
    if (count == kMaxStaticArrays) {
      throw std::runtime_error("sa_cuda emulator: more than " + std::to_string(kMaxStaticArrays) +
                               " SA_SHARED_ARRAYs in a kernel");
    }
    if (total > kMaxStaticSharedBytes) {
      throw std::runtime_error(
          "sa_cuda emulator: " + std::to_string(total) +
          " bytes of static shared memory (SA_SHARED_ARRAY) in a block; the limit is " +
          std::to_string(kMaxStaticSharedBytes));
    }
    if (total + dynamic_bytes_ > kMaxSharedBytes) {
      throw std::runtime_error("sa_cuda emulator: " + std::to_string(total) +
                               " bytes of static and " + std::to_string(dynamic_bytes_) +
                               " of dynamic shared memory in a block; the budget is " +
                               std::to_string(kMaxSharedBytes));
    }
    StaticArray& a = statics_[count];
    a.site = site;
    a.size = bytes;
    a.bytes = allocate_shared(bytes);
    std::memset(a.bytes.get(), kSharedPoison, bytes);
    static_count_.store(count + 1, std::memory_order_release);
    return a.bytes.get();
  }

 private:
  static constexpr unsigned kMaxStaticArrays = 16;
  struct StaticArray {
    const void* site = nullptr;
    size_t size = 0;
    SharedBytes bytes;
  };
  struct Completion {
    Block* self;
    void operator()() noexcept { self->on_barrier(); }
  };
  struct WarpCompletion {
    Block* self;
    unsigned base;  // the warp's first thread
    void operator()() noexcept { self->on_warp_barrier(base); }
  };

  void fail(const std::string& what) {
    if (failed()) return;
    error_ = "sa_cuda emulator: " + what;
    failed_.store(true, std::memory_order_release);
  }

  // Run by the last thread to arrive, before any is released.
  void on_barrier() noexcept {
    if (failed()) return;
    const Arrival& first = arrivals_[0];
    for (const Arrival& a : arrivals_) {
      if (a.same_barrier(first)) continue;
      fail(
          "the threads of block " + to_string(current_) +
          " reached different barriers (its barrier #" + std::to_string(barriers_in_block_ + 1) +
          "): " + describe_arrivals(0, threads_) +
          ". Every thread of a block must reach the same __syncthreads() (on the GPU, a barrier in "
          "divergent code hangs or corrupts shared memory).");
      return;
    }
    if (first.kind != Arrival::kBlockBoundary) {
      ++barriers_in_block_;
      return;
    }
    if (next_ordinal_ == blocks_) {
      finished_ = true;
      return;
    }
    const uint64_t linear = order_(next_ordinal_++);
    current_ = dim3(unsigned(linear % grid_.x), unsigned(linear / grid_.x % grid_.y),
                    unsigned(linear / (uint64_t(grid_.x) * grid_.y)));
    barriers_in_block_ = 0;
    std::memset(dynamic_.get(), kSharedPoison, dynamic_bytes_);
    for (unsigned i = 0; i < static_count_.load(std::memory_order_relaxed); ++i)
      std::memset(statics_[i].bytes.get(), kSharedPoison, statics_[i].size);
  }

  // Run by the last lane of the warp to arrive. Lanes at a shuffle and lanes at a barrier of the
  // block (or past the kernel's end) in one phase: the shuffle lacks lanes (undefined on the GPU).
  void on_warp_barrier(unsigned base) noexcept {
    if (failed()) return;
    const unsigned end = std::min(base + kWarpSize, threads_);
    unsigned shuffling = 0;
    for (unsigned tid = base; tid < end; ++tid)
      shuffling += arrivals_[tid].kind == Arrival::kShuffle;
    if (shuffling == 0 || shuffling == end - base) return;
    fail("the lanes of warp " + std::to_string(base / kWarpSize) + " of block " +
         to_string(current_) + " diverged at a shuffle: " + describe_arrivals(base, end) +
         ". Every lane of the warp must take part in a full-mask shuffle (on the GPU, a shuffle "
         "that "
         "names an absent lane is undefined).");
  }

  // "threads 0-31 wait at ...; threads 32-63 returned from the kernel" (runs of equal arrivals).
  std::string describe_arrivals(unsigned begin, unsigned end) const {
    std::string out;
    unsigned runs = 0, start = begin;
    for (unsigned tid = begin + 1; tid <= end; ++tid) {
      if (tid < end && arrivals_[tid].same_barrier(arrivals_[start])) continue;
      if (++runs > 8) {
        out += "; ...";
        break;
      }
      if (!out.empty()) out += "; ";
      out +=
          (tid - start == 1 ? "thread " + std::to_string(start)
                            : "threads " + std::to_string(start) + "-" + std::to_string(tid - 1)) +
          " " + arrivals_[start].describe();
      start = tid;
    }
    return out;
  }

  const dim3 grid_;
  const unsigned threads_;
  const uint64_t seed_;
  const uint64_t blocks_;
  const BlockOrder order_;
  FiberBarrier<Completion> sync_;
  std::vector<std::unique_ptr<FiberBarrier<WarpCompletion>>> warps_;
  std::vector<Arrival> arrivals_;  // each thread's own slot, read by the completion steps
  std::vector<unsigned long long> slots_;  // one 8-byte exchange slot per thread
  // Written by the completion step only (the barrier orders it before the threads' reads).
  uint64_t next_ordinal_ = 0;
  dim3 current_{0, 0, 0};
  unsigned barriers_in_block_ = 0;
  bool finished_ = false;

  SharedBytes dynamic_;
  const size_t dynamic_bytes_;
  StaticArray statics_[kMaxStaticArrays];
  std::atomic<unsigned> static_count_{0};

  std::atomic<bool> failed_{false};  // atomic for ThreadSanitizer, as static_count_
  std::string error_;
};

inline thread_local Block* current_block = nullptr;
inline thread_local unsigned linear_tid = 0;

inline unsigned char* dynamic_shared_memory() { return current_block->dynamic_shared(); }

template <typename T, size_t N>
T (&shared_array(const void* site))
[N] { return *reinterpret_cast<T(*)[N]>(current_block->static_shared(site, sizeof(T) * N)); }

// Kernel launches since the process started: tests count the launches of one op call.
inline std::atomic<int64_t>& launch_counter() {
  static std::atomic<int64_t> count{0};
  return count;
}

inline int64_t launches() { return launch_counter().load(); }

// The block count of every launch since the log was last drained (under launch_mutex; the op
// sa_cuda_emu::emulated_launch_blocks drains it): tests read which grid a call chose (the
// channels_last kernels' tiles are kVec times fewer with packs of kVec channels). A process that
// never drains it keeps the last kMaxLoggedLaunches at most.
constexpr size_t kMaxLoggedLaunches = 4096;
inline std::vector<int64_t>& launch_blocks() {
  static std::vector<int64_t> blocks;
  return blocks;
}
inline void log_launch_blocks(int64_t blocks) {
  std::vector<int64_t>& log = launch_blocks();
  if (log.size() == kMaxLoggedLaunches)
    log.erase(log.begin(), log.begin() + kMaxLoggedLaunches / 2);
  log.push_back(blocks);
}

// A vector access the hardware faults on ("misaligned address"): its address is not a multiple of
// its size. Host memory is not so strict, so the emulator checks it.
inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    throw std::runtime_error("sa_cuda emulator: misaligned address: a " + std::to_string(bytes) +
                             "-byte access at byte " +
                             std::to_string(reinterpret_cast<uintptr_t>(p) % 256) +
                             " of a 256-byte line");
  }
}

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
    fail("grid " + to_string(grid) + " exceeds (2^31 - 1, 65535, 65535)");
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
  const uint64_t seed = block_order_seed();
  ++launch_counter();
  std::lock_guard<std::mutex> lock(launch_mutex());
  log_launch_blocks(int64_t(grid.x) * grid.y * grid.z);
  Block state(grid, block, smem_bytes, seed);
  // The CUDA built-ins are thread-locals of the launching thread, which runs every fiber: the
  // launch-wide ones are set once, the per-thread ones each time a fiber is resumed.
  current_block = &state;
  blockDim = block;
  gridDim = grid;
  auto resume = [&](unsigned tid) {
    linear_tid = tid;
    threadIdx = dim3(tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y));
  };
  auto run_thread = [&](unsigned tid) {
    try {
      // Each block boundary (before the first block, after every block) picks the next block.
      for (state.arrive(tid, {Arrival::kBlockBoundary, {}}); !state.finished();
           state.arrive(tid, {Arrival::kBlockBoundary, {}})) {
        // The first thread past the boundary sets it for all: they share the host thread.
        untracked([&] { blockIdx = state.current(); });
        body();
      }
    } catch (const Abort&) {
      state.leave(tid, nullptr);
    } catch (const std::exception& e) {
      state.leave(tid, e.what());
    } catch (...) {
      state.leave(tid, "an exception that is not a std::exception");
    }
  };
  struct Detach {
    ~Detach() { current_block = nullptr; }
  } detach;
  Fibers::run(state.threads(), run_thread, resume);
  if (state.failed()) throw std::runtime_error(state.error());
}

// One warp-wide exchange: every lane publishes v, then reads lane src's value. A source lane
// outside the (possibly partial) warp yields the caller's own value, as on the hardware for
// __shfl_down_sync past the end.
template <typename T>
T warp_exchange(unsigned mask, T v, int src_lane, std::source_location where) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "shuffle of an 8-byte value at most");
  if (mask != 0xffffffffu)
    throw std::runtime_error("sa_cuda emulator: only full-mask shuffles are supported");
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = current_block->exchange(linear_tid, bits, src_lane, where);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline unsigned lane_id() { return linear_tid % kWarpSize; }

}  // namespace sa_emu

inline void __syncthreads(std::source_location where = std::source_location::current()) {
  sa_emu::current_block->arrive(sa_emu::linear_tid, {sa_emu::Arrival::kSyncthreads, where});
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                  std::source_location where = std::source_location::current()) {
  const int lane = static_cast<int>(sa_emu::lane_id());
  const int src = (lane ^ lane_mask);
  return sa_emu::warp_exchange(mask, v, (src / width == lane / width) ? src : lane, where);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                   std::source_location where = std::source_location::current()) {
  const int lane = static_cast<int>(sa_emu::lane_id());
  const int src = lane + static_cast<int>(delta);
  return sa_emu::warp_exchange(mask, v, (src / width == lane / width) ? src : lane, where);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32,
              std::source_location where = std::source_location::current()) {
  const int lane = static_cast<int>(sa_emu::lane_id());
  return sa_emu::warp_exchange(mask, v, (lane / width) * width + src_lane % width, where);
}
