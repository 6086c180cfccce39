// The engine with real processes: every collective against a reference, chunking, several
// groups at once, and the failure cases (dead peer, stalled peer, mismatched calls, leftovers).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>

#include <cmath>
#include <functional>
#include <sstream>

#include "ranks.hpp"
#include "typed_buffer.hpp"

namespace nxd::testing {
namespace {

// Small slots so that modest tensors already take several chunks.
constexpr size_t kSmallSlot = 16 << 10;

std::string describe(DType dtype, size_t count, int world) {
  std::ostringstream text;
  text << dtype_name(dtype) << " count=" << count << " world=" << world;
  return text.str();
}

bool segment_exists(const std::string& name) {
  struct stat st {};
  return ::stat(("/dev/shm" + name).c_str(), &st) == 0;
}

// Whether this machine lets processes read each other's memory (process_vm_readv between a
// parent and its child): where it does not, groups fall back to copying through the segment.
bool processes_can_read_each_other() {
  static const bool can = [] {
    const std::string name = fresh_segment_name();
    return all_zero(run_checks(2, [&](int rank) -> std::string {
      auto group = join_group(name, rank, iota_ranks(2));
      group->barrier();  // the first collective runs through the segment and settles the choice
      return group->zero_copy() ? "" : "no zero-copy";
    }));
  }();
  return can;
}

TEST(ShmGroup, AllReduceSumAndMaxMatchTheReferenceForEveryDTypeSizeAndWorld) {
  const bool can_read = processes_can_read_each_other();
  for (const bool zero_copy : {true, false}) {
    for (int world : {2, 3, 4}) {
      const std::string name = fresh_segment_name();
      const auto statuses = run_checks(world, [&](int rank) -> std::string {
        auto group = join_group(name, rank, iota_ranks(world), kSmallSlot, 30, zero_copy);
        group->barrier();
        if (group->zero_copy() != (zero_copy && can_read)) return "unexpected zero-copy state";
        // 0 elements, odd sizes, one chunk below the direct-reduce limit and several above it,
        // zero-copy above 16 KB and in several pieces (256 KB of pieces over the peers) at 200003.
        for (size_t count : {size_t{0}, size_t{1}, size_t{7}, size_t{1001}, size_t{12289}, size_t{3 * 4096 + 5},
                             size_t{200003}}) {
          for (DType dtype : kAllDTypes) {
            for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Max}) {
              TypedBuffer buffer(dtype, count);
              for (size_t i = 0; i < count; ++i) buffer.set(i, test_value(rank, i));
              group->all_reduce(buffer.data(), count, dtype, op);
              for (size_t i = 0; i < count; ++i) {
                double expected = op == ReduceOp::Sum ? 0 : -1e30;
                for (int r = 0; r < world; ++r) {
                  expected = op == ReduceOp::Sum ? expected + test_value(r, i) : std::max(expected, test_value(r, i));
                }
                if (buffer.get(i) != expected) {
                  return describe(dtype, count, world) + " " + reduce_op_name(op) + ": element " + std::to_string(i) +
                         " is " + std::to_string(buffer.get(i)) + ", expected " + std::to_string(expected);
                }
              }
            }
          }
        }
        return "";
      });
      EXPECT_TRUE(all_zero(statuses)) << "world " << world << (zero_copy ? ", zero-copy" : ", through the segment");
    }
  }
}

// An fp32 all_reduce of 100000 elements (zero-copy where the group is) in a group of 3: "" if
// the sum is right on this rank, else what is wrong.
std::string sums_of_three_ranks(ShmGroup& group, int rank) {
  TypedBuffer buffer(DType::Float32, 100000);
  for (size_t i = 0; i < buffer.count(); ++i) buffer.set(i, test_value(rank, i));
  group.all_reduce(buffer.data(), buffer.count(), DType::Float32, ReduceOp::Sum);
  for (size_t i = 0; i < buffer.count(); ++i) {
    if (buffer.get(i) != test_value(0, i) + test_value(1, i) + test_value(2, i)) return "wrong sum";
  }
  return "";
}

TEST(ShmGroup, ZeroCopyOnlyWhenEveryRankCanAndWants) {
  if (!processes_can_read_each_other()) GTEST_SKIP() << "process_vm_readv is not permitted here";
  const int world = 3;
  const std::string name = fresh_segment_name();
  const auto statuses = run_checks(world, [&](int rank) -> std::string {
    // Rank 1 opts out (as a rank whose probe failed would): all three copy through the segment.
    auto group = join_group(name, rank, iota_ranks(world), kSmallSlot, 30, rank != 1);
    group->barrier();
    if (group->zero_copy()) return "zero-copy although rank 1 opted out";
    return sums_of_three_ranks(*group, rank);
  });
  EXPECT_TRUE(all_zero(statuses));
}

TEST(ShmGroup, IfFasterZeroCopyFollowsTheMeasuredKernelCopiesOnEveryRank) {
  if (!processes_can_read_each_other()) GTEST_SKIP() << "process_vm_readv is not permitted here";
  const int world = 3;
  // Per rank, the most memcpys a kernel copy may cost: no copy is free (limit 0), every copy is
  // within 1e9; one rank that measures too slow turns it off for all.
  const std::vector<std::pair<std::vector<double>, bool>> cases{
      {{1e9, 1e9, 1e9}, true}, {{0, 0, 0}, false}, {{1e9, 0, 1e9}, false}};
  for (const auto& [limits, expected] : cases) {
    const std::string name = fresh_segment_name();
    const auto statuses = run_checks(world, [&](int rank) -> std::string {
      GroupConfig config;
      config.segment = name;
      config.rank = rank;
      config.global_ranks = iota_ranks(world);
      config.slot_bytes = kSmallSlot;
      config.zero_copy = ZeroCopy::IfFaster;
      config.kernel_copy_limit = limits[rank];
      auto group = join_group(config);
      group->barrier();
      if (group->zero_copy() != expected) return expected ? "no zero-copy" : "zero-copy";
      return sums_of_three_ranks(*group, rank);
    });
    EXPECT_TRUE(all_zero(statuses)) << "limits " << limits[0] << ", " << limits[1] << ", " << limits[2];
  }
}

TEST(ShmGroup, AllReducesAboveTheZeroCopyRangeMatchTheReference) {
  // 8 MB and more run through the segment even where the group is zero-copy (1 MiB slots here).
  const std::string name = fresh_segment_name();
  const auto statuses = run_checks(2, [&](int rank) -> std::string {
    auto group = join_group(name, rank, iota_ranks(2));
    for (DType dtype : {DType::Float32, DType::Float64}) {
      const size_t count = (8 << 20) / dtype_size(dtype) + 1001;
      TypedBuffer buffer(dtype, count);
      for (size_t i = 0; i < count; ++i) buffer.set(i, test_value(rank, i));
      group->all_reduce(buffer.data(), count, dtype, ReduceOp::Sum);
      for (size_t i = 0; i < count; ++i) {
        if (buffer.get(i) != test_value(0, i) + test_value(1, i)) return describe(dtype, count, 2);
      }
    }
    return "";
  });
  EXPECT_TRUE(all_zero(statuses));
}

TEST(ShmGroup, AllReduceOfInexactValuesIsBitIdenticalOnEveryRank) {
  const int world = 3;
  const std::string name = fresh_segment_name();
  const auto statuses = run_checks(world, [&](int rank) -> std::string {
    auto group = join_group(name, rank, iota_ranks(world), kSmallSlot);
    std::mt19937 random(1234 + rank);
    std::uniform_real_distribution<double> uniform(-1, 1);
    for (DType dtype : kAllDTypes) {
      for (size_t count : {size_t{513}, size_t{20000}, size_t{150001}}) {
        TypedBuffer buffer(dtype, count);
        for (size_t i = 0; i < count; ++i) buffer.set(i, uniform(random) / 3);
        group->all_reduce(buffer.data(), count, dtype, ReduceOp::Sum);
        std::vector<unsigned char> every(buffer.nbytes() * world);
        group->all_gather(buffer.data(), every.data(), buffer.nbytes(), dtype);
        for (int r = 0; r < world; ++r) {
          if (std::memcmp(every.data() + r * buffer.nbytes(), buffer.data(), buffer.nbytes()) != 0) {
            return describe(dtype, count, world) + ": rank " + std::to_string(r) + " got different bits";
          }
        }
      }
    }
    return "";
  });
  EXPECT_TRUE(all_zero(statuses));
}

TEST(ShmGroup, AllGatherReduceScatterAndBroadcastMatchTheReference) {
  for (int world : {2, 4}) {
    const std::string name = fresh_segment_name();
    const auto statuses = run_checks(world, [&](int rank) -> std::string {
      auto group = join_group(name, rank, iota_ranks(world), kSmallSlot);
      for (size_t count : {size_t{0}, size_t{3}, size_t{4097}, size_t{9000}}) {
        for (DType dtype : kAllDTypes) {
          // all_gather: rank r's buffer lands at row r.
          TypedBuffer mine(dtype, count), gathered(dtype, count * world);
          for (size_t i = 0; i < count; ++i) mine.set(i, test_value(rank, i));
          group->all_gather(mine.data(), gathered.data(), mine.nbytes(), dtype);
          for (int r = 0; r < world; ++r) {
            for (size_t i = 0; i < count; ++i) {
              if (gathered.get(r * count + i) != test_value(r, i)) {
                return "all_gather " + describe(dtype, count, world) + " row " + std::to_string(r);
              }
            }
          }
          // reduce_scatter: row q of every rank's input is summed into rank q's output.
          TypedBuffer rows(dtype, count * world), out(dtype, count);
          for (int q = 0; q < world; ++q) {
            for (size_t i = 0; i < count; ++i) rows.set(q * count + i, test_value(rank + q, i));
          }
          group->reduce_scatter(rows.data(), out.data(), count, dtype, ReduceOp::Sum);
          for (size_t i = 0; i < count; ++i) {
            double expected = 0;
            for (int r = 0; r < world; ++r) expected += test_value(r + rank, i);
            if (out.get(i) != expected) return "reduce_scatter " + describe(dtype, count, world);
          }
          // broadcast from the last rank.
          TypedBuffer data(dtype, count);
          for (size_t i = 0; i < count; ++i) data.set(i, test_value(rank, i));
          group->broadcast(data.data(), data.nbytes(), world - 1, dtype);
          for (size_t i = 0; i < count; ++i) {
            if (data.get(i) != test_value(world - 1, i)) return "broadcast " + describe(dtype, count, world);
          }
        }
      }
      group->barrier();
      return "";
    });
    EXPECT_TRUE(all_zero(statuses)) << "world " << world;
  }
}

// Rows of a reduce-scatter (row q of rank `rank` holds test_value(rank + q, i)) and the reduction
// of row `rank` over a world, as the engine must compute it.
void fill_rows(TypedBuffer& rows, int rank, int world, size_t count) {
  for (int q = 0; q < world; ++q) {
    for (size_t i = 0; i < count; ++i) rows.set(q * count + i, test_value(rank + q, i));
  }
}

double reduced_row_value(ReduceOp op, int rank, int world, size_t i) {
  double expected = op == ReduceOp::Sum ? 0 : -1e30;
  for (int r = 0; r < world; ++r) {
    const double value = test_value(r + rank, i);
    expected = op == ReduceOp::Sum ? expected + value : std::max(expected, value);
  }
  return expected;
}

TEST(ShmGroup, ReduceScatterInPlaceOrNotAndBroadcastFromAnyRootMatchTheReference) {
  for (int world : {2, 3, 4}) {
    const std::string name = fresh_segment_name();
    const auto statuses = run_checks(world, [&](int rank) -> std::string {
      auto group = join_group(name, rank, iota_ranks(world), kSmallSlot);
      // One step, and several 16 KB slots.
      for (size_t count : {size_t{1}, size_t{7}, size_t{1001}, size_t{4097}, size_t{70001}}) {
        for (DType dtype : kAllDTypes) {
          for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Max}) {
            for (const bool in_place : {false, true}) {
              const std::string what = describe(dtype, count, world) + " " + reduce_op_name(op) +
                                       (in_place ? " in place" : "");
              TypedBuffer rows(dtype, count * world), separate(dtype, count);
              fill_rows(rows, rank, world, count);
              char* out = in_place ? static_cast<char*>(rows.data()) + rank * count * dtype_size(dtype)
                                   : static_cast<char*>(separate.data());
              group->reduce_scatter(rows.data(), out, count, dtype, op);
              const TypedBuffer& result = in_place ? rows : separate;
              const size_t first = in_place ? rank * count : 0;
              for (size_t i = 0; i < count; ++i) {
                if (result.get(first + i) != reduced_row_value(op, rank, world, i)) {
                  return "reduce_scatter " + what + ": element " + std::to_string(i);
                }
              }
              // The other rows of the input stay as they were.
              for (int q = 0; q < world; ++q) {
                for (size_t i = 0; q != rank && i < count; ++i) {
                  if (rows.get(q * count + i) != test_value(rank + q, i)) return "reduce_scatter " + what + " input";
                }
              }
            }
          }
          const int root = static_cast<int>(count % world);
          TypedBuffer data(dtype, count);
          for (size_t i = 0; i < count; ++i) data.set(i, test_value(rank, i));
          group->broadcast(data.data(), data.nbytes(), root, dtype);
          for (size_t i = 0; i < count; ++i) {
            if (data.get(i) != test_value(root, i)) {
              return "broadcast from " + std::to_string(root) + " " + describe(dtype, count, world);
            }
          }
        }
      }
      return "";
    });
    EXPECT_TRUE(all_zero(statuses)) << "world " << world;
  }
}

TEST(ShmGroup, SeveralGroupsOfOneJobWorkInterleaved) {
  // Four ranks: "TP" groups [0, 1] and [2, 3], "DP" groups [0, 2] and [1, 3], all alive.
  const std::string tp_names[] = {fresh_segment_name(), fresh_segment_name()};
  const std::string dp_names[] = {fresh_segment_name(), fresh_segment_name()};
  const auto statuses = run_checks(4, [&](int rank) -> std::string {
    const int tp = rank / 2, dp = rank % 2;
    auto tp_group = join_group(tp_names[tp], rank % 2, {2 * tp, 2 * tp + 1});
    auto dp_group = join_group(dp_names[dp], rank / 2, {dp, dp + 2});
    for (int round = 0; round < 50; ++round) {
      float tp_value = static_cast<float>(rank + round), dp_value = static_cast<float>(10 * rank + round);
      tp_group->all_reduce(&tp_value, 1, DType::Float32, ReduceOp::Sum);
      dp_group->all_reduce(&dp_value, 1, DType::Float32, ReduceOp::Sum);
      const float tp_expected = static_cast<float>(2 * tp + 2 * tp + 1 + 2 * round);
      const float dp_expected = static_cast<float>(10 * dp + 10 * (dp + 2) + 2 * round);
      if (tp_value != tp_expected || dp_value != dp_expected) return "round " + std::to_string(round);
    }
    return "";
  });
  EXPECT_TRUE(all_zero(statuses));
}

TEST(ShmGroup, RanksAsThreadsOfOneProcess) {
  const std::string name = fresh_segment_name();
  const int world = 3;
  std::vector<std::string> failures(world);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < world; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        auto group = join_group(name, rank, iota_ranks(world), kSmallSlot);
        std::vector<double> data(5000, rank + 1.0);
        for (int round = 0; round < 20; ++round) {
          std::fill(data.begin(), data.end(), rank + 1.0);
          group->all_reduce(data.data(), data.size(), DType::Float64, ReduceOp::Sum);
          if (data.front() != 6.0 || data.back() != 6.0) failures[rank] = "wrong sum";
        }
      } catch (const std::exception& error) {
        failures[rank] = error.what();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int rank = 0; rank < world; ++rank) EXPECT_EQ(failures[rank], "") << "rank " << rank;
}

TEST(ShmGroup, SegmentIsPrivateAndItsNameIsGoneOnceEveryRankAttached) {
  const std::string name = fresh_segment_name();
  GroupConfig config;
  config.segment = name;
  config.global_ranks = {0, 1};
  auto creator = ShmGroup::create(config);
  struct stat st {};
  ASSERT_EQ(::stat(("/dev/shm" + name).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600);
  config.rank = 1;
  auto peer = ShmGroup::attach(config);
  creator->wait_for_peers();
  EXPECT_FALSE(segment_exists(name));
  float value = 1;
  peer->wait_for_peers();
  std::thread other([&] {
    float mine = 2;
    peer->all_reduce(&mine, 1, DType::Float32, ReduceOp::Sum);
  });
  creator->all_reduce(&value, 1, DType::Float32, ReduceOp::Sum);
  other.join();
  EXPECT_EQ(value, 3.0f);
}

TEST(ShmGroup, DeadPeerIsNamedInTheErrorInsteadOfWaitingForTheTimeout) {
  const std::string name = fresh_segment_name();
  const auto statuses = run_ranks(2, [&](int rank) {
    auto group = join_group(name, rank, {5, 9}, 1 << 20, /*timeout_s=*/60);
    group->barrier();
    if (rank == 1) ::kill(::getpid(), SIGKILL);
    float value = 1;
    try {
      group->all_reduce(&value, 1, DType::Float32, ReduceOp::Sum);
    } catch (const CollectiveFailure& failure) {
      // "exited" comes from the liveness check, not from the (60 s) timeout.
      const std::string message = failure.what();
      const bool named = message.find("rank 1 (global rank 9") != std::string::npos &&
                         message.find("exited") != std::string::npos && message.find("[5, 9]") != std::string::npos;
      if (!named) std::fprintf(stderr, "unexpected failure: %s\n", message.c_str());
      return named ? 0 : 1;
    }
    return 2;
  });
  EXPECT_EQ(statuses[0], 0);
  EXPECT_EQ(statuses[1], 128 + SIGKILL);
  EXPECT_FALSE(segment_exists(name));
}

TEST(ShmGroup, StalledPeerTimesOutAndThePeerThenSeesTheAbort) {
  const std::string name = fresh_segment_name();
  const auto statuses = run_ranks(2, [&](int rank) {
    auto group = join_group(name, rank, iota_ranks(2), 1 << 20, /*timeout_s=*/0.5);
    if (rank == 1) std::this_thread::sleep_for(std::chrono::seconds(2));
    float value = 1;
    try {
      group->all_reduce(&value, 1, DType::Float32, ReduceOp::Sum);
    } catch (const CollectiveFailure& failure) {
      const std::string message = failure.what();
      const char* expected = rank == 0 ? "rank 1 (global rank 1" : "aborted because rank 0";
      if (message.find(expected) == std::string::npos) std::fprintf(stderr, "unexpected: %s\n", message.c_str());
      if (message.find(expected) == std::string::npos) return 1;
      // The group stays unusable: later calls fail at once instead of hanging.
      try {
        group->barrier();
      } catch (const CollectiveFailure&) {
        return 0;
      }
      return 3;
    }
    return 2;
  });
  EXPECT_EQ(statuses[0], 0);
  EXPECT_EQ(statuses[1], 0);
}

TEST(ShmGroup, MismatchedCollectivesFailOnEveryRankInsteadOfCorruptingData) {
  const std::string name = fresh_segment_name();
  const auto statuses = run_ranks(2, [&](int rank) {
    auto group = join_group(name, rank, iota_ranks(2), 1 << 20, /*timeout_s=*/10);
    std::vector<float> data(rank == 0 ? 100 : 200, 1.0f);
    try {
      group->all_reduce(data.data(), data.size(), DType::Float32, ReduceOp::Sum);
      group->barrier();
    } catch (const CollectiveFailure& failure) {
      const std::string message = failure.what();
      return message.find("issued different collectives") != std::string::npos ? 0 : 1;
    }
    return 2;
  });
  EXPECT_EQ(statuses[0], 0);
  EXPECT_EQ(statuses[1], 0);
}

TEST(ShmGroup, AnnouncementsAgreeWithPeersThatDoTheSameAndFailThoseThatRunTheCallHere) {
  const std::string name = fresh_segment_name();
  const auto statuses = run_ranks(2, [&](int rank) {
    auto group = join_group(name, rank, iota_ranks(2), 1 << 20, /*timeout_s=*/10);
    // Both ranks run the call elsewhere: one agreed step, and the group keeps working.
    group->announce_elsewhere(Collective::AllReduce, Elsewhere::OtherEngine, 6, ReduceOp::Sum, -1);
    float value = 1;
    group->all_reduce(&value, 1, DType::Float32, ReduceOp::Sum);
    if (value != 2) return 3;
    // Rank 0 runs the next call elsewhere, rank 1 here: both fail at once, each naming rank 0's choice.
    try {
      std::vector<float> data(6, 1.0f);
      if (rank == 0) {
        group->announce_elsewhere(Collective::AllReduce, Elsewhere::OtherEngine, 6, ReduceOp::Sum, -1);
      } else {
        group->all_reduce(data.data(), data.size(), DType::Float32, ReduceOp::Sum);
      }
    } catch (const CollectiveFailure& failure) {
      const std::string message = failure.what();
      if (message.find("all_reduce(sum, 6 elements) on torch.distributed") == std::string::npos) {
        std::fprintf(stderr, "rank %d: unexpected failure: %s\n", rank, message.c_str());
        return 1;
      }
      return 0;
    }
    return 2;
  });
  EXPECT_EQ(statuses[0], 0);
  EXPECT_EQ(statuses[1], 0);
}

struct Interrupted {};

TEST(ShmGroup, InterruptionCheckEndsAWaitAndThePeerLearnsWhy) {
  const std::string name = fresh_segment_name();
  const auto statuses = run_ranks(2, [&](int rank) {
    auto group = join_group(name, rank, {4, 6}, 1 << 20, /*timeout_s=*/60);
    float value = 1;
    if (rank == 0) {
      // The check throws the first time the waiting rank runs it, long before the peer arrives.
      group->set_interruption_check([] { throw Interrupted{}; });
      try {
        group->all_reduce(&value, 1, DType::Float32, ReduceOp::Sum);
      } catch (const Interrupted&) {
        return 0;
      }
      return 2;  // the wait ended only because the peer arrived
    }
    std::this_thread::sleep_for(std::chrono::seconds(3));
    try {
      group->all_reduce(&value, 1, DType::Float32, ReduceOp::Sum);
    } catch (const CollectiveFailure& failure) {
      const std::string message = failure.what();
      const bool named = message.find("rank 0 (global rank 4") != std::string::npos &&
                         message.find("was interrupted while waiting in all_reduce") != std::string::npos;
      if (!named) std::fprintf(stderr, "unexpected failure: %s\n", message.c_str());
      return named ? 0 : 1;
    }
    return 3;
  });
  EXPECT_EQ(statuses[0], 0);
  EXPECT_EQ(statuses[1], 0);
  EXPECT_FALSE(segment_exists(name));
}

TEST(ShmGroup, InterruptedSetUpLeavesNoSegment) {
  const std::string name = fresh_segment_name();
  GroupConfig config;
  config.segment = name;
  config.global_ranks = {0, 1};
  config.timeout_s = 60;
  auto creator = ShmGroup::create(config);
  creator->set_interruption_check([] { throw Interrupted{}; });
  EXPECT_THROW(creator->wait_for_peers(), Interrupted);  // the peer never attaches: only the check ends the wait
  EXPECT_FALSE(segment_exists(name));
}

TEST(ShmGroup, RankThatNeverAttachesFailsSetUpAndLeavesNoSegment) {
  const std::string name = fresh_segment_name();
  GroupConfig config;
  config.segment = name;
  config.global_ranks = {0, 1};
  config.timeout_s = 0.2;
  auto creator = ShmGroup::create(config);
  try {
    creator->wait_for_peers();
    ADD_FAILURE() << "wait_for_peers returned without the peer";
  } catch (const CollectiveFailure& failure) {
    EXPECT_NE(std::string(failure.what()).find("did not attach"), std::string::npos) << failure.what();
  }
  EXPECT_FALSE(segment_exists(name));
}

TEST(ShmSegment, OrphanOfADeadCreatorIsRemovedByTheNextRun) {
  // A child creates a segment and dies before any peer attached: its name is left behind.
  int channel[2];
  ASSERT_EQ(::pipe(channel), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    const std::string name = segment_name("orphan");
    SharedSegment segment = SharedSegment::create(name, 4096);
    ssize_t written = ::write(channel[1], name.c_str(), name.size());
    ::_exit(written > 0 ? 0 : 1);
  }
  char buffer[256] = {};
  ASSERT_GT(::read(channel[0], buffer, sizeof(buffer) - 1), 0);
  int status = 0;
  ::waitpid(child, &status, 0);
  const std::string orphan = buffer;
  ASSERT_TRUE(segment_exists(orphan));
  EXPECT_GE(remove_orphaned_segments(), 1);
  EXPECT_FALSE(segment_exists(orphan));
  ::close(channel[0]);
  ::close(channel[1]);
}

TEST(ShmGroup, RejectsBadConfiguration) {
  GroupConfig config;
  config.segment = fresh_segment_name();
  config.global_ranks = {0, 1};
  config.rank = 2;
  EXPECT_THROW(ShmGroup::create(config), UnsupportedArgument);
  config.rank = 0;
  config.slot_bytes = 1000;
  EXPECT_THROW(ShmGroup::create(config), UnsupportedArgument);
  config.slot_bytes = 1 << 20;
  config.kernel_copy_limit = -1;
  EXPECT_THROW(ShmGroup::create(config), UnsupportedArgument);
  EXPECT_FALSE(segment_exists(config.segment));
}

}  // namespace
}  // namespace nxd::testing
