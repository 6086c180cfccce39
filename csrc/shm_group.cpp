#include "shm_group.hpp"

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <iterator>
#include <new>
#include <random>
#include <sstream>
#include <type_traits>
#include <vector>

#include "errors.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NXD_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define NXD_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define NXD_CPU_RELAX() asm volatile("" ::: "memory")
#endif

namespace nxd {

constexpr uint64_t kMagic = 0x6e78642d73686d31ULL;  // "nxd-shm1"
// 2: call heads carry the Elsewhere reason; 3: per-rank join flags; 4: zero-copy buffers and probes;
// 5: each rank's CPU hint
constexpr uint32_t kLayoutVersion = 5;
constexpr size_t kSlotAlignment = 4096;
// Chunks up to this size are reduced whole by every rank in one step; larger ones in two
// steps, each rank reducing one share, which moves less data per rank.
constexpr size_t kDirectReduceBytes = 32 << 10;
// All-reduces from this size up are zero-copy (when the group is): two steps and two system calls
// per peer and piece, against one step and a copy into the segment below kDirectReduceBytes, two
// steps and three copies per slot above. Measured with benchmarks/engine_bandwidth.cpp (2 ranks,
// float32, median us per call, zero-copy / through the segment): 4 KB 2.4 / 1.1, 8 KB 2.7 / 1.9,
// 16 KB 3.2 / 3.4, 32 KB 3.5 / 5.9, 1 MB 48 / 102.
constexpr size_t kZeroCopyBytes = 16 << 10;
// ... and up to this size, not beyond: the kernel's copies in process_vm_readv/writev cost about
// twice a memcpy per byte once the tensors outgrow the caches (12.5 MB read by process_vm_readv
// in 2.0-2.8 ms, a memcpy of it 0.5 ms), where the segment's memcpys stream. Measured with
// benchmarks/engine_bandwidth.cpp (2 ranks, float32, unpinned on a machine other work loaded,
// median us per call, zero-copy / through the segment, three alternating runs): 4 MB 394 / 580,
// 8 MB 1911 / 1485, 2235 / 1350, 1858 / 1228; 16 MB 5224 / 3338, 5354 / 3191, 4770 / 1183.
constexpr size_t kZeroCopyMaxBytes = 8 << 20;
// ZeroCopy::IfFaster: zero-copy is used where a process_vm_readv of kKernelCopyProbeBytes (best
// of kKernelCopyProbeTries) costs at most GroupConfig::kernel_copy_limit (2) memcpys of them.
// Zero-copy moves each byte between ranks once by a kernel copy, the segment by two memcpys, so
// kernel copies above about two memcpys lose. Both kinds of machine were seen (benchmarks/engine_bandwidth.cpp, 2
// ranks, float32, median us per call, zero-copy / through the segment): where the kernel copied
// 256 KB in about a memcpy's time, the measurements above; on an AMD EPYC VM (Linux 6.18) where
// it took 4.1 memcpys (18.4 us against 4.5 us), 16 KB 6.0 / 3.1, 256 KB 29.7 / 34.6, 1 MB
// 93.8-116 / 50.6-54.0, 4 MB 518 / 219.
constexpr size_t kKernelCopyProbeBytes = 256 << 10;
constexpr int kKernelCopyProbeTries = 5;
// Bytes of peers' shares read per piece, over all peers: the pieces and the tensor's share being
// reduced stay in L2 (2 MB on the machine measured; 256 KB was faster than 64 KB there).
constexpr size_t kZeroCopyPieceBytes = 256 << 10;
// How long a rank that leaves a zero-copy all-reduce early (an abort, Ctrl-C) waits for its peers
// to stop writing into its tensor. A writer checks for an abort before every piece, so it stops
// within one piece (tens of microseconds); the limit only matters for a writer that is stopped
// (a debugger, SIGSTOP) inside its system call, which could then still write after we return.
constexpr auto kWritersStopLimit = std::chrono::seconds(1);
// Waiting: spin this many pauses, then yield the core until kYieldPhase has passed, then
// sleep on the futex in slices of kSleepSliceNs; but sleep at once while the rank waited for
// last stepped on our CPU (shares_my_cpu): it cannot run until we stop. Schedulers that pack
// the ranks onto fewer CPUs than they could use do this (the VM we develop on, whose kernel packs
// vCPUs, ran 2 ranks on one CPU for minutes at a time; spinning and yielding there made a 1 MB
// all_reduce through the segment 470 us instead of 50). Every kPollPeriod of sleeping, check that
// the peers still live and run the interruption check: each costs a few system calls (or the
// GIL), nothing next to 50 ms asleep, and 50 ms is well inside "Ctrl-C answers at once".
//
// The spin count, measured: one pause cost 27-30 ns of CPU time on the AMD EPYC virtual
// machine we develop on (CLOCK_THREAD_CPUTIME_ID over 10^6 pauses, 5 runs); it is about 40 ns
// on Intel since Skylake (140 cycles) and a few ns on older Intel, so 1000 rounds (each a
// pause plus the acquire loads of the ranks still behind) are 30-40 us. A whole small
// collective took 3.5 us on that machine (4 KB, 2 ranks, the engine's own call, median of
// 2000), so a peer that is merely a few collectives behind is caught
// without a system call, and a rank that waits for a slow one gives its core up after 40 us
// at most: with more ranks than cores, spinning longer only delays the rank it waits for.
// Sleep slices bound the cost of a lost wake-up to 2 ms (none is possible; see
// sleep_until_behind_moves), so a mistake there would be slow, never a hang.
constexpr int kSpinIterations = 1000;
constexpr auto kYieldPhase = std::chrono::microseconds(500);
constexpr long kSleepSliceNs = 2'000'000;
constexpr auto kPollPeriod = std::chrono::milliseconds(50);

// The segment's layout. Everything here is mapped by several processes at different
// addresses, so: the atomics must be lock-free (only those are address-free, i.e. work
// through two mappings of one page; a lock-based atomic would lock a table private to each
// process), the structs standard-layout (a layout fixed by the declaration, the same in
// every build of kLayoutVersion) and trivially destructible (the segment is unmapped, never
// destroyed). They cannot be trivially copyable (std::atomic is not) and need not be: they
// are placement-constructed in the segment and never copied; ProcessIdentity, copied in and
// out, is (see process_identity.hpp).
//
// Who writes what: the creator (group rank 0) writes layout_version..slot_bytes and constructs
// every RankLine, and only then publishes `magic` (release); attach() reads `magic` first
// (acquire) and refuses the segment until it is set, so a peer that opens the name early
// (it exists from shm_open on) neither reads half-written fields nor has its own line's
// `joined` zeroed by the creator's construction afterwards. Nobody writes them again. Every
// other field says its writers below.
struct SegmentHeader {
  std::atomic<uint64_t> magic;
  uint32_t layout_version;
  int32_t size;
  uint64_t slot_bytes;
  // The first rank to fail: its CAS wins, it alone writes abort_reason, then publishes it.
  alignas(64) std::atomic<int32_t> aborted_by;  // -1 while no rank has failed
  std::atomic<uint32_t> abort_published;        // set once abort_reason is written
  char abort_reason[1024];
  // Any rank: futex word, bumped to wake sleepers; and how many ranks may be asleep on it.
  alignas(64) std::atomic<uint32_t> wake_word;
  std::atomic<uint32_t> sleepers;
};

// One per rank, on its own pair of cache lines: written only by its rank (single writer, so
// no field needs a lock or an RMW), read by all.
struct alignas(128) RankLine {
  std::atomic<uint64_t> step;
  uint64_t call_head[2];   // Call::pack_head() of the call at step s, indexed by s % 2
  uint64_t call_count[2];  // Call::count of the call at step s, indexed by s % 2
  uint64_t buffer[2];      // zero-copy: the address of this rank's tensor at step s, by s % 2
  ProcessIdentity process;        // written once, before `joined`
  uint64_t probe_address;         // written once, before `joined`: where probe_token lies
  uint64_t probe_token;           //   in this rank's memory (see can_read_every_peer)
  std::atomic<uint32_t> joined;   // 1 once the fields above are written and the segment mapped
  std::atomic<uint32_t> probed;   // 0 until set-up probed the peers, then 1 (could read all) or 2
  std::atomic<uint32_t> writing;  // 1 while this rank may write into peers' tensors (zero-copy)
  std::atomic<int32_t> cpu;       // a hint, written at each step: the CPU this rank ran on, or -1
};

static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<uint32_t>::is_always_lock_free &&
                  std::atomic<int32_t>::is_always_lock_free,
              "shared-memory atomics must be lock-free to be address-free across processes");
static_assert(std::is_standard_layout_v<SegmentHeader> && std::is_standard_layout_v<RankLine>,
              "the segment layout must be fixed by the declarations alone");
static_assert(std::is_trivially_destructible_v<SegmentHeader> && std::is_trivially_destructible_v<RankLine>,
              "segment structs are unmapped, never destroyed");
static_assert(sizeof(RankLine) == 128, "one rank's line must stay within its own two cache lines");

namespace {

using Clock = std::chrono::steady_clock;

size_t round_up(size_t value, size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

size_t lines_offset() { return round_up(sizeof(SegmentHeader), alignof(RankLine)); }

size_t slots_offset(int size) { return round_up(lines_offset() + sizeof(RankLine) * size, kSlotAlignment); }

long futex(std::atomic<uint32_t>* word, int op, uint32_t value, const timespec* timeout) {
  return ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, value, timeout, nullptr, 0);
}

// Whether the kernel copies memory between processes in at most `limit` memcpys' time here:
// process_vm_readv from this process into itself against memcpy, the best of a few tries of
// each (a try that was descheduled does not count). False where process_vm_readv fails.
bool kernel_copies_within(double limit) {
  std::vector<char> from(kKernelCopyProbeBytes, 1), to(kKernelCopyProbeBytes, 0);
  auto best = std::chrono::nanoseconds::max();
  auto best_kernel = std::chrono::nanoseconds::max();
  for (int i = 0; i < kKernelCopyProbeTries; ++i) {
    const auto start = Clock::now();
    std::memcpy(to.data(), from.data(), from.size());
    const auto copied = Clock::now();
    iovec local{to.data(), to.size()};
    iovec remote{from.data(), from.size()};
    if (::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0) != static_cast<ssize_t>(from.size())) return false;
    best = std::min(best, std::chrono::duration_cast<std::chrono::nanoseconds>(copied - start));
    best_kernel = std::min(best_kernel, std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - copied));
  }
  return static_cast<double>(best_kernel.count()) <= limit * static_cast<double>(best.count());
}

// Indexed by Collective; 0 is no collective (a corrupt or foreign call head).
constexpr const char* kCollectiveNames[] = {"?", "all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier"};
static_assert(std::size(kCollectiveNames) == static_cast<size_t>(Collective::kCount),
              "one name per Collective");

const char* kind_name(Collective kind) {
  const auto index = static_cast<size_t>(kind);
  return index < std::size(kCollectiveNames) ? kCollectiveNames[index] : kCollectiveNames[0];
}

void validate_config(const GroupConfig& config) {
  const int size = static_cast<int>(config.global_ranks.size());
  if (size < 1) throw UnsupportedArgument("a group needs at least one rank");
  if (config.rank < 0 || config.rank >= size) {
    throw UnsupportedArgument("rank " + std::to_string(config.rank) + " is outside a group of " +
                              std::to_string(size) + " ranks");
  }
  if (config.slot_bytes < kSlotAlignment || config.slot_bytes % kSlotAlignment != 0 ||
      config.slot_bytes < static_cast<size_t>(size) * 64) {
    throw UnsupportedArgument("slot_bytes must be a multiple of 4096 and at least 64 bytes per rank, got " +
                              std::to_string(config.slot_bytes));
  }
  if (!(config.timeout_s > 0)) throw UnsupportedArgument("timeout must be positive");
  if (!(config.kernel_copy_limit >= 0)) throw UnsupportedArgument("kernel_copy_limit must be 0 or more");
}

}  // namespace

uint64_t ShmGroup::Call::pack_head() const {
  return static_cast<uint64_t>(kind) | static_cast<uint64_t>(dtype) << 8 | static_cast<uint64_t>(op) << 16 |
         static_cast<uint64_t>(elsewhere) << 24 | static_cast<uint64_t>(static_cast<uint32_t>(root)) << 32;
}

ShmGroup::Call ShmGroup::Call::unpack(uint64_t head, uint64_t count) {
  Call call{static_cast<Collective>(head & 0xff), static_cast<DType>((head >> 8) & 0xff),
            static_cast<ReduceOp>((head >> 16) & 0xff), static_cast<int32_t>(head >> 32), count};
  call.elsewhere = static_cast<uint8_t>((head >> 24) & 0xff);
  return call;
}

std::string ShmGroup::Call::describe() const {
  std::ostringstream text;
  text << kind_name(kind) << "(";
  if (elsewhere != 0) {
    // Announced, not run here: the element type may be one this engine does not know.
    if (kind == Collective::AllReduce || kind == Collective::ReduceScatter) text << reduce_op_name(op) << ", ";
    if (kind != Collective::Barrier) text << count << " elements";
    if (kind == Collective::Broadcast) text << " from rank " << root;
  } else {
    switch (kind) {
      case Collective::AllReduce:
      case Collective::ReduceScatter:
        text << reduce_op_name(op) << ", " << dtype_name(dtype) << ", " << count << " elements";
        break;
      case Collective::AllGather: text << dtype_name(dtype) << ", " << count << " bytes"; break;
      case Collective::Broadcast: text << dtype_name(dtype) << ", " << count << " bytes from rank " << root; break;
      case Collective::Barrier:
      case Collective::kCount: break;
    }
  }
  text << ")";
  if (elsewhere == static_cast<uint8_t>(Elsewhere::OtherEngine)) {
    text << " on torch.distributed (a dtype or device that shared memory does not run)";
  } else if (elsewhere == static_cast<uint8_t>(Elsewhere::InvalidInput)) {
    text << " refused for invalid input (see that rank's error)";
  }
  return text.str();
}

size_t ShmGroup::segment_bytes(int size, size_t slot_bytes) { return slots_offset(size) + 2 * size * slot_bytes; }

std::unique_ptr<ShmGroup> ShmGroup::create(const GroupConfig& config) {
  validate_config(config);
  remove_orphaned_segments();
  const int size = static_cast<int>(config.global_ranks.size());
  SharedSegment segment = SharedSegment::create(config.segment, segment_bytes(size, config.slot_bytes));
  auto* header = new (segment.data()) SegmentHeader();
  header->layout_version = kLayoutVersion;
  header->size = size;
  header->slot_bytes = config.slot_bytes;
  // Relaxed: published with the rest by the release store of `magic` below.
  header->aborted_by.store(-1, std::memory_order_relaxed);
  char* lines = static_cast<char*>(segment.data()) + lines_offset();
  for (int r = 0; r < size; ++r) new (lines + r * sizeof(RankLine)) RankLine();
  header->magic.store(kMagic, std::memory_order_release);
  return std::unique_ptr<ShmGroup>(new ShmGroup(config, std::move(segment)));
}

std::unique_ptr<ShmGroup> ShmGroup::attach(const GroupConfig& config) {
  validate_config(config);
  SharedSegment segment = SharedSegment::open(config.segment);
  const int size = static_cast<int>(config.global_ranks.size());
  const auto* header = static_cast<const SegmentHeader*>(segment.data());
  // Acquire, pairing with create(): a set magic means the header and every RankLine are complete.
  if (segment.size() < sizeof(SegmentHeader) || header->magic.load(std::memory_order_acquire) != kMagic ||
      header->layout_version != kLayoutVersion || header->size != size ||
      segment.size() != segment_bytes(size, header->slot_bytes)) {
    throw SegmentError("shared-memory segment " + config.segment + " does not hold a group of " +
                       std::to_string(size) + " ranks of this engine version; all ranks must run the same build");
  }
  GroupConfig attached = config;
  attached.slot_bytes = header->slot_bytes;
  return std::unique_ptr<ShmGroup>(new ShmGroup(attached, std::move(segment)));
}

ShmGroup::ShmGroup(const GroupConfig& config, SharedSegment segment)
    : segment_(std::move(segment)),
      header_(static_cast<SegmentHeader*>(segment_.data())),
      lines_(static_cast<char*>(segment_.data()) + lines_offset()),
      slots_(static_cast<char*>(segment_.data()) + slots_offset(static_cast<int>(config.global_ranks.size()))),
      name_(config.segment),
      rank_(config.rank),
      size_(static_cast<int>(config.global_ranks.size())),
      slot_bytes_(config.slot_bytes),
      global_ranks_(config.global_ranks),
      want_zero_copy_(config.zero_copy),
      kernel_copy_limit_(config.kernel_copy_limit),
      probe_token_(std::random_device{}() | static_cast<uint64_t>(std::random_device{}()) << 32),
      timeout_s_(config.timeout_s),
      peer_buffers_(config.global_ranks.size()),
      sources_(config.global_ranks.size()) {
  RankLine& mine = line(rank_);
  mine.process = current_process();
  mine.probe_address = reinterpret_cast<uintptr_t>(&probe_token_);
  mine.probe_token = probe_token_;
  // Release: a peer that sees joined == 1 (acquire, in not_joined) also sees `process` and
  // the probe fields.
  mine.joined.store(1, std::memory_order_release);
}

ShmGroup::~ShmGroup() {
  if (!unlinked_) {
    try {
      SharedSegment::unlink(name_);
    } catch (const SegmentError&) {
      // Nothing to report from a destructor; a later run removes orphaned segments.
    }
  }
}

void ShmGroup::wait_for_peers() {
  std::lock_guard<std::mutex> lock(mutex_);
  try {
    wait_during_setup(&ShmGroup::not_joined, "attach to the shared-memory segment");
    // Release, before any step of ours: a peer that has seen one of our steps (acquire) sees the
    // verdict too, in learn_zero_copy().
    const bool zero_copy = want_zero_copy_ != ZeroCopy::Never && can_read_every_peer() &&
                           (want_zero_copy_ == ZeroCopy::Always || kernel_copies_within(kernel_copy_limit_));
    line(rank_).probed.store(zero_copy ? 1 : 2, std::memory_order_release);
  } catch (...) {
    // Failed or interrupted: the name must not outlive the set-up (the destructor may run late).
    try {
      SharedSegment::unlink(name_);
      unlinked_ = true;
    } catch (const SegmentError&) {
      // The failure being reported matters more; a later run removes orphaned segments.
    }
    throw;
  }
  SharedSegment::unlink(name_);
  unlinked_ = true;
}

void ShmGroup::wait_during_setup(bool (ShmGroup::*missing)(int) const, const char* waiting_for) {
  const auto start = Clock::now();
  auto next_poll = start + kPollPeriod;
  auto any_missing = [&] {
    for (int r = 0; r < size_; ++r) {
      if ((this->*missing)(r)) return true;
    }
    return false;
  };
  while (any_missing()) {
    check_not_aborted();
    const auto now = Clock::now();
    if (now >= next_poll) {
      check_interruption("set-up");
      next_poll = now + kPollPeriod;
    }
    if (now - start > std::chrono::duration<double>(timeout_s_.load(std::memory_order_relaxed))) {
      // Not describe_rank(): a rank that has not joined has no pid to show.
      std::string late;
      for (int r = 0; r < size_; ++r) {
        if ((this->*missing)(r)) {
          late += (late.empty() ? "rank " : ", rank ") + std::to_string(r) + " (global rank " +
                  std::to_string(global_ranks_[r]) + ")";
        }
      }
      fail(late + " of " + label() + " did not " + waiting_for + " within " +
           std::to_string(timeout_s_.load(std::memory_order_relaxed)) +
           " s; check that every rank of the group set it up");
    }
    ::usleep(100);
  }
}

bool ShmGroup::can_read_every_peer() {
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    const RankLine& peer = line(r);
    uint64_t seen = 0;
    iovec local{&seen, sizeof(seen)};
    iovec remote{reinterpret_cast<void*>(static_cast<uintptr_t>(peer.probe_address)), sizeof(seen)};
    // Fails with EPERM under Yama's ptrace_scope >= 1 for processes that are not our
    // descendants, ENOSYS or EPERM under seccomp filters; reads another process's word (and so
    // not the token) where the pid means something else in our pid namespace.
    if (::process_vm_readv(peer.process.pid, &local, 1, &remote, 1, 0) != sizeof(seen) || seen != peer.probe_token) {
      return false;
    }
  }
  return true;
}

bool ShmGroup::not_joined(int rank) const {
  // Acquire, pairing with the release in the constructor: `process` and the probe fields of a
  // joined rank are visible here, and so to can_read_every_peer(), describe_rank() and
  // check_peers_alive() of any later collective.
  return line(rank).joined.load(std::memory_order_acquire) == 0;
}

// After our first step: every rank published its probe verdict before its first step, so all
// verdicts are visible and every rank comes to the same decision, before its second collective
// (the first one runs through the segment on every rank).
void ShmGroup::learn_zero_copy() {
  zero_copy_known_ = true;
  bool every_rank = true;
  // Acquire, pairing with the release in wait_for_peers() (already ordered by the step's acquire).
  for (int r = 0; r < size_; ++r) every_rank &= line(r).probed.load(std::memory_order_acquire) == 1;
  if (!every_rank) return;
  const size_t piece = std::max<size_t>(4096, kZeroCopyPieceBytes / std::max(1, size_ - 1) / 4096 * 4096);
  scratch_.resize(piece / sizeof(CacheLine) * size_);
  zero_copy_ = true;
}

std::string ShmGroup::label() const {
  std::string text = "group [";
  for (int r = 0; r < size_; ++r) text += (r ? ", " : "") + std::to_string(global_ranks_[r]);
  return text + "]";
}

std::string ShmGroup::describe_rank(int rank) const {
  return "rank " + std::to_string(rank) + " (global rank " + std::to_string(global_ranks_[rank]) + ", pid " +
         std::to_string(line(rank).process.pid) + ")";
}

void ShmGroup::set_timeout(double seconds) {
  if (!(seconds > 0)) throw UnsupportedArgument("timeout must be positive");
  // Relaxed: a lone value that orders nothing else; a wait already running keeps its deadline.
  timeout_s_.store(seconds, std::memory_order_relaxed);
}

char* ShmGroup::slot(uint64_t step, int rank) const {
  return slots_ + ((step & 1) * size_ + rank) * slot_bytes_;
}

RankLine& ShmGroup::line(int rank) const { return *reinterpret_cast<RankLine*>(lines_ + rank * sizeof(RankLine)); }

void ShmGroup::enter() {
  if (!broken_.empty()) {
    throw CollectiveFailure(label() + " is unusable after an earlier failure (" + broken_ +
                            "); restart the job or create a new process group");
  }
  check_not_aborted();
}

// Why plain (non-atomic) slot and call_head writes are safe: this rank writes set s % 2 (its
// slot, call_head[s % 2], call_count[s % 2]) only before publishing s, and peers read that
// set only after seeing step >= s and before publishing s + 1. This rank writes the set
// again only for s + 2, after wait_for_step(s + 1) saw every peer publish s + 1, i.e. after
// their reads. Each such edge is a release store of `step` read by an acquire (or stronger)
// load, so every access to a set is ordered by happens-before: no data race, no torn read.
uint64_t ShmGroup::step(const Call& call) {
  const uint64_t step = ++step_;
  RankLine& mine = line(rank_);
  cpu_ = ::sched_getcpu();
  // Relaxed: a hint for peers that wait for our next step (shares_my_cpu), ordered with nothing.
  mine.cpu.store(cpu_, std::memory_order_relaxed);
  mine.call_head[step & 1] = call.pack_head();
  mine.call_count[step & 1] = call.count;
  // Waker half of a store-buffering pair with sleep_until_behind_moves(), which writes
  // `sleepers` and then reads `step`; here we write `step` and then read `sleepers`. Release
  // alone would let both loads read the old values (each store still in its core's store
  // buffer): the peer would sleep on a step that has been published, and this rank would not
  // wake it. With all four accesses seq_cst they fall in one total order S, so either the
  // sleeper's read of `step` comes after this store in S (it sees the step and does not
  // sleep) or its increment comes before our load (we see sleepers != 0 and wake it). The
  // store also releases the slot and call_head writes above. Cost: one xchg on x86 (a
  // release store would be a mov, but then needs an mfence for the pair), stlr on arm64.
  mine.step.store(step, std::memory_order_seq_cst);
  if (header_->sleepers.load(std::memory_order_seq_cst) != 0) wake_sleepers();
  wait_for_step(step, call);
  check_calls_agree(step, call);
  if (!zero_copy_known_) learn_zero_copy();
  return step;
}

int ShmGroup::first_behind(uint64_t step, int from, std::memory_order order) const {
  for (int r = from; r < size_; ++r) {
    if (line(r).step.load(order) < step) return r;
  }
  return -1;
}

bool ShmGroup::shares_my_cpu(int rank) const {
  // Relaxed: a stale value only makes us spin or sleep when the other would have been better.
  return cpu_ >= 0 && line(rank).cpu.load(std::memory_order_relaxed) == cpu_;
}

void ShmGroup::wait_for_step(uint64_t step, const Call& call) {
  int behind = first_behind(step, 0);
  if (behind < 0) return;
  for (int i = 0; i < kSpinIterations && !shares_my_cpu(behind); ++i) {
    NXD_CPU_RELAX();
    behind = first_behind(step, behind);
    if (behind < 0) return;
  }
  const auto start = Clock::now();
  auto next_poll = start + kPollPeriod;
  const auto timeout = std::chrono::duration<double>(timeout_s_.load(std::memory_order_relaxed));
  while (true) {
    check_not_aborted();
    const auto now = Clock::now();
    if (now - start < kYieldPhase && !shares_my_cpu(behind)) {
      ::sched_yield();
    } else {
      sleep_until_behind_moves(step, behind);
      if (now >= next_poll) {
        check_peers_alive(step, call);
        check_interruption(call.describe());
        next_poll = now + kPollPeriod;
      }
      if (now - start > timeout) {
        std::string stalled;
        for (int r = 0; r < size_; ++r) {
          if (line(r).step.load(std::memory_order_acquire) < step) {
            stalled += (stalled.empty() ? "" : ", ") + describe_rank(r);
          }
        }
        fail(stalled + " of " + label() + " did not reach " + call.describe() + " within " +
             std::to_string(timeout_s_.load(std::memory_order_relaxed)) + " s while rank " + std::to_string(rank_) +
             " waited: it is stalled or issued different collectives; raise the timeout if it is only slow");
      }
    }
    behind = first_behind(step, behind);
    if (behind < 0) return;
  }
}

// The sleeper half of the pair described in step(). The order of the three accesses matters:
//  1. Read wake_word first (acquire). A bump it sees was made after the waker's step store
//     or abort publication, so by acquire/release the re-check in 3 sees that too; a bump it
//     misses changes the word, so FUTEX_WAIT (which compares the word to `seen` atomically
//     with queueing us) returns at once, or the FUTEX_WAKE that follows the bump finds us.
//  2. Announce the sleep (seq_cst RMW), so that a waker that publishes its step after this
//     point in S reads sleepers != 0 and wakes us.
//  3. Re-check the steps with seq_cst loads: an acquire load here is not enough, because the
//     C++ model (and arm64's ldapr, which may pass an earlier store to another address) lets
//     it read a step older than one published before our increment in S, the lost wake-up
//     of store buffering. abort_group() bumps wake_word unconditionally, so the abort flag
//     needs only the acquire of point 1: no second store-buffering pair there.
// On x86 all seq_cst loads are plain movs and the RMW a lock xadd, so the fix costs nothing;
// it is the sleep path anyway (a system call).
void ShmGroup::sleep_until_behind_moves(uint64_t step, int behind) {
  const uint32_t seen = header_->wake_word.load(std::memory_order_acquire);
  header_->sleepers.fetch_add(1, std::memory_order_seq_cst);
  if (first_behind(step, behind, std::memory_order_seq_cst) >= 0 &&
      !header_->abort_published.load(std::memory_order_acquire)) {
    const timespec slice{0, kSleepSliceNs};
    futex(&header_->wake_word, FUTEX_WAIT, seen, &slice);
  }
  // seq_cst, not relaxed: the count only lets wakers skip a system call, but a decrement that
  // became visible before the wait ended would let a waker skip us. The futex call is opaque to
  // the compiler, and this is the sleep path: the strongest order costs nothing measurable.
  header_->sleepers.fetch_sub(1, std::memory_order_seq_cst);
}

void ShmGroup::wake_sleepers() {
  // Release: a sleeper whose acquire read of wake_word sees this bump also sees what the waker
  // published before it (its step, or the abort reason). An RMW, so concurrent wakers never
  // lose each other's bumps (a lost bump could leave the word equal to a sleeper's `seen`).
  header_->wake_word.fetch_add(1, std::memory_order_release);
  futex(&header_->wake_word, FUTEX_WAKE, INT_MAX, nullptr);
}

void ShmGroup::check_peers_alive(uint64_t step, const Call& call) {
  for (int r = 0; r < size_; ++r) {
    // Only a proven exit fails the group: a peer whose liveness /proc cannot tell (Unknown)
    // is waited for like a live one, and the timeout ends the wait if it never arrives.
    if (line(r).step.load(std::memory_order_acquire) < step && process_liveness(line(r).process) == Liveness::Dead) {
      fail(describe_rank(r) + " of " + label() + " exited before " + call.describe() + " completed (rank " +
           std::to_string(rank_) + " waited for it); the group cannot continue: restart the job");
    }
  }
}

void ShmGroup::check_calls_agree(uint64_t step, const Call& call) {
  const uint64_t head = call.pack_head();
  for (int r = 0; r < size_; ++r) {
    const RankLine& peer = line(r);
    if (peer.call_head[step & 1] == head && peer.call_count[step & 1] == call.count) continue;
    const Call other = Call::unpack(peer.call_head[step & 1], peer.call_count[step & 1]);
    fail("ranks of " + label() + " issued different collectives: rank " + std::to_string(rank_) + " called " +
         call.describe() + " while rank " + std::to_string(r) + " called " + other.describe() +
         "; every rank of a group must issue the same collectives in the same order, with the same sizes, "
         "dtypes and ops");
  }
}

void ShmGroup::check_not_aborted() {
  // Acquire, pairing with the release in abort_group(): the reason and aborted_by are complete.
  if (!header_->abort_published.load(std::memory_order_acquire)) return;
  const int by = header_->aborted_by.load(std::memory_order_relaxed);
  broken_ = std::string(header_->abort_reason);
  throw CollectiveFailure("collective aborted because rank " + std::to_string(by) + " of " + label() +
                          " failed: " + broken_);
}

void ShmGroup::check_interruption(const std::string& waiting_in) {
  if (!interruption_check_) return;
  try {
    interruption_check_();
  } catch (...) {
    // Whatever it throws (KeyboardInterrupt through the bindings) goes to the caller unchanged;
    // the peers learn why this rank left instead of waiting for it until the timeout.
    abort_group(describe_rank(rank_) + " of " + label() + " was interrupted while waiting in " + waiting_in);
    throw;
  }
}

void ShmGroup::abort_group(const std::string& reason) {
  broken_ = reason;
  int32_t expected = -1;
  // Relaxed: the CAS only elects the one rank that writes abort_reason; what readers need is
  // published by the release store below (which the CAS is sequenced before).
  if (header_->aborted_by.compare_exchange_strong(expected, rank_, std::memory_order_relaxed)) {
    const size_t n = std::min(reason.size(), sizeof(header_->abort_reason) - 1);
    std::memcpy(header_->abort_reason, reason.data(), n);
    header_->abort_reason[n] = '\0';
    // seq_cst (a release would publish the reason): one half of a store-buffering pair with
    // all_reduce_zero_copy(), which stores `writing` and then loads this flag; see
    // wait_for_writers_to_stop().
    header_->abort_published.store(1, std::memory_order_seq_cst);
  }
  wake_sleepers();
}

void ShmGroup::fail(const std::string& reason) {
  abort_group(reason);
  throw CollectiveFailure(reason);
}

void ShmGroup::all_reduce(void* data, size_t count, DType dtype, ReduceOp op) {
  std::lock_guard<std::mutex> lock(mutex_);
  enter();
  const Call call{Collective::AllReduce, dtype, op, -1, count};
  const size_t element = dtype_size(dtype);
  if (count == 0) {
    step(call);
    return;
  }
  auto* bytes = static_cast<char*>(data);
  if (zero_copy_ && count * element >= kZeroCopyBytes && count * element < kZeroCopyMaxBytes) {
    all_reduce_zero_copy(bytes, count, element, dtype, op, call);
    return;
  }
  const size_t chunk = slot_bytes_ / element;
  for (size_t done = 0; done < count; done += chunk) {
    all_reduce_chunk(bytes + done * element, std::min(chunk, count - done), element, dtype, op, call);
  }
}

void ShmGroup::all_reduce_chunk(char* data, size_t count, size_t element, DType dtype, ReduceOp op,
                                const Call& call) {
  if (count * element <= kDirectReduceBytes) {
    // One step: every rank reduces the whole chunk from every rank's copy, in rank order.
    std::memcpy(slot(step_ + 1, rank_), data, count * element);
    const uint64_t gathered = step(call);
    for (int r = 0; r < size_; ++r) sources_[r] = r == rank_ ? data : slot(gathered, r);
    reduce(dtype, op, data, nullptr, sources_.data(), size_, count);
    return;
  }
  // Two steps: rank r reduces share r of the chunk (its own part straight from `data`) and
  // publishes the result; then every rank copies the shares it did not reduce.
  const size_t per_share = round_up((count + size_ - 1) / size_, 64 / element) * element;
  const size_t bytes = count * element;
  auto share_begin = [&](int r) { return std::min(bytes, r * per_share); };
  auto share_bytes = [&](int r) { return std::min(bytes, (r + 1) * per_share) - share_begin(r); };
  char* staged = slot(step_ + 1, rank_);
  for (int r = 0; r < size_; ++r) {
    if (r != rank_) std::memcpy(staged + share_begin(r), data + share_begin(r), share_bytes(r));
  }
  const uint64_t gathered = step(call);
  const size_t begin = share_begin(rank_);
  for (int r = 0; r < size_; ++r) sources_[r] = (r == rank_ ? data : slot(gathered, r)) + begin;
  char* published = slot(gathered + 1, rank_) + begin;
  reduce(dtype, op, data + begin, published, sources_.data(), size_, share_bytes(rank_) / element);
  const uint64_t reduced = step(call);
  for (int r = 0; r < size_; ++r) {
    if (r != rank_) std::memcpy(data + share_begin(r), slot(reduced, r) + share_begin(r), share_bytes(r));
  }
}

// Two steps, whatever the size. Each rank owns one share of the elements:
//  1. publish the tensor's address; then, piece by piece, read this rank's share of every peer's
//     tensor, reduce it (sources in rank order) into this rank's own tensor, and write the result
//     into every peer's tensor;
//  2. publish that the share is written; return once every rank has: every share of this tensor
//     is reduced, and no peer reads or writes it any more.
// Who touches what: share r of every rank's tensor is read and written by rank r alone, each
// piece read before it is written, so no two ranks touch one byte. Step 1 orders every rank's input before every read; step 2 orders every write
// before the owner returns (release stores of `step`, acquire loads of it, in step(); the kernel
// copies of process_vm_readv/writev are done when the call returns). A rank that leaves early
// (an abort, Ctrl-C) first waits for its peers to stop writing into its tensor.
//
// Pushing results into the peers (rather than each rank pulling the other shares after a second
// step) writes lines this rank has just read, so no line crosses cores twice per call: measured
// with benchmarks/engine_bandwidth.cpp (2 ranks, 1 MB), 49 us against 146 us for pulling.
void ShmGroup::all_reduce_zero_copy(char* data, size_t count, size_t element, DType dtype, ReduceOp op,
                                    const Call& call) {
  // Plain store: published by the release store of `step` in step(), read by peers after their
  // acquire of it, and rewritten (the other index) only at a later step (see step()).
  line(rank_).buffer[(step_ + 1) & 1] = reinterpret_cast<uintptr_t>(data);
  try {
    const uint64_t published = step(call);
    for (int r = 0; r < size_; ++r) {
      peer_buffers_[r] = reinterpret_cast<char*>(static_cast<uintptr_t>(line(r).buffer[published & 1]));
    }
    const size_t per_share = round_up((count + size_ - 1) / size_, 64 / element) * element;
    const size_t bytes = count * element;
    const size_t begin = std::min(bytes, rank_ * per_share), end = std::min(bytes, (rank_ + 1) * per_share);
    const size_t piece = scratch_.size() * sizeof(CacheLine) / size_;
    char* scratch = scratch_.data()->bytes;
    RankLine& mine = line(rank_);
    // seq_cst: the other half of the store-buffering pair with abort_group() (the flag, then
    // the abort check below; see wait_for_writers_to_stop()).
    mine.writing.store(1, std::memory_order_seq_cst);
    try {
      for (size_t at = begin; at < end; at += piece) {
        const size_t n = std::min(piece, end - at);
        for (int r = 0; r < size_; ++r) {
          if (r != rank_) read_peer(r, at, scratch + r * piece, n);
          sources_[r] = r == rank_ ? data + at : scratch + r * piece;
        }
        reduce(dtype, op, data + at, nullptr, sources_.data(), size_, n / element);
        // seq_cst, see above: a peer that left after aborting is never written.
        if (header_->abort_published.load(std::memory_order_seq_cst)) check_not_aborted();
        for (int r = 0; r < size_; ++r) {
          if (r != rank_) write_peer(r, at, data + at, n);
        }
      }
    } catch (...) {
      mine.writing.store(0, std::memory_order_release);
      throw;
    }
    // Release: a peer that sees 0 (acquire or stronger) sees our writes into its tensor done.
    mine.writing.store(0, std::memory_order_release);
    step(call);
  } catch (...) {
    // Every failure path aborts already (fail(), check_interruption(), or a peer's abort); this
    // covers anything else (std::bad_alloc), so that writers always learn that we leave.
    if (!header_->abort_published.load(std::memory_order_seq_cst)) {
      abort_group(describe_rank(rank_) + " of " + label() + " left an all_reduce on an unexpected error");
    }
    wait_for_writers_to_stop();
    throw;
  }
}

// Called once an abort is published (see the caller). A peer either saw that abort before writing
// its next piece, or had set `writing` before we read it here: the abort store, the peer's store
// of `writing` and its load of the abort flag, and our load of the flag (which reads the abort)
// and of `writing` below are all seq_cst, so they fall in one total order in which the peer's
// "writing = 1, then no abort yet" comes before the abort, which comes before our load of its
// `writing`: we see 1 and wait. Hence waiting for `writing` == 0 (or the peer's death) leaves no
// writer, and its release store of 0 orders its last write into our tensor before our return.
void ShmGroup::wait_for_writers_to_stop() {
  header_->abort_published.load(std::memory_order_seq_cst);  // reads 1: puts the abort before us in S
  const auto start = Clock::now();
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    while (line(r).writing.load(std::memory_order_seq_cst) != 0 && Clock::now() - start < kWritersStopLimit &&
           process_liveness(line(r).process) != Liveness::Dead) {
      ::sched_yield();
    }
  }
}

void ShmGroup::read_peer(int peer, size_t offset, void* out, size_t bytes) {
  iovec local{out, bytes};
  iovec remote{peer_buffers_[peer] + offset, bytes};
  const ssize_t done = ::process_vm_readv(line(peer).process.pid, &local, 1, &remote, 1, 0);
  if (done != static_cast<ssize_t>(bytes)) fail_peer_access(peer, "read", "process_vm_readv", done);
}

void ShmGroup::write_peer(int peer, size_t offset, const void* in, size_t bytes) {
  iovec local{const_cast<void*>(in), bytes};
  iovec remote{peer_buffers_[peer] + offset, bytes};
  const ssize_t done = ::process_vm_writev(line(peer).process.pid, &local, 1, &remote, 1, 0);
  if (done != static_cast<ssize_t>(bytes)) fail_peer_access(peer, "write", "process_vm_writev", done);
}

void ShmGroup::fail_peer_access(int peer, const char* verb, const char* call, ssize_t done) {
  const std::string why = done < 0 ? std::strerror(errno) : "only " + std::to_string(done) + " bytes";
  fail("rank " + std::to_string(rank_) + " of " + label() + " could not " + verb + " the tensor of " +
       describe_rank(peer) + " (" + call + ": " + why + "); the group cannot continue: restart the job");
}

void ShmGroup::all_gather(const void* in, void* out, size_t bytes, DType dtype) {
  std::lock_guard<std::mutex> lock(mutex_);
  enter();
  const Call call{Collective::AllGather, dtype, ReduceOp::Sum, -1, bytes};
  if (bytes == 0) {
    step(call);
    return;
  }
  const auto* input = static_cast<const char*>(in);
  auto* output = static_cast<char*>(out);
  for (size_t done = 0; done < bytes; done += slot_bytes_) {
    const size_t n = std::min(slot_bytes_, bytes - done);
    std::memcpy(slot(step_ + 1, rank_), input + done, n);
    const uint64_t gathered = step(call);
    for (int r = 0; r < size_; ++r) {
      std::memcpy(output + r * bytes + done, r == rank_ ? input + done : slot(gathered, r), n);
    }
  }
}

void ShmGroup::reduce_scatter(const void* in, void* out, size_t count, DType dtype, ReduceOp op) {
  std::lock_guard<std::mutex> lock(mutex_);
  enter();
  const Call call{Collective::ReduceScatter, dtype, op, -1, count};
  const size_t element = dtype_size(dtype);
  if (count == 0) {
    step(call);
    return;
  }
  // Each step moves `chunk` elements of every row: row r goes to rank r's part of the slot.
  const size_t chunk = slot_bytes_ / (element * size_);
  const auto* input = static_cast<const char*>(in);
  auto* output = static_cast<char*>(out);
  for (size_t done = 0; done < count; done += chunk) {
    const size_t n = std::min(chunk, count - done);
    char* mine = slot(step_ + 1, rank_);
    for (int r = 0; r < size_; ++r) {
      if (r != rank_) std::memcpy(mine + r * n * element, input + (r * count + done) * element, n * element);
    }
    const uint64_t gathered = step(call);
    for (int r = 0; r < size_; ++r) {
      sources_[r] = r == rank_ ? input + (rank_ * count + done) * element : slot(gathered, r) + rank_ * n * element;
    }
    reduce(dtype, op, output + done * element, nullptr, sources_.data(), size_, n);
  }
}

void ShmGroup::broadcast(void* data, size_t bytes, int root, DType dtype) {
  std::lock_guard<std::mutex> lock(mutex_);
  enter();
  if (root < 0 || root >= size_) {
    throw UnsupportedArgument("broadcast root " + std::to_string(root) + " is outside " + label());
  }
  const Call call{Collective::Broadcast, dtype, ReduceOp::Sum, root, bytes};
  if (bytes == 0) {
    step(call);
    return;
  }
  auto* buffer = static_cast<char*>(data);
  for (size_t done = 0; done < bytes; done += slot_bytes_) {
    const size_t n = std::min(slot_bytes_, bytes - done);
    if (rank_ == root) std::memcpy(slot(step_ + 1, root), buffer + done, n);
    const uint64_t published = step(call);
    if (rank_ != root) std::memcpy(buffer + done, slot(published, root), n);
  }
}

void ShmGroup::barrier() {
  std::lock_guard<std::mutex> lock(mutex_);
  enter();
  step(Call{Collective::Barrier, DType::Float32, ReduceOp::Sum, -1, 0});
}

void ShmGroup::announce_elsewhere(Collective collective, Elsewhere reason, uint64_t count, ReduceOp op, int root) {
  std::lock_guard<std::mutex> lock(mutex_);
  enter();
  Call call{collective, DType::Float32, op, root, count};
  call.elsewhere = static_cast<uint8_t>(reason);
  step(call);
}

}  // namespace nxd
