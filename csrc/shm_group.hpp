// The shared-memory collective engine: one segment per group of ranks on this host.
//
// All-reduces of 16 KB to 8 MB are zero-copy where the kernel lets ranks access each other's
// memory (process_vm_readv/writev; every rank probes every peer at set-up and all agree): each
// rank reads its share of every peer's tensor, reduces it and writes the result into every
// tensor. Otherwise, and for other sizes, data passes through the segment: every rank owns one
// slot in each of two slot sets. A collective runs as a series of steps:
// before step v a rank writes only its own slot of set v % 2 and then publishes v; after
// every rank has published v, all read any slot of set v % 2 until they publish v + 1. So no
// slot is overwritten while a peer may still read it, and a step costs one exchange of
// cache lines. Waiting spins briefly, then yields, then sleeps on a futex, checking for dead
// peers, the timeout and (through a callback) pending interruptions, so ranks that outnumber
// the cores still make progress and a blocked rank still answers Ctrl-C.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <sys/types.h>
#include <string>
#include <vector>

#include "process_identity.hpp"
#include "reduce_kernels.hpp"
#include "shm_segment.hpp"

namespace nxd {

// Whether a group's all-reduces in the zero-copy range read and write peers' tensors directly
// (process_vm_readv/writev), where every rank of the group can.
enum class ZeroCopy : uint8_t {
  Never,     // always through the segment
  IfFaster,  // where the kernel's copies are fast enough to win here (measured at set-up)
  Always,    // whenever every rank can (what tests and benchmarks of the zero-copy path ask for)
};

struct GroupConfig {
  std::string segment;             // shared-memory name, from segment_name()
  int rank = 0;                    // this process's rank in the group
  std::vector<int> global_ranks;   // the group's ranks in the job, for error messages
  size_t slot_bytes = 1 << 20;     // bytes per rank and slot set: the largest step
  double timeout_s = 1800;         // how long to wait for a peer before failing
  ZeroCopy zero_copy = ZeroCopy::IfFaster;
  double kernel_copy_limit = 2;    // IfFaster: zero-copy where a kernel copy costs at most this many memcpys
};

struct SegmentHeader;
struct RankLine;

// The collectives of the engine, as every rank of a step publishes them. 0 is no collective;
// kCount is one past the last, for tables indexed by Collective.
enum class Collective : uint8_t { AllReduce = 1, AllGather, ReduceScatter, Broadcast, Barrier, kCount };

// Why a rank does not run a collective on this engine (see ShmGroup::announce_elsewhere).
enum class Elsewhere : uint8_t { OtherEngine = 1, InvalidInput = 2 };

class ShmGroup {
 public:
  // Group rank 0 creates the segment; the others open it after learning its name. Both then
  // call wait_for_peers(), after which the name is gone from /dev/shm.
  static std::unique_ptr<ShmGroup> create(const GroupConfig& config);
  static std::unique_ptr<ShmGroup> attach(const GroupConfig& config);
  ~ShmGroup();

  // Blocks until every rank has mapped the segment, then removes its name from /dev/shm
  // (every rank does, so the name goes even if some rank dies right after).
  void wait_for_peers();

  // In place on `data` (`count` elements); every rank ends with bit-identical results.
  void all_reduce(void* data, size_t count, DType dtype, ReduceOp op);
  // `out` receives every rank's `bytes` of `in`, in rank order. `dtype` is only compared across
  // ranks, so that buffers of different element types but equal sizes fail instead of mixing.
  void all_gather(const void* in, void* out, size_t bytes, DType dtype);
  // `in` holds size() rows of `count` elements; `out` receives the reduction of row rank().
  void reduce_scatter(const void* in, void* out, size_t count, DType dtype, ReduceOp op);
  // Overwrites `data` with rank `root`'s bytes (`dtype` as for all_gather).
  void broadcast(void* data, size_t bytes, int root, DType dtype);
  void barrier();

  // Publishes, as one step, that this rank runs `collective` (on `count` elements) on another
  // engine, or raises an error for its input instead of running it. Returns once every rank
  // published the same; if a peer runs that step on this engine instead, every rank fails at
  // once rather than waiting for a peer that never arrives.
  void announce_elsewhere(Collective collective, Elsewhere reason, uint64_t count, ReduceOp op, int root);

  // `check` runs about every kPollPeriod while this rank waits for its peers (never on the
  // fast path). If it throws, the group is aborted (peers fail at once) and its exception
  // reaches the caller of the collective: the bindings use it to deliver Ctrl-C.
  void set_interruption_check(std::function<void()> check) { interruption_check_ = std::move(check); }

  // Whether all-reduces of 16 KB to 8 MB access peers' tensors directly: false until the first
  // collective has run (which every rank runs through the segment), then the same on every rank.
  // Read it between collectives, in the thread that runs them.
  bool zero_copy() const { return zero_copy_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  size_t slot_bytes() const { return slot_bytes_; }
  void set_timeout(double seconds);
  double timeout() const { return timeout_s_.load(std::memory_order_relaxed); }
  // A readable name for messages, e.g. "group [0, 1]".
  std::string label() const;

 private:
  struct alignas(64) CacheLine {
    char bytes[64];
  };

  // What a rank is doing at a step; every rank of the step must agree on it. `elsewhere` is 0
  // for a collective run here, else the Elsewhere reason of an announce_elsewhere() step.
  struct Call {
    Collective kind;
    DType dtype;
    ReduceOp op;
    int32_t root;
    uint64_t count;
    uint8_t elsewhere = 0;
    uint64_t pack_head() const;
    static Call unpack(uint64_t head, uint64_t count);
    std::string describe() const;
  };

  ShmGroup(const GroupConfig& config, SharedSegment segment);
  static size_t segment_bytes(int size, size_t slot_bytes);

  void all_reduce_chunk(char* data, size_t count, size_t element, DType dtype, ReduceOp op, const Call& call);
  void all_reduce_zero_copy(char* data, size_t count, size_t element, DType dtype, ReduceOp op, const Call& call);
  // Copy `bytes` at `offset` of rank `peer`'s published tensor into `out`, or `in` there
  // (process_vm_readv, process_vm_writev).
  void read_peer(int peer, size_t offset, void* out, size_t bytes);
  void write_peer(int peer, size_t offset, const void* in, size_t bytes);
  [[noreturn]] void fail_peer_access(int peer, const char* verb, const char* call, ssize_t done);
  // After an abort in a zero-copy all-reduce: returns once no peer writes into our tensor.
  void wait_for_writers_to_stop();
  // Whether this process can read every peer's memory: each peer's probe word holds its token.
  bool can_read_every_peer();
  char* slot(uint64_t step, int rank) const;
  RankLine& line(int rank) const;

  // Throws if the group failed before, here or in a peer.
  void enter();
  // Publishes the next step with `call` and returns once every rank has published it.
  uint64_t step(const Call& call);
  void wait_for_step(uint64_t step, const Call& call);
  bool shares_my_cpu(int rank) const;  // `rank` last stepped on the CPU we ran on at our last step
  void check_calls_agree(uint64_t step, const Call& call);
  void check_not_aborted();
  void check_peers_alive(uint64_t step, const Call& call);
  void check_interruption(const std::string& waiting_in);
  // Marks the group failed for every rank (the first reason wins) and wakes sleeping peers.
  void abort_group(const std::string& reason);
  // The first rank from `from` on that has not published `step`, or -1.
  int first_behind(uint64_t step, int from, std::memory_order order = std::memory_order_acquire) const;
  bool not_joined(int rank) const;
  void learn_zero_copy();
  // Waits (checking aborts, interruptions and the timeout) until no rank is `missing`.
  void wait_during_setup(bool (ShmGroup::*missing)(int) const, const char* waiting_for);
  void sleep_until_behind_moves(uint64_t step, int behind);
  void wake_sleepers();
  [[noreturn]] void fail(const std::string& reason);
  std::string describe_rank(int rank) const;

  // Who may touch what. Set in the constructor and constant after it (read by any thread):
  SharedSegment segment_;
  SegmentHeader* header_;  // the shared fields carry their own rules (shm_group.cpp)
  char* lines_;
  char* slots_;
  std::string name_;
  int rank_;
  int size_;
  size_t slot_bytes_;
  std::vector<int> global_ranks_;
  ZeroCopy want_zero_copy_;      // GroupConfig::zero_copy
  double kernel_copy_limit_;     // GroupConfig::kernel_copy_limit
  const uint64_t probe_token_;   // random; peers read it at probe_token_'s address to test access
  // Any thread, lock-free (set_timeout may run while a collective waits):
  std::atomic<double> timeout_s_;
  // Set once by the owner before the first collective (the bindings do it at creation), read
  // under mutex_; never changed while a collective may run:
  std::function<void()> interruption_check_;
  // Guarded by mutex_: written and read only by the thread that holds it, i.e. inside
  // wait_for_peers() and the collectives (and by the destructor, which runs after them). GCC
  // has no thread-safety analysis and libstdc++'s std::mutex carries no capability attributes
  // for clang's, so this comment is the annotation.
  bool unlinked_ = false;
  bool zero_copy_known_ = false;      // learn_zero_copy() ran (after our first step)
  bool zero_copy_ = false;            // every rank can access every peer's memory and wants to
  std::vector<char*> peer_buffers_;   // zero-copy: each rank's tensor (its address) in this call
  std::vector<CacheLine> scratch_;    // zero-copy: one piece per rank, read from its tensor
  uint64_t step_ = 0;                 // the last step this rank published (== line(rank_).step)
  int cpu_ = -1;                      // the CPU this rank ran on at its last step (== line(rank_).cpu)
  std::vector<const void*> sources_;  // scratch: the buffers one reduction reads
  std::string broken_;                // why the group is unusable, empty while it works
  std::mutex mutex_;  // one collective at a time per group in this process
};

}  // namespace nxd
