// Python bindings of the C++ core: the shared-memory collective engine.
// Tensors arrive through DLPack (nanobind ndarray) and are used in place, never copied;
// the GIL is released while a collective runs, and retaken only by the interruption check
// while a rank waits, so that Ctrl-C raises KeyboardInterrupt there instead of after the wait.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <iterator>
#include <string>

#include "errors.hpp"
#include "shm_group.hpp"
#include "shm_segment.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using CpuTensor = nb::ndarray<nb::device::cpu, nb::c_contig>;

std::string describe_dtype(const nb::dlpack::dtype& dtype) {
  // Indexed by DLPack's type code (nb::dlpack::dtype_code); 3 is OpaqueHandle.
  static constexpr const char* codes[] = {"int", "uint", "float", "?", "bfloat", "complex", "bool"};
  const std::string code =
      dtype.code < std::size(codes) ? codes[dtype.code] : "dlpack code " + std::to_string(dtype.code) + " ";
  return code + std::to_string(dtype.bits);
}

nxd::DType engine_dtype(const CpuTensor& tensor) {
  const nb::dlpack::dtype dtype = tensor.dtype();
  if (dtype.lanes == 1) {
    if (dtype.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float)) {
      if (dtype.bits == 32) return nxd::DType::Float32;
      if (dtype.bits == 64) return nxd::DType::Float64;
      if (dtype.bits == 16) return nxd::DType::Float16;
    }
    if (dtype.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && dtype.bits == 16) {
      return nxd::DType::BFloat16;
    }
  }
  throw nb::type_error(("the shared-memory engine runs float32, float64, bfloat16 and float16 tensors, not " +
                        describe_dtype(dtype) + "; cast the tensor or use the torch backend")
                           .c_str());
}

nxd::ReduceOp reduce_op(const std::string& name) {
  if (name == "sum") return nxd::ReduceOp::Sum;
  if (name == "max") return nxd::ReduceOp::Max;
  throw nb::value_error(("reduce op must be 'sum' or 'max', got '" + name + "'").c_str());
}

nxd::Collective collective_named(const std::string& name) {
  if (name == "all_reduce") return nxd::Collective::AllReduce;
  if (name == "all_gather") return nxd::Collective::AllGather;
  if (name == "reduce_scatter") return nxd::Collective::ReduceScatter;
  if (name == "broadcast") return nxd::Collective::Broadcast;
  if (name == "barrier") return nxd::Collective::Barrier;
  throw nb::value_error(("unknown collective '" + name + "'").c_str());
}

nxd::Elsewhere elsewhere_named(const std::string& name) {
  if (name == "other_engine") return nxd::Elsewhere::OtherEngine;
  if (name == "invalid_input") return nxd::Elsewhere::InvalidInput;
  throw nb::value_error(("reason must be 'other_engine' or 'invalid_input', got '" + name + "'").c_str());
}

// Runs Python's handlers of pending signals (the default SIGINT handler raises KeyboardInterrupt)
// from a rank that waits with the GIL released; the exception travels through the engine as
// nb::python_error and nanobind raises it again in Python. Signals run only in the main thread.
void raise_pending_signals() {
  nb::gil_scoped_acquire acquire;
  if (PyErr_CheckSignals() != 0) throw nb::python_error();
}

std::unique_ptr<nxd::ShmGroup> interruptible(std::unique_ptr<nxd::ShmGroup> group) {
  group->set_interruption_check(&raise_pending_signals);
  return group;
}

nxd::GroupConfig make_config(const std::string& segment, int rank, const std::vector<int>& global_ranks,
                             size_t slot_bytes, double timeout_s) {
  nxd::GroupConfig config;
  config.segment = segment;
  config.rank = rank;
  config.global_ranks = global_ranks;
  config.slot_bytes = slot_bytes;
  config.timeout_s = timeout_s;
  return config;
}

void check_same_dtype(const CpuTensor& a, const CpuTensor& b, const char* what) {
  if (a.dtype() != b.dtype()) throw nb::type_error((std::string(what) + ": input and output dtypes differ").c_str());
}

void all_gather(nxd::ShmGroup& group, const CpuTensor& input, CpuTensor& output) {
  check_same_dtype(input, output, "all_gather");
  const nxd::DType dtype = engine_dtype(input);
  if (output.nbytes() != input.nbytes() * group.size()) {
    throw nb::value_error("all_gather: the output must hold group size times the input's elements");
  }
  nb::gil_scoped_release release;
  group.all_gather(input.data(), output.data(), input.nbytes(), dtype);
}

void reduce_scatter(nxd::ShmGroup& group, const CpuTensor& input, CpuTensor& output, const std::string& op) {
  check_same_dtype(input, output, "reduce_scatter");
  const nxd::DType dtype = engine_dtype(input);
  const nxd::ReduceOp reduce = reduce_op(op);
  if (input.size() != output.size() * group.size()) {
    throw nb::value_error("reduce_scatter: the input must hold group size times the output's elements");
  }
  nb::gil_scoped_release release;
  group.reduce_scatter(input.data(), output.data(), output.size(), dtype, reduce);
}

void all_reduce(nxd::ShmGroup& group, CpuTensor& tensor, const std::string& op) {
  const nxd::DType dtype = engine_dtype(tensor);
  const nxd::ReduceOp reduce = reduce_op(op);
  nb::gil_scoped_release release;
  group.all_reduce(tensor.data(), tensor.size(), dtype, reduce);
}

void broadcast(nxd::ShmGroup& group, CpuTensor& tensor, int root) {
  const nxd::DType dtype = engine_dtype(tensor);
  nb::gil_scoped_release release;
  group.broadcast(tensor.data(), tensor.nbytes(), root, dtype);
}

void announce_elsewhere(nxd::ShmGroup& group, const std::string& collective, const std::string& reason,
                        uint64_t count, const std::string& op, int root) {
  const nxd::Collective kind = collective_named(collective);
  const nxd::Elsewhere why = elsewhere_named(reason);
  const nxd::ReduceOp reduce = reduce_op(op);
  nb::gil_scoped_release release;
  group.announce_elsewhere(kind, why, count, reduce, root);
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "neuronx_distributed C++ core: the shared-memory collective engine";
  m.attr("ABI_VERSION") = 3;
  // Group handles are cached for the life of the process and freed after nanobind's leak check.
  nb::set_leak_warnings(false);

  nb::exception<nxd::CollectiveFailure>(m, "CollectiveFailure", PyExc_RuntimeError);
  nb::exception<nxd::SegmentError>(m, "SegmentError", PyExc_OSError);

  m.def("segment_name", &nxd::segment_name, "token"_a,
        "The shared-memory name for a group created by this process: /nxd-<uid>-<pidns>-<pid>-<token>.");
  m.def("remove_orphaned_segments", &nxd::remove_orphaned_segments,
        "Remove this user's segments in /dev/shm whose creating process is gone; returns how many.");

  nb::class_<nxd::ShmGroup>(m, "ShmGroup",
                            "One group of ranks on this host sharing a memory segment. Rank 0 calls create(), "
                            "the others attach() to the name it shares; then all call wait_for_peers().")
      .def_static(
          "create",
          [](const std::string& segment, int rank, const std::vector<int>& global_ranks, size_t slot_bytes,
             double timeout_s) {
            return interruptible(nxd::ShmGroup::create(make_config(segment, rank, global_ranks, slot_bytes, timeout_s)));
          },
          "segment"_a, "rank"_a, "global_ranks"_a, "slot_bytes"_a, "timeout_s"_a)
      .def_static(
          "attach",
          [](const std::string& segment, int rank, const std::vector<int>& global_ranks, size_t slot_bytes,
             double timeout_s) {
            return interruptible(nxd::ShmGroup::attach(make_config(segment, rank, global_ranks, slot_bytes, timeout_s)));
          },
          "segment"_a, "rank"_a, "global_ranks"_a, "slot_bytes"_a, "timeout_s"_a)
      .def("wait_for_peers", &nxd::ShmGroup::wait_for_peers, nb::call_guard<nb::gil_scoped_release>(),
           "Block until every rank has mapped the segment, then remove its name from /dev/shm.")
      .def("all_reduce", &all_reduce, "tensor"_a.noconvert(), "op"_a,
           "Reduce `tensor` (sum or max) in place; every rank ends with identical values.")
      .def("all_gather", &all_gather, "input"_a.noconvert(), "output"_a.noconvert(),
           "Fill `output` with every rank's `input`, in rank order.")
      .def("reduce_scatter", &reduce_scatter, "input"_a.noconvert(), "output"_a.noconvert(), "op"_a,
           "`input` holds one row per rank; `output` receives the reduction of this rank's row.")
      .def("broadcast", &broadcast, "tensor"_a.noconvert(), "root"_a,
           "Overwrite `tensor` with the copy of group rank `root`.")
      .def("barrier", &nxd::ShmGroup::barrier, nb::call_guard<nb::gil_scoped_release>(),
           "Return once every rank has entered.")
      .def("announce_elsewhere", &announce_elsewhere, "collective"_a, "reason"_a, "count"_a, "op"_a = "sum",
           "root"_a = -1,
           "Publish, as one step, that this rank runs `collective` on torch.distributed (reason 'other_engine') "
           "or raises for its input (reason 'invalid_input'); every rank fails at once if a peer runs that step "
           "on shared memory instead.")
      .def_prop_ro("rank", &nxd::ShmGroup::rank)
      .def_prop_ro("size", &nxd::ShmGroup::size)
      .def_prop_ro("slot_bytes", &nxd::ShmGroup::slot_bytes)
      .def_prop_ro("label", &nxd::ShmGroup::label)
      .def_prop_rw("timeout", &nxd::ShmGroup::timeout, &nxd::ShmGroup::set_timeout,
                   "Seconds to wait for a peer before the collective fails.");
}
