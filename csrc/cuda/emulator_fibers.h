// Cooperative fibers for the SIMT emulator (emulator.h): the CUDA threads of a launch run as
// fibers on the host thread that launched it, and a barrier is a counter.
//
// Why not one host thread per CUDA thread: on a 2-core machine, every __syncthreads of a 256-thread
// block then costs 256 futex wake-ups and as many kernel context switches, and each warp shuffle
// 64 more; the emulated tests spent most of their time in the kernel's scheduler. A fiber switch
// stays in user space: on x86-64 it is switch_stack below (saves six registers and the two
// floating-point control words, swaps the stack pointer); elsewhere glibc's swapcontext, which also
// makes a sigprocmask system call per switch (the native kernel selftest ran 12 times as long with
// it, and AddressSanitizer's swapcontext interceptor clears the shadow of the new stack at each
// switch).
// SA_EMU_UCONTEXT=1 selects swapcontext on x86-64 too (the emulator's tests build it both ways).
//
// The sanitizers still see one thread per CUDA thread:
// - ThreadSanitizer: each fiber is a TSan fiber (__tsan_create_fiber). Switches between fibers
//   carry no happens-before (__tsan_switch_to_fiber_no_sync); a barrier is a release by every
//   arriving fiber and an acquire by every leaving one, so a shared-memory access that no
//   __syncthreads orders is reported as a data race, as between real threads. The launching
//   thread's switch into a fiber orders what it wrote before the launch (the inputs, the block
//   state) before the fiber; a fiber's last switch back orders all the fiber did before what the
//   launching thread does after the launch. The emulator's own bookkeeping, which passes between
//   the fibers through the host thread (the scheduler's state, the CUDA built-ins such as
//   threadIdx, the barriers' counters), is kept out of TSan's view: the scheduler runs with TSan
//   ignoring its accesses, the barriers count with atomics, and a fiber writes a built-in through
//   untracked().
// - AddressSanitizer: every switch is announced (__sanitizer_start_switch_fiber /
//   __sanitizer_finish_switch_fiber), so ASan knows which stack runs, and a fiber stack is
//   unpoisoned before it is reused.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#define SA_EMU_TSAN 1
#endif
#if defined(__SANITIZE_ADDRESS__)
#define SA_EMU_ASAN 1
#endif
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SA_EMU_TSAN 1
#endif
#if __has_feature(address_sanitizer)
#define SA_EMU_ASAN 1
#endif
#endif
#if defined(SA_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
// Exported by the TSan runtime (gcc's and clang's), not declared in its header.
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif
#if defined(SA_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(SA_EMU_UCONTEXT)
#define SA_EMU_UCONTEXT 0
#endif

namespace sa_emu {

// Runs f with ThreadSanitizer not recording the accesses of the running fiber (see above).
template <typename F>
void untracked(const F& f) {
#if defined(SA_EMU_TSAN)
  __tsan_ignore_thread_begin();
  f();
  __tsan_ignore_thread_end();
#else
  f();
#endif
}

#if defined(__x86_64__) && !SA_EMU_UCONTEXT
// Saves the callee-saved registers (System V ABI: rbp, rbx, r12-r15) and the SSE and x87 control
// words on the current stack, stores the stack pointer in *save_sp, loads load_sp and restores what
// the same function saved there (or initial_frame wrote), then returns on that stack.
[[gnu::naked, gnu::noinline]] inline void switch_stack(void** /*save_sp: rdi*/,
                                                       void* /*load_sp: rsi*/) {
  asm volatile(
      "pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}

// A suspended fiber, or the scheduler: its saved stack pointer.
struct Context {
  void* sp = nullptr;
};

// A fiber that starts in entry() on [stack, stack + bytes): the frame switch_stack restores, with
// entry as its return address, the current control words (a fiber computes as its launcher does:
// flush-to-zero, rounding) and zeros for the registers.
inline void make_context(Context& context, unsigned char* stack, size_t bytes, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  uint64_t* slot = reinterpret_cast<uint64_t*>(top);
  *--slot = 0;  // entry's own return address: entry never returns (and a backtrace ends here)
  *--slot = reinterpret_cast<uint64_t>(entry);  // entry starts with rsp = top - 8, as after a call
  for (int reg = 0; reg < 6; ++reg) *--slot = 0;
  uint32_t mxcsr = 0;
  uint16_t fpu_control = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_control));
  --slot;
  std::memcpy(slot, &mxcsr, sizeof(mxcsr));
  std::memcpy(reinterpret_cast<unsigned char*>(slot) + 4, &fpu_control, sizeof(fpu_control));
  context.sp = slot;
}

inline void swap_context(Context& from, const Context& to) { switch_stack(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

inline void make_context(Context& context, unsigned char* stack, size_t bytes, void (*entry)()) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack;
  context.uc.uc_stack.ss_size = bytes;
  context.uc.uc_link = nullptr;
  makecontext(&context.uc, entry, 0);
}

inline void swap_context(Context& from, const Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// What a fiber runs on: its stack and, under ThreadSanitizer, its TSan fiber. Made once, kept for
// the process's lifetime and reused by later launches: mapping up to 1024 stacks (and creating as
// many TSan fibers) per launch would cost more than the launch. The lowest page of the stack is a
// guard page: a stack overflow faults instead of writing over its neighbour. A TSan fiber reused by
// a later launch is ordered after its earlier work by the launcher's switches (see above).
class FiberSlot {
 public:
  static constexpr size_t kStackBytes = 256 * 1024;
  static constexpr size_t kGuard = 4096;

  FiberSlot() {
    void* p = mmap(nullptr, kStackBytes + kGuard, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    mprotect(p, kGuard, PROT_NONE);
    stack_ = static_cast<unsigned char*>(p) + kGuard;
#if defined(SA_EMU_TSAN)
    tsan_ = __tsan_create_fiber(0);
#endif
  }
  FiberSlot(FiberSlot&& o) noexcept : stack_(o.stack_), tsan_(o.tsan_) {
    o.stack_ = nullptr;
    o.tsan_ = nullptr;
  }
  FiberSlot(const FiberSlot&) = delete;
  ~FiberSlot() {
    if (stack_ != nullptr) munmap(stack_ - kGuard, kStackBytes + kGuard);
#if defined(SA_EMU_TSAN)
    if (tsan_ != nullptr) __tsan_destroy_fiber(tsan_);
#endif
  }
  unsigned char* stack() const { return stack_; }
  void* tsan() const { return tsan_; }

 private:
  unsigned char* stack_;
  void* tsan_ = nullptr;
};

// The fibers of one launch, run round-robin on the calling thread until every one has returned.
// A fiber gives control back only by waiting (wait_for_phase); it is resumed once the counter it
// waits on has moved on. Used by one launch at a time (launches hold a global mutex).
class Fibers {
 public:
  // Runs entry(i) for i in [0, count) as fibers; resume(i) is called each time fiber i is about to
  // run (to set the thread-local state of the CUDA thread). Returns once every entry returned.
  template <typename Entry, typename Resume>
  static void run(unsigned count, const Entry& entry, const Resume& resume) {
    Fibers fibers(count);
    Runner<Entry> runner{&entry};
    fibers.runner_ = &runner;
    fibers.start_all(&Runner<Entry>::trampoline);
    fibers.schedule(resume);
  }

  // Called from a fiber: gives control back until *phase differs from seen.
  static void wait_for_phase(const std::atomic<uint64_t>* phase, uint64_t seen) {
    Fibers& self = *running();
    Fiber& me = self.fibers_[self.current_];
    me.phase = phase;
    me.seen = seen;
    self.switch_to_scheduler(me, /*last=*/false);
  }

 private:
  struct Fiber {
    Context context;
    const std::atomic<uint64_t>* phase = nullptr;  // waiting until *phase != seen
    uint64_t seen = 0;
    bool done = false;
    void* asan_fake = nullptr;  // ASan's fake stack of this fiber while it is switched out
  };

  template <typename Entry>
  struct Runner {
    const Entry* entry;
    // Where every fiber of the launch starts: the running Fibers say which fiber and what entry.
    static void trampoline() {
      Fibers& f = *running();
      f.arrived_in_fiber();
      const unsigned index = f.current_;
      (*static_cast<const Runner*>(f.runner_)->entry)(index);
      f.fibers_[index].done = true;
      f.switch_to_scheduler(f.fibers_[index], /*last=*/true);  // never returns
    }
  };

  explicit Fibers(unsigned count) : fibers_(count) {
    std::vector<FiberSlot>& pool = slots();
    while (pool.size() < count) pool.emplace_back();
  }

  static Fibers*& running() {
    static thread_local Fibers* fibers = nullptr;
    return fibers;
  }
  static std::vector<FiberSlot>& slots() {
    static std::vector<FiberSlot> pool;
    return pool;
  }

  void start_all(void (*trampoline)()) {
    for (unsigned i = 0; i < fibers_.size(); ++i) {
      Fiber& f = fibers_[i];
      unsigned char* stack = slots()[i].stack();
#if defined(SA_EMU_ASAN)
      // A fiber of an earlier launch may have left redzones poisoned on this stack.
      ASAN_UNPOISON_MEMORY_REGION(stack, FiberSlot::kStackBytes);
#endif
      make_context(f.context, stack, FiberSlot::kStackBytes, trampoline);
    }
  }

  // The round-robin loop: resumes every fiber whose wait is over until all are done.
  template <typename Resume>
  void schedule(const Resume& resume) {
    struct Running {  // this launch's Fibers are the thread's running ones until schedule() ends
      Fibers* saved;
      explicit Running(Fibers* self) : saved(running()) { running() = self; }
      ~Running() { running() = saved; }
    } running_now(this);
#if defined(SA_EMU_TSAN)
    __tsan_ignore_thread_begin();  // the scheduler's accesses: bookkeeping only (see above)
    struct Track {
      ~Track() { __tsan_ignore_thread_end(); }
    } track;
#endif
    unsigned alive = static_cast<unsigned>(fibers_.size());
    while (alive > 0) {
      bool progressed = false;
      for (unsigned i = 0; i < fibers_.size(); ++i) {
        Fiber& f = fibers_[i];
        if (f.done || (f.phase != nullptr && f.phase->load(std::memory_order_relaxed) == f.seen))
          continue;
        f.phase = nullptr;
        resume(i);
        switch_to_fiber(i);
        progressed = true;
        alive -= f.done;
      }
      // The barriers complete whenever every live thread has arrived, so some fiber can always
      // run; a round where none could is an emulator bug, reported instead of hanging.
      if (!progressed) {
        throw std::logic_error("sa_cuda emulator: every CUDA thread waits and none can go on (" +
                               std::to_string(alive) + " threads)");
      }
    }
  }

  void switch_to_fiber(unsigned i) {
    Fiber& f = fibers_[i];
    current_ = i;
#if defined(SA_EMU_ASAN)
    __sanitizer_start_switch_fiber(&scheduler_fake_, slots()[i].stack(), FiberSlot::kStackBytes);
#endif
#if defined(SA_EMU_TSAN)
    if (scheduler_tsan_ == nullptr) scheduler_tsan_ = __tsan_get_current_fiber();
    // With sync (flags 0): what the launcher did happens before the fiber goes on.
    __tsan_switch_to_fiber(slots()[i].tsan(), 0);
#endif
    swap_context(scheduler_, f.context);
#if defined(SA_EMU_ASAN)
    __sanitizer_finish_switch_fiber(scheduler_fake_, nullptr, nullptr);
#endif
  }

  // From fiber `me` back to the scheduler; `last`: the fiber has returned and never resumes.
  void switch_to_scheduler(Fiber& me, bool last) {
#if defined(SA_EMU_ASAN)
    __sanitizer_start_switch_fiber(last ? nullptr : &me.asan_fake, scheduler_stack_bottom_,
                                   scheduler_stack_size_);
#endif
#if defined(SA_EMU_TSAN)
    // Only the fiber's end orders what it did before the launcher's next steps; a switch in
    // between must not order one CUDA thread's accesses before another's.
    __tsan_switch_to_fiber(scheduler_tsan_, last ? 0 : __tsan_switch_to_fiber_no_sync);
#endif
    swap_context(me.context, scheduler_);
    arrived_in_fiber();
  }

  // Run by a fiber each time it gets control.
  void arrived_in_fiber() {
#if defined(SA_EMU_ASAN)
    __sanitizer_finish_switch_fiber(fibers_[current_].asan_fake, &scheduler_stack_bottom_,
                                    &scheduler_stack_size_);
#endif
  }

  std::vector<Fiber> fibers_;
  unsigned current_ = 0;
  const void* runner_ = nullptr;  // the Runner of this launch
  Context scheduler_;
  void* scheduler_fake_ = nullptr;
  const void* scheduler_stack_bottom_ = nullptr;
  size_t scheduler_stack_size_ = 0;
  void* scheduler_tsan_ = nullptr;
};

// std::barrier's contract (arrive, arrive_and_wait, arrive_and_drop; the completion step runs once
// per phase, in the last thread to arrive, before any waiting thread goes on) for fibers.
template <typename Completion>
class FiberBarrier {
 public:
  FiberBarrier(unsigned expected, Completion completion)
      : expected_(expected), next_expected_(expected), completion_(completion) {}

  void arrive() {
    const uint64_t phase = phase_.load(kOrder);
    release(phase);
    if (arrived_.fetch_add(1, kOrder) + 1 == expected_.load(kOrder)) complete(phase);
  }
  void arrive_and_wait() {
    const uint64_t phase = phase_.load(kOrder);
    arrive();
    if (phase_.load(kOrder) == phase) Fibers::wait_for_phase(&phase_, phase);
    acquire(phase);
  }
  // Leaves the barrier: arrives at this phase and is no longer expected at the later ones.
  void arrive_and_drop() {
    next_expected_.fetch_sub(1, kOrder);
    arrive();
  }

 private:
  // The fibers share one host thread: the atomics are for ThreadSanitizer, which must not see the
  // barrier's own counting as a race, nor as an order between the CUDA threads (release() and
  // acquire() are the order).
  static constexpr std::memory_order kOrder = std::memory_order_relaxed;

  void complete(uint64_t phase) {
    acquire(phase);
    completion_();
    release(phase);  // what the completion step did, before the waiting threads go on
    arrived_.store(0, kOrder);
    expected_.store(next_expected_.load(kOrder), kOrder);
    phase_.fetch_add(1, kOrder);
  }

  // The happens-before edges of a phase for ThreadSanitizer: every arrival releases, every
  // departure acquires. Two sync addresses, alternating: the last thread of phase p goes on and may
  // arrive at phase p + 1 before the others have left p, and what it does after p must not be
  // ordered before them. Phase p + 2 cannot start before every thread has left p.
  void release([[maybe_unused]] uint64_t phase) {
#if defined(SA_EMU_TSAN)
    __tsan_release(&sync_[phase & 1]);
#endif
  }
  void acquire([[maybe_unused]] uint64_t phase) {
#if defined(SA_EMU_TSAN)
    __tsan_acquire(&sync_[phase & 1]);
#endif
  }

  std::atomic<unsigned> arrived_{0}, expected_, next_expected_;
  std::atomic<uint64_t> phase_{0};
  Completion completion_;
  char sync_[2] = {};  // addresses only (ThreadSanitizer's sync objects)
};

}  // namespace sa_emu
