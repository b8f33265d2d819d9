// Exception types thrown by the mtht core. The Python binding maps each one to the
// Python exception of the same name; the core itself knows nothing of Python.
#pragma once

#include <stdexcept>
#include <string>

namespace mtht {

// Bad argument: wrong length, shape, non-finite value, invalid configuration.
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A name (slot, table) that does not exist.
struct KeyError : std::out_of_range {
  using std::out_of_range::out_of_range;
};

// A configuration that is valid but not supported by this build.
struct NotImplementedError : std::logic_error {
  using std::logic_error::logic_error;
};

// A corrupt, truncated or mismatched file.
struct IOError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace mtht
