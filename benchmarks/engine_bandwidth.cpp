// The C++ engine's all_reduce bandwidth next to single-thread memcpy of the same bytes, measured
// in the same run, without Python: the numbers to profile (perf record) and to compare engine
// changes by.
//
//   build/cpp-none/engine_bandwidth [--ranks 2] [--rounds 7] [--dtype float32|bfloat16] [--sizes KB,KB,...]
//                                   [--slot-kb KB] [--staged | --zero-copy]
//
// Every size runs `rounds` rounds; a round times a batch of all_reduce calls (every rank) and
// then, while the peers wait in a barrier, a batch of memcpy calls of the same bytes in rank 0.
// Rank 0 prints, per size, the median time per call of each (the median over rounds of each
// round's median) and the ratio memcpy time / all_reduce time per round as median [min, max]:
// a ratio taken within one round is fair even when other processes load the machine. By default
// the group decides as users' groups do (ZeroCopy::IfFaster); --staged turns zero-copy off (every
// all_reduce through the segment), --zero-copy on wherever the processes can. Where more
// processes than cores compete, a rank waits for its descheduled peer at every step: `chrt -f 10`
// in front gives both ranks a core for the few seconds of a run (how the numbers in the engine's
// comments were taken).
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "errors.hpp"
#include "shm_group.hpp"
#include "shm_segment.hpp"

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  int ranks = 2;
  int rounds = 7;
  nxd::DType dtype = nxd::DType::Float32;
  size_t slot_bytes = nxd::GroupConfig{}.slot_bytes;
  nxd::ZeroCopy zero_copy = nxd::ZeroCopy::IfFaster;  // --staged: Never, --zero-copy: Always
  std::vector<size_t> sizes{4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20};
};

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const char* value = i + 1 < argc ? argv[i + 1] : nullptr;
    if (arg == "--ranks" && value) {
      options.ranks = std::atoi(value);
    } else if (arg == "--rounds" && value) {
      options.rounds = std::atoi(value);
    } else if (arg == "--dtype" && value) {
      const std::string name = value;
      if (name == "float32") options.dtype = nxd::DType::Float32;
      else if (name == "bfloat16") options.dtype = nxd::DType::BFloat16;
      else throw std::runtime_error("--dtype must be float32 or bfloat16");
    } else if (arg == "--staged") {
      options.zero_copy = nxd::ZeroCopy::Never;
      continue;
    } else if (arg == "--zero-copy") {
      options.zero_copy = nxd::ZeroCopy::Always;
      continue;
    } else if (arg == "--slot-kb" && value) {
      options.slot_bytes = std::strtoull(value, nullptr, 10) << 10;
    } else if (arg == "--sizes" && value) {
      options.sizes.clear();
      for (const char* p = value; *p;) {
        char* end = nullptr;
        options.sizes.push_back(std::strtoull(p, &end, 10) << 10);
        p = *end == ',' ? end + 1 : end;
      }
    } else {
      throw std::runtime_error("usage: engine_bandwidth [--ranks N] [--rounds N] [--dtype float32|bfloat16] "
                               "[--sizes KB,KB,...] [--slot-kb KB] [--staged | --zero-copy]");
    }
    ++i;
  }
  if (options.ranks < 2 || options.rounds < 1) throw std::runtime_error("--ranks >= 2 and --rounds >= 1");
  return options;
}

// Calls per timed batch: fewer for large buffers, so that every size takes about as long.
int calls_for(size_t bytes) { return static_cast<int>(std::clamp<size_t>((64 << 20) / bytes, 10, 2000)); }

// `bytes` of `fill`, 64-byte aligned.
class Buffer {
 public:
  Buffer(size_t bytes, int fill) : data_(static_cast<char*>(std::aligned_alloc(64, round_up(bytes)))) {
    if (data_ == nullptr) throw std::bad_alloc();
    std::memset(data_.get(), fill, bytes);
  }
  char* data() { return data_.get(); }

 private:
  static size_t round_up(size_t bytes) { return (bytes + 63) / 64 * 64; }
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> data_;
};

template <typename Fn>
double median_seconds(int calls, Fn&& fn) {
  std::vector<double> times(calls);
  for (int i = 0; i < calls; ++i) {
    const auto start = Clock::now();
    fn();
    times[i] = std::chrono::duration<double>(Clock::now() - start).count();
  }
  std::nth_element(times.begin(), times.begin() + calls / 2, times.end());
  return times[calls / 2];
}

double median(std::vector<double> values) {
  std::nth_element(values.begin(), values.begin() + values.size() / 2, values.end());
  return values[values.size() / 2];
}

std::unique_ptr<nxd::ShmGroup> join(const std::string& name, int rank, const Options& options) {
  const int ranks = options.ranks;
  nxd::GroupConfig config;
  config.segment = name;
  config.slot_bytes = options.slot_bytes;
  config.zero_copy = options.zero_copy;
  config.rank = rank;
  for (int r = 0; r < ranks; ++r) config.global_ranks.push_back(r);
  std::unique_ptr<nxd::ShmGroup> group;
  if (rank == 0) {
    group = nxd::ShmGroup::create(config);
  } else {
    while (!group) {
      try {
        group = nxd::ShmGroup::attach(config);
      } catch (const nxd::SegmentError&) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));  // rank 0 has not created it yet
      }
    }
  }
  group->wait_for_peers();
  return group;
}

void run_rank(const Options& options, const std::string& name, int rank) {
  auto group = join(name, rank, options);
  const size_t element = nxd::dtype_size(options.dtype);
  group->barrier();  // the first collective settles whether the group is zero-copy
  if (rank == 0) {
    std::printf("all_reduce (sum, %s), %d ranks, %u cores, %zu KB slots, zero-copy %s; median us per call; ratio = "
                "memcpy time / all_reduce time per round, median [min, max] of %d rounds\n",
                nxd::dtype_name(options.dtype), options.ranks, std::thread::hardware_concurrency(),
                options.slot_bytes >> 10, group->zero_copy() ? "on" : "off", options.rounds);
    std::printf("%8s | %10s | %10s | %12s | %12s | %s\n", "size", "all_reduce", "memcpy", "engine GB/s",
                "memcpy GB/s", "ratio");
  }
  for (size_t bytes : options.sizes) {
    const size_t count = bytes / element;
    // 64-byte aligned, like torch's CPU allocator. Zeros sum to zeros: no overflow over many calls.
    Buffer data(bytes, 0), source(bytes, 1), target(bytes, 2);
    const int calls = calls_for(bytes);
    auto all_reduce = [&] { group->all_reduce(data.data(), count, options.dtype, nxd::ReduceOp::Sum); };
    std::vector<double> engine, copy, ratio;
    for (int round = 0; round < options.rounds; ++round) {
      for (int i = 0; i < std::min(calls, 20); ++i) all_reduce();
      const double e = median_seconds(calls, all_reduce);
      group->barrier();
      if (rank == 0) {
        for (int i = 0; i < std::min(calls, 20); ++i) std::memcpy(target.data(), source.data(), bytes);
        const double c = median_seconds(calls, [&] { std::memcpy(target.data(), source.data(), bytes); });
        engine.push_back(e);
        copy.push_back(c);
        ratio.push_back(c / e);
      }
      group->barrier();
    }
    if (rank == 0) {
      const double e = median(engine), c = median(copy);
      std::printf("%6zu KB | %10.1f | %10.1f | %12.2f | %12.2f | %3.0f%% [%.0f%%, %.0f%%]\n", bytes >> 10, e * 1e6,
                  c * 1e6, bytes / e / 1e9, bytes / c / 1e9, median(ratio) * 100,
                  *std::min_element(ratio.begin(), ratio.end()) * 100,
                  *std::max_element(ratio.begin(), ratio.end()) * 100);
      std::fflush(stdout);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  try {
    options = parse(argc, argv);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return 2;
  }
  const std::string name = nxd::segment_name("bench" + std::to_string(std::random_device{}() % 1000000));
  std::fflush(nullptr);
  std::vector<pid_t> children;
  for (int rank = 0; rank < options.ranks; ++rank) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      int status = 0;
      try {
        run_rank(options, name, rank);
      } catch (const std::exception& error) {
        std::fprintf(stderr, "rank %d: %s\n", rank, error.what());
        status = 1;
      }
      std::fflush(nullptr);
      ::_exit(status);
    }
    children.push_back(pid);
  }
  int failed = 0;
  for (pid_t child : children) {
    int status = 0;
    ::waitpid(child, &status, 0);
    failed |= !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  return failed;
}
