// Test helpers: run a body in several forked processes, one per rank, sharing one group.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "errors.hpp"
#include "shm_group.hpp"
#include "shm_segment.hpp"

namespace nxd::testing {

// A fresh segment name for one test group.
inline std::string fresh_segment_name() {
  static std::mt19937_64 random(std::random_device{}());
  return segment_name("t" + std::to_string(random() % 1000000000000ULL));
}

inline std::vector<int> iota_ranks(int size, int first = 0) {
  std::vector<int> ranks(size);
  for (int r = 0; r < size; ++r) ranks[r] = first + r;
  return ranks;
}

// Rank 0 creates the segment; the others attach once it exists. All wait for each other.
inline std::unique_ptr<ShmGroup> join_group(GroupConfig config) {
  const int rank = config.rank;
  std::unique_ptr<ShmGroup> group;
  if (rank == 0) {
    group = ShmGroup::create(config);
  } else {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (!group) {
      try {
        group = ShmGroup::attach(config);
      } catch (const SegmentError&) {
        // Not created (or not initialized) yet: rank 0 runs concurrently.
        if (std::chrono::steady_clock::now() > deadline) throw;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
  }
  group->wait_for_peers();
  return group;
}

// join_group of a group that copies through the segment (zero_copy false) or reads and writes
// peers' tensors wherever it can (true: ZeroCopy::Always, whatever the kernel's copies cost).
inline std::unique_ptr<ShmGroup> join_group(const std::string& name, int rank, const std::vector<int>& global_ranks,
                                            size_t slot_bytes = 1 << 20, double timeout_s = 30,
                                            bool zero_copy = true) {
  GroupConfig config;
  config.zero_copy = zero_copy ? ZeroCopy::Always : ZeroCopy::Never;
  config.segment = name;
  config.rank = rank;
  config.global_ranks = global_ranks;
  config.slot_bytes = slot_bytes;
  config.timeout_s = timeout_s;
  return join_group(config);
}

// The exit status a rank reports when its body threw.
constexpr int kThrew = 100;

// Runs body(rank) in `world` forked processes and returns each one's exit status (the body's
// return value, kThrew if it threw, 128 + signal if it was killed). Failures are printed.
inline std::vector<int> run_ranks(int world, const std::function<int(int)>& body) {
  std::fflush(nullptr);
  std::vector<pid_t> children;
  for (int rank = 0; rank < world; ++rank) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      int status = kThrew;
      try {
        status = body(rank);
      } catch (const std::exception& error) {
        std::fprintf(stderr, "rank %d threw: %s\n", rank, error.what());
      }
      std::fflush(nullptr);
      ::_exit(status);
    }
    children.push_back(pid);
  }
  std::vector<int> statuses;
  for (pid_t child : children) {
    int status = 0;
    ::waitpid(child, &status, 0);
    statuses.push_back(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
  }
  return statuses;
}

// Runs `check(rank)` that returns an empty string on success or a description of the failure.
inline std::vector<int> run_checks(int world, const std::function<std::string(int)>& check) {
  return run_ranks(world, [&](int rank) {
    const std::string failure = check(rank);
    if (failure.empty()) return 0;
    std::fprintf(stderr, "rank %d: %s\n", rank, failure.c_str());
    return 1;
  });
}

inline bool all_zero(const std::vector<int>& statuses) {
  for (int status : statuses) {
    if (status != 0) return false;
  }
  return true;
}

}  // namespace nxd::testing
